"""What an architecture's config.json says, read into LlamaArgs flags.

The families name the same things differently (the norms' epsilon, which projections have
biases, rope parameters in transformers 4's or 5's fields, Gemma's caps, Granite's
multipliers ...). models/registry.py picks the architecture and its fixed flags;
`config_flags` and `rope` read the rest from the config, as each HF modeling file does.
"""

from __future__ import annotations

import importlib
from typing import Any

from loraplex.layers.activation import ACT_AND_MUL
from loraplex.layers.quantization import QuantConfig
from loraplex.models.classic import ACTIVATION_FIELDS, CLASSIC_NORM_EPS
from loraplex.models.granite_hybrid import GRANITE_MOE_ARCHITECTURES
from loraplex.models.lfm2 import LFM2_ARCHITECTURES
from loraplex.models.llama4 import llama4_flags
from loraplex.models.qwen3_next import GATED_DELTA_NET_ARCHITECTURES

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


def sliding_window(hf_config: Any, name: str) -> dict[str, Any]:
    """Sliding-window attention, as HF applies it: the window and the layers that use it
    (`layer_types` "sliding_attention" where the config lists them; else every layer, but
    Gemma 2's odd ones, which attend globally). Empty when the model has no window."""
    window = getattr(hf_config, "sliding_window", None)
    if not window or getattr(hf_config, "use_sliding_window", True) is False:
        return {}
    types = getattr(hf_config, "layer_types", None)
    if types:
        layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    elif name == "Gemma2ForCausalLM":
        layers = tuple(range(0, hf_config.num_hidden_layers, 2))
    else:
        layers = tuple(range(hf_config.num_hidden_layers))
    return {"sliding_window": int(window), "window_layers": layers} if layers else {}


def _hidden_act(hf: Any, name: str, gated: bool) -> str:
    """The gated MLP's activation. Gemma was trained with the tanh GELU, which its early
    configs call "gelu": as vLLM does, "gelu" means exact only as `hidden_activation`."""
    if name in ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        return "gelu" if getattr(hf, "hidden_activation", None) == "gelu" else "gelu_tanh"
    act = getattr(hf, "mlp_hidden_act" if name == "NemotronHForCausalLM" else
                  ACTIVATION_FIELDS.get(name, "hidden_act"), "silu")
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


def rope(hf: Any, name: str, head_dim: int) -> tuple[float, dict | None]:
    """rope_theta and the scaling LlamaArgs takes: Qwen2-VL's "mrope" as the default rope
    it is (in sections: _mrope), transformers 4's LongRoPE with its original context
    beside it, Phi-3.5-MoE's scales, Hunyuan's fixed alpha."""
    theta, scaling = rope_params(hf)
    kind = scaling.get("rope_type", scaling.get("type")) if scaling is not None else None
    if kind == "mrope":
        scaling = None
    if kind == "longrope" and "original_max_position_embeddings" not in scaling:
        scaling = {**scaling, "original_max_position_embeddings":
                   hf.original_max_position_embeddings}
    if name == "PhimoeForCausalLM" and scaling is not None:
        scaling = _phimoe_mscale(scaling)
    return ntk_alpha(theta, scaling, head_dim)


def config_flags(hf: Any, name: str, quant: QuantConfig | None, gated: bool,
                 head_dim: int) -> dict[str, Any]:
    """Every LlamaArgs flag `name`'s config sets beyond the shapes and the rope (`gated`:
    the architecture's MLP is gated, which limits its activations). No two readers set
    the same flag (dict() refuses a repeated keyword)."""
    return dict(
        norm_eps=_norm_eps(hf, name),
        hidden_act=_hidden_act(hf, name, gated),
        rotary_dim=_rotary_dim(hf, head_dim),
        **_biases(hf, name),
        **_nope_layers(hf, name),
        **_gemma_attention(hf, name),
        **_granite(hf, name),
        **_embedding_scaling(name),
        **_cohere(hf, name),
        **_qk_norm(hf, name),
        **sliding_window(hf, name),
        **_local_rope(hf, name),
        **_mrope(hf),
        **_llama4(hf, name, quant),
        **_ministral3(hf, name),
        **_layer_options(hf, name),
    )
