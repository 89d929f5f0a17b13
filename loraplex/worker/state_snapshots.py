"""Prefix caching for hybrid models: copies of a sequence's whole recurrent state at block
boundaries of its tokens, so a later sequence with that prefix starts there.

A cached prefix of K/V blocks is not enough for a model whose Mamba2 / Mamba-1 mixers,
short convolutions or DeltaNets carry a per-sequence state (worker/mamba_state.py): the
state after the prefix must exist too. When a prefill chunk or a decode step ends on a
block boundary, every state layer's tensors of the sequence's slot are copied into one
entry of this pool, keyed by the prefix hash the block manager registers for the block
that ends there (engine/block_manager.py: tokens, adapter registration, cache_salt,
images). A sequence admitted after a cached prefix starts from the entry of the prefix's
last block: the entry is copied into its new slot and its first chunk continues from it.
The decode steps' snapshots (vLLM's mamba_cache_mode="align") are what a chat's next turn
hits: its prompt is this turn's prompt, the reply and a new message, so it starts after
the reply's last full block instead of recomputing the reply.

A fixed number of entries, each one state slot's size, preallocated out of the KV cache's
budget (ModelRunner._num_kv_blocks); the least recently used entry is overwritten when a
new snapshot needs room. An evicted snapshot only shortens later hits (the block manager
looks for the longest cached prefix whose last block still has one). A generating
sequence takes a snapshot every block_size tokens; each one supersedes the sequence's
previous one past its prompt (`save(..., supersedes=)`), which moves to the LRU end of
the pool, first to be overwritten. So a long generation holds one entry of a full pool
and never flushes other prompts' snapshots, while the superseded ones stay as long as the
pool has room nobody else wants (a preempted sequence's recompute, or a request that
shares the reply only up to some block, can still hit them). Dropping them outright
would waste that room; keeping them as ordinary LRU entries would let one long
generation evict everyone's prompt snapshots.

Every copy is device to device on the step's stream, by slot numbers the host already
knows: no host sync.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from loraplex.worker.mamba_state import StateMixer


class StateSnapshots:
    def __init__(self, mixers: list[StateMixer], num_entries: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        # (layer, its state's attribute name, [entries, *shape] copies)
        self._tensors = [(mixer, name, torch.zeros(num_entries, *shape, dtype=dtype,
                                                   device=device))
                         for mixer in mixers
                         for name, shape in mixer.slot_state_shapes().items()]
        self.num_entries = num_entries
        self._entry: OrderedDict[bytes, int] = OrderedDict()  # key -> entry, LRU first
        self._free = list(range(num_entries - 1, -1, -1))
        self.num_loaded = 0  # snapshots copied into a sequence's slot

    def __contains__(self, key: bytes) -> bool:
        return key in self._entry

    def __len__(self) -> int:
        return len(self._entry)

    def save(self, key: bytes, slot: int, supersedes: bytes | None = None) -> None:
        """Keep state slot `slot` as the state after the prefix `key`. A key already held
        is only marked recently used: the same prefix under the same weights has the same
        state. `supersedes`: the same sequence's previous snapshot past its prompt, moved
        to the LRU end (the first entry overwritten when the pool is full)."""
        if supersedes in self._entry:  # (the key itself: moved back to the end below)
            self._entry.move_to_end(supersedes, last=False)
        if key in self._entry:
            self._entry.move_to_end(key)
            return
        if not self.num_entries:
            return
        entry = self._free.pop() if self._free else self._entry.popitem(last=False)[1]
        for mixer, name, copies in self._tensors:
            copies[entry].copy_(getattr(mixer, name)[slot])
        self._entry[key] = entry

    def load(self, key: bytes, slot: int) -> None:
        """Copy the state after prefix `key` into state slot `slot`."""
        entry = self._entry.get(key)
        if entry is None:
            raise RuntimeError("a sequence starts after a cached prefix whose state "
                               "snapshot is gone (the block manager admitted it without one)")
        self._entry.move_to_end(key)
        for mixer, name, copies in self._tensors:
            getattr(mixer, name)[slot].copy_(copies[entry])
        self.num_loaded += 1

    def clear(self) -> None:
        """Forget every snapshot (reset_prefix_cache)."""
        self._entry.clear()
        self._free = list(range(self.num_entries - 1, -1, -1))
