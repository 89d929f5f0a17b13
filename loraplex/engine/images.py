"""A request's images: decoded, turned into pixel values by the model's own HF image
processor (so the pixels are HF's), and the prompt's image placeholders expanded to one
token per image embedding, as HF's LlavaProcessor expands them (LLaVA-NeXT: as many as
the image's size gives, LlavaNextProcessor's count; Gemma 3: each <start_of_image> as
Gemma3Processor expands it, models/gemma3_vision.py; Llama 4: each <|image|> as
Llama4Processor expands it, tiles and separators, models/llama4_vision.py). The server does this on
its encoder thread and hands the engine the ImageInputs (the step loop never waits on an
image processor); offline, LLMEngine.add_request calls the same ImageProcessor.

The vision tower runs later, once per request, at its first prefill step that reaches a
placeholder (worker/model_runner.py); its output stays on `ImageInputs.embeds`, so later
chunks of the prompt and a recompute after preemption reuse it. Each image's hash goes
into the prefix-cache hashes of the blocks its placeholders are in
(engine/block_manager.py): the same text with another image never shares their K/V.
"""

from __future__ import annotations

import hashlib
import io
import logging
from bisect import bisect_left
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import torch

from loraplex.engine.media import MediaConnector, fetch_media
from loraplex.engine.multimodal_processor import MultimodalProcessor
from loraplex.engine.pan_and_scan import KEYS as PAN_AND_SCAN_KEYS
from loraplex.engine.pan_and_scan import PanAndScan
from loraplex.models.gemma3_vision import Gemma3ImageTokens, Gemma3Vision, Gemma3VisionConfig
from loraplex.models.gemma4_vision import Gemma4Vision, Gemma4VisionConfig, is_gemma4
from loraplex.models.granite_speech import (
    GraniteSpeechAudio,
    GraniteSpeechAudioConfig,
    is_granite_speech,
)
from loraplex.models.idefics3 import Idefics3Vision, Idefics3VisionConfig, is_idefics3
from loraplex.models.internvl import InternVLVision, InternVLVisionConfig, is_internvl
from loraplex.models.lfm2_vl import Lfm2VlVision, Lfm2VlVisionConfig, is_lfm2_vl
from loraplex.models.llama4_vision import (
    Llama4ImageTokens,
    Llama4Vision,
    Llama4VisionConfig,
    is_llama4,
)
from loraplex.models.llava import LlavaVision, LlavaVisionConfig, placeholder_runs
from loraplex.models.llava_onevision import (
    LlavaOnevisionVision,
    LlavaOnevisionVisionConfig,
    is_llava_onevision,
)
from loraplex.models.phi4mm import Phi4MMVision, Phi4MMVisionConfig, is_phi4mm
from loraplex.models.pixtral import PixtralVision, PixtralVisionConfig, takes_pixtral_tower
from loraplex.models.qwen2_audio import Qwen2Audio, Qwen2AudioConfig, is_qwen2_audio
from loraplex.models.qwen2_vl import QwenVision, QwenVisionConfig, is_qwen_vl
from loraplex.models.qwen3_vl import Qwen3Vision, Qwen3VisionConfig, is_qwen3_vl
from loraplex.models.voxtral import Voxtral, VoxtralAudioConfig, is_voxtral

logger = logging.getLogger(__name__)

# (Granite Speech's and Qwen2-Audio's audio encoders plug in the same way:
# models/granite_speech.py, models/qwen2_audio.py)
VisionConfig = (LlavaVisionConfig | Gemma3VisionConfig | QwenVisionConfig | PixtralVisionConfig
                | Llama4VisionConfig | GraniteSpeechAudioConfig | Qwen2AudioConfig
                | Phi4MMVisionConfig | VoxtralAudioConfig | InternVLVisionConfig
                | Gemma4VisionConfig | Lfm2VlVisionConfig | Idefics3VisionConfig
                | LlavaOnevisionVisionConfig)
Vision = (LlavaVision | Gemma3Vision | QwenVision | Qwen3Vision | PixtralVision | Llama4Vision
          | GraniteSpeechAudio | Qwen2Audio | Phi4MMVision | Voxtral | InternVLVision
          | Gemma4Vision | Lfm2VlVision | Idefics3Vision | LlavaOnevisionVision)


def _is_gemma3(hf_config: Any) -> bool:
    return getattr(hf_config, "model_type", None) == "gemma3"


