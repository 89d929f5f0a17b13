"""Gemma 4's images, videos and audio clips on their way into the engine: HF's Gemma 4
image processor resizes each image (aspect ratio kept) and cuts it into patches
(models/gemma4_vision.py), and each <|image|> of the prompt becomes boi, the image's soft
tokens, eoi, as Gemma4Processor expands it (so the prompt ids are HF's). A video's frames
are images of their own at the video budget, each `<|video|>` becoming the frames with
their timestamps (engine/gemma4_videos.py); a clip's log-mel frames go to the audio
tower, each `<|audio|>` becoming boa, its soft tokens, eoa
(engine/gemma4_audio_inputs.py).

Images, frames and clips are items of one ImageInputs in prompt order (one call embeds
them all): their values flat, item after item (`pixel_values`: an image's or frame's
real patches, a clip's mel frames), each item's size (`sizes`: a (rows, columns) patch
grid, or a clip's (mel frames,)), its run of soft tokens (`ranges`: each frame its own, so
each is its own bidirectional block under use_bidirectional_attention "vision", as HF's
mask makes it; clips stay causal, `audio`), its hash; `videos` names the frames.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from loraplex.engine.gemma4_audio_inputs import Gemma4AudioClips
from loraplex.engine.gemma4_videos import Gemma4Clip, Gemma4Videos
from loraplex.engine.images import (
    ImageInputs,
    ImageProcessor,
    expand_wrapped,
    image_hash,
    load_images,
)
from loraplex.engine.qwen_videos import split_videos
from loraplex.models.gemma4_vision import Gemma4VisionConfig

Size = tuple[int, ...]  # an image's or frame's (rows, columns); a clip's (mel frames,)


class Gemma4ImageProcessor(ImageProcessor):
    """Gemma 4's patches of images and video frames, and its prompt expansion."""

    def __init__(self, path: str, config: Gemma4VisionConfig, tokenizer: Any = None) -> None:
        super().__init__(path, config, tokenizer)
        hf = self.hf
        if (hf.patch_size, hf.pooling_kernel_size) != (config.patch_size,
                                                       config.pooling_kernel_size):
            raise ValueError(f"Gemma 4's image processor cuts {hf.patch_size}-pixel patches "
                             f"pooled {hf.pooling_kernel_size} x {hf.pooling_kernel_size}, its "
                             f"tower takes {config.patch_size} pooled "
                             f"{config.pooling_kernel_size}")
        self.config = config = replace(config, max_soft_tokens=int(hf.max_soft_tokens))
        self._expand = lambda ids, sizes, crops: expand_gemma4(
            ids, config, [config.tokens_for(s) for s in sizes])
        # timestamps are text: without the tokenizer (or a video token) videos are refused
        self.video = (Gemma4Videos(path, config, hf, tokenizer)
                      if config.video_token_id >= 0 and tokenizer is not None else None)
        self.audio = Gemma4AudioClips(path, config) if config.audio is not None else None

    @property
    def modalities(self) -> tuple[str, ...]:
        return ("image",) + (("video",) if self.video is not None else ()) + (
            ("audio",) if self.audio is not None else ())

    def placeholder_token(self, modality: str) -> int | None:
        return {"video": self.config.video_token_id,
                "audio": self.config.audio_token_id}.get(modality, self.placeholder)

    def process(self, ids: list[int], data: Mapping[str, Any],
                options: Mapping[str, Any] | None = None) -> tuple[list[int], ImageInputs]:
        return self.inputs(ids, data.get("image"), data.get("video"), data.get("audio"))

    def expanded(self, ids: list[int], data: Mapping[str, Any],
                 options: Mapping[str, Any] | None = None) -> list[int]:
        images = [] if data.get("image") is None else load_images(data["image"])
        return self._expand_all(ids, [self.config.grid((im.height, im.width)) for im in images],
                                self._clips(data.get("video")),
                                [len(f) for f in self._audio(data.get("audio"))])

    def processed_inputs(self, data: Mapping[str, Any]) -> ImageInputs | None:
        raw = "video" in data or "audio" in data
        return None if raw else super().processed_inputs(data)

    def __call__(self, ids: list[int], data: Any, options: Mapping[str, Any] | None = None
                 ) -> tuple[list[int], ImageInputs]:
        return self.inputs(ids, data)

    def inputs(self, ids: list[int], images: Any, videos: Any = None, audio: Any = None
               ) -> tuple[list[int], ImageInputs]:
        """The prompt with its placeholders expanded, and its items' inputs (module
        docstring). `images`: one image or a list (PIL images or URLs), or None;
        `videos`, `audio`: multi_modal_data's "video" / "audio" entries, or None."""
        images = [] if images is None else load_images(images)
        clips, sounds = self._clips(videos), self._audio(audio)
        c = self.config
        grids = [c.grid((im.height, im.width)) for im in images]
        # before the pixels: a mismatch costs nothing
        ids = self._expand_all(ids, grids, clips, [len(f) for f in sounds])
        items: list[tuple[torch.Tensor, Size]] = []  # images, frames, clips: by kind
        if images:
            out = self.hf(images=[im.convert("RGB") for im in images], return_tensors="pt")
            self.check_pixels(out["pixel_values"])
            items += [(p[:r * w].float(), (r, w))
                      for p, (r, w) in zip(out["pixel_values"], grids, strict=True)]
        for clip in clips:
            items += [(p, clip.grid) for p in self.video.pixels(clip).split(
                clip.grid[0] * clip.grid[1])]
        items += [(f.float(), (len(f),)) for f in sounds]
        runs = self._runs(ids)
        kinds = (c.image_token_id, c.video_token_id, c.audio_token_id)
        firsts = [p for kind in kinds for p, t, _ in runs if t == kind]
        order = sorted(range(len(items)), key=lambda i: firsts[i])
        values = torch.cat([items[i][0].flatten() for i in order]) if items \
            else torch.empty(0)
        hashes = [image_hash(*items[i]) for i in order]
        return ids, ImageInputs(values, self.positions(ids), [(p, n) for p, _, n in runs],
                                hashes, sizes=[items[i][1] for i in order],
                                bidirectional=c.bidirectional,
                                videos=self._of(runs, c.video_token_id),
                                audio=self._of(runs, c.audio_token_id))

    @staticmethod
    def _of(runs: list[tuple[int, int, int]], token: int) -> list[int]:
        """Which items (runs) are of `token`'s kind."""
        return [k for k, (_, t, _) in enumerate(runs) if t == token]

    def _clips(self, videos: Any) -> list[Gemma4Clip]:
        if videos is None:
            return []
        if self.video is None:
            raise ValueError("multi_modal_data: video inputs are not supported for this model "
                             "(its config names no video_token_id, or no tokenizer was given)")
        return [self.video.clip(v) for v in split_videos(videos)]

    def _audio(self, data: Any) -> list[torch.Tensor]:
        """Each clip's real mel frames."""
        if data is None:
            return []
        if self.audio is None:
            raise ValueError("multi_modal_data: audio inputs are not supported for this model "
                             "(its checkpoint has no audio tower, or limit_mm_per_prompt "
                             "allows no audio)")
        return self.audio.features(data)

    def _expand_all(self, ids: list[int], grids: list[Size], clips: list[Gemma4Clip],
                    frames: list[int] = ()) -> list[int]:
        """`frames`: each audio clip's mel frames."""
        ids = expand_gemma4(ids, self.config, [self.config.grid_tokens(g) for g in grids])
        ids = self.video.expand(ids, clips) if clips else ids
        return self.audio.expand(ids, list(frames)) if frames else ids

    def expand(self, ids: list[int], images: list[Any],
               options: Mapping[str, Any] | None = None) -> list[int]:
        return self._expand_all(ids, [self.config.grid((im.height, im.width))
                                      for im in images], [])

    def _runs(self, ids: list[int]) -> list[tuple[int, int, int]]:
        """Each run of soft tokens (an image's, a frame's, a clip's): (first position,
        token, length)."""
        tokens = set(self._tokens())
        runs: list[tuple[int, int, int]] = []
        for p, t in enumerate(ids):
            if t not in tokens:
                continue
            if runs and runs[-1][1] == t and sum(runs[-1][::2]) == p:
                runs[-1] = (runs[-1][0], t, runs[-1][2] + 1)
            else:
                runs.append((p, t, 1))
        return runs

    def _tokens(self) -> tuple[int, ...]:
        """The soft tokens of the modalities served."""
        c = self.config
        return (c.image_token_id,) + ((c.video_token_id,) if self.video is not None else ()) \
            + ((c.audio_token_id,) if self.audio is not None else ())

    def positions(self, ids: list[int]) -> list[int]:
        tokens = set(self._tokens())
        return [p for p, t in enumerate(ids) if t in tokens]

    def check_pixels(self, pixels: torch.Tensor) -> None:
        c = self.config
        want = (c.max_soft_tokens * c.pooling_kernel_size ** 2, 3 * c.patch_size ** 2)
        if tuple(pixels.shape[-2:]) != want:
            raise ValueError(f"the image processor gives patches {tuple(pixels.shape[-2:])}, "
                             f"the vision tower takes {want}")

    def check(self, ids: list[int], inputs: ImageInputs) -> None:
        """Processed inputs given with a prompt (the server's) must be that prompt's: a
        run of soft tokens per item, as many as its size gives, the frames and clips
        where the video and audio tokens are."""
        c = self.config
        runs = self._runs(ids)
        if self.positions(ids) != inputs.positions \
                or [(p, n) for p, _, n in runs] != inputs.ranges \
                or [n for *_, n in runs] != [c.item_tokens(s) for s in inputs.sizes] \
                or self._of(runs, c.video_token_id) != inputs.videos \
                or self._of(runs, c.audio_token_id) != inputs.audio \
                or inputs.pixel_values.numel() != sum(c.item_values(s) for s in inputs.sizes) \
                or inputs.bidirectional != c.bidirectional:
            raise ValueError("multi_modal_data: the processed image inputs do not match the "
                             "prompt's (expanded) image placeholders")


def expand_gemma4(ids: list[int], c: Gemma4VisionConfig, counts: list[int]) -> list[int]:
    """Image i's one <|image|> becomes boi, `counts[i]` <|image|>, eoi (Gemma4Processor's
    text); a prompt already so expanded is kept as is."""
    return expand_wrapped(ids, c.image_token_id, c.boi_token_id, c.eoi_token_id, counts,
                          "<|image|>")
