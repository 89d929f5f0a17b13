"""Gemma 4's audio clips (Gemma4ForConditionalGeneration's audio tower and embedder,
models/gemma4_audio.py) against HF transformers' Gemma 4 (+ PEFT) and HF's Gemma4Processor
with its Gemma4AudioFeatureExtractor, fp32: the tower's output (HF's get_audio_features;
clips padded together there, each alone here) under the shipped attention chunking and one
with a right context, with clipped linears and gradient clipping that bite; the token
count; the prompt ids (each <|audio|> into boa, its soft tokens, eoa); greedy tokens and
logprobs of mixed batches (text, image, video and audio requests over the base and
adapters of two ranks); chunked prefill through a clip; prefix caching (the same clip
hits, another misses); LoRA on the audio tower; chat audio and video parts over a real
server; bad clips failing alone."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers.models.gemma4",
                    reason="transformers < 5.5 has no Gemma 4 (the floors' 4.56)")

from loraplex import LoRARequest, SamplingParams  # noqa: E402
from loraplex.models.gemma4_audio import Gemma4AudioConfig  # noqa: E402
from tests.engine_utils import make_llm  # noqa: E402
from tests.gemma4_fixtures import gemma4_config  # noqa: E402
from tests.gemma4_image_fixtures import (  # noqa: E402
    check_against_hf,
    gemma4_llm,
    hf_inputs,
    make_tiny_gemma4_vision,
    processor,
)
from tests.gemma4_video_fixtures import frames  # noqa: E402
from tests.llava_fixtures import data_url, image  # noqa: E402
from tests.multimodal_fixtures import (  # noqa: E402
    LANGUAGE_MODEL,
    chat_token_ids,
    check_chat_refusals,
    greedy_reference,
    hf_logprobs,
    make_multimodal_adapter,
    wav_b64,
)
from tests.server_utils import RemoteServer  # noqa: E402
from tests.test_qwen_video import gif_url, paletted  # noqa: E402

SHIPPED = {}  # chunk 12, left 13, right 0
RIGHT = dict(attention_chunk_size=4, attention_context_left=5, attention_context_right=3)
GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3)
ASK = "User: <|audio|>\nWhat is said? Model:"
ALL = "User: <|image|> <|video|> and <|audio|>: same? Model:"
TWO = "User: <|audio|> then <|audio|>? Model:"
TEXT = "User: What is the capital of France? Model:"
VIDEO = {"fps": 2.0, "frames_indices": [0, 3], "total_num_frames": 4}


def wave(seed: int, seconds: float, rate: int = 16000) -> np.ndarray:
    """A clip of `seconds` at `rate`: a chirp plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * (200 + 300 * seed) * t * (1 + t))
            + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


def heard(clip: np.ndarray) -> np.ndarray:
    """The clip as a chat part carries it (a 16-bit WAV) and the server decodes it."""
    from loraplex.engine.audio_decode import decode_audio

    return np.asarray(decode_audio(base64.b64decode(wav_b64((clip, 16000))))[0], np.float32)


def request(prompt: str, clips: list, images: list = (), videos: list = ()) -> dict | str:
    data = {k: v for k, v in (("audio", [(c, 16000) for c in clips]), ("image", list(images)),
                              ("video", list(videos))) if v}
    return {"prompt": prompt, "multi_modal_data": data} if data else prompt


