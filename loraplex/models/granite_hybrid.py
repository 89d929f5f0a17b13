"""Granite 4.0 (GraniteMoeHybridForCausalLM): a decoder whose layers mix Mamba2 mixers
(layers/mamba2.py) with attention, each followed by GraniteMoe's feed-forward: a mixture
of experts (`block_sparse_moe`, fused `input_linear` / `output_linear`, a softmax over the
top-k router logits) plus an always-on shared MLP (`shared_mlp`), or the shared MLP alone
when num_local_experts is 0 (the dense variants). Granite's multipliers (embedding,
residual, attention, logits) and NoPE or rope attention come from LlamaArgs; this file
builds one layer (LlamaModel picks it when `LlamaArgs.granite_moe` is set) and reads the
config. Granite 3.x's MoE models are the same layer with attention only: the experts
alone (GraniteMoeForCausalLM) or with the shared MLP (GraniteMoeSharedForCausalLM).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loraplex.layers.activation import ACT_AND_MUL
from loraplex.layers.linear import make_linear
from loraplex.layers.mamba2 import Mamba2Args, Mamba2Mixer
from loraplex.layers.moe import SparseMoE
from loraplex.layers.rotary import RotaryEmbedding
from loraplex.worker.context import get_context

HYBRID_ARCHITECTURES = ("GraniteMoeHybridForCausalLM",)
GRANITE_MOE_ARCHITECTURES = ("GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM",
                             *HYBRID_ARCHITECTURES)
# the HF module names a LoRA adapter may target; the experts through transformers 5's
# target_parameters (experts.gate_up_proj / down_proj, lora/experts.py)
HYBRID_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj",
                       "input_linear", "output_linear", "embed_tokens", "lm_head", "experts")
# the hub's (and transformers 5's saved) names for the experts and the router -> ours
HYBRID_RENAMES = ((".block_sparse_moe.input_linear.weight",
                   ".block_sparse_moe.experts.gate_up_proj"),
                  (".block_sparse_moe.output_linear.weight",
                   ".block_sparse_moe.experts.down_proj"),
                  (".block_sparse_moe.router.layer.", ".block_sparse_moe.gate."))
_MAMBA_TYPES = ("mamba", "linear_attention")
_ATTENTION_TYPES = ("attention", "full_attention")


class GraniteSharedMLP(nn.Module):
    """output_linear(act(gate) * up), gate and up the two halves of input_linear."""

    def __init__(self, hidden_size: int, size: int, act: str) -> None:
        super().__init__()
        self.input_linear = make_linear(hidden_size, [2 * size])
        self.output_linear = make_linear(size, [hidden_size])
        self.act_and_mul = ACT_AND_MUL[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_linear(self.act_and_mul(self.input_linear(x)))


class GraniteHybridDecoderLayer(nn.Module):
    def __init__(self, a: Any, rotary: RotaryEmbedding, prefix: str, index: int) -> None:
        super().__init__()
        from loraplex.models.llama import LlamaAttention  # (llama.py builds this layer)
        self.input_layernorm = a.norm(a.hidden_size)
        self.post_attention_layernorm = a.norm(a.hidden_size)
        self.mamba = self.self_attn = None
        if index in a.mamba_layers:
            self.mamba = Mamba2Mixer(a.hidden_size, a.mamba, a.quant, f"{prefix}.mamba")
        else:
            self.self_attn = LlamaAttention(a, rotary, f"{prefix}.self_attn", index)
        self.block_sparse_moe = SparseMoE(
            a.hidden_size, a.intermediate_size, a.num_experts, a.num_experts_per_tok,
            fused_experts=True) if a.num_experts else None
        self.shared_mlp = GraniteSharedMLP(a.hidden_size, a.shared_mlp_size, a.hidden_act) \
            if a.shared_mlp_size else None  # (GraniteMoe: none)
        self.residual_multiplier = a.residual_multiplier

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        h = self.mamba(h, get_context().mamba) if self.mamba is not None \
            else self.self_attn(positions, h)
        x = x + h * self.residual_multiplier
        h = self.post_attention_layernorm(x)
        out = self.shared_mlp(h) if self.shared_mlp is not None else 0
        if self.block_sparse_moe is not None:
            out = self.block_sparse_moe(h) + out
        return x + out * self.residual_multiplier


def hybrid_flags(hf: Any, name: str) -> dict[str, Any]:
    """LlamaArgs flags of a GraniteMoe, GraniteMoeShared or GraniteMoeHybrid config: the
    experts (0: dense), the shared MLP's size (0: none), Granite's multipliers
    (registry._granite's); a hybrid's: which layers are Mamba2 mixers and their shape,
    NoPE unless position_embedding_type is "rope"."""
    if name not in GRANITE_MOE_ARCHITECTURES:
        return {}
    common = dict(granite_moe=True,
                  shared_mlp_size=int(getattr(hf, "shared_intermediate_size", 0) or 0),
                  num_experts=int(hf.num_local_experts or 0),
                  num_experts_per_tok=int(hf.num_experts_per_tok),
                  checkpoint_renames=HYBRID_RENAMES,
                  embedding_multiplier=float(hf.embedding_multiplier),
                  residual_multiplier=float(hf.residual_multiplier),
                  attention_multiplier=float(hf.attention_multiplier),
                  logits_scaling=float(hf.logits_scaling))
    if name not in HYBRID_ARCHITECTURES:
        return common
    types = list(getattr(hf, "layer_types", None) or hf.layers_block_type)
    unknown = sorted({t for t in types if t not in _MAMBA_TYPES + _ATTENTION_TYPES})
    if unknown:
        raise ValueError(f"{name}: layer types {unknown} are not supported (mamba / "
                         "attention)")
    hidden = int(hf.hidden_size)
    heads = int(hf.mamba_n_heads)
    inner = int(hf.mamba_expand * hidden)
    head_dim = hf.mamba_d_head if hf.mamba_d_head != "auto" else inner // heads
    limit = getattr(hf, "time_step_limit", None) or (0.0, float("inf"))
    mamba = Mamba2Args(num_heads=heads, head_dim=int(head_dim),
                       state_size=int(hf.mamba_d_state), n_groups=int(hf.mamba_n_groups),
                       conv_kernel=int(hf.mamba_d_conv), intermediate_size=inner,
                       chunk_size=int(hf.mamba_chunk_size),
                       conv_bias=bool(hf.mamba_conv_bias), proj_bias=bool(hf.mamba_proj_bias),
                       eps=float(hf.rms_norm_eps),
                       time_step_limit=(float(limit[0]), float(limit[1])))
    rope = getattr(hf, "position_embedding_type", None) == "rope"
    return dict(common, mamba=mamba,
                mamba_layers=tuple(i for i, t in enumerate(types) if t in _MAMBA_TYPES),
                nope_layers=() if rope else tuple(range(hf.num_hidden_layers)))
