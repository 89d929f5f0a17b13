"""InternVL's videos (the "-hf" layout), as HF's InternVLVideoProcessor and
InternVLProcessor take them; HF's video processor imports torchvision, which loraplex
does not depend on, so its steps are redone here in torch (engine/qwen_videos.py's
frame_pixels: torchvision's bicubic resize with antialias, HF's fused rescale and
normalization).

Frames: taken as given, as vLLM takes the frames its loader sampled (HF's
`do_sample_frames` is off by default); where the metadata says `"do_sample_frames": True`
(vLLM's loader says so when it kept every frame) and the processor config gives
`num_frames` or `fps` to sample by, HF's InternVLVideoProcessor.sample_frames picks them
from the frames given: `num_frames` (or `fps` x the video's seconds, by the metadata's
fps), evenly from `initial_shift` (True: half a step). (Without either HF's sampling
fails; the frames are then taken as given.) Each frame is resized to the processor's
height x width (the tower's tile side: one tile a frame, no thumbnail) and normalized
(the class defaults: 384 pixels, CLIP's mean and std; the hub's configs give 448 and
ImageNet's).

Prompt: each `<video>` becomes, for frame i of T, "Frame{i}: " + `<img>`, image_seq_length
`<IMG_CONTEXT>`, `</img>`, the frames joined by "\\n" (InternVLProcessor's
replace_video_token). HF writes that into the prompt's text before tokenizing, so the
first frame's "Frame1: " is tokenized with the prompt's text before it
(models/text_splice.py).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from loraplex.engine.images import ImageInputs, load_images
from loraplex.engine.qwen_videos import (
    CLIP_MEAN,
    CLIP_STD,
    QwenVideoProcessor,
    frame_pixels,
    split_videos,
    unpack,
    video_processor_dict,
)
from loraplex.models.text_splice import TextSplice

DEFAULT_SIDE = 384  # InternVLVideoProcessor's size without a config


def sample_frames(total: int, fps: float | None, num_frames: int | None,
                  target_fps: float | None, initial_shift: bool | float = True) -> list[int]:
    """HF's InternVLVideoProcessor.sample_frames over `total` frames of a video at `fps`:
    `num_frames` of them (else `target_fps` per second of it), from `initial_shift`
    (True: half a step) a step of total / num_frames apart."""
    if num_frames is None:
        if target_fps is None:
            raise ValueError("multi_modal_data: sampling a video's frames needs the video "
                             "processor's num_frames or fps")
        if not fps:
            raise ValueError("multi_modal_data: sampling a video's frames by fps needs its "
                             "metadata's fps")
        num_frames = int(total / fps * target_fps)
    if num_frames < 1:
        raise ValueError(f"multi_modal_data: a video of {total} frames gives no frame to "
                         "sample")
    if num_frames > total:
        raise ValueError(f"multi_modal_data: cannot sample {num_frames} frames from a video "
                         f"of {total}")
    step = total / num_frames
    shift = step / 2 if initial_shift is True else float(initial_shift)
    return torch.arange(shift, total, step).int().tolist()


class InternVLVideoProcessor:
    """The checkpoint's InternVLVideoProcessor settings applied to frames."""

    def __init__(self, path: str, side: int) -> None:
        """`side`: the tower's tile side, which each frame is resized to."""
        cfg = video_processor_dict(path)
        size = cfg.get("size") or {"height": DEFAULT_SIDE, "width": DEFAULT_SIDE}
        if set(size) != {"height", "width"} or cfg.get("do_center_crop"):
            raise ValueError(f"{path}: InternVL's video processor is supported with a "
                             f"height x width size and no center crop, got {size}")
        self.do_resize = bool(cfg.get("do_resize", True))
        if self.do_resize and (size["height"], size["width"]) != (side, side):
            raise ValueError(f"{path}: InternVL's video processor resizes frames to "
                             f"{size['height']} x {size['width']}, its tower takes "
                             f"{side} x {side}")
        self.side = side
        self.do_rescale = bool(cfg.get("do_rescale", True))
        self.do_normalize = bool(cfg.get("do_normalize", True))
        self.rescale_factor = float(cfg.get("rescale_factor", 1 / 255))
        self.mean = tuple(cfg.get("image_mean") or CLIP_MEAN)
        self.std = tuple(cfg.get("image_std") or CLIP_STD)
        self.num_frames = cfg.get("num_frames")
        self.fps = cfg.get("fps")
        self.initial_shift = cfg.get("initial_shift", True)

    def frames(self, video: Any) -> torch.Tensor:
        """[T, 3, H, W] frames (uint8 as given, or float), sampled where the metadata asks
        `do_sample_frames`."""
        frames, meta = unpack(video)
        frames = QwenVideoProcessor.array(frames)
        if meta.get("do_sample_frames") and (self.num_frames or self.fps):
            frames = frames[sample_frames(len(frames), meta.get("fps"), self.num_frames,
                                          self.fps, self.initial_shift)]
        return frames

    def __call__(self, frames: torch.Tensor) -> tuple[torch.Tensor, bytes]:
        """A video's frames (`frames`) -> its tiles [T, 3, side, side] and their hash."""
        if not self.do_resize and tuple(frames.shape[-2:]) != (self.side, self.side):
            raise ValueError(f"multi_modal_data: a video's frames must be {self.side} x "
                             f"{self.side} (the video processor does not resize), got "
                             f"{tuple(frames.shape[-2:])}")
        pixels = frame_pixels(frames, (self.side, self.side), self)
        digest = hashlib.blake2b(b"internvl video" + pixels.contiguous().numpy().tobytes(),
                                 digest_size=16).digest()
        return pixels, digest


