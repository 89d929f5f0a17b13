"""MLP activations. Gated ones on the packed gate_up projection output: act(gate) * up.

SwiGLU (Llama, Mistral, Qwen, Phi-3) uses SiLU; GeGLU (Gemma) the tanh-approximated GELU
it was trained with (or the exact one where the config says so). gpt-oss's experts clamp
their SwiGLU (ClampedSwiGLU). MLPs without a gate (Arcee, Nemotron: squared ReLU;
StarCoder2: tanh GELU) apply ACTIVATIONS to the up projection's output; Apertus's
xIELU (XIELU) has learned parameters of its own in each layer.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)  # in place: one [T, I] buffer fewer per layer


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh").mul_(up)


def gelu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate).mul_(up)


ACT_AND_MUL: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": silu_and_mul, "gelu_tanh": gelu_tanh_and_mul, "gelu": gelu_and_mul}


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 (So et al., "Primer"): Nemotron's and Arcee's MLP activation."""
    return F.relu(x).square()


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu,
    "relu2": relu_squared, "relu": F.relu}


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's expert activation: g = min(gate, limit), u = clamp(up, -limit, limit),
    out = (u + 1) * g * sigmoid(alpha * g)."""

    alpha: float = 1.702
    limit: float = 7.0

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=self.limit)
        up = up.clamp(-self.limit, self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


class XIELU(nn.Module):
    """xIELU (Huang et al., 2024), Apertus's MLP activation, as HF's XIELUActivation
    computes it in Python: with a_p = softplus(alpha_p), a_n = beta + softplus(alpha_n),
    a_p x^2 + beta x for x > 0, else a_n (expm1(min(x, eps)) - x) + beta x. Its four
    parameters are the checkpoint's (mlp.act_fn.*), learned per layer."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha_p = nn.Parameter(torch.zeros(1))
        self.alpha_n = nn.Parameter(torch.zeros(1))
        self.beta = nn.Parameter(torch.tensor(0.5))
        self.eps = nn.Parameter(torch.tensor(-1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha_p = F.softplus(self.alpha_p).to(x.dtype)
        beta = self.beta.to(x.dtype)
        alpha_n = beta + F.softplus(self.alpha_n).to(x.dtype)
        return torch.where(x > 0, alpha_p * x * x + beta * x,
                           (torch.expm1(torch.minimum(x, self.eps.to(x.dtype))) - x) * alpha_n
                           + beta * x)
