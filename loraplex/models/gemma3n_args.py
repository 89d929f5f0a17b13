"""Gemma 3n's config (a Gemma3nTextConfig) read into LlamaArgs: the attention, KV sharing
and per-layer embeddings in Gemma 4's terms (Gemma4Args: models/gemma4.py's attention and
worker/memory.py's cache budget read them), the rest in Gemma3nArgs (models/gemma3n.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraplex.models.config_flags import max_positions, rope_params
from loraplex.models.gemma4_args import FULL, SLIDING, Gemma4Args
from loraplex.models.gemma_quant import check_gemma_quant
from loraplex.models.llama import LlamaArgs

# transformers 4.56 saves Gemma3nForCausalLM under its conversion mapping's names, every
# `model` replaced (model.per_layer_model.language_model_projection.weight)
_RENAMES = (("model.language_model", "model"),)


@dataclass(frozen=True)
class Gemma3nArgs:
    altup_num_inputs: int  # the parallel hidden-state streams (AltUp)
    altup_active_idx: int  # the stream the layers compute on
    altup_correct_scale: bool  # the corrected active stream scaled before the PLE gate
    laurel_rank: int  # LAuReL's low-rank residual branch
    intermediate_sizes: tuple[int, ...]  # per layer
    sparsity: tuple[float, ...]  # per layer: activation_sparsity_pattern (0: dense)


def kv_sharing_modes(hf: Any) -> tuple[str | None, ...]:
    """Each layer's KV sharing mode as transformers 5 derives it (4.56's config has no
    `kv_sharing_modes`): the last num_kv_shared_layers layers "reuse" the K/V of the last
    earlier layer of their type, which "store"s it."""
    types, shared = list(hf.layer_types), int(hf.num_kv_shared_layers or 0)
    if shared == 0:
        return (None,) * len(types)
    first = len(types) - shared
    modes: list[str | None] = [None if i < first else "reuse" for i in range(len(types))]
    for kind in set(types[first:]):
        if kind not in types[:first]:
            raise ValueError(f"Gemma 3n: the shared {kind} layers have no earlier layer of "
                             "their type to reuse the K/V of")
    for kind in set(types[:first]):
        modes[first - 1 - types[:first][::-1].index(kind)] = "store"
    return tuple(modes)


def _per_layer(value: Any, n: int, what: str) -> tuple:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
    if len(values) != n:
        raise ValueError(f"Gemma 3n: {what} has {len(values)} values for {n} layers")
    return values


def gemma3n_args(hf: Any, quant: Any, max_model_len: int | None, text_only: Any,
                 long_lora_factors: tuple[float, ...]) -> LlamaArgs:
    """LlamaArgs (with Gemma4Args and Gemma3nArgs) of a Gemma3nTextConfig
    (models/registry.py)."""
    check_gemma_quant(quant, "Gemma 3n")
    if long_lora_factors:
        raise ValueError("--long-lora-scaling-factors: not supported on Gemma 3n, whose "
                         "layer types each have a rope of their own")
    if getattr(hf, "attention_bias", False):
        raise ValueError("Gemma 3n with attention_bias is not supported (no released "
                         "checkpoint has one)")
    if hf.hidden_activation not in ("gelu_pytorch_tanh", "gelu_new"):
        raise ValueError(f"Gemma 3n with hidden_activation={hf.hidden_activation!r} is not "
                         "supported (gelu_pytorch_tanh is)")
    n, types = hf.num_hidden_layers, tuple(hf.layer_types)
    if set(types) - {SLIDING, FULL}:
        raise ValueError(f"Gemma 3n: layer types {sorted(set(types) - {SLIDING, FULL})} are "
                         "not supported")
    head_dim = int(getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    sparsity = hf.activation_sparsity_pattern
    g4 = Gemma4Args(
        layer_types=types, head_dims=(head_dim,) * n, kv_heads=(hf.num_key_value_heads,) * n,
        kv_modes=kv_sharing_modes(hf), k_eq_v=False, full_rope=rope_params(hf, FULL),
        ple_size=int(hf.hidden_size_per_layer_input),
        ple_vocab=int(hf.vocab_size_per_layer_input), pad_token_id=int(hf.pad_token_id or 0))
    g3n = Gemma3nArgs(
        altup_num_inputs=int(hf.altup_num_inputs), altup_active_idx=int(hf.altup_active_idx),
        altup_correct_scale=bool(hf.altup_correct_scale), laurel_rank=int(hf.laurel_rank),
        intermediate_sizes=tuple(int(s) for s in _per_layer(
            hf.intermediate_size, n, "intermediate_size")),
        sparsity=tuple(float(s) for s in _per_layer(
            sparsity if sparsity is not None else 0.0, n, "activation_sparsity_pattern")))
    if not 0 <= g3n.altup_active_idx < g3n.altup_num_inputs:
        raise ValueError(f"Gemma 3n: altup_active_idx={g3n.altup_active_idx} is not one of "
                         f"the altup_num_inputs={g3n.altup_num_inputs} streams")
    theta, scaling = rope_params(hf, SLIDING)
    window = int(hf.sliding_window or 0)
    return LlamaArgs(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
        intermediate_size=max(g3n.intermediate_sizes), num_layers=n,
        num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads,
        head_dim=head_dim, norm_eps=float(hf.rms_norm_eps), rope_theta=theta,
        rope_scaling=scaling, max_position=max_positions(hf), rope_rows=max_model_len,
        text_only=text_only, tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        hidden_act="gelu_tanh", gemma=True, embed_scale_in_embedding=True,
        final_logit_softcap=float(getattr(hf, "final_logit_softcapping", None) or 0.0),
        sliding_window=window or None,
        window_layers=tuple(i for i, t in enumerate(types) if t == SLIDING) if window else (),
        checkpoint_skips=_shared_layer_kv(g4.kv_modes), gemma4=g4, gemma3n=g3n,
        checkpoint_renames=_RENAMES,
        quant=quant.renamed(_RENAMES) if quant is not None else None)


# the tensors of one linear in a checkpoint of any format loraplex loads: plain, FP8 and
# compressed-tensors, GPTQ / AWQ, bitsandbytes 4-bit (Params4bit's pieces) and 8-bit
_LINEAR_TENSORS = (
    "weight", "weight_scale", "weight_scale_inv", "input_scale", "weight_packed",
    "weight_shape", "weight_zero_point", "weight_g_idx", "weight_global_scale",
    "input_global_scale", "qweight", "qzeros", "scales", "g_idx", "SCB", "weight_format",
    *(f"weight.{piece}" for piece in ("absmax", "quant_map", "nested_absmax",
                                      "nested_quant_map", "quant_state.bitsandbytes__nf4",
                                      "quant_state.bitsandbytes__fp4")))


def _shared_layer_kv(modes: tuple[str | None, ...]) -> tuple[str, ...]:
    """The reusing layers' own K/V projections (quantized or not) and norms, which
    transformers 4.56 still builds and saves (unused where HF runs with a cache): skipped
    on load."""
    reusing = [i for i, mode in enumerate(modes) if mode == "reuse"]
    return tuple(f".layers.{i}.self_attn.{m}.{t}" for i in reusing
                 for m in ("k_proj", "v_proj") for t in _LINEAR_TENSORS) + tuple(
        f".layers.{i}.self_attn.{m}.weight" for i in reusing for m in ("k_norm", "v_norm"))
