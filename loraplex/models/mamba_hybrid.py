"""Models with Mamba2 mixers (layers/mamba2.py), beside attention or alone: what they share.

Two layer shapes:
- HybridDecoderLayer (Granite 4.0, Bamba): input_layernorm -> a Mamba2 mixer (`mamba`) or
  attention (`self_attn`) -> residual, then a feed-forward on post_attention_layernorm ->
  residual. Granite scales both outputs by residual_multiplier and has its own
  feed-forward (models/granite_hybrid.py); Bamba's is a SwiGLU MLP (`feed_forward`), its
  second norm pre_ff_layernorm in its checkpoints.
- MixerBlock (Mamba2, Nemotron-H): one sublayer per layer, `norm` -> `mixer` -> residual,
  the mixer a Mamba2 mixer, attention without positions (Nemotron-H's), an ungated
  squared-ReLU MLP or a mixture of such experts (Nemotron-H's, models/nemotron_h_moe.py). Their checkpoints' `backbone.` / `embeddings` /
  `norm_f` are our `model.` / `embed_tokens` / `norm`.

Falcon-H1's layer (attention beside the mixer) and Zamba2's (shared transformer blocks)
are their own files'. `mamba2_args` and `layer_kinds` read a config's Mamba2 shape and
layer kinds (granite_hybrid.py's flags too); `mamba_flags` is the registry's hook for
Bamba, Mamba2, Nemotron-H, Falcon-H1 and Zamba2; llama.py builds the layers
(layer_class).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loraplex.layers.mamba2 import Mamba2Args, Mamba2Mixer
from loraplex.layers.rotary import RotaryEmbedding
from loraplex.models.falcon_h1 import FALCON_H1, FalconH1DecoderLayer, falcon_h1_flags
from loraplex.models.nemotron_h_moe import NemotronHMoE, nemotron_moe_args
from loraplex.models.zamba2 import ZAMBA2, zamba2_flags, zamba2_layer
from loraplex.worker.context import get_context

_MAMBA_TYPES = ("mamba", "linear_attention", "M")
_ATTENTION_TYPES = ("attention", "full_attention", "*")
_MLP_TYPES = ("mlp", "-")
_MOE_TYPES = ("moe", "E")  # Nemotron-H's
# MixerBlock models' checkpoint names -> ours
MIXER_BLOCK_RENAMES = (("backbone.", "model."), ("model.embeddings.", "model.embed_tokens."),
                       ("model.norm_f.", "model.norm."))
# ... and the module path components of their adapters (PEFT on HF's model)
MIXER_BLOCK_ALIASES = (("backbone", "model"), ("embeddings", "embed_tokens"))
BAMBA_RENAMES = ((".pre_ff_layernorm.", ".post_attention_layernorm."),
                 ("model.final_layernorm.", "model.norm."))
# a Mamba2 config's fields, by family: heads, head dim, d_state, groups, d_conv, expand,
# chunk, conv bias, in / out projection bias, norm eps
_MAMBA_FIELDS = {
    "granite": ("mamba_n_heads", "mamba_d_head", "mamba_d_state", "mamba_n_groups",
                "mamba_d_conv", "mamba_expand", "mamba_chunk_size", "mamba_conv_bias",
                "mamba_proj_bias", "rms_norm_eps"),
    "mamba2": ("num_heads", "head_dim", "state_size", "n_groups", "conv_kernel", "expand",
               "chunk_size", "use_conv_bias", "use_bias", "layer_norm_epsilon"),
    "nemotron_h": ("mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups",
                   "conv_kernel", "expand", "chunk_size", "use_conv_bias", "use_bias",
                   "layer_norm_epsilon"),
}
_FAMILY = {"GraniteMoeHybridForCausalLM": "granite", "BambaForCausalLM": "granite",
           "FalconH1ForCausalLM": "granite", "Mamba2ForCausalLM": "mamba2",
           "NemotronHForCausalLM": "nemotron_h", "Zamba2ForCausalLM": "zamba2"}


class HybridDecoderLayer(nn.Module):
    """A mixer or attention, then a feed-forward (a subclass's `ffn`), each output times
    residual_multiplier as it joins the residual stream."""

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
        self.residual_multiplier = a.residual_multiplier

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        h = self.mamba(h, get_context().mamba) if self.mamba is not None \
            else self.self_attn(positions, h)
        x = x + h * self.residual_multiplier
        return x + self.ffn(self.post_attention_layernorm(x)) * self.residual_multiplier


class BambaDecoderLayer(HybridDecoderLayer):
    """Bamba's: the feed-forward a SwiGLU MLP named feed_forward."""

    def __init__(self, a: Any, rotary: RotaryEmbedding, prefix: str, index: int) -> None:
        super().__init__(a, rotary, prefix, index)
        from loraplex.models.llama import LlamaMLP
        self.feed_forward = LlamaMLP(a, f"{prefix}.feed_forward")

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(h)


class MixerBlock(nn.Module):
    """Mamba2's and Nemotron-H's layer: x + mixer(norm(x)), the mixer of the layer's kind."""

    def __init__(self, a: Any, rotary: RotaryEmbedding, prefix: str, index: int) -> None:
        super().__init__()
        from loraplex.models.llama import LlamaAttention, UngatedMLP
        self.norm = a.norm(a.hidden_size)
        self.kind = "mamba" if index in a.mamba_layers else "mlp" if index in a.mlp_layers \
            else "moe" if index in a.moe_mixer_layers else "attention"
        self.mixer = (Mamba2Mixer(a.hidden_size, a.mamba, a.quant, f"{prefix}.mixer")
                      if self.kind == "mamba" else UngatedMLP(a, f"{prefix}.mixer")
                      if self.kind == "mlp" else NemotronHMoE(a, f"{prefix}.mixer")
                      if self.kind == "moe" else
                      LlamaAttention(a, rotary, f"{prefix}.mixer", index))

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if self.kind == "mamba":
            return x + self.mixer(h, get_context().mamba)
        return x + (self.mixer(positions, h) if self.kind == "attention" else self.mixer(h))


def layer_class(a: Any) -> type[nn.Module]:
    """The decoder layer of a model with LlamaArgs `a` built by this file's flags."""
    if a.hybrid_layer == "bamba":
        return BambaDecoderLayer
    if a.hybrid_layer == "mixer_block":
        return MixerBlock
    if a.hybrid_layer == "falcon_h1":
        return FalconH1DecoderLayer
    if a.hybrid_layer == "zamba2":
        return zamba2_layer
    if a.hybrid_layer == "lfm2":
        from loraplex.models.lfm2 import Lfm2DecoderLayer
        return Lfm2DecoderLayer
    if a.hybrid_layer in ("mamba1", "jamba"):  # Mamba-1 mixers: models/mamba1.py
        from loraplex.models.mamba1 import layer_class as mamba1_layer_class
        return mamba1_layer_class(a)
    if a.hybrid_layer == "qwen3_next":
        from loraplex.models.qwen3_next import Qwen3NextDecoderLayer
        return Qwen3NextDecoderLayer
    if a.hybrid_layer == "kimi_linear":
        from loraplex.models.kimi_linear import KimiLinearDecoderLayer
        return KimiLinearDecoderLayer
    from loraplex.models.granite_hybrid import GraniteHybridDecoderLayer
    return GraniteHybridDecoderLayer


def layer_kinds(hf: Any, name: str) -> list[str]:
    """Each layer's kind: "mamba", "attention" or "mlp", from the config's layer_types
    (transformers 5), layers_block_type (Granite, Nemotron-H on 4.x) or
    hybrid_override_pattern (Nemotron-H's hub configs, read by its remote code: M, *, -,
    E); Mamba2's are all mixers. Nemotron-H's may be "mlp" or "moe" too; other kinds are
    refused."""
    if name in ("Mamba2ForCausalLM", FALCON_H1, ZAMBA2):  # (Falcon-H1's, some of
        # Zamba2's attend beside them)
        return ["mamba"] * int(hf.num_hidden_layers)
    types = list(getattr(hf, "layer_types", None) or getattr(hf, "layers_block_type", None)
                 or getattr(hf, "hybrid_override_pattern", None) or [])
    kinds = ["mamba" if t in _MAMBA_TYPES else "attention" if t in _ATTENTION_TYPES
             else "mlp" if t in _MLP_TYPES and name == "NemotronHForCausalLM"
             else "moe" if t in _MOE_TYPES and name == "NemotronHForCausalLM" else t
             for t in types]
    unknown = sorted({k for k in kinds if k not in ("mamba", "attention", "mlp", "moe")})
    if unknown:
        raise ValueError(f"{name}: layer types {unknown} are not supported (Mamba2 mixer, "
                         "attention" + (", MLP, MoE)" if name == "NemotronHForCausalLM"
                                       else ")"))
    return kinds


def mamba2_args(hf: Any, name: str) -> Mamba2Args:
    """The mixers' shape from the config's fields of the architecture's family."""
    heads, head_dim, state, groups, conv, expand, chunk, conv_bias, proj_bias, eps = (
        getattr(hf, f) for f in _MAMBA_FIELDS[_FAMILY[name]])
    hidden = int(hf.hidden_size)
    inner = int(heads) * int(head_dim) if name == "NemotronHForCausalLM" \
        else int(expand * hidden)
    if name == FALCON_H1 and hf.mamba_d_ssm is not None:
        inner = int(hf.mamba_d_ssm)
    if head_dim in (None, "auto"):
        head_dim = inner // int(heads)
    act = getattr(hf, "mamba_hidden_act" if name == "NemotronHForCausalLM" else "hidden_act",
                  "silu")
    if act != "silu":
        raise ValueError(f"{name}: the Mamba2 mixers' activation {act!r} is not supported "
                         "(silu)")
    limit = getattr(hf, "time_step_limit", None) or (0.0, float("inf"))
    falcon = {} if name != FALCON_H1 else dict(  # (HF's default ssm_multipliers: 1)
        norm_before_gate=bool(hf.mamba_norm_before_gate), gated_norm=bool(hf.mamba_rms_norm),
        out_proj_bias=bool(hf.projectors_bias), in_multiplier=float(hf.ssm_in_multiplier),
        zxbcdt_multipliers=tuple(float(v) for v in hf.ssm_multipliers or (1.0,) * 5))
    return Mamba2Args(num_heads=int(heads), head_dim=int(head_dim), state_size=int(state),
                      n_groups=int(groups), conv_kernel=int(conv), intermediate_size=inner,
                      chunk_size=int(chunk), conv_bias=bool(conv_bias),
                      proj_bias=bool(proj_bias), eps=float(eps),
                      time_step_limit=(float(limit[0]), float(limit[1])), **falcon)


def mamba_flags(hf: Any, name: str) -> dict[str, Any]:
    """LlamaArgs flags of Bamba, Mamba2 and Nemotron-H (Granite's: granite_hybrid.py):
    the mixers' shape, which layers are mixers (and Nemotron-H's MLPs), the layer class
    and the checkpoint's names; attention without rope on Nemotron-H, with half of each
    head rotated on Bamba (its fixed partial_rotary_factor)."""
    if name not in _FAMILY or name == "GraniteMoeHybridForCausalLM":
        return {}
    if name == FALCON_H1:
        return dict(falcon_h1_flags(hf), mamba=mamba2_args(hf, name))
    if name == ZAMBA2:
        return zamba2_flags(hf)
    kinds = layer_kinds(hf, name)
    flags = dict(mamba=mamba2_args(hf, name),
                 mamba_layers=tuple(i for i, k in enumerate(kinds) if k == "mamba"))
    if name == "BambaForCausalLM":
        return dict(flags, hybrid_layer="bamba", checkpoint_renames=BAMBA_RENAMES)
    flags.update(hybrid_layer="mixer_block", checkpoint_renames=MIXER_BLOCK_RENAMES,
                 adapter_aliases=MIXER_BLOCK_ALIASES,
                 mlp_layers=tuple(i for i, k in enumerate(kinds) if k == "mlp"))
    if name == "NemotronHForCausalLM":  # (its MLP: registry's ungated_mlp, relu2)
        flags.update(nope_layers=tuple(range(len(kinds))))
    if "moe" in kinds:  # Nemotron-H's mixtures (num_experts and grouped_topk: the
        # experts' LoRA slots, tokens grouped on the host)
        moe = nemotron_moe_args(hf)
        flags.update(nemotron_moe=moe, num_experts=moe.num_experts, grouped_topk=moe.routing,
                     moe_module="mixer",
                     moe_mixer_layers=tuple(i for i, k in enumerate(kinds) if k == "moe"))
    return flags


def has_mamba_layers(hf: Any, name: str) -> bool:
    """Whether the model has Mamba2 mixers (Granite 4.0 -micro, in the same class, has
    attention layers only), LFM2's short convolutions, gated DeltaNets
    (models/qwen3_next.py), Kimi-Linear's KDA layers (models/kimi_linear.py) or Mamba-1
    mixers (models/mamba1.py): a state per sequence
    either way."""
    from loraplex.models.kimi_linear import has_kda_layers
    from loraplex.models.lfm2 import has_conv_layers
    from loraplex.models.mamba1 import has_mamba1_layers
    from loraplex.models.qwen3_next import has_gated_delta_net_layers
    return (name in _FAMILY and "mamba" in layer_kinds(hf, name)) \
        or has_conv_layers(hf, name) or has_gated_delta_net_layers(hf, name) \
        or has_mamba1_layers(hf, name) or has_kda_layers(hf, name)
