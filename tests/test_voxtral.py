"""Voxtral (VoxtralForConditionalGeneration) with audio, against HF transformers' model
(+ PEFT) on the same weights, fp32, HF's VoxtralProcessor's input_features (each clip padded
to whole 30 s windows): the audio embeddings, greedy tokens HF's and logprobs within 1e-4
for a mixed batch (text and audio on the base and on adapters of two ranks, two clips in
one prompt, a clip over 30 s: two windows, an 8 kHz clip), LoRA on the encoder and
projector (enable_tower_connector_lora), bad inputs each failing alone; chat with an
audio part on the HF tokenizer (template) and on Mistral's (mistral_common encodes it), and
the server's chat and /v1/audio/transcriptions with the openai client."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
import torch

from loraplex import LoRARequest, SamplingParams
from tests.engine_utils import make_llm
from tests.multimodal_fixtures import at_16k, check_audio, wav_b64, wav_bytes
from tests.multimodal_fixtures import audio_prompt as audio
from tests.voxtral_fixtures import ASK, RATE, clip, hf_logprobs, make_tiny_voxtral

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)


@pytest.fixture(scope="module")
def vx(tiny_root: Path) -> dict[str, Path]:
    return make_tiny_voxtral(tiny_root / "voxtral", seed=70)


def check(outs, paths: dict[str, Path], jobs: list[tuple[str, list, str | None]]) -> None:
    check_audio(outs, paths, jobs, hf_logprobs)


@torch.no_grad()
def test_audio_embeddings_match_hf(vx):
    """The encoder + projector's rows for a short clip and one of 31 s (two windows, each
    its own encoder pass) are HF's get_audio_features' within 1e-5, and the features are
    HF's processor's."""
    from tests.voxtral_fixtures import hf_features, hf_reference

    llm = make_llm(vx["base"])
    engine = llm.llm_engine
    clips = [clip(6, seconds=0.5), clip(7, seconds=31.0)]
    token = llm.get_tokenizer().convert_tokens_to_ids("[AUDIO]")
    ids, inputs = engine.image_processor([1, token, 5, token], clips)
    assert inputs.sizes == [(1, 375), (2, 750)] and ids.count(token) == 1125
    want_features = hf_features(vx["base"], [c[0] for c in clips])
    torch.testing.assert_close(inputs.pixel_values.view(want_features.shape), want_features)
    got = engine.vision(inputs.pixel_values, inputs.sizes)
    ref = hf_reference(str(vx["base"]), None)
    if hasattr(ref, "model"):
        want = ref.model.get_audio_features(want_features).pooler_output
    else:  # transformers 4.x
        want = ref.get_audio_embeds(want_features)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_mixed_batch_matches_hf(vx):
    """One call: text on the base, audio on the base, on r8 and on r4, text on r4, two
    clips in one prompt, an 8 kHz clip (resampled); a 64-token budget splits every clip's
    375 rows over prefill chunks."""
    llm = make_llm(vx["base"], enable_lora=True, max_lora_rank=8, max_loras=2,
                   max_num_batched_tokens=64, max_num_seqs=8, max_model_len=1024)
    a, b, slow = clip(1), clip(2), clip(3, rate=8000)
    two = "[INST][BEGIN_AUDIO][AUDIO] then [BEGIN_AUDIO][AUDIO]?[/INST]"
    jobs = [("Hello there, how are you?", [], None), (ASK, [a], None), (ASK, [a], "r8"),
            (ASK, [b], "r4"), ("Hello there, how are you?", [], "r4"), (two, [a, b], "r8"),
            (ASK, [slow], None)]
    reqs = {n: LoRARequest(n, i + 1, str(vx[n])) for i, n in enumerate(("r8", "r4"))}
    outs = llm.generate([audio(p, c) for p, c, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[reqs.get(n) for *_, n in jobs])
    check(outs, vx, jobs)
    token = llm.get_tokenizer().convert_tokens_to_ids("[AUDIO]")
    assert [o.prompt_token_ids.count(token) for o in outs] == [0, 375, 375, 375, 0, 750, 375]
    cum = [o.outputs[0].cumulative_logprob for o in outs]
    assert abs(cum[1] - cum[2]) > 1e-2  # the adapter counts on audio rows


def test_clip_over_30_s_matches_hf(vx):
    """A 65 s clip: three windows, 1125 placeholders, HF's tokens and logprobs."""
    llm = make_llm(vx["base"], max_model_len=2048, max_num_batched_tokens=512)
    long_ = clip(9, seconds=65.0)
    outs = llm.generate([audio(ASK, [long_])], GREEDY, use_tqdm=False)
    token = llm.get_tokenizer().convert_tokens_to_ids("[AUDIO]")
    assert outs[0].prompt_token_ids.count(token) == 1125
    check(outs, vx, [(ASK, [long_], None)])


