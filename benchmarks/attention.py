"""One attention layer over the paged KV cache, implementation against implementation.

Decode (one query per sequence) over a batch x context grid, and packed variable-length
causal prefill, at Llama-3.1-8B head shapes (32 query heads, 8 KV heads, head_dim 128,
bf16, cache blocks of 16). Implementations:

- torch:        the torch path of layers/attention.py: gather each sequence's blocks, SDPA
- torch_mirror: the torch path's decode between batch changes: append the new token to
                the layer's contiguous copy of the batch's K/V, SDPA over it
- triton:       layers/triton_attention.py (decode: the runner's split count; with
                --sweep-splits also every split count in SPLITS)
- flex:         torch FlexAttention, compiled; decode through torch's experimental
                PagedAttention (its own cache layout, pages of 128 tokens), prefill as
                packed documents with a causal document mask

Each case reports the median time, a second independent median (the spread between the
two is the noise), the bytes of K/V it must read and the achieved GB/s; on CUDA also the
time to read those bytes at the measured copy bandwidth (the decode floor). Small cases
rotate over several copies of the cache so the L2 cache does not hold them.

    python benchmarks/attention.py                     # a GPU: the whole grid
    python benchmarks/attention.py --sweep-splits      # + every triton split count
    python benchmarks/attention.py --batch 1 8 --context 256 1024 --prefill none   # quick
FlexAttention compiles once per shape (seconds to a minute each): where one command must
fit a time limit, run it apart, e.g. `--impls flex --batch 8 64 --context 1024 4096`.
On the CPU (no GPU) the default grid is small and triton runs only under
TRITON_INTERPRET=1 (correct, but the interpreter's times mean nothing).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json  # noqa: E402

from loraplex.layers.attention import Attention, decode_splits, torch_prefill_layout  # noqa: E402
from loraplex.worker.context import StepContext, step_context  # noqa: E402

H, KVH, D, BLOCK = 32, 8, 128, 16
SPLITS = (1, 2, 4, 8, 16, 32)
ROTATE_BYTES = 256 << 20  # caches rotated per case: well past an H100's 50 MB of L2
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def timer(device: torch.device, budget_ms: float) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of fn: CUDA events through triton's do_bench, else a host clock."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=budget_ms,
                                                  return_mode="median")

    def run(fn: Callable[[], object]) -> float:
        fn()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < 3 or (time.perf_counter() - start) * 1e3 < budget_ms:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    return run


def copy_bandwidth_gb_s(device: torch.device, time_ms) -> float | None:
    if device.type != "cuda":
        return None
    src = torch.randn(256 << 20, device=device)  # 1 GiB of fp32
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / time_ms(lambda: dst.copy_(src)) / 1e6  # read + write


def rotation(nbytes: int) -> int:
    return max(1, min(16, math.ceil(ROTATE_BYTES / max(nbytes, 1))))


def cycle(fns: list[Callable[[], object]]) -> Callable[[], object]:
    it = [0]

    def run() -> object:
        it[0] = (it[0] + 1) % len(fns)
        return fns[it[0]]()
    return run


def decode_case(batch: int, context: int, dtype: torch.dtype, device: torch.device,
                impls: list[str], sweep: bool, time_ms) -> list[dict]:
    nblk = -(-context // BLOCK)
    num_blocks = batch * nblk + 1
    kv_bytes = 2 * batch * context * KVH * D * dtype.itemsize
    gen = torch.Generator().manual_seed(batch * 7919 + context)
    tables = torch.randperm(num_blocks, generator=gen)[:batch * nblk].view(batch, nblk)
    tables = tables.to(torch.int32).to(device)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    slots = (tables[:, -1].long() * BLOCK + (context - 1) % BLOCK)
    q = torch.randn(batch, H, D, device=device, dtype=dtype)
    k_new, v_new = (torch.randn(batch, KVH, D, device=device, dtype=dtype) for _ in range(2))
    layers = []
    for _ in range(rotation(kv_bytes)):
        layer = Attention(H, KVH, D, D ** -0.5)
        layer.k_cache, layer.v_cache = (torch.randn(num_blocks, BLOCK, KVH, D, device=device,
                                                    dtype=dtype) for _ in range(2))
        layers.append(layer)
    rows = []
    variants: list[tuple[str, str, dict]] = []
    if "torch" in impls:
        variants.append(("torch", "torch", {}))
    if "torch_mirror" in impls:
        variants.append(("torch_mirror", "torch", {"mirror_capacity": -(-(context + 64) // BLOCK)
                                                   * BLOCK}))
    if "triton" in impls:
        chosen = decode_splits(batch, KVH, context, device)
        for s in sorted({chosen, *(SPLITS if sweep else ())}):
            name = "triton" if s == chosen else f"triton_splits{s}"
            variants.append((name, "triton", {"decode_splits": s}))
    for name, backend, extra in variants:
        def make(layer: Attention, backend=backend, extra=extra) -> Callable[[], object]:
            ctx = StepContext(is_prefill=False, slot_mapping=slots, attn_backend=backend,
                              block_tables=tables, context_lens=lens, max_context_len=context,
                              **extra)

            def run() -> object:
                with step_context(ctx):
                    out = layer(q, k_new, v_new)
                ctx.mirror_rebuild = False  # the first call built the mirror
                return out
            return run
        runs = [make(x) for x in layers]
        row = measure("decode", name, cycle(runs), time_ms, batch=batch, context=context,
                      splits=extra.get("decode_splits"))
        rows.append(agree(row, runs[0](), rows))
    if "flex" in impls:
        rows.append(flex_decode(batch, context, dtype, device, kv_bytes, q, time_ms))
    for r in rows:
        r["kv_bytes"] = kv_bytes
    return rows


def flex_decode(batch, context, dtype, device, kv_bytes, q, time_ms) -> dict:
    """FlexAttention through torch's PagedAttention helper: [1, KVH, pages * 128, D] caches."""
    try:
        from torch.nn.attention.experimental._paged_attention import PagedAttention
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        page = 128
        pages = batch * -(-context // page)
        paged = PagedAttention(pages, page, batch, device=device)
        for b in range(batch):
            paged.reserve(torch.tensor(b, device=device), torch.tensor(context, device=device))
        lens = torch.full((batch,), context, device=device)

        def visible(b, h, q_idx, kv_idx):
            return kv_idx < lens[b]

        logical = create_block_mask(visible, batch, None, 1, pages // batch * page,
                                    device=device, BLOCK_SIZE=page)
        mask = paged.convert_logical_block_mask(logical)
        fn = torch.compile(flex_attention, dynamic=False)
        caches = [tuple(torch.randn(1, KVH, pages * page, D, device=device, dtype=dtype)
                        for _ in range(2)) for _ in range(rotation(kv_bytes))]
        q4 = q.unsqueeze(2)  # [B, H, 1, D]
        run = cycle([lambda k=k, v=v: fn(q4, k, v, block_mask=mask, enable_gqa=True)
                     for k, v in caches])
        return measure("decode", "flex", run, time_ms, batch=batch, context=context,
                       page_size=page)
    except Exception as e:  # an optional comparison: record why it did not run
        return {"phase": "decode", "impl": "flex", "batch": batch, "context": context,
                "error": f"{type(e).__name__}: {str(e)[:300]}"}


def prefill_case(seqs: int, q_len: int, cached: int, dtype: torch.dtype, device: torch.device,
                 impls: list[str], time_ms) -> list[dict]:
    t = seqs * q_len
    gen = torch.Generator().manual_seed(seqs * 31 + q_len)
    q = torch.randn(t, H, D, generator=gen).to(device, dtype)
    k, v = (torch.randn(t, KVH, D, generator=gen).to(device, dtype) for _ in range(2))
    lens = [q_len] * seqs
    cu = torch.arange(0, t + 1, q_len, dtype=torch.int32, device=device)
    layer = Attention(H, KVH, D, D ** -0.5)
    nblk = -(-(cached + q_len) // BLOCK)
    layer.k_cache, layer.v_cache = (torch.randn(seqs * nblk, BLOCK, KVH, D, generator=gen)
                                    .to(device, dtype) for _ in range(2))
    tables = torch.arange(seqs * nblk, dtype=torch.int32, device=device).view(seqs, nblk)
    pos = torch.arange(cached, cached + q_len, device=device)
    slots = (tables[:, pos // BLOCK].long() * BLOCK + pos % BLOCK).reshape(-1)
    flops = 4 * seqs * H * D * q_len * (cached + (q_len + 1) / 2)  # QK^T and PV, causal
    shape = dict(seqs=seqs, q_len=q_len, cached=cached, flops=flops)
    rows = []
    for impl in impls:
        if impl in ("torch", "triton"):
            if impl == "torch" and cached:
                rows.append({"phase": "prefill", "impl": impl, **shape,
                             "error": "the torch path has no cached-context prefill"})
                continue
            ctx = StepContext(is_prefill=True, slot_mapping=slots, attn_backend=impl,
                              max_seqlen_q=q_len, cu_seqlens_q=cu)
            if impl == "torch":
                torch_prefill_layout(ctx, lens, device)
            elif cached:
                ctx.block_tables = tables
                ctx.context_lens = torch.full((seqs,), cached, dtype=torch.int32, device=device)

            def run(ctx=ctx) -> object:
                with step_context(ctx):
                    return layer(q, k, v)
            rows.append(agree(measure("prefill", impl, run, time_ms, **shape), run(), rows))
        elif impl == "flex":
            rows.append(flex_prefill(q, k, v, seqs, q_len, cached, time_ms, shape))
    return rows


def flex_prefill(q, k, v, seqs, q_len, cached, time_ms, shape) -> dict:
    try:
        if cached:
            raise NotImplementedError("cached context is not wired for flex here")
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        t = q.shape[0]
        doc = torch.arange(t, device=q.device) // q_len

        def causal_doc(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

        mask = create_block_mask(causal_doc, None, None, t, t, device=q.device)
        fn = torch.compile(flex_attention, dynamic=False)
        q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, heads, T, D]
        return measure("prefill", "flex", lambda: fn(q4, k4, v4, block_mask=mask,
                                                     enable_gqa=True), time_ms, **shape)
    except Exception as e:
        return {"phase": "prefill", "impl": "flex", **shape,
                "error": f"{type(e).__name__}: {str(e)[:300]}"}


def agree(row: dict, out: torch.Tensor, earlier: list[dict]) -> dict:
    """Keep the output of the case's first implementation; report the others' distance
    from it (||out - first|| / ||first||), so a fast wrong variant shows."""
    first = next((r for r in earlier if "_out" in r), None)
    if first is None:
        row["_out"] = out
    else:
        ref = first["_out"].float()
        row["rel_err_vs_" + first["impl"]] = ((out.float() - ref).norm() / ref.norm()).item()
    return row


def measure(phase: str, impl: str, fn: Callable[[], object], time_ms, **info) -> dict:
    try:
        ms = [time_ms(fn), time_ms(fn)]
    except Exception as e:
        return {"phase": phase, "impl": impl, **info, "error": f"{type(e).__name__}: {e}"[:400]}
    return {"phase": phase, "impl": impl, **info, "ms": min(ms), "ms_runs": ms}


def add_rates(rows: list[dict], gb_s: float | None, tflops: float | None) -> None:
    for r in rows:
        if "ms" not in r:
            continue
        if "kv_bytes" in r:
            r["gb_s"] = r["kv_bytes"] / r["ms"] / 1e6
            if gb_s:
                r["floor_ms"] = r["kv_bytes"] / gb_s / 1e6
                r["x_floor"] = r["ms"] / r["floor_ms"]
        if "flops" in r:
            r["tflop_s"] = r["flops"] / r["ms"] / 1e9
            if tflops:
                r["floor_ms"] = r["flops"] / tflops / 1e9
                r["x_floor"] = r["ms"] / r["floor_ms"]


def matmul_tflops(device: torch.device, dtype: torch.dtype, time_ms) -> float | None:
    if device.type != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, device=device, dtype=dtype) for _ in range(2))
    return 2 * 8192 ** 3 / time_ms(lambda: a @ b) / 1e9


def parse_args() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64] if cuda else [1, 8])
    ap.add_argument("--context", type=int, nargs="+",
                    default=[256, 1024, 4096] if cuda else [256, 1024])
    ap.add_argument("--prefill", nargs="+", default=["1x4096", "4x1024", "16x256", "4x512+1536"]
                    if cuda else ["2x256"],
                    help="SEQSxLEN[+CACHED] cases, or 'none'")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    ap.add_argument("--impls", default="torch,torch_mirror,triton,flex")
    ap.add_argument("--sweep-splits", action="store_true")
    ap.add_argument("--budget-ms", type=float, default=200.0, help="timing per measurement")
    ap.add_argument("--out", type=Path, default=None)
    return ap.parse_args()


