"""InternVL's videos (transformers' native InternVLForConditionalGeneration) against HF
transformers (+ PEFT), fp32: the prompt ids InternVLProcessor's rule gives (each `<video>`
into "Frame{i}: <img>...</img>" lines, written into the text and tokenized with it), the
frames' pixels as one tile each, HF's frame sampling (InternVLVideoProcessor.sample_frames,
compiled from its source: the module imports torchvision, which is not installed), greedy
tokens and logprobs within 1e-4 for videos, images and text under the base and two
adapters of different ranks in one batch (whole and chunked prefill), bad videos failing
alone in the engine and over HTTP (a GIF video_url through the openai client)."""

from __future__ import annotations

import ast
import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers

from loraplex import LoRARequest
from tests.engine_utils import make_llm, refused_alone
from tests.internvl_fixtures import (
    GREEDY,
    SEQ,
    TILE,
    VIDEO_ASK,
    check_media,
    hf_inputs,
    hf_logprobs,
    make_tiny_internvl,
    media_request,
    tokenizer,
    video,
    with_adapters,
)
from tests.llava_fixtures import data_url, image
from tests.multimodal_fixtures import (
    chat_token_ids,
    check_chat_refusals,
    greedy_reference,
    our_processor,
)
from tests.server_utils import RemoteServer

pytest.importorskip("PIL")

TEXT = "USER: What is the capital of France? ASSISTANT:"
BOTH = "USER: <IMG_CONTEXT> then <video>: same scene? ASSISTANT:"
# "USER:" right before the video: HF tokenizes "USER:Frame1: " as one run of text
THEN = "USER:<video> and <IMG_CONTEXT> and<video>? ASSISTANT:"


@pytest.fixture(scope="module")
def internvl(tiny_root):
    base = make_tiny_internvl(tiny_root / "internvl_video" / "base", seed=84)
    return with_adapters(base, seed=85)


def test_prompt_and_pixels_are_hfs(internvl):
    """A video alone, an image then a video, two videos around an image with text glued
    to them: the expanded ids are HF's processor's (the same as `expanded` counts), the
    pixels HF's in prompt order, each item's placeholders its range; the expanded prompt
    given again is kept as it is, its items read in the same order; processed inputs
    whose frames or kinds are not the prompt's are refused."""
    base = internvl["base"]
    proc, tok = our_processor(base), tokenizer(str(base))
    assert proc.modalities == ("image", "video")
    wide = image(2, (50, 20))  # 3 tiles and a thumbnail
    for prompt, ims, vids in ((VIDEO_ASK, [], [video(1)]), (BOTH, [wide], [video(3, 2)]),
                              (THEN, [wide], [video(4, 4), video(5, 1)])):
        inp = hf_inputs(base, prompt, ims, True, vids)
        data = {"image": ims, "video": vids} if ims else {"video": vids}
        ids, inputs = proc.process(tok(prompt).input_ids, data)
        assert ids == inp["input_ids"][0].tolist()
        assert proc.expanded(tok(prompt).input_ids, data) == ids
        again, kept = proc.process(ids, data)  # expanded already (the chat route's way)
        assert again == ids and kept.ranges == inputs.ranges and kept.videos == inputs.videos
        proc.check(ids, inputs)  # the server's processed inputs, checked against the prompt
        k = inputs.videos[0]
        fewer = [(sz[0] - 1, 0) if i == k else sz for i, sz in enumerate(inputs.sizes)]
        for bad in (replace(inputs, sizes=fewer), replace(inputs, videos=[])):
            with pytest.raises(ValueError, match="do not match the prompt"):
                proc.check(ids, bad)
        assert torch.allclose(inputs.pixel_values, inp["pixel_values"], atol=1e-5)
        frames = [len(v) for v in vids]
        assert [inputs.sizes[k][0] for k in inputs.videos] == frames
        context = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
        assert [sum(ids[p] == context for p in range(first, first + n))
                for first, n in inputs.ranges] == [
            SEQ * (s[0] if k in inputs.videos else 4) for k, s in enumerate(inputs.sizes)]
        assert len(inputs.positions) == SEQ * (sum(frames) + 4 * len(ims))
    text = tok.decode(proc.process(tok(THEN).input_ids, {"image": [wide], "video": [
        video(4, 2), video(5, 1)]})[0])
    assert "USER:Frame1: <img>" in text and "</img>\nFrame2: <img>" in text


