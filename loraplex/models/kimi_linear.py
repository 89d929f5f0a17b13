"""Kimi-Linear (KimiLinearForCausalLM: moonshotai/Kimi-Linear-48B-A3B): a decoder whose
layers are Kimi Delta Attention (layers/kda.py, `linear_attention`, most of them) or
DeepSeek's multi-head latent attention without rotary positions (layers/mla.py,
`full_attention`: the latent's rope part is kept and shared but never rotated), each
followed by DeepSeek-V3's mixture of experts (sigmoid scores plus a correction bias,
grouped, ungated shared experts) or, in its `dense` layers, a SwiGLU MLP.

    x = x + self_attn(norm(x));  x = x + mlp(norm(x))

The hub's checkpoints (and transformers 5's saves) and its remote code (modeling_kimi.py)
name the experts `block_sparse_moe`, each expert w1 / w3 / w2, and keep the forget gate's
parameters on the layer (`self_attn.f_a_proj`, `f_b_proj`, `dt_bias`, `A_log`, as ours);
transformers 5's modules are `mlp`, fused experts and `self_attn.forget_gate.*`. So an
adapter trained on either loads: one on transformers 5 names `self_attn.forget_gate.f_a_proj`
and `mlp` (ours), one on the remote code `self_attn.f_a_proj` and `block_sparse_moe`
(its experts one by one: experts.N.w1...); a checkpoint's names are renamed likewise
(`KIMI_RENAMES`, its not-convert list's too). Quantized checkpoints load as the other
hybrids' (models/hybrid_quant.py): the KDA, latent attention and MLP projections and the
experts quantized, routers, convs and norms plain. LlamaArgs carries the rest
(models/llama.py); this file builds one layer and reads the config.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loraplex.layers.gated_delta_net import GatedDeltaNetArgs
from loraplex.layers.kda import KimiDeltaAttention
from loraplex.layers.mla import MLAAttention
from loraplex.layers.moe import GroupedTopK
from loraplex.layers.quantization import QuantConfig
from loraplex.models.hybrid_quant import check_hybrid_quant
from loraplex.worker.context import get_context

KIMI_LINEAR = "KimiLinearForCausalLM"
KIMI_LINEAR_MODEL_TYPES = {"kimi_linear": KIMI_LINEAR}
# a checkpoint's names -> ours: transformers 5's forget gate (the hub's are ours), the
# hub's experts (transformers 5's are ours); no outer dots, so that a not-convert list's
# entries are renamed too, whole (model.layers.1.block_sparse_moe) or partial
# (self_attn.forget_gate.f_a_proj)
KIMI_RENAMES = (("self_attn.forget_gate.", "self_attn."), ("block_sparse_moe", "mlp"))
# an adapter's module path components -> ours ("": dropped): transformers 5's forget gate
# module, the remote code's experts' module
KIMI_ADAPTER_ALIASES = (("forget_gate", ""), ("block_sparse_moe", "mlp"))
# KDA's projections beside MLA's (LoRA targets; q_proj and o_proj are MLA's names too)
KDA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "f_a_proj", "f_b_proj", "b_proj",
                    "g_a_proj", "g_b_proj", "o_proj")


class NoRotary(nn.Module):
    """MLA's rope part left as it is (Kimi-Linear's latent attention has no positions)."""

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k


class KimiLinearDecoderLayer(nn.Module):
    """KDA or latent attention (`self_attn`), then the experts or the MLP (`mlp`)."""

    def __init__(self, a: Any, rotary: nn.Module, prefix: str, index: int) -> None:
        super().__init__()
        from loraplex.models.llama import feed_forward  # (llama.py builds this layer)
        self.input_layernorm = a.norm(a.hidden_size)
        self.post_attention_layernorm = a.norm(a.hidden_size)
        self.is_kda = index in a.mamba_layers
        self.self_attn = KimiDeltaAttention(a.hidden_size, a.kda, a.quant, f"{prefix}.self_attn") \
            if self.is_kda else MLAAttention(a.hidden_size, a.num_heads, a.mla, a.qkv_bias,
                                             a.quant, NoRotary(), f"{prefix}.self_attn")
        _, self.mlp = feed_forward(a, prefix, index)  # (moe_module "mlp")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        h = self.self_attn(h, get_context().mamba) if self.is_kda \
            else self.self_attn(positions, h)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


def kda_args(hf: Any) -> GatedDeltaNetArgs:
    """The KDA layers' shape (linear_head_dim, linear_num_heads: HF reads them from the
    hub's linear_attn_config): as many key as value heads, of one head dim."""
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise ValueError(f"{KIMI_LINEAR}: activation {hf.hidden_act!r} is not supported "
                         "(silu)")
    heads, dim = int(hf.linear_num_heads), int(hf.linear_head_dim)
    return GatedDeltaNetArgs(num_k_heads=heads, num_v_heads=heads, head_k_dim=dim,
                             head_v_dim=dim, conv_kernel=int(hf.linear_conv_kernel_dim),
                             eps=float(hf.rms_norm_eps), fused_projections=False)


def _experts(hf: Any) -> dict[str, Any]:
    """DeepSeek-V3's experts under Kimi's config names (HF's attribute_map: num_experts,
    num_expert_group, moe_renormalize...); dense layers by mlp_layer_types, as HF builds
    them."""
    router = getattr(hf, "moe_router_activation_func", "sigmoid") or "sigmoid"
    if router != "sigmoid":
        raise ValueError(f"{KIMI_LINEAR} with moe_router_activation_func={router!r} is not "
                         "supported (sigmoid, as HF's router computes it)")
    types = list(hf.mlp_layer_types)
    return dict(num_experts=int(hf.num_local_experts),
                num_experts_per_tok=int(hf.num_experts_per_tok),
                moe_intermediate_size=int(hf.moe_intermediate_size),
                norm_topk_prob=bool(hf.norm_topk_prob), moe_module="mlp",
                expert_leaves=("w1", "w3", "w2"),
                grouped_topk=GroupedTopK(int(hf.n_group or 1), int(hf.topk_group or 1),
                                         float(hf.routed_scaling_factor or 1.0)),
                shared_expert_intermediate_size=int(hf.moe_intermediate_size)
                * int(hf.n_shared_experts or 0),
                shared_expert_name="shared_experts",
                dense_layers=tuple(i for i, t in enumerate(types) if t != "sparse"))


def kimi_linear_flags(hf: Any, name: str, quant: QuantConfig | None) -> dict[str, Any]:
    """LlamaArgs flags of a Kimi-Linear config (MLA's own: models/deepseek.py's mla_args,
    applied by the registry): the KDA layers (mamba_layers: their state slots), their
    shape, the layer class, the experts, the checkpoint's and adapters' names."""
    if name != KIMI_LINEAR:
        return {}
    check_hybrid_quant(quant, name, experts=True)
    kinds = list(hf.layer_types)
    unknown = sorted(set(kinds) - {"linear_attention", "full_attention"})
    if unknown:
        raise ValueError(f"{KIMI_LINEAR}: layer types {unknown} are not supported "
                         "(linear_attention, full_attention)")
    return dict(kda=kda_args(hf), hybrid_layer="kimi_linear",
                mamba_layers=tuple(i for i, k in enumerate(kinds) if k == "linear_attention"),
                checkpoint_renames=KIMI_RENAMES,
                adapter_aliases=KIMI_ADAPTER_ALIASES, **_experts(hf))


def has_kda_layers(hf: Any, name: str) -> bool:
    return name == KIMI_LINEAR and "linear_attention" in hf.layer_types
