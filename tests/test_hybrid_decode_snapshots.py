"""Hybrid prefix caching past the prompt: decode steps that end on a block boundary keep
a state snapshot (worker/state_snapshots.py), so a chat's next turn starts after the
previous reply's last full block instead of recomputing the reply.

The snapshot pool on its own (a superseded snapshot is the first to go, no host reads),
then tiny random Granite 4.0 hybrid (Mamba2), LFM2 (short convolutions), Qwen3.5 (gated
DeltaNet) and Mamba (Mamba-1) in a three-turn chat, and on Bamba: adapters of two ranks
and cache_salt in mixed batches, a long generation beside other prompts' snapshots in a
pool of four, a preempted sequence restarting from its own decode snapshot,
reset_prefix_cache, and beam search. Every output equals the engine's without prefix
caching (logprobs within 1e-5) and HF's (+ PEFT).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex import LoRARequest, SamplingParams
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.sequence import Sequence
from loraplex.sampling_params import BeamSearchParams
from loraplex.worker.mamba_state import MambaStateCache
from loraplex.worker.state_snapshots import StateSnapshots
from tests.engine_utils import check_against_hf, make_llm
from tests.fixtures import hf_logprobs, make_peft_adapter
from tests.test_hybrid_prefix_cache import KINDS, assert_same, build, generate

BS = 8
LONG = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=2)


def reply_blocks(prompt: list[int], params: SamplingParams = LONG) -> int:
    """Tokens of prompt + reply in full blocks once the reply is done (its last token is
    sampled, never computed)."""
    return (len(prompt) + params.max_tokens - 1) // BS * BS


class FakeMixer:
    """A state layer's slots: one [slots, 2, 3] tensor named as a mixer names its own."""

    def __init__(self, slots: int, device: str = "cpu") -> None:
        self.conv_state = torch.zeros(slots, 2, 3, device=device)

    def slot_state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"conv_state": (2, 3)}


def test_superseded_snapshots_go_first():
    """Pool of four: two prompts' snapshots, then one sequence's decode snapshots d1..d4,
    each superseding the last: spare room keeps d1, a full pool overwrites the superseded
    ones (d2, d3, then d1 for another prompt's q) and never a prompt's; the sequence's
    last one, d4, is an ordinary LRU entry (r overwrites p1, the least recently used).
    A superseded key already gone, or the new key itself, changes nothing; each snapshot
    reloads what was saved."""
    mixer = FakeMixer(slots=2)
    pool = StateSnapshots([mixer], 4, torch.float32, torch.device("cpu"))

    def save(key: bytes, value: float, supersedes: bytes | None = None) -> None:
        mixer.conv_state[0].fill_(value)
        pool.save(key, 0, supersedes)

    save(b"p1", 1.0)
    save(b"p2", 2.0)
    save(b"d1", 3.0)
    save(b"d2", 4.0, supersedes=b"d1")
    assert set(pool._entry) == {b"p1", b"p2", b"d1", b"d2"}
    save(b"d3", 5.0, supersedes=b"d2")
    assert set(pool._entry) == {b"p1", b"p2", b"d1", b"d3"}
    save(b"d4", 6.0, supersedes=b"d3")
    assert set(pool._entry) == {b"p1", b"p2", b"d1", b"d4"}
    save(b"q", 7.0)
    assert set(pool._entry) == {b"p1", b"p2", b"d4", b"q"}
    save(b"d4", 6.0, supersedes=b"d3")  # (d3 long gone)
    save(b"d4", 6.0, supersedes=b"d4")
    save(b"r", 8.0)
    assert set(pool._entry) == {b"p2", b"d4", b"q", b"r"}
    for key, value in ((b"p2", 2.0), (b"d4", 6.0), (b"q", 7.0), (b"r", 8.0)):
        pool.load(key, 1)
        assert torch.equal(mixer.conv_state[1], torch.full((2, 3), value))


def test_snapshot_copies_never_read_the_state():
    """Saving, superseding and loading on meta tensors (no values at all): the copies
    never bring a value back to the host, so on a GPU they cost no sync."""
    mixer = FakeMixer(slots=2, device="meta")
    pool = StateSnapshots([mixer], 2, torch.float32, torch.device("meta"))
    pool.save(b"a", 0)
    pool.save(b"b", 1, supersedes=b"a")
    pool.save(b"c", 0, supersedes=b"b")
    pool.load(b"c", 1)
    assert len(pool) == 2 and b"a" in pool


