"""Chat tool calling over HTTP with the official openai client: tool_choice "required" or
a named function (the reply constrained to the tools' schemas, back as tool_calls,
streamed too: a call's arguments piece by piece); "auto" with the hermes, llama3_json,
mistral, pythonic, qwen3_coder, granite and phi4_mini_json parsers (a 400 on a server started
without them; mistral's reply keeps its special tokens); a conversation carrying calls and tool results; malformed requests are
400s."""

from __future__ import annotations

import json
import re
import shutil

import openai
import pytest

from loraplex.entrypoints.tool_parsers import (
    PARSERS,
    GraniteParser,
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    Phi4MiniJsonParser,
    PythonicParser,
)
from tests.fixtures import add_tokens_to_model
from tests.server_utils import RemoteServer, serve_cmd
from tests.test_server_cli import assert_one_line_error, run

pytest.importorskip("xgrammar")

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object",
                       "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                      "days": {"type": "integer", "minimum": 1,
                                               "maximum": 7}},
                       "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "parameters": {"type": "object",
                                      "properties": {"a": {"type": "integer"},
                                                     "b": {"type": "integer"}},
                                      "required": ["a", "b"], "additionalProperties": False}}},
]
MESSAGES = [{"role": "user", "content": "Weather in Paris for 3 days?"}]


def check_weather(arguments: str) -> None:
    args = json.loads(arguments)
    assert args["city"] in ("Paris", "Oslo") and 1 <= args["days"] <= 7, args


def name_args(calls) -> list[tuple[str, object]]:
    """Each call's name and its arguments, parsed."""
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def check_call(call) -> None:
    assert call.type == "function" and call.id
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        check_weather(call.function.arguments)
    else:
        assert call.function.name == "add" and set(args) == {"a", "b"}, args


@pytest.fixture(scope="module")
def client(tiny_models):
    args = ["--dtype", "float32", "--max-model-len", "512", "--cpu-kv-cache-gib", "0.05"]
    with RemoteServer(tiny_models["llama"], args) as server:
        yield server.get_client()


def _model(client) -> str:
    return client.models.list().data[0].id


def test_named_function(client):
    res = client.chat.completions.create(
        model=_model(client), messages=MESSAGES, tools=TOOLS, max_tokens=60, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    check_weather(call.function.arguments)


def test_required_calls_one_or_more_tools(client):
    called = 0
    for seed in range(3):
        res = client.chat.completions.create(
            model=_model(client), messages=MESSAGES, tools=TOOLS, tool_choice="required",
            max_tokens=200, temperature=1.0, seed=seed)
        choice = res.choices[0]
        if choice.finish_reason == "length":  # cut short: returned as text
            assert not choice.message.tool_calls and choice.message.content
            continue
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            check_call(call)
        called += 1
    assert called  # (a random model may ramble to max_tokens, but not every time)


def streamed_calls(chunks) -> list[tuple[str, str, str]]:
    """(id, name, arguments) of each streamed call: its first piece has its id and name,
    the later ones (in order) only more of its arguments."""
    calls: dict[int, list[str]] = {}
    for c in chunks:
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            if tc.index not in calls:
                assert tc.id and tc.type == "function" and tc.function.name, tc
                calls[tc.index] = [tc.id, tc.function.name, tc.function.arguments or ""]
            else:
                assert tc.id is None and tc.function.name is None, tc
                calls[tc.index][2] += tc.function.arguments
    assert sorted(calls) == list(range(len(calls)))
    return [tuple(calls[i]) for i in sorted(calls)]


@pytest.mark.parametrize("choice", ["add", "required"])
def test_streamed_calls_equal_the_whole_reply(client, choice):
    """Streamed, a call goes out once its name is known, then its arguments piece by piece
    as the model writes them; put together they are the whole reply's calls."""
    tool_choice = {"type": "function", "function": {"name": "add"}} if choice == "add" \
        else "required"
    kw = dict(model=_model(client), messages=MESSAGES, tools=TOOLS, max_tokens=80,
              temperature=0, tool_choice=tool_choice)
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kw))
    pieces = sum(len(c.choices[0].delta.tool_calls or []) for c in chunks if c.choices)
    got = streamed_calls(chunks)
    assert whole.finish_reason == "tool_calls"
    assert [(n, json.loads(a)) for _, n, a in got] == name_args(whole.message.tool_calls)
    assert pieces > len(got)  # the arguments came in pieces, not whole at the end
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_conversation_with_calls_and_results(client):
    """An assistant turn that called a tool, and the tool's answer, go back in."""
    messages = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    res = client.chat.completions.create(model=_model(client), messages=messages, tools=TOOLS,
                                         tool_choice="none", max_tokens=5, temperature=0)
    assert res.choices[0].finish_reason == "length" and res.choices[0].message.content


