"""Qwen2-VL's and Qwen2.5-VL's vision tower (Wang et al., "Qwen2-VL"; Bai et al.,
"Qwen2.5-VL"): a ViT over the image processor's patches at the image's own resolution,
and over a video's (engine/qwen_videos.py) with the same weights: each temporal patch of
a video attends within itself only (HF's cu_seqlens per frame pair).

A patch is `temporal_patch_size` frames (an image: itself, repeated) of patch_size^2
pixels, embedded by a Conv3d whose stride is its kernel. The processor lays each image's
patches out in `spatial_merge_size`^2 blocks (a 2 x 2 square of neighbours after one
another), which the PatchMerger concatenates and maps by an MLP to one language-model
embedding. Attention is bidirectional within an image and rotates q/k with a 2-D rope:
the first half of the rotated frequencies by the patch's row, the second by its column.

Qwen2-VL: LayerNorm blocks with a GELU MLP (fc1, fc2). Qwen2.5-VL: RMSNorm blocks with a
SwiGLU MLP (gate/up/down, biased) and window attention: a block not in
`fullatt_block_indexes` attends only within windows of `window_size` pixels (its tokens
reordered window by window, merge blocks kept whole, and put back after the merger).

Checkpoints name the tower `visual.*` (the hub's files, transformers < 4.52) or
`model.visual.*` (saved since): `QwenVision.load_weight` takes both. The language model
is loraplex's Llama (Qwen2's qkv bias) with M-RoPE (models/mrope.py, layers/rotary.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.layers.norm import RMSNorm
from loraplex.models.llava import VISION_ACTIVATIONS, VisionWeights, check_activation

Grid = tuple[int, int, int]  # an image's patches: (t, h, w), as image_grid_thw
ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                 "Qwen3VLForConditionalGeneration",  # Qwen3-VL: models/qwen3_vl.py
                 "Qwen3VLMoeForConditionalGeneration")


def is_qwen_vl(hf_config: Any) -> bool:
    """The checkpoint is a Qwen2-VL, Qwen2.5-VL or Qwen3-VL (its images take a tower of
    this module's parts; Qwen3-VL's: models/qwen3_vl.py)."""
    return any(a in ARCHITECTURES for a in getattr(hf_config, "architectures", None) or [])


def _token_id(hf: Any, name: str, default: int | None = None) -> int:
    """A special token's id, where the config keeps it: at its top (transformers 5, the
    hub's files) or in its text config (transformers 4.x keeps vision_start_token_id
    there); `default` when it names none (else an error)."""
    value = getattr(hf, name, None)
    if value is None:
        value = getattr(getattr(hf, "text_config", None), name, None)
    if value is None:
        if default is not None:
            return default
        raise ValueError(f"the config names no {name}")
    return int(value)


@dataclass(frozen=True)
class QwenVisionConfig:
    qwen25: bool  # Qwen2.5-VL (RMSNorm, SwiGLU, windows); else Qwen2-VL
    hidden_size: int  # the tower's
    intermediate_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int  # spatial_merge_size: merge blocks are merge_size^2 patches
    in_channels: int
    hidden_act: str
    text_hidden_size: int  # the merger's output
    window_size: int  # Qwen2.5-VL's, in pixels (0: no windows)
    full_attention_layers: tuple[int, ...]  # Qwen2.5-VL's fullatt_block_indexes
    rope_theta: float
    image_token_id: int
    vision_start_token_id: int
    video_token_id: int  # `<|video_pad|>` (-1: the config names none, videos refused)
    # Qwen2.5-VL's vision_config.tokens_per_second: a video's temporal positions step by
    # tokens_per_second x second_per_grid_t (0: Qwen2-VL's, by 1)
    tokens_per_second: float

    @classmethod
    def from_hf(cls, hf: Any) -> QwenVisionConfig:
        v = hf.vision_config
        qwen25 = hf.model_type == "qwen2_5_vl"
        check_activation("vision_config.hidden_act", v.hidden_act)
        params = getattr(v, "rope_parameters", None) or {}
        if qwen25:
            hidden, inter, out = v.hidden_size, v.intermediate_size, v.out_hidden_size
            window, full = int(v.window_size), tuple(v.fullatt_block_indexes)
        else:
            hidden, out = v.embed_dim, v.hidden_size
            inter, window, full = int(v.embed_dim * v.mlp_ratio), 0, ()
        return cls(qwen25, hidden, inter, v.depth, v.num_heads, v.patch_size,
                   v.temporal_patch_size, v.spatial_merge_size,
                   getattr(v, "in_channels", getattr(v, "in_chans", 3)), v.hidden_act, out,
                   window, full, float(params.get("rope_theta", 10000.0)),
                   _token_id(hf, "image_token_id"), _token_id(hf, "vision_start_token_id"),
                   _token_id(hf, "video_token_id", -1),
                   float(getattr(v, "tokens_per_second", 0) or 0) if qwen25 else 0.0)

    def tokens_for(self, grid: Grid) -> int:
        """Placeholder tokens (merged embeddings) of an image (or a video) of `grid`
        patches."""
        t, h, w = grid
        return t * h * w // self.merge_size ** 2


def patch_positions(c: QwenVisionConfig, grid: Grid) -> torch.Tensor:
    """[t*h*w, 2]: each patch's (row, column), in the processor's merge-block order."""
    t, h, w = grid
    m = c.merge_size
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    blocks = (h // m, m, w // m, m)
    rows = rows.reshape(blocks).transpose(1, 2).flatten()
    cols = cols.reshape(blocks).transpose(1, 2).flatten()
    return torch.stack([rows, cols], dim=-1).repeat(t, 1)


def frame_lengths(grids: list[Grid]) -> list[int]:
    """The tower's full-attention segments: each temporal patch (frame pair) of each grid
    on its own, as HF's cu_seqlens (an image is one; a video's frames never attend to
    each other's patches)."""
    return [h * w for t, h, w in grids for _ in range(t)]


