"""GLM-4.5 / 4.6 / 4.7's `<arg_key>` / `<arg_value>` tags (`glm45`)."""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from loraplex.entrypoints.protocol import ToolCall
from loraplex.entrypoints.tool_parsers.base import (
    PartialCall,
    _call,
    _SchemaTypedParser,
)


class Glm45Parser(_SchemaTypedParser):
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
