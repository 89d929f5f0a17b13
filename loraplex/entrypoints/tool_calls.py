"""Chat tool calls, as vLLM makes them.

`tool_choice` "required" or a named function needs no knowledge of the model: the reply
is constrained (structured outputs) to JSON, then turned into `tool_calls`.

    named function f:  the reply is f's arguments      -> one call of f
    "required":        [{"name": ..., "parameters": {...}}, ...], each name one of the
                       tools and its parameters that tool's schema  -> one call each

"auto" (the default when tools are given) lets the model answer or call, in its own
format: the server needs `--enable-auto-tool-choice --tool-call-parser NAME`, and the
parser reads the calls out of the reply (`PARSERS`: Hermes / Qwen's `<tool_call>` tags,
Llama 3's bare JSON, Mistral's `[TOOL_CALLS]`). Streamed, the text before a call goes out as it comes; the calls
go out whole once the reply is complete.
"""

from __future__ import annotations

import json
import random
import re
import string
from typing import Any

from loraplex.entrypoints.errors import BadRequestError
from loraplex.entrypoints.protocol import ChatCompletionRequest, FunctionCall, ToolCall
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


# ---- "auto": the model's own format -----------------------------------------------------
def _call(name: Any, arguments: Any) -> ToolCall:
    if not isinstance(name, str):
        raise ValueError("a tool call without a name")
    return ToolCall(function=FunctionCall(
        name=name, arguments=arguments if isinstance(arguments, str)
        else json.dumps(arguments if arguments is not None else {})))


def _held_back(text: str, marker: str) -> int:
    """How much of `text` is surely not the start of `marker` (a partial stream)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return len(text) - k
    return len(text)


class _StartTagParser:
    """A format whose calls follow a start tag, after any text; streamed, the text before
    the tag (or before what may be its start) is content."""

    start: str
    keeps_special_tokens = False  # whether the reply must keep special tokens to parse

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
            call.id = "".join(random.choices(self._id_chars, k=9))
        return (head.strip() or None, calls) if calls else (text, [])

    @staticmethod
    def _calls(part: str) -> list[ToolCall]:
        if "[ARGS]" in part:  # v11: name[ARGS]{arguments}
            name, _, args = part.partition("[ARGS]")
            return [_call(name.strip(), json.loads(args, strict=False))]
        loaded = json.loads(part, strict=False)
        return [_call(c.get("name"), c.get("arguments"))
                for c in (loaded if isinstance(loaded, list) else [loaded])]


class Llama3JsonParser:
    """Llama 3.1 / 3.2: the whole reply is {"name", "parameters"} (several: joined by
    ';'), after an optional <|python_tag|>."""

    tag = "<|python_tag|>"
    keeps_special_tokens = False

    def _body(self, text: str) -> str:
        return text.strip().removeprefix(self.tag).strip()

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

    def content_prefix(self, text: str) -> int:
        head = text.lstrip()
        if not head or head.startswith(("{", self.tag)) or self.tag.startswith(head):
            return 0  # (the start of) a call, or nothing yet: hold it
        return len(text)


PARSERS = {"hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser}
