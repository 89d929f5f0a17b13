"""Hermes and Qwen 2.5 / 3's `<tool_call>` JSON (`hermes`)."""

from __future__ import annotations

import json
import re

from loraplex.entrypoints.protocol import ToolCall
from loraplex.entrypoints.tool_parsers.base import (
    PartialCall,
    _call,
    _json_calls,
    _StartTagParser,
)


class HermesParser(_StartTagParser):
    """Hermes and Qwen 2.5 / 3: calls in <tool_call>{"name", "arguments"}</tool_call>,
    after any text."""

    start = "<tool_call>"
    _calls = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls); a reply whose calls do not parse is all content."""
        if self.start not in text:
            return text, []
        try:
            calls = [_call(c.get("name"), c.get("arguments")) for c in
                     (json.loads(m, strict=False) for m in self._calls.findall(text))]
        except (ValueError, AttributeError):
            return text, []
        return (text[:text.index(self.start)].strip() or None, calls) if calls else (text, [])

    def partial(self, text: str) -> list[PartialCall]:
        calls: list[PartialCall] = []
        i = text.find(self.start)
        while i >= 0:
            calls += _json_calls(text, i + len(self.start), "arguments")[0][:1]
            i = text.find(self.start, i + len(self.start))
        return calls