def test_commit_keeps_snapshots_at_block_boundaries():
    """BlockManager.commit on a hybrid's slots, blocks of 8, a 32-token prompt: a chunk
    that crosses a boundary and ends past it keeps none, chunks ending at 16 and at the
    prompt's end keep theirs (the prompt's, never superseded); a verified draft's commit
    reaching 40 keeps none, decode steps reaching 48 and 56 keep theirs, 56's superseding
    48's (first in line for eviction); release forgets the sequence's latest."""
    mixer = FakeMixer(slots=1)
    pool = StateSnapshots([mixer], 8, torch.float32, torch.device("cpu"))
    states = MambaStateCache([mixer], 1, torch.float32, torch.device("cpu"), pool, BS)
    bm = BlockManager(8, BS, enable_caching=True, states=states)
    seq = Sequence("r", 0, list(range(32)), SamplingParams())
    seq.cache_salt = bytes(8)
    bm.allocate(seq)
    states.slot(seq)
    for computed in (11, 16, 32):
        seq.num_computed_tokens = computed
        bm.commit(seq, state=True)
    h = seq.block_hashes
    assert list(pool._entry) == [h[1], h[3]] and not states.generated_snapshot
    for token in range(100, 116):  # decode steps: each computes the token before it
        seq.append_token(token)
        bm.may_append(seq)
        seq.num_computed_tokens += 1
        bm.commit(seq, state=seq.num_computed_tokens != 40)  # (40: a verified draft's)
        if seq.num_computed_tokens == 41:
            assert list(pool._entry) == [h[1], h[3]]
    assert list(pool._entry) == [h[1], h[3], h[5]]
    assert states.generated_snapshot == {seq.seq_id: h[5]}
    seq.append_token(116)
    for token in range(117, 125):
        seq.append_token(token)
        bm.may_append(seq)
        seq.num_computed_tokens += 1
        bm.commit(seq, state=True)
    assert list(pool._entry) == [h[5], h[1], h[3], h[6]]
    states.release(seq)
    assert not states.generated_snapshot


@pytest.fixture(scope="module", params=KINDS)
def hybrid(request, tiny_root: Path) -> tuple[str, Path]:
    return request.param, build(request.param,
                                tiny_root / f"decode_snapshots_{request.param}")


def test_chat_turns_start_after_the_reply(hybrid, prompts):
    """Three turns, each prompt the last one's, its reply and a new message, in chunks of
    16: turns two and three start after the last full block of the reply before them
    (kept by a decode step); the slots and the superseding bookkeeping are all given back;
    every turn equals the engine's without prefix caching and HF's."""
    kind, base = hybrid
    cached = make_llm(base, block_size=BS, max_num_batched_tokens=16)
    plain = make_llm(base, block_size=BS, max_num_batched_tokens=16,
                     enable_prefix_caching=False)
    turns, outs = [prompts[-1]], []
    for message in (prompts[1], prompts[2], None):
        outs.append(generate(cached, turns[-1], params=LONG))
        if message is not None:
            turns.append(turns[-1] + list(outs[-1].outputs[0].token_ids) + message[1:])
    assert outs[0].num_cached_tokens == 0
    for before, out in zip(turns, outs[1:]):
        assert out.num_cached_tokens == reply_blocks(before) > len(before) // BS * BS
    state = cached.llm_engine.model_runner.mamba_state
    assert state.num_free_slots == state.num_slots and not state.generated_snapshot
    for out, turn in zip(outs, turns, strict=True):
        assert_same(out, generate(plain, turn, params=LONG))
    check_against_hf(outs, base, [None] * len(turns), turns)


@pytest.fixture(scope="module")
def bamba(tiny_root: Path) -> tuple[Path, dict[str, Path]]:
    """A tiny Bamba (Mamba2 mixers beside attention) and adapters of ranks 8 and 4."""
    from tests.test_mamba_hybrids import make_model

    root = tiny_root / "decode_snapshots_bamba"
    base = make_model(root / "base", "bamba", 520)
    return base, {
        "r8": make_peft_adapter(base, root / "r8", r=8, lora_alpha=16,
                                target_modules=["in_proj", "out_proj"], seed=521),
        "r4": make_peft_adapter(base, root / "r4", r=4, lora_alpha=8,
                                target_modules=["in_proj", "q_proj", "v_proj"], seed=522)}


def run(llm, jobs: list[tuple[list[int], str | None, str | None]], adapters,
        params: SamplingParams = LONG) -> list:
    """(prompt, adapter, cache_salt) jobs in one generate call (one mixed batch)."""
    reqs = {name: LoRARequest(name, i + 1, str(adapters[name]))
            for i, name in enumerate(sorted(adapters))}
    return llm.generate([{"prompt_token_ids": p} | ({"cache_salt": s} if s else {})
                         for p, _, s in jobs], params,
                        lora_request=[reqs[a] if a else None for _, a, _ in jobs],
                        use_tqdm=False)


