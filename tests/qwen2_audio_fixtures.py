"""A tiny random Qwen2-Audio (Qwen2AudioForConditionalGeneration: Whisper's encoder at its
full 30 s window, the projector, a Qwen2 language model) written with transformers, with
its WhisperFeatureExtractor, PEFT adapters of two ranks on the language model, and HF's
model (+ PEFT) on HF's processor's input_features as the reference of
tests/test_qwen2_audio.py."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from tests.fixtures import _reinit_, make_tokenizer
from tests.granite_speech_fixtures import clip as speech_clip
from tests.multimodal_fixtures import LANGUAGE_MODEL, make_multimodal_adapter, with_peft

AUDIO = "<|AUDIO|>"
ASK = "<|audio_bos|><|AUDIO|><|audio_eos|>What is this sound?"
N_MELS = 16
RATE = 16000


def make_tiny_qwen2_audio(out: Path, seed: int) -> dict[str, Path]:
    """{"base": the checkpoint, "r8": an adapter on q / v / down, "r4": one on k / o / up,
    "tower": one on the language model and the encoder's fc1 (left out there)}."""
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2Config,
        WhisperFeatureExtractor,
    )

    base = out / "base"
    base.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(base)
    tok.add_special_tokens({"additional_special_tokens": [AUDIO, "<|audio_bos|>",
                                                          "<|audio_eos|>"]})
    text = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024, rms_norm_eps=1e-6, bos_token_id=1,
                       eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    audio = Qwen2AudioEncoderConfig(num_mel_bins=N_MELS, encoder_layers=2,
                                    encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
                                    max_source_positions=1500)
    cfg = Qwen2AudioConfig(audio_config=audio.to_dict(), text_config=text.to_dict(),
                           audio_token_index=tok.convert_tokens_to_ids(AUDIO))
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(cfg).eval()
    _reinit_(model, seed, 0.2)
    model.save_pretrained(str(base))
    tok.save_pretrained(str(base))
    WhisperFeatureExtractor(feature_size=N_MELS, sampling_rate=RATE).save_pretrained(str(base))
    return {"base": base,
            "r8": _adapter(base, out / "r8", 8, seed + 1, LANGUAGE_MODEL + "(q_proj|v_proj|"
                           "down_proj)"),
            "r4": _adapter(base, out / "r4", 4, seed + 2, LANGUAGE_MODEL + "(k_proj|o_proj|"
                           "up_proj)"),
            "tower": _adapter(base, out / "tower", 4, seed + 3,
                              r".*(language_model.*\.q_proj|audio_tower.*\.fc1)")}


def _adapter(base: Path, out: Path, r: int, seed: int, targets: str) -> Path:
    return make_multimodal_adapter(base, out, r, seed, targets, model=hf_model(str(base)))


def hf_model(base: str) -> torch.nn.Module:
    from transformers import Qwen2AudioForConditionalGeneration

    return Qwen2AudioForConditionalGeneration.from_pretrained(base, dtype=torch.float32).eval()


@functools.lru_cache(maxsize=8)
def hf_reference(base: str, adapter: str | None) -> torch.nn.Module:
    return with_peft(hf_model(base), adapter)


def clip(seed: int, seconds: float = 0.5, rate: int = RATE) -> tuple[np.ndarray, int]:
    """Granite Speech's test waveform (two tones and noise), half a second by default."""
    return speech_clip(seed, seconds, rate)


def hf_features(base: Path, waves: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """HF's Qwen2AudioProcessor's audio inputs: the extractor as the processor calls it
    (padding="max_length", the attention mask renamed feature_attention_mask)."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor.from_pretrained(str(base))
    f = fe(waves, sampling_rate=RATE, padding="max_length", return_attention_mask=True,
           return_tensors="pt")
    return {"input_features": f["input_features"],
            "feature_attention_mask": f["attention_mask"]}


@torch.no_grad()
def hf_logprobs(base: Path, adapter: Path | None, ids: list[int],
                waves: list[np.ndarray]) -> torch.Tensor:
    """[len(ids), vocab] log-softmax of HF's Qwen2-Audio over `ids` (placeholders expanded)
    with its clips (16 kHz waveforms) through HF's extractor."""
    model = hf_reference(str(base), None if adapter is None else str(adapter))
    kw = hf_features(base, waves) if waves else {}
    logits = model(input_ids=torch.tensor([ids]), **kw).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)
