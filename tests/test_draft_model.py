"""Draft-model speculative decoding: configuration and start-up checks, the rejection
rule with the draft's probabilities (its output distribution), and the engine with a
draft model against the same engine without one and against HF transformers + PEFT
(mixed adapters, a draft equal to the target, a truncated one, an unrelated random one,
sampling, stops, chunked prefill, preemption, abort), and the server."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from loraplex import LoRARequest, SamplingParams
from loraplex.engine.arg_utils import parse_speculative_config
from loraplex.layers.rejection_sampler import accept_or_resample
from loraplex.layers.sampler import Sampler, SamplingRow
from tests.engine_utils import check_against_hf, make_llm
from tests.fixtures import (
    edited_copy,
    hf_greedy,
    load_hf_model,
    load_tokenizer,
    make_peft_adapter,
    make_tiny_model,
)
from tests.server_utils import RemoteServer, clean_env, serve_cmd
from tests.test_spec_decode import TEXTS, _assert_same, _generate

K = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The target (a tiny llama, loops under greedy), adapters of ranks 4 and 8 on it,
    and four drafts of its tokenizer: the target's first layer alone (its last layer
    dropped), the target with its weights perturbed (a useful acceptance rate), the
    target itself, an unrelated random model."""
    root = tmp_path_factory.mktemp("draft")
    base = make_tiny_model(root / "base", "llama", seed=3, init_std=0.1)
    truncated = edited_copy(
        base, root / "truncated", lambda c: c.update(num_hidden_layers=1),
        tensors=lambda t: {k: v for k, v in t.items() if not k.startswith("model.layers.1.")},
        config="config.json", weights="model.safetensors")
    gen = torch.Generator().manual_seed(4)
    perturbed = edited_copy(  # every weight off by ~3%: most drafts right, not all
        base, root / "perturbed", tensors=lambda t: {
            k: v * (1 + 0.03 * torch.randn(v.shape, generator=gen)) for k, v in t.items()},
        weights="model.safetensors")
    return {
        "base": base, "truncated": truncated, "same": base, "perturbed": perturbed,
        "random": make_tiny_model(root / "random", "llama", seed=9, num_layers=1,
                                  hidden_size=32, num_heads=2, num_kv_heads=1),
        "r4": make_peft_adapter(base, root / "r4", r=4, target_modules=["q_proj", "v_proj"],
                                seed=21, scale=0.2),
        "r8": make_peft_adapter(base, root / "r8", r=8, target_modules="all-linear",
                                seed=22, scale=0.2),
    }


def _spec(models: dict[str, Path], draft: str, k: int = K) -> dict:
    return {"model": str(models[draft]), "num_speculative_tokens": k}


def _loras(models: dict[str, Path], names: list[str | None]) -> list[LoRARequest | None]:
    return [LoRARequest(n, 1 if n == "r4" else 2, str(models[n])) if n else None
            for n in names]


def _prompts() -> list[list[int]]:
    tok = load_tokenizer()
    return [tok.encode(t) for t in TEXTS]


def _stats(llm):
    return llm.llm_engine.get_stats().spec_decode


def _check_draft_cache(llm) -> None:
    """Only running sequences hold draft state (a preempted one's went), and every draft
    block is either free or in exactly one state's table."""
    engine = llm.llm_engine
    draft = engine.draft
    running = {s.seq_id for s in engine.scheduler.running}
    assert set(draft.states) <= running
    held = [b for st in draft.states.values() for b in st.block_table]
    assert len(set(held)) == len(held)
    assert sorted(held + draft.free_blocks) == list(range(draft.num_blocks))


def _assert_draft_cache_empty(llm) -> None:
    draft = llm.llm_engine.draft
    assert draft.states == {} and draft.num_free_blocks == draft.num_blocks


# ---- configuration ----------------------------------------------------------------------
def test_draft_model_config_forms():
    cfg = parse_speculative_config('{"model": "/some/draft", "num_speculative_tokens": 4}')
    assert (cfg.method, cfg.model, cfg.num_speculative_tokens) == ("draft_model",
                                                                    "/some/draft", 4)
    cfg = parse_speculative_config({"method": "draft_model", "model": "d", "revision": "main",
                                    "num_speculative_tokens": 2, "max_model_len": 128,
                                    "draft_tensor_parallel_size": 1, "quantization": None})
    assert (cfg.revision, cfg.max_model_len) == ("main", 128)


