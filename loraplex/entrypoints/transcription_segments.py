"""Whisper's timestamp tokens as OpenAI's `verbose_json` segments (vLLM's reading of them).

With `<|notimestamps|>` replaced by `<|0.00|>` in its decoder prompt, Whisper writes
`text <|t1|><|t1'|> text <|t2|>...`: each segment is closed by a timestamp and the next
opened by another right after it. Timestamp tokens are the ids from `<|0.00|>` on, one per
0.02 s (HF's tokenizer: the ids past its last special token). A segment runs from its
opening timestamp to its closing one (the chunk's offset in the clip added); a lone closing
timestamp ends the last segment, and text after the last timestamp (the reply cut short)
belongs to none, as in HF's `decode(..., output_offsets=True)`. Timestamps are taken as
they come within one chunk (each chunk is its own 30 s window, so HF's roll-over of
decreasing timestamps into a next window does not apply)."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

TIME_PRECISION = 0.02  # seconds per timestamp token
FIRST_TIMESTAMP = "<|0.00|>"


@dataclass
class Segment:
    """One of OpenAI's TranscriptionSegment."""

    id: int
    seek: int  # the chunk's offset in the clip, in 10 ms mel frames (Whisper's `seek`)
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def timestamp_pieces(token_ids: Sequence[int], first_timestamp: int,
                     eos_token_id: int | None) -> list[tuple[int, int, int, int]]:
    """(start, end, text_begin, close) per segment of a reply to a prompt ending in
    `<|0.00|>`: its opening and closing timestamps' positions (in 0.02 s steps), and the
    indices in `token_ids` of its first text token and of its closing timestamp."""
    ids = list(token_ids)
    if ids and ids[-1] == eos_token_id:
        ids.pop()
    marks = [first_timestamp] + ids  # the prompt's <|0.00|> opens the first segment
    last = max(i for i, t in enumerate(marks) if t >= first_timestamp)
    del marks[last + 1:]  # text after the last timestamp is in no segment
    is_ts = [t >= first_timestamp for t in marks]
    if len(marks) >= 2 and is_ts[-1] and not is_ts[-2]:
        marks.append(marks[-1])  # a lone closing timestamp: the last segment ends there
        is_ts.append(True)
    pieces, opened = [], 0
    for i in range(1, len(marks)):
        if is_ts[i] and is_ts[i - 1]:  # marks[i - 1] closes a segment, marks[i] opens one
            if i - 1 > opened:  # (a timestamp right after an opening one closes nothing)
                pieces.append((marks[opened] - first_timestamp,
                               marks[i - 1] - first_timestamp, opened, i - 2))
            opened = i
    return pieces


def segments(token_ids: Sequence[int], logprobs: Sequence[dict[int, Any]] | None,
             decode: Callable[[list[int]], str], first_timestamp: int,
             eos_token_id: int | None, offset_s: float, temperature: float,
             first_id: int = 0) -> list[Segment]:
    """One chunk's reply as segments, numbered from `first_id`, their times `offset_s`
    (the chunk's start in the clip) later; `logprobs`: each reply token's {token: Logprob}
    (a segment's avg_logprob: the mean over its text tokens and closing timestamp)."""
    ids = list(token_ids)
    out = []
    for start, end, begin, close in timestamp_pieces(ids, first_timestamp, eos_token_id):
        text_ids = ids[begin:close]
        lps = [logprobs[k][ids[k]].logprob for k in range(begin, close + 1)] if logprobs else []
        text = decode(text_ids)
        raw = text.encode()
        out.append(Segment(
            id=first_id + len(out), seek=round(offset_s * 100),
            start=round(offset_s + start * TIME_PRECISION, 3),
            end=round(offset_s + end * TIME_PRECISION, 3), text=text, tokens=text_ids,
            temperature=temperature, avg_logprob=sum(lps) / len(lps) if lps else 0.0,
            compression_ratio=len(raw) / len(zlib.compress(raw)) if raw else 0.0))
    return out