class VideosBesideImages:
    """The video side of an ImageProcessor whose videos are items of the prompt's
    ImageInputs beside its images, in prompt order (InternVL's and LLaVA-OneVision's:
    mixed in before ImageProcessor). A subclass sets `video` (None: videos refused with
    `no_videos`) and `video_token_id`, and gives `with_videos` (the prompt expanded and
    the inputs) and `expanded_with_videos` (the prompt expanded only)."""

    video: Any
    no_videos: str
    video_token_id: int | None

    @property
    def modalities(self) -> tuple[str, ...]:
        return ("image", "video") if self.video is not None else ("image",)

    def placeholder_token(self, modality: str) -> int | None:
        return self.video_token_id if modality == "video" else self.placeholder

    def _video(self) -> Any:
        if self.video is None:
            raise ValueError(self.no_videos)
        return self.video

    def process(self, ids: list[int], data: Mapping[str, Any],
                options: Mapping[str, Any] | None = None) -> tuple[list[int], ImageInputs]:
        if "video" in data:
            return self.with_videos(ids, data.get("image"), data["video"])
        return super().process(ids, data, options)

    def expanded(self, ids: list[int], data: Mapping[str, Any],
                 options: Mapping[str, Any] | None = None) -> list[int]:
        if "video" in data:
            images = load_images(data["image"]) if data.get("image") is not None else []
            frames = [len(self._video().frames(v)) for v in split_videos(data["video"])]
            return self.expanded_with_videos(ids, images, frames)
        return super().expanded(ids, data, options)

    def processed_inputs(self, data: Mapping[str, Any]) -> ImageInputs | None:
        """The server's inputs (under "image": its videos are items of them); raw videos
        beside them are processed with them, as raw items."""
        return None if "video" in data else super().processed_inputs(data)


def frame_pieces(frames: int, context: list[int], start: int, end: int) -> list[int | str]:
    """A video's prompt as InternVLProcessor writes it: "Frame{i}: " (text) + `<img>`,
    the tile's `context` tokens, `</img>` per frame, joined by "\\n"."""
    out: list[int | str] = []
    for i in range(frames):
        out += [("\n" if i else "") + f"Frame{i + 1}: ", start, *context, end]
    return out


