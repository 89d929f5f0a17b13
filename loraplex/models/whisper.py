"""Whisper (`WhisperForConditionalGeneration`, openai/whisper-*): an encoder-decoder, computed
as HF computes it.

- The encoder: two conv1d + GELU over the log-mel features of the 30 s window (3000
  frames -> 1500 positions), the checkpoint's sinusoidal position table added, pre-norm
  transformer layers (SDPA, bidirectional), a final LayerNorm. It runs once per request,
  at its first prefill step, under the request's adapter (worker/model_runner.py), and
  each decoder layer's cross-attention keys and values of its output are computed then
  too and kept on the request (engine/whisper_inputs.py's WhisperAudio): per request, not
  paged, freed with it.
- The decoder: token embedding + learned positions, pre-norm layers of causal
  self-attention (loraplex's paged KV cache, like any decoder), cross-attention over the
  request's encoder states (the step context's `cross`: each row span of the flat batch
  with its request's K/V) and an MLP; a final LayerNorm; the output projection tied to
  the token embedding (HF's proj_out).

Every projection is a plain Linear under HF's module name (`model.encoder.layers.N.
self_attn.q_proj`, `model.decoder.layers.N.encoder_attn.k_proj`, `fc1`, ...), none
packed, so a PEFT adapter's names are ours and LoRA wraps encoder and decoder alike.
As HF: queries are scaled before the product, k_proj has no bias, no embedding scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.layers.attention import Attention
from loraplex.layers.linear import make_linear
from loraplex.layers.rotary import RotaryEmbedding
from loraplex.lora.meta import LoRABatchMeta
from loraplex.models.llama import ImageRows, LlamaArgs
from loraplex.models.llava import VISION_ACTIVATIONS, check_activation
from loraplex.worker.context import StepContext, get_context, step_context

# one request's cross-attention keys and values, per decoder layer: ([H, S, D], [H, S, D])
CrossKV = list[tuple[torch.Tensor, torch.Tensor]]


def is_whisper(hf_config: Any) -> bool:
    return getattr(hf_config, "model_type", None) == "whisper"


@dataclass(frozen=True)
class WhisperConfig:
    """What the model reads of HF's WhisperConfig."""

    vocab_size: int
    d_model: int
    num_mel_bins: int
    encoder_layers: int
    encoder_heads: int
    encoder_ffn_dim: int
    decoder_layers: int
    decoder_heads: int
    decoder_ffn_dim: int
    act: str
    max_source_positions: int  # encoder positions of the 30 s window (1500)
    max_target_positions: int  # decoder positions (448)

    @classmethod
    def from_hf(cls, hf: Any) -> WhisperConfig:
        check_activation("activation_function", hf.activation_function)
        for heads in (hf.encoder_attention_heads, hf.decoder_attention_heads):
            if hf.d_model % heads:
                raise ValueError(f"d_model={hf.d_model} is not a multiple of {heads} heads")
        return cls(hf.vocab_size, hf.d_model, hf.num_mel_bins, hf.encoder_layers,
                   hf.encoder_attention_heads, hf.encoder_ffn_dim, hf.decoder_layers,
                   hf.decoder_attention_heads, hf.decoder_ffn_dim, hf.activation_function,
                   hf.max_source_positions, hf.max_target_positions)

    @property
    def window_frames(self) -> int:
        """Mel frames the encoder takes (3000: 30 s)."""
        return 2 * self.max_source_positions

    def cross_kv_bytes(self, dtype: torch.dtype) -> int:
        """One request's cross-attention K/V: every decoder layer's keys and values of
        the encoder's max_source_positions states (as much as that many tokens of KV
        cache: the decoder layers' self-attention has the same width)."""
        elem = torch.tensor([], dtype=dtype).element_size()
        return self.decoder_layers * 2 * self.max_source_positions * self.d_model * elem

    def decoder_args(self) -> LlamaArgs:
        """The decoder's shape as the engine sizes it (KV cache, vocabulary, positions):
        the paged cache holds the decoder's self-attention only."""
        head_dim = self.d_model // self.decoder_heads
        return LlamaArgs(vocab_size=self.vocab_size, hidden_size=self.d_model,
                         intermediate_size=self.decoder_ffn_dim,
                         num_layers=self.decoder_layers, num_heads=self.decoder_heads,
                         num_kv_heads=self.decoder_heads, head_dim=head_dim, norm_eps=1e-5,
                         rope_theta=10000.0, rope_scaling=None,
                         max_position=self.max_target_positions, tie_word_embeddings=True,
                         checkpoint_renames=(("proj_out.", "lm_head."),))


