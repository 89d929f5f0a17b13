"""The prompt types of vLLM's `vllm.inputs`: a prompt is text, token ids, or one of these
dicts (what `LLM.generate`, `LLMEngine.add_request` and `AsyncLLMEngine.generate` take).

They are TypedDicts, so a plain dict with the same keys is the same prompt; the engine
refuses any other key (llm_engine.py), rather than ignore it.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

import torch


class TextPrompt(TypedDict):
    """Text, tokenized with the model's (or the request's adapter's) tokenizer."""

    prompt: str
    # {"image": an image or a list of them}, on a model that takes images (LLaVA)
    multi_modal_data: NotRequired[dict[str, Any]]
    mm_processor_kwargs: NotRequired[dict[str, Any]]
    multi_modal_uuids: NotRequired[dict[str, Any]]
    cache_salt: NotRequired[str]  # prefix-cache isolation: only equal salts share blocks


class TokensPrompt(TypedDict):
    """Token ids, as they are (no special tokens added); `prompt`, if given, is only
    reported back in the output."""

    prompt_token_ids: list[int]
    prompt: NotRequired[str]
    multi_modal_data: NotRequired[dict[str, Any]]
    mm_processor_kwargs: NotRequired[dict[str, Any]]
    multi_modal_uuids: NotRequired[dict[str, Any]]
    cache_salt: NotRequired[str]


class EmbedsPrompt(TypedDict):
    """The prompt's embeddings [length, hidden] in place of its tokens, on an engine
    started with enable_prompt_embeds (engine/prompt_embeds.py)."""

    prompt_embeds: torch.Tensor
    cache_salt: NotRequired[str]


PromptType = str | list[int] | TextPrompt | TokensPrompt | EmbedsPrompt | dict[str, Any]
