"""Offline generate throughput: loraplex vs HF transformers + PEFT, in the same run.

Cases: the bare base, one adapter for every request, and N adapters mixed in one batch.
Output tokens per second over a whole `generate` of `batch` prompts (prefill included).

    python benchmarks/throughput.py                      # issue 3's CPU shape
    python benchmarks/throughput.py --hidden 256 --layers 4 --batch 8 --new-tokens 16  # quick
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Timer,
    add_shape_args,
    build_shape,
    hf_peft_model,
    machine_info,
    write_json,
)


def run_loraplex(base: Path, adapters: list[Path], prompts: list[list[int]], new_tokens: int,
                 case: str, max_loras: int, rank: int) -> float:
    from loraplex import LLM, LoRARequest, SamplingParams

    enable = case != "base"
    llm = LLM(model=str(base), dtype="float32", enable_lora=enable, max_loras=max_loras,
              max_lora_rank=rank, max_num_seqs=len(prompts), max_model_len=1024)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    reqs = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    loras = [None if case == "base" else reqs[0] if case == "one" else reqs[i % len(reqs)]
             for i in range(len(prompts))]
    inputs = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(inputs[:2], SamplingParams(max_tokens=2), lora_request=loras[:2],
                 use_tqdm=False)  # warm-up (adapters load here)
    with Timer() as t:
        outs = llm.generate(inputs, params, lora_request=loras, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
    return t.seconds


def run_hf(base: Path, adapters: list[Path], prompts: list[list[int]], new_tokens: int,
           case: str) -> float:
    model = hf_peft_model(base, adapters if case != "base" else None)
    kwargs = {}
    if case != "base":
        names = ["a0" if case == "one" else f"a{i % len(adapters)}" for i in range(len(prompts))]
        kwargs["adapter_names"] = names
    ids = torch.tensor(prompts)
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
               pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:2], max_new_tokens=2, do_sample=False, pad_token_id=0,
                       **({"adapter_names": kwargs["adapter_names"][:2]} if kwargs else {}))
        with Timer() as t:
            out = model.generate(ids, **gen, **kwargs)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return t.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap, adapters=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent / "results" / "throughput_cpu.json")
    a = ap.parse_args()

    base, adapters = build_shape(a)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, a.vocab, (a.batch, a.prompt_len), generator=gen).tolist()
    total = a.batch * a.new_tokens
    results: dict[str, dict] = {}
    for case in ("base", "one", "mixed"):
        s = run_loraplex(base, adapters, prompts, a.new_tokens, case, a.adapters, a.rank)
        results[f"loraplex_{case}"] = {"seconds": s, "out_tok_s": total / s}
        print(f"loraplex {case:6s} {total / s:8.1f} tok/s ({s:.2f} s)", flush=True)
        gc.collect()
        if not a.skip_hf:
            s = run_hf(base, adapters, prompts, a.new_tokens, case)
            results[f"hf_{case}"] = {"seconds": s, "out_tok_s": total / s}
            print(f"hf+peft  {case:6s} {total / s:8.1f} tok/s ({s:.2f} s)", flush=True)
            gc.collect()
    ratios = {"mixed_vs_own_base": results["loraplex_mixed"]["out_tok_s"]
              / results["loraplex_base"]["out_tok_s"]}
    if not a.skip_hf:
        ratios["mixed_vs_hf_peft_mixed"] = (results["loraplex_mixed"]["out_tok_s"]
                                            / results["hf_mixed"]["out_tok_s"])
        ratios["base_vs_hf_base"] = (results["loraplex_base"]["out_tok_s"]
                                     / results["hf_base"]["out_tok_s"])
    print({k: round(v, 3) for k, v in ratios.items()})
    write_json(a.out, {"benchmark": "throughput", "command": " ".join(sys.argv),
                       "config": vars(a) | {"workdir": str(a.workdir), "out": str(a.out)},
                       "machine": machine_info(), "results": results, "ratios": ratios})


if __name__ == "__main__":
    main()
