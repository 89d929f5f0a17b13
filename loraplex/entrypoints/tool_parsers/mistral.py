"""Mistral's `[TOOL_CALLS]` (`mistral`): a JSON list, or name[ARGS]{...} (v11)."""

from __future__ import annotations

import json
import random
import string

from loraplex.entrypoints.protocol import ToolCall
from loraplex.entrypoints.tool_parsers.base import (
    PartialCall,
    _call,
    _held_back,
    _json_calls,
    _StartTagParser,
)


class MistralParser(_StartTagParser):
    """Mistral: after [TOOL_CALLS], a JSON list of {"name", "arguments"} (tokenizers
    before v11: Mistral 7B v0.3, Mixtral, Nemo), or name[ARGS]{...} for each call (v11
    on: Mistral Small 3.1 and later). [TOOL_CALLS] is a special token, so the reply is
    decoded with special tokens kept (vLLM does the same). Call ids are 9 letters and
    digits: Mistral's chat templates refuse any other id in the conversation's history."""

    start = "[TOOL_CALLS]"
    keeps_special_tokens = True
    _id_chars = string.ascii_letters + string.digits

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.start not in text:
            return text, []
        head, *parts = text.split(self.start)
        try:
            calls = [c for part in parts for c in self._calls(part.strip())]
        except (ValueError, AttributeError):
            return text, []
        for call in calls:
            call.id = self.call_id()
        return (head.strip() or None, calls) if calls else (text, [])

    @classmethod
    def call_id(cls) -> str:
        return "".join(random.choices(cls._id_chars, k=9))

    def partial(self, text: str) -> list[PartialCall]:
        calls: list[PartialCall] = []
        for part in text.split(self.start)[1:]:
            if "[ARGS]" in part:  # v11: its arguments run to the next call (or the end)
                name, _, args = part.partition("[ARGS]")
                calls.append((name.strip(), args[:_held_back(args, self.start)]))
            elif part.strip() and part.lstrip()[0] not in "[{":
                calls.append((None, ""))  # v11: its name is being written
            else:
                calls += _json_calls(part, 0, "arguments")[0]
        return calls

    @staticmethod
    def _calls(part: str) -> list[ToolCall]:
        if "[ARGS]" in part:  # v11: name[ARGS]{arguments}
            name, _, args = part.partition("[ARGS]")
            return [_call(name.strip(), json.loads(args, strict=False))]
        loaded = json.loads(part, strict=False)
        return [_call(c.get("name"), c.get("arguments"))
                for c in (loaded if isinstance(loaded, list) else [loaded])]
