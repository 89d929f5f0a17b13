"""OpenAI's Responses API (/v1/responses) on a real server with the official openai client:
the same reply as the chat route for the same conversation (instructions as a system
message, message and function-call items, adapters by name), streamed events that add up
to the response, max_output_tokens (incomplete), text.format json_schema, forced function
calls, reasoning items; bad requests fail alone with OpenAI's error shape."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.server_utils import RemoteServer

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
          "required": ["city"], "additionalProperties": False}
TOOL = {"type": "function", "name": "add", "description": "Add two numbers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                        "b": {"type": "integer"}},
                       "required": ["a", "b"]}}


@pytest.fixture(scope="module")
def server(tiny_models, tiny_adapters):
    ad = tiny_adapters["llama"]
    args = ["--served-model-name", "tiny", "--enable-lora", "--max-loras", "2",
            "--max-lora-rank", "16", "--dtype", "float32", "--max-model-len", "256",
            "--cpu-kv-cache-gib", "0.05", "--enable-prompt-tokens-details", "--lora-modules", f"r8_all={ad['r8_all']}",
            f"r4_qv={ad['r4_qv']}"]
    with RemoteServer(tiny_models["llama"], args) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return server.get_client()


KW = dict(temperature=0, extra_body={"ignore_eos": True})


def _chat_text(client, model, messages, max_tokens=8) -> tuple[str, str]:
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                       **KW)
    return r.choices[0].message.content, r.choices[0].finish_reason


@pytest.mark.parametrize("model", ["tiny", "r8_all", "r4_qv"])
def test_same_reply_as_chat(client, model):
    """A string input, and instructions + message items (a developer message, content
    parts), give the chat route's reply to the same conversation; usage counts it."""
    r = client.responses.create(model=model, input="Tell me a story", max_output_tokens=8,
                                **KW)
    text, _ = _chat_text(client, model, [{"role": "user", "content": "Tell me a story"}])
    assert r.output_text == text and r.model == model
    assert r.status == "incomplete"  # all 8 tokens of max_output_tokens, as chat's "length"
    assert [item.type for item in r.output] == ["message"]
    assert r.usage.output_tokens == 8 and r.usage.total_tokens == r.usage.input_tokens + 8
    items = [{"role": "developer", "content": "Be brief."},
             {"type": "message", "role": "user",
              "content": [{"type": "input_text", "text": "Hello "},
                          {"type": "input_text", "text": "there"}]},
             {"role": "assistant", "content": "Hi."},
             {"role": "user", "content": "More"}]
    r = client.responses.create(model=model, instructions="You are terse.", input=items,
                                max_output_tokens=6, **KW)
    text, finish = _chat_text(client, model, [
        {"role": "system", "content": "You are terse."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "More"}], max_tokens=6)
    assert r.output_text == text


def test_stream_events_add_up_to_the_response(client):
    kw = dict(model="r8_all", input="Once upon a time", max_output_tokens=10, **KW)
    events = list(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress",
                         "response.output_item.added"]
    assert kinds[3] == "response.content_part.added"
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    whole = client.responses.create(**kw)
    assert streamed == final.output_text == whole.output_text == events[-4].text
    # 10 tokens, all of max_output_tokens: incomplete, as OpenAI says it
    assert final.status == whole.status == "incomplete"
    assert whole.incomplete_details.reason == "max_output_tokens"
    assert final.usage.output_tokens == 10


def _same_logprobs(got: list, want: list) -> bool:
    """The same tokens and alternatives, the logprobs as close as two runs' (one of them
    may read the prefix cache the other filled)."""
    def tokens(lps):
        return [(lp["token"], [t["token"] for t in lp["top_logprobs"]]) for lp in lps]

    def values(lps):
        return [v for lp in lps for v in (lp["logprob"], *(t["logprob"]
                                                           for t in lp["top_logprobs"]))]
    return tokens(got) == tokens(want) and values(got) == pytest.approx(values(want),
                                                                         abs=1e-5)


