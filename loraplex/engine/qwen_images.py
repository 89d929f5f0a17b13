"""Qwen2-VL's, Qwen2.5-VL's and Qwen3-VL's images (engine/images.py's ImageProcessor, for
these models; Qwen3-VL's processor, placeholders and image positions are Qwen2-VL's):
the checkpoint's HF image processor (Qwen2VLImageProcessor: smart_resize to multiples
of patch_size x merge_size, patches in merge-block order, `image_grid_thw`), the
prompt's `<|image_pad|>` expanded to grid_t x grid_h x grid_w / merge_size^2 tokens per
image as Qwen2VLProcessor expands it, and the prompt's M-RoPE positions
(models/mrope.py) computed once here, beside the pixels, for the model runner.

Videos (Qwen2-VL, Qwen2.5-VL: engine/qwen_videos.py; Qwen3-VL: engine/qwen3_videos.py)
are items of the same ImageInputs: each `<|video_pad|>` expanded as the model's
processor does (Qwen2: its grid's t x h x w / merge_size^2 tokens; Qwen3: per temporal
patch a timestamp and its pads between vision start and end, the item's range then
spanning from its first pad to its last), its patches in the pixels and its grid in
`sizes` at its place in prompt order among the images (one tower call embeds them all,
row after row as the placeholders come; Qwen3-VL's DeepStack features with them), its
hash in the prefix-cache keys of its blocks, its positions as HF's get_rope_index gives
them.

`ImageInputs.sizes` holds each image's patch grid (t, h, w) here, which is what the vision
tower (models/qwen2_vl.py) and the placeholder count read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch

from loraplex.engine.images import ImageInputs, expand_placeholders, load_images
from loraplex.engine.multimodal_processor import MultimodalProcessor
from loraplex.engine.qwen3_videos import Qwen3VideoProcessor
from loraplex.engine.qwen_videos import QwenVideoProcessor, split_videos
from loraplex.models.mrope import mrope_positions
from loraplex.models.qwen2_vl import Grid, QwenVisionConfig
from loraplex.models.qwen3_vl import Qwen3VisionConfig


def _token(tokenizer: Any, name: str, text: str) -> int:
    """A special token's id as HF's processor finds it: the tokenizer's attribute, else
    its text's id."""
    return getattr(tokenizer, name, None) or tokenizer.convert_tokens_to_ids(text)