@pytest.mark.parametrize("spec, match", [
    ({"model": "d", "num_speculative_tokens": 0}, "num_speculative_tokens must be"),
    ({"model": "d", "num_speculative_tokens": -2}, "num_speculative_tokens must be"),
    ({"model": "d"}, "num_speculative_tokens is required"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs a 'model'"),
    ({"model": "d", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2},
     "draft_tensor_parallel_size=2"),
    ({"model": "d", "num_speculative_tokens": 2, "prompt_lookup_max": 2}, "unknown key"),
    ({"model": "d", "num_speculative_tokens": 2, "max_model_len": 0}, "max_model_len must"),
])
def test_bad_draft_configs_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_speculative_config(spec)


def test_bad_drafts_fail_at_start_up(models, tmp_path):
    """A missing draft, one with another vocab size, one whose tokenizer maps tokens to
    other ids: the engine refuses to start, saying why."""
    base = models["base"]
    with pytest.raises(ValueError, match="draft model .* neither a local directory"):
        make_llm(base, speculative_config={"model": str(tmp_path / "nope"),
                                           "num_speculative_tokens": 2})
    bigger = edited_copy(models["truncated"], tmp_path / "bigger",
                         lambda c: c.update(vocab_size=c["vocab_size"] + 8),
                         config="config.json")
    with pytest.raises(ValueError, match=r"vocab_size \(\d+\) is not the target's"):
        make_llm(base, speculative_config={"model": str(bigger), "num_speculative_tokens": 2})

    def swap_two(tok: dict) -> None:
        vocab = tok["model"]["vocab"]
        a, b = list(vocab)[40:42]
        vocab[a], vocab[b] = vocab[b], vocab[a]
    other = edited_copy(models["truncated"], tmp_path / "other", swap_two,
                        config="tokenizer.json")
    with pytest.raises(ValueError, match="tokenizer .* does not have the target's vocabulary"):
        make_llm(base, speculative_config={"model": str(other), "num_speculative_tokens": 2})


# ---- the rejection rule with draft probabilities ------------------------------------------
def _frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accept_or_resample_with_draft_probs_emits_exactly_p(seed):
    """One step, many trials: drafts drawn from a random q, verified against a random p
    (with zeros, as top-k leaves it, unnormalized): the emitted tokens follow p within
    6 sigma, the acceptance rate is sum(min(p, q)), above the deterministic rule's."""
    gen = torch.Generator().manual_seed(seed)
    vocab, n = 7, 200_000
    p = torch.rand(vocab, generator=gen) ** 2
    p[seed % vocab] = 0.0
    q = torch.softmax(2 * torch.randn(vocab, generator=gen), dim=0)
    drafts = torch.multinomial(q, n, replacement=True, generator=gen)
    uniform = torch.rand(n, generator=gen)
    race = torch.empty(n, vocab).exponential_(generator=gen)
    rows, qs = p.expand(n, -1), q.expand(n, -1)
    tokens, accepted = accept_or_resample(rows, drafts, uniform, race, qs)
    target = (p / p.sum()).double()
    assert torch.allclose(_frequencies(tokens, vocab), target, atol=6 * (0.25 / n) ** 0.5)
    rate = accepted.double().mean().item()
    assert abs(rate - torch.minimum(target, q.double()).sum().item()) < 0.006
    assert bool((tokens[accepted] == drafts[accepted]).all())
    # the deterministic rule (accept d with p(d)) is exact too, but accepts less
    _, one_hot = accept_or_resample(rows, drafts, uniform, race)
    assert one_hot.double().mean().item() < rate - 0.02


def test_sampler_with_draft_probs_keeps_the_processed_distribution():
    """Through the Sampler (temperature, top-k, a presence penalty): rows verifying
    drafts drawn from a q emit exactly the distribution of rows without drafts; equal
    p and q accept every draft."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0, 0.5]])
    params = SamplingParams(temperature=0.7, top_k=4, presence_penalty=0.8)
    n = 60_000
    torch.manual_seed(0)
    rows = [SamplingRow(params, [0], [1], None)] * n
    q = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.25, 0.1])
    drafts = torch.multinomial(q, n, replacement=True).tolist()
    out = Sampler(set())(logits.expand(n, -1), rows, draft_tokens=drafts,
                         draft_probs=q.expand(n, -1))
    z = logits[0].clone()
    z[1] -= 0.8
    z = z / 0.7
    z[z < z.topk(4).values[-1]] = float("-inf")
    p = torch.softmax(z, dim=0).double()
    assert torch.allclose(_frequencies(torch.tensor(out.token_ids), 6), p, atol=0.012)
    drawn = torch.multinomial(p.float(), n, replacement=True).tolist()
    same = Sampler(set())(logits.expand(n, -1), rows, draft_tokens=drawn,
                          draft_probs=p.float().expand(n, -1))
    assert sum(same.accepted) >= n - 5


# ---- the engine -------------------------------------------------------------------------
def test_greedy_mixed_adapters_match_plain_and_peft(models):
    """Base and adapters of ranks 4 and 8 in one batch, the perturbed target as draft
    (run without adapters): the tokens are the engine's without speculation and HF +
    PEFT's, logprobs within 1e-4; some drafts accepted (runs of two and more), some rejected."""
    base = models["base"]
    prompts = _prompts()
    names = [None, "r4", "r8", None, "r8", "r4"]
    loras = _loras(models, names)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=3)
    kw = dict(enable_lora=True, max_loras=2, max_lora_rank=8)
    spec = make_llm(base, speculative_config=_spec(models, "perturbed"), **kw)
    plain = make_llm(base, **kw)
    spec_outs, _ = _generate(spec, prompts, params, loras)
    _assert_same(spec_outs, _generate(plain, prompts, params, loras)[0])
    stats = _stats(spec)
    assert stats.num_draft_tokens > stats.num_accepted_tokens > 0
    assert stats.accepted_per_position[1] > 0
    check_against_hf(spec_outs, base, [models[n] if n else None for n in names], prompts)
    _assert_draft_cache_empty(spec)


