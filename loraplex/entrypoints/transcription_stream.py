"""The transcription routes' `stream=true` replies: vLLM's server-sent events.

Each event is a `transcription.chunk` (`translation.chunk` on the translations route) whose
`choices[0].delta.content` is the text added since the last one; a long clip's chunks
(entrypoints/audio_chunks.py) run at once and stream one after another, in order, so the
concatenated deltas are the non-streamed text. The last event carries the last chunk's
finish_reason; then, with vLLM's `stream_include_usage`, one with no choices and the usage
of all chunks (`stream_continuous_usage_stats`: on every event too); then `data: [DONE]`
(OpenAIServing.sse, which also turns a failure after the first event into an error event).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from pydantic import BaseModel

from loraplex.entrypoints.protocol import DeltaMessage, UsageInfo
from loraplex.entrypoints.serving_base import EngineRequests
from loraplex.outputs import RequestOutput


class TranscriptionStreamChoice(BaseModel):
    delta: DeltaMessage
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class TranscriptionStreamResponse(BaseModel):
    id: str
    object: str  # "transcription.chunk" / "translation.chunk"
    created: int
    model: str
    choices: list[TranscriptionStreamChoice]
    usage: UsageInfo | None = None


@dataclass
class StreamSpec:
    """What one streamed reply says besides the text."""

    request_id: str
    object: str
    model: str
    prompt_tokens: int  # all chunks' (and Whisper's audio frames, as vLLM counts them)
    include_usage: bool
    continuous_usage: bool


async def transcription_events(spec: StreamSpec, chunks: list[EngineRequests],
                               check: Callable[[RequestOutput], None]) -> AsyncIterator[str]:
    """The SSE `data:` lines of the chunks' replies, in chunk order; `check` raises on a
    failed output."""
    created = int(time.time())
    generated = 0

    def event(choices: list[TranscriptionStreamChoice], usage: UsageInfo | None) -> str:
        body = TranscriptionStreamResponse(id=spec.request_id, object=spec.object,
                                           created=created, model=spec.model,
                                           choices=choices, usage=usage)
        return f"data: {body.model_dump_json(exclude_none=True)}\n\n"

    def usage() -> UsageInfo:
        return UsageInfo(prompt_tokens=spec.prompt_tokens, completion_tokens=generated,
                         total_tokens=spec.prompt_tokens + generated)

    for k, queued in enumerate(chunks):
        sent, before = 0, generated
        async for out in queued.streams[0]:
            check(out)
            o = out.outputs[0]
            generated = before + len(o.token_ids)
            delta, sent = o.text[sent:], len(o.text)
            last = o.finish_reason is not None and k == len(chunks) - 1
            if not delta and not last:
                continue
            choice = TranscriptionStreamChoice(
                delta=DeltaMessage(content=delta),
                finish_reason=o.finish_reason if last else None,
                stop_reason=o.stop_reason if last else None)
            yield event([choice], usage() if spec.continuous_usage else None)
    if spec.include_usage:
        yield event([], usage())