@dataclass(frozen=True)
class InternVLMediaTokens:
    """InternVLProcessor's prompt rule for images and videos together, on token ids."""

    context: int  # <IMG_CONTEXT>
    start: int  # <img>
    end: int  # </img>
    video: int  # <video>
    per_frame: int  # <IMG_CONTEXT> tokens a frame (a tile) takes
    splice: TextSplice

    def expand(self, ids: list[int], images: list[int], frames: list[int]
               ) -> tuple[list[int], list[tuple[str, int]]]:
        """Each `<IMG_CONTEXT>` expanded for image i's `images[i]` tokens, each `<video>`
        for video j's `frames[j]` frames, as InternVLProcessor writes them into the text;
        and the items' prompt order, ("image", i) / ("video", j). A prompt expanded so
        already (the chat route expands before it processes) is kept as it is."""
        order = self._expanded_order(ids, images, frames)
        if order is not None:
            return list(ids), order
        for kind, found, given, mark in (
                ("image", ids.count(self.context), len(images), "<IMG_CONTEXT>"),
                ("video", ids.count(self.video), len(frames), "<video>")):
            if found != given:
                raise ValueError(f"the prompt has {found} {kind} placeholder token(s) for "
                                 f"{given} {kind}(s): put one {mark} where each {kind} goes")
        pieces: list[int | str] = []
        order = []
        seen = {"image": 0, "video": 0}
        for t in ids:
            kind = "image" if t == self.context else "video" if t == self.video else None
            if kind is None:
                pieces.append(t)
                continue
            i = seen[kind]
            seen[kind] += 1
            order.append((kind, i))
            pieces += ([self.start, *[t] * images[i], self.end] if kind == "image" else
                       frame_pieces(frames[i], [self.context] * self.per_frame, self.start,
                                    self.end))
        return self.splice(pieces), order

    def _expanded_order(self, ids: list[int], images: list[int], frames: list[int]
                        ) -> list[tuple[str, int]] | None:
        """The items' order in a prompt expanded already: its runs of `<IMG_CONTEXT>`,
        each between `<img>` and `</img>`, an image's run its count, a video's its frames'
        runs after their "Frame{i}: " texts; None: not so expanded."""
        if self.video in ids or not wrapped(ids, self.context, self.start, self.end):
            return None
        runs = [(p, _run_length(ids, p)) for p, t in enumerate(ids)
                if t == self.context and (p == 0 or ids[p - 1] != t)]
        frame_of = [self._frame_number(ids, p - 1) for p, _ in runs]
        order: list[tuple[str, int]] = []
        k, left = 0, {"image": iter(enumerate(images)), "video": iter(enumerate(frames))}
        while k < len(runs):
            kind = "video" if frame_of[k] == 1 else "image"
            i, n = next(left[kind], (None, 0))
            want = [(self.per_frame, f + 1) for f in range(n)] if kind == "video" else [(n, None)]
            got = [(length, frame_of[k + j]) for j, (_, length) in enumerate(runs[k:k + len(want)])]
            if i is None or got != want:
                return None
            order.append((kind, i))
            k += len(want)
        if len(order) != len(images) + len(frames):
            return None
        return order

    def _frame_number(self, ids: list[int], at: int) -> int | None:
        """i where the text before the `<img>` at `at` ends with "Frame{i}: "."""
        lo = at
        while lo > 0 and ids[lo - 1] not in self.splice.special:
            lo -= 1
        found = re.search(r"Frame(\d+): $", self.splice.decode(ids[lo:at]))
        return int(found.group(1)) if found else None


def _run_length(ids: list[int], p: int) -> int:
    n = 0
    while p + n < len(ids) and ids[p + n] == ids[p]:
        n += 1
    return n


def wrapped(ids: list[int], context: int, start: int, end: int) -> bool:
    """Every run of `<IMG_CONTEXT>` lies between `<img>` and `</img>`."""
    for i, t in enumerate(ids):
        if t != context:
            continue
        if (i == 0 or ids[i - 1] not in (context, start)) or \
                (i + 1 == len(ids) or ids[i + 1] not in (context, end)):
            return False
    return True
