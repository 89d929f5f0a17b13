"""Ngram speculative decoding: configuration, the proposer, the acceptance rule's
distribution, and the engine with drafts against the same engine without them and
against HF transformers + PEFT (mixed adapters, stops inside accepted runs, logprobs,
chunked prefill + prefix caching, n > 1, preemption, penalties, structured outputs)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from loraplex import EngineArgs, LoRARequest, SamplingParams
from loraplex.config import SpeculativeConfig
from loraplex.engine.arg_utils import parse_speculative_config
from loraplex.engine.ngram_proposer import NgramProposer
from loraplex.engine.spec_decode import SpecDecodeLogger, SpecDecodeStats
from loraplex.layers.rejection_sampler import accept_or_resample
from loraplex.layers.sampler import Sampler, SamplingRow
from loraplex.sampling_params import StructuredOutputsParams
from tests.engine_utils import check_against_hf, make_llm
from tests.fixtures import load_tokenizer, make_peft_adapter, make_tiny_model
from tests.server_utils import RemoteServer, clean_env, serve_cmd, token_ids_of

SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
        "prompt_lookup_min": 1}
TEXTS = (
    "The cat sat on the mat. The cat sat on the mat. The cat",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "How much wood would a woodchuck chuck if a woodchuck could chuck wood?",
    "Hi",
    "It was the best of times, it was the worst of times, it was the age of wisdom",
    "What is the capital of France?",
)


# ---- configuration --------------------------------------------------------------------
@pytest.mark.parametrize("spec, match", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "method 'eagle' needs a 'model'"),
    ({"method": "medusa", "num_speculative_tokens": 2}, "only supports the 'ngram'"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs a 'model'"),
    ({"method": "lookahead", "num_speculative_tokens": 2}, "unknown method 'lookahead'"),
    ({"method": "ngram"}, "num_speculative_tokens is required"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
      "prompt_lookup_max": 2}, r"prompt_lookup_min \(4\) must be <= prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0},
     "prompt_lookup_min must be"),
    ({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1},
     "unknown key"),
    ("{not json", "not valid JSON"),
    ([1, 2], "must be a dict"),
])
def test_bad_speculative_configs_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_speculative_config(spec)


def test_speculative_config_defaults_and_forms():
    cfg = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 4})
    assert (cfg.prompt_lookup_min, cfg.prompt_lookup_max) == (5, 5)  # vLLM's defaults
    cfg = parse_speculative_config('{"model": "[ngram]", "num_speculative_tokens": 2, '
                                   '"prompt_lookup_max": 3}')
    assert cfg == SpeculativeConfig(2, prompt_lookup_max=3, prompt_lookup_min=3)
    assert parse_speculative_config(None) is None


def test_engine_args_refuse_a_bad_config(spec_model):
    base, _ = spec_model
    from transformers import AutoConfig

    args = EngineArgs(model=str(base), speculative_config={"method": "eagle3",
                                                            "num_speculative_tokens": 3})
    with pytest.raises(ValueError, match="method 'eagle3' needs a 'model'"):
        args.create_engine_config(AutoConfig.from_pretrained(base))


# ---- the proposer -----------------------------------------------------------------------
def test_ngram_proposer_longest_then_most_recent_match():
    p = NgramProposer(min_n=1, max_n=3)
    assert p.propose([1, 2, 3, 4, 1, 2, 3], 3) == [4, 1, 2]
    # the 3-gram [9, 2, 3] beats the more recent 2-gram [2, 3]
    assert p.propose([9, 2, 3, 1, 8, 5, 2, 3, 7, 9, 2, 3], 2) == [1, 8]
    # equally long matches: the most recent one
    assert p.propose([2, 3, 5, 2, 3, 6, 0, 3], 2) == [6, 0]
    # k caps the proposal; a match near the end proposes what there is
    assert p.propose([1, 2, 3, 4, 1, 2, 3], 1) == [4]
    assert p.propose([7, 7], 3) == [7]
    # nothing repeats, or the match is shorter than min_n
    assert p.propose([1, 2, 3, 4], 3) == []
    assert NgramProposer(min_n=2, max_n=3).propose([5, 3, 1, 4, 3], 2) == []
    assert p.propose([1, 2, 1], 0) == []


def test_spec_decode_stats_and_log_line():
    stats = SpecDecodeStats()
    stats.observe(3, 2)
    stats.observe(2, 0)
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens,
            stats.accepted_per_position) == (2, 5, 2, [1, 1, 0])
    log = SpecDecodeLogger(interval_s=3600)
    assert log.maybe_log(stats) is None  # not due yet
    line = log.maybe_log(stats, force=True)
    assert line == ("SpecDecoding metrics: Mean acceptance length: 2.00, Accepted: 2 tokens, "
                    "Drafted: 5 tokens, Per-position acceptance rate: 0.500, 0.500, 0.000, "
                    "Avg Draft acceptance rate: 40.0%")
    assert log.maybe_log(stats, force=True) is None  # nothing new since
    stats.observe(1, 1)
    assert "Accepted: 1 tokens, Drafted: 1 tokens" in log.maybe_log(stats, force=True)


# ---- the acceptance rule ---------------------------------------------------------------
def _frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


@pytest.mark.parametrize("draft", [0, 2, 4])  # likely, unlikely, impossible (p = 0)
def test_accept_or_resample_emits_exactly_p(draft):
    """The emitted token's marginal is p whatever the draft; the draft is accepted with
    probability p(draft). 400k seeded rows: 6 sigma is < 0.005 on any frequency."""
    n, gen = 400_000, torch.Generator().manual_seed(draft)
    probs = torch.tensor([0.5, 0.2, 0.15, 0.15, 0.0]) * 3  # unnormalized, as top-k leaves it
    p = probs / probs.sum()
    rows = probs.expand(n, -1)
    uniform = torch.rand(n, generator=gen)
    q = torch.empty(n, 5).exponential_(generator=gen)
    tokens, accepted = accept_or_resample(rows, torch.full((n,), draft), uniform, q)
    assert torch.allclose(_frequencies(tokens, 5), p.double(), atol=0.005)
    assert abs(accepted.double().mean().item() - p[draft].item()) < 0.005
    assert torch.equal(tokens[accepted], torch.full_like(tokens[accepted], draft))
    # rows without a draft just sample from p
    plain, none = accept_or_resample(rows, torch.full((n,), -1), uniform, q)
    assert not none.any()
    assert torch.allclose(_frequencies(plain, 5), p.double(), atol=0.005)


def test_sampler_verification_keeps_the_processed_distribution():
    """Through the Sampler, with temperature, top-k and a presence penalty that depends
    on the output so far: a row verifying a draft emits tokens with exactly the
    distribution the same row samples from without one."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0, 0.5]])
    params = SamplingParams(temperature=0.7, top_k=4, presence_penalty=0.8)
    out_so_far = [1]  # token 1 penalized
    n = 60_000
    torch.manual_seed(0)
    rows = [SamplingRow(params, [0], out_so_far, None)] * n
    sampler = Sampler(set())
    with_draft = sampler(logits.expand(n, -1), rows, draft_tokens=[1] * n)
    without = sampler(logits.expand(n, -1), rows)
    z = logits[0].clone()
    z[1] -= 0.8
    z = z / 0.7
    z[z < z.topk(4).values[-1]] = float("-inf")
    p = torch.softmax(z, dim=0).double()
    for out in (with_draft, without):
        freq = _frequencies(torch.tensor(out.token_ids), 6)
        assert torch.allclose(freq, p, atol=0.012), (freq, p)  # 6 sigma at n = 60k
    acc = torch.tensor(with_draft.accepted, dtype=torch.double).mean().item()
    assert abs(acc - p[1].item()) < 0.012
    assert all(t == 1 for t, a in zip(with_draft.token_ids, with_draft.accepted) if a)
    # greedy rows: the draft is accepted exactly when it is the argmax
    greedy = [SamplingRow(SamplingParams(temperature=0.0), [0], [], None)] * 2
    out = sampler(logits.expand(2, -1), greedy, draft_tokens=[0, 1])
    assert out.token_ids == [0, 0] and out.accepted == [True, False]


