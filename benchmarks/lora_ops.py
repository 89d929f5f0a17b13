"""LoRA op microbenchmark: one decoder layer's LoRA adds, torch reference vs Triton.

For each projection of one layer (qkv packed, o, gate_up packed, down) of a Llama shape:
`add_lora` (shrink + expand) on 32 decode tokens, over 32 adapters (token i -> slot i) or
1 adapter (every token slot 0), and three rank setups:

    r16          slots of rank 16 (max_lora_rank 16)
    r8/r64       slots alternate rank 8 and 64, padded to max_lora_rank 64
    r8/r64-pad   the same buffers with every rank declared 64: what ignoring the real
                 ranks would cost (issue 7's padding cost)

Beside each time: the bytes of adapter weights the step must read (real ranks of the
active slots only, A and B once each), the implied bandwidth, and the base projection's
own matmul for scale. CUDA times come from torch.cuda.Event (median of --iters runs after
warm-up); CPU times from perf_counter. Triton runs only on CUDA (the interpreter is a
correctness tool, not a timing one).

    python benchmarks/lora_ops.py                       # CPU: torch backend, fp32
    python benchmarks/lora_ops.py --device cuda         # GPU: torch vs Triton, bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json  # noqa: E402

from loraplex.lora.meta import LoRABatchMeta  # noqa: E402
from loraplex.lora.ops import torch_ops  # noqa: E402

# (hidden, q = heads * head_dim, kv = kv_heads * head_dim, intermediate): config.json numbers
SHAPES = {"llama-3.1-8b": (4096, 4096, 1024, 14336), "llama-3.2-1b": (2048, 2048, 512, 8192)}
RANKS = {"r16": (16, [16]), "r8/r64": (64, [8, 64]), "r8/r64-pad": (64, [64])}
TOKENS = 32


def projections(shape: str) -> dict[str, tuple[int, list[int]]]:
    """name -> (in_features, packed output sizes)."""
    h, q, kv, inter = SHAPES[shape]
    return {"qkv": (h, [q, kv, kv]), "o": (q, [h]), "gate_up": (h, [inter, inter]),
            "down": (inter, [h])}


def timer(device: torch.device, iters: int) -> Callable[[Callable[[], None]], tuple[float, float]]:
    """(median, min) seconds of fn() over `iters` runs, after 3 warm-up runs."""
    def run(fn: Callable[[], None]) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times), min(times)
    return run


def backends(device: torch.device) -> dict:
    out = {"torch": torch_ops}
    if device.type == "cuda":
        try:
            from loraplex.lora.ops import triton_ops
        except ImportError:
            print("triton does not import: torch backend only")
        else:
            out["triton"] = triton_ops
    return out


def base_matmul_seconds(x: torch.Tensor, d_out: int, time_fn) -> float:
    weight = torch.randn(d_out, x.shape[1], device=x.device, dtype=x.dtype)
    return time_fn(lambda: F.linear(x, weight))[0]


def bench_ranks(x: torch.Tensor, y: torch.Tensor, sizes: list[int], rank_name: str,
                slots: int, time_fn, ops: dict) -> list[dict]:
    """Every adapters x backend case for one rank setup (fresh slot buffers)."""
    (max_rank, cycle), n, d_in = RANKS[rank_name], len(sizes), x.shape[1]
    a_stacked = torch.randn(slots, max_rank, n, d_in, device=x.device, dtype=x.dtype) * 0.01
    b_stacked = torch.randn(slots, sum(sizes), max_rank, device=x.device, dtype=x.dtype) * 0.01
    ranks = [cycle[s % len(cycle)] for s in range(slots)]
    lora_ranks = torch.tensor(ranks, dtype=torch.int32, device=x.device)
    records = []
    for adapters in (32, 1):
        token_slots = [i % adapters for i in range(TOKENS)]
        meta = LoRABatchMeta.make(token_slots, x.device)
        nbytes = x.element_size() * sum(ranks[s] for s in set(token_slots)) * (n * d_in
                                                                               + sum(sizes))
        for backend, mod in ops.items():
            seconds, fastest = time_fn(lambda mod=mod, meta=meta: mod.add_lora(
                y, x, a_stacked, b_stacked, lora_ranks, meta, sizes))
            records.append({"ranks": rank_name, "adapters": adapters, "backend": backend,
                            "us": 1e6 * seconds, "us_min": 1e6 * fastest,
                            "adapter_bytes": nbytes, "adapter_gb_s": nbytes / seconds / 1e9})
    return records


def bench_projection(name: str, d_in: int, sizes: list[int], slots: int,
                     device: torch.device, dtype: torch.dtype, time_fn, ops: dict) -> list[dict]:
    x = torch.randn(TOKENS, d_in, device=device, dtype=dtype)
    y = torch.zeros(TOKENS, sum(sizes), device=device, dtype=dtype)
    head = {"projection": name, "in": d_in, "out": sizes,
            "base_matmul_us": 1e6 * base_matmul_seconds(x, sum(sizes), time_fn)}
    return [head | r for rank_name in RANKS
            for r in bench_ranks(x, y, sizes, rank_name, slots, time_fn, ops)]


def layer_totals(records: list[dict]) -> list[dict]:
    """One decoder layer (all four projections) per shape, rank setup, adapters, backend."""
    totals: dict[tuple, dict] = {}
    for r in records:
        key = (r["shape"], r["ranks"], r["adapters"], r["backend"])
        t = totals.setdefault(key, dict(zip(("shape", "ranks", "adapters", "backend"), key))
                              | {"us": 0.0, "base_matmul_us": 0.0, "adapter_bytes": 0})
        for field in ("us", "base_matmul_us", "adapter_bytes"):
            t[field] += r[field]
    for t in totals.values():
        t["adapter_gb_s"] = t["adapter_bytes"] / t["us"] / 1e3
    return list(totals.values())


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--slots", type=int, default=32, help="max_loras (slot buffers)")
    p.add_argument("--iters", type=int, default=None, help="default: 50 on CUDA, 5 on CPU")
    p.add_argument("--out", type=Path, default=None,
                   help="default: benchmarks/results/lora_ops_<device>.json")
    return p.parse_args()


def main() -> None:
    a = parse_args()
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    iters = a.iters or (50 if device.type == "cuda" else 5)
    time_fn, ops = timer(device, iters), backends(device)
    records = []
    with torch.inference_mode():
        meta_s, _ = timer(torch.device("cpu"), iters)(
            lambda: LoRABatchMeta.make(list(range(TOKENS)), device))
        for shape in a.shapes:
            for name, (d_in, sizes) in projections(shape).items():
                for r in bench_projection(name, d_in, sizes, a.slots, device, dtype,
                                          time_fn, ops):
                    records.append({"shape": shape} | r)
                    print(f"{shape:13s} {name:8s} {r['ranks']:10s} {r['adapters']:2d} adapters "
                          f"{r['backend']:6s} {r['us']:9.1f} us  {r['adapter_gb_s']:7.1f} GB/s "
                          f"(base matmul {r['base_matmul_us']:.1f} us)")
    totals = layer_totals(records)
    for t in totals:
        print(f"{t['shape']:13s} layer    {t['ranks']:10s} {t['adapters']:2d} adapters "
              f"{t['backend']:6s} {t['us']:9.1f} us  {t['adapter_gb_s']:7.1f} GB/s "
              f"(base matmuls {t['base_matmul_us']:.1f} us)")
    out = a.out or Path(__file__).parent / "results" / f"lora_ops_{device.type}.json"
    write_json(out, {"benchmark": "lora_ops", "command": " ".join(sys.argv),
                     "machine": machine_info(), "device": str(device),
                     "dtype": str(dtype).removeprefix("torch."), "tokens": TOKENS,
                     "slots": a.slots, "iters": iters, "meta_make_us": 1e6 * meta_s,
                     "layer_totals": totals, "results": records})


if __name__ == "__main__":
    main()
