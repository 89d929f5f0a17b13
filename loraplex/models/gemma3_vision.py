"""Gemma 3's image side (Gemma3ForConditionalGeneration, Gemma 3 4B/12B/27B): a SigLIP
ViT (models/llava.py's tower with `siglip`) encodes the image, its last hidden state (after
post_layernorm) is average-pooled from the patch grid to `mm_tokens_per_image` vectors
(Gemma3MultiModalProjector: 64 x 64 patches -> 16 x 16 = 256 tokens), Gemma's RMSNorm
(`mm_soft_emb_norm`) and a matmul by `mm_input_projection_weight` map each into the
language model, and each vector takes the place of one `<image_soft_token>`.

The prompt marks an image with `<start_of_image>` (the boi token); HF's Gemma3Processor
replaces it, in the text, by "\\n\\n<start_of_image>" + mm_tokens_per_image soft tokens +
"<end_of_image>\\n\\n". `Gemma3ImageTokens` does the same to token ids: the inserted "\\n\\n"
merges with a neighbouring newline token ("\\n" + "\\n\\n" is Gemma's one "\\n\\n\\n" token) by
re-tokenizing the newline run, as tokenizing the expanded text would (vLLM's fix, for
any run length). With pan-and-scan crops (engine/pan_and_scan.py) the image's
<start_of_image> becomes, as Gemma3Processor writes it, "Here is the original image " + the
image's sequence + " and here are some crops to help you see better " + the crops'
sequences joined by spaces; each crop is an image of its own. The text around such an
insertion is tokenized again with it (what tokenizing the expanded text gives).

The image's soft tokens attend to each other both ways in the language model (text stays
causal): layers/attention.py's `image_blocks` (torch), `image_key_limits` (the Triton
prefill kernel's `key_limit`); the scheduler never ends a prefill chunk
inside an image's tokens (`ImageInputs.chunk_len`), so each image is computed whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.layers.norm import GemmaRMSNorm
from loraplex.models.llava import (
    CLIPVisionTower,
    TowerConfig,
    VisionWeights,
    check_activation,
    check_tower,
    placeholder_runs,
)
from loraplex.models.text_splice import TextSplice


@dataclass(frozen=True)
class Gemma3VisionConfig(TowerConfig):  # feature_layers: the last layer's, always
    text_hidden_size: int
    tokens_per_image: int  # mm_tokens_per_image
    image_token_id: int  # <image_soft_token>: the rows that take the image's vectors
    boi_token_id: int  # <start_of_image>: what a prompt puts where an image goes
    eoi_token_id: int

    @classmethod
    def from_hf(cls, hf: Any) -> Gemma3VisionConfig:
        v = hf.vision_config
        check_tower("Gemma 3", v, "siglip_vision_model", "SigLIP")
        check_activation("vision_config.hidden_act", v.hidden_act)
        side, per_side = v.image_size // v.patch_size, int(hf.mm_tokens_per_image ** 0.5)
        if per_side * per_side != hf.mm_tokens_per_image or side % per_side:
            raise ValueError(f"mm_tokens_per_image={hf.mm_tokens_per_image} must be a square "
                             f"whose side divides the {side} x {side} patch grid")
        token = getattr(hf, "image_token_id", None)
        return cls(*cls.fields_of(v, (v.num_hidden_layers,)), hf.text_config.hidden_size,
                   int(hf.mm_tokens_per_image),
                   int(token if token is not None else hf.image_token_index),
                   int(hf.boi_token_index), int(hf.eoi_token_index))

    @property
    def placeholder_id(self) -> int:
        return self.boi_token_id

    @property
    def bidirectional(self) -> bool:
        """An image's soft tokens attend to each other both ways (HF's token_type_ids
        mask)."""
        return True

    def tokens_for(self, size: tuple[int, int]) -> int:
        """Soft tokens an image takes, whatever its size (it is resized to image_size)."""
        return self.tokens_per_image

    def tiles(self, size: tuple[int, int]) -> int:
        return 1


class Gemma3Projector(nn.Module):
    """HF's Gemma3MultiModalProjector: the patch grid average-pooled to
    tokens_per_image vectors, Gemma's RMSNorm, one matmul (no bias)."""

    def __init__(self, c: Gemma3VisionConfig) -> None:
        super().__init__()
        self.mm_input_projection_weight = nn.Parameter(
            torch.empty(c.hidden_size, c.text_hidden_size))
        self.mm_soft_emb_norm = GemmaRMSNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.side = c.image_size // c.patch_size
        self.kernel = self.side // int(c.tokens_per_image ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, d = x.shape  # [images, patches, D]
        grid = x.transpose(1, 2).reshape(b, d, self.side, self.side)
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        return (self.mm_soft_emb_norm(pooled) @ self.mm_input_projection_weight).to(x.dtype)


