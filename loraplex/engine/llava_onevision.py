"""LLaVA-OneVision's images and videos on their way into the engine, as
LlavaOnevisionProcessor takes them: each `<image>` expanded to the image's count
(models/llava_onevision.py `tokens_for`: LLaVA-NeXT's anyres with the anyres_max budget),
its tiles from the checkpoint's HF image processor (engine/images.py's ImageProcessor);
each `<video>` expanded to its frames' pooled tokens and one newline, its frames resized
to the tower's tile and normalized as HF's LlavaOnevisionVideoProcessor does (its module
needs torchvision, not a dependency: engine/internvl_videos.py's steps, the same ones,
redone in torch), taken as given (HF's do_sample_frames is off; vLLM's loader samples).

Images and videos are items of one ImageInputs in prompt order (a video's size
(frames, 0), `ImageInputs.videos` its index), so one tower call embeds them all.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from loraplex.engine.images import (
    ImageInputs,
    ImageProcessor,
    expand_placeholders,
    image_hash,
    load_images,
    placeholder_ranges,
)
from loraplex.engine.internvl_videos import InternVLVideoProcessor, VideosBesideImages
from loraplex.engine.qwen_videos import QwenVideoProcessor, split_videos, unpack
from loraplex.models.llava_onevision import LlavaOnevisionVisionConfig, is_video

logger = logging.getLogger(__name__)


class OnevisionVideoProcessor(InternVLVideoProcessor):
    """HF's LlavaOnevisionVideoProcessor settings on frames: each resized to the tile,
    rescaled and normalized; no frame sampling (its do_sample_frames is off)."""

    def frames(self, video: Any) -> torch.Tensor:
        """[T, 3, H, W] frames as given (uint8, or float)."""
        return QwenVideoProcessor.array(unpack(video)[0])


class LlavaOnevisionProcessor(VideosBesideImages, ImageProcessor):
    """ImageProcessor with OneVision's counts, and its videos."""

    config: LlavaOnevisionVisionConfig

    def __init__(self, path: str, config: LlavaOnevisionVisionConfig, tokenizer: Any = None
                 ) -> None:
        super().__init__(path, config, tokenizer)
        self.video_token_id = config.video_token_id
        self.video: OnevisionVideoProcessor | None = None
        try:
            self.video = OnevisionVideoProcessor(path, config.image_size)
        except ValueError as e:  # (a video processor config it cannot follow: images only)
            logger.warning("%s; video inputs are refused", e)
            self.no_videos = f"multi_modal_data: video inputs are not supported: {e}"

    def expanded_with_videos(self, ids: list[int], images: list[Any], frames: list[int]
                             ) -> list[int]:
        return self.expand_media(ids, self._sizes(images), frames)

    def expand_media(self, ids: list[int], sizes: list[tuple[int, int]], frames: list[int]
                     ) -> list[int]:
        """Each `<image>` expanded for its image's size, each `<video>` for its frames
        (a prompt expanded so already is kept as it is)."""
        c = self.config
        ids = expand_placeholders(ids, c.image_token_id, [c.tokens_for(s) for s in sizes])
        return expand_placeholders(ids, c.video_token_id,
                                   [c.tokens_for((n, 0)) for n in frames], kind="video")

    def with_videos(self, ids: list[int], image_data: Any, video_data: Any
                    ) -> tuple[list[int], ImageInputs]:
        """The prompt with its images' and videos' placeholders expanded, and their inputs:
        items in prompt order, an image its tiles, a video its frames."""
        images = load_images(image_data) if image_data is not None else []
        video = self._video()
        clips = [video.frames(v) for v in split_videos(video_data)]
        sizes = self._sizes(images)
        # before the pixels: a mismatch costs nothing
        ids = self.expand_media(ids, sizes, [len(f) for f in clips])
        items = []
        if images:
            pixels = self._image_pixels(images, sizes)
            items += [(p, s, image_hash(p, s)) for p, s in
                      zip(pixels.split([self.config.tiles(s) for s in sizes]), sizes,
                          strict=True)]
        for frames in clips:
            pixels, digest = video(frames)
            items.append((pixels, (len(frames), 0), digest))
        order = self._order(ids)
        kept = [items[i if kind == "image" else len(images) + i] for kind, i in order]
        sizes = [s for _, s, _ in kept]
        positions = self.positions(ids)
        return ids, ImageInputs(
            torch.cat([p for p, _, _ in kept]), positions,
            placeholder_ranges(positions, [self.config.tokens_for(s) for s in sizes]),
            [h for _, _, h in kept], sizes=sizes,
            videos=[k for k, s in enumerate(sizes) if is_video(s)])

    def _image_pixels(self, images: list[Any], sizes: list[tuple[int, int]]) -> torch.Tensor:
        """The images' tiles [tiles, 3, H, W], one after another (HF pads each to the
        most tiles any has)."""
        out = self.hf(images=[im.convert("RGB") for im in images], return_tensors="pt")
        pixels = out["pixel_values"]
        self.check_pixels(pixels)
        return torch.cat([p[:self.config.tiles(s)] for p, s in zip(pixels, sizes, strict=True)])

    @staticmethod
    def _sizes(images: list[Any]) -> list[tuple[int, int]]:
        """The images' (height, width); an empty image is refused (its size would read as
        a video's)."""
        sizes = [(im.height, im.width) for im in images]
        if any(0 in s for s in sizes):
            raise ValueError("multi_modal_data: an image has no pixels")
        return sizes

    def _order(self, ids: list[int]) -> list[tuple[str, int]]:
        """The items' kinds and indices in prompt order: one a run of placeholders."""
        c = self.config
        kinds = {c.image_token_id: "image", c.video_token_id: "video"}
        order, seen = [], {"image": 0, "video": 0}
        for p, t in enumerate(ids):
            if t in kinds and (p == 0 or ids[p - 1] != t):
                order.append((kinds[t], seen[kinds[t]]))
                seen[kinds[t]] += 1
        return order

    def positions(self, ids: list[int]) -> list[int]:
        c = self.config
        return [p for p, t in enumerate(ids) if t in (c.image_token_id, c.video_token_id)]

    def check(self, ids: list[int], inputs: ImageInputs) -> None:
        """The server's inputs must be the prompt's: ImageProcessor's checks with each
        item's kind the kind of its placeholders."""
        super().check(ids, inputs)
        c = self.config
        kinds = [c.video_token_id if is_video(s) else c.image_token_id for s in inputs.sizes]
        if [ids[first] for first, _ in inputs.ranges] != kinds or \
                inputs.videos != [k for k, s in enumerate(inputs.sizes) if is_video(s)]:
            raise ValueError("multi_modal_data: the processed image inputs do not match the "
                             "prompt's (expanded) image placeholders")
