"""The prompt types of vLLM's `vllm.inputs`: a prompt is text, token ids, or one of these
dicts (what `LLM.generate`, `LLMEngine.add_request` and `AsyncLLMEngine.generate` take).

They are TypedDicts, so a plain dict with the same keys is the same prompt; the engine
refuses any other key (engine/prompt_checks.py), rather than ignore it.
"""

from __future__ import annotations

from typing import Any, TypedDict

import torch


class _PromptOptions(TypedDict, total=False):
    """What any prompt dict may add (all optional)."""

    # {"image": an image or a list of them}, on a model that takes images
    multi_modal_data: dict[str, Any]
    mm_processor_kwargs: dict[str, Any]
    multi_modal_uuids: dict[str, Any]
    cache_salt: str  # prefix-cache isolation: only equal salts share blocks


class TextPrompt(_PromptOptions):
    """Text, tokenized with the model's (or the request's adapter's) tokenizer."""

    prompt: str


class TokensPrompt(_PromptOptions):
    """Token ids, as they are (no special tokens added); a `prompt` given beside them is
    only reported back in the output."""

    prompt_token_ids: list[int]


class _EmbedsOptions(TypedDict, total=False):
    cache_salt: str


class EmbedsPrompt(_EmbedsOptions):
    """The prompt's embeddings [length, hidden] in place of its tokens, on an engine
    started with enable_prompt_embeds (engine/prompt_embeds.py)."""

    prompt_embeds: torch.Tensor


PromptType = str | list[int] | TextPrompt | TokensPrompt | EmbedsPrompt | dict[str, Any]
