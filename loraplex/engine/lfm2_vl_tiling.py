"""LFM2-VL's image processor, HF's Lfm2VlImageProcessor step for step in torch alone.

HF's runs only with torchvision (its TorchvisionBackend), which loraplex does not need
otherwise; this reads the checkpoint's preprocessor_config.json and does the same. An
image too large for one tile (its pixels, rounded to multiples of patch x factor, past
max_image_tokens x (patch x factor)^2 x max_pixels_tolerance) is split: resized to the
grid of min_tiles..max_tiles tiles of tile_size whose aspect ratio is nearest its own
(ties: the larger grid when the image covers half of it) and cut row by row, then its
thumbnail (the image smart-resized to min_image_tokens..max_image_tokens tokens) after
the tiles when use_thumbnail; an image that fits is that smart-resized image alone.
Resizes are bilinear with antialias on the uint8 image as torchvision's
(engine/llama4_images.py `resize`); then (x - 255 mean) / (255 std) in fp32 (HF's fused
rescale and normalize), and each tile cut into patches, row-major, each patch's pixels
(row, column, channel) flat: the rows the tower's NaFlex embedding reads.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from loraplex.engine.llama4_images import resize
from loraplex.models.lfm2_vl import Lfm2VlLayout

_BILINEAR = 2  # PILImageResampling.BILINEAR, HF's default for LFM2-VL


def round_by_factor(x: float, factor: int) -> int:
    return round(x / factor) * factor


def closest_grid(aspect: float, grids: list[tuple[int, int]], size: tuple[int, int],
                 tile: int) -> tuple[int, int]:
    """HF's find_closest_aspect_ratio: the (cols, rows) whose cols / rows is nearest
    `aspect` (width / height); a tie goes to the later grid when the image's area is more
    than half of its tiles'."""
    best, best_diff = (1, 1), float("inf")
    area = size[0] * size[1]
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


