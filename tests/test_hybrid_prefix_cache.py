"""Prefix caching for hybrid models (worker/state_snapshots.py): a cached prefix is used up
to the last block whose recurrent-state snapshot is kept, the snapshot copied into the new
sequence's state slot.

Tiny random Granite 4.0 hybrid (Mamba2), LFM2 (short convolutions), Qwen3.5 (gated
DeltaNet) and Mamba (Mamba-1): a repeated prompt and a multi-turn continuation start
from the cache, and every output equals the same engine's without prefix caching and HF's.
On Bamba (Mamba2 beside attention): n = 2 siblings in chunks, a prefix cached under one
adapter never used by the base, a pool of two snapshots (eviction), preemption under
shared prefixes, reset_prefix_cache, the snapshots' memory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex import SamplingParams
from tests.engine_utils import check_against_hf, lora_requests, make_llm
from tests.fixtures import make_peft_adapter

PARAMS = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=2)
KINDS = ["granite", "lfm2", "qwen3_5", "mamba"]


def build(kind: str, root: Path) -> Path:
    """The tiny base of `kind`, by its own test module's recipe (skipped where this
    transformers cannot build or check it)."""
    if kind == "granite":
        from tests.test_hybrid import TRANSFORMERS_5, make_hybrid
        if not TRANSFORMERS_5:
            pytest.skip("the Granite hybrid is checked against transformers 5")
        return make_hybrid(root / "base")
    if kind == "lfm2":
        from tests.test_lfm2 import _skip_reason, make_model
    elif kind == "qwen3_5":
        from tests.test_qwen3_next import make_model  # (skips without Qwen3.5)

        def _skip_reason(_: str) -> None:
            return None
    else:
        from tests.test_mamba1 import _skip_reason, make_model
    if (reason := _skip_reason(kind)) is not None:
        pytest.skip(reason)
    return make_model(root / "base", kind, 500 + KINDS.index(kind))


@pytest.fixture(scope="module", params=KINDS)
def hybrid(request, tiny_root: Path) -> tuple[str, Path]:
    return request.param, build(request.param, tiny_root / f"hybrid_prefix_{request.param}")


@pytest.fixture(scope="module")
def bamba(tiny_root: Path) -> tuple[Path, dict[str, Path]]:
    """A tiny Bamba (Mamba2 mixers and attention; transformers 4.56 builds it too) and an
    adapter on its mixers."""
    from tests.test_mamba_hybrids import make_model

    root = tiny_root / "hybrid_prefix_bamba"
    base = make_model(root / "base", "bamba", 510)
    return base, {"r8_mamba": make_peft_adapter(base, root / "r8_mamba", r=8, lora_alpha=16,
                                                target_modules=["in_proj", "out_proj"],
                                                seed=511)}


def generate(llm, prompt: list[int], lora=None, params: SamplingParams = PARAMS):
    return llm.generate([{"prompt_token_ids": prompt}], params, lora_request=lora,
                        use_tqdm=False)[0]


def assert_same(got, want, atol: float = 1e-5) -> None:
    """Two runs' completions: the same tokens, logprobs within `atol`."""
    for g, w in zip(got.outputs, want.outputs, strict=True):
        assert g.token_ids == w.token_ids
        for lg, lw in zip(g.logprobs, w.logprobs, strict=True):
            assert lg.keys() == lw.keys()
            assert all(abs(lg[t].logprob - lw[t].logprob) < atol for t in lw)


def test_repeat_and_continuation(hybrid, prompts):
    """A prompt of several blocks, the same prompt again, and a second turn (the prompt,
    its reply and more): the second and third start after cached blocks whose state was
    kept (the third after the reply's last full block, kept by a decode step), and all
    three equal the engine's without prefix caching and HF's."""
    kind, base = hybrid
    prompt = prompts[-1] + prompts[2][1:]  # 5 blocks of 8 and a part
    assert len(prompt) % 8
    cached = make_llm(base, block_size=8, max_num_batched_tokens=16)
    plain = make_llm(base, block_size=8, max_num_batched_tokens=16,
                     enable_prefix_caching=False)
    first = generate(cached, prompt)
    again = generate(cached, prompt)
    turn2 = prompt + list(first.outputs[0].token_ids) + prompts[1][1:]
    second = generate(cached, turn2)
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens == len(prompt) // 8 * 8
    computed = len(prompt) + PARAMS.max_tokens - 1  # (the reply's last token never is)
    assert computed // 8 > len(prompt) // 8  # the reply ends a block
    assert second.num_cached_tokens == computed // 8 * 8
    state = cached.llm_engine.model_runner.mamba_state
    assert state.snapshots.num_loaded == 2
    assert state.num_free_slots == state.num_slots
    for out, p in ((first, prompt), (again, prompt), (second, turn2)):
        assert_same(out, generate(plain, p))
    check_against_hf([first, again, second], base, [None] * 3, [prompt, prompt, turn2])


def test_siblings_share_the_prefix(bamba, prompts):
    """n = 2 greedy siblings in chunks of 16: the second is admitted once the first has
    computed (and kept the state of) its first chunks, and starts after them."""
    base, _ = bamba
    llm = make_llm(base, block_size=8, max_num_batched_tokens=16)
    prompt = prompts[-1] + prompts[3][1:]
    params = SamplingParams(n=2, temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=2)
    out = generate(llm, prompt, params=params)
    assert out.num_cached_tokens > 0
    want = generate(make_llm(base, block_size=8, enable_prefix_caching=False), prompt,
                    params=params)
    assert_same(out, want)