@dataclass
class CrossBatch:
    """The step's cross-attention inputs: rows [start, end) of the flat batch attend to
    `states[i]` (their request's K/V per decoder layer)."""

    spans: list[tuple[int, int]]
    states: list[CrossKV]


def serving_config(hf: Any) -> Any:
    """HF's WhisperConfig with max_position_embeddings, which the engine reads for
    max_model_len: the decoder's max_target_positions."""
    hf.max_position_embeddings = hf.max_target_positions
    return hf


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[N, heads * D] -> [heads, N, D]."""
    return x.view(x.shape[0], heads, -1).transpose(0, 1)


class EncoderAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scaling = (d // heads) ** -0.5
        self.q_proj = make_linear(d, [d], bias=True)
        self.k_proj = make_linear(d, [d], bias=False)
        self.v_proj = make_linear(d, [d], bias=True)
        self.out_proj = make_linear(d, [d], bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = _heads(self.q_proj(x) * self.scaling, self.heads)
        k, v = _heads(self.k_proj(x), self.heads), _heads(self.v_proj(x), self.heads)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # [H, N, D]
        return self.out_proj(out.transpose(0, 1).reshape(x.shape))


class EncoderLayer(nn.Module):
    def __init__(self, c: WhisperConfig) -> None:
        super().__init__()
        self.self_attn = EncoderAttention(c.d_model, c.encoder_heads)
        self.self_attn_layer_norm = nn.LayerNorm(c.d_model)
        self.fc1 = make_linear(c.d_model, [c.encoder_ffn_dim], bias=True)
        self.fc2 = make_linear(c.encoder_ffn_dim, [c.d_model], bias=True)
        self.final_layer_norm = nn.LayerNorm(c.d_model)
        self.act = VISION_ACTIVATIONS[c.act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    def __init__(self, c: WhisperConfig) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(c.num_mel_bins, c.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(c.d_model, c.d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(c.max_source_positions, c.d_model)
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.encoder_layers))
        self.layer_norm = nn.LayerNorm(c.d_model)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[n_mels, 3000] -> [1500, d_model]."""
        x = F.gelu(self.conv2(F.gelu(self.conv1(features[None]))))[0].T
        x = x + self.embed_positions.weight
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class DecoderSelfAttention(nn.Module):
    """Causal, over the paged KV cache (layers/attention.py)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = d // heads
        self.q_proj = make_linear(d, [d], bias=True)
        self.k_proj = make_linear(d, [d], bias=False)
        self.v_proj = make_linear(d, [d], bias=True)
        self.out_proj = make_linear(d, [d], bias=True)
        self.attn = Attention(heads, heads, self.head_dim, self.head_dim ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (p(x).view(x.shape[0], self.heads, self.head_dim)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(self.attn(q, k, v))


class CrossAttention(nn.Module):
    """Each row's queries over its own request's encoder keys and values."""

    def __init__(self, d: int, heads: int, index: int) -> None:
        super().__init__()
        self.heads = heads
        self.index = index  # the decoder layer: which of a request's K/V are this one's
        self.scaling = (d // heads) ** -0.5
        self.q_proj = make_linear(d, [d], bias=True)
        self.k_proj = make_linear(d, [d], bias=False)
        self.v_proj = make_linear(d, [d], bias=True)
        self.out_proj = make_linear(d, [d], bias=True)

    def keys_values(self, encoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[S, d] encoder output -> this layer's K, V [H, S, D]."""
        return _heads(self.k_proj(encoded), self.heads), _heads(self.v_proj(encoded), self.heads)

    def forward(self, x: torch.Tensor, cross: CrossBatch) -> torch.Tensor:
        q = _heads(self.q_proj(x) * self.scaling, self.heads)  # [H, T, D]
        out = torch.zeros_like(q)  # rows of no span (none but a profile run's) get 0
        for (start, end), kv in zip(cross.spans, cross.states, strict=True):
            k, v = kv[self.index]
            out[:, start:end] = F.scaled_dot_product_attention(q[:, start:end], k, v,
                                                               scale=1.0)
        return self.out_proj(out.transpose(0, 1).reshape(x.shape))


