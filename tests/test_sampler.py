"""Sampler: greedy, penalties (vs HF's processors), top-k/top-p/min-p, seeds, min_tokens,
logprobs and ranks, and one device->host transfer per call."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from loraplex.layers.sampler import Sampler, SamplingRow
from loraplex.sampling_params import SamplingParams

V = 64
EOS = 2


def row(params: SamplingParams | None = None, prompt: list[int] | None = None,
        output: list[int] | None = None, seed: int | None = None) -> SamplingRow:
    params = params or SamplingParams()
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(params, [5, 6] if prompt is None else list(prompt), list(output or []), gen)


def rand_logits(b: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(b, V, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def sampler() -> Sampler:
    return Sampler({EOS})


GREEDY = SamplingParams(temperature=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_is_argmax_and_deterministic(sampler, dtype):
    logits = rand_logits(8).to(dtype)
    before = logits.clone()
    rows = [row(GREEDY) for _ in range(8)]
    out = sampler(logits, rows)
    assert out.token_ids == logits.float().argmax(-1).tolist()
    assert sampler(logits, rows).token_ids == out.token_ids
    assert torch.equal(logits, before)  # the caller's logits are not modified
    raw = torch.log_softmax(logits.float(), -1)
    assert out.token_logprobs == pytest.approx(
        raw[torch.arange(8), out.token_ids].tolist(), abs=1e-6)
    assert out.logprobs == [None] * 8


def test_empty_batch(sampler):
    out = sampler(torch.empty(0, V), [])
    assert (out.token_ids, out.token_logprobs, out.logprobs) == ([], [], [])


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_hf(sampler, penalty):
    logits = rand_logits(3, seed=1)
    prompts = [[1, 4, 4, 9], [10, 11], []]
    outputs = [[9, 20], [], [30, 31, 30]]
    rows = [row(SamplingParams(repetition_penalty=penalty), p, o)
            for p, o in zip(prompts, outputs)]
    got = sampler.penalized_logits(logits, rows)
    hf = RepetitionPenaltyLogitsProcessor(penalty)
    for i, (p, o) in enumerate(zip(prompts, outputs)):
        want = hf(torch.tensor([p + o]), logits[i:i + 1].clone())
        torch.testing.assert_close(got[i:i + 1], want)
    assert not torch.equal(got, logits)


def test_presence_and_frequency_penalties_use_output_counts(sampler):
    logits = rand_logits(2, seed=2)
    out_ids = [7, 7, 7, 8]
    rows = [row(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [9, 9], out_ids),
            row(SamplingParams(), [9], out_ids)]
    got = sampler.penalized_logits(logits, rows)
    want = logits[0].clone()
    want[7] -= 0.5 + 3 * 0.25
    want[8] -= 0.5 + 1 * 0.25  # prompt token 9 is not penalized
    torch.testing.assert_close(got[0], want)
    torch.testing.assert_close(got[1], logits[1])


def test_greedy_argmax_is_taken_after_penalties(sampler):
    logits = torch.zeros(1, V)
    logits[0, 3], logits[0, 4] = 5.0, 4.0
    r = row(SamplingParams(temperature=0.0, repetition_penalty=2.0), [3], [])
    assert sampler(logits, [r]).token_ids == [4]


def test_top_k_1_equals_greedy(sampler):
    logits = rand_logits(16, seed=3)
    rows = [row(SamplingParams(temperature=0.3 + 0.2 * i, top_k=1)) for i in range(16)]
    assert sampler(logits, rows).token_ids == logits.argmax(-1).tolist()


def test_greedy_rows_unaffected_by_random_neighbours(sampler):
    logits = rand_logits(6, seed=4)
    rows = [row(GREEDY if i % 2 else SamplingParams(temperature=1.5), seed=i if i < 3 else None)
            for i in range(6)]
    toks = sampler(logits, rows).token_ids
    assert [toks[i] for i in (1, 3, 5)] == logits.argmax(-1)[[1, 3, 5]].tolist()


def _support(logits: torch.Tensor, warpers: list) -> set[int]:
    scores = logits[None].clone()
    for w in warpers:
        scores = w(torch.zeros(1, 1, dtype=torch.long), scores)
    return set(torch.nonzero(scores[0] > float("-inf")).flatten().tolist())


def _sampled_support(sampler: Sampler, logits: torch.Tensor, params: SamplingParams,
                     n: int = 4000) -> set[int]:
    torch.manual_seed(0)
    return set(sampler(logits.expand(n, V), [row(params) for _ in range(n)]).token_ids)


# Nine tokens with well separated probabilities, the rest practically impossible.
PEAKY = torch.full((V,), -30.0)
PEAKY[[10, 11, 12, 13, 14, 15, 16, 17, 18]] = torch.tensor(
    [3.0, 2.6, 2.2, 1.8, 1.4, 1.0, 0.6, 0.2, -0.2])


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (1.0, 3, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.0, 0, 0.6, 0.0), (1.3, 0, 0.8, 0.0),
    (1.0, 0, 1.0, 0.2), (0.8, 0, 1.0, 0.05), (1.0, 6, 0.7, 0.0), (1.2, 7, 0.9, 0.1),
])
def test_filters_keep_the_same_tokens_as_hf(sampler, temperature, top_k, top_p, min_p):
    warpers: list = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(MinPLogitsWarper(min_p))
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    assert _sampled_support(sampler, PEAKY, params) == _support(PEAKY, warpers)


@pytest.mark.parametrize("top_p", [0.5, 0.75, 0.8])
def test_top_p_boundary_like_hf(sampler, top_p):
    """A token whose higher-ranked mass exactly reaches top_p is dropped, as in HF/vLLM."""
    logits = torch.full((V,), float("-inf"))
    logits[[3, 4, 5, 6]] = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()  # exact in fp32
    params = SamplingParams(top_p=top_p)
    assert _sampled_support(sampler, logits, params, n=2000) == _support(
        logits, [TopPLogitsWarper(top_p)])


def test_mixed_filters_in_one_batch(sampler):
    """Per-row parameters: each row keeps its own support inside one batched call."""
    specs = [SamplingParams(top_k=2), SamplingParams(top_p=0.5), SamplingParams(min_p=0.3),
             SamplingParams(top_k=-1)]
    n = 2000
    rows = [row(specs[i % 4]) for i in range(4 * n)]
    torch.manual_seed(1)
    toks = sampler(PEAKY.expand(4 * n, V), rows).token_ids
    seen = [set(toks[i::4]) for i in range(4)]
    assert seen[0] == _support(PEAKY, [TopKLogitsWarper(2)])
    assert seen[1] == _support(PEAKY, [TopPLogitsWarper(0.5)])
    assert seen[2] == _support(PEAKY, [MinPLogitsWarper(0.3)])
    assert seen[3] == set(range(10, 19))


def test_random_sampling_follows_the_distribution(sampler):
    logits = torch.full((V,), -30.0)
    logits[[1, 5, 9]] = torch.tensor([0.0, 1.0, 2.0])
    n = 20000
    torch.manual_seed(2)
    toks = torch.tensor(sampler(logits.expand(n, V), [row() for _ in range(n)]).token_ids)
    freq = torch.bincount(toks, minlength=V)[[1, 5, 9]].float() / n
    torch.testing.assert_close(freq, torch.softmax(logits, -1)[[1, 5, 9]], atol=0.015, rtol=0)
    # temperature 0.5 sharpens exactly like dividing the logits
    toks = torch.tensor(sampler(logits.expand(n, V),
                                [row(SamplingParams(temperature=0.5)) for _ in range(n)]).token_ids)
    freq = torch.bincount(toks, minlength=V)[[1, 5, 9]].float() / n
    torch.testing.assert_close(freq, torch.softmax(logits / 0.5, -1)[[1, 5, 9]], atol=0.015,
                               rtol=0)


def _run_seeded(sampler: Sampler, order: list[str], steps: int = 12) -> dict[str, list[int]]:
    """Sample `steps` tokens for a batch whose rows are named in `order`; seeded rows
    named 'sX' own a generator seeded X, 'u' rows are unseeded, 'g' rows greedy."""
    gens = {name: torch.Generator().manual_seed(int(name[1:]))
            for name in order if name.startswith("s")}
    outs: dict[str, list[int]] = {name: [] for name in order}
    for step in range(steps):
        # a seeded row sees the same logits every run; the others' depend on their position
        logits = torch.stack([rand_logits(1, seed=1000 * step + (int(n[1:]) if n[0] == "s"
                                                                 else 500 + pos), scale=1.0)[0]
                              for pos, n in enumerate(order)])
        rows = [SamplingRow(GREEDY if n.startswith("g") else SamplingParams(temperature=0.9,
                                                                           top_p=0.95),
                            [1, 2], list(outs[n]), gens.get(n)) for n in order]
        for n, t in zip(order, sampler(logits, rows).token_ids):
            outs[n].append(t)
    return outs


def test_seeded_rows_independent_of_batch(sampler):
    alone = _run_seeded(sampler, ["s7"])["s7"]
    other = _run_seeded(sampler, ["s8"])["s8"]
    assert alone != other  # different seeds differ
    for order in (["u", "s7", "g", "s8"], ["s8", "g", "u", "u", "s7"], ["g", "s7"],
                  ["s7", "s8"]):
        torch.manual_seed(len(order))  # unseeded rows draw different noise each time
        outs = _run_seeded(sampler, order)
        assert outs["s7"] == alone
        if "s8" in outs:
            assert outs["s8"] == other


def test_min_tokens_blocks_eos_and_stop_tokens(sampler):
    logits = torch.zeros(1, V)
    logits[0, EOS], logits[0, 40], logits[0, 41] = 50.0, 49.0, 10.0
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[40])
    for n_out in range(3):
        assert sampler(logits, [row(params, output=[7] * n_out)]).token_ids == [41]
    assert sampler(logits, [row(params, output=[7] * 3)]).token_ids == [EOS]
    # ignore_eos: eos is not masked (it never ends the sequence), stop tokens still are
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[40], ignore_eos=True)
    assert sampler(logits, [row(params)]).token_ids == [EOS]
    logits[0, EOS] = 0.0
    assert sampler(logits, [row(params)]).token_ids == [41]
    # random rows too, and the reported logprob stays the raw one
    logits[0, EOS] = 50.0
    params = SamplingParams(min_tokens=2, logprobs=1)
    out = sampler(logits.expand(50, V), [row(params) for _ in range(50)])
    assert EOS not in out.token_ids
    assert all(lp[EOS].rank == 1 for lp in out.logprobs)


def test_logit_bias_per_row(sampler):
    logits = rand_logits(3, seed=4)
    top = logits.argmax(-1).tolist()
    rows = [row(SamplingParams(temperature=0.0, logit_bias={17: 100.0})),
            row(SamplingParams(temperature=0.0, logit_bias={top[1]: -100.0}, logprobs=0)),
            row(GREEDY)]
    out = sampler(logits, rows)
    second = logits[1].clone()
    second[top[1]] -= 100.0
    assert out.token_ids == [17, int(second.argmax()), top[2]]
    assert out.logprobs[1][out.token_ids[1]].logprob == pytest.approx(
        torch.log_softmax(logits[1], -1)[out.token_ids[1]].item())  # raw, like vLLM's
    # sampled rows too: +100 leaves no other token any chance
    params = SamplingParams(temperature=1.0, logit_bias={9: 100.0})
    assert set(sampler(logits[:1].expand(20, V), [row(params) for _ in range(20)]).token_ids) \
        == {9}
    for bad in ({3: 101.0}, {-1: 1.0}, {"3": 1.0}):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad)


def test_allowed_token_ids_and_bad_words(sampler):
    """allowed_token_ids: nothing else can be sampled (greedy or not); bad words: a one-token
    word is always banned, a longer one's last token only right after its other tokens."""
    logits = rand_logits(4, seed=5)
    top = logits.argmax(-1).tolist()
    allowed = [3, 40, 41]
    rows = [row(SamplingParams(temperature=0.0, allowed_token_ids=allowed)),
            row(GREEDY, output=[7, 8]),  # a bad word [8, top] follows: its last is banned
            row(GREEDY, output=[7, 9]),  # the same word does not follow here
            row(GREEDY)]  # a one-token bad word
    rows[1].bad_words = rows[2].bad_words = [[8, top[1]], [5, top[2]]]
    rows[3].bad_words = [[top[3]]]
    out = sampler(logits, rows)
    only = torch.full((V,), float("-inf"))
    only[allowed] = logits[0, allowed]
    assert out.token_ids[0] == int(only.argmax())
    assert out.token_ids[1] != top[1] and out.token_ids[1] == int(
        logits[1].index_fill(0, torch.tensor([top[1]]), float("-inf")).argmax())
    assert out.token_ids[2] == top[2] and out.token_ids[3] != top[3]
    sampled = sampler(logits[:1].expand(50, V), [
        row(SamplingParams(temperature=2.0, allowed_token_ids=allowed)) for _ in range(50)])
    assert set(sampled.token_ids) <= set(allowed)
    for field, bad in (("allowed_token_ids", []), ("allowed_token_ids", [-1]),
                       ("bad_words", [""]), ("truncate_prompt_tokens", 0)):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: bad})