def available(impls: list[str], device: torch.device) -> tuple[list[str], dict[str, str]]:
    skipped = {}
    if "triton" in impls and device.type != "cuda" and os.getenv("TRITON_INTERPRET") != "1":
        skipped["triton"] = "no CUDA (TRITON_INTERPRET=1 runs it, but its times mean nothing)"
    if "flex" in impls and device.type != "cuda":
        skipped["flex"] = "measured on CUDA only (CPU flex needs an inductor C++ build)"
    return [i for i in impls if i not in skipped], skipped


def main() -> None:
    a = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _DTYPES[a.dtype]
    impls, skipped = available(a.impls.split(","), device)
    time_ms = timer(device, a.budget_ms)
    gb_s = copy_bandwidth_gb_s(device, time_ms)
    tflops = matmul_tflops(device, dtype, time_ms)
    print(f"device {device}: copy {gb_s} GB/s, matmul {tflops} TFLOP/s; skipped {skipped}")
    rows: list[dict] = []
    for batch in a.batch:
        for context in a.context:
            new = decode_case(batch, context, dtype, device, impls, a.sweep_splits, time_ms)
            report(new)
            rows += new
    for case in ([] if a.prefill == ["none"] else a.prefill):
        m = re.fullmatch(r"(\d+)x(\d+)(?:\+(\d+))?", case)
        if not m:
            raise SystemExit(f"--prefill {case!r}: expected SEQSxLEN or SEQSxLEN+CACHED")
        seqs, q_len, cached = int(m[1]), int(m[2]), int(m[3] or 0)
        new = prefill_case(seqs, q_len, cached, dtype, device, impls, time_ms)
        report(new)
        rows += new
    add_rates(rows, gb_s, tflops)
    for r in rows:
        r.pop("_out", None)
    slug = re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_") \
        if device.type == "cuda" else "cpu"
    out = a.out or Path(__file__).parent / "results" / f"attention_{slug}.json"
    write_json(out, {"benchmark": "attention", "command": " ".join(sys.argv),
                     "config": {"heads": H, "kv_heads": KVH, "head_dim": D, "block_size": BLOCK,
                                "dtype": a.dtype, "impls": impls, "skipped": skipped},
                     "machine": machine_info(), "copy_gb_s": gb_s, "matmul_tflop_s": tflops,
                     "results": rows})
    summary(rows)