def test_draft_equal_to_target_accepts_everything(models):
    """The target as its own draft: under greedy every draft is accepted (the counters
    say so, per position too); sampled at temperature 0.8 without top-k/p, p = q at every
    position, so every draft is accepted too: the draft's distributions line up with the
    target's positions."""
    base = models["base"]
    prompts = _prompts()
    spec = make_llm(base, speculative_config=_spec(models, "same"))
    greedy = SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True)
    outs, _ = _generate(spec, prompts, greedy)
    _assert_same(outs, _generate(make_llm(base), prompts, greedy)[0])
    stats = _stats(spec)
    assert stats.num_drafts > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
    assert stats.accepted_per_position == [stats.num_drafts] * K
    # 25 tokens in chunks of K + 1 = 4: 7 steps of decode + the prefill step
    assert spec.llm_engine.scheduler.num_steps == 1 + -(-(25 - 1) // (K + 1))
    # the draft's cache kept the K - 1 drafts it forwarded and the target accepted: its
    # catch-up computed each prompt, then per later proposal only the last draft (never
    # forwarded); the bonus token is each decode forward's first
    proposals = -(-(25 - 1) // (K + 1))  # one per decode step
    assert spec.llm_engine.draft.num_catch_up_tokens == sum(len(p) for p in prompts) \
        + len(prompts) * (proposals - 1)
    # stops inside an accepted run (the step emitting output 5..8 stops at 6): a stop
    # string, max_tokens, and a stop token (min_tokens bans it before: its own output);
    # each as without speculation
    tok = load_tokenizer()
    ids = outs[0].outputs[0].token_ids
    stops = [SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True, min_tokens=7,
                            stop=[tok.decode([ids[6]])]),
             SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True, min_tokens=7,
                            stop_token_ids=[ids[6]]),
             SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)]
    stopped, last_step = _generate(spec, [prompts[0]] * 3, stops)
    _assert_same(stopped, _generate(make_llm(base), [prompts[0]] * 3, stops)[0])
    assert [len(stopped[i].outputs[0].token_ids) for i in (0, 2)] == [7, 7]
    assert last_step[0] == last_step[2] == 2  # the run's first two, nothing after them
    before = _stats(spec).copy()
    sampled = SamplingParams(temperature=0.8, max_tokens=25, ignore_eos=True, seed=5)
    _generate(spec, prompts, sampled)
    stats = _stats(spec)
    drafted = stats.num_draft_tokens - before.num_draft_tokens
    accepted = stats.num_accepted_tokens - before.num_accepted_tokens
    assert drafted > 50 and accepted >= drafted - 2  # (rounding may reject one)
    _assert_draft_cache_empty(spec)


