"""Mistral's consolidated format as a base: params.json and consolidated*.safetensors.

Mistral's model cards tell vLLM users to serve with `--config-format mistral --load-format
mistral`; the checkpoint is Mistral's own (mistral-inference's) rather than the HF
conversion beside it. `mistral_config` turns params.json into the HF config our model code
reads (as vLLM's configs/mistral.py adapts it); `iterate_mistral_weights` yields the
consolidated tensors under HF's names. Mistral keeps each head's q / k rows in the
interleaved rotary order (pairs 0,1 2,3 ...); HF's conversion permutes them to the
half-split order its rotate_half needs, and so do we (vLLM's maybe_remap_mistral), so the
layouts agree and a PEFT adapter trained on the HF model applies unchanged.

Text models, Voxtral (params.json's `multimodal.whisper_model_args`: its audio encoder
and projector, models/voxtral.py), and Pixtral's vision encoder (`vision_encoder`:
Pixtral-12B-2409, Mistral Small 3.1+; models/pixtral_params.py, its images through
mistral_common's encoding: engine/mistral_images.py); another multimodal block, experts,
latent attention, Llama 4 query scaling or quantization is refused at start-up rather
than loaded wrongly. A repo in
both formats whose params.json has Voxtral's audio encoder is served from its HF files when
config_format and load_format are "auto" (the tested path; the weights are the same).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open

from loraplex.models import pixtral_params
from loraplex.models.voxtral import config_from_params, hf_audio_name

logger = logging.getLogger(__name__)

PARAMS = "params.json"
_CONSOLIDATED = "consolidated*.safetensors"
FORMATS = ("auto", "hf", "mistral")

# params.json key -> HF config key (vLLM's _remap_general_mistral_args)
_RENAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "head_dim": "head_dim",
            "hidden_dim": "intermediate_size", "n_heads": "num_attention_heads",
            "n_kv_heads": "num_key_value_heads", "norm_eps": "rms_norm_eps",
            "vocab_size": "vocab_size", "rope_theta": "rope_theta",
            "tied_embeddings": "tie_word_embeddings", "activation": "hidden_act"}
# read elsewhere in this file, or mistral-inference's own (no bearing on the weights)
_KNOWN = {*_RENAMES, "max_seq_len", "max_position_embeddings", "sliding_window", "yarn",
          "model_type", "dtype", "max_batch_size", "lora"}
# what this loader does not serve, and why
_UNSUPPORTED = {
    "vision_encoder": "a vision encoder beside another multimodal block",
    "multimodal": "a multimodal encoder other than Voxtral's audio one or Pixtral's vision one",
    "moe": "a mixture of experts (Mixtral / Mistral Large 3 in Mistral's format: serve the "
           "HF-format checkpoint)",
    "quantization": "quantized weights",
    "qk_nope_head_dim": "multi-head latent attention",
    "kv_lora_rank": "multi-head latent attention",
    "llama_4_scaling": "Llama 4 query scaling (Ministral 3: serve the HF-format checkpoint)",
}


@dataclass(frozen=True)
class MistralFormat:
    """Which parts of the base come in Mistral's format: its config (params.json) and
    its weights (consolidated*.safetensors)."""

    config: bool = False
    weights: bool = False

    @classmethod
    def resolve(cls, path: str, config_format: str, load_format: str) -> MistralFormat:
        """vLLM's rule for "auto": params.json beside consolidated*.safetensors is
        Mistral's config; consolidated*.safetensors are Mistral's weights."""
        if config_format not in FORMATS:
            raise ValueError(f"config_format={config_format!r}: use one of "
                             + ", ".join(FORMATS))
        consolidated = has_consolidated(path)
        if config_format == "auto" and load_format == "auto" and _hf_beside_audio(path):
            logger.info("%s: params.json describes an audio encoder (Voxtral), which Mistral's "
                        "format is not served with: loading the HF-format files beside it", path)
            return cls()
        config = config_format == "mistral" or (config_format == "auto" and consolidated
                                                and os.path.isfile(os.path.join(path, PARAMS)))
        weights = load_format == "mistral" or (load_format == "auto" and consolidated)
        if weights and not consolidated:
            raise ValueError(f"load_format='mistral': no {_CONSOLIDATED} in {path}")
        return cls(config, weights)


def _hf_beside_audio(path: str) -> bool:
    """A repo in both formats (Voxtral's) whose params.json has an audio encoder: its HF
    files (config.json, model*.safetensors: models/voxtral.py) serve it."""
    file = os.path.join(path, PARAMS)
    if not (os.path.isfile(file) and os.path.isfile(os.path.join(path, "config.json"))
            and glob.glob(os.path.join(path, "model*.safetensors"))):
        return False
    with open(file) as f:
        params = json.load(f)
    return isinstance(params, dict) and is_voxtral_params(params)


def has_consolidated(path: str) -> bool:
    return bool(glob.glob(os.path.join(path, _CONSOLIDATED)))


def read_params(path: str) -> dict[str, Any]:
    file = os.path.join(path, PARAMS)
    if not os.path.isfile(file):
        raise ValueError(f"config_format='mistral' reads {PARAMS}, which {path} does not "
                         "have (an HF-format checkpoint: leave config_format 'auto' or 'hf')")
    with open(file) as f:
        params = json.load(f)
    if not isinstance(params, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return params


def mistral_config(path: str) -> Any:
    """params.json as the HF MistralConfig transformers would build from the HF
    conversion (config.json's fields the params lack, such as max_position_embeddings,
    come from a config.json beside it, as vLLM's fallback does)."""
    from transformers import MistralConfig

    params = read_params(path)
    audio = is_voxtral_params(params)
    vision = pixtral_params.is_vision_params(params)  # (its block: vision_encoder or multimodal)
    _refuse_unsupported({k: v for k, v in params.items() if not (
        (audio and k == "multimodal") or (vision and k in ("multimodal", "vision_encoder")))},
        path)
    fields: dict[str, Any] = {hf: params[key] for key, hf in _RENAMES.items()
                              if params.get(key) is not None}
    fields.setdefault("num_key_value_heads", fields.get("num_attention_heads"))
    fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    fields.setdefault("rope_theta", 10000.0)  # mistral-inference's default base
    fields["max_position_embeddings"] = _max_position(params, path)
    fields.update(_sliding_window(params.get("sliding_window"), fields["num_hidden_layers"]))
    rope = {"rope_type": "default", "rope_theta": float(fields.pop("rope_theta"))}
    if params.get("yarn"):
        rope = _yarn(params["yarn"], rope["rope_theta"])
    dtype = params.get("dtype") or _weights_dtype(path)
    config = MistralConfig(**fields, rope_parameters=rope, bos_token_id=1, eos_token_id=2,
                           **({"dtype": dtype} if dtype else {}))
    config.architectures = ["MistralForCausalLM"]
    if vision:
        return pixtral_params.config_from_params(params, config)
    return config_from_params(params, config) if audio else config


def is_voxtral_params(params: dict[str, Any]) -> bool:
    """params.json's multimodal block is Voxtral's audio encoder alone (models/voxtral.py)."""
    multimodal = params.get("multimodal")
    return isinstance(multimodal, dict) and set(multimodal) == {"whisper_model_args"}


def _refuse_unsupported(params: dict[str, Any], path: str) -> None:
    for key, what in _UNSUPPORTED.items():
        if params.get(key):
            raise ValueError(f"{os.path.join(path, PARAMS)} describes {what}: not supported "
                             "with config_format='mistral' (text models only)")
    if params.get("model_type", "transformer") != "transformer":
        raise ValueError(f"{os.path.join(path, PARAMS)}: model_type "
                         f"{params['model_type']!r} is not supported (a transformer only)")
    missing = [k for k in ("dim", "n_layers", "hidden_dim", "n_heads", "vocab_size", "norm_eps")
               if params.get(k) is None]
    if missing:
        raise ValueError(f"{os.path.join(path, PARAMS)} lacks {', '.join(missing)}")
    if params.get("lora"):
        raise ValueError(f"{os.path.join(path, PARAMS)} has LoRA settings of mistral-inference "
                         "(a fine-tune's): serve its merged consolidated weights")
    unknown = sorted(k for k in params if k not in _KNOWN and params[k] not in (None, False))
    if unknown:
        logger.warning("%s: ignoring %s (not read by loraplex)", os.path.join(path, PARAMS),
                       ", ".join(unknown))


def _max_position(params: dict[str, Any], path: str) -> int:
    """params' max_position_embeddings, else config.json's (vLLM's fallback), else
    max_seq_len, else vLLM's default of 128k."""
    if params.get("max_position_embeddings"):
        return int(params["max_position_embeddings"])
    hf_file = os.path.join(path, "config.json")
    if os.path.isfile(hf_file):
        with open(hf_file) as f:
            value = json.load(f).get("max_position_embeddings")
        if value:
            return int(value)
    return int(params.get("max_seq_len") or 128_000)


def _sliding_window(window: Any, num_layers: int) -> dict[str, Any]:
    """An int: every layer's window; a list: the pattern of windows (None: a global layer)
    repeated over the layers, as HF's layer_types says it (vLLM's remapping)."""
    if not window:
        return {"sliding_window": None}
    if isinstance(window, int):
        return {"sliding_window": window}
    if not isinstance(window, list) or num_layers % len(window) or \
            len({w for w in window if w is not None}) > 1:
        raise ValueError(f"{PARAMS}: sliding_window {window!r} is not supported (an int, or "
                         "a list of one window and nulls that divides the layers)")
    pattern = window * (num_layers // len(window))
    return {"sliding_window": next(w for w in window if w is not None),
            "layer_types": ["full_attention" if w is None else "sliding_attention"
                            for w in pattern]}


def _yarn(yarn: dict[str, Any], theta: float) -> dict[str, Any]:
    """params.json's yarn block as HF's rope_parameters (vLLM's _remap_mistral_yarn_args:
    beta -> beta_fast, alpha -> beta_slow; apply_scale false -> attention_factor 1)."""
    known = {"factor", "original_max_position_embeddings", "beta", "alpha", "apply_scale"}
    if set(yarn) - known:
        raise ValueError(f"{PARAMS}: yarn keys {sorted(set(yarn) - known)} are not supported")
    rope: dict[str, Any] = {"rope_type": "yarn", "rope_theta": theta, "mscale_all_dim": 1}
    for ours, (theirs, cast) in {"factor": ("factor", float),
                                 "original_max_position_embeddings": (
                                     "original_max_position_embeddings", int),
                                 "beta": ("beta_fast", float),
                                 "alpha": ("beta_slow", float)}.items():
        if ours in yarn:
            rope[theirs] = cast(yarn[ours])
    if not yarn.get("apply_scale", True):
        rope["attention_factor"] = 1.0
    return rope


def _files(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(path, _CONSOLIDATED)))


_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _weights_dtype(path: str) -> str | None:
    """The first consolidated tensor's dtype (params.json rarely says one)."""
    for file in _files(path):
        with safe_open(file, framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                return _DTYPES.get(st.get_slice(name).get_dtype())
    return None


# consolidated name -> HF name, per layer and for the rest
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_LAYER_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
                "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
                "ffn_norm": "post_attention_layernorm"}
_TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm",
              "output": "lm_head"}


def hf_name(name: str) -> str:
    """A consolidated tensor's HF name; any other name as it is (the loader then warns
    that it ignores it)."""
    module, _, param = name.rpartition(".")
    if (m := _LAYER.fullmatch(module)) is not None and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{param}"
    if module in _TOP_NAMES:
        return f"{_TOP_NAMES[module]}.{param}"
    return name


def to_half_split(w: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """q / k rows from Mistral's interleaved rotary order to HF's half-split one: per
    head, rows (0, 1, 2, 3, ...) = pairs (x0, y0, x1, y1, ...) become (x0, x1, ..., y0,
    y1, ...). w: [num_heads * head_dim, in]."""
    return (w.reshape(num_heads, head_dim // 2, 2, w.shape[-1]).transpose(1, 2)
            .reshape(num_heads * head_dim, w.shape[-1]))


def iterate_mistral_weights(path: str, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """consolidated*.safetensors' tensors under HF's names, q / k permuted (a vision
    encoder's too: models/pixtral_params.py)."""
    params = read_params(path) if os.path.isfile(os.path.join(path, PARAMS)) else {}
    heads = {"wq": hf_config.num_attention_heads, "wk": hf_config.num_key_value_heads}
    head_dim = getattr(hf_config, "head_dim", None) or \
        hf_config.hidden_size // hf_config.num_attention_heads
    for file in _files(path):
        with safe_open(file, framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensor = st.get_tensor(name)
                if (vision := pixtral_params.vision_tensor(name, tensor, params)) is not None:
                    yield vision
                    continue
                leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
                if leaf in heads and name.endswith(".weight") and name.startswith("layers."):
                    tensor = to_half_split(tensor, heads[leaf], head_dim)
                yield hf_audio_name(name) or hf_name(name), tensor
