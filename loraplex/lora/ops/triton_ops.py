"""Multi-LoRA shrink and expand in Triton: the GPU path, same signatures as torch_ops.

    shrink:  buf[p, i, k, :r] = A[s, :r, k, in-chunk p] @ x[i, in-chunk p]     r = lora_ranks[s]
    expand:  y[i, cols_k] += B[s, cols_k, :r] @ sum_p buf[p, i, k, :r]

(shapes in torch_ops). One launch per op per layer covers every packed slice, every
adapter and every rank in the step. The unit of work is a tile of LoRABatchMeta: up to
BLOCK_M tokens of one slot, so decode (a tile per adapter, BGMV-like) and prefill
(segments cut into fat tiles, SGMV-like) run the same kernels.

- shrink, grid (split_k, J = `groups`): program (p, j) takes tiles j, j+J, ...; for each
  it reads the slot's A over in-chunk p, all slices, rank rows only, and writes a
  partial sum (no atomics, no zeroing: expand adds the split_k partials).
- expand, grid (output blocks, J): program (n, j) takes the same tiles and for each
  reads B[slot, block n, :rank] and adds into y[rows, block n] (each y element has one
  owner). A block lies within one packed slice, which picks the buf columns.

Rank-aware: loops run over range(0, rank, BLOCK_R), so the padding up to max_lora_rank
is never read and a rank-0 slot costs nothing. The grid comes from host upper bounds
only (meta.max_tiles from the token count, and the layer's shapes), never from max_loras;
tiles past meta.num_tiles do nothing, and slots, ranks and tiles are read from tensors,
so a CUDA graph captured once replays with other slots, ranks and segment lengths.
Each tile reads its slot's weights once: in decode a slot's few tokens are one tile, so
each active adapter is read once per step; a long prefill segment spans several tiles.
Launch sizes are first guesses, not yet tuned on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.backends import TARGET_PROGRAMS, fp32_dot, interpreter_on, plan_split_k
from loraplex.lora.meta import LoRABatchMeta

BLOCK_R = 16  # rank rows per step; tl.dot needs >= 16
SHRINK_BLOCK_K = 128
EXPAND_BLOCK_N = 128
MAX_SPLIT_K = 32
MAX_SLICES = 3  # qkv
# The interpreter's tl.dot mishandles bf16 (numpy has none): there it runs in fp32. The
# kernels avoid tl helpers that are themselves @jit (tl.zeros, tl.cdiv): those stay
# compiled-only when triton was imported before TRITON_INTERPRET=1 was set (as in pytest).
_INTERPRETED = interpreter_on()


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    """a @ b with fp32 accumulation; exact fp32 for fp32 weights, else in b's dtype."""
    if F32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a.to(b.dtype), b)
    return out


