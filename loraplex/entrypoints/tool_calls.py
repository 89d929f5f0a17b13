"""Chat tool calls, as vLLM makes them.

`tool_choice` "required" or a named function needs no knowledge of the model: the reply
is constrained (structured outputs) to JSON, then turned into `tool_calls`.

    named function f:  the reply is f's arguments      -> one call of f
    "required":        [{"name": ..., "parameters": {...}}, ...], each name one of the
                       tools and its parameters that tool's schema  -> one call each

"auto" (the default when tools are given) lets the model answer or call, in its own
format: the server needs `--enable-auto-tool-choice --tool-call-parser NAME`, and the
parser reads the calls out of the reply (`PARSERS`: Hermes / Qwen's `<tool_call>` tags,
Llama 3's bare JSON, Mistral's `[TOOL_CALLS]`, Llama 3.2 / 4's Python list of calls,
Qwen3-Coder's XML-like tags with values typed by the tools' schemas, gpt-oss's harmony
messages to functions.NAME, Granite 3's `<|tool_call|>[...]`, Phi-4-mini's
`functools[...]`, GLM-4.5's key / value tags).

Streamed, the text before a call goes out as it comes; a call goes out once its name is
complete (id, name), then its arguments' text piece by piece as the model writes it
(`partial` of each format: the calls so far, each a name and the raw arguments so far).
"""

from __future__ import annotations

import ast
import json
import random
import re
import string
from typing import Any

from loraplex import harmony
from loraplex.entrypoints.errors import BadRequestError
from loraplex.entrypoints.protocol import (
    ChatCompletionRequest,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from loraplex.sampling_params import StructuredOutputsParams

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def _tool_schemas(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Function name -> its parameters' JSON schema; a malformed tool is a 400."""
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" \
                or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRequestError(f"tools[{i}] must be {{'type': 'function', 'function': "
                                  "{'name': ..., 'parameters': {...}}}", param="tools")
        params = fn.get("parameters") or _ANY_OBJECT
        if not isinstance(params, dict):
            raise BadRequestError(f"tools[{i}].function.parameters must be a JSON schema "
                                  "object", param="tools")
        out[fn["name"]] = params
    return out


def forced_function(req: ChatCompletionRequest) -> str | None:
    """The function a named tool_choice forces, else None."""
    choice = req.tool_choice
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if choice.get("type") != "function" or not isinstance(name, str):
            raise BadRequestError("tool_choice must be 'none', 'auto', 'required' or "
                                  "{'type': 'function', 'function': {'name': ...}}",
                                  param="tool_choice")
        return name
    return None


def tool_mode(req: ChatCompletionRequest, auto_parser: str | None) -> str | None:
    """How this request uses tools: None (it does not), "forced" (required or a named
    function) or "auto" (the server's parser reads the reply). A 400 for what cannot be
    served; `auto_parser`: the server's --tool-call-parser, None without
    --enable-auto-tool-choice."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise BadRequestError("tool_choice needs tools", param="tool_choice")
        return None
    _tool_schemas(req.tools)
    if choice == "none":
        return None
    if choice in (None, "auto"):
        if auto_parser is None:
            raise BadRequestError(
                "tool_choice 'auto' (the default when tools are given) needs the server "
                "started with --enable-auto-tool-choice and --tool-call-parser; or use "
                "tool_choice 'required' or a named function", param="tool_choice")
        return "auto"
    if choice != "required" and forced_function(req) is None:
        raise BadRequestError("tool_choice must be 'none', 'auto', 'required' or a named "
                              "function", param="tool_choice")
    return "forced"


def tool_choice_outputs(req: ChatCompletionRequest) -> StructuredOutputsParams:
    """The structured output a request's tool_choice constrains the reply to."""
    schemas = _tool_schemas(req.tools or [])
    name = forced_function(req)
    if name is not None:
        if name not in schemas:
            raise BadRequestError(f"tool_choice names {name!r}, which is not in tools",
                                  param="tool_choice")
        schema = schemas[name]
    else:
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": [
            {"type": "object", "properties": {"name": {"enum": [n]}, "parameters": p},
             "required": ["name", "parameters"], "additionalProperties": False}
            for n, p in schemas.items()]}}
        if req.parallel_tool_calls is False:
            schema["maxItems"] = 1
    return StructuredOutputsParams(json=schema, disable_any_whitespace=True)