# a multimodal checkpoint's encoder config: the first whose test its HF config meets (Qwen3-VL
# before Qwen2-VL, whose test it meets too), else LLaVA's (-NeXT's)
ENCODER_CONFIGS: tuple[tuple[Callable[[Any], bool], type[VisionConfig]], ...] = (
    (is_granite_speech, GraniteSpeechAudioConfig),
    (is_qwen2_audio, Qwen2AudioConfig),
    (is_phi4mm, Phi4MMVisionConfig),  # models/phi4mm.py: images and audio
    (is_voxtral, VoxtralAudioConfig),
    (_is_gemma3, Gemma3VisionConfig),
    (is_gemma4, Gemma4VisionConfig),  # engine/gemma4_images.py: its patches
    (is_llama4, Llama4VisionConfig),
    (is_qwen3_vl, Qwen3VisionConfig),  # a QwenVisionConfig
    (is_qwen_vl, QwenVisionConfig),  # Qwen2-VL, Qwen2.5-VL
    (takes_pixtral_tower, PixtralVisionConfig),  # Mistral 3, Pixtral-12B
    (is_internvl, InternVLVisionConfig),  # engine/internvl_images.py's tiles
    (is_lfm2_vl, Lfm2VlVisionConfig),  # engine/lfm2_vl_images.py's tiles
    (is_idefics3, Idefics3VisionConfig),  # Idefics3, SmolVLM: engine/idefics3_images.py
    (is_llava_onevision, LlavaOnevisionVisionConfig),  # engine/llava_onevision.py: videos
)

# the module an encoder config builds (by its exact class: Qwen3-VL's config is a
# QwenVisionConfig, its tower not a QwenVision)
TOWERS: dict[type[VisionConfig], Callable[[Any], Vision]] = {
    LlavaVisionConfig: LlavaVision,  # (LLaVA-NeXT too)
    Gemma3VisionConfig: Gemma3Vision,
    Gemma4VisionConfig: Gemma4Vision,
    Llama4VisionConfig: Llama4Vision,
    QwenVisionConfig: QwenVision,
    Qwen3VisionConfig: Qwen3Vision,
    PixtralVisionConfig: PixtralVision,
    GraniteSpeechAudioConfig: GraniteSpeechAudio,
    Qwen2AudioConfig: Qwen2Audio,
    VoxtralAudioConfig: Voxtral,
    Phi4MMVisionConfig: Phi4MMVision,
    InternVLVisionConfig: InternVLVision,
    Lfm2VlVisionConfig: Lfm2VlVision,
    Idefics3VisionConfig: Idefics3Vision,
    LlavaOnevisionVisionConfig: LlavaOnevisionVision,
}


def encoder_class(hf_config: Any) -> type[VisionConfig]:
    """The class of a multimodal checkpoint's encoder config (ENCODER_CONFIGS), without
    reading the config."""
    return next((c for takes, c in ENCODER_CONFIGS if takes(hf_config)), LlavaVisionConfig)


def vision_config(hf_config: Any) -> VisionConfig:
    """A multimodal checkpoint's image side (Qwen3-VL's: a QwenVisionConfig too), or its
    audio side (Granite Speech, Qwen2-Audio, Voxtral; Phi-4-multimodal: both); else
    LLaVA's (-NeXT)."""
    return encoder_class(hf_config).from_hf(hf_config)


def build_vision(config: VisionConfig) -> Vision:
    """The vision tower (and projector) or audio encoder `config` describes (TOWERS)."""
    return TOWERS[type(config)](config)


