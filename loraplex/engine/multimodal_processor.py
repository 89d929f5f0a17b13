"""What a multimodal processor is to the engine: the one interface every model's processor
of multi_modal_data (images, videos, audio clips) gives, so that the engine asks it rather
than naming the model.

A processor takes the modalities it lists, turns a prompt's raw items into the prompt with
its placeholders expanded and one ImageInputs (`process`), checks inputs processed already
(the server's, `check`), and says which text a chat message puts where an item goes
(`placeholder_text`). The defaults fit a processor of one modality whose
`__call__(ids, items)` takes that modality's multi_modal_data entry; a processor of several
(Qwen-VL's images and videos, Phi-4-multimodal's images and clips) or with its own prompt
form (Whisper's) overrides what differs. engine/multimodal_prompt.py picks a model's
processor by its config class and runs a prompt's multi_modal_data through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loraplex.engine.images import ImageInputs
    from loraplex.inputs import PromptType


class MultimodalProcessor:
    """A model's processor of multi_modal_data (engine/images.py's ImageProcessor and its
    siblings subclass it)."""

    # the multi_modal_data keys it takes; the first is what its processed inputs go under
    modalities: tuple[str, ...] = ("image",)
    # the token a prompt puts where an item goes (None: the model has none, Whisper)
    placeholder: int | None
    config: Any  # the model's vision / audio config (models/)
    # the mm_processor_kwargs keys it takes (Gemma 3's pan-and-scan options); others refused
    option_keys: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: str, config: Any, tokenizer: Any) -> MultimodalProcessor | None:
        """The checkpoint's processor; None when the model is served on text without one
        (a Gemma 3 or Llama 4 checkpoint saved without its image processor files)."""
        return cls(path, config, tokenizer)

    def __call__(self, ids: list[int], data: Any) -> tuple[list[int], ImageInputs]:
        raise NotImplementedError

    def expand(self, ids: list[int], items: Any) -> list[int]:
        raise NotImplementedError

    def check(self, ids: list[int], inputs: ImageInputs) -> None:
        """Processed inputs given with a prompt (the server's) must be that prompt's:
        ValueError otherwise."""
        raise NotImplementedError

    def check_options(self, options: Mapping[str, Any]) -> None:
        """mm_processor_kwargs (the engine's and a request's, merged): ValueError for a key
        this processor does not take (or, where it takes some, a bad value)."""
        unknown = sorted(set(options) - set(self.option_keys))
        if unknown:
            takes = ", ".join(self.option_keys) or "none"
            raise ValueError(f"mm_processor_kwargs: {unknown[0]!r} is not an option of this "
                             f"model's processor (it takes: {takes})")

    def process(self, ids: list[int], data: Mapping[str, Any],
                options: Mapping[str, Any] | None = None) -> tuple[list[int], ImageInputs]:
        """A prompt's raw multi_modal_data (its keys within `modalities`): the prompt with
        its placeholders expanded, and its items' inputs. `options`: mm_processor_kwargs,
        checked (check_options): empty but for a processor with option_keys."""
        return self(ids, data[self.modalities[0]])

    def expanded(self, ids: list[int], data: Mapping[str, Any],
                 options: Mapping[str, Any] | None = None) -> list[int]:
        """The prompt with its placeholders expanded for multi_modal_data's raw items,
        without processing them (ValueError: they do not match): what the chat route's
        /tokenize and usage count."""
        return self.expand(ids, data[self.modalities[0]])

    def processed_inputs(self, data: Mapping[str, Any]) -> ImageInputs | None:
        """The ImageInputs processed already that multi_modal_data holds (the server puts
        one under each of data_keys), to be checked and taken as they are; None: raw
        items to process."""
        from loraplex.engine.images import ImageInputs  # (images.py imports this module)

        return next((v for v in data.values() if isinstance(v, ImageInputs)), None)

    def data_keys(self, inputs: ImageInputs) -> list[str]:
        """The multi_modal_data keys processed inputs go under (default_mm_loras go by
        them)."""
        return [self.modalities[0]]

    def placeholder_token(self, modality: str) -> int | None:
        """The token a prompt puts where an item of `modality` goes."""
        return self.placeholder

    def placeholder_text(self, modality: str, tokenizer: Any) -> str | None:
        """What a chat message puts where an item of `modality` goes (the placeholder
        token's text); None when the model takes no such items, or they have no place in
        the prompt (Whisper's audio goes to its encoder)."""
        token = self.placeholder_token(modality) if modality in self.modalities else None
        return None if token is None else tokenizer.convert_ids_to_tokens(token)

    def mistral_audio_rate(self, tokenizer: Any) -> int | None:
        """The rate a chat's clips go to mistral_common at, when it writes their
        placeholders itself (Voxtral under tokenizer_mode "mistral"); None otherwise."""
        return None

    def request_prompt(self, prompt: PromptType, tokenizer: Any) -> PromptType:
        """The prompt as the engine reads it: as given, but for a model with prompt forms
        of its own (Whisper's encoder / decoder prompts)."""
        return prompt
