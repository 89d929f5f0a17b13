"""A request's audio clips for Granite Speech: each waveform resampled to the model's rate,
turned into the log-mel frames HF's GraniteSpeechFeatureExtractor makes (computed here in
torch: that extractor needs torchaudio), and the prompt's `<|audio|>` placeholder expanded
to the clip's count, as GraniteSpeechProcessor expands it. The frames travel on
engine/images.py's ImageInputs (`pixel_values`: [frames of every clip, 2 * n_mels]; `sizes`:
each clip's (frames, placeholders)), so the encoder runs once per request at its first
prefill step, chunked prefill and the prefix cache work as for images.

The features are torchaudio's MelSpectrogram with the extractor's settings (a periodic
Hann window of win_length zero-padded to n_fft, centred frames with reflect padding, the
power spectrum, an HTK mel filterbank without normalization), then HF's log10 with a floor,
a dynamic-range clamp to the clip's maximum - 8, x / 4 + 1, and pairs of frames stacked
(an odd last frame dropped).

Another sampling rate is resampled with a windowed sinc (a Hann window, 6 zero crossings,
cut-off at 0.99 of the lower Nyquist frequency: torchaudio's `resample` defaults; vLLM uses
librosa, whose default filter differs slightly, so a resampled clip's features are close
to, not identical with, vLLM's).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from loraplex.engine.images import ImageInputs, expand_placeholders, placeholder_ranges
from loraplex.engine.multimodal_processor import MultimodalProcessor
from loraplex.models.granite_speech import GraniteSpeechAudioConfig


@dataclass(frozen=True)
class MelConfig:
    """The feature extractor's settings (preprocessor_config.json; its defaults)."""

    sampling_rate: int = 16000
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 80

    @classmethod
    def read(cls, path: str) -> MelConfig:
        """From the checkpoint's preprocessor_config.json (top-level keys, or the
        `melspec_kwargs` older files save); the defaults without one."""
        file = os.path.join(path, "preprocessor_config.json")
        if not os.path.isfile(file):
            return cls()
        with open(file) as f:
            raw = json.load(f)
        mel = {**raw, **(raw.get("melspec_kwargs") or {})}
        rate = mel.get("sample_rate", mel.get("sampling_rate", 16000))
        return cls(int(rate), int(mel.get("n_fft", 512)), int(mel.get("win_length", 400)),
                   int(mel.get("hop_length", 160)),
                   int(mel.get("n_mels", mel.get("feature_size", 80))))

    @property
    def min_samples(self) -> int:
        """The shortest clip the centred, reflect-padded STFT takes."""
        return self.n_fft // 2 + 1


def hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def mel_filterbank(c: MelConfig) -> torch.Tensor:
    """[n_fft // 2 + 1, n_mels] triangular HTK filters over 0..sr/2, unnormalized
    (torchaudio's melscale_fbanks with norm=None, mel_scale="htk")."""
    freqs = torch.linspace(0, c.sampling_rate // 2, c.n_fft // 2 + 1)
    mels = torch.linspace(float(hz_to_mel(torch.tensor(0.0))),
                          float(hz_to_mel(torch.tensor(c.sampling_rate / 2))), c.n_mels + 2)
    pts = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    diff = pts[1:] - pts[:-1]
    slopes = pts[None, :] - freqs[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    return torch.clamp(torch.minimum(down, up), min=0.0)


def log_mel_frames(wave: torch.Tensor, c: MelConfig) -> torch.Tensor:
    """One 1-D float waveform at c.sampling_rate -> [frames, 2 * n_mels], HF's
    input_features of that clip alone."""
    window = torch.hann_window(c.win_length, periodic=True, dtype=torch.float32)
    spec = torch.stft(wave.float(), c.n_fft, c.hop_length, c.win_length, window, center=True,
                      pad_mode="reflect", return_complex=True).abs().pow(2)  # [freqs, T]
    mel = spec.T @ mel_filterbank(c)  # [T, n_mels]
    logmel = mel.clamp(min=1e-10).log10()
    logmel = torch.maximum(logmel, logmel.max() - 8.0) / 4 + 1
    if logmel.shape[0] % 2:
        logmel = logmel[:-1]
    return logmel.reshape(-1, 2 * c.n_mels)


def resample(wave: torch.Tensor, orig: int, new: int, zeros: int = 6,
             rolloff: float = 0.99) -> torch.Tensor:
    """`wave` (1-D) from rate `orig` to `new`: a Hann-windowed sinc low-pass at rolloff x
    the lower Nyquist frequency, `zeros` zero crossings a side, evaluated at the new
    instants (a polyphase conv1d); ceil(len * new / orig) samples."""
    if orig == new:
        return wave
    g = math.gcd(orig, new)
    orig, new = orig // g, new // g
    base = min(orig, new) * rolloff
    width = math.ceil(zeros * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None] / orig
    t = (-torch.arange(new, dtype=torch.float64)[:, None] / new + idx) * base
    t = t.clamp(-zeros, zeros)
    window = torch.cos(t * math.pi / zeros / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, 1, t))
    kernels = (sinc * window * base / orig).to(torch.float32)[:, None]  # [new, 1, taps]
    length = wave.shape[0]
    x = torch.nn.functional.pad(wave.float()[None, None], (width, width + orig))
    out = torch.nn.functional.conv1d(x, kernels, stride=orig)  # [1, new, steps]
    out = out[0].T.reshape(-1)
    return out[:resampled_length(length, orig, new)]


def resampled_length(length: int, orig: int, new: int) -> int:
    """Samples `resample` gives for `length` samples: ceil(length * new / orig)."""
    return -(-length * new // orig)


def as_clips(data: Any) -> list[tuple[np.ndarray | torch.Tensor, int]]:
    """multi_modal_data's "audio" entry as (waveform, rate) pairs: one (waveform,
    sample_rate) tuple or a list of them (vLLM's forms)."""
    if is_clip(data):
        return [data]
    if isinstance(data, list | tuple) and data and all(is_clip(x) for x in data):
        return list(data)
    if isinstance(data, list | tuple) and not data:
        raise ValueError("multi_modal_data: 'audio' holds no audio")
    raise ValueError("multi_modal_data: 'audio' must be a (waveform, sample_rate) tuple or a "
                     "list of them: a 1-D float numpy array (or tensor) and an int rate")


def is_clip(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], np.ndarray | torch.Tensor)


def waveform(wave: Any, rate: Any, index: int) -> torch.Tensor:
    """One clip as a 1-D float32 tensor, checked."""
    if isinstance(rate, bool) or not isinstance(rate, int | np.integer) or rate <= 0:
        raise ValueError(f"audio {index}: the sample rate must be a positive int, got {rate!r}")
    tensor = torch.from_numpy(np.asarray(wave)) if isinstance(wave, np.ndarray) else wave
    if tensor.dim() != 1:
        raise ValueError(f"audio {index}: the waveform must be 1-D (mono samples), got shape "
                         f"{tuple(tensor.shape)}")
    if not tensor.dtype.is_floating_point:
        raise ValueError(f"audio {index}: the waveform must hold floats (samples in [-1, 1]), "
                         f"got {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"audio {index}: the waveform holds NaN or infinite samples")
    return tensor.float()


class AudioProcessor(MultimodalProcessor):
    """Granite Speech's feature extractor and placeholder rule (engine/multimodal_processor.py's
    interface, audio only)."""

    modalities = ("audio",)

    @classmethod
    def load(cls, path: str, config: Any, tokenizer: Any) -> AudioProcessor:
        return cls(path, config)

    def __init__(self, path: str, config: GraniteSpeechAudioConfig) -> None:
        self.config = config
        self.mel = MelConfig.read(path)
        if 2 * self.mel.n_mels != config.input_dim:
            raise ValueError(f"the feature extractor's n_mels={self.mel.n_mels} gives frames "
                             f"of {2 * self.mel.n_mels}, the encoder takes {config.input_dim}")
        self.placeholder = config.image_token_id

    @property
    def rate(self) -> int:
        """The sample rate clips are resampled to."""
        return self.mel.sampling_rate

    def checked(self, data: Any) -> list[tuple[torch.Tensor, int, int]]:
        """Each clip checked: (waveform, its rate, its length in samples at the model's
        rate once resampled), so placeholders are counted without computing features."""
        out = []
        for i, (wave, rate) in enumerate(as_clips(data)):
            x = waveform(wave, rate, i)
            n = resampled_length(x.shape[0], int(rate), self.mel.sampling_rate)
            if n < self.mel.min_samples:
                raise ValueError(f"audio {i}: {n} samples at {self.mel.sampling_rate} Hz is "
                                 f"too short (at least {self.mel.min_samples})")
            out.append((x, int(rate), n))
        return out

    def frames(self, samples: int) -> int:
        """Feature rows of a clip of `samples`: the centred STFT's 1 + samples // hop
        frames, stacked in pairs (an odd last one dropped)."""
        return (1 + samples // self.mel.hop_length) // 2

    def features(self, data: Any) -> list[torch.Tensor]:
        """Each clip's frames, resampled to the model's rate first."""
        return [log_mel_frames(resample(x, rate, self.mel.sampling_rate), self.mel)
                for x, rate, _ in self.checked(data)]

    def __call__(self, ids: list[int], data: Any) -> tuple[list[int], ImageInputs]:
        """The prompt with its placeholders expanded, and its clips' inputs."""
        clips = self.features(data)
        return self.inputs(ids, clips, [(f.shape[0], self.config.tokens_for(f.shape[0]))
                                        for f in clips])

    def inputs(self, ids: list[int], clips: list[torch.Tensor],
               sizes: list[tuple[int, int]]) -> tuple[list[int], ImageInputs]:
        """The prompt with each clip's placeholder expanded to its count (sizes: (frames,
        placeholders) a clip), and the clips' features on an ImageInputs, each hashed."""
        ids = expand_placeholders(ids, self.placeholder, [n for _, n in sizes], "audio")
        positions = self.positions(ids)
        ranges = placeholder_ranges(positions, [n for _, n in sizes])
        hashes = [hashlib.blake2b(b"audio" + f.numpy().tobytes(), digest_size=16).digest()
                  for f in clips]
        return ids, ImageInputs(torch.cat(clips), positions, ranges, hashes, sizes=sizes)

    def expand(self, ids: list[int], data: Any) -> list[int]:
        """The prompt with its placeholders expanded for these clips (what /tokenize and
        usage count)."""
        counts = [self.config.tokens_for(self.frames(n)) for *_, n in self.checked(data)]
        return expand_placeholders(ids, self.placeholder, counts, "audio")

    def positions(self, ids: list[int]) -> list[int]:
        return [p for p, t in enumerate(ids) if t == self.placeholder]

    def check(self, ids: list[int], inputs: ImageInputs) -> None:
        """Processed inputs given with a prompt (the server's) must be that prompt's."""
        counts = [n for _, n in inputs.sizes]
        if self.positions(ids) != inputs.positions \
                or [self.config.tokens_for(f) for f, _ in inputs.sizes] != counts \
                or placeholder_ranges(inputs.positions, counts) != inputs.ranges \
                or inputs.pixel_values.shape[0] != sum(f for f, _ in inputs.sizes):
            raise ValueError("multi_modal_data: the processed audio inputs do not match the "
                             "prompt's (expanded) audio placeholders")


class WhisperFeaturesProcessor(AudioProcessor):
    """The audio models whose features HF's WhisperFeatureExtractor makes (Qwen2-Audio,
    Whisper, Voxtral): the checkpoint's extractor (its preprocessor_config.json; with
    `defaults`, Whisper's own at the encoder's mel bins when there is none), checked
    against the encoder's mel bins and window."""

    def __init__(self, path: str, config: Any, placeholder: int | None,
                 defaults: bool = False) -> None:
        from transformers import WhisperFeatureExtractor

        self.config = config
        self.extractor = (WhisperFeatureExtractor(feature_size=config.num_mel_bins)
                          if defaults and not os.path.isfile(
                              os.path.join(path, "preprocessor_config.json"))
                          else WhisperFeatureExtractor.from_pretrained(path))
        if self.extractor.feature_size != config.num_mel_bins:
            raise ValueError(f"the feature extractor's feature_size="
                             f"{self.extractor.feature_size}, the encoder takes "
                             f"num_mel_bins={config.num_mel_bins}")
        if self.extractor.nb_max_frames != config.window_frames:
            raise ValueError(f"the feature extractor's window is {self.extractor.nb_max_frames} "
                             f"frames, the encoder's {config.window_frames}")
        self.placeholder = placeholder

    @property
    def rate(self) -> int:
        return int(self.extractor.sampling_rate)
