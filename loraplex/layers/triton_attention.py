"""Triton attention over the paged KV cache (the CUDA path; tests run it on the CPU
under TRITON_INTERPRET=1).

Cache layout, as the model runner allocates it: k_cache / v_cache [num_blocks,
block_size, KVH, D]; token position p of sequence b lives in block
`block_tables[b, p // block_size]` at offset `p % block_size`. Kernels read K/V tiles
straight from the cache through the block table (one table lookup per token row, so a
tile may span several blocks and block_size need not be a power of two); nothing is
gathered into contiguous tensors.

- `store_kvcache`: write the step's K/V at `slot_mapping`; slot -1 is skipped (padded
  rows of a CUDA-graph batch). An FP8 cache gets x / scale saturated and rounded
  (attention.quantize_kv); the kernels read it back x scale, in fp32, in registers.
- `paged_decode_attention`: one query per sequence. A program owns one sequence, one KV
  head and one split of the context: the G query heads that share the KV head are the M
  rows of the dot, so every K/V tile is loaded once per group (past head dim 256, MLA's
  one latent KV head of 576 under 16-128 heads, 16 heads a program: a whole group's
  tile would not fit in shared memory; `_block_g`). Splits (flash-decoding)
  write fp32 partial outputs and log-sum-exps that a second kernel merges. All
  per-sequence sizes are read on the device, so the launch is CUDA-graph safe at a
  fixed batch size.
- `prefill_attention`: causal, variable-length queries packed flat (cu_seqlens). Query i
  of sequence b sits at absolute position context_lens[b] + i: it sees the whole cached
  context (read through the block table) and the step's own K/V up to itself (Gemma 3's
  image tokens: up to the last token of their image, `key_limit`).
A sliding window (WINDOW) and chunked local attention (CHUNK, Llama 4: a query at p sees
keys from p - p % CHUNK) are lower bounds on the key position: the loops start at the
first key any query of the tile sees, and a per-key mask does the rest.
Softmax runs in fp32 (base-2 exponentials, scale folded in); P is cast to the V dtype
for the second dot, as flash attention does. Attention sinks (gpt-oss: a logit per head
that joins the softmax with no value) enter each row's sum once at the end, or once in
the merge of a split decode. ALiBi (BLOOM, MPT: a slope per head) adds slope x key
position to each tile's scores (base 2, as the rest).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from loraplex.backends import fp32_dot, interpreter_on

_LOG2E = 1.4426950408889634
_INTERPRETED = interpreter_on()  # there tl.dot runs bf16 in fp32 (backends.fp32_dot)


@triton.jit
def _fp8_grid(x, inv_scale, FP8_MAX: tl.constexpr, MANT: tl.constexpr,
              MIN_EXP: tl.constexpr):
    """x * inv_scale saturated to +-FP8_MAX and rounded (to nearest, even) to the FP8
    grid in fp32, so the cast after is exact: the interpreter's own fp32 -> fp8 rounding
    is wrong where the mantissa carries into the exponent."""
    x = tl.minimum(tl.maximum(x.to(tl.float32) * inv_scale, -FP8_MAX), FP8_MAX)
    bits = x.to(tl.int32, bitcast=True)
    e = tl.maximum((bits >> 23) & 0xFF, 127 + MIN_EXP) - MANT  # the exponent of x's FP8
    step = (e << 23).to(tl.float32, bitcast=True)  # step (subnormals': the smallest normal's)
    inv_step = ((254 - e) << 23).to(tl.float32, bitcast=True)
    r = ((tl.abs(x) * inv_step + 12582912.0) - 12582912.0) * step  # 1.5 * 2**23: rint
    return tl.where(bits < 0, -r, r)  # the sign of a value rounded to zero too


@triton.jit
def _store_kvcache_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, k_inv_scale, v_inv_scale,
                          stride_kt, stride_vt, stride_kh, stride_vh, KVH: tl.constexpr,
                          HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                          FP8_MAX: tl.constexpr, MANT: tl.constexpr, MIN_EXP: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)  # one token: all its KV heads (T x stride > 2**31)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        m = (h < KVH) & (d < HEAD_DIM)
        dst = slot * KVH * HEAD_DIM + h * HEAD_DIM + d  # caches are contiguous
        k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=m)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=m)
        if FP8_MAX > 0:
            k = _fp8_grid(k, k_inv_scale, FP8_MAX, MANT, MIN_EXP)
            v = _fp8_grid(v, v_inv_scale, FP8_MAX, MANT, MIN_EXP)
        tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=m)
        tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=m)


# FP8 cache dtypes: (largest finite value, mantissa bits, smallest normal exponent)
_FP8 = {torch.float8_e4m3fn: (448.0, 3, -6), torch.float8_e5m2: (57344.0, 2, -14)}


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float = 1.0,
                  v_scale: float = 1.0) -> None:
    # k/v: [T, KVH, D] (last dim contiguous), caches: [num_blocks, block_size, KVH, D];
    # an FP8 cache gets x / scale (its scales: unused otherwise)
    t, kvh, d = k.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[2:] == (kvh, d)
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and slot_mapping.shape == (t,)
    fp8_max, mant, min_exp = _FP8.get(k_cache.dtype, (0.0, 0, 0))
    _store_kvcache_kernel[(t,)](k, v, k_cache, v_cache, slot_mapping, 1.0 / k_scale,
                                1.0 / v_scale, k.stride(0), v.stride(0), k.stride(1),
                                v.stride(1), KVH=kvh, HEAD_DIM=d,
                                BLOCK_H=triton.next_power_of_2(kvh),
                                BLOCK_D=triton.next_power_of_2(d), FP8_MAX=fp8_max, MANT=mant,
                                MIN_EXP=min_exp)


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    # fp32 accumulation; F32: exact fp32 products (fp32 inputs, or bf16 in the interpreter)
    if F32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _round_bf16(x):
    # fp32 x rounded to bfloat16 (to nearest, ties to even), as fp32: on the bits, as
    # torch rounds (the interpreter's cast to bfloat16 truncates)
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, F32: tl.constexpr,
                 SOFTCAP: tl.constexpr, slope, key_pos, ALIBI: tl.constexpr,
                 ALIBI_BF16: tl.constexpr):
    # one online-softmax step: q [M, D], k/v [N, D], valid [M, N] or [1, N]; ALIBI: each
    # row's slope [M] (base 2) times the keys' positions [N] joins the scores; ALIBI_BF16
    # > 0 (Falcon-RW): the slope as given, the position and slope x position rounded to
    # bfloat16 (HF's bfloat16 product), then times ALIBI_BF16 (and base 2)
    s = _dot(q, tl.trans(k), F32)
    if SOFTCAP > 0:  # Gemma 2: cap * tanh(scale * q.k / cap), then base 2 (tanh via sigmoid)
        log2e = 1.4426950408889634
        s = (SOFTCAP * log2e) * (2.0 * tl.sigmoid(s * (2.0 * qk_scale / (log2e * SOFTCAP)))
                                 - 1.0)
    else:
        s = s * qk_scale
    if ALIBI_BF16 > 0:
        s = s + _round_bf16(slope[:, None] * _round_bf16(key_pos.to(tl.float32))[None, :]) \
            * (ALIBI_BF16 * 1.4426950408889634)
    elif ALIBI:
        s = s + slope[:, None] * key_pos[None, :].to(tl.float32)
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    return m_new, l_i, acc * alpha[:, None] + _dot(p.to(v.dtype), v, F32)


@triton.jit
def _add_sink(m_i, l_i, acc, sink_logit):
    # one more key of logit `sink_logit` (per row) and value 0: the sum grows, acc not
    sink = sink_logit.to(tl.float32) * 1.4426950408889634  # base 2, as m_i
    m_new = tl.maximum(m_i, sink)
    alpha = tl.exp2(m_i - m_new)
    return l_i * alpha + tl.exp2(sink - m_new), acc * alpha[:, None]


@triton.jit
def _attend_paged(q, q_pos, m_i, l_i, acc, qk_scale, kc_ptr, vc_ptr, table_row_ptr, start,
                  end, stride_cb, stride_ct, k_scale, v_scale, HEAD_DIM: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  F32: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
                  CHUNK: tl.constexpr, slope, ALIBI: tl.constexpr, ALIBI_BF16: tl.constexpr):
    """Online softmax of q over cached positions [start, end) of one sequence and one KV
    head (kc_ptr/vc_ptr already offset to it), BLOCK_N rows at a time through the table.
    WINDOW > 0: query row m (at position q_pos[m]) sees only positions > q_pos[m] - WINDOW;
    CHUNK > 0: only positions >= q_pos[m] - q_pos[m] % CHUNK.
    An FP8 cache's tiles are dequantized (x scale in fp32, then q's dtype) as they load."""
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        n_ok = pos < end
        block = tl.load(table_row_ptr + pos // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        rows = block * stride_cb + (pos % BLOCK_SIZE) * stride_ct
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(kc_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(vc_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if kc_ptr.dtype.element_ty.is_fp8():
            k = (k.to(tl.float32) * k_scale).to(q.dtype)
            v = (v.to(tl.float32) * v_scale).to(q.dtype)
        valid = n_ok[None, :]
        if WINDOW > 0:
            valid = valid & (pos[None, :] > q_pos[:, None] - WINDOW)
        if CHUNK > 0:
            valid = valid & (pos[None, :] >= q_pos[:, None] - q_pos[:, None] % CHUNK)
        m_i, l_i, acc = _attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, F32, SOFTCAP,
                                     slope, pos, ALIBI, ALIBI_BF16)
    return m_i, l_i, acc


@triton.jit(do_not_specialize=["num_splits"])
def _decode_kernel(q_ptr, kc_ptr, vc_ptr, table_ptr, lens_ptr, sinks_ptr, slopes_ptr, out_ptr,
                   lse_ptr, qk_scale, k_scale, v_scale,
                   stride_qb, stride_qh, stride_cb, stride_ct, stride_ch, stride_tb,
                   stride_ob, stride_oh, stride_os, stride_lb, stride_lh, num_splits,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   SPLIT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, F32: tl.constexpr, SOFTCAP: tl.constexpr,
                   WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, CHUNK: tl.constexpr,
                   HEAD_TILES: tl.constexpr, ALIBI: tl.constexpr,
                   ALIBI_BF16: tl.constexpr):
    """num_splits is a runtime value, not specialized on: it follows the batch size and the
    longest context, and each new value would otherwise compile another kernel mid-serving.
    WINDOW > 0: only the last WINDOW cached positions (the new token's own included);
    CHUNK > 0: only those of the new token's chunk. A program takes BLOCK_G heads of a
    group: the group's HEAD_TILES-th part (1 but for MLA's 16 to 128 heads over one wide
    latent KV head)."""
    b = tl.program_id(0)
    kvh = tl.program_id(1) // HEAD_TILES
    tile = tl.program_id(1) % HEAD_TILES
    split = tl.program_id(2)
    ctx_len = tl.load(lens_ptr + b)
    lo = tl.maximum(ctx_len - WINDOW, 0) if WINDOW > 0 else 0
    if CHUNK > 0:  # the new token at ctx_len - 1 sees its chunk's keys only
        lo = tl.maximum(lo, ctx_len - 1 - (ctx_len - 1) % CHUNK)
    per_split = (ctx_len - lo + num_splits - 1) // num_splits  # rounded up to whole tiles:
    per_split = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, ctx_len)

    g = tile * BLOCK_G + tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    slope = tl.load(slopes_ptr + heads, mask=g_ok, other=0.0).to(tl.float32) \
        * (1.0 if ALIBI_BF16 > 0 else 1.4426950408889634) if ALIBI else m_i
    m_i, l_i, acc = _attend_paged(  # [lo, ctx_len) is the window: no per-key mask
        q, g, m_i, l_i, acc, qk_scale, kc_ptr + kvh * stride_ch, vc_ptr + kvh * stride_ch,
        table_ptr + b.to(tl.int64) * stride_tb, start, end, stride_cb, stride_ct, k_scale,
        v_scale, HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D, F32, SOFTCAP, 0, 0, slope, ALIBI,
        ALIBI_BF16)
    if HAS_SINKS and not SPLIT:  # split: the merge adds the sink once
        l_i, acc = _add_sink(m_i, l_i, acc, tl.load(sinks_ptr + heads, mask=g_ok, other=0.0))

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty split/sequence gives 0
    o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    if SPLIT:
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=g_ok)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(part_ptr, lse_ptr, sinks_ptr, out_ptr, stride_pb, stride_ph,
                         stride_ps, stride_lb, stride_lh, stride_ob, stride_oh, num_splits,
                         HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                         HAS_SINKS: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + s, mask=s < num_splits,
                  other=float("-inf"))
    m = tl.max(lse, 0)
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
        m = tl.maximum(m, sink)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # all -inf (empty) -> all 0
    part = tl.load(part_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
                   mask=(s[:, None] < num_splits) & (d[None, :] < HEAD_DIM), other=0.0)
    total = tl.sum(w, 0)
    if HAS_SINKS:
        total += tl.exp2(sink - m)
    out = tl.sum(w[:, None] * part, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _block_g(group: int, block_d: int) -> int:
    """Query heads a decode program takes: the whole group (at least 16, a dot's minimum),
    but at most 16 past head dim 256 (MLA's latent: 576, padded to 1024), where a whole
    group's tile (DeepSeek-V3: 128 heads) would not fit in shared memory."""
    whole = max(16, triton.next_power_of_2(group))
    return whole if block_d <= 256 else 16


def _block_n(block_d: int, dtype: torch.dtype) -> int:
    """Tokens per K/V tile: 64 rows of up to 256 bytes (bf16 x 128), else 32, so the
    pipelined tiles stay well inside shared memory (fp32 or head_dim 256 halve it)."""
    return 64 if block_d * dtype.itemsize <= 256 else 32


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: a few splits, so tests exercise the merge
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_num_splits(batch: int, num_kv_heads: int, max_context_len: int,
                      device: torch.device, min_tokens_per_split: int = 256) -> int:
    """Enough programs to fill the device twice over, but >= min_tokens_per_split tokens
    per split at the longest context. Depends only on host-known upper bounds, so a CUDA
    graph captured with max_context_len = max_model_len keeps its split count."""
    want = triton.cdiv(2 * _num_sms(device), batch * num_kv_heads)
    return max(1, min(want, triton.cdiv(max_context_len, min_tokens_per_split), 64))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           num_splits: int = 1, out: torch.Tensor | None = None,
                           softcap: float = 0.0, window: int = 0,
                           sinks: torch.Tensor | None = None, k_scale: float = 1.0,
                           v_scale: float = 1.0, chunk: int = 0,
                           alibi_slopes: torch.Tensor | None = None,
                           alibi_bf16_scale: float = 0.0) -> torch.Tensor:
    """out[b, h] = softmax(scale * q[b, h] . K_b^T) V_b over the first context_lens[b] cached
    tokens of sequence b (KV head h // (H // KVH)); context_lens[b] == 0 gives zeros.
    softcap > 0: the scores are softcap * tanh(score / softcap) (Gemma 2). window > 0: only
    the last `window` cached tokens (sliding-window attention); chunk > 0: only those of
    the new token's chunk of `chunk` positions (Llama 4). sinks [H]: each head's
    sink logit joins its softmax (gpt-oss). alibi_slopes [H] fp32: each head's scores get
    slope x key position (BLOOM, MPT); alibi_bf16_scale > 0 (Falcon-RW): the position
    and that product rounded to bfloat16, then times alibi_bf16_scale, as HF's Falcon
    computes it. An FP8
    cache holds K / k_scale, V / v_scale.

    q: [B, H, D] (last dim contiguous); k_cache/v_cache: [num_blocks, block_size, KVH, D];
    block_tables: [B, max_blocks] int32; context_lens: [B] int32. Returns [B, H, D]."""
    b, h, d = q.shape
    _, block_size, kvh, _ = k_cache.shape
    assert h % kvh == 0 and q.stride(-1) == 1 and k_cache.stride(-1) == 1
    assert k_cache.stride() == v_cache.stride() and block_tables.shape[0] >= b
    out = torch.empty(b, h, d, dtype=q.dtype, device=q.device) if out is None else out
    if num_splits > 1:
        part = torch.empty(b, h, num_splits, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, h, num_splits, dtype=torch.float32, device=q.device)
    else:
        part, lse = out.unsqueeze(2), out  # lse is unused with one split
    group = h // kvh
    block_d = _block_d(d)
    block_n = _block_n(block_d, q.dtype)
    block_g = _block_g(group, block_d)
    has_sinks = sinks is not None
    sinks = sinks if has_sinks else q  # any tensor: never read
    head_tiles = triton.cdiv(group, block_g)
    _decode_kernel[(b, kvh * head_tiles, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, sinks,
        alibi_slopes if alibi_slopes is not None else q, part, lse, scale * _LOG2E,
        float(k_scale), float(v_scale),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1), num_splits, GROUP=group, HEAD_DIM=d,
        BLOCK_SIZE=block_size, SPLIT=num_splits > 1,
        BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
        F32=fp32_dot(q.dtype, _INTERPRETED), SOFTCAP=float(softcap), WINDOW=int(window),
        HAS_SINKS=has_sinks, CHUNK=int(chunk), HEAD_TILES=head_tiles,
        ALIBI=alibi_slopes is not None, ALIBI_BF16=float(alibi_bf16_scale), num_warps=4)
    if num_splits > 1:
        _merge_splits_kernel[(b, h)](
            part, lse, sinks, out, part.stride(0), part.stride(1), part.stride(2),
            lse.stride(0), lse.stride(1), out.stride(0), out.stride(1), num_splits,
            HEAD_DIM=d, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=block_d,
            HAS_SINKS=has_sinks)
    return out


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, table_ptr, ctx_lens_ptr, cu_ptr,
                    sinks_ptr, slopes_ptr, limit_ptr, out_ptr, qk_scale, k_scale, v_scale,
                    stride_qt, stride_qh, stride_kt, stride_kh,
                    stride_vt, stride_vh, stride_cb, stride_ct, stride_ch, stride_tb, stride_ot,
                    stride_oh,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    HAS_CONTEXT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, F32: tl.constexpr, SOFTCAP: tl.constexpr,
                    WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_LIMIT: tl.constexpr,
                    CHUNK: tl.constexpr, ALIBI: tl.constexpr, ALIBI_BF16: tl.constexpr):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    kvh = h // GROUP
    q_start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_start
    i = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query index among the new tokens
    d = tl.arange(0, BLOCK_D)
    i_ok = i < q_len
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + i)[:, None].to(tl.int64) * stride_qt + h * stride_qh + d[None, :],
                mask=i_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # [BLOCK_M]: the head's slope on every row (l_i is zeros)
    slope = l_i + tl.load(slopes_ptr + h).to(tl.float32) \
        * (1.0 if ALIBI_BF16 > 0 else 1.4426950408889634) if ALIBI else l_i
    # 1) the cached context, all of it before every query: only the length bound (and,
    # with a window, positions past each query's position - WINDOW)
    ctx_len = tl.load(ctx_lens_ptr + b) if HAS_CONTEXT else 0
    ctx_end = tl.where(tile * BLOCK_M < q_len, ctx_len, 0)  # tiles past the end do nothing
    ctx_lo = tl.maximum(ctx_len + tile * BLOCK_M - WINDOW + 1, 0) if WINDOW > 0 else 0
    first_q = ctx_len + tile * BLOCK_M  # the tile's first query's position
    if CHUNK > 0:  # no query of the tile sees a key before the first query's chunk
        ctx_lo = tl.maximum(ctx_lo, first_q - first_q % CHUNK)
    m_i, l_i, acc = _attend_paged(
        q, ctx_len + i, m_i, l_i, acc, qk_scale, kc_ptr + kvh * stride_ch,
        vc_ptr + kvh * stride_ch, table_ptr + b.to(tl.int64) * stride_tb,
        tl.minimum(ctx_lo, ctx_end), ctx_end, stride_cb, stride_ct, k_scale, v_scale,
        HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D, F32, SOFTCAP, WINDOW, CHUNK, slope, ALIBI,
        ALIBI_BF16)
    # 2) the step's own K/V, causal: key j is visible to query i when j <= i, or with
    # HAS_LIMIT j <= limit[i] (Gemma 3's image tokens: the last of their image; i for
    # text) (and, with a window, j > i - WINDOW; with chunks, ctx_len + j at or after the
    # start of query ctx_len + i's chunk)
    if HAS_LIMIT:
        lim = tl.load(limit_ptr + q_start + i, mask=i_ok, other=-1)
        new_end = tl.minimum(q_len, tl.max(lim, 0) + 1)
    else:
        lim = i
        new_end = tl.minimum(q_len, (tile + 1) * BLOCK_M)
    new_lo = tl.maximum(tile * BLOCK_M - WINDOW + 1, 0) if WINDOW > 0 else 0
    if CHUNK > 0:
        new_lo = tl.maximum(new_lo, first_q - first_q % CHUNK - ctx_len)
    for n0 in range(new_lo, new_end, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        j_ok = j < new_end
        kv_rows = (q_start + j).to(tl.int64)
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_rows[:, None] * stride_kt + kvh * stride_kh + d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_rows[:, None] * stride_vt + kvh * stride_vh + d[None, :],
                    mask=kv_mask, other=0.0)
        valid = j_ok[None, :] & (j[None, :] <= lim[:, None])
        if WINDOW > 0:
            valid = valid & (j[None, :] > i[:, None] - WINDOW)
        if CHUNK > 0:
            q_pos = ctx_len + i
            valid = valid & (j[None, :] + ctx_len >= q_pos[:, None] - q_pos[:, None] % CHUNK)
        m_i, l_i, acc = _attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, F32, SOFTCAP,
                                     slope, ctx_len + j, ALIBI, ALIBI_BF16)
    if HAS_SINKS:
        l_i, acc = _add_sink(m_i, l_i, acc, tl.load(sinks_ptr + h))
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q_start + i)[:, None].to(tl.int64) * stride_ot + h * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=i_ok[:, None] & d_ok[None, :])


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, max_seqlen_q: int, scale: float,
                      k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                      block_tables: torch.Tensor | None = None,
                      context_lens: torch.Tensor | None = None,
                      out: torch.Tensor | None = None, softcap: float = 0.0,
                      window: int = 0, sinks: torch.Tensor | None = None,
                      k_scale: float = 1.0, v_scale: float = 1.0,
                      key_limit: torch.Tensor | None = None, chunk: int = 0,
                      alibi_slopes: torch.Tensor | None = None,
                      alibi_bf16_scale: float = 0.0) -> torch.Tensor:
    """Causal attention of new tokens packed flat: sequence b's queries and K/V are rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1] of q [T, H, D] / k, v [T, KVH, D]. With
    context_lens, sequence b also has context_lens[b] earlier tokens in the paged cache
    (block_tables [B, max_blocks] int32) that every one of its queries sees. softcap > 0:
    scores capped, window > 0 a sliding window and sinks [H] each head's sink logit, as in
    paged_decode_attention; an FP8 cache holds K / k_scale, V / v_scale (the step's own K/V
    are used as computed). key_limit [T] int32: each query's last visible key among its
    sequence's new tokens (index from the sequence's first new token; >= its own), for
    Gemma 3's image tokens, which see the rest of their image; None: causal. chunk > 0:
    each query sees only its chunk's keys (positions from p - p % chunk; Llama 4).
    alibi_slopes [H] fp32: slope x key position added to each head's scores (BLOOM, MPT;
    alibi_bf16_scale: as paged_decode_attention's). Returns [T, H, D]."""
    t, h, d = q.shape
    kvh = k.shape[1]
    assert h % kvh == 0 and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    has_ctx = context_lens is not None
    if has_ctx:
        assert k_cache is not None and v_cache is not None and block_tables is not None
        assert k_cache.stride() == v_cache.stride() and k_cache.shape[2:] == (kvh, d)
    else:  # any tensor will do: the context loops never run
        k_cache = v_cache = k
        block_tables = context_lens = cu_seqlens_q
    out = torch.empty(t, h, d, dtype=q.dtype, device=q.device) if out is None else out
    batch = cu_seqlens_q.shape[0] - 1
    block_d = _block_d(d)
    block = _block_n(block_d, q.dtype)
    grid = (triton.cdiv(max_seqlen_q, block), h, batch)
    has_sinks = sinks is not None
    _prefill_kernel[grid](
        q, k, v, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q,
        sinks if has_sinks else q, alibi_slopes if alibi_slopes is not None else q,
        key_limit if key_limit is not None else cu_seqlens_q, out,
        scale * _LOG2E, float(k_scale), float(v_scale), q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), k_cache.stride(0), k_cache.stride(1) if has_ctx else 0,
        k_cache.stride(2) if has_ctx else 0, block_tables.stride(0) if has_ctx else 0,
        out.stride(0), out.stride(1), GROUP=h // kvh, HEAD_DIM=d,
        BLOCK_SIZE=k_cache.shape[1] if has_ctx else 1, HAS_CONTEXT=has_ctx, BLOCK_M=block,
        BLOCK_N=block, BLOCK_D=block_d, F32=fp32_dot(q.dtype, _INTERPRETED),
        SOFTCAP=float(softcap), WINDOW=int(window), HAS_SINKS=has_sinks,
        HAS_LIMIT=key_limit is not None, CHUNK=int(chunk), ALIBI=alibi_slopes is not None,
        ALIBI_BF16=float(alibi_bf16_scale), num_warps=4)
    return out
