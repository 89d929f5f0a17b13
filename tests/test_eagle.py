"""EAGLE / EAGLE-3 speculative decoding: configuration and start-up checks; the head's
proposals against an independent plain-torch computation of the head (tests/
eagle_fixtures.py) on the HF (+ PEFT) target's features, greedy and sampled (the
distributions handed to the rejection sampler); the engine with a head against the same
engine without one and against HF transformers + PEFT (mixed adapters); a head built to
predict the target's greedy token (every draft accepted, stops inside accepted runs);
chunked prefill, preemption, abort, prefix caching, structured outputs; the server."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from loraplex import SamplingParams
from loraplex.engine.arg_utils import parse_speculative_config
from tests.eagle_fixtures import (
    hf_features,
    make_eagle1_head,
    make_eagle3_head,
    reference_drafts,
)
from tests.engine_utils import check_against_hf, make_llm
from tests.fixtures import (
    edited_copy,
    load_hf_model,
    load_tokenizer,
    make_peft_adapter,
    make_tiny_model,
)
from tests.server_utils import clean_env, serve_cmd
from tests.test_draft_model import (
    _assert_draft_cache_empty,
    _check_draft_cache,
    _loras,
    _prompts,
    check_added_tokens,
    check_second_tokens_follow_target,
    check_spec_server,
)
from tests.test_spec_decode import _assert_same, _generate

K = 3
AUX = {"e3": [0, 2, 3], "e3s": [1, 2, 3]}  # the EAGLE-3 heads' target layers
METHOD = {"e1": "eagle", "e3": "eagle3", "e3s": "eagle3"}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A 4-layer tiny llama target and adapters of ranks 4 and 8 on it; random heads:
    EAGLE-1 (with fc.bias; trained on 32 positions, served on more), EAGLE-3 with a draft vocabulary of 200 (d2t), EAGLE-3 in the
    speculators format (norm_before_residual); and an oracle pair: a target whose next
    token depends on its last token only (attention and MLP outputs zeroed, final norm
    weight 1) and an EAGLE-1 head that passes the next token's embedding through (fc
    picks it, its layer's outputs zeroed), so its drafts are the target's greedy
    tokens."""
    root = tmp_path_factory.mktemp("eagle")
    base = make_tiny_model(root / "base", "llama", seed=3, init_std=0.1, num_layers=4)
    bigram = edited_copy(base, root / "bigram", tensors=lambda t: {
        k: (torch.zeros_like(v) if k.endswith(("o_proj.weight", "down_proj.weight")) else
            torch.ones_like(v) if k == "model.norm.weight" else v) for k, v in t.items()},
        weights="model.safetensors")
    oracle = make_eagle1_head(bigram, root / "oracle", fc_bias=False)
    t = torch.load(oracle / "pytorch_model.bin", weights_only=True)
    h = t["fc.weight"].shape[0]
    t["fc.weight"] = torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1)
    for k in ("layers.0.self_attn.o_proj.weight", "layers.0.mlp.down_proj.weight"):
        t[k] = torch.zeros_like(t[k])
    torch.save(t, oracle / "pytorch_model.bin")
    return {
        "base": base, "bigram": bigram, "oracle": oracle,
        "e1": make_eagle1_head(base, root / "e1", seed=5, max_position_embeddings=32),
        "e3": make_eagle3_head(base, root / "e3", seed=6, draft_vocab=200, aux_ids=AUX["e3"]),
        "e3s": make_eagle3_head(base, root / "e3s", seed=7, speculators=True,
                                aux_ids=AUX["e3s"]),
        "r4": make_peft_adapter(base, root / "r4", r=4, target_modules=["q_proj", "v_proj"],
                                seed=21, scale=0.2),
        "r8": make_peft_adapter(base, root / "r8", r=8, target_modules="all-linear",
                                seed=22, scale=0.2),
    }


def _spec(models: dict[str, Path], head: str, k: int = K) -> dict:
    return {"method": METHOD.get(head, "eagle"), "model": str(models[head]),
            "num_speculative_tokens": k}


def _stats(llm):
    return llm.llm_engine.get_stats().spec_decode


