"""What a request is checked for before it is queued: a clear ValueError for what the
engine cannot do, rather than a silent default or a failure mid-step (vLLM's rules and
words where it has them)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from loraplex.inputs import PromptType
from loraplex.pooling_params import PoolingParams
from loraplex.sampling_params import SamplingParams

# vLLM's prompt-dict keys beyond prompt / prompt_token_ids that the engine accepts:
# cache_salt (prefix-cache isolation); multi_modal_data {"image": ...} on a model that takes
# images (and Qwen-VL videos), else only while empty, as multi_modal_uuids; mm_processor_kwargs
# (the options of the model's processor for its multi_modal_data, over the engine's: a key
# it does not take is refused, engine/multimodal_prompt.py). Any other key (prompt_embeds,
# token_type_ids, a typo) is refused: it would be silently ignored otherwise.
PROMPT_KEYS = {"prompt", "prompt_token_ids", "prompt_embeds", "cache_salt", "mm_processor_kwargs",
               "multi_modal_data", "multi_modal_uuids"}


def check_runner(runner: str, params: SamplingParams | PoolingParams) -> None:
    """A generate runner takes SamplingParams, a pooling runner PoolingParams (vLLM
    refuses the other kind as clearly)."""
    if runner == "pooling" and not isinstance(params, PoolingParams):
        raise ValueError("generation is only supported for generative models: this "
                         "engine runs runner='pooling' (use LLM.embed / /v1/embeddings, "
                         "or start it with runner='generate')")
    if runner == "generate" and isinstance(params, PoolingParams):
        raise ValueError("embeddings are only supported for pooling models: start the "
                         "engine with runner='pooling' (vLLM's task='embed')")


def check_prompt(ids: list[int], vocab: int, max_model_len: int) -> None:
    if not ids:
        raise ValueError("the prompt is empty")
    check_token_ids("prompt", ids, vocab)
    if len(ids) >= max_model_len:
        raise ValueError(f"the prompt has {len(ids)} tokens, but max_model_len is "
                         f"{max_model_len}: shorten the prompt or raise max_model_len")


def check_token_ids(field: str, ids: Iterable[int], vocab: int) -> None:
    """Ids inside the vocabulary (the base's, plus the tokens the request's adapter
    adds); the error names the request's field first."""
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"{field} token id {bad[0]} is out of range [0, {vocab})")


def check_logprobs(params: SamplingParams, limit: int) -> None:
    """logprobs / prompt_logprobs within the engine's max_logprobs (-1: no limit)."""
    for name in ("logprobs", "prompt_logprobs"):
        n = getattr(params, name)
        if n is not None and limit >= 0 and n > limit:
            raise ValueError(f"{name} must be <= max_logprobs ({limit}), got {n}: start "
                             "the engine with a larger max_logprobs (-1: no limit)")


def check_prompt_keys(prompt: dict[str, Any], model: str, takes_images: bool) -> None:
    """Refuse what a prompt dict asks for that this engine cannot do (vLLM refuses
    multimodal input for a text-only model too), rather than ignore it."""
    if prompt.get("multi_modal_data") and not takes_images:
        raise ValueError(f"multi_modal_data: multimodal inputs are not supported yet by "
                         f"model {model!r}: it has no vision tower (image inputs are "
                         "served on LLaVA, Gemma 3, Llama 4, Qwen-VL and Mistral 3 models) "
                         "and no audio encoder (audio inputs: Granite Speech, Qwen2-Audio)")
    if prompt.get("multi_modal_uuids"):
        raise ValueError("multi_modal_uuids: multimodal inputs are not supported yet with "
                         "uuids (images are hashed for the prefix cache)")
    unknown = sorted(set(prompt) - PROMPT_KEYS)
    if unknown:
        raise ValueError(f"prompt key(s) {', '.join(map(repr, unknown))} are not supported "
                         "yet: a prompt dict takes 'prompt' or 'prompt_token_ids', and "
                         "'cache_salt'")


def cache_salt(prompt: PromptType) -> bytes:
    """A prompt dict's cache_salt (vLLM's): requests share cached prefixes only with
    requests of the same salt, so one tenant cannot time another's prompts."""
    salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    if salt is None:
        return b""
    if not isinstance(salt, str) or not salt:
        raise ValueError("cache_salt must be a non-empty string")
    return salt.encode()


def bad_words_token_ids(words: list[str] | None, tokenizer: Any) -> list[list[int]]:
    """vLLM's rule: each word as the tokenizer encodes it alone and after a space (the
    second only when it is another token sequence of the same length)."""
    out: list[list[int]] = []
    for word in words or []:
        alone = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        out.append(alone)
        if spaced and spaced[0] != alone[0] and len(spaced) == len(alone):
            out.append(spaced)
    return out
