"""Structured outputs (xgrammar): outputs that follow a JSON schema, a regex, a choice
list or a grammar, offline and over HTTP; constrained rows share a batch with free ones
and adapters without changing them; logprobs stay the model's raw ones; a bad spec is a
clear error (a 400 over HTTP) and nothing else is affected."""

from __future__ import annotations

import json
import re

import openai
import pytest

from loraplex import LoRARequest, SamplingParams
from loraplex.sampling_params import GuidedDecodingParams, StructuredOutputsParams
from tests.engine_utils import GREEDY, check_against_hf, make_llm
from tests.fixtures import hf_logprobs
from tests.server_utils import RemoteServer

pytest.importorskip("xgrammar")

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99},
                         "pet": {"enum": ["cat", "dog"]}},
          "required": ["name", "age", "pet"], "additionalProperties": False}
REGEX = r"[0-9]{3}-[a-z]{2}"
CHOICES = ["yes", "no", "maybe so"]


def check_schema(text: str) -> None:
    # strict=False: xgrammar's JSON strings admit raw control characters (a random model
    # picks them; JSON proper wants them escaped)
    obj = json.loads(text, strict=False)
    assert set(obj) == {"name", "age", "pet"}, obj
    assert re.fullmatch("[a-z]{1,6}", obj["name"]), obj
    assert isinstance(obj["age"], int) and 0 <= obj["age"] <= 99
    assert obj["pet"] in ("cat", "dog")


SPECS = {  # name -> (params, check of the text)
    "json": (StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True), check_schema),
    "regex": (StructuredOutputsParams(regex=REGEX),
              lambda t: re.fullmatch(REGEX, t) or pytest.fail(t)),
    "choice": (StructuredOutputsParams(choice=CHOICES), lambda t: t in CHOICES or pytest.fail(t)),
    "grammar": (StructuredOutputsParams(grammar='root ::= "(" [a-c]+ ")"'),
                lambda t: re.fullmatch(r"\([a-c]+\)", t) or pytest.fail(t)),
}


@pytest.fixture(scope="module")
def llm(tiny_models):
    return make_llm(tiny_models["llama"], enable_lora=True, max_loras=2, max_lora_rank=16)


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_outputs_follow_the_spec(llm, spec, temperature, tiny_adapters):
    """Greedy and sampled, n = 2, on the base and on an adapter: every output parses and
    the grammar's end stops it."""
    params, check = SPECS[spec]
    sp = SamplingParams(temperature=temperature, max_tokens=120, n=2, seed=3,
                        structured_outputs=params)
    lora = LoRARequest("r8_all", 1, str(tiny_adapters["llama"]["r8_all"]))
    outs = llm.generate(["the cat sat on", "my friend walked to"], sp,
                        lora_request=[None, lora], use_tqdm=False)
    for out in outs:
        for choice in out.outputs:
            check(choice.text)
            assert choice.finish_reason == "stop", choice


def test_constrained_rows_leave_the_others_alone(llm, tiny_models, tiny_adapters, prompts):
    """Free requests (base and adapters) batched with constrained ones give HF + PEFT's
    tokens; the constrained greedy row reports the raw model's logprobs."""
    base, ad = tiny_models["llama"], tiny_adapters["llama"]
    reqs = {n: LoRARequest(n, i + 1, str(ad[n])) for i, n in enumerate(("r8_all", "r4_qv"))}
    constrained = SamplingParams(temperature=0.0, max_tokens=12, logprobs=2,
                                 structured_outputs=StructuredOutputsParams(regex=REGEX))
    jobs = [(prompts[0], GREEDY, None), (prompts[1], constrained, reqs["r8_all"]),
            (prompts[2], GREEDY, reqs["r8_all"]), (prompts[3], constrained, None),
            (prompts[4], GREEDY, reqs["r4_qv"])]
    outs = llm.generate([{"prompt_token_ids": p} for p, _, _ in jobs], [s for _, s, _ in jobs],
                        lora_request=[r for _, _, r in jobs], use_tqdm=False)
    free = [i for i, (_, s, _) in enumerate(jobs) if s is GREEDY]
    check_against_hf([outs[i] for i in free], base,
                     [ad[jobs[i][2].lora_name] if jobs[i][2] else None for i in free],
                     [jobs[i][0] for i in free])
    out, prompt = outs[3], prompts[3]
    assert re.fullmatch(REGEX, out.outputs[0].text)
    tokens = out.outputs[0].token_ids
    ref = hf_logprobs(base, None, prompt + tokens)[len(prompt) - 1:]
    for step, (tok, lp) in enumerate(zip(tokens, out.outputs[0].logprobs)):
        assert abs(lp[tok].logprob - ref[step, tok].item()) < 1e-4  # raw, not masked


