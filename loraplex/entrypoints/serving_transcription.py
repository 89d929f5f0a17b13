"""vLLM's `/v1/audio/transcriptions` for Granite Speech and Whisper, and
`/v1/audio/translations` for Whisper: a multipart form (file, model,
language, prompt, response_format json / text / verbose_json, timestamp_granularities[],
temperature, stream, and vLLM's max_completion_tokens, stream_include_usage,
stream_continuous_usage_stats) becomes the prompt vLLM's Granite
Speech builds for a transcription (the chat template over one user message, `<|audio|>can
you transcribe the speech into a written format?`, encoded as vLLM encodes it), the clip its
audio; the reply's text comes back as {"text", "usage"} or plain text. As in vLLM's Granite
Speech, `language` and `prompt` do not change the prompt. A clip longer than 30 s is cut
into chunks as vLLM cuts it (entrypoints/audio_chunks.py), each transcribed as a request of
its own under the request's adapter (all queued at once, so they share the batch), their
texts joined in order; usage counts the whole clip.

Whisper's decoder prompt is vLLM's (its `get_generation_prompt`):
`<|startoftranscript|><|{language}|><|{task}|><|notimestamps|>`, task `transcribe` or
`translate` (the translations route), after `<|startofprev|>{prompt}` when the form has a
prompt (vLLM writes `<|prev|>`, which is no Whisper token; `<|startofprev|>` is the one
Whisper was trained with). Without `language` it is detected as vLLM detects it: one
greedy token after `<|startoftranscript|>`, only language tokens allowed; one not among
the tokenizer's `<|xx|>` tokens gets a 400, detected on the first chunk of a long clip.
`response_format=verbose_json` (Whisper with timestamp tokens only, as vLLM) decodes with
`<|0.00|>` in place of `<|notimestamps|>` and returns the segments of its timestamps
(entrypoints/transcription_segments.py), each chunk's offset in the clip added.

Voxtral's prompt is vLLM's (its `get_generation_prompt`): mistral_common's
TranscriptionRequest for the clip and the form's `language` (optional), which needs
tokenizer_mode "mistral" (engine/voxtral_inputs.py); a clip over 30 s is several encoder
windows, as in chat (not cut: vLLM neither).

`stream=true` streams vLLM's `transcription.chunk` events (entrypoints/transcription_stream.py);
`srt` / `vtt` are refused, as by vLLM."""

from __future__ import annotations

import asyncio
import math
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

from loraplex.engine.audio_decode import decode_audio
from loraplex.engine.qwen2_audio_inputs import Qwen2AudioProcessor
from loraplex.engine.voxtral_inputs import VoxtralAudioProcessor, transcription_ids
from loraplex.engine.whisper_inputs import WhisperAudioProcessor
from loraplex.entrypoints.audio_chunks import chunk_config, cut
from loraplex.entrypoints.errors import BadRequestError
from loraplex.entrypoints.serving_base import EngineRequests, OpenAIServing
from loraplex.entrypoints.transcription_options import (
    Fields,
    TranscriptionOptions,
    raw_text_field,
    text_field,
)
from loraplex.entrypoints.transcription_segments import FIRST_TIMESTAMP, segments
from loraplex.entrypoints.transcription_stream import StreamSpec, transcription_events
from loraplex.sampling_params import SamplingParams