def test_draft_cache_after_rejections(models):
    """The target as its own draft, the target penalizing repetition (the draft does
    not): drafts get rejected, and after each step every sequence's drafts are exactly
    the target's unpenalized greedy continuation (HF's) of its tokens then, so the
    draft's cache held the right K/V: the accepted drafts' kept, the rest recomputed."""
    base = models["base"]
    prompts = _prompts()[:3]
    spec = make_llm(base, speculative_config=_spec(models, "same"))
    engine = spec.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                            repetition_penalty=1.6)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p}, params)
    checked = 0
    while engine.has_unfinished_requests():
        engine.step()
        for seq in engine.scheduler.running:
            state = engine.draft.states.get(seq.seq_id)
            if state is not None and state.forwarded:
                want = hf_greedy(base, None, seq.token_ids[:state.base], K)
                assert state.forwarded == want[:len(state.forwarded)], seq.seq_id
                checked += 1
    stats = _stats(spec)
    assert checked > 10 and 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert engine.draft.num_catch_up_tokens > sum(len(p) for p in prompts)  # rejections


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_draft_through_the_triton_attention(models, monkeypatch):
    """The CUDA path's attention (the Triton kernels, under the interpreter here) for
    both models: the draft's catch-up chunks (blocks of 8, chunks of 6) and its decode
    forwards over its own block tables; the tokens are the plain engine's."""
    import tests.test_attention  # noqa: F401  (on the CPU: Triton under the interpreter)

    monkeypatch.setenv("LORAPLEX_ATTENTION_BACKEND", "triton")
    base = models["base"]
    prompts = _prompts()[:3]
    loras = _loras(models, [None, "r8", "r4"])
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
    kw = dict(enable_lora=True, max_loras=2, max_lora_rank=8, block_size=8,
              max_num_batched_tokens=6)
    spec = make_llm(base, speculative_config=_spec(models, "perturbed"), **kw)
    assert spec.llm_engine.draft.runner.attn_backend == "triton"
    spec_outs, _ = _generate(spec, prompts, params, loras)
    _assert_same(spec_outs, _generate(make_llm(base, **kw), prompts, params, loras)[0])
    assert _stats(spec).num_accepted_tokens > 0


def test_kv_budget_is_shared_with_the_draft(models):
    """The draft's KV cache comes out of the same budget: the target gets budget //
    (its bytes per block + the draft's) blocks, the draft as many; the memory line says
    so."""
    base = models["base"]
    budget = 2**20
    spec = make_llm(base, speculative_config=_spec(models, "truncated"),
                    kv_cache_memory_bytes=budget)
    engine = spec.llm_engine
    plain = make_llm(base, kv_cache_memory_bytes=budget).llm_engine
    target_block = plain.memory.kv_block_bytes
    draft_block = engine.memory.draft_kv_block_bytes
    assert draft_block * 2 == target_block  # one layer of two
    assert plain.model_runner.num_blocks == budget // target_block
    assert engine.model_runner.num_blocks == budget // (target_block + draft_block)
    assert engine.draft.num_blocks == engine.model_runner.num_blocks
    line = engine.memory.describe(0)
    assert "draft model: weights" in line and engine.memory.draft_weight_bytes > 0


def test_unrelated_random_draft_keeps_outputs(models):
    """A random draft of another shape: most drafts are rejected, the outputs are still
    the plain engine's, with adapters, n = 2, stop token ids, max_tokens and a request
    with structured outputs (no drafts for it) in the batch."""
    base = models["base"]
    prompts = _prompts()
    kw = dict(enable_lora=True, max_loras=2, max_lora_rank=8)
    loras = _loras(models, [None, "r8", "r4", None, "r4", "r8"])
    free = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=1)
    ref, _ = _generate(make_llm(base, **kw), prompts, free, loras)
    params = [free,
              SamplingParams(temperature=0.0, max_tokens=11, ignore_eos=True, logprobs=1),
              SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                             stop_token_ids=[ref[2].outputs[0].token_ids[9]]),
              SamplingParams(n=2, temperature=0.0, max_tokens=20, ignore_eos=True),
              free, free]
    spec = make_llm(base, speculative_config=_spec(models, "random"), **kw)
    spec_outs, _ = _generate(spec, prompts, params, loras)
    _assert_same(spec_outs, _generate(make_llm(base, **kw), prompts, params, loras)[0])
    stats = _stats(spec)
    assert stats.num_drafts > 0 and stats.num_accepted_tokens < stats.num_draft_tokens / 2
    _assert_draft_cache_empty(spec)


