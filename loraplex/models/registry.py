"""Architecture name (config.json `architectures`) -> model class and its config flags."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from loraplex.layers.quantization import QuantConfig
from loraplex.models.classic import CLASSIC_FLAGS, CLASSIC_MODEL_TYPES, classic_args
from loraplex.models.config_flags import config_flags, max_positions, rope
from loraplex.models.deepseek import (
    DEEPSEEK_ARCHITECTURES,
    DEEPSEEK_MODEL_TYPES,
    mla_args,
)
from loraplex.models.gemma3n import Gemma3nForCausalLM
from loraplex.models.gemma3n_args import gemma3n_args
from loraplex.models.gemma4 import Gemma4ForCausalLM
from loraplex.models.gemma4_args import gemma4_args
from loraplex.models.granite_hybrid import GRANITE_MOE_ARCHITECTURES, granite_moe_flags
from loraplex.models.kimi_linear import KIMI_LINEAR, KIMI_LINEAR_MODEL_TYPES, kimi_linear_flags
from loraplex.models.lfm2 import LFM2_ARCHITECTURES, LFM2_MODEL_TYPES, lfm2_flags
from loraplex.models.llama import LlamaArgs, LlamaForCausalLM
from loraplex.models.mamba1 import MAMBA1_ARCHITECTURES, MAMBA1_MODEL_TYPES, mamba1_flags
from loraplex.models.mamba_hybrid import mamba_flags
from loraplex.models.moe_flags import moe_flags
from loraplex.models.qwen3_next import (
    ARCHITECTURE_FLAGS,
    GATED_DELTA_NET_ARCHITECTURES,
    GATED_DELTA_NET_MODEL_TYPES,
    gated_delta_net_flags,
)
from loraplex.models.text_only import MULTIMODAL, TextOnly
from loraplex.models.whisper import WhisperConfig, WhisperForConditionalGeneration

# encoder-decoder models, each its own class (not LlamaForCausalLM's flags)
ENCODER_DECODER = ("WhisperForConditionalGeneration",)

# name -> extra LlamaArgs flags
_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "MixtralForCausalLM": {},
    "Qwen2ForCausalLM": {"qkv_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True},
    "Qwen2MoeForCausalLM": {"qkv_bias": True},
    "Qwen3MoeForCausalLM": {"qk_norm": True},
    "GemmaForCausalLM": {"gemma": True},
    "Gemma2ForCausalLM": {"gemma": True, "norm_layout": "sandwich"},
    "Gemma3ForCausalLM": {"gemma": True, "norm_layout": "sandwich", "qk_norm": True},
    # its own decoder (models/gemma4.py): per-layer shapes, KV sharing, per-layer
    # embeddings, experts beside the MLP
    "Gemma4ForCausalLM": {},
    # its own decoder (models/gemma3n.py): AltUp, LAuReL, Gemma 4's attention and
    # per-layer embeddings
    "Gemma3nForCausalLM": {},
    "Olmo2ForCausalLM": {"norm_layout": "post", "qk_norm_full": True},
    "GraniteForCausalLM": {},
    "Phi3ForCausalLM": {"fused_qkv": True, "fused_gate_up": True},
    "GlmForCausalLM": {"fused_gate_up": True, "rope_interleaved": True},
    "Glm4ForCausalLM": {"fused_gate_up": True, "rope_interleaved": True, "norm_layout": "glm"},
    "GptOssForCausalLM": {"qkv_bias": True, "o_bias": True, "attention_sinks": True},
    "SmolLM3ForCausalLM": {},  # NoPE layers: _nope_layers
    "Exaone4ForCausalLM": {"norm_layout": "post", "qk_norm": True},
    "SeedOssForCausalLM": {},
    "MinistralForCausalLM": {},
    # YaRN, and queries scaled past the original context (_ministral3)
    "Ministral3ForCausalLM": {},
    "Ernie4_5ForCausalLM": {"rope_interleaved": True},
    # ERNIE 4.5's experts chosen by softmax scores plus a correction bias (its checkpoints
    # keep the bias in moe_statics, ours in the router), shared experts, dense layers
    # outside its MoE layer range (models/moe_flags.py)
    "Ernie4_5_MoeForCausalLM": {"rope_interleaved": True, "checkpoint_renames": (
        (".mlp.moe_statics.e_score_correction_bias", ".mlp.gate.e_score_correction_bias"),)},
    "HunYuanDenseV1ForCausalLM": {  # q/k norm after the rotation, under its names
        "qk_norm": True, "qk_norm_after_rope": True,
        "checkpoint_renames": ((".self_attn.query_layernorm.", ".self_attn.q_norm."),
                               (".self_attn.key_layernorm.", ".self_attn.k_norm."))},
    # ... and Hunyuan-A13B's experts: softmax top-k renormalized (one group of
    # GroupedTopK, its router "wg" in the gate), an ungated shared MLP beside them
    # (models/moe_flags.py)
    "HunYuanMoEV1ForCausalLM": {
        "qk_norm": True, "qk_norm_after_rope": True,
        "checkpoint_renames": ((".self_attn.query_layernorm.", ".self_attn.q_norm."),
                               (".self_attn.key_layernorm.", ".self_attn.k_norm."),
                               (".mlp.gate.wg.", ".mlp.gate."))},
    "ArceeForCausalLM": {"ungated_mlp": ("up_proj", "down_proj")},
    "NemotronForCausalLM": {"ungated_mlp": ("up_proj", "down_proj"),
                            "norm_type": "layernorm1p"},
    "Starcoder2ForCausalLM": {"ungated_mlp": ("c_fc", "c_proj"), "norm_type": "layernorm"},
    # q/k norm per use_qk_norm (_cohere), logit_scale, Cohere 2's NoPE global layers
    "CohereForCausalLM": {"norm_type": "layernorm_nobias", "norm_layout": "parallel",
                          "rope_interleaved": True},
    "Cohere2ForCausalLM": {"norm_type": "layernorm_nobias", "norm_layout": "parallel",
                           "rope_interleaved": True},
    "Glm4MoeForCausalLM": {},  # q/k/v biases, q/k norm and the experts per its config
    # dots.llm1: Qwen3's attention (local layers per layer_types), GLM-4.5's experts
    "Dots1ForCausalLM": {"qk_norm": True},
    # chunked attention, NoPE layers, experts and biases per its config (_llama4); rope
    # pairs rotated as HF's complex form does
    "Llama4ForCausalLM": {"rope_interleaved": True},
    # OLMo 2's layout and q/k norm, local and global layers (layer_types), each with its
    # own rope parameters (_local_rope: YaRN on the global ones only)
    "Olmo3ForCausalLM": {"norm_layout": "post", "qk_norm_full": True},
    "OlmoeForCausalLM": {"qk_norm_full": True},  # experts per its config (models/moe_flags.py)
    # q/k norm over all heads, partial rotary, sigmoid-routed experts with a correction
    # bias (models/moe_flags.py); its checkpoints keep the bias beside the router, ours in it
    "MiniMaxM2ForCausalLM": {"qk_norm_full": True, "checkpoint_renames": (
        (".block_sparse_moe.e_score_correction_bias",
         ".block_sparse_moe.gate.e_score_correction_bias"),)},
    # multi-head latent attention and the experts per its config (models/deepseek.py)
    **dict.fromkeys(DEEPSEEK_ARCHITECTURES, {}),
    # experts and a shared MLP; Granite 4.0's Mamba2 mixers beside attention layers
    # (models/granite_hybrid.py)
    **dict.fromkeys(GRANITE_MOE_ARCHITECTURES, {}),
    # Mamba2 mixers beside attention and SwiGLU MLPs (Bamba), alone (Mamba2), or beside
    # attention without positions and squared-ReLU MLPs, one per layer (Nemotron-H):
    # models/mamba_hybrid.py
    "BambaForCausalLM": {},
    "Mamba2ForCausalLM": {},
    "NemotronHForCausalLM": {"ungated_mlp": ("up_proj", "down_proj")},
    # attention beside a Mamba2 mixer in every layer, muP multipliers (models/falcon_h1.py)
    "FalconH1ForCausalLM": {},
    # Mamba2 layers, some after a transformer block shared between layers (models/zamba2.py)
    "Zamba2ForCausalLM": {},
    # short convolutions beside attention, LFM2-MoE's experts after its first layers
    # (models/lfm2.py)
    **dict.fromkeys(LFM2_ARCHITECTURES, {}),
    # gated DeltaNet layers beside attention with an output gate; experts with a gated
    # shared expert (Qwen3-Next, Qwen3.5-MoE) or an MLP (Qwen3.5): models/qwen3_next.py
    **dict.fromkeys(GATED_DELTA_NET_ARCHITECTURES, ARCHITECTURE_FLAGS),
    # KDA layers beside latent attention without positions, DeepSeek-V3's experts:
    # models/kimi_linear.py
    KIMI_LINEAR: {},
    # Mamba-1 mixers alone (Mamba, FalconMamba), or beside attention without positions
    # and experts (Jamba): models/mamba1.py
    **dict.fromkeys(MAMBA1_ARCHITECTURES, {}),
    # Apertus: an ungated MLP with xIELU (its learned parameters in mlp.act_fn), q/k norm,
    # its norms under its own names
    "ApertusForCausalLM": {"ungated_mlp": ("up_proj", "down_proj"), "qk_norm": True,
                           "checkpoint_renames": (
                               (".attention_layernorm.", ".input_layernorm."),
                               (".feedforward_layernorm.", ".post_attention_layernorm."))},
    # Phi-1.5 / Phi-2: attention and an ungated GELU MLP (fc1, fc2) side by side on one
    # LayerNorm'd input, biases everywhere (lm_head's too), partial rotary; its attention
    # output is `dense`, its optional q/k LayerNorm per head (_layer_options)
    "PhiForCausalLM": {"norm_type": "layernorm", "norm_layout": "parallel",
                       "ungated_mlp": ("fc1", "fc2"), "module_renames": (("dense", "o_proj"),),
                       "qkv_bias": True, "o_bias": True, "mlp_bias": True, "lm_head_bias": True,
                       "checkpoint_renames": (("model.final_layernorm.", "model.norm."),
                                              (".self_attn.q_layernorm.", ".self_attn.q_norm."),
                                              (".self_attn.k_layernorm.", ".self_attn.k_norm."))},
    # StableLM 2: LayerNorm with biases, partial rotary, q/k/v biases per use_qkv_bias, its
    # sublayers side by side per use_parallel_residual (_layer_options)
    "StableLmForCausalLM": {"norm_type": "layernorm"},
    # OLMo 1: LayerNorm without parameters, q/k/v clamped per clip_qkv (_layer_options)
    "OlmoForCausalLM": {"norm_type": "layernorm_noparam"},
    # Helium: Llama's layers, rotary on interleaved pairs, its RMSNorm's weight applied
    # in fp32
    "HeliumForCausalLM": {"rope_interleaved": True, "norm_type": "rms_fp32_scale"},
    # Phi-3.5-MoE: Mixtral's layers with LayerNorm, routed by its sparsemixer (models/moe_flags.py),
    # biases per attention_bias and lm_head_bias (_biases)
    "PhimoeForCausalLM": {"norm_type": "layernorm"},
    # GPT-NeoX (Pythia): q/k/v fused per head (query_key_value), its attention output
    # `dense`, an ungated GELU MLP, LayerNorm with biases, partial rotary; its sublayers
    # side by side per use_parallel_residual (_layer_options); its own names for the model, the
    # embeddings, attention and lm_head, in checkpoints and adapters
    "GPTNeoXForCausalLM": {
        "norm_type": "layernorm", "fused_qkv": True, "qkv_per_head": True,
        "ungated_mlp": ("dense_h_to_4h", "dense_4h_to_h"), "mlp_bias": True,
        "module_renames": (("query_key_value", "qkv_proj"), ("dense", "o_proj")),
        "checkpoint_renames": (("gpt_neox.embed_in.", "model.embed_tokens."),
                               ("gpt_neox.final_layer_norm.", "model.norm."),
                               ("gpt_neox.layers.", "model.layers."),
                               (".attention.", ".self_attn."), ("embed_out.", "lm_head.")),
        "checkpoint_skips": (".self_attn.bias", ".self_attn.masked_bias"),
        "adapter_aliases": (("gpt_neox", "model"), ("attention", "self_attn"),
                            ("embed_in", "embed_tokens"), ("embed_out", "lm_head"))},
    # GPTBigCode (StarCoder 1), Falcon, OPT, GPT-J: models/classic.py
    **CLASSIC_FLAGS,
}

# multimodal checkpoints: with images (LLaVA), or their language model on text
# (models/text_only.py)
SUPPORTED_ARCHITECTURES = (*_ARCHITECTURES, *ENCODER_DECODER,
                           *(m if spec.images else f"{m} (text)"
                             for m, spec in MULTIMODAL.items()))
# older configs name only a model_type
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "mixtral": "MixtralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                  "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                  "gemma3_text": "Gemma3ForCausalLM", "gemma4_text": "Gemma4ForCausalLM",
                  "gemma3n_text": "Gemma3nForCausalLM",
                  "granite": "GraniteForCausalLM", "olmo2": "Olmo2ForCausalLM",
                  "phi3": "Phi3ForCausalLM", "gpt_oss": "GptOssForCausalLM",
                  "smollm3": "SmolLM3ForCausalLM", "exaone4": "Exaone4ForCausalLM",
                  "seed_oss": "SeedOssForCausalLM", "ministral": "MinistralForCausalLM",
                  "ministral3": "Ministral3ForCausalLM",
                  "ernie4_5": "Ernie4_5ForCausalLM", "ernie4_5_moe": "Ernie4_5_MoeForCausalLM",
                  "glm": "GlmForCausalLM",
                  "glm4": "Glm4ForCausalLM", "hunyuan_v1_dense": "HunYuanDenseV1ForCausalLM",
                  "hunyuan_v1_moe": "HunYuanMoEV1ForCausalLM",
                  "arcee": "ArceeForCausalLM", "nemotron": "NemotronForCausalLM",
                  "starcoder2": "Starcoder2ForCausalLM", "cohere": "CohereForCausalLM",
                  "cohere2": "Cohere2ForCausalLM", "glm4_moe": "Glm4MoeForCausalLM",
                  "dots1": "Dots1ForCausalLM",
                  "llama4_text": "Llama4ForCausalLM", "olmo3": "Olmo3ForCausalLM",
                  "olmoe": "OlmoeForCausalLM", "minimax_m2": "MiniMaxM2ForCausalLM",
                  "granitemoehybrid": "GraniteMoeHybridForCausalLM",
                  "granitemoe": "GraniteMoeForCausalLM",
                  "granitemoeshared": "GraniteMoeSharedForCausalLM",
                  "bamba": "BambaForCausalLM", "mamba2": "Mamba2ForCausalLM",
                  "nemotron_h": "NemotronHForCausalLM", "falcon_h1": "FalconH1ForCausalLM",
                  "zamba2": "Zamba2ForCausalLM", "apertus": "ApertusForCausalLM",
                  "phi": "PhiForCausalLM", "stablelm": "StableLmForCausalLM",
                  "olmo": "OlmoForCausalLM", "helium": "HeliumForCausalLM",
                  "gpt_neox": "GPTNeoXForCausalLM", "phimoe": "PhimoeForCausalLM",
                  **DEEPSEEK_MODEL_TYPES, **LFM2_MODEL_TYPES, **CLASSIC_MODEL_TYPES,
                  **GATED_DELTA_NET_MODEL_TYPES, **MAMBA1_MODEL_TYPES,
                  **KIMI_LINEAR_MODEL_TYPES}
_CLASSIFIER = "ForSequenceClassification"


def _causal_name(name: str) -> str:
    """A headless checkpoint's architecture (`Qwen2Model`: no lm_head, saved from
    AutoModel, as embedding models are; `Qwen2ForSequenceClassification`: a score head
    instead) served by its causal LM's entry."""
    if name.endswith(_CLASSIFIER):
        return name[:-len(_CLASSIFIER)] + "ForCausalLM"
    return name[:-len("Model")] + "ForCausalLM" if name.endswith("Model") else name


