"""Scheduler rules: the max_loras cap per step, the LoRA policies (strict FCFS; fair time
slicing), cold adapters not holding anyone up, preemption, the priority policy."""

from __future__ import annotations

import random

import pytest

from loraplex.config import SchedulerConfig
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.scheduler import Scheduler
from loraplex.engine.sequence import Sequence
from loraplex.sampling_params import SamplingParams


def _run(scheduler: Scheduler, max_tokens: int, steps: int = 10_000, arrivals=None):
    """Drive the scheduler like the engine does; returns the batches and finish order.
    `arrivals(step)` may add sequences before each step; `seq.first_step` is recorded."""
    batches, finished = [], []
    for step in range(steps):
        if arrivals is not None:
            arrivals(step)
        if not scheduler.has_unfinished():
            if arrivals is None:
                break
            continue
        batch = scheduler.schedule()
        seqs = batch.seqs
        assert seqs or arrivals is not None, "scheduler stalled with work left"
        batches.append({s.lora_int_id for s in seqs} | scheduler.running_loras())
        sampled = batch.sampled
        batch.advance()
        for s in sampled:
            if not hasattr(s, "first_step"):
                s.first_step = step
            s.append_token(1)
            if s.num_output_tokens >= max_tokens:
                scheduler.finish(s)
                finished.append(s)
    return batches, finished


def _scheduler(max_loras: int, policy: str, max_num_seqs: int = 8, **kw) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=4096,
                          max_model_len=512, lora_policy=policy, **kw)
    return Scheduler(cfg, BlockManager(1000, 16), lambda batch: max_loras)


def _mixed_queue(sched: Scheduler, n: int = 60) -> list[Sequence]:
    rng = random.Random(0)
    params = SamplingParams(max_tokens=5)
    seqs = [Sequence(str(i), 0, [1] * rng.randint(2, 20), params,
                     lora_int_id=rng.choice([0, 1, 1, 1, 2, 3, 4, 5]))
            for i in range(n)]
    for s in seqs:
        sched.add(s)
    return seqs


@pytest.mark.parametrize("policy", ["fcfs", "fair"])
def test_max_loras_cap_and_everyone_finishes(policy):
    sched = _scheduler(2, policy)
    seqs = _mixed_queue(sched)
    batches, finished = _run(sched, max_tokens=5)
    assert all(len(b - {0}) <= 2 for b in batches)
    assert len(finished) == len(seqs)  # everyone, including rare adapters, completed
    if policy == "fcfs":  # strict admission: nobody overtakes a request 8+ places earlier
        order = {s.request_id: i for i, s in enumerate(finished)}
        assert all(order[str(i)] < order[str(j)] for i in range(60) for j in range(i + 9, 60))


def test_fair_policy_lets_running_adapters_go_ahead():
    steps = {}
    for policy in ("fcfs", "fair"):
        sched = _scheduler(2, policy, lora_min_slice_steps=4)
        _mixed_queue(sched)
        batches, _ = _run(sched, max_tokens=5)
        steps[policy] = len(batches)
    assert steps["fair"] < steps["fcfs"]  # fewer head-of-line stalls: fuller batches


def test_hot_adapter_cannot_starve_the_tail():
    """max_loras=1, a hot adapter gets new requests every step forever; one request for
    another adapter must still get the slot within a time slice plus one drain."""
    slice_steps, max_tokens = 8, 6
    sched = _scheduler(1, "fair", max_num_seqs=4, lora_min_slice_steps=slice_steps)
    params = SamplingParams(max_tokens=max_tokens)
    tail = Sequence("tail", 0, [1, 2, 3], params, lora_int_id=2)

    def arrivals(step):
        sched.add(Sequence(f"hot{step}", 0, [1, 2], params, lora_int_id=1))
        if step == 3:
            sched.add(tail)

    _, finished = _run(sched, max_tokens, steps=120, arrivals=arrivals)
    assert tail in finished
    assert tail.first_step - 3 <= slice_steps + max_tokens + 2
    hot_done = [s for s in finished if s.request_id.startswith("hot")]
    assert len(hot_done) > 40  # and the hot adapter keeps being served around it


