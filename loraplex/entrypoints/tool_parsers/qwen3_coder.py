"""Qwen3-Coder's `<function=...>` / `<parameter=...>` tags (`qwen3_coder`)."""

from __future__ import annotations

import json
import re
from typing import Any

from loraplex.entrypoints.protocol import ToolCall
from loraplex.entrypoints.tool_parsers.base import (
    PartialCall,
    _call,
    _SchemaTypedParser,
)


class Qwen3CoderParser(_SchemaTypedParser):
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
