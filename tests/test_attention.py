"""Attention over the paged KV cache against naive per-sequence attention (float64).

The Triton kernels run on the CPU under TRITON_INTERPRET=1 (small shapes: the
interpreter is slow) and, where CUDA is present, on the GPU at Llama-8B head shapes.
Both backends are also driven through the `Attention` layer with the metadata the model
runner builds, and the engine runs with the triton backend forced against HF.
"""

from __future__ import annotations

import os

import pytest
import torch

from loraplex.layers.attention import Attention, DecodeMirror, decode_groups
from loraplex.worker.context import DecodeBuffers, StepContext, step_context
from tests.triton_compile import compile_for_h100, interpret_triton_language

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton does not import")


if not CUDA:
    interpret_triton_language()
from loraplex.layers import triton_attention as ta  # noqa: E402

gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
# Triton kernels on CPU tensors: only under the interpreter, i.e. where there is no CUDA
# (with CUDA they would fail to launch; the GPU tests below run them compiled)
interpreted = pytest.mark.skipif(CUDA, reason="Triton on CPU tensors needs the interpreter")
DEV = torch.device("cpu")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}  # ||out-ref||/||ref||


def reference(q, k, v, scale, q_offset=0, softcap=0.0, window=0, sinks=None, limit=None,
              chunk=0):
    """q [M, H, D] at positions q_offset.., k/v [N, KVH, D] at 0..N-1: causal (or each
    query sees keys up to limit [M], Gemma 3's image tokens their whole image), float64;
    softcap > 0: scores capped as softcap * tanh(score / softcap) (Gemma 2); window > 0:
    a query at p sees keys at p - window < k <= p; sinks [H]: one more key per head with
    that score and no value (gpt-oss); chunk > 0: a query at p sees keys of its own chunk,
    k // chunk == p // chunk (Llama 4)."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    s = torch.einsum("mhd,nhd->hmn", q.double(), k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    key_pos = torch.arange(k.shape[0], device=q.device)[None, :]
    q_pos = (q_offset + torch.arange(q.shape[0], device=q.device))[:, None]
    visible = key_pos <= (q_pos if limit is None else limit.to(q.device)[:, None])
    if window:
        visible &= key_pos > q_pos - window
    if chunk:
        visible &= key_pos // chunk == q_pos // chunk
    s = s.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double()[:, None, None].expand(-1, s.shape[1], 1)], dim=-1)
        return torch.einsum("hmn,nhd->mhd", s.softmax(-1)[..., :-1], v)
    return torch.einsum("hmn,nhd->mhd", s.softmax(-1), v)


def paged_cache(lens, kvh, d, block_size, dtype, device, gen, spare=3):
    """Random caches and block tables with blocks scattered (non-contiguous, shuffled)."""
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + spare
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(perm[at:at + n])
        at += n
    width = max(max(need), 1) + 1  # a spare column, as the runner's tables have
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    shape = (num_blocks, block_size, kvh, d)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    return k_cache.to(device), v_cache.to(device), table.to(device)


def cached_kv(k_cache, v_cache, table_row, n):
    """The first n cached tokens of one sequence, gathered the slow obvious way."""
    bs = k_cache.shape[1]
    pos = torch.arange(n, device=k_cache.device)
    blocks = table_row[pos // bs].long()
    return k_cache[blocks, pos % bs], v_cache[blocks, pos % bs]


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def check_decode(lens, h, kvh, d, block_size, dtype, splits, device=DEV, seed=0, softcap=0.0,
                 window=0, sinks=None, chunk=0):
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, table = paged_cache(lens, kvh, d, block_size, dtype, device, gen)
    q = torch.randn(len(lens), h, d, generator=gen).to(dtype).to(device)
    out = torch.full_like(q, float("nan"))  # poison: every element must be written
    ta.paged_decode_attention(q, k_cache, v_cache, table, torch.tensor(
        lens, dtype=torch.int32, device=device), d ** -0.5, num_splits=splits, out=out,
        softcap=softcap, window=window, sinks=sinks, chunk=chunk)
    for b, n in enumerate(lens):
        if n == 0:  # a padded row of a CUDA-graph batch
            assert out[b].eq(0).all()
            continue
        k, v = cached_kv(k_cache, v_cache, table[b], n)
        ref = reference(q[b:b + 1], k, v, d ** -0.5, q_offset=n - 1, softcap=softcap,
                        window=window, sinks=sinks, chunk=chunk)
        assert rel_err(out[b:b + 1], ref) < TOL[dtype], (b, n)


@interpreted
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("d", [64, 128])
def test_decode_gqa_head_dims(group, d):
    check_decode([1, 37, 16, 100], h=2 * group, kvh=2, d=d, block_size=16,
                 dtype=torch.float32, splits=1, seed=group * d)


@interpreted
@pytest.mark.parametrize("splits", [2, 5])
def test_decode_split_k(splits):
    """Splits merge exactly; some splits of short sequences are empty; length 0 -> zeros."""
    check_decode([1, 0, 130, 64, 7], h=8, kvh=2, d=64, block_size=16, dtype=torch.float32,
                 splits=splits)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_half_types(dtype):
    check_decode([3, 77], h=4, kvh=1, d=64, block_size=16, dtype=dtype, splits=2)


@interpreted
def test_decode_odd_block_size():
    check_decode([1, 11, 29], h=4, kvh=2, d=32, block_size=5, dtype=torch.float32, splits=1)


def check_prefill(q_lens, ctx_lens, h, kvh, d, dtype, block_size=16, device=DEV, seed=0,
                  softcap=0.0, window=0, sinks=None, images=None, chunk=0):
    """images: each sequence's image spans (first position, count), whose tokens see their
    whole image (Gemma 3), through the kernel's key_limit."""
    gen = torch.Generator().manual_seed(seed)
    t = sum(q_lens)
    q = torch.randn(t, h, d, generator=gen).to(dtype).to(device)
    kv = torch.randn(t, 2, kvh, d, generator=gen).to(dtype).to(device)
    k, v = kv[:, 0], kv[:, 1]  # strided views, as the qkv split gives
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32,
                      device=device)
    cache = {}
    if any(ctx_lens):
        k_cache, v_cache, table = paged_cache(ctx_lens, kvh, d, block_size, dtype, device, gen)
        cache = dict(k_cache=k_cache, v_cache=v_cache, block_tables=table,
                     context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device))
    out = torch.full_like(q, float("nan"))  # poison: every row must be written
    limits = None
    if images is not None:
        from loraplex.layers.attention import image_key_limits

        limits = torch.tensor(image_key_limits(images, ctx_lens, q_lens), dtype=torch.int32)
    ta.prefill_attention(q, k, v, cu, max(q_lens), d ** -0.5, **cache, out=out, softcap=softcap,
                         window=window, sinks=sinks, chunk=chunk,
                         key_limit=None if limits is None else limits.to(device))
    for b, (n, c) in enumerate(zip(q_lens, ctx_lens)):
        s = int(cu[b])
        ks, vs = k[s:s + n], v[s:s + n]
        if c:
            kc, vc = cached_kv(cache["k_cache"], cache["v_cache"], cache["block_tables"][b], c)
            ks, vs = torch.cat([kc, ks]), torch.cat([vc, vs])
        ref = reference(q[s:s + n], ks, vs, d ** -0.5, q_offset=c, softcap=softcap,
                        window=window, sinks=sinks, chunk=chunk,
                        limit=None if limits is None else c + limits[s:s + n])
        assert rel_err(out[s:s + n], ref) < TOL[dtype], (b, n, c)


