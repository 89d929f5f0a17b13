"""Gemma 4's audio clips (vLLM's `multi_modal_data={"audio": (waveform, rate)}`, chat
`input_audio` / `audio_url` parts) on their way into the engine.

Each clip is resampled to the feature extractor's rate (16 kHz) and turned into log-mel
frames by HF's own Gemma4AudioFeatureExtractor (numpy, no extra dependency), its
settings from the checkpoint's processor_config.json ("feature_extractor"), else its
defaults; only the frames its mask calls real are kept (the tower encodes a clip alone:
models/gemma4_audio.py). Each `<|audio|>` of the prompt becomes boa, the clip's soft
tokens (`<|audio|>` each: a quarter of its frames, Gemma4Processor's count), eoa. A clip
longer than the extractor's max_length (30 s at 16 kHz: 750 soft tokens, the
processor's audio_seq_length) is refused, where HF would cut it silently.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from loraplex.engine.audio import as_clips, resample, waveform
from loraplex.engine.images import expand_wrapped
from loraplex.models.gemma4_audio import Gemma4AudioConfig
from loraplex.models.gemma4_vision import Gemma4VisionConfig

MAX_SAMPLES = 480_000  # Gemma4AudioFeatureExtractor's max_length


def processor_settings(path: str) -> dict[str, Any]:
    """processor_config.json's contents ({}: none)."""
    file = os.path.join(path, "processor_config.json")
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


class Gemma4AudioClips:
    """The checkpoint's feature extractor and the `<|audio|>` rule."""

    def __init__(self, path: str, config: Gemma4VisionConfig) -> None:
        from transformers import Gemma4AudioFeatureExtractor

        settings = processor_settings(path)
        extractor = dict(settings.get("feature_extractor") or {})
        extractor.pop("feature_extractor_type", None)
        self.hf = Gemma4AudioFeatureExtractor(**extractor)
        self.config = config
        self.rate = int(self.hf.sampling_rate)
        mels = config.audio.conv_channels[0]
        if self.hf.feature_size != mels:
            raise ValueError(f"{path}: Gemma 4's feature extractor gives {self.hf.feature_size} "
                             f"mel bins, its audio tower takes {mels}")

    def features(self, data: Any) -> list[torch.Tensor]:
        """multi_modal_data's "audio" entry -> each clip's real mel frames [frames, mels]."""
        out = []
        for i, (wave, rate) in enumerate(as_clips(data)):
            wave = waveform(wave, rate, i)
            if rate != self.rate:
                wave = resample(wave, int(rate), self.rate)
            if len(wave) > MAX_SAMPLES:
                raise ValueError(f"audio {i}: a clip of {len(wave) / self.rate:.1f} s is longer "
                                 f"than Gemma 4 takes ({MAX_SAMPLES / self.rate:.0f} s)")
            got = self.hf([wave.numpy()], return_tensors="pt")
            frames = got["input_features"][0][got["input_features_mask"][0]]
            if not len(frames):
                raise ValueError(f"audio {i}: a clip of {len(wave)} samples is too short for "
                                 "one mel frame")
            out.append(frames)
        return out

    def expand(self, ids: list[int], frames: list[int]) -> list[int]:
        """Clip i's one `<|audio|>` becomes boa, its soft tokens, eoa."""
        c = self.config
        return expand_wrapped(ids, c.audio_token_id, c.boa_token_id, c.eoa_token_id,
                              [Gemma4AudioConfig.tokens_for(n) for n in frames], "<|audio|>",
                              "audio")
