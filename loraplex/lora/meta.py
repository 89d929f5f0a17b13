"""Per-step LoRA metadata: which slot each token uses, grouped for batched matmuls.

Tokens are grouped by adapter slot into a padded [G, Tmax] layout (G = distinct slots
in the step), so every LoRA op is one gather, one bmm and one scatter-add, whatever the
number of adapters: no Python loop over adapters on the hot path. Built once per step
and shared by every wrapped layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoRABatchMeta:
    num_tokens: int
    active_slot_list: list[int]  # distinct slots in this step, sorted (host copy for cheap checks)
    active_slots: torch.Tensor  # [G] long
    max_group_len: int  # Tmax
    gather_idx: torch.Tensor  # [G * Tmax] long: token row for each padded position (pads -> 0)
    scatter_pos: torch.Tensor  # [N] long: padded positions that hold a real token
    scatter_tok: torch.Tensor  # [N] long: the token row each of those positions came from

    @property
    def no_lora(self) -> bool:
        return not self.active_slot_list

    @classmethod
    def make(cls, token_lora_slots: list[int], device: torch.device) -> LoRABatchMeta:
        """token_lora_slots[i] = device slot of token i's adapter, or -1 for the base."""
        groups: dict[int, list[int]] = {}
        for tok, slot in enumerate(token_lora_slots):
            if slot >= 0:
                groups.setdefault(slot, []).append(tok)
        slots = sorted(groups)
        tmax = max((len(g) for g in groups.values()), default=0)
        gather, pos, toks = [], [], []
        for g, slot in enumerate(slots):
            rows = groups[slot]
            gather.extend(rows)
            gather.extend([0] * (tmax - len(rows)))
            pos.extend(range(g * tmax, g * tmax + len(rows)))
            toks.extend(rows)

        def as_tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(
            num_tokens=len(token_lora_slots),
            active_slot_list=slots,
            active_slots=as_tensor(slots),
            max_group_len=tmax,
            gather_idx=as_tensor(gather),
            scatter_pos=as_tensor(pos),
            scatter_tok=as_tensor(toks),
        )
