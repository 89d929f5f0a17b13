"""InternVL's images on their way into the engine: HF's GotOcr2 image processor cuts each
image into tiles of the tower's size (crop_to_patches, as InternVLProcessor asks it: the
grid of at most max_patches tiles whose aspect ratio is nearest the image's, and a
thumbnail of the whole image after them when there is more than one tile), and each
`<IMG_CONTEXT>` of the prompt becomes `<img>`, tokens_per_tile `<IMG_CONTEXT>` per tile,
`</img>`, as InternVLProcessor expands it (so the prompt ids are HF's). The rest is
engine/images.py's ImageProcessor: pixels, placeholders' positions, hashes, checks.

Videos (multi_modal_data "video", chat `video_url` parts) are items of the same
ImageInputs (engine/internvl_videos.py: each frame one tile, each `<video>` its frames'
"Frame{i}: <img>...</img>" lines), in prompt order among the images: one tower call
embeds them all, tile after tile as the placeholders come. A video's size in
`ImageInputs.sizes` is (its frames, 0); `ImageInputs.videos` says which items are videos.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from loraplex.engine.images import (
    ImageInputs,
    ImageProcessor,
    image_hash,
    load_images,
    placeholder_ranges,
)
from loraplex.engine.internvl_videos import (
    InternVLMediaTokens,
    InternVLVideoProcessor,
    VideosBesideImages,
    wrapped,
)
from loraplex.engine.qwen_videos import split_videos
from loraplex.models.internvl import InternVLVisionConfig
from loraplex.models.internvl_chat import image_processor_settings
from loraplex.models.llava import placeholder_runs
from loraplex.models.text_splice import TextSplice

logger = logging.getLogger(__name__)

IMAGE_START, IMAGE_END, VIDEO = "<img>", "</img>", "<video>"


@dataclass(frozen=True)
class InternVLTiling(InternVLVisionConfig):
    """The tower's config with the image processor's tiling: what an image's size gives."""

    min_patches: int = 1
    max_patches: int = 12
    processor: Any = None  # the HF image processor (its own count of tiles)

    def tiles(self, size: tuple[int, int]) -> int:
        """Tiles an image of `size` (height, width) is cut into, its thumbnail counted."""
        return int(self.processor.get_number_of_image_patches(
            size[0], size[1], {"crop_to_patches": True}))

    def tokens_for(self, size: tuple[int, int]) -> int:
        """`<IMG_CONTEXT>` tokens an image of `size` takes (its `<img>`, `</img>` apart)."""
        return self.tiles(size) * self.tokens_per_tile


