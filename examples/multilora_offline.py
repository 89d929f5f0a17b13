"""One mixed batch: the base model and three LoRA adapters answer the same prompts together.

Runs offline: it writes a small random Llama checkpoint and three PEFT adapters (real HF
directories) under a temp dir, then serves them all from one loraplex engine. Pass
--model/--adapter to use your own checkpoint and PEFT adapters instead.

    python examples/multilora_offline.py
    python examples/multilora_offline.py --model meta-llama/Llama-3.2-1B --adapter sql=/path/to/sql
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from loraplex import LLM, LoRARequest, SamplingParams  # noqa: E402


def build_default(workdir: Path) -> tuple[str, dict[str, str]]:
    from common import make_random_adapter, make_random_llama

    base = make_random_llama(workdir / "base", hidden=256, layers=4, heads=8, kv_heads=4,
                             intermediate=512, vocab=2000)
    specs = {"r8-qv": (8, ["q_proj", "v_proj"]), "r16-attn": (16, ["q_proj", "k_proj",
             "v_proj", "o_proj"]), "r4-mlp": (4, ["gate_proj", "up_proj", "down_proj"])}
    adapters = {name: str(make_random_adapter(base, workdir / name, r=r, targets=t, seed=i))
                for i, (name, (r, t)) in enumerate(specs.items())}
    return str(base), adapters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model dir or hub id (default: a small random Llama)")
    ap.add_argument("--adapter", action="append", default=[], help="name=path of a PEFT dir")
    ap.add_argument("--max-tokens", type=int, default=12)
    a = ap.parse_args()
    if a.model:
        model, adapters = a.model, dict(item.split("=", 1) for item in a.adapter)
        prompts = ["The capital of France is", "def fibonacci(n):"]
    else:
        model, adapters = build_default(Path(tempfile.gettempdir()) / "loraplex-example")
        prompts = [" ".join(f"w{i}" for i in range(s, s + 8)) for s in (10, 500)]
    llm = LLM(model=model, enable_lora=True, max_loras=len(adapters) or 1,
              max_lora_rank=16, dtype="float32")
    reqs = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())}
    columns = ["base", *reqs]
    batch = [(p, c) for p in prompts for c in columns]
    params = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([p for p, _ in batch], params,
                        lora_request=[reqs.get(c) for _, c in batch])
    seconds = time.perf_counter() - start
    table = Table(title="one batch, base + every adapter", show_lines=True)
    table.add_column("prompt")
    for c in columns:
        table.add_column(c)
    for i, p in enumerate(prompts):
        row = outs[i * len(columns):(i + 1) * len(columns)]
        table.add_row(p, *[o.outputs[0].text for o in row])
    console = Console()
    console.print(table)
    n_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    console.print(f"{len(batch)} requests, {n_tokens} tokens in {seconds:.2f} s "
                  f"({n_tokens / seconds:.0f} tok/s)")


if __name__ == "__main__":
    main()