def test_seeded_rows_verify_reproducibly():
    logits = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))

    def run() -> tuple[list[int], list[bool]]:
        gen = torch.Generator().manual_seed(7)
        rows = [SamplingRow(SamplingParams(temperature=1.0, seed=7), [0], [], gen)] * 4
        out = Sampler(set())(logits, rows, draft_tokens=[3, 5, -1, 9])
        return out.token_ids, out.accepted
    assert run() == run()


# ---- the engine ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spec_model(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A tiny llama whose greedy continuations fall into loops (init std 0.1), so
    prompt lookup finds drafts that are partly right, and adapters of ranks 4, 8, 16."""
    root = tmp_path_factory.mktemp("spec")
    base = make_tiny_model(root / "base", "llama", seed=3, init_std=0.1)
    adapters = {
        "r4": make_peft_adapter(base, root / "r4", r=4, target_modules=["q_proj", "v_proj"],
                                seed=21, scale=0.2),
        "r8": make_peft_adapter(base, root / "r8", r=8, target_modules="all-linear",
                                seed=22, scale=0.2),
        "r16": make_peft_adapter(base, root / "r16", r=16, lora_alpha=16,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                 seed=23, scale=0.2),
    }
    return base, adapters


def _lora(adapters: dict[str, Path], name: str | None) -> LoRARequest | None:
    if name is None:
        return None
    return LoRARequest(name, sorted(adapters).index(name) + 1, str(adapters[name]))


def _prompts() -> list[list[int]]:
    tok = load_tokenizer()
    return [tok.encode(t) for t in TEXTS]


def _generate(llm, prompts, params, loras=None) -> tuple[list, list[int]]:
    """Requests in one batch, stepped to the end: the outputs in order, and per request
    how many tokens the step that finished it emitted. After every step, no running
    sequence holds blocks past its tokens."""
    engine = llm.llm_engine
    params = params if isinstance(params, list) else [params] * len(prompts)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p}, params[i],
                           lora_request=loras[i] if loras else None)
    seen: dict[str, int] = {}
    finished, last_step = {}, {}
    bs = engine.block_manager.block_size
    while engine.has_unfinished_requests():
        outs = engine.step()
        # the blocks of rejected drafts went back: none past a sequence's tokens
        assert all(len(s.block_table) <= s.num_blocks_needed(bs)
                   for s in engine.scheduler.running)
        for out in outs:
            n = len(out.outputs[0].token_ids)
            if out.finished:
                finished[out.request_id] = out
                last_step[out.request_id] = n - seen.get(out.request_id, 0)
            seen[out.request_id] = n
    ids = [str(i) for i in range(len(prompts))]
    return [finished[i] for i in ids], [last_step[i] for i in ids]


def _assert_same(spec_outs, plain_outs, atol: float = 1e-4) -> None:
    """Token for token the same completions (every one of n), text, finish reasons, and
    logprobs of each token from its own position."""
    for s, p in zip(spec_outs, plain_outs, strict=True):
        for a, b in zip(s.outputs, p.outputs, strict=True):
            assert a.token_ids == b.token_ids, (s.request_id, a.token_ids, b.token_ids)
            assert (a.text, a.finish_reason, a.stop_reason) == (b.text, b.finish_reason,
                                                                 b.stop_reason)
            assert (a.logprobs is None) == (b.logprobs is None)
            for la, lb in zip(a.logprobs or [], b.logprobs or [], strict=True):
                assert la.keys() == lb.keys()
                for t in la:
                    assert abs(la[t].logprob - lb[t].logprob) < atol
                    assert la[t].rank == lb[t].rank
            if a.cumulative_logprob is not None:  # (None without logprobs, as vLLM's)
                assert abs(a.cumulative_logprob - b.cumulative_logprob) < 1e-3


def _spec_stats(llm):
    return llm.llm_engine.get_stats().spec_decode


def test_greedy_mixed_adapters_match_plain_and_peft(spec_model):
    """Base + adapters of ranks 4, 8 and 16 (one more than max_loras and the host tier
    hold), prompts that repeat themselves: drafts were proposed, some accepted, some
    rejected, several-token runs accepted; the tokens are the engine's without drafts and
    HF + PEFT's, logprobs within 1e-4."""
    base, adapters = spec_model
    prompts = _prompts()
    names = [None, "r4", "r8", "r16", "r4", None, "r16", "r8"]
    batch = [prompts[i % len(prompts)] for i in range(len(names))]
    loras = [_lora(adapters, n) for n in names]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=3)
    kw = dict(enable_lora=True, max_loras=2, max_lora_rank=16, max_cpu_loras=2)
    spec_llm, plain_llm = make_llm(base, speculative_config=SPEC, **kw), make_llm(base, **kw)
    spec_outs, _ = _generate(spec_llm, batch, params, loras)
    plain_outs, _ = _generate(plain_llm, batch, params, loras)
    _assert_same(spec_outs, plain_outs)
    stats = _spec_stats(spec_llm)
    assert stats.num_drafts > 0 and stats.num_draft_tokens > stats.num_accepted_tokens > 0
    assert stats.accepted_per_position[1] > 0  # runs of two or more accepted drafts
    assert spec_llm.llm_engine.scheduler.num_steps < plain_llm.llm_engine.scheduler.num_steps
    check_against_hf(spec_outs, base, [adapters[n] if n else None for n in names], batch)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_verification_through_the_triton_attention(spec_model, monkeypatch):
    """The CUDA path's attention (the Triton kernels, under the interpreter here): a
    verified sequence's drafts go through the varlen prefill kernel over its cached
    context, beside decodes and prefills; the tokens are the plain engine's."""
    import tests.test_attention  # noqa: F401  (on the CPU: Triton under the interpreter)

    monkeypatch.setenv("LORAPLEX_ATTENTION_BACKEND", "triton")
    base, adapters = spec_model
    prompts = _prompts()[:3]
    loras = [None, _lora(adapters, "r8"), _lora(adapters, "r4")]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)
    kw = dict(enable_lora=True, max_loras=2, max_lora_rank=16, block_size=8)
    spec_llm, plain_llm = make_llm(base, speculative_config=SPEC, **kw), make_llm(base, **kw)
    assert spec_llm.llm_engine.model_runner.attn_backend == "triton"
    spec_outs, _ = _generate(spec_llm, prompts, params, loras)
    plain_outs, _ = _generate(plain_llm, prompts, params, loras)
    _assert_same(spec_outs, plain_outs)
    stats = _spec_stats(spec_llm)
    assert stats.num_draft_tokens > stats.num_accepted_tokens > 0