class InternVLImageProcessor(VideosBesideImages, ImageProcessor):
    """ImageProcessor with InternVL's tiles and its `<img>` ... `</img>` expansion."""

    @staticmethod
    def load_hf(path: str, config: Any) -> Any:
        """The checkpoint's GotOcr2 image processor; for InternVL's remote layout one built
        from its config (models/internvl_chat.py), as HF's conversion writes it."""
        settings = image_processor_settings(path)
        if settings is None:
            return ImageProcessor.load_hf(path, config)
        import transformers

        if not settings.pop("tiles"):  # dynamic_image_size false: one tile an image
            settings["max_patches"] = 1
        kind = getattr(transformers, "GotOcr2ImageProcessorPil", None) \
            or transformers.GotOcr2ImageProcessor  # (transformers 5: the one without torchvision)
        return kind(**settings)

    def __init__(self, path: str, config: InternVLVisionConfig, tokenizer: Any = None) -> None:
        super().__init__(path, config, tokenizer)
        side = self.hf.size["height"] if isinstance(self.hf.size, dict) else self.hf.size.height
        if side != config.image_size:
            raise ValueError(f"InternVL's image processor cuts {side}-pixel tiles, its tower "
                             f"takes {config.image_size}")
        tiling = InternVLTiling(**{f: getattr(config, f)
                                   for f in InternVLVisionConfig.__dataclass_fields__},
                                min_patches=self.hf.min_patches,
                                max_patches=self.hf.max_patches, processor=self.hf)
        self.config = tiling
        self.hf_kwargs = {"crop_to_patches": True}  # InternVLProcessor's default
        # the names the hub's tokenizer_config gives them (extra_special_tokens), else HF's
        texts = (getattr(tokenizer, "start_image_token", None) or IMAGE_START,
                 getattr(tokenizer, "end_image_token", None) or IMAGE_END)
        start, end = (tokenizer.convert_tokens_to_ids(t) for t in texts)
        if None in (start, end) or tokenizer.unk_token_id in (start, end):
            raise ValueError(f"InternVL's tokenizer lacks {texts[0]} / {texts[1]}")
        self._expand = lambda ids, sizes, crops: expand_internvl(
            ids, tiling.image_token_id, start, end, [tiling.tokens_for(s) for s in sizes])
        self.start, self.end = start, end
        self.video: InternVLVideoProcessor | None = None
        self.video_token_id = tokenizer.convert_tokens_to_ids(
            getattr(tokenizer, "video_token", None) or VIDEO)
        self.no_videos = ("multi_modal_data: video inputs are not supported for this "
                          f"model: its tokenizer has no {VIDEO} token")
        if self.video_token_id not in (None, tokenizer.unk_token_id):
            try:
                self.video = InternVLVideoProcessor(path, config.image_size)
            except ValueError as e:
                logger.warning("%s; video inputs are refused", e)
                self.no_videos = f"multi_modal_data: video inputs are not supported: {e}"
        self.media = InternVLMediaTokens(
            tiling.image_token_id, start, end, self.video_token_id, tiling.tokens_per_tile,
            TextSplice(tokenizer, {start, end, tiling.image_token_id, self.video_token_id}))

    def expanded_with_videos(self, ids: list[int], images: list[Any], frames: list[int]
                             ) -> list[int]:
        return self.expand_media(ids, [(im.height, im.width) for im in images], frames)[0]

    def with_videos(self, ids: list[int], image_data: Any, video_data: Any
                    ) -> tuple[list[int], ImageInputs]:
        """The prompt with its images' and videos' placeholders expanded, and their inputs:
        items in prompt order, an image its tiles and thumbnail, a video its frames."""
        video = self._video()
        images = load_images(image_data) if image_data is not None else []
        clips = [video.frames(v) for v in split_videos(video_data)]
        sizes = [(im.height, im.width) for im in images]
        # before the pixels: a mismatch costs nothing
        ids, order = self.expand_media(ids, sizes, [len(f) for f in clips])
        items: list[tuple[torch.Tensor, tuple[int, int], bytes]] = []
        if images:
            out = self.hf(images=[im.convert("RGB") for im in images], return_tensors="pt",
                          **self.hf_kwargs)
            self.check_pixels(out["pixel_values"])
            tiles = out["pixel_values"].split([self.config.tiles(s) for s in sizes])
            items += [(p, s, image_hash(p, s)) for p, s in zip(tiles, sizes, strict=True)]
        for frames in clips:
            pixels, digest = video(frames)
            items.append((pixels, (len(frames), 0), digest))
        order = [i if kind == "image" else len(images) + i for kind, i in order]
        kept = [items[i] for i in order]
        sizes = [s for _, s, _ in kept]
        videos = [k for k, i in enumerate(order) if i >= len(images)]
        positions = self.positions(ids)
        return ids, ImageInputs(
            torch.cat([p for p, _, _ in kept]), positions,
            placeholder_ranges(positions, self._counts(sizes, videos)),
            [h for _, _, h in kept], sizes=sizes, videos=videos)

    def _counts(self, sizes: list[tuple[int, int]], videos: list[int]) -> list[int]:
        """Each item's `<IMG_CONTEXT>` tokens: an image's by its tiles, a video's (its size
        (frames, 0)) a tile a frame."""
        return [self.config.tokens_per_tile * n for n in self._tiles(sizes, videos)]

    def _tiles(self, sizes: list[tuple[int, int]], videos: list[int]) -> list[int]:
        return [s[0] if k in videos else self.config.tiles(s) for k, s in enumerate(sizes)]

    def expand_media(self, ids: list[int], sizes: list[tuple[int, int]], frames: list[int]
                     ) -> tuple[list[int], list[tuple[str, int]]]:
        """The prompt expanded for images of `sizes` and videos of `frames` frames
        (InternVLMediaTokens.expand), and the items' prompt order."""
        return self.media.expand(ids, [self.config.tokens_for(s) for s in sizes], frames)

    def check(self, ids: list[int], inputs: ImageInputs) -> None:
        """Processed inputs given with a prompt (the server's) must be that prompt's (with
        videos: each item's tiles and placeholders by its kind)."""
        if not inputs.videos:
            return super().check(ids, inputs)
        counts = self._counts(inputs.sizes, inputs.videos)
        tiles = sum(self._tiles(inputs.sizes, inputs.videos))
        if self.positions(ids) != inputs.positions or len(inputs.sizes) != len(inputs.ranges) \
                or sum(counts) != len(inputs.positions) \
                or placeholder_ranges(inputs.positions, counts) != inputs.ranges \
                or inputs.pixel_values.shape[0] != tiles:
            raise ValueError("multi_modal_data: the processed image inputs do not match the "
                             "prompt's (expanded) image placeholders")


def expand_internvl(ids: list[int], context: int, start: int, end: int,
                    counts: list[int]) -> list[int]:
    """Image i's one `<IMG_CONTEXT>` becomes `<img>`, `counts[i]` of them, `</img>`; a
    prompt already so expanded is kept as is."""
    runs = placeholder_runs(ids, context)
    if runs == counts and wrapped(ids, context, start, end):
        return list(ids)
    if sum(runs) != len(counts):
        raise ValueError(f"the prompt has {sum(runs)} image placeholder token(s) (id "
                         f"{context}) for {len(counts)} image(s): put one <IMG_CONTEXT> "
                         "where each image goes")
    out: list[int] = []
    left = iter(counts)
    for t in ids:
        out.extend([start, *[context] * next(left), end] if t == context else [t])
    return out

