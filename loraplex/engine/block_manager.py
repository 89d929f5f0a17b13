"""Paged KV cache bookkeeping: fixed-size blocks handed out to sequences and taken back,
and shared between sequences with the same prefix (automatic prefix caching).

A sequence's K/V for token position p lives in block `block_table[p // block_size]`,
offset `p % block_size`. Blocks come from one free pool sized from the memory budget.

Prefix caching (vLLM's automatic prefix caching): once a block is full and its K/V are
computed, it is registered under a hash of its tokens, the hash of the block before it
(so the hash stands for the whole prefix) and the sequence's `cache_salt` (which adapter
weights computed the K/V: the same prompt under two adapters has different K/V; and
the request's own `cache_salt`, as in vLLM: only requests with the same salt share),
and the hashes of the images whose placeholders the block holds (vLLM's rule: the same
text with another image has other K/V from that block on; engine/images.py). A
new sequence whose first blocks' hashes are registered takes those blocks (reference
counted) and starts computing after them. A freed block keeps its contents and its hash
while it waits in the free pool, least recently freed first, so it can still be hit until
a new allocation takes it. At least the prompt's last token is always computed: it gives
the logits of the first output token.

A hybrid model (`states`: its Mamba state slots with their snapshot pool,
worker/state_snapshots.py) needs the recurrent state after the prefix as well: a prefill
chunk or a decode step that ends on a block boundary keeps a snapshot of the state under
that block's hash (`commit(..., state=True)`), a hit is cut to the longest cached prefix
whose last block has one, and prefill chunks are made to end where snapshots are wanted
(`state_chunk_len`; decode steps end on every boundary by themselves).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import TYPE_CHECKING

from loraplex.engine.sequence import Sequence

if TYPE_CHECKING:
    from loraplex.worker.mamba_state import MambaStateCache


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False,
                 states: MambaStateCache | None = None) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        # a hybrid's state slots and snapshots (None: no recurrent state, or caching off)
        self.states = states if enable_caching and states is not None \
            and states.snapshots is not None else None
        # free blocks, least recently freed first: allocation evicts from the front
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._refs = [0] * num_blocks
        self._cached: dict[bytes, int] = {}  # prefix hash -> block holding its K/V
        self._hash_of: dict[int, bytes] = {}  # the reverse, for eviction
        self.num_query_tokens = 0  # prompt tokens looked up at admission
        self.num_hit_tokens = 0  # of those, found in the cache

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    # ---- prefix caching --------------------------------------------------------------
    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Hashes of the first num_blocks full blocks (memoized on the sequence: a full
        block's tokens never change)."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else seq.cache_salt
            tokens = array("q", seq.token_ids[i * bs:(i + 1) * bs]).tobytes()
            images = seq.images.block_key(i * bs, (i + 1) * bs) if seq.images else b""
            hashes.append(hashlib.blake2b(parent + tokens + images, digest_size=16).digest())
        return hashes[:num_blocks]

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of `seq` (never its last token)."""
        if not self.enable_caching or seq.needs_prompt_logprobs or seq.pooling is not None:
            return []  # (prompt logprobs need every prompt position's logits; pooling,
            # every position's hidden state)
        hits, usable = [], 0
        for h in self._block_hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block = self._cached.get(h)
            if block is None:
                break
            hits.append(block)
            if self.states is None or h in self.states.snapshots:
                usable = len(hits)  # (a hybrid: the state after this block is kept too)
        return hits[:usable]

    def state_chunk_len(self, seq: Sequence, start: int, n: int) -> int:
        """A hybrid under prefix caching: how much of a prefill chunk of `n` tokens from
        `start` to take so that it ends where a state snapshot is wanted: never past the
        last block boundary before the sequence's last token (the longest prefix a request
        with these tokens can hit), and a chunk cut short by the token budget ends on a
        block boundary when one lies inside it."""
        if self.states is None:
            return n
        bs = self.block_size
        last = (seq.num_tokens - 1) // bs * bs
        if start < last < start + n:
            return last - start
        if start + n < seq.num_tokens and (start + n) // bs * bs > start:
            return (start + n) // bs * bs - start
        return n

    def num_cached_tokens(self, seq: Sequence) -> int:
        """Tokens of `seq` that allocate() would take from the cache now."""
        return len(self._prefix_hits(seq)) * self.block_size

    def commit(self, seq: Sequence, state: bool = False) -> None:
        """After a step: register the blocks that are now full and computed. `state`: the
        step was a prefill chunk or a decode step of `seq`, so a hybrid's state is at its
        computed tokens: when they end on a block boundary, its snapshot is kept under that
        block's hash. (Not after a verified draft: its state would be past the tokens
        accepted so far; hybrids take no drafts.)"""
        if not self.enable_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        if full <= seq.num_committed_blocks:
            return
        hashes = self._block_hashes(seq, full)
        for i in range(seq.num_committed_blocks, full):
            block = seq.block_table[i]
            if hashes[i] not in self._cached:  # else an identical block got there first
                self._cached[hashes[i]] = block
                self._hash_of[block] = hashes[i]
        seq.num_committed_blocks = full
        if state and self.states is not None and seq.num_computed_tokens == full * self.block_size:
            self.states.save_snapshot(seq, hashes[full - 1])

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (vLLM's reset_prefix_cache: after weights change
        under the same names, or to measure without the cache). As in vLLM, only while no
        sequence holds a block; False (nothing changed) otherwise."""
        if len(self._free) != self.num_blocks:
            return False
        self._cached.clear()
        self._hash_of.clear()
        if self.states is not None:
            self.states.snapshots.clear()
        return True

    # ---- allocation ------------------------------------------------------------------
    def _take(self) -> int:
        block, _ = self._free.popitem(last=False)
        h = self._hash_of.pop(block, None)
        if h is not None:
            del self._cached[h]  # evicted: its contents are about to be overwritten
        self._refs[block] = 1
        return block

    def can_allocate(self, seq: Sequence) -> bool:
        shared = sum(1 for b in self._prefix_hits(seq) if self._refs[b])  # cost no free block
        return seq.num_blocks_needed(self.block_size) - shared <= len(self._free)

    def allocate(self, seq: Sequence) -> None:
        """Blocks for every token of `seq` (prefill, or recompute after preemption): the
        cached prefix's shared, the rest fresh; the sequence starts computing after the
        cached prefix."""
        assert not seq.block_table, "sequence already holds blocks"
        hits = self._prefix_hits(seq)
        for block in hits:
            if not self._refs[block]:
                del self._free[block]
            self._refs[block] += 1
        fresh = [self._take() for _ in range(seq.num_blocks_needed(self.block_size) - len(hits))]
        seq.block_table = hits + fresh
        seq.num_committed_blocks = len(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        if self.enable_caching:
            self.num_query_tokens += seq.num_tokens
            self.num_hit_tokens += seq.num_computed_tokens
        if not seq.num_preemptions:  # what the request's output reports
            seq.num_cached_tokens = seq.num_computed_tokens

    def deallocate(self, seq: Sequence) -> None:
        """Release the sequence's blocks; the last block first in line for eviction."""
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            if not self._refs[block]:
                self._free[block] = None
        seq.block_table = []
        seq.num_committed_blocks = 0

    def can_append(self, seq: Sequence) -> bool:
        """Decode writes the K/V of the last token; it may need one more block."""
        return len(seq.block_table) >= seq.num_blocks_needed(self.block_size) or bool(
            self._free)

    def may_append(self, seq: Sequence) -> None:
        if len(seq.block_table) < seq.num_blocks_needed(self.block_size):
            seq.block_table.append(self._take())

    # ---- speculative decoding --------------------------------------------------------
    def reserve_lookahead(self, seq: Sequence, n: int) -> int:
        """Room for `n` draft tokens after the sequence's tokens, from free blocks only
        (drafts never cost anyone a preemption); how many of them fit."""
        bs = self.block_size
        while len(seq.block_table) * bs < seq.num_tokens + n and self._free:
            seq.block_table.append(self._take())
        return max(0, min(n, len(seq.block_table) * bs - seq.num_tokens))

    def trim(self, seq: Sequence) -> None:
        """After a verification step: give back the blocks past the sequence's tokens
        (those of rejected drafts). They hold no registered prefix: only blocks of
        computed, committed tokens are ever hashed."""
        needed = seq.num_blocks_needed(self.block_size)
        while len(seq.block_table) > needed:
            block = seq.block_table.pop()
            self._refs[block] -= 1
            if not self._refs[block]:
                self._free[block] = None
