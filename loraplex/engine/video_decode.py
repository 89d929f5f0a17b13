"""A chat `video_url` part's video: its bytes (engine/media.py) decoded into frames plus
vLLM's video metadata, frames sampled as vLLM's video loader samples them.

Animated GIF / WebP / PNG decode with PIL (a dependency). Video files (mp4, webm, mov,
mkv, ...) decode with PyAV, the optional extra `loraplex[video]` (vLLM decodes with
OpenCV; PyAV was chosen here: a smaller wheel, FFmpeg's whole set of demuxers and
decoders, reading from memory, and its encoders let the tests write real videos).
Without PyAV a video file fails alone, naming the extra.

Sampling (vLLM's OpenCV loader, media_io_kwargs {"video": {"num_frames", "fps"}}): of a
video's `total` frames keep n = min(num_frames, total) (num_frames -1: all), at most
floor(duration x fps) when fps > 0, at least 1; n == total keeps every frame, else the
frames np.linspace(0, total - 1, n) (as ints). The metadata is vLLM's (transformers'
VideoMetadata keys): `total_num_frames` (the video's, not the kept count), `fps` (the
video's own), `duration` (total / fps), `frames_indices` (the kept frames),
`video_backend`, `do_sample_frames` (vLLM's flag: every frame was kept). A model that
spaces frames in time reads the kept frames' rate as HF's VideoMetadata.sampled_fps:
len(frames_indices) / total_num_frames x fps (engine/qwen_videos.py).
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from loraplex.engine.media import MediaConnector, fetch_media

logger = logging.getLogger(__name__)

VIDEO_EXTRA = "pip install 'loraplex[video]'"


@dataclass(frozen=True)
class VideoSampling:
    """How many frames of a decoded video are kept (config.py: MultiModalConfig's
    video_num_frames, video_fps)."""

    num_frames: int = 32  # -1: every frame
    fps: float = -1.0  # > 0: at most duration x fps frames


def sample_indices(total: int, duration: float, sampling: VideoSampling) -> list[int]:
    """The indices of the frames kept of `total` (vLLM's rule, module docstring)."""
    n = total
    if sampling.num_frames > 0:
        n = min(sampling.num_frames, total)
    if sampling.fps > 0:
        n = min(n, math.floor(duration * sampling.fps))
    n = max(1, n)
    if n == total:
        return list(range(total))
    return np.linspace(0, total - 1, n, dtype=int).tolist()


def load_video(source: Any, connector: MediaConnector | None = None,
               sampling: VideoSampling | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """(frames [T, H, W, 3] uint8, metadata) of a video URL (data:, http(s), or file://
    as the connector allows) or an animated PIL image, frames sampled as vLLM samples
    them. ValueError for what is not read or not decoded."""
    from PIL import Image

    sampling = sampling or VideoSampling()
    if isinstance(source, Image.Image):
        return _animated_image(source, sampling)
    if not isinstance(source, str):
        raise ValueError(f"a video must be a URL or an animated PIL image, got "
                         f"{type(source).__name__}")
    try:
        data, _ = fetch_media(source, "video", connector)
    except ValueError as e:
        raise ValueError(f"video_url: {e}") from e
    try:
        clip = Image.open(io.BytesIO(data))
        clip.load()
    except Exception:  # not an image PIL reads: a video file
        return decode_video(data, sampling)
    return _animated_image(clip, sampling)


def _animated_image(clip: Any, sampling: VideoSampling) -> tuple[np.ndarray, dict[str, Any]]:
    """An animated GIF / WebP / PNG's frames, its fps from the frames' durations (none
    when they are not given: the model's default)."""
    from PIL import ImageSequence

    frames, durations = [], []
    for frame in ImageSequence.Iterator(clip):
        frames.append(np.asarray(frame.convert("RGB")))
        durations.append(float(frame.info.get("duration") or 0))
    if len({f.shape for f in frames}) != 1:
        raise ValueError("cannot decode the video: its frames differ in size")
    total = len(frames)
    fps = 1000 * total / sum(durations) if all(durations) else None
    duration = total / fps if fps else 0.0
    kept = sample_indices(total, duration, sampling)
    meta = _metadata(total, fps, kept, "pil")
    return np.stack([frames[i] for i in kept]), meta


def import_av() -> Any:
    """PyAV, or the error that names the extra that installs it."""
    try:
        import av
    except ImportError as e:
        raise ValueError("cannot decode the video: video files (mp4, webm, ...) need the "
                         f"optional video decoder PyAV: {VIDEO_EXTRA} (animated GIF, WebP "
                         "and PNG videos decode without it)") from e
    return av


def decode_video(data: bytes, sampling: VideoSampling) -> tuple[np.ndarray, dict[str, Any]]:
    """A video file's sampled frames (RGB) and metadata, decoded by PyAV from memory."""
    av = import_av()
    try:
        total, fps = _count_frames(av, data)
        if total == 0:
            raise ValueError("cannot decode the video: it has no frames")
        duration = total / fps if fps else 0.0
        kept = sample_indices(total, duration, sampling)
        frames, got = _decode_frames(av, data, kept)
    except (av.FFmpegError, IndexError) as e:  # IndexError: no video stream
        why = getattr(e, "strerror", None) or str(e) or "no video stream"
        raise ValueError(f"cannot decode the video: {why}") from e
    if not frames:
        raise ValueError("cannot decode the video: no frame decoded")
    if len(frames) < len(kept):  # the container counted frames it does not hold
        logger.warning("video: %d of %d frames to sample were decoded", len(frames), len(kept))
    if len({f.shape for f in frames}) != 1:
        raise ValueError("cannot decode the video: its frames differ in size")
    return np.stack(frames), _metadata(total, fps, got, "pyav")


def _count_frames(av: Any, data: bytes) -> tuple[int, float]:
    """The video stream's frame count (the container's, else its packets counted) and fps
    (0.0: unknown)."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
    return total, fps


def _decode_frames(av: Any, data: bytes, kept: list[int]) -> tuple[list[np.ndarray], list[int]]:
    """The frames at the indices `kept` (in decode order), only those converted to RGB."""
    wanted, last = set(kept), kept[-1]
    frames, got = [], []
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                frames.append(frame.to_ndarray(format="rgb24"))
                got.append(i)
            if i >= last:
                break
    return frames, got


def _metadata(total: int, fps: float | None, kept: list[int], backend: str) -> dict[str, Any]:
    """vLLM's video metadata (module docstring); no `fps` where the video gives none."""
    meta: dict[str, Any] = {"total_num_frames": total}
    if fps:
        meta.update(fps=fps, duration=total / fps)
    meta.update(video_backend=backend, frames_indices=list(kept),
                do_sample_frames=len(kept) == total)
    return meta
