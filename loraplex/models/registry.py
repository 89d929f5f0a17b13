"""Architecture name (config.json `architectures`) -> model class and its config flags."""

from __future__ import annotations

import importlib
from dataclasses import replace
from typing import Any

from loraplex.layers.activation import ACT_AND_MUL
from loraplex.layers.quantization import QuantConfig
from loraplex.models.classic import (
    ACTIVATION_FIELDS,
    CLASSIC_FLAGS,
    CLASSIC_MODEL_TYPES,
    CLASSIC_NORM_EPS,
    classic_args,
)
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
from loraplex.models.llama4 import llama4_flags
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
# the architectures whose q/k/v/o have biases where the config's attention_bias says so
# (and, for some, the MLP's where mlp_bias does), as their HF modeling code reads them
_ATTENTION_BIAS = ("LlamaForCausalLM", "GraniteForCausalLM", *GRANITE_MOE_ARCHITECTURES,
                   "BambaForCausalLM", "FalconH1ForCausalLM",
                   "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Qwen3ForCausalLM",
                   "Qwen3MoeForCausalLM", "Dots1ForCausalLM", "Olmo2ForCausalLM",
                   "SmolLM3ForCausalLM",
                   "HunYuanDenseV1ForCausalLM", "HunYuanMoEV1ForCausalLM", "ArceeForCausalLM",
                   "NemotronForCausalLM",
                   "CohereForCausalLM", "Cohere2ForCausalLM", "Olmo3ForCausalLM",
                   "OlmoeForCausalLM", *GATED_DELTA_NET_ARCHITECTURES,
                   "ApertusForCausalLM", "OlmoForCausalLM")
_MLP_BIAS = ("LlamaForCausalLM", "GraniteForCausalLM", "SmolLM3ForCausalLM",
             "ArceeForCausalLM", "NemotronForCausalLM", "BambaForCausalLM",
             "NemotronHForCausalLM", "FalconH1ForCausalLM", "HeliumForCausalLM")
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "gelu": "gelu", "relu2": "relu2", "xielu": "xielu", "relu": "relu"}
_DEFAULT_MAX_POSITIONS = 2048  # a config without max_position_embeddings (Mamba2)
# what a config calls its norms' epsilon, where not rms_norm_eps
_NORM_EPS = {"NemotronForCausalLM": "norm_eps", "Starcoder2ForCausalLM": "norm_epsilon",
             "CohereForCausalLM": "layer_norm_eps", "Cohere2ForCausalLM": "layer_norm_eps",
             "Mamba2ForCausalLM": "layer_norm_epsilon",
             "NemotronHForCausalLM": "layer_norm_epsilon",
             "MambaForCausalLM": "layer_norm_epsilon",
             "FalconMambaForCausalLM": "layer_norm_epsilon",
             "PhiForCausalLM": "layer_norm_eps", "StableLmForCausalLM": "layer_norm_eps",
             "GPTNeoXForCausalLM": "layer_norm_eps", **CLASSIC_NORM_EPS,
             **dict.fromkeys(LFM2_ARCHITECTURES, "norm_eps")}


def rope_params(hf: Any, layer_type: str = "full_attention") -> tuple[float, dict | None]:
    """rope_theta and scaling, from transformers 5 `rope_parameters` (Gemma 3's: one per
    layer type) or 4.x fields (Gemma 3's local layers: `rope_local_base_freq`)."""
    params = getattr(hf, "rope_parameters", None)
    if isinstance(params, dict) and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    elif layer_type == "sliding_attention":  # 4.x: the local layers' own base, no scaling
        return float(hf.rope_local_base_freq), None
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        scaling = params if params.get("rope_type", "default") != "default" else None
        return float(theta), scaling
    scaling = getattr(hf, "rope_scaling", None)
    return float(getattr(hf, "rope_theta", 10000.0)), scaling or None


# Qwen3-VL's text configs: M-RoPE interleaved whatever `mrope_interleaved` says (HF's
# Qwen3VLTextRotaryEmbedding always interleaves; the hub's configs say true)
_INTERLEAVED_MROPE = ("qwen3_vl_text", "qwen3_vl_moe_text")
# Qwen3.5's: the same, its default sections HF's Qwen3_5TextRotaryEmbedding's
_QWEN3_5_MROPE = ("qwen3_5_text", "qwen3_5_moe_text")


