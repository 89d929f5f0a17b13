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
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from loraplex.engine.llama4_images import resize
from loraplex.models.lfm2_vl import Lfm2VlLayout

_BILINEAR = 2  # PILImageResampling.BILINEAR, HF's default for LFM2-VL
# the image processor's options a checkpoint or a request's mm_processor_kwargs may set
# (HF's names), by the kind of value each takes
OPTIONS: dict[str, type] = {"min_image_tokens": int, "max_image_tokens": int, "min_tiles": int,
                            "max_tiles": int, "tile_size": int, "use_thumbnail": bool,
                            "do_image_splitting": bool, "max_pixels_tolerance": float}
FIELDS = {"do_image_splitting": "split"}  # HF's name -> Lfm2VlTiling's, where they differ


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


def saved_image_processor(path: str) -> dict[str, Any]:
    """The image processor's saved settings: preprocessor_config.json, else
    processor_config.json's "image_processor" (OSError: neither)."""
    legacy = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(legacy):
        with open(legacy) as f:
            return json.load(f)
    with open(os.path.join(path, "processor_config.json")) as f:
        cfg = json.load(f).get("image_processor")
    if not isinstance(cfg, dict):
        raise FileNotFoundError(f"{path}: processor_config.json holds no image_processor")
    return cfg


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
        """From `path`'s preprocessor_config.json, or the "image_processor" of its
        processor_config.json (as transformers 5 saves a processor); OSError when there is
        neither."""
        cfg = saved_image_processor(path)
        if cfg.get("resample", _BILINEAR) != _BILINEAR or not cfg.get("do_rescale", True) \
                or not cfg.get("do_normalize", True) or not cfg.get("do_pad", True) \
                or cfg.get("rescale_factor", 1 / 255) != 1 / 255:
            raise ValueError(f"LFM2-VL's image processor in {path}: only bilinear resizing "
                             "with rescale 1/255, normalize and pad is supported")
        d = cls()
        mean, std = cfg.get("image_mean", d.image_mean), cfg.get("image_std", d.image_std)
        base = cls(int(cfg.get("encoder_patch_size", d.patch)),
                   int(cfg.get("downsample_factor", d.factor)),
                   image_mean=tuple(mean if isinstance(mean, list) else [mean] * 3),
                   image_std=tuple(std if isinstance(std, list) else [std] * 3))
        return base.with_options({k: cfg[k] for k in OPTIONS if k in cfg},
                                 f"LFM2-VL's image processor in {path}")

    def with_options(self, options: Mapping[str, Any],
                     where: str = "mm_processor_kwargs") -> Lfm2VlTiling:
        """These settings with `options` (HF's names, OPTIONS) over them; ValueError for a
        value of the wrong kind or settings that do not fit together."""
        for key, value in options.items():
            kind = OPTIONS[key]
            if kind is bool:
                ok = isinstance(value, bool)
            elif kind is float:
                ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            if not ok:
                want = {bool: "true or false", float: "a number > 0"}.get(kind,
                                                                        "an integer >= 1")
                raise ValueError(f"{where}: {key} must be {want}, got {value!r}")
        out = replace(self, **{FIELDS.get(k, k): v for k, v in options.items()})
        if out.split and out.min_tiles > out.max_tiles:
            raise ValueError(f"{where}: min_tiles must be at most max_tiles")
        if out.min_image_tokens > out.max_image_tokens:
            raise ValueError(f"{where}: min_image_tokens must be at most max_image_tokens")
        if out.tile_size % (out.patch * out.factor):
            raise ValueError(f"{where}: tile_size {out.tile_size} must be a multiple of "
                             f"{out.patch * out.factor} pixels (patch x downsample_factor)")
        return out

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
