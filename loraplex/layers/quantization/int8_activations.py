"""compressed-tensors' int8 activation quantization (W8A8): a Linear's input is rounded to
int8 steps before its quantized weight multiplies it, as the checkpoint was calibrated.

    dynamic, per token (llm-compressor's W8A8):  s = max|x_t| / 127.5
    static, per tensor (the checkpoint's input_scale s and input_zero_point z):
    x' = (clamp(round(x / s + z), -128, 127) - z) * s      (clamped before rounding)

This is the compressed-tensors package's own definition (what transformers runs these
checkpoints with); vLLM's int8 kernels divide a token's absmax by 127 instead, less than
one int8 step apart. Here x' then goes through the weight's usual path (the int weight
dequantized, or GPTQ's Triton kernel on CUDA): the result is the int8 GEMM's, computed in
floating point. LoRA reads the unquantized x, as in vLLM (its delta is added beside the
base layer's output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT8_MIN, INT8_MAX = -128, 127


@dataclass(frozen=True)
class ActivationQuant:
    """How a Linear's input is quantized: `dynamic` per token (symmetric), or static per
    tensor from the checkpoint's input_scale (and input_zero_point unless `symmetric`)."""

    dynamic: bool
    symmetric: bool = True

    def fake_quantize(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                      zero: torch.Tensor | None = None) -> torch.Tensor:
        """x rounded to int8 steps, in x's dtype: per row of x when dynamic; with the
        static `scale` / `zero` ([1] each) otherwise."""
        if self.dynamic:
            scale = x.abs().amax(-1, keepdim=True) / ((INT8_MAX - INT8_MIN) / 2)
            scale = torch.where(scale == 0, torch.finfo(x.dtype).eps, scale)
            return torch.clamp(x / scale, INT8_MIN, INT8_MAX).round_() * scale
        assert scale is not None, "static activation quantization needs input_scale"
        scale = scale.to(x.dtype)
        if zero is None or self.symmetric:
            return torch.clamp(x / scale, INT8_MIN, INT8_MAX).round_() * scale
        zero = zero.to(x.dtype)
        return (torch.clamp(x / scale + zero, INT8_MIN, INT8_MAX).round_() - zero) * scale


def merged_static(scales: torch.Tensor, zeros: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One static (scale, zero) for sub-projections that read the same input (q/k/v,
    gate/up), each calibrated on its own: equal ones stay; otherwise the range that covers
    all of theirs, as vLLM merges them (the largest scale when symmetric)."""
    if bool((scales == scales[0]).all()) and (zeros is None or bool((zeros == zeros[0]).all())):
        return scales[:1], None if zeros is None else zeros[:1]
    if zeros is None:
        return scales.max().reshape(1), None
    high = (scales * (INT8_MAX - zeros)).max()
    low = (scales * (INT8_MIN - zeros)).min()
    scale = (high - low) / (INT8_MAX - INT8_MIN)
    return scale.reshape(1), (INT8_MIN - low / scale).round().reshape(1)