def window_order(c: QwenVisionConfig, grids: list[Grid]) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL's windows over the merge blocks of `grids` (image after image): the
    blocks' order window by window (row-major windows, row-major blocks in each) and the
    windows' lengths in patches."""
    side = c.window_size // c.merge_size // c.patch_size  # merge blocks across a window
    order: list[torch.Tensor] = []
    lengths: list[int] = []
    first = 0
    for t, h, w in grids:
        bh, bw = h // c.merge_size, w // c.merge_size
        index = torch.arange(t * bh * bw).view(t, bh, bw)
        for frame in index:
            for r in range(0, bh, side):
                for col in range(0, bw, side):
                    window = frame[r:r + side, col:col + side].flatten()
                    order.append(window + first)
                    lengths.append(window.numel() * c.merge_size ** 2)
        first += t * bh * bw
    return torch.cat(order), lengths


class PatchEmbed(nn.Module):
    def __init__(self, c: QwenVisionConfig, bias: bool = False) -> None:
        """`bias`: Qwen3-VL's convolution has one."""
        super().__init__()
        self.shape = (-1, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
        kernel = (c.temporal_patch_size, c.patch_size, c.patch_size)
        self.proj = nn.Conv3d(c.in_channels, c.hidden_size, kernel, stride=kernel, bias=bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.view(self.shape).to(self.proj.weight.dtype)
        return self.proj(x).view(x.shape[0], -1)  # [patches, hidden]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D] rotated by halves (HF's rotate_half), in fp32 (also Pixtral's)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class VisionAttention(nn.Module):
    """Bidirectional attention within each segment (an image, or a window of one)."""

    def __init__(self, c: QwenVisionConfig) -> None:
        super().__init__()
        self.num_heads = c.num_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, lengths: list[int], cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)  # [N, H, D] each
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        return self.proj(segment_attention(q, k, v, lengths).reshape(n, -1))


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      lengths: list[int]) -> torch.Tensor:
    """Bidirectional attention within consecutive segments of `lengths` rows (q, k, v:
    [N, H, D]). Segments of one length (most of an image's windows) go in one batched
    call: a mask over all N rows would cost N^2, a call per window many launches."""
    out = torch.empty_like(q)
    firsts: dict[int, list[int]] = {}
    start = 0
    for n in lengths:
        firsts.setdefault(n, []).append(start)
        start += n
    for n, starts in firsts.items():
        rows = (torch.tensor(starts)[:, None] + torch.arange(n)).to(q.device)  # [segs, n]
        qs, ks, vs = (t[rows].transpose(1, 2) for t in (q, k, v))  # [segs, H, n, D]
        out[rows] = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)
    return out


