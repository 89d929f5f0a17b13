"""Granite Speech (GraniteSpeechForConditionalGeneration) with audio, against HF
transformers' model (+ PEFT) on the same weights and the same log-mel frames, fp32: the
frames themselves against transformers' numpy audio tools (no torchaudio here), the
placeholder count against HF's extractor's own rule; greedy tokens HF's and logprobs within
1e-4 for a mixed batch (text under the base, audio under default_mm_loras' built-in
adapter, audio under another adapter, text under an adapter), chunked prefill over the
audio rows, prefix caching keyed by the audio, limit_mm_per_prompt, and bad inputs each
failing alone; vLLM's seed example with AudioAsset read from the cache."""

from __future__ import annotations

import io
import json
import wave
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch

from loraplex import LoRARequest, SamplingParams
from loraplex.engine.audio import MelConfig, log_mel_frames, resample
from loraplex.engine.audio_decode import decode_audio
from tests.engine_utils import make_llm
from tests.fixtures import make_tiny_model
from tests.granite_speech_fixtures import (
    N_MELS,
    RATE,
    clip,
    hf_logprobs,
    make_tiny_granite_speech,
)
from tests.multimodal_fixtures import assert_matches_reference, wav_b64
from tests.multimodal_fixtures import audio_prompt as audio

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
ASK = "<|audio|>Transcribe this:"
MEL = MelConfig(n_mels=N_MELS)


@pytest.fixture(scope="module")
def speech(tiny_root: Path) -> dict[str, Path]:
    return make_tiny_granite_speech(tiny_root / "granite_speech", seed=40)


def frames(c: tuple[np.ndarray, int]) -> torch.Tensor:
    return log_mel_frames(resample(torch.from_numpy(c[0]), c[1], RATE), MEL)


def check(outs, paths: dict[str, Path], jobs: list[tuple[str, list, str | None]]) -> None:
    """Each output's tokens HF's greedy ones, logprobs HF's within 1e-4 (HF given the
    expanded prompt and the clips' frames, stacked: equal lengths here)."""
    for out, (_, clips, adapter) in zip(outs, jobs, strict=True):
        ids, got = out.prompt_token_ids, out.outputs[0].token_ids
        feats = [frames(c) for c in clips]
        ref = hf_logprobs(paths["plain"], paths[adapter] if adapter else None,
                          ids + got[:-1], feats)[len(ids) - 1:]
        assert_matches_reference(out, ref, adapter)


