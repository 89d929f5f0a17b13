"""y = x W^T for bitsandbytes 4-bit weights (NF4 / FP4) in one Triton kernel: each
[BLOCK_K, BLOCK_N] tile of W dequantized in registers, never written out.

    W[n, k] = code[q(n, k)] * absmax[n, k // 64]     q(n, k): byte [n, k // 2], the high
                                                     nibble for even k (bitsandbytes.py)

A linear layer's weight, or one expert projection of a mixture (BnB4bitMatrix,
layers/quantized_experts.py). The kernel is triton_gemm.code4_gemm_kernel, which MXFP4's
4-bit codes share (triton_mxfp4.py): the same plan as triton_gemm.py's GPTQ / AWQ one, a program per
[BLOCK_M, BLOCK_N] tile of y walking its share of K (split-K for small batches, fp32
partials summed after). The 16-entry code table is read by index from global memory (it
stays in L1). bitsandbytes.py's torch path is the reference; on CPU tensors this runs only
under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch

from loraplex.backends import interpreter_on
from loraplex.layers.quantization.bitsandbytes import BnB4bitLinear, BnB4bitMatrix
from loraplex.layers.quantization.triton_gemm import code4_gemm_kernel, split_k_matmul

_INTERPRETED = interpreter_on()


def quant_matmul(x: torch.Tensor, layer: BnB4bitLinear | BnB4bitMatrix,
                 ways: int | None = None) -> torch.Tensor:
    """x [..., in] @ W^T (+ bias) with `layer`'s 4-bit weights; `ways`: K split over how
    many programs (None = enough to fill the GPU)."""
    def launch(grid, x2, y, m, n, k, k_per_split, f32, block_m, block_n, block_k):
        code4_gemm_kernel[grid](  # (the powers table is not read: any pointer)
            x2, layer.weight, layer.absmax, layer.code, layer.code, y, m, n, k, k_per_split,
            x2.stride(0), n, SCALE_BLOCK=k // layer.absmax.shape[-1], HIGH_FIRST=True,
            SCALE_EXPONENTS=False, F32=f32, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k)
    return split_k_matmul(x, layer, ways, launch)
