"""AltUp (Alternating Updates, Baykal et al., 2023), as Gemma 3n runs it: the residual
stream is n parallel streams [n, T, D]; each layer computes on one of them (the active
one) and AltUp carries its update to the others.

- predict: every stream becomes itself plus a mix of all streams, the mixing
  coefficients [T, n, n] a linear map of the router's modalities of the active stream
  (tanh(router(norm(x) / D))).
- correct: after the layer, each predicted stream moves by the layer's innovation (its
  output minus the active prediction) times (1 + a coefficient) from the modalities of
  that output.
- expand / collapse (the model's ends): the extra streams are linear projections of the
  embedding (and back), each rescaled to the first stream's RMS magnitude.
The coefficient clip (altup_coef_clip) applies in training only."""

from __future__ import annotations

import torch
from torch import nn

from loraplex.layers.norm import Gemma4RMSNorm
from loraplex.layers.quantization import QuantConfig
from loraplex.models.gemma_quant import NamedGateLinear


class AltUp(nn.Module):
    def __init__(self, hidden_size: int, num_inputs: int, active_idx: int, eps: float,
                 quant: QuantConfig | None = None, prefix: str = "altup") -> None:
        """`quant`: a quantized checkpoint's; the router and coefficient linears (a few
        outputs or inputs each) stay plain, dequantized where it quantized them
        (models/gemma_quant.py); `prefix`: this module's HF name, for their errors."""
        super().__init__()
        self.n, self.active = num_inputs, active_idx
        self.correct_output_scale = nn.Parameter(torch.zeros(hidden_size))
        n = num_inputs
        self.correction_coefs = NamedGateLinear(n, n, quant, f"{prefix}.correction_coefs")
        self.prediction_coefs = NamedGateLinear(n, n ** 2, quant, f"{prefix}.prediction_coefs")
        self.modality_router = NamedGateLinear(hidden_size, n, quant,
                                               f"{prefix}.modality_router")
        self.router_norm = Gemma4RMSNorm(hidden_size, eps)
        self.router_scale = 1.0 / hidden_size

    def modalities(self, x: torch.Tensor) -> torch.Tensor:
        """[T, n]: the router's tanh over the normed stream x [T, D]."""
        scale = torch.tensor(self.router_scale, dtype=x.dtype)
        return torch.tanh(self.modality_router(self.router_norm(x) * scale).float()).type_as(x)

    def predict(self, streams: torch.Tensor) -> torch.Tensor:
        """streams [n, T, D] -> predictions [n, T, D]: stream a + sum_b c[t, a, b] stream b."""
        m = self.modalities(streams[self.active])
        coefs = self.prediction_coefs(m).view(-1, self.n, self.n).transpose(1, 2)  # [T, b, a]
        mixed = torch.matmul(streams.permute(1, 2, 0), coefs)  # [T, D, a]
        return (mixed.permute(2, 0, 1) + streams).type_as(streams)

    def correct(self, predictions: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
        """predictions [n, T, D] moved by the innovation of the layer's output activated
        [T, D], each stream by its own coefficient."""
        coefs = self.correction_coefs(self.modalities(activated)) + 1.0  # [T, n]
        innovation = activated - predictions[self.active]
        return (innovation * coefs.t().unsqueeze(-1) + predictions).type_as(activated)

    def scale_corrected(self, x: torch.Tensor) -> torch.Tensor:
        return (x.type_as(self.correct_output_scale) * self.correct_output_scale).type_as(x)


def rms_matched(x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """x rescaled to the per-row RMS `magnitude` (its own RMS floored at 1e-5^1/2)."""
    own = torch.sqrt(torch.mean(x ** 2, dim=-1, keepdim=True).clamp(min=1e-5))
    return x * magnitude / own


def expand_streams(x: torch.Tensor, projections: nn.ModuleList) -> torch.Tensor:
    """The embedding x [T, D] and its projections, as n streams [n, T, D]."""
    magnitude = torch.mean(x ** 2, dim=-1, keepdim=True) ** 0.5
    return torch.stack([x, *(rms_matched(p(x).to(x.dtype), magnitude) for p in projections)])


def collapse_streams(streams: torch.Tensor, projections: nn.ModuleList) -> torch.Tensor:
    """The mean of the first stream and the others projected back [T, D]."""
    first = streams[0]
    magnitude = torch.mean(first ** 2, dim=-1, keepdim=True) ** 0.5
    back = [rms_matched(p(s).to(first.dtype), magnitude)
            for p, s in zip(projections, streams[1:], strict=True)]
    return torch.mean(torch.stack([first, *back]), dim=0)
