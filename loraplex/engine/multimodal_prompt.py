"""A prompt's multi_modal_data on its way into the engine. At start-up: which encoder
config a checkpoint gets under limit_mm_per_prompt (`encoder_config`) and the model's
processor, picked by that config's class (PROCESSORS, one line a model family). Per
request (LLMEngine.add_request): the prompt's items counted against limit_mm_per_prompt,
turned by the processor into the prompt with its placeholders expanded and one ImageInputs
(or processed inputs the server gave, checked and taken as they are), and the
default_mm_loras adapter of a prompt that names none. What differs between models is the
processor's (engine/multimodal_processor.py), so the engine names none.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from loraplex.config import MultiModalConfig, SchedulerConfig
from loraplex.engine.audio import AudioProcessor, is_clip
from loraplex.engine.gemma4_images import Gemma4ImageProcessor
from loraplex.engine.idefics3_images import Idefics3ImageProcessor
from loraplex.engine.images import (
    ImageInputs,
    ImageProcessor,
    VisionConfig,
    encoder_class,
    vision_config,
)
from loraplex.engine.internvl_images import InternVLImageProcessor
from loraplex.engine.lfm2_vl_images import Lfm2VlImageProcessor
from loraplex.engine.llava_onevision import LlavaOnevisionProcessor
from loraplex.engine.multimodal_processor import MultimodalProcessor
from loraplex.engine.phi4mm_inputs import Phi4MMProcessor
from loraplex.engine.pixtral_images import PixtralImageProcessor
from loraplex.engine.qwen2_audio_inputs import Qwen2AudioProcessor
from loraplex.engine.qwen_images import QwenImageProcessor
from loraplex.engine.qwen_videos import count_videos, takes_videos
from loraplex.engine.voxtral_inputs import VoxtralAudioProcessor
from loraplex.engine.whisper_inputs import WhisperAudioProcessor
from loraplex.inputs import PromptType
from loraplex.lora.request import LoRARequest
from loraplex.models.gemma3_vision import Gemma3VisionConfig
from loraplex.models.gemma4_vision import Gemma4VisionConfig
from loraplex.models.granite_speech import GraniteSpeechAudioConfig
from loraplex.models.idefics3 import Idefics3VisionConfig
from loraplex.models.internvl import InternVLVisionConfig
from loraplex.models.lfm2_vl import Lfm2VlVisionConfig
from loraplex.models.llama4_vision import Llama4VisionConfig
from loraplex.models.llava import LlavaVisionConfig
from loraplex.models.llava_onevision import LlavaOnevisionVisionConfig
from loraplex.models.phi4mm import Phi4MMVisionConfig
from loraplex.models.pixtral import PixtralVisionConfig
from loraplex.models.qwen2_audio import Qwen2AudioConfig
from loraplex.models.qwen2_vl import QwenVisionConfig
from loraplex.models.text_only import TextOnly
from loraplex.models.voxtral import VoxtralAudioConfig
from loraplex.models.whisper import WhisperConfig

logger = logging.getLogger(__name__)

# a model's processor by its vision / audio config's class (a subclass takes its base's
# entry unless it has its own: Qwen3-VL's config is a QwenVisionConfig)
PROCESSORS: dict[type, type[MultimodalProcessor]] = {
    LlavaVisionConfig: ImageProcessor,  # (LLaVA-NeXT too)
    Gemma3VisionConfig: ImageProcessor,
    Gemma4VisionConfig: Gemma4ImageProcessor,  # engine/gemma4_images.py: its patches
    Llama4VisionConfig: ImageProcessor,
    QwenVisionConfig: QwenImageProcessor,  # engine/qwen_images.py
    PixtralVisionConfig: PixtralImageProcessor,  # engine/pixtral_images.py (Mistral 3)
    InternVLVisionConfig: InternVLImageProcessor,  # engine/internvl_images.py: tiles
    Lfm2VlVisionConfig: Lfm2VlImageProcessor,  # engine/lfm2_vl_images.py: tiles
    Idefics3VisionConfig: Idefics3ImageProcessor,  # engine/idefics3_images.py (SmolVLM too)
    LlavaOnevisionVisionConfig: LlavaOnevisionProcessor,  # engine/llava_onevision.py: videos
    GraniteSpeechAudioConfig: AudioProcessor,  # engine/audio.py
    Qwen2AudioConfig: Qwen2AudioProcessor,  # engine/qwen2_audio_inputs.py
    VoxtralAudioConfig: VoxtralAudioProcessor,  # engine/voxtral_inputs.py
    Phi4MMVisionConfig: Phi4MMProcessor,  # engine/phi4mm_inputs.py: images and audio
    WhisperConfig: WhisperAudioProcessor,  # engine/whisper_inputs.py: its encoder's clip
}


def encoder_config(hf_config: Any, text_only: TextOnly | None, multimodal: MultiModalConfig,
                   model: str) -> VisionConfig | None:
    """The config of a multimodal checkpoint's vision tower and projector (LLaVA, Gemma 3,
    Llama 4, Qwen-VL, Mistral 3, InternVL: models/llava.py and its siblings) or audio encoder
    (Granite Speech, Qwen2-Audio, Voxtral; Phi-4-multimodal: both); None for a text
    model, or when limit_mm_per_prompt allows none of its inputs (served on text, the
    encoder never built; Qwen-VL: neither images nor videos, which the same tower
    embeds)."""
    if text_only is None or not text_only.images:
        return None
    kind = encoder_class(hf_config)
    modality = "audio" if issubclass(processor_class(kind), AudioProcessor) else "image"
    if kind is Phi4MMVisionConfig and multimodal.takes("audio"):  # images and audio
        modality = "audio"
    if not (multimodal.takes(modality)
            or (takes_videos(hf_config) and multimodal.takes("video"))
            or (kind is Gemma4VisionConfig  # its videos and audio clips
                and (multimodal.takes("video") or multimodal.takes("audio")))):
        logger.info("limit_mm_per_prompt allows no %s: serving %s on text (its encoder is "
                    "not loaded)", modality, model)
        return None
    config = vision_config(hf_config)
    if isinstance(config, Phi4MMVisionConfig | Gemma4VisionConfig) \
            and not multimodal.takes("audio"):
        config = replace(config, audio=None)  # images (and Gemma 4's videos) only
    return config


def load_processor(path: str, config: Any, tokenizer: Any) -> MultimodalProcessor | None:
    """The processor of the checkpoint at `path` for its vision / audio `config`; None for
    no config (the model takes no multi_modal_data, or limit_mm_per_prompt allows none), or
    a checkpoint served on text without one (MultimodalProcessor.load)."""
    if config is None:
        return None
    return processor_class(type(config)).load(path, config, tokenizer)


def processor_class(config_class: type) -> type[MultimodalProcessor]:
    """PROCESSORS' entry for a vision / audio config class (or its nearest base's)."""
    kind = next((PROCESSORS[k] for k in config_class.__mro__ if k in PROCESSORS), None)
    if kind is None:
        raise ValueError(f"no multimodal processor for {config_class.__name__}")
    return kind


class MultimodalPrompts:
    """The engine's multi_modal_data handling: its model's processor (None: text only),
    limit_mm_per_prompt, and the base tokenizer the placeholders' texts come from."""

    def __init__(self, processor: MultimodalProcessor | None, config: MultiModalConfig,
                 tokenizer: Any) -> None:
        self.processor = processor
        self.config = config
        self.tokenizer = tokenizer

        if processor is not None and config.processor_kwargs:
            self.options(None)  # the engine's mm_processor_kwargs, checked at start-up
        elif config.processor_kwargs:
            logger.warning("mm_processor_kwargs %s unused: the model takes no "
                           "multi_modal_data here", config.processor_kwargs)

    def options(self, request: Any) -> dict[str, Any]:
        """A request's mm_processor_kwargs over the engine's (vLLM's precedence), checked
        against the processor's options: ValueError for a key it does not take."""
        if request is not None and not isinstance(request, dict):
            raise ValueError("mm_processor_kwargs must be a dict, got "
                             f"{type(request).__name__}")
        options = {**self.config.processor_kwargs, **(request or {})}
        if options and self.processor is not None:
            self.processor.check_options(options)
        return options

    @property
    def modalities(self) -> tuple[str, ...]:
        """What multi_modal_data may carry: the processor's modalities; () without one."""
        return self.processor.modalities if self.processor is not None else ()

    def placeholder(self, modality: str) -> str | None:
        """What a chat message puts where an item of `modality` goes; None when the model
        takes none."""
        return (self.processor.placeholder_text(modality, self.tokenizer)
                if self.processor is not None else None)

    @property
    def mistral_audio_rate(self) -> int | None:
        return (self.processor.mistral_audio_rate(self.tokenizer)
                if self.processor is not None else None)

    def data_keys(self, inputs: ImageInputs) -> list[str]:
        return self.processor.data_keys(inputs)

    def request_prompt(self, prompt: PromptType) -> PromptType:
        """The prompt as the engine reads it (Whisper's forms as one dict)."""
        return (self.processor.request_prompt(prompt, self.tokenizer)
                if self.processor is not None else prompt)

    def check_counts(self, prompt: dict[str, Any]) -> None:
        """limit_mm_per_prompt, per modality of the prompt's multi_modal_data."""
        if isinstance(data := prompt.get("multi_modal_data"), dict):
            for modality, items in data.items():
                self.config.check_count(modality, count_items(items, modality))

    def inputs(self, prompt: PromptType, ids: list[int], scheduler: SchedulerConfig
               ) -> tuple[list[int], ImageInputs | None]:
        """A prompt dict's multi_modal_data: the prompt with its placeholders expanded, and
        the items' inputs. ImageInputs processed already (the server's, with the expanded
        ids) are checked and taken as they are: no processing on the step loop."""
        data = prompt.get("multi_modal_data") if isinstance(prompt, dict) else None
        if not data:
            return ids, None
        options = self.options(prompt.get("mm_processor_kwargs"))
        self._check_modalities(data)
        given = self.processor.processed_inputs(data)
        if given is not None:  # (the server processed them under the request's options)
            self.processor.check(ids, given)
            images = own_copy(given)
        else:
            ids, images = self.processor.process(ids, data, options)
        if images.bidirectional:
            check_bidirectional(images, scheduler)
        return ids, images

    def _check_modalities(self, data: Any) -> None:
        takes = self.modalities
        if isinstance(data, dict) and data and set(data) <= set(takes):
            return
        kinds = sorted(data) if isinstance(data, dict) else type(data).__name__
        if takes == ("audio",):
            raise ValueError(f"multi_modal_data: {kinds} is not supported; give "
                             "{'audio': a (waveform, sample_rate) tuple or a list of them}")
        raise ValueError(f"multi_modal_data: {kinds} is not supported; give "
                         "{'image': an image or a list of images}"
                         + (" and/or {'video': a video or a list of videos}"
                            if "video" in takes else ""))