@dataclass
class ImageInputs:
    """One request's images (shared by its n sequences: the tower runs once); or, with
    `prompt_embeds`, its whole prompt given as embeddings (engine/prompt_embeds.py)."""

    pixel_values: torch.Tensor  # [tiles, channels, H, W]: one an image but LLaVA-NeXT's
    # (Qwen2-VL, Mistral 3: [patches, patch pixels], engine/qwen_images.py, pixtral_images.py)
    positions: list[int]  # the prompt positions of the placeholders, image after image
    # each image's placeholders: (first position, span to its last one): their count but
    # for Llama 4's, whose tile separators lie between them (`placeholder_ranges`), and
    # Mistral 3's, from its first [IMG] to its [IMG_END]
    ranges: list[tuple[int, int]]
    hashes: list[bytes]  # each image's pixel values and size, hashed
    # [len(positions), hidden]: from the first prefill (Qwen3-VL: [len(positions), 1 + L,
    # hidden], each row's DeepStack features with it: models/qwen3_vl.py)
    embeds: torch.Tensor | None = None
    # each image's (height, width) (Mistral 3: resized)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    # Gemma 3: each image's placeholders attend to each other both ways, so a prefill
    # chunk holds an image whole (chunk_len) and attention widens its mask over them
    bidirectional: bool = False
    # (Qwen2-VL: its patch grid (t, h, w)); its M-RoPE positions [3, prompt] and the
    # decode offset after them (engine/qwen_images.py; None: 1-D positions)
    mrope: torch.Tensor | None = None
    mrope_delta: int = 0
    # vLLM's prompt_embeds: every prompt row's embedding given, its ids placeholders
    prompt_embeds: bool = False
    # Qwen2-VL / Qwen2.5-VL: which items (indices of ranges, hashes, sizes, all in prompt
    # order, images and videos alike) are videos (engine/qwen_images.py)
    videos: list[int] = field(default_factory=list)
    # Gemma 3's pan-and-scan: each image's crops, items of their own after it (empty:
    # none); what limit_mm_per_prompt does not count (engine/pan_and_scan.py)
    crops: list[int] = field(default_factory=list)
    # Gemma 4: which items are audio clips (engine/gemma4_images.py), never a
    # bidirectional block (`blocks`), nor counted as images
    audio: list[int] = field(default_factory=list)

    def free_on_preempt(self) -> None:
        """What the request gives back while preempted: nothing here (its embeddings are
        small, and the recompute reuses them); Whisper's encoder K/V are dropped
        (engine/whisper_inputs.py)."""

    def block_key(self, start: int, end: int) -> bytes:
        """What the prefix-cache hash of the block over positions [start, end) adds: the
        hashes of the images with placeholders in it."""
        return b"".join(h for (first, n), h in zip(self.ranges, self.hashes)
                        if first < end and first + n > start)

    def chunk_len(self, start: int, n: int) -> int:
        """How much of a prefill chunk of `n` tokens from `start` may run: all of it,
        unless it would end inside a bidirectional image, then up to that image (0: the
        image does not fit; it waits for a step with room for it all)."""
        if not self.bidirectional:
            return n
        end = start + n
        for first, count in self.blocks():
            if first < end < first + count:
                return max(first - start, 0)
        return n

    def blocks(self) -> list[tuple[int, int]]:
        """The items whose placeholders see each other both ways: none unless
        `bidirectional`, then every item but the audio clips."""
        if not self.bidirectional:
            return []
        return [r for i, r in enumerate(self.ranges) if i not in set(self.audio)]

    def rows_in(self, start: int, end: int) -> tuple[list[int], slice]:
        """The placeholder positions in [start, end) and their slice of `embeds`."""
        lo, hi = bisect_left(self.positions, start), bisect_left(self.positions, end)
        return self.positions[lo:hi], slice(lo, hi)


def load_images(data: Any) -> list[Any]:
    """multi_modal_data's "image" entry (one image or a list: PIL images or URLs) as PIL
    images; an empty list is refused."""
    images = [load_image(x) for x in (data if isinstance(data, list | tuple) else [data])]
    if not images:
        raise ValueError("multi_modal_data: 'image' holds no image")
    return images


def load_image(source: Any, connector: MediaConnector | None = None) -> Any:
    """A PIL image from a PIL image, a data URL (base64), an http(s) URL (fetched with a
    timeout) or, in a chat message, a file:// URL its connector allows (engine/media.py);
    ValueError for anything else or for bytes that are not an image."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source
    if not isinstance(source, str):
        raise ValueError(f"an image must be a PIL image or a URL, got {type(source).__name__}")
    data, _ = fetch_media(source, "image", connector)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # PIL raises several types for bytes it cannot read
        raise ValueError(f"cannot decode the image: {e}") from e
    return image


def image_hash(pixels: torch.Tensor, size: tuple[int, ...]) -> bytes:
    """An image's (a frame's, a clip's) prefix-cache key: its values (fp32) and size."""
    return hashlib.blake2b(pixels.float().contiguous().numpy().tobytes() + repr(size).encode(),
                           digest_size=16).digest()


def placeholder_ranges(positions: list[int], counts: list[int]) -> list[tuple[int, int]]:
    """Each image's (first placeholder position, span to its last one + 1), its
    placeholders `counts[i]` of `positions` in order."""
    firsts = [0, *accumulate(counts)][:-1]  # each image's first placeholder, counted
    return [(positions[f], positions[f + n - 1] - positions[f] + 1)
            for f, n in zip(firsts, counts, strict=True)]


