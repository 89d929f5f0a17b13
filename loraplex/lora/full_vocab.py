"""Fully trained embed_tokens / lm_head per adapter (PEFT's `modules_to_save`).

An adapter trained with modules_to_save=["embed_tokens", "lm_head"] ships whole copies of
those tables, trained; under its slot s they replace the base's:

    embedding:   x = E[s, t]                  instead of the base row (and its LoRA)
    logits:      z = cap(h . O[s])            instead of lm_head's output

E and O are per-slot buffers [max_loras, vocab, hidden]: a slot costs two vocabulary
tables, so this is off unless --enable-lora-modules-to-save. Rows of tokens an adapter
adds past the vocabulary stay in extra_vocab.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from loraplex.lora.extra_vocab import rows_by_slot

MODULES = ("embed_tokens", "lm_head")


class FullVocabSlots(nn.Module):
    def __init__(self, vocab_size: int, max_loras: int, hidden: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        shape = (max_loras, vocab_size, hidden)
        self.register_buffer("embed_tokens", torch.zeros(shape, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("lm_head", torch.zeros(shape, dtype=dtype, device=device),
                             persistent=False)
        # per module, the slots whose adapter replaces it (host); the embedding's also on
        # the device, indexed by slot (-1, the last entry: no adapter), for graphs
        self.slots: dict[str, set[int]] = {m: set() for m in MODULES}
        self.register_buffer("replaces_embedding", torch.zeros(
            max_loras + 1, dtype=torch.bool, device=device), persistent=False)

    def set(self, slot: int, tables: dict[str, torch.Tensor]) -> None:
        """One adapter's tables ({"embed_tokens" | "lm_head": [vocab, hidden]}) into
        `slot`; a module it does not replace is the base's there."""
        for module in MODULES:
            if module in tables:
                getattr(self, module)[slot].copy_(tables[module], non_blocking=True)
                self.slots[module].add(slot)
            else:
                self.slots[module].discard(slot)
        self.replaces_embedding[slot] = "embed_tokens" in tables

    def reset(self, slot: int) -> None:
        for module in MODULES:  # the rows are never read once the slot is off the set
            self.slots[module].discard(slot)
        self.replaces_embedding[slot] = False

    def slot_bytes(self) -> int:
        return 2 * self.embed_tokens[0].numel() * self.embed_tokens.element_size()

    def any_active(self, module: str, slots: Iterable[int]) -> bool:
        return not self.slots[module].isdisjoint(slots)

    def embed(self, input_ids: torch.Tensor, slots: torch.Tensor, y: torch.Tensor
              ) -> torch.Tensor:
        """`y` with the rows of tokens whose slot replaces the embedding taken from its
        table (ids past the vocabulary keep y's: extra_vocab's). No host sync."""
        use = self.replaces_embedding[slots] & (input_ids < self.vocab_size)
        rows = self.embed_tokens[slots.clamp(min=0), input_ids.clamp(0, self.vocab_size - 1)]
        return torch.where(use.unsqueeze(1), rows.to(y.dtype), y)

    def replace_logits(self, hidden: torch.Tensor, row_slots: list[int], logits: torch.Tensor,
                       cap: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """logits[:, :vocab] of each row whose slot replaces lm_head: cap(h . O[s]) (cap:
        what the model does to lm_head's output, LlamaForCausalLM.final_logits)."""
        for slot, rows in rows_by_slot(row_slots, self.slots["lm_head"].intersection(row_slots),
                                       hidden.device):
            z = hidden.index_select(0, rows) @ self.lm_head[slot].T.to(hidden.dtype)
            logits[rows, :self.vocab_size] = cap(z).to(logits.dtype)
        return logits
