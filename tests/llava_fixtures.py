"""A tiny random LLaVA (LlavaForConditionalGeneration: CLIP tower, MLP projector, Llama),
its processor, PEFT adapters on it, and HF transformers (+ PEFT) as the reference on
images (LLaVA's or LLaVA-NeXT's, tests/llava_next_fixtures.py): the ground truth of
tests/test_llava.py and tests/test_llava_next.py."""

from __future__ import annotations

import base64
import functools
import io
from pathlib import Path
from typing import Any

import torch

from loraplex import SamplingParams
from tests.fixtures import _reinit_, make_tokenizer
from tests.multimodal_fixtures import (  # noqa: F401 (some re-exported for the tests)
    assert_matches_reference,
    hf_multimodal,
    make_multimodal_adapter,
    with_adapters,
)

IMAGE_TOKEN = "<image>"
PATCH = 7  # 28 x 28 pixels in 4 x 4 patches: 16 placeholders an image ("default": no CLS)
# what the LLaVA tests ask: greedy with logprobs (held against HF's), one image
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
ASK = "USER: <image>\nWhat is this? ASSISTANT:"
TOKENS_PER_IMAGE = 16


def make_tiny_llava(out: Path, seed: int, feature_layer: int = -2,
                    strategy: str = "default") -> Path:
    """Tokenizer with `<image>` (the id after the 512 of tests/fixtures.py), a 3-layer CLIP
    tower read at `feature_layer`, a Llama language model; every weight drawn with std 0.2
    (so an image changes the output), saved with HF's LlavaProcessor."""
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok, text, vision = tiny_parts(out)
    image_token = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_index=image_token,
                      vision_feature_layer=feature_layer,
                      vision_feature_select_strategy=strategy, image_seq_length=16)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    _reinit_(model, seed, 0.2)
    model.save_pretrained(str(out))
    images = CLIPImageProcessor(size={"shortest_edge": 28},
                                crop_size={"height": 28, "width": 28})
    LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH,
                   vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
                   image_token=IMAGE_TOKEN).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def tiny_parts(out: Path) -> tuple[Any, Any, Any]:
    """What the tiny LLaVAs share: the tokenizer with `<image>` (saved in `out`), a 2-layer
    Llama config and a 3-layer CLIP tower config for 28-pixel images."""
    from transformers import CLIPVisionConfig, LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3,
                       tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=2, image_size=28, patch_size=PATCH)
    return tok, text, vision


@functools.lru_cache(maxsize=4)
def processor(base: str) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(base)


def hf_inputs(base: Path, prompt: str, images: list) -> dict[str, torch.Tensor]:
    """What HF's processor makes of a prompt and its images (placeholders expanded)."""
    return dict(processor(str(base))(text=prompt, images=images or None, return_tensors="pt"))


@torch.no_grad()
def hf_logprobs(base: Path, adapter: Path | None, ids: list[int],
                pixel_values: torch.Tensor | None, image_sizes: torch.Tensor | None = None
                ) -> torch.Tensor:
    """[len(ids), vocab] log-softmax of HF's LLaVA over `ids` with the images' pixels (and
    LLaVA-NeXT's image_sizes)."""
    model = hf_multimodal(str(base), None if adapter is None else str(adapter))
    kw = {"pixel_values": pixel_values} if pixel_values is not None else {}
    if image_sizes is not None:
        kw["image_sizes"] = image_sizes
    logits = model(input_ids=torch.tensor([ids]), **kw).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def check(outs, base: Path, jobs: list[tuple[str, list, Path | None]],
          add_special_tokens: bool = True) -> None:
    """Each output's prompt is HF's processor's, its tokens HF's greedy ones (a pick off
    HF's argmax only at a near-tie) and its logprobs HF's within 1e-4."""
    for out, (prompt, images, adapter) in zip(outs, jobs, strict=True):
        inp = dict(processor(str(base))(text=prompt, images=images or None,
                                        add_special_tokens=add_special_tokens,
                                        return_tensors="pt"))
        ids = inp["input_ids"][0].tolist()
        assert out.prompt_token_ids == ids
        got = out.outputs[0].token_ids
        ref = hf_logprobs(base, adapter, ids + got[:-1], inp.get("pixel_values"),
                          inp.get("image_sizes"))[len(ids) - 1:]
        assert_matches_reference(out, ref, adapter)


def image(seed: int, size: tuple[int, int] = (40, 32)) -> Any:
    """A random RGB picture (resized and cropped to 28 x 28 by the processor)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def data_url(img: Any) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
