"""Running decodes while a long prompt arrives: chunked prefill against whole prompts.

A batch of requests over several adapters is decoding when one long prompt comes in.
Prefilled whole, its step holds every running request for the whole prompt's compute;
chunked (`max_num_batched_tokens` = the chunk), the prompt is spread over several steps
and each one costs the running requests about one chunk's worth. Reported per setting:
the running requests' worst inter-token gap (the longest step they sat in, from the
prompt's arrival to a few steps after its first token), their median step until that
token, the long prompt's time to first token, the window's total time, and a step with
no prompt in it after the window (the gap the running requests see otherwise).

    python benchmarks/chunked_prefill.py                          # CPU, the small shape
    python benchmarks/chunked_prefill.py --budgets 0,256 --prompt-len 512 --layers 4  # quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_shape_args, build_shape, machine_info, write_json  # noqa: E402


def run(base: Path, adapters: list[Path], a: argparse.Namespace, budget: int) -> dict:
    """One setting; budget 0 = chunked prefill off (every prompt whole)."""
    from loraplex import LLM, LoRARequest, SamplingParams

    llm = LLM(model=str(base), dtype=a.dtype, enable_lora=True, max_loras=len(adapters),
              max_lora_rank=a.rank, max_num_seqs=a.running + 1, max_model_len=a.max_model_len,
              enable_chunked_prefill=budget > 0, max_num_batched_tokens=budget or None)
    engine = llm.llm_engine
    reqs = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    for r in reqs:
        engine.add_lora(r)
    gen = torch.Generator().manual_seed(0)
    decode = SamplingParams(temperature=0.0, max_tokens=a.max_model_len, ignore_eos=True)
    for i in range(a.running):
        ids = torch.randint(3, a.vocab, (a.short_len,), generator=gen).tolist()
        engine.add_request(f"run{i}", {"prompt_token_ids": ids}, decode,
                           lora_request=reqs[i % len(reqs)])
    for _ in range(a.warm_steps):  # every running request is decoding
        engine.step()
    long_ids = torch.randint(3, a.vocab, (a.prompt_len,), generator=gen).tolist()
    engine.add_request("long", {"prompt_token_ids": long_ids},
                       SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                       lora_request=reqs[0])
    steps, ttft, steps_to_first, start = [], None, 0, time.perf_counter()
    while ttft is None or len(steps) < steps_to_first + a.after_steps:
        t = time.perf_counter()
        outs = engine.step()
        steps.append(time.perf_counter() - t)
        if ttft is None and any(o.request_id == "long" for o in outs):
            ttft, steps_to_first = time.perf_counter() - start, len(steps)
    window = steps[:steps_to_first]
    return {"budget": budget, "chunked": budget > 0, "steps_to_first_token": steps_to_first,
            # every step counts: the one after the first token rebuilds the decode mirror
            "long_prompt_ttft_s": ttft, "running_worst_gap_ms": 1e3 * max(steps),
            "running_median_step_ms": 1e3 * statistics.median(window),
            "window_total_s": sum(window),
            "decode_step_ms": 1e3 * statistics.median(steps[steps_to_first:]),  # no prompt
            "steps_ms": [1e3 * s for s in steps]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap, adapters=4)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--running", type=int, default=16, help="requests decoding")
    ap.add_argument("--short-len", type=int, default=64, help="their prompt length")
    ap.add_argument("--prompt-len", type=int, default=1536, help="the long prompt")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--budgets", default="0,512,256",
                    help="max_num_batched_tokens per setting; 0 = chunked prefill off")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warm-steps", type=int, default=4)
    ap.add_argument("--after-steps", type=int, default=4)
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent / "results" / "chunked_prefill_cpu.json")
    a = ap.parse_args()

    base, adapters = build_shape(a)
    runs = []
    for rep in range(a.repeats):  # interleaved, so a slow spell of the machine hits all
        for budget in (int(b) for b in a.budgets.split(",")):
            r = run(base, adapters, a, budget) | {"repeat": rep}
            runs.append(r)
            print(f"budget {budget or 'whole':>5}: worst gap {r['running_worst_gap_ms']:7.0f} "
                  f"ms, median step {r['running_median_step_ms']:5.0f} ms, long TTFT "
                  f"{r['long_prompt_ttft_s']:5.2f} s over {r['steps_to_first_token']} steps; "
                  f"decode-only step {r['decode_step_ms']:4.0f} ms",
                  flush=True)
    write_json(a.out, {"benchmark": "chunked_prefill", "command": " ".join(sys.argv),
                       "config": vars(a) | {"workdir": str(a.workdir), "out": str(a.out)},
                       "machine": machine_info(), "runs": runs})


if __name__ == "__main__":
    main()
