"""Qwen2.5-VL and Qwen2-VL with videos (vLLM's multi_modal_data={"video": frames}), against
HF transformers (+ PEFT) on the same weights, fp32: the video patches against HF's own
patchify and the image processor's pixels, the tower's video embeddings against HF's
get_video_features, the M-RoPE positions against HF's get_rope_index with videos (and
second_per_grid_ts), greedy tokens HF's and logprobs within 1e-4 for video, video +
image, image and text prompts under the base and two adapters over one slot, whole and
chunked; prefix caching keyed on the video; limit_mm_per_prompt's "video"; bad videos
fail alone.

HF's Qwen2VLVideoProcessor imports torchvision, which this environment lacks: the
reference's pixel_values_videos are loraplex's (engine/qwen_videos.py), whose layout is
checked against HF's patchify and smart_resize (their source, compiled here)."""

from __future__ import annotations

import ast
import base64
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import torch
import transformers

from loraplex import LoRARequest
from loraplex.engine.qwen_images import QwenImageProcessor
from loraplex.engine.qwen_videos import QwenVideoProcessor
from loraplex.models.mrope import mrope_positions
from loraplex.models.qwen2_vl import QwenVisionConfig
from tests.engine_utils import make_llm, refused_alone
from tests.llava_fixtures import data_url, image
from tests.multimodal_fixtures import (
    assert_matches_reference,
    chat_token_ids,
    greedy_reference,
    hf_multimodal,
)
from tests.qwen2_vl_fixtures import (
    CHAT_TEMPLATE,
    GREEDY,
    IMAGE,
    hf_logprobs,
    image_processor,
    make_tiny_qwen_vl,
    tokenizer,
    with_adapters,
)
from tests.server_utils import RemoteServer
from tests.test_qwen2_vl import _tower

pytest.importorskip("PIL")
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
ASK = f"USER: {VIDEO}What happens? ASSISTANT:"
BOTH = f"USER: {IMAGE} then {VIDEO}: same scene? ASSISTANT:"
THEN = f"USER: {VIDEO} and {IMAGE} and {VIDEO}? ASSISTANT:"
IMAGE_ASK = f"USER: {IMAGE}What is this? ASSISTANT:"
TEXT = "USER: What is the capital of France? ASSISTANT:"
# the video processor's own bounds (not the image processor's): 1024 pixels a frame
VIDEO_CONFIG = {"video_processor_type": "Qwen2VLVideoProcessor",
                "size": {"shortest_edge": 64, "longest_edge": 1024}, "patch_size": 4,
                "temporal_patch_size": 2, "merge_size": 2, "do_resize": True,
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "do_convert_rgb": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711]}
pytestmark = pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                                reason="transformers 5's get_rope_index")


def video(seed: int, frames: int = 4, size: tuple[int, int] = (24, 16)) -> np.ndarray:
    """[frames, H, W, 3] uint8 random frames (size: (width, height), already the
    processor's multiple of 8 unless asked otherwise)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (frames, size[1], size[0], 3), dtype=np.uint8)


# the fixtures' template, reading video parts too (as Qwen's own templates do)
VIDEO_TEMPLATE = CHAT_TEMPLATE.replace(
    "{% elif content['type'] == 'text' %}",
    "{% elif content['type'] == 'video' %}" + VIDEO + "{% elif content['type'] == 'text' %}")


def paletted(seed: int, frames: int = 4, size: tuple[int, int] = (24, 16)) -> np.ndarray:
    """Random frames of 16 colours: a GIF holds them exactly."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    return palette[rng.integers(0, 16, (frames, size[1], size[0]))]


def gif_url(frames: np.ndarray, ms: int = 500) -> str:
    """An animated GIF data URL of the frames, `ms` each (500: 2 fps)."""
    from PIL import Image

    ims = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    ims[0].save(buf, format="GIF", save_all=True, append_images=ims[1:], duration=ms, loop=0)
    return "data:image/gif;base64," + base64.b64encode(buf.getvalue()).decode()


