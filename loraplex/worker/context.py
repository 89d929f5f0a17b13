"""Per-step batch metadata, read by attention and LoRA layers.

The model's forward takes only `(input_ids, positions)`; what else a layer needs for
this step (where to write K/V, how sequences are laid out, which adapter each token
uses) sits in a `StepContext` set for exactly the duration of one forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from loraplex.lora.meta import LoRABatchMeta

if TYPE_CHECKING:
    from loraplex.layers.mamba2 import MambaBatch
    from loraplex.models.whisper import CrossBatch


@dataclass
class StepContext:
    is_prefill: bool
    slot_mapping: torch.Tensor  # [T] long: flat KV-cache slot of each token's K/V; -1 = skip
    attn_backend: str = "torch"  # "torch" | "triton" (layers/attention.py)
    # per sequence, both phases
    block_tables: torch.Tensor | None = None  # [B, >= max_blocks] int32 (extra columns unread)
    # decode: tokens in the cache including this step's; prefill: tokens already cached
    # before this step (None = none, every sequence starts at position 0)
    context_lens: torch.Tensor | None = None  # [B] int32
    max_context_len: int = 0  # host-side upper bound of context_lens
    # prefill: the step's tokens of sequence b are rows cu_seqlens_q[b]:cu_seqlens_q[b+1]
    cu_seqlens_q: torch.Tensor | None = None  # [B + 1] int32
    max_seqlen_q: int = 0
    decode_splits: int = 1  # triton decode: context splits per sequence (flash-decoding)
    # torch decode path: keep the batch's K/V contiguous across steps (layers/attention.py
    # DecodeMirror), per group of rows (start, end, capacity); [] = gather every step
    mirror_groups: list[tuple[int, int, int]] = field(default_factory=list)
    mirror_rebuild: bool = True
    # torch decode path: rows [start, end) attend over the first `width` positions (rows
    # longest context first; None = one group, the whole batch at max_context_len)
    decode_groups: list[tuple[int, int, int]] | None = None
    # torch prefill path: tokens of sequence b sit at flat rows padded_index[b, :len_b]
    padded_index: torch.Tensor | None = None  # [B, L] long (pads point at row 0)
    # [B, 1, L, L or cached width] bool, causal & valid; None = all equal length, no context
    prefill_mask: torch.Tensor | None = None
    # torch prefill: positions of the padded queries [B or 1, L] and of the keys [width]
    prefill_positions: tuple[torch.Tensor, torch.Tensor] | None = None
    valid_rows: torch.Tensor | None = None  # [T] positions in the flattened [B*L] layout
    # triton prefill with Gemma 3's images: each prefill row's last visible key among its
    # sequence's step rows (layers/attention.py image_key_limits); None = causal
    key_limit: torch.Tensor | None = None  # [T] int32
    lora_meta: LoRABatchMeta | None = None
    scratch: dict[str, torch.Tensor] = field(default_factory=dict)  # per-step reusable buffers
    # a mixed step: this context describes its prefill rows, `decode` its last rows (one
    # per decoding sequence); slot_mapping and lora_meta cover all rows
    decode: StepContext | None = None
    # Whisper (models/whisper.py): each request's rows and its encoder K/V for
    # cross-attention; None elsewhere
    cross: CrossBatch | None = None
    # a hybrid model (layers/mamba2.py): each sequence's rows and its Mamba state slot
    mamba: MambaBatch | None = None


class DecodeBuffers:
    """Decode inputs and metadata in tensors preallocated for the largest batch and filled
    in place every step, so a CUDA graph captured at batch size n replays over new values:
    its inputs are the first n rows of the same storage. Rows past the real batch are
    padding: token 0 at position 0, slot -1 (no cache write), context length 0 (attention
    output 0). Values go host -> pinned staging -> device without waiting for the device."""

    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int, device: torch.device) -> None:
        self.input_ids = torch.zeros(max_num_seqs, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_num_seqs, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_num_seqs,), -1, dtype=torch.long, device=device)
        self.context_lens = torch.zeros(max_num_seqs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_num_seqs, max_blocks_per_seq, dtype=torch.int32,
                                        device=device)

    def _copy(self, dst: torch.Tensor, values: list, pad: int = 0, pad_value: int = 0) -> None:
        host = torch.tensor(values + [pad_value] * pad, dtype=dst.dtype, pin_memory=dst.is_cuda)
        dst.copy_(host, non_blocking=True)

    def _rows(self, n: int, padded_batch: int | None) -> int:
        rows = n if padded_batch is None else padded_batch
        if not n <= rows <= self.slot_mapping.shape[0]:
            raise ValueError(f"decode batch {n} padded to {rows} does not fit the buffers "
                             f"of {self.slot_mapping.shape[0]} rows")
        return rows

    def fill_tokens(self, input_ids: list[int], positions: list[int],
                    padded_batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one step's tokens and positions; returns views of padded_batch rows."""
        n = len(input_ids)
        rows = self._rows(n, padded_batch)
        self._copy(self.input_ids[:rows], input_ids, rows - n)
        self._copy(self.positions[:rows], positions, rows - n)
        return self.input_ids[:rows], self.positions[:rows]

    def fill(self, slots: list[int], context_lens: list[int], block_tables: list[list[int]],
             padded_batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write one step's values; returns views (slot_mapping, context_lens, block_tables)
        of padded_batch rows (default: the real batch), tables cut to the longest one
        (the rows keep the full row stride, so a graph's view of them stays valid)."""
        n = len(slots)
        width = max(len(t) for t in block_tables)
        if width > self.block_tables.shape[1] or n > self.slot_mapping.shape[0]:
            raise ValueError(f"decode batch {n} x {width} blocks exceeds the buffers "
                             f"{tuple(self.block_tables.shape)}")
        rows = self._rows(n, padded_batch)
        self._copy(self.slot_mapping[:rows], slots, rows - n, -1)
        self._copy(self.context_lens[:rows], context_lens, rows - n)
        tables = [t + [0] * (width - len(t)) for t in block_tables]
        self.block_tables[:n, :width].copy_(
            torch.tensor(tables, dtype=torch.int32, pin_memory=self.block_tables.is_cuda),
            non_blocking=True)
        return self.slot_mapping[:rows], self.context_lens[:rows], self.block_tables[:rows, :width]


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
