"""Llama 4's image side (Llama4ForConditionalGeneration: Scout, Maverick), as HF's
modeling_llama4.py computes it.

The image processor (HF's Llama4ImageProcessor; loraplex's in torch alone is
engine/llama4_images.py, its canvas choice here) resizes an image without distortion onto
the best canvas of up to `max_patches` square tiles of `image_size` (rows x columns: the
image's `grid`), pads it, cuts it into those tiles, and, when there is more than one,
adds the whole image resized to one tile (the global view) last. The tower is a ViT run
on each tile: patches by an unfolded linear, a learned class vector appended (last, not
first), learned positions, a pre-layernorm, layers whose attention rotates q and k by a
2-D rope over the patch grid (the first half of each head's pairs by column + 1, the
second by row + 1, the class token unrotated), a post-layernorm; the class token is
dropped, a pixel shuffle folds each 2 x 2 patch block (pixel_shuffle_ratio 0.5) into one
vector, and the vision adapter (two bias-free linears, each followed by an exact GELU)
and the projector (one bias-free linear) map it into the language model: a tile gives
(image_size / patch_size * ratio)^2 rows (Scout: 144).

Llama4Processor writes an image as `<|image_start|>`, then (grid of more than one
tile) each tile's `<|patch|>` rows, `<|tile_x_separator|>` between the tiles of a row and
`<|tile_y_separator|>` after each row, then `<|image|>` and the global view's (or the one
tile's) rows, and `<|image_end|>`; the rows take the image's vectors in that order
(`image_token_id` is `<|patch|>`). `Llama4ImageTokens` does the same to token ids (the
markers are special tokens: expanding ids is expanding the text).

The image's tokens attend causally, like text (HF's Llama 4 builds its causal and
chunked-causal masks from positions alone), so chunked prefill may split an image and
the chunked-attention layers cut through images at chunk boundaries as HF's do.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.models.llava import VisionWeights, check_tower

# HF's tower and adapter use nn.LayerNorm's and nn.GELU's defaults, whatever the config
# says (norm_eps, hidden_act)
_LN_EPS = 1e-5
# Llama4Processor's markers (its defaults; Scout's and Maverick's tokenizers have them)
IMAGE, PATCH = "<|image|>", "<|patch|>"
TILE_X, TILE_Y = "<|tile_x_separator|>", "<|tile_y_separator|>"


def is_llama4(hf_config: Any) -> bool:
    return getattr(hf_config, "model_type", None) == "llama4"


@functools.lru_cache(maxsize=8)
def canvases(max_patches: int, tile: int) -> torch.Tensor:
    """[N, 2] (height, width) canvases of up to `max_patches` tiles of `tile` pixels, in
    HF's order (its find_supported_resolutions: by tile count down, grouped by aspect
    ratio as first met)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_patches, 0, -1):
        for h in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio.setdefault(h / (n // h), []).append((h, n // h))
    return torch.tensor([(h * tile, w * tile) for shapes in by_ratio.values()
                         for h, w in shapes])


def best_canvas(size: tuple[int, int], options: torch.Tensor,
                resize_to_max_canvas: bool = False) -> tuple[int, int]:
    """HF's get_best_fit (the same fp32 tensor arithmetic, so ties break alike): the
    canvas needing the least upscaling (the most, with resize_to_max_canvas), else the
    least downscaling, the smallest among equals."""
    h, w = size
    scale_h, scale_w = options[:, 0] / h, options[:, 1] / w
    scales = torch.where(scale_h > scale_w, scale_w, scale_h)
    up = scales[scales >= 1]
    if len(up) > 0:
        chosen = up.max() if resize_to_max_canvas else up.min()
    else:
        chosen = scales[scales < 1].max()
    fits = options[scales == chosen]
    best = fits[torch.argmin(fits[:, 0] * fits[:, 1])] if len(fits) > 1 else fits[0]
    return int(best[0]), int(best[1])


def fit_without_distortion(size: tuple[int, int], target: tuple[int, int]
                           ) -> tuple[int, int]:
    """HF's get_max_res_without_distortion: the largest (height, width) of the image's
    aspect ratio within `target`."""
    (h, w), (th, tw) = size, target
    scale_w, scale_h = tw / w, th / h
    if scale_w < scale_h:
        return min(math.floor(h * scale_w), th), tw
    return th, min(math.floor(w * scale_h), tw)


@dataclass(frozen=True)
class Llama4VisionConfig:
    hidden_size: int  # the tower's
    intermediate_size: int  # its MLP's; also the adapter's input (hidden / ratio^2)
    num_layers: int
    num_heads: int
    image_size: int  # a tile's side, in pixels
    patch_size: int
    num_channels: int
    rope_theta: float
    shuffle_ratio: float  # pixel_shuffle_ratio
    projector_dim: int  # the adapter's width (projector_input_dim = projector_output_dim)
    text_hidden_size: int
    image_token_id: int  # <|patch|>: the rows that take the image's vectors
    boi_token_id: int  # <|image_start|>
    eoi_token_id: int  # <|image_end|>
    # the image processor's (preprocessor_config.json): ImageProcessor sets them
    max_patches: int = 16
    resize_to_max_canvas: bool = False
    # HF's tower runs on images only when the adapter takes intermediate_size = hidden /
    # ratio^2 inputs and projector_input_dim = projector_output_dim = vision_output_dim;
    # checked when the tower is built (a checkpoint without an image processor is served
    # on text whatever its tower)
    shapes_ok: bool = True

    @classmethod
    def from_hf(cls, hf: Any) -> Llama4VisionConfig:
        v = hf.vision_config
        check_tower("Llama 4", v, "llama4_vision_model", "Llama 4")
        image, patch = v.image_size, v.patch_size
        if not isinstance(image, int) or not isinstance(patch, int) or image % patch:
            raise ValueError(f"Llama 4's vision_config: image_size={image} must be a multiple "
                             f"of patch_size={patch} (square tiles)")
        side, ratio = image // patch, float(v.pixel_shuffle_ratio)
        if ratio <= 0 or side * ratio != int(side * ratio) or 1 / ratio != int(1 / ratio):
            raise ValueError(f"pixel_shuffle_ratio={ratio} must fold the {side} x {side} "
                             "patch grid into whole blocks")
        rope = getattr(v, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(v, "rope_theta", 10000.0))
        shapes_ok = (round(v.hidden_size / ratio ** 2) == v.intermediate_size
                     and v.projector_input_dim == v.projector_output_dim == v.vision_output_dim)
        return cls(v.hidden_size, v.intermediate_size, v.num_hidden_layers,
                   v.num_attention_heads, image, patch, getattr(v, "num_channels", 3),
                   float(theta), ratio, v.projector_output_dim, hf.text_config.hidden_size,
                   int(hf.image_token_index), int(hf.boi_token_index),
                   int(hf.eoi_token_index), shapes_ok=shapes_ok)

    def with_processor(self, hf: Any) -> Llama4VisionConfig:
        """This config with the image processor's tiling settings (its
        preprocessor_config.json: engine/llama4_images.py); refused when its tiles are not
        the tower's."""
        size = hf.size if isinstance(hf.size, dict) else vars(hf.size)
        if (size.get("height"), size.get("width")) != (self.image_size, self.image_size):
            raise ValueError(f"the image processor's size {size} is not the vision tower's "
                             f"{self.image_size} x {self.image_size} tiles")
        if getattr(hf, "do_resize", True) is False:
            raise ValueError("Llama 4's image processor with do_resize=False is not supported")
        return replace(self, max_patches=int(hf.max_patches),
                       resize_to_max_canvas=bool(hf.resize_to_max_canvas))

    @property
    def bidirectional(self) -> bool:
        """Image tokens attend causally in HF's Llama 4 (no token_type_ids mask)."""
        return False

    @property
    def tokens_per_tile(self) -> int:
        side = self.image_size // self.patch_size
        return int(side * self.shuffle_ratio) ** 2

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (rows, columns) of tiles HF's image processor cuts an image of `size`
        (height, width) into."""
        h, w = self.canvas(size)
        return h // self.image_size, w // self.image_size

    def canvas(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (height, width) HF's image processor pads an image of `size` to."""
        return best_canvas(size, canvases(self.max_patches, self.image_size),
                           self.resize_to_max_canvas)

    def tiles(self, size: tuple[int, int]) -> int:
        """The tiles the tower runs on: the grid's and, past one, the global view."""
        rows, cols = self.grid(size)
        return rows * cols + (1 if rows * cols > 1 else 0)

    def tokens_for(self, size: tuple[int, int]) -> int:
        """`<|patch|>` rows an image of `size` takes."""
        return self.tokens_per_tile * self.tiles(size)


class Llama4ImageTokens:
    """Llama4Processor's expansion of each `<|image|>`, on token ids."""

    def __init__(self, tokenizer: Any, c: Llama4VisionConfig) -> None:
        self.c = c
        ids: dict[str, int] = {}
        for token in (IMAGE, PATCH, TILE_X, TILE_Y):
            i = tokenizer.convert_tokens_to_ids(token)
            if i is None or i == tokenizer.unk_token_id:
                raise ValueError(f"Llama 4's tokenizer lacks {token}: it cannot take images")
            ids[token] = int(i)
        if ids[PATCH] != c.image_token_id:
            raise ValueError(f"the config's image_token_index {c.image_token_id} is not the "
                             f"tokenizer's {PATCH} ({ids[PATCH]})")
        self.image, self.patch = ids[IMAGE], ids[PATCH]
        self.tile_x, self.tile_y = ids[TILE_X], ids[TILE_Y]

    @property
    def placeholder(self) -> int:
        return self.image

    def layout(self, size: tuple[int, int]) -> list[int]:
        """HF's `_prompt_split_image` for an image of `size`, as token ids."""
        c = self.c
        rows, cols = c.grid(size)
        tile = [self.patch] * c.tokens_per_tile
        out = [c.boi_token_id]
        if rows * cols > 1:
            for _ in range(rows):
                for x in range(cols):
                    out += tile + ([self.tile_x] if x < cols - 1 else [])
                out.append(self.tile_y)
        return out + [self.image] + tile + [c.eoi_token_id]

    def __call__(self, ids: list[int], sizes: list[tuple[int, int]]) -> list[int]:
        """The prompt with image i's `<|image|>` expanded for `sizes[i]`; one already
        expanded (exactly HF's blocks for these sizes) as it is."""
        if self.patch in ids:
            collapsed = self._collapse(ids)
            if collapsed is not None and collapsed.count(self.image) == len(sizes) \
                    and self._expand(collapsed, sizes) == list(ids):
                return list(ids)
            raise ValueError(f"the prompt's expanded image tokens ({PATCH}, id {self.patch}) "
                             f"are not Llama4Processor's for its {len(sizes)} image(s): give "
                             f"one {IMAGE} where each image goes")
        n = ids.count(self.image)
        if n != len(sizes):
            raise ValueError(f"the prompt has {n} {IMAGE} token(s) (id {self.image}) for "
                             f"{len(sizes)} image(s): put one {IMAGE} where each image goes")
        return self._expand(ids, sizes)

    def _expand(self, ids: list[int], sizes: list[tuple[int, int]]) -> list[int]:
        out: list[int] = []
        left = iter(sizes)
        for t in ids:
            out.extend(self.layout(next(left)) if t == self.image else [t])
        return out

    def _collapse(self, ids: list[int]) -> list[int] | None:
        """Each <|image_start|> ... <|image_end|> block as one <|image|> (None: a block
        left open)."""
        out: list[int] = []
        i = 0
        while i < len(ids):
            if ids[i] != self.c.boi_token_id:
                out.append(ids[i])
                i += 1
                continue
            try:
                i = ids.index(self.c.eoi_token_id, i) + 1
            except ValueError:
                return None
            out.append(self.image)
        return out


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """HF's pixel_shuffle: [tiles, side^2, C] -> [tiles, (side * ratio)^2, C / ratio^2],
    in its order (a transpose of the grid, a fold, a transpose back)."""
    b, n, c = x.shape
    side = int(math.isqrt(n))
    x = x.view(b, side, int(side * ratio), int(c / ratio)).permute(0, 2, 1, 3).contiguous()
    x = x.view(b, int(side * ratio), int(side * ratio), int(c / ratio ** 2))
    return x.permute(0, 2, 1, 3).reshape(b, -1, x.shape[-1])


def rope_angles(c: Llama4VisionConfig) -> torch.Tensor:
    """[patches + 1, head_dim / 2] angles of HF's Llama4VisionRotaryEmbedding: pair k of
    the first half turns by (column + 1) * f_k, of the second by (row + 1) * f_k, with
    f_k = theta^(-2k / (head_dim / 2)); the class token (last) not at all."""
    side = c.image_size // c.patch_size
    quarter = c.hidden_size // c.num_heads // 4
    freq = 1.0 / c.rope_theta ** (torch.arange(0, 2 * quarter, 2)[:quarter].float()
                                  / (2 * quarter))
    idx = torch.arange(side * side)
    cols, rows = (idx % side + 1).float(), (idx // side + 1).float()
    angles = torch.cat([cols[:, None] * freq, rows[:, None] * freq], dim=-1)
    return torch.cat([angles, angles.new_zeros(1, angles.shape[1])])


class Llama4VisionAttention(nn.Module):
    def __init__(self, c: Llama4VisionConfig) -> None:
        super().__init__()
        self.heads = c.num_heads
        d = c.hidden_size
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1) for p in (self.q_proj, self.k_proj,
                                                               self.v_proj))
        q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2))  # bidirectional
        return self.o_proj(out.transpose(1, 2).reshape(b, n, d))


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Adjacent pairs (2i, 2i + 1) of each head rotated (HF's complex product), in fp32.
    x: [tiles, tokens, heads, head_dim]; cos, sin: [tokens, head_dim / 2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, None], sin[:, None]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x)