def _record_proposals(llm, pause: range = range(0)) -> list[tuple]:
    """Every proposal the scheduler gets, as it gets it: (sequence, its tokens then, the
    drafts, their distributions or None). The real proposer runs; this only keeps a copy.
    In the scheduler's steps in `pause` it is not asked: no drafts then (as when none
    fit), so those steps decode plainly."""
    scheduler = llm.llm_engine.scheduler
    propose, seen = scheduler.propose, []

    def keep(seqs):
        if scheduler.num_steps in pause:
            return [([], None)] * len(seqs)
        out = propose(seqs)
        for seq, (tokens, q) in zip(seqs, out):
            if tokens:
                seen.append((seq, list(seq.token_ids), list(tokens), q))
        return out

    scheduler.propose = keep
    return seen


# ---- configuration ----------------------------------------------------------------------
def test_eagle_config_forms():
    cfg = parse_speculative_config('{"method": "eagle3", "model": "/h", '
                                   '"num_speculative_tokens": 4}')
    assert (cfg.method, cfg.model, cfg.num_speculative_tokens) == ("eagle3", "/h", 4)
    cfg = parse_speculative_config({"method": "eagle", "model": "h", "revision": "main",
                                    "num_speculative_tokens": 2, "max_model_len": 128,
                                    "draft_tensor_parallel_size": 1})
    assert (cfg.method, cfg.revision, cfg.max_model_len) == ("eagle", "main", 128)
    for spec, match in (({"method": "eagle3", "num_speculative_tokens": 2}, "needs a 'model'"),
                        ({"method": "eagle", "model": "h", "num_speculative_tokens": 2,
                          "quantization": "fp8"}, "unknown key"),
                        ({"method": "eagle", "model": "h", "num_speculative_tokens": 0},
                         "num_speculative_tokens must be")):
        with pytest.raises(ValueError, match=match):
            parse_speculative_config(spec)


def test_bad_heads_fail_at_start_up(models, tmp_path):
    """A missing head, one of another hidden size, vocab size or depth, EAGLE-3 layer
    ids out of range or repeated (the default ids on a 4-layer target: 2, 2, 1), a head
    of the other method, a head missing a tensor: the engine refuses to start, saying
    why."""
    base = models["base"]

    def start(method: str, head: Path) -> None:
        make_llm(base, speculative_config={"method": method, "model": str(head),
                                           "num_speculative_tokens": 2})

    with pytest.raises(ValueError, match="EAGLE head model .* neither a local directory"):
        start("eagle", tmp_path / "nope")
    narrow = make_eagle1_head(base, tmp_path / "narrow", hidden_size=32, intermediate_size=64)
    with pytest.raises(ValueError, match="features of width 32; the target's hidden_size "
                                         "is 64"):
        start("eagle", narrow)
    with pytest.raises(ValueError, match=r"vocab_size \(600\) is not the target's \(512\)"):
        start("eagle", make_eagle1_head(base, tmp_path / "wide", vocab_size=600))
    with pytest.raises(ValueError, match="has 2 layers; loraplex runs one-layer heads"):
        start("eagle", make_eagle1_head(base, tmp_path / "deep", num_hidden_layers=2))
    small = make_eagle3_head(base, tmp_path / "small", aux_ids=[0, 2, 3], hidden_size=32,
                             intermediate_size=64, target_hidden_size=64)
    with pytest.raises(ValueError, match="hidden size 32. has no embed_tokens of its own and "
                                         "the target's is 64 wide"):
        start("eagle3", small)
    far = make_eagle3_head(base, tmp_path / "far", aux_ids=[0, 2, 9])
    with pytest.raises(ValueError, match=r"three distinct layers of the target's 4; layer "
                                         r"ids \[0, 2, 9\]"):
        start("eagle3", far)
    default = make_eagle3_head(base, tmp_path / "default")
    with pytest.raises(ValueError, match=r"layer ids \[2, 2, 1\]"):
        start("eagle3", default)
    with pytest.raises(ValueError, match="is an EAGLE-3 head: use method 'eagle3'"):
        start("eagle", models["e3"])
    with pytest.raises(ValueError, match="is an EAGLE-1 head: use method 'eagle'"):
        start("eagle3", models["e1"])
    holed = tmp_path / "holed"
    shutil.copytree(models["e1"], holed)
    t = torch.load(holed / "pytorch_model.bin", weights_only=True)
    del t["layers.0.mlp.down_proj.weight"]
    torch.save(t, holed / "pytorch_model.bin")
    with pytest.raises(ValueError, match="lacks weights for: model.layers.0.mlp.down_proj"):
        start("eagle", holed)