@pytest.mark.parametrize(("kw", "message"), [
    ({"tools": TOOLS}, "--enable-auto-tool-choice"),
    ({"tools": TOOLS, "tool_choice": "auto"}, "--enable-auto-tool-choice"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "not in tools"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}],
      "tool_choice": "required"}, "tools[0] must be"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "constrains the reply already"),
])
def test_bad_tool_requests_are_400s(client, kw, message):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=_model(client), messages=MESSAGES, max_tokens=5,
                                       **kw)
    assert message in str(err.value), err.value
    res = client.chat.completions.create(model=_model(client), messages=MESSAGES, max_tokens=3)
    assert res.choices[0].finish_reason == "length"  # the server carries on


def test_hermes_parser():
    p = HermesParser()
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
            '"Paris", "days": 3}}\n</tool_call>\n<tool_call>{"name": "add", "arguments": '
            '{"a": 1, "b": 2}}</tool_call>')
    content, calls = p.parse(text)
    assert content == "Let me check."
    assert name_args(calls) == [
        ("get_weather", {"city": "Paris", "days": 3}), ("add", {"a": 1, "b": 2})]
    assert p.parse("no calls here") == ("no calls here", [])
    broken = "<tool_call>{not json}</tool_call>"
    assert p.parse(broken) == (broken, [])  # kept as text
    # streaming: text before a call goes out, a possible start of one waits
    assert p.content_prefix("Hello <tool_call>{") == len("Hello ")
    assert p.content_prefix("Hello <tool_c") == len("Hello ")
    assert p.content_prefix("Hello <b>") == len("Hello <b>")


def test_llama3_json_parser():
    p = Llama3JsonParser()
    content, calls = p.parse(' {"name": "add", "parameters": {"a": 1, "b": 2}}; '
                             '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 1}}')
    assert content is None and [c.function.name for c in calls] == ["add", "get_weather"]
    assert json.loads(calls[0].function.arguments) == {"a": 1, "b": 2}
    assert p.parse("Paris is sunny.") == ("Paris is sunny.", [])
    assert p.parse('{"no": "name"}') == ('{"no": "name"}', [])
    assert p.content_prefix('  {"name"') == 0 and p.content_prefix("<|pyth") == 0
    assert p.content_prefix("Sunny") == len("Sunny")


def test_mistral_parser():
    p = MistralParser()
    content, calls = p.parse('Checking.[TOOL_CALLS][{"name": "get_weather", "arguments": '
                             '{"city": "Paris", "days": 3}}, {"name": "add", "arguments": '
                             '{"a": 1, "b": 2}}]')
    assert content == "Checking."
    assert name_args(calls) == [
        ("get_weather", {"city": "Paris", "days": 3}), ("add", {"a": 1, "b": 2})]
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", c.id) for c in calls)  # Mistral's ids
    # tokenizers v11 on: name[ARGS]{...} after each [TOOL_CALLS]
    content, calls = p.parse('[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}[TOOL_CALLS]get_weather'
                             '[ARGS]{"city": "Oslo", "days": 1}')
    assert content is None and [c.function.name for c in calls] == ["add", "get_weather"]
    assert json.loads(calls[1].function.arguments) == {"city": "Oslo", "days": 1}
    assert p.parse("Sunny.") == ("Sunny.", [])
    assert p.parse("[TOOL_CALLS][{oops") == ("[TOOL_CALLS][{oops", [])
    assert p.content_prefix("Hi [TOOL_CA") == len("Hi ") and p.keeps_special_tokens


