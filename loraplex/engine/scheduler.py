"""Continuous batching: which sequences run in the next step.

A step decodes every running sequence (one token each) and, in the same forward,
prefills the sequences admitted this step: a mixed step, as in vLLM v1, so a new
request never costs the running ones a step of their own. Running sequences are
scheduled first; waiting ones are then admitted in arrival order. KV blocks,
max_num_seqs and the token budget (max_num_batched_tokens of prompt per step; the
decoding sequences' one token each rides on top, so a prompt of max_model_len tokens
never waits for the running ones to drain) are first come, first served: admission
stops at the first sequence they cannot hold, so nobody behind it overtakes it on
memory. A step that had to preempt admits nobody.

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
blocks are freed and it is recomputed (prompt + output so far) when readmitted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from loraplex.config import SchedulerConfig
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.sequence import Sequence, SequenceStatus


def _always(_: int) -> bool:
    return True


def _never(_: int) -> bool:
    return False


@dataclass
class ScheduledBatch:
    """One step's work: `prefill` (admitted now: the whole prompt, or prompt + output so
    far after a preemption) and `decode` (running: one token each). Either may be empty."""

    prefill: list[Sequence]
    decode: list[Sequence]

    @property
    def seqs(self) -> list[Sequence]:
        """Prefill then decode: the order of the step's rows and logits."""
        return self.prefill + self.decode


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, block_manager: BlockManager,
                 lora_capacity: Callable[[set[int]], int] | None = None,
                 lora_ready: Callable[[int], bool] = _always,
                 lora_pinned: Callable[[int], bool] = _never) -> None:
        self.max_num_seqs = cfg.max_num_seqs
        self.max_num_batched_tokens = cfg.max_num_batched_tokens
        self.fair = cfg.lora_policy == "fair"
        self.min_slice_steps = cfg.lora_min_slice_steps
        self.block_manager = block_manager
        # distinct adapters a batch holding `set` may have; None = LoRA off
        self.lora_capacity = lora_capacity
        self.lora_ready = lora_ready
        self.lora_pinned = lora_pinned
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_steps = 0
        self._slot_since: dict[int, int] = {}  # running adapter -> step it got its slot
        self.draining: set[int] = set()  # running adapters admitting nothing new

    def add(self, seq: Sequence) -> None:
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
        prefill = [] if self.num_preemptions > preemptions else self._schedule_prefill()
        return ScheduledBatch(prefill, decode)

    def _schedule_prefill(self) -> list[Sequence]:
        batch: list[Sequence] = []
        loras = self.running_loras()
        self._track_slots(loras)
        blocked: int | None = None  # the longest-waiting adapter that found no slot
        num_tokens = 0
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
            if (len(self.running) + len(batch) >= self.max_num_seqs
                    or num_tokens + seq.num_tokens > self.max_num_batched_tokens
                    or not self.block_manager.can_allocate(seq)):
                break
            self.waiting.remove(seq)
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            if lora_id and lora_id not in loras:
                loras.add(lora_id)
                self._slot_since[lora_id] = self.num_steps
            num_tokens += seq.num_tokens
            batch.append(seq)
        self.running.extend(batch)
        if blocked is not None and not self.draining:
            self._drain_one(loras)
        return batch

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
        scheduled: list[Sequence] = []
        queue = list(self.running)  # oldest first
        while queue:
            seq = queue.pop(0)
            while not self.block_manager.can_append(seq):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.may_append(seq)
                scheduled.append(seq)
        self.running = scheduled
        return list(scheduled)  # the caller finishes sequences while iterating its batch

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: free the blocks, put it at the head of the queue."""
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks."""
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.deallocate(seq)
