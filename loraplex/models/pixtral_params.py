"""Mistral's own format with a vision encoder (Pixtral-12B-2409, Mistral Small 3.1+):
params.json's `vision_encoder` block (or `multimodal.vision_encoder_args`) as the HF
config its conversion gives, and consolidated.safetensors' vision tensors under HF's
names, as transformers' convert_pixtral / convert_mistral3 scripts map them.

Two layouts, by the block's projector: none (Pixtral-12B: `vision_language_adapter.*`
after the tower, one `[IMG]` per patch) is HF's `LlavaForConditionalGeneration` with a
`pixtral` vision config; `mm_projector_id` "patch_merge" with
`add_pre_mm_projector_layer_norm` (Mistral Small 3.1+: `pre_mm_projector_norm.*`,
`patch_merger.*`) is `Mistral3ForConditionalGeneration`. Both then load into
models/pixtral.py's tower and projector. As for the language model, Mistral keeps each
vision head's q / k rows in the interleaved rotary order, and HF's (and so ours) half-split
one: they are permuted on load (models/mistral_format.py's to_half_split).
"""

from __future__ import annotations

import re
from typing import Any

import torch

VISION_NORM_EPS = 1e-5  # mistral-inference's pre_mm_projector_norm
PATCH_MERGE = "patch_merge"
# the vision block's keys this module reads; another set is refused (not guessed at)
_KNOWN = {"hidden_size", "num_channels", "image_size", "max_image_size", "patch_size",
          "rope_theta", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "image_token_id", "image_break_token_id", "image_end_token_id", "adapter_bias",
          "spatial_merge_size", "add_pre_mm_projector_layer_norm", "mm_projector_id"}
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "patch_size")


def vision_block(params: dict[str, Any]) -> dict[str, Any] | None:
    """params.json's vision encoder settings (vLLM reads both places); None without."""
    multimodal = params.get("multimodal")
    if isinstance(multimodal, dict) and multimodal.get("vision_encoder_args"):
        return multimodal["vision_encoder_args"]
    return params.get("vision_encoder") or None


def is_vision_params(params: dict[str, Any]) -> bool:
    """params.json describes a vision encoder alone besides the language model."""
    multimodal = params.get("multimodal")
    return vision_block(params) is not None and (
        not isinstance(multimodal, dict) or set(multimodal) <= {"vision_encoder_args"})


