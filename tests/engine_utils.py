"""Helpers for engine tests: build an LLM over the tiny fixtures, run reference checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loraplex import LLM, LoRARequest, SamplingParams
from tests.fixtures import assert_greedy_close, hf_greedy, hf_logprobs

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)


def lora_requests(adapters: dict[str, Path]) -> dict[str, LoRARequest]:
    return {name: LoRARequest(name, i + 1, str(path))
            for i, (name, path) in enumerate(sorted(adapters.items()))}


def check_against_hf(outputs, base: Path, adapter_dirs: list[Path | None],
                     prompts: list[list[int]], atol: float = 1e-4) -> None:
    """Greedy tokens identical to HF+PEFT run alone; logprobs of each chosen token close."""
    for out, adapter, prompt in zip(outputs, adapter_dirs, prompts, strict=True):
        got = out.outputs[0].token_ids
        want = hf_greedy(base, adapter, prompt, len(got))
        if got != want:  # allowed only where the reference itself has a near-tie (< 1e-4)
            assert_greedy_close(got, base, adapter, prompt, tie_tol=1e-4)
        ref = hf_logprobs(base, adapter, prompt + got[:-1])[len(prompt) - 1:]
        for step, (tok, lp) in enumerate(zip(got, out.outputs[0].logprobs, strict=True)):
            for t, logprob in lp.items():
                want_lp = ref[step, t].item()
                assert abs(logprob.logprob - want_lp) < atol, (
                    f"adapter {adapter}, step {step}, token {t}: logprob {logprob.logprob!r}, "
                    f"HF {want_lp!r}, diff {abs(logprob.logprob - want_lp):.3e} > {atol}; "
                    f"prompt {prompt}, tokens {got}")
            assert tok in lp


# A Linear's input value right at a rounding boundary of its activation quantization
# (int8, FP8, NVFP4) may round the other way here than in HF (LoRA deltas summed in another
# order, 1e-7 apart): one step on one value, which moves that step's logprobs by up to ~0.1
# and leaves the next ones be.
FLIP = 0.1


def check_fake_quant_against_hf(outs, ref_dir: Path, adapters: list[Path | None],
                                prompts: list[list[int]]) -> None:
    """Outputs of a base whose activations are quantized (W8A8, FP8, NVFP4) against HF +
    PEFT running the compressed-tensors package's forward: each token HF's greedy pick
    (unless HF's top two are within FLIP), every logprob within FLIP of HF's and three
    quarters of them within 1e-4 (without the activations quantized, or quantized
    otherwise, nearly none are)."""
    close, total = 0, 0
    for out, adapter, prompt in zip(outs, adapters, prompts, strict=True):
        got = out.outputs[0].token_ids
        assert_greedy_close(got, ref_dir, adapter, prompt, tie_tol=FLIP)
        ref = hf_logprobs(ref_dir, adapter, prompt + got[:-1])[len(prompt) - 1:]
        for step, lps in enumerate(out.outputs[0].logprobs):
            diff = max(abs(lp.logprob - ref[step, t].item()) for t, lp in lps.items())
            assert diff < FLIP, (adapter, prompt, step, diff)
            close, total = close + (diff < 1e-4), total + 1
    assert close >= 0.75 * total, f"only {close} of {total} logprobs within 1e-4 of HF's"


def make_llm(base: Path, **kw) -> LLM:
    kw.setdefault("dtype", "float32")
    kw.setdefault("max_model_len", 256)
    kw.setdefault("cpu_kv_cache_gib", 0.05)
    return LLM(model=str(base), **kw)



def run_staggered(engine, jobs: list[tuple[int, list[int], LoRARequest | None]],
                  params: SamplingParams) -> tuple[list, int]:
    """Add job i = (step, prompt, adapter) before engine step `step`, run to the end.
    Returns the final outputs in job order and the number of steps whose outputs held both
    a first token (a prefill) and a later one (a decode): mixed steps seen from outside."""
    finished, mixed, step = {}, 0, 0
    while len(finished) < len(jobs):
        for i, (at, prompt, lora) in enumerate(jobs):
            if at == step:
                engine.add_request(str(i), {"prompt_token_ids": prompt}, params,
                                   lora_request=lora)
        outs = engine.step()
        lengths = {len(o.outputs[0].token_ids) for o in outs}
        mixed += 1 in lengths and len(lengths - {1}) > 0
        finished.update((o.request_id, o) for o in outs if o.finished)
        step += 1
    return [finished[str(i)] for i in range(len(jobs))], mixed


def check_shared_prefixes(base: Path, adapters: dict[str, Path], prompts: list[list[int]],
                          atol: float = 2e-4) -> None:
    """Requests sharing a long prefix (block size 8) on the base, r8_all and r4_qv; two
    compute it first, the rest arrive later and must start from their own weights' cached
    blocks; every output equals HF + PEFT. (atol: these are the longest prompts, 61
    tokens; with transformers 5.25 one top-3 logprob here is 1.4e-4 off HF's fp32
    reference, where the same code was within 1e-4 with 5.23.)"""
    reqs = lora_requests(adapters)
    system = prompts[-1]  # the longest: several blocks of 8
    names = [None, "r8_all", "r4_qv"]
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=16, block_size=8)
    for n in names[1:]:
        llm.llm_engine.add_lora(reqs[n])
    first = system + prompts[0][1:]
    jobs = [(0, first, None), (0, first, reqs["r8_all"])]
    jobs += [(4 + i, system + p[1:], reqs[n] if n else None)
             for i, (p, n) in enumerate([(p, n) for p in prompts[:3] for n in names])]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=3)
    outs, _ = run_staggered(llm.llm_engine, jobs, params)
    cached = [o.num_cached_tokens for o in outs]
    # nothing was cached yet; r4_qv's first request finds only other weights' blocks
    assert cached[:2] == [0, 0] and cached[4] == 0, cached
    assert all(c >= len(system) // 8 * 8 for c in cached[2:4] + cached[5:]), cached
    stats = llm.llm_engine.get_stats()
    assert stats.prefix_cache_hits == sum(cached) and stats.prefix_cache_queries > 0
    check_against_hf(outs, base, [adapters[lr.lora_name] if lr else None for _, _, lr in jobs],
                     [p for _, p, _ in jobs], atol)


def check_base_and_adapter(llm: LLM, base: Path, adapter: Path, prompts: list[list[int]]
                           ) -> None:
    """The base on the first prompt and `adapter` on the next two, in one generate call,
    each output HF + PEFT's."""
    req = lora_requests({"adapter": adapter})["adapter"]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:3]], GREEDY,
                        lora_request=[None, req, req], use_tqdm=False)
    check_against_hf(outs, base, [None, adapter, adapter], prompts[:3])


