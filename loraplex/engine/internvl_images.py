"""InternVL's images on their way into the engine: HF's GotOcr2 image processor cuts each
image into tiles of the tower's size (crop_to_patches, as InternVLProcessor asks it: the
grid of at most max_patches tiles whose aspect ratio is nearest the image's, and a
thumbnail of the whole image after them when there is more than one tile), and each
`<IMG_CONTEXT>` of the prompt becomes `<img>`, tokens_per_tile `<IMG_CONTEXT>` per tile,
`</img>`, as InternVLProcessor expands it (so the prompt ids are HF's). The rest is
engine/images.py's ImageProcessor: pixels, placeholders' positions, hashes, checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraplex.engine.images import ImageProcessor
from loraplex.models.internvl import InternVLVisionConfig
from loraplex.models.llava import placeholder_runs

IMAGE_START, IMAGE_END = "<img>", "</img>"


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


class InternVLImageProcessor(ImageProcessor):
    """ImageProcessor with InternVL's tiles and its `<img>` ... `</img>` expansion."""

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


def expand_internvl(ids: list[int], context: int, start: int, end: int,
                    counts: list[int]) -> list[int]:
    """Image i's one `<IMG_CONTEXT>` becomes `<img>`, `counts[i]` of them, `</img>`; a
    prompt already so expanded is kept as is."""
    runs = placeholder_runs(ids, context)
    if runs == counts and _wrapped(ids, context, start, end):
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


def _wrapped(ids: list[int], context: int, start: int, end: int) -> bool:
    """Every run of `<IMG_CONTEXT>` lies between `<img>` and `</img>`."""
    for i, t in enumerate(ids):
        if t != context:
            continue
        if (i == 0 or ids[i - 1] not in (context, start)) or \
                (i + 1 == len(ids) or ids[i + 1] not in (context, end)):
            return False
    return True