def to_tool_calls(req: ChatCompletionRequest, text: str) -> list[ToolCall] | None:
    """The calls a constrained reply makes; None when it does not parse (cut short by
    max_tokens: the caller returns it as content)."""
    name = forced_function(req)
    if name is not None:
        return [ToolCall(function=FunctionCall(name=name, arguments=text))]
    try:
        calls = json.loads(text, strict=False)
    except json.JSONDecodeError:
        return None
    return [ToolCall(function=FunctionCall(name=c["name"],
                                           arguments=json.dumps(c["parameters"])))
            for c in calls]


# ---- calls as they are written (streaming) ---------------------------------------------
PartialCall = tuple[str | None, str]  # (the name once complete, the arguments' text so far)


def _object_fields(text: str, i: int) -> tuple[dict[str, tuple[int, int | None]], int | None]:
    """The top-level fields of the JSON object that opens at text[i], as far as `text`
    goes: key -> (start of its value, end of it or None while it is being written), and
    the end of the object (None while it is open). A string-aware scan, no parsing; the
    stream rescans a reply's calls at every step, so a step costs time linear in their
    length."""
    fields: dict[str, tuple[int, int | None]] = {}
    depth, in_str, escaped = 0, False, False
    state, key, key_start, value_start = "key", "", 0, 0
    for j in range(i, len(text)):
        c = text[j]
        if in_str:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_str = False
                if depth == 1 and state == "in_key":
                    key, state = _json_string(text[key_start:j + 1]), "colon"
                elif depth == 1 and state == "in_value":
                    fields[key], state = (value_start, j + 1), "after"
            continue
        if c == '"':
            in_str = True
            if depth == 1 and state == "key":
                key_start, state = j, "in_key"
            elif depth == 1 and state == "value":
                value_start, state = j, "in_value"
        elif c in "{[":
            if depth == 1 and state == "value":
                value_start, state = j, "in_value"
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                if state == "in_value":  # a number or literal ends here
                    fields[key] = (value_start, len(text[:j].rstrip()))
                return fields, j + 1
            if depth == 1 and state == "in_value":
                fields[key], state = (value_start, j + 1), "after"
        elif depth == 1 and c == ":" and state == "colon":
            state = "value"
        elif depth == 1 and c == ",":
            if state == "in_value":
                fields[key] = (value_start, len(text[:j].rstrip()))
            state = "key"
        elif depth == 1 and state == "value" and not c.isspace():
            value_start, state = j, "in_value"
    if state == "in_value":
        fields[key] = (value_start, None)
    return fields, None


def _json_string(quoted: str) -> str:
    try:
        return json.loads(quoted)
    except ValueError:  # a bad escape: the key as written
        return quoted[1:-1]


def _json_calls(text: str, start: int, args_key: str, fallback: str = "arguments"
                ) -> tuple[list[PartialCall], int | None]:
    """The calls written so far in a JSON list of {"name", args_key} objects, or one such
    object, from text[start] on; and where the list or object ends (None: not yet). A call
    without args_key takes its `fallback` field's value."""
    i = _skip_space(text, start)
    if i >= len(text):
        return [], None
    if text[i] == "{":
        call, end = _json_call(text, i, args_key, fallback)
        return [call], end
    if text[i] != "[":
        return [], None
    calls: list[PartialCall] = []
    i += 1
    while True:
        i = _skip_space(text, i)
        if i >= len(text):
            return calls, None
        if text[i] == "]":
            return calls, i + 1
        if text[i] == ",":
            i += 1
            continue
        if text[i] != "{":
            return calls, None
        call, end = _json_call(text, i, args_key, fallback)
        calls.append(call)
        if end is None:
            return calls, None
        i = end