def check_mixed_batch(llm: LLM, base: Path, adapters: dict[str, Path], prompts: list[list[int]],
                      extra: int = 4) -> None:
    """Every adapter and the base on the first prompt, then `extra` more requests over the
    other prompts, in one generate call: each output equals HF + PEFT alone, and every
    adapter changed the first prompt's output."""
    reqs = lora_requests(adapters)
    names = [None, *adapters]
    batch = [(prompts[0], n) for n in names] + [
        (prompts[1 + i % (len(prompts) - 1)], names[(i + 1) % len(names)])
        for i in range(extra)]
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in batch], GREEDY,
                        lora_request=[reqs[n] if n else None for _, n in batch], use_tqdm=False)
    check_against_hf(outs, base, [adapters[n] if n else None for _, n in batch],
                     [p for p, _ in batch])
    first = {tuple(o.outputs[0].token_ids) for o in outs[:len(names)]}
    assert len(first) == len(names), "an adapter left the output unchanged"


def check_prefix_cache_repeat(llm: LLM, base: Path, adapters: dict[str, Path], name: str,
                              prompt: list[int], block_size: int) -> None:
    """`prompt` under the adapter `name` of `adapters` (lora_requests' ids) twice: the
    second run starts from the first's cached blocks and gives its tokens and logprobs,
    which are HF + PEFT's."""
    req, adapter = lora_requests(adapters)[name], adapters[name]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)
    first, again = (llm.generate([{"prompt_token_ids": prompt}], params, lora_request=req,
                                 use_tqdm=False)[0] for _ in range(2))
    assert again.num_cached_tokens >= len(prompt) // block_size * block_size - block_size > 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    for a, b in zip(again.outputs[0].logprobs, first.outputs[0].logprobs, strict=True):
        for t, lp in b.items():
            assert abs(a[t].logprob - lp.logprob) < 1e-5
    check_against_hf([again], base, [adapter], [prompt])


def check_engine_on_kernel(kernels, monkeypatch, base: Path, adapter: Path,
                           prompts: list[list[int]], **llm_kw) -> None:
    """An engine whose quantized linears run `kernels.quant_matmul` (a Triton module, under
    the interpreter on the CPU) against the same engine on the torch path, with `adapter`
    beside the base in one batch: the same tokens, logprobs within 1e-4 (the torch path
    is held against HF + PEFT elsewhere)."""
    lora = [None, LoRARequest("a", 1, str(adapter))]
    jobs = [{"prompt_token_ids": p} for p in prompts[:2]]
    calls, real = [], kernels.quant_matmul
    monkeypatch.setattr(kernels, "quant_matmul", lambda x, lay: calls.append(lay) or real(x, lay))
    outs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("LORAPLEX_QUANT_BACKEND", backend)
        llm = make_llm(base, enable_lora=True, max_lora_rank=8, **llm_kw)
        layer = llm.llm_engine.model.model.layers[0].mlp.down_proj.base_layer
        calls.clear()
        outs[backend] = llm.generate(jobs, GREEDY, lora_request=lora, use_tqdm=False)
        assert any(c is layer for c in calls) == (backend == "triton")
    for t, w in zip(outs["triton"], outs["torch"], strict=True):
        assert t.outputs[0].token_ids == w.outputs[0].token_ids
        for lp_t, lp_w in zip(t.outputs[0].logprobs, w.outputs[0].logprobs, strict=True):
            for tok, entry in lp_w.items():
                assert abs(lp_t[tok].logprob - entry.logprob) < 1e-4


def refused_alone(engine, bad: list[tuple[Any, str]], params: SamplingParams) -> list:
    """Each of the `bad` (prompt, error regex) fails at add_request with its ValueError,
    queueing nothing; then the requests queued before run to the end: their final
    outputs, in the order they finished."""
    for prompt, match in bad:
        with pytest.raises(ValueError, match=match):
            engine.add_request("bad", prompt, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    return outs
