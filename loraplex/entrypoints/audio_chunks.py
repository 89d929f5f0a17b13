"""Long clips for the transcription routes, cut as vLLM's speech-to-text server cuts them.

A clip longer than the model's window (`max_audio_clip_s`: Whisper's feature extractor's
`chunk_length`, 30 s; Granite Speech's and Phi-4-multimodal's vLLM's default, 30 s) is split
into chunks of at most that length, each ending at the quietest `min_energy_split_window_size`
samples (RMS) of the last `overlap_chunk_second` before its limit, so a cut falls in a pause
rather than in a word. Each chunk is then transcribed as a request of its own. Voxtral is not
cut (vLLM: its encoder takes a long clip as several 30 s windows). Each model's ChunkConfig
(None: not cut) is its transcriber's (entrypoints/transcription_models.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from loraplex.engine.audio import resample


@dataclass(frozen=True, slots=True)
class ChunkConfig:
    """vLLM's SpeechToTextConfig fields for chunking (its defaults)."""

    rate: int = 16000  # the model's sample rate: the clip is resampled to it first
    max_audio_clip_s: int = 30
    overlap_chunk_second: int = 1
    min_energy_split_window_size: int = 1600  # samples (0.1 s at 16 kHz)


def split_audio(wave: np.ndarray, config: ChunkConfig) -> list[tuple[int, int]]:
    """The chunks' [start, end) samples: the whole clip when it fits the window, else
    chunks of at most `max_audio_clip_s`, each cut at the quietest window of the last
    `overlap_chunk_second` before its limit; the last chunk takes what is left."""
    size = config.rate * config.max_audio_clip_s
    overlap = config.rate * config.overlap_chunk_second
    bounds: list[tuple[int, int]] = []
    start, n = 0, wave.shape[-1]
    while start < n:
        if start + size >= n:
            bounds.append((start, n))
            break
        cut = quietest_point(wave, start + size - overlap, start + size,
                             config.min_energy_split_window_size)
        bounds.append((start, cut))
        start = cut
    return bounds


def quietest_point(wave: np.ndarray, start: int, end: int, window: int) -> int:
    """The first sample of the window of lowest RMS energy among the whole windows of
    `window` samples from `start` in [start, end) (the first one on ties; as vLLM, the
    window flush with `end` is not a candidate)."""
    segment = wave[start:end].astype(np.float64)
    best, best_energy = start, math.inf
    for i in range(0, len(segment) - window, window):
        energy = math.sqrt(float(np.mean(segment[i:i + window] ** 2)))
        if energy < best_energy:
            best, best_energy = start + i, energy
    return best


def cut(wave: np.ndarray, rate: int, config: ChunkConfig | None
        ) -> list[tuple[np.ndarray, int]]:
    """The clip as (waveform, rate) chunks: at the model's rate, cut where it is quiet."""
    if config is None:
        return [(wave, rate)]
    x = resample(torch.from_numpy(np.asarray(wave, np.float32)), rate, config.rate).numpy()
    return [(x[a:b], config.rate) for a, b in split_audio(x, config)]
