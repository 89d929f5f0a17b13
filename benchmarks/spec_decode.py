"""Ngram speculative decoding against plain decoding, same engine options, same run.

Greedy generate of `batch` prompts over the base and adapters mixed, with and without
`speculative_config` (alternated `repeat` times, the fastest of each kept); output
tokens per second (prefill included), engine steps, the
drafts' acceptance, and whether the outputs are identical (they must be). A random
model's acceptance depends on how much its output repeats itself, so the figures say
what the overhead and the gain are on that workload, not on a real model's.

    python benchmarks/spec_decode.py --hidden 256 --layers 4 --vocab 8000   # quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timer, add_shape_args, build_shape, machine_info, write_json  # noqa: E402


def run(base: Path, adapters: list[Path], prompts: list[list[int]], new_tokens: int,
        rank: int, spec: dict | None) -> dict:
    from loraplex import LLM, LoRARequest, SamplingParams

    llm = LLM(model=str(base), dtype="float32", enable_lora=True, max_loras=len(adapters),
              max_lora_rank=rank, max_num_seqs=len(prompts), max_model_len=1024,
              speculative_config=spec)
    reqs = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    loras = [None if i % (len(reqs) + 1) == 0 else reqs[i % (len(reqs) + 1) - 1]
             for i in range(len(prompts))]
    inputs = [{"prompt_token_ids": p} for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(inputs[:2], SamplingParams(max_tokens=2), lora_request=loras[:2],
                 use_tqdm=False)  # warm-up (adapters load here)
    engine = llm.llm_engine
    steps = engine.scheduler.num_steps
    before = engine.get_stats().spec_decode
    with Timer() as t:
        outs = llm.generate(inputs, params, lora_request=loras, use_tqdm=False)
    result = {"seconds": t.seconds, "steps": engine.scheduler.num_steps - steps,
              "tokens_per_s": len(prompts) * new_tokens / t.seconds,
              "tokens": [o.outputs[0].token_ids for o in outs]}
    after = engine.get_stats().spec_decode
    if after is not None:
        drafted = after.num_draft_tokens - before.num_draft_tokens
        accepted = after.num_accepted_tokens - before.num_accepted_tokens
        result.update(drafts=after.num_drafts - before.num_drafts, draft_tokens=drafted,
                      accepted_tokens=accepted,
                      acceptance_rate=accepted / drafted if drafted else None)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap, adapters=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each, best kept")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--lookup-max", type=int, default=3)
    ap.add_argument("--lookup-min", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results"
                    / "spec_decode_cpu.json")
    a = ap.parse_args()
    base, adapters = build_shape(a)
    gen = torch.Generator().manual_seed(0)
    # prompts that repeat a random phrase (text that quotes itself)
    prompts = []
    for _ in range(a.batch):
        phrase = torch.randint(3, a.vocab, (16,), generator=gen).tolist()
        prompts.append([1] + (phrase * (a.prompt_len // 16 + 1))[:a.prompt_len - 1])
    spec = {"method": "ngram", "num_speculative_tokens": a.k,
            "prompt_lookup_max": a.lookup_max, "prompt_lookup_min": a.lookup_min}
    runs: dict[str, list[dict]] = {"plain": [], "ngram": []}
    for _ in range(a.repeat):  # alternated, so drift on a shared machine hits both
        runs["plain"].append(run(base, adapters, prompts, a.new_tokens, a.rank, None))
        runs["ngram"].append(run(base, adapters, prompts, a.new_tokens, a.rank, spec))
    identical = all(r["tokens"] == runs["plain"][0]["tokens"] for rs in runs.values()
                    for r in rs)
    plain, drafted = (min(rs, key=lambda r: r["seconds"]) for rs in runs.values())
    for rs in runs.values():
        for r in rs:
            r.pop("tokens")
    write_json(a.out, {"machine": machine_info(), "args": {k: str(v) for k, v in vars(a).items()},
                       "speculative_config": spec, "plain": plain, "ngram": drafted,
                       "all_runs": runs,
                       "outputs_identical": identical,
                       "speedup": drafted["tokens_per_s"] / plain["tokens_per_s"]})
    print(f"plain {plain['tokens_per_s']:.1f} tok/s in {plain['steps']} steps; ngram "
          f"{drafted['tokens_per_s']:.1f} tok/s in {drafted['steps']} steps, acceptance "
          f"{drafted['acceptance_rate']}; identical outputs: {identical}")


if __name__ == "__main__":
    main()
