"""A tiny random LLaVA-NeXT (LlavaNextForConditionalGeneration: CLIP tower, projector,
`image_newline`, Llama) with anyres grid pinpoints small enough that wide, tall and
square pictures get different tile layouts, its processor, PEFT adapters on it, and HF
transformers (+ PEFT) as the reference: the ground truth of tests/test_llava_next.py."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.fixtures import _reinit_
from tests.llava_fixtures import IMAGE_TOKEN, PATCH, tiny_parts

TILE = 28  # the tower's image size (tiny_parts'): 4 x 4 patches a tile
# (height, width): 1 x 2, 2 x 1, 2 x 2, 1 x 3 and 3 x 1 tiles
PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]


def make_tiny_llava_next(out: Path, seed: int) -> Path:
    """Tokenizer with `<image>`, a 3-layer CLIP tower read at layer -2 ("default": no CLS),
    a Llama language model, every weight (image_newline too) drawn with std 0.2, saved
    with HF's LlavaNextProcessor."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok, text, vision = tiny_parts(out)
    cfg = LlavaNextConfig(text_config=text, vision_config=vision,
                          image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          image_grid_pinpoints=PINPOINTS, image_seq_length=16)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    _reinit_(model, seed, 0.2)
    model.save_pretrained(str(out))
    images = LlavaNextImageProcessor(size={"shortest_edge": TILE},
                                     crop_size={"height": TILE, "width": TILE},
                                     image_grid_pinpoints=PINPOINTS)
    LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH,
                       vision_feature_select_strategy="default",
                       num_additional_image_tokens=1,
                       image_token=IMAGE_TOKEN).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
