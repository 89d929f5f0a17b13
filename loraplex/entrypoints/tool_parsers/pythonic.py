"""A Python list of calls (`pythonic`, `llama4_pythonic`), read with `ast`."""

from __future__ import annotations

import ast
import json
import re

from loraplex.entrypoints.protocol import ToolCall
from loraplex.entrypoints.tool_parsers.base import (
    PartialCall,
    _call,
    _skip_space,
    _WholeReplyParser,
)


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