def is_headless(hf_config: Any) -> bool:
    """The checkpoint is a `*Model` (or `*ForSequenceClassification`) without lm_head:
    it serves only as a pooling model (runner="pooling"), as vLLM loads such
    architectures."""
    archs = getattr(hf_config, "architectures", None) or []
    return not any(a in _ARCHITECTURES for a in archs) and any(
        (a.endswith("Model") or a.endswith(_CLASSIFIER)) and _causal_name(a) in _ARCHITECTURES
        for a in archs)


def is_classifier(hf_config: Any) -> bool:
    """A `*ForSequenceClassification` checkpoint of a supported family: its decoder is
    headless (`model.*`) and `score.weight` [num_labels, hidden] classifies the last
    token (vLLM's classify)."""
    return is_headless(hf_config) and any(
        a.endswith(_CLASSIFIER) for a in getattr(hf_config, "architectures", None) or [])


def architecture(hf_config: Any) -> str:
    """The supported architecture the config names; a clear error for any other model,
    checked before anything else (tokenizer, weights) is loaded for it."""
    archs = getattr(hf_config, "architectures", None) or []
    if not archs and getattr(hf_config, "model_type", None) in _BY_MODEL_TYPE:
        archs = [_BY_MODEL_TYPE[hf_config.model_type]]
    if any(a in ENCODER_DECODER for a in archs):
        return next(a for a in archs if a in ENCODER_DECODER)
    name = next((a for a in map(_causal_name, archs) if a in _ARCHITECTURES), None)
    if name is None:
        raise ValueError(f"model architecture {archs or '(none given)'} is not supported; "
                         "supported: " + ", ".join(SUPPORTED_ARCHITECTURES))
    return name




