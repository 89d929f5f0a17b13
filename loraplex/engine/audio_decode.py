"""Audio files into (mono float32 waveform in [-1, 1], sample rate): WAV (PCM 8/16/24/32-bit)
by the standard library's `wave`, every other format (mp3, ogg, flac, ...) by PyAV when it is
installed (the `loraplex[video]` extra's decoder, engine/video_decode.py). Several channels
are mixed down to their mean, as librosa's mono load does."""

from __future__ import annotations

import io
import wave
from typing import Any

import numpy as np

from loraplex.engine.media import MediaConnector, fetch_media
from loraplex.engine.video_decode import VIDEO_EXTRA


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """An audio file's samples (mono, float32) and rate; ValueError for bytes that are not
    audio, or a non-WAV file without PyAV."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return decode_wav(data)
    return decode_with_av(data)


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    try:
        with wave.open(io.BytesIO(data)) as f:
            width, channels, rate = f.getsampwidth(), f.getnchannels(), f.getframerate()
            raw = f.readframes(f.getnframes())
    except (wave.Error, EOFError) as e:
        raise ValueError(f"cannot decode the WAV audio: {e}") from e
    if width == 1:  # unsigned 8-bit
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width in (2, 3, 4):
        if width == 3:  # little-endian 24-bit: widened to 32 by a zero low byte
            b = np.frombuffer(raw, np.uint8).reshape(-1, 3)
            raw = np.concatenate([np.zeros((b.shape[0], 1), np.uint8), b], axis=1).tobytes()
            width = 4
        ints = np.frombuffer(raw, f"<i{width}")
        samples = ints.astype(np.float32) / float(2 ** (8 * width - 1))
    else:
        raise ValueError(f"cannot decode the WAV audio: {8 * width}-bit samples")
    if channels > 1:
        samples = samples[: len(samples) // channels * channels].reshape(-1, channels).mean(1)
    return samples.astype(np.float32), rate


def import_av_for_audio() -> Any:
    try:
        import av
    except ImportError as e:
        raise ValueError("cannot decode the audio: formats other than WAV (mp3, ogg, flac, "
                         f"...) need the optional decoder PyAV: {VIDEO_EXTRA}") from e
    return av


def decode_with_av(data: bytes) -> tuple[np.ndarray, int]:
    av = import_av_for_audio()
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.audio[0]
            rate = int(stream.rate or stream.codec_context.sample_rate)
            chunks = []
            for frame in container.decode(stream):
                x = frame.to_ndarray().astype(np.float32)
                if frame.format.is_planar:  # [channels, samples]
                    x = x.mean(0)
                else:  # interleaved [1, samples * channels]
                    x = x.reshape(-1, len(frame.layout.channels)).mean(1)
                if frame.format.name.startswith(("s16", "s32", "u8")):
                    x = _scaled_ints(x, frame.format.name)
                chunks.append(x)
    except (av.error.FFmpegError, IndexError) as e:
        raise ValueError(f"cannot decode the audio: {e}") from e
    if not chunks:
        raise ValueError("cannot decode the audio: it holds no samples")
    return np.concatenate(chunks).astype(np.float32), rate


def _scaled_ints(x: np.ndarray, fmt: str) -> np.ndarray:
    if fmt.startswith("u8"):
        return (x - 128) / 128
    return x / float(2 ** (15 if fmt.startswith("s16") else 31))


def load_audio(url: str, connector: MediaConnector | None = None) -> tuple[np.ndarray, int]:
    """An audio clip from a data URL, an http(s) URL or (chat, under its connector) a
    file:// URL."""
    data, _ = fetch_media(url, "audio", connector)
    return decode_audio(data)
