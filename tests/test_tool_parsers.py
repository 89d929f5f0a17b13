"""The tool parsers of DeepSeek-V3 / V3.1, Kimi-K2, MiniMax-M2, Seed-OSS and Llama 4
(vLLM's deepseek_v3, deepseek_v31, kimi_k2, minimax_m2, seed_oss, llama4_pythonic): each
on vLLM's example replies (several calls, none, text before them, typed or nested
arguments, malformed calls kept as text), its partial calls growing with the text, and a
real server per family with the openai client, streamed and not (the reply forced with
guided_choice, which tool_choice auto leaves free). The rest: tests/test_tool_calls.py."""

from __future__ import annotations

import json
import shutil

import pytest

from loraplex.entrypoints.tool_calls import call_deltas
from loraplex.entrypoints.tool_parsers import PARSERS
from tests.fixtures import add_tokens_to_model
from tests.server_utils import RemoteServer
from tests.test_tool_calls import MESSAGES, TOOLS, name_args, streamed_calls

pytest.importorskip("xgrammar")

B, E = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CB, CE, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


def v3_call(name: str, args: str) -> str:
    return f"{CB}function{SEP}{name}\n```json\n{args}\n```{CE}"


def kimi_call(call_id: str, args: str) -> str:
    return (f"<|tool_call_begin|>{call_id}<|tool_call_argument_begin|>{args}"
            "<|tool_call_end|>")


def parse(parser: str, text: str, tools: list | None = None):
    content, calls = PARSERS[parser]().for_request(tools).parse(text)
    return content, name_args(calls)


WEATHER = '{"location": "Beijing", "unit": {"deg": ["c", 1]}}'


def test_deepseek_v3():
    """vLLM's example: two calls, each its arguments in a ```json fence on one line."""
    text = ("Let me check." + B + v3_call("get_current_weather", WEATHER) + "\n"
            + v3_call("add", '{"a": 1}') + E)
    assert parse("deepseek_v3", text) == ("Let me check.", [
        ("get_current_weather", json.loads(WEATHER)), ("add", {"a": 1})])
    content, calls = PARSERS["deepseek_v3"]().parse(B + v3_call("add", "{}") + E)
    assert content is None and calls[0].function.arguments == "{}"
    for reply in ["No calls.", B + "nothing" + E,  # a section without a call
                  B + f"{CB}function{SEP}add\n```json\n{{\"a\":\n1}}\n```{CE}" + E]:
        assert parse("deepseek_v3", reply) == (reply, [])  # (vLLM: one line each)
    p = PARSERS["deepseek_v3"]()
    assert p.keeps_special_tokens and p.content_prefix("Hi <｜tool▁ca") == len("Hi ")


def test_deepseek_v31():
    text = ("Sure." + B + f"{CB}get_weather{SEP}{WEATHER}{CE}{CB}add{SEP}{{\"a\": 1}}{CE}" + E)
    assert parse("deepseek_v31", text) == ("Sure.", [
        ("get_weather", json.loads(WEATHER)), ("add", {"a": 1})])
    assert parse("deepseek_v31", "Paris is sunny.") == ("Paris is sunny.", [])
    unclosed = B + f"{CB}add{SEP}{{\"a\": 1}}"
    assert parse("deepseek_v31", unclosed) == (unclosed, [])


def test_kimi_k2_keeps_the_models_ids():
    text = ("I'll check. <|tool_calls_section_begin|>"
            + kimi_call("functions.get_weather:0", WEATHER) + " "
            + kimi_call(" functions.add:1 ", ' {"a": 1} ') + "<|tool_calls_section_end|>")
    content, calls = PARSERS["kimi_k2"]().parse(text)
    assert content == "I'll check. "
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("functions.get_weather:0", "get_weather", WEATHER),
        ("functions.add:1", "add", '{"a": 1}')]
    for reply in ["Sunny.", "<|tool_calls_section_begin|>" + kimi_call("get_weather", "{}")]:
        assert parse("kimi_k2", reply) == (reply, [])  # no ":N" in the id: text
    p = PARSERS["kimi_k2"]().for_request(None)
    p.partial("<|tool_calls_section_begin|>" + kimi_call("functions.add:3", "{}"))
    assert p.call_id() == "functions.add:3"  # streamed: the model's id too


MINIMAX_TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {
        "s": {"type": "string"}, "n": {"type": "integer"}, "x": {"type": "number"},
        "w": {"type": "number"}, "ok": {"type": "boolean"}, "one": {"type": "boolean"},
        "tags": {"type": "array"}, "opts": {"type": "object"}, "maybe": {"type": "integer"},
        "bad": {"type": "integer"}, "u": {"type": ["integer", "null"]}}}}}]