def hf_model(chunking: dict, seed: int) -> torch.nn.Module:
    """HF's Gemma4ForConditionalGeneration with a tiny random audio tower: weights of std
    0.2, clip bounds on its first layer's feed-forward, gradient clipping at 0.5."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Gemma4Config(text_config=gemma4_config(300).to_dict(),
                       vision_config=dict(hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=1, num_attention_heads=2,
                                          num_key_value_heads=2, head_dim=8, patch_size=4,
                                          pooling_kernel_size=2, position_embedding_size=16),
                       audio_config=dict(hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, output_proj_dims=24,
                                         subsampling_conv_channels=[128, 4],
                                         conv_kernel_size=5, gradient_clipping=0.5,
                                         **chunking))
    model = Gemma4ForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if "audio" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        ffw = model.model.audio_tower.layers[0].feed_forward1.ffw_layer_1
        ffw.input_min.fill_(-0.5)
        ffw.output_max.fill_(0.3)
    return model


@pytest.mark.parametrize("chunking", [SHIPPED, RIGHT], ids=["shipped", "right-context"])
def test_audio_features_match_hf(chunking):
    """Tower + embedder (Gemma4Vision's clip items): HF's get_audio_features (its real
    tokens) within 1e-5, for clips of 1 s, 0.44 s and 2.3 s, batched there."""
    from transformers import Gemma4AudioFeatureExtractor

    from loraplex.models.gemma4_vision import Gemma4Vision, Gemma4VisionConfig

    model = hf_model(chunking, seed=7)
    ours = Gemma4Vision(Gemma4VisionConfig.from_hf(model.config)).eval()
    ours.load_state_dict({k.removeprefix("model."): v for k, v in model.state_dict().items()
                          if k.startswith("model.") and ours.ours(k)})
    inp = Gemma4AudioFeatureExtractor()([wave(i, s) for i, s in enumerate((1, 0.44, 2.3))],
                                        return_tensors="pt")
    with torch.no_grad():
        ref = model.model.get_audio_features(inp["input_features"],
                                             inp["input_features_mask"])
        real = [f[m] for f, m in zip(inp["input_features"], inp["input_features_mask"])]
        got = ours(torch.cat(real).flatten(), [(len(f),) for f in real])
    assert ref.attention_mask.sum(1).tolist() == [
        Gemma4AudioConfig.tokens_for(len(f)) for f in real]
    torch.testing.assert_close(got, ref.pooler_output[ref.attention_mask], atol=1e-5, rtol=0)


def test_token_count_is_the_processors():
    """tokens_for over the extractor's real frames: Gemma4Processor's count for clips of
    any length (its _compute_audio_num_tokens)."""
    from transformers import Gemma4AudioFeatureExtractor, Gemma4Processor

    extractor = Gemma4AudioFeatureExtractor()
    count = Gemma4Processor._compute_audio_num_tokens
    stand_in = type("P", (), {"feature_extractor": extractor, "audio_seq_length": 750})()
    for n in (400, 401, 559, 1600, 16000, 16001, 48123):
        mask = extractor([np.zeros(n, np.float32)], return_tensors="pt")["input_features_mask"]
        assert Gemma4AudioConfig.tokens_for(int(mask.sum())) == count(
            stand_in, np.zeros(n), 16000), n


@pytest.fixture(scope="module")
def gemma4a(tiny_root: Path) -> dict[str, Path]:
    """Images, video frames and audio (a 2-layer audio tower), adapters r8 / r4 on the
    language model."""
    base = make_tiny_gemma4_vision(tiny_root / "gemma4audio" / "base", seed=96,
                                   video_soft_tokens=70, audio=True)
    return {"base": base,
            "r8": make_multimodal_adapter(base, base.parent / "r8", r=8, seed=97,
                                          targets=LANGUAGE_MODEL + "(q_proj|o_proj|down_proj)"),
            "r4": make_multimodal_adapter(base, base.parent / "r4", r=4, seed=98,
                                          targets=LANGUAGE_MODEL + "(k_proj|gate_proj)")}


def check(outs, base: Path, jobs: list, add_special_tokens: bool = True) -> None:
    """HF's prompt ids, tokens and logprobs (check_against_hf); `jobs`: (prompt, clips,
    images, videos, adapter)."""
    check_against_hf(outs, base, [(p, i, v, c, a) for p, c, i, v, a in jobs],
                     add_special_tokens)


def test_prompt_ids_match_hf_processor(gemma4a):
    """Each <|audio|> expanded as Gemma4Processor expands it, beside an image and a video;
    an expanded prompt taken as it is; an 8 kHz clip resampled first (its count is HF's
    for the 16 kHz clip); a count mismatch refused."""
    base = str(gemma4a["base"])
    tok = processor(base).tokenizer
    ours = make_llm(gemma4a["base"]).llm_engine.image_processor
    assert ours.modalities == ("image", "video", "audio")
    a, b = wave(1, 1.0), wave(2, 0.37)
    v = (frames(3, 2), VIDEO)
    for prompt, clips, images, videos in ((ASK, [a], [], []), (TWO, [b, a], [], []),
                                          (ALL, [a], [image(1)], [v])):
        want = hf_inputs(gemma4a["base"], prompt, images, videos=videos,
                         audio=clips)["input_ids"][0].tolist()
        data = request(prompt, clips, images, videos)["multi_modal_data"]
        got, inputs = ours.process(tok.encode(prompt), data)
        assert got == want
        assert [inputs.sizes[k] for k in inputs.audio] == [
            (int(m.sum()),) for m in hf_inputs(gemma4a["base"], prompt, images, videos=videos,
                                               audio=clips)["input_features_mask"]]
        assert ours.process(want, data)[0] == want
    slow = (wave(4, 1.0, 8000), 8000)
    got = ours.process(tok.encode(ASK), {"audio": [slow]})[0]
    assert got.count(tok.convert_tokens_to_ids("<|audio|>")) == 25
    with pytest.raises(ValueError, match=r"1 audio placeholder token.*for 2 audio"):
        ours.process(tok.encode(ASK), {"audio": [(a, 16000), (b, 16000)]})


def test_mixed_batch_matches_hf(gemma4a):
    """Audio requests on the base and on adapters of two ranks (more adapters than slots),
    image + video + audio, two clips, a video and a text request: HF's tokens and
    logprobs."""
    base = gemma4a["base"]
    llm = gemma4_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8)
    a, b, v = wave(1, 1.0), wave(2, 0.37), (frames(3, 2), VIDEO)
    jobs = [(ASK, [a], [], [], None), (ASK, [a], [], [], "r8"), (ASK, [a], [], [], "r4"),
            (ALL, [b], [image(1)], [v], "r8"), (TWO, [b, a], [], [], "r4"),
            (TEXT, [], [], [], None), ("User: <|video|> Model:", [], [], [v], "r4")]
    loras = {n: LoRARequest(n, i, str(gemma4a[n])) for i, n in enumerate(("r8", "r4"), 1)}
    outs = llm.generate([request(p, c, i, v) for p, c, i, v, _ in jobs], GREEDY,
                        use_tqdm=False, lora_request=[loras[n] if n else None for *_, n in jobs])
    check(outs, base, [(*job[:4], gemma4a[job[4]] if job[4] else None) for job in jobs])
    assert len({tuple(o.outputs[0].token_ids) for o in outs[:3]}) == 3


def test_chunked_prefill_and_prefix_cache(gemma4a):
    """Prefill chunks of 8 tokens through a clip: HF's tokens. The same clip again hits
    the prefix cache past it; another clip misses from its first soft token on."""
    base = gemma4a["base"]
    llm = gemma4_llm(base, enable_lora=True, max_lora_rank=8, max_num_batched_tokens=8,
                 block_size=4)
    a, other = wave(1, 1.0), wave(5, 1.0)
    r8 = LoRARequest("r8", 1, str(gemma4a["r8"]))
    first = llm.generate([request(ASK, [a])] * 2, GREEDY, use_tqdm=False,
                         lora_request=[None, r8])
    check(first, base, [(ASK, [a], [], [], None), (ASK, [a], [], [], gemma4a["r8"])])
    again = llm.generate([request(ASK, [a]), request(ASK, [other])], GREEDY, use_tqdm=False)
    check(again, base, [(ASK, [a], [], [], None), (ASK, [other], [], [], None)])
    ids = again[0].prompt_token_ids
    assert again[0].num_cached_tokens == (len(ids) - 1) // 4 * 4
    audio = processor(str(base)).tokenizer.convert_tokens_to_ids("<|audio|>")
    assert 0 < again[1].num_cached_tokens <= ids.index(audio)


def test_audio_stays_causal_under_image_blocks(tiny_root):
    """use_bidirectional_attention "vision": an image's tokens see each other both ways on
    the sliding layers, a clip's do not (HF's mask, its mm_token_type_ids); in chunks of
    80 that cut through the clip (never through the image): HF's tokens and logprobs."""
    base = make_tiny_gemma4_vision(tiny_root / "gemma4audioblocks" / "base", seed=100,
                                   image_blocks=True, audio=True)
    llm = gemma4_llm(base, max_num_batched_tokens=80)
    a = wave(1, 1.0)
    jobs = [("User: <|image|> and <|audio|>? Model:", [a], [image(1)], [], None),
            ("User: Say what you hear <|audio|>", [a], [], [], None)]
    outs = llm.generate([request(p, c, i, v) for p, c, i, v, _ in jobs], GREEDY,
                        use_tqdm=False)
    check(outs, base, jobs)


