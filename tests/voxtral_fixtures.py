"""A tiny random Voxtral (VoxtralForConditionalGeneration: Whisper's encoder at its full
30 s window, the stacking projector, a Llama language model) written with transformers, with
its WhisperFeatureExtractor, PEFT adapters of two ranks on the language model and one on
the encoder / projector, and HF's model (+ PEFT) on HF's VoxtralProcessor's
input_features as the reference of tests/test_voxtral.py."""

from __future__ import annotations

import base64
import functools
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tests.fixtures import _CORPUS, TOKENIZER_VOCAB_SIZE, _reinit_, make_tokenizer
from tests.granite_speech_fixtures import clip as speech_clip
from tests.mistral_fixtures import _PATTERN, _SPECIAL, _bpe_merges
from tests.multimodal_fixtures import LANGUAGE_MODEL, make_multimodal_adapter, with_peft

AUDIO = "[AUDIO]"
BEGIN_AUDIO = "[BEGIN_AUDIO]"
ASK = "[INST][BEGIN_AUDIO][AUDIO]What is this sound?[/INST]"
N_MELS = 16
RATE = 16000


def make_tiny_voxtral(out: Path, seed: int) -> dict[str, Path]:
    """{"base": the checkpoint, "r8": an adapter on q / v / down, "r4": one on k / o / up,
    "tower": one on the encoder's fc1 and the projector's linear_1 (and q_proj)}."""
    from transformers import (
        LlamaConfig,
        VoxtralConfig,
        VoxtralEncoderConfig,
        VoxtralForConditionalGeneration,
        WhisperFeatureExtractor,
    )

    base = out / "base"
    base.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(base)
    tok.add_special_tokens({"additional_special_tokens": [AUDIO, BEGIN_AUDIO, "[INST]",
                                                          "[/INST]"]})
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3,
                       tie_word_embeddings=False)
    audio = VoxtralEncoderConfig(num_mel_bins=N_MELS, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, hidden_size=16,
                                 max_source_positions=1500)
    cfg = VoxtralConfig(audio_config=audio.to_dict(), text_config=text.to_dict(),
                        audio_token_id=tok.convert_tokens_to_ids(AUDIO))
    torch.manual_seed(seed)
    model = VoxtralForConditionalGeneration(cfg).eval()
    _reinit_(model, seed, 0.2)
    with torch.no_grad():  # Whisper's sinusoids, as every Voxtral checkpoint has them
        from transformers.models.whisper.modeling_whisper import sinusoids

        # (transformers 5 keeps the towers under .model, 4.x on the model itself)
        table = getattr(model, "model", model).audio_tower.embed_positions.weight
        table.copy_(sinusoids(*table.shape))
    model.save_pretrained(str(base))
    tok.save_pretrained(str(base))
    WhisperFeatureExtractor(feature_size=N_MELS, sampling_rate=RATE).save_pretrained(str(base))
    mistral = _mistral_tokenizer_copy(base, out / "mistral")
    return {"base": base, "mistral": mistral,
            "mformat": _mistral_format(mistral, out / "mformat"),
            "r8": _adapter(base, out / "r8", 8, seed + 1, LANGUAGE_MODEL + "(q_proj|v_proj|"
                           "down_proj)"),
            "r4": _adapter(base, out / "r4", 4, seed + 2, LANGUAGE_MODEL + "(k_proj|o_proj|"
                           "up_proj)"),
            "tower": _adapter(base, out / "tower", 4, seed + 3,
                              r".*(language_model.*\.q_proj|audio_tower.*\.fc1|"
                              r"multi_modal_projector\.linear_1)")}


# Voxtral's tekken.json control tokens where its ids are (mistral_common finds them by name)
_VOXTRAL_SPECIAL = {24: AUDIO, 25: BEGIN_AUDIO, 34: "[TRANSCRIBE]"}
NUM_SPECIAL = 40


