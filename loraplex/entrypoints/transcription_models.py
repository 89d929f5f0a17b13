"""What the transcription routes ask of the model they serve, one class per kind of
processor (TRANSCRIBERS, by the processor's class as engine/multimodal_prompt.py's
PROCESSORS goes by the config's), so entrypoints/serving_transcription.py names no model:
whether it serves the task, whether it writes timestamps (verbose_json) and detects the
clip's language, how a long clip is cut (entrypoints/audio_chunks.py) and one chunk's
prompt.

Granite Speech and Phi-4-multimodal (ChatTranscriber): the prompt vLLM's Granite Speech
builds for a transcription, the chat template over one user message, `<|audio|>can you
transcribe the speech into a written format?`, encoded as vLLM encodes it; as in vLLM,
`language` and `prompt` do not change it.

Whisper (WhisperTranscriber): vLLM's decoder prompt (its `get_generation_prompt`),
`<|startoftranscript|><|{language}|><|{task}|><|notimestamps|>`, task `transcribe` or
`translate` (the translations route, served on Whisper only), after
`<|startofprev|>{prompt}` when the form has a prompt (vLLM writes `<|prev|>`, which is no
Whisper token; `<|startofprev|>` is the one Whisper was trained with). Without `language`
the route detects it as vLLM does: one greedy token after `<|startoftranscript|>`, only
language tokens allowed. verbose_json (Whisper with timestamp tokens only, as vLLM) puts
`<|0.00|>` in place of `<|notimestamps|>`. A long clip is cut at its extractor's window.

Voxtral (VoxtralTranscriber): vLLM's prompt (its `get_generation_prompt`), mistral_common's
TranscriptionRequest for the clip and the form's `language` (optional), which needs
tokenizer_mode "mistral" (engine/voxtral_inputs.py); a clip over 30 s is several encoder
windows, as in chat (not cut: vLLM neither).

Qwen2-Audio (NoTranscription): refused, as by vLLM (it has no transcription prompt).
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar

from loraplex.engine.audio import AudioProcessor
from loraplex.engine.phi4mm_inputs import Phi4MMProcessor
from loraplex.engine.qwen2_audio_inputs import Qwen2AudioProcessor
from loraplex.engine.voxtral_inputs import VoxtralAudioProcessor, transcription_ids
from loraplex.engine.whisper_inputs import WhisperAudioProcessor
from loraplex.entrypoints.audio_chunks import ChunkConfig
from loraplex.entrypoints.errors import BadRequestError
from loraplex.entrypoints.transcription_segments import FIRST_TIMESTAMP

# the models whose clips the route transcribes (its message to a model without audio)
SERVED_ON = "Granite Speech, Phi-4-multimodal, Whisper and Voxtral"
TRANSCRIBE = "can you transcribe the speech into a written format?"
LANGUAGE_TOKEN = re.compile(r"<\|[a-z]{2,3}\|>")  # Whisper's <|en|>, <|haw|>, ...

Clip = tuple[Any, int]  # (waveform, sample rate)
Prompt = tuple[str, list[int], Any]  # the prompt's text, its ids, the clip's inputs


class Transcriber:
    """One model's side of a transcription: its processor, the engine's tokenizer (its
    added tokens: Whisper's languages and timestamps) and the server's encoder-thread
    tokenizer (`encoder`, which prompts are encoded with)."""

    translates: ClassVar[bool] = False  # serves /v1/audio/translations

    def __init__(self, processor: Any, tokenizer: Any, encoder: Any) -> None:
        self.processor = processor
        self.tokenizer = tokenizer
        self.encoder = encoder

    def check(self, task: str, name: str) -> None:
        """BadRequestError unless the model serves `task` (transcribe, translate)."""
        if task == "translate" and not self.translates:
            raise BadRequestError(f"model {name!r}: translations are served on Whisper",
                                  param="model")

    def first_timestamp(self) -> int | None:
        """The `<|0.00|>` token's id (verbose_json's timestamps); None: none written."""
        return None

    def timestamps_refused(self, name: str) -> str | None:
        """Why verbose_json is not served on this model (None: it is)."""
        return (f"model {name!r} writes no timestamps (Whisper does; vLLM serves verbose_json "
                "on Whisper only)")

    def languages(self) -> dict[int, str] | None:
        """The language tokens' ids and codes a detection chooses among, for a form
        without `language`; None: the model detects none."""
        return None

    def language_prompt(self, clip: Clip) -> Prompt:
        """On the encoder thread: the prompt whose one greedy token, among `languages`, is
        the clip's language."""
        raise NotImplementedError

    def chunk_config(self) -> ChunkConfig | None:
        """How a long clip is cut (None: it is not): vLLM's defaults at the model's rate."""
        return ChunkConfig(rate=int(self.processor.rate))

    def encoder_tokens(self, seconds: float) -> int:
        """What the stream's usage.prompt_tokens counts beside the prompts' tokens."""
        return 0

    def prompt(self, clip: Clip, language: str | None, context: str, task: str,
               timestamps: bool) -> Prompt:
        """On the encoder thread: one chunk's prompt (`context`: the form's prompt)."""
        raise NotImplementedError

    def _process(self, ids: list[int], clip: Any) -> tuple[list[int], Any]:
        """The processor's placeholders expanded and the clip's inputs (400 on a bad clip)."""
        try:
            return self.processor(ids, clip)
        except ValueError as e:
            raise BadRequestError(f"file: {e}", param="file") from e


