"""Phi-4-multimodal's audio side (HF's Phi4MultimodalAudioEmbedding): log-mel features
normalized by the checkpoint's global mean / inverse std, an 8x conv subsampling (NeMo's:
a stride-2 conv, then depthwise + pointwise stride-2 pairs), conformer blocks (half-step
feed-forward, self-attention with a learned relative-position bias, a causal depthwise
conv module with a GLU, half-step feed-forward, LayerNorm), then a two-layer projection
(GELU) to the language model's width: the `speech` one, or the `vision_speech` one when
the prompt holds images too, as HF picks it. One vector per `<|audio|>` token.

One clip at a time, as HF runs a single clip (no padding mask); past 500 subsampled
positions HF folds the sequence into 500-long chunks encoded apart (the last zero-padded
and unmasked, as HF leaves it): the same here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CHUNK = 500  # HF's max_seq_len: positions per encoder pass
_ACTS = {"swish": F.silu, "silu": F.silu, "relu": F.relu, "gelu": F.gelu}


@dataclass(frozen=True)
class Phi4MMAudioConfig:
    """What the audio embedding reads of HF's Phi4MultimodalAudioConfig."""

    hidden_size: int
    intermediate_size: int
    blocks: int
    heads: int
    act: str
    chunk_size: int
    left_chunk: int
    ext_pw_out_channel: int
    depthwise_out_channel: int
    depthwise_multiplier: int
    kernel_size: int
    conv_act: str
    glu_act: str
    input_size: int
    time_reduction: int
    bias_max_distance: int
    bias_symmetric: bool
    nemo_act: str
    nemo_channels: int
    nemo_final_size: int
    text_hidden_size: int
    audio_token_id: int

    @classmethod
    def from_hf(cls, hf: Any) -> Phi4MMAudioConfig:
        a = hf.audio_config
        for field in ("activation", "conv_activation", "conv_glu_type", "nemo_activation"):
            if getattr(a, field) not in _ACTS:
                raise ValueError(f"audio_config.{field}={getattr(a, field)!r} is not supported")
        if a.downsample_rate != 1:
            raise ValueError(f"audio_config.downsample_rate={a.downsample_rate} is not "
                             "supported (1 is)")
        # (transformers 4.x spells it depthwise_seperable_out_channel)
        separable = getattr(a, "depthwise_separable_out_channel",
                            getattr(a, "depthwise_seperable_out_channel", None))
        if a.ext_pw_out_channel != a.hidden_size or separable != a.hidden_size:
            raise ValueError("audio_config: the conv module's channels must be hidden_size")
        return cls(a.hidden_size, a.intermediate_size, a.num_blocks, a.num_attention_heads,
                   a.activation, a.chunk_size, a.left_chunk, a.ext_pw_out_channel,
                   separable, a.depthwise_multiplier, a.kernel_size,
                   a.conv_activation, a.conv_glu_type, a.input_size, a.time_reduction,
                   a.bias_max_distance, a.bias_symmetric, a.nemo_activation,
                   a.nemo_conv_channels, a.nemo_final_size, hf.hidden_size,
                   int(a.audio_token_id))


class FeedForward(nn.Module):
    def __init__(self, c: Phi4MMAudioConfig) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(c.hidden_size)
        self.gate_up_proj = nn.Linear(c.hidden_size, 2 * c.intermediate_size)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size)
        self.act = _ACTS[c.act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, gate = self.gate_up_proj(self.layer_norm(x)).chunk(2, dim=-1)  # up first
        return self.down_proj(up * self.act(gate))


class Attention(nn.Module):
    def __init__(self, c: Phi4MMAudioConfig) -> None:
        super().__init__()
        self.heads = c.heads
        d = c.hidden_size
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """[chunks, n, d]; bias: [1, heads, n, n] added to the scores."""
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, d))