def _json_call(text: str, i: int, args_key: str, fallback: str
               ) -> tuple[PartialCall, int | None]:
    fields, end = _object_fields(text, i)
    name = None
    if "name" in fields and fields["name"][1] is not None:
        s, e = fields["name"]
        try:
            name = json.loads(text[s:e])
        except ValueError:
            name = None
    if args_key not in fields and fallback in fields:
        args_key = fallback
    s, e = fields.get(args_key, (0, 0))
    return (name if isinstance(name, str) else None, text[s:e]), end


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def forced_partial(req: ChatCompletionRequest, text: str) -> list[PartialCall]:
    """The calls a constrained reply has written so far (tool_choice_outputs' shapes)."""
    name = forced_function(req)
    if name is not None:
        return [(name, text)]
    return _json_calls(text, 0, "parameters")[0]


def call_deltas(partial: list[PartialCall], sent: dict[int, int], new_id: Any
                ) -> list[DeltaToolCall]:
    """The stream's next pieces of the calls written so far: a call whose name is complete
    goes out with its id and name (in order: a later call waits for an earlier one's
    name), then what its arguments' text gained. `sent`: call index -> arguments' length
    sent so far, updated."""
    out: list[DeltaToolCall] = []
    for j, (name, args) in enumerate(partial):
        if j not in sent:
            if name is None:
                break
            out.append(DeltaToolCall(index=j, id=new_id(), type="function",
                                     function=DeltaFunctionCall(name=name, arguments=args)))
            sent[j] = len(args)
        elif len(args) > sent[j]:
            out.append(DeltaToolCall(index=j, function=DeltaFunctionCall(
                arguments=args[sent[j]:])))
            sent[j] = len(args)
    return out


def final_call_deltas(calls: list[ToolCall], partial: list[PartialCall],
                      sent: dict[int, int]) -> list[DeltaToolCall]:
    """The last pieces once the reply is complete: a call not started yet goes out whole
    (its parsed arguments), a started one gets the rest of its arguments' text."""
    out: list[DeltaToolCall] = []
    for j, call in enumerate(calls):
        if j not in sent:
            out.append(DeltaToolCall(index=j, id=call.id, type="function",
                                     function=DeltaFunctionCall(**call.function.model_dump())))
        elif j < len(partial) and len(partial[j][1]) > sent[j]:
            out.append(DeltaToolCall(index=j, function=DeltaFunctionCall(
                arguments=partial[j][1][sent[j]:])))
    return out


# ---- "auto": the model's own format -----------------------------------------------------
def _call(name: Any, arguments: Any) -> ToolCall:
    if not isinstance(name, str):
        raise ValueError("a tool call without a name")
    return ToolCall(function=FunctionCall(
        name=name, arguments=arguments if isinstance(arguments, str)
        else json.dumps(arguments if arguments is not None else {})))


def _held_back(text: str, marker: str) -> int:
    """How much of `text` is surely not the start of `marker` (a partial stream)."""
    return len(text) - harmony.partial_marker_len(text, marker)


class _ToolParser:
    """What every format's parser shares: by default the reply is decoded as usual and
    calls get OpenAI's ids."""

    keeps_special_tokens = False  # whether the reply must keep special tokens to parse
    call_id = staticmethod(ToolCall.new_id)

    def for_request(self, tools: list[dict[str, Any]] | None) -> _ToolParser:
        """The parser for one request's tools (a format whose arguments are typed by
        their schemas reads them; the others are the same parser)."""
        return self


class _StartTagParser(_ToolParser):
    """A format whose calls follow a start tag, after any text; streamed, the text before
    the tag (or before what may be its start) is content."""

    start: str

    def content_prefix(self, text: str) -> int:
        """The length of the start of a partial reply that is surely content."""
        i = text.find(self.start)
        return i if i >= 0 else _held_back(text, self.start)


