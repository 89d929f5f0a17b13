"""MXFP4 weights (OCP microscaling, 4-bit): gpt-oss's experts as OpenAI ships them
(`quant_method: mxfp4`; everything else in those checkpoints is plain bf16).

    W[o, i] = fp4(q[o, i]) * 2 ** (s[o, i // 32] - 127)

q: E2M1 values (sign, 2 exponent bits, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and
their negatives), two per byte, the low nibble first; s: one exponent byte per block of
32 inputs. Checkpoints store an expert projection as `{name}_blocks` [E, out, in / 32, 16]
and `{name}_scales` [E, out, in / 32]. The values are kept packed ([out, in / 2] bytes)
and dequantized in torch for the experts a step routes tokens to.
"""

from __future__ import annotations

import torch

BLOCK = 32  # inputs per scale
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
               -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """packed [out, in / 2] uint8, scales [out, in / 32] uint8 -> W [out, in] in `dtype`."""
    out = packed.shape[0]
    table = torch.tensor(E2M1_VALUES, dtype=dtype, device=packed.device)
    low, high = table[(packed & 0x0F).int()], table[(packed >> 4).int()]
    values = torch.stack([low, high], dim=-1).view(out, -1, BLOCK)
    return torch.ldexp(values, scales.int().sub(127).unsqueeze(-1)).view(out, -1)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (packed [out, in / 2], scales [out, in / 32]): each block's scale the
    smallest power of two that brings its largest magnitude within 6, each value rounded
    to the nearest E2M1 one. For tests and dummy weights; checkpoints come quantized."""
    out, n = w.shape
    blocks = w.float().reshape(out, n // BLOCK, BLOCK)
    amax = blocks.abs().amax(dim=-1).clamp_min(2.0 ** -126)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = blocks / torch.exp2(exponent).unsqueeze(-1)
    table = torch.tensor(E2M1_VALUES)
    codes = (scaled.unsqueeze(-1) - table).abs().argmin(dim=-1).to(torch.uint8).view(out, n)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed, (exponent + 127).to(torch.uint8)