def test_granite_parser():
    """Granite 3: a JSON list of calls after <|tool_call|> and / or <tool_call>, or bare
    (3.0's special token decoded away), as the whole reply; anything else is text."""
    p = GraniteParser()
    calls = '[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "get_weather", ' \
            '"arguments": {"city": "Oslo", "days": 1}}]'
    for head in ["<|tool_call|>", " <tool_call>\n", "", "<|tool_call|> <tool_call>"]:
        content, got = p.parse(head + calls + "\n")
        assert content is None and name_args(got) == [
            ("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo", "days": 1})]
    for text in ["Paris is sunny.", "[]", "[1, 2]", '[{"name": "add"}]',  # vLLM: arguments
                 '{"name": "add", "arguments": {}}', "<tool_call>[{oops", "Sure. " + calls,
                 calls + " done", "<tool_call>" + calls + "</tool_call>"]:
        assert p.parse(text) == (text, []), text  # kept as text
    assert p.content_prefix(" <|tool_") == 0 and p.content_prefix("<tool_c") == 0
    assert p.content_prefix("[{") == 0 and p.content_prefix("Sunny") == len("Sunny")


def test_phi4_mini_json_parser():
    """Phi-4-mini: functools[...] after any text, "arguments" or "parameters"; a list in
    the arguments does not end the calls (it does in vLLM, whose regex stops at "]")."""
    p = Phi4MiniJsonParser()
    content, calls = p.parse('Let me see. functools[{"name": "add", "parameters": {"a": [1, 2]}}, '
                             '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}]'
                             " trailing")
    assert (content, name_args(calls)) == ("Let me see. ", [
        ("add", {"a": [1, 2]}), ("get_weather", {"city": "Oslo", "days": 1})])
    content, calls = p.parse('functools[{"name": "add", "arguments": {}}]')
    assert content is None and calls[0].function.arguments == "{}"
    for text in ["Sunny.", "functools is a module", "functools[]", 'functools[{"name": "add"}]',
                 'functools[{"arguments": {}}]', "functools[{oops}]", 'functools[{"name": 1, '
                 '"arguments": {}}]']:
        assert p.parse(text) == (text, []), text
    assert p.content_prefix("Hi functo") == len("Hi ")
    assert p.content_prefix("Hi functools[{") == len("Hi ")
    assert p.content_prefix("Hi functools.reduce") == len("Hi functools.reduce")


def test_tool_call_parser_flag_names_every_parser():
    from loraplex.entrypoints.cli import TOOL_CALL_PARSERS

    assert sorted(TOOL_CALL_PARSERS) == sorted(PARSERS)


