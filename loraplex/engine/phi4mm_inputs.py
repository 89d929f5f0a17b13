"""A request's images for Phi-4-multimodal: HF's Phi4MultimodalImageProcessor step for
step in torch alone (HF's runs only with torchvision, which loraplex does not need): the
crop grid from the image's size (models/phi4mm.py `crop_layout`), the uint8 image resized
into it bilinear with antialias as torchvision resizes it (engine/llama4_images.py
`resize`), padded white right and below, rescaled and normalized in fp32, cut into crops
row by row behind the whole padded image resized bicubic (no antialias) to one crop (the
global view); each `<|image|>` expanded to the image's token count, as
Phi4MultimodalProcessor expands it.

The ImageInputs carry every image's crops ([1 + crops, 3, S, S], image after image) and
its (height, width, dynamic_hd), from which the tower rebuilds the crop masks.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
import torch.nn.functional as F

from loraplex.engine.images import (
    ImageInputs,
    expand_placeholders,
    load_images,
    placeholder_ranges,
)
from loraplex.engine.llama4_images import resize
from loraplex.models.phi4mm import Phi4MMVisionConfig, crop_layout

_BICUBIC = 3  # PILImageResampling.BICUBIC: the global view's (HF's default)


class Phi4MMImageProcessor:
    """preprocessor_config.json's settings plus the `<|image|>` rule (the interface of
    engine/images.py's ImageProcessor)."""

    def __init__(self, path: str, config: Phi4MMVisionConfig) -> None:  # noqa: D107
        with open(os.path.join(path, "preprocessor_config.json")) as f:
            cfg = json.load(f)
        size = cfg.get("size") or {"height": 448, "width": 448}
        if (size.get("height"), size.get("width")) != (config.image_size,) * 2:
            raise ValueError(f"the image processor's size {size} is not the vision tower's "
                             f"{config.image_size} x {config.image_size} crops")
        if int(cfg.get("patch_size", 14)) != config.patch_size:
            raise ValueError(f"the image processor's patch_size {cfg.get('patch_size')} is "
                             f"not the vision tower's {config.patch_size}")
        if cfg.get("resample", _BICUBIC) != _BICUBIC or not cfg.get("do_rescale", True) \
                or not cfg.get("do_normalize", True):
            raise ValueError(f"Phi-4-multimodal's image processor in {path}: only bicubic "
                             "resample with do_rescale and do_normalize is supported")
        self.config = config
        self.dynamic_hd = int(cfg.get("dynamic_hd", 36))
        scale = float(cfg.get("rescale_factor", 1 / 255))
        mean, std = cfg.get("image_mean", [0.5] * 3), cfg.get("image_std", [0.5] * 3)
        # HF's fused rescale + normalize: mean and std over the rescale factor
        self.mean = torch.tensor(mean if isinstance(mean, list) else [mean] * 3) * (1 / scale)
        self.std = torch.tensor(std if isinstance(std, list) else [std] * 3) * (1 / scale)
        self.placeholder = config.image_token_id

    def crops(self, image: Any) -> torch.Tensor:
        """One PIL image -> [1 + crops, 3, S, S] (the global view first)."""
        import numpy as np

        c, s = self.config, self.config.image_size
        x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
        (w, h), (new_w, new_h), (pad_w, pad_h) = crop_layout(
            x.shape[1], x.shape[2], c.image_size, self.dynamic_hd)
        x = resize(x[None], (new_h, new_w))[0]
        x = F.pad(x, (0, pad_w, 0, pad_h), value=255)
        x = (x.float() - self.mean[:, None, None]) / self.std[:, None, None]
        glob = F.interpolate(x[None], size=[s, s], mode="bicubic", align_corners=False,
                             antialias=False)
        grid = x.view(3, h, s, w, s).permute(1, 3, 0, 2, 4).reshape(-1, 3, s, s)
        return torch.cat([glob, grid])

    def sizes(self, images: list[Any]) -> list[tuple[int, int, int]]:
        return [(im.height, im.width, self.dynamic_hd) for im in images]

    def __call__(self, ids: list[int], data: Any) -> tuple[list[int], ImageInputs]:
        """The prompt with its placeholders expanded, and its images' inputs."""
        images = load_images(data)
        sizes = self.sizes(images)
        counts = [self.config.tokens_for(s) for s in sizes]  # (refuses extreme ratios)
        ids = expand_placeholders(ids, self.placeholder, counts)
        crops = [self.crops(im) for im in images]
        positions = self.positions(ids)
        hashes = [hashlib.blake2b(p.numpy().tobytes() + repr(s).encode(),
                                  digest_size=16).digest() for p, s in zip(crops, sizes)]
        return ids, ImageInputs(torch.cat(crops), positions,
                                placeholder_ranges(positions, counts), hashes, sizes=sizes)

    def expand(self, ids: list[int], images: list[Any]) -> list[int]:
        """The prompt expanded for these images, without processing them."""
        counts = [self.config.tokens_for(s) for s in self.sizes(images)]
        return expand_placeholders(ids, self.placeholder, counts)

    def positions(self, ids: list[int]) -> list[int]:
        return [p for p, t in enumerate(ids) if t == self.placeholder]

    def check(self, ids: list[int], inputs: ImageInputs) -> None:
        """Processed inputs given with a prompt (the server's) must be that prompt's."""
        c = self.config
        try:
            counts = [c.tokens_for(s) for s in inputs.sizes]
            tiles = sum(c.tiles(s) for s in inputs.sizes)
        except (TypeError, ValueError):
            counts, tiles = [], -1
        if self.positions(ids) != inputs.positions or sum(counts) != len(inputs.positions) \
                or placeholder_ranges(inputs.positions, counts) != inputs.ranges \
                or inputs.pixel_values.shape[0] != tiles:
            raise ValueError("multi_modal_data: the processed image inputs do not match the "
                             "prompt's (expanded) image placeholders")
