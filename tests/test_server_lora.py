"""The real server, driven over HTTP: parity with HF+PEFT, streaming, concurrency, runtime
adapters, resolvers, metrics. One server for the module (start-up is the slow part)."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures import assert_greedy_close, edited_copy, hf_greedy, make_peft_adapter
from tests.server_utils import RemoteServer, token_ids_of

BASE = "tiny-base"
SERVED = ["r4_qv", "r8_all", "r16_rslora", "r8_patterns"]
GREEDY = {"temperature": 0, "max_tokens": 8, "logprobs": 0,
          "extra_body": {"ignore_eos": True, "return_tokens_as_token_ids": True}}


@pytest.fixture(scope="module")
def fs_cache(tmp_path_factory, tiny_adapters):
    cache = tmp_path_factory.mktemp("lora_cache")
    shutil.copytree(tiny_adapters["llama"]["r8_regex"], cache / "fs-r8")
    # a link into a store elsewhere, as a directory of many adapters is often laid out
    (cache / "fs-linked").symlink_to(tiny_adapters["llama"]["r16_rslora"],
                                     target_is_directory=True)
    return cache


@pytest.fixture(scope="module")
def server(tiny_models, tiny_adapters, fs_cache):
    ad = tiny_adapters["llama"]
    modules = [f"{n}={ad[n]}" for n in SERVED[:3]]
    modules.append(json.dumps({"name": "r8_patterns", "path": str(ad["r8_patterns"]),
                               "base_model_name": "tiny-parent"}))
    env = {"LORAPLEX_ALLOW_RUNTIME_LORA_UPDATING": "True",
           "LORAPLEX_PLUGINS": "lora_filesystem_resolver",
           "LORAPLEX_LORA_RESOLVER_CACHE_DIR": str(fs_cache)}
    with RemoteServer(tiny_models["llama"],
                      ["--served-model-name", BASE, "--enable-lora", "--max-loras", "2",
                       "--max-lora-rank", "16", "--max-cpu-loras", "8", "--max-model-len",
                       "128", "--dtype", "float32", "--lora-extra-vocab-size", "512",
                       "--long-lora-scaling-factors", "4.0,8.0", "--lora-modules", *modules],
                      env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return server.get_client()


def greedy_ids(client, model: str, prompt: list[int], max_tokens: int = 8) -> list[int]:
    kw = dict(GREEDY, max_tokens=max_tokens)
    r = client.completions.create(model=model, prompt=prompt, **kw)
    return token_ids_of(r.choices[0].logprobs)


def check_hf(got: list[int], base, adapter, prompt: list[int]) -> None:
    if got != hf_greedy(base, adapter, prompt, len(got)):
        assert_greedy_close(got, base, adapter, prompt, tie_tol=1e-4)


def still_serves(client, prompt=None) -> None:
    r = client.completions.create(model="r8_all", prompt=prompt or "Hello", max_tokens=2,
                                  temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_announces_address_and_adapters(server, tiny_adapters):
    want = (f"loraplex: serving {BASE} at http://127.0.0.1:{server.port} (LoRA adapters: "
            f"r4_qv ({tiny_adapters['llama']['r4_qv']}), ")
    deadline = time.monotonic() + 30  # printed just after uvicorn starts serving
    while want not in server.logs() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert want in server.logs()
    assert "--lora-extra-vocab-size is accepted" not in server.logs()


def test_health_version_models(server, tiny_models, tiny_adapters):
    assert server.get("/health").status_code == 200
    assert server.get("/version").json()["version"]
    data = server.get("/v1/models").json()["data"]
    cards = {c["id"]: c for c in data}
    assert BASE in cards and cards[BASE]["root"] == str(tiny_models["llama"])
    for name in SERVED:
        assert cards[name]["root"] == str(tiny_adapters["llama"][name])
    assert cards["r4_qv"]["parent"] == BASE
    assert cards["r8_patterns"]["parent"] == "tiny-parent"


def test_outputs_equal_hf_peft(client, tiny_models, tiny_adapters, prompts):
    base = tiny_models["llama"]
    for model in [BASE, *SERVED]:
        adapter = None if model == BASE else tiny_adapters["llama"][model]
        for prompt in prompts[:3]:
            check_hf(greedy_ids(client, model, prompt), base, adapter, prompt)


def test_stream_equals_full(client, prompts):
    for model in (BASE, "r8_all"):
        kw = dict(model=model, prompt="Once upon a time", max_tokens=12, temperature=0,
                  extra_body={"ignore_eos": True})
        full = client.completions.create(**kw)
        chunks = list(client.completions.create(stream=True,
                                                stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == full.choices[0].text
        assert chunks[-1].usage.completion_tokens == 12 == full.usage.completion_tokens
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_documents_reach_the_template(client, tokenizer):
    """vLLM's `documents` (a RAG template's variable) render into the prompt."""
    template = ("{% for d in documents %}[{{ d.title }}] {{ d.text }}\n{% endfor %}"
                "{% for m in messages %}{{ m.content }}{% endfor %}")
    documents = [{"title": "Paris", "text": "The capital of France."},
                 {"title": "Oslo", "text": "The capital of Norway."}]
    messages = [{"role": "user", "content": "Which capital?"}]
    r = client.chat.completions.create(model="r4_qv", messages=messages, max_tokens=1,
                                       extra_body={"chat_template": template,
                                                   "documents": documents})
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         documents=documents)
    assert text.startswith("[Paris] The capital of France.")
    assert r.usage.prompt_tokens == len(tokenizer(text, add_special_tokens=False).input_ids)


def test_continuous_usage_stats(client):
    """vLLM's stream_options.continuous_usage_stats: every chunk carries the usage so far
    (the chunk's choice's tokens), growing to the final usage chunk's; off, only the final
    chunk has one."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    kw = dict(model="r8_all", max_tokens=6, temperature=0, stream=True,
              extra_body={"ignore_eos": True})
    text = list(client.completions.create(prompt="Once upon a time", stream_options=options,
                                          **kw))
    messages = [{"role": "user", "content": "Once upon a time"}]
    chat = list(client.chat.completions.create(messages=messages, stream_options=options, **kw))
    assert chat[0].choices[0].delta.role == "assistant" and chat[0].usage.completion_tokens == 0
    for chunks in (text, chat):
        final = chunks[-1].usage
        assert not chunks[-1].choices and final.completion_tokens == 6
        counts = [c.usage.completion_tokens for c in chunks[:-1]]
        assert counts == sorted(counts) and counts[-1] == 6 and len(set(counts)) > 3
        assert all(c.usage.prompt_tokens == final.prompt_tokens and c.usage.total_tokens
                   == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)
    plain = list(client.completions.create(prompt="Once upon a time",
                                           stream_options={"include_usage": True}, **kw))
    assert [c.usage is None for c in plain] == [True] * (len(plain) - 1) + [False]


