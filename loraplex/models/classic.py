"""Older decoder families vLLM serves, as flags of models/llama.py's blocks:

- GPTBigCode (StarCoder 1, SantaCoder, WizardCoder): learned absolute positions (wpe), no
  rotary; multi-query attention, q/k/v fused in c_attn ([every head's q, k, v]; without
  multi_query, per head as GPT-NeoX's); LayerNorm, an ungated MLP c_fc / c_proj, biases
  everywhere. Its attention output is c_proj too: our attention's keeps that name.
- Falcon: q/k/v fused in query_key_value, by variant: new_decoder_architecture (40B,
  180B) per KV group [each group's queries, k, v], multi_query (7B) [q of all heads, k, v],
  else per head; attention (`dense`) and the MLP (dense_h_to_4h / dense_4h_to_h) side by
  side on one LayerNorm (7B; the new architecture's num_ln_in_parallel_attn=1) or on two
  (ln_attn, ln_mlp), or one after the other (parallel_attn=False); rotary, or ALiBi
  (alibi=True: Falcon-RW) as HF computes it: BLOOM's slopes, the positions and slope x
  position in bfloat16 (`alibi_bf16_scale`), over sqrt(head_dim), as HF scales the
  scores' sum with it: (q.k + slope j) / sqrt(d); biases per `bias`.
- OPT: learned positions at position + 2, no rotary; q/k/v_proj / out_proj, ReLU MLP fc1 /
  fc2 (directly on the layer in HF, in our `mlp`), LayerNorm before each sublayer; biases
  per enable_bias. OPT-350m (do_layer_norm_before=False): each LayerNorm on its
  sublayer's residual sum ("post_ln"), no final one; its embeddings word_embed_proj_dim
  wide, project_in after them (before the positions join), project_out before lm_head
  (both LoRA targets, as PEFT's all-linear takes them).
- GPT-J: attention and the MLP (fc_in / fc_out) side by side on one LayerNorm, rotary on
  interleaved pairs over the first rotary_dim dimensions of each head (base 10000), no
  biases on q/k/v/out_proj, lm_head with a bias.
- CodeGen: GPT-J's layer, q/k/v fused in qkv_proj as its 4 model-parallel shards held
  them: per shard its heads' queries, values, keys.
- BLOOM: ALiBi (a linear bias per head on the key positions: layers/attention.py), no
  positions otherwise; a LayerNorm on the embeddings; q/k/v fused per head in
  query_key_value, `dense`, a GELU MLP dense_h_to_4h / dense_4h_to_h, biases everywhere.
- MPT: ALiBi with its own slopes (alibi_bias_max), q/k/v fused in Wqkv and clamped
  (clip_qkv), its softmax_scale, LayerNorm without biases, no biases anywhere, a GELU MLP
  up_proj / down_proj of 4 x d_model (as HF's MptMLP builds it).

Their checkpoints' and adapters' names (transformer.h.{i}.attn, model.decoder.layers ...)
map onto ours (model.layers.{i}.self_attn ...) by checkpoint_renames / adapter_aliases.
"""

from __future__ import annotations

import math
from typing import Any

import torch

GPT_BIGCODE, FALCON, OPT, GPTJ, CODEGEN, BLOOM, MPT = (
    "GPTBigCodeForCausalLM", "FalconForCausalLM", "OPTForCausalLM", "GPTJForCausalLM",
    "CodeGenForCausalLM", "BloomForCausalLM", "MptForCausalLM")
CLASSIC_MODEL_TYPES = {"gpt_bigcode": GPT_BIGCODE, "falcon": FALCON, "opt": OPT,
                       "gptj": GPTJ, "codegen": CODEGEN, "bloom": BLOOM, "mpt": MPT}
CODEGEN_SHARDS = 4  # CodeGen's mp_num: its qkv_proj's layout
# what each config calls its activation and its norms' epsilon (OPT's is nn.LayerNorm's
# default, 1e-5: config_flags._norm_eps)
ACTIVATION_FIELDS = {GPT_BIGCODE: "activation_function", FALCON: "activation",
                     OPT: "activation_function", GPTJ: "activation_function",
                     CODEGEN: "activation_function"}