@interpreted
@pytest.mark.parametrize("group,d", [(1, 64), (4, 128)])
def test_prefill_varlen(group, d):
    check_prefill([5, 1, 70, 17], [0, 0, 0, 0], h=2 * group, kvh=2, d=d, dtype=torch.float32)


@interpreted
def test_prefill_with_cached_context():
    """Prefix-cached / chunked prefill: earlier tokens sit in the paged cache."""
    check_prefill([4, 1, 66], [0, 21, 35], h=4, kvh=1, d=64, dtype=torch.float32)


@interpreted
def test_prefill_bf16():
    check_prefill([9, 33], [16, 0], h=4, kvh=2, d=64, dtype=torch.bfloat16)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap(dtype):
    """Gemma 2's capped scores (a cap of 2 bites: the raw scores here reach ~4), in decode
    with split-K and in prefill over cached context."""
    check_decode([1, 37, 100], h=4, kvh=2, d=64, block_size=16, dtype=dtype, splits=3,
                 softcap=2.0)
    check_prefill([4, 33], [21, 0], h=4, kvh=2, d=64, dtype=dtype, softcap=2.0)


@interpreted
@pytest.mark.parametrize("window", [1, 7, 40])
def test_sliding_window(window):
    """Mistral's / Gemma 2's sliding window: decode over splits (contexts shorter and
    longer than the window), prefill with cached context (queries whose window starts in
    the cache, in their own chunk, or spans both)."""
    check_decode([1, 5, 37, 100], h=4, kvh=2, d=32, block_size=8, dtype=torch.float32,
                 splits=3, window=window)
    check_prefill([4, 33, 70], [21, 0, 9], h=4, kvh=2, d=32, dtype=torch.float32,
                  block_size=8, window=window)


