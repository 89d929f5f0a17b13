"""Pixtral images under tokenizer_mode "mistral": mistral_common's own image encoding
(its tokenizer's ImageEncoder: resized by OpenCV to at most max_image_size, up to
multiples of patch x merge pixels, normalized with its CLIP statistics), the one its chat
encoding expanded the prompt by, so a chat's `[IMG]` rows and the pixels always agree.
This is how vLLM serves Mistral's own format with a vision encoder (Pixtral-12B-2409,
Mistral Small 3.1+), which ships no HF image processor.

Needs mistral_common's `opencv` extra (opencv-python-headless): `loraplex[mistral]`.
"""

from __future__ import annotations

from typing import Any

import torch

from loraplex.models.pixtral import PixtralVisionConfig

INSTALL_HINT = ("Pixtral images under tokenizer_mode 'mistral' are encoded by mistral_common, "
                "which needs OpenCV: pip install 'loraplex[mistral]' (opencv-python-headless)")


class MistralImagePixels:
    """mistral_common's ImageEncoder of the tokenizer: each image's resized size, and its
    pixels (engine/pixtral_images.py's HFPixtralPixels interface)."""

    def __init__(self, tokenizer: Any, config: PixtralVisionConfig, tokens: Any) -> None:
        from mistral_common.imports import is_opencv_installed

        encoder = tokenizer.mistral.instruct_tokenizer.image_encoder
        if encoder is None:
            raise ValueError(f"{tokenizer.file} has no image settings (tekken.json's "
                             "`image`): mistral_common cannot encode images with it")
        if not is_opencv_installed():
            raise ImportError(INSTALL_HINT)
        cfg, ids = encoder.image_config, encoder.special_ids
        ours = (config.patch_size, config.merge_size, config.image_token_id,
                tokens.brk, tokens.end)
        theirs = (cfg.image_patch_size, cfg.spatial_merge_size, ids.img, ids.img_break,
                  ids.img_end)
        if ours != theirs:
            raise ValueError(f"the tokenizer's image settings (patch, merge, [IMG], "
                             f"[IMG_BREAK], [IMG_END]) {theirs} are not the model's {ours}")
        self.encoder = encoder

    def sizes(self, images: list[Any]) -> list[tuple[int, int]]:
        """Each image's (height, width) as mistral_common resizes it (its token grid)."""
        unit = self.encoder.image_config.image_patch_size \
            * self.encoder.image_config.spatial_merge_size
        out = []
        for im in images:
            cols, rows = self.encoder._image_to_num_tokens(im)  # (no public form of it)
            out.append((rows * unit, cols * unit))
        return out

    def pixels(self, images: list[Any], sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Each image's normalized pixels [C, H, W], as mistral_common encodes them."""
        from mistral_common.protocol.instruct.chunk import ImageChunk

        out = []
        for im, size in zip(images, sizes, strict=True):
            pixels = torch.from_numpy(self.encoder(ImageChunk(image=im)).image)
            if tuple(pixels.shape[1:]) != size:
                raise ValueError(f"mistral_common encoded an image at {tuple(pixels.shape[1:])}, "
                                 f"not the {size} its token grid gives")
            out.append(pixels)
        return out
