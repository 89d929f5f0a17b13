"""Llama 4's image processor, HF's Llama4ImageProcessor step for step in torch alone.

HF's runs only with torchvision (its TorchvisionBackend), which loraplex does not need
otherwise; this reads the checkpoint's preprocessor_config.json and does the same: the
canvas of up to `max_patches` tiles HF picks (models/llama4_vision.py `best_canvas`),
the image resized without distortion into it (upscaled to at most one tile's side unless
resize_to_max_canvas), bilinear with antialias on the uint8 image as torchvision's
resize does it (natively in uint8 where the CPU has AVX2, else in fp32 rounded back),
padded with zeros right and below, rescaled and normalized in bfloat16 (HF's override:
the original implementation's rounding), cut into tiles row by row, and, past one tile,
the whole image resized to one tile appended (the global view).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from loraplex.models.llama4_vision import best_canvas, canvases, fit_without_distortion

_BILINEAR = 2  # PILImageResampling.BILINEAR, HF's default for Llama 4


def _native_uint8() -> bool:
    """torchvision resizes uint8 bilinear natively on a CPU with AVX2 (its
    `_do_native_uint8_resize_on_cpu`: the string test, so AVX512 CPUs take the fp32 path)."""
    return "AVX2" in torch.backends.cpu.get_cpu_capability()


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision's resize_image of uint8 [N, C, H, W], bilinear, antialias."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if _native_uint8():
        return F.interpolate(images, size=list(size), mode="bilinear", align_corners=False,
                             antialias=True)
    out = F.interpolate(images.float(), size=list(size), mode="bilinear",
                        align_corners=False, antialias=True)
    return out.round_().to(torch.uint8)


@dataclass(frozen=True)
class Llama4ImagePreprocessor:
    """The fields of preprocessor_config.json HF's Llama4ImageProcessor reads."""

    size: dict[str, int]  # a tile's {"height", "width"}
    max_patches: int
    resize_to_max_canvas: bool
    rescale_factor: float
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    do_resize: bool = True

    @classmethod
    def from_pretrained(cls, path: str) -> Llama4ImagePreprocessor:
        """From `path`'s preprocessor_config.json (OSError when there is none)."""
        with open(os.path.join(path, "preprocessor_config.json")) as f:
            cfg = json.load(f)
        if cfg.get("resample", _BILINEAR) != _BILINEAR:
            raise ValueError(f"Llama 4's image processor in {path}: resample="
                             f"{cfg['resample']} is not supported (bilinear, 2, is)")
        if not cfg.get("do_rescale", True) or not cfg.get("do_normalize", True):
            raise ValueError(f"Llama 4's image processor in {path}: do_rescale and "
                             "do_normalize must be true")
        size = cfg.get("size") or {"height": 336, "width": 336}
        if size.get("height") != size.get("width"):
            raise ValueError(f"Llama 4's image processor in {path}: size {size} must be "
                             "square")
        mean, std = cfg.get("image_mean", [0.5] * 3), cfg.get("image_std", [0.5] * 3)
        return cls(dict(size), int(cfg.get("max_patches", 16)),
                   bool(cfg.get("resize_to_max_canvas", False)),
                   float(cfg.get("rescale_factor", 1 / 255)),
                   tuple(mean if isinstance(mean, list) else [mean] * 3),
                   tuple(std if isinstance(std, list) else [std] * 3),
                   bool(cfg.get("do_resize", True)))

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        """HF's rescale_and_normalize override: in bfloat16, then torchvision's
        normalize (mean and std in the tensor's dtype)."""
        x = images.to(torch.bfloat16) * self.rescale_factor
        mean = torch.tensor(self.image_mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.tensor(self.image_std, dtype=x.dtype).view(-1, 1, 1)
        return (x - mean) / std

    def __call__(self, images: list[Any], return_tensors: str = "pt"
                 ) -> dict[str, torch.Tensor]:
        """RGB PIL images -> {"pixel_values": [tiles, 3, tile, tile] (bfloat16, image
        after image), "aspect_ratios": [images, 2] (tile rows, columns)}."""
        import numpy as np

        tile = self.size["height"]
        options = canvases(self.max_patches, tile)
        pixels, ratios = [], []
        for im in images:
            x = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)[None]
            x = x.contiguous()
            h, w = x.shape[-2:]
            th, tw = best_canvas((h, w), options, self.resize_to_max_canvas)
            limit = (th, tw) if self.resize_to_max_canvas else \
                (min(max(h, tile), th), min(max(w, tile), tw))
            nh, nw = fit_without_distortion((h, w), limit)
            y = resize(x, (max(nh, 1), max(nw, 1)))
            y = F.pad(y, (0, tw - y.shape[-1], 0, th - y.shape[-2]))
            y = self._normalize(y)[0]
            rows, cols = th // tile, tw // tile
            tiles = y.view(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4)
            tiles = tiles.reshape(rows * cols, 3, tile, tile)
            if rows * cols > 1:
                whole = self._normalize(resize(x, (tile, tile)))
                tiles = torch.cat([tiles, whole])
            pixels.append(tiles)
            ratios.append((rows, cols))
        return {"pixel_values": torch.cat(pixels), "aspect_ratios": torch.tensor(ratios)}
