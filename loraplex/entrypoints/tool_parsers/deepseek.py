"""DeepSeek's tool-call tokens (`deepseek_v3`: V3 / R1-0528, `deepseek_v31`: V3.1), read as
vLLM's parsers read them: after any text (the content, as written), a calls section

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {"city": "Paris"}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

(V3.1: `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>`). The arguments are
passed on as written, one line each (vLLM's regexes do not cross a newline). The tags
are tokens of DeepSeek's tokenizers, so the reply is decoded with special tokens kept."""

from __future__ import annotations

import re

from loraplex.entrypoints.protocol import ToolCall
from loraplex.entrypoints.tool_parsers.base import PartialCall, _call, _held_back, _StartTagParser

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


class DeepSeekV3Parser(_StartTagParser):
    """DeepSeek-V3 / R1-0528: each call's type, NAME on its line, then its arguments in a
    ```json fence."""

    start = CALLS_BEGIN
    keeps_special_tokens = True  # whether the tags are special or not, they stay
    _calls = re.compile(CALL_BEGIN + r"(?P<type>.*)" + SEP + r"(?P<name>.*)\n```json\n"
                        r"(?P<arguments>.*)\n```" + CALL_END)
    _args_open, _args_end = "\n```json\n", "\n```" + CALL_END

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls); no call that matches: all content."""
        if self.start not in text:
            return text, []
        calls = [_call(m.group("name"), m.group("arguments"))
                 for m in self._calls.finditer(text)]
        if not calls:
            return text, []
        content = text[:text.find(self.start)]
        return content or None, calls

    def _split_call(self, body: str) -> tuple[str | None, str]:
        """A call's text after its begin tag -> (the name once its line ends, the
        arguments so far)."""
        _, sep, rest = body.partition(SEP)
        name, newline, _ = rest.partition("\n")
        if not sep or not newline:
            return None, ""
        _, opened, args = rest.partition(self._args_open)
        if not opened:
            return name, ""
        end = args.find(self._args_end)
        return name, args[:end] if end >= 0 else args[:_held_back(args, self._args_end)]

    def partial(self, text: str) -> list[PartialCall]:
        """Each call once its name's line is written; its arguments' text as it comes (a
        tail that may be the closing fence held back)."""
        if self.start not in text:
            return []
        calls: list[PartialCall] = []
        for body in text.split(CALL_BEGIN)[1:]:
            name, args = self._split_call(body)
            if name is None:
                break
            calls.append((name, args))
        return calls


class DeepSeekV31Parser(DeepSeekV3Parser):
    """DeepSeek-V3.1: NAME<｜tool▁sep｜>arguments, no type and no fence."""

    _calls = re.compile(CALL_BEGIN + r"(?P<name>.*?)" + SEP + r"(?P<arguments>.*?)" + CALL_END)

    def _split_call(self, body: str) -> tuple[str | None, str]:
        name, sep, args = body.partition(SEP)
        if not sep:
            return None, ""
        end = args.find(CALL_END)
        return name, args[:end] if end >= 0 else args[:_held_back(args, CALL_END)]
