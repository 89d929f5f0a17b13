"""y = x W^T for MXFP4 weights (gpt-oss's experts) in one Triton kernel: each
[BLOCK_K, BLOCK_N] tile of W dequantized in registers, never written out.

    W[n, k] = values[q(n, k)] * 2 ** (s[n, k // 32] - 127)     q(n, k): byte [n, k // 2],
                                                               the low nibble for even k

Both factors are looked up in mxfp4.tables (the 16 E2M1 values, the 256 powers of two),
read by index from global memory where they stay in L1. The kernel is
triton_gemm.code4_gemm_kernel, bitsandbytes' 4-bit one (triton_bnb.py) with the low nibble
first and scale exponents: a program per [BLOCK_M, BLOCK_N] tile of y, split-K for small
batches. mxfp4.py's torch path is the reference; on CPU tensors this
runs only under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch

from loraplex.backends import interpreter_on
from loraplex.layers.quantization.mxfp4 import BLOCK, MXFP4Matrix, tables
from loraplex.layers.quantization.triton_gemm import code4_gemm_kernel, split_k_matmul

_INTERPRETED = interpreter_on()


def quant_matmul(x: torch.Tensor, layer: MXFP4Matrix, ways: int | None = None
                 ) -> torch.Tensor:
    """x [..., in] @ W^T (+ bias) with `layer`'s MXFP4 weights; `ways`: K split over how
    many programs (None = enough to fill the GPU)."""
    values, powers = tables(x.device)

    def launch(grid, x2, y, m, n, k, k_per_split, f32, block_m, block_n, block_k):
        code4_gemm_kernel[grid](
            x2, layer.packed, layer.scales, values, powers, y, m, n, k, k_per_split,
            x2.stride(0), n, SCALE_BLOCK=BLOCK, HIGH_FIRST=False, SCALE_EXPONENTS=True,
            F32=f32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return split_k_matmul(x, layer, ways, launch)
