"""Tokens an adapter adds to the vocabulary (vLLM's `lora_extra_vocab_size`).

An adapter trained after `tokenizer.add_tokens(...)` and `resize_token_embeddings` has n
rows past the base's vocabulary V in its embedding and its lm_head. Under adapter slot s,
added token V + i is

    embedding:   x = E[s, i]                  (its own row; the base table has none)
    logits:      z[V + i] = h . O[s, i]       (one more output column)

E and O are per-slot buffers [max_loras, extra_vocab_size, hidden], like the LoRA slots.
A step whose sampled rows include such an adapter gets logits of width
V + extra_vocab_size; the columns past a row's adapter's own n (all of them for a row
without an adapter) are -inf, so no other request can ever sample an added token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn


def rows_by_slot(row_slots: list[int], slots: Iterable[int], device: torch.device
                 ) -> Iterator[tuple[int, torch.Tensor]]:
    """(slot, the indices of the rows of `row_slots` under it) for each of `slots`."""
    for slot in slots:
        yield slot, torch.tensor([i for i, s in enumerate(row_slots) if s == slot],
                                 device=device)


class ExtraVocabSlots(nn.Module):
    def __init__(self, vocab_size: int, max_loras: int, extra_vocab_size: int, hidden: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.vocab_size, self.extra_vocab_size = vocab_size, extra_vocab_size
        shape = (max_loras, extra_vocab_size, hidden)
        self.register_buffer("input_embeddings", torch.zeros(shape, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("output_embeddings", torch.zeros(shape, dtype=dtype,
                                                              device=device), persistent=False)
        self.slot_sizes = [0] * max_loras  # added tokens of each slot's adapter (host)

    def set(self, slot: int, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        """One adapter's added tokens: E and O rows [n, hidden] into `slot`."""
        n, old = inputs.shape[0], self.slot_sizes[slot]
        if old > n:  # rows past n are never read; zeroed so a slot holds only its adapter
            self.input_embeddings[slot, n:old].zero_()
            self.output_embeddings[slot, n:old].zero_()
        self.input_embeddings[slot, :n].copy_(inputs, non_blocking=True)
        self.output_embeddings[slot, :n].copy_(outputs, non_blocking=True)
        self.slot_sizes[slot] = n

    def reset(self, slot: int) -> None:
        old = self.slot_sizes[slot]
        if old:
            self.input_embeddings[slot, :old].zero_()
            self.output_embeddings[slot, :old].zero_()
            self.slot_sizes[slot] = 0

    def slot_bytes(self) -> int:
        """Bytes of one slot (E and O), whatever the adapter's rank."""
        return 2 * self.input_embeddings[0].numel() * self.input_embeddings.element_size()

    def any_active(self, slots: Iterable[int]) -> bool:
        """Whether an adapter with added tokens holds one of these slots (-1: none)."""
        return any(self.slot_sizes[s] for s in set(slots) if s >= 0)

    def embed(self, input_ids: torch.Tensor, slots: torch.Tensor, y: torch.Tensor
              ) -> torch.Tensor:
        """`y` (the base embedding of the ids, the added ones clamped into the base's
        range) with every added token's row replaced by its slot's E row. No host sync
        and no data-dependent shape, so a CUDA graph can hold it."""
        extra = input_ids - self.vocab_size  # >= 0 for an added token
        rows = self.input_embeddings[slots.clamp(min=0), extra.clamp(0, self.extra_vocab_size - 1)]
        return torch.where((extra >= 0).unsqueeze(1), rows.to(y.dtype), y)

    def append_logits(self, hidden: torch.Tensor, row_slots: list[int], logits: torch.Tensor,
                      cap: Callable[[torch.Tensor], torch.Tensor] = lambda z: z
                      ) -> torch.Tensor:
        """[rows, V] -> [rows, V + extra_vocab_size]: each row's added-token logits,
        cap(h . O[s, i]) for i < its adapter's n (cap: what the model does to lm_head's
        output, as on the base columns: LlamaForCausalLM.final_logits), -inf elsewhere;
        one matmul per slot."""
        extra = logits.new_full((logits.shape[0], self.extra_vocab_size), float("-inf"))
        active = {s for s in row_slots if s >= 0 and self.slot_sizes[s]}
        for slot, rows in rows_by_slot(row_slots, active, hidden.device):
            n = self.slot_sizes[slot]
            z = hidden.index_select(0, rows) @ self.output_embeddings[slot, :n].T.to(hidden.dtype)
            extra[rows, :n] = cap(z).to(extra.dtype)
        return torch.cat([logits, extra], dim=1)