class ConvModule(nn.Module):
    """LayerNorm, a pointwise GLU, a causal depthwise + pointwise conv, the activation, a
    last pointwise conv (HF's names)."""

    def __init__(self, c: Phi4MMAudioConfig) -> None:
        super().__init__()
        d, k = c.hidden_size, c.kernel_size
        self.kernel = k
        self.layer_norm = nn.LayerNorm(d)
        self.glu = nn.Module()
        self.glu.ext_pw_conv_1d = nn.Conv1d(d, 2 * c.ext_pw_out_channel, 1)
        self.glu.b1 = nn.Parameter(torch.zeros(1, c.ext_pw_out_channel, 1))
        self.glu.b2 = nn.Parameter(torch.zeros(1, c.ext_pw_out_channel, 1))
        self.dw_sep_conv_1d = nn.Module()
        self.dw_sep_conv_1d.dw_conv = nn.Conv1d(d, d * c.depthwise_multiplier, k,
                                                padding=k - 1, groups=d)
        self.dw_sep_conv_1d.pw_conv = nn.Conv1d(d * c.depthwise_multiplier,
                                                c.depthwise_out_channel, 1)
        self.ext_pw_conv_1d = nn.Conv1d(d, c.ext_pw_out_channel, 1)
        self.glu_act, self.act = _ACTS[c.glu_act], _ACTS[c.conv_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.glu
        h = g.ext_pw_conv_1d(self.layer_norm(x).transpose(1, 2))  # [b, 2 C, n]
        half = h.shape[1] // 2
        h = (h[:, :half] + g.b1) * self.glu_act(h[:, half:] + g.b2)
        h = self.dw_sep_conv_1d.pw_conv(self.dw_sep_conv_1d.dw_conv(h))
        if self.kernel > 1:
            h = h[:, :, :-(self.kernel - 1)]  # causal: the right padding's outputs dropped
        return self.ext_pw_conv_1d(self.act(h)).transpose(1, 2)


class ConformerBlock(nn.Module):
    def __init__(self, c: Phi4MMAudioConfig) -> None:
        super().__init__()
        self.feed_forward_in = FeedForward(c)
        self.self_attn = Attention(c)
        self.conv = ConvModule(c)
        self.feed_forward_out = FeedForward(c)
        self.layer_norm_att = nn.LayerNorm(c.hidden_size)
        self.layer_norm = nn.LayerNorm(c.hidden_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.feed_forward_in(x)
        x = x + self.self_attn(self.layer_norm_att(x), bias)
        x = x + self.conv(x)
        x = x + 0.5 * self.feed_forward_out(x)
        return self.layer_norm(x)


class Subsampling(nn.Module):
    """NeMo's conv subsampling by `time_reduction` (HF's `embed`: conv.* and out)."""

    def __init__(self, c: Phi4MMAudioConfig) -> None:
        super().__init__()
        ch, act = c.nemo_channels, _ACTS[c.nemo_act]
        act_module = nn.ReLU() if act is F.relu else nn.SiLU() if act is F.silu else nn.GELU()
        layers: list[nn.Module] = [nn.Conv2d(1, ch, 3, stride=2, padding=1), act_module]
        for _ in range(int(math.log2(c.time_reduction)) - 1):
            layers += [nn.Conv2d(ch, ch, 3, stride=2, padding=1, groups=ch),
                       nn.Conv2d(ch, ch, 1), act_module]
        self.conv = nn.Sequential(*layers)
        self.out = nn.Linear(ch * c.nemo_final_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[frames, mels] -> [ceil(frames / reduction), hidden]."""
        h = self.conv(x[None, None])  # [1, ch, n, f]
        return self.out(h[0].transpose(0, 1).reshape(h.shape[2], -1))


def chunk_mask(n: int, chunk: int, left: int) -> torch.Tensor:
    """[n, n] bool: HF's streaming mask (adaptive_enc_mask): each position sees its own
    chunk of `chunk` positions and `left` chunks before; chunk <= 0: one chunk (all)."""
    starts = list(range(0, n, chunk)) if chunk > 0 else []
    first = torch.tensor([0, *starts])  # each chunk's start, an empty leading one first
    end = torch.tensor([*starts, n])
    pos = torch.arange(n)
    which = ((pos[:, None] < end) & (pos[:, None] >= first)).nonzero()[:, 1]
    lo = first[(which - left).clamp(min=0)]
    hi = end[which.clamp(max=len(starts))]
    return (pos[None] >= lo[:, None]) & (pos[None] < hi[:, None])


class AudioEncoder(nn.Module):
    def __init__(self, c: Phi4MMAudioConfig) -> None:
        super().__init__()
        self.config = c
        self.encoder_embedding = nn.Module()
        self.encoder_embedding.register_buffer("global_mean", torch.zeros(c.input_size))
        self.encoder_embedding.register_buffer("global_invstd", torch.ones(c.input_size))
        self.embed = Subsampling(c)
        self.relative_attention_bias_layer = nn.Module()
        buckets = c.bias_max_distance * (1 if c.bias_symmetric else 2)
        self.relative_attention_bias_layer.bias_values = nn.Embedding(buckets, c.heads)
        self.encoders = nn.ModuleList(ConformerBlock(c) for _ in range(c.blocks))

    def relative_bias(self, n: int) -> torch.Tensor:
        """[1, heads, n, n]: the learned bias of each (query, key) distance, clipped."""
        c, table = self.config, self.relative_attention_bias_layer.bias_values
        pos = torch.arange(n, device=table.weight.device)
        rel = (pos[None] - pos[:, None]).clamp(-c.bias_max_distance, c.bias_max_distance - 1)
        idx = rel.abs() if c.bias_symmetric else rel + table.num_embeddings // 2
        return table(idx).permute(2, 0, 1)[None]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[frames, mels] -> [ceil(frames / reduction), hidden]."""
        c, e = self.config, self.encoder_embedding
        x = self.embed((features - e.global_mean) * e.global_invstd)
        n = x.shape[0]
        span = min(n, CHUNK)
        pad = -n % CHUNK if n > CHUNK else 0
        x = F.pad(x, (0, 0, 0, pad)).view(-1, span, x.shape[-1])  # [chunks, span, d]
        # HF adds the bool mask as 0 / 1 to the bias (a shift, not a mask, where it is all
        # true); kept as it is
        mask = chunk_mask(span, c.chunk_size, c.left_chunk).to(x.device, x.dtype)
        bias = mask[None, None] + self.relative_bias(span)
        for block in self.encoders:
            x = block(x, bias)
        return x.reshape(-1, x.shape[-1])[:n]


class AudioEmbedding(nn.Module):
    """HF's names: the encoder and both projections."""

    def __init__(self, c: Phi4MMAudioConfig) -> None:
        super().__init__()
        self.encoder = AudioEncoder(c)
        d, t = c.hidden_size, c.text_hidden_size
        self.up_proj_for_speech, self.down_proj_for_speech = nn.Linear(d, t), nn.Linear(t, t)
        self.up_proj_for_vision_speech = nn.Linear(d, t)
        self.down_proj_for_vision_speech = nn.Linear(t, t)

    def forward(self, features: torch.Tensor, tokens: int, with_images: bool) -> torch.Tensor:
        """One clip's [frames, mels] -> [tokens, text hidden]."""
        x = self.encoder(features)
        if with_images:
            up, down = self.up_proj_for_vision_speech, self.down_proj_for_vision_speech
        else:
            up, down = self.up_proj_for_speech, self.down_proj_for_speech
        out = down(F.gelu(up(x)))
        if out.shape[0] < tokens:
            raise ValueError(f"a clip gives {out.shape[0]} audio embeddings for {tokens} "
                             "placeholders")
        return out[:tokens]