def test_minimax_m2_types_parameters_by_schema():
    params = [("s", "42"), ("n", "3"), ("x", "2.5"), ("w", "4.0"), ("ok", "True"),
              ("one", "1"), ("tags", '["a", 1]'), ("opts", '{"k": {"j": null}}'),
              ("maybe", "null"), ("bad", "many"), ("u", "7"), ("untyped", " 5 ")]
    text = ("Let me see.\n<minimax:tool_call>\n<invoke name=\"f\">\n"
            + "".join(f'<parameter name="{k}">{v}</parameter>\n' for k, v in params)
            + "</invoke>\n<invoke name=g>\n</invoke>\n</minimax:tool_call>")
    assert parse("minimax_m2", text, MINIMAX_TOOLS) == ("Let me see.\n", [
        ("f", {"s": "42", "n": 3, "x": 2.5, "w": 4, "ok": True, "one": True,
               "tags": ["a", 1], "opts": {"k": {"j": None}}, "maybe": None, "bad": "many",
               "u": 7, "untyped": "5"}), ("g", {})])
    unclosed = '<minimax:tool_call><invoke name="f"></invoke>'
    for reply in ["Sunny.", unclosed, "<minimax:tool_call></minimax:tool_call>"]:
        assert parse("minimax_m2", reply) == (reply, [])


SEED_TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {
        "s": {"type": "string"}, "n": {"type": "integer"}, "x": {"type": "number"},
        "ok": {"type": "boolean"}, "opts": {"type": "object"}, "tags": {"type": "array"},
        "bad": {"type": "integer"}}}}}]


def test_seed_oss_types_parameters_by_schema():
    params = [("s", "\n42\n"), ("n", "3"), ("x", "2.0"), ("ok", "TRUE"),
              ("opts", '{"k": [1]}'), ("tags", "['a', None]"), ("bad", "x"), ("other", "1")]
    call = ("<seed:tool_call>\n<function=f>\n"
            + "".join(f"<parameter={k}>{v}</parameter>\n" for k, v in params)
            + "</function>\n</seed:tool_call>")
    text = "Let me see." + call + "<seed:tool_call><function=g></function></seed:tool_call>"
    assert parse("seed_oss", text, SEED_TOOLS) == ("Let me see.", [
        ("f", {"s": "42", "n": 3, "x": 2, "ok": True, "opts": {"k": [1]},
               "tags": ["a", None], "bad": "x", "other": "1"}), ("g", {})])
    # vLLM's leniency: an open call read to the end, and thinking kept in the content
    assert parse("seed_oss", "<seed:think>hm</seed:think>ok<function=g><parameter=a>1") == (
        "<seed:think>hm</seed:think>ok", [("g", {"a": "1"})])
    for reply in ["Sunny.", "<seed:tool_call>no function</seed:tool_call>"]:
        assert parse("seed_oss", reply) == (reply, [])
    p = PARSERS["seed_oss"]()
    assert p.content_prefix("Hi <seed:tool") == 3 and p.content_prefix("Hi <funct") == 3


def test_llama4_pythonic_is_vllms():
    """Stricter than pythonic: the list first (no leading space), plain names, literals
    without tuples or signs; <|python_start|> taken off, with any <|python_end|>."""
    text = '<|python_start|>[get_weather(city="Paris", metric={"a": [1, None]}), add()]' \
           "<|python_end|>"
    assert parse("llama4_pythonic", text) == (None, [
        ("get_weather", {"city": "Paris", "metric": {"a": [1, None]}}), ("add", {})])
    for reply in ["Sunny.", " [add(a=1)]", "[add(a=-1)]", "[add(a=(1, 2))]", "[m.add(a=1)]",
                  "[1, 2]", "[]", "Sure: [add(a=1)]"]:
        assert parse("llama4_pythonic", reply) == (reply, []), reply
    assert parse("llama4_pythonic", "<|python_start|>Sunny.") == ("Sunny.", [])
    p = PARSERS["llama4_pythonic"]()
    assert p.content_prefix("<|pyth") == 0 and p.content_prefix("[ad") == 0
    assert p.content_prefix(" [add(") == len(" [add(")  # vLLM: not a call


