"""MXFP4 weights (OCP microscaling, 4-bit): gpt-oss's experts as OpenAI ships them
(`quant_method: mxfp4`; everything else in those checkpoints is plain bf16).

    W[o, i] = fp4(q[o, i]) * 2 ** (s[o, i // 32] - 127)

q: E2M1 values (sign, 2 exponent bits, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and
their negatives), two per byte, the low nibble first; s: one exponent byte per block of
32 inputs. Checkpoints store an expert projection as `{name}_blocks` [E, out, in / 32, 16]
and `{name}_scales` [E, out, in / 32]. The values are kept packed ([out, in / 2] bytes);
an expert a step routes tokens to goes through the Triton kernel on CUDA
(triton_mxfp4.py), or is dequantized in torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.layers.quantization.codes4 import dequantize_codes4

BLOCK = 32  # inputs per scale
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
               -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass
class MXFP4Matrix:
    """One MXFP4 weight [out, in] as the Triton kernel (triton_mxfp4.py) reads it: a gpt-oss
    expert projection."""

    packed: torch.Tensor  # [out, in / 2] uint8
    scales: torch.Tensor  # [out, in / 32] uint8
    bias: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return 2 * self.packed.shape[1]

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]


_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the 16 E2M1 values, the 256 scales 2 ** (s - 127)) in fp32: what a nibble and a
    scale byte stand for, looked up by the torch path and the kernel alike."""
    if device not in _TABLES:
        _TABLES[device] = (torch.tensor(E2M1_VALUES, device=device),
                           torch.exp2(torch.arange(256, dtype=torch.float64) - 127)
                           .float().to(device))
    return _TABLES[device]


def dequantize(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """packed [out, in / 2] uint8, scales [out, in / 32] uint8 -> W [out, in] in `dtype`
    (exact: an E2M1 value times a power of two, computed in fp32)."""
    values, powers = tables(packed.device)
    block_scales = powers.index_select(0, scales.reshape(-1).int()).view(scales.shape)
    return dequantize_codes4(packed, block_scales, values, torch.float32,
                             high_first=False).to(dtype)


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
