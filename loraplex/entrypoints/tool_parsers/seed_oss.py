"""Seed-OSS's calls (`seed_oss`), read as vLLM's parser reads them: after any text, each
call a function with raw-text parameters, typed by the request's tool schemas:

    <seed:tool_call>
    <function=get_weather>
    <parameter=city>Paris</parameter>
    <parameter=days>3</parameter>
    </function>
    </seed:tool_call>

vLLM's leniency is kept: a call, function or parameter left open at the reply's end is
read to the end, and <function=...> without the <seed:tool_call> around it is a call.
A value (one newline either side dropped) is "null" -> null, else typed by its schema:
string kinds as written, int* an integer, num* / float* a number (whole: an integer),
bool* true only for "true", object as JSON, anything else a Python literal; what does
not read so, or a parameter the schema lacks, is the text. With a </seed:think> in the
reply (no reasoning parser), calls are read after it, and the thinking goes first in
the content."""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from loraplex.entrypoints.protocol import ToolCall
from loraplex.entrypoints.tool_parsers.base import (
    PartialCall,
    _call,
    _held_back,
    _SchemaTypedParser,
)

THINK_START, THINK_END = "<seed:think>", "</seed:think>"


class SeedOssParser(_SchemaTypedParser):
    start = "<seed:tool_call>"
    keeps_special_tokens = True  # whether the tags are special or not, they stay
    _prefix = "<function="
    _calls = re.compile(r"<seed:tool_call>(.*?)</seed:tool_call>|<seed:tool_call>(.*?)$",
                        re.DOTALL)
    _functions = re.compile(r"<function=(.*?)</function>|<function=(.*)$", re.DOTALL)
    _parameters = re.compile(r"<parameter=(.*?)</parameter>|<parameter=(.*?)$", re.DOTALL)

    def content_prefix(self, text: str) -> int:
        return min(super().content_prefix(text),
                   i if (i := text.find(self._prefix)) >= 0 else _held_back(text, self._prefix))

    def _properties(self, function: str) -> dict[str, Any]:
        """vLLM's: the schema's properties, or the schema itself when it has none."""
        params = self.schemas.get(function, {})
        return params.get("properties", params)

    def _typed(self, function: str, key: str, value: str) -> Any:
        if value.lower() == "null":
            return None
        props = self._properties(function)
        if key not in props:
            return value
        schema = props[key]
        kind = str(schema["type"]).strip().lower() \
            if isinstance(schema, dict) and "type" in schema else "string"
        if kind in ("string", "str", "text", "varchar", "char", "enum"):
            return value
        if kind.startswith(("int", "uint", "long", "short", "unsigned")):
            try:
                return int(value)
            except ValueError:
                return value
        if kind.startswith(("num", "float")):
            try:
                number = float(value)
                return number if number - int(number) != 0 else int(number)
            except (ValueError, OverflowError):
                return value
        if kind in ("boolean", "bool", "binary"):
            return value.lower() == "true"
        if kind == "object" or kind.startswith("dict"):
            try:
                return json.loads(value)
            except ValueError:
                pass
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return value

    def _pieces(self, function: str, params: str, complete_only: bool) -> list[str]:
        pieces = []
        for closed, open_ in self._parameters.findall(params):
            if complete_only and not closed:
                break
            match = closed or open_
            key, _, value = match.partition(">")
            value = value.removeprefix("\n").removesuffix("\n")
            pieces.append(f"{json.dumps(key, ensure_ascii=False)}: "
                          + json.dumps(self._typed(function, key, value), ensure_ascii=False))
        return pieces

    @staticmethod
    def _after_thinking(text: str) -> tuple[str, str]:
        if THINK_START in text and THINK_END in text:
            i = text.find(THINK_END) + len(THINK_END)
            return text[:i], text[i:]
        return "", text

    def _functions_in(self, text: str) -> list[tuple[str, bool]]:
        """Each function's text after "<function=", and whether its </function> came."""
        blocks = [closed or open_ for closed, open_ in self._calls.findall(text)] or [text]
        return [(closed or open_, bool(closed)) for block in blocks
                for closed, open_ in self._functions.findall(block)]

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self._prefix not in text:
            return text, []
        thinking, result = self._after_thinking(text)
        calls = []
        for function, _ in self._functions_in(result):
            name, closer, params = function.partition(">")
            if not closer:
                return text, []  # vLLM: no ">" after the name fails the whole reply
            calls.append(_call(name, "{" + ", ".join(self._pieces(name, params, False)) + "}"))
        if not calls:
            return text, []
        i = result.find(self.start)
        content = thinking + result[:i if i >= 0 else result.find(self._prefix)]
        return content or None, calls

    def partial(self, text: str) -> list[PartialCall]:
        """Each function once its name's ">" is written; its arguments as JSON, one
        parameter at a time as each </parameter> comes, closed at </function>."""
        calls: list[PartialCall] = []
        for function, closed in self._functions_in(self._after_thinking(text)[1]):
            name, closer, params = function.partition(">")
            if not closer:
                break
            calls.append((name, "{" + ", ".join(self._pieces(name, params, True))
                          + ("}" if closed else "")))
        return calls
