"""Qwen3-VL and Qwen3-VL-MoE with videos (vLLM's multi_modal_data={"video": frames} or
(frames, metadata)), against HF transformers (+ PEFT) on the same weights, fp32.

The reference's inputs are HF's own Qwen3VLProcessor's: its prompt (each temporal patch's
`<t seconds>` and vision start / end), video_grid_thw, mm_token_type_ids and its patchify
of the frames. HF's video processor needs torchvision (absent here) to resize and
normalize, so the reference is run on frames already of a valid size (do_resize off) and
its patches (do_rescale, do_normalize off) are normalized here by HF's formula; the
resize sizes are checked against HF's smart_resize and get_num_of_video_patches, the frame
sampling against HF's sample_frames. Building HF's processor checks its video
processor's class against a mapping that torchvision's absence leaves broken: that check
alone is skipped (`hf_processor`). Then: the tower's video embeddings and DeepStack
features, the M-RoPE positions against HF's get_rope_index, greedy tokens HF's and
logprobs within 1e-4 for a mixed batch (video, image + video, two videos, image and text
prompts; the base and two adapters of different ranks over one slot; whole and chunked
prefill), the MoE model, prefix caching keyed on the video, limit_mm_per_prompt's "video",
the server's chat route with a GIF video_url, and bad videos failing alone."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import openai
import pytest
import torch
import transformers

from loraplex import LoRARequest
from loraplex.engine.qwen3_videos import Qwen3VideoProcessor
from loraplex.engine.qwen_images import QwenImageProcessor
from loraplex.models.qwen3_vl import Qwen3VisionConfig
from tests.engine_utils import make_llm, refused_alone
from tests.llava_fixtures import image
from tests.multimodal_fixtures import (
    assert_matches_reference,
    chat_token_ids,
    greedy_reference,
    hf_logprobs,
    hf_multimodal,
    image_processor,
    tokenizer,
    with_adapters,
)
from tests.qwen2_vl_fixtures import GREEDY, IMAGE, make_tiny_qwen3_vl
from tests.server_utils import RemoteServer
from tests.test_qwen3_vl import _tower
from tests.test_qwen_video import VIDEO, VIDEO_TEMPLATE, gif_url, paletted, video

pytest.importorskip("PIL")
pytest.importorskip("transformers.models.qwen3_vl")
pytestmark = pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                                reason="transformers 5's Qwen3VLProcessor and get_rope_index")
ASK = f"USER: {VIDEO}What happens? ASSISTANT:"
BARE = "USER: <|video_pad|> What happens? ASSISTANT:"  # no vision start / end around it
BOTH = f"USER: {IMAGE} then {VIDEO}: same scene? ASSISTANT:"
THEN = f"USER: {VIDEO} and {IMAGE} and {VIDEO}? ASSISTANT:"
IMAGE_ASK = f"USER: {IMAGE}What is this? ASSISTANT:"
TEXT = "USER: What is the capital of France? ASSISTANT:"
# the fixture's video processor: 4-pixel patches, at most 8192 pixels over all frames
VIDEO_CONFIG = {"size": {"shortest_edge": 64, "longest_edge": 8192}, "patch_size": 4,
                "temporal_patch_size": 2, "merge_size": 2, "cap_pixels_per_frame": False}
STEPS = {"fps": 2.0, "frames_indices": [0, 3, 6, 9, 12], "total_num_frames": 13}


@pytest.fixture(scope="module")
def qwen3(tiny_root):
    base = make_tiny_qwen3_vl(tiny_root / "qwen3vl_video" / "base", seed=180)
    (base / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "Qwen3VLVideoProcessor", **VIDEO_CONFIG}))
    return with_adapters(base, seed=181)


@pytest.fixture(scope="module")
def qwen3moe(tiny_root):
    base = make_tiny_qwen3_vl(tiny_root / "qwen3vlmoe_video" / "base", seed=182, moe=True)
    (base / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_CONFIG))
    return with_adapters(base, seed=183)


@functools.lru_cache(maxsize=4)
def hf_processor(base: str) -> Any:
    """HF's Qwen3VLProcessor over the checkpoint's tokenizer and image processor and a
    Qwen3VLVideoProcessor of VIDEO_CONFIG. Its constructor looks the video processor's
    class up in a registry that has no entries without torchvision: that lookup (a type
    check) is what is skipped, the processor itself is HF's."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.processing_utils import ProcessorMixin

    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class",
                           lambda *_: None):
        return Qwen3VLProcessor(image_processor=image_processor(base),
                                tokenizer=tokenizer(base),
                                video_processor=Qwen3VLVideoProcessor(**VIDEO_CONFIG))