@pytest.mark.parametrize("policy", ["fcfs", "fair"])
def test_adapter_still_loading_does_not_hold_up_others(policy):
    ready = {1: True, 2: False}
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4096, max_model_len=512,
                          lora_policy=policy)
    sched = Scheduler(cfg, BlockManager(1000, 16), lambda batch: 2,
                      lora_ready=lambda lora_id: ready[lora_id])
    params = SamplingParams(max_tokens=4)
    cold = Sequence("cold", 0, [1, 2], params, lora_int_id=2)
    warm = [Sequence(f"w{i}", 0, [1, 2], params, lora_int_id=1 if i % 2 else 0)
            for i in range(4)]
    for s in [cold, *warm]:
        sched.add(s)

    def arrivals(step):
        if step == 10:
            ready[2] = True

    _, finished = _run(sched, max_tokens=4, steps=40, arrivals=arrivals)
    assert [s.first_step for s in warm] == [0] * 4  # the cold head of the queue waited alone
    assert cold in finished and cold.first_step == 10


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


def test_arrivals_join_the_running_decodes_in_one_step():
    """A request arriving while others decode is prefilled in the same step as their
    decode. The token budget is for prompts: the decodes' tokens ride on top, so a prompt
    of the whole budget does not wait for the running sequences to finish."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64,
                                      max_model_len=64, enable_chunked_prefill=False),
                      BlockManager(100, 4))
    params = SamplingParams(max_tokens=8)
    first = [Sequence(f"a{i}", 0, [1] * 4, params) for i in range(2)]
    for s in first:
        sched.add(s)
    step = sched.schedule()
    assert step.prefill == first and step.decode == []
    _finish_step(step)
    late = Sequence("late", 0, [1] * 60, params)
    too_late = Sequence("too_late", 0, [1] * 5, params)  # 60 + 5 > the 64-token budget
    sched.add(late)
    sched.add(too_late)
    step = sched.schedule()
    assert step.decode == first and step.prefill == [late]
    assert step.seqs == [late, *first]  # prompts' rows first, then the decodes
    assert list(sched.waiting) == [too_late]


def test_a_step_that_preempts_admits_nobody():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4096,
                                      max_model_len=64), BlockManager(3, 4))
    params = SamplingParams(max_tokens=8)
    running = [Sequence(f"r{i}", 0, [1] * 4, params) for i in range(2)]  # a block each
    for s in running:
        sched.add(s)
    _finish_step(sched.schedule())  # both now need a second block; only one is free
    newcomer = Sequence("new", 0, [1], params)
    sched.add(newcomer)
    step = sched.schedule()
    assert sched.num_preemptions == 1 and step.prefill == []
    assert step.decode == running[:1] and list(sched.waiting)[:1] == running[1:]


def _finish_step(step) -> None:
    """What the engine does after the forward: every sampled sequence gets a token."""
    sampled = step.sampled
    step.advance()
    for s in sampled:
        s.append_token(1)


def test_long_prompt_is_chunked_beside_the_decodes():
    """Chunked prefill: a prompt longer than the budget is computed a budget's worth per
    step while the running sequences decode in every one of those steps; its first token
    comes with its last chunk; the budget left over admits the next prompt's first chunk."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16,
                                      max_model_len=64), BlockManager(100, 4))
    params = SamplingParams(max_tokens=8)
    first = [Sequence(f"a{i}", 0, [1] * 4, params) for i in range(2)]
    for s in first:
        sched.add(s)
    _finish_step(sched.schedule())
    long, short = Sequence("long", 0, [1] * 40, params), Sequence("short", 0, [1] * 20, params)
    sched.add(long)
    sched.add(short)
    chunks, got_token = [], []
    for _ in range(4):
        step = sched.schedule()
        assert step.decode[:2] == first  # every step
        chunks.append(dict(zip([s.request_id for s in step.prefill], step.prefill_lens)))
        got_token.append(long in step.sampled)
        _finish_step(step)
    # long: 16 + 16 + 8; short: what each step leaves (8 in the third), then the rest
    assert chunks == [{"long": 16}, {"long": 16}, {"long": 8, "short": 8}, {"short": 12}]
    assert got_token == [False, False, True, True]  # its last chunk, then a decode
    assert long.num_output_tokens == 2 and short.num_output_tokens == 1
    assert long.num_computed_tokens == 41 and long.is_decoding
    # the next step decodes all four; no prompt is left
    step = sched.schedule()
    assert step.prefill == [] and step.decode == [*first, long, short]


