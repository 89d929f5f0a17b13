"""LLaVA-OneVision (LlavaOnevisionForConditionalGeneration) with images and videos, against
HF transformers' model (+ PEFT) on the same weights and HF's processor's outputs, fp32:
each `<image>` / `<video>` expanded as LlavaOnevisionProcessor expands it (the image's
anyres grid, the anyres_max budget's reduction on and off; a video's pooled frames and
newline), greedy tokens HF's and logprobs within 1e-4 for images, videos and text under
the base and two adapters of different ranks in one batch (whole and chunked prefill),
prefix caching with images, LoRA on the tower and projector, and bad images / videos
failing alone in the engine and over HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex import LoRARequest
from tests.engine_utils import make_llm, refused_alone
from tests.llava_fixtures import data_url, image
from tests.llava_onevision_fixtures import (
    ASK,
    GREEDY,
    IMAGE,
    TILE,
    VIDEO,
    VIDEO_ASK,
    check_media,
    hf_inputs,
    make_tiny_onevision,
    media_request,
    video,
)
from tests.multimodal_fixtures import (
    chat_token_ids,
    check_chat_refusals,
    greedy_reference,
    hf_logprobs,
    our_processor,
    tokenizer,
    with_adapters,
)
from tests.server_utils import RemoteServer

pytest.importorskip("PIL")

TEXT = "USER: What is the capital of France? ASSISTANT:"
BOTH = "USER: <image> then <video>: same scene? ASSISTANT:"
THEN = "USER: <video> and <image> and <video>? ASSISTANT:"
# (width, height): one tile, 1 x 2 and 2 x 1 grids (unpadded), 3 x 3 and 3 x 1 grids
# over the 2-tile budget (reduced), and sizes whose padding is odd
SIZES = [(16, 16), (40, 20), (20, 40), (48, 48), (90, 30), (33, 47), (50, 9), (7, 31)]


@pytest.fixture(scope="module")
def onevision(tiny_root):
    base = make_tiny_onevision(tiny_root / "onevision" / "base", seed=90)
    return with_adapters(base, seed=91)


@pytest.mark.parametrize("aspect", ["anyres_max_2", "anyres_max_9"])
def test_prompt_ids_are_hf_processors(aspect, onevision, tiny_root):
    """Each image size's expanded ids and tiles are HF's processor's (the budget's
    reduction on for anyres_max_2's large images, off for anyres_max_9); a
    video alone, an image then a video, two videos around an image: HF's ids, pixels in
    prompt order, each item's placeholders its range."""
    base = onevision["base"] if aspect == "anyres_max_2" else make_tiny_onevision(
        tiny_root / "onevision" / aspect, seed=92, aspect=aspect)
    proc, tok = our_processor(base), tokenizer(str(base))
    counts = []
    for size in SIZES:
        im = image(3, size)
        inp = hf_inputs(base, ASK, [im])
        ids, inputs = proc.process(tok(ASK).input_ids, {"image": [im]})
        assert ids == inp["input_ids"][0].tolist(), size
        assert torch.equal(inputs.pixel_values, inp["pixel_values"][0]), size
        counts.append(len(inputs.positions))
    reduced = aspect == "anyres_max_2"
    grid = 25 + 15 * 16  # 3 x 3 tiles of 5 x 5 patches, a newline each row
    assert (counts[3] < grid) == reduced  # 48 x 48: reduced only under the 2-tile budget
    wide = image(2, (40, 20))
    for prompt, ims, vids in ((VIDEO_ASK, [], [video(1)]), (BOTH, [wide], [video(3, 2)]),
                              (THEN, [wide], [video(4, 4), video(5, 1)])):
        inp = hf_inputs(base, prompt, ims, True, vids)
        data = {"image": ims, "video": vids} if ims else {"video": vids}
        ids, inputs = proc.process(tok(prompt).input_ids, data)
        assert ids == inp["input_ids"][0].tolist()
        assert proc.expanded(tok(prompt).input_ids, data) == ids
        again, kept = proc.process(ids, data)  # expanded already (the chat route's way)
        assert again == ids and kept.ranges == inputs.ranges and kept.videos == inputs.videos
        proc.check(ids, inputs)
        want = [p for p in (inp.get("pixel_values", [None])[0],) if p is not None]
        clips = iter(inp["pixel_values_videos"])
        frames = [next(clips) if k in inputs.videos else want[0]
                  for k in range(len(inputs.sizes))]
        assert torch.allclose(inputs.pixel_values, torch.cat(frames), atol=1e-5)
        assert [inputs.sizes[k] for k in inputs.videos] == [(len(v), 0) for v in vids]
        lengths = iter(len(v) for v in vids)
        assert [n for _, n in inputs.ranges] == [
            next(lengths) * 9 + 1 if k in inputs.videos else ids.count(tok.convert_tokens_to_ids(
                IMAGE)) // len(ims) for k in range(len(inputs.sizes))]
        bad = type(inputs)(**{**inputs.__dict__, "videos": []})
        with pytest.raises(ValueError, match="do not match the prompt"):
            proc.check(ids, bad)


@pytest.mark.parametrize("budget", [None, 16])
def test_mixed_batch_matches_hf(budget, onevision):
    """Images (one tile, unpadded grids, a reduced 3 x 3 grid) and videos under the base,
    r8 and r4, an image + video, two videos around an image, and a text request, in one
    batch with one adapter slot; budget 16: prefill chunks ending inside the images'
    and the videos' placeholders. HF's tokens, logprobs within 1e-4; the adapter, the
    image and the video change the output."""
    base = onevision["base"]
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8,
                   max_num_batched_tokens=budget)
    a, b, c = video(1), video(2, 2), video(3, 2)
    wide, big = image(4, (40, 20)), image(5, (48, 48))
    jobs = [(VIDEO_ASK, [], [a], None), (VIDEO_ASK, [], [a], "r8"),
            (ASK, [big], [], "r4"), (ASK, [wide], [], None), (BOTH, [wide], [b], "r4"),
            (THEN, [big], [b, c], None), (VIDEO_ASK, [], [c], None), (TEXT, [], [], "r8")]
    loras = {n: LoRARequest(n, i + 1, str(onevision[n])) for i, n in enumerate(("r8", "r4"))}
    outs = llm.generate([media_request(p, ims, vids) for p, ims, vids, _ in jobs], GREEDY,
                        use_tqdm=False, lora_request=[loras.get(n) for *_, n in jobs])
    check_media(outs, base, [(p, ims, vids, onevision[n] if n else None)
                             for p, ims, vids, n in jobs])
    tokens = [o.outputs[0].token_ids for o in outs]
    assert tokens[0] != tokens[1]  # the adapter
    assert tokens[0] != tokens[6]  # the video
    assert tokens[2] != [o.outputs[0].token_ids for o in llm.generate(
        media_request(ASK, [wide], []), GREEDY, use_tqdm=False,
        lora_request=loras["r4"])][0]  # the image