def test_chat_matches_completion_and_streams(client, tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    extra = {"ignore_eos": True}
    full = client.chat.completions.create(model="r4_qv", messages=messages, max_tokens=10,
                                          temperature=0, extra_body=extra)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    same = client.completions.create(model="r4_qv", prompt=ids, max_tokens=10, temperature=0,
                                     extra_body=extra)
    assert full.choices[0].message.content == same.choices[0].text
    assert full.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model="r4_qv", messages=messages,
                                                 max_tokens=10, temperature=0, stream=True,
                                                 extra_body=extra))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_many_prompts_n_echo_seed(client):
    r = client.completions.create(model="r8_all", prompt=["Hello", "The sun"], n=2,
                                  max_tokens=5, temperature=0.9, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert 4 <= r.usage.completion_tokens <= 20 and r.usage.prompt_tokens > 0
    again = client.completions.create(model="r8_all", prompt=["Hello", "The sun"], n=2,
                                      max_tokens=5, temperature=0.9, seed=7)
    assert [c.text for c in r.choices] == [c.text for c in again.choices]
    echo = client.completions.create(model="r8_all", prompt="Hello", echo=True, max_tokens=3,
                                     temperature=0)
    assert echo.choices[0].text.startswith("Hello")


def server_tokens(server, text: str) -> list[int]:
    return server.post("/tokenize", json={"prompt": text}).json()["tokens"]


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_scores_the_prompt(server, client, tiny_models, tiny_adapters,
                                              prompts, stream):
    """lm-eval's loglikelihood call (echo + logprobs, one token): every prompt token but the
    first gets its logprob under the adapter, equal to HF + PEFT's; vLLM's prompt_logprobs
    extra gives the same numbers keyed by token id."""
    from tests.fixtures import hf_logprobs

    prompt = prompts[2]
    kw = dict(model="r8_all", prompt=prompt, echo=True, logprobs=1, max_tokens=1,
              temperature=0, extra_body={"prompt_logprobs": 1})
    if stream:
        chunks = list(client.completions.create(**kw, stream=True))
        choice = chunks[0].choices[0]
        lp = choice.logprobs
    else:
        choice = client.completions.create(**kw).choices[0]
        lp = choice.logprobs
    assert len(lp.tokens) == len(prompt) + 1 and lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None and lp.text_offset == sorted(lp.text_offset)
    ref = hf_logprobs(tiny_models["llama"], tiny_adapters["llama"]["r8_all"], prompt)
    want = [ref[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    assert lp.token_logprobs[1:len(prompt)] == pytest.approx(want, abs=1e-4)
    by_id = choice.model_extra["prompt_logprobs"]
    assert by_id[0] is None and len(by_id) == len(prompt)
    assert [by_id[i][str(prompt[i])]["logprob"] for i in range(1, len(prompt))] == \
        pytest.approx(want, abs=1e-4)
    assert all(by_id[i][str(prompt[i])]["rank"] >= 1 for i in range(1, len(prompt)))
    # a text prompt (the tokenizer adds a BOS the echoed text lacks): the offsets index
    # the token texts one after another and never go back
    kw.update(prompt="Hello there", max_tokens=3, extra_body={"ignore_eos": True})
    if stream:
        chunks = list(client.completions.create(**kw, stream=True))
        offsets = [o for c in chunks for o in c.choices[0].logprobs.text_offset]
        tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    else:
        lp = client.completions.create(**kw).choices[0].logprobs
        offsets, tokens = lp.text_offset, lp.tokens
    assert len(tokens) == len(offsets) == len(server_tokens(server, "Hello there")) + 3
    assert offsets == [sum(map(len, tokens[:i])) for i in range(len(tokens))]


def test_chat_echo_and_prompt_logprobs(server, client):
    """vLLM's chat extras: echo puts the continued assistant message before the reply
    (streamed as its own chunk after the role); prompt_logprobs come back per prompt
    token."""
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "The sun is"}]
    extra = {"echo": True, "continue_final_message": True, "add_generation_prompt": False,
             "prompt_logprobs": 1}
    r = client.chat.completions.create(model="r8_all", messages=messages, max_tokens=3,
                                       temperature=0, extra_body=extra)
    content = r.choices[0].message.content
    assert content.startswith("The sun is") and len(content) > len("The sun is")
    prompt_lps = r.model_extra["prompt_logprobs"]
    assert prompt_lps[0] is None and len(prompt_lps) == r.usage.prompt_tokens
    plain = client.chat.completions.create(
        model="r8_all", messages=messages, max_tokens=3, temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert content == "The sun is" + plain.choices[0].message.content
    assert plain.model_extra.get("prompt_logprobs") is None
    chunks = list(client.chat.completions.create(
        model="r8_all", messages=messages, max_tokens=3, temperature=0, stream=True,
        extra_body={"echo": True, "continue_final_message": True,
                    "add_generation_prompt": False}))
    assert chunks[1].choices[0].delta.content == "The sun is"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == content
    # a reply to the user's message: nothing to echo
    r = client.chat.completions.create(model="r8_all", messages=messages[:1], max_tokens=2,
                                       temperature=0, extra_body={"echo": True})
    assert not r.choices[0].message.content.startswith("Hi")


def test_logit_bias(client):
    """OpenAI's logit_bias: token ids as string keys; out-of-vocabulary ids, non-integer
    keys and values outside [-100, 100] are 400s naming the field."""
    r = client.completions.create(model="r4_qv", prompt="Hello", max_tokens=4,
                                  temperature=0, logit_bias={"77": 100}, logprobs=0,
                                  extra_body={"ignore_eos": True,
                                              "return_tokens_as_token_ids": True})
    assert token_ids_of(r.choices[0].logprobs) == [77] * 4
    for bad in ({"999999": 5}, {"x": 5}, {"77": 500}):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="r4_qv", prompt="Hello", max_tokens=2,
                                      logit_bias=bad)
        assert err.value.body["param"] == "logit_bias", err.value.body
    still_serves(client)


def test_tokenize_and_detokenize(server, client, tokenizer):
    """vLLM's /tokenize (a prompt, or messages through the chat template) and /detokenize;
    the ids are the ones a completion is computed on; unknown models are 404s."""
    r = server.post("/tokenize", json={"model": "r8_all", "prompt": "Hello there",
                                       "return_token_strs": True}).json()
    assert r["tokens"] == tokenizer.encode("Hello there") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 128 and len(r["token_strs"]) == r["count"]
    completion = client.completions.create(model="r8_all", prompt="Hello there", max_tokens=1)
    assert completion.usage.prompt_tokens == r["count"]
    messages = [{"role": "user", "content": "Hi"}]
    chat = server.post("/tokenize", json={"messages": messages}).json()
    reply = client.chat.completions.create(model=BASE, messages=messages, max_tokens=1)
    assert chat["count"] == reply.usage.prompt_tokens
    back = server.post("/detokenize", json={"model": BASE, "tokens": r["tokens"]}).json()
    assert back["prompt"] == tokenizer.decode(r["tokens"])
    for path, body, status in (("/tokenize", {"model": "nope", "prompt": "x"}, 404),
                               ("/tokenize", {"prompt": "x", "messages": messages}, 400),
                               ("/detokenize", {"tokens": [10**9]}, 400),
                               ("/detokenize", {"tokens": "x"}, 400)):
        resp = server.post(path, json=body)
        assert resp.status_code == status, (path, body, resp.text)
        assert resp.json()["error"]["code"] == status


def concurrent_greedy_ids(srv, jobs: list[tuple[str, tuple[int, ...], int]]) -> list[list[int]]:
    """Greedy token ids of every (model, prompt, max_tokens) job, all sent at once."""
    async def run_all():
        aclient = srv.get_async_client()

        async def one(model, prompt, max_tokens):
            r = await aclient.completions.create(model=model, prompt=list(prompt),
                                                 **dict(GREEDY, max_tokens=max_tokens))
            return token_ids_of(r.choices[0].logprobs)
        return await asyncio.gather(*(one(*job) for job in jobs))

    return asyncio.run(run_all())


def test_32_concurrent_requests_match_alone(server, client, prompts):
    models = [BASE, *SERVED]  # 5 models over max_loras=2 slots
    jobs = [(models[i % len(models)], tuple(prompts[i % len(prompts)]), 6 + i % 7)
            for i in range(32)]
    alone = {(m, p, k): greedy_ids(client, m, list(p), k) for m, p, k in set(jobs)}
    results = concurrent_greedy_ids(server, jobs)
    for job, got in zip(jobs, results):
        assert got == alone[job], job


def test_chunked_prefill_and_prefix_cache_over_http(server, client, tiny_models,
                                                    tiny_adapters, prompts):
    """A second server with 6-token chunks and 4-token blocks: concurrent requests over
    the base and adapters, most sharing a long prefix, get the tokens the main server
    gives each alone, and its /metrics counts prefix-cache hits."""
    ad = tiny_adapters["llama"]
    models = [BASE, *SERVED[:3]]
    jobs = [(models[i % 4], tuple(prompts[-1] + prompts[i % 3][1:]), 5) for i in range(12)]
    alone = {job: greedy_ids(client, job[0], list(job[1]), job[2]) for job in set(jobs)}
    args = ["--served-model-name", BASE, "--enable-lora", "--max-loras", "2",
            "--max-lora-rank", "16", "--max-model-len", "128", "--dtype", "float32",
            "--max-num-batched-tokens", "6", "--block-size", "4",
            "--lora-modules", *[f"{n}={ad[n]}" for n in SERVED[:3]]]
    with RemoteServer(tiny_models["llama"], args) as chunked:
        results = concurrent_greedy_ids(chunked, jobs)
        hits = _metrics(chunked).get(("loraplex:prefix_cache_hits_total", ()), 0)
    for job, got in zip(jobs, results):
        assert got == alone[job], job
    assert hits > 0


def test_runtime_load_inplace_unload(server, client, tiny_models, tiny_adapters, prompts):
    base, ad, prompt = tiny_models["llama"], tiny_adapters["llama"], prompts[1]
    r = server.post("/v1/load_lora_adapter", {"lora_name": "dyn", "lora_path": str(ad["r4_qv"])})
    assert r.status_code == 200 and "dyn" in r.text
    assert "dyn" in {c["id"] for c in server.get("/v1/models").json()["data"]}
    old = greedy_ids(client, "dyn", prompt)
    check_hf(old, base, ad["r4_qv"], prompt)

    r = server.post("/v1/load_lora_adapter", {"lora_name": "dyn", "lora_path": str(ad["r8_all"])})
    assert r.status_code == 400 and "load_inplace" in r.json()["error"]["message"]
    still_serves(client)

    r = server.post("/v1/load_lora_adapter", {"lora_name": "dyn", "lora_path": str(ad["r8_all"]),
                                              "load_inplace": True})
    assert r.status_code == 200
    new = greedy_ids(client, "dyn", prompt)
    check_hf(new, base, ad["r8_all"], prompt)
    assert new != old

    counted = {k[1][0] for k in _metrics(server) if k[0] == "loraplex:prompt_tokens_total"}
    assert "dyn" in counted
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "dyn"}).status_code == 200
    assert not [k for k in _metrics(server) if "dyn" in k[1]]  # its series went with it
    with pytest.raises(openai.NotFoundError):
        greedy_ids(client, "dyn", prompt)
    r = server.post("/v1/unload_lora_adapter", {"lora_name": "dyn"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
    still_serves(client)


def test_inplace_reload_keeps_requests_in_flight_on_old_weights(server, client, tiny_models,
                                                                 tiny_adapters, prompts):
    base, ad, prompt = tiny_models["llama"], tiny_adapters["llama"], prompts[0]
    assert server.post("/v1/load_lora_adapter",
                       {"lora_name": "hot", "lora_path": str(ad["r4_qv"])}).status_code == 200
    stream = client.completions.create(model="hot", prompt=prompt, stream=True,
                                       **dict(GREEDY, max_tokens=100))
    ids = token_ids_of(next(iter(stream)).choices[0].logprobs)
    r = server.post("/v1/load_lora_adapter", {"lora_name": "hot", "lora_path": str(ad["r8_all"]),
                                              "load_inplace": True})
    assert r.status_code == 200
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs:
            ids += token_ids_of(chunk.choices[0].logprobs)
    assert len(ids) == 100
    check_hf(ids, base, ad["r4_qv"], prompt)  # the old weights, all the way
    check_hf(greedy_ids(client, "hot", prompt), base, ad["r8_all"], prompt)
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "hot"}).status_code == 200