def test_whole_prompts_without_chunked_prefill():
    cfg = dict(max_num_seqs=8, max_num_batched_tokens=16, max_model_len=16)
    sched = Scheduler(SchedulerConfig(**cfg, enable_chunked_prefill=False), BlockManager(100, 4))
    seqs = [Sequence(str(i), 0, [1] * 10, SamplingParams()) for i in range(2)]
    for s in seqs:
        sched.add(s)
    step = sched.schedule()  # 10 + 10 > 16: the second waits for the next step
    assert step.prefill == seqs[:1] and step.prefill_lens == [10]
    with pytest.raises(ValueError, match="chunked prefill off"):
        SchedulerConfig(max_num_batched_tokens=8, max_model_len=16, enable_chunked_prefill=False)
    SchedulerConfig(max_num_batched_tokens=8, max_model_len=16)  # chunked: fine


def test_preempting_a_prompt_mid_prefill_recomputes_it_from_the_start():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4,
                                      max_model_len=64), BlockManager(4, 4))
    params = SamplingParams(max_tokens=8)
    a, b = Sequence("a", 0, [1] * 7, params), Sequence("b", 0, [1] * 8, params)
    sched.add(a)
    sched.add(b)
    _finish_step(sched.schedule())  # a: 4 of 7 (2 blocks); b waits: the budget is spent
    _finish_step(sched.schedule())  # a: the other 3, sampled; b: 1 of 8 (the last 2 blocks)
    _finish_step(sched.schedule())  # a decodes (8 tokens, 2 blocks); b: 4 more
    assert a.num_output_tokens == 2 and b.num_computed_tokens == 5 and not b.is_decoding
    step = sched.schedule()  # a needs a third block: b, mid-prompt, is preempted
    assert step.decode == [a] and step.prefill == [] and sched.num_preemptions == 1
    assert b.num_computed_tokens == 0 and list(sched.waiting) == [b]


def test_enable_chunked_prefill_reaches_the_scheduler():
    from transformers import LlamaConfig

    from loraplex import EngineArgs

    hf = LlamaConfig(max_position_embeddings=32768)
    on = EngineArgs(model="x", device="cpu").create_engine_config(hf).scheduler_config
    assert on.enable_chunked_prefill and on.max_num_batched_tokens == 8192  # vLLM's default
    off = EngineArgs(model="x", device="cpu", enable_chunked_prefill=False
                     ).create_engine_config(hf).scheduler_config
    assert not off.enable_chunked_prefill and off.max_num_batched_tokens == 32768


def _scheduling(blocks: int, block_size: int = 4, max_num_seqs: int = 8,
                policy: str = "priority", **kw) -> Scheduler:
    """A scheduler under the scheduling `policy`, `blocks` KV blocks, max_loras=1."""
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=4096,
                          max_model_len=64, policy=policy, **kw)
    return Scheduler(cfg, BlockManager(blocks, block_size), lambda batch: 1)


def _seq(name: str, priority: int, n: int = 4, lora_int_id: int = 0) -> Sequence:
    return Sequence(name, 0, [1] * n, SamplingParams(max_tokens=8), lora_int_id,
                    priority=priority)


def _names(seqs) -> list[str]:
    return [s.request_id for s in seqs]


