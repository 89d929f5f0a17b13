"""Granite Speech's audio side (`GraniteSpeechForConditionalGeneration`, IBM's
granite-speech-3.x): a CTC conformer encodes the log-mel frames (engine/audio.py), a
window-level Q-Former (BLIP-2's) turns each window of `window_size` encoder frames into
`window_size // downsample_rate` vectors, a linear maps them to the language model's width,
and each vector takes the place of one `<|audio|>` token, as HF's model splices them.

The language model is loraplex's Granite (its multipliers: the audio rows are scaled by
`embedding_multiplier` as HF scales every input embedding); this module runs once per clip
at its first prefill step (engine/images.py's ImageInputs carry the frames). The
checkpoint's own LoRA adapter (its adapter_config.json beside the weights) targets the
language model: it is served as an ordinary adapter, default_mm_loras={"audio": ...}.

Each clip is encoded alone: HF pads a batch of clips to the longest and its encoder has no
mask, so a short clip's output in a padded batch depends on its neighbours; one clip per
call is HF's unpadded result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.models.llava import VISION_ACTIVATIONS, VisionWeights, check_activation


def is_granite_speech(hf_config: Any) -> bool:
    return getattr(hf_config, "model_type", None) == "granite_speech"


@dataclass(frozen=True)
class GraniteSpeechAudioConfig:
    """What the encoder, the projector and the splice read of a GraniteSpeechConfig."""

    input_dim: int  # a frame: two stacked log-mel frames (2 * n_mels)
    num_layers: int
    hidden_dim: int
    feedforward_mult: int
    num_heads: int
    dim_head: int
    output_dim: int  # the mid-layer CTC vocabulary
    context_size: int  # attention runs within blocks of this many frames
    max_pos_emb: int
    conv_kernel_size: int
    conv_expansion_factor: int
    # the Q-Former
    window_size: int
    downsample_rate: int
    q_hidden: int
    q_heads: int
    q_intermediate: int
    q_layers: int
    q_cross_every: int
    q_encoder_hidden: int
    q_act: str
    q_eps: float
    text_hidden_size: int
    image_token_id: int  # the `<|audio|>` token (engine/images.py's name for a placeholder)
    embedding_multiplier: float  # Granite's, on every input embedding

    @classmethod
    def from_hf(cls, hf: Any) -> GraniteSpeechAudioConfig:
        e, p, t = hf.encoder_config, hf.projector_config, hf.text_config
        if getattr(p, "model_type", "blip_2_qformer") != "blip_2_qformer":
            raise ValueError(f"Granite Speech with a {p.model_type!r} projector is not "
                             "supported (a blip_2_qformer one is)")
        if getattr(p, "use_qformer_text_input", False):
            raise ValueError("Granite Speech's Q-Former with use_qformer_text_input=True is "
                             "not supported")
        if hf.window_size % hf.downsample_rate:
            raise ValueError(f"window_size={hf.window_size} is not a multiple of "
                             f"downsample_rate={hf.downsample_rate}")
        check_activation("projector_config.hidden_act", p.hidden_act)
        return cls(e.input_dim, e.num_layers, e.hidden_dim, e.feedforward_mult, e.num_heads,
                   e.dim_head or e.hidden_dim // e.num_heads, e.output_dim, e.context_size,
                   e.max_pos_emb, e.conv_kernel_size, e.conv_expansion_factor,
                   hf.window_size, hf.downsample_rate, p.hidden_size, p.num_attention_heads,
                   p.intermediate_size, p.num_hidden_layers, p.cross_attention_frequency,
                   p.encoder_hidden_size, p.hidden_act, p.layer_norm_eps, t.hidden_size,
                   int(hf.audio_token_id), float(getattr(t, "embedding_multiplier", 1.0)))

    @property
    def bidirectional(self) -> bool:
        """Audio rows are causal in the language model, like text."""
        return False

    @property
    def queries(self) -> int:
        return self.window_size // self.downsample_rate

    def tokens_for(self, frames: int) -> int:
        """Placeholders a clip of `frames` encoder frames takes: a query's vector per
        window (the last one padded), as HF's feature extractor counts them."""
        return math.ceil(frames / self.window_size) * self.queries


# ---- the conformer ---------------------------------------------------------------------
class ConformerFeedForward(nn.Module):
    def __init__(self, c: GraniteSpeechAudioConfig) -> None:
        super().__init__()
        self.pre_norm = nn.LayerNorm(c.hidden_dim)
        self.up_proj = nn.Linear(c.hidden_dim, c.hidden_dim * c.feedforward_mult)
        self.down_proj = nn.Linear(c.hidden_dim * c.feedforward_mult, c.hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.up_proj(self.pre_norm(x))))


