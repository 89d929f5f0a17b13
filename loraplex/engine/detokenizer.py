"""Incremental detokenization and stop strings.

Decoding the whole output again at every step costs O(n^2); instead, like vLLM, each new
token decodes only a short window of ids: [prefix_offset, read_offset) is text already
released (context, so merges and leading spaces come out right) and [read_offset, end) is
new. The new text is the difference between the two decodes, released only once it does
not end in U+FFFD (a multi-byte character still split across tokens).
Stop strings are searched in the new text plus the last len(longest stop) - 1 characters.
"""

from __future__ import annotations

from typing import Any

from loraplex.sampling_params import SamplingParams

_PROMPT_CONTEXT = 5  # prompt ids kept as left context (vLLM's initial offset)
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Output text of one sequence, grown one token at a time; truncated at a stop string."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int],
                 params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._text = ""
        self._num_tokens = 0
        self._searched = 0  # chars of text already searched for stop strings
        self._stop_hit: str | None = None
        self._max_stop = max((len(s) for s in params.stop), default=0)

    def _decode(self, ids: list[int]) -> str:
        # No clean-up of spaces: it is not local, so windows would not add up (vLLM skips it).
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.params.skip_special_tokens,
            spaces_between_special_tokens=self.params.spaces_between_special_tokens,
            clean_up_tokenization_spaces=False)

    def append(self, token_id: int) -> None:
        """Add one generated token; a no-op once a stop string was hit."""
        if self._stop_hit is not None or not self.params.detokenize:
            return  # (detokenize=False: token ids only, the text stays empty)
        self._num_tokens += 1
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return  # nothing visible yet, or a character is still incomplete
        self._text += full[len(prefix):]
        # What was new becomes the context; ids before it are never decoded again.
        self._ids = self._ids[self._read_offset:]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        self._check_stop()

    def _check_stop(self) -> None:
        if not self.params.stop:
            return
        start = max(0, self._searched - self._max_stop + 1)
        self._searched = len(self._text)
        if self._num_tokens < self.params.min_tokens:
            return  # like vLLM, stop strings count only once min_tokens are out
        best: tuple[int, str] | None = None
        for s in self.params.stop:
            pos = self._text.find(s, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is not None:
            pos, s = best
            self._stop_hit = s
            self._text = self._text[:pos + len(s) if self.params.include_stop_str_in_output
                                    else pos]

    @property
    def output_text(self) -> str:
        """All output text so far (truncated at a stop string if one was hit)."""
        return self._text

    def stop_string_hit(self) -> str | None:
        """The stop string that ended the text, or None."""
        return self._stop_hit

    def visible_text(self, finished: bool) -> str:
        """What may be streamed: a tail that could still grow into a stop string is held
        back (it would have to be taken back otherwise); when finished, all of it."""
        text = self._text
        if finished or self._stop_hit is not None or not self.params.stop:
            return text
        hold = 0
        for s in self.params.stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return text[:len(text) - hold]
