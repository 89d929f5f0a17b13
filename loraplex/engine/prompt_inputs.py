"""A generate request's prompt as the engine takes it: a str, token ids or a prompt dict
(loraplex/inputs.py) into its text and token ids (`_tokenize`, with the request's
tokenizer: its adapter's own when the adapter adds tokens), or vLLM's prompt_embeds into
placeholder ids and their rows' embeddings (`_prompt_embeds`, engine/prompt_embeds.py).

A mixin of LLMEngine (engine/llm_engine.py); it reads the engine's attributes named below.
"""

from __future__ import annotations

from typing import Any

from loraplex.config import ModelConfig
from loraplex.engine.images import ImageInputs
from loraplex.engine.multimodal_processor import MultimodalProcessor
from loraplex.engine.multimodal_prompt import MultimodalPrompts
from loraplex.engine.prompt_checks import check_prompt_keys
from loraplex.engine.prompt_embeds import (
    NOT_ENABLED,
    PLACEHOLDER_ID,
    checked_prompt_embeds,
    prompt_embeds_inputs,
)
from loraplex.inputs import PromptType
from loraplex.sampling_params import SamplingParams


class PromptInputs:
    """LLMEngine's prompt forms into ids (or embeddings)."""

    model_config: ModelConfig
    model: Any
    mm_prompts: MultimodalPrompts
    image_processor: MultimodalProcessor | None  # engine/multimodal_api.py's

    def _tokenize(self, prompt: PromptType, tokenizer: Any) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            self.mm_prompts.check_counts(prompt)
            check_prompt_keys(prompt, self.model_config.name, self.image_processor is not None)
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self._tokenize(prompt["prompt"], tokenizer)
            if "prompt_embeds" in prompt:  # (generation takes them before this)
                raise ValueError("prompt_embeds: supported for generation, not pooling")
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, list | tuple) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"unsupported prompt type {type(prompt).__name__}: give a str, "
                         "a list of token ids or {'prompt_token_ids': [...]}")

    def _prompt_embeds(self, prompt: dict[str, Any], params: SamplingParams
                       ) -> tuple[list[int], ImageInputs]:
        """vLLM's EmbedsPrompt (engine/prompt_embeds.py): its placeholder ids and its
        rows' embeddings, truncated as truncate_prompt_tokens asks."""
        if not self.model_config.enable_prompt_embeds:
            raise ValueError(NOT_ENABLED)
        other = sorted(set(prompt) - {"prompt_embeds", "cache_salt"})
        if other:
            raise ValueError(f"a prompt with prompt_embeds takes only 'cache_salt' beside "
                             f"them, got {', '.join(map(repr, other))}")
        if params.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs: not available for prompt_embeds (the prompt "
                             "has no token ids to score)")
        a = self.model.args  # rows as wide as the embedding (OPT-350m's: before project_in)
        tensor = checked_prompt_embeds(prompt["prompt_embeds"],
                                       a.word_embed_proj_dim or a.hidden_size)
        mc = self.model_config
        tensor = params.truncate_prompt(tensor, mc.max_model_len)
        scale = self.model.model.given_embeds_scale(mc.dtype)  # as HF's model scales them
        return [PLACEHOLDER_ID] * tensor.shape[0], prompt_embeds_inputs(
            tensor * scale if scale != 1.0 else tensor, mc.device, mc.dtype)