class HermesParser(_StartTagParser):
    """Hermes and Qwen 2.5 / 3: calls in <tool_call>{"name", "arguments"}</tool_call>,
    after any text."""

    start = "<tool_call>"
    _calls = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls); a reply whose calls do not parse is all content."""
        if self.start not in text:
            return text, []
        try:
            calls = [_call(c.get("name"), c.get("arguments")) for c in
                     (json.loads(m, strict=False) for m in self._calls.findall(text))]
        except (ValueError, AttributeError):
            return text, []
        return (text[:text.index(self.start)].strip() or None, calls) if calls else (text, [])

    def partial(self, text: str) -> list[PartialCall]:
        calls: list[PartialCall] = []
        i = text.find(self.start)
        while i >= 0:
            calls += _json_calls(text, i + len(self.start), "arguments")[0][:1]
            i = text.find(self.start, i + len(self.start))
        return calls


class MistralParser(_StartTagParser):
    """Mistral: after [TOOL_CALLS], a JSON list of {"name", "arguments"} (tokenizers
    before v11: Mistral 7B v0.3, Mixtral, Nemo), or name[ARGS]{...} for each call (v11
    on: Mistral Small 3.1 and later). [TOOL_CALLS] is a special token, so the reply is
    decoded with special tokens kept (vLLM does the same). Call ids are 9 letters and
    digits: Mistral's chat templates refuse any other id in the conversation's history."""

    start = "[TOOL_CALLS]"
    keeps_special_tokens = True
    _id_chars = string.ascii_letters + string.digits

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.start not in text:
            return text, []
        head, *parts = text.split(self.start)
        try:
            calls = [c for part in parts for c in self._calls(part.strip())]
        except (ValueError, AttributeError):
            return text, []
        for call in calls:
            call.id = self.call_id()
        return (head.strip() or None, calls) if calls else (text, [])

    @classmethod
    def call_id(cls) -> str:
        return "".join(random.choices(cls._id_chars, k=9))

    def partial(self, text: str) -> list[PartialCall]:
        calls: list[PartialCall] = []
        for part in text.split(self.start)[1:]:
            if "[ARGS]" in part:  # v11: its arguments run to the next call (or the end)
                name, _, args = part.partition("[ARGS]")
                calls.append((name.strip(), args[:_held_back(args, self.start)]))
            elif part.strip() and part.lstrip()[0] not in "[{":
                calls.append((None, ""))  # v11: its name is being written
            else:
                calls += _json_calls(part, 0, "arguments")[0]
        return calls

    @staticmethod
    def _calls(part: str) -> list[ToolCall]:
        if "[ARGS]" in part:  # v11: name[ARGS]{arguments}
            name, _, args = part.partition("[ARGS]")
            return [_call(name.strip(), json.loads(args, strict=False))]
        loaded = json.loads(part, strict=False)
        return [_call(c.get("name"), c.get("arguments"))
                for c in (loaded if isinstance(loaded, list) else [loaded])]


class _WholeReplyParser(_ToolParser):
    """A format where calls are the whole reply, opening with `opening` after optional
    `tags` (each at most once, in order); streamed, a reply that starts so (or may yet) is
    held back, any other is content."""

    tags: tuple[str, ...]
    opening: str

    def content_prefix(self, text: str) -> int:
        head = text.lstrip()
        if not head or head.startswith((self.opening, *self.tags)) \
                or any(tag.startswith(head) for tag in self.tags):
            return 0  # (the start of) a call, or nothing yet: hold it
        return len(text)

    def _after_tags(self, text: str) -> str:
        """The reply from its calls' opening on: past leading space and the tags."""
        body = text.lstrip()
        for tag in self.tags:
            body = body.removeprefix(tag).lstrip()
        return body

    def _body(self, text: str) -> str:
        return self._after_tags(text).rstrip()


class Llama3JsonParser(_WholeReplyParser):
    """Llama 3.1 / 3.2: the whole reply is {"name", "parameters"} (several: joined by
    ';'), after an optional <|python_tag|>."""

    tags, opening = ("<|python_tag|>",), "{"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = self._body(text)
        if not body.startswith("{"):
            return text, []
        try:
            calls = [_call(c.get("name"), c.get("parameters", c.get("arguments")))
                     for c in (json.loads(part, strict=False) for part in body.split(";")
                               if part.strip())]
        except (ValueError, AttributeError):
            return text, []
        return None, calls

    def partial(self, text: str) -> list[PartialCall]:
        body = self._body(text)
        calls: list[PartialCall] = []
        i = 0
        while body.startswith("{", i):
            found, end = _json_calls(body, i, "parameters")
            calls += found
            if end is None:
                break
            i = _skip_space(body, end)
            if not body.startswith(";", i):
                break
            i = _skip_space(body, i + 1)
        return calls