class ImageProcessor(MultimodalProcessor):
    """The model's HF image processor plus its placeholder rule (LLaVA's; Gemma 3's,
    which needs the tokenizer for the newlines around an image; Llama 4's, for its
    markers)."""

    @classmethod
    def load(cls, path: str, config: VisionConfig, tokenizer: Any) -> ImageProcessor | None:
        """None for a Gemma 3 or Llama 4 checkpoint saved without image processor files
        (served on text, images refused); LLaVA's needs them."""
        try:
            return cls(path, config, tokenizer)
        except OSError:
            if isinstance(config, LlavaVisionConfig):
                raise
            logger.warning("%s has no image processor files: serving its language model on "
                           "text; image inputs are refused", path)
            return None

    def __init__(self, path: str, config: VisionConfig, tokenizer: Any = None) -> None:
        self.hf = self.load_hf(path, config)
        # the token a prompt (or the chat's string fallback) puts where an image goes
        self.placeholder = config.image_token_id
        # Gemma 3's pan-and-scan options as saved (engine/pan_and_scan.py); None: no crops
        self.pan_and_scan: PanAndScan | None = None
        # what the HF image processor is always called with (InternVL's crop_to_patches)
        self.hf_kwargs: dict[str, Any] = {}
        self._expand: Callable[[list[int], list[tuple[int, int]], list[int]], list[int]]
        if isinstance(config, Llama4VisionConfig):  # its tiling is the processor's
            config = config.with_processor(self.hf)
            llama4 = Llama4ImageTokens(tokenizer, config)
            self._expand = lambda ids, sizes, crops: llama4(ids, sizes)
            self.placeholder = llama4.placeholder
        elif isinstance(config, Gemma3VisionConfig):
            gemma3 = Gemma3ImageTokens(tokenizer, config)
            self._expand = lambda ids, sizes, crops: gemma3(
                ids, [config.tokens_for(s) for s in sizes], crops)
            self.pan_and_scan = PanAndScan.of_processor(self.hf)
            self.option_keys = PAN_AND_SCAN_KEYS
        else:
            self._expand = lambda ids, sizes, crops: expand_placeholders(
                ids, config.image_token_id, [config.tokens_for(s) for s in sizes])
        self.config = config

    @staticmethod
    def load_hf(path: str, config: VisionConfig) -> Any:
        """The checkpoint's HF image processor (InternVL's remote layout builds its own:
        engine/internvl_images.py)."""
        from transformers import AutoImageProcessor

        if isinstance(config, Llama4VisionConfig):  # HF's needs torchvision: ours
            from loraplex.engine.llama4_images import Llama4ImagePreprocessor

            return Llama4ImagePreprocessor.from_pretrained(path)
        return AutoImageProcessor.from_pretrained(path)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        self._crops_rule(options)

    def _crops_rule(self, options: Mapping[str, Any] | None) -> PanAndScan | None:
        """The pan-and-scan options under mm_processor_kwargs `options`; None: the model
        cuts no crops."""
        if self.pan_and_scan is None:
            return None
        return self.pan_and_scan.with_options(options or {})

    def process(self, ids: list[int], data: Mapping[str, Any],
                options: Mapping[str, Any] | None = None) -> tuple[list[int], ImageInputs]:
        return self(ids, data["image"], options)

    def expanded(self, ids: list[int], data: Mapping[str, Any],
                 options: Mapping[str, Any] | None = None) -> list[int]:
        return self.expand(ids, data["image"], options)

    def __call__(self, ids: list[int], data: Any, options: Mapping[str, Any] | None = None
                 ) -> tuple[list[int], ImageInputs]:
        """The prompt with its placeholders expanded, and its images' inputs. `data`: one
        image or a list (PIL images or URLs). Gemma 3's pan-and-scan crops (`options`, over
        the processor's own) are items of their own after their image's: each its own
        pixels, placeholders and bidirectional block, as HF's model takes them."""
        images = load_images(data)
        c = self.config
        sizes = [(im.height, im.width) for im in images]  # HF's image_sizes
        rule = self._crops_rule(options)
        crops = [rule.crops(s) for s in sizes] if rule is not None else [0] * len(sizes)
        # before the pixels: a mismatch costs nothing
        ids = self._expand(ids, sizes, crops)
        kwargs = rule.hf_kwargs() if rule is not None else self.hf_kwargs
        out = self.hf(images=[im.convert("RGB") for im in images], return_tensors="pt",
                      **kwargs)
        cut = [int(n) for n in out.get("num_crops", crops)] if rule is not None else crops
        if cut != crops:
            raise ValueError(f"the image processor cut {cut} pan-and-scan crops, loraplex "
                             f"counted {crops}")
        sizes = [s for s, k in zip(sizes, crops, strict=True) for _ in range(1 + k)]
        counts, tiles = [c.tokens_for(s) for s in sizes], [c.tiles(s) for s in sizes]
        pixels = out["pixel_values"]
        self.check_pixels(pixels)
        if pixels.dim() == 5:  # LLaVA-NeXT's: padded to the most tiles any image has
            pixels = torch.cat([p[:n] for p, n in zip(pixels, tiles, strict=True)])
        positions = self.positions(ids)
        ranges = placeholder_ranges(positions, counts)
        hashes = [image_hash(p, s) for p, s in zip(pixels.float().split(tiles), sizes)]
        return ids, ImageInputs(pixels, positions, ranges, hashes, sizes=sizes,
                                bidirectional=c.bidirectional,
                                crops=crops if any(crops) else [])

    def check_pixels(self, pixels: torch.Tensor) -> None:
        """The image processor's pixels are what the tower takes (their side)."""
        c = self.config
        if tuple(pixels.shape[-2:]) != (c.image_size, c.image_size):
            raise ValueError(f"the image processor gives {tuple(pixels.shape[-2:])} pixels, "
                             f"the vision tower takes {c.image_size} x {c.image_size}")

    def expand(self, ids: list[int], images: list[Any],
               options: Mapping[str, Any] | None = None) -> list[int]:
        """The prompt with its placeholders expanded for these (PIL) images (ValueError:
        they do not match), without processing them: what /tokenize and usage count."""
        sizes = [(im.height, im.width) for im in images]
        rule = self._crops_rule(options)
        return self._expand(ids, sizes, [rule.crops(s) if rule else 0 for s in sizes])

    def positions(self, ids: list[int]) -> list[int]:
        return [p for p, t in enumerate(ids) if t == self.config.image_token_id]

    def check(self, ids: list[int], inputs: ImageInputs) -> None:
        """Processed inputs given with a prompt (the server's) must be that prompt's: its
        placeholders where the inputs say, one embedding each."""
        c = self.config
        counts = [c.tokens_for(s) for s in inputs.sizes]
        if self.positions(ids) != inputs.positions or len(inputs.sizes) != len(inputs.ranges) \
                or sum(counts) != len(inputs.positions) \
                or placeholder_ranges(inputs.positions, counts) != inputs.ranges \
                or inputs.pixel_values.shape[0] != sum(c.tiles(s) for s in inputs.sizes) \
                or inputs.bidirectional != c.bidirectional:
            raise ValueError("multi_modal_data: the processed image inputs do not match the "
                             "prompt's (expanded) image placeholders")


