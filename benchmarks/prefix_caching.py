"""Requests that share a long prefix (a system prompt) per adapter: prefix caching on / off.

Each adapter has its tenants' shared system prompt; requests add a short question. One
request per adapter runs first (its prefix is computed then), then a batch of requests
over the adapters is timed. With prefix caching the batch computes only the questions
(its prompts start from the cached blocks of their own adapter's prefix); without, every
prompt is computed whole. Reported per setting: the batch's wall time, mean and p90 time
to first token, output tok/s, and the prompt tokens found in the cache.

    python benchmarks/prefix_caching.py                          # CPU, the small shape
    python benchmarks/prefix_caching.py --layers 4 --requests 8 --prefix-len 256  # quick
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


def run(base: Path, adapters: list[Path], a: argparse.Namespace, caching: bool) -> dict:
    from loraplex import LLM, LoRARequest, SamplingParams

    llm = LLM(model=str(base), dtype=a.dtype, enable_lora=True, max_loras=len(adapters),
              max_lora_rank=a.rank, max_num_seqs=a.requests, max_model_len=a.max_model_len,
              enable_prefix_caching=caching)
    reqs = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    gen = torch.Generator().manual_seed(0)
    system = torch.randint(3, a.vocab, (a.prefix_len,), generator=gen).tolist()
    questions = torch.randint(3, a.vocab, (a.requests, a.question_len), generator=gen).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=a.new_tokens, ignore_eos=True)
    first = [{"prompt_token_ids": system + q} for q in questions[:len(reqs)]]
    llm.generate(first, params, lora_request=reqs, use_tqdm=False)  # the prefixes, computed
    prompts = [{"prompt_token_ids": system + q} for q in questions]
    loras = [reqs[i % len(reqs)] for i in range(a.requests)]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    seconds = time.perf_counter() - start
    ttft = sorted(o.metrics["first_token_time"] - o.metrics["arrival_time"] for o in outs)
    return {"prefix_caching": caching, "seconds": seconds,
            "out_tok_s": a.requests * a.new_tokens / seconds,
            "ttft_mean_s": statistics.mean(ttft), "ttft_p90_s": ttft[int(0.9 * len(ttft))],
            "cached_prompt_tokens": sum(o.num_cached_tokens for o in outs),
            "prompt_tokens": sum(len(p["prompt_token_ids"]) for p in prompts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap, adapters=4)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prefix-len", type=int, default=512, help="the shared system prompt")
    ap.add_argument("--question-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent / "results" / "prefix_caching_cpu.json")
    a = ap.parse_args()

    base, adapters = build_shape(a)
    runs = []
    for rep in range(a.repeats):  # interleaved, so a slow spell of the machine hits both
        for caching in (False, True):
            r = run(base, adapters, a, caching) | {"repeat": rep}
            runs.append(r)
            print(f"prefix caching {'on ' if caching else 'off'}: {r['seconds']:6.2f} s, "
                  f"{r['out_tok_s']:6.1f} out tok/s, TTFT mean {r['ttft_mean_s']:5.2f} s "
                  f"p90 {r['ttft_p90_s']:5.2f} s; {r['cached_prompt_tokens']} of "
                  f"{r['prompt_tokens']} prompt tokens cached", flush=True)
    write_json(a.out, {"benchmark": "prefix_caching", "command": " ".join(sys.argv),
                       "config": vars(a) | {"workdir": str(a.workdir), "out": str(a.out)},
                       "machine": machine_info(), "runs": runs})


if __name__ == "__main__":
    main()