class PythonicParser(_WholeReplyParser):
    """Llama 3.2 (1B, 3B), Llama 4 and others: the whole reply is a Python list of calls
    with keyword arguments, [get_weather(city="Paris", days=3), add(a=1, b=2)], after an
    optional <|python_start|> (Llama 4; before <|python_end|>). Read with `ast` and
    literal values only: nothing in a reply is ever evaluated."""

    tags, opening, end = ("<|python_start|>",), "[", "<|python_end|>"
    _name = re.compile(r"([A-Za-z_][\w.]*)\s*\(")
    _keyword = re.compile(r"([A-Za-z_]\w*)\s*=(?!=)")

    def _body(self, text: str) -> str:
        return super()._body(text).removesuffix(self.end).rstrip()

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = self._body(text)
        if not body.startswith("["):
            return text, []
        try:
            tree = ast.parse(body, mode="eval").body
            if not isinstance(tree, ast.List) or not tree.elts:
                return text, []
            calls = [self._call(node) for node in tree.elts]
        except (SyntaxError, ValueError, TypeError, RecursionError):
            return text, []  # not a list of calls with literal keyword arguments: text
        return None, calls

    @staticmethod
    def _call(node: ast.expr) -> ToolCall:
        if not isinstance(node, ast.Call) or node.args or any(k.arg is None
                                                               for k in node.keywords):
            raise ValueError("not a call with keyword arguments only")
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        return _call(ast.unparse(node.func), json.dumps(kwargs))

    def partial(self, text: str) -> list[PartialCall]:
        """Each call once its name and "(" are written; its arguments as JSON, one
        keyword at a time as each value completes (`{"city": "Paris"`, then `, "days":
        3`, then `}` at its ")"), so the text only grows and ends as json.dumps'."""
        body = self._after_tags(text)
        calls: list[PartialCall] = []
        if not body.startswith("["):
            return calls
        i = 1
        while (m := self._name.match(body, _skip_space(body, i))) is not None:
            pieces, i, closed = self._keywords(body, m.end())
            calls.append((m.group(1), "{" + ", ".join(pieces) + ("}" if closed else "")))
            i = _skip_space(body, i)
            if not closed or not body.startswith(",", i):
                break
            i += 1
        return calls

    def _keywords(self, body: str, i: int) -> tuple[list[str], int, bool]:
        """A call's complete keyword arguments from i (just past "("), as JSON "key: value"
        pieces; where the scan stopped; whether the call's ")" was reached."""
        pieces: list[str] = []
        while True:
            i = _skip_space(body, i)
            if body.startswith(")", i):
                return pieces, i + 1, True
            k = self._keyword.match(body, i)
            end = _python_value_end(body, k.end()) if k is not None else None
            if end is None:
                return pieces, i, False  # being written (or not a keyword argument)
            try:
                value = json.dumps(ast.literal_eval(body[k.end():end].strip()))
            except (SyntaxError, ValueError, TypeError, RecursionError):
                return pieces, i, False
            pieces.append(f"{json.dumps(k.group(1))}: {value}")
            i = end + 1 if body[end] == "," else end


def _python_value_end(text: str, i: int) -> int | None:
    """Where a Python literal starting at i ends: the index of the "," or ")" after it
    outside brackets and strings; None if the text ends first."""
    depth, quote = 0, None
    while i < len(text):
        c = text[i]
        if quote is not None:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            if depth == 0:
                return i if c == ")" else None
            depth -= 1
        elif c == "," and depth == 0:
            return i
        i += 1
    return None


class GraniteParser(_WholeReplyParser):
    """Granite 3.x, as vLLM's granite parser reads it: the whole reply is a JSON list of
    {"name", "arguments"}, after <|tool_call|> (3.0: a special token, so the reply decoded
    as usual has a bare list) and / or <tool_call> (3.1 on)."""

    tags, opening = ("<|tool_call|>", "<tool_call>"), "["

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = self._body(text)
        if not body.startswith("["):
            return text, []
        try:
            calls = [_call(c["name"], c["arguments"]) for c in json.loads(body, strict=False)]
        except (ValueError, KeyError, TypeError):
            return text, []  # not a list of calls (or text after it): text
        return (None, calls) if calls else (text, [])

    def partial(self, text: str) -> list[PartialCall]:
        body = self._after_tags(text)
        return _json_calls(body, 0, "arguments")[0] if body.startswith("[") else []


