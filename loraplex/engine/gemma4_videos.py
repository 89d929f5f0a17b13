"""Gemma 4's videos (vLLM's `multi_modal_data={"video": ...}`, chat `video_url` parts).
Gemma 4 has no video tower: each frame is an image of its own through the vision tower,
at the video's smaller budget, as vLLM's Gemma 4 processor takes them.

Frames: taken as given (vLLM's loader has sampled them: engine/video_decode.py; HF's
Gemma4VideoProcessor would sample 32 of them itself, which vLLM bypasses too). Each frame
is resized (aspect ratio kept) and cut into patches by the checkpoint's image processor at
the video processor's max_soft_tokens (70 by default), as vLLM calls it; HF's video
processor computes the same patches (rescale, patchify and positions as its image
processor's) but resizes with torchvision, which loraplex does not depend on.

Prompt (Gemma4Processor.replace_video_token): each `<|video|>` becomes, per frame, its
timestamp `mm:ss` (whole seconds, truncated: the frame's index in the source video over
its fps, from the metadata's `frames_indices` and `fps`, else 0, 1, ... and HF's 24), a
space, boi, the frame's soft tokens (`<|video|>` each) and eoi, the frames joined by
spaces. HF writes that into the text and tokenizes it whole, so the first timestamp is
tokenized together with the text before the video (the stretch since the last added
token, when its ids are that text's tokenization); the later ones follow an eoi and are
tokenized alone, as is the text after the video.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from loraplex.engine.qwen_videos import QwenVideoProcessor, unpack, video_processor_dict
from loraplex.models.gemma4_vision import Gemma4VisionConfig
from loraplex.models.llava import placeholder_runs

DEFAULT_FPS = 24.0  # Gemma4Processor's, for a video without metadata
VIDEO_SOFT_TOKENS = 70  # Gemma4VideoProcessor's max_soft_tokens


@dataclass(frozen=True)
class Gemma4Clip:
    """One video as Gemma 4 takes it: its frames, their times, their patch grid."""

    frames: list[Any]  # PIL images, one size
    timestamps: list[float]  # seconds
    grid: tuple[int, int]  # each frame's (rows, columns) of patches after resizing


def stamp(seconds: float) -> str:
    """Gemma4Processor's `mm:ss`."""
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


class Gemma4Videos:
    """The checkpoint's video settings applied to frames, and the prompt rule."""

    def __init__(self, path: str, config: Gemma4VisionConfig, image_processor: Any,
                 tokenizer: Any) -> None:
        cfg = video_processor_dict(path)
        if "image_processor_type" in cfg:  # the image processor's file: no video settings
            cfg = {}
        sizes = (int(cfg.get("patch_size", config.patch_size)),
                 int(cfg.get("pooling_kernel_size", config.pooling_kernel_size)))
        if sizes != (config.patch_size, config.pooling_kernel_size):
            raise ValueError(f"{path}: Gemma 4's video processor cuts {sizes[0]}-pixel patches "
                             f"pooled {sizes[1]} x {sizes[1]}, its tower takes "
                             f"{config.patch_size} pooled {config.pooling_kernel_size}")
        self.config = replace(config, max_soft_tokens=int(cfg.get("max_soft_tokens",
                                                                  VIDEO_SOFT_TOKENS)))
        self.hf = image_processor
        self.tokenizer = tokenizer
        # what splits HF's tokenization: every added token
        self.added = set(getattr(tokenizer, "added_tokens_decoder", {})) | {
            config.image_token_id, config.video_token_id, config.boi_token_id,
            config.eoi_token_id}

    def clip(self, video: Any) -> Gemma4Clip:
        """A multi_modal_data video ([T, H, W, 3] uint8, a list of PIL images or arrays,
        or (frames, metadata)) as its frames, their times and their grid."""
        from PIL import Image

        frames, meta = unpack(video)
        array = QwenVideoProcessor.array(frames)  # [T, 3, H, W], checked
        if array.dtype != torch.uint8:
            raise ValueError("multi_modal_data: Gemma 4's video frames must be uint8 RGB (or "
                             f"PIL images), got {array.dtype}")
        fps = float(meta.get("fps") or DEFAULT_FPS)
        if not fps > 0:
            raise ValueError(f"multi_modal_data: a video's fps must be positive, got {fps}")
        indices = meta.get("frames_indices")
        indices = range(len(array)) if indices is None else [int(i) for i in indices]
        if len(indices) != len(array):
            raise ValueError(f"multi_modal_data: a video's frames_indices name {len(indices)} "
                             f"frames, but it has {len(array)}")
        pil = [Image.fromarray(np.ascontiguousarray(f.permute(1, 2, 0).numpy())) for f in array]
        grid = self.config.grid(tuple(array.shape[-2:]))
        return Gemma4Clip(pil, [i / fps for i in indices], grid)

    def frame_tokens(self, clip: Gemma4Clip) -> list[int]:
        """Each frame's soft-token count."""
        return [self.config.grid_tokens(clip.grid)] * len(clip.frames)

    def pixels(self, clip: Gemma4Clip) -> torch.Tensor:
        """[frames x rows x columns, 3 p^2]: each frame's real patches, as the image
        processor gives them at the video budget."""
        c = self.config
        out = self.hf(images=clip.frames, max_soft_tokens=c.max_soft_tokens, return_tensors="pt")
        patches = out["pixel_values"]
        if patches.shape[1] != c.max_soft_tokens * c.pooling_kernel_size ** 2:
            raise ValueError(f"the image processor gives {patches.shape[1]} patches a frame, "
                             f"not the video budget's {c.max_soft_tokens} soft tokens")
        return patches[:, :clip.grid[0] * clip.grid[1]].flatten(0, 1).float()

    def expand(self, ids: list[int], clips: list[Gemma4Clip]) -> list[int]:
        """Each video's one `<|video|>` replaced by its frames (the module docstring's
        rule); a prompt already so expanded (a run of `<|video|>` per frame) is kept."""
        c = self.config
        if placeholder_runs(ids, c.video_token_id) == [n for clip in clips
                                                       for n in self.frame_tokens(clip)]:
            return list(ids)
        pads = [p for p, t in enumerate(ids) if t == c.video_token_id]
        if len(pads) != len(clips):
            raise ValueError(f"the prompt has {len(pads)} <|video|> token(s) (id "
                             f"{c.video_token_id}) for {len(clips)} video(s): put one "
                             "<|video|> where each video goes")
        out: list[int] = []
        done = 0
        for p, clip in zip(pads, clips, strict=True):
            out = self._with_text(out + ids[done:p], stamp(clip.timestamps[0]) + " ")
            for i, n in enumerate(self.frame_tokens(clip)):
                if i:
                    out += self._encode(f" {stamp(clip.timestamps[i])} ")
                out += [c.boi_token_id, *[c.video_token_id] * n, c.eoi_token_id]
            done = p + 1
        return out + ids[done:]

    def _with_text(self, ids: list[int], text: str) -> list[int]:
        """`ids` followed by `text` as HF's whole-text tokenization gives it: the text
        since the last added token re-encoded with it (when `ids` hold its encoding)."""
        start = len(ids)
        while start and ids[start - 1] not in self.added:
            start -= 1
        before = self.tokenizer.decode(ids[start:])
        if start < len(ids) and self._encode(before) == ids[start:]:
            return ids[:start] + self._encode(before + text)
        return ids + self._encode(text)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)