def test_tower_connector_lora_matches_hf_peft(vx):
    """An adapter on the language model's q_proj, the encoder's fc1 and the projector's
    linear_1, with enable_tower_connector_lora: HF + PEFT's tokens and logprobs, beside a
    base request in the same batch."""
    llm = make_llm(vx["base"], enable_lora=True, enable_tower_connector_lora=True,
                   max_lora_rank=8, max_model_len=1024)
    req = LoRARequest("tower", 1, str(vx["tower"]))
    a = clip(4)
    outs = llm.generate([audio(ASK, [a]), audio(ASK, [a])], GREEDY, use_tqdm=False,
                        lora_request=[req, None])
    check(outs, vx, [(ASK, [a], "tower"), (ASK, [a], None)])
    assert outs[0].outputs[0].cumulative_logprob != pytest.approx(
        outs[1].outputs[0].cumulative_logprob, abs=1e-3)


def test_bad_inputs_fail_alone(vx):
    llm = make_llm(vx["base"], max_model_len=1024)
    a = clip(1)
    bad = [({"audio": (np.zeros((2, 4000), np.float32), RATE)}, "must be 1-D"),
           ({"audio": (np.zeros(4000, np.int16), RATE)}, "must hold floats"),
           ({"audio": (np.zeros(0, np.float32), RATE)}, "is empty"),
           ({"audio": [a, a]}, "1 audio placeholder token.*for 2 audio"),
           ({"audio": (clip(2, seconds=70.0)[0], RATE)}, "1139 tokens, but max_model_len is 1024"),
           ({"image": [a]}, r"\['image'\] is not supported.*'audio'")]
    for data, message in bad:
        with pytest.raises(ValueError, match=message):
            llm.generate({"prompt": ASK, "multi_modal_data": data}, GREEDY, use_tqdm=False)
    tok = llm.get_tokenizer()
    ids, inputs = llm.llm_engine.image_processor(tok(ASK).input_ids, [a])
    with pytest.raises(ValueError, match="do not match the prompt's"):
        short = list(ids)
        short.remove(tok.convert_tokens_to_ids("[AUDIO]"))  # one placeholder fewer
        llm.generate({"prompt_token_ids": short, "multi_modal_data": {"audio": inputs}},
                     GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    check(llm.generate([audio(ASK, [a])], GREEDY, use_tqdm=False), vx, [(ASK, [a], None)])


def _audio_part(c: tuple[np.ndarray, int]) -> dict:
    return {"type": "input_audio", "input_audio": {"data": wav_b64(c), "format": "wav"}}


def test_chat_with_audio_hf_tokenizer(vx):
    """LLM.chat with an input_audio part on the HF tokenizer: the template's text holds
    `[BEGIN_AUDIO][AUDIO]` where the clip was, expanded to 375; HF's tokens and logprobs
    on the decoded clip."""
    from loraplex.engine.audio_decode import decode_audio

    llm = make_llm(vx["base"], max_model_len=1024)
    a = clip(5)
    conv = [{"role": "user", "content": [_audio_part(a), {"type": "text", "text": "Why?"}]}]
    out = llm.chat(conv, GREEDY, use_tqdm=False)
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "[BEGIN_AUDIO][AUDIO]\nWhy?"}],
                                   tokenize=False, add_generation_prompt=True)
    audio_id = tok.convert_tokens_to_ids("[AUDIO]")
    want = []
    for t in tok(text, add_special_tokens=False).input_ids:
        want.extend([t] * (375 if t == audio_id else 1))
    assert out[0].prompt_token_ids == want
    check(out, vx, [(text, [decode_audio(wav_bytes(a))], None)])


