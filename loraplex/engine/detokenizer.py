"""Incremental detokenization and stop strings.

Decoding a growing list of ids from scratch each step costs O(n^2); instead, like vLLM,
only a short window of ids is decoded per token (prefix_offset/read_offset), and text
is released only once it no longer ends in a partial UTF-8 character (U+FFFD).
"""

from __future__ import annotations

from loraplex.sampling_params import SamplingParams

_WINDOW = 6  # ids of left context decoded with each new token


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.ids: list[int] = list(prompt_token_ids[-_WINDOW:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self._stop_hit: str | None = None
        self._checked = 0  # chars of text already searched for stop strings
        self._max_stop = max((len(s) for s in params.stop), default=0)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.params.skip_special_tokens,
            spaces_between_special_tokens=self.params.spaces_between_special_tokens)

    def append(self, token_id: int) -> None:
        if self._stop_hit is not None:
            return
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            # keep the window bounded
            if self.prefix_offset > _WINDOW:
                drop = self.prefix_offset - _WINDOW
                self.ids = self.ids[drop:]
                self.prefix_offset -= drop
                self.read_offset -= drop
            self._check_stop()

    def _check_stop(self) -> None:
        if not self.params.stop:
            return
        start = max(0, self._checked - self._max_stop + 1)
        best: tuple[int, str] | None = None
        for s in self.params.stop:
            pos = self.text.find(s, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        self._checked = len(self.text)
        if best is not None:
            pos, s = best
            self._stop_hit = s
            end = pos + len(s) if self.params.include_stop_str_in_output else pos
            self.text = self.text[:end]

    @property
    def output_text(self) -> str:
        return self.text

    def stop_string_hit(self) -> str | None:
        return self._stop_hit

    def visible_text(self, finished: bool) -> str:
        """Streaming view: hold back a tail that could still grow into a stop string."""
        if finished or self._stop_hit is not None or not self.params.stop:
            return self.text
        hold = 0
        for s in self.params.stop:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return self.text[:len(self.text) - hold] if hold else self.text