def test_logprobs_dict_and_ranks(sampler):
    logits = torch.tensor([[0.0, 1.0, 3.0, 3.0, 2.0, -1.0] + [-5.0] * (V - 6)])
    raw = torch.log_softmax(logits, -1)[0]
    # greedy with a penalty picks token 4; logprobs stay raw (before penalty/temperature)
    params = SamplingParams(temperature=0.0, repetition_penalty=10.0, logprobs=2)
    out = sampler(logits, [row(params, prompt=[2, 3])])
    assert out.token_ids == [4]
    lp = out.logprobs[0]
    assert set(lp) == {4, 2, 3}
    assert lp[4].rank == 3 and lp[2].rank == 1 and lp[3].rank == 1  # ties share rank 1
    for t in (2, 3, 4):
        assert lp[t].logprob == pytest.approx(raw[t].item(), abs=1e-6)
        assert lp[t].decoded_token is None
    assert out.token_logprobs[0] == pytest.approx(raw[4].item(), abs=1e-6)
    # rank of a token far down the list (penalties push the greedy pick to token 0)
    far = SamplingParams(temperature=0.0, logprobs=1, presence_penalty=2, frequency_penalty=2)
    out = sampler(logits.expand(2, V), [row(SamplingParams(temperature=0.0, logprobs=0)),
                                        row(far, output=[1, 2, 2, 3, 3, 4])])
    assert out.token_ids[0] in (2, 3) and out.logprobs[0].keys() == {out.token_ids[0]}
    assert out.token_ids[1] == 0 and out.logprobs[1][0].rank == 5
    others = out.logprobs[1].keys() - {0}
    assert len(others) == 1 and others <= {2, 3} and out.logprobs[1][others.pop()].rank == 1


