"""SamplingParams: vLLM's defaults, normalization, and one clear error per bad field."""

from __future__ import annotations

import math

import pytest

from loraplex.sampling_params import MAX_LOGPROBS, SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (1, 0, 0, 1)
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1.0, 1.0, 0, 0.0, None)
    assert p.stop == [] and p.stop_token_ids == []
    assert (p.ignore_eos, p.max_tokens, p.min_tokens, p.logprobs) == (False, 16, 0, None)
    assert p.prompt_logprobs is None
    assert p.skip_special_tokens and p.spaces_between_special_tokens
    assert not p.include_stop_str_in_output
    assert not p.greedy


def test_normalization():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(5, 7)).stop_token_ids == [5, 7]
    assert SamplingParams(top_k=-1).top_k == -1
    assert SamplingParams(max_tokens=None).max_tokens is None


def test_greedy_threshold():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=1e-4).greedy


def test_clone_is_deep():
    p = SamplingParams(stop=["x"], stop_token_ids=[3], seed=1)
    q = p.clone()
    assert q == p and q is not p
    q.stop.append("y")
    q.stop_token_ids.append(4)
    q.max_tokens = 99
    assert p.stop == ["x"] and p.stop_token_ids == [3] and p.max_tokens == 16


@pytest.mark.parametrize("field, value, fragment", [
    ("n", 0, ">= 1"),
    ("n", 1.5, ">= 1"),
    ("presence_penalty", 2.5, "[-2, 2]"),
    ("presence_penalty", -2.01, "[-2, 2]"),
    ("frequency_penalty", 3.0, "[-2, 2]"),
    ("frequency_penalty", math.nan, "[-2, 2]"),
    ("repetition_penalty", 0.0, "> 0"),
    ("repetition_penalty", -1.0, "> 0"),
    ("temperature", -0.1, ">= 0"),
    ("temperature", math.nan, ">= 0"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.1, "(0, 1]"),
    ("top_k", -2, "-1 or 0"),
    ("top_k", 2.5, "-1 or 0"),
    ("min_p", -0.1, "[0, 1]"),
    ("min_p", 1.5, "[0, 1]"),
    ("seed", "7", "int"),
    ("max_tokens", 0, ">= 1"),
    ("max_tokens", -5, ">= 1"),
    ("min_tokens", -1, ">= 0"),
    ("logprobs", -1, ">= 0"),
    ("prompt_logprobs", -1, ">= 0"),
    ("stop", "", "non-empty"),
    ("stop", ["ok", ""], "non-empty"),
    ("stop_token_ids", [1, -3], "ints >= 0"),
])
def test_validation_errors_name_field_value_and_range(field, value, fragment):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    msg = str(err.value)
    # the OpenAI server turns the first word into the error's `param`
    assert msg.split(" ", 1)[0] == field
    assert fragment in msg
    shown = repr([value] if field == "stop" and isinstance(value, str) else value)
    assert shown in msg


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match=r"^min_tokens must be <= max_tokens \(4\), got 5"):
        SamplingParams(max_tokens=4, min_tokens=5)
    assert SamplingParams(max_tokens=None, min_tokens=100).min_tokens == 100
    assert SamplingParams(max_tokens=4, min_tokens=4).min_tokens == 4


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.0), dict(top_p=1e-3), dict(top_k=1), dict(min_p=1.0),
    dict(presence_penalty=-2, frequency_penalty=2), dict(logprobs=0),
    dict(logprobs=MAX_LOGPROBS), dict(repetition_penalty=1e-3), dict(seed=0),
])
def test_boundaries_accepted(kwargs):
    SamplingParams(**kwargs)
