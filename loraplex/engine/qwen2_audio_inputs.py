"""A request's audio clips for Qwen2-Audio: each waveform resampled to the feature
extractor's rate (engine/audio.py's `resample`), its log-mel features made by HF's own
WhisperFeatureExtractor (numpy, no torchaudio: the checkpoint's preprocessor_config.json)
padded to the 30 s window as Qwen2AudioProcessor asks it (padding="max_length", the
attention mask's sum the clip's frames), and each `<|AUDIO|>` expanded to the clip's count
of audio tokens, as Qwen2AudioProcessor expands it (the `<|audio_bos|>` / `<|audio_eos|>`
around it are the prompt's, as the chat template writes them).

A clip longer than the window is refused: HF's extractor would cut it to 30 s silently,
which drops what the user sent. The features travel on engine/images.py's ImageInputs
(`pixel_values`: [clips * n_mels, 3000]; `sizes`: each clip's (frames, placeholders)).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from loraplex.engine.audio import (
    WhisperFeaturesProcessor,
    as_clips,
    resample,
    resampled_length,
    waveform,
)
from loraplex.engine.images import ImageInputs, expand_placeholders, placeholder_ranges
from loraplex.models.qwen2_audio import Qwen2AudioConfig


class Qwen2AudioProcessor(WhisperFeaturesProcessor):
    """Qwen2-Audio's features and placeholder rule (an AudioProcessor: audio only, and
    its placeholder text numbers the clips)."""

    def __init__(self, path: str, config: Qwen2AudioConfig) -> None:  # noqa: D107
        super().__init__(path, config, config.image_token_id)

    def placeholder_text(self, modality: str, tokenizer: Any) -> str | None:
        """vLLM's Qwen2-Audio text: the clip's 1-based number (chat_images.py fills {i}
        in), its bos / eos around the placeholder."""
        text = super().placeholder_text(modality, tokenizer)
        return None if text is None else f"Audio {{i}}: <|audio_bos|>{text}<|audio_eos|>"

    def checked(self, data: Any) -> list[tuple[torch.Tensor, int, int]]:
        """Each clip checked: (waveform, its rate, its length in samples at the
        extractor's rate once resampled)."""
        out = []
        for i, (wave, rate) in enumerate(as_clips(data)):
            x = waveform(wave, rate, i)
            n, limit = resampled_length(x.shape[0], int(rate), self.rate), self.extractor.n_samples
            if n > limit:
                raise ValueError(f"audio {i}: {n / self.rate:.2f} s is longer than "
                                 f"Qwen2-Audio's {limit / self.rate:g} s window: split it")
            if self.config.tokens_for(self.frames(n)) < 1:
                raise ValueError(f"audio {i}: {n} samples at {self.rate} Hz is too "
                                 "short (it gives no audio token)")
            out.append((x, int(rate), n))
        return out

    def frames(self, samples: int) -> int:
        """A clip's mel frames (its feature_attention_mask's sum: the extractor keeps
        every hop_length-th sample's mask)."""
        return -(-samples // self.extractor.hop_length)

    def clips(self, data: Any) -> list[tuple[torch.Tensor, int]]:
        """Each clip's padded features [n_mels, window] and its real frames."""
        out = []
        for x, rate, _ in self.checked(data):
            f = self.extractor(resample(x, rate, self.rate).numpy(), sampling_rate=self.rate,
                               padding="max_length", return_attention_mask=True,
                               return_tensors="np")
            out.append((torch.from_numpy(np.asarray(f["input_features"][0], np.float32)),
                        int(f["attention_mask"][0].sum())))
        return out

    def __call__(self, ids: list[int], data: Any) -> tuple[list[int], ImageInputs]:
        """The prompt with its placeholders expanded, and its clips' inputs."""
        clips = self.clips(data)
        return self.inputs(ids, [f for f, _ in clips],
                           [(frames, self.config.tokens_for(frames)) for _, frames in clips])

    def expand(self, ids: list[int], data: Any) -> list[int]:
        counts = [self.config.tokens_for(self.frames(n)) for *_, n in self.checked(data)]
        return expand_placeholders(ids, self.placeholder, counts, "audio")

    def check(self, ids: list[int], inputs: ImageInputs) -> None:
        """Processed inputs given with a prompt (the server's) must be that prompt's."""
        c = self.config
        counts = [n for _, n in inputs.sizes]
        if self.positions(ids) != inputs.positions \
                or [c.tokens_for(f) for f, _ in inputs.sizes] != counts \
                or placeholder_ranges(inputs.positions, counts) != inputs.ranges \
                or tuple(inputs.pixel_values.shape) != (len(counts) * c.num_mel_bins,
                                                        c.window_frames):
            raise ValueError("multi_modal_data: the processed audio inputs do not match the "
                             "prompt's (expanded) audio placeholders")