def test_logprobs_only_for_rows_that_ask(sampler):
    logits = rand_logits(3, seed=5)
    rows = [row(SamplingParams(logprobs=5)), row(), row(SamplingParams(logprobs=20))]
    out = sampler(logits, rows)
    assert out.logprobs[1] is None
    raw = torch.log_softmax(logits, -1)
    for i, k in ((0, 5), (2, 20)):
        d = out.logprobs[i]
        top = raw[i].topk(k).indices.tolist()
        assert set(d) == set(top) | {out.token_ids[i]}
        for t, lp in d.items():
            assert lp.logprob == pytest.approx(raw[i, t].item(), abs=1e-6)
            assert lp.rank == 1 + int((raw[i] > raw[i, t]).sum())


def test_logprobs_above_vocab_size(sampler):
    logits = torch.randn(1, 8)
    out = sampler(logits, [row(SamplingParams(logprobs=20))])
    assert set(out.logprobs[0]) == set(range(8))
    assert sorted(lp.rank for lp in out.logprobs[0].values()) == list(range(1, 9))


def test_one_device_to_host_transfer(sampler, monkeypatch):
    calls = []
    real = torch.Tensor.tolist

    def spy(self):
        calls.append(tuple(self.shape))
        return real(self)

    monkeypatch.setattr(torch.Tensor, "tolist", spy)
    for name in ("item", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, n=name, **k: pytest.fail(n))
    logits = rand_logits(4, seed=6)
    rows = [row(SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.2)),
            row(SamplingParams(top_k=5, top_p=0.9, min_p=0.05, presence_penalty=0.5,
                               frequency_penalty=0.5, min_tokens=2), output=[3, 3]),
            row(SamplingParams(logprobs=0), seed=3), row()]
    sampler(logits, rows)
    assert len(calls) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_greedy_and_seeded_rows(sampler):
    logits = rand_logits(4, seed=7).cuda().half()
    params = [GREEDY, SamplingParams(temperature=0.8, top_k=10, logprobs=3,
                                     repetition_penalty=1.3), GREEDY, SamplingParams(top_p=0.9)]

    def rows() -> list[SamplingRow]:
        return [SamplingRow(p, [1, 2], [3], torch.Generator("cuda").manual_seed(5))
                for p in params]

    out = sampler(logits, rows())
    assert [out.token_ids[i] for i in (0, 2)] == logits.float().argmax(-1)[[0, 2]].tolist()
    assert sampler(logits, rows()).token_ids == out.token_ids
    assert set(out.logprobs[1]) >= set(logits[1].float().topk(3).indices.tolist())
