"""Mistral 3's image side (Mistral3ForConditionalGeneration: Mistral Small 3.1 / 3.2,
Magistral Small, Ministral 3, Devstral Small 2): the Pixtral ViT over an image at its own
resolution (resized by the image processor to multiples of patch x merge pixels), the
patch merger and an MLP projector.

The tower: patches by a strided convolution (no bias), RMSNorm (`ln_pre`), then pre-norm
blocks (RMSNorm, attention without biases, a gated MLP) attending bidirectionally within
each image and rotating q/k with a 2-D rope: the frequencies of a head_dim rope, the even
ones by the patch's row and the odd ones by its column (HF's
PixtralVisionRotaryEmbedding), rotated by halves as Qwen2-VL's tower does
(models/qwen2_vl.py's `rotate`, `segment_attention`). The projector (HF's
Mistral3MultiModalProjector): RMSNorm (the text's eps), the patch merger (each
merge x merge square of neighbouring patches concatenated as torch's unfold lays them
out, channel-major, then `merging_layer`), then LLaVA's Linear-GELU-Linear
(models/llava.py's LlavaProjector). One embedding per merged patch takes the place of
one `[IMG]` token; the `[IMG_BREAK]` after each row and the final `[IMG_END]` are text
tokens (engine/pixtral_images.py expands the prompt).

Pixtral-12B in HF's layout (`LlavaForConditionalGeneration` with a `pixtral` vision
config: mistral-community/pixtral-12b) is the same tower without the projector's norm and
patch merger (one `[IMG]` per patch), LLaVA's MLP after it. Mistral's own format with a
vision encoder (models/pixtral_params.py) becomes one of these two configs.

Checkpoints name the parts `vision_tower.*` and `multi_modal_projector.*` (the hub's
files and transformers 5's) or under `model.` (transformers 4.52+ in memory): both load
(models/llava.py's VisionWeights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loraplex.layers.norm import RMSNorm
from loraplex.models.llava import (
    VISION_ACTIVATIONS,
    LlavaProjector,
    VisionWeights,
    check_activation,
    check_tower,
)
from loraplex.models.qwen2_vl import rotate, segment_attention

ARCHITECTURES = ("Mistral3ForConditionalGeneration",)
TOWER_NORM_EPS = 1e-5  # HF's Pixtral hard-codes its norms' eps


def is_mistral3(hf_config: Any) -> bool:
    """The checkpoint is a Mistral 3 (the projector with its norm and patch merger)."""
    return any(a in ARCHITECTURES for a in getattr(hf_config, "architectures", None) or [])


def is_pixtral_llava(hf_config: Any) -> bool:
    """A LLaVA whose tower is Pixtral's (Pixtral-12B in HF's layout)."""
    vision = getattr(hf_config, "vision_config", None)
    return "LlavaForConditionalGeneration" in (getattr(hf_config, "architectures", None) or []) \
        and getattr(vision, "model_type", None) == "pixtral"


def takes_pixtral_tower(hf_config: Any) -> bool:
    """The checkpoint's images take this module's tower (Mistral 3, Pixtral-12B)."""
    return is_mistral3(hf_config) or is_pixtral_llava(hf_config)


@dataclass(frozen=True)
class PixtralVisionConfig:
    hidden_size: int  # the tower's
    intermediate_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    num_channels: int
    hidden_act: str
    rope_theta: float
    merge_size: int  # spatial_merge_size
    feature_layers: tuple[int, ...]  # the one hidden state read (0: after ln_pre)
    text_hidden_size: int
    text_norm_eps: float  # the projector's RMSNorm
    projector_act: str
    projector_bias: bool
    image_token_id: int  # [IMG]: the rows that take the image's embeddings

    # Mistral 3's projector: RMSNorm and the patch merger before LLaVA's MLP (Pixtral-12B's
    # LLaVA: the MLP alone, merge_size 1)
    mistral3_projector: bool = True

    @classmethod
    def from_hf(cls, hf: Any) -> PixtralVisionConfig:
        v = hf.vision_config
        mistral3 = is_mistral3(hf)
        model = "Mistral 3" if mistral3 else "Pixtral (LLaVA)"
        check_tower(model, v, "pixtral", "Pixtral")
        check_activation("vision_config.hidden_act", v.hidden_act)
        check_activation("projector_hidden_act", hf.projector_hidden_act)
        layer = hf.vision_feature_layer
        if not isinstance(layer, int):  # HF's projector norms one layer's width only
            raise ValueError(f"vision_feature_layer={layer!r} is not supported for {model} "
                             "(one layer, an int)")
        strategy = getattr(hf, "vision_feature_select_strategy", "full")
        if not mistral3 and strategy != "full":  # "default" would drop the first patch
            raise ValueError(f"vision_feature_select_strategy={strategy!r} is not supported "
                             "for a Pixtral tower (full: every patch)")
        params = getattr(v, "rope_parameters", None) or {}
        token = getattr(hf, "image_token_id", None)
        return cls(v.hidden_size, v.intermediate_size, v.num_hidden_layers,
                   v.num_attention_heads, v.patch_size, getattr(v, "num_channels", 3),
                   v.hidden_act,  # transformers 4.x: rope_theta on the config itself
                   float(params.get("rope_theta", getattr(v, "rope_theta", 10000.0))),
                   int(hf.spatial_merge_size) if mistral3 else 1,
                   (layer % (v.num_hidden_layers + 1),),
                   hf.text_config.hidden_size, float(hf.text_config.rms_norm_eps),
                   hf.projector_hidden_act,
                   bool(getattr(hf, "multimodal_projector_bias", not mistral3)),
                   int(token if token is not None else hf.image_token_index), mistral3)

    @property
    def bidirectional(self) -> bool:
        """The language model attends to [IMG] tokens causally, as HF does."""
        return False

    @property
    def unit(self) -> int:
        """Pixels a side of one [IMG] token's square (patch x merge): the image
        processor resizes to multiples of it."""
        return self.patch_size * self.merge_size

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """[IMG] rows and columns of an image of `size` (height, width), resized."""
        return size[0] // self.unit, size[1] // self.unit

    def tokens_for(self, size: tuple[int, int]) -> int:
        """[IMG] tokens (merged embeddings) of an image of `size`, resized."""
        rows, cols = self.grid(size)
        return rows * cols


class PixtralAttention(nn.Module):
    def __init__(self, c: PixtralVisionConfig) -> None:
        super().__init__()
        self.num_heads = c.num_heads
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, nn.Linear(c.hidden_size, c.hidden_size, bias=False))

    def forward(self, x: torch.Tensor, lengths: list[int], cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = (p(x).view(n, self.num_heads, -1) for p in (self.q_proj, self.k_proj,
                                                              self.v_proj))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        return self.o_proj(segment_attention(q, k, v, lengths).reshape(n, -1))


class PixtralMLP(nn.Module):
    def __init__(self, c: PixtralVisionConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.act = VISION_ACTIVATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PixtralLayer(nn.Module):
    def __init__(self, c: PixtralVisionConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(c.hidden_size, TOWER_NORM_EPS)
        self.attention = PixtralAttention(c)
        self.ffn_norm = RMSNorm(c.hidden_size, TOWER_NORM_EPS)
        self.feed_forward = PixtralMLP(c)

    def forward(self, x: torch.Tensor, lengths: list[int], cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), lengths, cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class PixtralTransformer(nn.Module):
    def __init__(self, c: PixtralVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(PixtralLayer(c) for _ in range(c.num_layers))


class PixtralTower(nn.Module):
    """Patches -> the hidden states of its feature layer, image after image."""

    def __init__(self, c: PixtralVisionConfig) -> None:
        super().__init__()
        self.config = c
        self.patch_conv = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size,
                                    stride=c.patch_size, bias=False)
        self.ln_pre = RMSNorm(c.hidden_size, TOWER_NORM_EPS)
        self.transformer = PixtralTransformer(c)
        head_dim = c.hidden_size // c.num_heads
        inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope(self, grids: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [patches, 1, head_dim]: the even frequencies by row, the odd ones by
        column, twice (HF's PixtralVisionRotaryEmbedding), each image's grid row-major."""
        rows, cols = [], []
        for h, w in grids:
            r, col = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            rows.append(r.flatten())
            cols.append(col.flatten())
        device = self.inv_freq.device
        r, col = torch.cat(rows).to(device).float(), torch.cat(cols).to(device).float()
        freqs = torch.cat([r[:, None] * self.inv_freq[0::2], col[:, None] * self.inv_freq[1::2]],
                          dim=-1)
        freqs = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
        return freqs.cos(), freqs.sin()

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """[patches, channels x patch^2] of images of `grids` (patches down, across)."""
        c = self.config
        x = patches.view(-1, c.num_channels, c.patch_size, c.patch_size)
        x = self.ln_pre(self.patch_conv(x.to(self.patch_conv.weight.dtype)).flatten(1))
        cos, sin = self.rope(grids)
        lengths = [h * w for h, w in grids]
        for layer in self.transformer.layers[:c.feature_layers[0]]:
            x = layer(x, lengths, cos, sin)
        return x


