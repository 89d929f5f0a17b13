"""Gemma 4's images on their way into the engine: HF's Gemma 4 image processor resizes
each image (aspect ratio kept) and cuts it into patches padded to max_soft_tokens x k^2
(models/gemma4_vision.py), and each <|image|> of the prompt becomes boi, the image's soft
tokens, eoi, as Gemma4Processor expands it (so the prompt ids are HF's). The rest is
engine/images.py's ImageProcessor: placeholders' positions, hashes, checks.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from loraplex.engine.images import ImageProcessor
from loraplex.models.gemma4_vision import Gemma4VisionConfig, expand_gemma4


class Gemma4ImageProcessor(ImageProcessor):
    """ImageProcessor with Gemma 4's patches and its boi ... eoi expansion."""

    def __init__(self, path: str, config: Gemma4VisionConfig, tokenizer: Any = None) -> None:
        super().__init__(path, config, tokenizer)
        hf = self.hf
        if (hf.patch_size, hf.pooling_kernel_size) != (config.patch_size,
                                                       config.pooling_kernel_size):
            raise ValueError(f"Gemma 4's image processor cuts {hf.patch_size}-pixel patches "
                             f"pooled {hf.pooling_kernel_size} x {hf.pooling_kernel_size}, its "
                             f"tower takes {config.patch_size} pooled "
                             f"{config.pooling_kernel_size}")
        config = replace(config, max_soft_tokens=int(hf.max_soft_tokens))
        self.config = config
        self._expand = lambda ids, sizes, crops: expand_gemma4(
            ids, config, [config.tokens_for(s) for s in sizes])

    def check_pixels(self, pixels: torch.Tensor) -> None:
        c = self.config
        want = (c.max_soft_tokens * c.pooling_kernel_size ** 2, 3 * c.patch_size ** 2)
        if tuple(pixels.shape[-2:]) != want:
            raise ValueError(f"the image processor gives patches {tuple(pixels.shape[-2:])}, "
                             f"the vision tower takes {want}")
