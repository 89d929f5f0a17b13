"""Qwen3-VL's (and Qwen3-VL-MoE's) videos: HF's Qwen3VLVideoProcessor and
Qwen3VLProcessor's prompt rule, computed here in torch (engine/qwen_videos.py says why).

Frames: taken as given, as vLLM takes frames its loader sampled (HF's processor samples
them again at 2 fps by default, `do_sample_frames`; vLLM turns that off unless the
metadata says `"do_sample_frames": True`, and so does loraplex: then HF's rule picks
max(min_frames, total / fps x 2) frames, at most max_frames, evenly). Each frame's time
is its index in the source video (metadata `frames_indices`, else 0, 1, ...) over the
video's fps (metadata `fps`, else HF's default 24).

Pixels: Qwen3-VL's own defaults (patch 16, merge 2, temporal patch 2, mean and std 0.5,
128 to 768 merged 32 x 32 blocks), and its smart_resize, which weighs the pixel budget by
the frame count (and scales a side under patch x merge up first); a video needs at least
temporal_patch_size frames, as HF's resize refuses fewer.

Prompt: each `<|video_pad|>` (with the `<|vision_start|>` / `<|vision_end|>` around it
that the chat template puts there, which HF collapses) becomes, per temporal patch, its
timestamp `<{t:.1f} seconds>` (the mean time of the patch's frames), tokenized on its own
as vLLM does, then `<|vision_start|>`, its h x w / merge^2 pads and `<|vision_end|>`.

Positions (HF's get_rope_index): each temporal patch is an image of its own, at t = its
start, so the grids given to models/mrope.py are one (1, h, w) per temporal patch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from loraplex.engine.qwen_videos import DEFAULT_FPS, QwenVideoProcessor, Video, unpack
from loraplex.models.llava import placeholder_runs
from loraplex.models.qwen2_vl import Grid, QwenVisionConfig

IMAGENET_STANDARD = (0.5, 0.5, 0.5)
SAMPLE_FPS, MIN_FRAMES, MAX_FRAMES = 2.0, 4, 768  # Qwen3VLVideoProcessor's


def smart_resize(frames: int, height: int, width: int, temporal: int, factor: int,
                 min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """HF's qwen3_vl smart_resize (video_processing_qwen3_vl.py): the budget is over all
    the frames (rounded to temporal patches)."""
    if frames < temporal:
        raise ValueError(f"multi_modal_data: a video needs at least {temporal} frames "
                         f"(temporal_patch_size), got {frames}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError("multi_modal_data: a video's aspect ratio must be smaller than 200, "
                         f"got {height} x {width}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(frames / temporal) * temporal
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def frame_timestamps(indices: list[int], fps: float, temporal: int) -> list[float]:
    """Each temporal patch's time: the mean of its first and last frame's (the last
    frame repeated to fill the last patch), Qwen3VLProcessor._calculate_timestamps."""
    indices = list(indices) + [indices[-1]] * (-len(indices) % temporal)
    seconds = [i / fps for i in indices]
    return [(seconds[i] + seconds[i + temporal - 1]) / 2
            for i in range(0, len(seconds), temporal)]


class Qwen3VideoProcessor(QwenVideoProcessor):
    """Qwen3-VL's video processor settings applied to frames, and its prompt rule."""

    default_size = {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768}
    default_mean = default_std = IMAGENET_STANDARD
    default_max_video_tokens = 768

    def __init__(self, path: str, config: QwenVisionConfig,
                 encode: Callable[[str], list[int]], vision_end_token_id: int) -> None:
        """`encode`: the tokenizer's text -> ids (no special tokens), for timestamps."""
        super().__init__(path, config)
        self.encode = encode
        self.vision_end_token_id = vision_end_token_id

    def clip(self, video: Any) -> tuple[torch.Tensor, list[int], float]:
        """[T, 3, H, W] frames (sampled where the metadata asks), their indices in the
        source video, and its fps."""
        frames, meta = unpack(video)
        frames = self.array(frames)
        picked, indices, fps = self.sampled(len(frames), meta)
        return (frames if picked is None else frames[picked]), indices, fps

    @staticmethod
    def sampled(count: int, meta: dict[str, Any]) -> tuple[list[int] | None, list[int], float]:
        """Which of `count` frames are kept (None: all, as given), their indices in the
        source video, and its fps, from the metadata (without the pixels)."""
        fps = float(meta.get("fps") or DEFAULT_FPS)
        if not fps > 0:
            raise ValueError(f"multi_modal_data: a video's fps must be positive, got {fps}")
        indices = meta.get("frames_indices")
        indices = list(range(count)) if indices is None else [int(i) for i in indices]
        picked = None
        if meta.get("do_sample_frames"):  # HF's sample_frames over the frames given
            n = min(max(int(count / fps * SAMPLE_FPS), MIN_FRAMES), MAX_FRAMES, count)
            picked = np.linspace(0, count - 1, n).round().astype(int).tolist()
            indices = picked
        if len(indices) != count and picked is None:
            raise ValueError(f"multi_modal_data: a video's frames_indices name {len(indices)} "
                             f"frames, but it has {count}")
        return picked, indices, fps

    def size(self, frames: int, height: int, width: int) -> tuple[int, int]:
        """The frames' size after resizing (Qwen3VLVideoProcessor.resize's rule)."""
        if not self.do_resize:
            return height, width
        factor = self.patch_size * self.merge_size
        top = self.max_pixels
        if self.cap_pixels:  # qwen-vl-utils' per-frame cap, as HF applies it
            per_frame = max(min(self.max_video_tokens * factor * factor, top // frames),
                            int(self.min_pixels * 1.05))
            top = per_frame * frames
        return smart_resize(frames, height, width, self.temporal_patch_size, factor,
                            self.min_pixels, top)

    def grid(self, video: Any) -> Grid:
        frames, _, _ = self.clip(video)
        t, _, h, w = frames.shape
        h, w = self.size(t, h, w)
        tp = self.temporal_patch_size
        return (t + -t % tp) // tp, h // self.patch_size, w // self.patch_size

    def timestamps(self, video: Any) -> list[float]:
        frames, meta = unpack(video)
        _, indices, fps = self.sampled(len(frames), meta)
        return frame_timestamps(indices, fps, self.temporal_patch_size)

    def __call__(self, video: Any) -> Video:
        frames, indices, fps = self.clip(video)
        patches, grid = self.pixels(frames)
        times = frame_timestamps(indices, fps, self.temporal_patch_size)
        digest = hashlib.blake2b(b"qwen3 video" + patches.contiguous().numpy().tobytes()
                                 + repr((grid, times)).encode(), digest_size=16).digest()
        return Video(patches, grid, self.temporal_patch_size / fps, digest, times)

    def placeholder(self, video: Any, grid: Grid) -> list[int]:
        """A video's prompt ids: per temporal patch its timestamp, then its pads between
        vision start and end (Qwen3VLProcessor.replace_video_token)."""
        c = self.config
        pads = [c.vision_start_token_id] + [c.video_token_id] * c.tokens_for(
            (1, *grid[1:])) + [self.vision_end_token_id]
        return [i for t in self.timestamps(video)
                for i in self.encode(f"<{t:.1f} seconds>") + pads]

    def expand(self, ids: list[int], clips: list[Any], grids: list[Grid]) -> list[int]:
        """Each video's `<|video_pad|>` (and the vision start / end around it) replaced by
        its placeholder; a prompt already expanded (a run of pads per temporal patch) is
        kept as is."""
        c = self.config
        if placeholder_runs(ids, c.video_token_id) == [
                c.tokens_for((1, h, w)) for t, h, w in grids for _ in range(t)]:
            return list(ids)
        pads = [p for p, t in enumerate(ids) if t == c.video_token_id]
        if len(pads) != len(clips):
            raise ValueError(f"the prompt has {len(pads)} video placeholder token(s) (id "
                             f"{c.video_token_id}) for {len(clips)} video(s): put one "
                             "placeholder where each video goes")
        out: list[int] = []
        done = 0
        for p, video, grid in zip(pads, clips, grids, strict=True):
            lo, hi = p, p + 1
            if 0 < p < len(ids) - 1 and ids[p - 1] == c.vision_start_token_id \
                    and ids[p + 1] == self.vision_end_token_id:  # HF collapses the wrapper
                lo, hi = p - 1, p + 2
            out += ids[done:lo] + self.placeholder(video, grid)
            done = hi
        return out + ids[done:]

    def spans(self, ids: list[int], grids: list[Grid]) -> list[tuple[int, int]]:
        """Each video's placeholders: from its first pad to its last (timestamps and
        vision start / end between its temporal patches)."""
        c = self.config
        runs = [p for p, t in enumerate(ids) if t == c.video_token_id
                and (p == 0 or ids[p - 1] != t)]
        out, k = [], 0
        for t, h, w in grids:
            first, last = runs[k], runs[k + t - 1] + c.tokens_for((1, h, w))
            out.append((first, last - first))
            k += t
        return out

    def rope_grids(self, videos: list[Video]) -> tuple[list[Grid], list[float]]:
        """One (1, h, w) image per temporal patch (HF splits video_grid_thw so)."""
        grids = [(1, h, w) for v in videos for _ in range(v.grid[0]) for h, w in [v.grid[1:]]]
        return grids, [1.0] * len(grids)
