"""y = x W for GPTQ / AWQ weights in one Triton kernel: dequantized tile by tile in
registers, never written out as a full-precision matrix.

Each program owns a [BLOCK_M, BLOCK_N] tile of y and walks K (its share of K when a small
batch leaves too few tiles to fill the GPU: split-K, fp32 partials summed after). Per K
step it loads the
int32 words that hold the tile's [BLOCK_K, BLOCK_N] weights, shifts out each value, loads
the group's scale and zero (by g_idx for GPTQ, so act-order needs no reordering; by
k // group_size for AWQ) and multiplies the dequantized tile into an fp32 accumulator.
The bit layouts are those of linear.py (GPTQ: values along K, zeros along N; AWQ: both
along N in the order 0 4 1 5 2 6 3 7), and `linear.py`'s torch path is the reference.
On CPU tensors it runs only under TRITON_INTERPRET=1 (tests); there fp32 is exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from loraplex.backends import fp32_dot, interpreter_on, plan_split_k
from loraplex.layers.quantization.linear import PackedIntLinear, PackedIntWeight, QuantLinear

_INTERPRETED = interpreter_on()


@triton.jit
def x_tile(x_ptr, offs_m, offs_k, M, K, stride_xm):
    """x[offs_m, offs_k] ([BLOCK_M, BLOCK_K]), zeros past M and K."""
    return tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                   mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0)


@triton.jit
def accumulate(acc, x, w, F32: tl.constexpr):
    """acc + x @ w, w dequantized in fp32: exact fp32 where F32 (the interpreter, fp32
    inputs), else in x's dtype on the tensor cores."""
    if F32:
        acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
    else:
        acc += tl.dot(x, w.to(x.dtype))
    return acc


