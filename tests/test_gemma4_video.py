"""Gemma 4's videos (Gemma4ForConditionalGeneration: each frame an image of its own through
the vision tower at the video budget, its `mm:ss` timestamp before it) against HF
transformers' Gemma 4 (+ PEFT) and HF's Gemma4Processor with its Gemma4VideoProcessor
(tests/gemma4_video_fixtures.py: frames at the size it keeps, taken as given), fp32: the
tower's frame features, the prompt ids (the first timestamp tokenized with the text
before it), greedy tokens and logprobs of mixed batches (text, image, video and image +
video requests over the base and adapters of two ranks, chunked prefill through the
frames, each frame its own bidirectional block under use_bidirectional_attention
"vision"), prefix caching (the same video hits, another misses), LoRA on the tower,
LLM.chat, and bad videos failing alone. (Over HTTP: tests/test_gemma4_audio.py's server
test, one server for video_url and audio parts.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers.models.gemma4",
                    reason="transformers < 5.5 has no Gemma 4 (the floors' 4.56)")
pytest.importorskip("PIL")

from loraplex import LoRARequest, SamplingParams  # noqa: E402
from tests.gemma4_image_fixtures import (  # noqa: E402
    check_against_hf,
    gemma4_llm,
    hf_inputs,
    make_tiny_gemma4_vision,
    processor,
)
from tests.gemma4_video_fixtures import frames  # noqa: E402
from tests.llava_fixtures import image  # noqa: E402
from tests.multimodal_fixtures import (  # noqa: E402
    LANGUAGE_MODEL,
    hf_multimodal,
    make_multimodal_adapter,
)
from tests.test_qwen_video import gif_url, paletted  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3)
ASK = "User: <|video|>\nWhat happens? Model:"
BOTH = "User: <|video|> and then <|image|>: same scene? Model:"
TWO = "User: first <|video|>, then <|video|>? Model:"
TEXT = "User: What is the capital of France? Model:"
# a clip: 3 frames of a 2 fps video (indices 0, 3, 130: 00:00, 00:01, 01:05)
CLIP = {"fps": 2.0, "frames_indices": [0, 3, 130], "total_num_frames": 140}


def clip(seed: int, count: int = 3, size: tuple[int, int] = (56, 72)) -> tuple:
    """(frames, metadata): `count` frames of `size` (kept as they are by HF's resize)."""
    meta = {"fps": 2.0, "frames_indices": CLIP["frames_indices"][:count],
            "total_num_frames": 140} if count <= 3 else {
        "fps": 1.0, "frames_indices": list(range(count)), "total_num_frames": count}
    return frames(seed, count, size), meta


def request(prompt: str, images: list, videos: list) -> dict:
    data = {"video": videos} if videos else {}
    if images:
        data["image"] = images
    return {"prompt": prompt, "multi_modal_data": data} if data else prompt


@pytest.fixture(scope="module")
def gemma4v(tiny_root: Path) -> dict[str, Path]:
    """Images at 140 soft tokens at most, video frames at 70 (the video processor's, saved
    beside them), and adapters r8 / r4 on the language model."""
    base = make_tiny_gemma4_vision(tiny_root / "gemma4video" / "base", seed=90,
                                   image_soft_tokens=140, video_soft_tokens=70)
    return {"base": base,
            "r8": make_multimodal_adapter(base, base.parent / "r8", r=8, seed=91,
                                          targets=LANGUAGE_MODEL + "(q_proj|o_proj|down_proj)"),
            "r4": make_multimodal_adapter(base, base.parent / "r4", r=4, seed=92,
                                          targets=LANGUAGE_MODEL + "(k_proj|gate_proj)")}


@pytest.fixture(scope="module")
def gemma4v_blocks(tiny_root: Path) -> dict[str, Path]:
    """use_bidirectional_attention "vision": each frame's tokens both ways on the sliding
    layers (a window of 6, shorter than a frame)."""
    base = make_tiny_gemma4_vision(tiny_root / "gemma4videoblocks" / "base", seed=93,
                                   image_blocks=True, video_soft_tokens=70)
    return {"base": base,
            "r8": make_multimodal_adapter(base, base.parent / "r8", r=8, seed=94,
                                          targets=LANGUAGE_MODEL + "(q_proj|o_proj|down_proj)")}


def check(outs, base: Path, jobs: list[tuple[str, list, list, Path | None]],
          add_special_tokens: bool = True) -> None:
    """HF's prompt ids, tokens and logprobs (check_against_hf); `jobs`: (prompt, images,
    videos, adapter)."""
    check_against_hf(outs, base, [(p, i, v, [], a) for p, i, v, a in jobs], add_special_tokens)


def test_frame_features_match_hf(gemma4v):
    """The tower + embedder over two videos' frames (two frame sizes): HF's
    get_video_features within 1e-5."""
    llm = gemma4_llm(gemma4v["base"])
    videos = [clip(1), clip(2, 2, (64, 64))]
    inp = hf_inputs(gemma4v["base"], TWO, [], videos=videos)
    _, inputs = llm.llm_engine.image_processor.process(
        processor(str(gemma4v["base"])).tokenizer.encode(TWO), {"video": videos})
    ours = llm.llm_engine.vision(inputs.pixel_values, inputs.sizes)
    with torch.no_grad():
        ref = hf_multimodal(str(gemma4v["base"]), None).model.get_video_features(
            inp["pixel_values_videos"], inp["video_position_ids"],
            num_frames_per_video=inp["num_frames_per_video"]).pooler_output
    assert len(ref) == 2 and inputs.videos == list(range(5))
    torch.testing.assert_close(ours, torch.cat(ref), atol=1e-5, rtol=0)


def test_prompt_ids_match_hf_processor(gemma4v):
    """Each <|video|> expanded as Gemma4Processor expands it (timestamps from the
    metadata, 24 fps without; the first one tokenized with the text before it), among
    images; an expanded prompt is taken as it is; frames HF's processor would resize
    count as HF counts them; a count mismatch is refused."""
    from transformers import AutoConfig

    from loraplex.engine.images import vision_config
    from loraplex.engine.multimodal_prompt import load_processor

    base = str(gemma4v["base"])
    hf = processor(base)
    tok = hf.tokenizer
    ours = load_processor(base, vision_config(AutoConfig.from_pretrained(base)), tok)
    assert ours.modalities == ("image", "video") and ours.video.config.max_soft_tokens == 70
    bare = frames(5, 2)
    cases = ((ASK, [], [clip(1)]), (BOTH, [image(2, (90, 30))], [clip(3, 2, (64, 64))]),
             (TWO, [], [clip(4), (bare, {"fps": 24.0, "frames_indices": [0, 1],
                                         "total_num_frames": 2})]),
             ("<|video|>", [], [clip(6, 1)]),
             ("User: Clip 10<|video|> Model:", [], [clip(6, 1)]))  # "10" + "00:00" joined
    for prompt, images, videos in cases:
        want = hf_inputs(gemma4v["base"], prompt, images, videos=videos)["input_ids"][0].tolist()
        data = {"video": videos, **({"image": images} if images else {})}
        got, inputs = ours.process(tok.encode(prompt), data)
        assert got == want
        assert len(inputs.positions) == sum(t in (tok.image_token_id, hf.video_token_id)
                                            for t in want)
        assert ours.process(want, data)[0] == want
    many = frames(9, 25, (64, 64))  # bare: 24 fps, frame 24 at 00:01
    assert ours.expanded(tok.encode(ASK), {"video": [many]}) == hf_inputs(
        gemma4v["base"], ASK, [], videos=[(many, {"fps": 24.0, "frames_indices": list(range(25)),
                                                  "total_num_frames": 25})])["input_ids"][0].tolist()
    big = frames(7, 2, (120, 200))  # resized: HF's count of its tokens
    got = ours.process(tok.encode("<|video|>"), {"video": [big]})[0]
    assert got.count(hf.video_token_id) == hf._get_num_multimodal_tokens(
        video_sizes=[(2, 120, 200)], videos_kwargs={"max_soft_tokens": 70}).num_video_tokens[0]
    with pytest.raises(ValueError, match=r"1 <\|video\|> token.*for 2 video"):
        ours.process(tok.encode(ASK), {"video": [clip(1), clip(2)]})


def test_mixed_batch_matches_hf(gemma4v):
    """Video requests on the base and on adapters of two ranks (more adapters than slots),
    an image + video one, two videos, an image and a text request: HF's tokens and
    logprobs."""
    llm = gemma4_llm(gemma4v["base"], enable_lora=True, max_loras=1, max_lora_rank=8)
    a, b, im = clip(1), clip(3, 2, (64, 64)), image(2, (90, 30))
    jobs = [(ASK, [], [a], None), (ASK, [], [a], "r8"), (ASK, [], [a], "r4"),
            (BOTH, [im], [b], "r8"), (TWO, [], [b, a], "r4"), (TEXT, [], [], None),
            ("User: <|image|> Model:", [im], [], "r4")]
    loras = {n: LoRARequest(n, i, str(gemma4v[n])) for i, n in enumerate(("r8", "r4"), 1)}
    outs = llm.generate([request(p, ims, vids) for p, ims, vids, _ in jobs], GREEDY,
                        use_tqdm=False, lora_request=[loras[n] if n else None for *_, n in jobs])
    check(outs, gemma4v["base"],
          [(p, ims, vids, gemma4v[n] if n else None) for p, ims, vids, n in jobs])
    assert len({tuple(o.outputs[0].token_ids) for o in outs[:3]}) == 3


@pytest.mark.parametrize("budget", [None, 80])
def test_frame_blocks_match_hf(budget, gemma4v_blocks):
    """use_bidirectional_attention "vision": each frame its own block (HF's mask over
    runs of video tokens), the full layers causal, in a batch of video, image + video and
    text requests on the base and an adapter; `budget` 80: prompts chunked, never inside
    a frame (a frame of 63 or 64 tokens waits for a step with room)."""
    blocks = gemma4v_blocks
    llm = gemma4_llm(blocks["base"], enable_lora=True, max_lora_rank=8,
                   max_num_batched_tokens=budget)
    a, b = clip(1), clip(3, 2, (64, 64))
    jobs = [(ASK, [], [a], None), (ASK, [], [b], "r8"), (BOTH, [image(2)], [b], None),
            ("User: Say what you see <|video|>", [], [a], "r8"), (TEXT, [], [], "r8")]
    r8 = LoRARequest("r8", 1, str(blocks["r8"]))
    outs = llm.generate([request(p, ims, vids) for p, ims, vids, _ in jobs], GREEDY,
                        use_tqdm=False, lora_request=[r8 if n else None for *_, n in jobs])
    check(outs, blocks["base"], [(p, ims, vids, blocks[n] if n else None)
                                 for p, ims, vids, n in jobs])


def test_chunked_prefill_and_prefix_cache(gemma4v):
    """Prefill chunks of 24 tokens cutting through frames and timestamps: HF's tokens.
    The same video again hits the prefix cache past its frames; another video of the
    same size misses from its first frame on; both still HF's."""
    base = gemma4v["base"]
    llm = gemma4_llm(base, enable_lora=True, max_lora_rank=8, max_num_batched_tokens=24,
                   block_size=8, enable_prefix_caching=True)
    a, other = clip(1), clip(8)
    r8 = LoRARequest("r8", 1, str(gemma4v["r8"]))
    first = llm.generate([request(ASK, [], [a])] * 2, GREEDY, use_tqdm=False,
                         lora_request=[None, r8])
    check(first, base, [(ASK, [], [a], None), (ASK, [], [a], gemma4v["r8"])])
    again = llm.generate([request(ASK, [], [a]), request(ASK, [], [other])], GREEDY,
                         use_tqdm=False)
    check(again, base, [(ASK, [], [a], None), (ASK, [], [other], None)])
    ids = again[0].prompt_token_ids
    assert again[0].num_cached_tokens == (len(ids) - 1) // 8 * 8
    assert 0 < again[1].num_cached_tokens <= ids.index(processor(str(base)).video_token_id)


def test_tower_connector_lora_on_frames(gemma4v, tmp_path):
    """enable_tower_connector_lora: an adapter on the tower's q_proj and the embedder, and
    the language model's q_proj, over a video request: PEFT's tokens."""
    both = make_multimodal_adapter(
        gemma4v["base"], tmp_path / "tower", r=4, seed=95,
        targets=r".*(language_model.*\.q_proj|vision_tower.*q_proj\.linear"
                r"|embed_vision\.embedding_projection)")
    llm = gemma4_llm(gemma4v["base"], enable_lora=True, max_lora_rank=8,
                   enable_tower_connector_lora=True)
    a = clip(1)
    outs = llm.generate([request(ASK, [], [a])] * 2, GREEDY, use_tqdm=False,
                        lora_request=[None, LoRARequest("tower", 1, str(both))])
    check(outs, gemma4v["base"], [(ASK, [], [a], None), (ASK, [], [a], both)])
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids


def test_chat_and_bad_videos_fail_alone(gemma4v):
    """LLM.chat with a video_url part (a GIF); limit_mm_per_prompt {"video": 1}: two videos
    refused; float frames, frames_indices that do not match, a video without its
    placeholder and one too long for max_model_len fail at add_request and queue nothing;
    the good request beside them finishes with HF's tokens."""
    base = gemma4v["base"]
    llm = gemma4_llm(base, max_model_len=320, limit_mm_per_prompt={"video": 1, "image": 1})
    gif = paletted(2, 3, (72, 56))
    conv = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": gif_url(gif)}},
        {"type": "text", "text": "What happens?"}]}]
    outs = llm.chat(conv, GREEDY, use_tqdm=False)
    meta = {"fps": 2.0, "frames_indices": [0, 1, 2], "total_num_frames": 3}
    check(outs, base, [("<|user|><|video|>What happens?\n<|assistant|>", [], [(gif, meta)],
                        None)], add_special_tokens=False)
    engine = llm.llm_engine
    engine.add_request("good", request(ASK, [], [clip(1)]), GREEDY)
    float_frames = (frames(1, 2).astype("float32") / 255, {})
    bad = [(request(TWO, [], [clip(1), clip(2)]), r"At most 1 video\(s\)"),
           (request(ASK, [], [float_frames]), "must be uint8"),
           (request(ASK, [], [(frames(1, 2), {"frames_indices": [0]})]), "name 1 frames"),
           (request(TEXT, [], [clip(1)]), r"0 <\|video\|> token\(s\).*for 1 video"),
           (request(ASK, [], [clip(3, 5)]), "max_model_len"),
           (request(ASK, [], [[1, 2, 3]]), "'video' must be a video")]
    for prompt, match in bad:
        with pytest.raises(ValueError, match=match):
            engine.add_request("bad", prompt, GREEDY)
    done = []
    while engine.has_unfinished_requests():
        done += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in done] == ["good"]
    check(done, base, [(ASK, [], [clip(1)], None)])
