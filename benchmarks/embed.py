"""Embeddings throughput: loraplex (runner="pooling") vs HF transformers + PEFT, in the
same run.

Cases: the bare base, one adapter for every prompt, and N adapters mixed in one batch.
Embeddings (last-token pooling, normalized) of `batch` prompts per second (the best of
`repeat` timed runs after an untimed one), and the
largest difference between loraplex's embeddings and HF + PEFT's (the same vectors, or
the comparison means nothing). HF + PEFT runs the whole batch in one forward (mixed:
PEFT's `adapter_names`), asking lm_head for the last position only.

    python benchmarks/embed.py                      # the CPU shape of throughput.py
    python benchmarks/embed.py --hidden 256 --layers 4 --batch 8   # quick
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Timer,
    add_shape_args,
    build_shape,
    hf_peft_model,
    machine_info,
    write_json,
)


def _names(case: str, n_adapters: int, n: int) -> list[int | None]:
    """Each prompt's adapter index (None: the base)."""
    return [None if case == "base" else 0 if case == "one" else i % n_adapters
            for i in range(n)]


def run_loraplex(base: Path, adapters: list[Path], prompts: list[list[int]], case: str,
                 max_loras: int, rank: int, repeat: int) -> tuple[float, torch.Tensor]:
    from loraplex import LLM, LoRARequest

    llm = LLM(model=str(base), runner="pooling", dtype="float32", enable_lora=case != "base",
              max_loras=max_loras, max_lora_rank=rank, max_num_seqs=len(prompts),
              max_model_len=1024, max_num_batched_tokens=len(prompts) * len(prompts[0]))
    reqs = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    loras = [None if i is None else reqs[i]
             for i in _names(case, len(adapters), len(prompts))]
    inputs = [{"prompt_token_ids": p} for p in prompts]
    llm.embed(inputs, lora_request=loras, use_tqdm=False)  # warm-up, adapters load
    best = float("inf")
    for _ in range(repeat):
        with Timer() as t:
            outs = llm.embed(inputs, lora_request=loras, use_tqdm=False)
        best = min(best, t.seconds)
    return best, torch.tensor([o.outputs.embedding for o in outs])


def run_hf(base: Path, adapters: list[Path], prompts: list[list[int]], case: str,
           repeat: int) -> tuple[float, torch.Tensor]:
    model = hf_peft_model(base, adapters if case != "base" else None)
    kwargs = {}
    if case != "base":
        kwargs["adapter_names"] = [f"a{i}" for i in _names(case, len(adapters), len(prompts))]
    ids = torch.tensor(prompts)

    def embed(rows: slice) -> torch.Tensor:
        kw = {k: v[rows] for k, v in kwargs.items()}
        out = model(input_ids=ids[rows], output_hidden_states=True, logits_to_keep=1, **kw)
        return F.normalize(out.hidden_states[-1][:, -1].float(), dim=-1)

    best = float("inf")
    with torch.inference_mode():
        embed(slice(None))  # warm-up
        for _ in range(repeat):
            with Timer() as t:
                vectors = embed(slice(None))
            best = min(best, t.seconds)
    return best, vectors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap, adapters=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each, best kept "
                    "(after one untimed run of the whole batch)")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent / "results" / "embed_cpu.json")
    a = ap.parse_args()

    base, adapters = build_shape(a)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, a.vocab, (a.batch, a.prompt_len), generator=gen).tolist()
    results: dict[str, dict] = {}
    for case in ("base", "one", "mixed"):
        s, ours = run_loraplex(base, adapters, prompts, case, a.adapters, a.rank, a.repeat)
        gc.collect()
        s_hf, theirs = run_hf(base, adapters, prompts, case, a.repeat)
        gc.collect()
        diff = (ours - theirs).abs().max().item()
        results[case] = {"loraplex_seconds": s, "loraplex_embeddings_per_s": a.batch / s,
                         "hf_peft_seconds": s_hf, "hf_peft_embeddings_per_s": a.batch / s_hf,
                         "speedup_vs_hf_peft": s_hf / s, "max_abs_diff": diff}
        print(f"{case:6s} loraplex {a.batch / s:7.1f}/s  hf+peft {a.batch / s_hf:7.1f}/s  "
              f"x{s_hf / s:.2f}  max diff {diff:.2e}", flush=True)
    write_json(a.out, {"benchmark": "embed", "command": " ".join(sys.argv),
                       "config": vars(a) | {"workdir": str(a.workdir), "out": str(a.out)},
                       "machine": machine_info(), "results": results})


if __name__ == "__main__":
    main()