@triton.jit
def store_partial(y_ptr, acc, offs_m, offs_n, M, N, stride_ym):
    """This program's tile of y[split] (y: [splits, M, N])."""
    y_ptr += tl.program_id(2).to(tl.int64) * M * stride_ym
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _quant_gemm_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, y_ptr,
                       M, N, K, k_per_split, stride_xm, stride_ym,
                       GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                       MASK: tl.constexpr, ZERO_OFFSET: tl.constexpr, AWQ: tl.constexpr,
                       F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """PER values of BITS bits per int32 (MASK = 2**BITS - 1). Program (m, n, p) sums the
    K range p * k_per_split ... into y[p] (fp32 partials when split over K)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if AWQ:  # output column 8c + j sits in nibble j // 2 + 4 (j % 2) of word c
        col = offs_n % 8
        shift_n = (col // 2 + (col % 2) * 4) * 4
    else:
        shift_n = (offs_n % PER) * BITS
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    k_lo = tl.program_id(2) * k_per_split
    for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        kn_mask = k_mask[:, None] & n_mask[None, :]
        x = x_tile(x_ptr, offs_m, offs_k, M, K, stride_xm)
        if AWQ:
            words = tl.load(qweight_ptr + offs_k[:, None] * (N // 8) + offs_n[None, :] // 8,
                            mask=kn_mask, other=0)
            q = (words >> shift_n[None, :]) & MASK
            g = offs_k // GROUP_SIZE
        else:
            words = tl.load(qweight_ptr + (offs_k // PER)[:, None] * N + offs_n[None, :],
                            mask=kn_mask, other=0)
            q = (words >> ((offs_k % PER) * BITS)[:, None]) & MASK
            g = tl.load(g_idx_ptr + offs_k, mask=k_mask, other=0)
        zwords = tl.load(qzeros_ptr + g[:, None] * (N // PER) + offs_n[None, :] // PER,
                         mask=kn_mask, other=0)
        z = ((zwords >> shift_n[None, :]) & MASK) + ZERO_OFFSET
        s = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :], mask=kn_mask, other=0.0)
        acc = accumulate(acc, x, (q - z).to(tl.float32) * s.to(tl.float32), F32)
    store_partial(y_ptr, acc, offs_m, offs_n, M, N, stride_ym)


@triton.jit
def code4_gemm_kernel(x_ptr, w_ptr, scale_ptr, code_ptr, powers_ptr, y_ptr, M, N, K,
                      k_per_split, stride_xm, stride_ym, SCALE_BLOCK: tl.constexpr,
                      HIGH_FIRST: tl.constexpr, SCALE_EXPONENTS: tl.constexpr,
                      F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """4-bit codes, two per byte (W's byte [n, k // 2]), each looked up in a 16-value
    table and times its block's scale: bitsandbytes NF4 / FP4 (the high nibble for even k,
    an fp32 absmax per block) and MXFP4 (the low nibble first, a scale byte s per block
    standing for powers[s] = 2 ** (s - 127): SCALE_EXPONENTS). Program (m, n, p) sums the
    K range p * k_per_split ... into y[p]."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    k_lo = tl.program_id(2) * k_per_split
    for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kn_mask = (offs_k < K)[:, None] & n_mask[None, :]
        x = x_tile(x_ptr, offs_m, offs_k, M, K, stride_xm)
        byte = tl.load(w_ptr + offs_n[None, :] * (K // 2) + (offs_k // 2)[:, None],
                       mask=kn_mask, other=0).to(tl.int32)
        odd = offs_k % 2
        shift = (1 - odd) * 4 if HIGH_FIRST else odd * 4
        q = (byte >> shift[:, None]) & 15
        scale = tl.load(scale_ptr + offs_n[None, :] * (K // SCALE_BLOCK)
                        + (offs_k // SCALE_BLOCK)[:, None], mask=kn_mask, other=0)
        if SCALE_EXPONENTS:
            scale = tl.load(powers_ptr + scale.to(tl.int32))
        acc = accumulate(acc, x, tl.load(code_ptr + q) * scale, F32)  # w: [BLOCK_K, BLOCK_N]
    store_partial(y_ptr, acc, offs_m, offs_n, M, N, stride_ym)


def gemm_blocks(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): a 16-row tile for decode, wider ones for prefill."""
    if m <= 16:
        return 16, 64, 128
    if m <= 64:
        return 64, 64, 64
    return 128, 128, 32


def split_k_matmul(x: torch.Tensor, layer: QuantLinear, ways: int | None,
                   launch: Callable[..., None]) -> torch.Tensor:
    """What the quantized GEMM kernels share around their launch: x as [M, K] rows, the
    tile and split-K plan (a small batch has few output tiles, so K is split over programs
    too: `ways` of them, None = enough to fill the GPU), the fp32 partials summed in a
    fixed order, the bias. `launch(grid, x2, y, M, N, K, k_per_split, F32, BLOCK_M,
    BLOCK_N, BLOCK_K)` starts the kernel."""
    x2 = x.reshape(-1, layer.in_features).contiguous()
    m, n, k = x2.shape[0], layer.out_features, layer.in_features
    block_m, block_n, block_k = gemm_blocks(m)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    splits, k_per_split = plan_split_k(k, block_k, tiles, ways=ways)
    y = torch.empty(splits, m, n, dtype=x.dtype if splits == 1 else torch.float32,
                    device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)
    launch(grid, x2, y, m, n, k, k_per_split, fp32_dot(x.dtype, _INTERPRETED),
           block_m, block_n, block_k)
    y = y[0] if splits == 1 else y.sum(0).to(x.dtype)
    if layer.bias is not None:
        y += layer.bias
    return y.view(*x.shape[:-1], n)


def quant_matmul(x: torch.Tensor, layer: PackedIntLinear | PackedIntWeight,
                 ways: int | None = None) -> torch.Tensor:
    """x [..., in] @ W [in, out] (+ bias) with `layer`'s packed GPTQ / AWQ weights (a
    linear layer's, or one expert projection's)."""
    cfg = layer.cfg
    awq = cfg.method == "awq"
    g_idx = layer.qweight if awq else layer.g_idx  # AWQ reads no g_idx: any int32 pointer
    group = cfg.group_size if cfg.group_size != -1 else layer.in_features

    def launch(grid, x2, y, m, n, k, k_per_split, f32, block_m, block_n, block_k):
        _quant_gemm_kernel[grid](
            x2, layer.qweight, layer.qzeros, layer.scales, g_idx, y,
            m, n, k, k_per_split, x2.stride(0), n,
            GROUP_SIZE=group, BITS=cfg.bits, PER=cfg.pack_factor, MASK=(1 << cfg.bits) - 1,
            ZERO_OFFSET=cfg.zero_offset, AWQ=awq, F32=f32,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return split_k_matmul(x, layer, ways, launch)
