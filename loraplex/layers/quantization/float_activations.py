"""compressed-tensors' floating-point input activations: a Linear's input rounded to FP8
(e4m3) or NVFP4 (e2m1) steps before its quantized weight multiplies it, as the checkpoint
was calibrated (llm-compressor's FP8_DYNAMIC, FP8, FP8_BLOCK and NVFP4 schemes).

    FP8, dynamic per token or per group of inputs:   s = max|x_group| / 448
    FP8, static per tensor:                          s = the checkpoint's input_scale
    x' = fp8(clamp(x / s, -448, 448)) * s
    NVFP4 (groups of 16, over the static input_global_scale G):
    s = fp8(G * max|x_group| / 6) / G,   x' = e2m1(clamp(x / s, -6, 6)) * s

This is the compressed-tensors package's own fake quantization (forward_quantize; a
zero group scale becomes the scale dtype's eps, as there), in the same dtypes: FP8's in
x's dtype, NVFP4's in fp32 where G is. x' then goes through the weight's usual path (the
matmul in floating point, not an FP8 / FP4 GEMM). LoRA reads the unquantized x, as in
vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
FP4_MAX = 6.0
# the package's eps for a zero scale stored as FP8 (NVFP4's group scales)
FP8_SCALE_EPS = 0.125


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """x (already within +-6) to the nearest of 0, 0.5, 1, 1.5, 2, 3, 4, 6 (signed), ties
    to the even code, as the package's cast_to_fp4."""
    a = x.abs()
    r = torch.where(a <= 0.25, 0.0, torch.where(a < 0.75, 0.5, torch.where(
        a <= 1.25, 1.0, torch.where(a < 1.75, 1.5, torch.where(
            a <= 2.5, 2.0, torch.where(a < 3.5, 3.0, torch.where(a <= 5.0, 4.0, 6.0)))))))
    return (r * torch.sign(x)).to(x.dtype)


@dataclass(frozen=True)
class FloatActivationQuant:
    """How a Linear's input is quantized: `bits` 8 (FP8 e4m3) or 4 (NVFP4's e2m1);
    `dynamic` (a scale per token, or per `group_size` inputs of a token) or static (FP8:
    the checkpoint's input_scale per tensor). NVFP4 is always dynamic per 16 inputs, its
    group scales stored as FP8 over the static input_global_scale."""

    bits: int
    dynamic: bool
    group_size: int = -1  # -1: the whole token

    def fake_quantize(self, x: torch.Tensor, scale: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """x rounded to the format's steps, in x's dtype. `scale`: FP8 static's input_scale
        or NVFP4's input_global_scale ([1] each)."""
        if self.bits == 4:
            assert scale is not None, "NVFP4 activations need input_global_scale"
            return self._nvfp4(x, scale)
        if not self.dynamic:
            assert scale is not None, "static FP8 activations need input_scale"
            s = scale.to(x.dtype)
            return torch.clamp(x / s, -FP8_MAX, FP8_MAX).to(FP8).to(x.dtype) * s
        g = self._groups(x)  # [..., groups, size]
        s = g.abs().amax(-1, keepdim=True) / FP8_MAX
        s = torch.where(s == 0, torch.finfo(x.dtype).eps, s)
        q = torch.clamp(g / s, -FP8_MAX, FP8_MAX).to(FP8).to(x.dtype) * s
        return q.view_as(x)

    def _groups(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-1] if self.group_size == -1 else self.group_size
        return x.unflatten(-1, (x.shape[-1] // size, size))

    def _nvfp4(self, x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
        g = self._groups(x)
        top = g.abs().amax(-1, keepdim=True)
        s = (global_scale * (top / FP4_MAX)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        s = s.to(torch.promote_types(x.dtype, global_scale.dtype))
        s = torch.where(s == 0, FP8_SCALE_EPS, s) / global_scale
        q = round_to_e2m1(torch.clamp(g / s, -FP4_MAX, FP4_MAX)) * s
        return q.to(x.dtype).view_as(x)


def check_groups(act: FloatActivationQuant | None, in_features: int, method: str) -> None:
    """A Linear whose inputs its activation groups do not divide is refused (the package
    refuses it too)."""
    if act is not None and act.group_size != -1 and in_features % act.group_size:
        raise ValueError(f"{method}: {in_features} inputs are not a whole number of the "
                         f"activation quantization's groups of {act.group_size}")