@dataclass(frozen=True)
class Lfm2VlTiling:
    """The fields of preprocessor_config.json HF's Lfm2VlImageProcessor reads."""

    patch: int = 16  # encoder_patch_size
    factor: int = 2  # downsample_factor
    tile_size: int = 512
    min_tiles: int = 2
    max_tiles: int = 10
    use_thumbnail: bool = True
    min_image_tokens: int = 64
    max_image_tokens: int = 256
    max_pixels_tolerance: float = 2.0
    split: bool = True  # do_image_splitting
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_pretrained(cls, path: str) -> Lfm2VlTiling:
        """From `path`'s preprocessor_config.json (OSError when there is none)."""
        with open(os.path.join(path, "preprocessor_config.json")) as f:
            cfg = json.load(f)
        if cfg.get("resample", _BILINEAR) != _BILINEAR or not cfg.get("do_rescale", True) \
                or not cfg.get("do_normalize", True) or not cfg.get("do_pad", True) \
                or cfg.get("rescale_factor", 1 / 255) != 1 / 255:
            raise ValueError(f"LFM2-VL's image processor in {path}: only bilinear resizing "
                             "with rescale 1/255, normalize and pad is supported")
        d = cls()
        mean, std = cfg.get("image_mean", d.image_mean), cfg.get("image_std", d.image_std)
        tiling = cls(
            int(cfg.get("encoder_patch_size", d.patch)),
            int(cfg.get("downsample_factor", d.factor)), int(cfg.get("tile_size", d.tile_size)),
            int(cfg.get("min_tiles", d.min_tiles)), int(cfg.get("max_tiles", d.max_tiles)),
            bool(cfg.get("use_thumbnail", d.use_thumbnail)),
            int(cfg.get("min_image_tokens", d.min_image_tokens)),
            int(cfg.get("max_image_tokens", d.max_image_tokens)),
            float(cfg.get("max_pixels_tolerance", d.max_pixels_tolerance)),
            bool(cfg.get("do_image_splitting", d.split)),
            tuple(mean if isinstance(mean, list) else [mean] * 3),
            tuple(std if isinstance(std, list) else [std] * 3))
        if tiling.split and tiling.min_tiles > tiling.max_tiles:
            raise ValueError(f"LFM2-VL's image processor in {path}: min_tiles must be at "
                             "most max_tiles")
        return tiling

    def _grids(self) -> list[tuple[int, int]]:
        """HF's _target_ratios: (cols, rows) with min..max tiles, by tile count."""
        lo, hi = self.min_tiles, self.max_tiles
        grids = {(w, h) for n in range(lo, hi + 1) for w in range(1, n + 1)
                 for h in range(1, n + 1) if lo <= w * h <= hi}
        return sorted(grids, key=lambda g: g[0] * g[1])

    def smart_resize(self, h: int, w: int) -> tuple[int, int]:
        """HF's smart_resize: (height, width), multiples of patch x factor, within
        min..max_image_tokens tokens, the aspect ratio kept as near as may be."""
        step = self.patch * self.factor
        lo, hi = self.min_image_tokens * step ** 2, self.max_image_tokens * step ** 2
        hb, wb = max(step, round_by_factor(h, step)), max(step, round_by_factor(w, step))
        if hb * wb > hi:
            beta = math.sqrt(h * w / hi)
            hb = max(step, math.floor(h / beta / step) * step)
            wb = max(step, math.floor(w / beta / step) * step)
        elif hb * wb < lo:
            beta = math.sqrt(lo / (h * w))
            hb, wb = math.ceil(h * beta / step) * step, math.ceil(w * beta / step) * step
        return hb, wb

    def _too_large(self, h: int, w: int) -> bool:
        step = self.patch * self.factor
        hb, wb = max(self.patch, round_by_factor(h, step)), max(self.patch,
                                                                 round_by_factor(w, step))
        return hb * wb > self.max_image_tokens * step ** 2 * self.max_pixels_tolerance

    def grid(self, h: int, w: int) -> tuple[int, int]:
        """(rows, cols) of tiles an image of (h, w) pixels is cut into; (1, 1): not
        split."""
        if not self.split or (self.min_tiles == self.max_tiles == 1) \
                or not self._too_large(h, w):
            return 1, 1
        cols, rows = closest_grid(w / h, self._grids(), (h, w), self.tile_size)
        return rows, cols

    def layout(self, size: tuple[int, int]) -> Lfm2VlLayout:
        """An image's layout (models/lfm2_vl.py) from its (height, width) in pixels."""
        rows, cols = self.grid(*size)
        h, w = self.smart_resize(*size)
        if rows * cols > 1 and not self.use_thumbnail:
            h = w = 0
        return rows, cols, self.tile_size // self.patch, h // self.patch, w // self.patch

    def pixels(self, image: Any) -> torch.Tensor:
        """An RGB PIL image -> [patches, patch x patch x channels] (fp32), its tiles' then
        its thumbnail's (or the resized image's) patches."""
        import numpy as np

        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].contiguous()
        rows, cols, _, h, w = self.layout((image.height, image.width))
        views = []
        if rows * cols > 1:
            t = self.tile_size
            y = resize(x, (rows * t, cols * t))[0]
            views += list(y.view(3, rows, t, cols, t).permute(1, 3, 0, 2, 4)
                          .reshape(rows * cols, 3, t, t))
        if h:
            views.append(resize(x, (h * self.patch, w * self.patch))[0])
        return torch.cat([self._patches(self._normalize(v)) for v in views])

    def _normalize(self, image: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.image_mean) * 255.0
        std = torch.tensor(self.image_std) * 255.0
        return (image.float() - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)

    def _patches(self, image: torch.Tensor) -> torch.Tensor:
        """[C, H, W] -> [(H / p) (W / p), p p C]: HF's convert_image_to_patches."""
        p = self.patch
        c, hh, ww = image.shape
        x = image.reshape(c, hh // p, p, ww // p, p).permute(1, 3, 2, 4, 0)
        return x.reshape((hh // p) * (ww // p), p * p * c)