def test_output_text_logprobs(client):
    """include=["message.output_text.logprobs"]: the message text's tokens' logprobs (and
    top_logprobs alternatives), the chat route's for the same conversation; streamed, each
    delta carries its tokens' and the done event all of them; none without the include."""
    kw = dict(model="r4_qv", input="Tell me a story", max_output_tokens=6, **KW)
    include = dict(include=["message.output_text.logprobs"], top_logprobs=2)
    r = client.responses.create(**include, **kw)
    chat = client.chat.completions.create(
        model="r4_qv", messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=6, logprobs=True, top_logprobs=2, **KW)
    got = [lp.model_dump() for lp in r.output[0].content[0].logprobs]
    assert len(got) == 6 and all(len(lp["top_logprobs"]) == 2 for lp in got)
    assert _same_logprobs(got, [lp.model_dump() for lp in chat.choices[0].logprobs.content])
    assert "".join(lp["token"] for lp in got) == r.output_text
    events = list(client.responses.create(stream=True, **include, **kw))
    deltas = [lp.model_dump() for e in events if e.type == "response.output_text.delta"
              for lp in e.logprobs]
    done = next(e for e in events if e.type == "response.output_text.done")
    final = events[-1].response.output[0].content[0].logprobs
    assert len(deltas) == 6 and _same_logprobs(deltas, got)
    assert [lp.model_dump() for lp in done.logprobs] == deltas
    assert [lp.model_dump() for lp in final] == deltas
    assert client.responses.create(top_logprobs=2, **kw).output[0].content[0].logprobs == []
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(include=["message.output_text.logprobs"], top_logprobs=-1,
                                **kw)
    assert "top_logprobs" in e.value.message


def test_json_schema_format(client):
    r = client.responses.create(
        model="r4_qv", input="Where?", max_output_tokens=120, temperature=0,
        text={"format": {"type": "json_schema", "name": "place", "schema": SCHEMA,
                         "strict": True}})
    assert set(json.loads(r.output_text)) == {"city"}, (r.output_text, r.status)


def test_function_calls(client):
    """A forced function call comes back as a function_call item; its output goes back
    as a function_call_output item, streamed too."""
    r = client.responses.create(model="r8_all", input="Add 2 and 3", tools=[TOOL],
                                tool_choice={"type": "function", "name": "add"},
                                max_output_tokens=120, temperature=0)
    call = r.output[-1]
    assert call.type == "function_call" and call.name == "add" and r.status == "completed"
    assert set(json.loads(call.arguments)) == {"a", "b"}
    events = list(client.responses.create(
        model="r8_all", input="Add 2 and 3", tools=[TOOL], stream=True,
        tool_choice={"type": "function", "name": "add"}, max_output_tokens=120, temperature=0))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].arguments == call.arguments
    assert "".join(e.delta for e in events
                   if e.type == "response.function_call_arguments.delta") == call.arguments
    follow = [{"role": "user", "content": "Add 2 and 3"},
              {"type": "function_call", "call_id": call.call_id, "name": "add",
               "arguments": call.arguments},
              {"type": "function_call_output", "call_id": call.call_id, "output": "5"}]
    r = client.responses.create(model="r8_all", input=follow, tools=[TOOL],
                                max_output_tokens=6, tool_choice="none", **KW)
    assert r.output_text


def test_bad_requests_fail_alone(server, client):
    cases = [
        (dict(input="x", previous_response_id="resp_1"), 400, "stores no responses"),
        (dict(input=[{"role": "user", "content": [{"type": "input_image",
                                                   "image_url": "http://x"}]}]), 400,
         "image inputs are not supported by model 'tiny'"),
        (dict(input=[{"role": "user", "content": [{"type": "input_image",
                                                   "file_id": "file-1"}]}]), 400,
         "needs image_url, a data: or http(s) URL string (file_id given"),
        (dict(input=[{"role": "user", "content": [{"type": "input_file"}]}]), 400,
         "content part of type 'input_file' is not supported"),
        (dict(input="x", tools=[{"type": "web_search"}]), 400,
         "tools of type 'web_search' are not supported"),
        (dict(input=[{"type": "computer_call"}]), 400,
         "items of type 'computer_call' are not supported"),
        (dict(input="x", text={"format": {"type": "grammar"}}), 400,
         "text.format type 'grammar' is not supported"),
        (dict(input="x", temperature=-1), 400, "temperature"),
    ]
    for kw, status, message in cases:
        with pytest.raises(openai.APIStatusError) as e:
            client.responses.create(model="tiny", max_output_tokens=4, **kw)
        assert e.value.status_code == status and message in e.value.message, e.value.message
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="x", max_output_tokens=4)
    r = server.post("/v1/responses", {"model": "tiny"})  # no input
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    assert client.responses.create(model="tiny", input="still here", max_output_tokens=2,
                                   **KW).output_text


