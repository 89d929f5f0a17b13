"""A request's images and audio clips for Phi-4-multimodal.

Images: HF's Phi4MultimodalImageProcessor step for step in torch alone (HF's runs only with
torchvision, which loraplex does not need): the crop grid from the image's size
(models/phi4mm.py `crop_layout`), the uint8 image resized into it bilinear with antialias
as torchvision resizes it (engine/llama4_images.py `resize`), padded white right and
below, rescaled and normalized in fp32, cut into crops row by row behind the whole padded
image resized bicubic (no antialias) to one crop (the global view); each `<|image|>`
expanded to the image's token count, as Phi4MultimodalProcessor expands it.

Clips: each resampled to the feature extractor's rate, HF's own
Phi4MultimodalFeatureExtractor (torch) on it alone, each `<|audio|>` expanded to its
`audio_embed_sizes`.

One ImageInputs holds both kinds, items in prompt order: `pixel_values` their values flat
(an image's [1 + crops, 3, S, S], a clip's [frames, mels], item after item: the two do not
stack), `sizes` each image's (height, width, dynamic_hd), from which the tower rebuilds
the crop masks, and each clip's ("speech" or "vision": its projection, frames, tokens).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from loraplex.engine.audio import as_clips, is_clip, resample, resampled_length, waveform
from loraplex.engine.images import (
    ImageInputs,
    expand_placeholders,
    load_images,
    placeholder_ranges,
)
from loraplex.engine.llama4_images import resize
from loraplex.engine.multimodal_processor import MultimodalProcessor
from loraplex.models.phi4mm import Phi4MMVisionConfig, crop_layout, is_audio

# what preprocessor_config.json may set of the feature extractor
_EXTRACTOR_KEYS = ("feature_size", "sampling_rate", "hop_length", "n_fft", "win_length",
                   "preemphasis", "padding_value", "audio_compression_rate",
                   "audio_downsample_rate", "audio_feat_stride", "mel_min_frequency",
                   "mel_max_frequency")
_BICUBIC = 3  # PILImageResampling.BICUBIC: the global view's (HF's default)


class Phi4MMProcessor(MultimodalProcessor):
    """preprocessor_config.json's settings plus the `<|image|>` and `<|audio|>` rules
    (engine/multimodal_processor.py's interface, both modalities in one)."""

    @classmethod
    def load(cls, path: str, config: Phi4MMVisionConfig, tokenizer: Any) -> Phi4MMProcessor:
        return cls(path, config)

    def __init__(self, path: str, config: Phi4MMVisionConfig) -> None:  # noqa: D107
        with open(os.path.join(path, "preprocessor_config.json")) as f:
            cfg = json.load(f)
        size = cfg.get("size") or {"height": 448, "width": 448}
        if (size.get("height"), size.get("width")) != (config.image_size,) * 2:
            raise ValueError(f"the image processor's size {size} is not the vision tower's "
                             f"{config.image_size} x {config.image_size} crops")
        if int(cfg.get("patch_size", 14)) != config.patch_size:
            raise ValueError(f"the image processor's patch_size {cfg.get('patch_size')} is "
                             f"not the vision tower's {config.patch_size}")
        if cfg.get("resample", _BICUBIC) != _BICUBIC or not cfg.get("do_rescale", True) \
                or not cfg.get("do_normalize", True):
            raise ValueError(f"Phi-4-multimodal's image processor in {path}: only bicubic "
                             "resample with do_rescale and do_normalize is supported")
        self.config = config
        self.dynamic_hd = int(cfg.get("dynamic_hd", 36))
        scale = float(cfg.get("rescale_factor", 1 / 255))
        mean, std = cfg.get("image_mean", [0.5] * 3), cfg.get("image_std", [0.5] * 3)
        # HF's fused rescale + normalize: mean and std over the rescale factor
        self.mean = torch.tensor(mean if isinstance(mean, list) else [mean] * 3) * (1 / scale)
        self.std = torch.tensor(std if isinstance(std, list) else [std] * 3) * (1 / scale)
        self.placeholder = config.image_token_id
        self.extractor = None  # audio: HF's Phi4MultimodalFeatureExtractor (torch only)
        if config.audio is not None:
            from transformers import Phi4MultimodalFeatureExtractor

            self.extractor = Phi4MultimodalFeatureExtractor(
                **{k: v for k, v in cfg.items() if k in _EXTRACTOR_KEYS})
            if self.extractor.feature_size != config.audio.input_size:
                raise ValueError(f"the feature extractor's feature_size="
                                 f"{self.extractor.feature_size}, the audio encoder takes "
                                 f"input_size={config.audio.input_size}")
            if self.extractor.audio_downsample_rate != 1 or \
                    self.extractor.audio_compression_rate != config.audio.time_reduction:
                raise ValueError("the feature extractor's audio_compression_rate must be the "
                                 "encoder's time_reduction, its audio_downsample_rate 1")
        self.audio_placeholder = config.audio.audio_token_id if config.audio else None

    @property
    def modalities(self) -> tuple[str, ...]:
        return ("image", "audio") if self.extractor is not None else ("image",)

    @property
    def rate(self) -> int:
        return int(self.extractor.sampling_rate)

    def placeholder_token(self, modality: str) -> int | None:
        return self.audio_placeholder if modality == "audio" else self.placeholder

    def process(self, ids: list[int], data: Mapping[str, Any],
                options: Mapping[str, Any] | None = None) -> tuple[list[int], ImageInputs]:
        return self(ids, data.get("image"), audio=data.get("audio"))

    def expanded(self, ids: list[int], data: Mapping[str, Any],
                 options: Mapping[str, Any] | None = None) -> list[int]:
        return self.expand(ids, data.get("image", []), data.get("audio"))

    def data_keys(self, inputs: ImageInputs) -> list[str]:
        return self.modalities_of(inputs)

    def crops(self, image: Any) -> torch.Tensor:
        """One PIL image -> [1 + crops, 3, S, S] (the global view first)."""
        import numpy as np

        c, s = self.config, self.config.image_size
        x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
        (w, h), (new_w, new_h), (pad_w, pad_h) = crop_layout(
            x.shape[1], x.shape[2], c.image_size, self.dynamic_hd)
        x = resize(x[None], (new_h, new_w))[0]
        x = F.pad(x, (0, pad_w, 0, pad_h), value=255)
        x = (x.float() - self.mean[:, None, None]) / self.std[:, None, None]
        glob = F.interpolate(x[None], size=[s, s], mode="bicubic", align_corners=False,
                             antialias=False)
        grid = x.view(3, h, s, w, s).permute(1, 3, 0, 2, 4).reshape(-1, 3, s, s)
        return torch.cat([glob, grid])

    def sizes(self, images: list[Any]) -> list[tuple[int, int, int]]:
        return [(im.height, im.width, self.dynamic_hd) for im in images]

    def clips(self, data: Any, with_images: bool) -> list[tuple[torch.Tensor, tuple]]:
        """Each clip's log-mel features [frames, mels] (HF's feature extractor on the
        waveform resampled to its rate) and its size ("speech" / "vision", frames,
        tokens)."""
        if self.extractor is None:
            raise ValueError("multi_modal_data: audio is not allowed (limit_mm_per_prompt)")
        fe, out = self.extractor, []
        for i, (wave, rate) in enumerate(as_clips(data)):
            x = resample(waveform(wave, rate, i), int(rate), self.rate)
            if x.shape[0] < fe.win_length:
                raise ValueError(f"audio {i}: {x.shape[0]} samples at {self.rate} Hz is too "
                                 f"short (one window is {fe.win_length})")
            f = fe(x.numpy(), sampling_rate=self.rate, return_tensors="pt")
            feats = f["audio_input_features"][0].float()
            size = ("vision" if with_images else "speech", feats.shape[0],
                    int(f["audio_embed_sizes"][0]))
            out.append((feats, size))
        return out

    def audio_tokens(self, data: Any) -> list[int]:
        """Each clip's `<|audio|>` count without computing its features (the extractor's
        rule: ceil(frames / compression rate))."""
        fe, out = self.extractor, []
        for i, (wave, rate) in enumerate(as_clips(data)):
            n = resampled_length(waveform(wave, rate, i).shape[0], int(rate), self.rate)
            frames = (n - fe.win_length) // fe.hop_length + 1
            out.append(-(-frames * fe.audio_feat_stride // fe.audio_compression_rate))
        return out

    def __call__(self, ids: list[int], data: Any = None, audio: Any = None
                 ) -> tuple[list[int], ImageInputs]:
        """The prompt with its placeholders expanded, and its items' inputs, in prompt
        order. `data`: images (or, the chat's single list, audio clips); `audio`: clips."""
        if audio is None and data is not None and (is_clip(data) or (
                isinstance(data, list) and data and all(is_clip(x) for x in data))):
            data, audio = None, data
        images = load_images(data) if data is not None else []
        sizes = self.sizes(images)
        counts = [self.config.tokens_for(s) for s in sizes]  # (refuses extreme ratios)
        ids = expand_placeholders(ids, self.placeholder, counts)
        items = [(c, s) for c, s in zip((self.crops(im) for im in images), sizes)]
        if audio is not None:
            clips = self.clips(audio, bool(images))
            ids = expand_placeholders(ids, self.audio_placeholder,
                                      [s[2] for _, s in clips], "audio")
            items = self._in_prompt_order(ids, items, clips)
        positions = self.positions(ids)
        hashes = [hashlib.blake2b(v.numpy().tobytes() + repr(s).encode(),
                                  digest_size=16).digest() for v, s in items]
        return ids, ImageInputs(torch.cat([v.reshape(-1) for v, _ in items]), positions,
                                placeholder_ranges(positions, [self.config.tokens_for(s)
                                                               for _, s in items]),
                                hashes, sizes=[s for _, s in items])

    def _in_prompt_order(self, ids: list[int], images: list, clips: list) -> list:
        """Images and clips ordered by where their placeholder runs start."""
        starts = {t: [p for p, x in enumerate(ids) if x == t and (p == 0 or ids[p - 1] != t)]
                  for t in (self.placeholder, self.audio_placeholder)}
        keyed = list(zip(starts[self.placeholder], images)) + \
            list(zip(starts[self.audio_placeholder], clips))
        return [item for _, item in sorted(keyed, key=lambda k: k[0])]

    def expand(self, ids: list[int], images: list[Any], audio: Any = None) -> list[int]:
        """The prompt expanded for these items, without processing them."""
        if images and all(is_clip(x) for x in images):
            images, audio = [], images
        counts = [self.config.tokens_for(s) for s in self.sizes(images)]
        ids = expand_placeholders(ids, self.placeholder, counts)
        if audio:
            ids = expand_placeholders(ids, self.audio_placeholder, self.audio_tokens(audio),
                                      "audio")
        return ids

    def modalities_of(self, inputs: ImageInputs) -> list[str]:
        """The modalities of processed inputs' items."""
        audio = [is_audio(s) for s in inputs.sizes]
        return (["image"] if not all(audio) else []) + (["audio"] if any(audio) else [])

    def positions(self, ids: list[int]) -> list[int]:
        tokens = (self.placeholder, self.audio_placeholder)
        return [p for p, t in enumerate(ids) if t in tokens]

    def check(self, ids: list[int], inputs: ImageInputs) -> None:
        """Processed inputs given with a prompt (the server's) must be that prompt's."""
        c = self.config
        try:
            counts = [c.tokens_for(s) for s in inputs.sizes]
            numel = sum(c.numel(s) for s in inputs.sizes)
        except (TypeError, ValueError, AttributeError):
            counts, numel = [], -1
        if self.positions(ids) != inputs.positions or sum(counts) != len(inputs.positions) \
                or placeholder_ranges(inputs.positions, counts) != inputs.ranges \
                or inputs.pixel_values.numel() != numel:
            raise ValueError("multi_modal_data: the processed image / audio inputs do not "
                             "match the prompt's (expanded) placeholders")
