"""A Whisper request's audio and prompt.

The clip: resampled to the feature extractor's rate (engine/audio.py's `resample`), its
log-mel features made by HF's own WhisperFeatureExtractor (the checkpoint's
preprocessor_config.json) padded to the 30 s window as HF's WhisperProcessor pads them. One
clip per request; a clip longer than 30 s is refused (vLLM does not split it offline either: its
feature extractor truncates it to 30 s; the transcription routes cut long clips into
chunks first: entrypoints/audio_chunks.py). The features travel on a WhisperAudio (an
engine/images.py ImageInputs without placeholders: Whisper's decoder prompt has none), and
so do the decoder layers' cross-attention K/V once the model runner has run the encoder
(models/whisper.py): kept while the request runs, shared by its n sequences, dropped when
it is preempted (the recompute runs the encoder again) and freed with it; the model
runner counts them per running request in the memory budget.

The prompt, in vLLM's two forms: {"prompt": decoder text, "multi_modal_data": {"audio":
clip}} and the explicit {"encoder_prompt": {"prompt": "", "multi_modal_data": ...},
"decoder_prompt": text or {"prompt_token_ids": ...}}. The decoder text is tokenized
without the tokenizer's special tokens (as vLLM does for Whisper: its prefix tokens and
end-of-text would otherwise wrap the prompt); the prompt writes them
(`<|startoftranscript|><|en|><|transcribe|><|notimestamps|>`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from loraplex.engine.audio import (
    WhisperFeaturesProcessor,
    as_clips,
    resample,
    resampled_length,
    waveform,
)
from loraplex.engine.images import ImageInputs
from loraplex.models.whisper import CrossKV, WhisperConfig

USAGE = ("Whisper transcribes audio: give {'prompt': '<|startoftranscript|>...', "
         "'multi_modal_data': {'audio': (waveform, sample_rate)}} or {'encoder_prompt': "
         "{'prompt': '', 'multi_modal_data': {'audio': ...}}, 'decoder_prompt': '...'}")


@dataclass
class WhisperAudio(ImageInputs):
    """One request's clip: `pixel_values` its [n_mels, 3000] features, no placeholders."""

    cross_kv: CrossKV | None = None  # every decoder layer's K/V, from the first prefill

    def free_on_preempt(self) -> None:
        """The K/V go with the request's KV blocks: the memory budget counts them per
        running request (worker/model_runner.py), and the recompute runs the encoder
        again."""
        self.cross_kv = None

    def block_key(self, start: int, end: int) -> bytes:
        """Every decoder block's K/V depends on the audio (cross-attention): the clip's
        hash keys the prefix cache of all of them."""
        return self.hashes[0]


def decoder_prompt(prompt: Any, tokenizer: Any) -> dict[str, Any]:
    """Either form of a Whisper prompt as one dict: the decoder's text and ids (tokenized
    without special tokens) and the encoder's multi_modal_data."""
    if not isinstance(prompt, dict):
        raise ValueError(USAGE)
    if "encoder_prompt" in prompt or "decoder_prompt" in prompt:
        enc, dec = prompt.get("encoder_prompt"), prompt.get("decoder_prompt")
        if not isinstance(enc, dict) or enc.get("prompt") or enc.get("prompt_token_ids"):
            raise ValueError("encoder_prompt: Whisper's encoder takes the audio only "
                             "({'prompt': '', 'multi_modal_data': {'audio': ...}})")
        if isinstance(dec, str):
            dec = {"prompt": dec}
        if not isinstance(dec, dict) or not ({"prompt", "prompt_token_ids"} & dec.keys()):
            raise ValueError("decoder_prompt: a string, or a dict with 'prompt' or "
                             "'prompt_token_ids'")
        rest = {k: v for k, v in prompt.items() if k not in ("encoder_prompt", "decoder_prompt")}
        prompt = {**rest, **dec, "multi_modal_data": enc.get("multi_modal_data")}
    if "prompt_embeds" in prompt:
        raise ValueError("prompt_embeds: not supported for Whisper")
    data = prompt.get("multi_modal_data")
    if not isinstance(data, dict) or set(data) != {"audio"}:
        raise ValueError(USAGE)
    if "prompt_token_ids" in prompt:
        return prompt
    if not isinstance(prompt.get("prompt"), str):
        raise ValueError(USAGE)
    return {**prompt, "prompt_token_ids": tokenizer.encode(prompt["prompt"],
                                                           add_special_tokens=False)}


class WhisperAudioProcessor(WhisperFeaturesProcessor):
    """Whisper's features (an AudioProcessor: audio only); no placeholders, and its own
    prompt forms (request_prompt)."""

    def __init__(self, path: str, config: WhisperConfig) -> None:  # noqa: D107
        super().__init__(path, config, None)

    def request_prompt(self, prompt: Any, tokenizer: Any) -> dict[str, Any]:
        """Either vLLM form of a Whisper prompt as one dict (decoder_prompt)."""
        return decoder_prompt(prompt, tokenizer)

    def checked(self, data: Any) -> list[tuple[torch.Tensor, int, int]]:
        """The one clip, checked: (waveform, its rate, its samples once resampled)."""
        clips = as_clips(data)
        if len(clips) != 1:
            raise ValueError(f"multi_modal_data: Whisper takes one audio clip per request, "
                             f"got {len(clips)}")
        x = waveform(*clips[0], 0)
        rate = int(clips[0][1])
        n, limit = resampled_length(x.shape[0], rate, self.rate), self.extractor.n_samples
        if n > limit:
            raise ValueError(f"audio 0: {n / self.rate:.2f} s is longer than Whisper's "
                             f"{limit / self.rate:g} s window: split it")
        if n < 1:
            raise ValueError("audio 0: the clip holds no samples")
        return [(x, rate, n)]

    def features(self, data: Any) -> torch.Tensor:
        """[n_mels, 3000]: HF's input_features of the clip."""
        (x, rate, _), = self.checked(data)
        f = self.extractor(resample(x, rate, self.rate).numpy(), sampling_rate=self.rate,
                           return_tensors="np")
        return torch.from_numpy(np.asarray(f["input_features"][0], np.float32))

    def __call__(self, ids: list[int], data: Any) -> tuple[list[int], WhisperAudio]:
        features = self.features(data)
        digest = hashlib.blake2b(b"whisper" + features.numpy().tobytes(), digest_size=16)
        return ids, WhisperAudio(features, [], [], [digest.digest()])

    def expand(self, ids: list[int], data: Any) -> list[int]:
        self.checked(data)
        return ids

    def positions(self, ids: list[int]) -> list[int]:
        return []

    def check(self, ids: list[int], inputs: ImageInputs) -> None:
        """Processed inputs given with a prompt (the server's) must be one clip's."""
        c = self.config
        if not isinstance(inputs, WhisperAudio) \
                or tuple(inputs.pixel_values.shape) != (c.num_mel_bins, c.window_frames):
            raise ValueError("multi_modal_data: the processed audio inputs are not one "
                             "Whisper clip's features")
