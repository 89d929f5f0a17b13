"""vLLM's helpers for per-request processors: process_dict_updates, AdapterLogitsProcessor.

(vLLM's builtin min_p / logit_bias / min_tokens processors are the Sampler's own steps
here, layers/sampler.py.)
"""

from __future__ import annotations

import inspect
from abc import abstractmethod
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from loraplex.v1.sample.logits_processor.interface import (
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
)

if TYPE_CHECKING:
    import torch

    from loraplex.config import EngineConfig
    from loraplex.sampling_params import SamplingParams

T = TypeVar("T")
# fn(output_ids, logits_row) or fn(prompt_ids, output_ids, logits_row) -> logits_row
RequestLogitsProcessor = Callable[..., "torch.Tensor"]


def process_dict_updates(
        req_entries: dict[int, T], batch_update: BatchUpdate | None,
        new_state: Callable[[SamplingParams, list[int] | None, list[int]], T | None]) -> bool:
    """Keep a {row index: state} dict in step with the batch: added rows get
    new_state(...) (None: no entry), removed rows lose theirs, moved rows carry it.
    Returns whether the dict changed."""
    if not batch_update:
        return False
    updated = False
    for index, params, prompt_ids, output_ids in batch_update.added:
        state = new_state(params, prompt_ids, output_ids)
        if state is not None:
            req_entries[index] = state
            updated = True
        elif req_entries.pop(index, None) is not None:
            updated = True
    if not req_entries:
        return updated
    for index in batch_update.removed:
        if req_entries.pop(index, None) is not None:
            updated = True
    for a, b, direction in batch_update.moved:
        a_entry, b_entry = req_entries.pop(a, None), req_entries.pop(b, None)
        if a_entry is not None:
            req_entries[b] = a_entry
            updated = True
        if b_entry is not None:
            updated = True
            if direction == MoveDirectionality.SWAP:
                req_entries[a] = b_entry
    return updated


class AdapterLogitsProcessor(LogitsProcessor):
    """Runs per-request callables (the older per-request processor style) as a batch
    processor: subclasses say, per request, which callable (or None) applies to its row."""

    def __init__(self, vllm_config: EngineConfig, device: torch.device,
                 is_pin_memory: bool) -> None:
        self.req_info: dict[int, partial] = {}

    @abstractmethod
    def new_req_logits_processor(self, params: SamplingParams
                                 ) -> RequestLogitsProcessor | None:
        """The request's callable, or None when this processor leaves it alone."""
        raise NotImplementedError

    def _new_state(self, params: SamplingParams, prompt_ids: list[int] | None,
                   output_ids: list[int]) -> partial | None:
        fn = self.new_req_logits_processor(params)
        if fn is None:
            return None
        takes_prompt = len(inspect.signature(fn).parameters) == 3
        return partial(fn, prompt_ids, output_ids) if takes_prompt else partial(fn, output_ids)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.req_info, batch_update, self._new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, fn in self.req_info.items():
            row = logits[index]
            new_row = fn(row)
            if new_row is not row:
                logits[index] = new_row
        return logits