class ChatTranscriber(Transcriber):
    """Granite Speech's and Phi-4-multimodal's: the chat prompt vLLM's Granite Speech
    builds."""

    def prompt(self, clip: Clip, language: str | None, context: str, task: str,
               timestamps: bool) -> Prompt:
        placeholder = self.processor.placeholder_text("audio", self.tokenizer)
        message = {"role": "user", "content": placeholder + TRANSCRIBE}
        text = self.encoder.apply_chat_template([message], tokenize=False,
                                                add_generation_prompt=True)
        ids, inputs = self._process(list(self.encoder.encode(text)), [clip])
        return text, ids, inputs


class WhisperTranscriber(Transcriber):
    """Whisper's decoder prompt; translations, timestamps and language detection."""

    translates = True

    def first_timestamp(self) -> int | None:
        first = self.tokenizer.convert_tokens_to_ids(FIRST_TIMESTAMP)
        return None if first in (None, self.tokenizer.unk_token_id) else first

    def timestamps_refused(self, name: str) -> str | None:
        if self.first_timestamp() is None:
            return f"this Whisper tokenizer has no {FIRST_TIMESTAMP} timestamp tokens"
        return None

    def languages(self) -> dict[int, str]:
        languages = {i: t[2:-2] for t, i in self.tokenizer.get_added_vocab().items()
                     if LANGUAGE_TOKEN.fullmatch(t)}
        if not languages:
            raise BadRequestError("this Whisper tokenizer has no language tokens: give "
                                  "`language`", param="language")
        return languages

    def language_prompt(self, clip: Clip) -> Prompt:
        """`<|startoftranscript|>`, the clip's features."""
        text = "<|startoftranscript|>"
        ids, inputs = self._process(list(self.encoder.encode(text, add_special_tokens=False)),
                                    clip)
        return text, ids, inputs

    def chunk_config(self) -> ChunkConfig:
        """Its extractor's window, as vLLM's."""
        return ChunkConfig(rate=self.processor.rate,
                           max_audio_clip_s=int(self.processor.extractor.chunk_length))

    def encoder_tokens(self, seconds: float) -> int:
        """The clip's log-mel frames, as vLLM counts them (the prompt has no audio
        placeholders)."""
        return math.ceil(seconds * self.processor.rate / self.processor.extractor.hop_length)

    def prompt(self, clip: Clip, language: str | None, context: str, task: str,
               timestamps: bool) -> Prompt:
        """vLLM's decoder prompt (verbose_json: `<|0.00|>` for `<|notimestamps|>`), its ids
        (no special tokens added), the clip's features."""
        assert language is not None  # given, or detected by the route
        token = f"<|{language}|>"
        if self.tokenizer.convert_tokens_to_ids(token) in (None, self.tokenizer.unk_token_id):
            raise BadRequestError(f"language {language!r} is not one of Whisper's (no {token} "
                                  "token)", param="language")
        text = (f"<|startofprev|>{context}" if context else "") + \
            f"<|startoftranscript|>{token}<|{task}|>" + \
            (FIRST_TIMESTAMP if timestamps else "<|notimestamps|>")
        ids, inputs = self._process(list(self.encoder.encode(text, add_special_tokens=False)),
                                    clip)
        return text, ids, inputs


class VoxtralTranscriber(Transcriber):
    """Voxtral's: mistral_common's TranscriptionRequest; its clips are not cut."""

    def check(self, task: str, name: str) -> None:
        super().check(task, name)
        if not getattr(self.encoder, "is_mistral", False):
            raise BadRequestError(f"model {name!r} (Voxtral): transcriptions are "
                                  "mistral_common's TranscriptionRequest: serve it with "
                                  "--tokenizer-mode mistral", param="model")

    def chunk_config(self) -> None:
        return None

    def prompt(self, clip: Clip, language: str | None, context: str, task: str,
               timestamps: bool) -> Prompt:
        """mistral_common's transcription request for the clip, its text, the clip's
        features."""
        try:
            ids = transcription_ids(self.encoder, clip, self.processor.rate, language)
        except ValueError as e:
            raise BadRequestError(str(e), param="language") from e
        ids, inputs = self._process(ids, [clip])
        return self.encoder.decode(ids), ids, inputs


class NoTranscription(Transcriber):
    """Qwen2-Audio's: no transcription prompt (vLLM serves none), the chat route only."""

    def check(self, task: str, name: str) -> None:
        super().check(task, name)
        raise BadRequestError(f"model {name!r} (Qwen2-Audio) does not serve transcriptions "
                              "(vLLM neither): use the chat route with an input_audio part",
                              param="model")


# a model's transcriber by its processor's class (a subclass takes its base's entry unless
# it has its own: Whisper's, Qwen2-Audio's and Voxtral's processors are AudioProcessors)
TRANSCRIBERS: dict[type, type[Transcriber]] = {
    AudioProcessor: ChatTranscriber,  # Granite Speech (engine/audio.py)
    Phi4MMProcessor: ChatTranscriber,  # engine/phi4mm_inputs.py
    WhisperAudioProcessor: WhisperTranscriber,  # engine/whisper_inputs.py
    VoxtralAudioProcessor: VoxtralTranscriber,  # engine/voxtral_inputs.py
    Qwen2AudioProcessor: NoTranscription,  # engine/qwen2_audio_inputs.py
}


def transcriber(processor: Any, tokenizer: Any, encoder: Any) -> Transcriber | None:
    """The transcriber of a model whose processor takes audio; None: no entry for it."""
    kind = next((TRANSCRIBERS[k] for k in type(processor).__mro__ if k in TRANSCRIBERS), None)
    return None if kind is None else kind(processor, tokenizer, encoder)
