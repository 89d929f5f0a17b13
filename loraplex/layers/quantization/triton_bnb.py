"""y = x W^T for bitsandbytes 4-bit weights (NF4 / FP4) in one Triton kernel: each
[BLOCK_K, BLOCK_N] tile of W dequantized in registers, never written out.

    W[n, k] = code[q(n, k)] * absmax[n, k // 64]     q(n, k): byte [n, k // 2], the high
                                                     nibble for even k (bitsandbytes.py)

The same plan as triton_gemm.py (GPTQ / AWQ): a program per [BLOCK_M, BLOCK_N] tile of y,
walking its share of K (split-K for small batches, fp32 partials summed after). The
16-entry code table is read by index from global memory (it stays in L1). bitsandbytes.py's
torch path is the reference; on CPU tensors this runs only under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.backends import interpreter_on
from loraplex.layers.quantization.bitsandbytes import BnB4bitLinear
from loraplex.layers.quantization.triton_gemm import (
    accumulate,
    split_k_matmul,
    store_partial,
    x_tile,
)

_INTERPRETED = interpreter_on()


@triton.jit
def _bnb4_gemm_kernel(x_ptr, w_ptr, absmax_ptr, code_ptr, y_ptr, M, N, K, k_per_split,
                      stride_xm, stride_ym, BLOCKSIZE: tl.constexpr, F32: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (m, n, p) sums the K range p * k_per_split ... into y[p]."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    k_lo = tl.program_id(2) * k_per_split
    for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        kn_mask = k_mask[:, None] & n_mask[None, :]
        x = x_tile(x_ptr, offs_m, offs_k, M, K, stride_xm)
        byte = tl.load(w_ptr + offs_n[None, :] * (K // 2) + (offs_k // 2)[:, None],
                       mask=kn_mask, other=0).to(tl.int32)
        q = (byte >> ((1 - offs_k % 2) * 4)[:, None]) & 15
        scale = tl.load(absmax_ptr + offs_n[None, :] * (K // BLOCKSIZE)
                        + (offs_k // BLOCKSIZE)[:, None], mask=kn_mask, other=0.0)
        acc = accumulate(acc, x, tl.load(code_ptr + q) * scale, F32)  # w: [BLOCK_K, BLOCK_N]
    store_partial(y_ptr, acc, offs_m, offs_n, M, N, stride_ym)


def quant_matmul(x: torch.Tensor, layer: BnB4bitLinear, ways: int | None = None
                 ) -> torch.Tensor:
    """x [..., in] @ W^T (+ bias) with `layer`'s 4-bit weights; `ways`: K split over how
    many programs (None = enough to fill the GPU)."""
    def launch(grid, x2, y, m, n, k, k_per_split, f32, block_m, block_n, block_k):
        _bnb4_gemm_kernel[grid](
            x2, layer.weight, layer.absmax, layer.code, y, m, n, k, k_per_split,
            x2.stride(0), n, BLOCKSIZE=layer.cfg.group_size, F32=f32,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return split_k_matmul(x, layer, ways, launch)