CLASSIC_NORM_EPS = {GPT_BIGCODE: "layer_norm_epsilon", FALCON: "layer_norm_epsilon",
                    GPTJ: "layer_norm_epsilon", CODEGEN: "layer_norm_epsilon",
                    BLOOM: "layer_norm_epsilon", MPT: "layer_norm_epsilon"}
# GPT-2's names (GPTBigCode, GPT-J) -> ours, in checkpoints and adapters
_GPT2_RENAMES = (("transformer.wte.", "model.embed_tokens."),
                 ("transformer.ln_f.", "model.norm."), ("transformer.h.", "model.layers."),
                 (".attn.", ".self_attn."), (".ln_1.", ".input_layernorm."),
                 (".ln_2.", ".post_attention_layernorm."))
_GPT2_ALIASES = (("transformer", "model"), ("h", "layers"), ("attn", "self_attn"),
                 ("wte", "embed_tokens"))
# their checkpoints' causal-mask buffers (older saves), no weights
_MASK_BUFFERS = (".self_attn.bias", ".self_attn.masked_bias", ".self_attn.causal_mask")
# GPT-J's layer: parallel sublayers on one LayerNorm, interleaved rotary, biased MLP and
# lm_head
_GPTJ_LAYER = {
    "norm_type": "layernorm", "norm_layout": "parallel", "ungated_mlp": ("fc_in", "fc_out"),
    "mlp_bias": True, "lm_head_bias": True, "rope_interleaved": True,
    "checkpoint_renames": _GPT2_RENAMES, "checkpoint_skips": _MASK_BUFFERS,
    "adapter_aliases": _GPT2_ALIASES}

