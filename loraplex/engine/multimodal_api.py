"""What the engine answers about multimodal inputs, for the server and LLM.chat: its
processor, the modalities multi_modal_data may carry, each modality's placeholder text
in a chat, Voxtral's clip rate, processed inputs' data keys, each the answer of
engine/multimodal_prompt.py's MultimodalPrompts (`mm_prompts`; no model's processor is
named here); and default_mm_loras, the adapters registered at start-up that an image
(audio) prompt naming no adapter runs on.

A mixin of LLMEngine (engine/llm_engine.py); it reads the engine's attributes named below.
"""

from __future__ import annotations

from collections.abc import Callable

from loraplex.config import ModelConfig, MultiModalConfig
from loraplex.engine.images import ImageInputs
from loraplex.engine.multimodal_processor import MultimodalProcessor
from loraplex.engine.multimodal_prompt import MultimodalPrompts
from loraplex.lora.request import LoRARequest

# default_mm_loras' lora_int_ids start here, past the ids users and the server give
DEFAULT_MM_LORA_IDS = 1 << 30


class MultimodalAPI:
    """LLMEngine's multimodal properties and its default_mm_loras."""

    model_config: ModelConfig
    multimodal: MultiModalConfig
    mm_prompts: MultimodalPrompts

    register_lora: Callable[..., bool]  # engine/lora_admin.py's

    def _default_mm_loras(self) -> dict[str, LoRARequest]:
        """default_mm_loras as registered adapters, named by their modality; their ids
        are vLLM's (the modality's place in sorted order + 1) moved past any id a user
        or the server picks (DEFAULT_MM_LORA_IDS), so they never collide."""
        asked = self.multimodal.default_loras
        for modality in asked:
            if modality not in self.modalities:
                raise ValueError(f"default_mm_loras: {self.model_config.name!r} takes no "
                                 f"{modality} inputs")
        loras = {m: LoRARequest(m, DEFAULT_MM_LORA_IDS + i, asked[m])
                 for i, m in enumerate(sorted(asked), start=1)}
        for req in loras.values():
            self.register_lora(req, fetch_hub=True)
        return loras

    @property
    def image_processor(self) -> MultimodalProcessor | None:
        """The model's processor of multi_modal_data (engine/multimodal_processor.py); None
        when it takes none."""
        return self.mm_prompts.processor

    @property
    def modalities(self) -> tuple[str, ...]:
        """What multi_modal_data may carry here (images, Qwen-VL's videos, audio)."""
        return self.mm_prompts.modalities

    @property
    def image_placeholder(self) -> str | None:
        """The image token's text (LLaVA's `<image>`); None: the model takes no images."""
        return self.mm_prompts.placeholder("image")

    @property
    def video_placeholder(self) -> str | None:
        """The video token's text (`<|video_pad|>`); None: the model takes no videos."""
        return self.mm_prompts.placeholder("video")

    @property
    def audio_placeholder(self) -> str | None:
        """What a chat puts where a clip goes (Granite Speech's `<|audio|>`; Qwen2-Audio's
        `Audio {i}: <|audio_bos|><|AUDIO|><|audio_eos|>`, {i} the clip's number in the
        conversation); None: the model takes no audio, or not in a chat (Whisper)."""
        return self.mm_prompts.placeholder("audio")

    @property
    def mistral_audio_rate(self) -> int | None:
        """Voxtral under tokenizer_mode "mistral": the rate its chat clips go to
        mistral_common at (entrypoints/chat_images.py); None otherwise."""
        return self.mm_prompts.mistral_audio_rate

    def data_keys(self, inputs: ImageInputs) -> list[str]:
        """multi_modal_data's keys for processed inputs (default_mm_loras go by them)."""
        return self.mm_prompts.data_keys(inputs)

