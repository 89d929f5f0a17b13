"""HF's Gemma4VideoProcessor without torchvision, as tests/test_gemma4_video.py's ground
truth, and frames for it.

transformers' video_processing_gemma4.py needs torchvision (its `tvF`) to be imported at
all, for its resize, normalize and RGB conversion. This environment has no torchvision,
so the module is imported with a stand-in `tvF` whose `normalize` is (x - mean) / std in
torch and whose `resize` refuses: the test frames are at the size HF's resize keeps
(get_aspect_ratio_preserving_size returns it), so HF never resizes them, and everything
else (rescale, patches, positions, the prompt's timestamps) is HF's own code. Frames that
do need resizing are checked against HF's image processor (vLLM's path) instead.
"""

from __future__ import annotations

import builtins
import functools
import importlib
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _normalize(x: torch.Tensor, mean: Any, std: Any, inplace: bool = False) -> torch.Tensor:
    mean = torch.as_tensor(mean, dtype=x.dtype)[:, None, None]
    std = torch.as_tensor(std, dtype=x.dtype)[:, None, None]
    return (x - mean) / std


def _resize(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("torchvision's resize is not available: give frames at the "
                              "size HF's video processor keeps")


@functools.cache
def _video_processor_class() -> type:
    import transformers.image_processing_backends as backends

    tvf = types.SimpleNamespace(InterpolationMode=types.SimpleNamespace(BICUBIC=3),
                                normalize=_normalize, resize=_resize)
    builtins.tvF = tvf  # the class body's annotations name it
    try:
        module = importlib.import_module("transformers.models.gemma4.video_processing_gemma4")
    finally:
        del builtins.tvF
    module.tvF = tvf
    backends.tvF = tvf  # rescale_and_normalize's normalize
    return module.Gemma4VideoProcessor


def video_processor(max_soft_tokens: int = 70, path: Path | None = None) -> Any:
    """HF's Gemma4VideoProcessor at the tiny tower's patch sizes (4-pixel patches pooled
    2 x 2), or the one saved at `path`."""
    cls = _video_processor_class()
    if path is not None:
        return cls.from_pretrained(str(path.parent))
    return cls(patch_size=4, pooling_kernel_size=2, max_soft_tokens=max_soft_tokens)


def frames(seed: int, count: int, size: tuple[int, int] = (56, 72)) -> np.ndarray:
    """[count, H, W, 3] uint8: smooth random frames (a low-resolution noise upscaled), so
    resizing them keeps what they show. (56, 72) and (64, 64): sizes a 70-token budget at
    4-pixel patches pooled 2 x 2 keeps as they are."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 3, 7, 9, generator=gen)
    full = torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)
    return (full * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