def config_from_params(params: dict[str, Any], text: Any) -> Any:
    """The vision block as the HF config over `text` (models/mistral_format.py's config of
    the language model): LLaVA's with a Pixtral tower, or Mistral 3's."""
    from transformers import LlavaConfig, Mistral3Config

    v = dict(vision_block(params) or {})
    unknown = sorted(set(v) - _KNOWN)
    if unknown:
        raise ValueError(f"params.json's vision encoder has {', '.join(unknown)}, which "
                         "loraplex does not read")
    missing = [k for k in _REQUIRED if v.get(k) is None]
    if missing:
        raise ValueError(f"params.json's vision encoder lacks {', '.join(missing)}")
    merge, norm = v.get("mm_projector_id") == PATCH_MERGE, \
        bool(v.get("add_pre_mm_projector_layer_norm"))
    if v.get("mm_projector_id") not in (None, "", PATCH_MERGE) or merge != norm:
        raise ValueError("params.json's vision encoder: a projector with "
                         f"mm_projector_id={v.get('mm_projector_id')!r} and "
                         f"add_pre_mm_projector_layer_norm={norm} is not supported (none, "
                         "Pixtral-12B's; or both patch_merge and the norm, Mistral Small 3.1's)")
    if not merge and v.get("spatial_merge_size", 1) != 1:
        raise ValueError("params.json's vision encoder: spatial_merge_size without "
                         "mm_projector_id 'patch_merge'")
    if norm and float(text.rms_norm_eps) != VISION_NORM_EPS:  # HF's norm takes the text's
        raise ValueError(f"params.json: norm_eps {text.rms_norm_eps} differs from the vision "
                         f"projector norm's {VISION_NORM_EPS} (HF's Mistral 3 has one eps)")
    tower = {"model_type": "pixtral", "hidden_size": v["hidden_size"],
             "intermediate_size": v["intermediate_size"],
             "num_hidden_layers": v["num_hidden_layers"],
             "num_attention_heads": v["num_attention_heads"],
             "num_channels": v.get("num_channels", 3), "patch_size": v["patch_size"],
             "image_size": v.get("image_size") or v.get("max_image_size"),
             "head_dim": v["hidden_size"] // v["num_attention_heads"], "hidden_act": "silu",
             "rope_parameters": {"rope_type": "default",
                                 "rope_theta": float(v.get("rope_theta", 10000.0))},
             "rope_theta": float(v.get("rope_theta", 10000.0))}  # (transformers 4.x's)
    common = dict(vision_config=tower, text_config=text.to_dict(),
                  image_token_index=int(v.get("image_token_id", 10)),
                  projector_hidden_act="gelu", vision_feature_layer=-1,
                  multimodal_projector_bias=bool(v.get("adapter_bias", True)),
                  tie_word_embeddings=bool(text.tie_word_embeddings))
    if merge:
        config = Mistral3Config(**common, spatial_merge_size=int(v["spatial_merge_size"]))
        config.architectures = ["Mistral3ForConditionalGeneration"]
    else:
        config = LlavaConfig(**common, vision_feature_select_strategy="full")
        config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = getattr(text, "dtype", None)
    return config


# consolidated.safetensors' vision names -> HF's
_LAYER = r"vision_encoder\.transformer\.layers\.(\d+)\."
_VISION_NAMES = (
    (_LAYER + r"attention\.w([qkvo])\.", lambda m: f"vision_tower.transformer.layers.{m[1]}"
                                                   f".attention.{m[2]}_proj."),
    (_LAYER + r"feed_forward\.w([123])\.", lambda m: f"vision_tower.transformer.layers.{m[1]}"
                                                     ".feed_forward."
                                                     f"{_MLP[m[2]]}."),
    (_LAYER + r"(attention_norm|ffn_norm)\.", lambda m: f"vision_tower.transformer.layers."
                                                        f"{m[1]}.{m[2]}."),
    (r"vision_encoder\.(patch_conv|ln_pre)\.", lambda m: f"vision_tower.{m[1]}."),
    (r"vision_language_adapter\.w_in\.", lambda m: "multi_modal_projector.linear_1."),
    (r"vision_language_adapter\.w_out\.", lambda m: "multi_modal_projector.linear_2."),
    (r"patch_merger\.", lambda m: "multi_modal_projector.patch_merger."),
    (r"pre_mm_projector_norm\.", lambda m: "multi_modal_projector.norm."),
)
_MLP = {"1": "gate_proj", "2": "down_proj", "3": "up_proj"}


def hf_vision_name(name: str) -> str | None:
    """A consolidated vision tensor's HF name; None for any other tensor."""
    for pattern, new in _VISION_NAMES:
        if (m := re.match(pattern, name)) is not None:
            return new(m) + name[m.end():]
    return None


def vision_tensor(name: str, tensor: torch.Tensor, params: dict[str, Any]
                  ) -> tuple[str, torch.Tensor] | None:
    """(HF name, tensor) of a consolidated vision tensor, a q / k weight in HF's half-split
    rotary order (`params`: params.json's); None for any other tensor."""
    from loraplex.models.mistral_format import to_half_split

    hf = hf_vision_name(name)
    if hf is None:
        return None
    if re.search(r"\.attention\.w[qk]\.weight$", name):
        v = vision_block(params) or {}
        heads = v["num_attention_heads"]
        tensor = to_half_split(tensor, heads, v["hidden_size"] // heads)
    return hf, tensor