def test_stored_responses_continue_a_conversation(tiny_models):
    """LORAPLEX_ENABLE_RESPONSES_API_STORE: previous_response_id continues a stored
    response's conversation (its output included) as chat would the whole of it; GET
    returns a stored response; store=false and evicted ones are gone (404)."""
    args = ["--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "256",
            "--cpu-kv-cache-gib", "0.05"]
    env = {"LORAPLEX_ENABLE_RESPONSES_API_STORE": "1",
           "LORAPLEX_RESPONSES_API_STORE_SIZE": "4"}
    with RemoteServer(tiny_models["llama"], args, env=env) as server:
        client = server.get_client()
        first = client.responses.create(model="tiny", input="Tell me a story",
                                        instructions="Be terse.", max_output_tokens=6, **KW)
        streamed = list(client.responses.create(model="tiny", input="Once upon",
                                                max_output_tokens=6, stream=True, **KW))
        for previous, opening in ((first, "Tell me a story"),
                                  (streamed[-1].response, "Once upon")):
            r = client.responses.create(model="tiny", previous_response_id=previous.id,
                                        input="More", max_output_tokens=6, **KW)
            text, _ = _chat_text(client, "tiny", [  # instructions are not inherited
                {"role": "user", "content": opening},
                {"role": "assistant", "content": previous.output_text},
                {"role": "user", "content": "More"}], max_tokens=6)
            assert r.output_text == text
        assert client.responses.retrieve(first.id).output_text == first.output_text
        unstored = client.responses.create(model="tiny", input="x", max_output_tokens=2,
                                           store=False, **KW)
        client.responses.create(model="tiny", input="z", max_output_tokens=2, **KW)
        for gone in (unstored.id, first.id):  # store=false; the least recently used of 5
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(gone)
            with pytest.raises(openai.NotFoundError):
                client.responses.create(model="tiny", previous_response_id=gone, input="y",
                                        max_output_tokens=2)


def test_no_store_by_default(server, client):
    r = server.get("/v1/responses/resp_1")
    assert r.status_code == 404 and "LORAPLEX_ENABLE_RESPONSES_API_STORE" in r.text


def test_usage_tells_the_prompt_tokens_read_from_the_prefix_cache(server, client):
    """--enable-prompt-tokens-details: the second request for a prompt reports its full
    blocks (16 tokens; the last token is always computed) as cached, through completions
    (streamed or not: each prompt's count added up), chat and the Responses API; the
    first request for a new prompt reports none."""
    text = "The quick brown fox jumps over the lazy dog near the riverbank. " * 3
    prompts = [f"{i} {text}" for i in range(2)]

    def full_blocks(n: int) -> int:
        return (n - 1) // 16 * 16

    kw = dict(model="r8_all", max_tokens=2, temperature=0)
    first = client.completions.create(prompt=prompts, **kw)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = client.completions.create(prompt=prompts, **kw)
    lens = [httpx.post(server.url_for("tokenize"), json={"model": "r8_all", "prompt": p}
                       ).json()["count"] for p in prompts]
    assert again.usage.prompt_tokens == sum(lens)
    assert again.usage.prompt_tokens_details.cached_tokens == sum(map(full_blocks, lens))
    chunks = list(client.completions.create(prompt=prompts, stream=True,
                                            stream_options={"include_usage": True}, **kw))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == sum(map(full_blocks, lens))

    messages = [{"role": "user", "content": text}]
    chat = [client.chat.completions.create(messages=messages, **kw) for _ in range(2)]
    n = chat[0].usage.prompt_tokens
    assert n > 16
    assert [c.usage.prompt_tokens_details.cached_tokens for c in chat] == [0, full_blocks(n)]
    streamed = list(client.chat.completions.create(messages=messages, stream=True,
                                                   stream_options={"include_usage": True},
                                                   **kw))
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens == full_blocks(n)

    response = client.responses.create(model="r8_all", input=text + " again",
                                       max_output_tokens=2, temperature=0)
    repeat = client.responses.create(model="r8_all", input=text + " again",
                                     max_output_tokens=2, temperature=0)
    assert response.usage.input_tokens_details.cached_tokens < full_blocks(
        repeat.usage.input_tokens)  # the first time, at most what chat cached before
    assert repeat.usage.input_tokens_details.cached_tokens == full_blocks(
        repeat.usage.input_tokens)
