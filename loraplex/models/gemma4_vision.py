"""Gemma 4's image side (Gemma4ForConditionalGeneration; transformers 5's Gemma4VisionModel
and Gemma4MultimodalEmbedder), and the module that holds its encoders: Gemma4Vision runs
images and video frames (engine/gemma4_videos.py: images at the video budget) through
the vision tower and audio clips through the audio tower (models/gemma4_audio.py), each
item alone, from their values flat (engine/gemma4_images.py).

HF's image processor resizes each image, keeping its aspect ratio, to the largest size
of at most max_soft_tokens x k^2 patches (k: pooling_kernel_size) whose sides are
multiples of k x patch_size, cuts it into patches (row-major, each patch_size^2 x 3
values), and pads them to that many (engine/gemma4_images.py keeps the real ones). The
tower:
- patch_embedder: 2 (v - 0.5), one linear, plus a learned x and a y position embedding;
- encoder layers: Gemma's sandwich norms, q/k RMS-normed (v without a weight), a 2-D rope
  (the first half of each head rotates by the patch's column, the second by its row),
  attention scale 1.0, every patch seeing every patch of its image; a GeGLU MLP. Every
  linear sits inside a Gemma4ClippableLinear (`.linear`, with optional clamps);
- pooler: each k x k block of patches averaged (one soft token each, row-major),
  x sqrt(hidden), then (standardize) (x - std_bias) x std_scale.
embed_vision maps each into the language model: RMSNorm without a weight, one linear.

The prompt marks an image with <|image|> (the processor's image_token); Gemma4Processor
writes boi, the image's soft tokens (<|image|> each), eoi in its place
(engine/gemma4_images.py `expand_gemma4`). In the language model an image row's token embedding is the image's
vector (unscaled), and its per-layer embedding is the pad token's (models/gemma4.py).
With text_config.use_bidirectional_attention "vision" an image's tokens see each other
both ways on the sliding layers (AND(window, OR(causal, same image)), as Gemma 3's on
transformers 5: layers/attention.py image_blocks), while the full layers stay causal over
them (Attention.images_causal); unset, every layer is causal over them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.layers.activation import ACTIVATIONS
from loraplex.layers.norm import Gemma4RMSNorm
from loraplex.models.llava import VisionWeights

if TYPE_CHECKING:
    from loraplex.models.gemma4_audio import Gemma4AudioConfig


def is_gemma4(hf_config: Any) -> bool:
    return getattr(hf_config, "model_type", None) == "gemma4" \
        and getattr(hf_config, "vision_config", None) is not None


@dataclass(frozen=True)
class Gemma4VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    patch_size: int
    pooling_kernel_size: int
    position_embedding_size: int
    rope_theta: float
    eps: float
    clipped: bool  # use_clipped_linears
    standardize: bool
    text_hidden_size: int
    image_token_id: int  # <|image|>: the placeholder, and each soft token
    boi_token_id: int
    eoi_token_id: int
    image_blocks: bool  # use_bidirectional_attention "vision": both ways on sliding layers
    max_soft_tokens: int = 280  # the image processor's (engine/gemma4_images.py)
    video_token_id: int = -1  # <|video|>: each video frame's soft tokens (-1: none)
    # the audio tower (models/gemma4_audio.py; None: not built, audio refused) and its
    # tokens: <|audio|> (the placeholder, and each soft token), boa, eoa
    audio: Gemma4AudioConfig | None = None
    audio_token_id: int = -1
    boa_token_id: int = -1
    eoa_token_id: int = -1

    @classmethod
    def from_hf(cls, hf: Any) -> Gemma4VisionConfig:
        v = hf.vision_config
        if v.hidden_activation not in ("gelu_pytorch_tanh", "gelu_new"):
            raise ValueError(f"Gemma 4 vision_config.hidden_activation={v.hidden_activation!r}"
                             " is not supported (gelu_pytorch_tanh is)")
        rope = v.rope_parameters or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ValueError("Gemma 4's vision rope must be 'axial'")
        if v.num_attention_heads % v.num_key_value_heads:
            raise ValueError("Gemma 4 vision: heads must be a multiple of the KV heads")
        return cls(v.hidden_size, v.intermediate_size, v.num_hidden_layers,
                   v.num_attention_heads, v.num_key_value_heads, v.head_dim, v.patch_size,
                   v.pooling_kernel_size, v.position_embedding_size,
                   float(rope.get("rope_theta", 100.0)), float(v.rms_norm_eps),
                   bool(v.use_clipped_linears), bool(v.standardize),
                   hf.text_config.hidden_size, int(hf.image_token_id), int(hf.boi_token_id),
                   int(hf.eoi_token_id),
                   getattr(hf.text_config, "use_bidirectional_attention", None) == "vision",
                   video_token_id=int(getattr(hf, "video_token_id", None) or -1),
                   **_audio_fields(hf))

    def item_tokens(self, size: tuple[int, ...]) -> int:
        """The soft tokens of an item of Gemma4Vision's input: an image's or frame's
        (rows, columns) grid, or a clip's (mel frames,)."""
        if len(size) == 1:
            from loraplex.models.gemma4_audio import Gemma4AudioConfig

            return Gemma4AudioConfig.tokens_for(size[0])
        return self.grid_tokens(size)

    def item_values(self, size: tuple[int, ...]) -> int:
        """How many values an item holds in Gemma4Vision's flat input."""
        if len(size) == 1:
            return size[0] * self.audio.mels
        return size[0] * size[1] * 3 * self.patch_size ** 2

    @property
    def placeholder_id(self) -> int:
        return self.image_token_id

    @property
    def bidirectional(self) -> bool:
        """An image's tokens see each other both ways (on the sliding layers): each image
        is then prefilled within one chunk (ImageInputs.chunk_len)."""
        return self.image_blocks

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """(rows, columns) of patches an image of `size` (height, width) is resized to, as
        HF's get_aspect_ratio_preserving_size picks it."""
        h, w = size
        p, k = self.patch_size, self.pooling_kernel_size
        max_patches = self.max_soft_tokens * k * k
        factor = math.sqrt(max_patches * p * p / (h * w))
        side = k * p
        th, tw = int(math.floor(factor * h / side)) * side, int(math.floor(factor * w / side)) * side
        longest = (max_patches // k ** 2) * side
        if th == 0 and tw == 0:
            raise ValueError(f"an image of {h} x {w} pixels resizes to nothing")
        if th == 0:
            th, tw = side, min(int(math.floor(w / h)) * side, longest)
        elif tw == 0:
            th, tw = min(int(math.floor(h / w)) * side, longest), side
        if th * tw > max_patches * p * p:
            raise ValueError(f"an image of {h} x {w} pixels exceeds {max_patches} patches")
        return th // p, tw // p

    def tokens_for(self, size: tuple[int, int]) -> int:
        return self.grid_tokens(self.grid(size))

    def grid_tokens(self, grid: tuple[int, int]) -> int:
        """The soft tokens of a (rows, columns) patch grid: one per k x k block."""
        return grid[0] * grid[1] // self.pooling_kernel_size ** 2

    def tiles(self, size: tuple[int, int]) -> int:
        return 1


class ClippableLinear(nn.Module):
    """HF's Gemma4ClippableLinear: a linear (`.linear`, what LoRA targets), its input and
    output clamped by saved bounds when the config says so."""

    def __init__(self, d_in: int, d_out: int, clipped: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=False)
        self.clipped = clipped
        if clipped:
            for name in ("input_min", "input_max", "output_min", "output_max"):
                self.register_buffer(name, torch.tensor(math.inf * (-1 if "min" in name else 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clipped:
            x = torch.clamp(x, self.input_min, self.input_max)
        y = self.linear(x)
        return torch.clamp(y, self.output_min, self.output_max) if self.clipped else y


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-b, a), dim=-1) * sin


class VisionAttention(nn.Module):
    def __init__(self, c: Gemma4VisionConfig) -> None:
        super().__init__()
        self.c = c
        d, hd = c.hidden_size, c.head_dim
        self.q_proj = ClippableLinear(d, c.num_heads * hd, c.clipped)
        self.k_proj = ClippableLinear(d, c.num_kv_heads * hd, c.clipped)
        self.v_proj = ClippableLinear(d, c.num_kv_heads * hd, c.clipped)
        self.o_proj = ClippableLinear(c.num_heads * hd, d, c.clipped)
        self.q_norm = Gemma4RMSNorm(hd, c.eps)
        self.k_norm = Gemma4RMSNorm(hd, c.eps)
        self.v_norm = Gemma4RMSNorm(hd, c.eps, with_scale=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
                ) -> torch.Tensor:
        n, hd = x.shape[0], self.c.head_dim  # x: [patches, D], one image
        q = self._rope(self.q_norm(self.q_proj(x).view(n, -1, hd)), rope)
        k = self._rope(self.k_norm(self.k_proj(x).view(n, -1, hd)), rope)
        v = self.v_norm(self.v_proj(x).view(n, -1, hd))
        rep = self.c.num_heads // self.c.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                             v.transpose(0, 1), scale=1.0)
        return self.o_proj(out.transpose(0, 1).reshape(n, -1))

    @staticmethod
    def _rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The first half of each head turned by the column, the second by the row."""
        cos, sin = rope  # [patches, 2, head_dim / 2]
        halves = x.chunk(2, dim=-1)
        return torch.cat([_rotate(h, cos[:, None, i], sin[:, None, i])
                          for i, h in enumerate(halves)], dim=-1)


class VisionLayer(nn.Module):
    def __init__(self, c: Gemma4VisionConfig) -> None:
        super().__init__()
        self.self_attn = VisionAttention(c)
        self.mlp = nn.Module()
        for name, (i, o) in (("gate_proj", (c.hidden_size, c.intermediate_size)),
                             ("up_proj", (c.hidden_size, c.intermediate_size)),
                             ("down_proj", (c.intermediate_size, c.hidden_size))):
            setattr(self.mlp, name, ClippableLinear(i, o, c.clipped))
        for name in ("input_layernorm", "post_attention_layernorm",
                     "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            setattr(self, name, Gemma4RMSNorm(c.hidden_size, c.eps))
        self.act = ACTIVATIONS["gelu_tanh"]

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
                ) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope))
        h, m = self.pre_feedforward_layernorm(x), self.mlp
        return x + self.post_feedforward_layernorm(
            m.down_proj(self.act(m.gate_proj(h)) * m.up_proj(h)))


class VisionTower(nn.Module):
    """HF's Gemma4VisionModel (its names: patch_embedder, encoder.layers, std_*)."""

    def __init__(self, c: Gemma4VisionConfig) -> None:
        super().__init__()
        self.c = c
        self.patch_embedder = nn.Module()
        self.patch_embedder.input_proj = nn.Linear(3 * c.patch_size ** 2, c.hidden_size,
                                                   bias=False)
        self.patch_embedder.position_embedding_table = nn.Parameter(
            torch.ones(2, c.position_embedding_size, c.hidden_size))
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(VisionLayer(c) for _ in range(c.num_layers))
        if c.standardize:
            self.register_buffer("std_bias", torch.zeros(c.hidden_size))
            self.register_buffer("std_scale", torch.ones(c.hidden_size))
        quarter = c.head_dim // 2
        self.inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, quarter, 2).float() / quarter))

    def forward(self, patches: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """One image's real patches [rows x cols, 3 p^2] (row-major) -> its soft tokens
        [rows x cols / k^2, D] (fp32 until standardized, as HF)."""
        c, pe = self.c, self.patch_embedder
        ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        xs, ys = xs.flatten().to(patches.device), ys.flatten().to(patches.device)
        x = pe.input_proj((2 * (patches - 0.5)).to(pe.input_proj.weight.dtype))
        x = x + pe.position_embedding_table[0][xs] + pe.position_embedding_table[1][ys]
        freqs = torch.stack((xs, ys), -1)[..., None].float() * self.inv_freq.to(x.device)
        freqs = torch.cat((freqs, freqs), dim=-1)  # [patches, 2, head_dim / 2]
        rope = (freqs.cos().to(x.dtype), freqs.sin().to(x.dtype))
        for layer in self.encoder.layers:
            x = layer(x, rope)
        k = c.pooling_kernel_size
        grid = x.float().view(rows // k, k, cols // k, k, -1)
        pooled = grid.mean(dim=(1, 3)).flatten(0, 1) * c.hidden_size ** 0.5
        if c.standardize:
            pooled = (pooled - self.std_bias.float()) * self.std_scale.float()
        return pooled.to(x.dtype)


class Gemma4Vision(VisionWeights):
    """Pixels (and audio features) -> one language-model input embedding per soft token."""

    label = "Gemma 4's vision tower / embedder"

    def __init__(self, c: Gemma4VisionConfig) -> None:
        super().__init__()
        self.config = c
        self.vision_tower = VisionTower(c)
        self.embed_vision = embedder(c.hidden_size, c.text_hidden_size, c.eps)
        if c.audio is not None:  # models/gemma4_audio.py
            from loraplex.models.gemma4_audio import AudioTower

            self.audio_tower = AudioTower(c.audio)
            self.embed_audio = embedder(c.audio.output_dims, c.text_hidden_size, c.audio.eps)

    def ours(self, name: str) -> str | None:
        name = name.removeprefix("model.")
        towers = ("vision_tower.", "embed_vision.") + (
            ("audio_tower.", "embed_audio.") if self.config.audio is not None else ())
        return name if name.startswith(towers) else None

    @torch.inference_mode()
    def forward(self, values: torch.Tensor, sizes: list[tuple[int, ...]]) -> torch.Tensor:
        """The items' values flat (images' and video frames' real patches, audio clips'
        mel frames, item after item) and each item's size (an image's or frame's
        (rows, columns) patch grid, a clip's (mel frames,)) -> [their soft tokens, text
        hidden]."""
        c = self.config
        out = []
        for flat, size in zip(values.split([c.item_values(s) for s in sizes]), sizes,
                              strict=True):
            if len(size) == 1:
                tower, embed = self.audio_tower, self.embed_audio
                x = tower(flat.view(size[0], -1).to(embed.embedding_projection.weight.dtype))
            else:
                tower, embed = self.vision_tower, self.embed_vision
                rows, cols = size
                x = tower(flat.view(rows * cols, -1).to(embed.embedding_projection.weight.dtype),
                          rows, cols)
            out.append(embed.embedding_projection(embed.embedding_pre_projection_norm(x)))
        return torch.cat(out)


def embedder(d_in: int, d_out: int, eps: float) -> nn.Module:
    """HF's Gemma4MultimodalEmbedder: RMSNorm without a weight, one linear."""
    e = nn.Module()
    e.embedding_pre_projection_norm = Gemma4RMSNorm(d_in, eps, with_scale=False)
    e.embedding_projection = nn.Linear(d_in, d_out, bias=False)
    return e


def _audio_fields(hf: Any) -> dict[str, Any]:
    """The audio tower's config and tokens, where the checkpoint has one."""
    if getattr(hf, "audio_config", None) is None:
        return {}
    from loraplex.models.gemma4_audio import Gemma4AudioConfig

    eoa = getattr(hf, "eoa_token_id", None)
    return dict(audio=Gemma4AudioConfig.from_hf(hf), audio_token_id=int(hf.audio_token_id),
                boa_token_id=int(hf.boa_token_id),
                eoa_token_id=int(hf.eoa_token_index if eoa is None else eoa))
