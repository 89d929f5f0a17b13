"""One sequence being generated: its tokens, state, adapter and KV block table."""

from __future__ import annotations

import itertools
from enum import Enum, auto
from typing import Any

import torch

from loraplex.engine.images import ImageInputs
from loraplex.layers.pooler import PoolingState
from loraplex.outputs import Logprob
from loraplex.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


_counter = itertools.count()


class Sequence:
    """Prompt + generated tokens of one completion (a request with n > 1 has n of them)."""

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, lora_int_id: int = 0,
                 generator: torch.Generator | None = None, priority: int = 0) -> None:
        self.seq_id = next(_counter)  # counts up: arrival order
        self.request_id = request_id
        self.index = index  # which of the request's n completions
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        # the output so far as one list that grows in place: custom logits processors
        # keep a reference to it (output_token_ids is a fresh copy each time)
        self.live_output_token_ids: list[int] = []
        self.params = params
        self.lora_int_id = lora_int_id  # 0 = the base model
        self.generator = generator
        self.priority = priority  # the request's (lower first, under the priority policy)
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[dict[int, Logprob]] = []
        self.cumulative_logprob = 0.0
        self.num_preemptions = 0
        # structured outputs: where the output is in the request's grammar (an xgrammar
        # matcher, engine/structured_output.py); None = unconstrained
        self.grammar: Any = None
        # SamplingParams.bad_words in the request's tokenizer's ids (one list per variant)
        self.bad_words_token_ids: list[list[int]] = []
        # tokens whose K/V are in the cache; a step computes the next ones from here
        # (a chunk of the prompt, or the last token when decoding)
        self.num_computed_tokens = 0
        # prefix caching (engine/block_manager.py): which weights computed this sequence's
        # K/V (8 bytes: 0 = the base, else the adapter's registration) and the request's
        # own cache_salt, if any; the hashes of its full blocks, how many of its blocks
        # are registered, and the prompt tokens found cached
        self.cache_salt = bytes(8)
        self.block_hashes: list[bytes] = []
        self.num_committed_blocks = 0
        self.num_cached_tokens = 0
        # an image prompt's (LLaVA, Gemma 3): pixels, placeholder positions, hashes and (after the
        # first prefill step) the tower's embeddings; shared by the request's sequences
        self.images: ImageInputs | None = None
        # prompt_logprobs: entry i for prompt token i given the ones before (entry 0: None),
        # filled chunk by chunk; kept on the request's first completion only
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] if getattr(params, "prompt_logprobs", None) is not None and index == 0
            else None)
        # a pooling request (params: PoolingParams): its pooled hidden states so far; it
        # is prefill only, finished once its prompt is computed, and never decodes
        self.pooling: PoolingState | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_decoding(self) -> bool:
        """Every token but the last is in the cache: the next step computes one token
        (a prompt's last chunk of one token is the same computation). Never a pooling
        sequence's: its last token is a prefill chunk, whose hidden state it pools; nor a
        prompt's last token whose embedding is given (an image's, prompt_embeds): only
        the prefill path puts it in place of the token's."""
        if self.pooling is not None or self.num_computed_tokens != self.num_tokens - 1:
            return False
        last = self.num_tokens - 1
        return not (last < self.num_prompt_tokens and self.images is not None
                    and self.images.rows_in(last, last + 1)[0])

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked for and not all computed: the prompt's logits are needed
        (so no prefix may come from the cache)."""
        return self.prompt_logprobs is not None and \
            len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def num_blocks_needed(self, block_size: int) -> int:
        return (self.num_tokens + block_size - 1) // block_size

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.live_output_token_ids.append(token_id)
