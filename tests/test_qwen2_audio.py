"""Qwen2-Audio (Qwen2AudioForConditionalGeneration) with audio, against HF transformers'
model (+ PEFT) on the same weights, fp32, HF's WhisperFeatureExtractor's input_features and
feature_attention_mask as Qwen2AudioProcessor makes them: the expanded prompt
Qwen2AudioProcessor's, greedy tokens HF's and logprobs within 1e-4 for a mixed batch (text
and audio on the base and on adapters of two ranks, two clips in one prompt, an 8 kHz
clip), chunked prefill over the audio rows, prefix caching keyed by the audio, LoRA on the
audio tower left out, bad inputs each failing alone; the chat route over a real server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from loraplex import LoRARequest, SamplingParams
from tests.engine_utils import make_llm
from tests.multimodal_fixtures import at_16k, check_audio, wav_b64, wav_bytes
from tests.multimodal_fixtures import audio_prompt as audio
from tests.qwen2_audio_fixtures import (
    ASK,
    RATE,
    clip,
    hf_logprobs,
    make_tiny_qwen2_audio,
)

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)


@pytest.fixture(scope="module")
def qa(tiny_root: Path) -> dict[str, Path]:
    return make_tiny_qwen2_audio(tiny_root / "qwen2_audio", seed=50)


def check(outs, paths: dict[str, Path], jobs: list[tuple[str, list, str | None]]) -> None:
    check_audio(outs, paths, jobs, hf_logprobs)


def hf_processor_ids(base: Path, prompt: str, clips: list, bos: bool = True) -> list[int]:
    """Qwen2AudioProcessor's input_ids for `prompt` and its clips (the `<|AUDIO|>`
    expansion); `bos`: the tokenizer's special tokens added (a chat prompt has none)."""
    from transformers import AutoTokenizer, Qwen2AudioProcessor, WhisperFeatureExtractor

    proc = Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor.from_pretrained(
        str(base)), tokenizer=AutoTokenizer.from_pretrained(str(base)))
    out = proc(text=[prompt], audio=[at_16k(c) for c in clips], sampling_rate=RATE,
               add_special_tokens=bos)
    return list(out["input_ids"][0])


