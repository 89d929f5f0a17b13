"""Pixtral images (Mistral 3, Pixtral-12B; engine/images.py's ImageProcessor, for this
model): each image resized, its aspect kept, to at most the longest edge and up to
multiples of patch x merge pixels, and each `[IMG]` of the prompt expanded as
PixtralProcessor (and mistral_common) expands it: per row of merged patches that many
`[IMG]` and an `[IMG_BREAK]`, the last `[IMG_BREAK]` an `[IMG_END]`.

The pixels come from the checkpoint's HF image processor (PixtralImageProcessor, with
PixtralProcessor's patch size), or, under tokenizer_mode "mistral" (the only way for
Mistral's own format, which ships no HF processor), from mistral_common's image encoding
(engine/mistral_images.py), the one its chat encoding expanded the prompt by.

Only the `[IMG]` rows take image embeddings (`ImageInputs.positions`); an image's range
covers its whole expansion, breaks and end included, for the prefix cache's keys.
`ImageInputs.pixel_values` holds every image's patches ([patches, channels x patch^2],
row-major, the padding cut off), so images of any sizes stack across requests;
`ImageInputs.sizes` each image's resized (height, width).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loraplex.engine.images import ImageInputs, load_images
from loraplex.engine.multimodal_processor import MultimodalProcessor
from loraplex.models.pixtral import PixtralVisionConfig


class PixtralImageTokens:
    """PixtralProcessor's expansion of each `[IMG]`, on token ids."""

    def __init__(self, tokenizer: Any, c: PixtralVisionConfig, path: str) -> None:
        names = {"image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}
        processor = Path(path) / "processor_config.json"
        if processor.is_file():  # a checkpoint may name its own
            saved = json.loads(processor.read_text())
            names = {k: saved.get(k) or v for k, v in names.items()}
        ids = {}
        for key, token in names.items():
            ids[key] = tokenizer.convert_tokens_to_ids(token)
            if ids[key] is None or ids[key] == tokenizer.unk_token_id:
                raise ValueError(f"Pixtral images need the token {token!r} ({key}), "
                                 "which the tokenizer lacks")
        self.img, self.brk, self.end = (c.image_token_id, ids["image_break_token"],
                                        ids["image_end_token"])
        # mistral_common never encodes a control token from text: "[IMG]" must be an id
        self.hint = (" (tokenizer_mode 'mistral' reads \"[IMG]\" in a prompt's text as text: "
                     "give prompt_token_ids, or chat)") if getattr(tokenizer, "is_mistral",
                                                                   False) else ""

    def image(self, grid: tuple[int, int]) -> list[int]:
        rows, cols = grid
        out = ([self.img] * cols + [self.brk]) * rows
        return out[:-1] + [self.end]

    def __call__(self, ids: list[int], grids: list[tuple[int, int]]) -> list[int]:
        """The prompt with image i's `[IMG]` expanded for `grids[i]`; one already
        expanded (each image's tokens as its grid gives them) as it is."""
        if self.brk in ids or self.end in ids:
            collapsed = self._collapse(ids)
            if collapsed is not None and self._expand(collapsed, grids) == ids:
                return list(ids)
            raise ValueError("the prompt's [IMG] / [IMG_BREAK] / [IMG_END] tokens are not "
                             f"the expansion of {len(grids)} image(s) of these sizes: put "
                             "one [IMG] where each image goes")
        return self._expand(ids, grids)

    def _expand(self, ids: list[int], grids: list[tuple[int, int]]) -> list[int]:
        found = ids.count(self.img)
        if found != len(grids):
            raise ValueError(f"the prompt has {found} image placeholder token(s) (id "
                             f"{self.img}) for {len(grids)} image(s): put one [IMG] where "
                             "each image goes" + self.hint)
        left = iter(grids)
        return [x for t in ids for x in (self.image(next(left)) if t == self.img else [t])]

    def _collapse(self, ids: list[int]) -> list[int] | None:
        """Each expanded image back to one `[IMG]`; None when the tokens are no
        expansion (a break or an end outside an image)."""
        out: list[int] = []
        inside = False
        for t in ids:
            if t in (self.img, self.brk):
                if not inside:
                    if t == self.brk:
                        return None
                    out.append(self.img)
                inside = True
            elif t == self.end:
                if not inside:
                    return None
                inside = False
            else:
                if inside:
                    return None
                out.append(t)
        return None if inside else out


class HFPixtralPixels:
    """The checkpoint's HF image processor (PixtralImageProcessor) at PixtralProcessor's
    patch size: each image's resized size, and its pixels."""

    def __init__(self, path: str, config: PixtralVisionConfig) -> None:
        from transformers import AutoImageProcessor

        self.config = config
        self.hf = AutoImageProcessor.from_pretrained(path)
        size = self.hf.size if isinstance(self.hf.size, dict) else vars(self.hf.size)
        self.longest_edge = size.get("longest_edge")
        if not self.longest_edge:  # PixtralProcessor's resize rule reads only it
            raise ValueError(f"the image processor in {path} gives no size.longest_edge "
                             f"({size}): Pixtral images are resized by it")

    def sizes(self, images: list[Any]) -> list[tuple[int, int]]:
        """Each image's (height, width) as the HF processor will resize it (its own
        get_resize_output_image_size, without the pixels)."""
        resize = importlib.import_module(type(self.hf).__module__).get_resize_output_image_size
        edge, unit = self.longest_edge, self.config.unit
        return [tuple(int(x) for x in resize(  # a view of the image's shape: no pixels
            np.broadcast_to(np.zeros((1, 1, 1), np.uint8), (im.height, im.width, 3)),
            size=(edge, edge), patch_size=(unit, unit))) for im in images]

    def pixels(self, images: list[Any], sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Each image's pixels [C, H, W] (padded to the largest: cut by `sizes` later)."""
        unit = self.config.unit
        out = self.hf(images=[im.convert("RGB") for im in images], return_tensors="pt",
                      patch_size={"height": unit, "width": unit})
        if [tuple(s) for s in out["image_sizes"].tolist()] != sizes:
            raise ValueError(f"the image processor's sizes {out['image_sizes'].tolist()} are "
                             f"not the {sizes} its resize rule gives")
        return list(out["pixel_values"])


class PixtralImageProcessor(MultimodalProcessor):
    """The pixels (HF's image processor, or mistral_common's encoding under
    tokenizer_mode "mistral") plus PixtralProcessor's placeholder rule."""

    def __init__(self, path: str, config: PixtralVisionConfig, tokenizer: Any) -> None:
        self.config = config
        self.placeholder = config.image_token_id
        self.tokens = PixtralImageTokens(tokenizer, config, path)
        if getattr(tokenizer, "is_mistral", False):
            from loraplex.engine.mistral_images import MistralImagePixels

            self.source: HFPixtralPixels | MistralImagePixels = MistralImagePixels(
                tokenizer, config, self.tokens)
        else:
            self.source = HFPixtralPixels(path, config)

    def __call__(self, ids: list[int], data: Any) -> tuple[list[int], ImageInputs]:
        """The prompt with its placeholders expanded, and its images' inputs. `data`: one
        image or a list (PIL images or URLs)."""
        images = load_images(data)
        c = self.config
        sizes = self.source.sizes(images)
        ids = self.tokens(ids, [c.grid(s) for s in sizes])  # before the pixels
        pixels = self.source.pixels(images, sizes)
        patches = [self.patches(p, s) for p, s in zip(pixels, sizes, strict=True)]
        hashes = [hashlib.blake2b(p.float().contiguous().numpy().tobytes() + repr(s).encode(),
                                  digest_size=16).digest() for p, s in zip(patches, sizes)]
        return ids, ImageInputs(torch.cat(patches), self.positions(ids),
                                self.ranges(ids, sizes), hashes, sizes=sizes,
                                bidirectional=c.bidirectional)

    def patches(self, pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """One image's padded pixels [C, H, W] -> its patches [patches, C x p x p],
        row-major, the padding cut off."""
        p, (h, w) = self.config.patch_size, size
        x = pixels[:, :h, :w].reshape(pixels.shape[0], h // p, p, w // p, p)
        return x.permute(1, 3, 0, 2, 4).reshape((h // p) * (w // p), -1)

    def ranges(self, ids: list[int], sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Each image's (first position, tokens with breaks and end) in the prompt."""
        out, start = [], 0
        for s in sizes:
            first = ids.index(self.tokens.img, start)
            rows, cols = self.config.grid(s)
            out.append((first, rows * (cols + 1)))
            start = first + rows * (cols + 1)
        return out

    def expand(self, ids: list[int], images: list[Any]) -> list[int]:
        """The prompt with its placeholders expanded for these (PIL) images, without
        processing them: what /tokenize and usage count."""
        return self.tokens(ids, [self.config.grid(s) for s in self.source.sizes(images)])

    def positions(self, ids: list[int]) -> list[int]:
        return [p for p, t in enumerate(ids) if t == self.config.image_token_id]

    def check(self, ids: list[int], inputs: ImageInputs) -> None:
        """Processed inputs given with a prompt (the server's) must be that prompt's."""
        c, p = self.config, self.config.patch_size
        try:
            ok = self.tokens(ids, [c.grid(s) for s in inputs.sizes]) == ids \
                and self.positions(ids) == inputs.positions \
                and self.ranges(ids, inputs.sizes) == inputs.ranges \
                and inputs.bidirectional == c.bidirectional \
                and inputs.pixel_values.shape[0] == sum(h // p * (w // p) for h, w in inputs.sizes)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError("multi_modal_data: the processed image inputs do not match the "
                             "prompt's (expanded) image placeholders")