class ConformerAttention(nn.Module):
    """Attention within blocks of `context_size` frames (the last block padded, its padding
    masked), with Shaw's relative positions: a learned vector per clamped distance, dotted
    with the query and added to the logits."""

    def __init__(self, c: GraniteSpeechAudioConfig) -> None:
        super().__init__()
        if not 0 < c.context_size <= c.max_pos_emb:
            raise ValueError(f"encoder context_size={c.context_size} must be in "
                             f"(0, max_pos_emb={c.max_pos_emb}]")
        inner = c.dim_head * c.num_heads
        self.c = c
        self.pre_norm = nn.LayerNorm(c.hidden_dim)
        self.to_q = nn.Linear(c.hidden_dim, inner, bias=False)
        self.to_kv = nn.Linear(c.hidden_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, c.hidden_dim)
        self.rel_pos_emb = nn.Embedding(2 * c.max_pos_emb + 1, c.dim_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, n = self.c, x.shape[0]  # x: [frames, hidden], one clip
        x = self.pre_norm(x)
        size = c.context_size
        blocks, tail = math.ceil(n / size), n % size
        x = F.pad(x, (0, 0, 0, blocks * size - n))
        q = self.to_q(x).view(blocks, size, c.num_heads, -1).transpose(1, 2)
        k, v = (t.reshape(blocks, size, c.num_heads, -1).transpose(1, 2)
                for t in self.to_kv(x).chunk(2, dim=-1))
        seq = torch.arange(size, device=x.device)
        dists = (seq[:, None] - seq[None, :]).clamp(-size, size) + c.max_pos_emb
        rel = self.rel_pos_emb(dists)  # [size, size, dim_head]
        scale = c.dim_head ** -0.5
        bias = torch.einsum("bhcd,crd->bhcr", q, rel) * scale  # [blocks, heads, size, size]
        if tail:  # the padded block: only its first `tail` frames see each other
            keep = torch.zeros(size, size, dtype=torch.bool, device=x.device)
            keep[:tail, :tail] = True
            bias[-1].masked_fill_(~keep, -torch.finfo(bias.dtype).max)
        weights = torch.softmax(q @ k.transpose(-1, -2) * scale + bias, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(blocks * size, -1)
        return self.to_out(out[:n])


class ConformerConv(nn.Module):
    """Pointwise conv + GLU, a depthwise conv (same length), batch norm, SiLU, pointwise."""

    def __init__(self, c: GraniteSpeechAudioConfig) -> None:
        super().__init__()
        inner = c.hidden_dim * c.conv_expansion_factor
        self.norm = nn.LayerNorm(c.hidden_dim)
        self.up_conv = nn.Conv1d(c.hidden_dim, inner * 2, 1)
        self.depth_conv = DepthwiseConv(inner, c.conv_kernel_size)
        self.batch_norm = nn.BatchNorm1d(inner)
        self.down_conv = nn.Conv1d(inner, c.hidden_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.glu(self.up_conv(self.norm(x).T), dim=0)  # [channels, frames]
        h = F.silu(self.batch_norm(self.depth_conv(h)[None])[0])
        return self.down_conv(h).T


class DepthwiseConv(nn.Module):
    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.padding = (kernel // 2, kernel // 2 - (kernel + 1) % 2)
        self.conv = nn.Conv1d(channels, channels, kernel, groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding))


class ConformerBlock(nn.Module):
    """Macaron feed-forward halves around attention and convolution, then a norm."""

    def __init__(self, c: GraniteSpeechAudioConfig) -> None:
        super().__init__()
        self.ff1 = ConformerFeedForward(c)
        self.attn = ConformerAttention(c)
        self.conv = ConformerConv(c)
        self.ff2 = ConformerFeedForward(c)
        self.post_norm = nn.LayerNorm(c.hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ff1(x)
        x = x + self.attn(x)
        x = x + self.conv(x)
        x = x + 0.5 * self.ff2(x)
        return self.post_norm(x)


class CTCEncoder(nn.Module):
    """The conformer; after the middle layer, the CTC head's softmax is projected back and
    added (the model was trained with that feedback)."""

    def __init__(self, c: GraniteSpeechAudioConfig) -> None:
        super().__init__()
        self.input_linear = nn.Linear(c.input_dim, c.hidden_dim)
        self.layers = nn.ModuleList(ConformerBlock(c) for _ in range(c.num_layers))
        self.out = nn.Linear(c.hidden_dim, c.output_dim)
        self.out_mid = nn.Linear(c.output_dim, c.hidden_dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = self.input_linear(frames)
        for i, layer in enumerate(self.layers, start=1):
            x = layer(x)
            if i == len(self.layers) // 2:
                x = x + self.out_mid(torch.softmax(self.out(x), dim=-1))
        return x


# ---- the Q-Former ----------------------------------------------------------------------
class QFormerAttention(nn.Module):
    """BLIP-2's (BERT's) attention with its output projection, residual and post-norm;
    cross-attention takes keys and values from the encoder's frames."""

    def __init__(self, c: GraniteSpeechAudioConfig, cross: bool) -> None:
        super().__init__()
        kv_in = c.q_encoder_hidden if cross else c.q_hidden
        self.heads = c.q_heads
        self.attention = nn.Module()
        self.attention.query = nn.Linear(c.q_hidden, c.q_hidden)
        self.attention.key = nn.Linear(kv_in, c.q_hidden)
        self.attention.value = nn.Linear(kv_in, c.q_hidden)
        self.output = nn.Module()
        self.output.dense = nn.Linear(c.q_hidden, c.q_hidden)
        self.output.LayerNorm = nn.LayerNorm(c.q_hidden, eps=c.q_eps)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        a = self.attention
        b, n, d = x.shape  # x: [windows, queries, hidden]; kv: [windows, frames, ...]
        q, k, v = (p(s).view(b, s.shape[1], self.heads, -1).transpose(1, 2)
                   for p, s in ((a.query, x), (a.key, kv), (a.value, kv)))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.output.LayerNorm(self.output.dense(out) + x)


class QFormerFeedForward(nn.Module):
    def __init__(self, c: GraniteSpeechAudioConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.q_hidden, c.q_intermediate)
        self.act = VISION_ACTIVATIONS[c.q_act]


class QFormerOutput(nn.Module):
    def __init__(self, c: GraniteSpeechAudioConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.q_intermediate, c.q_hidden)
        self.LayerNorm = nn.LayerNorm(c.q_hidden, eps=c.q_eps)


class QFormerLayer(nn.Module):
    def __init__(self, c: GraniteSpeechAudioConfig, index: int) -> None:
        super().__init__()
        self.attention = QFormerAttention(c, cross=False)
        self.crossattention = (QFormerAttention(c, cross=True)
                               if index % c.q_cross_every == 0 else None)
        self.intermediate_query = QFormerFeedForward(c)
        self.output_query = QFormerOutput(c)

    def forward(self, x: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x)
        if self.crossattention is not None:
            x = self.crossattention(x, frames)
        mid = self.intermediate_query
        out = self.output_query
        return out.LayerNorm(out.dense(mid.act(mid.dense(x))) + x)


class QFormer(nn.Module):
    def __init__(self, c: GraniteSpeechAudioConfig) -> None:
        super().__init__()
        self.layernorm = nn.LayerNorm(c.q_hidden, eps=c.q_eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(QFormerLayer(c, i) for i in range(c.q_layers))

    def forward(self, queries: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        x = self.layernorm(queries)
        for layer in self.encoder.layer:
            x = layer(x, frames)
        return x


class WindowProjector(nn.Module):
    """Each window of `window_size` encoder frames (the last zero-padded) -> the learned
    queries after the Q-Former has read it -> the language model's width."""

    def __init__(self, c: GraniteSpeechAudioConfig) -> None:
        super().__init__()
        self.c = c
        self.query = nn.Parameter(torch.empty(1, c.queries, c.q_hidden))
        self.qformer = QFormer(c)
        self.linear = nn.Linear(c.q_hidden, c.text_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.c.window_size
        windows = math.ceil(x.shape[0] / w)
        x = F.pad(x, (0, 0, 0, windows * w - x.shape[0])).view(windows, w, -1)
        out = self.qformer(self.query.expand(windows, -1, -1), x)
        return self.linear(out.flatten(0, 1))


class GraniteSpeechAudio(VisionWeights):
    """Log-mel frames -> one language-model input embedding per `<|audio|>` token."""

    label = "Granite Speech's encoder / projector"

    def __init__(self, c: GraniteSpeechAudioConfig) -> None:
        super().__init__()
        self.config = c
        self.encoder = CTCEncoder(c)
        self.projector = WindowProjector(c)

    def ours(self, name: str) -> str | None:
        """Checkpoint names: `encoder.*` / `projector.*` (the hub's files) or
        `model.encoder.*` / `model.projector.*` (saved by transformers 5)."""
        return name.removeprefix("model.")

    @torch.inference_mode()
    def forward(self, frames: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
        """[frames, input_dim] of clips of `sizes` (frames, placeholders), stacked ->
        [their placeholders, text hidden], clip after clip (each clip encoded alone)."""
        dtype = self.projector.linear.weight.dtype
        out = []
        for clip, (_, tokens) in zip(frames.to(dtype).split([f for f, _ in sizes]), sizes,
                                     strict=True):
            embeds = self.projector(self.encoder(clip))
            if embeds.shape[0] != tokens:
                raise ValueError(f"a clip gives {embeds.shape[0]} audio embeddings for "
                                 f"{tokens} placeholders")
            out.append(embeds)
        return torch.cat(out) * self.config.embedding_multiplier