class Llama4VisionMLP(nn.Module):
    def __init__(self, c: Llama4VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Llama4VisionLayer(nn.Module):
    def __init__(self, c: Llama4VisionConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=_LN_EPS)
        self.self_attn = Llama4VisionAttention(c)
        self.post_attention_layernorm = nn.LayerNorm(c.hidden_size, eps=_LN_EPS)
        self.mlp = Llama4VisionMLP(c)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Encoder(nn.Module):
    def __init__(self, c: Llama4VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Llama4VisionLayer(c) for _ in range(c.num_layers))


class _PatchEmbedding(nn.Module):
    """HF's Llama4UnfoldConvolution: each patch's pixels (channel, row, column order)
    through one bias-free linear."""

    def __init__(self, c: Llama4VisionConfig) -> None:
        super().__init__()
        self.unfold = nn.Unfold(kernel_size=c.patch_size, stride=c.patch_size)
        self.linear = nn.Linear(c.num_channels * c.patch_size ** 2, c.hidden_size,
                                bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.linear(self.unfold(pixels).transpose(1, 2))


class _AdapterMLP(nn.Module):
    def __init__(self, c: Llama4VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c.intermediate_size, c.projector_dim, bias=False)
        self.fc2 = nn.Linear(c.projector_dim, c.projector_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc2(F.gelu(self.fc1(x))))


class _VisionAdapter(nn.Module):
    """HF's Llama4VisionPixelShuffleMLP."""

    def __init__(self, c: Llama4VisionConfig) -> None:
        super().__init__()
        self.ratio = c.shuffle_ratio
        self.mlp = _AdapterMLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(x, self.ratio))


class Llama4VisionTower(nn.Module):
    """HF's Llama4VisionModel (names as the checkpoint's `vision_model.*`)."""

    def __init__(self, c: Llama4VisionConfig) -> None:
        super().__init__()
        patches = (c.image_size // c.patch_size) ** 2
        self.patch_embedding = _PatchEmbedding(c)
        self.class_embedding = nn.Parameter(torch.empty(c.hidden_size))
        self.positional_embedding_vlm = nn.Parameter(torch.empty(patches + 1, c.hidden_size))
        self.layernorm_pre = nn.LayerNorm(c.hidden_size, eps=_LN_EPS)
        self.layernorm_post = nn.LayerNorm(c.hidden_size, eps=_LN_EPS)
        self.model = _Encoder(c)
        self.vision_adapter = _VisionAdapter(c)
        angles = rope_angles(c)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[tiles, C, H, W] -> [tiles, tokens_per_tile, projector_dim]."""
        x = self.patch_embedding(pixels)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([x, cls], dim=1) + self.positional_embedding_vlm.to(x.dtype)
        x = self.layernorm_pre(x)
        cos, sin = self.rope_cos.to(x.device), self.rope_sin.to(x.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.vision_adapter(self.layernorm_post(x)[:, :-1])


class Llama4Projector(nn.Module):
    def __init__(self, c: Llama4VisionConfig) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(c.projector_dim, c.text_hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_1(x)


class Llama4Vision(VisionWeights):
    """Pixels -> one language-model input embedding per `<|patch|>` row."""

    label = "Llama 4's vision model / projector"

    def __init__(self, c: Llama4VisionConfig) -> None:
        super().__init__()
        if not c.shapes_ok:
            raise ValueError("Llama 4's vision_config cannot take images: its adapter takes "
                             "intermediate_size = hidden_size / pixel_shuffle_ratio^2 inputs "
                             "and projector_input_dim = projector_output_dim = "
                             "vision_output_dim (HF's shapes)")
        self.config = c
        self.vision_model = Llama4VisionTower(c)
        self.multi_modal_projector = Llama4Projector(c)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
        """[tiles, channels, H, W] (each image's grid tiles, then its global view) ->
        [their rows, text hidden], in the prompt's order."""
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        return self.multi_modal_projector(self.vision_model(pixels.to(dtype))).flatten(0, 1)
