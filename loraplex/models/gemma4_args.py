"""Gemma 4's config (a Gemma4TextConfig) read into LlamaArgs and Gemma4Args: each
layer's attention shape and KV sharing mode, the two ropes, the per-layer embeddings, the
experts (models/gemma4.py runs them; models/registry.py builds them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraplex.models.config_flags import max_positions, rope_params
from loraplex.models.gemma_quant import check_gemma_quant
from loraplex.models.llama import LlamaArgs

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class Gemma4Args:
    layer_types: tuple[str, ...]
    head_dims: tuple[int, ...]  # per layer
    kv_heads: tuple[int, ...]  # per layer
    kv_modes: tuple[str | None, ...]  # per layer: None, "store" or "reuse"
    k_eq_v: bool  # attention_k_eq_v: the full layers' values are their keys' projection
    full_rope: tuple[float, dict | None]  # the full layers' theta and scaling
    ple_size: int = 0  # hidden_size_per_layer_input (0: no per-layer embeddings)
    ple_vocab: int = 0  # vocab_size_per_layer_input
    double_wide: bool = False  # use_double_wide_mlp: the reusing layers' MLP x 2
    num_experts: int = 0  # > 0: enable_moe_block
    top_k: int = 0
    moe_intermediate_size: int = 0
    pad_token_id: int = 0  # an image row's token for its per-layer embedding, as HF's

    def kv_source(self, index: int) -> int:
        """The layer whose cache layer `index` attends over: itself, or for a reusing
        layer the storing layer of its type."""
        if self.kv_modes[index] != "reuse":
            return index
        kind = self.layer_types[index]
        return next(i for i in range(index - 1, -1, -1)
                    if self.kv_modes[i] == "store" and self.layer_types[i] == kind)

    def has_v(self, index: int) -> bool:
        return not (self.k_eq_v and self.layer_types[index] == FULL)

    def cache_layers(self) -> list[int]:
        """The layers with a KV cache of their own."""
        return [i for i, mode in enumerate(self.kv_modes) if mode != "reuse"]


def _per_layer(hf: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Each layer's (head_dim, num_key_value_heads): transformers' per_layer_config where it
    has one (5.x since Gemma 4), else the config's one value for all."""
    layers = getattr(hf, "per_layer_config", None)
    if layers is not None and not isinstance(layers, dict):
        return (tuple(int(c.head_dim) for c in layers),
                tuple(int(c.num_key_value_heads) for c in layers))
    raise ValueError("Gemma 4: the installed transformers has no per_layer_config on the "
                     "config (transformers >= 5.5 is needed for Gemma 4)")


def gemma4_args(hf: Any, quant: Any, max_model_len: int | None, text_only: Any,
                long_lora_factors: tuple[float, ...]) -> LlamaArgs:
    """LlamaArgs (with Gemma4Args) of a Gemma4TextConfig (models/registry.py)."""
    check_gemma_quant(quant, "Gemma 4")
    if long_lora_factors:
        raise ValueError("--long-lora-scaling-factors: not supported on Gemma 4, whose "
                         "layer types each have a rope of their own")
    if getattr(hf, "use_bidirectional_attention", None) == "all":
        raise ValueError("Gemma 4 with use_bidirectional_attention='all' is not supported "
                         "(loraplex serves causal decoders)")
    if getattr(hf, "attention_bias", False):
        raise ValueError("Gemma 4 with attention_bias is not supported (no released "
                         "checkpoint has one)")
    types = tuple(hf.layer_types)
    if set(types) - {SLIDING, FULL}:
        raise ValueError(f"Gemma 4: layer types {sorted(set(types) - {SLIDING, FULL})} are "
                         "not supported")
    head_dims, kv_heads = _per_layer(hf)
    modes = tuple(hf.kv_sharing_modes)
    for i, mode in enumerate(modes):
        if mode is None or mode == "store":
            continue
        if "store" not in [modes[j] for j in range(i) if types[j] == types[i]]:
            raise ValueError(f"Gemma 4: layer {i} reuses K/V that no earlier layer keeps")
    g = Gemma4Args(
        layer_types=types, head_dims=head_dims, kv_heads=kv_heads, kv_modes=modes,
        k_eq_v=bool(getattr(hf, "attention_k_eq_v", False)),
        full_rope=rope_params(hf, FULL),
        ple_size=int(hf.hidden_size_per_layer_input or 0),
        ple_vocab=int(hf.vocab_size_per_layer_input or 0),
        double_wide=bool(getattr(hf, "use_double_wide_mlp", False)),
        num_experts=int(hf.num_experts or 0) if hf.enable_moe_block else 0,
        top_k=int(hf.top_k_experts or 0), moe_intermediate_size=int(
            hf.moe_intermediate_size or 0), pad_token_id=int(hf.pad_token_id or 0))
    if g.ple_size and g.ple_vocab < hf.vocab_size:
        raise ValueError(f"Gemma 4: vocab_size_per_layer_input={g.ple_vocab} below "
                         f"vocab_size={hf.vocab_size} is not supported (tokens without a "
                         "per-layer embedding row)")
    for i in range(len(types)):  # a reusing layer attends with its source's shape
        s = g.kv_source(i)
        if (head_dims[s], kv_heads[s]) != (head_dims[i], kv_heads[i]):
            raise ValueError(f"Gemma 4: layer {i} reuses layer {s}'s K/V but has another "
                             "head_dim / num_key_value_heads")
    theta, scaling = rope_params(hf, SLIDING)
    window = int(hf.sliding_window or 0)
    return LlamaArgs(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, quant=quant,
        intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads, num_kv_heads=kv_heads[0], head_dim=head_dims[0],
        norm_eps=float(hf.rms_norm_eps), rope_theta=theta, rope_scaling=scaling,
        max_position=max_positions(hf), rope_rows=max_model_len, text_only=text_only,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        hidden_act="gelu_tanh" if hf.hidden_activation in ("gelu_pytorch_tanh", "gelu_new")
        else _unsupported_act(hf.hidden_activation),
        gemma=True, embed_scale_in_embedding=True,
        final_logit_softcap=float(getattr(hf, "final_logit_softcapping", None) or 0.0),
        sliding_window=window or None,
        window_layers=tuple(i for i, t in enumerate(types) if t == SLIDING) if window else (),
        gemma4=g)


def _unsupported_act(act: str) -> str:
    raise ValueError(f"Gemma 4 with hidden_activation={act!r} is not supported "
                     "(gelu_pytorch_tanh is)")
