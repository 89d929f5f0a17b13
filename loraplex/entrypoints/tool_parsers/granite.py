"""Granite 3's `<|tool_call|>[...]` (`granite`)."""

from __future__ import annotations

import json

from loraplex.entrypoints.protocol import ToolCall
from loraplex.entrypoints.tool_parsers.base import (
    PartialCall,
    _call,
    _json_calls,
    _WholeReplyParser,
)


class GraniteParser(_WholeReplyParser):
    """Granite 3.x, as vLLM's granite parser reads it: the whole reply is a JSON list of
    {"name", "arguments"}, after <|tool_call|> (3.0: a special token, so the reply decoded
    as usual has a bare list) and / or <tool_call> (3.1 on)."""

    tags, opening = ("<|tool_call|>", "<tool_call>"), "["

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = self._body(text)
        if not body.startswith("["):
            return text, []
        try:
            calls = [_call(c["name"], c["arguments"]) for c in json.loads(body, strict=False)]
        except (ValueError, KeyError, TypeError):
            return text, []  # not a list of calls (or text after it): text
        return (None, calls) if calls else (text, [])

    def partial(self, text: str) -> list[PartialCall]:
        body = self._after_tags(text)
        return _json_calls(body, 0, "arguments")[0] if body.startswith("[") else []
