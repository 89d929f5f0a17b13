"""LoRA-wrapped linear layers: the base projection plus per-slot adapter weights.

    y = W x  +  B[s] (A[s] x)          s = the token's adapter slot (-1: base only)

Weights live in preallocated slot buffers (vLLM's `lora_a_stacked` / `lora_b_stacked`),
one A per packed sub-projection and their B's stacked like the base weight's rows.
Smaller ranks are zero-padded to `max_lora_rank`; `lora_ranks` holds each slot's real
rank so the ops skip the padding; an empty slot is all zeros with rank 0.
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
        n, d_in, d_out = len(self.output_sizes), base_layer.in_features, base_layer.out_features
        # A of every sub-projection, rank-major so a slot's first r ranks are one block:
        # [S, R, n, in]; B of all of them, stacked on the output axis like the base
        # weight: [S, sum(out_k), R]
        self.register_buffer("lora_a_stacked", torch.zeros(
            max_loras, max_rank, n, d_in, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lora_b_stacked", torch.zeros(
            max_loras, d_out, max_rank, dtype=dtype, device=device), persistent=False)
        # the real rank in each slot (0 = no weights here); kernels loop over it, not over R
        self.register_buffer("lora_ranks", torch.zeros(max_loras, dtype=torch.int32,
                                                       device=device), persistent=False)
        self.slot_ranks = [0] * max_loras  # host copy: skip the op when no active slot has weights

    def set_lora(self, slot: int, lora_a: list[torch.Tensor | None],
                 lora_b: list[torch.Tensor | None]) -> None:
        """Copy one adapter into `slot`; a None sub-projection stays zero."""
        self.reset_lora(slot)
        col = 0
        for k, (a, b, out) in enumerate(zip(lora_a, lora_b, self.output_sizes, strict=True)):
            if a is not None:
                rank = a.shape[0]
                self.lora_a_stacked[slot, :rank, k].copy_(a, non_blocking=True)
                self.lora_b_stacked[slot, col:col + out, :rank].copy_(b, non_blocking=True)
                self.slot_ranks[slot] = max(self.slot_ranks[slot], rank)
            col += out
        self.lora_ranks[slot] = self.slot_ranks[slot]

    def reset_lora(self, slot: int) -> None:
        self.lora_a_stacked[slot].zero_()
        self.lora_b_stacked[slot].zero_()
        self.lora_ranks[slot] = self.slot_ranks[slot] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        meta = get_context().lora_meta
        if meta is None or (meta.skip_unused_layers
                            and not any(self.slot_ranks[s] for s in meta.active_slot_list)):
            return y
        ops.add_lora(y, x, self.lora_a_stacked, self.lora_b_stacked, self.lora_ranks, meta,
                     self.output_sizes)
        return y