def test_tower_connector_lora_on_audio(gemma4a, tmp_path):
    """enable_tower_connector_lora: an adapter on the audio tower's attention and
    relative projections, its embedder and the language model's q_proj: PEFT's tokens."""
    both = make_multimodal_adapter(
        gemma4a["base"], tmp_path / "tower", r=4, seed=99,
        targets=r".*(language_model.*\.q_proj|audio_tower.*(q_proj\.linear|relative_k_proj)"
                r"|embed_audio\.embedding_projection)")
    llm = gemma4_llm(gemma4a["base"], enable_lora=True, max_lora_rank=8,
                 enable_tower_connector_lora=True)
    a = wave(1, 1.0)
    outs = llm.generate([request(ASK, [a])] * 2, GREEDY, use_tqdm=False,
                        lora_request=[None, LoRARequest("tower", 1, str(both))])
    check(outs, gemma4a["base"], [(ASK, [a], [], [], None), (ASK, [a], [], [], both)])
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids


def test_chat_and_bad_clips_fail_alone(gemma4a):
    """LLM.chat with an input_audio part; limit_mm_per_prompt {"audio": 1}: two clips
    refused; a 2-D waveform, NaN samples, a clip over 30 s, one without its placeholder
    fail at add_request and queue nothing; the good request beside them finishes with HF's
    tokens."""
    base = gemma4a["base"]
    llm = gemma4_llm(base, limit_mm_per_prompt={"audio": 1, "image": 1, "video": 1})
    a = wave(1, 1.0)
    conv = [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": wav_b64((a, 16000)), "format": "wav"}},
        {"type": "text", "text": "What is said?"}]}]
    outs = llm.chat(conv, GREEDY, use_tqdm=False)
    check(outs, base, [("<|user|><|audio|>What is said?\n<|assistant|>", [heard(a)], [], [],
                        None)], add_special_tokens=False)
    engine = llm.llm_engine
    engine.add_request("good", request(ASK, [a]), GREEDY)
    bad = [(request(TWO, [a, a]), r"At most 1 audio\(s\)"),
           ({"prompt": ASK, "multi_modal_data": {"audio": (np.zeros((2, 800), np.float32),
                                                           16000)}}, "must be 1-D"),
           ({"prompt": ASK, "multi_modal_data": {"audio": (np.full(800, np.nan, np.float32),
                                                           16000)}}, "NaN"),
           (request(ASK, [np.zeros(16000 * 31, np.float32)]), "longer than Gemma 4 takes"),
           (request(TEXT, [a]), r"0 audio placeholder token\(s\).*for 1 audio")]
    for prompt, match in bad:
        with pytest.raises(ValueError, match=match):
            engine.add_request("bad", prompt, GREEDY)
    done = []
    while engine.has_unfinished_requests():
        done += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in done] == ["good"]
    check(done, base, [(ASK, [a], [], [], None)])


