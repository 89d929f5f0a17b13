"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) on a real server
with the official anthropic client: the chat route's reply to the same conversation (the
base and two adapters of different ranks, in one batch), the SDK's stream helper adding up
to the whole message, stop sequences, a tool call round trip (hermes), thinking blocks
(granite's reasoning phrases), the prompt's token count, the API key as x-api-key too;
bad requests fail alone with Anthropic's error shape, before the stream or inside it.
(Image blocks: tests/test_llava.py, on a model with a vision tower.)"""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import openai
import pytest

from tests.server_utils import RemoteServer

anthropic = pytest.importorskip("anthropic")
pytest.importorskip("xgrammar")

KEY = "sekret"
TOOL = {"name": "add", "description": "Add two numbers",
        "input_schema": {"type": "object", "properties": {"a": {"type": "integer"},
                                                          "b": {"type": "integer"}},
                         "required": ["a", "b"], "additionalProperties": False}}
CHAT_TOOL = {"type": "function", "function": {"name": "add", "description": TOOL["description"],
                                              "parameters": TOOL["input_schema"]}}
CALL = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
SYSTEM = "You are terse."
CONVERSATION = [{"role": "user", "content": [{"type": "text", "text": "Hello "},
                                             {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": "Hi."},
                {"role": "user", "content": "Tell me a story"}]
CHAT_CONVERSATION = [{"role": "system", "content": SYSTEM},
                     {"role": "user", "content": "Hello there"},
                     {"role": "assistant", "content": "Hi."},
                     {"role": "user", "content": "Tell me a story"}]
# this SDK's create() has no sampling arguments (Anthropic's newer models take none):
# temperature, like vLLM's extras, goes in the body
# the tiny models' template, with the tools, the calls and the results' ids written out
TEMPLATE = ("{% if tools %}<|tools|>{{ tools | tojson }}\n{% endif %}"
            "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] or '' }}"
            "{% for c in m.get('tool_calls') or [] %}<call {{ c['id'] }}>"
            "{{ c['function']['name'] }} {{ c['function']['arguments'] }}{% endfor %}"
            "{% if m.get('tool_call_id') %}[{{ m['tool_call_id'] }}]{% endif %}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
GREEDY = dict(extra_body={"temperature": 0, "ignore_eos": True})


@pytest.fixture(scope="module")
def doomed(tiny_adapters, tmp_path_factory):
    """A copy of an adapter, registered at start-up, evicted from host memory and deleted
    by a test: its next load fails in the engine, after the stream's headers are sent."""
    path = tmp_path_factory.mktemp("anthropic") / "doomed"
    shutil.copytree(tiny_adapters["llama"]["r4_qv"], path)
    return path


@pytest.fixture(scope="module")
def server(tiny_models, tiny_adapters, doomed):
    ad = tiny_adapters["llama"]
    args = ["--served-model-name", "tiny", "--enable-lora", "--max-loras", "2",
            "--max-cpu-loras", "2", "--max-lora-rank", "16", "--dtype", "float32",
            "--max-model-len", "512",
            "--cpu-kv-cache-gib", "0.05", "--enable-auto-tool-choice", "--tool-call-parser",
            "hermes", "--reasoning-parser", "granite", "--api-key", KEY,
            "--chat-template", TEMPLATE,
            "--lora-modules", f"r8_all={ad['r8_all']}", f"r4_qv={ad['r4_qv']}",
            f"doomed={doomed}"]
    with RemoteServer(tiny_models["llama"], args, api_key=KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def chat(server):
    return server.get_client()


def _blocks(message) -> list[tuple]:
    """A message's content blocks: type, text, thinking and its signature, tool name and
    input (a tool_use's id left out: each reply draws its own)."""
    return [(b.type, *(getattr(b, k, None) for k in ("text", "thinking", "signature", "name",
                                                      "input"))) for b in message.content]


def test_same_reply_as_chat_in_one_batch(server, chat):
    """The base and two adapters, sent together: each the chat route's greedy reply to the
    same conversation (system string and text blocks), stop_reason max_tokens, usage."""
    models = ["tiny", "r8_all", "r4_qv"]

    async def together():
        async with anthropic.AsyncAnthropic(base_url=server.url, api_key=KEY,
                                            max_retries=0) as aclient:
            return await asyncio.gather(*[aclient.messages.create(
                model=m, system=SYSTEM, messages=CONVERSATION, max_tokens=8, **GREEDY)
                for m in models])

    for model, msg in zip(models, asyncio.run(together())):
        ref = chat.chat.completions.create(model=model, messages=CHAT_CONVERSATION,
                                           max_tokens=8, **GREEDY)
        assert msg.id.startswith("msg_") and msg.type == "message" and msg.model == model
        assert msg.role == "assistant" and msg.stop_reason == "max_tokens"
        assert _blocks(msg) == [("text", ref.choices[0].message.content, None, None, None,
                                 None)]
        assert msg.usage.input_tokens == ref.usage.prompt_tokens
        assert msg.usage.output_tokens == ref.usage.completion_tokens == 8
    texts = {m: msg.content[0].text for m, msg in zip(models, asyncio.run(together()))}
    assert len(set(texts.values())) == 3  # the adapters change the reply


def test_stream_adds_up_to_the_message(server, client):
    kw = dict(model="r8_all", system=[{"type": "text", "text": SYSTEM}],
              messages=CONVERSATION, max_tokens=10, **GREEDY)
    whole = client.messages.create(**kw)
    with client.messages.stream(**kw) as stream:
        streamed = stream.get_final_message()
    assert _blocks(streamed) == _blocks(whole)
    assert (streamed.stop_reason, streamed.stop_sequence) == (whole.stop_reason, None)
    assert streamed.usage.input_tokens == whole.usage.input_tokens
    assert streamed.usage.output_tokens == whole.usage.output_tokens == 10
    # the events in Anthropic's order, each with its `event:` line
    body = {k: v for k, v in kw.items() if k != "extra_body"} | kw["extra_body"]
    body["stream"] = True
    r = server.post("/v1/messages", body)
    assert r.status_code == 200 and "[DONE]" not in r.text
    events = [e for e in r.text.split("\n\n") if e.strip()]
    kinds = [e.split("\n")[0].removeprefix("event: ") for e in events]
    assert kinds[:3] == ["message_start", "content_block_start", "ping"]
    assert set(kinds[3:-3]) == {"content_block_delta"}
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    for e, kind in zip(events, kinds):
        assert json.loads(e.split("\n")[1].removeprefix("data: "))["type"] == kind


def test_stop_sequences(client, chat):
    """A stop sequence the greedy reply meets ends it there: stop_reason stop_sequence."""
    full = client.messages.create(model="tiny", messages=CONVERSATION, max_tokens=16,
                                  **GREEDY).content[0].text
    stop = full[6:9]
    msg = client.messages.create(model="tiny", messages=CONVERSATION, max_tokens=16,
                                 stop_sequences=[stop], **GREEDY)
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", stop)
    assert msg.content[0].text == full[:full.index(stop)]
    with client.messages.stream(model="tiny", messages=CONVERSATION, max_tokens=16,
                                stop_sequences=[stop], **GREEDY) as stream:
        streamed = stream.get_final_message()
    assert (streamed.stop_reason, streamed.stop_sequence) == ("stop_sequence", stop)
    assert _blocks(streamed) == _blocks(msg)


def test_tool_call_round_trip(client, chat):
    """tool_choice auto (the hermes parser reads the reply, made a call with guided_choice):
    text then a tool_use block, stop_reason tool_use, streamed the same; the call and its
    result sent back give the chat route's reply to the same conversation."""
    kw = dict(model="tiny", messages=[{"role": "user", "content": "1 + 2?"}], tools=[TOOL],
              max_tokens=100, extra_body={"temperature": 0, "guided_choice": ["Sure." + CALL]})
    msg = client.messages.create(**kw)
    assert msg.stop_reason == "tool_use"
    assert _blocks(msg) == [("text", "Sure.", None, None, None, None),
                            ("tool_use", None, None, None, "add", {"a": 1, "b": 2})]
    call = msg.content[1]
    assert call.id
    with client.messages.stream(**kw) as stream:
        streamed = stream.get_final_message()
    assert _blocks(streamed) == _blocks(msg) and streamed.stop_reason == "tool_use"
    turn = [{"role": "user", "content": "1 + 2?"},
            {"role": "assistant", "content": msg.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                          "content": [{"type": "text", "text": "3"}]},
                                         {"type": "text", "text": "Thanks"}]}]
    reply = client.messages.create(model="r4_qv", messages=turn, tools=[TOOL],
                                   tool_choice={"type": "none"}, max_tokens=8, **GREEDY)
    ref = chat.chat.completions.create(model="r4_qv", messages=[
        {"role": "user", "content": "1 + 2?"},
        {"role": "assistant", "content": "Sure.", "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": "add", "arguments": json.dumps({"a": 1, "b": 2})}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "3"},
        {"role": "user", "content": "Thanks"}], tools=[CHAT_TOOL], tool_choice="none",
        max_tokens=8, **GREEDY)
    assert reply.content[0].text == ref.choices[0].message.content
    assert reply.usage.input_tokens == ref.usage.prompt_tokens


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "add"}])
def test_forced_tool_choice(client, choice):
    """any / tool: the reply constrained to the tools' schemas, a tool_use block; cut
    short by max_tokens, the input its JSON holds so far (as the stream helper reads it)."""
    kw = dict(model="r8_all", messages=[{"role": "user", "content": "Go"}], tools=[TOOL],
              tool_choice=choice, extra_body={"temperature": 0})
    msg = client.messages.create(max_tokens=200, **kw)
    [block] = msg.content
    assert block.type == "tool_use" and block.name == "add" and set(block.input) == {"a", "b"}
    assert msg.stop_reason == "tool_use"
    if choice["type"] == "tool":
        cut = client.messages.create(max_tokens=4, **kw)
        assert cut.stop_reason == "max_tokens" and isinstance(cut.content[-1].input, dict)
        with client.messages.stream(max_tokens=4, **kw) as stream:
            assert _blocks(stream.get_final_message()) == _blocks(cut)