def _hf_sample_frames() -> Any:
    """HF's InternVLVideoProcessor.sample_frames, compiled from its source."""
    path = Path(transformers.__file__).parent / "models/internvl/video_processing_internvl.py"
    if not path.exists():
        pytest.skip(f"transformers {transformers.__version__} has no InternVL video processor")
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body
               if isinstance(n, ast.ClassDef) and n.name == "InternVLVideoProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "sample_frames")
    fn.decorator_list = []
    fn.args.args[1].annotation = None
    space: dict[str, Any] = {"torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), space)
    return space["sample_frames"]


@pytest.mark.parametrize(("total", "fps", "num_frames", "target", "shift"), [
    (10, 2.0, 4, None, True), (12, 3.0, None, 1.0, True), (7, 1.0, 7, None, 0),
    (9, 4.0, None, 2.5, 1.5), (5, 1.0, 1, None, True)])
def test_frame_sampling_is_hfs(total, fps, num_frames, target, shift):
    """sample_frames gives HF's indices: by num_frames or fps, each initial shift."""
    from loraplex.engine.internvl_videos import sample_frames

    hf = _hf_sample_frames()
    meta = SimpleNamespace(total_num_frames=total, fps=fps)
    owner = SimpleNamespace(num_frames=None, initial_shift=True)
    want = hf(owner, meta, num_frames=num_frames, fps=target, initial_shift=shift)
    assert sample_frames(total, fps, num_frames, target, shift) == want.tolist()


def test_sampled_video_prompt(internvl, tmp_path):
    """A processor config with fps 1: metadata `do_sample_frames` picks HF's frames of
    the frames given (2 of 6 at 3 fps, half a step in: 1 and 4), the prompt theirs; without
    the flag, or with no num_frames / fps to sample by, the frames are taken as given;
    sampling by fps without the video's, or more frames than it has: refused."""
    base = Path(shutil.copytree(internvl["base"], tmp_path / "fps"))
    path = base / "video_preprocessor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "fps": 1}))
    proc, tok = our_processor(base), tokenizer(str(base))
    clip = video(6, 6)
    ids, inputs = proc.process(tok(VIDEO_ASK).input_ids, {"video": [
        (clip, {"fps": 3.0, "do_sample_frames": True})]})
    inp = hf_inputs(base, VIDEO_ASK, [], True, [clip[[1, 4]]])
    assert ids == inp["input_ids"][0].tolist()
    assert torch.allclose(inputs.pixel_values, inp["pixel_values"], atol=1e-5)
    ids, _ = proc.process(tok(VIDEO_ASK).input_ids, {"video": [(clip, {"fps": 3.0})]})
    assert ids == hf_inputs(base, VIDEO_ASK, [], True, [clip])["input_ids"][0].tolist()
    with pytest.raises(ValueError, match="needs its metadata's fps"):
        proc.process(tok(VIDEO_ASK).input_ids, {"video": [(clip, {"do_sample_frames": True})]})
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_frames": 8}))
    with pytest.raises(ValueError, match="cannot sample 8 frames from a video of 6"):
        our_processor(base).process(tok(VIDEO_ASK).input_ids, {"video": [
            (clip, {"do_sample_frames": True})]})
    ids, _ = our_processor(internvl["base"]).process(tok(VIDEO_ASK).input_ids, {"video": [
        (clip, {"fps": 3.0, "do_sample_frames": True})]})  # nothing to sample by: as given
    assert ids == hf_inputs(base, VIDEO_ASK, [], True, [clip])["input_ids"][0].tolist()


@pytest.mark.parametrize("budget", [None, 8])
def test_mixed_batch_matches_hf(budget, internvl):
    """Videos under the base and r8, an image + video under r4, two videos around an
    image, an image alone and a text request, in one batch with one adapter slot;
    budget 8: prefill chunks ending inside the frames. HF's tokens, logprobs within
    1e-4; the adapter and the video change the output."""
    base = internvl["base"]
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8,
                   max_num_batched_tokens=budget)
    a, b, c, im = video(1), video(2, 2), video(3, 4), image(4, (50, 20))
    jobs = [(VIDEO_ASK, [], [a], None), (VIDEO_ASK, [], [a], "r8"),
            (BOTH, [im], [b], "r4"), (THEN, [im], [c, b], None),
            (VIDEO_ASK, [], [c], None), (TEXT, [], [], "r8")]
    loras = {n: LoRARequest(n, i + 1, str(internvl[n])) for i, n in enumerate(("r8", "r4"))}
    outs = llm.generate([media_request(p, ims, vids) for p, ims, vids, _ in jobs], GREEDY,
                        use_tqdm=False, lora_request=[loras.get(n) for *_, n in jobs])
    check_media(outs, base, [(p, ims, vids, internvl[n] if n else None)
                             for p, ims, vids, n in jobs])
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids  # the adapter
    assert outs[0].outputs[0].token_ids != outs[4].outputs[0].token_ids  # the video


