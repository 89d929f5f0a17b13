"""Continuous batching: which sequences run in the next step.

A step decodes every running sequence (one token each) and, in the same forward,
prefills prompts: a mixed step, as in vLLM v1, so a new request never costs the running
ones a step of their own. The token budget, max_num_batched_tokens, counts prompt tokens
(the decoding sequences' one token each rides on top). With chunked prefill (the
default) a prompt that does not fit the budget's remainder gets a chunk of it now and the
rest in the next steps, one chunk per step after the sequences mid-prompt from earlier
steps, so a long prompt never stalls the running decodes for longer than one budget's
worth of compute. Without it a prompt is prefilled whole, and must fit the budget.
A chunk never ends inside a Gemma 3 image's tokens (they attend to each other both ways,
so an image is computed in one step): it stops before the image, or waits for a step
with room for all of it (`ImageInputs.chunk_len`). A hybrid model under prefix caching
ends chunks where its recurrent state is to be kept: at the last block boundary before
the prompt's last token, and on a block boundary when the budget cuts a chunk
(BlockManager.state_chunk_len).

Running sequences are scheduled first (decodes, then prompts mid-prefill), then waiting
ones are admitted in arrival order, each after its prefix found in the prefix cache
(engine/block_manager.py). KV blocks (all of a prompt's, at admission),
max_num_seqs and the budget are first come, first served: admission stops at the first
sequence they cannot hold, so nobody behind it overtakes it on memory. A step that had to
preempt admits nobody.

The max_loras rule: the running set never holds more than `max_loras` distinct
adapters (the base takes no slot; slots pinned by adapters outside the batch count).
How requests for other adapters wait is the LoRA policy:

- "fcfs": admission stops at the first request whose adapter has no slot; it waits
  until a running adapter drains. Strict arrival order, but everything queues behind it.
- "fair" (default): a request whose adapter has no slot is skipped, so requests for
  running adapters (and the base) go on; and the slots are time-sliced so the tail is
  never starved: the adapter that has waited longest is "blocked", and once some running
  adapter has held its slot for `lora_min_slice_steps`, the one holding it longest
  stops admitting new requests (drains); when its last sequence finishes, the blocked
  adapter takes the slot. The longest-waiting adapter is always the next one in.

A request whose adapter is still being read from disk (not `lora_ready`) is skipped
until it is, whatever the policy: a cold adapter never holds up warm ones.
When decode runs out of KV blocks, the newest running sequence is preempted: its
blocks are freed and it is recomputed (prompt + output so far) when readmitted; it goes
back to the head of the queue.

The scheduling policy (vLLM's `--scheduling-policy`, `policy` here) orders the queue:
"fcfs" (default) is everything above. "priority" keeps the waiting queue sorted by
(priority, arrival), lower first, so admission (and with it the LoRA policy, which walks
the queue) goes by priority: "fair"'s blocked adapter is that of the first request the
queue holds up, and "fcfs" stops there. A preempted sequence goes back to its
(priority, arrival) place, and the victim is the running sequence that comes last in
that order (lowest priority, newest), wherever it is, instead of the newest. As in
vLLM v1, a waiting request never preempts a running one: a high-priority request that
finds no KV blocks waits for them like any other.
"""

from __future__ import annotations

from bisect import insort
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from loraplex.config import SchedulerConfig
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.sequence import Sequence, SequenceStatus


def _always(_: int) -> bool:
    return True


def _never(_: int) -> bool:
    return False


def _rank(seq: Sequence) -> tuple[int, int]:
    """The priority policy's order: lower priority first, then arrival."""
    return seq.priority, seq.seq_id


