"""Phi-4-multimodal's image side (transformers' native `Phi4MultimodalForCausalLM`,
microsoft/Phi-4-multimodal-instruct): a SigLIP tower run on each image's global view and
its HD crops, its second-to-last layer's patches pooled 2 x 2, the crops stitched back
into one grid with a learned separator column after each row, the global view after them
behind a separator vector, and a two-layer projection (GELU) to the Phi-3 language model's
width; each output vector takes the place of one `<|image|>` token, as HF's model splices
them (Phi4MultimodalImageEmbedding).

An image's crop layout (how many crops across and down, the white padding right or below)
follows from its size and the processor's `dynamic_hd` alone (`crop_layout`, HF's
`_get_crop_layout`): the ImageInputs carry each image's (height, width, dynamic_hd), and
the tower rebuilds each crop's patch mask from them (padded patches are no attention keys,
and take position 0). The pixels are engine/phi4mm_inputs.py's. The same module embeds
the prompt's audio clips (models/phi4mm_audio.py), so one request's images and clips are
one ImageInputs whose items keep the prompt's order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.models.llava import VISION_ACTIVATIONS, VisionWeights, check_activation
from loraplex.models.phi4mm_audio import AudioEmbedding, Phi4MMAudioConfig

PREFIX = "model.embed_tokens_extend."  # the checkpoint's names of both towers


def is_phi4mm(hf_config: Any) -> bool:
    return getattr(hf_config, "model_type", None) == "phi4_multimodal"


def phi3_text_config(hf: Any) -> Any:
    """The language model's config: Phi4MultimodalConfig's own fields are a Phi3Config's
    (it has no text_config)."""
    from transformers import Phi3Config

    fields = {k: v for k, v in hf.to_dict().items()
              if k not in ("vision_config", "audio_config", "model_type", "architectures",
                           "transformers_version", "auto_map")}
    return Phi3Config(**fields)


@dataclass(frozen=True)
class Phi4MMVisionConfig:
    """What the image embedding reads of HF's Phi4MultimodalConfig."""

    hidden_size: int
    intermediate_size: int
    layers: int  # the tower's layers run: up to feature_layer's output
    heads: int
    image_size: int  # a crop's side in pixels (crop_size)
    patch_size: int
    act: str
    eps: float
    text_hidden_size: int
    image_token_id: int
    all_layers: int  # the checkpoint's
    audio: Phi4MMAudioConfig | None = None  # models/phi4mm_audio.py; None: images only

    @classmethod
    def from_hf(cls, hf: Any, with_audio: bool = True) -> Phi4MMVisionConfig:
        """`with_audio`: the audio encoder too (limit_mm_per_prompt allows audio)."""
        v = hf.vision_config
        check_activation("vision_config.hidden_act", v.hidden_act)
        if v.crop_size != v.image_size:
            raise ValueError(f"vision_config.crop_size={v.crop_size} differs from image_size="
                             f"{v.image_size}: not supported")
        if (v.image_size // v.patch_size) % 2:
            raise ValueError("vision_config: an odd number of patches per side (HF's "
                             "reflection padding) is not supported")
        layer = v.feature_layer
        used = layer if layer >= 0 else v.num_hidden_layers + 1 + layer
        if not 0 < used <= v.num_hidden_layers:
            raise ValueError(f"vision_config.feature_layer={layer} is not supported")
        return cls(v.hidden_size, v.intermediate_size, used, v.num_attention_heads,
                   v.image_size, v.patch_size, v.hidden_act, v.layer_norm_eps,
                   hf.hidden_size, int(v.image_token_id), v.num_hidden_layers,
                   Phi4MMAudioConfig.from_hf(hf) if with_audio else None)

    @property
    def bidirectional(self) -> bool:
        """Image rows are causal in the language model, like text."""
        return False

    @property
    def mask_size(self) -> int:
        """Patches per crop side."""
        return self.image_size // self.patch_size

    @property
    def base(self) -> int:
        """Pooled features per crop side."""
        return self.mask_size // 2

    def numel(self, size: tuple[Any, int, int]) -> int:
        """An item's values in the flat `pixel_values`: an image's crops, a clip's
        features."""
        if is_audio(size):
            return size[1] * self.audio.input_size
        return self.tiles(size) * 3 * self.image_size ** 2

    def tiles(self, size: tuple[int, int, int]) -> int:
        """Crops of an image (its global view first)."""
        (w, h), _, _ = crop_layout(size[0], size[1], self.image_size, size[2])
        return 1 + w * h

    def tokens_for(self, size: tuple[Any, int, int]) -> int:
        """`<|image|>` tokens of an image of (height, width, dynamic_hd): its stitched sub
        grid with a separator per row, one separator, the global grid with its own; a
        clip's `<|audio|>` tokens (its size's last)."""
        if is_audio(size):
            return size[2]
        rows, cols = self.useful(size)
        return rows * (cols + 1) + 1 + self.base * (self.base + 1)

    def useful(self, size: tuple[int, int, int]) -> tuple[int, int]:
        """The pooled sub grid's rows and columns left once the padding is cut (HF reads
        them off the crops' masks at every other patch)."""
        mask = self.sub_mask(size)
        return int(mask[0::2, 0].sum()), int(mask[0, 0::2].sum())

    def sub_mask(self, size: tuple[int, int, int]) -> torch.Tensor:
        """[h crops * mask_size, w crops * mask_size] patch mask of the sub grid (HF's
        `_get_crop_attention_mask`): 0 over whole patches of padding."""
        (w, h), _, (pad_w, pad_h) = crop_layout(size[0], size[1], self.image_size, size[2])
        p, m = self.patch_size, self.mask_size
        mask = torch.ones(m * h, m * w)
        if pad_w >= p:
            mask[:, -(pad_w // p):] = 0
        if pad_h >= p:
            mask[-(pad_h // p):, :] = 0
        return mask


def is_audio(size: tuple[Any, int, int]) -> bool:
    """An item of ImageInputs.sizes is a clip's ("speech" or "vision": which projection,
    mel frames, tokens), else an image's (height, width, dynamic_hd)."""
    return isinstance(size[0], str)


def crop_layout(height: int, width: int, crop: int, max_crops: int
                ) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """HF's `_get_crop_layout`: ((crops across, crops down), the (width, height) the image
    is resized to, the (width, height) of white padding that fills the grid)."""
    w_crops, h_crops = math.ceil(width / crop), math.ceil(height / crop)
    if w_crops * h_crops > max_crops:
        ratios = sorted({(i, j) for n in range(1, max_crops + 1) for i in range(1, n + 1)
                         for j in range(1, n + 1) if 1 <= i * j <= max_crops},
                        key=lambda r: r[0] * r[1])
        best, best_diff, aspect = (1, 1), float("inf"), width / height
        for r in ratios:  # HF's find_closest_aspect_ratio
            diff = abs(aspect - r[0] / r[1])
            if diff < best_diff:
                best, best_diff = r, diff
            elif diff == best_diff and width * height > 0.5 * crop * crop * r[0] * r[1]:
                best = r
        w_crops, h_crops = best
    target_w, target_h = crop * w_crops, crop * h_crops
    if target_w / width < target_h / height:
        new = (target_w, int(height * (target_w / width)))
    else:
        new = (int(width * (target_h / height)), target_h)
    if min(new[1], target_h) < 10 or min(new[0], target_w) < 10:
        raise ValueError(f"an image of {width} x {height} has too extreme an aspect ratio "
                         f"(it resizes to {new[0]} x {new[1]})")
    return (w_crops, h_crops), new, (target_w - new[0], target_h - new[1])


class Embeddings(nn.Module):
    """SigLIP's patch embedding with NaViT-style positions (HF's Phi4MultimodalVision-
    Embeddings): a crop's unpadded patches spread over the position table's buckets."""

    def __init__(self, c: Phi4MMVisionConfig) -> None:
        super().__init__()
        self.side = c.mask_size
        self.patch_embedding = nn.Conv2d(3, c.hidden_size, c.patch_size, c.patch_size)
        self.position_embedding = nn.Embedding(self.side ** 2, c.hidden_size)

    def forward(self, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[crops, 3, S, S], [crops, side, side] bool -> [crops, side * side, hidden]."""
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        n = self.side
        bounds = torch.arange(1 / n, 1.0, 1 / n, device=pixels.device)
        idx = torch.arange(n, device=pixels.device, dtype=torch.float32)
        coords = [torch.clamp(idx[None] * (1.0 / m[:, None]), max=1.0 - 1e-6)
                  for m in (mask[:, :, 0].sum(1), mask[:, 0, :].sum(1))]
        h, w = (torch.bucketize(c, bounds, right=True) for c in coords)
        ids = (h[:, :, None] * n + w[:, None, :]).reshape(len(x), -1)
        ids = torch.where(mask.reshape(len(x), -1), ids, torch.zeros_like(ids))
        return x + self.position_embedding(ids)


class Attention(nn.Module):
    def __init__(self, c: Phi4MMVisionConfig) -> None:
        super().__init__()
        self.heads = c.heads
        d = c.hidden_size
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """[crops, n, d]; keys: [crops, 1, 1, n] bool, the unpadded patches."""
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class EncoderLayer(nn.Module):
    def __init__(self, c: Phi4MMVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.eps)
        self.self_attn = Attention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.eps)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.mlp.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)
        self.act = VISION_ACTIVATIONS[c.act]

    def forward(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), keys)
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(x))))


class Tower(nn.Module):
    """HF's Phi4MultimodalVisionModel's names, run to the feature layer."""

    def __init__(self, c: Phi4MMVisionConfig) -> None:
        super().__init__()
        self.embeddings = Embeddings(c)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.layers))

    def forward(self, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels, mask)
        keys = mask.reshape(len(x), 1, 1, -1)
        for layer in self.encoder.layers:
            x = layer(x, keys)
        return x


class ImageEmbedding(nn.Module):
    def __init__(self, c: Phi4MMVisionConfig) -> None:
        super().__init__()
        d = c.hidden_size
        self.img_processor = Tower(c)
        self.img_projection_up = nn.Linear(d, c.text_hidden_size)
        self.img_projection_down = nn.Linear(c.text_hidden_size, c.text_hidden_size)
        self.global_img_feature_extensor = nn.Parameter(torch.zeros(1, 1, d))
        self.sub_img_feature_extensor = nn.Parameter(torch.zeros(1, 1, 1, d))


class Phi4MMVision(VisionWeights):
    """Each image's crops -> one language-model input embedding per `<|image|>`."""

    label = "Phi-4-multimodal's image embedding"

    def __init__(self, c: Phi4MMVisionConfig) -> None:
        super().__init__()
        self.config = c
        self.image_embed = ImageEmbedding(c)
        if c.audio is not None:
            self.audio_embed = AudioEmbedding(c.audio)

    def ours(self, name: str) -> str | None:
        """`model.embed_tokens_extend.image_embed.*` and `.audio_embed.*` (without audio:
        none of those); the tower's pooling head, its last norm and the layers past the
        feature layer are never run."""
        if name.startswith(PREFIX + "audio_embed.") and self.config.audio is not None:
            return name[len(PREFIX):]
        if not name.startswith(PREFIX + "image_embed."):
            return None
        name = name[len(PREFIX):]
        tower = "image_embed.img_processor."
        if name.startswith((tower + "head.", tower + "post_layernorm.")):
            return None
        layers = tower + "encoder.layers."
        past = name.startswith(layers) and int(name[len(layers):].split(".")[0]) >= \
            self.config.layers
        return None if past else name

    def crop_masks(self, size: tuple[int, int, int]) -> torch.Tensor:
        """[1 + crops, side, side] bool: the global view's (whole), then each crop's, row
        by row."""
        c, m = self.config, self.config.mask_size
        sub = c.sub_mask(size)
        rows, cols = sub.shape[0] // m, sub.shape[1] // m
        crops = sub.view(rows, m, cols, m).transpose(1, 2).reshape(-1, m, m)
        return torch.cat([torch.ones(1, m, m), crops]).bool()

    def features(self, pixels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """[crops, 3, S, S] -> [crops, base, base, hidden]: the feature layer pooled 2 x 2."""
        x = self.image_embed.img_processor(pixels, masks)
        side = self.config.mask_size
        x = x.view(len(x), side, side, -1).permute(0, 3, 1, 2)
        return F.avg_pool2d(x, 2, 2).permute(0, 2, 3, 1)

    def stitch(self, feats: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        """One image's pooled crops -> its rows before the projection (HF's order: the
        sub grid, a separator, the global view), each grid row ended by a separator."""
        e = self.image_embed
        c, b = self.config, self.config.base
        (w, h), _, _ = crop_layout(size[0], size[1], c.image_size, size[2])
        d = feats.shape[-1]
        glob = torch.cat([feats[0:1], e.sub_img_feature_extensor.expand(1, b, 1, d)], dim=2)
        sub = feats[1:1 + w * h].view(h, w, b, b, d).transpose(1, 2).reshape(1, h * b, w * b, d)
        rows, cols = c.useful(size)
        sub = sub[:, :rows, :cols]
        sub = torch.cat([sub, e.sub_img_feature_extensor.expand(1, rows, 1, d)], dim=2)
        return torch.cat([sub.reshape(-1, d), e.global_img_feature_extensor.view(1, d),
                          glob.reshape(-1, d)])

    @torch.inference_mode()
    def forward(self, values: torch.Tensor, sizes: list[tuple[Any, int, int]]) -> torch.Tensor:
        """The items' values flat, item after item (an image's global view then its crops,
        [1 + crops, 3, S, S]; a clip's log-mel features, [frames, mels]), and each item's
        size (`is_audio`) -> [their placeholders, text hidden], item after item. One
        tower call for every image's crops; the clips one by one."""
        c, e = self.config, self.image_embed
        dtype = e.img_projection_up.weight.dtype
        parts = values.to(dtype).split([c.numel(s) for s in sizes])
        images = [(p, s) for p, s in zip(parts, sizes) if not is_audio(s)]
        embeds = iter(self.images(images) if images else [])
        out = []
        for part, size in zip(parts, sizes, strict=True):
            if is_audio(size):
                clip = part.view(size[1], c.audio.input_size)
                out.append(self.audio_embed(clip, size[2], size[0] == "vision"))
            else:
                out.append(next(embeds))
        return torch.cat(out)

    def images(self, items: list[tuple[torch.Tensor, tuple[int, int, int]]]
               ) -> list[torch.Tensor]:
        """Each image's embeddings, from one tower call on all their crops."""
        c, e = self.config, self.image_embed
        s = c.image_size
        pixels = torch.cat([p.view(-1, 3, s, s) for p, _ in items])
        masks = torch.cat([self.crop_masks(size) for _, size in items]).to(pixels.device)
        feats = self.features(pixels, masks).split([c.tiles(size) for _, size in items])
        return [e.img_projection_down(F.gelu(e.img_projection_up(self.stitch(f, size))))
                for f, (_, size) in zip(feats, items, strict=True)]