def test_eagle_state_keeps_the_latest_features_per_position():
    """A sequence's waiting features: a later computation of a position replaces the
    earlier one and drops what lay after it (a rejected draft's rows), positions the
    head has read are not taken again, a gap is refused (the proposer then starts the
    state over); positions count from the state's offset."""
    from loraplex.engine.eagle import EagleState
    from loraplex.engine.sequence import Sequence

    state = EagleState(Sequence("r", 0, list(range(10)), SamplingParams()), offset=2)
    rows = torch.arange(12.0)[:, None]  # row value = the position it stands for
    assert state.add(2, rows[2:6]) and state.features.flatten().tolist() == [2, 3, 4, 5]
    assert state.add(4, rows[4:5] + 100)  # position 4 again: 5 (stale) goes
    assert state.features.flatten().tolist() == [2, 3, 104]
    state.num_computed_tokens, state.features = 2, state.features[2:]  # 2 positions read
    assert state.add(3, rows[3:7])  # 3 (read already) not taken again, 4 replaced
    assert state.features.flatten().tolist() == [4, 5, 6]
    assert not state.add(10, rows[10:11])  # positions 7..9 never came
    assert state.features.flatten().tolist() == [4, 5, 6]


# ---- the head's math --------------------------------------------------------------------
@pytest.mark.parametrize("head", ["e1", "e3", "e3s"])
def test_proposals_match_a_reference_head(models, head):
    """Every proposal of a mixed batch (base, r8, base; one request sampled at 0.8) is the
    plain-torch head's on the HF + PEFT target's features of the same tokens: the drafts
    of greedy requests its argmaxes, a sampled request's distributions its softmax at
    the temperature, given the drafts drawn. So the features (the adapted target's,
    EAGLE-3's layers; of prompt chunks, verified drafts and, in two steps without
    drafts, plain decodes), their alignment, the catch-up, the head's own features fed
    back and d2t are right, not only the outputs."""
    base = models["base"]
    llm = make_llm(base, speculative_config=_spec(models, head), enable_lora=True,
                   max_loras=2, max_lora_rank=8, enable_prefix_caching=False,
                   max_num_batched_tokens=16)
    seen = _record_proposals(llm, pause=range(6, 8))
    names = [None, "r8", None]
    greedy = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, max_tokens=14, ignore_eos=True, seed=1)
    _generate(llm, _prompts()[:3], [greedy, greedy, sampled], _loras(models, names))
    hf = load_hf_model(base)
    embed, lm_head = hf.model.embed_tokens.weight.float(), hf.lm_head.weight.float()
    adapters = {0: None, 2: models["r8"]}
    checked = 0
    for seq, tokens, drafts, q in seen:
        target = load_hf_model(base, adapters[seq.lora_int_id])
        features = hf_features(target, tokens[:-1], AUX.get(head))
        want, logits = reference_drafts(METHOD[head], models[head], embed, lm_head, tokens,
                                        features, len(drafts),
                                        given=drafts if q is not None else None)
        if q is None:
            assert drafts == want, (seq.seq_id, tokens)
        else:
            probs = torch.stack([torch.softmax(lg / 0.8, -1) for lg in logits])
            torch.testing.assert_close(q.float().cpu(), probs, atol=1e-4, rtol=1e-3)
        checked += 1
    assert checked > 20 and any(q is not None for *_, q in seen)
    assert {s.lora_int_id for s, *_ in seen} == {0, 2}