class Phi4MiniJsonParser(_StartTagParser):
    """Phi-4-mini: after any text (the content), functools[...], a JSON list of {"name",
    "arguments" or "parameters"}; text after the list is dropped, as vLLM does. vLLM cuts
    the list at its first "]" (a list inside the arguments breaks it); here it is read as
    JSON to its own end."""

    start = "functools["
    _decoder = json.JSONDecoder(strict=False)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        i = text.find(self.start)
        if i < 0:
            return text, []
        try:
            listed, _ = self._decoder.raw_decode(text, i + len(self.start) - 1)
            calls = [_call(c["name"], c["arguments"] if "arguments" in c else c["parameters"])
                     for c in listed]
        except (ValueError, KeyError, TypeError):
            return text, []
        content = text[:i]  # as streamed: up to the tag
        return (content if content.strip() else None, calls) if calls else (text, [])

    def partial(self, text: str) -> list[PartialCall]:
        i = text.find(self.start)
        return [] if i < 0 else _json_calls(text, i + len(self.start) - 1, "arguments",
                                             "parameters")[0]


class Qwen3CoderParser(_StartTagParser):
    """Qwen3-Coder: after any text, calls in XML-like tags, each parameter's value as raw
    text, typed by the tool's schema (integer, number, boolean, object / array as JSON;
    anything else, or a parameter the schema lacks, a string):

        <tool_call>
        <function=get_weather>
        <parameter=city>
        Paris
        </parameter>
        </function>
        </tool_call>
    """

    start = "<tool_call>"
    _function = re.compile(r"<function=([^>\n]+)>")
    _parameter = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)

    def __init__(self, schemas: dict[str, dict[str, Any]] | None = None) -> None:
        self.schemas = schemas or {}

    def for_request(self, tools: list[dict[str, Any]] | None) -> Qwen3CoderParser:
        return Qwen3CoderParser(_tool_schemas(tools) if tools else {})

    def _blocks(self, text: str) -> list[str]:
        """Each call's text, from its <tool_call> to its </tool_call> or the reply's end."""
        parts = text.split(self.start)[1:]
        return [part.split("</tool_call>", 1)[0] for part in parts]

    def _typed(self, function: str, key: str, value: str) -> Any:
        kind = (self.schemas.get(function, {}).get("properties", {}).get(key) or {}) \
            .get("type")
        try:
            if kind == "integer":
                return int(value)
            if kind == "number":
                number = float(value)
                return int(number) if number.is_integer() and "." not in value else number
            if kind == "boolean" and value.strip().lower() in ("true", "false"):
                return value.strip().lower() == "true"
            if kind in ("object", "array"):
                return json.loads(value)
        except ValueError:
            pass
        return value

    def _arguments(self, function: str, body: str) -> tuple[list[str], bool]:
        """The call's complete parameters as JSON "key: value" pieces; whether its
        </function> came."""
        pieces = [f"{json.dumps(k)}: {json.dumps(self._typed(function, k, v))}"
                  for k, v in self._parameter.findall(body)]
        return pieces, "</function>" in body

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.start not in text:
            return text, []
        calls = []
        for body in self._blocks(text):
            m = self._function.search(body)
            if m is None or "</function>" not in body:
                return text, []
            pieces, _ = self._arguments(m.group(1), body)
            calls.append(_call(m.group(1), "{" + ", ".join(pieces) + "}"))
        content = text[:text.index(self.start)]  # as streamed: up to the tag
        return content if content.strip() else None, calls

    def partial(self, text: str) -> list[PartialCall]:
        """Each call once its <function=name> is written; its arguments as JSON, one
        parameter at a time as each </parameter> comes, closed at </function>."""
        calls: list[PartialCall] = []
        for body in self._blocks(text):
            m = self._function.search(body)
            if m is None:
                break
            pieces, closed = self._arguments(m.group(1), body)
            calls.append((m.group(1), "{" + ", ".join(pieces) + ("}" if closed else "")))
        return calls


