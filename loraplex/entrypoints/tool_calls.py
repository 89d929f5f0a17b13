"""Chat tool calls, as vLLM makes them.

`tool_choice` "required" or a named function needs no knowledge of the model: the reply
is constrained (structured outputs) to JSON, then turned into `tool_calls`.

    named function f:  the reply is f's arguments      -> one call of f
    "required":        [{"name": ..., "parameters": {...}}, ...], each name one of the
                       tools and its parameters that tool's schema  -> one call each

"auto" (the default when tools are given) lets the model answer or call, in its own
format: the server needs `--enable-auto-tool-choice --tool-call-parser NAME`, and the
parser reads the calls out of the reply (tool_parsers/, one file per format: `PARSERS`).

Streamed, the text before a call goes out as it comes; a call goes out once its name is
complete (id, name), then its arguments' text piece by piece as the model writes it
(`partial` of each format: the calls so far, each a name and the raw arguments so far).
"""

from __future__ import annotations

import json
from typing import Any

from loraplex.entrypoints.errors import BadRequestError
from loraplex.entrypoints.protocol import (
    ChatCompletionRequest,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from loraplex.entrypoints.tool_parsers.base import PartialCall, _json_calls, _tool_schemas
from loraplex.sampling_params import StructuredOutputsParams


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
