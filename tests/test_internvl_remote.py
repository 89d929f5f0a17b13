"""InternVL's original remote-code layout (`InternVLChatModel`): a tiny "-hf" checkpoint
written back into it (config.json's `llm_config` / `vision_config` / tiling settings,
`vision_model.*` with the fused `attn.qkv`, `mlp1.*`, `language_model.*`; the tokenizer
without the "-hf" names of its image tokens; no image processor files) is served as the
"-hf" model, checked against HF's InternVLForConditionalGeneration (+ PEFT) on the
original "-hf" weights, fp32: prompt ids, greedy tokens and logprobs within 1e-4 for
images and text under the base and an adapter trained on the remote model (its
`language_model.model.*` module names) in one batch; settings it cannot serve refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex import LoRARequest
from tests.engine_utils import make_llm
from tests.internvl_fixtures import (
    ASK,
    GREEDY,
    PATCH,
    SEQ,
    TILE,
    check,
    make_tiny_internvl,
    tokenizer,
    with_adapters,
)
from tests.llava_fixtures import image

pytest.importorskip("PIL")

TEXT = "USER: What is the capital of France? ASSISTANT:"
# "-hf" names (the hub's or transformers 5's) -> the remote code's (transformers'
# conversion, reversed)
REMOTE_NAMES = ((r"^(model\.)?vision_tower\.", "vision_model."), (r"\.layer\.", ".layers."),
                (r"cls_token", "class_embedding"),
                (r"position_embeddings", "position_embedding"),
                (r"patch_embeddings\.projection", "patch_embedding"),
                (r"\.lambda_(\d)", r".ls\1"), (r"attention\.projection_layer", "attn.proj"),
                (r"\.attention\.", ".attn."), (r"layernorm_before", "norm1"),
                (r"layernorm_after", "norm2"),
                (r"^(model\.)?multi_modal_projector\.layer_norm\.", "mlp1.0."),
                (r"^(model\.)?multi_modal_projector\.linear_1\.", "mlp1.1."),
                (r"^(model\.)?multi_modal_projector\.linear_2\.", "mlp1.3."),
                (r"^model\.language_model\.", "language_model.model."),
                (r"^lm_head\.", "language_model.lm_head."))


def remote_name(name: str) -> str:
    for pattern, new in REMOTE_NAMES:
        name = re.sub(pattern, new, name)
    return name


def write_remote(hf: Path, out: Path) -> Path:
    """The "-hf" checkpoint `hf` in the remote-code layout at `out`."""
    out.mkdir(parents=True)
    for f in ("tokenizer.json", "special_tokens_map.json"):
        if (hf / f).exists():
            shutil.copy(hf / f, out / f)
    tok_config = json.loads((hf / "tokenizer_config.json").read_text())
    tok_config.pop("extra_special_tokens", None)  # the originals: plain added tokens
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config))
    cfg = json.loads((hf / "config.json").read_text())
    vision = {k: v for k, v in cfg["vision_config"].items()
              if k not in ("use_qk_norm", "attention_bias", "use_mean_pooling",
                           "use_absolute_position_embeddings", "model_type")}
    vision.update(qk_normalization=cfg["vision_config"]["use_qk_norm"],
                  qkv_bias=cfg["vision_config"]["attention_bias"],
                  model_type="intern_vit_6b", architectures=["InternVisionModel"],
                  use_flash_attn=False, drop_path_rate=0.0, image_size=TILE,
                  patch_size=PATCH)
    llm = {**cfg["text_config"], "architectures": ["Qwen2ForCausalLM"]}
    (out / "config.json").write_text(json.dumps({
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "llm_config": llm, "vision_config": vision, "downsample_ratio": 0.5,
        "dynamic_image_size": True, "force_image_size": TILE, "max_dynamic_patch": 6,
        "min_dynamic_patch": 1, "ps_version": "v2", "select_layer": -1,
        "template": "internvl2_5", "use_thumbnail": True}))
    tensors = load_file(str(hf / "model.safetensors"))
    remote: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith("mask_token"):
            continue  # (the -hf tower's, unused)
        name = remote_name(name)
        if ".attn.q_proj." in name:
            parts = [tensors[next(k for k in tensors if remote_name(k) == name.replace(
                ".q_proj.", f".{p}_proj."))] for p in "qkv"]
            remote[name.replace(".q_proj.", ".qkv.")] = torch.cat(parts)
        elif ".attn.k_proj." not in name and ".attn.v_proj." not in name:
            remote[name] = t
    save_file(remote, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def remote_adapter(hf_adapter: Path, out: Path) -> Path:
    """A PEFT adapter as PEFT saves it on the remote model: its modules under
    `language_model.model.layers.*`."""
    shutil.copytree(hf_adapter, out)
    path = out / "adapter_model.safetensors"
    tensors = load_file(str(path))
    renamed = {k.replace("base_model.model.model.language_model.",
                         "base_model.model.language_model.model."): v
               for k, v in tensors.items()}
    assert renamed != tensors
    save_file(renamed, str(path), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def remote(tiny_root):
    """A Qwen2 "-hf" InternVL without a final tower norm, its r8 adapter, and both in
    the remote layout."""
    root = tiny_root / "internvl_remote"
    paths = with_adapters(make_tiny_internvl(root / "base", seed=88, final_norm=False),
                          seed=89)
    return {**paths, "remote": write_remote(paths["base"], root / "chat"),
            "remote_r8": remote_adapter(paths["r8"], root / "chat_r8")}


def test_remote_layout_matches_hf(remote):
    """The remote checkpoint serves as its "-hf" self: a wide image (3 tiles and a
    thumbnail) under the base and the remote adapter, two images, and text, in one batch:
    HF's prompt ids, tokens and logprobs; the adapter changes the output."""
    llm = make_llm(remote["remote"], enable_lora=True, max_lora_rank=8)
    r8 = LoRARequest("r8", 1, str(remote["remote_r8"]))
    a, wide = image(1, (16, 16)), image(2, (50, 20))
    two = "USER: <IMG_CONTEXT> and <IMG_CONTEXT>: which is brighter? ASSISTANT:"
    jobs = [(ASK, [wide], None), (ASK, [wide], r8), (two, [wide, a], r8), (TEXT, [], None)]
    outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": ims}} if ims else p
                         for p, ims, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[lr for *_, lr in jobs])
    check(outs, remote["base"], [(p, ims, remote["r8"] if lr else None)
                                 for p, ims, lr in jobs])
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids
    tok = tokenizer(str(remote["remote"]))
    assert outs[0].prompt_token_ids.count(tok.convert_tokens_to_ids("<IMG_CONTEXT>")) == \
        4 * SEQ