# each architecture's fixed LlamaArgs flags (registry._ARCHITECTURES); classic_args adds
# what its config decides
CLASSIC_FLAGS: dict[str, dict[str, Any]] = {
    GPT_BIGCODE: {
        "norm_type": "layernorm", "fused_qkv": True, "ungated_mlp": ("c_fc", "c_proj"),
        "attention_output": "c_proj", "qkv_bias": True, "o_bias": True, "mlp_bias": True,
        "learned_positions": 0, "module_renames": (("c_attn", "qkv_proj"),),
        "checkpoint_renames": (("transformer.wpe.", "model.embed_positions."),
                               *_GPT2_RENAMES),
        "checkpoint_skips": _MASK_BUFFERS, "adapter_aliases": _GPT2_ALIASES},
    FALCON: {
        "norm_type": "layernorm", "fused_qkv": True,
        "ungated_mlp": ("dense_h_to_4h", "dense_4h_to_h"),
        "module_renames": (("query_key_value", "qkv_proj"), ("dense", "o_proj")),
        "checkpoint_renames": (("transformer.word_embeddings.", "model.embed_tokens."),
                               ("transformer.ln_f.", "model.norm."),
                               ("transformer.h.", "model.layers."),
                               (".self_attention.", ".self_attn."),
                               (".ln_attn.", ".input_layernorm."),
                               (".ln_mlp.", ".post_attention_layernorm.")),
        "adapter_aliases": (("transformer", "model"), ("h", "layers"),
                            ("self_attention", "self_attn"),
                            ("word_embeddings", "embed_tokens"))},
    OPT: {
        "norm_type": "layernorm", "ungated_mlp": ("fc1", "fc2"), "learned_positions": 2,
        "module_renames": (("out_proj", "o_proj"),),
        # (checkpoints saved from OPTModel name it decoder.*, without model.)
        "checkpoint_renames": (("model.decoder.", "decoder."),
                               ("decoder.final_layer_norm.", "model.norm."),
                               ("decoder.", "model."),
                               (".self_attn_layer_norm.", ".input_layernorm."),
                               (".final_layer_norm.", ".post_attention_layernorm."),
                               (".fc1.", ".mlp.fc1."), (".fc2.", ".mlp.fc2.")),
        "adapter_aliases": (("decoder", ""), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2"))},
    GPTJ: {**_GPTJ_LAYER, "module_renames": (("out_proj", "o_proj"),)},
    CODEGEN: {**_GPTJ_LAYER, "fused_qkv": True, "qkv_per_head": True,
              "qkv_groups": CODEGEN_SHARDS, "qkv_group_order": "qvk",
              "module_renames": (("out_proj", "o_proj"),)},
    BLOOM: {
        "norm_type": "layernorm", "fused_qkv": True, "qkv_per_head": True,
        "ungated_mlp": ("dense_h_to_4h", "dense_4h_to_h"),
        "qkv_bias": True, "o_bias": True, "mlp_bias": True, "embedding_norm": True,
        "module_renames": (("query_key_value", "qkv_proj"), ("dense", "o_proj")),
        "checkpoint_prefix": "transformer.",
        "checkpoint_renames": (("transformer.word_embeddings_layernorm.", "model.embed_norm."),
                               ("transformer.word_embeddings.", "model.embed_tokens."),
                               ("transformer.ln_f.", "model.norm."),
                               ("transformer.h.", "model.layers."),
                               (".self_attention.", ".self_attn.")),
        "adapter_aliases": (("transformer", "model"), ("h", "layers"),
                            ("self_attention", "self_attn"),
                            ("word_embeddings", "embed_tokens"))},
    MPT: {
        "norm_type": "layernorm_nobias", "fused_qkv": True, "ungated_mlp": ("up_proj", "down_proj"),
        "module_renames": (("Wqkv", "qkv_proj"), ("out_proj", "o_proj")),
        "checkpoint_renames": (("transformer.wte.", "model.embed_tokens."),
                               ("transformer.norm_f.", "model.norm."),
                               ("transformer.blocks.", "model.layers."),
                               (".attn.", ".self_attn."), (".norm_1.", ".input_layernorm."),
                               (".norm_2.", ".post_attention_layernorm."), (".ffn.", ".mlp.")),
        "adapter_aliases": (("transformer", "model"), ("blocks", "layers"),
                            ("attn", "self_attn"), ("ffn", "mlp"), ("wte", "embed_tokens"))},
}


def classic_args(hf: Any, name: str) -> dict[str, Any]:
    """The LlamaArgs fields a classic architecture's config decides (over build_model's
    defaults, which read Llama's fields)."""
    return {GPT_BIGCODE: _gpt_bigcode, FALCON: _falcon, OPT: _opt, GPTJ: _gptj,
            CODEGEN: _codegen, BLOOM: _bloom, MPT: _mpt}[name](hf)


def _no_rotary(hf: Any) -> dict[str, Any]:
    """Learned positions instead: no layer rotates q and k."""
    return {"nope_layers": tuple(range(hf.num_hidden_layers))}


def _gpt_bigcode(hf: Any) -> dict[str, Any]:
    multi_query = bool(getattr(hf, "multi_query", True))
    return dict(_no_rotary(hf), num_kv_heads=1 if multi_query else hf.num_attention_heads,
                qkv_per_head=not multi_query,
                intermediate_size=hf.n_inner or 4 * hf.hidden_size,
                # (scale_attn_weights=False: scores unscaled)
                attention_multiplier=None if getattr(hf, "scale_attn_weights", True) else 1.0)


def _falcon(hf: Any) -> dict[str, Any]:
    heads, new = hf.num_attention_heads, bool(hf.new_decoder_architecture)
    kv_heads = (hf.num_kv_heads or heads) if new or not hf.multi_query else 1
    if new:  # always parallel; two norms unless num_ln_in_parallel_attn says one
        layout = "parallel" if getattr(hf, "num_ln_in_parallel_attn", None) == 1 \
            else "parallel_two_norms"
    else:
        layout = "parallel" if hf.parallel_attn else "pre"
    bias = bool(hf.bias)
    alibi = dict(_no_rotary(hf), alibi_slopes=falcon_alibi_slopes(heads),
                 alibi_bf16_scale=(hf.hidden_size // heads) ** -0.5) \
        if getattr(hf, "alibi", False) else {}
    return dict(num_kv_heads=kv_heads, qkv_per_head=new or not hf.multi_query,
                norm_layout=layout, qkv_bias=bias, o_bias=bias, mlp_bias=bias,
                intermediate_size=hf.ffn_hidden_size or 4 * hf.hidden_size, **alibi)


def _opt(hf: Any) -> dict[str, Any]:
    bias = bool(getattr(hf, "enable_bias", True))
    affine = bool(getattr(hf, "layer_norm_elementwise_affine", True))
    pre = bool(hf.do_layer_norm_before)  # False: OPT-350m's post-LN layers
    width = hf.word_embed_proj_dim or hf.hidden_size  # (HF builds its final LayerNorm
    # only before-norm and without _remove_final_layer_norm)
    return dict(_no_rotary(hf), num_kv_heads=hf.num_attention_heads,
                norm_layout="pre" if pre else "post_ln",
                final_norm=pre and not getattr(hf, "_remove_final_layer_norm", False),
                word_embed_proj_dim=width if width != hf.hidden_size else None,
                norm_type="layernorm" if affine else "layernorm_noparam",
                qkv_bias=bias, o_bias=bias, mlp_bias=bias, intermediate_size=hf.ffn_dim)


def _codegen(hf: Any) -> dict[str, Any]:
    if hf.num_attention_heads % CODEGEN_SHARDS:
        raise ValueError(f"CodeGen with n_head={hf.num_attention_heads}: its qkv_proj is laid "
                         f"out in {CODEGEN_SHARDS} shards of whole heads, so n_head must be a "
                         f"multiple of {CODEGEN_SHARDS}")
    return _gptj(hf)


def _gptj(hf: Any) -> dict[str, Any]:
    head_dim = hf.hidden_size // hf.num_attention_heads
    rotary = hf.rotary_dim if hf.rotary_dim and hf.rotary_dim < head_dim else None
    return dict(num_kv_heads=hf.num_attention_heads, rotary_dim=rotary,
                rope_theta=10000.0, rope_scaling=None,  # (its sinusoids' fixed base)
                intermediate_size=hf.n_inner or 4 * hf.hidden_size)


def _bloom(hf: Any) -> dict[str, Any]:
    if getattr(hf, "apply_residual_connection_post_layernorm", False):
        raise ValueError("BLOOM with apply_residual_connection_post_layernorm=True is not "
                         "supported")
    heads = hf.num_attention_heads
    return dict(_no_rotary(hf), num_kv_heads=heads, intermediate_size=4 * hf.hidden_size,
                hidden_act="gelu_tanh", alibi_slopes=alibi_slopes(heads))  # (bloom_gelu)


def _mpt(hf: Any) -> dict[str, Any]:
    attn = hf.attn_config
    heads = hf.num_attention_heads
    clip = getattr(attn, "clip_qkv", None)
    return dict(_no_rotary(hf), num_kv_heads=heads, intermediate_size=4 * hf.hidden_size,
                hidden_act="gelu", clip_qkv=float(clip) if clip else None,
                attention_multiplier=getattr(attn, "softmax_scale", None),
                alibi_slopes=mpt_alibi_slopes(heads, float(attn.alibi_bias_max)))


def mpt_alibi_slopes(num_heads: int, max_bias: float) -> tuple[float, ...]:
    """MPT's ALiBi slopes: 2^(-max_bias i / n) over n = the next power of two of heads;
    for other head counts the odd terms, then the even ones, the first num_heads."""
    n = 2 ** math.ceil(math.log2(num_heads))
    slopes = [2 ** (-max_bias * i / n) for i in range(1, n + 1)]
    return tuple((slopes[1::2] + slopes[::2])[:num_heads] if n != num_heads else slopes)


def falcon_alibi_slopes(num_heads: int) -> tuple[float, ...]:
    """Falcon-RW's: BLOOM's slopes rounded to bfloat16 (HF's build_alibi_tensor, as the
    model was trained)."""
    return tuple(torch.tensor(alibi_slopes(num_heads)).bfloat16().float().tolist())


def alibi_slopes(num_heads: int) -> tuple[float, ...]:
    """ALiBi's head slopes (Press et al., 2021), as BLOOM computes them: a geometric
    sequence over the largest power of two of heads, 2^(-8 i / n), and for the heads past
    it every other term of the sequence for twice as many."""
    n = 2 ** math.floor(math.log2(num_heads))
    slopes = [2 ** (-8 * i / n) for i in range(1, n + 1)]
    extra = min(n, num_heads - n)
    return tuple(slopes + [2 ** (-8 * i / (2 * n)) for i in range(1, 2 * extra, 2)])