def test_mixed_batch_matches_hf(qa):
    """One call: text on the base, audio on the base, on r8 and on r4, text on r4, two clips
    in one prompt, an 8 kHz clip (resampled), a 1 s clip; a 5-token budget splits every
    clip's rows over prefill chunks. The prompts are Qwen2AudioProcessor's."""
    llm = make_llm(qa["base"], enable_lora=True, max_lora_rank=8, max_loras=2,
                   max_num_batched_tokens=5, max_num_seqs=8)
    a, b, slow, long_ = clip(1), clip(2), clip(3, rate=8000), clip(4, seconds=1.0)
    two = "<|audio_bos|><|AUDIO|><|audio_eos|> then <|audio_bos|><|AUDIO|><|audio_eos|>?"
    jobs = [("Hello there, how are you?", [], None), (ASK, [a], None), (ASK, [a], "r8"),
            (ASK, [b], "r4"), ("Hello there, how are you?", [], "r4"), (two, [a, b], "r8"),
            (ASK, [slow], None), (ASK, [long_], "r4")]
    reqs = {n: LoRARequest(n, i + 1, str(qa[n])) for i, n in enumerate(("r8", "r4"))}
    outs = llm.generate([audio(p, c) for p, c, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[reqs.get(n) for *_, n in jobs])
    check(outs, qa, jobs)
    for out, (p, c, _) in zip(outs, jobs, strict=True):
        if c:
            assert out.prompt_token_ids == hf_processor_ids(qa["base"], p, c)
    token = llm.get_tokenizer().convert_tokens_to_ids("<|AUDIO|>")
    # 0.5 s: 50 mel frames, 25 encoder positions, 12 pooled tokens; 1 s: 25 tokens
    assert [o.prompt_token_ids.count(token) for o in outs] == [0, 12, 12, 12, 0, 24, 12, 25]
    cum = [o.outputs[0].cumulative_logprob for o in outs]
    assert abs(cum[1] - cum[2]) > 1e-2  # the adapter counts on audio rows


@torch.no_grad()
def test_audio_embeddings_match_hf(qa):
    """The encoder + projector's rows for clips of several lengths (the last frames next to
    the window's padding) are HF's, captured at its projector and cut to each clip's
    tokens, within 1e-5."""
    from tests.qwen2_audio_fixtures import hf_features, hf_reference

    llm = make_llm(qa["base"])
    engine = llm.llm_engine
    clips = [clip(i, seconds=s) for i, s in ((6, 0.5), (7, 0.2037), (8, 2.0))]
    token = llm.get_tokenizer().convert_tokens_to_ids("<|AUDIO|>")
    ids, inputs = engine.image_processor([1, token, token, token], clips)
    got = engine.vision(inputs.pixel_values, inputs.sizes)
    model = hf_reference(str(qa["base"]), None)
    seen = []
    inner = model.model if hasattr(model, "model") else model  # transformers 4.x: no .model
    hook = inner.multi_modal_projector.register_forward_hook(
        lambda mod, args, out: seen.append(out))
    try:
        model(input_ids=torch.tensor([ids]), **hf_features(qa["base"], [c[0] for c in clips]))
    finally:
        hook.remove()
    want = torch.cat([seen[0][i, :n] for i, (_, n) in enumerate(inputs.sizes)])
    assert got.shape == want.shape and [n for _, n in inputs.sizes] == [12, 5, 50]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_prefix_cache_keyed_by_the_audio(qa):
    """The same text with another clip shares only the blocks before the clip; the same
    clip again shares the whole prompt but its last block."""
    llm = make_llm(qa["base"], enable_prefix_caching=True, block_size=4)
    prompt = "Listen to this recording please: " + ASK
    a, b = clip(1), clip(2)
    runs = [llm.generate([audio(prompt, [c])], GREEDY, use_tqdm=False)[0] for c in (a, b, a)]
    check(runs, qa, [(prompt, [c], None) for c in (a, b, a)])
    ids = runs[0].prompt_token_ids
    first = ids.index(llm.get_tokenizer().convert_tokens_to_ids("<|AUDIO|>"))
    assert runs[0].num_cached_tokens == 0
    assert runs[1].num_cached_tokens == first // 4 * 4 > 0
    assert runs[2].num_cached_tokens == (len(ids) - 1) // 4 * 4


def test_tower_lora_left_out(qa, caplog):
    """An adapter on the language model and the audio tower: the tower's LoRA left out with
    a warning; on text it is HF + PEFT's (the tower never runs there)."""
    llm = make_llm(qa["base"], enable_lora=True, max_lora_rank=8)
    req = LoRARequest("tower", 1, str(qa["tower"]))
    with caplog.at_level("WARNING"):
        outs = llm.generate(["Hello there, how are you?"], GREEDY, use_tqdm=False,
                            lora_request=req)
    check(outs, qa, [("Hello there, how are you?", [], "tower")])
    assert any("2 modules on the vision tower / projector left out" in r.getMessage()
               for r in caplog.records)


def test_limit_and_default_mm_lora(qa):
    """{"audio": 0}: served on text, the encoder never built, audio refused;
    default_mm_loras={"audio": r8}: an audio prompt naming no adapter runs on r8 (HF +
    PEFT's), a text prompt on the base."""
    text = make_llm(qa["base"], limit_mm_per_prompt={"audio": 0})
    assert text.llm_engine.vision is None
    check(text.generate(["Hello there"], GREEDY, use_tqdm=False), qa, [("Hello there", [], None)])
    with pytest.raises(ValueError, match="At most 0 audio"):
        text.generate(audio(ASK, [clip(1)]), GREEDY, use_tqdm=False)
    llm = make_llm(qa["base"], enable_lora=True, max_lora_rank=8,
                   default_mm_loras={"audio": str(qa["r8"])})
    a = clip(1)
    outs = llm.generate([audio(ASK, [a]), "Hello there"], GREEDY, use_tqdm=False)
    check(outs, qa, [(ASK, [a], "r8"), ("Hello there", [], None)])


def test_bad_inputs_fail_alone(qa):
    llm = make_llm(qa["base"], max_model_len=1024)
    a = clip(1)
    bad = [({"audio": (np.zeros((2, 4000), np.float32), RATE)}, "must be 1-D"),
           ({"audio": (np.zeros(4000, np.int16), RATE)}, "must hold floats"),
           ({"audio": (clip(1, seconds=30.5)[0], RATE)}, r"30\.50 s is longer than .* 30 s"),
           ({"audio": (a[0][:200], RATE)}, "too short"),
           ({"audio": [a, a]}, "1 audio placeholder token.*for 2 audio"),
           ({"image": [a]}, r"\['image'\] is not supported.*'audio'")]
    for data, message in bad:
        with pytest.raises(ValueError, match=message):
            llm.generate({"prompt": ASK, "multi_modal_data": data}, GREEDY, use_tqdm=False)
    # processed inputs (the server's form) for another prompt
    tok = llm.get_tokenizer()
    ids, inputs = llm.llm_engine.image_processor(tok(ASK).input_ids, [a])
    with pytest.raises(ValueError, match="do not match the prompt's"):
        llm.generate({"prompt_token_ids": ids[1:], "multi_modal_data": {"audio": inputs}},
                     GREEDY, use_tqdm=False)
    ok = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"audio": inputs}},
                      GREEDY, use_tqdm=False)
    check(ok, qa, [(ASK, [a], None)])
    assert not llm.llm_engine.has_unfinished_requests()
    # 30 s exactly is the window: served
    full = llm.generate(audio(ASK, [clip(5, seconds=30.0)]), SamplingParams(max_tokens=1),
                        use_tqdm=False)[0]
    token = llm.get_tokenizer().convert_tokens_to_ids("<|AUDIO|>")
    assert full.prompt_token_ids.count(token) == 750
    check(llm.generate([audio(ASK, [a])], GREEDY, use_tqdm=False), qa, [(ASK, [a], None)])


