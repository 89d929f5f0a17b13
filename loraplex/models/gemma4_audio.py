"""Gemma 4's audio side (Gemma4ForConditionalGeneration; transformers 5's Gemma4AudioModel,
a Universal Speech Model conformer, and the audio Gemma4MultimodalEmbedder).

One clip's log-mel features [frames, mels] (HF's Gemma4AudioFeatureExtractor) ->
- subsample_conv_projection: two 3 x 3 stride-2 convs over (time, mel), each then a
  LayerNorm over its channels and ReLU; (channels x mels / 4) per step into one linear;
  a quarter of the frames remain (`tokens_for`);
- conformer layers: a half-step feed-forward (clamped, RMS-normed, SiLU, x
  residual_weight), relative-position attention, a light conv (GLU, a causal depthwise
  conv, RMSNorm, SiLU), a second feed-forward, a final norm. Every linear but
  relative_k_proj sits in a Gemma4ClippableLinear (`.linear`);
- output_proj (with a bias); embed_audio: RMSNorm without a weight, one linear into the
  language model.

The attention is HF's chunked local attention computed over the whole clip at once:
query i sees keys i - d for 0 <= d < attention_context_left - 1 (and up to
attention_context_right - 1 ahead), logits (q_i . k_j + q_i . r_e) soft-capped, with
q scaled by softplus(per_dim_scale) / (sqrt(head_dim) ln 2), k by ln(1 + e) / ln 2, and
r_e = relative_k_proj([sin(e w), cos(e w)]) (w: 10000^(-i / (hidden / 2 - 1))) for
e = d + context / 2 - (attention_context_left - 1) in [0, context / 2], zero elsewhere
(context: chunk + left - 1 + right): what HF's blocked form's relative shift gives (with
the shipped chunk 12, left 13, right 0, e = d). A clip is
encoded alone (no padding: HF's padded frames are masked, so its real frames see
exactly what they see here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.layers.norm import Gemma4RMSNorm
from loraplex.models.gemma4_vision import ClippableLinear


@dataclass(frozen=True)
class Gemma4AudioConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    conv_channels: tuple[int, int]
    conv_kernel_size: int
    residual_weight: float
    chunk_size: int
    context_left: int
    context_right: int
    logit_cap: float
    invalid_logit: float
    clipped: bool
    eps: float
    gradient_clipping: float
    output_dims: int
    text_hidden_size: int

    @property
    def mels(self) -> int:
        """The mel bins a frame holds: the first conv's channels (HF's input projection
        takes channels[0] / 4 x channels[1] values a step: mels / 4 of each)."""
        return self.conv_channels[0]

    @classmethod
    def from_hf(cls, hf: Any) -> Gemma4AudioConfig:
        a = hf.audio_config
        if a.hidden_act != "silu":
            raise ValueError(f"Gemma 4 audio_config.hidden_act={a.hidden_act!r} is not "
                             "supported (silu is)")
        return cls(a.hidden_size, a.num_hidden_layers, a.num_attention_heads,
                   tuple(a.subsampling_conv_channels), a.conv_kernel_size,
                   float(a.residual_weight), a.attention_chunk_size, a.attention_context_left,
                   a.attention_context_right, float(a.attention_logit_cap),
                   float(a.attention_invalid_logits_value), bool(a.use_clipped_linears),
                   float(a.rms_norm_eps), float(a.gradient_clipping), a.output_proj_dims,
                   hf.text_config.hidden_size)

    @staticmethod
    def tokens_for(frames: int) -> int:
        """Soft tokens of `frames` mel frames: two stride-2 convs (kernel 3, padding 1)."""
        for _ in range(2):
            frames = (frames - 1) // 2 + 1
        return frames


class SubsampleLayer(nn.Module):
    def __init__(self, c_in: int, c_out: int, eps: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(c_out, eps=eps, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [C, T, F] -> [C', T / 2, F / 2]
        x = self.conv(x.to(self.conv.weight.dtype))
        return F.relu(self.norm(x.permute(1, 2, 0)).permute(2, 0, 1))


class Subsample(nn.Module):
    """HF's Gemma4AudioSubSampleConvProjection."""

    def __init__(self, c: Gemma4AudioConfig) -> None:
        super().__init__()
        c0, c1 = c.conv_channels
        self.layer0 = SubsampleLayer(1, c0, c.eps)
        self.layer1 = SubsampleLayer(c0, c1, c.eps)
        self.input_proj_linear = nn.Linear(c0 // 4 * c1, c.hidden_size, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.layer0(features[None]))  # [C1, T / 4, F / 4]
        return self.input_proj_linear(x.permute(1, 2, 0).flatten(1))


def _clamp(x: torch.Tensor, bound: float) -> torch.Tensor:
    bound = min(bound, torch.finfo(x.dtype).max)
    return torch.clamp(x, -bound, bound)


class FeedForward(nn.Module):
    def __init__(self, c: Gemma4AudioConfig) -> None:
        super().__init__()
        self.c = c
        self.ffw_layer_1 = ClippableLinear(c.hidden_size, 4 * c.hidden_size, c.clipped)
        self.ffw_layer_2 = ClippableLinear(4 * c.hidden_size, c.hidden_size, c.clipped)
        self.pre_layer_norm = Gemma4RMSNorm(c.hidden_size, c.eps)
        self.post_layer_norm = Gemma4RMSNorm(c.hidden_size, c.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.c.gradient_clipping
        h = self.ffw_layer_2(F.silu(self.ffw_layer_1(self.pre_layer_norm(_clamp(x, g)))))
        return x + self.post_layer_norm(_clamp(h, g)) * self.c.residual_weight


class AudioAttention(nn.Module):
    def __init__(self, c: Gemma4AudioConfig) -> None:
        super().__init__()
        self.c = c
        d, hd = c.hidden_size, c.hidden_size // c.num_heads
        for name in ("q_proj", "k_proj", "v_proj", "post"):
            setattr(self, name, ClippableLinear(d, d, c.clipped))
        self.relative_k_proj = nn.Linear(d, d, bias=False)
        self.per_dim_scale = nn.Parameter(torch.zeros(hd))
        self.q_scale = hd ** -0.5 / math.log(2)
        self.k_scale = math.log(1 + math.e) / math.log(2)
        self.context = c.chunk_size + c.context_left - 1 + c.context_right
        half = d // 2
        self.inv_timescales = torch.exp(
            torch.arange(half) * -(math.log(10000.0) / max(half - 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, heads = x.shape[0], self.c.num_heads
        q = self.q_proj(x).float().view(t, heads, -1) * self.q_scale \
            * F.softplus(self.per_dim_scale)
        k = self.k_proj(x).float().view(t, heads, -1) * self.k_scale
        v = self.v_proj(x).float().view(t, heads, -1)
        dist = torch.arange(t, device=x.device)[:, None] - torch.arange(t, device=x.device)
        logits = torch.einsum("ihd,jhd->hij", q, k) + self._relative(q, dist)
        cap = self.c.logit_cap
        logits = torch.tanh(logits / cap) * cap
        seen = (dist >= 0) & (dist < self.c.context_left - 1) | (dist < 0) & (
            -dist < self.c.context_right)
        logits = logits.masked_fill(~seen, self.c.invalid_logit)
        out = torch.einsum("hij,jhd->ihd", logits.softmax(-1), v)
        return self.post(out.reshape(t, -1).to(x.dtype))

    def _relative(self, q: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """[heads, t, t]: q_i . r_e, e = (i - j) + context / 2 - past, zero outside
        [0, context / 2] (the module docstring)."""
        top = self.context // 2
        dist = dist + top - (self.c.context_left - 1)
        d = torch.arange(top + 1, device=q.device, dtype=torch.float32)[:, None]
        w = self.inv_timescales.to(q.device)
        r = self.relative_k_proj(torch.cat([torch.sin(d * w), torch.cos(d * w)], -1).to(
            self.relative_k_proj.weight.dtype)).float().view(top + 1, self.c.num_heads, -1)
        qr = torch.einsum("ihd,phd->hip", q, r)  # [heads, t, top + 1]
        index = dist.clamp(0, top).expand(q.shape[1], -1, -1)
        out = qr.gather(2, index)
        return out.masked_fill(((dist < 0) | (dist > top))[None], 0.0)


class LightConv(nn.Module):
    def __init__(self, c: Gemma4AudioConfig) -> None:
        super().__init__()
        self.c = c
        d = c.hidden_size
        self.linear_start = ClippableLinear(d, 2 * d, c.clipped)
        self.linear_end = ClippableLinear(d, d, c.clipped)
        self.depthwise_conv1d = nn.Conv1d(d, d, c.conv_kernel_size, groups=d, bias=False)
        self.pre_layer_norm = Gemma4RMSNorm(d, c.eps)
        self.conv_norm = Gemma4RMSNorm(d, c.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.glu(self.linear_start(self.pre_layer_norm(x)), dim=-1)
        h = F.pad(h.T, (self.c.conv_kernel_size - 1, 0))  # causal: the past only
        h = _clamp(self.depthwise_conv1d(h).T, self.c.gradient_clipping)
        return x + self.linear_end(F.silu(self.conv_norm(h)))


class ConformerLayer(nn.Module):
    def __init__(self, c: Gemma4AudioConfig) -> None:
        super().__init__()
        self.c = c
        self.feed_forward1 = FeedForward(c)
        self.feed_forward2 = FeedForward(c)
        self.self_attn = AudioAttention(c)
        self.lconv1d = LightConv(c)
        for name in ("norm_pre_attn", "norm_post_attn", "norm_out"):
            setattr(self, name, Gemma4RMSNorm(c.hidden_size, c.eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.c.gradient_clipping
        x = self.feed_forward1(x)
        x = x + self.norm_post_attn(_clamp(self.self_attn(self.norm_pre_attn(_clamp(x, g))), g))
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(_clamp(x, g))


class AudioTower(nn.Module):
    """HF's Gemma4AudioModel (its names: subsample_conv_projection, layers, output_proj)."""

    def __init__(self, c: Gemma4AudioConfig) -> None:
        super().__init__()
        self.subsample_conv_projection = Subsample(c)
        self.layers = nn.ModuleList(ConformerLayer(c) for _ in range(c.num_layers))
        self.output_proj = nn.Linear(c.hidden_size, c.output_dims)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """One clip's real mel frames [frames, mels] -> [tokens_for(frames), output_dims]."""
        x = self.subsample_conv_projection(features)
        for layer in self.layers:
            x = layer(x)
        return self.output_proj(x)