def _with_video_config(base: Path) -> Path:
    (base / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_CONFIG))
    return base


@pytest.fixture(scope="module")
def qwen25(tiny_root):
    base = _with_video_config(make_tiny_qwen_vl(tiny_root / "qwen25vl_video" / "base",
                                                seed=170))
    return with_adapters(base, seed=171)


@pytest.fixture(scope="module")
def qwen2(tiny_root):
    base = _with_video_config(make_tiny_qwen_vl(tiny_root / "qwen2vl_video" / "base",
                                                seed=172, qwen25=False))
    return with_adapters(base, seed=173)


def _processor(base: Path) -> QwenImageProcessor:
    return QwenImageProcessor(str(base), QwenVisionConfig.from_hf(
        hf_multimodal(str(base), None).config))


def hf_inputs(base: Path, prompt: str, images: list, videos: list,
              add_special_tokens: bool = True) -> dict[str, torch.Tensor]:
    """The reference's inputs: the prompt's ids with each image's and video's pad
    expanded (Qwen2_5_VLProcessor's rule), HF's image pixels, the videos' patches and
    grids, second_per_grid_ts (temporal_patch_size / 24 fps, HF's default without
    metadata) and mm_token_type_ids (1 image, 2 video)."""
    tok = tokenizer(str(base))
    ids = tok(prompt, add_special_tokens=add_special_tokens).input_ids
    pad, vpad = tok.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"])
    out: dict[str, Any] = {}
    counts: dict[int, Any] = {}
    if images:
        out = dict(image_processor(str(base))(images=images, return_tensors="pt"))
        counts[pad] = iter((out["image_grid_thw"].prod(-1) // 4).tolist())
    if videos:
        proc = QwenVideoProcessor(str(base), _processor(base).config)
        done = [proc(v) for v in videos]
        out["pixel_values_videos"] = torch.cat([v.patches for v in done])
        out["video_grid_thw"] = torch.tensor([v.grid for v in done])
        out["second_per_grid_ts"] = torch.tensor([v.second_per_grid_t for v in done])
        counts[vpad] = iter((out["video_grid_thw"].prod(-1) // 4).tolist())
    ids = [x for t in ids for x in ([t] * next(counts[t]) if t in counts else [t])]
    out["input_ids"] = torch.tensor([ids])
    out["mm_token_type_ids"] = ((out["input_ids"] == pad).int()
                                + 2 * (out["input_ids"] == vpad).int())
    return out


@torch.no_grad()
def check(outs, base: Path, jobs: list[tuple[str, list, list, Path | None]],
          add_special_tokens: bool = True) -> None:
    for out, (prompt, ims, vids, adapter) in zip(outs, jobs, strict=True):
        inp = hf_inputs(base, prompt, ims, vids, add_special_tokens)
        ids = inp["input_ids"][0].tolist()
        assert out.prompt_token_ids == ids
        got = out.outputs[0].token_ids
        ref = reference_logprobs(base, adapter, inp, got[:-1])[len(ids) - 1:]
        assert_matches_reference(out, ref, adapter)


def reference_logprobs(base: Path, adapter: Path | None, inputs: dict[str, torch.Tensor],
                       more: list[int]) -> torch.Tensor:
    """HF (+ PEFT)'s log-softmax over the prompt and `more` tokens, at the positions of
    Qwen's rule (_reference_positions): this transformers' own differ after a video
    whose positions reach past its longest side (a slow one, as the 2 fps ones here)."""
    whole = {**inputs, "input_ids": torch.tensor([inputs["input_ids"][0].tolist() + more])}
    positions, _ = _reference_positions(whole, _processor(base).config)
    return hf_logprobs(base, adapter, inputs, more, positions)


def request(prompt: str, images: list, videos: list) -> dict | str:
    data: dict[str, Any] = {}
    if images:
        data["image"] = images
    if videos:
        data["video"] = videos[0] if len(videos) == 1 else videos
    return {"prompt": prompt, "multi_modal_data": data} if data else prompt


def _hf_video_functions() -> tuple[Any, Any]:
    """HF's smart_resize and Qwen2VLVideoProcessor.patchify, compiled from their source
    (the module imports torchvision, which is not installed)."""
    path = Path(transformers.__file__).parent / "models/qwen2_vl/video_processing_qwen2_vl.py"
    tree = ast.parse(path.read_text())
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "smart_resize"]
    cls = next(n for n in tree.body
               if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    funcs += [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "patchify"]
    assert len(funcs) == 2
    space: dict[str, Any] = {"torch": torch, "math": math}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), str(path), "exec"), space)
    return space["smart_resize"], space["patchify"]


def test_video_config_where_hf_finds_it(qwen25, tmp_path):
    """processor_config.json's nested video_processor, else
    video_preprocessor_config.json, else the image processor's config (its min / max
    pixels); size's older min_pixels / max_pixels keys too."""
    base = qwen25["base"]
    c = _processor(base).config

    def bounds(files: dict[str, dict]) -> tuple[int, int]:
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        for name, body in files.items():
            (d / name).write_text(json.dumps(body))
        proc = QwenVideoProcessor(str(d), c)
        return proc.min_pixels, proc.max_pixels

    still = {"min_pixels": 100, "max_pixels": 2000, "patch_size": 4, "merge_size": 2}
    assert bounds({"preprocessor_config.json": still}) == (100, 2000)
    assert bounds({"preprocessor_config.json": still,
                   "video_preprocessor_config.json": VIDEO_CONFIG}) == (64, 1024)
    assert bounds({"preprocessor_config.json": still,
                   "video_preprocessor_config.json": VIDEO_CONFIG,
                   "processor_config.json": {"video_processor": {
                       "size": {"min_pixels": 32, "max_pixels": 512}}}}) == (32, 512)
    assert QwenVideoProcessor(str(base), c).max_pixels == 1024  # the fixture's


def test_video_patches_are_hfs(qwen25):
    """The patches in HF's patchify order (frames padded by the last one), the resize
    size HF's smart_resize under the video config's bounds, and a still video's patches
    the image processor's pixels of that image (its frame repeated)."""
    base = qwen25["base"]
    proc = QwenVideoProcessor(str(base), _processor(base).config)
    smart_resize, patchify = _hf_video_functions()
    for frames in (video(1, 4), video(2, 3, (40, 24))):
        got = proc(frames)
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
        mean = torch.tensor(VIDEO_CONFIG["image_mean"])[:, None, None] * 255
        std = torch.tensor(VIDEO_CONFIG["image_std"])[:, None, None] * 255
        ref, *grid = patchify(None, ((x - mean) / std)[None], 4, 2, 2)
        assert got.grid == tuple(grid) and torch.equal(got.patches, ref[0])
    for size in ((30, 44), (200, 90)):
        assert proc.size(2, *size) == smart_resize(*size, 8, 64, 1024)
    resized = proc(video(3, 3, (44, 30)))
    assert resized.grid == (2, 6, 8) and resized.patches.shape[0] == 96
    still = image(4, (24, 16))
    frames = np.stack([np.asarray(still)] * 2)
    pixels = image_processor(str(base))(images=[still], return_tensors="pt")["pixel_values"]
    assert torch.allclose(proc(frames).patches, pixels, atol=1e-5)


@pytest.mark.parametrize("which", ["qwen25", "qwen2"])
def test_video_embeddings_match_hf(which, request):
    """A video (several temporal patches, windows: Qwen2.5-VL) and an image in one tower
    call give HF's get_video_features and get_image_features within 1e-5."""
    base = request.getfixturevalue(which)["base"]
    ours, hf = _tower(base)
    inp = hf_inputs(base, BOTH, [image(1, (52, 40))], [video(2, 6, (32, 24))])
    with torch.no_grad():
        vid = hf.get_video_features(inp["pixel_values_videos"], inp["video_grid_thw"],
                                    return_dict=True).pooler_output
        img = hf.get_image_features(inp["pixel_values"], inp["image_grid_thw"],
                                    return_dict=True).pooler_output
    grids = [tuple(g) for g in inp["image_grid_thw"].tolist()] + [
        tuple(g) for g in inp["video_grid_thw"].tolist()]
    assert grids[1][0] == 3
    got = ours(torch.cat([inp["pixel_values"], inp["pixel_values_videos"]]), grids)
    ref = torch.cat([*img, *vid])
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


@pytest.mark.parametrize("which", ["qwen25", "qwen2"])
def test_positions_match_hf_get_rope_index(which, request):
    """Video, image + video, two videos of other fps (metadata) around an image: 3-D
    positions and delta HF's (Qwen2.5-VL: temporal steps of tokens_per_second x
    second_per_grid_t; Qwen2-VL: 1)."""
    base = request.getfixturevalue(which)["base"]
    hf = hf_multimodal(str(base), None)
    proc = _processor(base)
    c = proc.config
    assert c.tokens_per_second == (hf.config.vision_config.tokens_per_second
                                   if which == "qwen25" else 0)
    slow = (video(5, 5, (16, 16)), {"fps": 2.0})
    for prompt, ims, vids in ((ASK, [], [video(1, 6)]), (BOTH, [image(2)], [video(3)]),
                              (THEN, [image(4, (40, 24))], [video(5, 2), slow])):
        ids, inputs = proc(tokenizer(str(base))(prompt).input_ids, ims or None, videos=vids)
        inp = hf_inputs(base, prompt, ims, [v if isinstance(v, np.ndarray) else v[0]
                                            for v in vids])
        if prompt == THEN:  # the second video's fps: 2, not 24
            inp["second_per_grid_ts"] = torch.tensor([2 / 24, 2 / 2.0])
        assert ids == inp["input_ids"][0].tolist()
        ref, delta = hf.model.get_rope_index(
            inp["input_ids"], inp["mm_token_type_ids"], inp.get("image_grid_thw"),
            inp["video_grid_thw"], second_per_grid_ts=inp.get("second_per_grid_ts"))
        want, want_delta = _reference_positions(inp, c)
        assert torch.equal(inputs.mrope, want) and inputs.mrope_delta == want_delta
        if prompt != THEN:  # no video reaching past its longest side: HF's rule agrees
            assert torch.equal(inputs.mrope, ref[:, 0]) and inputs.mrope_delta == int(delta)
        else:  # the slow video's text: this transformers restarts it inside the video
            differs = (inputs.mrope != ref[:, 0]).any(0).nonzero()[:, 0].tolist()
            assert differs and min(differs) == inputs.ranges[-1][0] + inputs.ranges[-1][1]
        if which == "qwen25" and prompt == THEN:  # 2 fps: tokens_per_second apart
            first, n = inputs.ranges[-1]
            steps = inputs.mrope[0, first:first + n].unique().diff()
            assert len(steps) == 2 and (steps == c.tokens_per_second).all()
    # the plain function, too
    got, d = mrope_positions([7, c.video_token_id, c.video_token_id, 7], c.image_token_id,
                             [], c.merge_size, c.video_token_id, [(2, 2, 2)], [25.0])
    assert got[0].tolist() == [0, 1, 26, 27] and d == 27 + 1 - 4


def _reference_positions(inp: dict, c: Any) -> tuple[torch.Tensor, int]:
    """Qwen's reference rule (its get_rope_index, transformers <= 5.2, vLLM): text
    continues one past the largest position so far; a video's temporal patch i at
    int(i x second_per_grid_t x tokens_per_second) (Qwen2-VL, no tokens_per_second: i)."""
    ids = inp["input_ids"][0].tolist()
    images = iter(inp.get("image_grid_thw", torch.zeros(0, 3)).tolist())
    videos = iter(inp.get("video_grid_thw", torch.zeros(0, 3)).tolist())
    given = inp.get("second_per_grid_ts")
    seconds = iter((given if given is not None else torch.ones(99)).tolist())
    pieces, i, pos = [], 0, 0
    while i < len(ids):
        if ids[i] in (c.image_token_id, c.video_token_id):
            t, h, w = next(images if ids[i] == c.image_token_id else videos)
            step = 1.0 if ids[i] == c.image_token_id or not c.tokens_per_second else \
                next(seconds) * c.tokens_per_second
            h, w = h // c.merge_size, w // c.merge_size
            tt = (torch.arange(t).view(-1, 1).expand(-1, h * w) * step).long().flatten()
            hh = torch.arange(h).view(1, -1, 1).expand(t, -1, w).flatten()
            ww = torch.arange(w).view(1, 1, -1).expand(t, h, -1).flatten()
            pieces.append(torch.stack([tt, hh, ww]) + pos)
            i += t * h * w
        else:
            pieces.append(torch.tensor([[pos]] * 3))
            i += 1
        pos = int(pieces[-1].max()) + 1
    out = torch.cat(pieces, dim=1)
    return out, int(out.max()) + 1 - len(ids)


@pytest.mark.parametrize("budget", [None, 16])
def test_mixed_batch_matches_hf(budget, qwen25):
    """Video requests under the base and two adapters (ranks 8 and 4, one slot), an image
    and a video in one prompt, two videos around an image, an image and a text request in
    one call; budget 16: chunked prefill cuts videos' placeholders and positions."""
    base = qwen25["base"]
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8,
                   max_num_batched_tokens=budget)
    a, b = video(1), video(2, 6, (32, 24))
    im = image(3, (52, 40))
    jobs = [(ASK, [], [a], None), (ASK, [], [a], "r8"), (ASK, [], [a], "r4"),
            (ASK, [], [b], "r8"), (BOTH, [im], [b], None), (THEN, [im], [b, a], "r4"),
            (IMAGE_ASK, [im], [], "r8"), (TEXT, [], [], None)]
    loras = {"r8": LoRARequest("r8", 1, str(qwen25["r8"])),
             "r4": LoRARequest("r4", 2, str(qwen25["r4"]))}
    outs = llm.generate([request(p, ims, vids) for p, ims, vids, _ in jobs], GREEDY,
                        use_tqdm=False,
                        lora_request=[loras[n] if n else None for *_, n in jobs])
    check(outs, base, [(p, ims, vids, qwen25[n] if n else None) for p, ims, vids, n in jobs])
    assert len({tuple(o.outputs[0].token_ids) for o in outs[:3]}) == 3
    assert outs[1].outputs[0].token_ids != outs[3].outputs[0].token_ids


