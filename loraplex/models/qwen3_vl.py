"""Qwen3-VL's vision tower (Qwen Team, "Qwen3-VL"): Qwen2-VL's ViT (models/qwen2_vl.py:
the Conv3d patches, now with a bias; LayerNorm + GELU blocks; the 2-D rotary attention
per image) with two additions.

Learned absolute positions: a square table of `num_position_embeddings` vectors,
bilinearly resampled (align_corners) to each image's patch grid and added to the
patches, in the processor's merge-block order.

DeepStack: the hidden states after each of `deepstack_visual_indexes`' blocks go through
a merger of their own (LayerNorm over the concatenated 2 x 2 block, "postshuffle"), and
the language model adds the i-th one's output to the image rows' hidden states after
its decoder layer i (models/llama.py's LlamaModel._deepstack). The tower so gives each
placeholder [1 + L, text hidden]: its input embedding (the final merger's), then its L
DeepStack features. They travel together as one row of `ImageInputs.embeds`, so a
prefill chunk, a recompute and a prefix-cache hit treat them exactly as the input
embedding (each row's features are added at its own row only).

The language model is Qwen3 (q/k norm) with interleaved M-RoPE (models/mrope.py's
frequency_axes); the images' placeholder expansion and positions are Qwen2-VL's
(engine/qwen_images.py), the videos' Qwen3-VL's own (engine/qwen3_videos.py: timestamps
between the temporal patches; the tower embeds a video of t temporal patches as t
images, each attending within itself). Checkpoints name the tower `model.visual.*` (or
`visual.*`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.models.llava import VisionWeights, check_activation
from loraplex.models.qwen2_vl import (
    Grid,
    PatchEmbed,
    QwenVisionConfig,
    VisionBlock,
    _token_id,
    frame_lengths,
    patch_positions,
    vision_inv_freq,
    vision_rope,
)

# (Qwen3.5's: the same tower without DeepStack, over a gated DeltaNet language model,
# models/qwen3_next.py; its images and videos as Qwen3-VL's, HF's Qwen3VLProcessor)
QWEN3_5_ARCHITECTURES = ("Qwen3_5ForConditionalGeneration",
                         "Qwen3_5MoeForConditionalGeneration")
ARCHITECTURES = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration",
                 *QWEN3_5_ARCHITECTURES)


def is_qwen3_vl(hf_config: Any) -> bool:
    return any(a in ARCHITECTURES for a in getattr(hf_config, "architectures", None) or [])


@dataclass(frozen=True)
class Qwen3VisionConfig(QwenVisionConfig):
    num_position_embeddings: int  # the learned position table's (a square grid)
    deepstack_layers: tuple[int, ...]  # deepstack_visual_indexes: blocks whose output
    # feeds a DeepStack merger, in the order the decoder layers take them

    @classmethod
    def from_hf(cls, hf: Any) -> Qwen3VisionConfig:
        v = hf.vision_config
        check_activation("vision_config.hidden_act", v.hidden_act)
        deepstack = tuple(int(i) for i in getattr(v, "deepstack_visual_indexes", ()) or ())
        if any(not 0 <= i < v.depth for i in deepstack):
            raise ValueError(f"vision_config.deepstack_visual_indexes {list(deepstack)} must "
                             f"be blocks of the tower (depth {v.depth})")
        side = int(v.num_position_embeddings ** 0.5)
        if side * side != v.num_position_embeddings:
            raise ValueError("vision_config.num_position_embeddings must be a square, got "
                             f"{v.num_position_embeddings}")
        params = getattr(v, "rope_parameters", None) or {}
        return cls(False, v.hidden_size, v.intermediate_size, v.depth, v.num_heads,
                   int(v.patch_size), int(v.temporal_patch_size), v.spatial_merge_size,
                   v.in_channels, v.hidden_act, v.out_hidden_size, 0, (),
                   float(params.get("rope_theta", 10000.0)), _token_id(hf, "image_token_id"),
                   _token_id(hf, "vision_start_token_id"), _token_id(hf, "video_token_id", -1),
                   0.0, v.num_position_embeddings,
                   deepstack)


class Qwen3PatchMerger(nn.Module):
    """A 2 x 2 merge block's patches concatenated through Linear-GELU-Linear, normed per
    patch before (the final merger) or over the whole block (`postshuffle`: DeepStack's)."""

    def __init__(self, c: Qwen3VisionConfig, postshuffle: bool) -> None:
        super().__init__()
        self.size = c.hidden_size * c.merge_size ** 2
        self.postshuffle = postshuffle
        self.norm = nn.LayerNorm(self.size if postshuffle else c.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.size, self.size)
        self.linear_fc2 = nn.Linear(self.size, c.text_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.view(-1, self.size)) if self.postshuffle else \
            self.norm(x).view(-1, self.size)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class Qwen3Vision(VisionWeights):
    """Patches -> [placeholders, 1 + DeepStack layers, text hidden]."""

    label = "Qwen3-VL's vision tower"

    def __init__(self, c: Qwen3VisionConfig) -> None:
        super().__init__()
        self.config = c
        self.patch_embed = PatchEmbed(c, bias=True)
        self.pos_embed = nn.Embedding(c.num_position_embeddings, c.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(c) for _ in range(c.num_layers))
        self.merger = Qwen3PatchMerger(c, postshuffle=False)
        self.deepstack_merger_list = nn.ModuleList(
            Qwen3PatchMerger(c, postshuffle=True) for _ in c.deepstack_layers)
        self.register_buffer("inv_freq", vision_inv_freq(c), persistent=False)

    def positions(self, grids: list[Grid]) -> torch.Tensor:
        """[patches, hidden]: the learned table resampled to each grid (fp32, as HF's
        interpolation weights are), each patch's vector in merge-block order."""
        side = int(self.config.num_position_embeddings ** 0.5)
        table = self.pos_embed.weight.float().T.reshape(1, -1, side, side)
        out = []
        for t, h, w in grids:
            grid = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)[0]
            rows, cols = patch_positions(self.config, (t, h, w)).to(grid.device).unbind(-1)
            out.append(grid[:, rows, cols].T)
        return torch.cat(out)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        """[patches, channels x temporal x patch^2] of images of `grids` -> [their
        placeholders, 1 + len(deepstack_layers), text hidden], image after image."""
        c = self.config
        x = self.patch_embed(pixels)
        x = x + self.positions(grids).to(x.dtype)
        cos, sin = vision_rope(c, self.inv_freq, grids)
        lengths = frame_lengths(grids)
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, lengths, cos, sin)
            if i in c.deepstack_layers:
                deepstack.append(self.deepstack_merger_list[c.deepstack_layers.index(i)](x))
        return torch.stack([self.merger(x), *deepstack], dim=1)

    def ours(self, name: str) -> str:
        """A checkpoint tensor's name in this module (`model.visual.*` or `visual.*`); the
        blocks' MLP (`linear_fc1` / `linear_fc2`) is Qwen2-VL's (`fc1` / `fc2`)."""
        name = name.removeprefix("model.").removeprefix("visual.")
        return name.replace(".mlp.linear_fc", ".mlp.fc") if name.startswith("blocks.") \
            else name
