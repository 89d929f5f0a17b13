"""vLLM's `/v1/audio/transcriptions` and `/v1/audio/translations`: a multipart form (file,
model, language, prompt, response_format json / text / verbose_json,
timestamp_granularities[], temperature, stream, and vLLM's max_completion_tokens,
stream_include_usage, stream_continuous_usage_stats) becomes one prompt a chunk of the
clip, as the model's transcriber builds it (entrypoints/transcription_models.py, picked by
the model's processor: which models serve which task, timestamps and language detection,
how a clip is cut, each model's prompt); the reply's text comes back as {"text", "usage"}
or plain text. A clip longer than the model's window is cut into chunks as vLLM cuts it
(entrypoints/audio_chunks.py), each transcribed as a request of its own under the
request's adapter (all queued at once, so they share the batch), their texts joined in
order; usage counts the whole clip.

Without `language`, a model that detects it (Whisper) does so as vLLM does: one greedy
token after its detection prompt, only its language tokens allowed, on the first chunk of
a long clip. `response_format=verbose_json` (a model that writes timestamp tokens only, as
vLLM: Whisper's) decodes with `<|0.00|>` in the prompt and returns the segments of its
timestamps (entrypoints/transcription_segments.py), each chunk's offset in the clip added.

`stream=true` streams vLLM's `transcription.chunk` events (entrypoints/transcription_stream.py);
`srt` / `vtt` are refused, as by vLLM."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

from loraplex.engine.audio_decode import decode_audio
from loraplex.entrypoints.audio_chunks import cut
from loraplex.entrypoints.errors import BadRequestError
from loraplex.entrypoints.serving_base import EngineRequests, OpenAIServing
from loraplex.entrypoints.transcription_models import SERVED_ON, Transcriber, transcriber
from loraplex.entrypoints.transcription_options import (
    Fields,
    TranscriptionOptions,
    raw_text_field,
    text_field,
)
from loraplex.entrypoints.transcription_segments import segments
from loraplex.entrypoints.transcription_stream import StreamSpec, transcription_events
from loraplex.sampling_params import SamplingParams


async def read_form(request: Any) -> Fields:
    """A multipart/form-data request's fields: name -> (bytes, the file name or None),
    read by starlette's form parser (python-multipart); a list field (`name[]`, sent once
    per item) joined by commas."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise BadRequestError("a transcription request is multipart/form-data (file, model, "
                              f"...), got {content_type or 'no content type'!r}")
    try:
        form = await request.form()
    except Exception as e:  # the parser's errors are its own types; the message says which
        raise BadRequestError(f"the multipart/form-data body cannot be read: {e}") from e
    fields: Fields = {}
    for name, value in form.multi_items():
        if isinstance(value, str):
            data = value.encode()
            if name.endswith("[]") and name in fields:
                data = fields[name][0] + b"," + data
            fields[name] = (data, None)
        else:  # an uploaded file
            fields[name] = (await value.read(), value.filename)
    return fields


