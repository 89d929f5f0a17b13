"""The transcription form's fields besides the file and model, checked as vLLM checks them
(each bad one a 400 naming it), before any audio is decoded."""

from __future__ import annotations

from dataclasses import dataclass

from loraplex.entrypoints.errors import BadRequestError

Fields = dict[str, tuple[bytes, str | None]]
RESPONSE_FORMATS = ("json", "text", "verbose_json")  # vLLM's; srt / vtt it refuses too
GRANULARITIES = "timestamp_granularities[]"  # as the openai client writes the list


def text_field(fields: Fields, name: str) -> str | None:
    value = fields.get(name)
    return None if value is None else value[0].decode("utf-8", "replace").strip()


def raw_text_field(fields: Fields, name: str) -> str:
    """A field's text as sent (Whisper's prompt: its leading space is a token of its own)."""
    value = fields.get(name)
    return "" if value is None else value[0].decode("utf-8", "replace")


def _flag(fields: Fields, name: str) -> bool:
    value = (text_field(fields, name) or "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise BadRequestError(f"{name} must be true or false, got {value!r}", param=name)
    return value in ("true", "1")


@dataclass(frozen=True, slots=True)
class TranscriptionOptions:
    response_format: str
    temperature: float
    max_tokens: int | None
    stream: bool
    include_usage: bool  # vLLM's stream_include_usage
    continuous_usage: bool  # vLLM's stream_continuous_usage_stats

    @property
    def timestamps(self) -> bool:
        return self.response_format == "verbose_json"

    @classmethod
    def parse(cls, fields: Fields, timestamps_served: str | None) -> TranscriptionOptions:
        """`timestamps_served`: None when the model writes timestamps (Whisper with its
        timestamp tokens), else why not (verbose_json is refused, as vLLM refuses it)."""
        fmt = text_field(fields, "response_format") or "json"
        if fmt not in RESPONSE_FORMATS:
            raise BadRequestError(f"response_format {fmt!r} is not supported (json, text, "
                                  "verbose_json, as vLLM)", param="response_format")
        if fmt == "verbose_json" and timestamps_served is not None:
            raise BadRequestError(f"response_format 'verbose_json' is not supported: "
                                  f"{timestamps_served}", param="response_format")
        granularities = [g.strip() for g in (text_field(fields, GRANULARITIES) or "").split(",")
                         if g.strip()]
        if granularities and fmt != "verbose_json":
            raise BadRequestError("timestamp_granularities needs response_format "
                                  "verbose_json", param="timestamp_granularities")
        if set(granularities) - {"segment"}:
            raise BadRequestError(f"timestamp_granularities {granularities}: only 'segment' "
                                  "is supported (no word timestamps)",
                                  param="timestamp_granularities")
        stream = _flag(fields, "stream")
        include, continuous = (_flag(fields, "stream_include_usage"),
                               _flag(fields, "stream_continuous_usage_stats"))
        if (include or continuous) and not stream:
            raise BadRequestError("stream_include_usage / stream_continuous_usage_stats can "
                                  "only be given with stream=true (vLLM's rule)",
                                  param="stream_include_usage" if include
                                  else "stream_continuous_usage_stats")
        if stream and fmt == "verbose_json":
            raise BadRequestError("response_format verbose_json cannot be streamed (vLLM's "
                                  "rule)", param="stream")
        try:
            temperature = float(text_field(fields, "temperature") or 0.0)
        except ValueError:
            raise BadRequestError("temperature must be a number", param="temperature") from None
        try:
            limit = text_field(fields, "max_completion_tokens")
            max_tokens = int(limit) if limit else None
        except ValueError:
            raise BadRequestError("max_completion_tokens must be an int",
                                  param="max_completion_tokens") from None
        return cls(fmt, temperature, max_tokens, stream, include, include and continuous)
