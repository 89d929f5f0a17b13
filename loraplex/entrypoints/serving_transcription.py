"""vLLM's `/v1/audio/transcriptions` for Granite Speech and Whisper, and
`/v1/audio/translations` for Whisper: a multipart form (file, model,
language, prompt, response_format json / text, temperature, and vLLM's
max_completion_tokens) becomes the prompt vLLM's Granite
Speech builds for a transcription (the chat template over one user message, `<|audio|>can
you transcribe the speech into a written format?`, encoded as vLLM encodes it), the clip its
audio; the reply's text comes back as {"text", "usage"} or plain text. As in vLLM's Granite
Speech, `language` and `prompt` do not change the prompt. A clip is not split: one longer
than the context allows is refused (vLLM cuts long audio into chunks).

Whisper's decoder prompt is vLLM's (its `get_generation_prompt`):
`<|startoftranscript|><|{language}|><|{task}|><|notimestamps|>`, task `transcribe` or
`translate` (the translations route), after `<|startofprev|>{prompt}` when the form has a
prompt (vLLM writes `<|prev|>`, which is no Whisper token; `<|startofprev|>` is the one
Whisper was trained with). Without `language` it is detected as vLLM detects it: one
greedy token after `<|startoftranscript|>`, only language tokens allowed; one not among
the tokenizer's `<|xx|>` tokens gets a 400. A clip over 30 s is refused (vLLM splits it
into 30 s chunks).

Voxtral's prompt is vLLM's (its `get_generation_prompt`): mistral_common's
TranscriptionRequest for the clip and the form's `language` (optional), which needs
tokenizer_mode "mistral" (engine/voxtral_inputs.py); a clip over 30 s is several encoder
windows, as in chat."""

from __future__ import annotations

import math
import re
import uuid
from typing import Any

from loraplex.engine.audio_decode import decode_audio
from loraplex.engine.qwen2_audio_inputs import Qwen2AudioProcessor
from loraplex.engine.voxtral_inputs import VoxtralAudioProcessor, transcription_ids
from loraplex.engine.whisper_inputs import WhisperAudioProcessor
from loraplex.entrypoints.errors import BadRequestError
from loraplex.entrypoints.serving_base import OpenAIServing
from loraplex.sampling_params import SamplingParams

TRANSCRIBE = "can you transcribe the speech into a written format?"
RESPONSE_FORMATS = ("json", "text")
LANGUAGE_TOKEN = re.compile(r"<\|[a-z]{2,3}\|>")  # Whisper's <|en|>, <|haw|>, ...