def test_bad_videos_fail_alone(internvl):
    """limit_mm_per_prompt {"video": 1}: two videos refused; a video without its
    placeholder, frames that are not [T, H, W, 3], a video too long for max_model_len:
    each fails at add_request and queues nothing; the
    good video request beside them finishes with HF's tokens."""
    base = internvl["base"]
    engine = make_llm(base, max_model_len=96, limit_mm_per_prompt={"video": 1}).llm_engine
    engine.add_request("good", media_request(VIDEO_ASK, [], [video(1)]), GREEDY)
    bad = [(media_request("<video><video>", [], [video(1), video(2)]), r"At most 1 video"),
           (media_request(TEXT, [], [video(1)]), r"0 video placeholder token\(s\) for 1 video"),
           (media_request(VIDEO_ASK, [], [video(1)[..., 0]]), r"a video must be \[frames"),
           (media_request(VIDEO_ASK, [], [video(1, 12)]), "max_model_len is 96")]
    outs = refused_alone(engine, bad, GREEDY)
    assert [o.request_id for o in outs] == ["good"]
    check_media(outs, base, [(VIDEO_ASK, [], [video(1)], None)])


def test_server_video_chat(internvl):
    """The official client's chats: a GIF video_url (frames at the tile's size) under r8
    and an image with a video on the base get HF (+ PEFT)'s greedy tokens and prompt
    counts; an undecodable video and a second video (limit 1) fail alone with a 400."""
    from tests.test_qwen_video import gif_url, paletted

    base, n = internvl["base"], GREEDY.max_tokens
    frames = paletted(7, 3, (TILE, TILE))
    clip = {"type": "video_url", "video_url": {"url": gif_url(frames)}}
    im = image(8, (50, 20))
    filmed = [clip, {"type": "text", "text": "What happens?"}]
    both = [{"type": "image_url", "image_url": {"url": data_url(im)}}, *filmed]
    turn = "<|user|>{}What happens?\n<|assistant|>"
    want = []
    for adapter, ims, text in ((internvl["r8"], [], "<video>\n"),
                               (None, [im], "<IMG_CONTEXT>\n<video>\n")):
        inp = hf_inputs(base, turn.format(text), ims, False, [frames])
        want.append((len(inp["input_ids"][0]), greedy_reference(
            lambda r, a=adapter, i=inp: hf_logprobs(base, a, i, r), n)))
    args = ["--max-model-len", "512", "--dtype", "float32", "--enable-lora",
            "--max-lora-rank", "8", "--lora-modules", f"r8={internvl['r8']}",
            "--limit-mm-per-prompt", '{"image": 1, "video": 1}']
    with RemoteServer(base, args) as server:
        client = server.get_client()
        assert chat_token_ids(client, "r8", filmed, n, want[0][0]) == want[0][1]
        check_chat_refusals(client, "r8", [
            ([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}],
             "cannot decode the video"),
            ([*filmed, clip], "At most 1 video")], n)
        assert chat_token_ids(client, str(base), both, n, want[1][0]) == want[1][1]


def test_frame_text_tokenized_with_the_prompts(internvl, tmp_path):
    """A tokenizer with " Frame" as one token: "USER: " before a `<video>` and the first
    frame's "Frame1: " are one text to HF, so they give that token (tokenized apart
    they would not); later frames' "\\nFrame{i}: " stand between `</img>` and `<img>`."""
    base = Path(shutil.copytree(internvl["base"], tmp_path / "merged"))
    tok = tokenizer(str(internvl["base"]))
    tok = type(tok).from_pretrained(str(base))
    tok.add_tokens([" Frame"])
    tok.save_pretrained(str(base))
    proc, tok = our_processor(base), tokenizer(str(base))
    ids, _ = proc.process(tok(VIDEO_ASK).input_ids, {"video": [video(1)]})
    assert ids == hf_inputs(base, VIDEO_ASK, [], True, [video(1)])["input_ids"][0].tolist()
    assert ids.count(tok.convert_tokens_to_ids(" Frame")) == 1
