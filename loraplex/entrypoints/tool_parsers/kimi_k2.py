"""Kimi-K2's tool-call tokens (`kimi_k2`), read as vLLM's parser reads them: after any text
(the content, as written), a calls section whose calls carry the model's own ids,
functions.NAME:INDEX, kept as the calls' ids (Kimi's chat template writes them back):

    <|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0
    <|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>

The name is the id's part before ":" and after its last "."; the arguments are passed on
as written. The tags are special tokens, so the reply keeps them."""

from __future__ import annotations

import re

from loraplex.entrypoints.protocol import FunctionCall, ToolCall
from loraplex.entrypoints.tool_parsers.base import PartialCall, _held_back, _StartTagParser

CALL_BEGIN, ARGS_BEGIN, CALL_END = ("<|tool_call_begin|>", "<|tool_call_argument_begin|>",
                                    "<|tool_call_end|>")


class KimiK2Parser(_StartTagParser):
    """One per request (`for_request`): streamed, a call's id is the one the model wrote
    (`call_id` hands them out in order, as `partial` saw them)."""

    start = "<|tool_calls_section_begin|>"
    keeps_special_tokens = True
    _calls = re.compile(r"<\|tool_call_begin\|>\s*(?P<id>[^<]+:\d+)\s*"
                        r"<\|tool_call_argument_begin\|>\s*"
                        r"(?P<arguments>(?:(?!<\|tool_call_begin\|>).)*?)\s*<\|tool_call_end\|>",
                        re.DOTALL)
    _id = re.compile(r"\s*(.+:\d+)\s*$", re.DOTALL)

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._given = 0

    def for_request(self, tools: object) -> KimiK2Parser:
        return KimiK2Parser()

    @staticmethod
    def _name(call_id: str) -> str:
        return call_id.split(":")[0].split(".")[-1]

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.start not in text:
            return text, []
        calls = []
        for m in self._calls.finditer(text):
            call_id = m.group("id")
            calls.append(ToolCall(id=call_id, function=FunctionCall(
                name=self._name(call_id), arguments=m.group("arguments"))))
        if not calls:
            return text, []
        content = text[:text.find(self.start)]
        return content or None, calls

    def partial(self, text: str) -> list[PartialCall]:
        """Each call once its id is whole (its argument tag came); its arguments' text as
        it comes, without the space around it."""
        if self.start not in text:
            return []
        calls: list[PartialCall] = []
        self._ids = []
        for body in text.split(CALL_BEGIN)[1:]:
            head, opened, args = body.partition(ARGS_BEGIN)
            m = self._id.match(head)
            if not opened or m is None:
                break
            self._ids.append(m.group(1))
            end = args.find(CALL_END)
            args = args[:end] if end >= 0 else args[:_held_back(args, CALL_END)]
            calls.append((self._name(m.group(1)), args.strip()))
        return calls

    def call_id(self) -> str:
        """The next streamed call's id: the model's (calls go out in order)."""
        self._given += 1
        return self._ids[self._given - 1] if self._given <= len(self._ids) \
            else ToolCall.new_id()