class DecoderLayer(nn.Module):
    def __init__(self, c: WhisperConfig, index: int) -> None:
        super().__init__()
        self.self_attn = DecoderSelfAttention(c.d_model, c.decoder_heads)
        self.self_attn_layer_norm = nn.LayerNorm(c.d_model)
        self.encoder_attn = CrossAttention(c.d_model, c.decoder_heads, index)
        self.encoder_attn_layer_norm = nn.LayerNorm(c.d_model)
        self.fc1 = make_linear(c.d_model, [c.decoder_ffn_dim], bias=True)
        self.fc2 = make_linear(c.decoder_ffn_dim, [c.d_model], bias=True)
        self.final_layer_norm = nn.LayerNorm(c.d_model)
        self.act = VISION_ACTIVATIONS[c.act]

    def forward(self, x: torch.Tensor, cross: CrossBatch) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        x = x + self.encoder_attn(self.encoder_attn_layer_norm(x), cross)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class WhisperDecoder(nn.Module):
    def __init__(self, c: WhisperConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.d_model)
        self.embed_positions = nn.Embedding(c.max_target_positions, c.d_model)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.decoder_layers))
        self.layer_norm = nn.LayerNorm(c.d_model)


class WhisperModel(nn.Module):
    def __init__(self, c: WhisperConfig, args: LlamaArgs) -> None:
        super().__init__()
        self.encoder = WhisperEncoder(c)
        self.decoder = WhisperDecoder(c)
        # Whisper rotates nothing: this table is never applied; the model runner and the
        # LoRA manager read its row bookkeeping (no LongRoPE, no long-context LoRA)
        self.rotary = RotaryEmbedding(args.head_dim, args.max_position, args.rope_theta,
                                      None, rows=1)

    @property
    def embed_tokens(self) -> nn.Module:
        """The decoder's token embedding (LoRA's vocabulary layers look for it here)."""
        return self.decoder.embed_tokens


class WhisperForConditionalGeneration(nn.Module):
    packed_modules_mapping: dict[str, tuple[str, int]] = {}
    lora_target_modules = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

    def __init__(self, c: WhisperConfig) -> None:
        super().__init__()
        self.config = c
        self.args = c.decoder_args()
        self.model = WhisperModel(c, self.args)
        self.lm_head = make_linear(c.d_model, [c.vocab_size])
        self.lm_head.weight = self.model.decoder.embed_tokens.weight  # HF's tied proj_out

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                image_rows: ImageRows | None = None) -> torch.Tensor:
        """The decoder's hidden states [T, d_model]; each row's cross-attention reads the
        step context's `cross` (None only in the profile run: no encoder states)."""
        if image_rows is not None:
            raise ValueError("Whisper's decoder takes no image rows")
        cross = get_context().cross or CrossBatch([], [])
        d = self.model.decoder
        x = d.embed_tokens(input_ids) + d.embed_positions(positions)
        for layer in d.layers:
            x = layer(x, cross)
        return d.layer_norm(x)

    @torch.inference_mode()
    def encode(self, features: torch.Tensor, slot: int) -> CrossKV:
        """One request's [n_mels, 3000] features -> every decoder layer's cross-attention
        K/V, all under its adapter `slot` (-1: the base), in a step context of its own."""
        encoder = self.model.encoder
        device = encoder.conv1.weight.device
        meta = LoRABatchMeta.make([slot] * self.config.max_source_positions, device) \
            if slot >= 0 else None
        ctx = StepContext(is_prefill=True, slot_mapping=torch.empty(0, dtype=torch.long,
                                                                    device=device),
                          lora_meta=meta)
        with step_context(ctx):
            encoded = encoder(features.to(device, encoder.conv1.weight.dtype))
            return [layer.encoder_attn.keys_values(encoded) for layer in self.model.decoder.layers]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def final_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