@interpreted
@pytest.mark.parametrize("chunk,window", [(1, 0), (4, 0), (24, 0), (16, 6)])
def test_chunked_attention(chunk, window):
    """Llama 4's chunked local attention (a query sees its own chunk's keys only): decode
    over splits at contexts ending at, past and just before a chunk boundary; prefill with
    cached context (chunks starting in the cache, in the step, across a query tile) and
    with a window inside the chunk too."""
    check_decode([1, 4, 5, 24, 25, 37, 100], h=4, kvh=2, d=32, block_size=8,
                 dtype=torch.float32, splits=3, chunk=chunk, window=window)
    check_prefill([4, 33, 70, 1], [21, 0, 9, 24], h=4, kvh=2, d=32, dtype=torch.float32,
                  block_size=8, chunk=chunk, window=window)


@interpreted
@pytest.mark.parametrize("window", [0, 6])
def test_prefill_image_blocks(window):
    """Gemma 3's images (spans of positions): their tokens see the rest of their image
    (key_limit), text stays causal; after cached context (one image in it), with a window
    shorter than an image (it still applies), one across two query tiles (64 rows: local
    rows 59..66)."""
    check_prefill([40, 9, 70], [0, 21, 5], h=4, kvh=2, d=32, dtype=torch.float32,
                  block_size=8, window=window,
                  images=[[(3, 16), (20, 16)], [(15, 4), (22, 4)], [(10, 40), (50, 1), (64, 8)]])


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_sinks(dtype):
    """gpt-oss's per-head sink logits (some far above the scores, so they take most of the
    weight; one far below): decode in one split and merged from several (the sink counted
    once), a context of one token, prefill over cached context and with a window."""
    sinks = torch.tensor([3.0, -1.0, 0.5, -30.0], device=DEV).to(dtype)
    for splits in (1, 3):
        check_decode([1, 37, 100], h=4, kvh=2, d=64, block_size=16, dtype=dtype,
                     splits=splits, sinks=sinks)
    check_prefill([4, 33], [21, 0], h=4, kvh=2, d=64, dtype=dtype, sinks=sinks)
    check_prefill([4, 33], [21, 0], h=4, kvh=2, d=32, dtype=dtype, block_size=8, window=7,
                  sinks=sinks)