def test_the_grammar_end_wins_over_min_tokens_and_ignore_eos(llm):
    """min_tokens bans the stop token the finished grammar needs: the grammar wins (no
    filler tokens); ignore_eos does not run past the grammar's end either."""
    spec = StructuredOutputsParams(choice=["yes"])
    for extra in (dict(min_tokens=6), dict(ignore_eos=True)):
        out = llm.generate(["the cat"], SamplingParams(temperature=0.0, max_tokens=12,
                                                       structured_outputs=spec, **extra),
                           use_tqdm=False)[0].outputs[0]
        assert (out.text, out.finish_reason) == ("yes", "stop"), extra
        assert out.token_ids[-1] == llm.llm_engine.tokenizer.eos_token_id
        assert llm.llm_engine.tokenizer.decode(out.token_ids[:-1]) == "yes"


def test_params_are_checked(llm):
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="choice must be a non-empty list"):
        StructuredOutputsParams(choice=[])
    old = SamplingParams(guided_decoding=GuidedDecodingParams(choice=["a", "b"]))
    assert old.structured_outputs.choice == ["a", "b"] and old.guided_decoding is None
    engine = llm.llm_engine
    for bad, message in ((StructuredOutputsParams(regex="(unclosed"), "invalid structured "
                          "output regex"),
                         (StructuredOutputsParams(json='{"type": "objec'), "invalid structured "
                          "output json")):
        with pytest.raises(ValueError, match=message):
            engine.add_request("bad", "hi", SamplingParams(structured_outputs=bad))
        assert "bad" not in engine.requests


def test_openai_server(tiny_models):
    """response_format (json_schema, json_object), vLLM's guided_choice and
    structured_outputs over HTTP with the official client; bad ones are 400s."""
    args = ["--dtype", "float32", "--max-model-len", "256", "--cpu-kv-cache-gib", "0.05"]
    with RemoteServer(tiny_models["llama"], args) as server:
        client = server.get_client()
        model = client.models.list().data[0].id
        messages = [{"role": "user", "content": "Describe a pet."}]
        fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}
        res = client.chat.completions.create(
            model=model, messages=messages, max_tokens=120, temperature=0,
            response_format=fmt, extra_body={"structured_outputs": None})
        check_schema(res.choices[0].message.content)
        res = client.chat.completions.create(model=model, messages=messages, max_tokens=120,
                                             temperature=0.8, seed=1,
                                             response_format={"type": "json_object"})
        assert res.choices[0].finish_reason != "stop" or isinstance(
            json.loads(res.choices[0].message.content, strict=False), dict)
        res = client.completions.create(model=model, prompt="Is it?", max_tokens=10,
                                        extra_body={"guided_choice": CHOICES})
        assert res.choices[0].text in CHOICES
        res = client.completions.create(model=model, prompt="Code:", max_tokens=10,
                                        extra_body={"structured_outputs": {"regex": REGEX}})
        assert re.fullmatch(REGEX, res.choices[0].text)
        bad = [({"response_format": {"type": "xml"}}, "response_format type"),
               ({"guided_regex": "(", "guided_choice": ["a"]}, "one way to constrain"),
               ({"guided_regex": "(unclosed"}, "invalid structured output regex"),
               ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one of")]
        for body, message in bad:
            with pytest.raises(openai.BadRequestError) as err:
                client.completions.create(model=model, prompt="x", max_tokens=4,
                                          extra_body=body)
            assert message in str(err.value), (body, err.value)
        res = client.completions.create(model=model, prompt="still", max_tokens=3)
        assert res.choices[0].finish_reason == "length"