def _mrope(hf: Any) -> dict[str, Any]:
    """Qwen2-VL's M-RoPE sections (transformers 5: in rope_parameters; 4.x: rope_scaling,
    whose type "mrope" is a default rope otherwise); Qwen3-VL's and Qwen3.5's
    interleaved."""
    interleaved = getattr(hf, "model_type", None) in (*_INTERLEAVED_MROPE, *_QWEN3_5_MROPE)
    for params in (getattr(hf, "rope_parameters", None), getattr(hf, "rope_scaling", None)):
        if isinstance(params, dict) and params.get("mrope_section"):
            return {"mrope_section": tuple(int(n) for n in params["mrope_section"]),
                    "mrope_interleaved": interleaved}
    if getattr(hf, "model_type", None) in _INTERLEAVED_MROPE:  # HF's default sections
        return {"mrope_section": (24, 20, 20), "mrope_interleaved": True}
    if getattr(hf, "model_type", None) in _QWEN3_5_MROPE:
        return {"mrope_section": (11, 11, 10), "mrope_interleaved": True}
    return {}


def sliding_window(hf_config: Any, name: str | None = None) -> dict[str, Any]:
    """Sliding-window attention, as HF applies it: the window and the layers that use it
    (`layer_types` "sliding_attention" where the config lists them; else every layer, but
    Gemma 2's odd ones, which attend globally). Empty when the model has no window."""
    window = getattr(hf_config, "sliding_window", None)
    if not window or getattr(hf_config, "use_sliding_window", True) is False:
        return {}
    types = getattr(hf_config, "layer_types", None)
    if types:
        layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    elif (name or architecture(hf_config)) == "Gemma2ForCausalLM":
        layers = tuple(range(0, hf_config.num_hidden_layers, 2))
    else:
        layers = tuple(range(hf_config.num_hidden_layers))
    return {"sliding_window": int(window), "window_layers": layers} if layers else {}


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


def _hidden_act(hf: Any, name: str) -> str:
    """The gated MLP's activation. Gemma was trained with the tanh GELU, which its early
    configs call "gelu": as vLLM does, "gelu" means exact only as `hidden_activation`."""
    if name in ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        return "gelu" if getattr(hf, "hidden_activation", None) == "gelu" else "gelu_tanh"
    act = getattr(hf, "mlp_hidden_act" if name == "NemotronHForCausalLM" else
                  ACTIVATION_FIELDS.get(name, "hidden_act"), "silu")
    gated = "ungated_mlp" not in _ARCHITECTURES[name]
    supported = [a for a, ours in _ACTIVATIONS.items() if (not gated or ours in ACT_AND_MUL)
                 and (ours != "xielu" or name == "ApertusForCausalLM")]
    if act not in supported:
        raise ValueError(f"hidden_act={act!r} is not supported for {name}; supported: "
                         + ", ".join(supported))
    return _ACTIVATIONS[act]


def _norm_eps(hf: Any, name: str) -> float:
    """The norms' epsilon, under the name the architecture's config gives it (OLMo's and
    OPT's configs have none: HF's norms fix it at 1e-5)."""
    if name in ("OlmoForCausalLM", "OPTForCausalLM"):
        return 1e-5
    return float(getattr(hf, _NORM_EPS.get(name, "rms_norm_eps")))