@interpreted
@pytest.mark.parametrize("kvh", [2, 3])
def test_store_kvcache_skips_padding(kvh):
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(4, 8, kvh, 16, generator=gen)
    v_cache = torch.randn(4, 8, kvh, 16, generator=gen)
    kv = torch.randn(3, 2, kvh, 16, generator=gen)
    slots = torch.tensor([9, -1, 30])
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_k.view(-1, kvh, 16)[[9, 30]] = kv[[0, 2], 0]
    want_v.view(-1, kvh, 16)[[9, 30]] = kv[[0, 2], 1]
    ta.store_kvcache(kv[:, 0], kv[:, 1], k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_decode_num_splits_bounds():
    assert ta.decode_num_splits(64, 8, 4096, DEV) == 1  # batch alone fills the device
    assert ta.decode_num_splits(1, 8, 100, DEV) == 1  # short context: no split
    assert 1 < ta.decode_num_splits(1, 8, 4096, DEV) <= 16


def test_decode_compiles_a_bounded_set_of_kernels(monkeypatch):
    """Eager decode (every mixed step's decode half) picks its split count from the batch
    and the longest context, so that count must not be a compile-time constant: a serving
    process would compile a new kernel (~1 s) each time it first met a value. Records the
    compile-time arguments of every launch over batch 1..16 and contexts to 16K on an H100."""
    variants: set[tuple] = set()

    class Record:
        def __init__(self, fn):
            self.name = fn.__name__

        def __getitem__(self, grid):
            return lambda *args, **constexprs: variants.add((self.name, *constexprs.items()))

    monkeypatch.setattr(ta, "_num_sms", lambda device: 132)
    for kernel in ("_decode_kernel", "_merge_splits_kernel"):
        monkeypatch.setattr(ta, kernel, Record(getattr(ta, kernel)))
    cache = torch.zeros(4, 16, 8, 128, dtype=torch.bfloat16)
    splits_seen = set()
    for batch in (1, 2, 3, 5, 8, 16):
        for ctx in range(1, 16385, 128):
            splits = ta.decode_num_splits(batch, 8, ctx, DEV)
            splits_seen.add(splits)
            ta.paged_decode_attention(torch.zeros(batch, 32, 128, dtype=torch.bfloat16), cache,
                                      cache, torch.zeros(batch, 1, dtype=torch.int32),
                                      torch.zeros(batch, dtype=torch.int32), 0.1, splits)
    assert len(splits_seen) > 30  # the workload does vary the split count
    # decode: split or not; merge: the split count's power-of-2 bucket (2..64)
    assert len(variants) <= 2 + 6, sorted(variants)


# ---- the Attention layer, both backends, with the runner's metadata ------------------

def test_decode_groups():
    assert decode_groups([40, 30, 21, 20, 9, 3]) == [(0, 4, 40), (4, 5, 9), (5, 6, 3)]
    assert decode_groups([20, 18, 11]) is None  # one group: no row pads past 2x
    # rows out of order: every group is as wide as its longest row (correct, just slower)
    assert decode_groups([20, 30, 9, 40]) == [(0, 2, 30), (2, 4, 40)]


@pytest.mark.parametrize("backend,lens", [
    ("torch", [1, 13, 8, 30]), ("torch", [30, 13, 8, 1]),  # the second: in groups
    pytest.param("triton", [1, 13, 8, 30], marks=interpreted)])
def test_layer_decode(backend, lens):
    h, kvh, d, bs = 4, 2, 32, 8
    gen = torch.Generator().manual_seed(1)  # lens: tokens per sequence, the last this step's
    layer = Attention(h, kvh, d, d ** -0.5)
    layer.k_cache, layer.v_cache, table = paged_cache(lens, kvh, d, bs, torch.float32, DEV, gen)
    tables = [row.tolist()[:-(-n // bs)] for row, n in zip(table, lens)]
    slots = [t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in zip(tables, lens)]
    q, k, v = (torch.randn(len(lens), n, d, generator=gen) for n in (h, kvh, kvh))
    buffers = DecodeBuffers(8, 6, DEV)
    slot_mapping, context_lens, block_tables = buffers.fill(slots, lens, tables)
    ctx = StepContext(is_prefill=False, slot_mapping=slot_mapping, attn_backend=backend,
                      block_tables=block_tables, context_lens=context_lens,
                      max_context_len=max(lens), decode_splits=2,
                      decode_groups=decode_groups(lens) if backend == "torch" else None)
    assert backend != "torch" or lens[0] != 30 or ctx.decode_groups == [(0, 1, 30),
                                                                        (1, 3, 13), (3, 4, 1)]
    with step_context(ctx):
        out = layer(q, k, v).view(len(lens), h, d)
    for b, n in enumerate(lens):
        kc, vc = cached_kv(layer.k_cache, layer.v_cache, block_tables[b], n)
        assert torch.equal(kc[-1], k[b]) and torch.equal(vc[-1], v[b])  # written first
        assert rel_err(out[b:b + 1], reference(q[b:b + 1], kc, vc, d ** -0.5, n - 1)) < 1e-5


def test_decode_mirror_plan():
    """Rebuild or append, and each row group's capacity (its longest + headroom, in
    blocks); no mirror past max_bytes."""
    mirror = DecodeMirror(block_size=16, bytes_per_token=10, max_bytes=10_000)
    mirror.headroom = 64

    def caps(ctx):
        return [cap for _, _, cap in ctx.mirror_groups]

    steps = [([7, 9], [40, 5], True, [112, 80]),  # two groups: 5 is under half of 40
             ([7, 9], [41, 6], False, [112, 80]),  # the same batch one token on: append
             ([7, 9], [43, 8], True, [112, 80]),  # lengths jumped (a step elsewhere): rebuild
             ([9, 7], [9, 44], True, [112]),  # another order (one group): rebuild
             *(([9, 7], [10 + i, 45 + i], False, [112]) for i in range(68)),  # up to 112
             ([9, 7], [78, 113], True, [192]),  # past the capacity: rebuild, larger
             (list(range(12)), [20] * 12, True, [])]  # 12 x 96 x 10 B > max_bytes: gather
    for ids, lens, rebuild, want in steps:
        ctx = StepContext(is_prefill=False, slot_mapping=torch.zeros(0))
        mirror.plan(ctx, ids, lens)
        assert (ctx.mirror_rebuild, caps(ctx)) == (rebuild, want), (ids, lens)
        assert [w for _, _, w in ctx.decode_groups or []] in ([], [max(lens[a:b]) for a, b, _
                                                                  in ctx.mirror_groups])
    mirror.reset()
    ctx = StepContext(is_prefill=False, slot_mapping=torch.zeros(0))
    mirror.plan(ctx, [1], [21])
    assert ctx.mirror_rebuild and caps(ctx) == [96]


@pytest.mark.parametrize("mirror_bytes", [0, 1 << 30])
def test_torch_decode_steps_with_mirror(mirror_bytes):
    """Several decode steps of a changing batch through the torch path: appending to the
    mirror, rebuilding it, or gathering, the output is attention over the cache."""
    h, kvh, d, bs = 4, 2, 16, 4
    gen = torch.Generator().manual_seed(3)
    layer = Attention(h, kvh, d, d ** -0.5)
    layer.k_cache = torch.randn(64, bs, kvh, d, generator=gen)
    layer.v_cache = torch.randn(64, bs, kvh, d, generator=gen)
    free = torch.randperm(64, generator=gen).tolist()
    seqs = {i: {"len": n, "table": [free.pop() for _ in range(-(-n // bs))]}
            for i, n in enumerate([3, 9, 1])}
    mirror = DecodeMirror(bs, 2 * kvh * d * 4, mirror_bytes)
    mirror.headroom = 8  # run out of capacity within a few steps
    buffers = DecodeBuffers(4, 32, DEV)
    rebuilds = []
    for step, batch in enumerate([[0, 1, 2]] * 3 + [[0, 2]] * 2 + [[2, 0, 1]] * 14):
        for i in batch:  # the token this step writes
            seq = seqs[i]
            seq["len"] += 1
            if seq["len"] > len(seq["table"]) * bs:
                seq["table"].append(free.pop())
        lens = [seqs[i]["len"] for i in batch]
        tables = [seqs[i]["table"] for i in batch]
        slots = [t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in zip(tables, lens)]
        slot_mapping, context_lens, block_tables = buffers.fill(slots, lens, tables)
        ctx = StepContext(is_prefill=False, slot_mapping=slot_mapping, block_tables=block_tables,
                          context_lens=context_lens, max_context_len=max(lens))
        mirror.plan(ctx, batch, lens)
        q, k, v = (torch.randn(len(batch), n, d, generator=gen) for n in (h, kvh, kvh))
        with step_context(ctx):
            out = layer(q, k, v).view(len(batch), h, d)
        for b, n in enumerate(lens):
            kc, vc = cached_kv(layer.k_cache, layer.v_cache, block_tables[b], n)
            ref = reference(q[b:b + 1], kc, vc, d ** -0.5, n - 1)
            assert rel_err(out[b:b + 1], ref) < 1e-5, (step, b)
        rebuilds.append(ctx.mirror_rebuild if ctx.mirror_groups else None)
    if mirror_bytes:  # batch changes at steps 3 and 5, one more when the capacity runs out
        assert rebuilds[:6] == [True, False, False, True, False, True]
        assert rebuilds[6:].count(True) == 1 and None not in rebuilds
    else:
        assert set(rebuilds) == {None}


def test_torch_decode_mirror_sized_per_group():
    """One long sequence beside short ones: each row group's mirror is as long as its own
    longest (not the batch's), and appending steps stay exact."""
    h, kvh, d, bs = 4, 2, 16, 4
    gen = torch.Generator().manual_seed(5)
    layer = Attention(h, kvh, d, d ** -0.5)
    layer.k_cache = torch.randn(64, bs, kvh, d, generator=gen)
    layer.v_cache = torch.randn(64, bs, kvh, d, generator=gen)
    free = list(range(64))
    lens = [60, 5, 4]  # longest first, as the runner orders them
    tables = [[free.pop() for _ in range(-(-(n + 3) // bs))] for n in lens]
    mirror = DecodeMirror(bs, 2 * kvh * d * 4, 1 << 30)
    mirror.headroom = 4
    buffers = DecodeBuffers(4, 32, DEV)
    for step in range(3):
        lens = [n + 1 for n in lens]
        slots = [t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in zip(tables, lens)]
        slot_mapping, context_lens, block_tables = buffers.fill(slots, lens, tables)
        ctx = StepContext(is_prefill=False, slot_mapping=slot_mapping, block_tables=block_tables,
                          context_lens=context_lens, max_context_len=max(lens))
        mirror.plan(ctx, [0, 1, 2], lens)
        assert ctx.mirror_rebuild == (step == 0)
        assert ctx.mirror_groups == [(0, 1, 68), (1, 3, 12)]  # not 3 rows x 68
        q, k, v = (torch.randn(3, n, d, generator=gen) for n in (h, kvh, kvh))
        with step_context(ctx):
            out = layer(q, k, v).view(3, h, d)
        for b, n in enumerate(lens):
            kc, vc = cached_kv(layer.k_cache, layer.v_cache, block_tables[b], n)
            assert rel_err(out[b:b + 1], reference(q[b:b + 1], kc, vc, d ** -0.5, n - 1)) < 1e-5
    assert layer._mirror["k"].numel() == (68 + 2 * 12) * kvh * d


def test_decode_buffers_pad_rows():
    buffers = DecodeBuffers(4, 3, DEV)
    buffers.fill([5, 6, 7], [9, 9, 9], [[0, 1], [2, 3], [4, 5]])
    slot_mapping, context_lens, block_tables = buffers.fill([3], [2], [[7]], padded_batch=3)
    assert slot_mapping.tolist() == [3, -1, -1] and context_lens.tolist() == [2, 0, 0]
    assert block_tables.shape == (3, 1) and block_tables[0, 0] == 7
    with pytest.raises(ValueError, match="exceeds"):
        buffers.fill([1], [60], [[0, 1, 2, 3]])


# ---- the engine with the triton backend (interpreter on CPU) against HF ---------------

def test_engine_triton_backend_matches_hf(monkeypatch, tiny_models, tiny_adapters, prompts):
    from loraplex import SamplingParams
    from tests.engine_utils import check_against_hf, lora_requests, make_llm

    monkeypatch.setenv("LORAPLEX_ATTENTION_BACKEND", "triton")
    base, adapters = tiny_models["qwen3"], tiny_adapters["qwen3"]
    reqs = lora_requests(adapters)
    names = [None, "r8_all", None, "r4_qv"]
    batch = [prompts[i] for i in (1, 3, 0, 2)]
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=16, block_size=8)
    assert llm.llm_engine.model_runner.attn_backend == "triton"
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params,
                        lora_request=[reqs[n] if n else None for n in names], use_tqdm=False)
    check_against_hf(outs, base, [adapters[n] if n else None for n in names], batch)


@pytest.mark.parametrize("budget", [None, 6])
def test_engine_triton_backend_mixed_steps_match_hf(monkeypatch, budget, tiny_models,
                                                    tiny_adapters, prompts):
    """Prompts prefilled in the same forward as running decodes, both Triton kernels (and
    the Triton LoRA ops) over one step's rows; budget 6: chunked prefill, later chunks read
    the earlier ones from the paged cache."""
    from loraplex import SamplingParams
    from tests.engine_utils import check_against_hf, lora_requests, make_llm, run_staggered

    monkeypatch.setenv("LORAPLEX_ATTENTION_BACKEND", "triton")
    monkeypatch.setenv("LORAPLEX_LORA_BACKEND", "triton")
    base, adapters = tiny_models["llama"], tiny_adapters["llama"]
    reqs = lora_requests(adapters)
    names = [None, "r8_all", "r4_qv", None]
    jobs = [(2 * i, prompts[i], reqs[n] if n else None) for i, n in enumerate(names)]
    assert budget is None or max(len(p) for _, p, _ in jobs) > 2 * budget
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=16, block_size=8,
                   max_num_batched_tokens=budget)
    for name in ("r8_all", "r4_qv"):
        llm.llm_engine.add_lora(reqs[name])
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3)
    outs, mixed = run_staggered(llm.llm_engine, jobs, params)
    from loraplex.lora import ops
    device = llm.llm_engine.model_runner.device  # cuda where there is a GPU
    assert mixed > 0 and ops.backend(torch.zeros(1, device=device)).__name__.endswith("triton_ops")
    check_against_hf(outs, base, [adapters[n] if n else None for n in names],
                     [p for _, p, _ in jobs])


@interpreted
def test_engine_triton_backend_prefix_cache_matches_hf(monkeypatch, tiny_models,
                                                       tiny_adapters, prompts):
    """Prompts whose prefix is in the cache start with context: the Triton prefill kernel
    reads the cached blocks through the block table."""
    from tests.engine_utils import check_shared_prefixes

    monkeypatch.setenv("LORAPLEX_ATTENTION_BACKEND", "triton")
    monkeypatch.setenv("LORAPLEX_LORA_BACKEND", "triton")
    # Triton's split-K sums in another order than torch: on this request (r8_all after a
    # 32-token cached prefix) the LoRA backends differ by 4e-5 on torch 2.13 and 1e-4 on
    # the floors (scripts/check_floors.sh); dropping one rank of the adapter moves one by 7.9
    check_shared_prefixes(tiny_models["llama"], tiny_adapters["llama"], prompts, atol=2e-4)


def test_backend_env_is_checked(monkeypatch):
    from loraplex.layers.attention import attention_backend

    monkeypatch.setenv("LORAPLEX_ATTENTION_BACKEND", "flash")
    with pytest.raises(ValueError, match="expected one of"):
        attention_backend(DEV)
    monkeypatch.setenv("LORAPLEX_ATTENTION_BACKEND", "auto")
    assert attention_backend(DEV) == "torch"


# ---- compiled for sm_90 without a GPU ---------------------------------------------------

_LAUNCHES = """
from loraplex.layers import triton_attention as A
for name in ("_store_kvcache_kernel", "_decode_kernel", "_merge_splits_kernel", "_prefill_kernel"):
    setattr(A, name, Capture(getattr(A, name)))
for dtype, h, kvh, d in ((torch.bfloat16, 32, 8, 128), (torch.float32, 16, 2, 256)):
    kc, table = torch.zeros(8, 16, kvh, d, dtype=dtype), torch.zeros(2, 4, dtype=torch.int32)
    lens, q = torch.zeros(2, dtype=torch.int32), torch.zeros(2, h, d, dtype=dtype)
    for splits in (1, 4):
        A.paged_decode_attention(q, kc, kc, table, lens, 0.1, num_splits=splits)
    qt, k = torch.zeros(24, h, d, dtype=dtype), torch.zeros(24, kvh, d, dtype=dtype)
    A.prefill_attention(qt, k, k, torch.tensor([0, 10, 24], dtype=torch.int32), 14, 0.1,
                        kc, kc, table, lens)
    A.store_kvcache(k, k, kc, kc, torch.zeros(24, dtype=torch.int32))
# gpt-oss: 64 query heads over 8 KV heads of 64 dims, bf16 sinks
kc, q = torch.zeros(8, 16, 8, 64, dtype=torch.bfloat16), torch.zeros(2, 64, 64, dtype=torch.bfloat16)
sinks = torch.zeros(64, dtype=torch.bfloat16)
for splits in (1, 4):
    A.paged_decode_attention(q, kc, kc, table, lens, 0.1, num_splits=splits, sinks=sinks,
                             window=128 * (splits - 1))
qt, k = torch.zeros(24, 64, 64, dtype=torch.bfloat16), torch.zeros(24, 8, 64, dtype=torch.bfloat16)
A.prefill_attention(qt, k, k, torch.tensor([0, 10, 24], dtype=torch.int32), 14, 0.1, kc, kc,
                    table, lens, sinks=sinks, window=128)
# Gemma 3's images: each query's last visible key (key_limit), a window
A.prefill_attention(qt, k, k, torch.tensor([0, 10, 24], dtype=torch.int32), 14, 0.1, kc, kc,
                    table, lens, window=1024, key_limit=torch.zeros(24, dtype=torch.int32))
"""


@pytest.mark.skipif(CUDA, reason="with CUDA the GPU tests compile the kernels for real")
def test_kernels_compile_for_h100():
    """The interpreter accepts code the compiler rejects: compile for sm_90 (no GPU needed),
    within an H100's shared memory."""
    assert compile_for_h100(_LAUNCHES) == 15


# ---- GPU: real kernels, Llama-8B head shapes -------------------------------------------

@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("splits", [1, 4])
def test_gpu_decode(dtype, splits):
    gen = torch.Generator().manual_seed(7)
    lens = torch.randint(1, 4097, (64,), generator=gen).tolist()
    lens[:3] = [1, 4096, 0]
    check_decode(lens, h=32, kvh=8, d=128, block_size=16, dtype=dtype, splits=splits,
                 device=torch.device("cuda"))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_prefill(dtype):
    check_prefill([1, 300, 1024, 77], [0, 513, 0, 2000], h=32, kvh=8, d=128, dtype=dtype,
                  device=torch.device("cuda"))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_softcap(dtype):
    """Gemma 2's shapes (head_dim 256, 8 query heads per KV head) with its cap of 50 and a
    cap of 2 that bites on these random scores."""
    for cap in (50.0, 2.0):
        check_decode([1, 700, 3000], h=16, kvh=2, d=256, block_size=16, dtype=dtype,
                     splits=4, device=torch.device("cuda"), softcap=cap)
        check_prefill([9, 400], [0, 1000], h=16, kvh=2, d=256, dtype=dtype,
                      device=torch.device("cuda"), softcap=cap)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_sliding_window(dtype):
    """Mistral v0.1's window (4096) over longer contexts, and a short one."""
    for window in (4096, 100):
        check_decode([1, 3000, 6000], h=32, kvh=8, d=128, block_size=16, dtype=dtype,
                     splits=4, device=torch.device("cuda"), window=window)
        check_prefill([300, 700], [5000, 0], h=32, kvh=8, d=128, dtype=dtype,
                      device=torch.device("cuda"), window=window)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_chunked_attention(dtype):
    """Llama 4 Scout's shapes (40 query heads over 8 KV heads of 128 dims), chunks of 2048
    (its 8192 scaled to test lengths) and of 100 (not a multiple of the tiles)."""
    for chunk in (2048, 100):
        check_decode([1, 2048, 2049, 3000, 6000], h=40, kvh=8, d=128, block_size=16,
                     dtype=dtype, splits=4, device=torch.device("cuda"), chunk=chunk)
        check_prefill([300, 700, 5], [5000, 0, 2047], h=40, kvh=8, d=128, dtype=dtype,
                      device=torch.device("cuda"), chunk=chunk)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_attention_sinks(dtype):
    """gpt-oss-120b's shapes (64 query heads over 8 KV heads of 64 dims), its window of 128
    on alternate layers, bf16 sink logits."""
    gen = torch.Generator().manual_seed(8)
    sinks = (2 * torch.randn(64, generator=gen)).to(dtype).cuda()
    for window in (0, 128):
        check_decode([1, 700, 3000], h=64, kvh=8, d=64, block_size=16, dtype=dtype,
                     splits=4, device=torch.device("cuda"), window=window, sinks=sinks)
        check_prefill([9, 400], [0, 1000], h=64, kvh=8, d=64, dtype=dtype,
                      device=torch.device("cuda"), window=window, sinks=sinks)
