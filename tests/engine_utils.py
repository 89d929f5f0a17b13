"""Helpers for engine tests: build an LLM over the tiny fixtures, run reference checks."""

from __future__ import annotations

from pathlib import Path

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
                assert abs(logprob.logprob - ref[step, t].item()) < atol, (adapter, step, t)
            assert tok in lp


def make_llm(base: Path, **kw) -> LLM:
    kw.setdefault("dtype", "float32")
    kw.setdefault("max_model_len", 256)
    kw.setdefault("cpu_kv_cache_gib", 0.05)
    return LLM(model=str(base), **kw)