def test_adapters_never_share_a_prefix(bamba, prompts):
    """The same prompt under an adapter, then the base, then the adapter again: the base
    finds nothing of the adapter's (the hash holds the registration: its blocks and its
    state snapshot are other keys), the adapter's second run its own; all equal HF +
    PEFT."""
    base, adapters = bamba
    req = lora_requests(adapters)["r8_mamba"]
    llm = make_llm(base, enable_lora=True, max_lora_rank=8, block_size=8)
    snapshots = llm.llm_engine.model_runner.mamba_state.snapshots
    prompt = prompts[-1]
    outs = [generate(llm, prompt, req)]
    kept = len(snapshots)
    outs.append(generate(llm, prompt))
    assert outs[1].num_cached_tokens == 0 and len(snapshots) == 2 * kept
    outs.append(generate(llm, prompt, req))
    assert outs[2].num_cached_tokens > 0
    check_against_hf(outs, base, [adapters["r8_mamba"], None, adapters["r8_mamba"]],
                     [prompt] * 3)


def test_evicted_snapshots_shorten_hits(bamba, prompts):
    """A pool of two snapshots, least recently used overwritten (one per prompt here: one
    output token, so no decode step keeps one): a, b, a again (from its snapshot), c
    (overwrites b's), a (still there), b (its K/V blocks are cached but its state is not:
    computed in full). Exact throughout."""
    base, _ = bamba
    llm = make_llm(base, block_size=8, mamba_state_snapshots=2)
    snapshots = llm.llm_engine.model_runner.mamba_state.snapshots
    a, b, c = prompts[-1], prompts[-2] + prompts[1][1:], prompts[-3] + prompts[0][1:]
    assert all(len(p) % 8 and len(p) > 16 for p in (a, b, c)) and snapshots.num_entries == 2
    order = [a, b, a, c, a, b]
    one = SamplingParams(temperature=0.0, max_tokens=1, logprobs=2)
    outs = [generate(llm, p, params=one) for p in order]
    assert len(snapshots) == 2
    assert [o.num_cached_tokens for o in outs] == [0, 0, len(a) // 8 * 8, 0, len(a) // 8 * 8, 0]
    check_against_hf(outs, base, [None] * len(order), order)


def test_preemption_with_shared_prefixes(bamba, prompts):
    """Six requests sharing a 24-token prefix in 12 KV blocks of 8: some are preempted and
    recomputed, starting from a cached prefix's snapshot; all equal HF + PEFT."""
    base, adapters = bamba
    req = lora_requests(adapters)["r8_mamba"]
    llm = make_llm(base, enable_lora=True, max_lora_rank=8, max_model_len=64,
                   num_gpu_blocks_override=12, block_size=8, max_num_batched_tokens=16)
    system = prompts[-1][:25]
    batch = [system + prompts[i % len(prompts)][1:] + [5 + i] for i in range(6)]
    names = [None, "r8_mamba", None, None, "r8_mamba", None]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params,
                        lora_request=[req if n else None for n in names], use_tqdm=False)
    engine = llm.llm_engine
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_hit_tokens > 0
    assert engine.model_runner.mamba_state.snapshots.num_loaded > 0
    check_against_hf(outs, base, [adapters[n] if n else None for n in names], batch)


def test_reset_prefix_cache_drops_the_snapshots(bamba, prompts):
    base, _ = bamba
    llm = make_llm(base, block_size=8)
    snapshots = llm.llm_engine.model_runner.mamba_state.snapshots
    first = generate(llm, prompts[-1])
    assert len(snapshots) > 0 and generate(llm, prompts[-1]).num_cached_tokens > 0
    assert llm.reset_prefix_cache()
    assert len(snapshots) == 0
    again = generate(llm, prompts[-1])
    assert again.num_cached_tokens == 0
    assert_same(again, first)


def test_snapshot_memory_and_refusal(bamba):
    """The snapshots come out of the KV cache budget after the state slots: by default
    max_num_seqs of them, at most a quarter of that budget's worth; a negative number, or
    more than fit, are refused; without prefix caching, none."""
    from loraplex.worker.mamba_state import state_bytes_per_slot

    base, _ = bamba
    for gib in (0.004, 0.05):  # a quarter holds fewer than max_num_seqs, then all of them
        runner = make_llm(base, max_num_seqs=64, cpu_kv_cache_gib=gib,
                          block_size=8).llm_engine.model_runner
        per_slot = state_bytes_per_slot(runner.mixers, torch.float32)
        after_slots = int(gib * 2**30) - 64 * per_slot
        want = min(64, after_slots // 4 // per_slot)
        assert runner.num_state_snapshots == want and (want < 64) == (gib == 0.004)
        if gib == 0.004:  # (the larger budget's blocks stop at what 64 sequences can use)
            assert runner.num_blocks == (after_slots - want * per_slot) \
                // runner._bytes_per_block()
    off = make_llm(base, max_num_seqs=4, block_size=8, enable_prefix_caching=False)
    assert off.llm_engine.model_runner.mamba_state.snapshots is None
    with pytest.raises(ValueError, match="mamba_state_snapshots must be >= 0"):
        make_llm(base, mamba_state_snapshots=-1)
    with pytest.raises(ValueError, match="mamba_state_snapshots=100000"):
        make_llm(base, max_num_seqs=4, cpu_kv_cache_gib=0.004, mamba_state_snapshots=100000)