def _chunks(llm, prompts, params, loras) -> list[list[int]]:
    """Per request, the number of tokens each step emitted (drafts accepted + 1)."""
    engine = llm.llm_engine
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p}, params, lora_request=loras[i])
    sizes: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            sizes[out.request_id].append(len(out.outputs[0].token_ids)
                                         - sum(sizes[out.request_id]))
    return [sizes[str(i)] for i in range(len(prompts))]


def _inside_runs(chunks: list[int]) -> list[int]:
    """Positions that a step emitted with more tokens after them in the same step."""
    out, start = [], 0
    for n in chunks:
        out += range(start, start + n - 1)
        start += n
    return out


def test_stops_and_limits_inside_accepted_runs(spec_model, tmp_path):
    """Stop strings and max_tokens that fall inside a run of accepted drafts (at a token
    the verifying step emitted with more after it) end the output there, exactly as
    without drafts: nothing after, the same finish and stop reasons, the same text. Stop
    token ids, min_tokens and eos (generation_config's ids) too."""
    base, adapters = spec_model
    prompts = _prompts()
    kw = dict(enable_lora=True, max_lora_rank=16, max_loras=2)
    loras = [_lora(adapters, n) for n in (None, "r8", "r4", None, "r16", "r8")]
    free = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    full, _ = _generate(make_llm(base, **kw), prompts, free, loras)
    chunks = _chunks(make_llm(base, speculative_config=SPEC, **kw), prompts, free, loras)
    tok = load_tokenizer()
    jobs, params, job_loras, stops = [], [], [], []
    for prompt, lora, out, sizes in zip(prompts, loras, full, chunks):
        ids = out.outputs[0].token_ids
        assert sum(sizes) == len(ids)
        text = [tok.decode([t]) for t in ids]  # whole characters, not a byte of one
        inside = [j for j in _inside_runs(sizes)
                  if text[j].strip() and text[j].isascii() and text[j].isprintable()]
        for j in inside[:1] + inside[-1:]:
            stops.append(j)
            params += [
                # the stop string is checked from min_tokens on: it hits at j
                SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                               stop=[tok.decode([ids[j]])], min_tokens=j + 1, logprobs=1,
                               include_stop_str_in_output=len(stops) % 2 == 0),
                SamplingParams(temperature=0.0, max_tokens=j + 1, ignore_eos=True,
                               logprobs=1),
                SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                               stop_token_ids=[ids[j]]),
                SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                               stop_token_ids=[ids[j]], min_tokens=j + 1),
            ]
            jobs += [prompt] * 4
            job_loras += [lora] * 4
    assert len(stops) >= 6, stops  # enough places inside accepted runs
    spec = make_llm(base, speculative_config=SPEC, **kw)
    spec_outs, last_step = _generate(spec, jobs, params, job_loras)
    plain_outs, _ = _generate(make_llm(base, **kw), jobs, params, job_loras)
    _assert_same(spec_outs, plain_outs)
    for by_string, by_length, j in zip(spec_outs[::4], spec_outs[1::4], stops):
        assert len(by_string.outputs[0].token_ids) == j + 1
        assert by_string.outputs[0].finish_reason == "stop"
        assert len(by_length.outputs[0].token_ids) == j + 1
        assert by_length.outputs[0].finish_reason == "length"
    assert max(last_step) > 1  # some request ended in a step that emitted several tokens
    # eos: generation_config.json's ids end a reply (unless ignore_eos)
    eos_ids = sorted({out.outputs[0].token_ids[j] for out, j in zip(full, stops[::2])})
    folder = tmp_path / "genconf"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}))
    eos = SamplingParams(temperature=0.0, max_tokens=40)
    outs = {}
    for name, extra in (("spec", dict(speculative_config=SPEC)), ("plain", {})):
        llm = make_llm(base, generation_config=str(folder), **kw, **extra)
        outs[name], _ = _generate(llm, prompts, eos, loras)
    _assert_same(outs["spec"], outs["plain"])
    assert sum(o.outputs[0].finish_reason == "stop" for o in outs["spec"]) >= 3


