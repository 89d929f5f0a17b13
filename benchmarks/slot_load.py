"""Adapter swaps: the cost of copying an adapter from the host tier into a device slot.

When requests want more adapters than `max_loras`, slots are swapped every few steps,
on the step loop (on CUDA the copies go on a side stream, but they are issued, and
their Python runs, between steps). This measures `LoRAManager.activate` for batches of
`max_loras` adapters that are all in host memory and none in a slot, so every
activation is a slot load: ms per adapter swapped in, per `max_lora_rank`.

    python benchmarks/slot_load.py                                # small-cpu shape
    python benchmarks/slot_load.py --shape llama-3.1-8b --device cuda   # a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json  # noqa: E402
from many_adapters import SHAPES, model_and_adapters  # noqa: E402

from loraplex import EngineArgs, LLMEngine, LoRARequest  # noqa: E402


def ms_per_load(model_dir: Path, dirs: list[Path], a: argparse.Namespace, max_rank: int
                ) -> list[float]:
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(model_dir), dtype=a.dtype, device=a.device, load_format="dummy",
        enable_lora=True, max_loras=a.max_loras, max_cpu_loras=3 * a.max_loras,
        max_lora_rank=max_rank, max_num_seqs=8, max_model_len=64, enforce_eager=True,
        cpu_kv_cache_gib=a.cpu_kv_cache_gib))
    manager = engine.lora_manager
    reqs = [LoRARequest(f"a{i}", i + 1, str(d)) for i, d in enumerate(dirs[:3 * a.max_loras])]
    for req in reqs:
        manager.add(req)  # into the host tier (read, validated, packed)
    groups = [{r.lora_int_id for r in reqs[g::3]} for g in range(3)]
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    times = []
    for rep in range(a.repeats + 1):  # the first round warms up
        sync()
        start = time.perf_counter()
        for group in groups:  # each group evicts the last: every activation loads a slot
            manager.activate(group)
        sync()
        if rep:
            times.append(1000 * (time.perf_counter() - start) / (3 * a.max_loras))
    del engine
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small-cpu")
    ap.add_argument("--rank", type=int, default=16, help="the adapters' rank")
    ap.add_argument("--max-lora-ranks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--max-loras", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--cpu-kv-cache-gib", type=float, default=8.0,
                    help="the CPU budget the slots come out of (ignored on CUDA)")
    ap.add_argument("--workdir", default=None, help="where model and adapters are written")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    model_dir, dirs = model_and_adapters(a.shape, a.rank, a.workdir, 3 * a.max_loras)
    device = "cuda" if a.device.startswith("cuda") else "cpu"
    out = a.out or Path(__file__).parent / "results" / f"slot_load_{device}.json"
    rows = []
    for max_rank in a.max_lora_ranks:
        times = ms_per_load(model_dir, dirs, a, max_rank)
        rows.append({"max_lora_rank": max_rank, "adapter_rank": a.rank,
                     "ms_per_load_median": statistics.median(times),
                     "ms_per_load_min": min(times), "ms_per_load_max": max(times)})
        print(f"max_lora_rank {max_rank}, r={a.rank} adapters: "
              f"{rows[-1]['ms_per_load_median']:.3f} ms per slot load "
              f"({min(times):.3f}-{max(times):.3f})", flush=True)
    write_json(out, {"benchmark": "slot_load", "config": vars(a) | {"out": str(out)},
                     "machine": machine_info(), "targets": "q_proj,k_proj,v_proj,o_proj",
                     "results": rows})


if __name__ == "__main__":
    main()
