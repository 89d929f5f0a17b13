"""Idefics3's and SmolVLM's image side (`Idefics3ForConditionalGeneration`,
`SmolVLMForConditionalGeneration`: Idefics3-8B-Llama3, SmolVLM-256M / 500M / 2.2B, SmolVLM2):
a SigLIP ViT over each square tile of an image (its `max_image_size`), a connector that
folds each scale_factor x scale_factor square of patches into one vector (pixel shuffle,
InternVL's layout: models/internvl.py) and projects it by one matrix
(`modality_projection.proj`, no bias). Each tile gives image_seq_len embeddings, which
take the place of as many `<image>` tokens; the tile markers around them are text
(engine/idefics3_images.py expands the prompt, HF's image processor cuts the tiles).

The tower is Idefics2's NaViT-style SigLIP: its positions are bucketized fractional
coordinates (`position_ids`, computed as HF's are); every tile loraplex gives it is
whole (each image is processed alone, its tiles all max_image_size square), so no patch
is masked. The language model is loraplex's Llama (models/text_only.py).

Checkpoints name the parts `model.vision_model.*` and `model.connector.*` (VisionWeights
drops the `model.`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loraplex.models.internvl import pixel_shuffle
from loraplex.models.llava import (
    CLIPEmbeddings,
    CLIPVisionTower,
    TowerConfig,
    VisionWeights,
    check_activation,
    check_tower,
)

# model_type -> (its vision config's model_type, the family's name in errors)
FAMILIES = {"idefics3": ("idefics3_vision", "Idefics3"), "smolvlm": ("smolvlm_vision", "SmolVLM")}


def is_idefics3(hf_config: Any) -> bool:
    """Idefics3 or SmolVLM (the same model under two names)."""
    return getattr(hf_config, "model_type", None) in FAMILIES


@dataclass(frozen=True)
class Idefics3VisionConfig(TowerConfig):  # feature_layers: the last layer's, always
    text_hidden_size: int
    scale: int  # scale_factor: patches folded per side
    image_token_id: int  # <image>

    @classmethod
    def from_hf(cls, hf: Any) -> Idefics3VisionConfig:
        v = hf.vision_config
        vision_type, name = FAMILIES[hf.model_type]
        check_tower(name, v, vision_type, "SigLIP")
        check_activation("vision_config.hidden_act", v.hidden_act)
        side = v.image_size // v.patch_size
        if side * v.patch_size != v.image_size or side % hf.scale_factor:
            raise ValueError(f"{name}'s scale_factor {hf.scale_factor} must fold the tower's "
                             f"{side} x {side} patches evenly")
        return cls(*cls.fields_of(v, (v.num_hidden_layers,)), hf.text_config.hidden_size,
                   int(hf.scale_factor), int(hf.image_token_id))

    @property
    def bidirectional(self) -> bool:
        """An image's tokens are causal, like text."""
        return False

    @property
    def tokens_per_image(self) -> int:
        """Embeddings one tile gives (the processor's image_seq_len)."""
        return (self.image_size // self.patch_size // self.scale) ** 2


def position_ids(side: int, per_side: int) -> torch.Tensor:
    """The tower's position of each patch of a whole tile of `side` x `side` patches, its
    table `per_side` x `per_side`: HF's bucketized fractional coordinates (equal to the
    patch's own index unless float rounding says otherwise; kept as HF computes them)."""
    boundaries = torch.arange(1 / per_side, 1.0, 1 / per_side)
    coords = torch.clamp(torch.arange(side, dtype=torch.float32) * (1.0 / side),
                         max=1.0 - 1e-6)
    buckets = torch.bucketize(coords, boundaries, right=True)
    return (buckets[:, None] * per_side + buckets[None, :]).reshape(-1)


class NaViTEmbeddings(CLIPEmbeddings):
    """SigLIP's patches and learned positions, the positions by `position_ids`."""

    def __init__(self, c: Idefics3VisionConfig) -> None:
        super().__init__(c, siglip=True)
        self.per_side = c.image_size // c.patch_size
        self.patch_size = c.patch_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [B, P, D]
        ids = position_ids(pixels.shape[-1] // self.patch_size, self.per_side)
        return patches + self.position_embedding(ids.to(pixels.device))


class Connector(nn.Module):
    """Pixel shuffle, then one matrix to the language model's width."""

    def __init__(self, c: Idefics3VisionConfig) -> None:
        super().__init__()
        self.modality_projection = nn.Module()
        self.modality_projection.proj = nn.Linear(c.hidden_size * c.scale ** 2,
                                                  c.text_hidden_size, bias=False)
        self.scale = c.scale

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """[tiles, side * side, D] -> [tiles * (side / scale)^2, text hidden]."""
        side = int(states.shape[1] ** 0.5)
        folded = pixel_shuffle(states.reshape(states.shape[0], side, side, -1), self.scale)
        return self.modality_projection.proj(folded.reshape(-1, folded.shape[-1]))


class Idefics3Vision(VisionWeights):
    """Tiles' pixels -> one language-model input embedding per `<image>`."""

    label = "Idefics3's vision model / connector"

    def __init__(self, c: Idefics3VisionConfig) -> None:
        super().__init__()
        self.config = c
        self.vision_model = CLIPVisionTower(c, siglip=True)
        self.vision_model.embeddings = NaViTEmbeddings(c)
        self.connector = Connector(c)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
        """[tiles, channels, H, W] of every image (each image's tiles, its global view
        last) -> [tiles * tokens_per_image, text hidden], tile after tile."""
        dtype = self.connector.modality_projection.proj.weight.dtype
        (states,) = self.vision_model(pixels.to(dtype))
        return self.connector(states)