TRANSCRIBE = "can you transcribe the speech into a written format?"
LANGUAGE_TOKEN = re.compile(r"<\|[a-z]{2,3}\|>")  # Whisper's <|en|>, <|haw|>, ...


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
        self._check_model(task)
        if "file" not in fields:
            raise BadRequestError("the form needs a `file` field (the audio)", param="file")
        opts = TranscriptionOptions.parse(fields, self._timestamps_refused())
        model = text_field(fields, "model") or None
        lora = await self.models.resolve(model)
        try:
            wave, rate = await self.off_loop(decode_audio, fields["file"][0])
        except ValueError as e:
            raise BadRequestError(f"file: {e}", param="file") from e
        processor = engine.image_processor
        chunking = chunk_config(processor)
        clips = await self.off_loop(cut, wave, rate, chunking)
        language = None
        if isinstance(processor, WhisperAudioProcessor):
            language = text_field(fields, "language") or await self._detect_language(
                clips[0], model, lora)
        prompts = [await self.off_loop(self._chunk_prompt, c, fields, language, task,
                                       opts.timestamps) for c in clips]
        request_id = f"{'trsl' if task == 'translate' else 'trsc'}-{uuid.uuid4().hex}"
        chunks = await self._queue_chunks(request_id, prompts, opts, model, lora)
        seconds = len(wave) / rate
        if opts.stream:
            spec = StreamSpec(request_id, "translation.chunk" if task == "translate"
                              else "transcription.chunk", model or engine.model_config.name,
                              self._prompt_tokens(prompts, seconds), opts.include_usage,
                              opts.continuous_usage)
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
            return self._verbose(finals, clips, chunking, task, language, opts, seconds, usage)
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

    def _check_model(self, task: str) -> None:
        """400 unless the model serves the route."""
        engine = self.engine.engine
        name = engine.model_config.name
        if "audio" not in engine.modalities:
            raise BadRequestError(f"model {name!r} takes no audio: "
                                  "transcriptions are served on Granite Speech, Phi-4-multimodal, "
                                  "Whisper and Voxtral",
                                  param="file")
        whisper = isinstance(engine.image_processor, WhisperAudioProcessor)
        if task == "translate" and not whisper:
            raise BadRequestError(f"model {name!r}: translations are served on Whisper",
                                  param="model")
        if isinstance(engine.image_processor, Qwen2AudioProcessor):  # as vLLM: no ASR prompt
            raise BadRequestError(f"model {name!r} (Qwen2-Audio) does not "
                                  "serve transcriptions (vLLM neither): use the chat route "
                                  "with an input_audio part", param="model")
        voxtral = isinstance(engine.image_processor, VoxtralAudioProcessor)
        if voxtral and not getattr(self.encoder, "is_mistral", False):
            raise BadRequestError(f"model {name!r} (Voxtral): "
                                  "transcriptions are mistral_common's TranscriptionRequest: "
                                  "serve it with --tokenizer-mode mistral", param="model")

    def _timestamps_refused(self) -> str | None:
        """Why verbose_json is not served on this model (None: it is)."""
        engine = self.engine.engine
        if not isinstance(engine.image_processor, WhisperAudioProcessor):
            return (f"model {engine.model_config.name!r} writes no timestamps (Whisper does; "
                    "vLLM serves verbose_json on Whisper only)")
        if self._first_timestamp() is None:
            return f"this Whisper tokenizer has no {FIRST_TIMESTAMP} timestamp tokens"
        return None

    def _first_timestamp(self) -> int | None:
        tok = self.engine.engine.tokenizer
        first = tok.convert_tokens_to_ids(FIRST_TIMESTAMP)
        return None if first in (None, tok.unk_token_id) else first

    def _chunk_prompt(self, clip: tuple[Any, int], fields: Fields, language: str | None,
                      task: str, timestamps: bool) -> tuple[str, list[int], Any]:
        """On the encoder thread: one chunk's prompt as the model's route builds it."""
        processor = self.engine.engine.image_processor
        if isinstance(processor, WhisperAudioProcessor):
            assert language is not None
            return self._whisper_prompt(clip, language, raw_text_field(fields, "prompt"), task,
                                        timestamps)
        if isinstance(processor, VoxtralAudioProcessor):
            return self._voxtral_prompt(clip, text_field(fields, "language") or None)
        return self._prompt(clip)

    def _prompt_tokens(self, prompts: list[tuple[str, list[int], Any]], seconds: float) -> int:
        """The stream's usage.prompt_tokens: every chunk's prompt, and for Whisper (whose
        prompt has no audio placeholders) the clip's log-mel frames, as vLLM counts them."""
        n = sum(len(ids) for _, ids, _ in prompts)
        processor = self.engine.engine.image_processor
        if isinstance(processor, WhisperAudioProcessor):
            n += math.ceil(seconds * processor.rate / processor.extractor.hop_length)
        return n

    def _verbose(self, finals: list[Any], clips: list[tuple[Any, int]], chunking: Any,
                 task: str, language: str | None, opts: TranscriptionOptions, seconds: float,
                 usage: dict[str, Any]) -> dict[str, Any]:
        """verbose_json: each chunk's timestamps as segments, offset by where it starts."""
        tok = self.engine.engine.tokenizer
        first = self._first_timestamp()
        assert first is not None and chunking is not None
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

    def _prompt(self, clip: tuple[Any, int]) -> tuple[str, list[int], Any]:
        """On the encoder thread: the template's text, its ids with `<|audio|>` expanded,
        the clip's processed inputs."""
        engine = self.engine.engine
        message = {"role": "user", "content": engine.audio_placeholder + TRANSCRIBE}
        text = self.encoder.apply_chat_template([message], tokenize=False,
                                                add_generation_prompt=True)
        try:
            ids, inputs = engine.image_processor(list(self.encoder.encode(text)), [clip])
        except ValueError as e:
            raise BadRequestError(f"file: {e}", param="file") from e
        return text, ids, inputs

    def _voxtral_prompt(self, clip: tuple[Any, int], language: str | None
                        ) -> tuple[str, list[int], Any]:
        """On the encoder thread: mistral_common's transcription request for the clip, its
        text, the clip's features."""
        processor = self.engine.engine.image_processor
        try:
            ids = transcription_ids(self.encoder, clip, processor.rate, language)
        except ValueError as e:
            raise BadRequestError(str(e), param="language") from e
        try:
            ids, inputs = processor(ids, [clip])
        except ValueError as e:
            raise BadRequestError(f"file: {e}", param="file") from e
        return self.encoder.decode(ids), ids, inputs

    async def _detect_language(self, clip: tuple[Any, int], model: str | None,
                               lora: Any) -> str:
        """Whisper's language of the clip, as vLLM detects it: the decoder's greedy token
        after `<|startoftranscript|>` among the language tokens (under the request's
        model)."""
        engine = self.engine.engine
        languages = {i: t[2:-2] for t, i in engine.tokenizer.get_added_vocab().items()
                     if LANGUAGE_TOKEN.fullmatch(t)}
        if not languages:
            raise BadRequestError("this Whisper tokenizer has no language tokens: give "
                                  "`language`", param="language")
        text = "<|startoftranscript|>"

        def prompt() -> tuple[list[int], Any]:
            try:
                return engine.image_processor(
                    list(self.encoder.encode(text, add_special_tokens=False)), clip)
            except ValueError as e:
                raise BadRequestError(f"file: {e}", param="file") from e

        ids, inputs = await self.off_loop(prompt)
        params = SamplingParams(temperature=0.0, max_tokens=1,
                                allowed_token_ids=sorted(languages))
        queued = await self.start_requests(f"lang-{uuid.uuid4().hex}", [(text, ids)], [params],
                                           model, lora, images=inputs)
        return languages[(await self.final_output(queued)).outputs[0].token_ids[0]]

    def _whisper_prompt(self, clip: tuple[Any, int], language: str, prompt: str, task: str,
                        timestamps: bool = False) -> tuple[str, list[int], Any]:
        """On the encoder thread: Whisper's decoder prompt as vLLM builds it (verbose_json:
        `<|0.00|>` for `<|notimestamps|>`), its ids (no special tokens added), the clip's
        features."""
        engine = self.engine.engine
        token = f"<|{language}|>"
        if engine.tokenizer.convert_tokens_to_ids(token) in (None, engine.tokenizer.unk_token_id):
            raise BadRequestError(f"language {language!r} is not one of Whisper's (no {token} "
                                  "token)", param="language")
        text = (f"<|startofprev|>{prompt}" if prompt else "") + \
            f"<|startoftranscript|>{token}<|{task}|>" + \
            (FIRST_TIMESTAMP if timestamps else "<|notimestamps|>")
        try:
            ids, inputs = engine.image_processor(
                list(self.encoder.encode(text, add_special_tokens=False)), clip)
        except ValueError as e:
            raise BadRequestError(f"file: {e}", param="file") from e
        return text, ids, inputs