def _metadata(item: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """A video as (frames array, HF's metadata): vLLM's defaults (every frame, in order;
    HF's 24 fps) where the item gives none."""
    frames, meta = item if isinstance(item, tuple) else (item, {})
    frames = np.stack([np.asarray(f) for f in frames]) if isinstance(frames, list) else frames
    return frames, {"total_num_frames": meta.get("total_num_frames", len(frames)),
                    "fps": meta.get("fps"),
                    "frames_indices": meta.get("frames_indices", list(range(len(frames))))}


def hf_inputs(base: Path, prompt: str, images: list, videos: list,
              add_special_tokens: bool = True) -> dict[str, torch.Tensor]:
    """HF's processor's inputs for the prompt, images and videos (frames of valid sizes,
    taken as given: do_sample_frames off, as vLLM for sampled frames), its video patches
    normalized by HF's fused rescale + normalize (mean and std 0.5)."""
    clips = [_metadata(v) for v in videos]
    kw: dict[str, Any] = {}
    if clips:
        kw = {"videos": [f for f, _ in clips], "videos_kwargs": dict(
            video_metadata=[m for _, m in clips], do_sample_frames=False, do_resize=False,
            do_rescale=False, do_normalize=False, do_convert_rgb=False)}
    out = dict(hf_processor(str(base))(text=[prompt], images=images or None,
                                       add_special_tokens=add_special_tokens,
                                       return_tensors="pt", **kw))
    out.pop("attention_mask")
    if clips:
        out["pixel_values_videos"] = (out["pixel_values_videos"].float() - 127.5) / 127.5
    return out


@torch.no_grad()
def check(outs, base: Path, jobs: list[tuple[str, list, list, Path | None]],
          add_special_tokens: bool = True) -> None:
    """Each output's prompt is HF's processor's, its tokens HF's greedy ones and its
    logprobs HF's (+ PEFT's) within 1e-4."""
    for out, (prompt, ims, vids, adapter) in zip(outs, jobs, strict=True):
        inp = hf_inputs(base, prompt, ims, vids, add_special_tokens)
        ids = inp["input_ids"][0].tolist()
        assert out.prompt_token_ids == ids
        got = out.outputs[0].token_ids
        ref = hf_logprobs(base, adapter, inp, got[:-1])[len(ids) - 1:]
        assert_matches_reference(out, ref, adapter)


def request(prompt: str, images: list, videos: list) -> dict | str:
    data: dict[str, Any] = {}
    if images:
        data["image"] = images
    if videos:
        data["video"] = videos[0] if len(videos) == 1 else videos
    return {"prompt": prompt, "multi_modal_data": data} if data else prompt


def _span(r: tuple[int, int]) -> tuple[int, int]:
    return r[0], r[0] + r[1]


def _processor(base: Path) -> QwenImageProcessor:
    return QwenImageProcessor(str(base), Qwen3VisionConfig.from_hf(
        hf_multimodal(str(base), None).config), tokenizer(str(base)))


def test_prompt_and_patches_are_hf_processors(qwen3):
    """The expanded ids (timestamps from the metadata's fps and frame indices, else 24
    fps over 0, 1, ...; the chat template's vision start / end collapsed; a bare pad),
    the grids, and the patches (an odd frame count: the last frame repeated) are HF's."""
    base = qwen3["base"]
    proc = _processor(base)
    tok = tokenizer(str(base))
    odd = (video(1, 5, (24, 16)), STEPS)
    for prompt, ims, vids in ((ASK, [], [odd]), (ASK, [], [video(2, 4, (32, 24))]),
                              (BARE, [], [video(3, 6)]),
                              (THEN, [image(4, (40, 24))], [video(5, 2), odd])):
        want = hf_inputs(base, prompt, ims, vids)
        ids, inputs = proc(tok(prompt).input_ids, ims or None, videos=vids)
        assert ids == want["input_ids"][0].tolist()
        assert [inputs.sizes[i] for i in inputs.videos] == [
            tuple(g) for g in want["video_grid_thw"].tolist()]
        rows = inputs.pixel_values.split([t * h * w for t, h, w in inputs.sizes])
        assert torch.equal(torch.cat([rows[i] for i in inputs.videos]),
                           want["pixel_values_videos"])
        # each video's range: from its first pad to its last, its frames' pads all in it
        vpad = proc.config.video_token_id
        for i, (first, n) in enumerate(inputs.ranges):
            inside = [p for p in range(first, first + n) if ids[p] == vpad]
            assert (i in inputs.videos) == bool(inside) and ids[first + n - 1] == ids[first]
        assert sorted(p for i in inputs.videos for p in range(*_span(inputs.ranges[i]))
                      if ids[p] == vpad) == [p for p, t in enumerate(ids) if t == vpad]
        # the already expanded prompt is kept as it is (the server expands it first)
        assert proc(ids, ims or None, videos=vids)[0] == ids
    text = tok.decode(proc(tok(ASK).input_ids, None, videos=[odd])[0])
    assert "<0.8 seconds><|vision_start|>" in text and "<6.0 seconds>" in text
    assert text.count("<|vision_start|>") == 3 and text.count("<|vision_end|>") == 3


def test_resize_and_frame_sampling_are_hfs(qwen3):
    """Frame sizes HF's smart_resize (the budget over all frames; a side under 8 scaled
    up first) with and without the per-frame cap; `do_sample_frames` in the metadata
    picks HF's sample_frames indices; fewer frames than a temporal patch refused."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize
    from transformers.video_utils import VideoMetadata

    base = qwen3["base"]
    proc = _processor(base).video
    assert isinstance(proc, Qwen3VideoProcessor)
    hf = hf_processor(str(base)).video_processor
    for frames, h, w in ((4, 16, 24), (6, 200, 90), (3, 5, 60), (12, 64, 64), (2, 40, 30)):
        proc.cap_pixels, proc.max_video_tokens = False, 768
        assert proc.size(frames, h, w) == smart_resize(frames, h, w, 2, 8, 64, 8192)
        for cap in (False, True):  # 6 tokens a frame: the cap bites on these small ones
            proc.cap_pixels, proc.max_video_tokens = cap, 6
            t, gh, gw = proc.grid(video(1, frames, (w, h)))
            assert t * gh * gw == hf.get_num_of_video_patches(
                frames, h, w, {"cap_pixels_per_frame": cap, "max_video_tokens": 6})
    proc.cap_pixels, proc.max_video_tokens = False, 768
    resized = proc(video(2, 6, (90, 60)))
    assert resized.grid == (3, *(s // 4 for s in smart_resize(6, 60, 90, 2, 8, 64, 8192)))
    assert resized.patches.shape[0] == np.prod(resized.grid)
    for total, fps in ((60, 24.0), (9, 2.0), (100, 30.0)):
        frames = video(3, total, (8, 8))
        want = hf.sample_frames(VideoMetadata(total_num_frames=total, fps=fps))
        clip, indices, _ = proc.clip((frames, {"fps": fps, "do_sample_frames": True}))
        assert indices == want.tolist() and np.array_equal(
            clip.permute(0, 2, 3, 1).numpy(), frames[want])
    with pytest.raises(ValueError, match="at least 2 frames"):
        proc(video(4, 1))


def test_video_embeddings_and_deepstack_match_hf(qwen3):
    """An image and a video (3 temporal patches) in one tower call: HF's
    get_video_features' merged embeddings and DeepStack features."""
    base = qwen3["base"]
    ours, hf = _tower(base)
    inp = hf_inputs(base, BOTH, [image(1, (52, 40))], [video(2, 6, (32, 24))])
    with torch.no_grad():
        img = hf.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"],
                                          return_dict=True)
        vid = hf.model.get_video_features(inp["pixel_values_videos"], inp["video_grid_thw"],
                                          return_dict=True)
    ref = torch.stack([torch.cat([*img.pooler_output, *vid.pooler_output]),
                       *(torch.cat([*a, *b]) for a, b in zip(img.deepstack_features,
                                                            vid.deepstack_features))], dim=1)
    grids = [tuple(g) for g in torch.cat([inp["image_grid_thw"],
                                          inp["video_grid_thw"]]).tolist()]
    assert grids[1][0] == 3
    got = ours(torch.cat([inp["pixel_values"], inp["pixel_values_videos"]]), grids)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got - ref).abs().max()


