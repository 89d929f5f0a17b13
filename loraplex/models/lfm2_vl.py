"""LFM2-VL's image side (`Lfm2VlForConditionalGeneration`: LiquidAI/LFM2-VL-450M / 1.6B /
3B): a SigLIP2 NaFlex tower over each tile at its own patch grid, a pixel unshuffle that
folds each f x f square of patches into one vector (downsample_factor f), and an MLP
projector (LayerNorm, Linear, GELU, Linear). A tile of gh x gw patches gives
(gh / f) x (gw / f) embeddings, which take the place of as many `<image>` tokens
(engine/lfm2_vl_images.py cuts the tiles and expands the prompt).

NaFlex: the patches come flat (a Linear over each patch's pixels, not a convolution), and
the learned square table of positions is resized to each tile's grid (bilinear with
antialias, as HF's `resize_positional_embeddings`). HF runs its tiles padded to one length
with a mask over the padding; here tiles of one grid run together, unpadded (the same
values: padded keys are masked out there). The encoder layers are SigLIP's
(models/llava.py's CLIP layers), then `post_layernorm`; the pooling head
(`vision_use_head`) is never read.

An image's layout (`Lfm2VlLayout`, what `ImageInputs.sizes` holds per image here):
(rows, cols, tile, height, width) in patches: rows x cols tiles of tile x tile patches
when the image is split (rows x cols > 1), then one height x width image (its thumbnail,
or the whole image resized when it is not split; height 0: split without a thumbnail).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.models.internvl import pixel_shuffle
from loraplex.models.llava import (
    VISION_ACTIVATIONS,
    CLIPEncoder,
    TowerConfig,
    VisionWeights,
    check_activation,
    check_tower,
)

# (rows, cols, tile side, height, width), all in patches: see the module's docstring
Lfm2VlLayout = tuple[int, int, int, int, int]


def is_lfm2_vl(hf_config: Any) -> bool:
    """The checkpoint is LFM2-VL."""
    return getattr(hf_config, "model_type", None) == "lfm2_vl"


def tile_grids(layout: Lfm2VlLayout) -> list[tuple[int, int]]:
    """Each tile's patch grid (height, width), in the order the pixels hold them."""
    rows, cols, tile, h, w = layout
    grids = [(tile, tile)] * (rows * cols) if rows * cols > 1 else []
    return grids + ([(h, w)] if h else [])


@dataclass(frozen=True)
class Lfm2VlVisionConfig(TowerConfig):  # image_size: the position table's side in pixels
    text_hidden_size: int
    factor: int  # downsample_factor: patches folded per side
    projector_hidden_size: int
    projector_act: str
    projector_bias: bool
    projector_layernorm: bool
    image_token_id: int  # <image>

    @classmethod
    def from_hf(cls, hf: Any) -> Lfm2VlVisionConfig:
        v = hf.vision_config
        check_tower("LFM2-VL", v, "siglip2_vision_model", "SigLIP2")
        check_activation("vision_config.hidden_act", v.hidden_act)
        check_activation("projector_hidden_act", hf.projector_hidden_act)
        side = int(round(v.num_patches ** 0.5))
        if side * side != v.num_patches:
            raise ValueError(f"LFM2-VL: vision_config.num_patches={v.num_patches} must be a "
                             "square (the position table's grid)")
        return cls(v.hidden_size, v.intermediate_size, v.num_hidden_layers,
                   v.num_attention_heads, side * int(v.patch_size), int(v.patch_size),
                   getattr(v, "num_channels", 3), v.layer_norm_eps, v.hidden_act,
                   (v.num_hidden_layers,), hf.text_config.hidden_size,
                   int(hf.downsample_factor), int(hf.projector_hidden_size),
                   hf.projector_hidden_act, bool(hf.projector_bias),
                   bool(hf.projector_use_layernorm), int(hf.image_token_id))

    @property
    def placeholder_id(self) -> int:
        return self.image_token_id

    @property
    def bidirectional(self) -> bool:
        """An image's tokens are causal, like text."""
        return False

    def tokens_for(self, layout: Lfm2VlLayout) -> int:
        """`<image>` tokens an image of this layout takes (its markers apart)."""
        f = self.factor
        return sum((h // f) * (w // f) for h, w in tile_grids(layout))

    def patches(self, layout: Lfm2VlLayout) -> int:
        """Rows of pixel values (patches) an image of this layout has."""
        return sum(h * w for h, w in tile_grids(layout))


class NaFlexEmbeddings(nn.Module):
    """Each patch's pixels through a Linear, plus the position table resized to the
    tile's grid."""

    def __init__(self, c: Lfm2VlVisionConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Linear(c.num_channels * c.patch_size ** 2, c.hidden_size)
        self.side = c.image_size // c.patch_size
        self.position_embedding = nn.Embedding(self.side ** 2, c.hidden_size)

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """The table resized to `grid` (height, width): [h * w, D], row after row."""
        table = self.position_embedding.weight
        x = table.reshape(self.side, self.side, -1).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False, antialias=True)
        return x[0].flatten(1).T.to(table.dtype)

    def forward(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """[tiles, h * w, patch pixels] of tiles of one grid -> [tiles, h * w, D]."""
        return self.patch_embedding(patches) + self.positions(grid)


class Siglip2Tower(nn.Module):
    def __init__(self, c: Lfm2VlVisionConfig) -> None:
        super().__init__()
        self.embeddings = NaFlexEmbeddings(c)
        self.encoder = CLIPEncoder(c)  # SigLIP's layers: CLIP's, by the same names
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.embeddings(patches, grid)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class Projector(nn.Module):
    """HF's Lfm2VlMultiModalProjector after its pixel unshuffle."""

    def __init__(self, c: Lfm2VlVisionConfig) -> None:
        super().__init__()
        width = c.hidden_size * c.factor ** 2
        self.layer_norm = nn.LayerNorm(width) if c.projector_layernorm else nn.Identity()
        self.linear_1 = nn.Linear(width, c.projector_hidden_size, bias=c.projector_bias)
        self.linear_2 = nn.Linear(c.projector_hidden_size, c.text_hidden_size,
                                  bias=c.projector_bias)
        self.act = VISION_ACTIVATIONS[c.projector_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))


class Lfm2VlVision(VisionWeights):
    """Tiles' patches -> one language-model input embedding per `<image>`."""

    label = "LFM2-VL's vision tower / projector"
    unused = ("vision_tower.head.",)  # SigLIP2's pooling head, unread

    def __init__(self, c: Lfm2VlVisionConfig) -> None:
        super().__init__()
        self.config = c
        self.vision_tower = Siglip2Tower(c)
        self.multi_modal_projector = Projector(c)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, sizes: list[Lfm2VlLayout]) -> torch.Tensor:
        """[patches, patch pixels] of every image (each image's tiles, its thumbnail
        last; `sizes`: each image's layout) -> [their tokens, text hidden], tile after
        tile."""
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        grids = [g for layout in sizes for g in tile_grids(layout)]
        tiles = pixels.to(dtype).split([h * w for h, w in grids])
        out: list[torch.Tensor | None] = [None] * len(grids)
        for grid in dict.fromkeys(grids):  # the tiles of one grid in one call
            which = [i for i, g in enumerate(grids) if g == grid]
            states = self.vision_tower(torch.stack([tiles[i] for i in which]), grid)
            folded = pixel_shuffle(states.view(len(which), *grid, -1), self.config.factor)
            embeds = self.multi_modal_projector(folded.flatten(1, 2))
            for i, e in zip(which, embeds):
                out[i] = e
        return torch.cat(out)