def test_penalties_and_bad_words_per_position(spec_model):
    """Repetition, presence and frequency penalties and bad words depend on the output
    before each position: applied per draft position they give the same tokens. (A
    negative presence penalty keeps the output repetitive enough for drafts.)"""
    base, adapters = spec_model
    prompts = _prompts()
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=2,
                            repetition_penalty=1.1, presence_penalty=-0.6,
                            frequency_penalty=0.2, bad_words=["sea shells"])
    loras = [_lora(adapters, n) for n in (None, "r8", "r16", None, "r4", "r8")]
    kw = dict(enable_lora=True, max_lora_rank=16, max_loras=3)
    spec = make_llm(base, speculative_config=SPEC, **kw)
    spec_outs, _ = _generate(spec, prompts, params, loras)
    plain_outs, _ = _generate(make_llm(base, **kw), prompts, params, loras)
    _assert_same(spec_outs, plain_outs)
    assert _spec_stats(spec).num_accepted_tokens > 0


def test_chunked_prefill_and_prefix_cache(spec_model):
    """Chunks of 5 tokens, blocks of 8, prefix caching on. A second round of prompts
    made of the first round's prompts and outputs hits blocks committed while drafts
    were verified: were a rejected draft's K/V or tokens hashed, its output would differ."""
    base, adapters = spec_model
    prompts = _prompts()
    loras = [_lora(adapters, n) for n in ("r8", None, "r4", "r8", None, "r16")]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=1)
    kw = dict(enable_lora=True, max_lora_rank=16, max_loras=2, block_size=8,
              max_num_batched_tokens=5, enable_prefix_caching=True)
    spec, plain = make_llm(base, speculative_config=SPEC, **kw), make_llm(base, **kw)
    first, _ = _generate(spec, prompts, params, loras)
    _assert_same(first, _generate(plain, prompts, params, loras)[0])
    again = [p + o.outputs[0].token_ids[:24] for p, o in zip(prompts, first)]
    hits = spec.llm_engine.block_manager.num_hit_tokens
    second, _ = _generate(spec, again, params, loras)
    assert spec.llm_engine.block_manager.num_hit_tokens - hits >= 8 * len(again)
    _assert_same(second, _generate(make_llm(base, **kw), again, params, loras)[0])
    assert _spec_stats(spec).num_accepted_tokens > 0


