"""Paged KV cache bookkeeping: fixed-size blocks handed out to sequences and taken back.

A sequence's K/V for token position p lives in block `block_table[p // block_size]`,
offset `p % block_size`. Blocks come from one free list sized from the memory budget.
"""

from __future__ import annotations

from collections import deque

from loraplex.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def can_allocate(self, seq: Sequence) -> bool:
        return seq.num_blocks_needed(self.block_size) <= len(self.free_blocks)

    def allocate(self, seq: Sequence) -> None:
        """Blocks for every token of `seq` (prefill, or recompute after preemption)."""
        assert not seq.block_table, "sequence already holds blocks"
        for _ in range(seq.num_blocks_needed(self.block_size)):
            seq.block_table.append(self.free_blocks.popleft())

    def deallocate(self, seq: Sequence) -> None:
        self.free_blocks.extend(reversed(seq.block_table))
        seq.block_table.clear()

    def can_append(self, seq: Sequence) -> bool:
        """Decode writes the K/V of the last token; it may need one more block."""
        return len(seq.block_table) >= seq.num_blocks_needed(self.block_size) or bool(
            self.free_blocks)

    def may_append(self, seq: Sequence) -> None:
        if len(seq.block_table) < seq.num_blocks_needed(self.block_size):
            seq.block_table.append(self.free_blocks.popleft())