def test_qwen2_vl_video_matches_hf(qwen2):
    """Qwen2-VL (no windows; temporal positions by 1), base and an adapter, chunked."""
    base = qwen2["base"]
    llm = make_llm(base, enable_lora=True, max_lora_rank=8, max_num_batched_tokens=16)
    a, b = video(1), video(2, 6, (32, 24))
    jobs = [(ASK, [], [b], None), (ASK, [], [b], "r8"), (BOTH, [image(3)], [a], "r4"),
            (TEXT, [], [], None)]
    loras = {"r8": LoRARequest("r8", 1, str(qwen2["r8"])),
             "r4": LoRARequest("r4", 2, str(qwen2["r4"]))}
    outs = llm.generate([request(p, ims, vids) for p, ims, vids, _ in jobs], GREEDY,
                        use_tqdm=False,
                        lora_request=[loras[n] if n else None for *_, n in jobs])
    check(outs, base, [(p, ims, vids, qwen2[n] if n else None) for p, ims, vids, n in jobs])


def test_frames_as_pil_images_and_metadata(qwen25):
    """A list of PIL frames is the same video as its array; (frames, {"fps": 2}) spaces
    its positions by 2 fps (the reference's second_per_grid_ts 1.0)."""
    base = qwen25["base"]
    llm = make_llm(base)
    from PIL import Image

    a = video(1)
    pil = [Image.fromarray(f) for f in a]
    outs = llm.generate([request(ASK, [], [a]), request(ASK, [], [pil]),
                         request(ASK, [], [(a, {"fps": 2.0})])], GREEDY, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    check(outs[:1], base, [(ASK, [], [a], None)])
    inp = hf_inputs(base, ASK, [], [a])
    inp["second_per_grid_ts"] = torch.tensor([1.0])
    got = outs[2].outputs[0].token_ids
    # at 2 fps the video's positions reach past its longest side: Qwen's rule for the
    # text after it (see test_positions_match_hf_get_rope_index), given to HF
    ref = reference_logprobs(base, None, inp, got[:-1])[inp["input_ids"].shape[1] - 1:]
    assert_matches_reference(outs[2], ref, None)


def test_prefix_cache_never_shares_across_videos(qwen25):
    """The same text with another video of the same size: only the blocks before it are
    shared; the same video again: all but the last block; the same frames at another fps
    (other temporal positions): only the blocks before it."""
    base = qwen25["base"]
    llm = make_llm(base, enable_prefix_caching=True, block_size=8)
    prompt = "USER: Once upon a time there was a little girl who lived. " + ASK[6:]
    a, b = video(1), video(2)
    vids = [a, b, a, (a, {"fps": 2.0})]
    runs = [llm.generate([request(prompt, [], [v])], GREEDY, use_tqdm=False)[0] for v in vids]
    check(runs[:3], base, [(prompt, [], [v], None) for v in vids[:3]])
    ids = runs[0].prompt_token_ids
    first = ids.index(llm.get_tokenizer().convert_tokens_to_ids("<|video_pad|>"))
    assert runs[0].num_cached_tokens == 0
    assert runs[1].num_cached_tokens == first // 8 * 8 > 0
    assert runs[2].num_cached_tokens == (len(ids) - 1) // 8 * 8
    assert runs[3].num_cached_tokens == first // 8 * 8
    assert runs[0].outputs[0].token_ids != runs[1].outputs[0].token_ids


def test_limit_mm_per_prompt_video(qwen25):
    """{"video": 0} refuses videos and still serves images; {"video": 1} refuses two;
    {"image": 0} still serves videos (the tower is built for them)."""
    base = qwen25["base"]
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


def test_placeholder_texts(qwen25):
    """What a chat's text puts where an image / a video goes (the engine asks its
    processor, engine/multimodal_processor.py); no audio here."""
    engine = make_llm(qwen25["base"]).llm_engine
    assert (engine.image_placeholder, engine.video_placeholder, engine.audio_placeholder) \
        == ("<|image_pad|>", "<|video_pad|>", None)
    assert engine.modalities == ("image", "video")


def test_bad_videos_fail_alone(qwen25):
    """Each bad video raises at add_request with a clear error and queues nothing; the
    good request beside them finishes with HF's tokens."""
    base = qwen25["base"]
    llm = make_llm(base)
    engine = llm.llm_engine
    engine.add_request("good", request(ASK, [], [video(1)]), GREEDY)
    ids, processed = engine.image_processor(engine.tokenizer.encode(IMAGE_ASK), [image(1)])
    bad = [(request(ASK, [], [video(1)[..., :2]]), r"\[frames, height, width, 3\]"),
           # processed inputs (the server's) beside raw videos: refused, not half taken
           ({"prompt_token_ids": ids, "multi_modal_data": {"image": processed,
                                                           "video": video(1)}},
            "got ImageInputs"),
           (request(ASK, [], [[image(1), image(2, (16, 16))]]), "one size"),
           (request(TEXT, [], [video(1)]), r"0 video placeholder token\(s\).*for 1 video"),
           (request(f"{VIDEO}{VIDEO}", [], [video(1)]), r"2 video placeholder"),
           ({"prompt": ASK, "multi_modal_data": {"video": "clip.mp4"}}, "'video' must be"),
           ({"prompt": ASK, "multi_modal_data": {"video": (video(1), {"fps": -1})}},
            "fps must be positive")]
    outs = refused_alone(engine, bad, GREEDY)
    assert [o.request_id for o in outs] == ["good"]
    check(outs, base, [(ASK, [], [video(1)], None)])


def test_chat_with_video_url_parts(qwen25):
    """LLM.chat with an animated GIF video_url (decoded by PIL, its 2 fps in the
    positions) beside an image: HF's tokens; bytes that are no video fail with a clear
    error (video files: tests/test_video_files.py)."""
    from loraplex.engine.video_decode import load_video

    base = qwen25["base"]
    llm = make_llm(base)
    frames, im = paletted(1), image(3)
    got, meta = load_video(gif_url(frames))
    assert np.array_equal(got, frames) and meta["fps"] == 2.0
    assert meta["frames_indices"] == [0, 1, 2, 3] and meta["total_num_frames"] == 4
    conv = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": gif_url(frames)}},
        {"type": "text", "text": "What happens? And "},
        {"type": "image_url", "image_url": {"url": data_url(im)}}]}]
    outs = llm.chat(conv, GREEDY, use_tqdm=False, chat_template=VIDEO_TEMPLATE)
    text = f"<|im_start|>user\n{VIDEO}What happens? And {IMAGE}<|im_end|>\n<|im_start|>assistant\n"
    check(outs, base, [(text, [im], [(frames, {"fps": 2.0})], None)], add_special_tokens=False)
    mp4 = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAAIGZ0eXA="}}]}]
    with pytest.raises(ValueError, match="cannot decode the video"):
        llm.chat(mp4, GREEDY, use_tqdm=False, chat_template=VIDEO_TEMPLATE)