def test_chat_with_audio_mistral_tokenizer(vx):
    """tokenizer_mode="mistral": mistral_common encodes the chat's audio part itself
    (`[BEGIN_AUDIO]` + 375 `[AUDIO]` in its [INST] turn), an 8 kHz clip resampled first;
    HF's tokens and logprobs under an adapter, beside a text-only chat."""
    from loraplex.engine.audio_decode import decode_audio

    llm = make_llm(vx["mistral"], tokenizer_mode="mistral", max_model_len=1024,
                   enable_lora=True, max_lora_rank=8)
    a = clip(6, rate=8000)
    conv = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, _audio_part(a),
                                         {"type": "text", "text": "what is it?"}]}]
    text_only = [{"role": "user", "content": "Hello there"}]
    req = LoRARequest("r8", 1, str(vx["r8"]))
    outs = llm.chat([conv, text_only], GREEDY, use_tqdm=False, lora_request=req)
    ids = outs[0].prompt_token_ids
    assert ids[:2] == [1, 3]  # <s>[INST]
    assert ids.count(24) == 375 and ids[ids.index(24) - 1] == 25 and ids[-1] == 4
    check(outs, {**vx, "base": vx["mistral"]},
          [("", [decode_audio(wav_bytes(a))], "r8"), ("", [], "r8")])


def test_repo_in_both_formats(vx):
    """A repo with Mistral's params.json (its audio encoder block) and consolidated weights
    beside the HF files, as Voxtral's: all "auto" serves the HF files with Mistral's
    tokenizer (vLLM's rule for tekken.json)."""
    auto = make_llm(vx["mistral"], max_model_len=1024)
    assert getattr(auto.get_tokenizer(), "is_mistral", False)
    a = clip(8)
    conv = [{"role": "user", "content": [_audio_part(a), {"type": "text", "text": "Hi"}]}]
    out = auto.chat(conv, GREEDY, use_tqdm=False)
    assert out[0].prompt_token_ids.count(24) == 375
    from loraplex.engine.audio_decode import decode_audio

    check(out, {**vx, "base": vx["mistral"]}, [("", [decode_audio(wav_bytes(a))], None)])


def test_mistral_format_matches_hf(vx):
    """Mistral's format alone (params.json's whisper_model_args, consolidated.safetensors'
    mm_whisper_embeddings.*, no encoder positions stored: Whisper's sinusoids; no
    preprocessor_config.json), all "auto" as vLLM picks it: HF's tokens and logprobs for a
    chat with a clip over 30 s under an adapter beside a base text chat."""
    from loraplex.engine.audio_decode import decode_audio

    llm = make_llm(vx["mformat"], max_model_len=1024, enable_lora=True, max_lora_rank=8)
    assert llm.llm_engine.mistral_format.weights and llm.llm_engine.mistral_audio_rate
    a = clip(9, seconds=31.0)
    conv = [{"role": "user", "content": [_audio_part(a), {"type": "text", "text": "Hi"}]}]
    req = LoRARequest("r4", 1, str(vx["r4"]))
    outs = llm.chat([conv, [{"role": "user", "content": "Hello there"}]], GREEDY,
                    use_tqdm=False, lora_request=[req, None])
    assert outs[0].prompt_token_ids.count(24) == 750
    check(outs, {**vx, "base": vx["mistral"]},
          [("", [decode_audio(wav_bytes(a))], "r4"), ("", [], None)])


