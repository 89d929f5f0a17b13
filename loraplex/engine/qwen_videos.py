"""Qwen2-VL's and Qwen2.5-VL's videos (vLLM's `multi_modal_data={"video": ...}`): the
frames into patches by HF's Qwen2VLVideoProcessor's rule, computed here in torch.

HF's video processor imports torchvision, which loraplex does not depend on, so its
steps are redone on the frames as given (a chat's video file is decoded and its frames
sampled first: engine/video_decode.py): each
frame resized to the one smart_resize size (multiples of patch_size x merge_size within
the config's pixel bounds; bicubic with antialias, as torchvision resizes a uint8 tensor:
in fp32, clamped and rounded back), rescaled and normalized in one fused step (HF's
`(x - mean / rescale) / (std / rescale)`), the last frame repeated up to a multiple of
temporal_patch_size, and the patches laid out as HF's `patchify` lays them: temporal
patch by temporal patch, merge block by merge block, each patch's channels, then its
temporal_patch_size frames, then its pixels. Frames are taken as they are (no frame
sampling: the caller has sampled them, as vLLM's loader does).

A video's `second_per_grid_t` is temporal_patch_size / its fps (Qwen2_5_VLProcessor's
rule; the fps from the video's metadata, `(frames, {"fps": ...})`, else HF's default of
24), which spaces its temporal M-RoPE positions (models/mrope.py).

Qwen3-VL's videos (engine/qwen3_videos.py) subclass the processor: the same pixels, its
own defaults and resize, and its prompt (`expand`), item ranges (`spans`) and position
grids (`rope_grids`) in place of the ones here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from loraplex.engine.images import expand_placeholders
from loraplex.models.internvl import is_internvl
from loraplex.models.llava_onevision import is_llava_onevision
from loraplex.models.qwen2_vl import Grid, QwenVisionConfig, is_qwen_vl
from loraplex.models.qwen3_vl import is_qwen3_vl

DEFAULT_FPS = 24.0  # HF's VideoMetadata.sampled_fps without metadata
# Qwen2VLVideoProcessor's defaults
DEFAULT_SIZE = {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Video:
    """One processed video: its patches, patch grid and what spaces its positions."""

    patches: torch.Tensor  # [t * h * w, channels x temporal_patch_size x patch^2]
    grid: Grid
    second_per_grid_t: float
    hash: bytes
    # Qwen3-VL: each temporal patch's time in seconds, which its prompt text gives
    timestamps: list[float] = field(default_factory=list)


def _smart_resize(height: int, width: int, factor: int, min_pixels: int,
                  max_pixels: int) -> tuple[int, int]:
    """HF's qwen2_vl smart_resize (video_processing_qwen2_vl.py)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError("multi_modal_data: a video's aspect ratio must be smaller than 200, "
                         f"got {height} x {width}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def takes_videos(hf_config: Any) -> bool:
    """The checkpoint's videos are served: Qwen2-VL's, Qwen2.5-VL's, Qwen3-VL's and
    Qwen3.5's (engine/qwen3_videos.py), InternVL's (engine/internvl_videos.py),
    LLaVA-OneVision's (engine/llava_onevision.py)."""
    return is_qwen_vl(hf_config) or is_qwen3_vl(hf_config) or is_internvl(hf_config) \
        or is_llava_onevision(hf_config)


def is_video(item: Any) -> bool:
    """One video: a [T, H, W, C] array, a list of frames (PIL images or [H, W, C]
    arrays), or (frames, metadata dict)."""
    from PIL import Image

    if isinstance(item, np.ndarray | torch.Tensor):
        return item.ndim == 4
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], dict):
        return True
    return isinstance(item, list | tuple) and len(item) > 0 and all(
        isinstance(f, Image.Image) or (isinstance(f, np.ndarray) and f.ndim == 3)
        for f in item)


def split_videos(data: Any) -> list[Any]:
    """multi_modal_data's "video" entry as a list of videos: one video (is_video), or a
    list of them."""
    if is_video(data):
        return [data]
    if isinstance(data, list | tuple) and data and all(is_video(v) for v in data):
        return list(data)
    raise ValueError("multi_modal_data: 'video' must be a video (a [T, H, W, 3] array, a "
                     "list of PIL images, or (frames, {'fps': ...})) or a list of videos")


def count_videos(data: Any) -> int:
    """How many videos an entry holds (limit_mm_per_prompt), without checking them."""
    try:
        return len(split_videos(data))
    except ValueError:
        return 1