def test_adapters_and_salts_never_share_a_reply(bamba, prompts):
    """Turn one under the base, r8, r4 and the base with a cache_salt, in one batch; turn
    two of each under its own adapter and salt starts after its own reply; r8's turn two
    under the base, and the salted one under another salt, start after none of it. All
    equal the engine without prefix caching and HF + PEFT."""
    base, adapters = bamba
    kw = dict(enable_lora=True, max_lora_rank=8, block_size=BS, max_num_batched_tokens=16)
    cached, plain = make_llm(base, **kw), make_llm(base, enable_prefix_caching=False, **kw)
    p = prompts[-1]
    first = [(p, None, None), (p, "r8", None), (p, "r4", None), (p, None, "tenant")]
    outs = run(cached, first, adapters)
    turn2 = [tuple([p + list(o.outputs[0].token_ids) + prompts[1][1:], a, s])
             for o, (_, a, s) in zip(outs, first)]
    second = turn2 + [(turn2[1][0], None, None), (turn2[3][0], None, "other")]
    outs2 = run(cached, second, adapters)
    assert [o.num_cached_tokens for o in outs2[:4]] == [reply_blocks(p)] * 4
    assert outs2[4].num_cached_tokens < reply_blocks(p) and outs2[5].num_cached_tokens == 0
    jobs = first + second
    want = run(plain, first, adapters) + run(plain, second, adapters)  # (the same batches)
    for got, w in zip(outs + outs2, want, strict=True):
        assert_same(got, w, atol=5e-5)  # (r4's turn two: 1.8e-5 apart; the state after
        # the reply comes from 19 recurrent decode steps here and from the chunked scan
        # there, both exact, each ~1e-5 from HF's; a wrong state is ~0.1 off)
    check_against_hf(outs + outs2, base, [adapters[a] if a else None for _, a, _ in jobs],
                     [j[0] for j in jobs])


def test_long_generation_keeps_other_prompts_snapshots(bamba, prompts):
    """A pool of four: prompts a and b keep one snapshot each, then c generates 40 tokens
    (five decode snapshots, each superseding the last): a and b still start from theirs,
    and c's next turn from its last one."""
    base, _ = bamba
    llm = make_llm(base, block_size=BS, mamba_state_snapshots=4)
    one = SamplingParams(temperature=0.0, max_tokens=1, logprobs=2)
    many = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2)
    a, b, c = prompts[3], prompts[2] + prompts[0][1:], prompts[-1]
    outs = [generate(llm, a, params=one), generate(llm, b, params=one),
            generate(llm, c, params=many)]
    assert len(llm.llm_engine.model_runner.mamba_state.snapshots) == 4
    c2 = c + list(outs[-1].outputs[0].token_ids) + prompts[1][1:]
    again = [generate(llm, a, params=one), generate(llm, b, params=one),
             generate(llm, c2, params=one)]
    assert [o.num_cached_tokens for o in again] == [
        (len(a) - 1) // BS * BS, (len(b) - 1) // BS * BS, reply_blocks(c, many)]
    check_against_hf(outs + again, base, [None] * 6, [a, b, c, a, b, c2])


def test_preempted_sequence_restarts_from_its_decode_snapshot(bamba, prompts, monkeypatch):
    """Two 40-token generations in 10 KV blocks of 8: the newer is preempted, and its
    recompute starts past its prompt, from a snapshot its decode steps kept (its blocks
    freed last-first, so the last ones went to the other sequence). Equal to the engine
    without prefix caching and HF's."""
    base, _ = bamba
    kw = dict(block_size=BS, max_model_len=64, num_gpu_blocks_override=10,
              max_num_batched_tokens=16)
    llm = make_llm(base, **kw)
    manager = llm.llm_engine.block_manager
    starts = []  # (preemptions, tokens taken from the cache, prompt length) per admission
    allocate = manager.allocate

    def recording(seq) -> None:
        allocate(seq)
        starts.append((seq.num_preemptions, seq.num_computed_tokens, seq.num_prompt_tokens))

    monkeypatch.setattr(manager, "allocate", recording)
    batch = [prompts[1], prompts[2][:12]]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert any(pre and start > prompt for pre, start, prompt in starts), starts
    want = make_llm(base, enable_prefix_caching=False, **kw).generate(
        [{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    for got, w in zip(outs, want, strict=True):
        assert_same(got, w)
    check_against_hf(outs, base, [None, None], batch)


def test_reset_prefix_cache_drops_decode_snapshots(bamba, prompts):
    base, _ = bamba
    llm = make_llm(base, block_size=BS)
    p = prompts[-1]
    turn2 = p + list(generate(llm, p, params=LONG).outputs[0].token_ids) + prompts[1][1:]
    assert llm.reset_prefix_cache()
    out = generate(llm, turn2, params=LONG)
    assert out.num_cached_tokens == 0
    assert_same(out, generate(make_llm(base, block_size=BS, enable_prefix_caching=False),
                              turn2, params=LONG))


def test_beam_search_on_a_hybrid(bamba, prompts):
    """Beam search (each step every beam a one-token request: its prefix from the cache,
    past block boundaries the beams cross) equals the engine's without prefix caching,
    and each beam's cumulative logprob HF's."""
    base, _ = bamba
    params = BeamSearchParams(beam_width=2, max_tokens=12)
    job = [{"prompt_token_ids": prompts[-1]}]
    got = make_llm(base, block_size=BS).beam_search(job, params)[0].sequences
    want = make_llm(base, block_size=BS, enable_prefix_caching=False).beam_search(
        job, params)[0].sequences
    assert [s.tokens for s in got] == [s.tokens for s in want]
    for g, w in zip(got, want):
        assert abs(g.cum_logprob - w.cum_logprob) < 1e-5
        n = len(prompts[-1])
        ref = hf_logprobs(base, None, g.tokens)[n - 1:-1]
        total = sum(ref[i, t].item() for i, t in enumerate(g.tokens[n:]))
        assert abs(g.cum_logprob - total) < 1e-4
