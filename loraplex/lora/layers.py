"""LoRA-wrapped linear layers: the base projection plus per-slot adapter weights.

    y = W x  +  B[s] (A[s] x)          s = the token's adapter slot (-1: base only)

Weights live in preallocated slot buffers (vLLM's `lora_a_stacked` / `lora_b_stacked`):
A for all packed sub-projections stacked along the rank axis, one B per sub-projection.
Smaller ranks are zero-padded to `max_lora_rank`; an empty slot is all zeros.
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex.layers.linear import Linear
from loraplex.lora import ops
from loraplex.worker.context import get_context


class LinearWithLoRA(nn.Module):
    def __init__(self, base_layer: Linear, max_loras: int, max_rank: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.output_sizes = base_layer.output_sizes
        self.max_rank = max_rank
        device = base_layer.weight.device
        n = len(self.output_sizes)
        # A of every sub-projection, stacked on the rank axis: [S, n * R, in]
        self.register_buffer("lora_a_stacked", torch.zeros(
            max_loras, n * max_rank, base_layer.in_features, dtype=dtype, device=device),
            persistent=False)
        # one B per sub-projection: [S, out_k, R]
        self.lora_b_stacked = [torch.zeros(max_loras, out, max_rank, dtype=dtype, device=device)
                               for out in self.output_sizes]
        self.slot_has_lora = [False] * max_loras  # host-side: skip the op when no slot needs it

    def set_lora(self, slot: int, lora_a: list[torch.Tensor | None],
                 lora_b: list[torch.Tensor | None]) -> None:
        """Copy one adapter into `slot`; a None sub-projection stays zero."""
        self.reset_lora(slot)
        r = self.max_rank
        for k, (a, b) in enumerate(zip(lora_a, lora_b, strict=True)):
            if a is None:
                continue
            rank = a.shape[0]
            self.lora_a_stacked[slot, k * r:k * r + rank].copy_(a, non_blocking=True)
            self.lora_b_stacked[k][slot, :, :rank].copy_(b, non_blocking=True)
        self.slot_has_lora[slot] = any(a is not None for a in lora_a)

    def reset_lora(self, slot: int) -> None:
        self.lora_a_stacked[slot].zero_()
        for b in self.lora_b_stacked:
            b[slot].zero_()
        self.slot_has_lora[slot] = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        meta = get_context().lora_meta
        if meta is None or not any(self.slot_has_lora[s] for s in meta.active_slot_list):
            return y
        ops.add_lora(y, x, self.lora_a_stacked, self.lora_b_stacked, meta,
                     self.output_sizes, self.max_rank)
        return y