def test_filesystem_resolver(server, client, tiny_models, tiny_adapters, prompts):
    assert "fs-r8" not in {c["id"] for c in server.get("/v1/models").json()["data"]}
    got = greedy_ids(client, "fs-r8", prompts[2])
    check_hf(got, tiny_models["llama"], tiny_adapters["llama"]["r8_regex"], prompts[2])
    assert "fs-r8" in {c["id"] for c in server.get("/v1/models").json()["data"]}
    linked = greedy_ids(client, "fs-linked", prompts[2])
    check_hf(linked, tiny_models["llama"], tiny_adapters["llama"]["r16_rslora"], prompts[2])
    for missing in ("fs-missing", "../fs-r8", "a/b"):
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=missing, prompt="Hi", max_tokens=2)
    still_serves(client)


def test_bad_adapter_loads_are_400(server, client, tiny_models, tiny_adapters, tmp_path):
    ad = tiny_adapters["llama"]
    big = make_peft_adapter(tiny_models["llama"], tmp_path / "r32", r=32, seed=3)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(ad["r4_qv"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    fc1 = edited_copy(ad["r4_qv"], tmp_path / "fc1", lambda c: c.update(target_modules=["fc1"]))
    trained = make_peft_adapter(tiny_models["llama"], tmp_path / "trained", r=4, seed=4,
                                modules_to_save=["lm_head"])
    cases = {str(tmp_path / "nowhere"): "does not exist", str(big): "max_lora_rank",
             str(fc1): "not found in the model", str(corrupt): "cannot read",
             str(trained): "--enable-lora-modules-to-save"}
    for i, (path, reason) in enumerate(cases.items()):
        r = server.post("/v1/load_lora_adapter", {"lora_name": f"bad{i}", "lora_path": path})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert reason in err["message"] and err["type"] == "BadRequestError"
        assert f"bad{i}" not in {c["id"] for c in server.get("/v1/models").json()["data"]}
        still_serves(client)
    r = server.post("/v1/load_lora_adapter", {"lora_name": "x"})
    assert r.status_code == 400 and "lora_path" in r.json()["error"]["message"]


def test_request_errors(server, client, prompts):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="Hi", max_tokens=2)
    assert e.value.body["type"] == "NotFoundError"
    still_serves(client)
    bad_kwargs = [dict(max_tokens=-1), dict(temperature=-0.5), dict(top_p=0),
                  dict(max_tokens=500), dict(n=0), dict(prompt=list(range(3, 200))),
                  dict(prompt=[10**6]), dict(prompt=[]), dict(max_tokens="abc")]
    for kw in bad_kwargs:
        kw = {"model": "r4_qv", "prompt": "Hi", "max_tokens": 2, **kw}
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**kw)
        assert e.value.status_code == 400 and e.value.body["type"] == "BadRequestError", kw
        still_serves(client)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="r4_qv", messages=[], max_tokens=2)
    still_serves(client)