def expand_placeholders(ids: list[int], token: int, counts: list[int],
                        kind: str = "image") -> list[int]:
    """Image i's one placeholder becomes `counts[i]` of them (HF's processor does it to
    the text); a prompt already expanded (runs of exactly `counts`) is kept as is. `kind`:
    what the placeholders stand for (Qwen-VL's videos have their own)."""
    runs = placeholder_runs(ids, token)
    if runs == counts:
        return list(ids)
    if sum(runs) != len(counts):
        raise ValueError(f"the prompt has {sum(runs)} {kind} placeholder token(s) (id {token}) "
                         f"for {len(counts)} {kind}(s): put one placeholder where each {kind} "
                         "goes")
    out: list[int] = []
    left = iter(counts)
    for t in ids:
        out.extend([token] * next(left) if t == token else [t])
    return out


def expand_wrapped(ids: list[int], token: int, begin: int, end: int, counts: list[int],
                   name: str, kind: str = "image") -> list[int]:
    """Item i's one `token` (its text `name`) becomes `begin`, `counts[i]` of it, `end`
    (InternVL's <img> ... </img>, Gemma 4's boi ... eoi and boa ... eoa); a prompt already
    so expanded is kept as is."""
    runs = placeholder_runs(ids, token)
    if runs == counts and _wrapped(ids, token, begin, end):
        return list(ids)
    if sum(runs) != len(counts):
        raise ValueError(f"the prompt has {sum(runs)} {kind} placeholder token(s) (id {token}) "
                         f"for {len(counts)} {kind}(s): put one {name} where each {kind} goes")
    out: list[int] = []
    left = iter(counts)
    for t in ids:
        out.extend([begin, *[token] * next(left), end] if t == token else [t])
    return out


def _wrapped(ids: list[int], token: int, begin: int, end: int) -> bool:
    """Every run of `token` lies between `begin` and `end`."""
    for i, t in enumerate(ids):
        if t == token and ((i == 0 or ids[i - 1] not in (t, begin))
                           or (i + 1 == len(ids) or ids[i + 1] not in (t, end))):
            return False
    return True
