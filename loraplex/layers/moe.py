"""Sparse mixture of experts (Mixtral's block_sparse_moe, Qwen2-MoE's and Qwen3-MoE's mlp,
gpt-oss's mlp): the router and the sum over the chosen experts.

    p = softmax(W_g x)                      router over E experts
    top-k experts e of p, weights w_e = p_e / sum of the top-k p
                                            (Qwen3-MoE without norm_topk_prob: w_e = p_e)
    y = sum_e w_e * W2_e (silu(W1_e x) * W3_e x)

gpt-oss (`gpt_oss`, its experts' ClampedSwiGLU): the router has a bias and its weights
are the softmax of the top-k logits; each expert has biases and a clamped SwiGLU:
y = sum_e w_e * (W2_e act(W1_e x + b1_e, W3_e x + b3_e) + b2_e).
Qwen2-MoE adds a shared expert every token goes through, weighted by a sigmoid gate:
y += sigmoid(w_s . x) * shared_expert(x).

GLM-4.5 (and DeepSeek-V3) route by sigmoid scores within groups ("noaux_tc",
GroupedTopKRouter): s = sigmoid(W_g x); the experts are chosen on s + b (a learned
correction bias, for load balance, used for the choice only) among the `topk_groups`
groups of experts whose best two such scores sum highest; their weights are s_e,
renormalized, times `routed_scaling_factor`; shared experts are added ungated:
y += shared_experts(x).
LFM2-MoE routes so with one group (its expert_bias the correction bias, no shared
experts), HF's 1e-6 added to the sum it renormalizes by (`GroupedTopK.norm_eps`).
DeepSeek-V2 routes by softmax instead (`scoring="softmax"`, as HF's DeepseekV2TopkRouter):
p = softmax(W_g x); "group_limited_greedy" keeps the `topk_groups` groups whose best p is
highest ("greedy": one group, all eligible); the chosen experts' weights are p_e times
`routed_scaling_factor`, not renormalized; no correction bias.

Phi-3.5-MoE routes by its "sparsemixer" (HF's `sparsemixer`, as it runs in eval): the
best logit's expert first, weighted by its softmax among the logits within a relative
2 * jitter_eps of it (the others masked); then the best of the rest, weighted likewise
among the rest; top-2 only, the weights not renormalized (`sparsemixer_route`).

The experts are layers/experts.py's FusedExperts, or for a quantized checkpoint one of
layers/quantized_experts.py's. The routers stay plain (GateLinear): a checkpoint that
quantized them is dequantized while it loads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.layers.activation import ClampedSwiGLU
from loraplex.layers.experts import FusedExperts
from loraplex.layers.linear import Linear, make_linear
from loraplex.layers.quantization import QuantConfig, QuantLinear
from loraplex.layers.quantized_experts import (
    BnB4bitFusedExperts,
    FP8FusedExperts,
    MXFP4FusedExperts,
    PackedIntFusedExperts,
)


class GateLinear(Linear):
    """A mixture's router (and Qwen2-MoE's shared_expert_gate), always plain: [E, H] is
    small, and routing on the exact weights keeps the top-k choice what the quantizer saw.
    Some checkpoints quantize it anyway (GPTQModel's / AutoRound's Qwen3-MoE pack mlp.gate;
    transformers 4's load_in_4bit quantizes every nn.Linear): their tensors (qweight,
    weight.absmax, ...) gather in a linear of the checkpoint's method, built on the first of
    them, which finish_loading dequantizes into the plain weight. Plain tensors load as
    they are, so checkpoints that leave the router plain need not say so."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 quant: QuantConfig | None = None) -> None:
        super().__init__(in_features, [out_features], bias)
        self.quant = quant
        self._quantized: QuantLinear | None = None  # while loading a quantized checkpoint's

    def load_shard(self, param_name: str, loaded: torch.Tensor, shard: int = 0) -> None:
        plain = loaded.is_floating_point() and loaded.element_size() > 1  # not FP8 / ints
        if param_name == "bias" and self.bias is None:
            if loaded.any():
                raise ValueError("the checkpoint has a bias for a router that has none")
            return  # some quantizers save a zero bias for every linear
        if param_name in ("weight", "bias") and plain:
            return super().load_shard(param_name, loaded, shard)
        if self._quantized is None:
            layer = make_linear(self.in_features, self.output_sizes, False, self.quant)
            if not isinstance(layer, QuantLinear):
                raise ValueError(f"router tensor {param_name} ({loaded.dtype}) is quantized, "
                                 "but the checkpoint's config names no quantization for it")
            self._quantized = layer.to(self.weight.device)
        self._quantized.load_shard(param_name, loaded, 0)

    def param_of(self, name: str) -> str:
        """The parameter a checkpoint tensor fills: the weight, unless it is the bias."""
        return "bias" if name == "bias" else "weight"

    def finish_loading(self) -> None:
        """Dequantize a quantized checkpoint's router into the plain weight."""
        if self._quantized is None:
            return
        self._quantized.finish_loading()
        with torch.no_grad():
            self.weight.copy_(self._quantized.dequantize(torch.float32).T)
        self._quantized = None


