"""Tiny random Pixtral checkpoints: Pixtral-12B's HF layout (`LlavaForConditionalGeneration`
with a `pixtral` vision config, LLaVA's projector, one `[IMG]` per 8 x 8 patch), and
both it and a Mistral 3 rewritten in Mistral's own format (params.json with its
`vision_encoder` block, consolidated.safetensors, a tekken.json whose image settings make
mistral_common encode images), by the inverse of the HF conversion's mapping.

The HF model stays the reference: the Mistral-format checkpoint's weights are its own
under Mistral's names, q / k rows of the language model and of the vision tower put back
in the interleaved rotary order.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.fixtures import TOKENIZER_VOCAB_SIZE, _reinit_, make_tokenizer
from tests.llava_fixtures import data_url
from tests.mistral3_fixtures import GREEDY, IMAGE_TOKENS
from tests.mistral_fixtures import to_interleaved, write_mistral_format
from tests.multimodal_fixtures import chat_token_ids, hf_logprobs
from tests.server_utils import RemoteServer

PATCH = 8  # Pixtral-12B's layout: a placeholder per 8 x 8 pixels
TEKKEN_IMAGE_TOKEN = 10  # mistral_common's [IMG] rank ([IMG_BREAK] 12, [IMG_END] 13)


def _text_config(vocab: int) -> dict:
    return dict(model_type="mistral", vocab_size=vocab, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1,
                eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
                sliding_window=None)


def _vision_config(patch: int) -> dict:
    return dict(model_type="pixtral", hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=patch,
                hidden_act="silu",
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def make_tiny_pixtral(out: Path, seed: int, mistral3: bool = False,
                      tekken: bool = False) -> Path:
    """A 2-layer Mistral behind a 2-layer Pixtral tower: LLaVA's (8-pixel patches, the
    projector with biases) or, `mistral3`, Mistral 3's (4-pixel patches merged 2 x 2);
    images up to 64 pixels a side; weights std 0.2. `tekken`: for the Mistral-format
    copy, the vocabulary and [IMG] id of tests/mistral_fixtures.py's tekken.json (no HF
    tokenizer or image processor saved); else the session's HF tokenizer with the image
    tokens and HF's PixtralImageProcessorPil."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        Mistral3Config,
        Mistral3ForConditionalGeneration,
    )

    out.mkdir(parents=True, exist_ok=True)
    if tekken:
        vocab, image_token, tok = TOKENIZER_VOCAB_SIZE, TEKKEN_IMAGE_TOKEN, None
    else:
        tok = make_tokenizer(out)
        tok.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
        vocab, image_token = len(tok), tok.convert_tokens_to_ids("[IMG]")
    patch = 4 if mistral3 else PATCH
    common = dict(text_config=_text_config(vocab), vision_config=_vision_config(patch),
                  image_token_index=image_token, projector_hidden_act="gelu",
                  vision_feature_layer=-1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    if mistral3:
        model = Mistral3ForConditionalGeneration(Mistral3Config(
            **common, spatial_merge_size=2, multimodal_projector_bias=False))
    else:
        model = LlavaForConditionalGeneration(LlavaConfig(
            **common, vision_feature_select_strategy="full", multimodal_projector_bias=True))
    model = model.eval()
    _reinit_(model, seed, 0.2)
    model.save_pretrained(str(out))
    if tok is not None:
        from transformers import PixtralImageProcessorPil

        PixtralImageProcessorPil(size={"longest_edge": 64},
                                 patch_size={"height": patch, "width": patch}
                                 ).save_pretrained(str(out))
        tok.save_pretrained(str(out))
    return out


# HF's names of the vision side -> Mistral's (the inverse of models/pixtral_params.py's)
_VISION = (
    (r"vision_tower\.transformer\.layers\.(\d+)\.attention\.([qkvo])_proj\.",
     r"vision_encoder.transformer.layers.\1.attention.w\2."),
    (r"vision_tower\.transformer\.layers\.(\d+)\.feed_forward\.gate_proj\.",
     r"vision_encoder.transformer.layers.\1.feed_forward.w1."),
    (r"vision_tower\.transformer\.layers\.(\d+)\.feed_forward\.down_proj\.",
     r"vision_encoder.transformer.layers.\1.feed_forward.w2."),
    (r"vision_tower\.transformer\.layers\.(\d+)\.feed_forward\.up_proj\.",
     r"vision_encoder.transformer.layers.\1.feed_forward.w3."),
    (r"vision_tower\.", "vision_encoder."),
    (r"multi_modal_projector\.linear_1\.", "vision_language_adapter.w_in."),
    (r"multi_modal_projector\.linear_2\.", "vision_language_adapter.w_out."),
    (r"multi_modal_projector\.patch_merger\.", "patch_merger."),
    (r"multi_modal_projector\.norm\.", "pre_mm_projector_norm."),
)


def _mistral_vision(name: str) -> str:
    for pattern, new in _VISION:
        if re.match(pattern, name):
            return re.sub(pattern, new, name, count=1)
    raise AssertionError(name)


def write_pixtral_mistral_format(hf_dir: Path, out: Path) -> Path:
    """`hf_dir` (a make_tiny_pixtral(tekken=True) model) in Mistral's format in `out`:
    the language model as tests/mistral_fixtures.py writes it, the vision side under
    Mistral's names (the tower's q / k interleaved), params.json's `vision_encoder`
    block, and tekken.json's `image` settings."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    tmp = out.parent / (out.name + "-text")  # the language model alone, as the text test
    tmp.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(hf_dir / "model.safetensors"))
    lm = {re.sub(r"^(model\.language_model\.|language_model\.model\.)", "model.", k)
          .replace("language_model.lm_head.", "lm_head."): v for k, v in tensors.items()
          if "language_model" in k or k.startswith("lm_head.")}
    save_file(lm, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(text))
    write_mistral_format(tmp, out)
    consolidated = load_file(str(out / "consolidated.safetensors"))
    heads = vision["num_attention_heads"]
    for name, t in tensors.items():
        if "language_model" in name or name.startswith("lm_head."):
            continue
        name = name.removeprefix("model.")
        if re.search(r"attention\.[qk]_proj\.weight$", name):
            t = to_interleaved(t, heads)
        consolidated[_mistral_vision(name)] = t.contiguous()
    save_file(consolidated, str(out / "consolidated.safetensors"))
    merge = cfg.get("spatial_merge_size", 1)
    block = {"hidden_size": vision["hidden_size"], "num_channels": 3, "image_size": 64,
             "max_image_size": 64, "patch_size": vision["patch_size"],
             "rope_theta": 10000.0, "intermediate_size": vision["intermediate_size"],
             "num_hidden_layers": vision["num_hidden_layers"],
             "num_attention_heads": heads, "image_token_id": cfg["image_token_index"],
             "image_break_token_id": 12, "image_end_token_id": 13,
             "adapter_bias": cfg["multimodal_projector_bias"]}
    if cfg["architectures"] == ["Mistral3ForConditionalGeneration"]:
        block.update(mm_projector_id="patch_merge", spatial_merge_size=merge,
                     add_pre_mm_projector_layer_norm=True)
    params = json.loads((out / "params.json").read_text())
    (out / "params.json").write_text(json.dumps({**params, "vision_encoder": block}))
    tekken = json.loads((out / "tekken.json").read_text())
    tekken["image"] = {"image_patch_size": vision["patch_size"], "max_image_size": 64,
                       "spatial_merge_size": merge}
    (out / "tekken.json").write_text(json.dumps(tekken))
    return out


def check_chat_server(served: Path, pixtral: dict[str, Path], picture: Any, text: str,
                      inputs: dict[str, torch.Tensor]) -> None:
    """The chat route of a server of `served` with an image_url part (`picture`) and
    `text`, under the base and the r8 adapter: HF's greedy tokens over `inputs` (HF's
    processed prompt); a bad image and a second image past the limit fail with a 400, the
    server carrying on. Both Pixtral layouts' test files check their server with it."""
    content = [{"type": "image_url", "image_url": {"url": data_url(picture)}},
               {"type": "text", "text": text}]
    args = ["--max-model-len", "256", "--dtype", "float32", "--enable-lora",
            "--max-lora-rank", "8", "--lora-modules", f"r8={pixtral['r8']}",
            "--limit-mm-per-prompt", '{"image": 1}']
    n = inputs["input_ids"].shape[1]
    with RemoteServer(served, args) as server:
        client = server.get_client()
        base = str(served)
        for model, adapter in ((base, None), ("r8", pixtral["r8"])):
            got = chat_token_ids(client, model, content, prompt_tokens=n)
            ref = hf_logprobs(pixtral["base"], adapter, inputs, got[:-1])
            assert got == ref[n - 1:].argmax(-1).tolist()
        for parts, match in (
                ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
                 "cannot decode the image"),
                ([*content, content[0]], "At most 1 image")):
            with pytest.raises(openai.BadRequestError) as info:
                chat_token_ids(client, base, parts)
            assert re.search(match, info.value.body["message"]), info.value.body
        assert len(chat_token_ids(client, base, content)) == GREEDY.max_tokens  # still serving
