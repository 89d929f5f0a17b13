"""EAGLE draft heads: one decoder layer that extrapolates the target's features.

EAGLE-1 (vLLM's EagleLlamaForCausalLM): the row of position p reads token p + 1 and the
target's final hidden state (after its norm) at p, x = fc(cat(embed(token), feature)),
then one Llama decoder layer without its input norm; its output is both the next row's
feature and, through lm_head without a norm, the logits of token p + 2.

EAGLE-3 (vLLM's Eagle3LlamaForCausalLM, LlamaForCausalLMEagle3 and the speculators
format): the target's feature is the residual stream entering three of its layers,
concatenated and projected by fc to the hidden size (`combine`); the layer's attention
reads cat(input_layernorm(embed(token)), hidden_norm(feature)) (q/k/v 2H wide), the
feature is the residual; its output before the head's final norm is the next row's
feature, after it the logits' input over the head's own vocabulary (draft_vocab_size),
whose id i is the target's i + d2t[i].

Both share the target's embed_tokens and lm_head unless the checkpoint has its own (the
base weights: the head runs without adapters); an EAGLE-1 checkpoint's embed_tokens, a
copy of the target's, is not loaded (as vLLM). The head runs on the ModelRunner as a
model would: its layer's Attention has its own paged KV cache; the proposer sets each
forward's `features` (one row per input token) before the runner calls it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.layers.linear import Linear, make_linear
from loraplex.layers.rotary import RotaryEmbedding
from loraplex.models.config_flags import rope_params
from loraplex.models.llama import LlamaArgs, LlamaAttention, LlamaDecoderLayer, LlamaMLP
from loraplex.models.loader import iterate_weights

# HF sub-projections packed into one of our linears: (ours, shard)
_PACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


@dataclass(frozen=True)
class EagleHeadConfig:
    method: str  # "eagle" (EAGLE-1) or "eagle3"
    args: LlamaArgs  # the head's decoder layer (one) and the target vocabulary
    draft_vocab_size: int  # EAGLE-3: its lm_head's rows (= vocab_size without d2t)
    target_hidden_size: int  # the width of each target feature fc reads
    aux_layer_ids: tuple[int, ...] | None  # EAGLE-3: the config's, None: vLLM's default
    norm_before_residual: bool = False  # EAGLE-3: the residual is hidden_norm(feature)


def is_eagle3_checkpoint(raw: dict) -> bool:
    archs = raw.get("architectures") or []
    return raw.get("speculators_model_type") == "eagle3" or any("Eagle3" in a for a in archs)


def read_head_config(path: str, method: str, max_model_len: int) -> EagleHeadConfig:
    """The head's config.json: a Llama config (EAGLE-1's and EAGLE-3's public heads), or
    the speculators format (its layer in transformer_layer_config). Refuses a head of the
    other method, and heads of more than one layer."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ValueError(f"speculative_config: the EAGLE head in {path} has no config.json")
    with open(file) as f:
        raw = json.load(f)
    if is_eagle3_checkpoint(raw) != (method == "eagle3"):
        other = "an EAGLE-3" if method == "eagle" else "an EAGLE-1"
        raise ValueError(f"speculative_config: {path} is {other} head: use method "
                         f"{'eagle3' if method == 'eagle' else 'eagle'!r}")
    layer = raw.get("transformer_layer_config") or raw
    missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                           "vocab_size") if k not in layer]
    if missing:
        raise ValueError(f"speculative_config: the EAGLE head's config.json in {path} lacks "
                         + ", ".join(missing))
    if layer.get("num_hidden_layers", 1) != 1:
        raise ValueError(f"speculative_config: the EAGLE head in {path} has "
                         f"{layer['num_hidden_layers']} layers; loraplex runs one-layer heads")
    hf = SimpleNamespace(**layer)
    heads, hidden = layer["num_attention_heads"], layer["hidden_size"]
    head_dim = layer.get("head_dim") or hidden // heads
    theta, scaling = rope_params(hf)
    args = LlamaArgs(
        vocab_size=layer["vocab_size"], hidden_size=hidden,
        intermediate_size=layer["intermediate_size"], num_layers=1, num_heads=heads,
        num_kv_heads=layer.get("num_key_value_heads") or heads, head_dim=head_dim,
        norm_eps=float(layer.get("rms_norm_eps", 1e-6)), rope_theta=theta,
        # the rotary table serves the target's positions, whatever the head trained on
        rope_scaling=scaling,
        max_position=max(layer.get("max_position_embeddings", 0), max_model_len),
        rope_rows=max_model_len, tie_word_embeddings=False,
        qkv_bias=bool(layer.get("attention_bias", False)),
        o_bias=bool(layer.get("attention_bias", False)),
        mlp_bias=bool(layer.get("mlp_bias", False)))
    if layer.get("hidden_act", "silu") != "silu":
        raise ValueError(f"speculative_config: the EAGLE head's hidden_act "
                         f"{layer['hidden_act']!r} is not supported (silu only)")
    ids = raw.get("eagle_aux_hidden_state_layer_ids") or (
        raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    return EagleHeadConfig(
        method=method, args=args,
        draft_vocab_size=raw.get("draft_vocab_size") or args.vocab_size,
        target_hidden_size=raw.get("target_hidden_size") or hidden,
        aux_layer_ids=tuple(ids) if ids else None,
        norm_before_residual=bool(raw.get("norm_before_residual", False)))


def read_head_weights(path: str) -> dict[str, torch.Tensor]:
    """The head's tensors under one naming: EAGLE-3's `midlayer.*` as `layers.0.*`, a
    `model.` prefix dropped (heads are small: all of them at once)."""
    out = {}
    for name, tensor in iterate_weights(path):
        name = name.removeprefix("model.").replace("midlayer.", "layers.0.")
        out[name] = tensor
    return out


class SharedWeight(nn.Module):
    """The target's embedding or lm_head weight, read without holding it as a parameter
    (it is the target's: neither loaded nor counted again)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.shared = weight.detach()

    @property
    def weight(self) -> torch.Tensor:
        return self.shared


class SharedEmbedding(SharedWeight):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.shared)


class SharedHead(SharedWeight):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.shared)


class Eagle3Layer(nn.Module):
    """EAGLE-3's midlayer: attention over cat(normed embeds, normed feature), 2H wide."""

    def __init__(self, a: LlamaArgs, rotary: RotaryEmbedding, norm_before_residual: bool
                 ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(replace(a, hidden_size=2 * a.hidden_size), rotary,
                                        "layers.0.self_attn", 0)
        self.self_attn.o_proj = make_linear(self.self_attn.q_size, [a.hidden_size], a.o_bias)
        self.mlp = LlamaMLP(a, "layers.0.mlp")
        self.input_layernorm = a.norm(a.hidden_size)
        self.hidden_norm = a.norm(a.hidden_size)
        self.post_attention_layernorm = a.norm(a.hidden_size)
        self.norm_before_residual = norm_before_residual

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor,
                feature: torch.Tensor) -> torch.Tensor:
        normed = self.hidden_norm(feature)
        residual = normed if self.norm_before_residual else feature
        x = torch.cat([self.input_layernorm(embeds), normed], dim=-1)  # [T, 2H]
        h = residual + self.self_attn(positions, x)
        return h + self.mlp(self.post_attention_layernorm(h))


class EagleBody(nn.Module):
    """What the ModelRunner reads of `model.model`: embed_tokens, rotary, aux_layers."""

    def __init__(self, cfg: EagleHeadConfig, embed: nn.Module) -> None:
        super().__init__()
        a = cfg.args
        self.embed_tokens = embed
        self.rotary = RotaryEmbedding(a.head_dim, a.max_position, a.rope_theta,
                                      a.rope_scaling, rows=a.rope_rows)
        self.aux_layers = None  # the head keeps no features of its own layers
        self.aux_hidden_states = None
        if cfg.method == "eagle":
            self.fc = Linear(2 * a.hidden_size, [a.hidden_size], bias=False)
            layer = LlamaDecoderLayer(a, self.rotary, "layers.0", 0)
            layer.input_layernorm = nn.Identity()  # EAGLE-1's first layer has none
        else:
            self.fc = Linear(3 * cfg.target_hidden_size, [a.hidden_size], bias=False)
            layer = Eagle3Layer(a, self.rotary, cfg.norm_before_residual)
            self.norm = a.norm(a.hidden_size)
        self.layers = nn.ModuleList([layer])


class EagleHead(nn.Module):
    """An EAGLE head as the ModelRunner drives it (the LlamaForCausalLM interface it
    reads: args, model, lm_head, forward, compute_logits, final_logits)."""

    def __init__(self, cfg: EagleHeadConfig, embed: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.args = cfg.args
        self.model = EagleBody(cfg, embed)
        self.lm_head = lm_head
        # EAGLE-3: draft id -> target id offsets (None: the vocabularies are the same)
        self.register_buffer("d2t", None)
        self.features: torch.Tensor | None = None  # [T, hidden]: set before each forward
        self.prenorm: torch.Tensor | None = None  # [T, hidden]: each row's output feature

    def combine(self, target_features: torch.Tensor) -> torch.Tensor:
        """The target's features as the head reads them: EAGLE-3's three layers' states
        through fc; EAGLE-1's final hidden state as it is."""
        return self.model.fc(target_features) if self.cfg.method == "eagle3" else \
            target_features

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                image_rows: Any = None) -> torch.Tensor:
        """The rows' logits inputs; their output features are left in `prenorm`."""
        body, features = self.model, self.features
        # a token an adapter added (past the base vocabulary) reads as the last base one:
        # the head has no row for it (its drafts are only verified, never trusted)
        embeds = body.embed_tokens(input_ids.clamp(max=self.args.vocab_size - 1))
        if self.cfg.method == "eagle":
            x = body.fc(torch.cat([embeds, features.to(embeds.dtype)], dim=-1))
            self.prenorm = body.layers[0](positions, x)
            return self.prenorm
        self.prenorm = body.layers[0](positions, embeds, features.to(embeds.dtype))
        return body.norm(self.prenorm)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, the target's vocab]: EAGLE-3's draft vocabulary mapped through d2t,
        -inf at the target ids it cannot propose."""
        logits = self.lm_head(hidden)
        if self.d2t is None:
            return logits
        out = logits.new_full((logits.shape[0], self.args.vocab_size), float("-inf"))
        ids = torch.arange(logits.shape[1], device=logits.device) + self.d2t
        out[:, ids] = logits
        return out

    def final_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


def _base_weight(module: nn.Module, what: str, hidden: int) -> torch.Tensor:
    """The target's embedding or lm_head weight under its LoRA wrapper, if any, checked
    to fit a head of width `hidden`."""
    weight = getattr(getattr(module, "base_layer", module), "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise ValueError(f"speculative_config: the EAGLE head shares the target's {what}, "
                         "which is quantized here; a head with its own is needed")
    if weight.shape[1] != hidden:
        raise ValueError(f"speculative_config: the EAGLE head (hidden size {hidden}) has no "
                         f"{what} of its own and the target's is {weight.shape[1]} wide")
    return weight


def build_head(cfg: EagleHeadConfig, tensors: dict[str, torch.Tensor], target: nn.Module,
               path: str) -> EagleHead:
    """The head over its checkpoint's tensors, in the current default dtype and device
    (the engine's _build): its own embed_tokens / lm_head where it has them, else the
    target's; EAGLE-3's d2t checked against the target's vocabulary."""
    a = cfg.args
    # EAGLE-1 trains with the target's embedding frozen: its checkpoint's copy is not
    # loaded again (vLLM shares the target's too); EAGLE-3 heads may train their own
    own_embed = tensors.get("embed_tokens.weight") if cfg.method == "eagle3" else None
    own_head = tensors.get("lm_head.weight")
    embed = (nn.Embedding(a.vocab_size, a.hidden_size) if own_embed is not None else
             SharedEmbedding(_base_weight(target.model.embed_tokens, "embed_tokens",
                                         a.hidden_size)))
    rows = cfg.draft_vocab_size if cfg.method == "eagle3" else a.vocab_size
    if own_head is None and rows != a.vocab_size:
        raise ValueError(f"speculative_config: the EAGLE-3 head in {path} has no lm_head "
                         f"for its draft vocabulary ({rows} tokens)")
    if own_head is None and getattr(getattr(target, "args", None), "lm_head_bias", False):
        raise ValueError(f"speculative_config: the EAGLE head in {path} has no lm_head, and "
                         "the target's has a bias (Phi), which a shared head does not apply")
    lm_head = (Linear(a.hidden_size, [rows]) if own_head is not None else
               SharedHead(_base_weight(target.lm_head, "lm_head", a.hidden_size)))
    head = EagleHead(cfg, embed, lm_head)
    for name, module, tensor in (("embed_tokens.weight", embed, own_embed),
                                 ("lm_head.weight", lm_head, own_head)):
        if tensor is None:
            continue
        if tensor.shape != module.weight.shape:
            raise ValueError(f"speculative_config: EAGLE head tensor {name} has shape "
                             f"{tuple(tensor.shape)}, the head's config gives "
                             f"{tuple(module.weight.shape)}")
        with torch.no_grad():
            module.weight.copy_(tensor)
    d2t = tensors.get("d2t")
    if cfg.method == "eagle3" and d2t is not None:
        ids = torch.arange(d2t.shape[0]) + d2t.long()
        if d2t.shape != (rows,) or ids.min() < 0 or ids.max() >= a.vocab_size:
            raise ValueError(f"speculative_config: the EAGLE-3 head's d2t does not map its "
                             f"{rows} draft tokens into the target's {a.vocab_size}")
        head.d2t = d2t.long().to(head.model.fc.weight.device)
    elif cfg.method == "eagle3" and rows != a.vocab_size:
        raise ValueError(f"speculative_config: the EAGLE-3 head in {path} has a draft "
                         f"vocabulary of {rows} tokens but no d2t to map it")
    load_head_weights(head, tensors, path)
    return head.eval()


def load_head_weights(head: EagleHead, tensors: dict[str, torch.Tensor], path: str) -> None:
    """The checkpoint's tensors into the head (q/k/v and gate/up packed); fc.bias, which
    EAGLE-1's reference code trains and vLLM ignores, is applied when present. Refuses
    missing tensors and wrong shapes."""
    body = head.model
    if "fc.bias" in tensors:
        w = body.fc.weight
        body.fc.bias = nn.Parameter(torch.empty(w.shape[0], dtype=w.dtype, device=w.device))
    params = dict(head.named_parameters())
    loaded = {"lm_head.weight", "model.embed_tokens.weight"}  # (build_head's own copies)
    for name, tensor in tensors.items():
        if name in ("t2d", "d2t", "embed_tokens.weight", "lm_head.weight") \
                or "rotary_emb" in name:
            continue  # (embed_tokens, lm_head, d2t: build_head's)
        if head.cfg.method == "eagle" and name == "layers.0.input_layernorm.weight":
            continue  # EAGLE-1's first layer runs without it (vLLM, the reference code)
        ours = "model." + name
        module, _, param = ours.rpartition(".")
        prefix, _, leaf = module.rpartition(".")
        if leaf in _PACKED:
            packed, shard = _PACKED[leaf]
            target = head.get_submodule(f"{prefix}.{packed}")
            try:
                target.load_shard(param, tensor, shard)
            except ValueError as e:
                raise ValueError(f"speculative_config: EAGLE head tensor {name}: {e}") \
                    from None
            loaded.add(f"{prefix}.{packed}.{param}")
            continue
        if ours not in params:
            raise ValueError(f"speculative_config: EAGLE head tensor {name} has no place "
                             f"in an {head.cfg.method} head")
        if params[ours].shape != tensor.shape:
            raise ValueError(f"speculative_config: EAGLE head tensor {name} has shape "
                             f"{tuple(tensor.shape)}, the head's config gives "
                             f"{tuple(params[ours].shape)}")
        with torch.no_grad():
            params[ours].copy_(tensor)
        loaded.add(ours)
    missing = sorted(n for n in params if n not in loaded)
    if missing:
        raise ValueError(f"speculative_config: the EAGLE head in {path} lacks weights for: "
                         + ", ".join(missing[:8]))