@pytest.mark.parametrize("parser, reply, content", [
    ("hermes", 'Sure.<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>',
     "Sure."),
    ("pythonic", "[add(a=1, b=2)]", None),
    ("qwen3_coder", "Sure.\n<tool_call>\n<function=add>\n<parameter=a>\n1\n</parameter>\n"
                    "<parameter=b>\n2\n</parameter>\n</function>\n</tool_call>", "Sure.\n"),
    ("phi4_mini_json", 'Sure. functools[{"name": "add", "parameters": {"a": 1, "b": 2}}]',
     "Sure. "),
    ("glm45", "Sure.\n<tool_call>add\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n"
              "<arg_key>b</arg_key>\n<arg_value>2</arg_value>\n</tool_call>", "Sure.\n"),
])
def test_auto_tool_choice(parser, reply, content, tiny_models):
    """A server with --enable-auto-tool-choice --tool-call-parser NAME serves tool_choice
    auto: a reply without calls is text; a reply with one (made so here with guided_choice,
    which auto leaves free) comes back as tool_calls, streamed too."""
    args = ["--dtype", "float32", "--max-model-len", "512", "--cpu-kv-cache-gib", "0.05",
            "--enable-auto-tool-choice", "--tool-call-parser", parser]
    with RemoteServer(tiny_models["llama"], args) as server:
        client = server.get_client()
        model = _model(client)
        res = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS,
                                             max_tokens=8, temperature=0)
        assert res.choices[0].message.content and not res.choices[0].message.tool_calls
        kw = dict(model=model, messages=MESSAGES, tools=TOOLS, max_tokens=200, temperature=0,
                  extra_body={"guided_choice": [reply]})
        choice = client.chat.completions.create(**kw).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == content
        assert name_args(choice.message.tool_calls) == [("add", {"a": 1, "b": 2})]
        chunks = list(client.chat.completions.create(stream=True, **kw))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.content or "" for d in deltas) == (content or "")
        assert [(n, a) for _, n, a in streamed_calls(chunks)] == [("add", '{"a": 1, "b": 2}')]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_parallel_tool_calls_false_makes_at_most_one_call(tiny_models, client):
    """OpenAI's parallel_tool_calls=false. auto: the model's first call of two (streamed
    too; the Responses API passes it on); required: the grammar allows one call."""
    reply = ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
             '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}'
             '</tool_call>')
    args = ["--dtype", "float32", "--max-model-len", "512", "--cpu-kv-cache-gib", "0.05",
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    with RemoteServer(tiny_models["llama"], args) as server:
        auto = server.get_client()
        kw = dict(model=_model(auto), messages=MESSAGES, tools=TOOLS, max_tokens=200,
                  temperature=0, extra_body={"guided_choice": [reply]})
        both = auto.chat.completions.create(**kw).choices[0].message.tool_calls
        assert [c.function.name for c in both] == ["add", "get_weather"]
        one = auto.chat.completions.create(parallel_tool_calls=False, **kw).choices[0]
        assert one.finish_reason == "tool_calls"
        assert name_args(one.message.tool_calls) == [("add", {"a": 1, "b": 2})]
        chunks = list(auto.chat.completions.create(parallel_tool_calls=False, stream=True,
                                                   **kw))
        assert [(n, a) for _, n, a in streamed_calls(chunks)] == [("add", '{"a": 1, "b": 2}')]
        flat = [{"type": "function", **t["function"]} for t in TOOLS]
        items = auto.responses.create(model=_model(auto), input=MESSAGES[0]["content"],
                                      tools=flat, parallel_tool_calls=False, temperature=0,
                                      extra_body={"guided_choice": [reply]}).output
        assert [i.name for i in items if i.type == "function_call"] == ["add"]
    for seed in range(3):
        choice = client.chat.completions.create(
            model=_model(client), messages=MESSAGES, tools=TOOLS, tool_choice="required",
            parallel_tool_calls=False, max_tokens=200, temperature=1.0, seed=seed).choices[0]
        assert len(choice.message.tool_calls or []) <= 1
    from loraplex.entrypoints.protocol import ChatCompletionRequest
    from loraplex.entrypoints.tool_calls import tool_choice_outputs
    req = ChatCompletionRequest(messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                parallel_tool_calls=False)
    assert tool_choice_outputs(req).json["maxItems"] == 1


def _with_special_token(src, dst, token: str):
    """A copy of the tiny model whose tokenizer has `token` as a special token (the last
    id: the embeddings grow by one row)."""
    shutil.copytree(src, dst)
    return dst, add_tokens_to_model(dst, [token], special=True)[0]


def test_mistral_parser_keeps_special_tokens(tiny_models, tmp_path):
    """[TOOL_CALLS] is a special token: with tool_choice auto and the mistral parser the
    reply is decoded with special tokens kept (here the model is made to say nothing
    else: as no call follows it, it comes back as content); without tools it is dropped as
    usual."""
    base, tag = _with_special_token(tiny_models["llama"], tmp_path / "mistralish",
                                    "[TOOL_CALLS]")
    args = ["--dtype", "float32", "--max-model-len", "256", "--cpu-kv-cache-gib", "0.05",
            "--enable-auto-tool-choice", "--tool-call-parser", "mistral"]
    with RemoteServer(base, args) as server:
        client = server.get_client()
        kw = dict(model=_model(client), messages=MESSAGES, max_tokens=2, temperature=0,
                  logit_bias={str(tag): 100})
        res = client.chat.completions.create(tools=TOOLS, **kw)
        assert res.choices[0].message.content == "[TOOL_CALLS][TOOL_CALLS]"
        assert client.chat.completions.create(**kw).choices[0].message.content == ""


def test_pythonic_parser():
    """Llama 3.2 / 4's calls: a Python list of calls with literal keyword arguments, read
    with ast (never evaluated); anything else is text."""
    p = PythonicParser()
    content, calls = p.parse('[get_weather(city="Paris", days=3), add(a=1, b=-2), '
                             "note(text='it\\'s, ok)', tags=['x', None, True], d={'k': (1, 2)})]")
    assert content is None
    assert name_args(calls) == [
        ("get_weather", {"city": "Paris", "days": 3}), ("add", {"a": 1, "b": -2}),
        ("note", {"text": "it's, ok)", "tags": ["x", None, True], "d": {"k": [1, 2]}})]
    content, calls = p.parse('<|python_start|>[add(a=1, b=2)]<|python_end|>')  # Llama 4
    assert content is None and calls[0].function.name == "add"
    for text in ["Paris is sunny.", "[1, 2]", "[]", "[add(1, 2)]", "[add(a=b)]",
                 "[add(a=__import__('os'))]", "[add(**k)]", "[add(a={1, 2})]", "[add(a=1"]:
        assert p.parse(text) == (text, []), text  # kept as text
    assert p.content_prefix(" [add(") == 0 and p.content_prefix("<|python_st") == 0
    assert p.content_prefix("Sunny") == len("Sunny")


def test_qwen3_coder_parser_types_values_by_schema():
    from loraplex.entrypoints.tool_parsers import Qwen3CoderParser

    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {
            "n": {"type": "integer"}, "x": {"type": "number"}, "ok": {"type": "boolean"},
            "tags": {"type": "array"}, "opts": {"type": "object"}, "s": {"type": "string"},
            "bad": {"type": "integer"}}}}}]
    reply = ("Let me check.\n<tool_call>\n<function=f>\n"
             + "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in [
                 ("n", "3"), ("x", "2.5"), ("ok", "True"), ("tags", '["a", 1]'),
                 ("opts", '{"k": null}'), ("s", "42"), ("bad", "many"),
                 ("unknown", "multi\nline")])
             + "</function>\n</tool_call>")
    content, calls = Qwen3CoderParser().for_request(tools).parse(reply)
    assert content == "Let me check.\n" and calls[0].function.name == "f"
    assert json.loads(calls[0].function.arguments) == {
        "n": 3, "x": 2.5, "ok": True, "tags": ["a", 1], "opts": {"k": None}, "s": "42",
        "bad": "many", "unknown": "multi\nline"}
    p = Qwen3CoderParser()
    assert p.parse("No tools needed.") == ("No tools needed.", [])
    unfinished = "<tool_call>\n<function=f>\n<parameter=n>\n3\n</parameter>"
    assert p.parse(unfinished) == (unfinished, [])  # no </function>: text, as written
    assert p.content_prefix("Sure. <tool_c") == len("Sure. ")


