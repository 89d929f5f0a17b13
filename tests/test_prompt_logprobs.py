"""SamplingParams.prompt_logprobs: the logprob of every prompt token given the ones before
it, with its rank and the top-k, against HF + PEFT; across chunks of a chunked prefill,
beside other requests and adapters, never from the prefix cache, kept over preemption."""

from __future__ import annotations

import pytest

from loraplex import SamplingParams
from tests.engine_utils import check_against_hf, lora_requests, make_llm
from tests.fixtures import hf_logprobs


def check_prompt_logprobs(out, base, adapter, prompt, k: int) -> None:
    entries = out.prompt_logprobs
    assert entries is not None and len(entries) == len(prompt) and entries[0] is None
    ref = hf_logprobs(base, adapter, prompt)
    for i in range(1, len(prompt)):
        row, tok, entry = ref[i - 1], prompt[i], entries[i]
        assert abs(entry[tok].logprob - row[tok].item()) < 1e-4, (adapter, i)
        assert entry[tok].rank == int((row > row[tok]).sum()) + 1
        top = row.topk(k).indices.tolist()
        assert set(top) <= set(entry) <= set(top) | {tok}


def check_batch_with_prompt_logprobs(llm, base, batch: list[list[int]], loras: list,
                                     dirs: list, params: SamplingParams) -> None:
    """One generate call over `batch` (each prompt with its LoRARequest or None): greedy
    tokens and logprobs, and prompt logprobs (top params.prompt_logprobs), equal HF + PEFT
    with the adapter in `dirs`."""
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, lora_request=loras,
                        use_tqdm=False)
    check_against_hf(outs, base, dirs, batch)
    for out, adapter, prompt in zip(outs, dirs, batch):
        check_prompt_logprobs(out, base, adapter, prompt, params.prompt_logprobs)


@pytest.mark.parametrize("budget", [None, 6])
def test_prompt_logprobs_match_peft(budget, tiny_models, tiny_adapters, prompts):
    base, adapters = tiny_models["llama"], tiny_adapters["llama"]
    reqs = lora_requests(adapters)
    names = [None, "r8_all", "r4_qv", "r16_rslora"]
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=16, block_size=8,
                   max_num_batched_tokens=budget)
    batch = [prompts[-1 - i % 2] for i in range(len(names))]
    params = [SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=3)]  # a neighbour without
    outs = llm.generate([{"prompt_token_ids": p} for p in batch],
                        [params[i % 2 == 1] for i in range(len(names))],
                        lora_request=[reqs[n] if n else None for n in names], use_tqdm=False)
    for i, (out, name, prompt) in enumerate(zip(outs, names, batch)):
        if i % 2:
            assert out.prompt_logprobs is None
        else:
            check_prompt_logprobs(out, base, adapters[name] if name else None, prompt, 2)


def test_prompt_logprobs_are_computed_not_taken_from_the_prefix_cache(tiny_models, prompts):
    base = tiny_models["llama"]
    llm = make_llm(base, block_size=8)
    prompt = prompts[-1]
    plain = SamplingParams(temperature=0.0, max_tokens=2)
    assert llm.generate([{"prompt_token_ids": prompt}], plain, use_tqdm=False)[0] \
        .num_cached_tokens == 0
    with_lp = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=0)
    out = llm.generate([{"prompt_token_ids": prompt}], with_lp, use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    check_prompt_logprobs(out, base, None, prompt, 0)
    assert llm.generate([{"prompt_token_ids": prompt}], plain, use_tqdm=False)[0] \
        .num_cached_tokens > 0  # the cache itself still works


def test_prompt_logprobs_survive_preemption(tiny_models, tiny_adapters, prompts):
    base, adapters = tiny_models["qwen2"], tiny_adapters["qwen2"]
    reqs = lora_requests(adapters)
    names = [None, "r8_all", None, "r4_qv"]
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=16, max_model_len=64,
                   num_gpu_blocks_override=12, block_size=8,
                   max_num_seqs=4)  # also: the prompt's logits in slices of 4 rows
    batch = [prompts[i % len(prompts)] for i in range(len(names))]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, prompt_logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params,
                        lora_request=[reqs[n] if n else None for n in names], use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    for out, name, prompt in zip(outs, names, batch):
        check_prompt_logprobs(out, base, adapters[name] if name else None, prompt, 1)
