"""Gemma 3's pan-and-scan (HF's Gemma3ImageProcessor.pan_and_scan): an image much wider
than tall (or taller than wide) is also cut into 2 to `max_num_crops` crops side by side,
each resized to the tower's size and encoded as an image of its own; Gemma3Processor
writes them after the whole image (models/gemma3_vision.py, Gemma3ImageTokens). Off
unless the image processor's config or mm_processor_kwargs turn it on (vLLM's
`{"do_pan_and_scan": true}`); the crop count here is HF's rule, so /tokenize and usage
count the crops without cutting the image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

# the keys of mm_processor_kwargs (and of the image processor's config) read here
KEYS = ("do_pan_and_scan", "pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops",
        "pan_and_scan_min_ratio_to_activate")


@dataclass(frozen=True)
class PanAndScan:
    """The four options; the defaults are Gemma3Processor's (its config saves None)."""

    do_pan_and_scan: bool = False
    pan_and_scan_min_crop_size: int = 256
    pan_and_scan_max_num_crops: int = 4
    pan_and_scan_min_ratio_to_activate: float = 1.2

    @classmethod
    def of_processor(cls, hf: Any) -> PanAndScan:
        """The options an HF Gemma3ImageProcessor was saved with (None: the default)."""
        saved = {k: getattr(hf, k, None) for k in KEYS}
        return cls().with_options({k: v for k, v in saved.items() if v is not None},
                                  "the image processor's config")

    def with_options(self, options: Mapping[str, Any],
                     where: str = "mm_processor_kwargs") -> PanAndScan:
        """These options with `options` (keys among KEYS) over them; ValueError for a
        value of the wrong kind."""
        for key, value in options.items():
            if key == "do_pan_and_scan":
                ok = isinstance(value, bool)
            elif key == "pan_and_scan_min_ratio_to_activate":
                ok = isinstance(value, int | float) and not isinstance(value, bool) \
                    and value > 0
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            if not ok:
                kind = {"do_pan_and_scan": "true or false",
                        "pan_and_scan_min_ratio_to_activate": "a number > 0"}.get(
                            key, "an integer >= 1")
                raise ValueError(f"{where}: {key} must be {kind}, got {value!r}")
        return replace(self, **dict(options))

    def crops(self, size: tuple[int, int]) -> int:
        """How many crops HF cuts an image of `size` (height, width) into (0: none)."""
        if not self.do_pan_and_scan:
            return 0
        long, short = max(size), min(size)
        if long / short < self.pan_and_scan_min_ratio_to_activate:
            return 0
        n = min(int(math.floor(long / self.pan_and_scan_min_crop_size)),
                int(math.floor(long / short + 0.5)))  # HF's half-up rounding
        n = min(self.pan_and_scan_max_num_crops, max(2, n))
        if min(math.ceil(long / n), short) < self.pan_and_scan_min_crop_size:
            return 0
        return n

    def hf_kwargs(self) -> dict[str, Any]:
        """What HF's image processor is called with (all four: its own are None)."""
        return {k: getattr(self, k) for k in KEYS}
