"""4-bit codes, two per byte, each a 16-value table's entry times its block's scale: the
torch path of bitsandbytes' NF4 / FP4 weights (the high nibble first, an fp32 absmax per
block) and of MXFP4's (the low nibble first, a power of two per block). Their CUDA path
is one kernel too, triton_gemm.code4_gemm_kernel.
"""

from __future__ import annotations

import torch


def dequantize_codes4(packed: torch.Tensor, block_scales: torch.Tensor, code: torch.Tensor,
                      dtype: torch.dtype, high_first: bool) -> torch.Tensor:
    """packed [out, in / 2] uint8, block_scales [out, in / block] (floats), code [16] ->
    W [out, in] in `dtype`; `high_first`: the even input is the byte's high nibble."""
    out = packed.shape[0]
    code = code.to(dtype)
    # byte b -> its two values in input order: one lookup per byte (2.5x faster on a CPU
    # than two per nibble)
    high, low = code.repeat_interleave(16), code.repeat(16)
    pairs = torch.stack((high, low) if high_first else (low, high), dim=-1)
    values = pairs.index_select(0, packed.reshape(-1).int())  # [out * in / 2, 2]
    blocks = values.view(out, block_scales.shape[1], -1)
    return (blocks * block_scales.to(dtype).unsqueeze(-1)).view(out, -1)
