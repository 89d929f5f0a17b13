"""Ngram (prompt lookup) drafts: text that repeats itself continues as it did before.

For a sequence's tokens (prompt + output), find the most recent earlier occurrence of
its last n tokens, n from `max_n` down to `min_n` (the longest match wins; among equally
long ones the most recent), and propose the up to k tokens that followed it. vLLM's
NgramProposer does the same search with KMP; here the candidates (earlier positions of
the last token) come from one vectorized comparison and only they are extended
backwards, so a step costs O(length) in numpy plus O(candidates x max_n) in Python.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class NgramProposer:
    def __init__(self, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that followed the longest (then most recent) earlier match of
        the suffix of `tokens`; [] when no suffix of at least min_n tokens reappears."""
        n_tok = len(tokens)
        if k < 1 or n_tok <= self.min_n:
            return []
        arr = np.asarray(tokens, dtype=np.int64)
        # earlier positions holding the last token, most recent first (the match's end)
        ends = np.flatnonzero(arr[:-1] == arr[-1])[::-1]
        longest = min(self.max_n, n_tok - 1)
        best_len, best_end = 0, -1
        for end in ends.tolist():
            m = 1  # tokens matched so far, backwards from `end` and from the suffix's end
            while m < longest and m <= end and tokens[end - m] == tokens[n_tok - 1 - m]:
                m += 1
            if m > best_len:
                best_len, best_end = m, end
                if m == longest:
                    break
        if best_len < self.min_n:
            return []
        return [int(t) for t in tokens[best_end + 1:best_end + 1 + k]]
