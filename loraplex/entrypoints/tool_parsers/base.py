"""What the tool parsers share: the tools' schemas, a call from a parsed name and
arguments, the base classes (`_ToolParser`, `_StartTagParser`: calls after a start tag and
any text; `_WholeReplyParser`: calls as the whole reply), and the string-aware scan of
JSON calls as they are written (`_json_calls`), which streaming reads at every step."""

from __future__ import annotations

import json
from typing import Any

from loraplex import harmony
from loraplex.entrypoints.errors import BadRequestError
from loraplex.entrypoints.protocol import FunctionCall, ToolCall

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


class _SchemaTypedParser(_StartTagParser):
    """A start-tag format whose arguments come as text and are typed by the request's
    tool schemas (name -> parameters): one parser per request, made by for_request."""

    def __init__(self, schemas: dict[str, dict[str, Any]] | None = None) -> None:
        self.schemas = schemas or {}

    def for_request(self, tools: list[dict[str, Any]] | None) -> _SchemaTypedParser:
        return type(self)(_tool_schemas(tools) if tools else {})


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