def test_server_chat_and_transcription(vx):
    """The server (tokenizer_mode mistral) through the openai client: a chat with an
    input_audio part and a transcription (with and without `language`, vLLM's
    TranscriptionRequest prompt; a 31 s clip as one request of two windows, not cut) are
    HF's greedy replies; a bad language, a file that is no
    audio and a chat part with bad base64 get a 400 alone; the server carries on."""
    import openai

    from loraplex.engine.audio_decode import decode_audio
    from loraplex.engine.mistral_tokenizer import MistralTokenizer
    from loraplex.engine.voxtral_inputs import transcription_ids
    from tests.server_utils import RemoteServer

    base = vx["mistral"]
    tok = MistralTokenizer.from_pretrained(str(base))
    a = clip(7)
    wav = wav_bytes(a)
    clip16 = decode_audio(wav)
    extra = {"ignore_eos": True}

    def greedy(ids: list[int], n: int = 6, audio: tuple | None = None) -> list[int]:
        out: list[int] = []
        for _ in range(n):
            out.append(int(hf_logprobs(base, None, ids + out,
                                       [at_16k(audio or clip16)])[-1].argmax()))
        return out

    def text(ids: list[int], audio: tuple | None = None) -> str:
        """HF's greedy reply as the server's text (an incomplete UTF-8 tail held back)."""
        return tok.decode(greedy(ids, audio=audio), skip_special_tokens=True).rstrip("\ufffd")

    args = ["--max-model-len", "1024", "--dtype", "float32", "--tokenizer-mode", "mistral"]
    with RemoteServer(base, args) as server:
        client = server.get_client()
        chat = client.chat.completions.create(
            model=str(base), max_tokens=6, temperature=0.0, logprobs=True,
            extra_body={**extra, "return_tokens_as_token_ids": True},
            messages=[{"role": "user", "content": [_audio_part(a),
                                                   {"type": "text", "text": "Say it"}]}])
        prompt = tok.encode_chat([{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(),
                                                    "format": "wav"}},
            {"type": "text", "text": "Say it"}]}])
        assert chat.usage.prompt_tokens == len(prompt)
        assert [int(c.token.split(":")[1]) for c in chat.choices[0].logprobs.content] \
            == greedy(prompt)
        extra_t = {"max_completion_tokens": 6, **extra}
        texts = []
        for language in ("en", None):
            kw = {"language": language} if language else {}
            got = client.audio.transcriptions.create(model=str(base), file=("a.wav", wav),
                                                     temperature=0.0, extra_body=extra_t, **kw)
            ids = transcription_ids(tok, clip16, RATE, language)
            assert ids.count(24) == 375 and ids[-1] == 34
            assert got.text == text(ids)
            texts.append(got.text)
        assert texts[0] != texts[1]  # `lang:en` counts
        long_wav = wav_bytes(clip(8, seconds=31.0))  # not cut into 30 s chunks (vLLM neither)
        long16 = decode_audio(long_wav)
        got = client.audio.transcriptions.create(model=str(base), file=("b.wav", long_wav),
                                                 temperature=0.0, extra_body=extra_t)
        ids = transcription_ids(tok, long16, RATE, None)
        assert ids.count(24) == 2 * 375
        assert got.text == text(ids, long16)
        for kw, message in (({"language": "zz"}, "language 'zz'"),
                            ({"file": ("a.wav", b"RIFF0000WAVEjunk")}, "cannot decode")):
            with pytest.raises(openai.BadRequestError, match=message):
                client.audio.transcriptions.create(**{"model": str(base),
                                                      "file": ("a.wav", wav), **kw})
        bad = {"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}}
        with pytest.raises(openai.BadRequestError, match="not valid base64"):
            client.chat.completions.create(model=str(base), max_tokens=2,
                                           messages=[{"role": "user", "content": [bad]}])
        again = client.audio.transcriptions.create(model=str(base), file=("a.wav", wav),
                                                   temperature=0.0, extra_body=extra_t)
        assert again.text == text(transcription_ids(tok, clip16, RATE, None))


def test_server_transcription_needs_mistral_tokenizer(vx):
    """On the HF tokenizer a transcription is refused (a 400 naming --tokenizer-mode
    mistral: mistral_common writes the prompt); a chat with audio is served after it."""
    import openai

    from tests.server_utils import RemoteServer

    a = clip(3)
    with RemoteServer(vx["base"], ["--max-model-len", "1024", "--dtype", "float32"]) as server:
        client = server.get_client()
        with pytest.raises(openai.BadRequestError, match="--tokenizer-mode mistral"):
            client.audio.transcriptions.create(model=str(vx["base"]), file=("a.wav", wav_bytes(a)))
        chat = client.chat.completions.create(
            model=str(vx["base"]), max_tokens=2, temperature=0.0,
            messages=[{"role": "user", "content": [_audio_part(a)]}])
        assert chat.usage.prompt_tokens > 375