async def read_form(request: Any) -> dict[str, tuple[bytes, str | None]]:
    """A multipart/form-data request's fields: name -> (bytes, the file name or None),
    read by starlette's form parser (python-multipart)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise BadRequestError("a transcription request is multipart/form-data (file, model, "
                              f"...), got {content_type or 'no content type'!r}")
    try:
        form = await request.form()
    except Exception as e:  # the parser's errors are its own types; the message says which
        raise BadRequestError(f"the multipart/form-data body cannot be read: {e}") from e
    fields: dict[str, tuple[bytes, str | None]] = {}
    for name, value in form.multi_items():
        if isinstance(value, str):
            fields[name] = (value.encode(), None)
        else:  # an uploaded file
            fields[name] = (await value.read(), value.filename)
    return fields


def _text(fields: dict[str, tuple[bytes, str | None]], name: str) -> str | None:
    value = fields.get(name)
    return None if value is None else value[0].decode("utf-8", "replace").strip()


def _raw_text(fields: dict[str, tuple[bytes, str | None]], name: str) -> str:
    """A field's text as sent (Whisper's prompt: its leading space is a token of its own)."""
    value = fields.get(name)
    return "" if value is None else value[0].decode("utf-8", "replace")


class OpenAIServingTranscription(OpenAIServing):
    async def create_transcription(self, fields: dict[str, tuple[bytes, str | None]],
                                   task: str = "transcribe") -> dict[str, Any] | str:
        """The transcription (or, task "translate", the English translation) of the form's
        `file`: {"text", "usage"} (json) or the text."""
        engine = self.engine.engine
        if "audio" not in engine.modalities:
            raise BadRequestError(f"model {engine.model_config.name!r} takes no audio: "
                                  "transcriptions are served on Granite Speech, Phi-4-multimodal, "
                                  "Whisper and Voxtral",
                                  param="file")
        whisper = isinstance(engine.image_processor, WhisperAudioProcessor)
        if task == "translate" and not whisper:
            raise BadRequestError(f"model {engine.model_config.name!r}: translations are "
                                  "served on Whisper", param="model")
        if isinstance(engine.image_processor, Qwen2AudioProcessor):  # as vLLM: no ASR prompt
            raise BadRequestError(f"model {engine.model_config.name!r} (Qwen2-Audio) does not "
                                  "serve transcriptions (vLLM neither): use the chat route "
                                  "with an input_audio part", param="model")
        voxtral = isinstance(engine.image_processor, VoxtralAudioProcessor)
        if voxtral and not getattr(self.encoder, "is_mistral", False):
            raise BadRequestError(f"model {engine.model_config.name!r} (Voxtral): "
                                  "transcriptions are mistral_common's TranscriptionRequest: "
                                  "serve it with --tokenizer-mode mistral", param="model")
        if "file" not in fields:
            raise BadRequestError("the form needs a `file` field (the audio)", param="file")
        fmt = _text(fields, "response_format") or "json"
        if fmt not in RESPONSE_FORMATS:
            raise BadRequestError(f"response_format {fmt!r} is not supported (json, text)",
                                  param="response_format")
        try:
            temperature = float(_text(fields, "temperature") or 0.0)
        except ValueError:
            raise BadRequestError("temperature must be a number",
                                  param="temperature") from None
        try:
            limit = _text(fields, "max_completion_tokens")
            max_tokens = int(limit) if limit else None
        except ValueError:
            raise BadRequestError("max_completion_tokens must be an int",
                                  param="max_completion_tokens") from None
        model = _text(fields, "model") or None
        lora = await self.models.resolve(model)
        try:
            wave, rate = await self.off_loop(decode_audio, fields["file"][0])
        except ValueError as e:
            raise BadRequestError(f"file: {e}", param="file") from e
        if whisper:
            language = _text(fields, "language") or await self._detect_language(
                (wave, rate), model, lora)
            text, ids, inputs = await self.off_loop(
                self._whisper_prompt, (wave, rate), language, _raw_text(fields, "prompt"),
                task)
        elif voxtral:
            text, ids, inputs = await self.off_loop(self._voxtral_prompt, (wave, rate),
                                                    _text(fields, "language") or None)
        else:
            text, ids, inputs = await self.off_loop(self._prompt, (wave, rate))
        try:
            params = SamplingParams(temperature=temperature, max_tokens=max_tokens)
        except ValueError as e:
            raise BadRequestError(str(e)) from e
        self.fit_max_tokens(params, len(ids))
        queued = await self.start_requests(f"trsc-{uuid.uuid4().hex}", [(text, ids)],
                                           [params], model, lora, images=inputs)
        out = (await self.final_output(queued)).outputs[0].text
        if fmt == "text":
            return out
        return {"text": out, "usage": {"type": "duration",
                                       "seconds": math.ceil(len(wave) / rate)}}

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

    def _whisper_prompt(self, clip: tuple[Any, int], language: str, prompt: str, task: str
                        ) -> tuple[str, list[int], Any]:
        """On the encoder thread: Whisper's decoder prompt as vLLM builds it, its ids
        (no special tokens added), the clip's features."""
        engine = self.engine.engine
        token = f"<|{language}|>"
        if engine.tokenizer.convert_tokens_to_ids(token) in (None, engine.tokenizer.unk_token_id):
            raise BadRequestError(f"language {language!r} is not one of Whisper's (no {token} "
                                  "token)", param="language")
        text = (f"<|startofprev|>{prompt}" if prompt else "") + \
            f"<|startoftranscript|>{token}<|{task}|><|notimestamps|>"
        try:
            ids, inputs = engine.image_processor(
                list(self.encoder.encode(text, add_special_tokens=False)), clip)
        except ValueError as e:
            raise BadRequestError(f"file: {e}", param="file") from e
        return text, ids, inputs
