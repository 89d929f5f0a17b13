"""Tool calling with `tool_choice` "required" or a named function, as vLLM does it without
a model-specific parser: the reply is constrained (structured outputs) to JSON, then
turned into `tool_calls`.

    named function f:  the reply is f's arguments      -> one call of f
    "required":        [{"name": ..., "parameters": {...}}, ...], each name one of the
                       tools and its parameters that tool's schema  -> one call each

"auto" needs a parser for the model's own tool-call format (vLLM's --tool-call-parser),
which loraplex does not have yet: it is refused with a message, as vLLM refuses it
without --enable-auto-tool-choice.
"""

from __future__ import annotations

import json
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


def tools_in_use(req: ChatCompletionRequest) -> bool:
    """Whether this request calls tools (checked: a 400 for what cannot be served)."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise BadRequestError("tool_choice needs tools", param="tool_choice")
        return False
    if choice == "none":
        return False
    if choice in (None, "auto"):
        raise BadRequestError(
            "tool_choice 'auto' (the default when tools are given) needs a parser for the "
            "model's tool-call format, which loraplex does not have yet: use tool_choice "
            "'required' or a named function", param="tool_choice")
    if choice != "required" and forced_function(req) is None:
        raise BadRequestError("tool_choice must be 'none', 'auto', 'required' or a named "
                              "function", param="tool_choice")
    return True


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
