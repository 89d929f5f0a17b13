"""gpt-oss's replies, in OpenAI's harmony format (vLLM: --reasoning-parser openai_gptoss,
--tool-call-parser openai).

A reply is a run of messages. The prompt ends with `<|start|>assistant`, so the first
message's header comes at once; each later one starts with `<|start|>assistant`:

    <|channel|>analysis<|message|>The user wants the weather.<|end|>
    <|start|>assistant<|channel|>final<|message|>It is sunny.<|return|>
or, calling a tool (the recipient in the channel part, or after the role):
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json
        <|message|>{"city": "Paris"}<|call|>

The channel says what a message is: analysis the reasoning, final the answer, commentary
a tool call (it has a recipient, `to=functions.NAME`) or a preamble the user may see.
`<|return|>` and `<|call|>` end the reply (generation_config's eos ids), so they are not
in its text; `<|end|>` closes a message. The markers are special tokens: a server with
these parsers decodes the reply with special tokens kept.

`split` gives (the analysis messages' text, the rest): the final and preamble messages'
text, then each tool call in one canonical form, `<|start|>assistant to=functions.NAME
<|channel|>commentary<|message|>ARGUMENTS`, which `split` reads back unchanged (so the
tool parser may run it again on what it gets). A reply that is not in the format at all
(structured outputs constrain the whole reply) is content. The split of a reply's first
n characters is a prefix of the split of the whole: a message counts once its header is
complete.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

START, CHANNEL, MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
_CLOSERS = ("<|end|>", "<|return|>", "<|call|>")
_HEADER_OPENERS = (CHANNEL, "to=", " to=")  # how the first message's header may begin
_CHANNEL_NAME = re.compile(r"<\|channel\|>\s*(\w+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
FUNCTIONS = "functions."


@dataclass(frozen=True)
class HarmonyMessage:
    channel: str  # analysis | commentary | final (a reply outside the format: final)
    recipient: str | None  # "functions.get_weather" for a tool call
    body: str

    @property
    def call(self) -> str | None:
        """The function this message calls, if it is a tool call."""
        if self.recipient and self.recipient.startswith(FUNCTIONS):
            return self.recipient[len(FUNCTIONS):]
        return None


def messages(text: str, finished: bool = True) -> list[HarmonyMessage]:
    """The reply's messages whose header is complete (the last body may still grow; while
    not `finished`, without a tail that may become a marker)."""
    out = []
    parts = text.split(START)
    for i, part in enumerate(parts):
        if not finished and i == len(parts) - 1:
            part = part[:len(part) - max(partial_marker_len(part, m)
                                         for m in (START, *_CLOSERS))]
        header, sep, body = part.partition(MESSAGE)
        if not sep:
            if i == 0 and _plain(part, finished):  # no header: text outside the format
                out.append(HarmonyMessage("final", None, part))
            continue
        if i == 0 and not part.lstrip().startswith(_HEADER_OPENERS):
            out.append(HarmonyMessage("final", None, part))  # a "<|message|>" in plain text
            continue
        ends = [body.find(c) for c in _CLOSERS if c in body]
        channel = _CHANNEL_NAME.search(header)
        recipient = _RECIPIENT.search(header)
        out.append(HarmonyMessage(channel.group(1) if channel else "final",
                                  recipient.group(1) if recipient else None,
                                  body[:min(ends)] if ends else body))
    return out


def partial_marker_len(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def _plain(first: str, finished: bool) -> bool:
    """Is the text before any <|start|> (with no <|message|>) plain content, not a header
    still being written? Undecided while it may yet become one."""
    head = first.lstrip()
    if head.startswith(_HEADER_OPENERS):
        return False  # a header, cut off if finished
    # while streaming, "", " t" or "to" may still be a header's start
    return finished or not any(o.startswith((first, head)) for o in _HEADER_OPENERS)


def tool_call_text(name: str, arguments: str) -> str:
    """A call in the canonical form `split` writes (and reads back)."""
    return f"{START}assistant to={FUNCTIONS}{name}{CHANNEL}commentary{MESSAGE}{arguments}"


@dataclass(frozen=True)
class HarmonyReasoningParser:
    """`--reasoning-parser openai_gptoss`: ReasoningParser's interface (reasoning.py) over
    the harmony format."""

    name: str = "openai_gptoss"
    opens_in_reply: bool = False
    keeps_special_tokens: bool = True  # its markers are special tokens

    def split(self, text: str, finished: bool = True) -> tuple[str | None, str]:
        """(the analysis text or None, the final and preamble text, then the calls)."""
        msgs = messages(text, finished)
        analysis = [m.body for m in msgs if m.channel == "analysis"]
        rest = "".join(tool_call_text(m.call, m.body) if m.call is not None else m.body
                       for m in msgs if m.channel != "analysis")
        return ("".join(analysis) if analysis else None), rest

    def for_request(self, chat_template_kwargs: dict[str, Any] | None
                    ) -> HarmonyReasoningParser:
        return self

    def tag_ids(self, tokenizer: Any) -> None:
        """No single end-of-reasoning tag: structured outputs constrain the whole reply
        (which then has no analysis, and is read as content)."""
        return None