def test_server_chat_with_video_url(qwen25):
    """The official client's chat request with a GIF video_url gets HF's greedy tokens
    and /tokenize the expanded ids; an undecodable video, or more videos than
    --limit-mm-per-prompt allows, fail alone with a 400."""
    base = qwen25["base"]
    frames = paletted(2)
    content = [{"type": "video_url", "video_url": {"url": gif_url(frames)}},
               {"type": "text", "text": "What happens?"}]
    inp = hf_inputs(base, f"<|im_start|>user\n{VIDEO}What happens?<|im_end|>\n"
                          "<|im_start|>assistant\n", [], [(frames, {"fps": 2.0})],
                    add_special_tokens=False)
    ids = inp["input_ids"][0].tolist()
    want = greedy_reference(lambda reply: reference_logprobs(base, None, inp, reply), GREEDY.max_tokens)
    args = ["--max-model-len", "256", "--dtype", "float32", "--chat-template", VIDEO_TEMPLATE,
            "--limit-mm-per-prompt", '{"video": 1}']
    with RemoteServer(base, args) as server:
        client = server.get_client()
        model = client.models.list().data[0].id

        def chat(content: list) -> list[int]:
            return chat_token_ids(client, model, content, GREEDY.max_tokens, len(ids))

        assert chat(content) == want
        tok = server.post("/tokenize", {"model": model, "messages": [
            {"role": "user", "content": content}]})
        assert tok.status_code == 200 and tok.json()["tokens"] == ids, tok.text
        for bad, match in (
                ([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}],
                 "cannot decode the video"),
                ([content[0], content[0]], r"At most 1 video\(s\)")):
            with pytest.raises(openai.BadRequestError) as info:
                chat(bad)
            assert info.value.status_code == 400
            assert re.search(match, info.value.body["message"]), info.value.body
        assert chat(content) == want  # the server still serves


def test_default_mm_lora_for_videos(qwen25):
    """default_mm_loras {"video": adapter}: a video request naming no adapter runs under
    it (HF + PEFT's tokens); an image request stays on the base."""
    base = qwen25["base"]
    llm = make_llm(base, enable_lora=True, max_lora_rank=8,
                   default_mm_loras={"video": str(qwen25["r8"])})
    a, im = video(1), image(2)
    outs = llm.generate([request(ASK, [], [a]), request(IMAGE_ASK, [im], [])], GREEDY,
                        use_tqdm=False)
    check(outs, base, [(ASK, [], [a], qwen25["r8"]), (IMAGE_ASK, [im], [], None)])