def report(rows: list[dict]) -> None:
    for r in rows:
        what = (f"B={r['batch']:<3d} ctx={r['context']:<5d}" if r["phase"] == "decode"
                else f"{r['seqs']}x{r['q_len']}+{r['cached']}")
        res = f"{r['ms']:9.4f} ms ({r['ms_runs'][0]:.4f} / {r['ms_runs'][1]:.4f})" \
            if "ms" in r else f"error: {r['error'][:90]}"
        res += "".join(f"  {k} {v:.1e}" for k, v in r.items() if k.startswith("rel_err"))
        print(f"{r['phase']:7s} {what:18s} {r['impl']:16s} {res}", flush=True)


def summary(rows: list[dict]) -> None:
    print("\nphase   case               impl              ms        GB/s or TFLOP/s  x floor")
    for r in rows:
        if "ms" not in r:
            continue
        what = (f"B={r['batch']} ctx={r['context']}" if r["phase"] == "decode"
                else f"{r['seqs']}x{r['q_len']}+{r['cached']}")
        rate = r.get("gb_s", r.get("tflop_s", 0.0))
        floor = f"{r['x_floor']:.2f}" if r.get("x_floor") else "-"
        print(f"{r['phase']:7s} {what:18s} {r['impl']:16s} {r['ms']:9.4f} {rate:12.1f}  {floor}")


if __name__ == "__main__":
    main()