def check_bidirectional(images: ImageInputs, scheduler: SchedulerConfig) -> None:
    """Gemma 3's images attend to their own tokens both ways, so each is prefilled within
    one chunk: it must fit the token budget."""
    longest = max((n for _, n in images.blocks()), default=0)
    if scheduler.enable_chunked_prefill and longest > scheduler.max_num_batched_tokens:
        raise ValueError(f"multi_modal_data: an image takes {longest} tokens, which are "
                         "prefilled in one step: max_num_batched_tokens "
                         f"({scheduler.max_num_batched_tokens}) must be at least that")


def default_mm_lora(prompt: PromptType, loras: dict[str, LoRARequest]
                    ) -> LoRARequest | None:
    """The default_mm_loras adapter of a prompt carrying that modality's data (its request
    named no adapter); as in vLLM, none when it carries several such."""
    data = prompt.get("multi_modal_data") if isinstance(prompt, dict) else None
    if not loras or not isinstance(data, dict):
        return None
    hits = [m for m in data if m in loras]
    return loras[hits[0]] if len(hits) == 1 else None


def count_items(items: Any, modality: str = "image") -> int:
    """How many images (or other items) a multi_modal_data entry holds: a list of them,
    the server's processed ImageInputs (its images; its videos count as "video"), or
    one; videos: engine/qwen_videos.py's count (a list of frames is one video)."""
    if isinstance(items, ImageInputs):
        return len(items.ranges) - len(items.videos) - len(items.audio) - sum(items.crops)
    if modality == "video":
        return count_videos(items)
    if modality == "audio" and is_clip(items):  # one (waveform, rate) tuple
        return 1
    return len(items) if isinstance(items, list | tuple) else 1


def own_copy(images: ImageInputs) -> ImageInputs:
    """Processed inputs given to a request, as its own: the tower's output it gets is
    never another request's (one that reused the object, perhaps under another adapter
    with LoRA on the tower), nor written back into the caller's object."""
    return replace(images, embeds=None)