def test_glm45_parser_types_values_as_vllm():
    """A value is kept as written where the schema says string, else read as JSON, else
    as a Python literal, else kept as text; GLM-4.7's form (no newline after the name)
    and several calls read too."""
    from loraplex.entrypoints.tool_parsers import Glm45Parser

    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string"}, "n": {"type": "integer"},
                                         "tags": {"type": "array"}}}}}]
    reply = ("Let me check.\n<tool_call>f\n"
             + "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{v}</arg_value>\n" for k, v in [
                 ("s", "42"), ("n", "3"), ("tags", '["a", 1]'), ("py", "{'k': None}"),
                 ("unknown", "multi\nline"), ("flag", "true")])
             + "</tool_call><tool_call>g<arg_key>x</arg_key><arg_value>1.5</arg_value>"
             "</tool_call>")
    content, calls = Glm45Parser().for_request(tools).parse(reply)
    assert content == "Let me check.\n"
    assert [c.function.name for c in calls] == ["f", "g"]
    assert json.loads(calls[0].function.arguments) == {
        "s": "42", "n": 3, "tags": ["a", 1], "py": {"k": None}, "unknown": "multi\nline",
        "flag": True}
    assert json.loads(calls[1].function.arguments) == {"x": 1.5}
    p = Glm45Parser()
    assert p.parse("No tools needed.") == ("No tools needed.", [])
    unfinished = "<tool_call>f\n<arg_key>n</arg_key><arg_value>3</arg_value>"
    assert p.parse(unfinished) == (unfinished, [])  # no </tool_call>: text, as written
    assert p.content_prefix("Sure. <tool_c") == len("Sure. ")
    assert p.partial("<tool_call>get_wea") == []  # the name is not whole yet


