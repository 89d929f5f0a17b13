"""InternVL's original remote-code layout (`InternVLChatModel`, model_type "internvl_chat":
OpenGVLab/InternVL3-1B and the like, without "-hf"), served as the "-hf" model it converts
to (models/internvl.py), as vLLM serves it without running its code: config.json's
`llm_config` / `vision_config` and settings become transformers' InternVLConfig at load
time (`chat_config`), and the weights' names the "-hf" ones (`hf_vision_names`: transformers'
convert_internvl_weights_to_hf.py mapping; the tower's fused `attn.qkv` split into q / k /
v). The language model's `language_model.model.*` / `language_model.lm_head.*` are already
names the "-hf" hub files use (and what PEFT adapters trained on the remote model name).

The settings: `force_image_size` (else the tower's image_size) the tile side,
`min_dynamic_patch` / `max_dynamic_patch` the tiles an image may take (GotOcr2's
min_patches / max_patches: the same tiling as the remote code's dynamic_preprocess, a
thumbnail after more than one tile), `dynamic_image_size` false: one tile an image,
`downsample_ratio`, `select_layer` (vision_feature_layer), `ps_version` "v2" (HF's pixel
shuffle; "v1" refused), `template` (the chat template is the tokenizer's), the
`<IMG_CONTEXT>` token's id from the tokenizer. The image processor is GotOcr2's built from
these with ImageNet's mean and std, the remote code's (`image_processor_settings`).
Language models: Qwen2, Qwen3 and Llama (InternLM2's fused `wqkv` refused).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LANGUAGE_MODELS = ("qwen2", "qwen3", "llama")
# the remote vision config's keys under transformers' names; keys it has none for dropped
VISION_RENAMES = {"qk_normalization": "use_qk_norm", "qkv_bias": "attention_bias"}
VISION_DROPPED = ("architectures", "auto_map", "use_flash_attn", "drop_path_rate",
                  "_name_or_path", "model_type", "transformers_version", "torch_dtype")
# transformers' convert_internvl_weights_to_hf.py mapping, in its order
HF_NAMES = ((r"^vision_model\.", "vision_tower."), (r"\.layers\.", ".layer."),
            (r"class_embedding", "cls_token"), (r"position_embedding", "position_embeddings"),
            (r"patch_embedding", "patch_embeddings.projection"), (r"\.ls(\d+)", r".lambda_\1"),
            (r"attn\.proj", "attention.projection_layer"), (r"\.attn\.", ".attention."),
            (r"norm1", "layernorm_before"), (r"norm2", "layernorm_after"),
            (r"^mlp1\.0\.", "multi_modal_projector.layer_norm."),
            (r"^mlp1\.1\.", "multi_modal_projector.linear_1."),
            (r"^mlp1\.3\.", "multi_modal_projector.linear_2."))


def read_config(path: str) -> dict[str, Any] | None:
    """config.json of an InternVLChatModel checkpoint at `path`; None for any other."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        config = json.load(f)
    archs = config.get("architectures") or []
    return config if "InternVLChatModel" in archs or \
        config.get("model_type") == "internvl_chat" else None


def chat_config(path: str) -> Any | None:
    """transformers' InternVLConfig ("-hf") for the InternVLChatModel checkpoint at
    `path`; None for any other checkpoint."""
    raw = read_config(path)
    if raw is None:
        return None
    from transformers import AutoTokenizer, InternVLConfig

    llm = dict(raw["llm_config"])
    if llm.get("model_type") not in LANGUAGE_MODELS:
        raise ValueError(f"InternVLChatModel over a {llm.get('model_type')!r} language model "
                         f"is not supported (only {', '.join(LANGUAGE_MODELS)})")
    if raw.get("ps_version", "v1") != "v2":
        raise ValueError(f"InternVLChatModel's ps_version {raw.get('ps_version', 'v1')!r} is "
                         "not supported (only 'v2', HF's pixel shuffle)")
    if not raw.get("use_thumbnail", False) and raw.get("dynamic_image_size", False):
        raise ValueError("InternVLChatModel without use_thumbnail is not supported")
    vision = {VISION_RENAMES.get(k, k): v for k, v in raw["vision_config"].items()
              if k not in VISION_DROPPED}
    side = raw.get("force_image_size") or vision["image_size"]
    vision.update(image_size=side, use_absolute_position_embeddings=True,
                  use_mean_pooling=True)  # (no final norm: the remote tower has none)
    tokenizer = AutoTokenizer.from_pretrained(path)
    context = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    if context is None or context == tokenizer.unk_token_id:
        raise ValueError(f"{path}: the tokenizer has no <IMG_CONTEXT> token")
    ratio = float(raw.get("downsample_ratio", 0.5))
    per_tile = int((side // vision["patch_size"]) ** 2 * ratio ** 2)
    llm.pop("architectures", None)
    config = InternVLConfig(
        text_config=llm, vision_config=vision, image_token_id=context,
        downsample_ratio=ratio, vision_feature_layer=int(raw.get("select_layer", -1)),
        image_seq_length=per_tile,
        tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)))
    config.architectures = ["InternVLForConditionalGeneration"]
    return config


def image_processor_settings(path: str) -> dict[str, Any] | None:
    """The GotOcr2 image processor settings an InternVLChatModel checkpoint's tiling gives
    (and whether it crops to patches); None for any other checkpoint."""
    raw = read_config(path)
    if raw is None:
        return None
    side = raw.get("force_image_size") or raw["vision_config"]["image_size"]
    return {"size": {"height": side, "width": side}, "crop_to_patches": False,
            "min_patches": int(raw.get("min_dynamic_patch", 1)),
            "max_patches": int(raw.get("max_dynamic_patch", 12)),
            "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
            "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
            "resample": 3, "tiles": bool(raw.get("dynamic_image_size", True))}


def hf_vision_names(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A remote checkpoint's tower / projector tensor under its "-hf" name(s) (the fused
    `attn.qkv` as q_proj, k_proj, v_proj: its rows in thirds); any other tensor as it
    is."""
    if not name.startswith(("vision_model.", "mlp1.")):
        return [(name, tensor)]
    for pattern, new in HF_NAMES:
        name = re.sub(pattern, new, name)
    if ".attention.qkv." not in name:
        return [(name, tensor)]
    return [(name.replace(".qkv.", f".{p}_proj."), part)
            for p, part in zip("qkv", tensor.chunk(3, dim=0), strict=True)]