def test_positions_match_hf_get_rope_index(qwen3):
    """Video alone, image then video, video image video: our 3-D positions and delta
    are HF's get_rope_index's (each temporal patch an image of its own)."""
    base = qwen3["base"]
    hf = hf_multimodal(str(base), None)
    proc = _processor(base)
    tok = tokenizer(str(base))
    for prompt, ims, vids in ((ASK, [], [video(1, 6)]), (BOTH, [image(2)], [video(3)]),
                              (THEN, [image(4, (40, 24))], [video(5, 2), (video(6, 5),
                                                                           STEPS)])):
        inp = hf_inputs(base, prompt, ims, vids)
        ref, delta = hf.model.get_rope_index(inp["input_ids"], inp["mm_token_type_ids"],
                                             inp.get("image_grid_thw"), inp["video_grid_thw"])
        ids, inputs = proc(tok(prompt).input_ids, ims or None, videos=vids)
        assert ids == inp["input_ids"][0].tolist()
        assert torch.equal(inputs.mrope, ref[:, 0]) and inputs.mrope_delta == int(delta)
        assert inputs.mrope_delta < 0


@pytest.mark.parametrize("budget", [None, 16])
def test_mixed_batch_matches_hf(budget, qwen3):
    """Video requests under the base and two adapters (ranks 8 and 4, one slot), image +
    video, two videos around an image, an image and a text request in one call; budget
    16: chunked prefill cuts through the videos' frames, timestamps and DeepStack rows."""
    base = qwen3["base"]
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8,
                   max_num_batched_tokens=budget)
    a, b = (video(1, 5), STEPS), video(2, 6, (32, 24))
    im = image(3, (52, 40))
    jobs = [(ASK, [], [a], None), (ASK, [], [a], "r8"), (ASK, [], [a], "r4"),
            (ASK, [], [b], "r8"), (BOTH, [im], [b], None), (THEN, [im], [b, a], "r4"),
            (IMAGE_ASK, [im], [], "r8"), (TEXT, [], [], None)]
    loras = {"r8": LoRARequest("r8", 1, str(qwen3["r8"])),
             "r4": LoRARequest("r4", 2, str(qwen3["r4"]))}
    outs = llm.generate([request(p, ims, vids) for p, ims, vids, _ in jobs], GREEDY,
                        use_tqdm=False,
                        lora_request=[loras[n] if n else None for *_, n in jobs])
    check(outs, base, [(p, ims, vids, qwen3[n] if n else None) for p, ims, vids, n in jobs])
    assert len({tuple(o.outputs[0].token_ids) for o in outs[:3]}) == 3