@triton.jit
def _tile(t, tile_slot_ptr, tile_start_ptr, tile_len_ptr, sorted_ptr, ranks_ptr,
          BLOCK_M: tl.constexpr):
    """Tile t of the step: its slot, the slot's rank, its token rows and their mask."""
    slot = tl.load(tile_slot_ptr + t).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < tl.load(tile_len_ptr + t)
    rows = tl.load(sorted_ptr + tl.load(tile_start_ptr + t) + offs_m, mask=m_mask, other=0)
    return slot, tl.load(ranks_ptr + slot), rows.to(tl.int64), m_mask


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, buf_ptr, ranks_ptr,
    sorted_ptr, tile_slot_ptr, tile_start_ptr, tile_len_ptr, num_tiles_ptr,
    d_in, k_per_split, groups,
    stride_xm, stride_xd,
    stride_as, stride_ak, stride_ar, stride_ad,
    stride_bp, stride_bm, stride_bk, stride_br,
    N_SLICES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr, F32: tl.constexpr,
):
    pid_p = tl.program_id(0)
    d_lo = pid_p * k_per_split
    d_hi = tl.minimum(d_lo + k_per_split, d_in)
    for t in range(tl.program_id(1), tl.load(num_tiles_ptr), groups):
        slot, rank, rows, m_mask = _tile(t, tile_slot_ptr, tile_start_ptr, tile_len_ptr,
                                         sorted_ptr, ranks_ptr, BLOCK_M)
        x_rows = x_ptr + rows[:, None] * stride_xm
        out_rows = buf_ptr + pid_p * stride_bp + rows[:, None] * stride_bm
        for k in tl.static_range(N_SLICES):
            a_k = a_ptr + slot * stride_as + k * stride_ak
            for r0 in range(0, rank, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                r_mask = offs_r < rank
                acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
                for d0 in range(d_lo, d_hi, BLOCK_K):
                    offs_d = d0 + tl.arange(0, BLOCK_K)
                    d_mask = offs_d < d_hi
                    xt = tl.load(x_rows + offs_d[None, :] * stride_xd,
                                 mask=m_mask[:, None] & d_mask[None, :], other=0.0)
                    at = tl.load(a_k + offs_r[None, :] * stride_ar + offs_d[:, None] * stride_ad,
                                 mask=d_mask[:, None] & r_mask[None, :], other=0.0)
                    acc += _dot(xt, at, F32)  # [BLOCK_M, BLOCK_K] @ [BLOCK_K, BLOCK_R]
                tl.store(out_rows + k * stride_bk + offs_r[None, :] * stride_br, acc,
                         mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_kernel(
    buf_ptr, b_ptr, y_ptr, ranks_ptr,
    sorted_ptr, tile_slot_ptr, tile_start_ptr, tile_len_ptr, num_tiles_ptr,
    out0, out1, out2, split_k, groups,
    stride_bp, stride_bm, stride_bk, stride_br,
    stride_ws, stride_wn, stride_wr,
    stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, F32: tl.constexpr,
):
    # output block pid_n lies in packed slice k = 0, 1 or 2 (out2 = 0 with two slices)
    pid_n = tl.program_id(0)
    nb0 = (out0 + BLOCK_N - 1) // BLOCK_N
    nb1 = (out1 + BLOCK_N - 1) // BLOCK_N
    in1 = pid_n >= nb0
    in2 = pid_n >= nb0 + nb1
    k = in1.to(tl.int32) + in2.to(tl.int32)
    col0 = tl.where(in2, out0 + out1, tl.where(in1, out0, 0))
    blk0 = tl.where(in2, nb0 + nb1, tl.where(in1, nb0, 0))
    offs_n = col0 + (pid_n - blk0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < col0 + tl.where(in2, out2, tl.where(in1, out1, out0))
    for t in range(tl.program_id(1), tl.load(num_tiles_ptr), groups):
        slot, rank, rows, m_mask = _tile(t, tile_slot_ptr, tile_start_ptr, tile_len_ptr,
                                         sorted_ptr, ranks_ptr, BLOCK_M)
        if rank > 0:
            t_rows = buf_ptr + rows[:, None] * stride_bm + k * stride_bk
            acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
            for r0 in range(0, rank, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                r_mask = offs_r < rank
                tt = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
                for p in range(split_k):
                    tt += tl.load(t_rows + p * stride_bp + offs_r[None, :] * stride_br,
                                  mask=m_mask[:, None] & r_mask[None, :], other=0.0)
                w = tl.load(b_ptr + slot * stride_ws + offs_n[None, :] * stride_wn
                            + offs_r[:, None] * stride_wr,
                            mask=r_mask[:, None] & n_mask[None, :], other=0.0)
                acc += _dot(tt, w, F32)  # [BLOCK_M, BLOCK_R] @ [BLOCK_R, BLOCK_N]
            y_tile = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
            mask = m_mask[:, None] & n_mask[None, :]
            y = tl.load(y_tile, mask=mask, other=0.0)
            tl.store(y_tile, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, lora_ranks: torch.Tensor, slots: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"expected a [tokens, features] tensor, got shape {tuple(x.shape)}")
    if lora_ranks.dtype != torch.int32 or lora_ranks.shape != (slots,):
        raise ValueError(f"lora_ranks must be int32 [{slots}], got {lora_ranks.dtype} "
                         f"{tuple(lora_ranks.shape)}")


def _meta_args(meta: LoRABatchMeta) -> tuple[torch.Tensor, ...]:
    return (meta.sorted_token_ids, meta.tile_slot, meta.tile_start, meta.tile_len,
            meta.num_tiles)


def lora_shrink(x: torch.Tensor, a_stacked: torch.Tensor, lora_ranks: torch.Tensor,
                meta: LoRABatchMeta) -> torch.Tensor:
    """buf[p, i, k, :r] = A[s, :r, k, chunk p] @ x[i, chunk p]: split_k partial sums."""
    slots, rank, n, d_in = a_stacked.shape
    _check(x, lora_ranks, slots)
    if x.shape[1] != d_in:
        raise ValueError(f"x has {x.shape[1]} features, lora_a_stacked expects {d_in}")
    j = max(1, min(meta.max_tiles, 1024))
    splits, k_per_split = plan_split_k(d_in, SHRINK_BLOCK_K, j, most=MAX_SPLIT_K)
    buf = torch.empty(splits, x.shape[0], n, rank, dtype=torch.float32, device=x.device)
    _shrink_kernel[(splits, j)](
        x, a_stacked, buf, lora_ranks, *_meta_args(meta), d_in, k_per_split, j,
        *x.stride(), *(a_stacked.stride(i) for i in (0, 2, 1, 3)), *buf.stride(),
        N_SLICES=n, BLOCK_M=meta.block_m, BLOCK_R=BLOCK_R, BLOCK_K=SHRINK_BLOCK_K,
        F32=fp32_dot(a_stacked.dtype, _INTERPRETED))
    return buf


def lora_expand(buf: torch.Tensor, b_stacked: torch.Tensor, y: torch.Tensor,
                lora_ranks: torch.Tensor, meta: LoRABatchMeta, output_sizes: list[int]) -> None:
    """y[i, cols_k] += B[s, cols_k, :r] @ buf.sum(0)[i, k, :r], in place, every slice k."""
    slots, d_out, rank = b_stacked.shape
    _check(y, lora_ranks, slots)
    if not 1 <= len(output_sizes) <= MAX_SLICES or sum(output_sizes) != d_out or d_out != y.shape[1]:
        raise ValueError(f"output_sizes {output_sizes} do not split lora_b_stacked rows "
                         f"{d_out} / y columns {y.shape[1]} into 1..{MAX_SLICES} slices")
    if buf.shape[1:] != (y.shape[0], len(output_sizes), rank):
        raise ValueError(f"buf {tuple(buf.shape)} does not match y {tuple(y.shape)} / "
                         f"{len(output_sizes)} slices of rank {rank}")
    outs = list(output_sizes) + [0] * (MAX_SLICES - len(output_sizes))
    n_blocks = sum(triton.cdiv(o, EXPAND_BLOCK_N) for o in output_sizes)
    j = max(1, min(meta.max_tiles, triton.cdiv(TARGET_PROGRAMS, n_blocks)))
    _expand_kernel[(n_blocks, j)](
        buf, b_stacked, y, lora_ranks, *_meta_args(meta), *outs, buf.shape[0], j,
        *buf.stride(), *b_stacked.stride(), *y.stride(),
        BLOCK_M=meta.block_m, BLOCK_R=BLOCK_R, BLOCK_N=EXPAND_BLOCK_N,
        F32=fp32_dot(b_stacked.dtype, _INTERPRETED))


def add_lora(y: torch.Tensor, x: torch.Tensor, a_stacked: torch.Tensor,
             b_stacked: torch.Tensor, lora_ranks: torch.Tensor, meta: LoRABatchMeta,
             output_sizes: list[int]) -> None:
    """y += B[s] (A[s] x) for every token whose slot s >= 0: two launches."""
    if x.shape[0] == 0:
        return
    buf = lora_shrink(x, a_stacked, lora_ranks, meta)
    lora_expand(buf, b_stacked, y, lora_ranks, meta, output_sizes)
