"""A Python list of calls (`pythonic`, `llama4_pythonic`), read with `ast`."""

from __future__ import annotations

import ast
import json
import re
from typing import Any

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


class Llama4PythonicParser(PythonicParser):
    """Llama 4 (`llama4_pythonic`), as vLLM's parser reads it, stricter than `pythonic`:
    the reply must start with the list (or <|python_start|>, taken off with every
    <|python_end|>; no leading space), each call a plain name, each keyword's value a
    string, number, bool, None, list or dict of them (no tuple, no sign: -1 is text). A
    reply that is not such a list is content, with its <|python_start|> taken off."""

    _start, _end = "<|python_start|>", "<|python_end|>"
    _pattern = re.compile(r"\[([a-zA-Z]+\w*\(([a-zA-Z]+\w*=.*,\s*)*([a-zA-Z]+\w*=.*\s)?\),\s*)*"
                          r"([a-zA-Z]+\w*\(([a-zA-Z]+\w*=.*,\s*)*([a-zA-Z]+\w*=.*\s*)?\)\s*)+\]",
                          re.DOTALL)

    def content_prefix(self, text: str) -> int:
        if text.startswith(("[", self._start)) or self._start.startswith(text):
            return 0  # (the start of) the calls, or nothing yet: hold it
        return len(text)

    def _after_tags(self, text: str) -> str:
        return text[len(self._start):] if text.startswith(self._start) else text

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if text.startswith(self._start):
            text = text[len(self._start):].replace(self._end, "")
        if not self._pattern.match(text):
            return text, []
        try:
            tree = ast.parse(text).body[0]
            listed = getattr(tree, "value", None)
            if not isinstance(listed, ast.List) or \
                    not all(isinstance(e, ast.Call) for e in listed.elts):
                return text, []
            calls = [self._strict_call(e) for e in listed.elts]
        except (SyntaxError, ValueError, TypeError, IndexError, RecursionError):
            return text, []
        return None, calls

    @classmethod
    def _strict_call(cls, node: ast.Call) -> ToolCall:
        if not isinstance(node.func, ast.Name):
            raise ValueError("a call's name must be a plain name")
        return _call(node.func.id, json.dumps({k.arg: cls._value(k.value)
                                               for k in node.keywords}))

    @classmethod
    def _value(cls, node: ast.expr) -> Any:
        """vLLM's literals: constants, and lists and dicts (constant keys) of them."""
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Dict) and all(isinstance(k, ast.Constant) for k in node.keys):
            return {k.value: cls._value(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, ast.List):
            return [cls._value(v) for v in node.elts]
        raise ValueError("a call's arguments must be literals")