class Glm45Parser(_StartTagParser):
    """GLM-4.5 / 4.6 (vLLM's glm45): after any text, each call is the function's name and
    its arguments as key / value tags (GLM-4.7 writes the first key right after the name,
    without the newline: read too):

        <tool_call>get_weather
        <arg_key>city</arg_key>
        <arg_value>Paris</arg_value>
        </tool_call>

    A value is raw text: kept as written where the tool's schema says string, else read
    as JSON, else as a Python literal, else kept as text (vLLM's rule, so "3" is 3 for an
    argument the schema does not type)."""

    start = "<tool_call>"
    _end = "</tool_call>"
    _argument = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>",
                           re.DOTALL)

    def __init__(self, schemas: dict[str, dict[str, Any]] | None = None) -> None:
        self.schemas = schemas or {}

    def for_request(self, tools: list[dict[str, Any]] | None) -> Glm45Parser:
        return Glm45Parser(_tool_schemas(tools) if tools else {})

    def _blocks(self, text: str) -> list[tuple[str, bool]]:
        """Each call's text after its <tool_call>, and whether its </tool_call> came."""
        return [(part.split(self._end, 1)[0], self._end in part)
                for part in text.split(self.start)[1:]]

    @staticmethod
    def _name(body: str, closed: bool) -> str | None:
        """The function's name, once what ends it (a newline, <arg_key>, the call's end)
        has come."""
        ends = [i for i in (body.find("\n"), body.find("<arg_key>")) if i >= 0]
        if not ends and not closed:
            return None
        name = body[:min(ends)] if ends else body
        return name.strip() or None

    def _typed(self, function: str, key: str, value: str) -> Any:
        kind = (self.schemas.get(function, {}).get("properties", {}).get(key) or {}) \
            .get("type")
        if kind == "string":
            return value
        try:
            return json.loads(value)
        except ValueError:
            pass
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return value

    def _arguments(self, function: str, body: str) -> list[str]:
        return [f"{json.dumps(k.strip())}: {json.dumps(self._typed(function, k.strip(), v))}"
                for k, v in self._argument.findall(body)]

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.start not in text:
            return text, []
        calls = []
        for body, closed in self._blocks(text):
            name = self._name(body, closed)
            if name is None or not closed:
                return text, []
            calls.append(_call(name, "{" + ", ".join(self._arguments(name, body)) + "}"))
        content = text[:text.index(self.start)]
        return content if content.strip() else None, calls

    def partial(self, text: str) -> list[PartialCall]:
        """Each call once its name is whole; its arguments as JSON, one at a time as each
        </arg_value> comes, closed at </tool_call>."""
        calls: list[PartialCall] = []
        for body, closed in self._blocks(text):
            name = self._name(body, closed)
            if name is None:
                break
            calls.append((name, "{" + ", ".join(self._arguments(name, body))
                          + ("}" if closed else "")))
        return calls


class OpenAIParser(_StartTagParser):
    """gpt-oss (harmony.py): a call is a commentary message to functions.NAME whose body
    is its arguments; the final and preamble messages are the content. It reads the
    reply as the openai_gptoss reasoning parser leaves it (the content, then each call
    from its `<|start|>`), or a raw one (the analysis then left out)."""

    start = harmony.START
    keeps_special_tokens = True

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        msgs = [m for m in harmony.messages(text) if m.channel != "analysis"]
        calls = [_call(m.call, m.body) for m in msgs if m.call is not None]
        if not calls:
            return text, []
        return "".join(m.body for m in msgs if m.call is None) or None, calls

    def partial(self, text: str) -> list[PartialCall]:
        return [(m.call, m.body) for m in harmony.messages(text, finished=False)
                if m.call is not None]


PARSERS = {"hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser,
           "pythonic": PythonicParser, "llama4_pythonic": PythonicParser,
           "qwen3_coder": Qwen3CoderParser, "openai": OpenAIParser, "granite": GraniteParser,
           "phi4_mini_json": Phi4MiniJsonParser, "glm45": Glm45Parser}
