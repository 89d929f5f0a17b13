"""gpt-oss's harmony messages to functions.NAME (`openai`)."""

from __future__ import annotations

from loraplex import harmony
from loraplex.entrypoints.protocol import ToolCall
from loraplex.entrypoints.tool_parsers.base import PartialCall, _call, _StartTagParser


class OpenAIParser(_StartTagParser):
    """gpt-oss (harmony.py): a call is a commentary message to functions.NAME whose body
    is its arguments; the final and preamble messages are the content. It reads the
    reply as the openai_gptoss reasoning parser leaves it (the content, then each call
    from its `<|start|>`), or a raw one (the analysis then left out)."""

    start = harmony.START
    keeps_special_tokens = True

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        msgs = [m for m in harmony.messages(text) if m.channel != "analysis"]
        calls = [_call(m.call, m.body) for m in msgs if m.call is not None]
        if not calls:
            return text, []
        return "".join(m.body for m in msgs if m.call is None) or None, calls

    def partial(self, text: str) -> list[PartialCall]:
        return [(m.call, m.body) for m in harmony.messages(text, finished=False)
                if m.call is not None]
