"""Per-step batch metadata, read by attention and LoRA layers.

The model's forward takes only `(input_ids, positions)`; what else a layer needs for
this step (where to write K/V, how sequences are laid out, which adapter each token
uses) sits in a `StepContext` set for exactly the duration of one forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from loraplex.lora.meta import LoRABatchMeta


@dataclass
class StepContext:
    is_prefill: bool
    slot_mapping: torch.Tensor  # [T] flat KV-cache index each token's K/V is written to
    # prefill: tokens of sequence b sit at flat rows padded_index[b, :len_b]
    padded_index: torch.Tensor | None = None  # [B, L] long (pads point at row 0)
    prefill_mask: torch.Tensor | None = None  # [B, 1, L, L] bool, causal & valid; None = all equal len
    valid_rows: torch.Tensor | None = None  # [T] positions in the flattened [B*L] layout
    # decode: one token per sequence
    block_tables: torch.Tensor | None = None  # [B, max_blocks] long
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, max_blocks * block_size] bool
    lora_meta: LoRABatchMeta | None = None
    scratch: dict[str, torch.Tensor] = field(default_factory=dict)  # per-step reusable buffers


_current: StepContext | None = None


@contextmanager
def step_context(ctx: StepContext) -> Iterator[StepContext]:
    global _current
    if _current is not None:
        raise RuntimeError("nested step_context is not allowed")
    _current = ctx
    try:
        yield ctx
    finally:
        _current = None


def get_context() -> StepContext:
    if _current is None:
        raise RuntimeError("no step context: layers must run inside ModelRunner.run")
    return _current
