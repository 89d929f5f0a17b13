"""InternVL's image side (transformers' native `InternVLForConditionalGeneration`, the
InternVL3 / InternVL3.5 "-hf" checkpoints): InternViT over each 448-pixel tile of an image,
a pixel shuffle that folds each 2 x 2 square of patches into one vector (downsample_ratio
0.5), and an MLP projector (LayerNorm, Linear, GELU, Linear). Each tile gives
(side * ratio)^2 embeddings, which take the place of as many `<IMG_CONTEXT>` tokens; the
`<img>` before an image's and the `</img>` after them are text (engine/internvl_images.py
expands the prompt and cuts the tiles).

InternViT is a pre-norm ViT with a CLS token and learned absolute positions; its layers
scale each residual branch by a learned vector (layer scale: `lambda_1`, `lambda_2`), its
norms are LayerNorms or RMSNorms (`norm_type`: InternViT-6B's), its attention has q / k
RMSNorms over the whole width where `use_qk_norm` says (InternViT-6B). The language model
is loraplex's Qwen2, Qwen3 or Llama (text_config's model_type: models/text_only.py).
The features are the last layer's after the final norm, or, with a `vision_feature_layer`
other than -1, HF's `hidden_states[layer]` (the later layers skipped, no final norm).

Checkpoints name the parts `vision_tower.*` and `multi_modal_projector.*` (the hub's
files) or under `model.` (saved by transformers 5): both load (models/llava.py's
VisionWeights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.models.internvl_chat import hf_vision_names
from loraplex.models.llava import (
    CLIPMLP,
    VISION_ACTIVATIONS,
    VisionWeights,
    check_activation,
    check_tower,
)


def is_internvl(hf_config: Any) -> bool:
    """The checkpoint is transformers' native InternVL."""
    return getattr(hf_config, "model_type", None) == "internvl"


def _side(value: Any) -> int:
    """A square size from an int or an (height, width) pair; others refused."""
    if isinstance(value, int):
        return value
    h, w = value
    if h != w:
        raise ValueError(f"InternVL with a non-square tower size {tuple(value)} is not supported")
    return int(h)