def test_malformed_bodies_are_400_not_422(server, client):
    for body in (b"{not json", b"[1, 2]", b'{"model": "r4_qv", "prompt": {"a": 1}}', b""):
        r = httpx.post(server.url_for("v1/completions"), content=body, timeout=30,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == 400
        assert "Traceback" not in r.text and "pydantic" not in r.text
        still_serves(client)
    assert server.get("/no/such/route").json()["error"]["code"] == 404


def test_disconnect_aborts_request(server, client):
    with httpx.stream("POST", server.url_for("v1/completions"), timeout=30, json={
            "model": "r8_all", "prompt": "Hello", "max_tokens": 110, "ignore_eos": True,
            "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = _metrics(server)
        if m.get(("loraplex:request_success_total", ("abort", "r8_all")), 0) >= 1 and \
                m[("loraplex:num_requests_running", ())] == 0 and \
                m[("loraplex:kv_cache_usage_perc", ())] == 0:  # its KV blocks are free
            break
        time.sleep(0.1)
    else:
        pytest.fail("the disconnected request was not aborted")
    still_serves(client)


def test_a_repeated_prompt_hits_the_prefix_cache(server, client):
    """The second request for the same long prompt and adapter reuses the first one's
    cached K/V, and /metrics counts it (vLLM's prefix_cache_queries / _hits)."""
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    before = _metrics(server).get(("loraplex:prefix_cache_hits_total", ()), 0)
    replies = [client.completions.create(model="r8_all", prompt=prompt, max_tokens=3,
                                         temperature=0) for _ in range(2)]
    assert replies[0].choices[0].text == replies[1].choices[0].text
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = _metrics(server)
        if m.get(("loraplex:prefix_cache_hits_total", ()), 0) > before:
            break
        time.sleep(0.1)
    else:
        pytest.fail("no prefix cache hit was counted")
    assert m[("loraplex:prefix_cache_queries_total", ())] >= 2 * replies[0].usage.prompt_tokens
    # without --enable-prompt-tokens-details usage does not tell (vLLM's default)
    assert replies[1].usage.prompt_tokens_details is None


def test_cache_salt_over_http(server, client):
    """vLLM's cache_salt request field: the cached prefix of one salt is not a hit for
    another; the same salt hits; an empty salt is a 400 naming the field."""
    prompt = "A salted prompt: the lazy dog sleeps while the quick brown fox runs. " * 2

    def counted(salt: str) -> tuple[float, float]:
        """(queries, hits) once this request's lookup is on /metrics."""
        key = ("loraplex:prefix_cache_queries_total", ())
        before = _metrics(server).get(key, 0)
        client.completions.create(model="r8_all", prompt=prompt, max_tokens=2, temperature=0,
                                  extra_body={"cache_salt": salt})
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            m = _metrics(server)
            if m.get(key, 0) > before:
                return m[key], m.get(("loraplex:prefix_cache_hits_total", ()), 0)
            time.sleep(0.1)
        pytest.fail("the request's prefix lookup was not counted")

    _, hits = counted("tenant-1")
    _, after_other = counted("tenant-2")
    assert after_other == hits
    _, after_same = counted("tenant-1")
    assert after_same > hits
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="r8_all", prompt=prompt, max_tokens=2,
                                  extra_body={"cache_salt": ""})
    assert err.value.body["param"] == "cache_salt"


def _metrics(server) -> dict:
    out = {}
    for fam in text_string_to_metric_families(server.get("/metrics").text):
        for s in fam.samples:
            out[(s.name, tuple(v for k, v in sorted(s.labels.items())))] = s.value
    return out


def test_metrics(server, client):
    still_serves(client)
    client.completions.create(model=BASE, prompt="Hi", max_tokens=2)
    fams = {f.name: f for f in text_string_to_metric_families(server.get("/metrics").text)}
    info = fams["loraplex:lora_requests_info"].samples
    assert len(info) == 1
    assert set(info[0].labels) == {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}
    assert info[0].labels["max_lora"] == "2"
    for name in ("loraplex:request_success", "loraplex:prompt_tokens",
                 "loraplex:generation_tokens", "loraplex:time_to_first_token_seconds",
                 "loraplex:time_per_output_token_seconds", "loraplex:num_requests_running",
                 "loraplex:num_requests_waiting"):
        assert name in fams, name
    models = {s.labels.get("model_name") for s in fams["loraplex:request_success"].samples}
    assert {"r8_all", BASE} <= models  # counters: per model a request named
    for hist in ("loraplex:time_to_first_token_seconds", "loraplex:e2e_request_latency_seconds"):
        assert {s.labels["model_name"] for s in fams[hist].samples} == {BASE}  # as vLLM
    # adapter tiers: resident counts, cache hits/misses, load latency
    tiers = {s.labels["tier"]: s.value for s in fams["loraplex:lora_adapters"].samples}
    assert tiers["registered"] >= 1 and 1 <= tiers["device"] <= 2 and tiers["loading"] == 0
    hits = {s.labels["tier"]: s.value for s in fams["loraplex:lora_cache_hits"].samples
            if s.name.endswith("_total")}
    misses = {s.labels["tier"]: s.value for s in fams["loraplex:lora_cache_misses"].samples
              if s.name.endswith("_total")}
    assert hits["device"] > 0 and misses["device"] >= 1  # first use of an adapter
    loads = [s for s in fams["loraplex:lora_load_seconds"].samples if s.name.endswith("_count")]
    assert loads and loads[0].value >= 1 + misses["host"]  # --lora-modules read at start


def _extra_vocab_adapter(src, dst, rows: int):
    """`src` plus vLLM's new_embeddings file adding `rows` tokens (and no tokenizer)."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    save_file({"input_embeddings": torch.zeros(rows, 64),
               "output_embeddings": torch.zeros(rows, 64)},
              str(dst / "new_embeddings.safetensors"))
    return dst


def test_adapter_that_adds_tokens_over_http(server, client, tiny_models, tiny_adapters,
                                           tmp_path):
    """An adapter trained with added tokens loads at runtime. Its requests' text is encoded
    with its tokenizer (an added token's text becomes its id; the base's requests keep the
    base tokenizer), its outputs and logprobs decode its tokens, and its tokens equal HF +
    PEFT's on the resized model. Without its tokenizer it is a 400 naming why; a
    long-context LoRA whose factor the server lacks is refused naming it; the server carries
    on."""
    from transformers import AutoTokenizer

    from tests.fixtures import make_added_tokens_adapter

    base = tiny_models["llama"]
    src = make_added_tokens_adapter(base, tmp_path / "added", seed=44)
    tok = AutoTokenizer.from_pretrained(str(src))
    r = server.post("/v1/load_lora_adapter", {"lora_name": "added", "lora_path": str(src)})
    assert r.status_code == 200, r.text
    text = "Hello <tool> world <think>"
    ids = tok.encode(text)
    assert {512, 513} <= set(ids)
    kw = dict(max_tokens=8, temperature=0, logprobs=2)
    r = client.completions.create(model="added", prompt=text, **kw, extra_body={
        "ignore_eos": True, "return_tokens_as_token_ids": True})
    got = token_ids_of(r.choices[0].logprobs)
    check_hf(got, base, src, ids)
    assert any(t >= 512 for t in got), got
    assert r.choices[0].text == tok.decode(got).rstrip("\ufffd")
    assert r.usage.prompt_tokens == len(ids)
    r = client.completions.create(model="added", prompt=text, **kw,
                                  extra_body={"ignore_eos": True})
    assert {"<tool>", "<think>", "<end_think>"} & set(r.choices[0].logprobs.tokens)
    base_ids = AutoTokenizer.from_pretrained(str(base)).encode(text)
    r = client.completions.create(model=BASE, prompt=text, max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens == len(base_ids) != len(ids)
    messages = [{"role": "user", "content": "Hi <tool>"}]
    r = client.chat.completions.create(model="added", messages=messages, max_tokens=2,
                                       temperature=0)
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tok(rendered, add_special_tokens=False).input_ids)

    r = client.completions.create(model="added", prompt=ids, echo=True, max_tokens=1,
                                  temperature=0)  # token ids echoed as the adapter's text
    assert r.choices[0].text.startswith(tok.decode(ids))
    r = server.post("/tokenize", {"model": "added", "prompt": text, "return_token_strs": True})
    assert r.json()["tokens"] == ids and "<tool>" in r.json()["token_strs"]
    assert server.post("/tokenize", {"model": BASE, "prompt": text}).json()["tokens"] == base_ids
    r = server.post("/detokenize", {"model": "added", "tokens": ids})
    assert r.json()["prompt"] == tok.decode(ids)

    no_tok = shutil.copytree(src, tmp_path / "no_tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tok / name).unlink()
    long = edited_copy(tiny_adapters["llama"]["r4_qv"], tmp_path / "long",
                   lambda c: c.update(context_length=16384))
    for name, path, reason in (("no_tok", no_tok, "no usable tokenizer"),
                               ("long", long, "start the engine with "
                                "--long-lora-scaling-factors including 32 (it was started "
                                "with --long-lora-scaling-factors 4,8)")):
        r = server.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        assert r.status_code == 400, r.text
        assert reason in r.json()["error"]["message"]
        assert name not in {c["id"] for c in server.get("/v1/models").json()["data"]}
        still_serves(client)
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "added"}).status_code == 200


def test_embedding_and_lm_head_adapter_over_http(server, client, tiny_models, prompts,
                                                 tmp_path):
    """An adapter with LoRA on embed_tokens and lm_head (PEFT's copies of both saved
    beside it) loads at runtime and serves what HF + PEFT gives; the same adapter with a
    trained embedding copy is a 400 naming why, and the server carries on."""
    from safetensors.torch import load_file, save_file

    base, prompt = tiny_models["llama"], prompts[3]
    good = make_peft_adapter(base, tmp_path / "vocab_lora", r=8, seed=31,
                             target_modules=["embed_tokens", "lm_head", "v_proj"])
    trained = shutil.copytree(good, tmp_path / "trained")
    tensors = load_file(str(trained / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("embed_tokens.base_layer.weight"))
    tensors[key] = tensors[key] * 1.5
    save_file(tensors, str(trained / "adapter_model.safetensors"))

    r = server.post("/v1/load_lora_adapter", {"lora_name": "vocab", "lora_path": str(good)})
    assert r.status_code == 200, r.text
    check_hf(greedy_ids(client, "vocab", prompt), base, good, prompt)
    r = server.post("/v1/load_lora_adapter", {"lora_name": "trained", "lora_path": str(trained)})
    assert r.status_code == 400, r.text
    assert "differ from the base model's" in r.json()["error"]["message"]
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "vocab"}).status_code == 200
    still_serves(client)


def test_bad_requests_fail_alone_while_a_stream_runs(server, client, tiny_models, tiny_adapters,
                                                     prompts, tmp_path):
    """A good streaming request runs while a burst of bad ones arrives: each bad one gets
    its status in OpenAI's error shape, the good one streams exactly what it does alone."""
    base, ad, prompt = tiny_models["llama"], tiny_adapters["llama"], prompts[2]
    alone = greedy_ids(client, "r8_all", prompt, 80)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(ad["r4_qv"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    big = make_peft_adapter(base, tmp_path / "r32", r=32, seed=3)
    chat = {"model": "r4_qv", "max_tokens": 2}
    burst = [  # (route, body, status, text in the message)
        ("load_lora_adapter", {"lora_name": "broken", "lora_path": str(corrupt)}, 400,
         "cannot read"),
        ("load_lora_adapter", {"lora_name": "big", "lora_path": str(big)}, 400,
         "max_lora_rank"),
        ("load_lora_adapter", {"lora_name": "vocab", "lora_path": str(
            _extra_vocab_adapter(ad["r4_qv"], tmp_path / "vocab", 600))}, 400,
         "has 600 extra embeddings"),
        ("completions", {"model": "r4_qv", "prompt": [1, 600], "max_tokens": 2}, 400,
         "out of range"),
        ("completions", {"model": "no-such-model", "prompt": "Hi"}, 404, "does not exist"),
        ("completions", {"model": "r4_qv", "prompt": [], "max_tokens": 2}, 400,
         "the prompt is empty"),
        ("completions", b'{"model": "r4_qv", "prompt": ', 400, "not valid JSON"),
        ("completions", {"model": "r4_qv", "prompt": list(range(3, 200)), "max_tokens": 2},
         400, "maximum context length"),
        ("completions", {"model": "r4_qv", "prompt": "Hi", "max_tokens": -1}, 400,
         "max_tokens"),
        ("completions", {"model": "r4_qv", "prompt": "Hi", "temperature": -1}, 400,
         "temperature"),
        ("chat/completions", {**chat, "messages": []}, 400, "messages"),
        ("chat/completions", {**chat, "messages": [{"role": "user", "content": "Hi"}],
                              "chat_template": "{{ raise_exception('no') }}"}, 400, "no"),
    ]

    async def run():
        aclient = server.get_async_client()
        stream = await aclient.completions.create(model="r8_all", prompt=prompt, stream=True,
                                                  **dict(GREEDY, max_tokens=80))
        chunks = aiter(stream)
        ids = token_ids_of((await anext(chunks)).choices[0].logprobs)
        async with httpx.AsyncClient(base_url=server.url_for("v1"), timeout=60) as http:
            replies = await asyncio.gather(*(
                http.post(route, content=body, headers={"Content-Type": "application/json"})
                if isinstance(body, bytes) else http.post(route, json=body)
                for route, body, _, _ in burst))
        async for chunk in chunks:
            if chunk.choices and chunk.choices[0].logprobs:
                ids += token_ids_of(chunk.choices[0].logprobs)
        return ids, replies

    ids, replies = asyncio.run(run())
    for (route, body, status, text), r in zip(burst, replies):
        assert r.status_code == status, (route, body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
        assert text in err["message"], (route, err)
    assert ids == alone
    check_hf(ids, base, ad["r8_all"], prompt)
    models = {c["id"] for c in server.get("/v1/models").json()["data"]}
    assert not models & {"broken", "big", "vocab"}
    still_serves(client)


def test_odd_but_valid_inputs(server, client):
    """vLLM's choices: temperature has no upper bound (OpenAI's is 2); unknown fields are
    accepted and named in a warning in the server log."""
    r = client.completions.create(model="r4_qv", prompt="Hi", max_tokens=3, temperature=7.5,
                                  extra_body={"frobnicate": 1})
    assert r.usage.completion_tokens == 3
    r = client.chat.completions.create(
        model="r4_qv", max_tokens=2,
        messages=[{"role": "user", "content": "Hi", "mood": "odd"}])
    assert r.choices[0].message.content is not None
    log = server.logs()
    assert "present in the request but ignored: frobnicate" in log
    assert "present in the request but ignored: messages[0].mood" in log


def test_limits_are_400s_naming_the_field(server, client):
    for kw, param in ((dict(n=257), "n"), (dict(seed=2**63), "seed"),
                      (dict(extra_body={"top_k": -5}), "top_k")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="r4_qv", prompt="Hi", max_tokens=2, **kw)
        assert e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="r4_qv", max_tokens=2, logprobs=True,
                                       top_logprobs=21,
                                       messages=[{"role": "user", "content": "Hi"}])
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:  # the engine's max_logprobs (20)
        client.completions.create(model="r4_qv", prompt="Hi", max_tokens=2, logprobs=21)
    assert e.value.body["param"] == "logprobs" and "max_logprobs (20)" in e.value.message
    r = httpx.post(server.url_for("v1/completions"), timeout=30,
                   content=json.dumps({"model": "r4_qv", "prompt": "Hi"}),
                   headers={"Content-Type": "text/plain"})
    assert r.status_code == 400 and "Content-Type: application/json" in r.text
    r = server.post("/v1/completions", {"model": "r4_qv", "prompt": "Hi",
                                        "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
    still_serves(client)


def test_priority_without_the_priority_policy_is_a_400(server, client):
    """vLLM's rule: a nonzero priority needs --scheduling-policy priority (this server is
    fcfs; tests/test_priority_scheduling.py serves by priority); the request fails alone,
    on every route that takes it."""
    calls = [(client.completions.create, dict(prompt="Hi", max_tokens=2)),
             (client.chat.completions.create,
              dict(messages=[{"role": "user", "content": "Hi"}], max_tokens=2)),
             (client.responses.create, dict(input="Hi", max_output_tokens=2))]
    for create, kw in calls:
        with pytest.raises(openai.BadRequestError) as e:
            create(model="r4_qv", extra_body={"priority": 1}, **kw)
        err = e.value.body
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == 400
        assert err["message"] == "Got priority 1 but Priority scheduling is not enabled."
        still_serves(client)
        assert create(model="r4_qv", extra_body={"priority": 0}, **kw)


def test_a_repeated_request_id_does_not_touch_the_other_request(server):
    """request_id is the client's; engine ids are ours, so a duplicate cannot abort (or be
    refused because of) another client's request."""
    async def run():
        aclient = server.get_async_client()
        kw = dict(model="r8_all", prompt="Hello", max_tokens=30, temperature=0,
                  extra_body={"ignore_eos": True, "request_id": "same"})
        return await asyncio.gather(*(aclient.completions.create(**kw) for _ in range(3)))
    for r in asyncio.run(run()):
        assert r.id == "same" and r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 30


def test_sampling_fields_reach_the_engine(client, prompts):
    """OpenAI's and vLLM's sampling fields, each shown to change what is generated."""
    prompt = prompts[1]
    ids = greedy_ids(client, "r8_all", prompt, 12)

    def run(**kw):
        extra = {**GREEDY["extra_body"], **kw.pop("extra_body", {})}
        r = client.completions.create(model="r8_all", prompt=prompt,
                                      **{**GREEDY, "max_tokens": 12, **kw, "extra_body": extra})
        return r.choices[0], token_ids_of(r.choices[0].logprobs)

    # sampled (temperature 1), but each of these leaves only the greedy token
    for kw in (dict(extra_body={"top_k": 1}), dict(extra_body={"min_p": 1.0}),
               dict(top_p=1e-9)):
        assert run(temperature=1.0, seed=5, **kw)[1] == ids, kw
    k = next(i for i in range(3, 12) if ids[i] not in ids[:i])
    choice, got = run(extra_body={"stop_token_ids": [ids[k]]})
    assert got == ids[:k + 1] and choice.finish_reason == "stop"
    assert choice.stop_reason == ids[k]
    first = ids[0]  # min_tokens bars a stop token from the first 3 tokens (vLLM's rule)
    choice, got = run(extra_body={"stop_token_ids": [first], "min_tokens": 3})
    assert got[0] != ids[0] and first not in got[:-1]
    assert (choice.finish_reason, got[-1]) == ("stop", first) or len(got) == 12
    choice, got = run(extra_body={"repetition_penalty": 1e9})  # nothing seen comes again
    assert all(t not in prompt and t not in got[:i] for i, t in enumerate(got)), got

    text = client.completions.create(model="r8_all", prompt=prompt, max_tokens=12,
                                     temperature=0, extra_body={"ignore_eos": True}
                                     ).choices[0].text
    stop = next(text[i:i + 3] for i in range(2, len(text) - 3)
                if "\ufffd" not in text[i:i + 3] and text[i:i + 3].strip())
    for include in (False, True):
        c = client.completions.create(model="r8_all", prompt=prompt, max_tokens=12,
                                      temperature=0, stop=[stop],
                                      extra_body={"ignore_eos": True,
                                                  "include_stop_str_in_output": include}
                                      ).choices[0]
        end = text.index(stop) + (len(stop) if include else 0)
        assert (c.text, c.finish_reason, c.stop_reason) == (text[:end], "stop", stop)

    # token-id lists: one choice per prompt, each what it is alone
    r = client.completions.create(model="r8_all", prompt=[prompts[0], prompt],
                                  **dict(GREEDY, max_tokens=12))
    assert [token_ids_of(c.logprobs) for c in r.choices] == \
        [greedy_ids(client, "r8_all", prompts[0], 12), ids]


def test_token_controls_over_http(server, client, tiny_models, prompts, tokenizer):
    """vLLM's allowed_token_ids, bad_words and truncate_prompt_tokens as extra_body fields
    (tests/test_token_controls.py holds them against HF); a bad value is a 400 naming it."""
    from loraplex.engine.prompt_checks import bad_words_token_ids
    from tests.test_token_controls import hf_greedy_with

    base, prompt = tiny_models["llama"], prompts[3]
    kw = {k: v for k, v in GREEDY.items() if k != "extra_body"}
    ids = GREEDY["extra_body"]
    r = client.completions.create(model=BASE, prompt=prompt, **kw, extra_body={
        **ids, "allowed_token_ids": [5, 60, 61, 300]})
    assert token_ids_of(r.choices[0].logprobs) == hf_greedy_with(
        base, None, prompt, allowed=[5, 60, 61, 300])
    plain = greedy_ids(client, BASE, prompt)
    word = next(w for t in plain if (w := tokenizer.decode([t]).strip())
                and tokenizer.encode(w, add_special_tokens=False) == [t])
    r = client.completions.create(model=BASE, prompt=prompt, **kw, extra_body={
        **ids, "bad_words": [word]})
    assert token_ids_of(r.choices[0].logprobs) == hf_greedy_with(
        base, None, prompt, bad=bad_words_token_ids([word], tokenizer)) != plain
    r = client.completions.create(model=BASE, prompt=prompt * 20, **kw, extra_body={
        **ids, "truncate_prompt_tokens": 12})
    assert r.usage.prompt_tokens == 12
    assert token_ids_of(r.choices[0].logprobs) == hf_greedy(base, None, (prompt * 20)[-12:], 8)
    r = server.post("/v1/completions", {"model": BASE, "prompt": "Hi",
                                        "allowed_token_ids": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "allowed_token_ids"