class Gemma3Vision(VisionWeights):
    """Pixels -> one language-model input embedding per soft token."""

    label = "Gemma 3's vision tower / projector"
    unused = ("vision_tower.head.",)  # SigLIP's pooling head (vision_use_head), unread

    def __init__(self, c: Gemma3VisionConfig) -> None:
        super().__init__()
        self.config = c
        self.vision_tower = CLIPVisionTower(c, siglip=True)
        self.multi_modal_projector = Gemma3Projector(c)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
        """[images, channels, H, W] -> [images x tokens_per_image, text hidden]."""
        dtype = self.multi_modal_projector.mm_input_projection_weight.dtype
        (states,) = self.vision_tower(pixels.to(dtype))
        return self.multi_modal_projector(states).flatten(0, 1)


# what Gemma3Processor writes around an image's and its crops' sequences
ORIGINAL_IMAGE = "Here is the original image "
SOME_CROPS = " and here are some crops to help you see better "


class Gemma3ImageTokens:
    """Gemma3Processor's expansion of each <start_of_image>, on token ids."""

    def __init__(self, tokenizer: Any, c: Gemma3VisionConfig) -> None:
        self.c = c
        self.encode = lambda text: list(tokenizer.encode(text, add_special_tokens=False))
        self.wrap = self.encode("\n\n")
        # the crops' text tokenized with the prompt's around it (models/text_splice.py)
        self.splice = TextSplice(tokenizer, {c.boi_token_id, c.eoi_token_id,
                                             c.image_token_id})
        # the tokens that are only newlines, and how many each holds
        self.newlines: dict[int, int] = {}
        for k in range(1, 33):
            ids = self.encode("\n" * k)
            if len(ids) == 1:
                self.newlines[ids[0]] = k

    def __call__(self, ids: list[int], counts: list[int], crops: list[int] | None = None
                 ) -> list[int]:
        """The prompt with image i's <start_of_image> expanded for `counts[i]` soft
        tokens (and `crops[i]` pan-and-scan crops of as many); one already expanded (its
        runs of soft tokens are those counts) as it is."""
        c = self.c
        crops = crops or [0] * len(counts)
        runs = placeholder_runs(ids, c.image_token_id)
        if runs == [n for n, k in zip(counts, crops, strict=True) for _ in range(1 + k)]:
            return list(ids)
        boi = sum(t == c.boi_token_id for t in ids)
        if runs or boi != len(counts):
            raise ValueError(f"the prompt has {boi} <start_of_image> token(s) (id "
                             f"{c.boi_token_id}) for {len(counts)} image(s): put one "
                             "<start_of_image> where each image goes")
        if any(crops):
            return self._with_crops(ids, counts, crops)
        out: list[tuple[int, bool]] = []  # (token, whether it is an inserted newline)
        left = iter(counts)
        for t in ids:
            if t != c.boi_token_id:
                out.append((t, False))
                continue
            out += [(n, True) for n in self.wrap]
            out += [(t, False)] + [(c.image_token_id, False)] * next(left)
            out += [(c.eoi_token_id, False)] + [(n, True) for n in self.wrap]
        return self._merge_newlines(out)

    def _with_crops(self, ids: list[int], counts: list[int], crops: list[int]) -> list[int]:
        """Gemma3Processor's text for images with crops: the inserted text (str pieces)
        tokenized with the prompt's text around it, up to the nearest special tokens."""
        c = self.c
        pieces: list[int | str] = []
        left = iter(zip(counts, crops, strict=True))
        for t in ids:
            if t != c.boi_token_id:
                pieces.append(t)
                continue
            n, k = next(left)
            one = ["\n\n", t, *[c.image_token_id] * n, c.eoi_token_id, "\n\n"]
            if k:
                pieces += [ORIGINAL_IMAGE, *one, SOME_CROPS, *one] + [" ", *one] * (k - 1)
            else:
                pieces += one
        return self.splice(pieces)

    def _merge_newlines(self, tokens: list[tuple[int, bool]]) -> list[int]:
        """Each run of newline tokens that holds an inserted one, tokenized again as
        one run of newlines (what tokenizing the expanded text gives)."""
        out: list[int] = []
        i = 0
        while i < len(tokens):
            j = i
            while j < len(tokens) and tokens[j][0] in self.newlines:
                j += 1
            if j == i:
                out.append(tokens[i][0])
                i += 1
                continue
            run = tokens[i:j]
            if any(inserted for _, inserted in run):
                out += self.encode("\n" * sum(self.newlines[t] for t, _ in run))
            else:
                out += [t for t, _ in run]
            i = j
        return out