@dataclass(frozen=True)
class InternVLVisionConfig:
    hidden_size: int  # the tower's
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int  # a tile's side in pixels
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    hidden_act: str
    rms_norm: bool  # norm_type "rms_norm" (else LayerNorm)
    qk_norm: bool
    attention_bias: bool
    final_norm: bool  # use_mean_pooling false: a LayerNorm after the last layer
    scale: int  # 1 / downsample_ratio: patches folded per side
    text_hidden_size: int
    projector_act: str
    image_token_id: int  # <IMG_CONTEXT>
    # -1: the last layer's states after the final norm (HF's last_hidden_state); else
    # HF's hidden_states[k]: after k layers (0: the embeddings, as transformers 4 gives
    # them; transformers 5 asks its tower for no hidden states at 0 and fails), unnormed
    feature_layer: int = -1

    @classmethod
    def from_hf(cls, hf: Any) -> InternVLVisionConfig:
        v = hf.vision_config
        check_tower("InternVL", v, "internvl_vision", "InternViT")
        check_activation("vision_config.hidden_act", v.hidden_act)
        check_activation("projector_hidden_act", hf.projector_hidden_act)
        if hf.vision_feature_select_strategy != "default":  # HF's model cannot run "full"
            raise ValueError("InternVL is supported with vision_feature_select_strategy "
                             "'default' (the CLS dropped; HF's pixel shuffle needs a square "
                             f"of patches), not {hf.vision_feature_select_strategy!r}")
        layers = v.num_hidden_layers
        layer = hf.vision_feature_layer
        if not isinstance(layer, int) or not -layers - 1 <= layer <= layers:
            raise ValueError("InternVL's vision_feature_layer must be one layer's index "
                             f"within the tower's {layers} layers, got {layer!r}")
        scale = round(1 / hf.downsample_ratio)
        side = _side(v.image_size) // _side(v.patch_size)
        if abs(scale * hf.downsample_ratio - 1) > 1e-6 or side % scale:
            raise ValueError(f"InternVL's downsample_ratio {hf.downsample_ratio} must fold "
                             f"the tower's {side} x {side} patches evenly")
        if not getattr(v, "use_absolute_position_embeddings", True):
            raise ValueError("InternVL without absolute position embeddings is not supported")
        return cls(v.hidden_size, v.intermediate_size, v.num_hidden_layers,
                   v.num_attention_heads, _side(v.image_size), _side(v.patch_size),
                   getattr(v, "num_channels", 3), v.layer_norm_eps, v.hidden_act,
                   v.norm_type == "rms_norm", bool(v.use_qk_norm), bool(v.attention_bias),
                   not v.use_mean_pooling, scale, hf.text_config.hidden_size,
                   hf.projector_hidden_act, int(hf.image_token_id),
                   feature_layer=layer if layer == -1 else layer % (layers + 1))

    @property
    def bidirectional(self) -> bool:
        """An image's tokens are causal, like text."""
        return False

    @property
    def tokens_per_tile(self) -> int:
        """Embeddings one tile gives: its patches, folded scale x scale."""
        return (self.image_size // self.patch_size // self.scale) ** 2


class RMSNorm(nn.Module):
    """InternViT's RMSNorm (fp32 statistics, the weight applied in the input's dtype)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _norm(c: InternVLVisionConfig) -> nn.Module:
    if c.rms_norm:
        return RMSNorm(c.hidden_size, c.layer_norm_eps)
    return nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class PatchEmbeddings(nn.Module):
    def __init__(self, c: InternVLVisionConfig) -> None:
        super().__init__()
        self.projection = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size,
                                    stride=c.patch_size)


class Embeddings(nn.Module):
    """Patches by a strided convolution, the CLS vector first, learned positions."""

    def __init__(self, c: InternVLVisionConfig) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.empty(1, 1, c.hidden_size))
        self.patch_embeddings = PatchEmbeddings(c)
        patches = (c.image_size // c.patch_size) ** 2
        self.position_embeddings = nn.Parameter(torch.empty(1, patches + 1, c.hidden_size))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embeddings.projection(pixels).flatten(2).transpose(1, 2)  # [B, P, D]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.position_embeddings


class Attention(nn.Module):
    """Full multi-head attention over a tile's tokens, q / k normed over the whole width
    where the config says."""

    def __init__(self, c: InternVLVisionConfig) -> None:
        super().__init__()
        d = c.hidden_size
        self.num_heads = c.num_heads
        self.q_proj = nn.Linear(d, d, bias=c.attention_bias)
        self.k_proj = nn.Linear(d, d, bias=c.attention_bias)
        self.v_proj = nn.Linear(d, d, bias=c.attention_bias)
        self.projection_layer = nn.Linear(d, d)
        self.q_norm = RMSNorm(d, 1e-6) if c.qk_norm else nn.Identity()  # HF's default eps
        self.k_norm = RMSNorm(d, 1e-6) if c.qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k = self.q_norm(self.q_proj(x)), self.k_norm(self.k_proj(x))
        q, k, v = (t.view(b, n, self.num_heads, -1).transpose(1, 2)
                   for t in (q, k, self.v_proj(x)))
        out = F.scaled_dot_product_attention(q, k, v)  # scale: head_dim^-1/2
        return self.projection_layer(out.transpose(1, 2).reshape(b, n, d))


class Layer(nn.Module):
    """Pre-norm, each branch scaled by its layer-scale vector before the residual."""

    def __init__(self, c: InternVLVisionConfig) -> None:
        super().__init__()
        self.layernorm_before = _norm(c)
        self.attention = Attention(c)
        self.layernorm_after = _norm(c)
        self.mlp = CLIPMLP(c)  # (fc1, GELU, fc2: CLIP's, by its names)
        self.lambda_1 = nn.Parameter(torch.empty(c.hidden_size))
        self.lambda_2 = nn.Parameter(torch.empty(c.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.lambda_1 * self.attention(self.layernorm_before(x))
        return x + self.lambda_2 * self.mlp(self.layernorm_after(x))


class Encoder(nn.Module):
    def __init__(self, c: InternVLVisionConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c.num_layers))


class InternViT(nn.Module):
    def __init__(self, c: InternVLVisionConfig) -> None:
        super().__init__()
        self.embeddings = Embeddings(c)
        self.encoder = Encoder(c)
        self.layernorm = (nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
                          if c.final_norm else nn.Identity())

    def forward(self, pixels: torch.Tensor, feature_layer: int = -1) -> torch.Tensor:
        """[tiles, channels, H, W] -> the states [tiles, 1 + patches, D] of
        `feature_layer` (InternVLVisionConfig's: -1, the last layer's normed)."""
        x = self.embeddings(pixels)
        last = feature_layer == -1
        for layer in self.encoder.layer if last else self.encoder.layer[:feature_layer]:
            x = layer(x)
        return self.layernorm(x) if last else x


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """[tiles, side, side, D] -> [tiles, side / scale, side / scale, D * scale^2]: each
    scale x scale square of patches one vector, laid out as HF's pixel_shuffle lays it
    (columns folded first, then rows, the map transposed between)."""
    b, w, h, d = x.shape
    x = x.reshape(b, w, h // scale, d * scale).permute(0, 2, 1, 3)
    x = x.reshape(b, h // scale, w // scale, d * scale * scale)
    return x.permute(0, 2, 1, 3)


class Projector(nn.Module):
    def __init__(self, c: InternVLVisionConfig) -> None:
        super().__init__()
        width = c.hidden_size * c.scale ** 2
        self.layer_norm = nn.LayerNorm(width)  # (HF's default eps)
        self.linear_1 = nn.Linear(width, c.text_hidden_size)
        self.linear_2 = nn.Linear(c.text_hidden_size, c.text_hidden_size)
        self.act = VISION_ACTIVATIONS[c.projector_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))


class InternVLVision(VisionWeights):
    """Tiles' pixels -> one language-model input embedding per `<IMG_CONTEXT>`."""

    label = "InternVL's vision tower / projector"
    unused = ("vision_tower.embeddings.mask_token",)  # masked image modelling only

    def __init__(self, c: InternVLVisionConfig) -> None:
        super().__init__()
        self.config = c
        self.vision_tower = InternViT(c)
        self.multi_modal_projector = Projector(c)

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        """One checkpoint tensor; the remote layout's under their "-hf" names
        (models/internvl_chat.py)."""
        for hf_name, part in hf_vision_names(name, tensor):
            super().load_weight(hf_name, part)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
        """[tiles, channels, H, W] of every image (each image's tiles, its thumbnail
        last) -> [tiles * tokens_per_tile, text hidden], tile after tile."""
        c = self.config
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        states = self.vision_tower(pixels.to(dtype), c.feature_layer)[:, 1:]  # no CLS
        side = c.image_size // c.patch_size
        folded = pixel_shuffle(states.reshape(states.shape[0], side, side, -1), c.scale)
        return self.multi_modal_projector(folded.reshape(-1, folded.shape[-1]))
