"""Liquid AI's LFM2 (Lfm2ForCausalLM) and LFM2-MoE (Lfm2MoeForCausalLM): a decoder whose
layers are short convolutions (layers/short_conv.py; layer_types "conv") or attention
("full_attention"), each followed by a feed-forward:

    x = x + (conv or self_attn)(operator_norm(x))
    x = x + feed_forward(ffn_norm(x))

Attention RMS-normalizes q and k per head (q_layernorm / k_layernorm, our q_norm /
k_norm) before the rope, and names its output projection out_proj. The feed-forward is a
SwiGLU MLP w2(silu(w1 x) * w3 x), which LFM2 sizes from intermediate_size by its
`block_auto_adjust_ff_dim` rule (`ff_size`); LFM2-MoE keeps intermediate_size for its
first num_dense_layers layers and puts a mixture of experts in the others (sigmoid
scores; the top-k chosen on scores + expert_bias, weighted by the scores, renormalized
as HF does, times routed_scaling_factor: layers/moe.py's GroupedTopKRouter with one
group). The final norm is `embedding_norm` (our model.norm), embeddings tied.

A conv layer's state is per sequence (its window of L_cache - 1 inputs), so the model is
served as the Mamba2 hybrids are: state slots, no prefix cache, eager decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loraplex.layers.moe import GroupedTopK, SparseMoE
from loraplex.layers.quantization import QuantConfig
from loraplex.layers.rotary import RotaryEmbedding
from loraplex.layers.short_conv import ShortConv
from loraplex.models.hybrid_quant import check_hybrid_quant
from loraplex.models.llama import LlamaArgs, LlamaAttention, LlamaMLP
from loraplex.worker.context import get_context

LFM2, LFM2_MOE = "Lfm2ForCausalLM", "Lfm2MoeForCausalLM"
LFM2_ARCHITECTURES = (LFM2, LFM2_MOE)
LFM2_MODEL_TYPES = {"lfm2": LFM2, "lfm2_moe": LFM2_MOE}
# its checkpoints' names -> ours (the expert bias sits beside the router there, in it here)
LFM2_RENAMES = ((".self_attn.q_layernorm.", ".self_attn.q_norm."),
                (".self_attn.k_layernorm.", ".self_attn.k_norm."),
                ("model.embedding_norm.", "model.norm."),
                (".feed_forward.expert_bias", ".feed_forward.gate.e_score_correction_bias"))
# HF module name -> (our packed module, its slice): q/k/v as every model's; the MLP's
# w1 (gate) and w3 (up) packed, w2 our down_proj
LFM2_PACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
               "w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", 0)}
# what an adapter may target: the conv block's in_proj / out_proj, attention's q / k / v /
# out_proj, the MLPs' w1 / w3 / w2, embeddings and lm_head; LFM2-MoE's experts through
# PEFT's target_parameters (its router is no Linear in HF: PEFT cannot target it)
LFM2_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w3", "w2",
                     "embed_tokens", "lm_head")


@dataclass(frozen=True)
class Lfm2Args:
    conv_layers: tuple[int, ...]  # the others attend
    conv_kernel: int  # conv_L_cache: taps of each channel's causal conv
    conv_bias: bool  # on in_proj, the conv and out_proj
    ff_size: int  # the dense feed-forward's width
    use_expert_bias: bool = True  # LFM2-MoE: the choice on scores + expert_bias


def _experts(a: LlamaArgs, prefix: str) -> SparseMoE:
    """LFM2-MoE's sparse feed-forward (a quantized checkpoint's experts in its format, each
    expert's w1 / w3 / w2 a module modules_to_not_convert may name); without
    use_expert_bias its bias is zeros, kept as a buffer (no checkpoint has one to load)."""
    names = tuple(f"{prefix}.experts.{e}.{leaf}" for e in range(a.num_experts)
                  for leaf in ("w1", "w3", "w2"))
    moe = SparseMoE(a.hidden_size, a.moe_intermediate_size, a.num_experts,
                    a.num_experts_per_tok, a.norm_topk_prob, quant=a.quant,
                    expert_names=names, grouped=a.grouped_topk, fused_experts=True)
    if not a.lfm2.use_expert_bias:
        bias = moe.gate.e_score_correction_bias
        del moe.gate.e_score_correction_bias
        moe.gate.register_buffer("e_score_correction_bias", torch.zeros_like(bias))
    return moe


class Lfm2DecoderLayer(nn.Module):
    def __init__(self, a: LlamaArgs, rotary: RotaryEmbedding, prefix: str, index: int) -> None:
        super().__init__()
        lf = a.lfm2
        self.operator_norm = a.norm(a.hidden_size)
        self.ffn_norm = a.norm(a.hidden_size)
        self.conv = self.self_attn = None
        if index in lf.conv_layers:
            self.conv = ShortConv(a.hidden_size, lf.conv_kernel, lf.conv_bias, a.quant,
                                  f"{prefix}.conv")
        else:
            self.self_attn = LlamaAttention(a, rotary, f"{prefix}.self_attn", index)
        sparse = a.num_experts > 0 and index not in a.dense_layers
        self.feed_forward = _experts(a, f"{prefix}.feed_forward") if sparse \
            else LlamaMLP(a, f"{prefix}.feed_forward", lf.ff_size)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.operator_norm(x)
        x = x + (self.conv(h, get_context().mamba) if self.conv is not None
                 else self.self_attn(positions, h))
        return x + self.feed_forward(self.ffn_norm(x))


def ff_size(hf: Any) -> int:
    """LFM2's MLP width: with block_auto_adjust_ff_dim, 2/3 of intermediate_size, times
    block_ffn_dim_multiplier and rounded up to block_multiple_of (HF's Lfm2MLP), else
    intermediate_size itself."""
    size = int(hf.intermediate_size)
    if not getattr(hf, "block_auto_adjust_ff_dim", False):
        return size
    size = int(2 * size / 3)
    multiplier = getattr(hf, "block_ffn_dim_multiplier", None)
    if multiplier is not None:
        size = int(multiplier * size)
        step = int(hf.block_multiple_of)
        size = step * ((size + step - 1) // step)
    return size


def conv_layers(hf: Any) -> tuple[int, ...]:
    """The layers that convolve ("conv"); the rest attend. Other kinds are refused."""
    types = list(getattr(hf, "layer_types", None) or [])
    if not types:  # configs of transformers 4.5x may give full_attn_idxs only
        attn = set(getattr(hf, "full_attn_idxs", None) or range(hf.num_hidden_layers))
        types = ["full_attention" if i in attn else "conv"
                 for i in range(hf.num_hidden_layers)]
    unknown = sorted(set(types) - {"conv", "full_attention"})
    if unknown:
        raise ValueError(f"LFM2: layer types {unknown} are not supported (conv, "
                         "full_attention)")
    return tuple(i for i, t in enumerate(types) if t == "conv")


def has_conv_layers(hf: Any, name: str) -> bool:
    """An LFM2 model with a conv layer (its state is per sequence)."""
    return name in LFM2_ARCHITECTURES and bool(conv_layers(hf))


def lfm2_flags(hf: Any, name: str, quant: QuantConfig | None) -> dict[str, Any]:
    """LlamaArgs flags of an LFM2 / LFM2-MoE config (the registry's hook)."""
    if name not in LFM2_ARCHITECTURES:
        return {}
    check_hybrid_quant(quant, name, experts=name == LFM2_MOE)
    kernel = int(hf.conv_L_cache)
    if kernel < 2:
        raise ValueError(f"LFM2: conv_L_cache={kernel} is not supported (2 or more taps)")
    moe = name == LFM2_MOE
    lf = Lfm2Args(conv_layers=conv_layers(hf), conv_kernel=kernel,
                  conv_bias=bool(hf.conv_bias),
                  ff_size=int(hf.intermediate_size) if moe else ff_size(hf),
                  use_expert_bias=bool(getattr(hf, "use_expert_bias", True)))
    # (attention's output projection is `out_proj`, as the conv block's)
    flags: dict[str, Any] = dict(lfm2=lf, hybrid_layer="lfm2", qk_norm=True,
                                 attention_output="out_proj",
                                 checkpoint_renames=LFM2_RENAMES)
    if moe:  # one group of experts: GroupedTopKRouter's choice is then a plain top-k
        flags.update(num_experts=int(hf.num_experts),
                     num_experts_per_tok=int(hf.num_experts_per_tok),
                     moe_intermediate_size=int(hf.moe_intermediate_size),
                     norm_topk_prob=bool(hf.norm_topk_prob), fused_experts=True,
                     moe_module="feed_forward",  # (its name: no adapter alias for it)
                     grouped_topk=GroupedTopK(1, 1, float(hf.routed_scaling_factor),
                                              norm_eps=1e-6),
                     dense_layers=tuple(range(int(hf.num_dense_layers))))
    return flags


def lfm2_lora_targets(args: LlamaArgs) -> tuple[tuple[str, ...], dict[str, tuple[str, int]]]:
    """(lora_target_modules, packed_modules_mapping) of an LFM2 model."""
    experts = ("experts",) if args.num_experts else ()
    return LFM2_LORA_TARGETS + experts, dict(LFM2_PACKED)