def test_thinking_blocks(client, chat):
    """A reasoning parser's split as a thinking block before the text, streamed the same;
    thinking disabled: no thinking block."""
    reply = "Here is my thought process: add them Here is my response: three"
    kw = dict(model="tiny", messages=[{"role": "user", "content": "1 + 2?"}], max_tokens=60,
              extra_body={"temperature": 0, "guided_choice": [reply]})
    ref = chat.chat.completions.create(model="tiny", messages=kw["messages"], max_tokens=60,
                                       extra_body=kw["extra_body"])
    msg = client.messages.create(**kw)
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == ref.choices[0].message.reasoning_content
    assert msg.content[1].text == ref.choices[0].message.content and msg.content[0].signature
    with client.messages.stream(**kw) as stream:
        assert _blocks(stream.get_final_message()) == _blocks(msg)
    off = client.messages.create(thinking={"type": "disabled"}, **kw)
    assert _blocks(off) == _blocks(msg)[1:]  # the same reply, its reasoning left out


def test_count_tokens(client, chat):
    """The rendered prompt's tokens: what the chat route counts for the same conversation
    (the tools in the template; system blocks joined)."""
    system = [{"type": "text", "text": SYSTEM[:4]}, {"type": "text", "text": SYSTEM[4:]}]
    for tools, chat_tools in (([], None), ([TOOL], [CHAT_TOOL])):
        n = client.messages.count_tokens(model="r8_all", system=system,
                                         messages=CONVERSATION, tools=tools).input_tokens
        ref = chat.chat.completions.create(model="r8_all", messages=CHAT_CONVERSATION,
                                           tools=chat_tools, max_tokens=1)
        assert n == ref.usage.prompt_tokens
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="nope", messages=CONVERSATION)