def _mistral_tokenizer_copy(base: Path, out: Path) -> Path:
    """The same weights with Voxtral's own tokenizer: tekken.json (v7, an `audio` block as
    Voxtral's: 16 kHz, 12.5 tokens a second, 30 s chunks; [AUDIO] = 24) and the config's
    audio_token_id 24, for tokenizer_mode="mistral"."""
    from safetensors.torch import load_file

    out.mkdir(parents=True, exist_ok=True)
    for name in ("preprocessor_config.json", "generation_config.json"):
        if (base / name).exists():
            (out / name).write_bytes((base / name).read_bytes())
    # the vocabulary cut to tekken's ids (the HF tokenizer's added ones are past them)
    tensors = load_file(str(base / "model.safetensors"))
    for name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        tensors[name] = tensors[name][:TOKENIZER_VOCAB_SIZE].clone()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config["text_config"]["vocab_size"] = TOKENIZER_VOCAB_SIZE
    (out / "config.json").write_text(json.dumps({**config, "audio_token_id": 24}))
    pieces = [bytes([i]) for i in range(256)]
    pieces += _bpe_merges(_CORPUS, TOKENIZER_VOCAB_SIZE - NUM_SPECIAL - 256)
    vocab = [{"rank": i, "token_bytes": base64.b64encode(p).decode(),
              "token_str": p.decode("utf-8", errors="replace")} for i, p in enumerate(pieces)]
    names = [_VOXTRAL_SPECIAL.get(i, _SPECIAL[i] if i < 20 else f"<SPECIAL_{i}>")
             for i in range(NUM_SPECIAL)]
    data = {"config": {"pattern": _PATTERN, "num_vocab_tokens": len(vocab),
                       "default_vocab_size": NUM_SPECIAL + len(vocab),
                       "default_num_special_tokens": NUM_SPECIAL, "version": "v7"},
            "vocab": vocab, "version": 1, "type": "Tekken",
            "special_tokens": [{"rank": i, "token_str": t, "is_control": True}
                               for i, t in enumerate(names)],
            "audio": {"sampling_rate": RATE, "frame_rate": 12.5, "chunk_length_s": 30.0,
                      "audio_encoding_config": {"num_mel_bins": N_MELS, "hop_length": 160,
                                                "window_size": 400}}}
    (out / "tekken.json").write_text(json.dumps(data))
    # Voxtral's repos ship Mistral's format beside the HF files: a params.json with the
    # audio encoder's block, and consolidated weights (a stand-in here: never read)
    params = {"dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 128, "n_heads": 4,
              "n_kv_heads": 2, "vocab_size": config["text_config"]["vocab_size"],
              "norm_eps": 1e-5, "multimodal": {"whisper_model_args": {
                  "encoder_args": {"dim": 16, "n_layers": 2}, "downsample_args": {
                      "downsample_factor": 4}}}}
    (out / "params.json").write_text(json.dumps(params))
    save_file({"tok_embeddings.weight": torch.zeros(2, 2)},
              str(out / "consolidated.safetensors"))
    return out


# HF's names as saved (the hub's layout) -> consolidated.safetensors' (the inverse of
# transformers' conversion)
_TO_MISTRAL = (
    (r"language_model\.model\.embed_tokens\.", "mm_whisper_embeddings.tok_embeddings."),
    (r"language_model\.model\.norm\.", "norm."),
    (r"language_model\.lm_head\.", "output."),
    (r"language_model\.model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.", r"layers.\1.attention.w\2."),
    (r"language_model\.model\.layers\.(\d+)\.mlp\.gate_proj\.", r"layers.\1.feed_forward.w1."),
    (r"language_model\.model\.layers\.(\d+)\.mlp\.down_proj\.", r"layers.\1.feed_forward.w2."),
    (r"language_model\.model\.layers\.(\d+)\.mlp\.up_proj\.", r"layers.\1.feed_forward.w3."),
    (r"language_model\.model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.attention_norm."),
    (r"language_model\.model\.layers\.(\d+)\.post_attention_layernorm\.",
     r"layers.\1.ffn_norm."),
    (r"audio_tower\.conv([12])\.", None),
    (r"audio_tower\.layer_norm\.", "mm_whisper_embeddings.whisper_encoder.transformer.norm."),
    (r"audio_tower\.layers\.(\d+)\.self_attn\.([qkv])_proj\.",
     r"mm_whisper_embeddings.whisper_encoder.transformer.layers.\1.attention.w\2."),
    (r"audio_tower\.layers\.(\d+)\.self_attn\.out_proj\.",
     r"mm_whisper_embeddings.whisper_encoder.transformer.layers.\1.attention.wo."),
    (r"audio_tower\.layers\.(\d+)\.self_attn_layer_norm\.",
     r"mm_whisper_embeddings.whisper_encoder.transformer.layers.\1.attention_norm."),
    (r"audio_tower\.layers\.(\d+)\.fc([12])\.",
     r"mm_whisper_embeddings.whisper_encoder.transformer.layers.\1.feed_forward.w\2."),
    (r"audio_tower\.layers\.(\d+)\.final_layer_norm\.",
     r"mm_whisper_embeddings.whisper_encoder.transformer.layers.\1.ffn_norm."),
    (r"multi_modal_projector\.linear_([12])\.", None),
)


def _mistral_name(name: str) -> str | None:
    import re

    for pattern, new in _TO_MISTRAL:
        if (m := re.match(pattern, name)) is None:
            continue
        if new is None and "conv" in pattern:
            new = f"mm_whisper_embeddings.whisper_encoder.conv_layers.{int(m[1]) - 1}."
        elif new is None:
            new = f"mm_whisper_embeddings.audio_language_projection.{2 * int(m[1]) - 2}."
        return m.expand(new) + name[m.end():]
    return None  # the encoder's positions: not stored


