"""LLaVA-OneVision's image and video path (`LlavaOnevisionForConditionalGeneration`, Li et
al., "LLaVA-OneVision"): LLaVA-NeXT's anyres (models/llava.py: the base tile, then the
grid's unpadded patch rows) behind a SigLIP tower read without its post_layernorm
("full": every patch, SigLIP has no CLS), with two changes HF's model makes:

- "anyres_max_N": when an image's unpadded grid holds more than 1.1 x the patches of N
  tiles, its patch map is downscaled (bilinear) by that ratio before the newlines are
  added, so a large image takes about N tiles' tokens (`reduced`);
- videos: each frame is one tile at the tower's size, its patch map pooled 2 x 2
  (bilinear, to ceil(side / 2) a side), the frames' tokens one after another and one
  `image_newline` after the last (`video_features`).

A video is an item of the same ImageInputs as the images (engine/llava_onevision.py), its
size (frames, 0), so one tower call embeds a prompt's images and videos together.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from loraplex.models.llava import (
    LlavaVision,
    LlavaVisionConfig,
    anyres_grid,
    check_activation,
    check_tower,
    unpadded_grid,
    with_newlines,
)


def is_llava_onevision(hf_config: Any) -> bool:
    return getattr(hf_config, "model_type", None) == "llava_onevision"


def is_video(size: tuple[int, int]) -> bool:
    """An item's size marks a video: (frames, 0)."""
    return size[1] == 0


@dataclass(frozen=True)
class LlavaOnevisionVisionConfig(LlavaVisionConfig):
    video_token_id: int = 0
    max_tiles: int = 9  # "anyres_max_N"'s N: the budget, in tiles' patches

    @classmethod
    def from_hf(cls, hf: Any) -> LlavaOnevisionVisionConfig:
        v = hf.vision_config
        check_tower("LLaVA-OneVision", v, "siglip_vision_model", "SigLIP")
        check_activation("vision_config.hidden_act", v.hidden_act)
        check_activation("projector_hidden_act", hf.projector_hidden_act)
        pinpoints = tuple((int(h), int(w)) for h, w in hf.image_grid_pinpoints)
        if hf.vision_feature_select_strategy != "full" or \
                any(x % v.image_size for p in pinpoints for x in p):
            # SigLIP has no CLS: "default" drops a patch, which HF's layout has no room
            # for (its model fails on every image), as with pinpoints not whole tiles
            raise ValueError("LLaVA-OneVision is supported with vision_feature_select_strategy "
                             "'full' and image_grid_pinpoints that are multiples of the "
                             f"tower's image_size {v.image_size} (HF's model runs no other)")
        aspect = getattr(hf, "vision_aspect_ratio", "anyres_max_9")
        found = re.fullmatch(r"anyres_max_([1-9]\d*)", aspect)
        if found is None:  # (HF's model reads N from any other and fails)
            raise ValueError(f"vision_aspect_ratio={aspect!r} is not supported "
                             "(anyres_max_N)")
        layers = hf.vision_feature_layer
        layers = (layers,) if isinstance(layers, int) else tuple(layers)
        return cls(*cls.fields_of(v, tuple(i % (v.num_hidden_layers + 1) for i in layers)),
                   True, hf.text_config.hidden_size, hf.projector_hidden_act,
                   bool(getattr(hf, "multimodal_projector_bias", True)),
                   _token(hf, "image"), pinpoints, True, _token(hf, "video"),
                   int(found.group(1)))

    @property
    def side(self) -> int:
        """Patches along a tile's side."""
        return self.image_size // self.patch_size

    @property
    def tokens_per_image(self) -> int:
        """A tile's tokens: one a patch (SigLIP has no CLS)."""
        return self.side ** 2

    @property
    def pooled_side(self) -> int:
        """A video frame's patch map side after its 2 x 2 pooling."""
        return math.ceil(self.side / 2)

    def tiles(self, size: tuple[int, int]) -> int:
        """Tiles an item is cut into: a video's frames, an image's grid and base tile."""
        return size[0] if is_video(size) else super().tiles(size)

    def tokens_for(self, size: tuple[int, int]) -> int:
        """An item's placeholders: a video's pooled frames and one newline; an image's
        base tile, then its grid's rows (reduced to the budget) each with a newline (what
        HF's LlavaOnevisionProcessor counts)."""
        if is_video(size):
            return size[0] * self.pooled_side ** 2 + 1
        _, _, rows, cols = anyres_grid(self, size)
        height, width = self.reduced(rows.stop - rows.start, cols.stop - cols.start)
        return self.tokens_per_image + height * (width + 1)

    def reduced(self, height: int, width: int) -> tuple[int, int]:
        """An unpadded patch map's size after "anyres_max_N"'s downscale: by the ratio
        sqrt(patches / N tiles' patches), where that is over 1.1."""
        ratio = math.sqrt(height * width / (self.max_tiles * self.side ** 2))
        if ratio <= 1.1:
            return height, width
        return int(height // ratio), int(width // ratio)


def _token(hf: Any, kind: str) -> int:
    """The config's image / video token id (`*_token_id`, or older `*_token_index`)."""
    token = getattr(hf, f"{kind}_token_id", None)
    return int(token if token is not None else getattr(hf, f"{kind}_token_index"))


class LlavaOnevisionVision(LlavaVision):
    """Tiles and frames -> one language-model input embedding per placeholder."""

    label = "LLaVA-OneVision's vision tower / projector"
    config: LlavaOnevisionVisionConfig

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
        """[tiles and frames, channels, H, W] of items of `sizes` (an image's (height,
        width), a video's (frames, 0)) -> [their placeholders, text hidden], item after
        item."""
        c = self.config
        items = self.project(pixels).split([c.tiles(s) for s in sizes])
        return torch.cat([self.video_features(t) if is_video(s) else self.image_features(t, s)
                          for t, s in zip(items, sizes, strict=True)])

    def image_features(self, tiles: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """An image's [1 + tiles, patches, D]: the base tile, then its unpadded grid,
        reduced to the budget, row by row with image_newline."""
        grid = unpadded_grid(self.config, tiles, size)
        height, width = self.config.reduced(*grid.shape[:2])
        if (height, width) != grid.shape[:2]:
            grid = F.interpolate(grid.permute(2, 0, 1)[None], [height, width],
                                 mode="bilinear")[0].permute(1, 2, 0)
        return torch.cat([tiles[0], with_newlines(grid, self.image_newline)])

    def video_features(self, frames: torch.Tensor) -> torch.Tensor:
        """A video's [frames, patches, D]: each frame's patch map pooled 2 x 2 (bilinear),
        the frames in order, then one image_newline."""
        c = self.config
        side = c.side
        maps = frames.view(len(frames), side, side, -1).permute(0, 3, 1, 2)
        pooled = F.interpolate(maps, [c.pooled_side, c.pooled_side], mode="bilinear")
        rows = pooled.permute(0, 2, 3, 1).reshape(-1, frames.shape[-1])
        return torch.cat([rows, self.image_newline.to(rows.dtype)[None]])