def _biases(hf: Any, name: str) -> dict[str, Any]:
    """Which projections have biases, where the architecture reads it from its config."""
    if name == "Ernie4_5ForCausalLM":  # one flag for every projection
        bias = bool(getattr(hf, "use_bias", False))
        return dict(qkv_bias=bias, o_bias=bias, mlp_bias=bias)
    if name == "Ernie4_5_MoeForCausalLM":  # the same, and lm_head's; the experts have
        # none (the dense and shared MLPs have: HF builds them so)
        bias = bool(getattr(hf, "use_bias", False))
        return dict(qkv_bias=bias, o_bias=bias, mlp_bias=bias, lm_head_bias=bias)
    if name in ("GlmForCausalLM", "Glm4ForCausalLM", "Glm4MoeForCausalLM"):  # q/k/v only
        return dict(qkv_bias=bool(getattr(hf, "attention_bias", True)))
    if name == "Starcoder2ForCausalLM":  # one flag for every projection
        bias = bool(getattr(hf, "use_bias", True))
        return dict(qkv_bias=bias, o_bias=bias, mlp_bias=bias)
    if name == "StableLmForCausalLM":  # q/k/v only
        return dict(qkv_bias=bool(getattr(hf, "use_qkv_bias", False)))
    if name == "GPTNeoXForCausalLM":  # query_key_value's and dense's (the MLP's: always)
        bias = bool(getattr(hf, "attention_bias", True))
        return dict(qkv_bias=bias, o_bias=bias)
    if name == "PhimoeForCausalLM":  # q/k/v/o's, and lm_head's of its own flag
        bias = bool(getattr(hf, "attention_bias", False))
        return dict(qkv_bias=bias, o_bias=bias,
                    lm_head_bias=bool(getattr(hf, "lm_head_bias", False)))
    if name == "HeliumForCausalLM":  # o_proj never has one
        return dict(qkv_bias=bool(getattr(hf, "attention_bias", False)),
                    mlp_bias=bool(getattr(hf, "mlp_bias", False)))
    if name == "SeedOssForCausalLM":
        return dict(qkv_bias=bool(getattr(hf, "attention_bias", True)),
                    o_bias=bool(getattr(hf, "attention_out_bias", False)),
                    mlp_bias=bool(getattr(hf, "mlp_bias", False)))
    out: dict[str, Any] = {}
    if name in _ATTENTION_BIAS:
        out["qkv_bias"] = out["o_bias"] = bool(getattr(hf, "attention_bias", False))
    if name in _MLP_BIAS:
        out["mlp_bias"] = bool(getattr(hf, "mlp_bias", False))
    return out


def _nope_layers(hf: Any, name: str) -> dict[str, Any]:
    """Layers without rotary positions: SmolLM3's no_rope_layers (0 = NoPE); EXAONE 4's
    global layers, when it has sliding-window ones (HF rotates only those then); Cohere 2's
    global layers (it rotates only in its sliding-window layers: none without a window)."""
    layers: tuple[int, ...] = ()
    if name == "SmolLM3ForCausalLM":
        layers = tuple(i for i, rope in enumerate(hf.no_rope_layers) if not rope)
    elif name == "Cohere2ForCausalLM" and not getattr(hf, "sliding_window", None):
        layers = tuple(range(hf.num_hidden_layers))
    elif name in ("Exaone4ForCausalLM", "Cohere2ForCausalLM") \
            and getattr(hf, "sliding_window", None):
        layers = tuple(i for i, t in enumerate(hf.layer_types) if t != "sliding_attention")
    return {"nope_layers": layers} if layers else {}


def _rotary_dim(hf: Any, head_dim: int) -> int | None:
    """Partial rotary (Phi-4-mini): the head dimensions rotated, int(head_dim x factor) as
    HF computes them; None when the whole head is."""
    params = getattr(hf, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None))
    if factor in (None, 1.0):
        return None
    dim = int(head_dim * factor)
    if not 0 < dim <= head_dim or dim % 2:
        raise ValueError(f"partial_rotary_factor={factor} gives {dim} rotary dimensions of "
                         f"{head_dim}: not an even number in (0, head_dim]")
    return dim


def _gemma_attention(hf: Any, name: str) -> dict[str, Any]:
    """Gemma 2's and 3's attention scale and score / logit caps (None in its config: no
    cap, as in Gemma 3)."""
    if name not in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        return {}
    return dict(query_pre_attn_scalar=float(hf.query_pre_attn_scalar),
                attn_logit_softcap=float(getattr(hf, "attn_logit_softcapping", None) or 0.0),
                final_logit_softcap=float(getattr(hf, "final_logit_softcapping", None) or 0.0))


def _local_rope(hf: Any, name: str) -> dict[str, Any]:
    """Gemma 3's sliding-window layers rotate with their own base (and no scaling), OLMo
    3's with their own rope parameters (the global layers' YaRN is not theirs)."""
    if name == "Olmo3ForCausalLM" and isinstance(
            (getattr(hf, "rope_parameters", None) or {}).get("sliding_attention"), dict):
        return {"local_rope": rope_params(hf, "sliding_attention")}
    if name != "Gemma3ForCausalLM":
        return {}
    return {"local_rope": rope_params(hf, "sliding_attention")}


