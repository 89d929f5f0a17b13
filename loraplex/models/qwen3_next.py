"""Qwen3-Next (Qwen3NextForCausalLM) and Qwen3.5's language models (Qwen3_5ForCausalLM,
Qwen3_5MoeForCausalLM): decoders whose layers are gated DeltaNets
(layers/gated_delta_net.py, `linear_attention`) or attention (`full_attention`, one in
four on the hub's), each followed by a feed-forward.

    x = x + mixer(norm(x));  x = x + ffn(norm(x))

Their attention gates its output (q_proj gives each head's query and gate), normalizes q
and k per head and rotates a part of each head (partial_rotary_factor, 0.25 on the hub's);
every norm but the DeltaNet's is the zero-centred RMSNorm (x * (1 + w), Gemma's). The
feed-forward: Qwen3-Next's and Qwen3.5-MoE's a sparse mixture (softmax top-k) plus a
shared expert gated by sigmoid(shared_expert_gate(x)), Qwen2-MoE's; Qwen3.5's a SwiGLU
MLP. LlamaArgs carries the rest (models/llama.py); this file builds one layer and reads
the config. Qwen3.5's rope is Qwen3-VL's M-RoPE with interleaved sections (the registry's
_mrope), its images Qwen3-VL's tower without DeepStack (models/qwen3_vl.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loraplex.layers.gated_delta_net import GatedDeltaNet, GatedDeltaNetArgs
from loraplex.layers.quantization import QuantConfig
from loraplex.layers.rotary import RotaryEmbedding
from loraplex.models.hybrid_quant import check_hybrid_quant
from loraplex.worker.context import get_context

QWEN3_NEXT = "Qwen3NextForCausalLM"
QWEN3_5 = "Qwen3_5ForCausalLM"
QWEN3_5_MOE = "Qwen3_5MoeForCausalLM"
GATED_DELTA_NET_ARCHITECTURES = (QWEN3_NEXT, QWEN3_5, QWEN3_5_MOE)
# their text configs' model_type -> architecture
GATED_DELTA_NET_MODEL_TYPES = {"qwen3_next": QWEN3_NEXT, "qwen3_5_text": QWEN3_5,
                               "qwen3_5_moe_text": QWEN3_5_MOE}
# LlamaArgs flags common to them: q/k norm per head, the zero-centred norm, the gate
ARCHITECTURE_FLAGS = {"qk_norm": True, "norm_type": "rms_1p", "attn_output_gate": True}


class Qwen3NextDecoderLayer(nn.Module):
    """A gated DeltaNet (`linear_attn`) or attention (`self_attn`), then the feed-forward
    (`mlp`: the mixture or the MLP)."""

    def __init__(self, a: Any, rotary: RotaryEmbedding, prefix: str, index: int) -> None:
        super().__init__()
        from loraplex.models.llama import LlamaAttention, feed_forward  # (llama.py builds
        # this layer)
        self.input_layernorm = a.norm(a.hidden_size)
        self.post_attention_layernorm = a.norm(a.hidden_size)
        self.linear_attn = self.self_attn = None
        if index in a.mamba_layers:
            self.linear_attn = GatedDeltaNet(a.hidden_size, a.gated_delta_net, a.quant,
                                             f"{prefix}.linear_attn")
        else:
            self.self_attn = LlamaAttention(a, rotary, f"{prefix}.self_attn", index)
        _, self.mlp = feed_forward(a, prefix, index)  # (moe_module "mlp")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        h = self.linear_attn(h, get_context().mamba) if self.linear_attn is not None \
            else self.self_attn(positions, h)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


def gated_delta_net_args(hf: Any) -> GatedDeltaNetArgs:
    """The DeltaNet layers' shape from the config's linear_* fields."""
    name = hf.architectures[0] if getattr(hf, "architectures", None) else ""
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise ValueError(f"{name}: activation {hf.hidden_act!r} is not supported (silu)")
    k_heads, v_heads = int(hf.linear_num_key_heads), int(hf.linear_num_value_heads)
    if v_heads % k_heads:
        raise ValueError(f"linear_num_value_heads={v_heads} is not a multiple of "
                         f"linear_num_key_heads={k_heads}")
    return GatedDeltaNetArgs(
        num_k_heads=k_heads, num_v_heads=v_heads, head_k_dim=int(hf.linear_key_head_dim),
        head_v_dim=int(hf.linear_value_head_dim), conv_kernel=int(hf.linear_conv_kernel_dim),
        eps=float(hf.rms_norm_eps),
        fused_projections=getattr(hf, "model_type", None) == "qwen3_next")


def layer_kinds(hf: Any) -> list[str]:
    """Each layer's `layer_types` entry: linear_attention or full_attention (others
    refused)."""
    kinds = list(hf.layer_types)
    unknown = sorted(set(kinds) - {"linear_attention", "full_attention"})
    if unknown:
        raise ValueError(f"layer types {unknown} are not supported (linear_attention, "
                         "full_attention)")
    return kinds


def gated_delta_net_flags(hf: Any, name: str, quant: QuantConfig | None) -> dict[str, Any]:
    """LlamaArgs flags of a Qwen3-Next or Qwen3.5 config: the DeltaNets' shape and
    layers (mamba_layers: their state slots), the layer class; the experts' (Qwen3-Next's,
    Qwen3.5-MoE's: every layer sparse on Qwen3.5-MoE) as the registry reads Qwen2-MoE's,
    their checkpoints' experts per expert or fused (either of transformers' layouts)."""
    if name not in GATED_DELTA_NET_ARCHITECTURES:
        return {}
    check_hybrid_quant(quant, name, experts=name != QWEN3_5)
    kinds = layer_kinds(hf)
    flags: dict[str, Any] = dict(
        gated_delta_net=gated_delta_net_args(hf), hybrid_layer="qwen3_next",
        mamba_layers=tuple(i for i, k in enumerate(kinds) if k == "linear_attention"))
    if name == QWEN3_5:
        return flags
    step = int(getattr(hf, "decoder_sparse_step", 1) or 1)
    only_mlp = set(getattr(hf, "mlp_only_layers", None) or [])
    return dict(flags, num_experts=int(hf.num_experts),
                num_experts_per_tok=int(hf.num_experts_per_tok),
                moe_intermediate_size=int(hf.moe_intermediate_size),
                # (Qwen3.5-MoE's router always renormalizes: its config has no flag)
                norm_topk_prob=bool(getattr(hf, "norm_topk_prob", True)), moe_module="mlp",
                fused_experts=True,
                shared_expert_intermediate_size=int(hf.shared_expert_intermediate_size),
                dense_layers=tuple(i for i in range(hf.num_hidden_layers)
                                   if i in only_mlp or (i + 1) % step))


def has_gated_delta_net_layers(hf: Any, name: str) -> bool:
    return name in GATED_DELTA_NET_ARCHITECTURES and "linear_attention" in hf.layer_types
