"""The engine against HF transformers + PEFT (fp32): mixed batches of the base and
adapters of different ranks and configs, more adapters than max_loras."""

from __future__ import annotations

import pytest

from loraplex import SamplingParams
from tests.engine_utils import (
    GREEDY,
    check_against_hf,
    lora_requests,
    make_llm,
    run_staggered,
)
from tests.fixtures import ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_matches_peft(arch, tiny_models, tiny_adapters, prompts):
    base, adapters = tiny_models[arch], tiny_adapters[arch]
    reqs = lora_requests(adapters)
    names = [None, *sorted(reqs)]  # base + 5 adapters, max_loras=2 below
    batch = [(prompts[i % len(prompts)], names[i % len(names)]) for i in range(12)]
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=16, max_cpu_loras=3)
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in batch], GREEDY,
                        lora_request=[reqs[n] if n else None for _, n in batch], use_tqdm=False)
    check_against_hf(outs, base, [adapters[n] if n else None for _, n in batch],
                     [p for p, _ in batch])
    # adapters really changed something
    texts = {n: o.outputs[0].token_ids for (p, n), o in zip(batch, outs) if p == prompts[0]}
    assert len(set(map(tuple, texts.values()))) == len(texts)
    # more adapters than the host tier holds: every one was read, some were evicted
    lm = llm.llm_engine.lora_manager
    assert lm.stats.host_misses >= len(reqs) and lm.num_host <= 3


def test_all_adapters_in_one_step(tiny_models, tiny_adapters, prompts):
    """max_loras large enough: base + 5 adapters decode in the very same steps."""
    base, adapters = tiny_models["llama"], tiny_adapters["llama"]
    reqs = lora_requests(adapters)
    names = [None, *sorted(reqs)]
    llm = make_llm(base, enable_lora=True, max_loras=5, max_lora_rank=16)
    engine = llm.llm_engine
    for req in reqs.values():  # loaded up front: a cold adapter's request would wait
        engine.add_lora(req)
    for i, n in enumerate(names):
        engine.add_request(str(i), {"prompt_token_ids": prompts[i % len(prompts)]}, GREEDY,
                           lora_request=reqs[n] if n else None)
    finished = {out.request_id: out for out in engine.step() if out.finished}
    # the first step was one prefill holding the base and every adapter together
    running = engine.scheduler.running
    assert len(running) == len(names)
    assert {s.lora_int_id for s in running} == {0, *(r.lora_int_id for r in reqs.values())}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    outs = [finished[str(i)] for i in range(len(names))]
    check_against_hf(outs, base, [adapters[n] if n else None for n in names],
                     [prompts[i % len(prompts)] for i in range(len(names))])


def test_requests_joining_a_running_batch_match_peft(tiny_models, tiny_adapters, prompts):
    """Requests arriving while others decode are prefilled in the same forward as those
    decodes (mixed steps); every output still equals HF + PEFT run alone. Base and
    adapters of ranks 4 / 8 / 16, more adapters than max_loras."""
    base, adapters = tiny_models["llama"], tiny_adapters["llama"]
    reqs = lora_requests(adapters)
    names = [None, "r8_all", "r4_qv", None, "r16_rslora", "r8_patterns", "r8_all"]
    jobs = [(2 * i, prompts[i % len(prompts)], reqs[n] if n else None)
            for i, n in enumerate(names)]
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=16)
    for req in reqs.values():  # in host memory: arrivals are not held back by reads
        llm.llm_engine.add_lora(req)
    outs, mixed = run_staggered(llm.llm_engine, jobs, GREEDY)
    assert mixed > 0 and llm.llm_engine.model_runner.num_mixed_steps == mixed
    for out in outs:  # the queue ends when the forward starts, the first token after it
        m = out.metrics
        assert m["arrival_time"] <= m["first_scheduled_time"] < m["first_token_time"]
    check_against_hf(outs, base, [adapters[n] if n else None for n in names],
                     [p for _, p, _ in jobs])


@pytest.mark.parametrize("budget", [5, 8])  # mid-block and block-aligned chunks
def test_chunked_prefill_matches_peft(budget, tiny_models, tiny_adapters, prompts):
    """Prompts longer than max_num_batched_tokens are computed a chunk per step, each later
    chunk attending to the earlier ones in the paged cache, beside running decodes and
    other prompts' chunks; the outputs equal HF + PEFT. Base and ranks 4 / 8 / 16, more
    adapters than max_loras."""
    base, adapters = tiny_models["llama"], tiny_adapters["llama"]
    reqs = lora_requests(adapters)
    names = [None, "r8_all", "r4_qv", "r16_rslora", None, "r8_all"]
    jobs = [(i, prompts[-1 - i % 3], reqs[n] if n else None) for i, n in enumerate(names)]
    assert min(len(p) for _, p, _ in jobs) > 2 * budget  # three chunks or more each
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=16, block_size=8,
                   max_num_batched_tokens=budget)
    for req in reqs.values():
        llm.llm_engine.add_lora(req)
    engine = llm.llm_engine
    steps_before = engine.scheduler.num_steps
    outs, mixed = run_staggered(engine, jobs, GREEDY)
    assert mixed > 0
    prompt_tokens = sum(len(p) for _, p, _ in jobs)
    assert engine.scheduler.num_steps - steps_before >= prompt_tokens / budget
    check_against_hf(outs, base, [adapters[n] if n else None for n in names],
                     [p for _, p, _ in jobs])


def test_preemption_keeps_outputs(tiny_models, tiny_adapters, prompts):
    """A tiny KV budget forces preemption by recompute; outputs do not change."""
    base, adapters = tiny_models["qwen2"], tiny_adapters["qwen2"]
    reqs = lora_requests(adapters)
    names = [None, "r8_all", "r16_rslora", None, "r4_qv", "r8_all"]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    llm = make_llm(base, enable_lora=True, max_loras=3, max_lora_rank=16, max_model_len=64,
                   num_gpu_blocks_override=12, block_size=8)
    batch = [prompts[i % len(prompts)] for i in range(len(names))]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params,
                        lora_request=[reqs[n] if n else None for n in names], use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    check_against_hf(outs, base, [adapters[n] if n else None for n in names], batch)


def test_sharded_bin_tied_and_llama3_rope(tmp_path, prompts):
    """Checkpoint variants load the same way: sharded safetensors, .bin, tied embeddings,
    Llama-3 rope scaling."""
    from tests.fixtures import make_peft_adapter, make_tiny_model

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    variants = {
        "sharded": dict(sharded=True),
        "bin": dict(safetensors=False),
        "tied": dict(tie_word_embeddings=True, rope_scaling=rope),
    }
    for name, kw in variants.items():
        base = make_tiny_model(tmp_path / name, "llama", seed=7, **kw)
        adapter = make_peft_adapter(base, tmp_path / f"{name}_lora", r=8, seed=3)
        from loraplex import LoRARequest

        llm = make_llm(base, enable_lora=True, max_lora_rank=8)
        outs = llm.generate([{"prompt_token_ids": prompts[3]}] * 2, GREEDY,
                            lora_request=[None, LoRARequest("a", 1, str(adapter))],
                            use_tqdm=False)
        check_against_hf(outs, base, [None, adapter], [prompts[3]] * 2)
