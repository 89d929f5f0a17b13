"""Custom logits processors for the tests, written as vLLM users write them (only the
import path changed); importable by name, so the server can load them too."""

from __future__ import annotations

import torch

from loraplex.config import VllmConfig
from loraplex.v1.sample.logits_processor import (
    AdapterLogitsProcessor,
    BatchUpdate,
    LogitsProcessor,
    process_dict_updates,
)

VOCAB = 512  # the tiny models'


class DummyLogitsProcessor(LogitsProcessor):
    """vLLM's test DummyLogitsProcessor: extra_args={"target_token": t} keeps only t."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        target = (sampling_params.extra_args or {}).get("target_token")
        if target is not None and (not isinstance(target, int) or not 0 <= target < VOCAB):
            raise ValueError(f"target_token must be a token id, got {target!r}")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.req_info: dict[int, int] = {}
        self.max_num_seqs = vllm_config.scheduler_config.max_num_seqs  # as vLLM's read it

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(
            self.req_info, batch_update,
            lambda params, _, __: (params.extra_args or {}).get("target_token"))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.req_info:
            return logits
        rows = torch.tensor(list(self.req_info), dtype=torch.long, device=logits.device)
        cols = torch.tensor(list(self.req_info.values()), dtype=torch.long,
                            device=logits.device)
        keep = logits[rows, cols].clone()
        logits[rows] = float("-inf")
        logits[rows, cols] = keep
        return logits


class CountingProcessor(LogitsProcessor):
    """Tracks every row (its prompt and live output list) and checks the batch's indices
    each step; rows with extra_args={"count": True} get token k = (prompt[-1] + 1 + k) %
    VOCAB, from its own recorded state, so a row mixed up with another shows."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, tuple[list[int], list[int], bool]] = {}
        self.batch_size = 0
        self.seen_moves = 0
        self.seen_removals = 0

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            for index, params, prompt, output in batch_update.added:
                self.rows[index] = (prompt, output, bool((params.extra_args or {})
                                                         .get("count")))
            for index in batch_update.removed:
                del self.rows[index]
            for a, b, _ in batch_update.moved:
                self.rows[b] = self.rows.pop(a)
            self.seen_moves += len(batch_update.moved)
            self.seen_removals += len(batch_update.removed)
            self.batch_size = batch_update.batch_size
        assert sorted(self.rows) == list(range(self.batch_size)), (self.rows, self.batch_size)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        assert logits.shape[0] == self.batch_size
        for index, (prompt, output, on) in self.rows.items():
            if on:
                target = (prompt[-1] + 1 + len(output)) % VOCAB
                logits[index] = float("-inf")
                logits[index, target] = 0.0
        return logits


def counted(prompt: list[int], n: int) -> list[int]:
    """The tokens CountingProcessor forces after `prompt`."""
    return [(prompt[-1] + 1 + k) % VOCAB for k in range(n)]


class OnlyTokenForRandomRows(LogitsProcessor):
    """Claims argmax invariance (it is not): so it runs after temperature, where only
    random rows' sampling sees it; extra_args={"only": t}."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.only: dict[int, int] = {}

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.only, batch_update,
                             lambda params, _, __: (params.extra_args or {}).get("only"))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, t in self.only.items():
            keep = logits[index, t].clone()
            logits[index] = float("-inf")
            logits[index, t] = keep
        return logits


class RepeatPromptStart(AdapterLogitsProcessor):
    """Per-request callables: extra_args={"repeat": "first"} forces the prompt's first
    token (fn(prompt_ids, output_ids, row)); {"repeat": "last_output"} after the first
    token forces the last output token again (fn(output_ids, row))."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device,
                 is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        self.max_model_len = vllm_config.model_config.max_model_len  # as vLLM's example

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params):
        mode = (params.extra_args or {}).get("repeat")
        if mode == "first":
            def first(prompt_ids, output_ids, row):
                row = torch.full_like(row, float("-inf"))  # a new tensor: written back
                row[prompt_ids[0]] = 0.0
                return row
            return first
        if mode == "last_output":
            def last(output_ids, row):
                if output_ids:
                    t = output_ids[-1]
                    row.fill_(float("-inf"))  # in place
                    row[t] = 0.0
                return row
            return last
        return None


class NotAProcessor:
    pass
