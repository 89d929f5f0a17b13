"""Idefics3's and SmolVLM's images on their way into the engine: HF's image processor
(the checkpoint's; transformers 5's PIL one where torchvision is missing) resizes each
image and, with `do_image_splitting`, cuts it into a grid of max_image_size tiles and a
global view of the whole image after them; each `<image>` of the prompt becomes what
Idefics3Processor / SmolVLMProcessor write for it (so the prompt ids are HF's):

    per tile: <fake_token_around_image> <row_i_col_j> <image> x image_seq_len,
    "\\n" after each row (the last row's "\\n" and the global view's own: "\\n\\n"),
    then <fake_token_around_image> <global-img> <image> x image_seq_len
    <fake_token_around_image>

(an image that is not split: the last line alone). The rest is engine/images.py's
ImageProcessor: pixels, placeholders' positions, hashes, checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraplex.engine.images import ImageProcessor
from loraplex.models.idefics3 import Idefics3VisionConfig

FAKE, GLOBAL = "<fake_token_around_image>", "<global-img>"


@dataclass(frozen=True)
class Idefics3Tiling(Idefics3VisionConfig):
    """The tower's config with the image processor's tiling: what an image's size gives."""

    splitting: bool = True  # do_image_splitting
    processor: Any = None  # the HF image processor (its own count of rows and columns)

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (rows, columns) of tiles an image of `size` (height, width) is cut into;
        (0, 0): not split, the global view alone."""
        tiles, rows, cols = self.processor.get_number_of_image_patches(
            size[0], size[1], {"do_image_splitting": self.splitting})
        # an image not split: (0, 0, 0) from transformers 5, (1, 1, 1) from 4.x
        return (int(rows), int(cols)) if tiles > 1 else (0, 0)

    def tiles(self, size: tuple[int, int]) -> int:
        """Tiles an image of `size` gives, its global view counted."""
        rows, cols = self.grid(size)
        return rows * cols + 1

    def tokens_for(self, size: tuple[int, int]) -> int:
        """`<image>` tokens an image of `size` takes (its markers apart)."""
        return self.tiles(size) * self.tokens_per_image


class _PerImage:
    """HF's image processor called with each image as a sample of its own, so its pixel
    values come [images, most tiles, ...] (a flat list would be one sample's images, all
    their tiles in one row), as LLaVA-NeXT's do; everything else is the processor's."""

    def __init__(self, hf: Any) -> None:
        self.hf = hf

    def __call__(self, images: list[Any], **kwargs: Any) -> Any:
        return self.hf(images=[[im] for im in images], **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.hf, name)


class Idefics3ImageProcessor(ImageProcessor):
    """ImageProcessor with Idefics3's tiles and its markers around each tile."""

    def __init__(self, path: str, config: Idefics3VisionConfig, tokenizer: Any = None) -> None:
        super().__init__(path, config, tokenizer)
        hf = self.hf
        side = hf.max_image_size["longest_edge"]
        if side != config.image_size:
            raise ValueError(f"the image processor cuts {side}-pixel tiles, the vision tower "
                             f"takes {config.image_size}")
        tiling = Idefics3Tiling(**{f: getattr(config, f)
                                   for f in Idefics3VisionConfig.__dataclass_fields__},
                                splitting=bool(hf.do_image_splitting), processor=hf)
        self.config = tiling
        self.hf = _PerImage(hf)
        markers = ImageMarkers(tokenizer, tiling)
        self._expand = lambda ids, sizes, crops: markers.expand(ids, sizes)


class ImageMarkers:
    """The token ids Idefics3Processor / SmolVLMProcessor write around an image's
    `<image>` runs, read from the tokenizer (the names its config gives them, else HF's)."""

    def __init__(self, tokenizer: Any, config: Idefics3Tiling) -> None:
        self.tokenizer, self.config = tokenizer, config
        self.image = config.image_token_id
        self.fake = self._id(getattr(tokenizer, "fake_image_token", None) or FAKE)
        self.global_ = self._id(getattr(tokenizer, "global_image_token", None) or GLOBAL)
        image, fake = tokenizer.convert_ids_to_tokens([self.image, self.fake])
        # the newlines between rows, as the tokenizer reads them between these markers
        self.row_end = self._between(image, "\n", fake)
        self.grid_end = self._between(image, "\n\n", fake)

    def _id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer lacks {token}, which an image's prompt needs")
        return int(tid)

    def _between(self, left: str, text: str, right: str) -> list[int]:
        ids = self.tokenizer.encode(left + text + right, add_special_tokens=False)
        return ids[1:-1]

    def image_ids(self, size: tuple[int, int]) -> list[int]:
        """What one image of `size` (height, width) becomes."""
        seq = [self.image] * self.config.tokens_per_image
        rows, cols = self.config.grid(size)
        out: list[int] = []
        for r in range(rows):
            for c in range(cols):
                out += [self.fake, self._id(f"<row_{r + 1}_col_{c + 1}>"), *seq]
            out += self.row_end if r + 1 < rows else self.grid_end
        return out + [self.fake, self.global_, *seq, self.fake]

    def expand(self, ids: list[int], sizes: list[tuple[int, int]]) -> list[int]:
        """Image i's one `<image>` becomes image_ids(sizes[i]); a prompt already so
        expanded (HF's processor's ids, or a prompt the chat route expanded) is kept."""
        count = ids.count(self.image)
        if count != len(sizes) and self._expanded(ids, sizes):
            return list(ids)
        if count != len(sizes):
            raise ValueError(f"the prompt has {count} image placeholder token(s) (id "
                             f"{self.image}) for {len(sizes)} image(s): put one <image> "
                             "where each image goes")
        out: list[int] = []
        left = iter(sizes)
        for t in ids:
            out.extend(self.image_ids(next(left)) if t == self.image else [t])
        return out

    def _expanded(self, ids: list[int], sizes: list[tuple[int, int]]) -> bool:
        """Every `<image>` of `ids` lies in image i's whole expansion, in order."""
        at, covered = 0, 0
        for size in sizes:
            want = self.image_ids(size)
            try:
                start = ids.index(self.image, at) - want.index(self.image)
            except ValueError:
                return False
            if start < 0 or ids[start:start + len(want)] != want:
                return False
            at, covered = start + len(want), covered + want.count(self.image)
        return covered == ids.count(self.image)
