"""Scheduler rules: the max_loras cap per step, FCFS without starvation, preemption."""

from __future__ import annotations

import random

from loraplex.config import SchedulerConfig
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.scheduler import Scheduler
from loraplex.engine.sequence import Sequence
from loraplex.sampling_params import SamplingParams


def _run(scheduler: Scheduler, max_tokens: int, steps: int = 10_000):
    """Drive the scheduler like the engine does; returns the batches and finish order."""
    batches, finished = [], []
    for _ in range(steps):
        if not scheduler.has_unfinished():
            break
        seqs, _ = scheduler.schedule()
        assert seqs, "scheduler stalled with work left"
        batches.append({s.lora_int_id for s in seqs} | scheduler.running_loras())
        for s in seqs:
            s.append_token(1)
            if s.num_output_tokens >= max_tokens:
                scheduler.finish(s)
                finished.append(s)
    return batches, finished


def test_max_loras_cap_and_no_starvation():
    rng = random.Random(0)
    max_loras = 2
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4096,
                                      max_model_len=512),
                      BlockManager(1000, 16), lambda batch: max_loras)
    params = SamplingParams(max_tokens=5)
    seqs = [Sequence(str(i), 0, [1] * rng.randint(2, 20), params,
                     lora_int_id=rng.choice([0, 1, 1, 1, 2, 3, 4, 5]))
            for i in range(60)]
    for s in seqs:
        sched.add(s)
    batches, finished = _run(sched, max_tokens=5)
    assert all(len(b - {0}) <= max_loras for b in batches)
    assert len(finished) == len(seqs)  # everyone, including rare adapters, completed
    # FCFS admission: nobody finishes before a request that arrived 8+ places earlier
    order = {s.request_id: i for i, s in enumerate(finished)}
    assert all(order[str(i)] < order[str(j)] for i in range(60) for j in range(i + 9, 60))


def test_preemption_when_blocks_run_out():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4096,
                                      max_model_len=64), BlockManager(6, 4))
    params = SamplingParams(max_tokens=8)
    seqs = [Sequence(str(i), 0, [1] * 6, params) for i in range(3)]
    for s in seqs:
        sched.add(s)
    _, finished = _run(sched, max_tokens=8)
    assert len(finished) == 3 and sched.num_preemptions > 0
    assert sched.block_manager.num_free_blocks == 6
