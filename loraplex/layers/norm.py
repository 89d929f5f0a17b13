"""RMSNorm (Zhang & Sennrich, 2019) and LayerNorm, computed in fp32 like the HF reference."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * self._normalized(x).to(x.dtype)


class FP32ScaleRMSNorm(RMSNorm):
    """Helium's: the weight applied in fp32 before the cast back (Llama casts first)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight.float() * self._normalized(x)).to(x.dtype)


class GemmaRMSNorm(RMSNorm):
    """Gemma's: the weight is stored as w - 1, and the scaling happens in fp32 before
    the cast back (Llama casts first)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self._normalized(x) * (1.0 + self.weight.float())).to(x.dtype)


class Gemma4RMSNorm(RMSNorm):
    """Gemma 4's: the weight as it is (not 1 + w), applied in fp32 before the cast back, and
    x * (mean(x^2) + eps)^-1/2 as HF writes it; `with_scale` False: no weight (its v norm
    and its router's)."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True) -> None:
        super().__init__(dim, eps)
        if not with_scale:
            del self.weight
            self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        return (y if self.weight is None else y * self.weight.float()).to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm (Ba et al., 2016) over the last dimension, in fp32: StarCoder2's (with a
    bias), Cohere's (without; its q/k norm has a weight per head, shape [heads, head_dim]),
    Nemotron's "1P" (the weight stored as w - 1, like Gemma's RMSNorm) and OLMo's (neither
    weight nor bias: `weight=False`)."""

    def __init__(self, shape: int | tuple[int, ...], eps: float = 1e-5, bias: bool = True,
                 weight_minus_one: bool = False, weight: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight_minus_one = weight_minus_one
        self.weight = None if not weight else nn.Parameter(
            torch.zeros(shape) if weight_minus_one else torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.weight is not None:
            y = y * (self.weight.float() + 1.0 if self.weight_minus_one
                     else self.weight.float())
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)