def test_prefix_cache_with_images(onevision):
    """Prefix caching: the same image again hits the cache (HF's tokens); another image
    (or video) behind the same text shares no block with it and gets its own output."""
    base = onevision["base"]
    llm = make_llm(base, enable_prefix_caching=True, block_size=8)
    jobs = [(ASK, [image(6, (40, 20))], []), (ASK, [image(6, (40, 20))], []),
            (ASK, [image(7, (40, 20))], []), (VIDEO_ASK, [], [video(8)]),
            (VIDEO_ASK, [], [video(9)])]
    outs = []
    for p, ims, vids in jobs:
        outs += llm.generate(media_request(p, ims, vids), GREEDY, use_tqdm=False)
    check_media(outs, base, [(p, ims, vids, None) for p, ims, vids in jobs])
    cached = [o.num_cached_tokens for o in outs]
    assert cached[1] >= 32 and cached[2] < 8 and cached[4] < 8, cached
    tokens = [o.outputs[0].token_ids for o in outs]
    assert tokens[0] == tokens[1] and tokens[0] != tokens[2] and tokens[3] != tokens[4]


def test_bad_inputs_fail_alone(onevision):
    """limit_mm_per_prompt {"video": 1}: two videos refused; a video without its
    placeholder, frames that are not [T, H, W, 3], an image count that is not the
    prompt's, an undecodable image URL, a video too long for max_model_len: each fails at
    add_request and queues nothing; the good image and video requests beside them finish
    with HF's tokens."""
    base = onevision["base"]
    engine = make_llm(base, max_model_len=128, limit_mm_per_prompt={"video": 1}).llm_engine
    engine.add_request("video", media_request(VIDEO_ASK, [], [video(1)]), GREEDY)
    engine.add_request("image", media_request(ASK, [image(2, (40, 20))], []), GREEDY)
    bad = [(media_request("<video><video>", [], [video(1), video(2)]), r"At most 1 video"),
           (media_request(TEXT, [], [video(1)]),
            r"0 video placeholder token\(s\) \(id \d+\) for 1 video"),
           (media_request(VIDEO_ASK, [], [video(1)[..., 0]]), r"a video must be \[frames"),
           (media_request(ASK, [image(1), image(2)], []),
            r"1 image placeholder token\(s\) \(id \d+\) for 2 image"),
           (media_request(ASK, ["data:image/png;base64,AAAA"], []), "cannot decode the image"),
           (media_request(VIDEO_ASK, [], [video(1, 40)]), "max_model_len is 128")]
    outs = refused_alone(engine, bad, GREEDY)
    assert sorted(o.request_id for o in outs) == ["image", "video"]
    outs.sort(key=lambda o: o.request_id)
    check_media(outs, base, [(ASK, [image(2, (40, 20))], [], None),
                             (VIDEO_ASK, [], [video(1)], None)])


