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
from loraplex.layers.moe import SparseMoE
from loraplex.layers.rotary import RotaryEmbedding
from loraplex.models.mamba_hybrid import HybridDecoderLayer, layer_kinds, mamba2_args

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


class GraniteSharedMLP(nn.Module):
    """output_linear(act(gate) * up), gate and up the two halves of input_linear."""

    def __init__(self, hidden_size: int, size: int, act: str) -> None:
        super().__init__()
        self.input_linear = make_linear(hidden_size, [2 * size])
        self.output_linear = make_linear(size, [hidden_size])
        self.act_and_mul = ACT_AND_MUL[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_linear(self.act_and_mul(self.input_linear(x)))


class GraniteHybridDecoderLayer(HybridDecoderLayer):
    """A mixer or attention (models/mamba_hybrid.py), then GraniteMoe's feed-forward: the
    experts, the shared MLP, or both summed."""

    def __init__(self, a: Any, rotary: RotaryEmbedding, prefix: str, index: int) -> None:
        super().__init__(a, rotary, prefix, index)
        self.block_sparse_moe = SparseMoE(
            a.hidden_size, a.intermediate_size, a.num_experts, a.num_experts_per_tok,
            fused_experts=True) if a.num_experts else None
        self.shared_mlp = GraniteSharedMLP(a.hidden_size, a.shared_mlp_size, a.hidden_act) \
            if a.shared_mlp_size else None  # (GraniteMoe: none)

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        out = self.shared_mlp(h) if self.shared_mlp is not None else 0
        if self.block_sparse_moe is not None:
            out = self.block_sparse_moe(h) + out
        return out


def granite_moe_flags(hf: Any, name: str) -> dict[str, Any]:
    """LlamaArgs flags of a GraniteMoe, GraniteMoeShared or GraniteMoeHybrid config: the
    experts (0: dense), the shared MLP's size (0: none), Granite's multipliers
    (config_flags._granite's); a hybrid's: which layers are Mamba2 mixers and their shape,
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
    kinds = layer_kinds(hf, name)
    mamba = mamba2_args(hf, name)
    rope = getattr(hf, "position_embedding_type", None) == "rope"
    return dict(common, mamba=mamba,
                mamba_layers=tuple(i for i, k in enumerate(kinds) if k == "mamba"),
                nope_layers=() if rope else tuple(range(hf.num_hidden_layers)))