def test_server_chat_with_audio_and_video(gemma4a):
    """/v1/chat/completions with an input_audio part on the base and an adapter, and a GIF
    video_url part on the adapter: HF's greedy tokens over HF's processor's prompt (its
    usage counted); two clips or two videos (over the limits), bytes that are no audio or
    no video, a clip over 30 s: a 400 each, the server serving on (an image, a video and a
    clip in one message count one of each)."""
    base = gemma4a["base"]
    a = wave(1, 1.0)
    content = [{"type": "input_audio", "input_audio": {"data": wav_b64((a, 16000)),
                                                       "format": "wav"}},
               {"type": "text", "text": "What is said?"}]
    inp = hf_inputs(base, "<|user|><|audio|>What is said?\n<|assistant|>", [], False,
                    audio=[heard(a)])
    gif = paletted(3, 3, (72, 56))
    filmed = [{"type": "video_url", "video_url": {"url": gif_url(gif)}},
              {"type": "text", "text": "What happens?"}]
    video_inp = hf_inputs(base, "<|user|><|video|>What happens?\n<|assistant|>", [], False,
                          videos=[(gif, {"fps": 2.0, "frames_indices": [0, 1, 2],
                                         "total_num_frames": 3})])
    n = GREEDY.max_tokens
    args = ["--max-model-len", "512", "--dtype", "float32", "--enable-lora",
            "--max-lora-rank", "8", "--lora-modules", f"r8={gemma4a['r8']}",
            "--limit-mm-per-prompt", '{"image": 1, "audio": 1, "video": 1}']
    with RemoteServer(base, args) as server:
        client = server.get_client()
        for model, adapter, parts, ref in ((str(base), None, content, inp),
                                           ("r8", gemma4a["r8"], content, inp),
                                           ("r8", gemma4a["r8"], filmed, video_inp)):
            want = greedy_reference(lambda r, a=adapter, i=ref: hf_logprobs(base, a, i, r), n)
            assert chat_token_ids(client, model, parts, n, len(ref["input_ids"][0])) == want
        long = wav_b64((np.zeros(16000 * 31, np.float32), 16000))
        bad = {"too many": ([content[0], content[0]], "At most 1 audio"),
               "too many videos": ([filmed[0], filmed[0]], "At most 1 video"),
               "broken": ([{"type": "input_audio", "input_audio": {
                   "data": "AAAA", "format": "wav"}}], "audio"),
               "broken video": ([{"type": "video_url", "video_url": {
                   "url": "data:video/mp4;base64,AAAA"}}], "cannot decode the video"),
               "too long": ([{"type": "input_audio", "input_audio": {
                   "data": long, "format": "wav"}}], "longer than Gemma 4 takes")}
        check_chat_refusals(client, str(base), list(bad.values()))
        everything = [{"type": "image_url", "image_url": {"url": data_url(image(1))}},
                      filmed[0], *content]
        assert len(chat_token_ids(client, "r8", everything, n)) == n
