"""y = x W^T for FP8 weights (float8_e4m3fn) in one Triton kernel: each [BLOCK_K, BLOCK_N]
tile of W dequantized in registers, never written out.

    W[n, k] = values[q(n, k)] * row_scale[n, k // block_in]     q: the weight's byte

The FP8 byte is looked up in the table of its 256 values (read by index from global
memory, where it stays in L1), as triton_bnb.py looks up the NF4 code: the same code runs
under the interpreter, which has no FP8 type. The same plan as triton_gemm.py: a program
per [BLOCK_M, BLOCK_N] tile of y, split-K for small batches. fp8.py's torch path is the
reference; on CPU tensors this runs only under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.backends import interpreter_on
from loraplex.layers.quantization.fp8 import FP8Linear, fp8_values
from loraplex.layers.quantization.triton_gemm import (
    accumulate,
    split_k_matmul,
    store_partial,
    x_tile,
)

_INTERPRETED = interpreter_on()


@triton.jit
def _fp8_gemm_kernel(x_ptr, w_ptr, scale_ptr, values_ptr, y_ptr, M, N, K, k_per_split,
                     stride_xm, stride_ym, BLOCKS: tl.constexpr, BLOCK_IN: tl.constexpr,
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
        q = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None], mask=kn_mask,
                    other=0).to(tl.int32)
        scale = tl.load(scale_ptr + offs_n[None, :] * BLOCKS + (offs_k // BLOCK_IN)[:, None],
                        mask=kn_mask, other=0.0)
        acc = accumulate(acc, x, tl.load(values_ptr + q) * scale, F32)  # [BLOCK_K, BLOCK_N]
    store_partial(y_ptr, acc, offs_m, offs_n, M, N, stride_ym)


def quant_matmul(x: torch.Tensor, layer: FP8Linear, ways: int | None = None) -> torch.Tensor:
    """x [..., in] @ W^T (+ bias) with `layer`'s FP8 weights; `ways`: K split over how many
    programs (None = enough to fill the GPU)."""
    def launch(grid, x2, y, m, n, k, k_per_split, f32, block_m, block_n, block_k):
        _fp8_gemm_kernel[grid](
            x2, layer.weight.view(torch.uint8), layer.row_scale, fp8_values(x.device), y,
            m, n, k, k_per_split, x2.stride(0), n, BLOCKS=layer.row_scale.shape[1],
            BLOCK_IN=layer.block_in, F32=f32,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return split_k_matmul(x, layer, ways, launch)