class OpenAIServingTranscription(OpenAIServing):
    async def create_transcription(self, fields: Fields, task: str = "transcribe"
                                   ) -> dict[str, Any] | str | AsyncIterator[str]:
        """The transcription (or, task "translate", the English translation) of the form's
        `file`: {"text", "usage"} (json), the text, verbose_json's segments, or (stream)
        the SSE lines."""
        engine = self.engine.engine
        asr = self._transcriber(task)
        if "file" not in fields:
            raise BadRequestError("the form needs a `file` field (the audio)", param="file")
        opts = TranscriptionOptions.parse(
            fields, asr.timestamps_refused(engine.model_config.name))
        model = text_field(fields, "model") or None
        lora = await self.models.resolve(model)
        try:
            wave, rate = await self.off_loop(decode_audio, fields["file"][0])
        except ValueError as e:
            raise BadRequestError(f"file: {e}", param="file") from e
        chunking = asr.chunk_config()
        clips = await self.off_loop(cut, wave, rate, chunking)
        language = text_field(fields, "language") or None
        if language is None and (languages := asr.languages()) is not None:
            language = await self._detect_language(asr, languages, clips[0], model, lora)
        context = raw_text_field(fields, "prompt")
        prompts = [await self.off_loop(asr.prompt, c, language, context, task, opts.timestamps)
                   for c in clips]
        request_id = f"{'trsl' if task == 'translate' else 'trsc'}-{uuid.uuid4().hex}"
        chunks = await self._queue_chunks(request_id, prompts, opts, model, lora)
        seconds = len(wave) / rate
        if opts.stream:
            spec = StreamSpec(request_id, "translation.chunk" if task == "translate"
                              else "transcription.chunk", model or engine.model_config.name,
                              sum(len(ids) for _, ids, _ in prompts)
                              + asr.encoder_tokens(seconds),
                              opts.include_usage, opts.continuous_usage)
            everything = EngineRequests(sum((q.ids for q in chunks), []),
                                        sum((q.streams for q in chunks), []))
            return self.sse(transcription_events(spec, chunks, self.check_output), everything)
        try:
            finals = await asyncio.gather(*(self.final_output(q) for q in chunks))
        except BaseException:  # one failed: the others stop too
            for queued in chunks:
                await self.abort_all(queued)
            raise
        usage = {"type": "duration", "seconds": math.ceil(seconds)}
        if opts.timestamps:
            return self._verbose(asr, finals, clips, task, language, seconds, opts, usage)
        out = "".join(f.outputs[0].text for f in finals)
        return out if opts.response_format == "text" else {"text": out, "usage": usage}

    async def _queue_chunks(self, request_id: str, prompts: list[tuple[str, list[int], Any]],
                            opts: TranscriptionOptions, model: str | None, lora: Any
                            ) -> list[EngineRequests]:
        """Every chunk's request queued (all or none), under the request's adapter: they
        run in the same steps."""
        chunks: list[EngineRequests] = []
        try:
            for i, (text, ids, inputs) in enumerate(prompts):
                try:
                    params = SamplingParams(temperature=opts.temperature,
                                            max_tokens=opts.max_tokens,
                                            logprobs=1 if opts.timestamps else None)
                except ValueError as e:
                    raise BadRequestError(str(e)) from e
                self.fit_max_tokens(params, len(ids))
                chunks.append(await self.start_requests(f"{request_id}-{i}", [(text, ids)],
                                                        [params], model, lora, images=inputs))
        except BaseException:
            for queued in chunks:
                await self.abort_all(queued)
            raise
        return chunks

    def _transcriber(self, task: str) -> Transcriber:
        """The model's transcriber (entrypoints/transcription_models.py); 400 unless the
        model serves the route."""
        engine = self.engine.engine
        name = engine.model_config.name
        if "audio" not in engine.modalities:
            raise BadRequestError(f"model {name!r} takes no audio: transcriptions are served "
                                  f"on {SERVED_ON}", param="file")
        asr = transcriber(engine.image_processor, engine.tokenizer, self.encoder)
        if asr is None:
            raise BadRequestError(f"model {name!r} does not serve transcriptions",
                                  param="model")
        asr.check(task, name)
        return asr

    def _verbose(self, asr: Transcriber, finals: list[Any], clips: list[tuple[Any, int]],
                 task: str, language: str | None, seconds: float,
                 opts: TranscriptionOptions, usage: dict[str, Any]) -> dict[str, Any]:
        """verbose_json: each chunk's timestamps as segments, offset by where it starts."""
        tok = self.engine.engine.tokenizer
        first = asr.first_timestamp()
        assert first is not None
        found: list[Any] = []
        offset = 0.0
        for final, (wave, rate) in zip(finals, clips, strict=True):
            o = final.outputs[0]
            found += segments(o.token_ids, o.logprobs,
                              lambda ids: tok.decode(ids, skip_special_tokens=True), first,
                              tok.eos_token_id, offset, opts.temperature, len(found))
            offset += len(wave) / rate
        return {"task": task, "language": language, "duration": seconds,
                "text": "".join(s.text for s in found),
                "segments": [s.to_dict() for s in found], "usage": usage}

    async def _detect_language(self, asr: Transcriber, languages: dict[int, str],
                               clip: tuple[Any, int], model: str | None, lora: Any) -> str:
        """The clip's language, as vLLM detects it: the decoder's greedy token after the
        model's detection prompt among its language tokens (under the request's model)."""
        text, ids, inputs = await self.off_loop(asr.language_prompt, clip)
        params = SamplingParams(temperature=0.0, max_tokens=1,
                                allowed_token_ids=sorted(languages))
        queued = await self.start_requests(f"lang-{uuid.uuid4().hex}", [(text, ids)], [params],
                                           model, lora, images=inputs)
        return languages[(await self.final_output(queued)).outputs[0].token_ids[0]]
