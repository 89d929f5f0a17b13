"""Qwen2-VL's, Qwen2.5-VL's and Qwen3-VL's images (engine/images.py's ImageProcessor, for
these models; Qwen3-VL's processor, placeholders and image positions are Qwen2-VL's):
the checkpoint's HF image processor (Qwen2VLImageProcessor: smart_resize to multiples
of patch_size x merge_size, patches in merge-block order, `image_grid_thw`), the
prompt's `<|image_pad|>` expanded to grid_t x grid_h x grid_w / merge_size^2 tokens per
image as Qwen2VLProcessor expands it, and the prompt's M-RoPE positions
(models/mrope.py) computed once here, beside the pixels, for the model runner.

`ImageInputs.sizes` holds each image's patch grid (t, h, w) here, which is what the vision
tower (models/qwen2_vl.py) and the placeholder count read.
"""

from __future__ import annotations

import hashlib
from itertools import accumulate
from typing import Any

from loraplex.engine.images import ImageInputs, expand_placeholders, load_image
from loraplex.models.mrope import mrope_positions
from loraplex.models.qwen2_vl import QwenVisionConfig


class QwenImageProcessor:
    """The model's HF image processor plus Qwen2-VL's placeholder and position rules."""

    def __init__(self, path: str, config: QwenVisionConfig) -> None:
        from transformers import AutoImageProcessor

        self.config = config
        self.hf = AutoImageProcessor.from_pretrained(path)

    def _grids(self, images: list[Any]) -> list[tuple[int, int, int]]:
        """Each image's patch grid, as the HF processor will give it (its own smart_resize,
        without the pixels)."""
        import importlib

        hf, c = self.hf, self.config
        resize = importlib.import_module(type(hf).__module__).smart_resize
        size = getattr(hf, "size", None) or {}
        size = size if isinstance(size, dict) else vars(size)
        lo = size.get("shortest_edge") or getattr(hf, "min_pixels", None)
        hi = size.get("longest_edge") or getattr(hf, "max_pixels", None)
        grids = []
        for im in images:
            h, w = resize(im.height, im.width, factor=c.patch_size * c.merge_size,
                          min_pixels=lo, max_pixels=hi)
            grids.append((1, h // c.patch_size, w // c.patch_size))
        return grids

    def __call__(self, ids: list[int], data: Any) -> tuple[list[int], ImageInputs]:
        """The prompt with its placeholders expanded, and its images' inputs (with the
        prompt's M-RoPE positions). `data`: one image or a list (PIL images or URLs)."""
        images = [load_image(x) for x in (data if isinstance(data, list | tuple) else [data])]
        if not images:
            raise ValueError("multi_modal_data: 'image' holds no image")
        c = self.config
        grids = self._grids(images)
        counts = [c.tokens_for(g) for g in grids]
        # before the pixels: a mismatch costs nothing
        ids = expand_placeholders(ids, c.image_token_id, counts)
        out = self.hf(images=[im.convert("RGB") for im in images], return_tensors="pt")
        pixels = out["pixel_values"]
        if [tuple(int(x) for x in g) for g in out["image_grid_thw"].tolist()] != grids:
            raise ValueError(f"the image processor's grids {out['image_grid_thw'].tolist()} "
                             f"are not the {grids} its smart_resize gives")
        positions = self.positions(ids)
        firsts = [0, *accumulate(counts)][:-1]
        ranges = [(positions[f], n) for f, n in zip(firsts, counts, strict=True)]
        patches = pixels.float().split([t * h * w for t, h, w in grids])
        hashes = [hashlib.blake2b(p.contiguous().numpy().tobytes() + repr(g).encode(),
                                  digest_size=16).digest() for p, g in zip(patches, grids)]
        inputs = ImageInputs(pixels, positions, ranges, hashes, sizes=grids)
        inputs.mrope, inputs.mrope_delta = mrope_positions(ids, c.image_token_id, grids,
                                                           c.merge_size)
        return ids, inputs

    def expand(self, ids: list[int], images: list[Any]) -> list[int]:
        """The prompt with its placeholders expanded for these (PIL) images, without
        processing them: what /tokenize and usage count."""
        return expand_placeholders(ids, self.config.image_token_id,
                                   [self.config.tokens_for(g) for g in self._grids(images)])

    def positions(self, ids: list[int]) -> list[int]:
        return [p for p, t in enumerate(ids) if t == self.config.image_token_id]

    def check(self, ids: list[int], inputs: ImageInputs) -> None:
        """Processed inputs given with a prompt (the server's) must be that prompt's."""
        c = self.config
        if self.positions(ids) != inputs.positions or inputs.mrope is None \
                or inputs.mrope.shape[1] != len(ids) \
                or [n for _, n in inputs.ranges] != [c.tokens_for(g) for g in inputs.sizes] \
                or inputs.pixel_values.shape[0] != sum(t * h * w for t, h, w in inputs.sizes):
            raise ValueError("multi_modal_data: the processed image inputs do not match the "
                             "prompt's (expanded) image placeholders")
