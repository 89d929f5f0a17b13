"""LoRAX's / TGI's generate API (POST /generate, /generate_stream, /) on a real server,
driven by huggingface_hub's InferenceClient (TGI's client, which LoRAX's mirrors) and by
httpx with lorax-client's bodies. Each request's adapter is `adapter_id`; what comes back
(tokens, logprobs, text) is what the offline LLM gives for the same prompt and adapter,
which tests/test_engine_parity.py holds against HF + PEFT. Bad requests fail alone, in
TGI's error shape."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError as HFValidationError

from loraplex import LoRARequest, SamplingParams
from tests.engine_utils import make_llm
from tests.server_utils import RemoteServer

PROMPT = "The quick brown fox"
ADAPTERS = ("r4_qv", "r8_all")


@pytest.fixture(scope="module")
def server(tiny_models, tiny_adapters):
    adapters = tiny_adapters["llama"]
    args = ["--dtype", "float32", "--max-model-len", "256", "--enable-lora", "--max-loras", "1",
            "--max-lora-rank", "16",
            "--lora-modules", *[f"{name}={adapters[name]}" for name in ADAPTERS]]
    with RemoteServer(tiny_models["llama"], args) as s:
        yield s


@pytest.fixture(scope="module")
def offline(tiny_models, tiny_adapters):
    """adapter name (None: the base) -> the offline LLM's greedy output for PROMPT, with
    logprobs (top 2) and prompt logprobs."""
    llm = make_llm(tiny_models["llama"], enable_lora=True, max_loras=1, max_lora_rank=16)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2,
                            prompt_logprobs=0)
    out = {}
    for i, name in enumerate((None, *ADAPTERS), start=1):
        lora = LoRARequest(name, i, str(tiny_adapters["llama"][name])) if name else None
        out[name] = llm.generate([PROMPT], params, lora_request=lora, use_tqdm=False)[0]
    return out


def test_text_generation_details_match_the_engine(server, offline):
    """huggingface_hub's client, details on: each adapter's tokens, their logprobs and the
    prompt's (decoder_input_details) are the engine's; top_n_tokens its top 2."""
    client = InferenceClient(base_url=server.url)
    for name in (None, *ADAPTERS):
        want = offline[name]
        res = client.text_generation(PROMPT, adapter_id=name, max_new_tokens=8, details=True,
                                     decoder_input_details=True, top_n_tokens=2, stop=[])
        o = want.outputs[0]
        assert [t.id for t in res.details.tokens] == list(o.token_ids)
        assert [t.logprob for t in res.details.tokens] == pytest.approx(
            [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)], abs=1e-5)
        assert res.generated_text == o.text == "".join(t.text for t in res.details.tokens)
        assert res.details.finish_reason == "length" and res.details.generated_tokens == 8
        assert [t.id for t in res.details.prefill] == list(want.prompt_token_ids)
        assert res.details.prefill[0].logprob is None
        assert [t.logprob for t in res.details.prefill[1:]] == pytest.approx(
            [e[t].logprob for t, e in zip(want.prompt_token_ids[1:],
                                          want.prompt_logprobs[1:])], abs=1e-5)
        for position, top in zip(o.logprobs, res.details.top_tokens):
            best = sorted(position.items(), key=lambda kv: kv[1].rank)[:2]
            # (this client leaves top_tokens' entries as dicts)
            assert [t["id"] if isinstance(t, dict) else t.id for t in top] == \
                [t for t, _ in best]
    assert offline[None].outputs[0].token_ids != offline["r8_all"].outputs[0].token_ids


def test_streamed_tokens_add_up_to_the_text(server, offline):
    client = InferenceClient(base_url=server.url)
    events = list(client.text_generation(PROMPT, adapter_id="r8_all", max_new_tokens=8,
                                         stream=True, details=True))
    o = offline["r8_all"].outputs[0]
    assert [e.token.id for e in events] == list(o.token_ids)
    assert "".join(e.token.text for e in events) == o.text
    assert all(e.details is None for e in events[:-1])
    assert events[-1].generated_text == o.text and events[-1].details.generated_tokens == 8
    assert events[-1].details.finish_reason == "length"


def test_lorax_client_bodies(server, offline):
    """What lorax-client posts (to the base URL; `stream` picks the route) and reads: a
    list of one response on "/", LoRAX's per-token alternatives, `data:` events."""
    parameters = {"adapter_id": "r4_qv", "adapter_source": "hub", "merged_adapters": None,
                  "api_token": None, "do_sample": False, "max_new_tokens": 8,
                  "ignore_eos_token": True, "repetition_penalty": None,
                  "return_full_text": True, "stop": [], "seed": None, "temperature": None,
                  "top_k": None, "top_p": None, "truncate": None, "typical_p": None,
                  "best_of": None, "watermark": False, "details": True,
                  "decoder_input_details": False, "return_k_alternatives": 2,
                  "response_format": None}
    o = offline["r4_qv"].outputs[0]
    res = httpx.post(server.url_for("/"), json={"inputs": PROMPT, "parameters": parameters,
                                                "stream": False}, timeout=60)
    assert res.status_code == 200, res.text
    (body,) = res.json()
    assert body["generated_text"] == PROMPT + o.text  # return_full_text
    tokens = body["details"]["tokens"]
    assert [t["id"] for t in tokens] == list(o.token_ids)
    assert body["details"]["prompt_tokens"] == len(offline["r4_qv"].prompt_token_ids)
    assert all(t["alternative_tokens"][0]["id"] == t["id"] for t in tokens)  # greedy: top 1
    with httpx.stream("POST", server.url_for("/"), timeout=60,
                      json={"inputs": PROMPT, "parameters": parameters, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    events = [json.loads(line.removeprefix("data:")) for line in lines]
    assert [e["token"]["id"] for e in events] == list(o.token_ids)
    assert events[-1]["details"]["prompt_tokens"] == body["details"]["prompt_tokens"]


def test_adapters_share_batches(server, offline):
    """Concurrent requests for the base and both adapters over one slot: each gets its
    own adapter's output."""
    def one(name):
        return httpx.post(server.url_for("generate"), timeout=120, json={
            "inputs": PROMPT, "parameters": {"adapter_id": name, "max_new_tokens": 8,
                                             "details": True}}).json()
    names = [None, *ADAPTERS] * 3
    with ThreadPoolExecutor(len(names)) as pool:
        bodies = list(pool.map(one, names))
    for name, body in zip(names, bodies):
        assert [t["id"] for t in body["details"]["tokens"]] == \
            list(offline[name].outputs[0].token_ids)


def test_sampling_seeds_and_best_of(server):
    """A sampled request without a seed reports the one it used, which reproduces it;
    best_of keeps the likeliest sequence and returns the others."""
    client = InferenceClient(base_url=server.url)
    first = client.text_generation(PROMPT, do_sample=True, max_new_tokens=8, details=True,
                                   temperature=1.5)
    assert first.details.seed is not None
    again = client.text_generation(PROMPT, do_sample=True, max_new_tokens=8, details=True,
                                   temperature=1.5, seed=first.details.seed)
    assert again.generated_text == first.generated_text
    best = client.text_generation(PROMPT, do_sample=True, best_of=3, max_new_tokens=8,
                                  details=True, adapter_id="r8_all")
    others = best.details.best_of_sequences
    assert len(others) == 2
    cumulative = [sum(t.logprob for t in seq.tokens) for seq in [best.details, *others]]
    assert cumulative[0] == pytest.approx(max(cumulative), abs=1e-4)


def test_grammar_and_stop_sequences(server):
    client = InferenceClient(base_url=server.url)
    res = client.text_generation(PROMPT, max_new_tokens=12, details=True,
                                 grammar={"type": "regex", "value": "(yes|no)!"})
    assert res.generated_text in ("yes!", "no!")
    free = client.text_generation(PROMPT, max_new_tokens=8, details=True)
    stop = free.generated_text[2:4]
    cut = client.text_generation(PROMPT, max_new_tokens=8, details=True, stop=[stop])
    assert cut.details.finish_reason == "stop_sequence"
    assert cut.generated_text == free.generated_text[:free.generated_text.index(stop)]


@pytest.mark.parametrize("parameters, status, message", [
    ({"adapter_id": "nope"}, 404, "nope"),
    ({"typical_p": 0.5}, 422, "typical_p"),
    ({"watermark": True}, 422, "watermark"),
    ({"merged_adapters": {"ids": ["r4_qv"], "weights": []}}, 422, "merged_adapters"),
    ({"adapter_source": "s3", "adapter_id": "x"}, 422, "adapter_source"),
    ({"best_of": 2}, 422, "best_of"),
    ({"max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"max_new_tokens": 5000}, 422, "maximum context length"),
    ({"no_such_field": 1}, 422, "no_such_field"),
    ({"grammar": {"type": "ebnf", "value": "x"}}, 422, "grammar"),
])
def test_bad_requests_fail_alone_in_tgi_shape(server, parameters, status, message):
    res = server.post("generate", json={"inputs": PROMPT, "parameters": parameters})
    assert res.status_code == status, res.text
    body = res.json()
    assert message in body["error"] and body["error_type"]
    ok = server.post("generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
    assert ok.status_code == 200 and ok.json()["generated_text"]


def test_validation_errors_reach_the_client_as_its_exceptions(server):
    client = InferenceClient(base_url=server.url)
    with pytest.raises(HFValidationError, match="typical_p"):
        client.text_generation(PROMPT, typical_p=0.5, max_new_tokens=2)
    assert server.post("generate", json={"inputs": ""}).status_code == 422  # empty inputs


def test_local_adapter_source_loads_a_directory(tiny_models, tiny_adapters, offline, server):
    """LoRAX's adapter_source "local": with runtime LoRA updating on, an adapter_id that is
    a directory is loaded under that name (as /v1/load_lora_adapter would); off, a 404."""
    path = str(tiny_adapters["llama"]["r4_qv"])
    body = {"inputs": PROMPT, "parameters": {"adapter_id": path, "adapter_source": "local",
                                             "max_new_tokens": 8, "details": True}}
    assert server.post("generate", json=body).status_code == 404
    args = ["--dtype", "float32", "--max-model-len", "256", "--enable-lora",
            "--max-lora-rank", "16"]
    with RemoteServer(tiny_models["llama"], args,
                      env={"LORAPLEX_ALLOW_RUNTIME_LORA_UPDATING": "1"}) as s:
        for _ in range(2):  # loaded once, then served by name
            res = s.post("generate", json=body)
            assert res.status_code == 200, res.text
            assert [t["id"] for t in res.json()["details"]["tokens"]] == \
                list(offline["r4_qv"].outputs[0].token_ids)
        assert path in [m["id"] for m in s.get("v1/models").json()["data"]]
