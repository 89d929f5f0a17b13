"""Voxtral's audio side (`VoxtralForConditionalGeneration`, mistralai/Voxtral-Mini-3B-2507 and
-Small-24B-2507): Whisper's encoder (two conv1d + GELU, learned positions, pre-norm
transformer layers, a final LayerNorm) over 30 s windows of log-mel features, then a
projector that stacks `intermediate_size // d_model` consecutive encoder frames into one
vector (HF's reshape) and maps it through linear, activation, linear to the language
model's width; each output vector takes the place of one `[AUDIO]` token.

Unlike Qwen2-Audio, HF masks nothing: every window is padded to 3000 frames with the
extractor's silence and all 1500 encoder positions take part (HF's `attention_mask` is
documented as unused). A clip longer than 30 s is several windows, each its own encoder
pass, their outputs concatenated in time, as HF's VoxtralProcessor splits the features and
vLLM's Voxtral does. The language model is loraplex's Llama (models/text_only.py); this
module runs once per clip at its first prefill step (engine/voxtral_inputs.py).

Mistral's format (params.json's `multimodal.whisper_model_args`, consolidated.safetensors'
`mm_whisper_embeddings.*`) is read as transformers' conversion script reads it
(`config_from_params`, `hf_audio_name`); it stores no encoder positions, which are
Whisper's sinusoids (filled in at `check_loaded`, as the conversion and vLLM do).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loraplex.models.llava import VISION_ACTIVATIONS, VisionWeights, check_activation
from loraplex.models.qwen2_audio import AudioTower as Qwen2AudioTower
from loraplex.models.qwen2_audio import WhisperEncoderConfig


def is_voxtral(hf_config: Any) -> bool:
    return getattr(hf_config, "model_type", None) == "voxtral"


@dataclass(frozen=True)
class VoxtralAudioConfig(WhisperEncoderConfig):
    """What the encoder, the projector and the splice read of HF's VoxtralConfig (the
    encoder's fields and checks are models/qwen2_audio.py's, whose layers it shares)."""

    intermediate_size: int  # the projector's input: this many / d_model frames stacked
    projector_act: str
    text_hidden_size: int
    image_token_id: int  # the `[AUDIO]` token (engine/images.py's name for a placeholder)

    @classmethod
    def from_hf(cls, hf: Any) -> VoxtralAudioConfig:
        a = hf.audio_config
        encoder = cls.encoder_fields(a)
        check_activation("projector_hidden_act", hf.projector_hidden_act)
        stack, rest = divmod(a.intermediate_size, a.d_model)
        if rest or a.max_source_positions % stack:
            raise ValueError(f"audio_config.intermediate_size={a.intermediate_size} must be "
                             f"a multiple of d_model={a.d_model} that divides the window's "
                             f"{a.max_source_positions} positions")
        token = 24 if hf.audio_token_id is None else hf.audio_token_id  # HF's processor's
        return cls(*encoder, a.intermediate_size, hf.projector_hidden_act,
                   hf.text_config.hidden_size, int(token))

    @property
    def tokens_per_window(self) -> int:
        """`[AUDIO]` tokens of one window (375: 1500 frames, four stacked)."""
        return self.max_source_positions * self.d_model // self.intermediate_size


def config_from_params(params: dict[str, Any], text: Any) -> Any:
    """params.json's audio block (Mistral's format) as HF's VoxtralConfig over `text`
    (models/mistral_format.py's config of the language model)."""
    from transformers import VoxtralConfig

    whisper = params["multimodal"]["whisper_model_args"]
    enc = whisper["encoder_args"]
    factor = (whisper.get("downsample_args") or {}).get("downsample_factor", 4)
    if enc["hidden_dim"] != factor * enc["dim"]:
        raise ValueError(f"params.json: the audio encoder's hidden_dim={enc['hidden_dim']} is "
                         f"not downsample_factor={factor} x dim={enc['dim']} (HF's Voxtral "
                         "stacks that many frames through its feed-forward width)")
    audio = {"hidden_size": enc["dim"], "num_hidden_layers": enc["n_layers"],
             "intermediate_size": enc["hidden_dim"], "num_attention_heads": enc["n_heads"],
             "num_mel_bins": (enc.get("audio_encoding_args") or {}).get("num_mel_bins", 128),
             "max_source_positions": enc.get("max_source_positions", 1500)}
    config = VoxtralConfig(audio_config=audio, text_config=text.to_dict(), audio_token_id=24,
                           projector_hidden_act="gelu")
    config.architectures = ["VoxtralForConditionalGeneration"]
    config.dtype = getattr(text, "dtype", None)
    return config


# consolidated.safetensors' audio names -> HF's
_AUDIO_NAMES = (
    (r"whisper_encoder\.conv_layers\.([01])\.(?:conv\.)?", lambda m: f"audio_tower.conv"
                                                            f"{int(m[1]) + 1}."),
    (r"whisper_encoder\.transformer\.norm\.", lambda m: "audio_tower.layer_norm."),
    (r"whisper_encoder\.transformer\.layers\.(\d+)\.attention\.w([qkv])\.",
     lambda m: f"audio_tower.layers.{m[1]}.self_attn.{m[2]}_proj."),
    (r"whisper_encoder\.transformer\.layers\.(\d+)\.attention\.wo\.",
     lambda m: f"audio_tower.layers.{m[1]}.self_attn.out_proj."),
    (r"whisper_encoder\.transformer\.layers\.(\d+)\.attention_norm\.",
     lambda m: f"audio_tower.layers.{m[1]}.self_attn_layer_norm."),
    (r"whisper_encoder\.transformer\.layers\.(\d+)\.feed_forward\.w([12])\.",
     lambda m: f"audio_tower.layers.{m[1]}.fc{m[2]}."),
    (r"whisper_encoder\.transformer\.layers\.(\d+)\.ffn_norm\.",
     lambda m: f"audio_tower.layers.{m[1]}.final_layer_norm."),
    (r"audio_language_projection\.([02])\.", lambda m: f"multi_modal_projector.linear_"
                                                       f"{int(m[1]) // 2 + 1}."),
)


def hf_audio_name(name: str) -> str | None:
    """A consolidated tensor's HF name when it is Voxtral's (`mm_whisper_embeddings.*`:
    the encoder, the projector, and the language model's token embedding); None for
    any other."""
    prefix = "mm_whisper_embeddings."
    if not name.startswith(prefix):
        return None
    rest = name[len(prefix):]
    if rest == "tok_embeddings.weight":
        return "model.embed_tokens.weight"
    for pattern, new in _AUDIO_NAMES:
        if (m := re.match(pattern, rest)) is not None:
            return new(m) + rest[m.end():]
    return name  # unknown: the loader says it ignores it


def sinusoids(length: int, channels: int) -> torch.Tensor:
    """Whisper's fixed encoder positions: sin, then cos, of position x 10000^(-i / (c/2 - 1))."""
    rates = torch.exp(-math.log(10000) / (channels // 2 - 1) * torch.arange(channels // 2))
    angles = torch.arange(length)[:, None] * rates[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class AudioTower(Qwen2AudioTower):
    """HF's VoxtralEncoder (its names; Qwen2-Audio's encoder without the pooling), one
    window at a time, nothing masked."""

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        """[n_mels, 3000] -> [1500, d_model]."""
        return self.layer_norm(self.encode(self.embed_positions.num_embeddings, window))


class Projector(nn.Module):
    """HF's VoxtralMultiModalProjector: linear_1 (stacked frames -> text width), the
    activation, linear_2; no biases."""

    def __init__(self, c: VoxtralAudioConfig) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(c.intermediate_size, c.text_hidden_size, bias=False)
        self.linear_2 = nn.Linear(c.text_hidden_size, c.text_hidden_size, bias=False)
        self.act = VISION_ACTIVATIONS[c.projector_act]

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(frames)))


class Voxtral(VisionWeights):
    """30 s windows of log-mel features -> one language-model input embedding per
    `[AUDIO]`."""

    label = "Voxtral's encoder / projector"

    def __init__(self, c: VoxtralAudioConfig) -> None:
        super().__init__()
        self.config = c
        self.audio_tower = AudioTower(c)
        self.multi_modal_projector = Projector(c)

    def ours(self, name: str) -> str | None:
        """Checkpoint names: `audio_tower.*` / `multi_modal_projector.*`, or the same
        under `model.` (transformers 5's layout)."""
        return name.removeprefix("model.")

    def check_loaded(self, path: str) -> None:
        """Mistral's format stores no encoder positions: Whisper's sinusoids, as HF's
        conversion writes them."""
        table = self.audio_tower.embed_positions.weight
        if "audio_tower.embed_positions.weight" not in self._loaded:
            with torch.no_grad():
                table.copy_(sinusoids(*table.shape))
            self._loaded.add("audio_tower.embed_positions.weight")
        super().check_loaded(path)

    @torch.inference_mode()
    def forward(self, features: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
        """[windows * n_mels, 3000] (every clip's windows, stacked) and each clip's
        (windows, placeholders) -> [their placeholders, text hidden], clip after clip."""
        c = self.config
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        windows = features.to(dtype).view(-1, c.num_mel_bins, features.shape[-1])
        frames = torch.cat([self.audio_tower(w) for w in windows])  # [windows * 1500, d]
        embeds = self.multi_modal_projector(frames.reshape(-1, c.intermediate_size))
        if embeds.shape[0] != sum(n for _, n in sizes):
            raise ValueError(f"the clips give {embeds.shape[0]} audio embeddings for "
                             f"{sum(n for _, n in sizes)} placeholders")
        return embeds
