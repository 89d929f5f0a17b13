"""Models of Mamba-1 mixers (layers/mamba1.py): Mamba (MambaForCausalLM, state-spaces'
mamba-*-hf), FalconMamba (FalconMambaForCausalLM) and AI21's Jamba (JambaForCausalLM).

- Mamba and FalconMamba: no attention at all, one sublayer per layer,
  x + mixer(norm(x)); their checkpoints' `backbone.` / `embeddings` / `norm_f` are our
  `model.` / `embed_tokens` / `norm` (Mamba2's names, models/mamba_hybrid.py).
  FalconMamba RMS-normalizes dt, B and C inside the mixer, without weights.
- Jamba: a Mamba-1 mixer (`mamba`, with weighted norms on dt, B and C) or attention
  without positions (`self_attn`, one in attn_layer_period layers from
  attn_layer_offset), then a feed-forward (`feed_forward`): a mixture of experts (one in
  expert_layer_period layers from expert_layer_offset; softmax top-k, not renormalized,
  its router `router`, our `gate`) or a SwiGLU MLP.

    x = x + (mamba or self_attn)(input_layernorm(x))
    x = x + feed_forward(pre_ff_layernorm(x))

A mixer's state is per sequence, so these are served as the Mamba2 hybrids are: state
slots, no prefix cache, eager decode. The residual stream stays in the model's dtype
(HF keeps Mamba's in fp32 under residual_in_fp32: the same in an fp32 model).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from loraplex.layers.mamba1 import Mamba1Args, Mamba1Mixer
from loraplex.layers.moe import SparseMoE
from loraplex.layers.quantization import QuantConfig
from loraplex.layers.rotary import RotaryEmbedding
from loraplex.models.hybrid_quant import check_hybrid_quant
from loraplex.models.mamba_hybrid import MIXER_BLOCK_ALIASES, MIXER_BLOCK_RENAMES
from loraplex.worker.context import get_context

MAMBA, FALCON_MAMBA, JAMBA = "MambaForCausalLM", "FalconMambaForCausalLM", "JambaForCausalLM"
MAMBA1_ARCHITECTURES = (MAMBA, FALCON_MAMBA, JAMBA)
MAMBA1_MODEL_TYPES = {"mamba": MAMBA, "falcon_mamba": FALCON_MAMBA, "jamba": JAMBA}
# Jamba's checkpoints' names -> ours
JAMBA_RENAMES = ((".pre_ff_layernorm.", ".post_attention_layernorm."),
                 ("model.final_layernorm.", "model.norm."),
                 (".feed_forward.router.", ".feed_forward.gate."))
# ... and its adapters' (transformers 4's router is a Linear that PEFT can target)
JAMBA_ALIASES = (("router", "gate"),)
MIXER_TARGETS = ("in_proj", "x_proj", "dt_proj", "out_proj")


class Mamba1Block(nn.Module):
    """Mamba's and FalconMamba's layer: x + mixer(norm(x))."""

    def __init__(self, a: Any, rotary: RotaryEmbedding, prefix: str, index: int) -> None:
        super().__init__()
        self.norm = a.norm(a.hidden_size)
        self.mixer = Mamba1Mixer(a.hidden_size, a.mamba1, a.quant, f"{prefix}.mixer")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x), get_context().mamba)


class JambaDecoderLayer(nn.Module):
    """A Mamba-1 mixer or attention, then the mixture of experts or the MLP."""

    def __init__(self, a: Any, rotary: RotaryEmbedding, prefix: str, index: int) -> None:
        super().__init__()
        from loraplex.models.llama import LlamaAttention, LlamaMLP  # (llama.py builds
        # this layer)
        self.input_layernorm = a.norm(a.hidden_size)
        self.post_attention_layernorm = a.norm(a.hidden_size)
        self.mamba = self.self_attn = None
        if index in a.mamba_layers:
            self.mamba = Mamba1Mixer(a.hidden_size, a.mamba1, a.quant, f"{prefix}.mamba")
        else:
            self.self_attn = LlamaAttention(a, rotary, f"{prefix}.self_attn", index)
        self.feed_forward = LlamaMLP(a, f"{prefix}.feed_forward") \
            if a.num_experts == 0 or index in a.dense_layers else \
            SparseMoE(a.hidden_size, a.intermediate_size, a.num_experts, a.num_experts_per_tok,
                      normalize=False, quant=a.quant, fused_experts=True,
                      expert_names=tuple(f"{prefix}.feed_forward.experts.{e}.{leaf}"
                                         for e in range(a.num_experts)
                                         for leaf in a.expert_leaves))

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = x + (self.mamba(h, get_context().mamba) if self.mamba is not None
                 else self.self_attn(positions, h))
        return x + self.feed_forward(self.post_attention_layernorm(x))


def layer_class(a: Any) -> type[nn.Module]:
    return JambaDecoderLayer if a.hybrid_layer == "jamba" else Mamba1Block


def _mixer_args(hf: Any, name: str) -> Mamba1Args:
    """The mixers' shape from the config: Mamba's and FalconMamba's fields, or Jamba's
    mamba_* ones."""
    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{name}: the mixers' activation {act!r} is not supported (silu)")
    hidden = int(hf.hidden_size)
    if name == JAMBA:
        rank = hf.mamba_dt_rank
        return Mamba1Args(
            intermediate_size=int(hf.mamba_expand) * hidden, state_size=int(hf.mamba_d_state),
            conv_kernel=int(hf.mamba_d_conv),
            time_step_rank=math.ceil(hidden / 16) if rank == "auto" else int(rank),
            conv_bias=bool(hf.mamba_conv_bias), proj_bias=bool(hf.mamba_proj_bias),
            bcdt_norm="weighted", norm_eps=float(hf.rms_norm_eps))
    rank = hf.time_step_rank
    return Mamba1Args(
        intermediate_size=int(getattr(hf, "intermediate_size", None) or hf.expand * hidden),
        state_size=int(hf.state_size), conv_kernel=int(hf.conv_kernel),
        time_step_rank=math.ceil(hidden / 16) if rank == "auto" else int(rank),
        conv_bias=bool(hf.use_conv_bias), proj_bias=bool(hf.use_bias),
        bcdt_norm="plain" if name == FALCON_MAMBA else "",
        norm_eps=float(getattr(hf, "mixer_rms_eps", 1e-6)))


def _every(n: int, period: int, offset: int) -> tuple[int, ...]:
    """Jamba's layers i with i % period == offset."""
    return tuple(i for i in range(n) if i % period == offset)