def check_second_tokens_follow_target(spec, base: Path, prompt: list[int]) -> None:
    """Rejection sampling with a proposer's distributions, through `spec` (one draft per
    step): 1500 seeded requests at temperature 0.8, max_tokens 3. The second token's
    count of each id, summed over the requests, is the sum of the target's probabilities
    of it given each request's first token (HF's softmax(logits / 0.8)) within 5 sigma;
    some drafts accepted, some resampled."""
    params = [SamplingParams(temperature=0.8, max_tokens=3, ignore_eos=True, seed=i)
              for i in range(1500)]
    outs, _ = _generate(spec, [prompt] * len(params), params)
    stats = _stats(spec)
    assert stats.num_drafts == len(params) and 0 < stats.num_accepted_tokens < len(params)
    firsts = torch.tensor([o.outputs[0].token_ids[0] for o in outs])
    seconds = torch.tensor([o.outputs[0].token_ids[1] for o in outs])
    distinct = firsts.unique()
    ids = torch.cat([torch.tensor([prompt]).expand(len(distinct), -1), distinct[:, None]], 1)
    with torch.no_grad():
        logits = load_hf_model(base)(input_ids=ids).logits[:, -1].double()
    p = torch.softmax(logits / 0.8, -1)[torch.searchsorted(distinct, firsts)]  # [N, V]
    got = torch.bincount(seconds, minlength=p.shape[1]).double()
    sigma = (p * (1 - p)).sum(0).sqrt().clamp_min(1.0)
    z = (got - p.sum(0)).abs() / sigma
    assert (z <= 5).all(), (z.max(), int(z.argmax()))


def test_sampled_tokens_keep_the_target_distribution(models):
    """The draft model's distributions reach the rejection sampler (spec_decode.py's
    draft_probs): with the random draft of another shape (its q far from the target's
    p), sampled tokens keep the target's distribution; a q lost on the way (zeros: every
    draft accepted) gives the draft's counts instead."""
    spec = make_llm(models["base"], speculative_config=_spec(models, "random", k=1),
                    max_num_seqs=256)
    check_second_tokens_follow_target(spec, models["base"], _prompts()[4][:6])


def test_adapter_added_tokens(models, tmp_path):
    """An adapter that adds tokens, greedy picks them often: the draft (base vocabulary)
    reads them as its last token, never proposes them, and the step carries on; the
    outputs are the plain engine's."""
    spec, _ = check_added_tokens(models["base"], _spec(models, "same"), tmp_path)
    assert _stats(spec).num_accepted_tokens > 0


def check_added_tokens(base: Path, speculative_config: dict, tmp_path: Path
                       ) -> tuple[Any, list[Any]]:
    """Two prompts, one under an adapter that adds tokens (greedy picks them often), with
    speculation: its outputs hold added tokens and are the plain engine's. Returns the
    speculating LLM and its outputs (the adapter's first)."""
    from tests.fixtures import make_added_tokens_adapter

    adapter = make_added_tokens_adapter(base, tmp_path / "added", mode="resized", row_std=2.0)
    prompts = _prompts()[:2]
    loras = [LoRARequest("added", 1, str(adapter)), None]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=1)
    kw = dict(enable_lora=True, max_loras=1, max_lora_rank=8)
    spec = make_llm(base, speculative_config=speculative_config, **kw)
    outs, _ = _generate(spec, prompts, params, loras)
    assert any(t >= 512 for t in outs[0].outputs[0].token_ids)
    _assert_same(outs, _generate(make_llm(base, **kw), prompts, params, loras)[0])
    return spec, outs


def test_structured_outputs_get_no_drafts(models):
    pytest.importorskip("xgrammar")
    from loraplex.sampling_params import StructuredOutputsParams

    base = models["base"]
    constrained = SamplingParams(temperature=0.0, max_tokens=12, structured_outputs=(
        StructuredOutputsParams(regex="(ab){2,5}c")))
    spec = make_llm(base, speculative_config=_spec(models, "same"))
    outs, _ = _generate(spec, _prompts()[:1], constrained)
    _assert_same(outs, _generate(make_llm(base), _prompts()[:1], constrained)[0])
    assert _stats(spec).num_drafts == 0