def test_priority_orders_the_queue_then_arrival():
    sched = _scheduling(100, max_num_seqs=1)
    for name, priority in [("a", 2), ("b", 0), ("c", 1), ("d", 0), ("e", -1)]:
        sched.add(_seq(name, priority))
    assert _names(sched.waiting) == ["e", "b", "d", "c", "a"]
    assert _names(sched.schedule().prefill) == ["e"]
    fcfs = _scheduling(100, policy="fcfs")
    for name, priority in [("a", 2), ("b", 0), ("c", 1)]:
        fcfs.add(_seq(name, priority))
    assert _names(fcfs.waiting) == ["a", "b", "c"]  # priorities mean nothing under fcfs


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_preempted_sequence_goes_back_to_its_place(policy):
    """fcfs: to the head of the queue; priority: to its (priority, arrival) place."""
    sched = _scheduling(3, policy=policy)
    r0, r1 = _seq("r0", 1), _seq("r1", 2)
    sched.add(r0)
    sched.add(r1)
    _finish_step(sched.schedule())  # a block each; both now need a second, one is free
    for s in (_seq("w0", 0, 12), _seq("w3", 3)):
        sched.add(s)
    step = sched.schedule()
    assert sched.num_preemptions == 1 and step.decode == [r0] and step.prefill == []
    want = ["r1", "w0", "w3"] if policy == "fcfs" else ["w0", "r1", "w3"]
    assert _names(sched.waiting) == want


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_decode_victim_is_the_lowest_priority(policy):
    """Four running sequences, admitted a and b, then v, then c; a, b and c need a new
    block in the same step and one is free. a takes it; for b, fcfs preempts the newest
    (c), priority the lowest-priority one (v), though v is neither the newest nor short of
    a block itself."""
    sched = _scheduling(6, policy=policy)
    arrivals = {0: [("a", 0, 1), ("b", 1, 1)], 1: [("v", 9, 5)], 2: [("c", 2, 3)]}
    for i in range(4):
        for name, priority, n in arrivals.get(i, []):
            sched.add(_seq(name, priority, n))
        _finish_step(sched.schedule())
    assert sched.num_preemptions == 0 and sched.block_manager.num_free_blocks == 1
    step = sched.schedule()
    victim = "c" if policy == "fcfs" else "v"
    assert sched.num_preemptions == 1 and _names(sched.waiting) == [victim]
    assert _names(step.decode) == [n for n in ("a", "b", "v", "c") if n != victim]


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_decode_victim_may_have_had_its_turn_this_step(policy):
    """By priority the victim is chosen among all running sequences, one already given
    its block this step included (it gives it back): `low` runs first, then `hi` and
    `mid` arrive; when `mid` finds no block, fcfs preempts `mid` itself (nobody is newer),
    priority preempts `low`."""
    sched = _scheduling(5, policy=policy)
    sched.add(_seq("low", 9))
    _finish_step(sched.schedule())  # low: 5 tokens
    sched.add(_seq("hi", 0))
    sched.add(_seq("mid", 1))
    _finish_step(sched.schedule())  # low decodes (its second block); hi, mid: 5 tokens
    step = sched.schedule()  # one block free; hi and mid each need one
    victim = "mid" if policy == "fcfs" else "low"
    assert sched.num_preemptions == 1 and _names(sched.waiting) == [victim]
    assert set(_names(step.decode)) == {"low", "hi", "mid"} - {victim}
    assert set(_names(sched.running)) == {"low", "hi", "mid"} - {victim}


@pytest.mark.parametrize("lora_policy", ["fcfs", "fair"])
def test_priority_composes_with_the_lora_policy(lora_policy):
    """max_loras=1: admission walks the queue by priority, the LoRA policy on the way:
    `b` (adapter 2) goes first; `a` (adapter 1) then finds no slot, which stops admission
    under fcfs and is skipped under fair (the base request behind it goes in)."""
    sched = _scheduling(100, lora_policy=lora_policy)
    for name, priority, lora in [("a", 1, 1), ("base", 2, 0), ("b", 0, 2)]:
        sched.add(_seq(name, priority, lora_int_id=lora))
    step = sched.schedule()
    assert _names(step.prefill) == (["b"] if lora_policy == "fcfs" else ["b", "base"])
    assert sched.running_loras() == {2}


def test_unknown_scheduling_policy_is_refused():
    with pytest.raises(ValueError, match="scheduling_policy='lifo': use one of fcfs, priority"):
        SchedulerConfig(policy="lifo")
