"""Llama 3.1 / 3.2's bare JSON calls (`llama3_json`)."""

from __future__ import annotations

import json

from loraplex.entrypoints.protocol import ToolCall
from loraplex.entrypoints.tool_parsers.base import (
    PartialCall,
    _call,
    _json_calls,
    _skip_space,
    _WholeReplyParser,
)


class Llama3JsonParser(_WholeReplyParser):
    """Llama 3.1 / 3.2: the whole reply is {"name", "parameters"} (several: joined by
    ';'), after an optional <|python_tag|>."""

    tags, opening = ("<|python_tag|>",), "{"

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

    def partial(self, text: str) -> list[PartialCall]:
        body = self._body(text)
        calls: list[PartialCall] = []
        i = 0
        while body.startswith("{", i):
            found, end = _json_calls(body, i, "parameters")
            calls += found
            if end is None:
                break
            i = _skip_space(body, end)
            if not body.startswith(";", i):
                break
            i = _skip_space(body, i + 1)
        return calls