def video_processor_dict(path: str) -> dict[str, Any]:
    """The checkpoint's video processor settings where HF's video processor finds them:
    processor_config.json's nested "video_processor", else video_preprocessor_config.json,
    else the image processor's preprocessor_config.json ({}: none, the defaults)."""
    nested = os.path.join(path, "processor_config.json")
    if os.path.isfile(nested):
        with open(nested) as f:
            found = json.load(f).get("video_processor")
        if isinstance(found, dict):
            return found
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file) as f:
                return json.load(f)
    return {}


def unpack(video: Any) -> tuple[Any, dict[str, Any]]:
    """A video's frames and its metadata dict ({} when given bare)."""
    if isinstance(video, tuple) and len(video) == 2 and isinstance(video[1], dict):
        return video
    return video, {}


class QwenVideoProcessor:
    """The checkpoint's video processor settings (video_processor_dict) applied to
    frames."""

    default_size = DEFAULT_SIZE
    default_mean, default_std = CLIP_MEAN, CLIP_STD
    default_max_video_tokens = 128000

    def __init__(self, path: str, config: QwenVisionConfig) -> None:
        self.config = config
        cfg = video_processor_dict(path)
        size = dict(cfg.get("size") or self.default_size)
        for old, new in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            if old in size:  # older configs' size keys
                size[new] = size.pop(old)
        if "shortest_edge" not in size or "longest_edge" not in size:
            raise ValueError(f"{path}: the video processor's size must give shortest_edge and "
                             f"longest_edge (pixels), got {size}")
        if cfg.get("min_pixels") is not None:
            size["shortest_edge"] = cfg["min_pixels"]
        if cfg.get("max_pixels") is not None:
            size["longest_edge"] = cfg["max_pixels"]
        self.min_pixels, self.max_pixels = int(size["shortest_edge"]), int(size["longest_edge"])
        self.patch_size = int(cfg.get("patch_size", config.patch_size))
        self.temporal_patch_size = int(cfg.get("temporal_patch_size",
                                               config.temporal_patch_size))
        self.merge_size = int(cfg.get("merge_size", config.merge_size))
        if (self.patch_size, self.temporal_patch_size, self.merge_size) != (
                config.patch_size, config.temporal_patch_size, config.merge_size):
            raise ValueError(f"{path}: the video processor's patch sizes differ from the "
                             "vision tower's")
        self.do_resize = bool(cfg.get("do_resize", True))
        self.do_rescale = bool(cfg.get("do_rescale", True))
        self.do_normalize = bool(cfg.get("do_normalize", True))
        self.rescale_factor = float(cfg.get("rescale_factor", 1 / 255))
        self.mean = tuple(cfg.get("image_mean") or self.default_mean)
        self.std = tuple(cfg.get("image_std") or self.default_std)
        self.cap_pixels = bool(cfg.get("cap_pixels_per_frame"))
        self.max_video_tokens = int(cfg.get("max_video_tokens", self.default_max_video_tokens))

    def frames(self, video: Any) -> tuple[torch.Tensor, float]:
        """[T, 3, H, W] frames (uint8 as given, or the array's dtype) and the fps."""
        video, meta = unpack(video)
        return self.array(video), _sampled_fps(meta)

    @staticmethod
    def array(video: Any) -> torch.Tensor:
        """[T, 3, H, W]: a video's frames (without metadata), uint8 or float."""
        if isinstance(video, list | tuple):
            from PIL import Image

            arrays = [np.asarray(f.convert("RGB")) if isinstance(f, Image.Image) else f
                      for f in video]
            if len({a.shape for a in arrays}) != 1:
                raise ValueError("multi_modal_data: a video's frames must all have one size")
            video = np.stack(arrays)
        frames = torch.as_tensor(np.ascontiguousarray(video)) if isinstance(
            video, np.ndarray) else video
        if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
            raise ValueError("multi_modal_data: a video must be [frames, height, width, 3] "
                             f"(RGB), got shape {tuple(frames.shape)}")
        if not (frames.dtype == torch.uint8 or frames.dtype.is_floating_point):
            raise ValueError(f"multi_modal_data: a video's pixels must be uint8 or float, "
                             f"got {frames.dtype}")
        return frames.permute(0, 3, 1, 2)

    def size(self, frames: int, height: int, width: int) -> tuple[int, int]:
        """The frames' size after resizing (Qwen2VLVideoProcessor.resize's rule)."""
        if not self.do_resize:
            return height, width
        factor = self.patch_size * self.merge_size
        top = self.max_pixels
        if self.cap_pixels:  # qwen-vl-utils' whole-video budget, as HF applies it
            total = int(self.max_video_tokens * factor * factor * 0.9)
            top = max(min(top, total * self.temporal_patch_size // frames),
                      int(self.min_pixels * 1.05))
        return _smart_resize(height, width, factor, self.min_pixels, top)

    def grid(self, video: Any) -> Grid:
        frames, _ = self.frames(video)
        t, _, h, w = frames.shape
        h, w = self.size(t, h, w)
        tp = self.temporal_patch_size
        return (t + -t % tp) // tp, h // self.patch_size, w // self.patch_size

    def __call__(self, video: Any) -> Video:
        frames, fps = self.frames(video)
        if fps <= 0:
            raise ValueError(f"multi_modal_data: a video's fps must be positive, got {fps}")
        patches, grid = self.pixels(frames)
        second = self.temporal_patch_size / fps
        digest = hashlib.blake2b(b"video" + patches.contiguous().numpy().tobytes()
                                 + repr((grid, second)).encode(), digest_size=16).digest()
        return Video(patches, grid, second, digest)

    def pixels(self, frames: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        """[T, 3, H, W] frames resized, rescaled, normalized and laid out in patches."""
        t, _, height, width = frames.shape
        return self.patchify(frame_pixels(frames, self.size(t, height, width), self))

    def expand(self, ids: list[int], clips: list[Any], grids: list[Grid]) -> list[int]:
        """The prompt with each video's `<|video_pad|>` expanded to its grid's tokens
        (Qwen2VLProcessor's rule)."""
        c = self.config
        return expand_placeholders(ids, c.video_token_id, [c.tokens_for(g) for g in grids],
                                   kind="video")

    def spans(self, ids: list[int], grids: list[Grid]) -> list[tuple[int, int]]:
        """Each video's placeholders in the expanded prompt: (first, span to its last)."""
        c = self.config
        firsts = [p for p, t in enumerate(ids)
                  if t == c.video_token_id and (p == 0 or ids[p - 1] != t)]
        return [(first, c.tokens_for(g)) for first, g in zip(firsts, grids, strict=True)]

    def rope_grids(self, videos: list[Video]) -> tuple[list[Grid], list[float]]:
        """What models/mrope.py's mrope_positions takes for these videos: a grid per run
        of placeholders and its temporal step (Qwen2.5-VL: tokens_per_second x
        second_per_grid_t in fp32, as HF multiplies them; Qwen2-VL: 1)."""
        c = self.config
        steps = [float(torch.tensor(v.second_per_grid_t, dtype=torch.float32)
                       * c.tokens_per_second) if c.tokens_per_second else 1.0 for v in videos]
        return [v.grid for v in videos], steps

    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        """[T, C, H, W] -> [t * h * w, C x temporal x patch^2] in HF's patch order."""
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if pad := -x.shape[0] % tp:
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        frames, c, height, width = x.shape
        t, h, w = frames // tp, height // p, width // p
        x = x.view(t, tp, c, h // m, m, p, w // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(t * h * w, c * tp * p * p), (t, h, w)


def frame_pixels(frames: torch.Tensor, size: tuple[int, int], norm: Any) -> torch.Tensor:
    """[T, 3, H, W] frames resized to `size` (bicubic with antialias, as torchvision
    resizes: a uint8 tensor in fp32, clamped and rounded back) and rescaled and normalized
    in HF's one fused step, by `norm`'s do_rescale, rescale_factor, do_normalize, mean and
    std (a video processor's settings; InternVL's too, engine/internvl_videos.py)."""
    x = frames
    if size != tuple(frames.shape[-2:]):
        x = F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False,
                          antialias=True)
        if frames.dtype == torch.uint8:  # torchvision's uint8 bicubic
            x = x.clamp_(0, 255).round_().to(torch.uint8)
    x = x.to(torch.float32)
    if norm.do_normalize:  # HF's fused rescale + normalize
        scale = 1 / norm.rescale_factor if norm.do_rescale else 1.0
        mean = torch.tensor(norm.mean, dtype=torch.float32) * scale
        std = torch.tensor(norm.std, dtype=torch.float32) * scale
        x = (x - mean[:, None, None]) / std[:, None, None]
    elif norm.do_rescale:
        x = x * norm.rescale_factor
    return x


def _sampled_fps(meta: dict[str, Any]) -> float:
    """HF's VideoMetadata.sampled_fps: the video's fps scaled by the share of its frames
    sampled (when the metadata says which), else its fps, else 24."""
    fps, indices, total = meta.get("fps"), meta.get("frames_indices"), meta.get(
        "total_num_frames")
    if not fps:
        return DEFAULT_FPS
    if indices is None or total is None:
        return float(fps)
    return len(indices) / total * float(fps)
