"""Nemotron-H's mixture-of-experts mixer (its "moe" layers, "E" in hybrid_override_pattern;
NVIDIA-Nemotron-3-Nano), as HF's NemotronHMoE:

    weights, experts = grouped sigmoid routing of x   (layers/moe.py GroupedTopKRouter:
                                                       correction bias, n_group / topk_group,
                                                       norm_topk_prob, routed_scaling_factor)
    z = fc1_latent_proj(x)                            (only with moe_latent_size)
    y = sum_e w_e * down_e(relu2(up_e(z)))            (experts without a gate)
    y = fc2_latent_proj(y) + shared_experts(x)        (an ungated MLP of its own size)

The experts are FusedExperts with `ungated` (layers/experts.py), their LoRA
lora/experts.py's; the shared experts and the latent projections are plain linears that
adapters may target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loraplex.layers.activation import ACTIVATIONS
from loraplex.layers.experts import FusedExperts
from loraplex.layers.linear import make_linear
from loraplex.layers.moe import GroupedTopK, GroupedTopKRouter


@dataclass(frozen=True)
class NemotronMoEArgs:
    """The config's moe fields (NemotronHConfig)."""

    num_experts: int  # n_routed_experts
    top_k: int  # num_experts_per_tok
    intermediate_size: int  # moe_intermediate_size, each expert's
    shared_intermediate_size: int  # moe_shared_expert_intermediate_size
    latent_size: int | None  # moe_latent_size: the experts' width (None: hidden_size)
    routing: GroupedTopK
    normalize: bool  # norm_topk_prob


def nemotron_moe_args(hf: Any) -> NemotronMoEArgs:
    """The config's fields; n_shared_experts other than 1 is refused: transformers 5 builds
    one shared MLP of moe_shared_expert_intermediate_size whatever it says (vLLM one of
    n_shared_experts times that size, or none), so the two would disagree."""
    shared = getattr(hf, "n_shared_experts", 1)
    if shared not in (None, 1):
        raise ValueError(f"NemotronHForCausalLM: n_shared_experts={shared} is not supported "
                         "(1: one shared MLP of moe_shared_expert_intermediate_size, as "
                         "transformers builds it)")
    return NemotronMoEArgs(
        num_experts=int(hf.n_routed_experts), top_k=int(hf.num_experts_per_tok),
        intermediate_size=int(hf.moe_intermediate_size),
        shared_intermediate_size=int(hf.moe_shared_expert_intermediate_size),
        latent_size=getattr(hf, "moe_latent_size", None),
        routing=GroupedTopK(int(getattr(hf, "n_group", 1) or 1),
                            int(getattr(hf, "topk_group", 1) or 1),
                            float(getattr(hf, "routed_scaling_factor", 1.0))),
        normalize=bool(getattr(hf, "norm_topk_prob", True)))


class NemotronHMoE(nn.Module):
    """The mixer of a "moe" layer, under its checkpoints' names (gate, experts,
    shared_experts, fc1_latent_proj, fc2_latent_proj)."""

    def __init__(self, a: Any, prefix: str) -> None:
        super().__init__()
        from loraplex.models.llama import UngatedMLP  # (llama.py builds this layer)
        m: NemotronMoEArgs = a.nemotron_moe
        if a.quant is not None:
            raise ValueError(f"{a.quant.method}-quantized Nemotron-H mixtures of experts are "
                             "not supported yet (their experts load unquantized only)")
        self.top_k, self.normalize = m.top_k, m.normalize
        self.gate = GroupedTopKRouter(a.hidden_size, m.num_experts, m.routing)
        width = m.latent_size or a.hidden_size
        self.experts = FusedExperts(width, m.intermediate_size, m.num_experts,
                                    ungated=ACTIVATIONS[a.hidden_act])
        self.shared_experts = UngatedMLP(a, f"{prefix}.shared_experts",
                                         m.shared_intermediate_size)
        self.fc1_latent_proj = self.fc2_latent_proj = None
        if m.latent_size is not None:
            self.fc1_latent_proj = make_linear(a.hidden_size, [width], a.mlp_bias)
            self.fc2_latent_proj = make_linear(width, [a.hidden_size], a.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.gate.route(x, self.top_k, self.normalize)  # fp32, as HF
        z = x if self.fc1_latent_proj is None else self.fc1_latent_proj(x)
        y = self.experts(z, weights.to(x.dtype), experts)
        if self.fc2_latent_proj is not None:
            y = self.fc2_latent_proj(y)
        return y + self.shared_experts(x)