def test_chunked_prefill_preemption_and_abort(models):
    """Chunks of 5 tokens (the draft catches up in chunks of 5 too), a KV cache of 12
    blocks of 8 for six sequences: preemption by recompute (the draft's cache freed and
    recomputed as well); outputs are the plain engine's. An aborted request gives its
    draft blocks back."""
    base = models["base"]
    prompts = _prompts()
    loras = _loras(models, [None, "r8", "r4", None, "r4", "r8"])
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    kw = dict(enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=64,
              num_gpu_blocks_override=12, block_size=8, max_num_batched_tokens=5)
    spec = make_llm(base, speculative_config=_spec(models, "truncated"), **kw)
    engine = spec.llm_engine
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p}, params, lora_request=loras[i])
    finished = {}
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
        _check_draft_cache(spec)
    spec_outs = [finished[str(i)] for i in range(len(prompts))]
    _assert_same(spec_outs, _generate(make_llm(base, **kw), prompts, params, loras)[0])
    assert spec.llm_engine.scheduler.num_preemptions > 0
    assert _stats(spec).num_accepted_tokens > 0
    _assert_draft_cache_empty(spec)
    engine = spec.llm_engine
    engine.add_request("x", {"prompt_token_ids": prompts[0]}, params)
    while not engine.draft.states:
        engine.step()
    assert engine.draft.num_free_blocks < engine.draft.num_blocks
    engine.abort_request("x")
    _assert_draft_cache_empty(spec)


def test_seeded_sampling_is_reproducible(models):
    base = models["base"]
    params = SamplingParams(n=2, temperature=0.9, top_p=0.95, seed=3, max_tokens=20,
                            ignore_eos=True)
    runs = [_generate(make_llm(base, speculative_config=_spec(models, "truncated")),
                      _prompts()[:3], params)[0] for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]


# ---- the server -------------------------------------------------------------------------
def test_server_with_a_draft_model(models, tmp_path):
    """`loraplex serve --speculative-config '{"model": ..., "num_speculative_tokens": 3}'`
    with an adapter: greedy completions through the openai client equal the plain
    engine's; the start-up log reports the draft's memory; /metrics counts the drafts; a
    bad request fails alone (404) and the server carries on."""
    log = check_spec_server(models["base"], models["r8"], _spec(models, "truncated"),
                            "loraplex:spec_decode_num_accepted_tokens_total", tmp_path)
    assert "draft model: weights" in log


def check_spec_server(base: Path, r8: Path, spec: dict, counter: str, tmp_path: Path) -> str:
    """A server speculating with `spec` and an adapter r8: greedy completions of the base
    and of r8 through the openai client equal the plain engine's, an unknown model is a
    404 and the server carries on, /metrics' `counter` is past 0. Returns the server's
    log."""
    import openai

    args = ["--served-model-name", "tiny", "--enable-lora", "--max-lora-rank", "8",
            "--max-model-len", "256", "--dtype", "float32", "--lora-modules", f"r8={r8}",
            "--speculative-config", json.dumps(spec)]
    plain = make_llm(base, enable_lora=True, max_lora_rank=8)
    prompt = _prompts()[0]
    greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    with RemoteServer(base, args) as server:
        client = server.get_client()
        for model, lora in (("tiny", None), ("r8", LoRARequest("r8", 2, str(r8)))):
            got = client.completions.create(model=model, prompt=prompt, temperature=0,
                                            max_tokens=30, extra_body={"ignore_eos": True})
            want = plain.generate([{"prompt_token_ids": prompt}], greedy, lora_request=lora)
            assert got.choices[0].text == want[0].outputs[0].text
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="hi", max_tokens=3)
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=3).choices
        metrics = server.get("/metrics").text
        shutil.copy(server.log.name, tmp_path / "log")
    counts = [ln for ln in metrics.splitlines() if ln.startswith(counter)]
    assert counts and float(counts[0].split()[-1]) > 0
    return (tmp_path / "log").read_text()


@pytest.mark.parametrize("spec, needle", [
    ('{"model": "/nonexistent/draft", "num_speculative_tokens": 3}',
     "draft model '/nonexistent/draft' is neither a local directory"),
    ('{"model": "d", "num_speculative_tokens": 0}', "num_speculative_tokens must be"),
])
def test_serve_refuses_a_bad_draft(models, spec, needle):
    res = subprocess.run(serve_cmd(models["base"], "--dtype", "float32",
                                   "--speculative-config", spec),
                         capture_output=True, text=True, timeout=120, env=clean_env())
    assert res.returncode != 0
    errors = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in res.stderr