def mamba1_flags(hf: Any, name: str, quant: QuantConfig | None) -> dict[str, Any]:
    """LlamaArgs flags of a Mamba, FalconMamba or Jamba config (the registry's hook)."""
    if name not in MAMBA1_ARCHITECTURES:
        return {}
    check_hybrid_quant(quant, name, experts=name == JAMBA and int(hf.num_experts) > 1)
    n = int(hf.num_hidden_layers)
    if name != JAMBA:
        return dict(mamba1=_mixer_args(hf, name), mamba_layers=tuple(range(n)),
                    hybrid_layer="mamba1", checkpoint_renames=MIXER_BLOCK_RENAMES,
                    adapter_aliases=MIXER_BLOCK_ALIASES)
    attention = _every(n, int(hf.attn_layer_period), int(hf.attn_layer_offset))
    experts = _every(n, int(hf.expert_layer_period), int(hf.expert_layer_offset)) \
        if int(hf.num_experts) > 1 else ()
    flags: dict[str, Any] = dict(
        mamba1=_mixer_args(hf, name), hybrid_layer="jamba",
        mamba_layers=tuple(i for i in range(n) if i not in attention),
        nope_layers=tuple(range(n)), checkpoint_renames=JAMBA_RENAMES,
        adapter_aliases=JAMBA_ALIASES)
    if experts:
        flags.update(num_experts=int(hf.num_experts),
                     num_experts_per_tok=int(hf.num_experts_per_tok), norm_topk_prob=False,
                     moe_module="feed_forward", fused_experts=True,
                     dense_layers=tuple(i for i in range(n) if i not in experts))
    return flags


def has_mamba1_layers(hf: Any, name: str) -> bool:
    """A Mamba, FalconMamba, or Jamba with a mixer layer (a state per sequence)."""
    return name in MAMBA1_ARCHITECTURES and bool(mamba1_flags(hf, name, None)["mamba_layers"])


def mamba1_lora_targets(args: Any, targets: tuple[str, ...]) -> tuple[str, ...]:
    """What an adapter may target: the mixers' four projections, and Jamba's attention,
    MLPs, experts and router (`targets`: the Llama ones, with the experts' where it has
    them); Mamba's and FalconMamba's embeddings and lm_head beside the mixers'."""
    if args.hybrid_layer == "jamba":
        return targets + MIXER_TARGETS
    return MIXER_TARGETS + ("embed_tokens", "lm_head")