# ---- the engine -------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["e1", "e3"])
def test_greedy_mixed_adapters_match_plain_and_peft(models, head):
    """Base and adapters of ranks 4 and 8 in one batch, the head run without adapters:
    the tokens are the engine's without speculation and HF + PEFT's, logprobs within
    1e-4 (random heads: nearly every draft is rejected, the counters count them)."""
    base = models["base"]
    prompts = _prompts()
    names = [None, "r4", "r8", None, "r8", "r4"]
    loras = _loras(models, names)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3)
    kw = dict(enable_lora=True, max_loras=2, max_lora_rank=8)
    spec = make_llm(base, speculative_config=_spec(models, head), **kw)
    spec_outs, _ = _generate(spec, prompts, params, loras)
    _assert_same(spec_outs, _generate(make_llm(base, **kw), prompts, params, loras)[0])
    stats = _stats(spec)
    assert stats.num_drafts > 30 and stats.num_draft_tokens > stats.num_accepted_tokens
    check_against_hf(spec_outs, base, [models[n] if n else None for n in names], prompts)
    _assert_draft_cache_empty(spec)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_eagle3_through_the_triton_attention(models, monkeypatch):
    """The CUDA path's attention (the Triton kernels, under the interpreter here) for
    the target and the head: the head's catch-up chunks (blocks of 8, chunks of 6) and
    its one-row draft forwards over its own block tables; the tokens are the plain
    engine's."""
    import tests.test_attention  # noqa: F401  (on the CPU: Triton under the interpreter)

    monkeypatch.setenv("LORAPLEX_ATTENTION_BACKEND", "triton")
    base = models["base"]
    prompts = _prompts()[:2]
    loras = _loras(models, [None, "r8"])
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=1)
    kw = dict(enable_lora=True, max_loras=2, max_lora_rank=8, block_size=8,
              max_num_batched_tokens=6)
    spec = make_llm(base, speculative_config=_spec(models, "e3"), **kw)
    assert spec.llm_engine.draft.runner.attn_backend == "triton"
    seen = _record_proposals(spec)
    spec_outs, _ = _generate(spec, prompts, params, loras)
    _assert_same(spec_outs, _generate(make_llm(base, **kw), prompts, params, loras)[0])
    hf = load_hf_model(base)
    embed, lm_head = hf.model.embed_tokens.weight.float(), hf.lm_head.weight.float()
    for seq, tokens, drafts, _ in seen[:6]:  # the head's math on this path too
        target = load_hf_model(base, models["r8"] if seq.lora_int_id else None)
        features = hf_features(target, tokens[:-1], AUX["e3"])
        assert drafts == reference_drafts("eagle3", models["e3"], embed, lm_head, tokens,
                                          features, len(drafts))[0]
    assert len(seen) >= 6


def test_oracle_head_accepts_everything(models):
    """A head whose drafts are the target's greedy tokens: every draft accepted (per
    position too), K + 1 tokens a step; stops inside an accepted run (a stop string, a
    stop token, max_tokens) end it where the plain engine does."""
    bigram = models["bigram"]
    prompts = _prompts()
    spec = make_llm(bigram, speculative_config=_spec(models, "oracle"))
    params = SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True, logprobs=1)
    outs, _ = _generate(spec, prompts, params)
    _assert_same(outs, _generate(make_llm(bigram), prompts, params)[0])
    stats = _stats(spec)
    assert stats.num_drafts > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
    assert stats.accepted_per_position == [stats.num_drafts] * K
    assert spec.llm_engine.scheduler.num_steps == 1 + -(-(25 - 1) // (K + 1))
    tok = load_tokenizer()
    ids = outs[0].outputs[0].token_ids
    stops = [SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True, min_tokens=7,
                            stop=[tok.decode([ids[6]])]),
             SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True, min_tokens=7,
                            stop_token_ids=[ids[6]]),
             SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)]
    stopped, last_step = _generate(spec, [prompts[0]] * 3, stops)
    _assert_same(stopped, _generate(make_llm(bigram), [prompts[0]] * 3, stops)[0])
    assert [len(stopped[i].outputs[0].token_ids) for i in (0, 2)] == [7, 7]
    assert last_step[0] == last_step[2] == 2  # the run's first two, nothing after them
    _assert_draft_cache_empty(spec)


@pytest.mark.parametrize("head", ["e1", "e3s"])
def test_chunked_prefill_preemption_and_abort(models, head):
    """Chunks of 5 tokens, a KV cache of 12 blocks of 8 for six sequences (the head's
    as many): preemption by recompute (the head's cache and features dropped and
    rebuilt); the outputs are the plain engine's. An aborted request gives its head
    blocks back."""
    base = models["base"]
    prompts = _prompts()
    loras = _loras(models, [None, "r8", "r4", None, "r4", "r8"])
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    kw = dict(enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=64,
              num_gpu_blocks_override=12, block_size=8, max_num_batched_tokens=5)
    spec = make_llm(base, speculative_config=_spec(models, head), **kw)
    engine = spec.llm_engine
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p}, params, lora_request=loras[i])
    finished = {}
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
        _check_draft_cache(spec)
    spec_outs = [finished[str(i)] for i in range(len(prompts))]
    _assert_same(spec_outs, _generate(make_llm(base, **kw), prompts, params, loras)[0])
    assert engine.scheduler.num_preemptions > 0 and _stats(spec).num_drafts > 0
    _assert_draft_cache_empty(spec)
    engine.add_request("x", {"prompt_token_ids": prompts[0]}, params)
    while not engine.draft.num_free_blocks < engine.draft.num_blocks:
        engine.step()
    engine.abort_request("x")
    _assert_draft_cache_empty(spec)


