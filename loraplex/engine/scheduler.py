"""Continuous batching: which sequences run in the next step.

A step is either a prefill of newly admitted sequences or a decode of all running
ones. Admission is first come, first served, and stops at the first waiting sequence
that does not fit (KV blocks, max_num_seqs, token budget, or the max_loras rule), so
nobody behind it can overtake it and nobody starves.

The max_loras rule: the running set never holds more than `max_loras` distinct
adapters (the base takes no slot; slots pinned by adapters outside the batch count).
A request for another adapter waits until a running adapter has drained.
When decode runs out of KV blocks, the newest running sequence is preempted: its
blocks are freed and it is recomputed (prompt + output so far) when readmitted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from loraplex.config import SchedulerConfig
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, block_manager: BlockManager,
                 lora_capacity: Callable[[set[int]], int] | None = None) -> None:
        self.max_num_seqs = cfg.max_num_seqs
        self.max_num_batched_tokens = cfg.max_num_batched_tokens
        self.block_manager = block_manager
        # distinct adapters a batch holding `set` may have; None = LoRA off
        self.lora_capacity = lora_capacity
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

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

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Returns (sequences, is_prefill). Empty list: nothing can run now."""
        batch = self._schedule_prefill()
        if batch:
            return batch, True
        return self._schedule_decode(), False

    def _schedule_prefill(self) -> list[Sequence]:
        batch: list[Sequence] = []
        loras = self.running_loras()
        num_tokens = 0
        while self.waiting:
            seq = self.waiting[0]
            if (len(self.running) + len(batch) >= self.max_num_seqs
                    or num_tokens + seq.num_tokens > self.max_num_batched_tokens
                    or not self._lora_fits(seq.lora_int_id, loras)
                    or not self.block_manager.can_allocate(seq)):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            if seq.lora_int_id:
                loras.add(seq.lora_int_id)
            num_tokens += seq.num_tokens
            batch.append(seq)
        self.running.extend(batch)
        return batch

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
