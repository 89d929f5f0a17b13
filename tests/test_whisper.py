"""Whisper (WhisperForConditionalGeneration), an encoder-decoder, against HF transformers'
model (+ PEFT) on the same weights, fp32, HF's WhisperFeatureExtractor's input_features:
features and encoder output; greedy tokens HF's and logprobs within 1e-4 for a mixed batch
(the base and adapters of two ranks, one on the decoder, one on the encoder and the
cross-attention; both of vLLM's prompt forms; an 8 kHz clip), chunked prefill, preemption,
an abort mid-request; bad inputs each failing alone; the transcription and translation
routes over a real server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from loraplex import LoRARequest, SamplingParams
from tests.engine_utils import make_llm
from tests.multimodal_fixtures import assert_matches_reference, at_16k, wav_bytes
from tests.whisper_fixtures import (
    RATE,
    SOT,
    clip,
    hf_features,
    hf_greedy_reply,
    hf_logprobs,
    hf_reference,
    make_tiny_whisper,
)

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)


@pytest.fixture(scope="module")
def whisper(tiny_root: Path) -> dict[str, Path]:
    return make_tiny_whisper(tiny_root / "whisper", seed=70)


def whisper_llm(base: Path, **kw):
    kw.setdefault("max_model_len", 64)  # the decoder's max_target_positions
    return make_llm(base, **kw)


def plain(c: tuple[np.ndarray, int], decoder: str = SOT) -> dict:
    return {"prompt": decoder, "multi_modal_data": {"audio": c}}


def explicit(c: tuple[np.ndarray, int], decoder: str = SOT) -> dict:
    return {"encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": c}},
            "decoder_prompt": decoder}


def check(outs, paths: dict[str, Path], jobs: list[tuple[tuple, str | None]]) -> None:
    for out, (c, adapter) in zip(outs, jobs, strict=True):
        ids, got = out.prompt_token_ids, out.outputs[0].token_ids
        ref = hf_logprobs(paths["base"], paths[adapter] if adapter else None,
                          ids + got[:-1], at_16k(c))[len(ids) - 1:]
        assert_matches_reference(out, ref, adapter)


def test_features_and_encoder_match_hf(whisper):
    llm = whisper_llm(whisper["base"])
    engine = llm.llm_engine
    c = clip(1, seconds=2.0)
    _, audio = engine.image_processor([], c)
    want = hf_features(whisper["base"], c[0])[0]
    assert torch.equal(audio.pixel_values, want)
    model = engine.model
    with torch.no_grad():
        hf_out = hf_reference(str(whisper["base"]), None).model.encoder(want[None])
        kv = model.encode(audio.pixel_values, -1)
        hf_layer = hf_reference(str(whisper["base"]), None).model.decoder.layers[1]
        want_k = hf_layer.encoder_attn.k_proj(hf_out.last_hidden_state[0])
    assert len(kv) == 2
    k = kv[1][0].transpose(0, 1).reshape(1500, -1)
    torch.testing.assert_close(k, want_k, atol=1e-4, rtol=1e-4)


def test_prompt_tokens_without_special_tokens(whisper):
    """The decoder prompt is the text's tokens alone (no BOS / EOS around it), both
    forms."""
    llm = whisper_llm(whisper["base"])
    tok = llm.get_tokenizer()
    outs = llm.generate([plain(clip(1)), explicit(clip(1))],
                        SamplingParams(max_tokens=1), use_tqdm=False)
    want = tok.encode(SOT, add_special_tokens=False)
    assert [o.prompt_token_ids for o in outs] == [want, want]
    assert want[0] == tok.convert_tokens_to_ids("<|startoftranscript|>")


def test_mixed_batch_matches_hf(whisper):
    """One call: the base, r8 (decoder) and r4 (encoder + cross-attention) on different
    clips, both prompt forms, an 8 kHz clip, a 2 s one; a 3-token budget chunks the
    decoder prompts, so prefill chunks and decodes share steps."""
    llm = whisper_llm(whisper["base"], enable_lora=True, max_lora_rank=8, max_loras=2,
                   max_num_batched_tokens=3)
    a, b, slow = clip(1), clip(2, seconds=2.0), clip(3, rate=8000)
    jobs = [(a, None), (a, "r8"), (a, "r4"), (b, "r4"), (slow, "r8"), (b, None)]
    loras = {"r8": LoRARequest("r8", 1, str(whisper["r8"])),
             "r4": LoRARequest("r4", 2, str(whisper["r4"]))}
    prompts = [(plain if i % 2 else explicit)(c) for i, (c, _) in enumerate(jobs)]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False,
                        lora_request=[loras.get(n) for _, n in jobs])
    check(outs, whisper, jobs)
    cum = [o.outputs[0].cumulative_logprob for o in outs]
    assert len({round(x, 3) for x in cum[:3]}) == 3  # each adapter changes the output
    assert llm.llm_engine.model_runner.num_mixed_steps > 0


def test_preemption_recomputes_the_decoder(whisper):
    """A KV cache of 6 blocks of 4 tokens for 3 requests of 4 + 8 tokens: some are
    preempted and recomputed; every output is still HF's."""
    llm = whisper_llm(whisper["base"], num_gpu_blocks_override=6, block_size=4,
                   max_model_len=24)
    jobs = [(clip(i), None) for i in (1, 2, 3)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    outs = llm.generate([plain(c) for c, _ in jobs], params, use_tqdm=False)
    check(outs, whisper, jobs)
    assert llm.llm_engine.scheduler.num_preemptions > 0


def test_encoder_states_come_out_of_the_budget(whisper):
    """Each running request's encoder K/V are reserved from the KV budget: max_num_seqs
    drops to the requests that fit with a full decoder cache each, the blocks get the
    rest; more requests than that queue and still give HF's tokens; a preempted request
    drops its K/V and runs the encoder again; a budget for none is refused."""
    budget_gib = 0.012
    llm = whisper_llm(whisper["base"], cpu_kv_cache_gib=budget_gib, block_size=16)
    engine = llm.llm_engine
    runner = engine.model_runner
    cross = engine.model.config.cross_kv_bytes(torch.float32)
    block = runner._bytes_per_block()
    budget = int(budget_gib * 2**30)
    fit = (budget - 4 * block) // cross  # beside one max_model_len (64: 4 blocks of 16)
    assert 1 < fit < 256
    assert runner.max_num_seqs == engine.config.scheduler_config.max_num_seqs == fit
    assert runner.num_blocks == min((budget - fit * cross) // block, fit * 4)
    encoded = []
    encode = engine.model.encode
    engine.model.encode = lambda *a: encoded.append(1) or encode(*a)
    jobs = [(clip(i), None) for i in range(1, fit + 3)]
    outs = llm.generate([plain(c) for c, _ in jobs], GREEDY, use_tqdm=False)
    check(outs, whisper, jobs)
    assert len(encoded) == len(jobs)
    with pytest.raises(ValueError, match="cannot hold one sequence: Whisper's encoder K/V"):
        whisper_llm(whisper["base"], cpu_kv_cache_gib=cross / 2**31)


def test_preempted_request_runs_its_encoder_again(whisper):
    llm = whisper_llm(whisper["base"], num_gpu_blocks_override=6, block_size=4,
                      max_model_len=24)
    engine = llm.llm_engine
    encoded = []
    encode = engine.model.encode
    engine.model.encode = lambda *a: encoded.append(1) or encode(*a)
    jobs = [(clip(i), None) for i in (1, 2, 3)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    outs = llm.generate([plain(c) for c, _ in jobs], params, use_tqdm=False)
    check(outs, whisper, jobs)
    assert len(encoded) == len(jobs) + engine.scheduler.num_preemptions > len(jobs)


def test_abort_mid_request(whisper):
    llm = whisper_llm(whisper["base"])
    engine = llm.llm_engine
    engine.add_request("a", plain(clip(1)), GREEDY)
    engine.add_request("b", plain(clip(2)), GREEDY)
    engine.step()
    engine.step()
    engine.abort_request("a")
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert set(done) == {"b"}
    check([done["b"]], whisper, [(clip(2), None)])


def test_bad_inputs_fail_alone(whisper):
    llm = whisper_llm(whisper["base"])
    engine = llm.llm_engine
    long = clip(4, seconds=30.5)
    bad = {"too long": plain(long),
           "two clips": {"prompt": SOT, "multi_modal_data": {"audio": [clip(1), clip(2)]}},
           "no audio": SOT,
           "no audio dict": {"prompt": SOT},
           "text to the encoder": {"encoder_prompt": {"prompt": "hi", "multi_modal_data":
                                                      {"audio": clip(1)}},
                                   "decoder_prompt": SOT},
           "NaN": plain((np.full(800, np.nan, np.float32), RATE)),
           "int samples": plain((np.zeros(800, np.int16), RATE))}
    messages = {}
    for name, prompt in bad.items():
        with pytest.raises(ValueError) as e:
            engine.add_request(name, prompt, GREEDY)
        messages[name] = str(e.value)
    assert "30 s window" in messages["too long"]
    assert "one audio clip" in messages["two clips"]
    assert "Whisper transcribes audio" in messages["no audio"]
    assert "encoder_prompt" in messages["text to the encoder"]
    assert not engine.has_unfinished_requests()
    out = llm.generate([plain(clip(1))], GREEDY, use_tqdm=False)
    check(out, whisper, [(clip(1), None)])


def test_speculative_decoding_and_pooling_refused(whisper):
    with pytest.raises(ValueError, match="speculative decoding is not supported for Whisper"):
        whisper_llm(whisper["base"], speculative_config={"method": "ngram",
                                                      "num_speculative_tokens": 2,
                                                      "prompt_lookup_max": 2})
    with pytest.raises(ValueError, match="Whisper runs as a generate model"):
        whisper_llm(whisper["base"], runner="pooling")


def test_prefix_cache_keyed_by_the_audio(whisper):
    """The same decoder prompt with another clip shares no block (every block's K/V
    depends on the audio); the same clip again shares the whole prompt but its last
    block."""
    llm = whisper_llm(whisper["base"], enable_prefix_caching=True, block_size=4)
    prompt = "<|startofprev|> Hello there, how are you?" + SOT
    a, b = clip(1), clip(2)
    runs = [llm.generate([plain(c, prompt)], GREEDY, use_tqdm=False)[0] for c in (a, b, a)]
    check(runs, whisper, [(c, None) for c in (a, b, a)])
    n = len(runs[0].prompt_token_ids)
    assert n > 8
    assert [r.num_cached_tokens for r in runs] == [0, 0, (n - 1) // 4 * 4]


def _greedy_text(paths, adapter: str | None, prompt: str, wav: bytes, n: int) -> str:
    """HF (+ PEFT)'s greedy reply to the decoder prompt `prompt` with the clip decoded from
    `wav`, at most n tokens, eos ending it, as text."""
    from transformers import AutoTokenizer

    from loraplex.engine.audio_decode import decode_audio

    tok = AutoTokenizer.from_pretrained(str(paths["base"]))
    out = hf_greedy_reply(paths, adapter, prompt, at_16k(decode_audio(wav)), n)
    return tok.decode(out, skip_special_tokens=True).rstrip("\ufffd")


def _hf_language(paths, adapter: str | None, wav: bytes) -> str:
    """HF (+ PEFT)'s language token after <|startoftranscript|>, among <|en|> and <|fr|>."""
    from transformers import AutoTokenizer

    from loraplex.engine.audio_decode import decode_audio

    tok = AutoTokenizer.from_pretrained(str(paths["base"]))
    ids = {lang: tok.convert_tokens_to_ids(f"<|{lang}|>") for lang in ("en", "fr")}
    lp = hf_logprobs(paths["base"], paths[adapter] if adapter else None,
                     tok.encode("<|startoftranscript|>", add_special_tokens=False),
                     at_16k(decode_audio(wav)))[-1]
    return max(ids, key=lambda lang: lp[ids[lang]])


def _task_prompt(language: str, task: str) -> str:
    return f"<|startoftranscript|><|{language}|><|{task}|><|notimestamps|>"


def test_server_transcriptions_and_translations(whisper):
    """/v1/audio/transcriptions and /v1/audio/translations through the openai client: the
    reply HF (+ PEFT)'s greedy one on vLLM's Whisper decoder prompt (language, prompt,
    task; without a language, the one HF's decoder picks first among the language tokens),
    an adapter by `model`, json and text; verbose_json (this tokenizer has no timestamp
    tokens), an unknown language, a bad response_format and an undecodable file get a 400
    alone (clips over 30 s: tests/test_transcription_long.py)."""
    import openai

    from tests.server_utils import RemoteServer

    wav = wav_bytes(clip(2, seconds=1.0))
    base = str(whisper["base"])
    args = ["--max-model-len", "64", "--dtype", "float32", "--enable-lora",
            "--max-lora-rank", "8", "--lora-modules", f"r4={whisper['r4']}"]
    extra = {"max_completion_tokens": 5}
    with RemoteServer(whisper["base"], args) as server:
        client = server.get_client()
        got = client.audio.transcriptions.create(model=base, file=("a.wav", wav),
                                                 temperature=0.0, extra_body=extra)
        lang = _hf_language(whisper, None, wav)
        assert got.text == _greedy_text(whisper, None, _task_prompt(lang, "transcribe"), wav, 5)
        fr = client.audio.transcriptions.create(
            model="r4", file=("a.wav", wav), language="fr", prompt=" Hello there",
            response_format="text", extra_body=extra)
        want = _greedy_text(whisper, "r4", "<|startofprev|> Hello there<|startoftranscript|>"
                            "<|fr|><|transcribe|><|notimestamps|>", wav, 5)
        assert fr.strip() == want.strip() and want != got.text
        tr = client.audio.translations.create(model="r4", file=("a.wav", wav),
                                              extra_body=extra)
        lang = _hf_language(whisper, "r4", wav)
        assert tr.text == _greedy_text(whisper, "r4", _task_prompt(lang, "translate"), wav, 5)
        # the task token counts
        assert tr.text != _greedy_text(whisper, "r4", _task_prompt(lang, "transcribe"), wav, 5)
        en = client.audio.transcriptions.create(model=base, file=("a.wav", wav),
                                                language="en", extra_body=extra)
        assert en.text == _greedy_text(whisper, None, SOT, wav, 5)
        for kw, message in (({"response_format": "verbose_json"}, "no <|0.00|> timestamp"),
                            ({"language": "xx"}, "language 'xx'"),
                            ({"response_format": "srt"}, "response_format 'srt'"),
                            ({"file": ("a.wav", b"RIFF0000WAVEjunk")}, "cannot decode")):
            with pytest.raises(openai.BadRequestError, match=message):
                client.audio.transcriptions.create(**{"model": base, "file": ("a.wav", wav),
                                                      **kw})
        with pytest.raises(openai.NotFoundError):
            client.audio.translations.create(model="nope", file=("a.wav", wav))
        assert client.audio.transcriptions.create(model=base, file=("a.wav", wav),
                                                  extra_body=extra).text == got.text


def test_chat_audio_refused(whisper):
    """Whisper has no chat prompt: an audio part in a chat is refused."""
    llm = whisper_llm(whisper["base"])
    part = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    with pytest.raises(ValueError, match="audio inputs are not supported"):
        llm.chat([{"role": "user", "content": [part]}], GREEDY, use_tqdm=False,
                 chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")


def test_siblings_and_default_mm_lora(whisper):
    """n=2 siblings share one clip and its encoder states; default_mm_loras={"audio": r8} applies to the
    explicit form too (its audio is the encoder prompt's)."""
    llm = whisper_llm(whisper["base"], enable_lora=True, max_lora_rank=8,
                      default_mm_loras={"audio": str(whisper["r8"])})
    engine = llm.llm_engine
    params = SamplingParams(n=2, temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=2)
    engine.add_request("a", explicit(clip(2)), params)
    seqs = engine.requests["a"].seqs
    for _ in range(100):  # (the adapter loads on a worker thread first)
        if seqs[0].num_computed_tokens:
            break
        engine.step()
    assert seqs[0].images is seqs[1].images and seqs[0].images.cross_kv is not None
    while engine.has_unfinished_requests():
        outs = [o for o in engine.step() if o.finished]
    out = outs[0]
    assert len(out.outputs) == 2 and out.outputs[0].token_ids == out.outputs[1].token_ids
    ids, got = out.prompt_token_ids, out.outputs[1].token_ids
    ref = hf_logprobs(whisper["base"], whisper["r8"], ids + got[:-1], at_16k(clip(2)))
    for step, lps in enumerate(out.outputs[1].logprobs):
        for t, lp in lps.items():
            assert abs(lp.logprob - ref[len(ids) - 1 + step, t].item()) < 1e-4