def _embedding_scaling(name: str) -> dict[str, Any]:
    """Whether HF scales Gemma's embeddings inside its embedding module, so embeddings a
    caller gives (inputs_embeds; our prompt_embeds) enter unscaled: Gemma 3's always,
    Gemma's and Gemma 2's from transformers 5 on (4.x scales whatever enters the model).
    As the installed transformers does it, so a prompt_embeds made with its
    get_input_embeddings() means what it means to HF."""
    if name == "Gemma3ForCausalLM":
        return {"embed_scale_in_embedding": True}
    if name not in ("GemmaForCausalLM", "Gemma2ForCausalLM"):
        return {}
    model_type = "gemma" if name == "GemmaForCausalLM" else "gemma2"
    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    prefix = "Gemma" if model_type == "gemma" else "Gemma2"
    return {"embed_scale_in_embedding": hasattr(modeling, f"{prefix}TextScaledWordEmbedding")}


def _granite(hf: Any, name: str) -> dict[str, Any]:
    """Granite's multipliers of the embeddings, the sublayers' outputs and the attention
    scores, and its logits' divisor."""
    if name != "GraniteForCausalLM":
        return {}
    return dict(embedding_multiplier=float(hf.embedding_multiplier),
                residual_multiplier=float(hf.residual_multiplier),
                attention_multiplier=float(hf.attention_multiplier),
                logits_scaling=float(hf.logits_scaling))


def _qk_norm(hf: Any, name: str) -> dict[str, Any]:
    """GLM-4.5's optional q/k RMSNorm per head (`use_qk_norm`)."""
    if name != "Glm4MoeForCausalLM":
        return {}
    return {"qk_norm": bool(getattr(hf, "use_qk_norm", False))}


def _cohere(hf: Any, name: str) -> dict[str, Any]:
    """Cohere's logit scale and its optional q/k norm (a LayerNorm weight per head)."""
    if name not in ("CohereForCausalLM", "Cohere2ForCausalLM"):
        return {}
    qk_norm = bool(getattr(hf, "use_qk_norm", False))
    return dict(logit_scale=float(hf.logit_scale if hf.logit_scale is not None else 1.0),
                qk_norm=qk_norm, qk_norm_per_head_weight=qk_norm)


def _layer_options(hf: Any, name: str) -> dict[str, Any]:
    """Phi's optional q/k LayerNorm (qk_layernorm: one over head_dim, shared by the heads,
    with a bias); StableLM's sublayers side by side (use_parallel_residual: one norm) and
    its q/k LayerNorm (StableLM 2 12B: a LayerNorm per head, whose weights load as rows of
    one per-head weight); GPT-NeoX's sublayers side by side
    (use_parallel_residual: each its own norm); OLMo's clip_qkv."""
    if name == "PhiForCausalLM":
        return {"qk_norm": bool(getattr(hf, "qk_layernorm", False))}
    if name == "StableLmForCausalLM":
        flags: dict[str, Any] = {"norm_layout": "parallel"} \
            if getattr(hf, "use_parallel_residual", False) else {}
        if getattr(hf, "qk_layernorm", False):
            flags.update(qk_norm=True, qk_norm_per_head_weight=True, checkpoint_stacks=(
                (".self_attn.q_layernorm.norms.", ".self_attn.q_norm."),
                (".self_attn.k_layernorm.norms.", ".self_attn.k_norm.")))
        return flags
    if name == "GPTNeoXForCausalLM":
        return {"norm_layout": "parallel_two_norms"} \
            if getattr(hf, "use_parallel_residual", True) else {}
    if name == "OlmoForCausalLM" and getattr(hf, "clip_qkv", None) is not None:
        return {"clip_qkv": float(hf.clip_qkv)}
    return {}


def _ministral3(hf: Any, name: str) -> dict[str, Any]:
    """Ministral 3's (Mistral 3's newer language models: Ministral 3, Devstral Small 2)
    query scaling by position, Llama 4's: rope_parameters' llama_4_scaling_beta and
    original_max_position_embeddings, as HF's Ministral3Attention reads them."""
    if name != "Ministral3ForCausalLM":
        return {}
    params = getattr(hf, "rope_parameters", None) or {}
    beta, original = params.get("llama_4_scaling_beta"), \
        params.get("original_max_position_embeddings")
    if beta is None or not original:
        raise ValueError("Ministral 3: rope_parameters must give llama_4_scaling_beta and "
                         "original_max_position_embeddings (HF's attention reads both)")
    return {"position_query_scale": (float(beta), float(original))}


