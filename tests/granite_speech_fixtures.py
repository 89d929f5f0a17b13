"""A tiny random Granite Speech (GraniteSpeechForConditionalGeneration: conformer encoder,
Q-Former projector, Granite with its multipliers) written with transformers, its own LoRA
adapter saved inside the model dir as the hub's checkpoint ships it, other adapters beside,
and HF's model (+ PEFT) on the same log-mel frames as the reference of
tests/test_granite_speech.py."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers

from tests.fixtures import _reinit_, make_tokenizer
from tests.multimodal_fixtures import with_peft

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5

AUDIO_TOKEN = "<|audio|>"
N_MELS = 16
RATE = 16000


def make_tiny_granite_speech(out: Path, seed: int) -> dict[str, Path]:
    """{"plain": the checkpoint alone (HF's reference loads it), "base": the same with its
    own adapter (r8 on q / v) inside, "r4": another adapter (k / o / down), "r8": the
    built-in one as a directory of its own}. Weights drawn with std 0.2, the batch norm's
    running statistics random too."""
    from transformers import (
        Blip2QFormerConfig,
        GraniteConfig,
        GraniteSpeechConfig,
        GraniteSpeechEncoderConfig,
        GraniteSpeechForConditionalGeneration,
    )

    plain = out / "plain"
    plain.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(plain)
    tok.add_special_tokens({"additional_special_tokens": [AUDIO_TOKEN]})
    text = GraniteConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1,
                         eos_token_id=2, pad_token_id=3, embedding_multiplier=2.0,
                         residual_multiplier=0.5, attention_multiplier=0.2,
                         logits_scaling=1.5, tie_word_embeddings=True)
    encoder = GraniteSpeechEncoderConfig(input_dim=2 * N_MELS, num_layers=3, hidden_dim=32,
                                         feedforward_mult=2, num_heads=2, dim_head=16,
                                         output_dim=12, context_size=8, max_pos_emb=16,
                                         conv_kernel_size=5, conv_expansion_factor=2)
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, cross_attention_frequency=1,
                                 encoder_hidden_size=32)
    cfg = GraniteSpeechConfig(text_config=text.to_dict(), encoder_config=encoder.to_dict(),
                              projector_config=qformer.to_dict(),
                              audio_token_index=tok.convert_tokens_to_ids(AUDIO_TOKEN),
                              window_size=6, downsample_rate=3, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = GraniteSpeechForConditionalGeneration(cfg).eval()
    _reinit_(model, seed, 0.2)
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    model.save_pretrained(str(plain))
    tok.save_pretrained(str(plain))
    (plain / "preprocessor_config.json").write_text(json.dumps({
        "feature_extractor_type": "GraniteSpeechFeatureExtractor",
        "processor_class": "GraniteSpeechProcessor", "sampling_rate": RATE,
        "melspec_kwargs": {"sample_rate": RATE, "n_fft": 512, "win_length": 400,
                           "hop_length": 160, "n_mels": N_MELS},
        "projector_window_size": 6, "projector_downsample_rate": 3}))
    r8 = _adapter(plain, out / "r8", 8, seed + 1, r"(q_proj|v_proj)")
    r4 = _adapter(plain, out / "r4", 4, seed + 2, r"(k_proj|o_proj|down_proj)")
    base = Path(shutil.copytree(plain, out / "base"))
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(r8 / f, base / f)
    return {"plain": plain, "base": base, "r8": r8, "r4": r4}


def _adapter(plain: Path, out: Path, r: int, seed: int, leaves: str) -> Path:
    """A PEFT adapter on the language model's `leaves` (a regex), A and B random."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(hf_model(str(plain)), LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=r".*language_model.*\." + leaves,
        lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(out))
    return out


def hf_model(plain: str) -> torch.nn.Module:
    from transformers import GraniteSpeechForConditionalGeneration

    return GraniteSpeechForConditionalGeneration.from_pretrained(
        plain, dtype=torch.float32).eval()


@functools.lru_cache(maxsize=8)
def hf_reference(plain: str, adapter: str | None) -> torch.nn.Module:
    return with_peft(hf_model(plain), adapter)


def clip(seed: int, seconds: float = 0.25, rate: int = RATE) -> tuple[np.ndarray, int]:
    """A waveform: two tones and noise, in [-1, 1] (vLLM's (audio, sample_rate) form)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f1, f2 = 200 + 700 * rng.random(), 1000 + 3000 * rng.random()
    wave = 0.5 * np.sin(2 * np.pi * f1 * t) + 0.3 * np.sin(2 * np.pi * f2 * t)
    return (wave + 0.05 * rng.standard_normal(t.shape)).astype(np.float32), rate


@torch.no_grad()
def hf_logprobs(plain: Path, adapter: Path | None, ids: list[int],
                frames: list[torch.Tensor]) -> torch.Tensor:
    """[len(ids), vocab] log-softmax of HF's Granite Speech over `ids` (placeholders
    expanded) with its clips' frames, stacked (HF pads a batch of clips and its encoder has
    no mask: the clips of one prompt here have equal lengths)."""
    model = hf_reference(str(plain), None if adapter is None else str(adapter))
    kw = {}
    if frames:
        kw["input_features"] = torch.stack(frames)
    logits = model(input_ids=torch.tensor([ids]), **kw).logits[0]
    if TRANSFORMERS_5:  # 5.x's own lm_head leaves out Granite's logits_scaling, which 4.x's
        # GraniteForCausalLM language model and vLLM apply (the checkpoints' behaviour)
        logits = logits / model.config.text_config.logits_scaling
    return torch.log_softmax(logits.float(), dim=-1)