def test_auto_tool_choice_needs_a_parser(tiny_models):
    res = run(serve_cmd(str(tiny_models["llama"]), "--enable-auto-tool-choice"))
    assert_one_line_error(res, 1, "--enable-auto-tool-choice needs --tool-call-parser")


@pytest.mark.parametrize("parser,text,calls", [
    ("hermes", 'Hi <tool_call>{"name": "add", "arguments": {"a": 1, "b": {"c": "}"}}}'
               '</tool_call><tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}'
               '</tool_call>', [("add", '{"a": 1, "b": {"c": "}"}}'),
                                ("get_weather", '{"city": "Oslo"}')]),
    ("mistral", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}, {"arguments": {"b": '
                '"x\\"y"}, "name": "sub"}]', [("add", '{"a": 1}'), ("sub", '{"b": "x\\"y"}')]),
    ("mistral", '[TOOL_CALLS]add[ARGS]{"a": 1}[TOOL_CALLS]sub[ARGS]{"b": 2}',
     [("add", '{"a": 1}'), ("sub", '{"b": 2}')]),
    ("llama3_json", '<|python_tag|>{"name": "add", "parameters": {"a": [1, 2]}}; '
                    '{"name": "sub", "parameters": {}}', [("add", '{"a": [1, 2]}'),
                                                           ("sub", "{}")]),
    ("qwen3_coder", 'Hi <tool_call>\n<function=add>\n<parameter=a>\n1\n</parameter>\n'
                    '<parameter=b>\nx</parameter> y\n</parameter>\n</function>\n</tool_call>'
                    '<tool_call>\n<function=sub>\n</function>\n</tool_call>',
     [("add", '{"a": "1", "b": "x"}'), ("sub", "{}")]),
    ("pythonic", '[get_weather(city="Oslo", days=2), add(a=1, b=[1, "x,)\\"("]), sub()]',
     [("get_weather", '{"city": "Oslo", "days": 2}'),
      ("add", '{"a": 1, "b": [1, "x,)\\"("]}'), ("sub", "{}")]),
    ("granite", '<|tool_call|><tool_call>[{"name": "add", "arguments": {"a": [1, "]"]}}, '
                '{"arguments": {}, "name": "sub"}]', [("add", '{"a": [1, "]"]}'),
                                                      ("sub", "{}")]),
    ("phi4_mini_json", 'Hi functools[{"name": "add", "parameters": {"a": "x\\"]"}}, {"name": '
                       '"sub", "arguments": [1]}] bye', [("add", '{"a": "x\\"]"}'),
                                                        ("sub", "[1]")]),
    ("glm45", "Hi <tool_call>add\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n"
              "<arg_key>b</arg_key>\n<arg_value>x</arg_value>\n</tool_call>"
              "<tool_call>sub\n</tool_call>", [("add", '{"a": 1, "b": "x"}'), ("sub", "{}")]),
])
def test_partial_calls_grow_with_the_text(parser, text, calls):
    """Every prefix of a reply: the calls so far are the final ones' prefixes (arguments
    only grow, a name appears whole), so the stream's pieces add up to the final calls."""
    from loraplex.entrypoints.tool_calls import call_deltas
    from loraplex.entrypoints.tool_parsers import PARSERS

    p = PARSERS[parser]()
    sent: dict[int, int] = {}
    got: dict[int, list[str]] = {}
    for n in range(len(text) + 1):
        for j, (name, args) in enumerate(p.partial(text[:n])):
            final_name, final_args = calls[j]
            assert name in (None, final_name) and final_args.startswith(args), (n, name, args)
        for d in call_deltas(p.partial(text[:n]), sent, p.call_id):
            if d.function.name is not None:
                got[d.index] = [d.function.name, d.function.arguments]
            else:
                got[d.index][1] += d.function.arguments
    assert [tuple(got[i]) for i in sorted(got)] == calls
    assert p.parse(text)[1] and [json.loads(c.function.arguments) for c in p.parse(text)[1]] \
        == [json.loads(a) for _, a in calls]


def test_granite_thinks_then_calls(tiny_models):
    """Granite 3.2's way on one server (`--reasoning-parser granite --tool-call-parser
    granite`): the thought process apart, then the answer or a <|tool_call|> list read
    from what follows "Here is my response:"; streamed alike. The phrases are no tokens,
    so guided_choice constrains the whole reply, thought process included."""
    args = ["--dtype", "float32", "--max-model-len", "512", "--cpu-kv-cache-gib", "0.05",
            "--reasoning-parser", "granite", "--enable-auto-tool-choice",
            "--tool-call-parser", "granite"]
    thought = "Here is my thought process:\nAdd them.\n\nHere is my response:\n"
    call = '<|tool_call|>[{"name": "add", "arguments": {"a": 1, "b": 2}}]'
    with RemoteServer(tiny_models["llama"], args) as server:
        client = server.get_client()
        kw = dict(model=_model(client), messages=MESSAGES, max_tokens=200, temperature=0)
        for tools, answer in [(TOOLS, call), (None, "It is 3.")]:
            req = dict(kw, extra_body={"guided_choice": [thought + answer]},
                       **({"tools": tools} if tools else {}))
            res = client.chat.completions.create(**req)
            msg = res.choices[0].message
            assert msg.reasoning_content == "\nAdd them.\n\n"
            assert 0 < res.usage.completion_tokens_details.reasoning_tokens \
                < res.usage.completion_tokens
            chunks = list(client.chat.completions.create(stream=True, **req))
            deltas = [c.choices[0].delta for c in chunks if c.choices]
            assert "".join(d.reasoning_content or "" for d in deltas) == "\nAdd them.\n\n"
            if tools:
                assert res.choices[0].finish_reason == "tool_calls" and msg.content is None
                assert name_args(msg.tool_calls) == [("add", {"a": 1, "b": 2})]
                assert [(n, a) for _, n, a in streamed_calls(chunks)] == [
                    ("add", '{"a": 1, "b": 2}')]
                assert "".join(d.content or "" for d in deltas) == ""
            else:
                assert msg.content == "\nIt is 3." and not msg.tool_calls
                assert "".join(d.content or "" for d in deltas) == "\nIt is 3."