class VisionMLP(nn.Module):
    """Qwen2-VL: fc2(act(fc1(x))); Qwen2.5-VL: down(act(gate(x)) * up(x)), biased."""

    def __init__(self, c: QwenVisionConfig) -> None:
        super().__init__()
        self.gated = c.qwen25
        self.act = VISION_ACTIVATIONS[c.hidden_act]
        if self.gated:
            self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size)
            self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size)
            self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size)
        else:
            self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
            self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act(self.fc1(x)))


def _norm(c: QwenVisionConfig, size: int) -> nn.Module:
    return RMSNorm(size) if c.qwen25 else nn.LayerNorm(size, eps=1e-6)


class VisionBlock(nn.Module):
    def __init__(self, c: QwenVisionConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = _norm(c, c.hidden_size), _norm(c, c.hidden_size)
        self.attn = VisionAttention(c)
        self.mlp = VisionMLP(c)

    def forward(self, x: torch.Tensor, lengths: list[int], cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), lengths, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Each merge block's patches (normed) concatenated, through Linear-GELU-Linear."""

    def __init__(self, c: QwenVisionConfig) -> None:
        super().__init__()
        self.ln_q = _norm(c, c.hidden_size)
        self.size = c.hidden_size * c.merge_size ** 2
        self.mlp = nn.Sequential(nn.Linear(self.size, self.size), nn.GELU(),
                                 nn.Linear(self.size, c.text_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.size))


def vision_inv_freq(c: QwenVisionConfig) -> torch.Tensor:
    """The 2-D rope's frequencies: a quarter of head_dim's, shared by rows and columns."""
    head_dim = c.hidden_size // c.num_heads
    quarter = torch.arange(0, head_dim // 2, 2, dtype=torch.float) / (head_dim // 2)
    return 1.0 / c.rope_theta ** quarter


def vision_rope(c: QwenVisionConfig, inv_freq: torch.Tensor, grids: list[Grid]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [patches, 1, head_dim]: rows' frequencies then columns', twice."""
    pos = torch.cat([patch_positions(c, g) for g in grids]).to(inv_freq.device)
    freqs = (pos[..., None].float() * inv_freq).flatten(1)  # [N, head_dim / 2]
    freqs = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
    return freqs.cos(), freqs.sin()


class QwenVision(VisionWeights):
    """Patches -> one language-model input embedding per placeholder token."""

    label = "Qwen-VL's vision tower"

    def __init__(self, c: QwenVisionConfig) -> None:
        super().__init__()
        self.config = c
        self.patch_embed = PatchEmbed(c)
        self.blocks = nn.ModuleList(VisionBlock(c) for _ in range(c.num_layers))
        self.merger = PatchMerger(c)
        self.register_buffer("inv_freq", vision_inv_freq(c), persistent=False)

    def rope(self, grids: list[Grid]) -> tuple[torch.Tensor, torch.Tensor]:
        return vision_rope(self.config, self.inv_freq, grids)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        """[patches, channels x temporal x patch^2] of images of `grids` -> [their
        placeholders, text hidden], image after image."""
        c, unit = self.config, self.config.merge_size ** 2
        x = self.patch_embed(pixels)
        cos, sin = self.rope(grids)
        full = frame_lengths(grids)
        order, windows = None, full
        if c.window_size:  # Qwen2.5-VL: window by window, merge blocks kept whole
            order, windows = window_order(c, grids)
            order = order.to(x.device)

            def permute(t: torch.Tensor) -> torch.Tensor:
                return t.view(-1, unit, *t.shape[1:])[order].flatten(0, 1)

            x, cos, sin = permute(x), permute(cos), permute(sin)
        for i, block in enumerate(self.blocks):
            lengths = full if not c.window_size or i in c.full_attention_layers else windows
            x = block(x, lengths, cos, sin)
        merged = self.merger(x)
        return merged if order is None else merged[torch.argsort(order)]

    def ours(self, name: str) -> str:
        """A checkpoint tensor's name in this module (`visual.*` or `model.visual.*`)."""
        return name.removeprefix("model.").removeprefix("visual.")