def _error(e: pytest.ExceptionInfo, kind: str, message: str) -> None:
    body = e.value.body
    assert body["type"] == "error" and body["error"]["type"] == kind, body
    assert message in body["error"]["message"], body


def test_bad_requests_fail_alone(server, client):
    user = [{"role": "user", "content": "Hi"}]
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="nope", messages=user, max_tokens=4)
    _error(e, "not_found_error", "The model `nope` does not exist")
    cases = [
        (dict(messages=user, max_tokens=0), "max_tokens"),
        (dict(messages=[{"role": "user", "content": [{"type": "video"}]}], max_tokens=4),
         "messages[0].content[0]: a block of type 'video' is not valid"),
        (dict(messages=[{"role": "assistant", "content": [
            {"type": "tool_result", "tool_use_id": "x", "content": "3"}]}], max_tokens=4),
         "is not valid in a assistant message"),
        (dict(messages=[{"role": "system", "content": "Hi"}], max_tokens=4), "role"),
        (dict(messages=[{"role": "user", "content": [{"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": "AAAA"}}]}], max_tokens=4),
         "image"),
        (dict(messages=user, max_tokens=4, tool_choice={"type": "any"}), "tool_choice"),
        (dict(messages=user, max_tokens=4000), "maximum context length"),
        (dict(messages=user, max_tokens=4000, stream=True), "maximum context length"),
        (dict(messages=user, max_tokens=4, extra_body={"n": 2}), "n must be 1"),
    ]
    for kw, message in cases:
        with pytest.raises(anthropic.BadRequestError) as e:
            client.messages.create(model="tiny", **kw)
        _error(e, "invalid_request_error", message)
    r = server.post("/v1/messages", {"model": "tiny", "messages": user})  # no max_tokens
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]
    r = server.get("/v1/messages")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    msg = client.messages.create(model="tiny", messages=user, max_tokens=3, **GREEDY)
    assert msg.usage.output_tokens == 3  # the server carried on