@dataclass(frozen=True)
class GroupedTopK:
    """The grouped sigmoid routing of DeepSeek-V3 and GLM-4.5: experts in `num_groups`
    groups, the best `topk_groups` groups eligible, the chosen experts' weights times
    `scaling`. `scoring`: "sigmoid" (noaux_tc: sigmoid scores plus a correction bias,
    groups ranked by their best two), "softmax" (DeepSeek-V2: softmax scores, groups
    ranked by their best one, no bias; Hunyuan's, one group) or "softmax_bias" (ERNIE
    4.5: softmax scores plus a correction bias choose, the softmax scores weigh; one
    group). `norm_eps`: added to the sum the chosen weights are divided by (LFM2-MoE's
    HF router adds 1e-6)."""

    num_groups: int
    topk_groups: int
    scaling: float
    scoring: str = "sigmoid"
    norm_eps: float = 1e-20


class GroupedTopKRouter(GateLinear):
    """GLM-4.5's / DeepSeek-V3's router ("gate"): its weight and the experts' score
    correction bias stay fp32, as in HF (the top-k choice is sensitive to both)."""

    def __init__(self, in_features: int, num_experts: int, routing: GroupedTopK,
                 quant: QuantConfig | None = None) -> None:
        super().__init__(in_features, num_experts, quant=quant)
        if num_experts % routing.num_groups or routing.topk_groups > routing.num_groups:
            raise ValueError(f"{num_experts} experts cannot route in {routing.num_groups} "
                             f"groups, {routing.topk_groups} of them eligible")
        if routing.scoring not in ("sigmoid", "softmax", "softmax_bias"):
            raise ValueError(f"grouped routing scores by sigmoid or softmax, not "
                             f"{routing.scoring!r}")
        self.routing = routing
        self.weight.data = self.weight.data.float()
        self.e_score_correction_bias = nn.Parameter(
            torch.zeros(num_experts, dtype=torch.float32), requires_grad=False) \
            if routing.scoring != "softmax" else None

    def load_shard(self, param_name: str, loaded: torch.Tensor, shard: int = 0) -> None:
        if param_name != "e_score_correction_bias" or self.e_score_correction_bias is None:
            return super().load_shard(param_name, loaded, shard)
        if loaded.dim() == 2 and loaded.shape[0] == 1:  # ERNIE 4.5's moe_statics: [1, E]
            loaded = loaded[0]
        if loaded.shape != self.e_score_correction_bias.shape:
            raise ValueError(f"e_score_correction_bias has shape {tuple(loaded.shape)}, "
                             f"the router expects {tuple(self.e_score_correction_bias.shape)}")
        with torch.no_grad():
            self.e_score_correction_bias.copy_(loaded)

    def param_of(self, name: str) -> str:
        return name if name == "e_score_correction_bias" else super().param_of(name)

    def route(self, x: torch.Tensor, top_k: int, normalize: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] fp32, experts [T, k]) of each token."""
        if self.routing.scoring == "softmax":
            return self._route_softmax(x, top_k, normalize)
        logits = F.linear(x.float(), self.weight)  # [T, E]
        scores = logits.sigmoid() if self.routing.scoring == "sigmoid" else logits.softmax(-1)
        choice = scores + self.e_score_correction_bias
        groups, per_group = self.routing.num_groups, scores.shape[-1] // self.routing.num_groups
        group_scores = choice.view(-1, groups, per_group).topk(2, dim=-1)[0].sum(dim=-1)
        best = group_scores.topk(self.routing.topk_groups, dim=-1, sorted=False)[1]
        eligible = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        choice = choice.masked_fill(~eligible.repeat_interleave(per_group, dim=1),
                                    float("-inf"))
        experts = choice.topk(top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, experts)
        if normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + self.routing.norm_eps)
        return weights * self.routing.scaling, experts

    def _route_softmax(self, x: torch.Tensor, top_k: int, normalize: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSeek-V2's: softmax scores, the experts outside the best groups (by their
        best score) zeroed, the top-k scores times the scaling (HF renormalizes none);
        Hunyuan's: one group, the top-k renormalized."""
        scores = F.linear(x.float(), self.weight).softmax(dim=-1)  # [T, E]
        groups, per_group = self.routing.num_groups, scores.shape[-1] // self.routing.num_groups
        if groups > 1:
            group_scores = scores.view(-1, groups, per_group).max(dim=-1).values
            best = group_scores.topk(self.routing.topk_groups, dim=-1, sorted=False)[1]
            eligible = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            scores = scores.masked_fill(~eligible.repeat_interleave(per_group, dim=1), 0.0)
        weights, experts = scores.topk(top_k, dim=-1, sorted=False)
        if normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.routing.scaling, experts