def test_prefix_cache_hits_and_siblings(models):
    """With prefix caching, a prompt seen before is not recomputed, so the target gives
    no features for it: the head's context starts where the target's computation did
    (its state's offset), it still drafts, and the outputs (n = 2 siblings too) are the
    plain engine's."""
    base = models["base"]
    prompt = _prompts()[1]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    spec = make_llm(base, speculative_config=_spec(models, "e1"), block_size=8)
    plain = make_llm(base, block_size=8)
    first, _ = _generate(spec, [prompt], params)
    engine = spec.llm_engine
    engine.add_request("again", {"prompt_token_ids": prompt}, params)
    engine.step()
    (state,) = engine.draft.states.values()
    assert state.offset > 0 and state.offset % 8 == 0  # the cached blocks' tokens
    drafts = _stats(spec).num_drafts
    out = []
    while engine.has_unfinished_requests():
        out += [o for o in engine.step() if o.finished]
    assert out[0].outputs[0].token_ids == first[0].outputs[0].token_ids
    assert _stats(spec).num_drafts > drafts
    two = SamplingParams(n=2, temperature=0.0, max_tokens=16, ignore_eos=True)
    _assert_same(_generate(spec, [prompt, _prompts()[2]], two)[0],
                 _generate(plain, [prompt, _prompts()[2]], two)[0])
    _assert_draft_cache_empty(spec)


def test_adapter_added_tokens(models, tmp_path):
    """An adapter that adds tokens, greedy picks them often: the head (base vocabulary)
    reads them as its last token and never proposes them; the outputs are the plain
    engine's and HF + PEFT's."""
    _, outs = check_added_tokens(models["base"], _spec(models, "e3"), tmp_path)
    check_against_hf(outs, models["base"], [tmp_path / "added", None], _prompts()[:2])


def test_structured_outputs_get_no_drafts(models):
    pytest.importorskip("xgrammar")
    from loraplex.sampling_params import StructuredOutputsParams

    base = models["base"]
    constrained = SamplingParams(temperature=0.0, max_tokens=12, structured_outputs=(
        StructuredOutputsParams(regex="(ab){2,5}c")))
    spec = make_llm(base, speculative_config=_spec(models, "e3"))
    engine = spec.llm_engine
    engine.add_request("c", {"prompt_token_ids": _prompts()[0]}, constrained)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
        assert engine.draft.states == {}  # no features kept for it either
    _assert_same(outs, _generate(make_llm(base), _prompts()[:1], constrained)[0])
    assert _stats(spec).num_drafts == 0


def test_seeded_sampling_is_reproducible(models):
    base = models["base"]
    params = SamplingParams(n=2, temperature=0.9, top_p=0.95, seed=3, max_tokens=20,
                            ignore_eos=True)
    runs = [_generate(make_llm(base, speculative_config=_spec(models, "e3")),
                      _prompts()[:3], params)[0] for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]


# ---- the server -------------------------------------------------------------------------
def test_server_with_an_eagle3_head(models, tmp_path):
    """`loraplex serve --speculative-config '{"method": "eagle3", ...}'` with an adapter:
    greedy completions through the openai client equal the plain engine's; /metrics
    counts the drafts; a bad request fails alone (404) and the server carries on."""
    log = check_spec_server(models["base"], models["r8"], _spec(models, "e3"),
                            "loraplex:spec_decode_num_draft_tokens_total", tmp_path)
    assert "EAGLE-3 head" in log


def test_serve_refuses_a_missing_head(models):
    res = subprocess.run(serve_cmd(models["base"], "--dtype", "float32",
                                   "--speculative-config",
                                   '{"method": "eagle3", "model": "/nonexistent/head", '
                                   '"num_speculative_tokens": 3}'),
                         capture_output=True, text=True, timeout=120, env=clean_env())
    assert res.returncode != 0
    errors = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "EAGLE head model '/nonexistent/head' is neither" in \
        errors[0] and "Traceback" not in res.stderr


def test_sampled_tokens_keep_the_target_distribution(models):
    """Rejection sampling with the head's distributions: the random EAGLE-1 head (its q
    far from the target's p: accepted and resampled tokens both), one draft each; the
    second tokens follow the target's distribution (check_second_tokens_follow_target)."""
    spec = make_llm(models["base"], speculative_config=_spec(models, "e1", k=1),
                    max_num_seqs=256)
    check_second_tokens_follow_target(spec, models["base"], _prompts()[4][:6])