@pytest.mark.parametrize("parser,text,calls", [
    ("deepseek_v3", "Hi" + B + v3_call("add", '{"a": 1, "b": {"c": "```"}}') + "\n"
     + v3_call("sub", "{}") + E, [("add", '{"a": 1, "b": {"c": "```"}}'), ("sub", "{}")]),
    ("deepseek_v31", "Hi" + B + f"{CB}add{SEP}{{\"a\": [1, 2]}}{CE}{CB}sub{SEP}{{}}{CE}" + E,
     [("add", '{"a": [1, 2]}'), ("sub", "{}")]),
    ("kimi_k2", "Hi<|tool_calls_section_begin|>" + kimi_call("functions.add:0", '{"a": 1}')
     + kimi_call("functions.sub:1", ' {"b": "<"} ') + "<|tool_calls_section_end|>",
     [("add", '{"a": 1}'), ("sub", '{"b": "<"}')]),
    ("minimax_m2", 'Hi<minimax:tool_call>\n<invoke name="add">\n<parameter name="a">1'
     '</parameter>\n<parameter name="b">x</parameter>\n</invoke>\n<invoke name="sub">'
     "</invoke></minimax:tool_call>", [("add", '{"a": "1", "b": "x"}'), ("sub", "{}")]),
    ("seed_oss", "Hi<seed:tool_call>\n<function=add>\n<parameter=a>\n1\n</parameter>\n"
     "<parameter=b>x</parameter>\n</function>\n</seed:tool_call><seed:tool_call>"
     "<function=sub></function></seed:tool_call>", [("add", '{"a": "1", "b": "x"}'),
                                                    ("sub", "{}")]),
    ("llama4_pythonic", '<|python_start|>[add(a=1, b=["x", {"k": None}]), sub()]<|python_end|>',
     [("add", '{"a": 1, "b": ["x", {"k": null}]}'), ("sub", "{}")]),
])
def test_partial_calls_grow_with_the_text(parser, text, calls):
    """Every prefix: the calls so far are prefixes of the final ones, so the stream's
    pieces (id and name first, then the arguments) add up to the parsed calls."""
    p = PARSERS[parser]().for_request(None)
    sent: dict[int, int] = {}
    got: dict[int, list[str]] = {}
    for n in range(len(text) + 1):
        for j, (name, args) in enumerate(p.partial(text[:n])):
            assert name in (None, calls[j][0]) and calls[j][1].startswith(args), (n, args)
        for d in call_deltas(p.partial(text[:n]), sent, p.call_id):
            if d.function.name is not None:
                assert d.id and d.index not in got
                got[d.index] = [d.function.name, d.function.arguments]
            else:
                got[d.index][1] += d.function.arguments
    assert [tuple(got[i]) for i in sorted(got)] == calls
    assert [(c.function.name, json.loads(c.function.arguments))
            for c in p.parse(text)[1]] == [(n, json.loads(a)) for n, a in calls]


ADD = '{"a": 1, "b": 2}'


@pytest.fixture(scope="module")
def thinker(tiny_models, tmp_path_factory):
    """A tiny llama whose tokenizer has <think> and </think> as tokens (deepseek_v3's
    reasoning parser needs them for structured outputs)."""
    path = tmp_path_factory.mktemp("ds") / "thinker"
    shutil.copytree(tiny_models["llama"], path)
    add_tokens_to_model(path, ["<think>", "</think>"], seed=64)
    return path


@pytest.mark.parametrize("parser, reply, content, reasoning", [
    ("deepseek_v3", "Sure." + B + v3_call("add", ADD) + E, "Sure.", "deepseek_v3"),
    ("kimi_k2", "<|tool_calls_section_begin|>" + kimi_call("functions.add:0", ADD)
     + "<|tool_calls_section_end|>", None, None),
    ("minimax_m2", 'Add.</think>\n\n<minimax:tool_call>\n<invoke name="add">\n'
     '<parameter name="a">1</parameter>\n<parameter name="b">2</parameter>\n</invoke>\n'
     "</minimax:tool_call>", "<think>Add.</think>\n\n", "minimax_m2_append_think"),
    ("seed_oss", "Sure.\n<seed:tool_call>\n<function=add>\n<parameter=a>\n1\n</parameter>\n"
     "<parameter=b>\n2\n</parameter>\n</function>\n</seed:tool_call>", "Sure.\n", None),
    ("llama4_pythonic", "<|python_start|>[add(a=1, b=2)]<|python_end|>", None, None),
])
def test_auto_tool_choice(parser, reply, content, reasoning, tiny_models, thinker):
    """One server per family: a reply without calls is text; one with a call comes back
    as tool_calls (streamed: id and name, then the arguments), the text before it as
    content; with a reasoning parser too (minimax_m2_append_think: the thinking stays in
    the content; deepseek_v3: all content unless the request asks for thinking)."""
    args = ["--dtype", "float32", "--max-model-len", "512", "--cpu-kv-cache-gib", "0.05",
            "--enable-auto-tool-choice", "--tool-call-parser", parser]
    args += ["--reasoning-parser", reasoning] if reasoning else []
    model = thinker if reasoning == "deepseek_v3" else tiny_models["llama"]
    with RemoteServer(model, args) as server:
        client = server.get_client()
        name = client.models.list().data[0].id
        kw = dict(model=name, messages=MESSAGES, tools=TOOLS, max_tokens=200, temperature=0,
                  extra_body={"guided_choice": [reply]})
        choice = client.chat.completions.create(**kw).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == content
        assert name_args(choice.message.tool_calls) == [("add", {"a": 1, "b": 2})]
        chunks = list(client.chat.completions.create(stream=True, **kw))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.content or "" for d in deltas) == (content or "")
        got = streamed_calls(chunks)
        assert [(n, a) for _, n, a in got] == [("add", ADD)]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        if parser == "kimi_k2":  # the model's own id, both ways
            assert choice.message.tool_calls[0].id == got[0][0] == "functions.add:0"
        if reasoning == "deepseek_v3":  # thinking asked for: R1's split, no </think>: all
            res = client.chat.completions.create(  # reasoning
                model=name, messages=MESSAGES, max_tokens=6, temperature=0,
                extra_body={"chat_template_kwargs": {"thinking": True}})
            msg = res.choices[0].message
            assert msg.reasoning_content and not msg.content
            assert res.usage.completion_tokens_details.reasoning_tokens == 6
