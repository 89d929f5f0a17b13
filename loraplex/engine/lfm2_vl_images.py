"""LFM2-VL's images on their way into the engine: each image's tiles and thumbnail as HF's
Lfm2VlImageProcessor cuts them (engine/lfm2_vl_tiling.py), and each `<image>` of the prompt
expanded as Lfm2VlProcessor expands it (so the prompt ids are HF's):

    <|image_start|> [<|img_row_R_col_C|> <image> x per_tile] per tile, row by row
    [<|img_thumbnail|> <image> x thumbnail's] <|image_end|>

for a split image, `<|image_start|> <image> x its tokens <|image_end|>` for one that is not.
Only the `<image>` rows take embeddings (`ImageInputs.positions`); an image's range spans
from its first `<image>` to its last, the tile markers between them, for the prefix
cache's keys. `ImageInputs.pixel_values` holds every image's patches ([patches, patch
pixels]: images of any size stack across requests), `ImageInputs.sizes` each image's
layout (models/lfm2_vl.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from loraplex.engine.images import ImageInputs, load_images, placeholder_ranges
from loraplex.engine.lfm2_vl_tiling import OPTIONS, Lfm2VlTiling
from loraplex.engine.multimodal_processor import MultimodalProcessor
from loraplex.models.lfm2_vl import Lfm2VlLayout, Lfm2VlVisionConfig, tile_grids
from loraplex.models.llava import placeholder_runs

logger = logging.getLogger(__name__)

# Lfm2VlProcessor's defaults for the markers (a tokenizer may name its own)
MARKERS = {"image_start_token": "<|image_start|>", "image_end_token": "<|image_end|>",
           "image_thumbnail_token": "<|img_thumbnail|>"}


class Lfm2VlImageTokens:
    """Lfm2VlProcessor's expansion of each `<image>`, on token ids."""

    def __init__(self, tokenizer: Any, c: Lfm2VlVisionConfig) -> None:
        self.c = c
        self.tokenizer = tokenizer
        self.start, self.end, self.thumbnail = (
            self._id(getattr(tokenizer, key, None) or text) for key, text in MARKERS.items())

    def _id(self, text: str) -> int:
        token = self.tokenizer.convert_tokens_to_ids(text)
        if token is None or token == self.tokenizer.unk_token_id:
            raise ValueError(f"LFM2-VL images need the token {text!r}, which the tokenizer "
                             "lacks")
        return token

    def image(self, layout: Lfm2VlLayout) -> list[int]:
        """One image's expansion."""
        rows, cols, _, h, _ = layout
        f, img = self.c.factor, self.c.image_token_id
        grids = tile_grids(layout)
        out = [self.start]
        if rows * cols > 1:
            for i in range(rows * cols):
                gh, gw = grids[i]
                out += [self._id(f"<|img_row_{i // cols + 1}_col_{i % cols + 1}|>"),
                        *[img] * ((gh // f) * (gw // f))]
            if h:
                out.append(self.thumbnail)
        if h:
            gh, gw = grids[-1]
            out += [img] * ((gh // f) * (gw // f))
        return out + [self.end]

    def __call__(self, ids: list[int], layouts: list[Lfm2VlLayout]) -> list[int]:
        """Image i's one `<image>` becomes its expansion; a prompt already so expanded is
        kept as is."""
        img = self.c.image_token_id
        images = [self.image(layout) for layout in layouts]
        runs = placeholder_runs(ids, img)
        if runs != [1] * len(layouts):
            if sum(runs) == sum(x.count(img) for x in images) \
                    and _contains_in_order(ids, images):
                return list(ids)
            raise ValueError(f"the prompt has {sum(runs)} image placeholder token(s) (id "
                             f"{img}) for {len(layouts)} image(s): put one <image> where "
                             "each image goes")
        out: list[int] = []
        left = iter(images)
        for t in ids:
            out.extend(next(left) if t == img else [t])
        return out


def _contains_in_order(ids: list[int], parts: list[list[int]]) -> bool:
    """Each of `parts` occurs in `ids`, one after the other."""
    at = 0
    for part in parts:
        while at + len(part) <= len(ids) and ids[at:at + len(part)] != part:
            at += 1
        if at + len(part) > len(ids):
            return False
        at += len(part)
    return True


def _special_tokens(path: str) -> bool:
    """Lfm2VlProcessor's use_image_special_tokens as processor_config.json saves it
    (default true)."""
    saved = os.path.join(path, "processor_config.json")
    if not os.path.isfile(saved):
        return True
    with open(saved) as f:
        return bool(json.load(f).get("use_image_special_tokens", True))


class Lfm2VlImageProcessor(MultimodalProcessor):
    """LFM2-VL's tiling (ours, HF's rules) and Lfm2VlProcessor's expansion."""

    @classmethod
    def load(cls, path: str, config: Lfm2VlVisionConfig, tokenizer: Any
             ) -> Lfm2VlImageProcessor | None:
        """None for a checkpoint saved without its image processor's settings (served on
        text, images refused)."""
        try:
            return cls(path, config, tokenizer)
        except OSError:
            logger.warning("%s has no preprocessor_config.json (nor a processor_config.json "
                           "with an image_processor): serving its language model on text; "
                           "image inputs are refused", path)
            return None

    def __init__(self, path: str, config: Lfm2VlVisionConfig, tokenizer: Any = None) -> None:
        self.hf = Lfm2VlTiling.from_pretrained(path)
        if (self.hf.patch, self.hf.factor) != (config.patch_size, config.factor):
            raise ValueError(f"LFM2-VL's image processor cuts {self.hf.patch}-pixel patches "
                             f"folded {self.hf.factor} x {self.hf.factor}, its tower takes "
                             f"{config.patch_size} folded {config.factor}")
        if not _special_tokens(path):
            raise ValueError("LFM2-VL with use_image_special_tokens false is not supported "
                             "(each image between <|image_start|> and <|image_end|> is)")
        self.config = config
        self.placeholder = config.image_token_id
        self.tokens = Lfm2VlImageTokens(tokenizer, config)
        self.option_keys = tuple(OPTIONS)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        self.hf.with_options(options)

    def process(self, ids: list[int], data: Mapping[str, Any],
                options: Mapping[str, Any] | None = None) -> tuple[list[int], ImageInputs]:
        return self(ids, data["image"], options)

    def expanded(self, ids: list[int], data: Mapping[str, Any],
                 options: Mapping[str, Any] | None = None) -> list[int]:
        return self.expand(ids, data["image"], options)

    def __call__(self, ids: list[int], data: Any, options: Mapping[str, Any] | None = None
                 ) -> tuple[list[int], ImageInputs]:
        """The prompt with its placeholders expanded, and its images' inputs. `data`: one
        image or a list (PIL images or URLs); `options`: mm_processor_kwargs (OPTIONS)
        over the checkpoint's settings."""
        tiling = self.hf.with_options(options or {})
        images = [im.convert("RGB") for im in load_images(data)]
        layouts = [tiling.layout((im.height, im.width)) for im in images]
        ids = self.tokens(ids, layouts)  # before the pixels: a mismatch costs nothing
        patches = [tiling.pixels(im) for im in images]
        c = self.config
        positions = self.positions(ids)
        hashes = [hashlib.blake2b(p.numpy().tobytes() + repr(s).encode(),
                                  digest_size=16).digest() for p, s in zip(patches, layouts)]
        return ids, ImageInputs(torch.cat(patches), positions,
                                placeholder_ranges(positions, [c.tokens_for(s) for s in layouts]),
                                hashes, sizes=layouts)

    def expand(self, ids: list[int], items: Any,
               options: Mapping[str, Any] | None = None) -> list[int]:
        """The prompt expanded for these images, without their pixels: what /tokenize and
        usage count."""
        tiling = self.hf.with_options(options or {})
        return self.tokens(ids, [tiling.layout((im.height, im.width))
                                 for im in load_images(items)])

    def positions(self, ids: list[int]) -> list[int]:
        return [p for p, t in enumerate(ids) if t == self.config.image_token_id]

    def check(self, ids: list[int], inputs: ImageInputs) -> None:
        """Processed inputs given with a prompt (the server's) must be that prompt's."""
        c = self.config
        counts = [c.tokens_for(s) for s in inputs.sizes]
        if self.positions(ids) != inputs.positions or len(inputs.sizes) != len(inputs.ranges) \
                or sum(counts) != len(inputs.positions) \
                or placeholder_ranges(inputs.positions, counts) != inputs.ranges \
                or inputs.pixel_values.shape[0] != sum(c.patches(s) for s in inputs.sizes):
            raise ValueError("multi_modal_data: the processed image inputs do not match the "
                             "prompt's (expanded) image placeholders")
