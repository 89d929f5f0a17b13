"""MiniMax-M2's calls (`minimax_m2`), read as vLLM's parser reads them: after any text,
XML-like invokes whose parameters are raw text, typed by the request's tool schemas:

    <minimax:tool_call>
    <invoke name="get_weather">
    <parameter name="city">Paris</parameter>
    <parameter name="days">3</parameter>
    </invoke>
    </minimax:tool_call>

A value is stripped; "null" is null; then by its schema type: string (and a parameter
the schema does not type) as written, integer / number read as such (a whole number an
integer), boolean true for "true" or "1", object / array and other types read as JSON;
what does not read so is kept as text. Only complete <minimax:tool_call> blocks count
(an open one at the reply's end is content)."""

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


def _unquoted(name: str) -> str:
    name = name.strip()
    if len(name) >= 2 and name[0] == name[-1] and name[0] in "\"'":
        return name[1:-1]
    return name


def _schema_type(schema: Any) -> str:
    """A property's type; of a list of types, the first that is not "null"."""
    kind = schema.get("type", "string") if isinstance(schema, dict) else "string"
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    return str(kind).lower()


class MiniMaxM2Parser(_SchemaTypedParser):
    start = "<minimax:tool_call>"
    end = "</minimax:tool_call>"
    keeps_special_tokens = True  # whether the tags are special or not, they stay
    _blocks = re.compile(r"<minimax:tool_call>(.*?)</minimax:tool_call>", re.DOTALL)
    _invokes = re.compile(r"<invoke name=(.*?)</invoke>", re.DOTALL)
    _parameters = re.compile(r"<parameter name=(.*?)</parameter>", re.DOTALL)

    def _typed(self, function: str, key: str, value: str) -> Any:
        if value.lower() == "null":
            return None
        props = self.schemas.get(function, {}).get("properties", {})
        kind = _schema_type(props.get(key)) if isinstance(props, dict) else "string"
        if kind in ("string", "str", "text"):
            return value
        try:
            if kind in ("integer", "int"):
                return int(value)
            if kind in ("number", "float"):
                number = float(value)
                return int(number) if number.is_integer() else number
            if kind in ("boolean", "bool"):
                return value.lower() in ("true", "1")
            return json.loads(value)
        except (ValueError, OverflowError):
            return value

    def _pieces(self, function: str, body: str) -> list[str]:
        """The invoke's complete parameters, as JSON "key": value pieces."""
        pieces = []
        for match in self._parameters.findall(body):
            m = re.match(r"([^>]+)>(.*)", match, re.DOTALL)
            if m is not None:
                value = m.group(2).strip()
                pieces.append(f"{json.dumps(_unquoted(m.group(1)), ensure_ascii=False)}: "
                              + json.dumps(self._typed(function, _unquoted(m.group(1)), value),
                                           ensure_ascii=False))
        return pieces

    def _call_of(self, invoke: str) -> ToolCall | None:
        m = re.match(r"([^>]+)", invoke)
        if m is None:
            return None
        name = _unquoted(m.group(1))
        return _call(name, "{" + ", ".join(self._pieces(name, invoke)) + "}")

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.start not in text:
            return text, []
        calls = [call for block in self._blocks.findall(text)
                 for invoke in self._invokes.findall(block)
                 if (call := self._call_of(invoke)) is not None]
        if not calls:
            return text, []
        i = text.find(self.start)
        return (text[:i] if i > 0 else None), calls

    def partial(self, text: str) -> list[PartialCall]:
        """Each invoke once its name's ">" is written; its arguments as JSON, one
        parameter at a time as each </parameter> comes, closed at </invoke>."""
        calls: list[PartialCall] = []
        for block in text.split(self.start)[1:]:
            for invoke in block.split(self.end, 1)[0].split("<invoke name=")[1:]:
                head, closer, body = invoke.partition(">")
                if not closer:
                    return calls
                name = _unquoted(head)
                body, closed, _ = (head + closer + body).partition("</invoke>")
                calls.append((name, "{" + ", ".join(self._pieces(name, body))
                              + ("}" if closed else "")))
        return calls
