"""A tiny random Whisper (WhisperForConditionalGeneration: its full 30 s encoder window, a
short decoder) written with transformers, with its WhisperFeatureExtractor, a tokenizer
holding Whisper's control tokens, PEFT adapters of two ranks (one on the decoder, one on
the encoder and the cross-attention), and HF's model (+ PEFT) on HF's extractor's
input_features as the reference of tests/test_whisper.py."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from tests.fixtures import _reinit_, make_tokenizer
from tests.granite_speech_fixtures import clip as speech_clip
from tests.multimodal_fixtures import make_multimodal_adapter, with_peft

N_MELS = 16
RATE = 16000
CONTROL = ["<|startoftranscript|>", "<|en|>", "<|fr|>", "<|transcribe|>", "<|translate|>",
           "<|notimestamps|>", "<|startofprev|>"]
SOT = "<|startoftranscript|><|en|><|transcribe|><|notimestamps|>"


def make_tiny_whisper(out: Path, seed: int, timestamps: bool = False) -> dict[str, Path]:
    """{"base": the checkpoint, "r8": an adapter on the decoder's q / v (self- and
    cross-attention) and fc1, "r4": one on the encoder's q / v / fc2 and the
    cross-attention's k / out}. `timestamps`: HF's WhisperTokenizer with Whisper's 1501
    timestamp tokens (`timestamp_tokenizer`)."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    base = out / "base"
    base.mkdir(parents=True, exist_ok=True)
    if timestamps:
        tok = timestamp_tokenizer()
    else:
        tok = make_tokenizer(base)
        tok.add_special_tokens({"additional_special_tokens": CONTROL})
    cfg = WhisperConfig(vocab_size=len(tok), num_mel_bins=N_MELS, d_model=32,
                        encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                        decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64,
                        max_source_positions=1500, max_target_positions=64,
                        decoder_start_token_id=tok.convert_tokens_to_ids(CONTROL[0]),
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.bos_token_id, begin_suppress_tokens=None,
                        suppress_tokens=None)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg).eval()
    # weights wide and biases small: with the tied output projection, smaller weights
    # leave every greedy reply one repeated token whatever the audio and the prompt
    _reinit_(model, seed, 0.5)
    with torch.no_grad():
        from transformers.models.whisper.modeling_whisper import sinusoids

        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.mul_(0.2)
        model.model.encoder.embed_positions.weight.copy_(sinusoids(1500, 32))  # HF's table
        if timestamps:  # (tied to the output projection) so greedy replies mix timestamps
            first = tok.convert_tokens_to_ids("<|0.00|>")  # and text rather than all one
            model.model.decoder.embed_tokens.weight[first:] *= 0.7
    model.save_pretrained(str(base))
    tok.save_pretrained(str(base))
    WhisperFeatureExtractor(feature_size=N_MELS, sampling_rate=RATE).save_pretrained(str(base))
    return {"base": base,
            "r8": _adapter(base, out / "r8", 8, seed + 1,
                           r".*decoder\.layers.*\.(q_proj|v_proj|fc1)"),
            "r4": _adapter(base, out / "r4", 4, seed + 2,
                           r".*encoder\.layers.*\.(q_proj|v_proj|fc2)|.*encoder_attn\."
                           r"(k_proj|out_proj)")}


def timestamp_tokenizer():
    """HF's WhisperTokenizer over the session's BPE: `<|endoftext|>` (bos / eos / unk),
    the control tokens with `<|notimestamps|>` last, then `<|0.00|>` ... `<|30.00|>` as
    Whisper orders them (HF finds the timestamps past the last special token)."""
    import json
    import tempfile

    import transformers
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer

    from tests.fixtures import _trained_tokenizer

    bpe = json.loads(_trained_tokenizer().to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in bpe["merges"]]
    if int(transformers.__version__.split(".")[0]) >= 5:
        tok = WhisperTokenizer(vocab=bpe["vocab"], merges=merges)
    else:  # transformers 4.x reads them from files only
        files = Path(tempfile.mkdtemp(prefix="whisper-bpe-"))
        (files / "vocab.json").write_text(json.dumps(bpe["vocab"]))
        (files / "merges.txt").write_text("#version: 0.2\n"
                                          + "".join(f"{a} {b}\n" for a, b in merges))
        tok = WhisperTokenizer(str(files / "vocab.json"), str(files / "merges.txt"))
    control = [t for t in CONTROL if t != "<|notimestamps|>"] + ["<|notimestamps|>"]
    tok.add_special_tokens({"additional_special_tokens": control})
    tok.add_tokens([AddedToken(f"<|{i * 0.02:.2f}|>", special=False, normalized=False)
                    for i in range(1501)])
    return tok


def _adapter(base: Path, out: Path, r: int, seed: int, targets: str) -> Path:
    return make_multimodal_adapter(base, out, r, seed, targets, model=hf_model(str(base)))


def hf_model(base: str) -> torch.nn.Module:
    from transformers import WhisperForConditionalGeneration

    return WhisperForConditionalGeneration.from_pretrained(base, dtype=torch.float32).eval()


@functools.lru_cache(maxsize=8)
def hf_reference(base: str, adapter: str | None) -> torch.nn.Module:
    return with_peft(hf_model(base), adapter)


def hf_greedy_reply(paths: dict[str, Path], adapter: str | None, prompt: str, x: np.ndarray, n: int) -> list[int]:
    """HF (+ PEFT)'s greedy reply tokens to the decoder prompt with the 16 kHz clip, at
    most n, eos ending it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(paths["base"]))
    ids = tok.encode(prompt, add_special_tokens=False)
    out: list[int] = []
    for _ in range(n):
        t = int(hf_logprobs(paths["base"], paths[adapter] if adapter else None, ids + out,
                            x)[-1].argmax())
        out.append(t)
        if t == tok.eos_token_id:
            break
    return out


def clip(seed: int, seconds: float = 0.5, rate: int = RATE) -> tuple[np.ndarray, int]:
    """Granite Speech's test waveform (two tones and noise), half a second by default."""
    return speech_clip(seed, seconds, rate)


def hf_features(base: Path, wave: np.ndarray) -> torch.Tensor:
    """HF's input_features [1, n_mels, 3000] of a 16 kHz waveform (WhisperProcessor's
    call: the extractor's defaults, padded to 30 s)."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor.from_pretrained(str(base))
    return fe(wave, sampling_rate=RATE, return_tensors="pt")["input_features"]


@torch.no_grad()
def hf_logprobs(base: Path, adapter: Path | None, ids: list[int],
                wave: np.ndarray) -> torch.Tensor:
    """[len(ids), vocab] log-softmax of HF's Whisper decoder over `ids` with the clip (a
    16 kHz waveform) through HF's extractor and encoder."""
    model = hf_reference(str(base), None if adapter is None else str(adapter))
    logits = model(input_features=hf_features(base, wave),
                   decoder_input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)