def _mistral_format(hf_dir: Path, out: Path) -> Path:
    """The checkpoint in Mistral's format alone (params.json as Voxtral's, with its
    `multimodal.whisper_model_args`; consolidated.safetensors under Mistral's names, the
    language model's q / k rows interleaved; no encoder positions; tekken.json; no
    config.json or preprocessor_config.json)."""
    from safetensors.torch import load_file

    from tests.mistral_fixtures import to_interleaved

    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((hf_dir / "config.json").read_text())
    text, audio = config["text_config"], config["audio_config"]
    tensors = {}
    for name, t in load_file(str(hf_dir / "model.safetensors")).items():
        new = _mistral_name(name)
        if new is None:
            assert name.endswith("embed_positions.weight"), name
            continue
        if new.startswith("layers.") and new.split(".")[-2] in ("wq", "wk"):
            heads = text["num_attention_heads"] if ".wq." in new else text["num_key_value_heads"]
            t = to_interleaved(t, heads)
        tensors[new] = t.contiguous()
    save_file(tensors, str(out / "consolidated.safetensors"))
    params = {"dim": text["hidden_size"], "n_layers": text["num_hidden_layers"],
              "head_dim": text["head_dim"], "hidden_dim": text["intermediate_size"],
              "n_heads": text["num_attention_heads"], "n_kv_heads": text["num_key_value_heads"],
              "rope_theta": 10000.0, "norm_eps": text["rms_norm_eps"],
              "vocab_size": text["vocab_size"], "max_position_embeddings": 2048,
              "tied_embeddings": False,
              "multimodal": {"whisper_model_args": {
                  "encoder_args": {"audio_encoding_args": {
                      "sampling_rate": RATE, "frame_rate": 12.5, "num_mel_bins": N_MELS,
                      "hop_length": 160, "window_size": 400, "chunk_length_s": 30.0},
                      "dim": audio["hidden_size"], "n_layers": audio["num_hidden_layers"],
                      "head_dim": audio["hidden_size"] // audio["num_attention_heads"],
                      "hidden_dim": audio["intermediate_size"],
                      "n_heads": audio["num_attention_heads"], "vocab_size": 51866,
                      "max_source_positions": audio["max_source_positions"]},
                  "downsample_args": {"downsample_factor": 4}}}}
    (out / "params.json").write_text(json.dumps(params))
    (out / "tekken.json").write_bytes((hf_dir / "tekken.json").read_bytes())
    return out


def _adapter(base: Path, out: Path, r: int, seed: int, targets: str) -> Path:
    return make_multimodal_adapter(base, out, r, seed, targets, model=hf_model(str(base)))


def hf_model(base: str) -> torch.nn.Module:
    from transformers import VoxtralForConditionalGeneration

    return VoxtralForConditionalGeneration.from_pretrained(base, dtype=torch.float32).eval()


@functools.lru_cache(maxsize=8)
def hf_reference(base: str, adapter: str | None) -> torch.nn.Module:
    return with_peft(hf_model(base), adapter)


def clip(seed: int, seconds: float = 0.5, rate: int = RATE) -> tuple[np.ndarray, int]:
    """Granite Speech's test waveform (two tones and noise), half a second by default."""
    return speech_clip(seed, seconds, rate)


def hf_features(base: Path, waves: list[np.ndarray]) -> torch.Tensor:
    """HF's VoxtralProcessor's input_features: each clip padded to a multiple of 30 s, its
    log-mel features cut into 3000-frame windows, all windows stacked."""
    from types import SimpleNamespace

    from transformers import VoxtralProcessor, WhisperFeatureExtractor

    # its method reads only the feature extractor (no tokenizer: the mistral copy has
    # tekken.json alone)
    proc = SimpleNamespace(feature_extractor=WhisperFeatureExtractor.from_pretrained(str(base)))
    retrieve = getattr(VoxtralProcessor, "_retrieve_input_features", None) or \
        VoxtralProcessor._retreive_input_features  # (transformers 4.x's spelling)
    return retrieve(
        proc, waves, 3000, sampling_rate=RATE, padding=True, truncation=False,
        pad_to_multiple_of=480000, return_tensors="pt")


@torch.no_grad()
def hf_logprobs(base: Path, adapter: Path | None, ids: list[int],
                waves: list[np.ndarray]) -> torch.Tensor:
    """[len(ids), vocab] log-softmax of HF's Voxtral over `ids` (placeholders expanded)
    with its clips (16 kHz waveforms) through HF's processor's features."""
    model = hf_reference(str(base), None if adapter is None else str(adapter))
    kw = {"input_features": hf_features(base, waves)} if waves else {}
    logits = model(input_ids=torch.tensor([ids]), **kw).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)
