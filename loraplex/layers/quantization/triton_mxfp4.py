"""y = x W^T for MXFP4 weights (gpt-oss's experts) in one Triton kernel: each
[BLOCK_K, BLOCK_N] tile of W dequantized in registers, never written out.

    W[n, k] = values[q(n, k)] * 2 ** (s[n, k // 32] - 127)     q(n, k): byte [n, k // 2],
                                                               the low nibble for even k

Both factors are looked up in mxfp4.tables (the 16 E2M1 values, the 256 powers of two),
read by index from global memory where they stay in L1, as triton_bnb.py looks up the NF4
code. The same plan as triton_gemm.py: a program per [BLOCK_M, BLOCK_N] tile of y,
split-K for small batches. mxfp4.py's torch path is the reference; on CPU tensors this
runs only under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.backends import interpreter_on
from loraplex.layers.quantization.mxfp4 import BLOCK, MXFP4Matrix, tables
from loraplex.layers.quantization.triton_gemm import (
    accumulate,
    split_k_matmul,
    store_partial,
    x_tile,
)

_INTERPRETED = interpreter_on()


@triton.jit
def _mxfp4_gemm_kernel(x_ptr, w_ptr, scale_ptr, values_ptr, powers_ptr, y_ptr, M, N, K,
                       k_per_split, stride_xm, stride_ym, SCALE_BLOCK: tl.constexpr,
                       F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """Program (m, n, p) sums the K range p * k_per_split ... into y[p]."""
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
        q = (byte >> ((offs_k % 2) * 4)[:, None]) & 15
        s = tl.load(scale_ptr + offs_n[None, :] * (K // SCALE_BLOCK)
                    + (offs_k // SCALE_BLOCK)[:, None], mask=kn_mask, other=0).to(tl.int32)
        w = tl.load(values_ptr + q) * tl.load(powers_ptr + s)  # [BLOCK_K, BLOCK_N]
        acc = accumulate(acc, x, w, F32)
    store_partial(y_ptr, acc, offs_m, offs_n, M, N, stride_ym)


def quant_matmul(x: torch.Tensor, layer: MXFP4Matrix, ways: int | None = None
                 ) -> torch.Tensor:
    """x [..., in] @ W^T (+ bias) with `layer`'s MXFP4 weights; `ways`: K split over how
    many programs (None = enough to fill the GPU)."""
    values, powers = tables(x.device)

    def launch(grid, x2, y, m, n, k, k_per_split, f32, block_m, block_n, block_k):
        _mxfp4_gemm_kernel[grid](
            x2, layer.packed, layer.scales, values, powers, y, m, n, k, k_per_split,
            x2.stride(0), n, SCALE_BLOCK=BLOCK, F32=f32,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return split_k_matmul(x, layer, ways, launch)