def sparsemixer_route(logits: torch.Tensor, jitter_eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-3.5-MoE's top-2 choice (weights [T, 2], experts [T, 2]), computed as HF's
    sparsemixer does outside training, in the logits' dtype: each pick's distance to the
    others measured against the full logits, the earlier picks out of the softmax."""
    weights, experts, rest = [], [], logits
    for _ in range(2):
        best, expert = rest.max(dim=-1, keepdim=True)
        factor = logits.abs().clamp(min=best)
        far = (best - logits) / factor > 2 * jitter_eps
        gates = rest.masked_fill(far, float("-inf")).softmax(dim=-1)
        weights.append(gates.gather(-1, expert))
        experts.append(expert)
        rest = rest.scatter(-1, expert, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(experts, dim=-1)


def experts_quantized(quant: QuantConfig, hf_names: tuple[str, ...]) -> bool:
    """Are the experts (their HF modules `hf_names`) quantized, or all left plain by
    modules_to_not_convert? Some of them plain is refused."""
    skipped = [quant.skips(n) for n in hf_names]
    if any(skipped) and not all(skipped):
        raise ValueError(f"{quant.method}: modules_to_not_convert leaves only some of a "
                         f"mixture's experts unquantized (e.g. {hf_names[skipped.index(True)]}, "
                         f"not {hf_names[skipped.index(False)]})")
    return not (skipped and all(skipped))


class SparseMoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int,
                 top_k: int, normalize: bool = True, shared_expert: nn.Module | None = None,
                 quant: QuantConfig | None = None, gpt_oss: ClampedSwiGLU | None = None,
                 expert_names: tuple[str, ...] = (), grouped: GroupedTopK | None = None,
                 shared_name: str = "shared_expert", fused_experts: bool = False,
                 sparsemixer_eps: float | None = None) -> None:
        """`quant`: an FP8, GPTQ, AWQ or bitsandbytes 4-bit checkpoint's or gpt-oss's MXFP4
        one (its experts; the routers stay plain, GateLinear); `expert_names`: the experts'
        HF modules, which modules_to_not_convert may leave plain; `grouped`: GLM-4.5's
        routing, whose shared experts (`shared_name` "shared_experts") have no gate;
        `fused_experts`: the checkpoint's experts are fused (Qwen3-VL-MoE's, unquantized
        only: FusedExperts.load_fused); `sparsemixer_eps`: Phi-3.5-MoE's routing, with its
        router_jitter_noise (sparsemixer_route)."""
        super().__init__()
        if quant is not None and quant.method == "nvfp4":
            raise ValueError("compressed-tensors NVFP4 mixtures of experts are not supported "
                             "yet: loraplex loads NVFP4 weights in a model's Linears only")
        self.shared_name = shared_name
        setattr(self, shared_name, shared_expert)
        self.shared_expert_gate = GateLinear(hidden_size, 1, quant=quant) \
            if shared_expert and grouped is None else None
        self.top_k, self.normalize = top_k, normalize
        self.sparsemixer_eps = sparsemixer_eps
        self.gpt_oss = gpt_oss is not None
        # the router, under its checkpoints' name: Mixtral's, Qwen's and GLM's "gate",
        # gpt-oss's "router" (with a bias)
        self.router_name = "router" if gpt_oss else "gate"
        setattr(self, self.router_name,
                GroupedTopKRouter(hidden_size, num_experts, grouped, quant) if grouped else
                GateLinear(hidden_size, num_experts, bias=gpt_oss is not None, quant=quant))
        packed_int = ("gptq", "awq", "compressed-tensors")
        if quant is not None and quant.method in (*packed_int, "bitsandbytes") \
                and not experts_quantized(quant, expert_names):
            quant = None
        if quant is not None and quant.method == "mxfp4":
            self.experts = MXFP4FusedExperts(hidden_size, intermediate_size, num_experts,
                                             gpt_oss)
        elif quant is not None and quant.method == "bitsandbytes":
            self.experts = BnB4bitFusedExperts(hidden_size, intermediate_size, num_experts,
                                               quant)
        elif quant is not None and quant.method in packed_int:
            self.experts = PackedIntFusedExperts(hidden_size, intermediate_size, num_experts,
                                                 quant)
        elif quant is not None:
            self.experts = FP8FusedExperts(hidden_size, intermediate_size, num_experts, quant)
        else:
            self.experts = FusedExperts(hidden_size, intermediate_size, num_experts,
                                        gpt_oss=gpt_oss, fused=fused_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router = getattr(self, self.router_name)
        if isinstance(router, GroupedTopKRouter):
            weights, experts = router.route(x, self.top_k, self.normalize)
            out = self.experts(x, weights.to(x.dtype), experts)
            shared = getattr(self, self.shared_name)
            return out if shared is None else out + shared(x)
        logits = router(x)
        if self.sparsemixer_eps is not None:  # Phi-3.5-MoE
            weights, experts = sparsemixer_route(logits, self.sparsemixer_eps)
        elif self.gpt_oss:  # the softmax of the top-k logits
            top, experts = logits.topk(self.top_k, dim=-1)
            weights = F.softmax(top, dim=-1, dtype=torch.float32)
        else:
            probs = F.softmax(logits, dim=-1, dtype=torch.float32)
            weights, experts = probs.topk(self.top_k, dim=-1)  # [T, k]
            if self.normalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self.experts(x, weights.to(x.dtype), experts)
        if self.shared_expert_gate is not None:  # Qwen2-MoE's shared expert
            out += torch.sigmoid(self.shared_expert_gate(x)) * getattr(self, self.shared_name)(x)
        return out