class QwenImageProcessor(MultimodalProcessor):
    """The model's HF image processor plus Qwen2-VL's placeholder and position rules."""

    def __init__(self, path: str, config: QwenVisionConfig, tokenizer: Any = None) -> None:
        """`tokenizer`: Qwen3-VL's videos' timestamps are text (none: its videos refused)."""
        from transformers import AutoImageProcessor

        self.config = config
        self.placeholder = config.image_token_id
        self.hf = AutoImageProcessor.from_pretrained(path)
        self.video: QwenVideoProcessor | None = None
        if config.video_token_id >= 0 and not isinstance(config, Qwen3VisionConfig):
            self.video = QwenVideoProcessor(path, config)
        elif config.video_token_id >= 0 and tokenizer is not None:
            self.video = Qwen3VideoProcessor(
                path, config, lambda text: tokenizer.encode(text, add_special_tokens=False),
                _token(tokenizer, "vision_end_token_id", "<|vision_end|>"))
        self.no_videos = "multi_modal_data: video inputs are not supported for this model " + (
            "(its config names no video_token_id)" if config.video_token_id < 0 else
            "(Qwen3-VL's video timestamps need the tokenizer, which was not given)")

    @property
    def modalities(self) -> tuple[str, ...]:
        return ("image", "video") if self.video is not None else ("image",)

    def placeholder_token(self, modality: str) -> int | None:
        return self.config.video_token_id if modality == "video" else self.placeholder

    def process(self, ids: list[int], data: Mapping[str, Any],
                options: Mapping[str, Any] | None = None) -> tuple[list[int], ImageInputs]:
        if "video" in data:
            return self(ids, data.get("image"), videos=data["video"])
        return self(ids, data["image"])

    def expanded(self, ids: list[int], data: Mapping[str, Any],
                 options: Mapping[str, Any] | None = None) -> list[int]:
        return self.expand(ids, data.get("image", []), data.get("video"))

    def processed_inputs(self, data: Mapping[str, Any]) -> ImageInputs | None:
        """The server's inputs (under "image": its videos are items of them); raw videos
        beside them are processed with them, as raw items."""
        return None if "video" in data else super().processed_inputs(data)

    def _grids(self, images: list[Any]) -> list[tuple[int, int, int]]:
        """Each image's patch grid, as the HF processor will give it (its own smart_resize,
        without the pixels)."""
        import importlib

        hf, c = self.hf, self.config
        resize = importlib.import_module(type(hf).__module__).smart_resize
        size = getattr(hf, "size", None) or {}
        size = size if isinstance(size, dict) else vars(size)
        lo = size.get("shortest_edge") or getattr(hf, "min_pixels", None)
        hi = size.get("longest_edge") or getattr(hf, "max_pixels", None)
        grids = []
        for im in images:
            h, w = resize(im.height, im.width, factor=c.patch_size * c.merge_size,
                          min_pixels=lo, max_pixels=hi)
            grids.append((1, h // c.patch_size, w // c.patch_size))
        return grids

    def __call__(self, ids: list[int], data: Any, videos: Any = None
                 ) -> tuple[list[int], ImageInputs]:
        """The prompt with its placeholders expanded, and its images' and videos' inputs
        (with the prompt's M-RoPE positions). `data`: one image or a list (PIL images or
        URLs), or None; `videos`: multi_modal_data's "video" entry (engine/qwen_videos.py),
        or None. Images and videos are items of one ImageInputs, in prompt order: one
        tower call embeds them all."""
        images = [] if data is None else load_images(data)
        clips = [] if videos is None else split_videos(videos)
        if clips and self.video is None:
            raise ValueError(self.no_videos)
        c = self.config
        grids = self._grids(images)
        video_grids = [self.video.grid(v) for v in clips] if clips else []
        # before the pixels: a mismatch costs nothing
        ids = self._expand(ids, grids, clips, video_grids)
        items: list[tuple[torch.Tensor, Grid, bytes]] = []
        if images:
            out = self.hf(images=[im.convert("RGB") for im in images], return_tensors="pt")
            if [tuple(int(x) for x in g) for g in out["image_grid_thw"].tolist()] != grids:
                raise ValueError(f"the image processor's grids {out['image_grid_thw'].tolist()}"
                                 f" are not the {grids} its smart_resize gives")
            patches = out["pixel_values"].float().split([t * h * w for t, h, w in grids])
            items += [(p, g, hashlib.blake2b(p.contiguous().numpy().tobytes()
                                             + repr(g).encode(), digest_size=16).digest())
                      for p, g in zip(patches, grids)]
        processed = [self.video(v) for v in clips]
        if [v.grid for v in processed] != video_grids:
            raise ValueError("a video's patch grid is not the one its size gives")
        items += [(v.patches, v.grid, v.hash) for v in processed]
        # each item's placeholders (first, span); the prompt order of images and videos
        spans = [(first, c.tokens_for(g)) for first, g in
                 zip(self._firsts(ids, c.image_token_id), grids, strict=True)]
        if clips:
            spans += self.video.spans(ids, video_grids)
        order = sorted(range(len(items)), key=lambda i: spans[i][0])
        pixels = (torch.cat([items[i][0] for i in order]) if items
                  else torch.empty(0, c.in_channels * c.temporal_patch_size * c.patch_size ** 2))
        inputs = ImageInputs(pixels, self.positions(ids), [spans[i] for i in order],
                             [items[i][2] for i in order], sizes=[items[i][1] for i in order],
                             videos=[k for k, i in enumerate(order) if i >= len(images)])
        runs, steps = self.video.rope_grids(processed) if processed else ([], [])
        inputs.mrope, inputs.mrope_delta = mrope_positions(
            ids, c.image_token_id, grids, c.merge_size,
            c.video_token_id if self.video is not None else None, runs, steps)
        return ids, inputs

    def _expand(self, ids: list[int], grids: list[Grid], clips: list[Any],
                video_grids: list[Grid]) -> list[int]:
        c = self.config
        ids = expand_placeholders(ids, c.image_token_id, [c.tokens_for(g) for g in grids])
        if self.video is None:
            return ids
        return self.video.expand(ids, clips, video_grids)

    @staticmethod
    def _firsts(ids: list[int], token: int) -> list[int]:
        """The first placeholder of each run of `token` (one run per item: expanded)."""
        return [p for p, t in enumerate(ids) if t == token and (p == 0 or ids[p - 1] != token)]

    def expand(self, ids: list[int], images: list[Any], videos: Any = None) -> list[int]:
        """The prompt with its placeholders expanded for these (PIL) images and videos,
        without processing them: what /tokenize and usage count."""
        clips = [] if videos is None else split_videos(videos)
        if clips and self.video is None:
            raise ValueError(self.no_videos)
        return self._expand(ids, self._grids(images), clips,
                            [self.video.grid(v) for v in clips] if clips else [])

    def positions(self, ids: list[int]) -> list[int]:
        tokens = {self.config.image_token_id}
        if self.video is not None:
            tokens.add(self.config.video_token_id)
        return [p for p, t in enumerate(ids) if t in tokens]

    def check(self, ids: list[int], inputs: ImageInputs) -> None:
        """Processed inputs given with a prompt (the server's) must be that prompt's."""
        c = self.config
        videos = set(inputs.videos)
        if self.positions(ids) != inputs.positions or inputs.mrope is None \
                or inputs.mrope.shape[1] != len(ids) \
                or [sum(first <= p < first + n for p in inputs.positions)
                    for first, n in inputs.ranges] != [c.tokens_for(g) for g in inputs.sizes] \
                or any((ids[first] == c.video_token_id) != (i in videos)
                       for i, (first, _) in enumerate(inputs.ranges)) \
                or inputs.pixel_values.shape[0] != sum(t * h * w for t, h, w in inputs.sizes):
            raise ValueError("multi_modal_data: the processed image inputs do not match the "
                             "prompt's (expanded) image placeholders")
