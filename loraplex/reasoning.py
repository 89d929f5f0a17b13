"""Reasoning replies (vLLM's --reasoning-parser): a model that thinks between <think> and
</think> before it answers gets its reply split into `reasoning` and `content`.

    deepseek_r1  everything before </think> is reasoning, with or without the opening tag
                 (R1's chat template writes <think> into the prompt; QwQ, and Qwen3's
                 thinking-only models, the same); no </think> yet: all reasoning
    qwen3        reasoning only when the reply opens with <think> (Qwen3's hybrid models;
                 with enable_thinking=False the template puts an empty think block in the
                 prompt and the reply is all content)
    glm45        GLM-4.5 / 4.6: as qwen3 (its template too closes an empty think block in
                 the prompt when thinking is off)
    openai_gptoss  gpt-oss's harmony messages: the analysis channel is the reasoning
                 (harmony.py; the default for gpt-oss, as in vLLM)
    mistral      Magistral: between [THINK] and [/THINK] (special tokens, so kept in the
                 decoded reply), after any content; no [THINK]: all content
    granite      Granite 3.2+ (thinking=True): "Here is my thought process:" opens the
                 reply, "Here is my response:" ends the reasoning ("Here's" too); plain
                 text, not tokens, so structured outputs constrain the whole reply (as
                 in vLLM, which does not support them with this parser either)
    seed_oss     Seed-OSS: deepseek_r1's rule between <seed:think> and </seed:think>
    minimax_m2   MiniMax-M2: deepseek_r1's rule (its template opens <think> in the prompt)
    minimax_m2_append_think  MiniMax-M2, the reasoning kept in the content: the reply is
                 all content, "<think>" put back before it (vLLM's, for clients that
                 send the thinking back in the conversation, as MiniMax asks)
    deepseek_v3  DeepSeek-V3.1 / V3: per request, deepseek_r1's rule with
                 chat_template_kwargs {"thinking": true}, else all content (vLLM's)

The split of a reply's first n characters is a prefix of the split of the whole (a tail
that may still become a tag is held back until it is decided), so streamed deltas add up
to the final message. Structured outputs then constrain only what follows </think>
(engine: `reasoning_ended`, StructuredOutputs' matchers wait for the end tag).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loraplex.harmony import HarmonyReasoningParser, partial_marker_len


@dataclass(frozen=True)
class ReasoningParser:
    name: str
    opens_in_reply: bool  # reasoning only when the reply starts with the start tag (qwen3)
    start: str = "<think>"
    end: str = "</think>"
    keeps_special_tokens: bool = False  # decode the reply with special tokens (harmony)

    @property
    def starts(self) -> tuple[str, ...]:
        """Every way the reasoning may open (a model with variants overrides it)."""
        return (self.start,)

    @property
    def ends(self) -> tuple[str, ...]:
        return (self.end,)

    def split(self, text: str, finished: bool = True) -> tuple[str | None, str]:
        """(reasoning or None, content) of a reply's text. Not `finished`: a tail that
        could still turn into a tag is in neither part yet."""
        head = text.lstrip()
        if not finished and any(s != head and s.startswith(head) for s in self.starts):
            return None, ""  # "<thi": the opening tag or not, decided by what follows
        opened = next((s for s in self.starts if head.startswith(s)), None)
        if opened is not None:
            body = head[len(opened):]
        elif self.opens_in_reply:
            return None, text
        else:
            body = text
        return self._until_end(body, finished)

    def _until_end(self, body: str, finished: bool) -> tuple[str, str]:
        """(reasoning, content) of what follows the start tag: split at the first end tag;
        none yet (not `finished`): a tail that may become one ("...</thi") held back."""
        ends = [(i, e) for e in self.ends if (i := body.find(e)) >= 0]
        if ends:
            i, end = min(ends)
            return body[:i], body[i + len(end):]
        if not finished:
            body = body[:len(body) - max(partial_marker_len(body, e) for e in self.ends)]
        return body, ""

    def for_request(self, chat_template_kwargs: dict[str, Any] | None
                    ) -> ReasoningParser | None:
        """The parser for one request (a model whose thinking a request turns on or off
        picks here; None: its reply is all content)."""
        return self

    def tag_ids(self, tokenizer: Any) -> tuple[int, int] | None:
        """(start, end) tag token ids: each tag must be one token of the vocabulary."""
        ids = []
        for tag in (self.start, self.end):
            encoded = tokenizer.encode(tag, add_special_tokens=False)
            if len(encoded) != 1 and getattr(tokenizer, "is_mistral", False) and \
                    tag in tokenizer.get_vocab():  # Magistral's: a control token, which
                encoded = [tokenizer.get_vocab()[tag]]  # mistral_common never encodes
            if len(encoded) != 1:
                raise ValueError(f"--reasoning-parser {self.name}: {tag!r} is not one token of "
                                 f"this tokenizer ({encoded}); the model does not reason "
                                 "with these tags")
            ids.append(encoded[0])
        return ids[0], ids[1]


@dataclass(frozen=True)
class MistralReasoningParser(ReasoningParser):
    """Magistral, as vLLM's mistral parser splits it: the reasoning is between the first
    [THINK] and the [/THINK] after it, anywhere in the reply; the content is what is
    around them (a [/THINK] without [THINK] is dropped). For structured outputs the reply
    thinks when its first token is [THINK] (qwen3's way)."""

    name: str = "mistral"
    opens_in_reply: bool = True
    start: str = "[THINK]"
    end: str = "[/THINK]"
    keeps_special_tokens: bool = True  # its tags are special tokens

    def split(self, text: str, finished: bool = True) -> tuple[str | None, str]:
        before, opened, body = text.partition(self.start)
        if not finished and not opened:  # "...[TH" may become either tag: hold it back
            before = before[:len(before) - max(partial_marker_len(before, t)
                                               for t in (self.start, self.end))]
        before = before.replace(self.end, "", 1)
        if not opened:
            return None, before
        reasoning, content = self._until_end(body, finished)
        return reasoning, before + content


@dataclass(frozen=True)
class GraniteReasoningParser(ReasoningParser):
    """Granite 3.2+: phrases, not tags; vLLM's granite parser accepts "Here's" for "Here
    is" (seen from quantized models). The reasoning runs to the reply's end until the
    response phrase comes (vLLM's stream does the same; its whole reply would then be
    content, which a stream cannot take back)."""

    name: str = "granite"
    opens_in_reply: bool = True
    start: str = "Here is my thought process:"
    end: str = "Here is my response:"

    @property
    def starts(self) -> tuple[str, ...]:
        return self.start, self.start.replace("Here is", "Here's")

    @property
    def ends(self) -> tuple[str, ...]:
        return self.end, self.end.replace("Here is", "Here's")

    def tag_ids(self, tokenizer: Any) -> None:
        """No tag tokens: structured outputs constrain the whole reply (which then has no
        thought process, and is read as content)."""
        return None


@dataclass(frozen=True)
class AppendThinkReasoningParser(ReasoningParser):
    """MiniMax-M2's minimax_m2_append_think (vLLM's): no reasoning apart; the reply, whose
    <think> the chat template wrote into the prompt, is content with "<think>" put back
    before it. No tag ids: structured outputs constrain the whole reply."""

    name: str = "minimax_m2_append_think"
    opens_in_reply: bool = False

    def split(self, text: str, finished: bool = True) -> tuple[str | None, str]:
        return None, self.start + text

    def tag_ids(self, tokenizer: Any) -> None:
        return None


@dataclass(frozen=True)
class DeepSeekV3ReasoningParser(ReasoningParser):
    """DeepSeek-V3.1 (and V3), vLLM's deepseek_v3: a request whose chat_template_kwargs
    say {"thinking": true} (V3.1's template then opens <think> in the prompt) is split as
    deepseek_r1 splits; any other is all content. For structured outputs the engine sees
    the prompt: one that opened <think> thinks, one that closed it (V3.1 without
    thinking) or has no tag (V3) is constrained from the reply's start (qwen3's way)."""

    name: str = "deepseek_v3"
    opens_in_reply: bool = True

    def for_request(self, chat_template_kwargs: dict[str, Any] | None
                    ) -> ReasoningParser | None:
        if (chat_template_kwargs or {}).get("thinking"):
            return REASONING_PARSERS["deepseek_r1"]  # type: ignore[return-value]
        return None


REASONING_PARSERS: dict[str, ReasoningParser | HarmonyReasoningParser] = {
    "deepseek_r1": ReasoningParser("deepseek_r1", opens_in_reply=False),
    "qwen3": ReasoningParser("qwen3", opens_in_reply=True),
    "glm45": ReasoningParser("glm45", opens_in_reply=True),
    "openai_gptoss": HarmonyReasoningParser(),
    "mistral": MistralReasoningParser(),
    "granite": GraniteReasoningParser(),
    "seed_oss": ReasoningParser("seed_oss", opens_in_reply=False, start="<seed:think>",
                                end="</seed:think>"),
    "minimax_m2": ReasoningParser("minimax_m2", opens_in_reply=False),
    "minimax_m2_append_think": AppendThinkReasoningParser(),
    "deepseek_v3": DeepSeekV3ReasoningParser(),
}


def reasoning_opened(prompt_ids: list[int], start_id: int, end_id: int) -> bool:
    """The prompt opens the reasoning: its last tag is the start tag (DeepSeek-V3.1's
    template with thinking on writes "<think>" last). Then the reply thinks from its
    first token, whether or not its parser waits for a start tag in the reply."""
    for token in reversed(prompt_ids):
        if token in (start_id, end_id):
            return token == start_id
    return False


def reasoning_ended(prompt_ids: list[int], start_id: int, end_id: int) -> bool:
    """The prompt closes any reasoning it opened: its last tag is the end tag (Qwen3's
    enable_thinking=False writes "<think>\\n\\n</think>" into it). Then structured outputs
    constrain the reply from its first token."""
    for token in reversed(prompt_ids):
        if token == end_id:
            return True
        if token == start_id:
            return False
    return False


def reasoning_token_count(parser: ReasoningParser | HarmonyReasoningParser,
                          token_ids: list[int], decode: Callable[[list[int]], str]) -> int:
    """How many of a reply's tokens its reasoning took (OpenAI's usage
    `reasoning_tokens`): the fewest leading tokens whose text holds all of the reasoning.
    The split of a prefix grows with the prefix, so a binary search finds them in about
    log2(n) decodes. 0 for a reply without reasoning."""
    def reasoning(ids: list[int], finished: bool) -> str:
        return parser.split(decode(ids), finished)[0] or ""

    whole = reasoning(token_ids, True)
    if not whole:
        return 0
    lo, hi = 1, len(token_ids)
    while lo < hi:  # (a character split over tokens is whole, not U+FFFD, only at its last)
        mid = (lo + hi) // 2
        if reasoning(token_ids[:mid], False) == whole:
            hi = mid
        else:
            lo = mid + 1
    return lo
