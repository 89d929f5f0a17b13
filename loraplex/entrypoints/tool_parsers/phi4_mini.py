"""Phi-4-mini's `functools[...]` (`phi4_mini_json`)."""

from __future__ import annotations

import json

from loraplex.entrypoints.protocol import ToolCall
from loraplex.entrypoints.tool_parsers.base import (
    PartialCall,
    _call,
    _json_calls,
    _StartTagParser,
)


class Phi4MiniJsonParser(_StartTagParser):
    """Phi-4-mini: after any text (the content), functools[...], a JSON list of {"name",
    "arguments" or "parameters"}; text after the list is dropped, as vLLM does. vLLM cuts
    the list at its first "]" (a list inside the arguments breaks it); here it is read as
    JSON to its own end."""

    start = "functools["
    _decoder = json.JSONDecoder(strict=False)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        i = text.find(self.start)
        if i < 0:
            return text, []
        try:
            listed, _ = self._decoder.raw_decode(text, i + len(self.start) - 1)
            calls = [_call(c["name"], c["arguments"] if "arguments" in c else c["parameters"])
                     for c in listed]
        except (ValueError, KeyError, TypeError):
            return text, []
        content = text[:i]  # as streamed: up to the tag
        return (content if content.strip() else None, calls) if calls else (text, [])

    def partial(self, text: str) -> list[PartialCall]:
        i = text.find(self.start)
        return [] if i < 0 else _json_calls(text, i + len(self.start) - 1, "arguments",
                                             "parameters")[0]