def test_n_greater_than_one_and_seeds(spec_model):
    """n = 3 greedy completions all equal the plain engine's; seeded random sampling with
    drafts is reproducible (same seed, same config, same output)."""
    base, adapters = spec_model
    prompts = _prompts()[:3]
    loras = [_lora(adapters, n) for n in (None, "r8", "r4")]
    greedy = SamplingParams(n=3, temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    kw = dict(enable_lora=True, max_lora_rank=16, max_loras=2)
    spec = make_llm(base, speculative_config=SPEC, **kw)
    _assert_same(_generate(spec, prompts, greedy, loras)[0],
                 _generate(make_llm(base, **kw), prompts, greedy, loras)[0])
    seeded = SamplingParams(n=2, temperature=0.8, top_p=0.95, seed=11, max_tokens=24,
                            ignore_eos=True)
    runs = [_generate(make_llm(base, speculative_config=SPEC, **kw), prompts, seeded,
                      loras)[0] for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]


def test_preemption_with_drafts(spec_model):
    """A KV cache of 12 blocks of 8 for six sequences: preemption by recompute, drafts
    only where free blocks allow; the outputs are the plain engine's."""
    base, adapters = spec_model
    prompts = _prompts()
    loras = [_lora(adapters, n) for n in (None, "r8", "r16", None, "r4", "r8")]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    kw = dict(enable_lora=True, max_loras=3, max_lora_rank=16, max_model_len=64,
              num_gpu_blocks_override=12, block_size=8)
    spec = make_llm(base, speculative_config=SPEC, **kw)
    spec_outs, _ = _generate(spec, prompts, params, loras)
    _assert_same(spec_outs, _generate(make_llm(base, **kw), prompts, params, loras)[0])
    assert spec.llm_engine.scheduler.num_preemptions > 0
    assert _spec_stats(spec).num_accepted_tokens > 0
    bm = spec.llm_engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # every draft block came back


def test_structured_outputs_get_no_drafts(spec_model):
    """A request with structured outputs decodes one token per step beside drafted ones:
    its grammar state cannot be verified several positions at once."""
    pytest.importorskip("xgrammar")
    base, _ = spec_model
    prompts = _prompts()[:2]
    constrained = SamplingParams(temperature=0.0, max_tokens=12, structured_outputs=(
        StructuredOutputsParams(regex="(ab){2,5}c")))
    free = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    spec = make_llm(base, speculative_config=SPEC)
    spec_outs, _ = _generate(spec, prompts, [constrained, free])
    plain_outs, _ = _generate(make_llm(base), prompts, [constrained, free])
    _assert_same(spec_outs, plain_outs)
    assert spec_outs[0].outputs[0].text == plain_outs[0].outputs[0].text
    stats = _spec_stats(spec)
    alone, _ = _generate(spec, prompts[:1], constrained)
    assert _spec_stats(spec).num_drafts == stats.num_drafts  # none for it alone


# ---- the server ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def servers(spec_model):
    """The same server with and without --speculative-config."""
    base, adapters = spec_model
    args = ["--served-model-name", "tiny", "--enable-lora", "--max-loras", "2",
            "--max-lora-rank", "16", "--max-model-len", "256", "--dtype", "float32",
            "--lora-modules", f"r4={adapters['r4']}", f"r8={adapters['r8']}"]
    with RemoteServer(base, [*args, "--speculative-config", json.dumps(SPEC)]) as spec, \
            RemoteServer(base, args) as plain:
        yield spec, plain


def _metric_values(server, name: str) -> float:
    return sum(s.value for family in text_string_to_metric_families(server.get("/metrics").text)
               for s in family.samples if s.name == name)


def test_server_completions_and_streaming_chat_match(servers):
    """Greedy completions and streamed chats through the openai client: the text of the
    server with drafts is the server without them's; /metrics counts the drafts."""
    spec, plain = servers
    kw = dict(temperature=0, max_tokens=40, extra_body={"ignore_eos": True})
    for model in ("tiny", "r4", "r8"):
        got = [s.get_client().completions.create(model=model, prompt=TEXTS[0], **kw)
               for s in (spec, plain)]
        assert got[0].choices[0].text == got[1].choices[0].text
        assert got[0].usage.completion_tokens == got[1].usage.completion_tokens == 40
        messages = [{"role": "user", "content": TEXTS[1]}]
        chunks = list(spec.get_client().chat.completions.create(
            model=model, messages=messages, stream=True, **kw))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        full = plain.get_client().chat.completions.create(model=model, messages=messages,
                                                          **kw)
        assert streamed == full.choices[0].message.content
    # a streamed completion: several tokens (and their logprobs) may come in one chunk
    kw["extra_body"] = {"ignore_eos": True, "return_tokens_as_token_ids": True}
    chunks = list(spec.get_client().completions.create(model="r8", prompt=TEXTS[2],
                                                       stream=True, logprobs=1, **kw))
    full = plain.get_client().completions.create(model="r8", prompt=TEXTS[2], logprobs=1,
                                                 **kw)
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert [t for c in chunks for t in token_ids_of(c.choices[0].logprobs)] == \
        token_ids_of(full.choices[0].logprobs)
    assert len(chunks) < 40  # some chunks carried several tokens
    drafts = _metric_values(spec, "loraplex:spec_decode_num_drafts_total")
    drafted = _metric_values(spec, "loraplex:spec_decode_num_draft_tokens_total")
    accepted = _metric_values(spec, "loraplex:spec_decode_num_accepted_tokens_total")
    per_pos = _metric_values(spec, "loraplex:spec_decode_num_accepted_tokens_per_pos_total")
    assert drafts > 0 and drafted > accepted > 0 and per_pos == accepted
    assert _metric_values(plain, "loraplex:spec_decode_num_drafts_total") == 0


@pytest.mark.parametrize("spec, needle", [
    ('{"method": "eagle", "num_speculative_tokens": 3}', "method 'eagle' needs a 'model'"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, '
     '"prompt_lookup_max": 2}', "prompt_lookup_min (3) must be <="),
    ("{nope", "not valid JSON"),
])
def test_serve_refuses_a_bad_speculative_config(spec_model, spec, needle):
    res = subprocess.run(serve_cmd(spec_model[0], "--speculative-config", spec),
                         capture_output=True, text=True, timeout=120, env=clean_env())
    assert res.returncode == 2, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in res.stderr
