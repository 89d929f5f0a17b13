"""Qwen2-Audio's audio side (`Qwen2AudioForConditionalGeneration`, Qwen/Qwen2-Audio-7B and
-7B-Instruct): Whisper's encoder (two conv1d + GELU, learned positions, pre-norm
transformer layers), an average pool over pairs of frames, a final LayerNorm and a linear
projector to the Qwen2 language model's width; each output vector takes the place of one
`<|AUDIO|>` token, as HF's model splices them.

HF pads every clip's log-mel features to Whisper's 30 s window (3000 frames) and masks the
padded encoder positions as attention keys; only the clip's own positions reach the
output. Here the convolutions run over the whole padded window (the last real frames see
the padding's features through the kernel, as in HF) and the transformer layers over the
clip's positions alone: the same rows, without the padded ones. The language model is
loraplex's Qwen2; this module runs once per clip at its first prefill step
(engine/images.py's ImageInputs carry the features: engine/qwen2_audio_inputs.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.models.llava import VISION_ACTIVATIONS, VisionWeights, check_activation


def is_qwen2_audio(hf_config: Any) -> bool:
    return getattr(hf_config, "model_type", None) == "qwen2_audio"


@dataclass(frozen=True)
class WhisperEncoderConfig:
    """Whisper's encoder as HF's audio_config gives it: Qwen2-Audio's and Voxtral's (which
    shares these layers, models/voxtral.py) configs start with these fields."""

    num_mel_bins: int
    d_model: int
    layers: int
    heads: int
    ffn_dim: int
    act: str
    max_source_positions: int  # encoder positions of one 30 s window (1500)

    @staticmethod
    def encoder_fields(a: Any) -> tuple[int, int, int, int, int, str, int]:
        """HF's audio_config checked and read, in this class's field order."""
        check_activation("audio_config.activation_function", a.activation_function)
        if a.d_model % a.encoder_attention_heads:
            raise ValueError(f"audio_config.d_model={a.d_model} is not a multiple of "
                             f"encoder_attention_heads={a.encoder_attention_heads}")
        return (a.num_mel_bins, a.d_model, a.encoder_layers, a.encoder_attention_heads,
                a.encoder_ffn_dim, a.activation_function, a.max_source_positions)

    @property
    def bidirectional(self) -> bool:
        """Audio rows are causal in the language model, like text."""
        return False

    @property
    def window_frames(self) -> int:
        """Mel frames of the padded window the encoder takes (3000: 30 s)."""
        return 2 * self.max_source_positions


@dataclass(frozen=True)
class Qwen2AudioConfig(WhisperEncoderConfig):
    """What the encoder, the projector and the splice read of HF's Qwen2AudioConfig."""

    text_hidden_size: int
    image_token_id: int  # the `<|AUDIO|>` token (engine/images.py's name for a placeholder)

    @classmethod
    def from_hf(cls, hf: Any) -> Qwen2AudioConfig:
        token = getattr(hf, "audio_token_id", None)
        token = getattr(hf, "audio_token_index", 151646) if token is None else token
        return cls(*cls.encoder_fields(hf.audio_config), hf.text_config.hidden_size,
                   int(token))

    @staticmethod
    def tokens_for(frames: int) -> int:
        """`<|AUDIO|>` tokens for a clip of `frames` mel frames (its feature_attention_mask's
        sum): conv2's stride-2 output, then the pool's pairs, as Qwen2AudioProcessor counts."""
        positions = (frames - 1) // 2 + 1
        return (positions - 2) // 2 + 1


class EncoderAttention(nn.Module):
    """Whisper's: no bias on k_proj; queries scaled before the product, as HF's."""

    def __init__(self, c: Qwen2AudioConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.q_proj = nn.Linear(c.d_model, c.d_model)
        self.k_proj = nn.Linear(c.d_model, c.d_model, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.d_model)
        self.out_proj = nn.Linear(c.d_model, c.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, d = x.shape  # one clip's positions
        q, k, v = (p(x).view(n, self.heads, -1).transpose(0, 1)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(0, 1).reshape(n, d))


class EncoderLayer(nn.Module):
    def __init__(self, c: Qwen2AudioConfig) -> None:
        super().__init__()
        self.self_attn = EncoderAttention(c)
        self.self_attn_layer_norm = nn.LayerNorm(c.d_model)
        self.fc1 = nn.Linear(c.d_model, c.ffn_dim)
        self.fc2 = nn.Linear(c.ffn_dim, c.d_model)
        self.final_layer_norm = nn.LayerNorm(c.d_model)
        self.act = VISION_ACTIVATIONS[c.act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class AudioTower(nn.Module):
    """HF's Qwen2AudioEncoder (its names), one clip at a time (Voxtral's encoder is the
    same without the pooling: models/voxtral.py reads its config's same field names)."""

    def __init__(self, c: Qwen2AudioConfig) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(c.num_mel_bins, c.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(c.d_model, c.d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(c.max_source_positions, c.d_model)
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.layers))
        self.layer_norm = nn.LayerNorm(c.d_model)

    def encode(self, n: int, features: torch.Tensor) -> torch.Tensor:
        """The layers' output [n, d_model] over the first `n` positions of [n_mels,
        window] features: two convs (the second of stride 2) with GELU, the positions
        added (Voxtral's tower too: models/voxtral.py)."""
        x = F.gelu(self.conv2(F.gelu(self.conv1(features[None]))))[0].T  # [positions, d]
        x = x[:n] + self.embed_positions.weight[:n]
        for layer in self.layers:
            x = layer(x)
        return x

    def forward(self, features: torch.Tensor, frames: int) -> torch.Tensor:
        """[n_mels, window] padded features of a clip with `frames` real ones ->
        [tokens_for(frames), d_model]."""
        x = self.encode((frames - 1) // 2 + 1, features)  # the positions HF leaves unmasked
        tokens = Qwen2AudioConfig.tokens_for(frames)
        x = x[:2 * tokens].view(tokens, 2, -1).mean(1)  # AvgPool1d(2, stride 2)
        return self.layer_norm(x)


class Projector(nn.Module):
    def __init__(self, c: Qwen2AudioConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(c.d_model, c.text_hidden_size)


class Qwen2Audio(VisionWeights):
    """Padded log-mel features -> one language-model input embedding per `<|AUDIO|>`."""

    label = "Qwen2-Audio's encoder / projector"

    def __init__(self, c: Qwen2AudioConfig) -> None:
        super().__init__()
        self.config = c
        self.audio_tower = AudioTower(c)
        self.multi_modal_projector = Projector(c)

    def ours(self, name: str) -> str | None:
        """Checkpoint names: `audio_tower.*` / `multi_modal_projector.*` (the hub's files)
        or the same under `model.` (saved by transformers 5)."""
        return name.removeprefix("model.")

    @torch.inference_mode()
    def forward(self, features: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
        """[clips * n_mels, window] (each clip's padded features, stacked) and each clip's
        (mel frames, placeholders) -> [their placeholders, text hidden], clip after clip."""
        c = self.config
        dtype = self.multi_modal_projector.linear.weight.dtype
        clips = features.to(dtype).view(-1, c.num_mel_bins, features.shape[-1])
        out = []
        for clip, (frames, tokens) in zip(clips, sizes, strict=True):
            embeds = self.multi_modal_projector.linear(self.audio_tower(clip, frames))
            if embeds.shape[0] != tokens:
                raise ValueError(f"a clip gives {embeds.shape[0]} audio embeddings for "
                                 f"{tokens} placeholders")
            out.append(embeds)
        return torch.cat(out)