@dataclass
class ScheduledBatch:
    """One step's work: `prefill` (sequences computing part or all of their prompt, or of
    prompt + output so far after a preemption: `prefill_lens[i]` tokens from
    `num_computed_tokens` on) and `decode` (one token each). Either may be empty."""

    prefill: list[Sequence]
    decode: list[Sequence]
    prefill_lens: list[int] = field(default_factory=list)  # default: each whole remainder
    # speculative decoding: decoding sequences with drafts to verify (not in `decode`):
    # spec[i] computes its last token and spec_tokens[i], and gets logits at each
    spec: list[Sequence] = field(default_factory=list)
    spec_tokens: list[list[int]] = field(default_factory=list)
    # a draft model's sampled requests: the draft's distribution at each draft ([n, vocab];
    # None: a deterministic draft, ngram's or a greedy request's)
    spec_probs: list[torch.Tensor | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prefill_lens:
            self.prefill_lens = [s.num_uncomputed_tokens for s in self.prefill]
        if not self.spec_probs:
            self.spec_probs = [None] * len(self.spec)

    @property
    def seqs(self) -> list[Sequence]:
        """Prefill, verification, then decode: the order of the step's rows."""
        return self.prefill + self.spec + self.decode

    @property
    def sampled(self) -> list[Sequence]:
        """The sequences that get a next token this step, in the order of the step's logits:
        prefills whose chunk reaches their last token, then every decode."""
        done = [s for s, n in zip(self.prefill, self.prefill_lens)
                if n == s.num_uncomputed_tokens and s.pooling is None]  # pooling: no token
        return done + self.decode

    @property
    def prompt_logprob_positions(self) -> list[tuple[Sequence, range]]:
        """Per prefill sequence collecting prompt logprobs: the positions of this step's
        chunk whose logits give the next prompt token's logprob (entry p + 1)."""
        spans = []
        for seq, n in zip(self.prefill, self.prefill_lens):
            if seq.needs_prompt_logprobs:
                start = max(seq.num_computed_tokens, len(seq.prompt_logprobs) - 1)
                end = min(seq.num_computed_tokens + n, seq.num_prompt_tokens - 1)
                if start < end:
                    spans.append((seq, range(start, end)))
        return spans

    def keep(self, kept: set[Sequence]) -> ScheduledBatch:
        """The batch without the sequences not in `kept` (their adapter failed to load)."""
        pairs = [(s, n) for s, n in zip(self.prefill, self.prefill_lens) if s in kept]
        spec = [(s, d, q) for s, d, q in zip(self.spec, self.spec_tokens, self.spec_probs)
                if s in kept]
        return ScheduledBatch([s for s, _ in pairs], [s for s in self.decode if s in kept],
                              [n for _, n in pairs], [s for s, _, _ in spec],
                              [d for _, d, _ in spec], [q for _, _, q in spec])

    def advance(self) -> None:
        """After the forward: the step's tokens are in the cache (prefill and decode; a
        verified sequence advances by the tokens it accepted, LLMEngine._emit_verified)."""
        for seq, n in zip(self.prefill, self.prefill_lens):
            seq.num_computed_tokens += n
        for seq in self.decode:
            seq.num_computed_tokens += 1


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, block_manager: BlockManager,
                 lora_capacity: Callable[[set[int]], int] | None = None,
                 lora_ready: Callable[[int], bool] = _always,
                 lora_pinned: Callable[[int], bool] = _never,
                 propose: Callable[[list[Sequence]], list[tuple[list[int], torch.Tensor | None]]]
                 | None = None,
                 release: Callable[[Sequence], None] | None = None) -> None:
        self.max_num_seqs = cfg.max_num_seqs
        self.max_num_batched_tokens = cfg.max_num_batched_tokens
        self.chunked_prefill = cfg.enable_chunked_prefill
        self.fair = cfg.lora_policy == "fair"
        self.by_priority = cfg.policy == "priority"
        self.min_slice_steps = cfg.lora_min_slice_steps
        self.block_manager = block_manager
        # distinct adapters a batch holding `set` may have; None = LoRA off
        self.lora_capacity = lora_capacity
        self.lora_ready = lora_ready
        self.lora_pinned = lora_pinned
        # speculative decoding: the decoding sequences' draft tokens ([] = none) and the
        # draft's distributions; `release`: a sequence left the running set (a draft
        # model's cache of it goes)
        self.propose = propose
        self.release = release
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_steps = 0
        self._slot_since: dict[int, int] = {}  # running adapter -> step it got its slot
        self.draining: set[int] = set()  # running adapters admitting nothing new

    def add(self, seq: Sequence) -> None:
        if self.by_priority:
            insort(self.waiting, seq, key=_rank)
        else:
            self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def running_loras(self) -> set[int]:
        return {s.lora_int_id for s in self.running if s.lora_int_id}

    def _lora_fits(self, lora_int_id: int, loras: set[int]) -> bool:
        if not lora_int_id or lora_int_id in loras:
            return True
        limit = self.lora_capacity(loras) if self.lora_capacity else 0
        return len(loras) < limit

    def schedule(self) -> ScheduledBatch:
        """The next step's sequences; both lists empty: nothing can run now."""
        self.num_steps += 1
        preemptions = self.num_preemptions
        decode = self._schedule_decode()
        spec, drafts, probs = self._draft(decode)
        prefill, lens = self._continue_prefills()
        if self.num_preemptions == preemptions:
            self._admit(prefill, lens)
        return ScheduledBatch(prefill, decode, lens, spec, drafts, probs)

    def _draft(self, decode: list[Sequence]
               ) -> tuple[list[Sequence], list[list[int]], list[torch.Tensor | None]]:
        """Speculative decoding: the decoding sequences that get drafts move out of
        `decode` (in place). Run after every decode has its block, so drafts take only
        free blocks and never cause a preemption; they ride on top of the token budget
        like decodes do."""
        if self.propose is None or not decode:
            return [], [], []
        spec, drafts, probs, plain = [], [], [], []
        for seq, (tokens, q) in zip(decode, self.propose(decode)):
            n = self.block_manager.reserve_lookahead(seq, len(tokens)) if tokens else 0
            if n:
                spec.append(seq)
                drafts.append(tokens[:n])
                probs.append(q[:n] if q is not None else None)
            else:
                plain.append(seq)
        decode[:] = plain
        return spec, drafts, probs

    def _continue_prefills(self) -> tuple[list[Sequence], list[int]]:
        """The next chunk of each running sequence that is mid-prompt, oldest first."""
        prefill: list[Sequence] = []
        lens: list[int] = []
        budget = self.max_num_batched_tokens
        for seq in self.running:
            if seq.is_decoding or budget == 0:
                continue
            n = self.block_manager.state_chunk_len(seq, seq.num_computed_tokens,
                                                   min(seq.num_uncomputed_tokens, budget))
            if seq.images is not None:  # never inside a Gemma 3 image
                n = seq.images.chunk_len(seq.num_computed_tokens, n)
                if n == 0:
                    continue
            prefill.append(seq)
            lens.append(n)
            budget -= n
        return prefill, lens

    def _admit(self, prefill: list[Sequence], lens: list[int]) -> None:
        """Admit waiting sequences into this step's prefill (their first chunk)."""
        batch: list[Sequence] = []
        loras = self.running_loras()
        self._track_slots(loras)
        blocked: int | None = None  # the longest-waiting adapter that found no slot
        budget = self.max_num_batched_tokens - sum(lens)
        for seq in list(self.waiting):
            lora_id = seq.lora_int_id
            if lora_id and not self.lora_ready(lora_id):
                continue  # still loading: do not hold anyone up
            if lora_id in self.draining:
                continue
            if not self._lora_fits(lora_id, loras):
                if not self.fair:
                    break
                blocked = blocked or lora_id
                continue
            cached = self.block_manager.num_cached_tokens(seq)
            todo = seq.num_tokens - cached
            n = min(todo, budget) if self.chunked_prefill else todo
            if n <= budget:  # a hybrid's chunk ends where its state is kept
                n = self.block_manager.state_chunk_len(seq, cached, n)
            if seq.images is not None:  # never inside a Gemma 3 image
                n = seq.images.chunk_len(cached, n)
            if (len(self.running) + len(batch) >= self.max_num_seqs
                    or n == 0 or n > budget
                    or not self.block_manager.can_allocate(seq)):
                break
            self.waiting.remove(seq)
            self.block_manager.allocate(seq)  # a cached prefix counts as computed
            seq.status = SequenceStatus.RUNNING
            if lora_id and lora_id not in loras:
                loras.add(lora_id)
                self._slot_since[lora_id] = self.num_steps
            budget -= n
            batch.append(seq)
            lens.append(n)
        prefill.extend(batch)
        self.running.extend(batch)
        if blocked is not None and not self.draining:
            self._drain_one(loras)

    def _track_slots(self, loras: set[int]) -> None:
        """Forget adapters that left the running set (their slot is free again)."""
        for lora_id in list(self._slot_since):
            if lora_id not in loras:
                del self._slot_since[lora_id]
        self.draining &= loras

    def _drain_one(self, loras: set[int]) -> None:
        """Time slice: the adapter holding its slot longest stops taking new requests."""
        candidates = [(since, lora_id) for lora_id, since in self._slot_since.items()
                      if lora_id in loras and not self.lora_pinned(lora_id)
                      and self.num_steps - since >= self.min_slice_steps]
        if candidates:
            self.draining.add(min(candidates)[1])

    def _schedule_decode(self) -> list[Sequence]:
        """One token for each running sequence past its prompt, preempting running
        sequences (`_victim`) while the KV blocks do not stretch that far. Sequences
        mid-prompt stay running (their blocks were allocated at admission)."""
        kept: list[Sequence] = []
        decode: list[Sequence] = []
        queue = list(self.running)  # oldest first
        while queue:
            seq = queue.pop(0)
            if not seq.is_decoding:
                kept.append(seq)
                continue
            while not self.block_manager.can_append(seq):
                victim = self._victim(seq, queue, kept, decode)
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.may_append(seq)
                kept.append(seq)
                decode.append(seq)
        self.running = kept
        return decode  # a new list: the caller finishes sequences while iterating it

    def _victim(self, seq: Sequence, queue: list[Sequence], kept: list[Sequence],
                decode: list[Sequence]) -> Sequence:
        """Whom to preempt so that `seq` can grow, taken out of this step's lists: the
        newest running sequence (`seq` itself when none is left behind it), or by
        priority the last in (priority, arrival) of all running ones, those already
        scheduled this step included (vLLM v1's choice)."""
        if not self.by_priority:
            return queue.pop() if queue else seq
        victim = max([seq, *queue, *kept], key=_rank)
        for group in (queue, kept, decode):
            if victim in group:
                group.remove(victim)
        return victim

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: free the blocks, put it back in the queue (at the head; by
        priority, at its place)."""
        self.block_manager.deallocate(seq)
        if self.release is not None:
            self.release(seq)
        if seq.images is not None:
            seq.images.free_on_preempt()
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        if self.by_priority:
            self.add(seq)
        else:
            self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks."""
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.deallocate(seq)
        if self.release is not None:
            self.release(seq)