def test_moe_video_matches_hf(qwen3moe):
    """Qwen3-VL-MoE: video requests under the base and both adapters, an image + video
    and a text request, chunked."""
    base = qwen3moe["base"]
    llm = make_llm(base, enable_lora=True, max_lora_rank=8, max_num_batched_tokens=16)
    a, im = (video(1, 5), STEPS), image(3)
    jobs = [(ASK, [], [a], None), (ASK, [], [a], "r8"), (BOTH, [im], [a], "r4"),
            (TEXT, [], [], None)]
    loras = {"r8": LoRARequest("r8", 1, str(qwen3moe["r8"])),
             "r4": LoRARequest("r4", 2, str(qwen3moe["r4"]))}
    outs = llm.generate([request(p, ims, vids) for p, ims, vids, _ in jobs], GREEDY,
                        use_tqdm=False,
                        lora_request=[loras[n] if n else None for *_, n in jobs])
    check(outs, base, [(p, ims, vids, qwen3moe[n] if n else None)
                       for p, ims, vids, n in jobs])


def test_frames_as_pil_images(qwen3):
    """A list of PIL frames (with metadata) is the same video as its array."""
    from PIL import Image

    base = qwen3["base"]
    frames = video(1, 5)
    pil = [Image.fromarray(f) for f in frames]
    outs = make_llm(base).generate([request(ASK, [], [(frames, STEPS)]),
                                    request(ASK, [], [(pil, STEPS)])], GREEDY, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    check(outs[1:], base, [(ASK, [], [(frames, STEPS)], None)])


def test_chat_video_url_sampled_again(qwen3):
    """A chat video_url whose every frame the loader kept (its metadata's
    do_sample_frames, as vLLM's loader sets it) is sampled again by HF's Qwen3-VL rule,
    as vLLM has HF do: a 10 fps GIF's 10 frames become HF's sample_frames' 4, the prompt
    and tokens HF's on those frames and their indices."""
    from transformers.video_utils import VideoMetadata

    base = qwen3["base"]
    frames = paletted(6, 10)
    hf = hf_processor(str(base)).video_processor
    want = hf.sample_frames(VideoMetadata(total_num_frames=10, fps=10.0))
    assert len(want) < len(frames)
    content = [{"type": "video_url", "video_url": {"url": gif_url(frames, ms=100)}},
               {"type": "text", "text": "What happens?"}]
    outs = make_llm(base).chat([{"role": "user", "content": content}], GREEDY,
                               chat_template=VIDEO_TEMPLATE, use_tqdm=False)
    prompt = f"<|im_start|>user\n{VIDEO}What happens?<|im_end|>\n<|im_start|>assistant\n"
    sampled = (frames[want], {"fps": 10.0, "frames_indices": want.tolist()})
    check(outs, base, [(prompt, [], [sampled], None)], add_special_tokens=False)


def test_prefix_cache_never_shares_across_videos(qwen3):
    """The same text with another video of the same size: only the blocks before it are
    shared; the same video again: all but the last block; the same frames at other
    times: only the blocks before its first timestamp."""
    base = qwen3["base"]
    llm = make_llm(base, enable_prefix_caching=True, block_size=8)
    prompt = "USER: Once upon a time there was a little girl who lived. " + ASK[6:]
    a, b = video(1), video(2)
    vids = [a, b, a, (a, {"fps": 2.0})]
    runs = [llm.generate([request(prompt, [], [v])], GREEDY, use_tqdm=False)[0] for v in vids]
    check(runs, base, [(prompt, [], [v], None) for v in vids])
    ids = runs[0].prompt_token_ids
    first = ids.index(llm.get_tokenizer().convert_tokens_to_ids("<|video_pad|>"))
    # the other times' first timestamp: where their prompts part
    parted = next(i for i, (x, y) in enumerate(zip(ids, runs[3].prompt_token_ids)) if x != y)
    assert runs[0].num_cached_tokens == 0
    assert runs[1].num_cached_tokens == first // 8 * 8 > 0
    assert runs[2].num_cached_tokens == (len(ids) - 1) // 8 * 8
    assert runs[3].num_cached_tokens == parted // 8 * 8 > 0
    assert runs[0].outputs[0].token_ids != runs[1].outputs[0].token_ids


def test_limit_mm_per_prompt_video(qwen3):
    """{"video": 0} refuses videos and still serves images; {"video": 1, "image": 0}
    refuses two and serves one (the tower built for videos alone)."""
    base = qwen3["base"]
    llm = make_llm(base, limit_mm_per_prompt={"video": 0})
    with pytest.raises(ValueError, match=r"At most 0 video\(s\)"):
        llm.generate(request(ASK, [], [video(1)]), GREEDY, use_tqdm=False)
    assert llm.generate(request(IMAGE_ASK, [image(1)], []), GREEDY, use_tqdm=False)
    llm = make_llm(base, limit_mm_per_prompt={"video": 1, "image": 0})
    with pytest.raises(ValueError, match=r"At most 1 video\(s\).*got 2"):
        llm.generate(request(THEN.replace(IMAGE, ""), [], [video(1), video(2)]), GREEDY,
                     use_tqdm=False)
    out = llm.generate(request(ASK, [], [video(1)]), GREEDY, use_tqdm=False)
    check(out, base, [(ASK, [], [video(1)], None)])


def test_bad_videos_fail_alone(qwen3):
    """Each bad video raises at add_request with a clear error and queues nothing; the
    good request beside them finishes with HF's tokens."""
    base = qwen3["base"]
    engine = make_llm(base, max_model_len=128).llm_engine
    engine.add_request("good", request(ASK, [], [video(1)]), GREEDY)
    bad = [(request(ASK, [], [video(1)[..., :2]]), r"\[frames, height, width, 3\]"),
           (request(ASK, [], [video(1, 1)]), "at least 2 frames"),
           (request(ASK, [], [(video(1), {"frames_indices": [0, 1]})]),
            "frames_indices name 2 frames, but it has 4"),
           (request(ASK, [], [video(1, 40, (32, 32))]), "max_model_len is 128"),
           (request(TEXT, [], [video(1)]), r"0 video placeholder token\(s\).*for 1 video"),
           (request(f"{VIDEO}{VIDEO}", [], [video(1)]), r"2 video placeholder"),
           (request(ASK, [], [(video(1), {"fps": -1})]), "fps must be positive")]
    outs = refused_alone(engine, bad, GREEDY)
    assert [o.request_id for o in outs] == ["good"]
    check(outs, base, [(ASK, [], [video(1)], None)])


def test_server_chat_with_gif_video_url(qwen3):
    """The official client's chat request with a GIF video_url (2 fps, from its frame
    durations) under an adapter gets HF + PEFT's greedy tokens and /tokenize the expanded
    ids; a video too long for the context, a one-frame one and an undecodable one fail
    alone with a 400; the server still serves."""
    base = qwen3["base"]
    frames = paletted(2)
    content = [{"type": "video_url", "video_url": {"url": gif_url(frames)}},
               {"type": "text", "text": "What happens?"}]
    inp = hf_inputs(base, f"<|im_start|>user\n{VIDEO}What happens?<|im_end|>\n"
                          "<|im_start|>assistant\n", [], [(frames, {"fps": 2.0})],
                    add_special_tokens=False)
    ids = inp["input_ids"][0].tolist()
    want = greedy_reference(lambda reply: hf_logprobs(base, qwen3["r8"], inp, reply),
                            GREEDY.max_tokens)
    args = ["--max-model-len", "160", "--dtype", "float32", "--chat-template", VIDEO_TEMPLATE,
            "--enable-lora", "--max-lora-rank", "8", "--lora-modules", f"r8={qwen3['r8']}"]
    with RemoteServer(base, args) as server:
        client = server.get_client()

        def chat(content: list) -> list[int]:
            return chat_token_ids(client, "r8", content, GREEDY.max_tokens, len(ids))

        assert chat(content) == want
        tok = server.post("/tokenize", {"model": "r8", "messages": [
            {"role": "user", "content": content}]})
        assert tok.status_code == 200 and tok.json()["tokens"] == ids, tok.text
        long = [{"type": "video_url", "video_url": {"url": gif_url(paletted(3, 40, (32, 32)))}}]
        for bad, match in (
                (long, "maximum context length is 160"),
                ([{"type": "video_url", "video_url": {"url": gif_url(paletted(4, 1))}}],
                 "at least 2 frames"),
                ([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}],
                 "cannot decode the video")):
            with pytest.raises(openai.BadRequestError) as info:
                chat(bad)
            assert info.value.status_code == 400
            assert re.search(match, info.value.body["message"]), info.value.body
        assert chat(content) == want  # the server still serves


def test_default_mm_lora_for_videos(qwen3):
    """default_mm_loras {"video": adapter}: a video request naming no adapter runs under
    it (HF + PEFT's tokens); an image request stays on the base."""
    base = qwen3["base"]
    llm = make_llm(base, enable_lora=True, max_lora_rank=8,
                   default_mm_loras={"video": str(qwen3["r8"])})
    a, im = (video(1, 5), STEPS), image(2)
    outs = llm.generate([request(ASK, [], [a]), request(IMAGE_ASK, [im], [])], GREEDY,
                        use_tqdm=False)
    check(outs, base, [(ASK, [], [a], qwen3["r8"]), (IMAGE_ASK, [im], [], None)])