def test_remote_config(remote):
    """chat_config: the "-hf" config the conversion writes (tiles, layer, ratio, the
    `<IMG_CONTEXT>` id from the tokenizer); a "-hf" checkpoint is none of its business."""
    from loraplex.models.internvl_chat import chat_config

    config = chat_config(str(remote["remote"]))
    assert config.architectures == ["InternVLForConditionalGeneration"]
    assert config.image_seq_length == (TILE // PATCH // 2) ** 2 == SEQ
    assert config.vision_config.use_mean_pooling and config.vision_config.use_qk_norm
    assert config.image_token_id == tokenizer(str(remote["base"])).convert_tokens_to_ids(
        "<IMG_CONTEXT>")
    assert chat_config(str(remote["base"])) is None


@pytest.mark.parametrize(("change", "match"), [
    ({"ps_version": "v1"}, "ps_version 'v1' is not supported"),
    ({"llm_config": {"model_type": "internlm2"}}, "'internlm2' language model"),
    ({"use_thumbnail": False}, "without use_thumbnail")])
def test_remote_settings_refused(remote, tmp_path, change, match):
    """A remote checkpoint loraplex cannot serve as its "-hf" self fails at start-up."""
    base = Path(shutil.copytree(remote["remote"], tmp_path / "bad"))
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=match):
        make_llm(base)


@pytest.mark.parametrize(("change", "layer", "tiles"), [
    ({"select_layer": -2, "max_dynamic_patch": 2}, -2, 3),
    ({"dynamic_image_size": False}, -1, 1)])
def test_remote_settings_taken(remote, tmp_path, change, layer, tiles):
    """select_layer is the vision_feature_layer; max_dynamic_patch bounds an image's tiles
    (a 50 x 20 image: 2 and the thumbnail), dynamic_image_size false gives one tile."""
    from loraplex.engine.images import vision_config
    from loraplex.engine.internvl_images import InternVLImageProcessor
    from loraplex.models.internvl_chat import chat_config

    base = Path(shutil.copytree(remote["remote"], tmp_path / "set"))
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, **change}))
    config = chat_config(str(base))
    assert config.vision_feature_layer == layer
    proc = InternVLImageProcessor(str(base), vision_config(config), tokenizer(str(base)))
    assert proc.config.tiles((20, 50)) == tiles