def test_error_inside_a_stream(server, client, chat, doomed):
    """A failure after the stream began (an adapter deleted from disk before its first
    load) ends the stream with Anthropic's `error` event, which the SDK raises; the chat
    route's stream ends with OpenAI's error body; the other requests carry on."""
    user = [{"role": "user", "content": "Hi"}]
    for model in ("r8_all", "r4_qv"):  # these two fill host memory (max_cpu_loras = 2)
        client.messages.create(model=model, messages=user, max_tokens=1)
    shutil.rmtree(doomed)  # so 'doomed' is read again, and fails, when it is asked for
    r = server.post("/v1/messages", {"model": "doomed", "messages": user, "max_tokens": 4,
                                     "stream": True})
    assert r.status_code == 200  # the headers went out before the load failed
    events = [e for e in r.text.split("\n\n") if e.strip()]
    kinds = [e.split("\n")[0].removeprefix("event: ") for e in events]
    assert kinds == ["message_start", "error"], r.text  # the message began, then failed
    body = json.loads(events[1].split("\n")[1].removeprefix("data: "))
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "doomed" in body["error"]["message"], body
    with (pytest.raises(anthropic.APIStatusError) as e,
          client.messages.stream(model="doomed", messages=user, max_tokens=4) as stream):
        stream.get_final_message()
    _error(e, "invalid_request_error", "doomed")
    with pytest.raises(openai.APIError) as info:
        for _ in chat.chat.completions.create(model="doomed", messages=user, max_tokens=4,
                                              stream=True):
            pass
    assert "doomed" in info.value.message
    msg = client.messages.create(model="r4_qv", messages=user, max_tokens=3, **GREEDY)
    assert msg.usage.output_tokens == 3  # the server carried on


def test_api_key_as_x_api_key(server):
    """--api-key: Anthropic's x-api-key header is accepted as the bearer token is; a wrong
    key is a 401 in Anthropic's shape."""
    user = [{"role": "user", "content": "Hi"}]
    # the SDK sends its api_key as x-api-key (no Authorization header)
    keyed = anthropic.Anthropic(base_url=server.url, max_retries=0, api_key=KEY)
    # (sampled: two tokens may decode to no text, so the count is what is checked)
    assert keyed.messages.create(model="tiny", messages=user, max_tokens=2,
                                 extra_body={"ignore_eos": True}).usage.output_tokens == 2
    r = httpx.post(server.url_for("v1/messages"), headers={"x-api-key": KEY},
                   json={"model": "tiny", "messages": user, "max_tokens": 1})
    assert r.status_code == 200, r.text
    wrong = anthropic.Anthropic(base_url=server.url, max_retries=0, api_key="wrong")
    with pytest.raises(anthropic.AuthenticationError) as e:
        wrong.messages.create(model="tiny", messages=user, max_tokens=2)
    _error(e, "authentication_error", "Unauthorized")
    r = httpx.get(server.url_for("v1/models"), headers={"x-api-key": KEY})
    assert r.status_code == 200