def test_tower_lora_matches_hf_peft(onevision):
    """enable_tower_connector_lora: an adapter on the SigLIP tower, the projector and the
    language model, beside the base, on an image and a video: HF + PEFT's output; the
    tower's LoRA changes it."""
    from tests.multimodal_fixtures import LANGUAGE_MODEL, make_multimodal_adapter

    base = onevision["base"]
    tower = make_multimodal_adapter(
        base, base.parent / "tower", r=4, seed=93, scale=0.5,
        targets=rf".*(vision_tower.*(q_proj|fc1)|multi_modal_projector.linear_1)|"
                rf"{LANGUAGE_MODEL}(v_proj)")
    llm = make_llm(base, enable_lora=True, enable_tower_connector_lora=True,
                   max_lora_rank=8, max_loras=2)
    jobs = [(ASK, [image(4, (40, 20))], [], None), (ASK, [image(4, (40, 20))], [], tower),
            (VIDEO_ASK, [], [video(1)], tower), (VIDEO_ASK, [], [video(1)], None)]
    lora = LoRARequest("tower", 1, str(tower))
    outs = llm.generate([media_request(p, ims, vids) for p, ims, vids, _ in jobs], GREEDY,
                        use_tqdm=False, lora_request=[lora if a else None for *_, a in jobs])
    check_media(outs, base, jobs)
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids


def test_server_chat(onevision):
    """The official client's chats: an image_url under r8 and a GIF video_url with an
    image on the base get HF (+ PEFT)'s greedy tokens and prompt counts; an undecodable
    image or video and a second video (limit 1) fail alone with a 400 in OpenAI's shape."""
    from tests.test_qwen_video import gif_url, paletted

    base, n = onevision["base"], GREEDY.max_tokens
    frames = paletted(7, 3, (TILE, TILE))
    clip = {"type": "video_url", "video_url": {"url": gif_url(frames)}}
    im = image(8, (40, 20))
    pictured = [{"type": "image_url", "image_url": {"url": data_url(im)}},
                {"type": "text", "text": "What is this?"}]
    both = [pictured[0], clip, {"type": "text", "text": "What happens?"}]
    turn = "<|user|>{}\n<|assistant|>"
    want = []
    for adapter, ims, vids, text in (
            (onevision["r8"], [im], [], f"{IMAGE}\nWhat is this?"),
            (None, [im], [frames], f"{IMAGE}\n{VIDEO}\nWhat happens?")):
        inp = hf_inputs(base, turn.format(text), ims, False, vids)
        want.append((len(inp["input_ids"][0]), greedy_reference(
            lambda r, a=adapter, i=inp: hf_logprobs(base, a, i, r), n)))
    args = ["--max-model-len", "512", "--dtype", "float32", "--enable-lora",
            "--max-lora-rank", "8", "--lora-modules", f"r8={onevision['r8']}",
            "--limit-mm-per-prompt", '{"image": 1, "video": 1}']
    with RemoteServer(base, args) as server:
        client = server.get_client()
        assert chat_token_ids(client, "r8", pictured, n, want[0][0]) == want[0][1]
        check_chat_refusals(client, "r8", [
            ([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}],
             "cannot decode the video"),
            ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
             "cannot decode the image"),
            ([*both, clip], "At most 1 video")], n)
        assert chat_token_ids(client, str(base), both, n, want[1][0]) == want[1][1]


def test_video_config_it_cannot_follow_refuses_videos_only(onevision, tmp_path, caplog):
    """A video processor config that does not resize frames to the tower's tile: images
    are served (HF's tokens), videos refused with the reason, at add_request."""
    import json
    import shutil

    base = Path(shutil.copytree(onevision["base"], tmp_path / "odd_video"))
    (base / "video_preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": TILE * 2, "width": TILE * 2}}))
    with caplog.at_level("WARNING"):
        engine = make_llm(base).llm_engine
    assert "video inputs are refused" in caplog.text
    engine.add_request("image", media_request(ASK, [image(2, (40, 20))], []), GREEDY)
    outs = refused_alone(engine, [(media_request(VIDEO_ASK, [], [video(1)]),
                                   "not supported")], GREEDY)
    check_media(outs, base, [(ASK, [image(2, (40, 20))], [], None)])