class PatchMerger(nn.Module):
    """Each merge x merge square of patches as one vector (channel-major within the
    square: torch's unfold, as HF's Mistral3PatchMerger), then `merging_layer`."""

    def __init__(self, c: PixtralVisionConfig) -> None:
        super().__init__()
        self.merge = c.merge_size
        self.merging_layer = nn.Linear(c.hidden_size * c.merge_size ** 2, c.hidden_size,
                                       bias=False)

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        m, d, out = self.merge, x.shape[-1], []
        for image, (h, w) in zip(x.split([h * w for h, w in grids]), grids, strict=True):
            blocks = image.view(h // m, m, w // m, m, d).permute(0, 2, 4, 1, 3)
            out.append(blocks.reshape(-1, d * m * m))
        return self.merging_layer(torch.cat(out))


class PixtralProjector(LlavaProjector):
    """HF's Mistral3MultiModalProjector: RMSNorm, the patch merger, LLaVA's MLP; Pixtral-12B's
    (LLaVA's LlavaMultiModalProjector): the MLP alone."""

    def __init__(self, c: PixtralVisionConfig) -> None:
        super().__init__(c)  # type: ignore[arg-type]  # LLaVA's fields, by name
        merger = c.mistral3_projector
        self.norm = RMSNorm(c.hidden_size, c.text_norm_eps) if merger else None
        self.patch_merger = PatchMerger(c) if merger else None

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]] | None = None
                ) -> torch.Tensor:
        if self.patch_merger is not None:
            x = self.patch_merger(self.norm(x), grids or [])
        return super().forward(x)


class PixtralVision(VisionWeights):
    """Patches -> one language-model input embedding per [IMG] token."""

    label = "the Pixtral vision tower / projector"

    def __init__(self, c: PixtralVisionConfig) -> None:
        super().__init__()
        self.config = c
        self.vision_tower = PixtralTower(c)
        self.multi_modal_projector = PixtralProjector(c)

    @torch.inference_mode()
    def forward(self, patches: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
        """[patches, channels x patch^2] of images of `sizes` (height, width, resized)
        -> [their [IMG] tokens, text hidden], image after image."""
        p = self.config.patch_size
        grids = [(h // p, w // p) for h, w in sizes]
        return self.multi_modal_projector(self.vision_tower(patches, grids), grids)