def _llama4(hf: Any, name: str, quant: QuantConfig | None) -> dict[str, Any]:
    """Llama 4's flags (models/llama4.py): its chunked and NoPE layers, q/k norm,
    temperature tuning, experts and dense layers."""
    if name != "Llama4ForCausalLM":
        return {}
    if quant is not None and not (quant.method == "bitsandbytes" and quant.bits == 4
                                  and not quant.prequantized):
        raise ValueError(f"{quant.method}-quantized Llama 4 checkpoints are not supported "
                         "yet: its fused experts load unquantized, or NF4-quantized as they "
                         "load (quantization='bitsandbytes' on the original checkpoint)")
    return llama4_flags(hf)


def _phimoe_mscale(scaling: dict) -> dict:
    """Phi-3.5-MoE's LongRoPE scales cos / sin by its config's short_mscale (prompts within
    the original context) or long_mscale, not by HF's computed attention factor: one value
    for both is served as that factor; two different ones are refused."""
    short, long = scaling.get("short_mscale"), scaling.get("long_mscale")
    if short is None and long is None:
        return scaling
    if short != long:
        raise ValueError(f"Phi-3.5-MoE with short_mscale={short} and long_mscale={long} is "
                         "not supported: loraplex's LongRoPE tables take one scale")
    return {**scaling, "attention_factor": float(short)}


def ntk_alpha(theta: float, scaling: dict | None, head_dim: int
              ) -> tuple[float, dict | None]:
    """Hunyuan's "dynamic" rope with a fixed `alpha`: not dynamic at all, the base
    stretched to theta * alpha^(d / (d - 2)) (as HF computes it), with no other scaling."""
    if scaling and scaling.get("rope_type", scaling.get("type")) == "dynamic" \
            and scaling.get("alpha"):
        return theta * float(scaling["alpha"]) ** (head_dim / (head_dim - 2)), None
    return theta, scaling


def max_positions(hf_config: Any) -> int:
    """The config's max_position_embeddings; for a model without positions (Mamba2, whose
    config has none) vLLM's default of 2048, which max_model_len may raise."""
    return int(getattr(hf_config, "max_position_embeddings", None) or _DEFAULT_MAX_POSITIONS)


def long_lora_max_position(hf_config: Any, factors: tuple[float, ...] | None) -> int:
    """The positions a model serves: its max_position_embeddings, times the largest
    long-context LoRA factor (a LongLoRA adapter was trained that much longer); any number
    for a model without positions (Mamba2)."""
    if getattr(hf_config, "max_position_embeddings", None) is None:
        return 2**62
    return int(hf_config.max_position_embeddings * max(factors or (1.0,)))


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
    theta, scaling = rope_params(hf_config)
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "mrope":
        scaling = None  # Qwen2-VL (transformers 4): a default rope in sections (_mrope)
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "longrope" \
            and "original_max_position_embeddings" not in scaling:  # transformers 4: beside it
        scaling = {**scaling, "original_max_position_embeddings":
                   hf_config.original_max_position_embeddings}
    if name == "PhimoeForCausalLM" and scaling is not None:
        scaling = _phimoe_mscale(scaling)
    # (Mamba2 has no attention: its num_heads / head_dim are its mixers', unused here;
    # Mamba's config names no heads at all)
    num_heads = getattr(hf_config, "num_attention_heads", None) \
        or getattr(hf_config, "num_heads", None) or 1
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    theta, scaling = ntk_alpha(theta, scaling, head_dim)
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
        norm_eps=_norm_eps(hf_config, name),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position=max_positions(hf_config),
        rope_rows=max_model_len,
        long_lora_factors=tuple(long_lora_factors),
        text_only=text_only,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        quant=quant,
        hidden_act=_hidden_act(hf_config, name),
        rotary_dim=_rotary_dim(hf_config, head_dim),
        **_ARCHITECTURES[name],
        **_biases(hf_config, name),
        **_nope_layers(hf_config, name),
        **_gemma_attention(hf_config, name),
        **moe_flags(hf_config, name, quant),
        **_granite(hf_config, name),
        **_embedding_scaling(name),
        **_cohere(hf_config, name),
        **_qk_norm(hf_config, name),
        **sliding_window(hf_config, name),
        **_local_rope(hf_config, name),
        **_mrope(hf_config),
        **_llama4(hf_config, name, quant),
        **_ministral3(hf_config, name),
        **_layer_options(hf_config, name),
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