def test_features_match_transformers_numpy_audio_tools():
    """log-mel frames: transformers.audio_utils' STFT and HTK filterbank (float64 numpy)
    and the extractor's post-processing transcribed; the placeholder count: HF's
    extractor's own _get_num_audio_features."""
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function
    from transformers.models.granite_speech.feature_extraction_granite_speech import (
        GraniteSpeechFeatureExtractor,
    )

    for n in (4000, 4321, 16000):
        wave_, _ = clip(n, seconds=n / RATE)
        if n == 16000:  # half silence: the clamp to the maximum - 8 at work
            wave_[8000:] = 0
        fb = mel_filter_bank(num_frequency_bins=257, num_mel_filters=N_MELS, min_frequency=0.0,
                             max_frequency=RATE / 2, sampling_rate=RATE, norm=None,
                             mel_scale="htk")
        win = window_function(400, "hann", periodic=True, frame_length=512)
        mel = spectrogram(wave_.astype(np.float64), win, frame_length=512, hop_length=160,
                          fft_length=512, power=2.0, center=True, pad_mode="reflect",
                          mel_filters=fb)  # [n_mels, T]
        logmel = np.log10(np.clip(mel.T, 1e-10, None))
        logmel = np.maximum(logmel, logmel.max() - 8.0) / 4 + 1
        if logmel.shape[0] % 2:
            logmel = logmel[:-1]
        ref = logmel.reshape(-1, 2 * N_MELS)
        got = log_mel_frames(torch.from_numpy(wave_), MEL)
        assert got.shape == ref.shape
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-4)
        ns = SimpleNamespace(melspec_kwargs={"hop_length": 160}, projector_window_size=6,
                             projector_downsample_rate=3)
        want = GraniteSpeechFeatureExtractor._get_num_audio_features(ns, [n])[0]
        assert want == -(-got.shape[0] // 6) * 2


def test_resample_keeps_a_tone():
    """8 kHz and 44.1 kHz tones resampled to 16 kHz: the tone at the new instants (away
    from the edges), ceil(len * new / old) samples."""
    for rate in (8000, 44100, 48000):
        t = np.arange(rate // 2) / rate
        x = torch.from_numpy(np.sin(2 * np.pi * 440 * t).astype(np.float32))
        y = resample(x, rate, RATE)
        assert y.shape[0] == -(-x.shape[0] * RATE // rate)
        want = np.sin(2 * np.pi * 440 * np.arange(y.shape[0]) / RATE)
        np.testing.assert_allclose(y.numpy()[200:-200], want[200:-200], atol=2e-3)
    # a 12 kHz tone has no place at 16 kHz: the low-pass removes it (its window's stopband)
    x = torch.from_numpy(np.sin(2 * np.pi * 12000 * np.arange(24000) / 48000).astype(np.float32))
    assert resample(x, 48000, RATE)[200:-200].abs().max() < 3e-3


def test_mixed_batch_matches_hf(speech):
    """One call: text under the base, audio under default_mm_loras (the adapter inside the
    model dir), audio under an explicit r4, text under r4, two clips in one prompt, an 8 kHz
    clip (resampled); a 5-token budget splits every clip's rows over prefill chunks."""
    llm = make_llm(speech["base"], enable_lora=True, max_lora_rank=8, max_loras=2,
                   default_mm_loras={"audio": str(speech["base"])},
                   max_num_batched_tokens=5)
    a, b, slow = clip(1), clip(2), clip(3, rate=8000)
    two = "<|audio|> then <|audio|>: same speaker?"
    jobs = [("Hello there, how are you?", [], None), (ASK, [a], "r8"), (ASK, [a], "r4"),
            ("Hello there, how are you?", [], "r4"), (two, [a, b], "r8"), (ASK, [slow], "r8"),
            (ASK, [b], "r8")]
    r4 = LoRARequest("r4", 7, str(speech["r4"]))
    outs = llm.generate([audio(p, c) for p, c, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[r4 if n == "r4" else None for *_, n in jobs])
    check(outs, speech, jobs)
    token = llm.get_tokenizer().convert_tokens_to_ids("<|audio|>")
    # 0.25 s: 26 mel frames, 13 encoder frames, 3 windows of 6, 2 queries each
    assert [o.prompt_token_ids.count(token) for o in outs] == [0, 6, 6, 0, 12, 6, 6]
    cum = [o.outputs[0].cumulative_logprob for o in outs]
    assert abs(cum[1] - cum[6]) > 1e-2 and abs(cum[1] - cum[2]) > 1e-2  # audio, adapter count


def test_default_lora_only_with_audio(speech):
    """Without default_mm_loras an audio request runs on the base model (HF's base model,
    no adapter); test_mixed_batch_matches_hf covers it with default_mm_loras."""
    a = clip(1)
    llm = make_llm(speech["base"])
    check(llm.generate([audio(ASK, [a])], GREEDY, use_tqdm=False), speech, [(ASK, [a], None)])


def test_prefix_cache_keyed_by_the_audio(speech):
    """The same text with another clip shares only the blocks before the clip; the same
    clip again shares the whole prompt but its last block."""
    llm = make_llm(speech["base"], enable_prefix_caching=True, block_size=4)
    prompt = "Listen to this recording please: " + ASK
    a, b = clip(1), clip(2)
    runs = [llm.generate([audio(prompt, [c])], GREEDY, use_tqdm=False)[0] for c in (a, b, a)]
    check(runs, speech, [(prompt, [c], None) for c in (a, b, a)])
    ids = runs[0].prompt_token_ids
    first = ids.index(llm.get_tokenizer().convert_tokens_to_ids("<|audio|>"))
    assert runs[0].num_cached_tokens == 0
    assert runs[1].num_cached_tokens == first // 4 * 4 > 0
    assert runs[2].num_cached_tokens == (len(ids) - 1) // 4 * 4


def test_limit_mm_per_prompt(speech):
    """{"audio": 0}: served on text, the encoder never built, audio refused; {"audio": 1}:
    two clips refused."""
    text = make_llm(speech["base"], limit_mm_per_prompt={"audio": 0})
    assert text.llm_engine.vision is None
    check(text.generate(["Hello there"], GREEDY, use_tqdm=False), speech,
          [("Hello there", [], None)])
    with pytest.raises(ValueError, match="At most 0 audio"):
        text.generate(audio(ASK, [clip(1)]), GREEDY, use_tqdm=False)
    one = make_llm(speech["base"], limit_mm_per_prompt={"audio": 1})
    with pytest.raises(ValueError, match="At most 1 audio"):
        one.generate(audio(ASK + ASK, [clip(1), clip(2)]), GREEDY, use_tqdm=False)
    one.generate(audio(ASK, clip(1)), GREEDY, use_tqdm=False)  # one bare tuple: one clip


def test_bad_inputs_fail_alone(speech, tiny_root):
    llm = make_llm(speech["base"], max_model_len=64)
    a = clip(1)
    bad = [({"audio": (np.zeros((2, 4000), np.float32), RATE)}, "must be 1-D"),
           ({"audio": (np.zeros(4000, np.int16), RATE)}, "must hold floats"),
           ({"audio": (a[0], 0)}, "sample rate must be a positive int"),
           ({"audio": (a[0][:100], RATE)}, "too short"),
           ({"audio": [a[0]]}, r"\(waveform, sample_rate\) tuple"),
           ({"audio": [a, a]}, "1 audio placeholder token.*for 2 audio"),
           ({"image": [a]}, r"\['image'\] is not supported.*'audio'")]
    for data, message in bad:
        with pytest.raises(ValueError, match=message):
            llm.generate({"prompt": ASK, "multi_modal_data": data}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len|too long|longer"):
        llm.generate(audio(ASK, [clip(1, seconds=4.0)]), GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    check(llm.generate([audio(ASK, [a])], GREEDY, use_tqdm=False), speech, [(ASK, [a], None)])
    text = make_llm(make_tiny_model(tiny_root / "speech_text", "llama", seed=5))
    with pytest.raises(ValueError, match="no audio encoder"):
        text.generate(audio("Hi", [a]), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="default_mm_loras.*takes no audio"):
        make_llm(make_tiny_model(tiny_root / "speech_text", "llama", seed=5), enable_lora=True,
                 default_mm_loras={"audio": str(speech["r4"])})


def _wav(samples: np.ndarray, width: int, channels: int, rate: int) -> bytes:
    ints = np.round(samples * (2 ** (8 * width - 1) - 1)).astype("<i4")
    raw = ints.astype(f"<i{width}").tobytes() if width != 3 else \
        b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints.reshape(-1))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(raw)
    return buf.getvalue()


@pytest.mark.parametrize("width", [2, 3, 4])
def test_wav_decoding(width):
    """PCM 16/24/32-bit, stereo mixed down to the channels' mean."""
    rng = np.random.default_rng(width)
    stereo = rng.uniform(-0.9, 0.9, (300, 2))
    got, rate = decode_audio(_wav(stereo, width, 2, 22050))
    assert rate == 22050 and got.dtype == np.float32
    np.testing.assert_allclose(got, stereo.mean(1), atol=2 * 2.0 ** (1 - 8 * width) + 1e-7)
    with pytest.raises(ValueError, match="cannot decode"):
        decode_audio(b"RIFF\x00\x00\x00\x00WAVEjunk")


def _ogg(path: Path, seconds: float = 0.5) -> np.ndarray:
    """An Opus-in-Ogg file (48 kHz, as vLLM's assets are Ogg) written with PyAV."""
    av = pytest.importorskip("av")
    rate = 48000
    x = (0.4 * np.sin(2 * np.pi * 330 * np.arange(int(seconds * rate)) / rate))
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="ogg") as c:
        s = c.add_stream("libopus", rate=rate)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray((x * 32767).astype(np.int16)[None], format="s16",
                                           layout="mono")
        frame.sample_rate = rate
        for p in [*s.encode(frame), *s.encode(None)]:
            c.mux(p)
    return x


def test_seed_example(speech, tmp_path, monkeypatch):
    """The seed document's default_mm_loras example with only vllm -> loraplex (the model
    id pointed at the tiny checkpoint, the asset put in the cache first: no network)."""
    monkeypatch.setenv("LORAPLEX_ASSETS_CACHE", str(tmp_path / "assets"))
    _ogg(tmp_path / "assets" / "multimodal_asset" / "mary_had_lamb.ogg")
    from loraplex import LLM, SamplingParams
    from loraplex.assets.audio import AudioAsset

    llm = LLM(model=str(speech["base"]), enable_lora=True, max_lora_rank=64,
              default_mm_loras={"audio": str(speech["base"])}, max_model_len=256,
              cpu_kv_cache_gib=0.05)
    audio_, rate = AudioAsset("mary_had_lamb").audio_and_sample_rate
    assert rate == 48000 and audio_.ndim == 1 and abs(len(audio_) - 24000) < 2000
    assert AudioAsset("mary_had_lamb").url == (
        "https://vllm-public-assets.s3.us-west-2.amazonaws.com/multimodal_asset/"
        "mary_had_lamb.ogg")
    outputs = llm.generate({"prompt": "<|audio|>Transcribe this:",
                            "multi_modal_data": {"audio": (audio_, rate)}},
                           sampling_params=SamplingParams(temperature=0.2, max_tokens=64))
    assert len(outputs[0].outputs[0].token_ids) > 0
    encoder_frames = (-(-len(audio_) * RATE // rate) // 160 + 1) // 2
    assert outputs[0].prompt_token_ids.count(
        llm.get_tokenizer().convert_tokens_to_ids("<|audio|>")) == -(-encoder_frames // 6) * 2


def _chat_reference(paths, text_ids: list[int], c, adapter: str | None, n: int) -> list[int]:
    """HF's greedy reply to `text_ids` (its one `<|audio|>` expanded to 6) with clip `c`
    decoded from its 16-bit WAV."""
    from tests.multimodal_fixtures import greedy_reference

    decoded = decode_audio(_wav(c[0].astype(np.float64), 2, 1, c[1]))
    token = 512
    ids = [t for x in text_ids for t in ([x] * 6 if x == token else [x])]
    return greedy_reference(lambda reply: hf_logprobs(
        paths["plain"], paths[adapter] if adapter else None, ids + reply,
        [frames(decoded)]), n)


def test_chat_with_audio_parts(speech):
    """LLM.chat: an input_audio part (base64 WAV) and an audio_url part (a data URL) become
    `<|audio|>` placeholders in the template's text, the clips the request's; the
    default_mm_loras adapter applies."""
    llm = make_llm(speech["base"], enable_lora=True, max_lora_rank=8,
                   default_mm_loras={"audio": str(speech["base"])})
    a = clip(1)
    for part in ({"type": "input_audio", "input_audio": {"data": wav_b64(a), "format": "wav"}},
                 {"type": "audio_url",
                  "audio_url": {"url": "data:audio/wav;base64," + wav_b64(a)}}):
        conv = [{"role": "user", "content": [part, {"type": "text", "text": "Transcribe"}]}]
        out = llm.chat(conv, GREEDY, use_tqdm=False)[0]
        text = llm.get_tokenizer()("<|user|><|audio|>\nTranscribe\n<|assistant|>",
                                   add_special_tokens=False).input_ids
        assert out.outputs[0].token_ids == _chat_reference(speech, text, a, "r8", 6)


def _refused(client, model: str, content: list, message: str) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, max_tokens=4, messages=[
            {"role": "user", "content": content}])
    assert info.value.status_code == 400
    assert __import__("re").search(message, info.value.message), info.value.message


def test_server_chat_with_input_audio(speech, tiny_root):
    """The chat route: a WAV input_audio part under default_mm_loras (HF + PEFT's greedy
    reply); a malformed clip and an audio part to a text-only model get a 400 alone."""
    from tests.multimodal_fixtures import chat_token_ids
    from tests.server_utils import RemoteServer

    a = clip(1)
    content = [{"type": "input_audio", "input_audio": {"data": wav_b64(a), "format": "wav"}},
               {"type": "text", "text": "Transcribe"}]
    base = str(speech["base"])
    args = ["--max-model-len", "256", "--dtype", "float32", "--enable-lora",
            "--max-lora-rank", "8", "--default-mm-loras", json.dumps({"audio": base})]
    with RemoteServer(speech["base"], args) as server:
        client = server.get_client()
        got = chat_token_ids(client, base, content)
        from transformers import AutoTokenizer

        text = AutoTokenizer.from_pretrained(base)(
            "<|user|><|audio|>\nTranscribe\n<|assistant|>", add_special_tokens=False).input_ids
        assert got == _chat_reference(speech, text, a, "r8", len(got))
        _refused(client, base, [{"type": "input_audio", "input_audio": {
            "data": "UklGRgAAAABXQVZFanVuaw==", "format": "wav"}}], "cannot decode")
        _refused(client, base, [{"type": "input_audio", "input_audio": {"data": "@@"}}],
                 "not valid base64")
        _refused(client, base, [{"type": "image_url", "image_url": {"url": "data:x"}}],
                 "image inputs are not supported")
        assert len(chat_token_ids(client, base, content)) == GREEDY.max_tokens  # still serving
    text_model = make_tiny_model(tiny_root / "speech_server_text", "llama", seed=6)
    with RemoteServer(text_model, ["--max-model-len", "128", "--dtype", "float32",
                                   "--served-model-name", "plain"]) as server:
        client = server.get_client()
        _refused(client, "plain", content, "audio inputs are not supported by model 'plain'")
        assert len(chat_token_ids(client, "plain", content[1:])) == GREEDY.max_tokens


def test_server_transcriptions(speech, tiny_root):
    """/v1/audio/transcriptions (the openai client's multipart form): vLLM's Granite Speech
    prompt, the reply HF + PEFT's greedy one under default_mm_loras (json and text); a bad
    form field, verbose_json (no timestamp tokens), an undecodable file and a model without
    audio get a 400 alone."""
    import openai
    from transformers import AutoTokenizer

    from tests.server_utils import RemoteServer

    a = clip(1)
    wav = _wav(a[0].astype(np.float64), 2, 1, a[1])
    base = str(speech["base"])
    tok = AutoTokenizer.from_pretrained(base)
    text = tok.apply_chat_template([{"role": "user", "content": "<|audio|>can you transcribe "
                                     "the speech into a written format?"}], tokenize=False,
                                   add_generation_prompt=True)
    # (a byte-level token left incomplete at the end is held back by the detokenizer)
    want = tok.decode(_chat_reference(speech, tok.encode(text), a, "r8", 5),
                      skip_special_tokens=True).rstrip("\ufffd")
    args = ["--max-model-len", "256", "--dtype", "float32", "--enable-lora",
            "--max-lora-rank", "8", "--default-mm-loras", json.dumps({"audio": base})]
    with RemoteServer(speech["base"], args) as server:
        client = server.get_client()
        extra = {"max_completion_tokens": 5}
        got = client.audio.transcriptions.create(model=base, file=("a.wav", wav),
                                                 temperature=0.0, extra_body=extra)
        assert got.text == want
        plain = client.audio.transcriptions.create(model=base, file=("a.wav", wav),
                                                   response_format="text", extra_body=extra)
        assert plain.strip() == want.strip()
        for kw, message in (({"response_format": "srt"}, "response_format 'srt'"),
                            ({"response_format": "verbose_json",
                              "timestamp_granularities": ["segment"]}, "writes no timestamps"),
                            ({"file": ("a.wav", b"RIFF0000WAVEjunk")}, "cannot decode")):
            with pytest.raises(openai.BadRequestError, match=message):
                client.audio.transcriptions.create(**{"model": base, "file": ("a.wav", wav),
                                                      **kw})
        for body, message in ((b'{"model": "x"}', "multipart/form-data"),
                              (None, "needs a `file` field")):
            r = (server.post("/v1/audio/transcriptions", body) if body else httpx.post(
                server.url_for("/v1/audio/transcriptions"), data={"model": base},
                files={"notes": ("a.txt", b"no audio")}))
            assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
        assert client.audio.transcriptions.create(model=base, file=("a.wav", wav),
                                                  extra_body=extra).text == want
    text_model = make_tiny_model(tiny_root / "speech_server_text", "llama", seed=6)
    with RemoteServer(text_model, ["--max-model-len", "128", "--dtype", "float32",
                                   "--served-model-name", "plain"]) as server, \
            pytest.raises(openai.BadRequestError, match="takes no audio"):
        server.get_client().audio.transcriptions.create(model="plain", file=("a.wav", wav))


@pytest.mark.parametrize("rate", [16000, 8000, 22050, 44100])
def test_placeholder_count_without_features(speech, rate):
    """expand() (the chat route's and /tokenize's count) counts each clip's placeholders
    from its length alone; they must be the ones the features give (__call__)."""
    from transformers import AutoConfig

    from loraplex.engine.audio import AudioProcessor
    from loraplex.models.granite_speech import GraniteSpeechAudioConfig

    config = GraniteSpeechAudioConfig.from_hf(AutoConfig.from_pretrained(speech["plain"]))
    processor = AudioProcessor(str(speech["plain"]), config)
    ids = [7, processor.placeholder, 9]
    gen = np.random.default_rng(rate)
    for n in [rate // 31, rate // 10 + 1, rate // 4 - 1, rate // 2, rate + 3, 2 * rate + 159]:
        clips = [(gen.standard_normal(n).astype(np.float32) * 0.1, rate)]
        assert processor.expand(ids, clips) == processor(ids, clips)[0], n