def _decoded(c: tuple[np.ndarray, int]) -> tuple[np.ndarray, int]:
    from loraplex.engine.audio_decode import decode_audio

    return decode_audio(wav_bytes(c))


def test_chat_numbers_the_clips(qa):
    """LLM.chat: input_audio parts across two messages become vLLM's `Audio 1: ...`,
    `Audio 2: ...` placeholders; the prompt Qwen2AudioProcessor's, the reply HF's."""
    llm = make_llm(qa["base"])
    a, b = clip(1), clip(2)
    part = [{"type": "input_audio", "input_audio": {"data": wav_b64(c), "format": "wav"}}
            for c in (a, b)]
    conv = [{"role": "user", "content": [part[0], {"type": "text", "text": "First."}]},
            {"role": "assistant", "content": "Yes."},
            {"role": "user", "content": [{"type": "text", "text": "And "}, part[1]]}]
    out = llm.chat(conv, GREEDY, use_tqdm=False)[0]
    text = llm.get_tokenizer().apply_chat_template([
        {"role": "user", "content": "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nFirst."},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "And Audio 2: <|audio_bos|><|AUDIO|><|audio_eos|>\n"}],
        tokenize=False, add_generation_prompt=True)
    clips = [_decoded(a), _decoded(b)]
    assert out.prompt_token_ids == hf_processor_ids(qa["base"], text, clips, bos=False)
    check([out], qa, [(text, clips, None)])


def test_server_chat_with_input_audio(qa):
    """The chat route: a WAV input_audio part on an adapter, the reply HF + PEFT's greedy
    one; a malformed clip and a transcription request get a 400 alone, the server goes on."""
    import openai

    from tests.multimodal_fixtures import chat_token_ids, greedy_reference
    from tests.server_utils import RemoteServer

    a = clip(1)
    content = [{"type": "input_audio", "input_audio": {"data": wav_b64(a), "format": "wav"}},
               {"type": "text", "text": "What is this?"}]
    args = ["--max-model-len", "256", "--dtype", "float32", "--enable-lora",
            "--max-lora-rank", "8", "--lora-modules", f"r8={qa['r8']}"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(qa["base"]))
    text = tok.apply_chat_template([{"role": "user", "content": "Audio 1: <|audio_bos|>"
                                     "<|AUDIO|><|audio_eos|>\nWhat is this?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = hf_processor_ids(qa["base"], text, [_decoded(a)], bos=False)
    want = greedy_reference(lambda reply: hf_logprobs(qa["base"], qa["r8"], ids + reply,
                                                      [at_16k(_decoded(a))]), 6)
    with RemoteServer(qa["base"], args) as server:
        client = server.get_client()
        assert chat_token_ids(client, "r8", content, prompt_tokens=len(ids)) == want
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="r8", max_tokens=4, messages=[
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {
                    "data": "UklGRgAAAABXQVZFanVuaw==", "format": "wav"}}]}])
        assert info.value.status_code == 400 and "cannot decode" in info.value.message
        with pytest.raises(openai.BadRequestError, match="does not serve transcriptions"):
            client.audio.transcriptions.create(model=str(qa["base"]),
                                               file=("a.wav", wav_bytes(a)))
        assert chat_token_ids(client, "r8", content) == want  # still serving


@pytest.mark.parametrize("rate", [16000, 8000, 22050, 44100])
def test_placeholder_count_without_features(qa, rate):
    """expand() (the chat route's and /tokenize's count) counts each clip's placeholders
    from its length alone; they must be the ones HF's extractor's mask gives (__call__)."""
    from transformers import AutoConfig

    from loraplex.engine.qwen2_audio_inputs import Qwen2AudioProcessor
    from loraplex.models.qwen2_audio import Qwen2AudioConfig

    config = Qwen2AudioConfig.from_hf(AutoConfig.from_pretrained(qa["base"]))
    processor = Qwen2AudioProcessor(str(qa["base"]), config)
    ids = [7, processor.placeholder, 9]
    gen = np.random.default_rng(rate)
    for n in [rate // 25, rate // 10 + 1, rate // 4 - 1, rate + 3, 3 * rate + 159, 30 * rate]:
        clips = [(gen.standard_normal(n).astype(np.float32) * 0.1, rate)]
        assert processor.expand(ids, clips) == processor(ids, clips)[0], n
