"""A request's audio clips for Voxtral: each waveform resampled to the feature extractor's
rate (engine/audio.py's `resample`), padded with silence to a whole number of 30 s windows
and made into log-mel features by HF's own WhisperFeatureExtractor, as VoxtralProcessor
calls it (padding to a multiple of 480000 samples, no truncation), then cut into windows
of 3000 frames; each `[AUDIO]` placeholder expanded to the clip's count of audio tokens,
375 a window, as mistral_common's audio encoding counts them (ceil(samples / hop / 8) over
the padded clip). The `[BEGIN_AUDIO]` before it is the prompt's, as mistral_common's chat
encoding writes it.

The features travel on engine/images.py's ImageInputs (`pixel_values`: [windows * n_mels,
3000]; `sizes`: each clip's (windows, placeholders)).

With tokenizer_mode "mistral" (vLLM's only mode for Voxtral) mistral_common writes the
placeholders itself: a chat's audio parts go to it as `input_audio` parts (`input_audio_part`:
the clip resampled here first, as a float WAV, so mistral_common neither resamples nor
rounds it), and a transcription is its TranscriptionRequest (`transcription_ids`), as vLLM's
Voxtral `get_generation_prompt` builds it; both need the `soundfile` package, which
mistral_common decodes audio with.
"""

from __future__ import annotations

import base64
import io
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
from loraplex.models.voxtral import VoxtralAudioConfig


class VoxtralAudioProcessor(WhisperFeaturesProcessor):
    """Voxtral's features and placeholder rule (an AudioProcessor: audio only; under the
    Mistral tokenizer a chat's clips go to mistral_common)."""

    def __init__(self, path: str, config: VoxtralAudioConfig) -> None:  # noqa: D107
        # Mistral's format ships no preprocessor_config.json: Whisper's extractor at
        # tekken.json's settings (16 kHz, hop 160, window 400, 30 s), as vLLM computes them
        super().__init__(path, config, config.image_token_id, defaults=True)

    def placeholder_text(self, modality: str, tokenizer: Any) -> str | None:
        """`[BEGIN_AUDIO][AUDIO]`, as mistral_common writes it (which, under tokenizer_mode
        "mistral", writes the chat itself: mistral_audio_rate)."""
        text = super().placeholder_text(modality, tokenizer)
        return None if text is None else "[BEGIN_AUDIO]" + text

    def mistral_audio_rate(self, tokenizer: Any) -> int | None:
        """Under tokenizer_mode "mistral" the chat's clips go to mistral_common at the
        model's rate (entrypoints/chat_images.py)."""
        return self.rate if getattr(tokenizer, "is_mistral", False) else None

    def windows(self, samples: int) -> int:
        """30 s windows of a clip of `samples` at the extractor's rate."""
        return -(-samples // self.extractor.n_samples)

    def checked(self, data: Any) -> list[tuple[torch.Tensor, int, int]]:
        """Each clip checked: (waveform, its rate, its 30 s windows once resampled)."""
        out = []
        for i, (wave, rate) in enumerate(as_clips(data)):
            x = waveform(wave, rate, i)
            n = resampled_length(x.shape[0], int(rate), self.rate)
            if n == 0:
                raise ValueError(f"audio {i}: the waveform is empty")
            out.append((x, int(rate), self.windows(n)))
        return out

    def clips(self, data: Any) -> list[torch.Tensor]:
        """Each clip's windows' features, [windows * n_mels, 3000]."""
        out = []
        for x, rate, windows in self.checked(data):
            f = self.extractor(resample(x, rate, self.rate).numpy(), sampling_rate=self.rate,
                               padding=True, truncation=False,
                               pad_to_multiple_of=self.extractor.n_samples, return_tensors="np")
            mel = np.asarray(f["input_features"][0], np.float32)  # [n_mels, windows * 3000]
            mel = mel.reshape(mel.shape[0], windows, -1).transpose(1, 0, 2)
            out.append(torch.from_numpy(np.ascontiguousarray(mel)).flatten(0, 1))
        return out

    def __call__(self, ids: list[int], data: Any) -> tuple[list[int], ImageInputs]:
        """The prompt with its placeholders expanded, and its clips' inputs."""
        clips = self.clips(data)
        n_mels = self.config.num_mel_bins
        sizes = [(f.shape[0] // n_mels, f.shape[0] // n_mels * self.config.tokens_per_window)
                 for f in clips]
        return self.inputs(ids, clips, sizes)

    def expand(self, ids: list[int], data: Any) -> list[int]:
        counts = [w * self.config.tokens_per_window for *_, w in self.checked(data)]
        return expand_placeholders(ids, self.placeholder, counts, "audio")

    def check(self, ids: list[int], inputs: ImageInputs) -> None:
        """Processed inputs given with a prompt (the server's) must be that prompt's."""
        c = self.config
        counts = [n for _, n in inputs.sizes]
        if self.positions(ids) != inputs.positions \
                or [w * c.tokens_per_window for w, _ in inputs.sizes] != counts \
                or placeholder_ranges(inputs.positions, counts) != inputs.ranges \
                or tuple(inputs.pixel_values.shape) != (
                    sum(w for w, _ in inputs.sizes) * c.num_mel_bins, c.window_frames):
            raise ValueError("multi_modal_data: the processed audio inputs do not match the "
                             "prompt's (expanded) audio placeholders")


def wav_base64(wave: torch.Tensor, rate: int) -> str:
    """A clip as a base64 float32 WAV: mistral_common reads it back sample for sample."""
    try:
        import soundfile
    except ImportError:
        raise ValueError("Voxtral's audio through mistral_common needs the soundfile "
                         "package: pip install 'loraplex[mistral]'") from None
    buf = io.BytesIO()
    soundfile.write(buf, wave.numpy(), rate, format="WAV", subtype="FLOAT")
    return base64.b64encode(buf.getvalue()).decode()


def input_audio_part(clip: tuple[Any, int], rate: int) -> tuple[dict[str, Any],
                                                                 tuple[np.ndarray, int]]:
    """A chat's decoded clip as mistral_common takes it (an OpenAI `input_audio` part, WAV
    at the model's rate), and the resampled clip that goes with the request."""
    x = resample(waveform(clip[0], clip[1], 0), int(clip[1]), rate)
    part = {"type": "input_audio", "input_audio": {"data": wav_base64(x, rate),
                                                   "format": "wav"}}
    return part, (x.numpy(), rate)


def transcription_ids(tokenizer: Any, clip: tuple[Any, int], rate: int,
                      language: str | None) -> list[int]:
    """mistral_common's TranscriptionRequest for the clip (resampled to the model's rate),
    encoded: `<s>[INST][BEGIN_AUDIO]` + its `[AUDIO]` tokens + `[/INST]`, then
    `lang:{language}` when given, then `[TRANSCRIBE]`."""
    from mistral_common.protocol.instruct.chunk import RawAudio
    from mistral_common.protocol.transcription.request import TranscriptionRequest

    x = resample(waveform(clip[0], clip[1], 0), int(clip[1]), rate)
    try:
        request = TranscriptionRequest(model="voxtral", language=language,
                                       audio=RawAudio(data=wav_base64(x, rate), format="wav"))
    except ValueError as e:  # pydantic's: a language that is no ISO 639-1 code
        raise ValueError(f"language {language!r} is not an ISO 639-1 code") from e
    return list(tokenizer.mistral.instruct_tokenizer.encode_transcription(request).tokens)