def build_model(hf_config: Any, quant: QuantConfig | None = None,
                long_lora_factors: tuple[float, ...] = (),
                text_only: TextOnly | None = None,
                max_model_len: int | None = None) -> LlamaForCausalLM:
    """The model of `hf_config`; `long_lora_factors`: rope tables for long-context LoRA;
    `text_only`: hf_config is a multimodal checkpoint's text config (text_only.py);
    `max_model_len`: the positions served, which the rope tables need hold no more of."""
    name = architecture(hf_config)
    if name == "WhisperForConditionalGeneration":  # models/whisper.py
        if quant is not None:
            raise ValueError(f"{name}: quantized checkpoints are not supported")
        return WhisperForConditionalGeneration(WhisperConfig.from_hf(hf_config))
    if name == "Gemma4ForCausalLM":  # its config has per-layer head_dim / KV heads
        return Gemma4ForCausalLM(gemma4_args(hf_config, quant, max_model_len, text_only,
                                             tuple(long_lora_factors)))
    if name == "Gemma3nForCausalLM":  # AltUp, LAuReL, per-layer MLP widths
        return Gemma3nForCausalLM(gemma3n_args(hf_config, quant, max_model_len, text_only,
                                               tuple(long_lora_factors)))
    # (Mamba2 has no attention: its num_heads / head_dim are its mixers', unused here;
    # Mamba's config names no heads at all)
    num_heads = getattr(hf_config, "num_attention_heads", None) \
        or getattr(hf_config, "num_heads", None) or 1
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    theta, scaling = rope(hf_config, name, head_dim)
    args = LlamaArgs(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=getattr(hf_config, "intermediate_size", 0),  # (Mamba2: none)
        num_layers=hf_config.num_hidden_layers,
        num_heads=num_heads,
        # (GPT-NeoX's heads are all q/k/v heads, whatever else its config holds)
        num_kv_heads=num_heads if name == "GPTNeoXForCausalLM" else
        getattr(hf_config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=scaling,
        max_position=max_positions(hf_config),
        rope_rows=max_model_len,
        long_lora_factors=tuple(long_lora_factors),
        text_only=text_only,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        quant=quant,
        **_ARCHITECTURES[name],
        **config_flags(hf_config, name, quant, "ungated_mlp" not in _ARCHITECTURES[name],
                       head_dim),
        **moe_flags(hf_config, name, quant),
        **granite_moe_flags(hf_config, name),
        **mamba_flags(hf_config, name),
        **lfm2_flags(hf_config, name, quant),
        **gated_delta_net_flags(hf_config, name, quant),
        **mamba1_flags(hf_config, name, quant),
        **kimi_linear_flags(hf_config, name, quant),
    )
    if name in (*DEEPSEEK_ARCHITECTURES, KIMI_LINEAR):  # MLA: its own heads, head dims
        # and biases
        args = replace(args, **mla_args(hf_config, name, scaling))
    if name in CLASSIC_FLAGS:  # their configs' own fields (models/classic.py)
        args = replace(args, **classic_args(hf_config, name))
    if quant is not None and args.checkpoint_renames:  # not-convert lists under our names
        args = replace(args, quant=quant.renamed(args.checkpoint_renames))
    return LlamaForCausalLM(args)
