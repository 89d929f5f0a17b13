"""Video files in chat `video_url` parts (engine/video_decode.py, engine/media.py): tiny
real mp4 / webm files written by PyAV itself, decoded back (solid colours within a lossy
codec's tolerance, the sampled indices exactly), vLLM's sampling rule and metadata,
media_io_kwargs and --allowed-local-media-path as vLLM checks them, the decoder missing
(its import failing), and on Qwen2.5-VL a chat with an mp4 giving the tokens of
multi_modal_data={"video": (its decoded frames, metadata)} and HF's on those frames,
offline and over a real server (data: and file:// URLs; refused and corrupt ones fail
alone with a 400)."""

from __future__ import annotations

import base64
import importlib.util
import io
import re
import sys

import numpy as np
import openai
import pytest
import torch
import transformers

from loraplex.config import MultiModalConfig
from loraplex.engine.media import MediaConnector, fetch_media
from loraplex.engine.video_decode import VideoSampling, load_video, sample_indices
from tests.engine_utils import make_llm
from tests.llava_fixtures import data_url, image
from tests.multimodal_fixtures import assert_matches_reference, chat_token_ids, greedy_reference
from tests.qwen2_vl_fixtures import GREEDY, make_tiny_qwen_vl, tokenizer, with_adapters
from tests.server_utils import RemoteServer
from tests.test_qwen_video import (
    VIDEO,
    VIDEO_TEMPLATE,
    _with_video_config,
    check,
    gif_url,
    hf_inputs,
    paletted,
    reference_logprobs,
)

# ten frames, each its own solid colour: which frames were kept shows in the pixels
COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255],
                    [255, 0, 255], [128, 128, 128], [255, 255, 255], [0, 0, 0],
                    [255, 128, 0]], dtype=np.uint8)
SOLID = np.broadcast_to(COLOURS[:, None, None, :], (10, 16, 24, 3)).copy()
CONTAINERS = {"mp4": ("mp4", "libx264"), "webm": ("webm", "libvpx-vp9")}
FOUR = '{"video": {"num_frames": 4}}'


def write_video(frames: np.ndarray, container: str = "mp4", fps: int = 5) -> bytes:
    """The frames ([T, H, W, 3] uint8) encoded by PyAV into `container` (CONTAINERS)."""
    av = pytest.importorskip("av")
    fmt, codec = CONTAINERS[container]
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


def video_url(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def test_sample_indices_are_vllms():
    """vLLM's OpenCV loader's rule: min(num_frames, total), capped at floor(duration x
    fps) when fps > 0, at least one; all frames in order when that is every one, else
    np.linspace(0, total - 1, n) as ints."""
    def idx(total: int, duration: float, num_frames: int, fps: float = -1) -> list[int]:
        return sample_indices(total, duration, VideoSampling(num_frames, fps))

    assert idx(10, 2.0, 4) == [0, 3, 6, 9]
    assert idx(10, 2.0, 3) == [0, 4, 9]
    assert idx(100, 4.0, 32) == np.linspace(0, 99, 32, dtype=int).tolist()
    assert idx(10, 2.0, 32) == list(range(10)) == idx(10, 2.0, -1)
    assert idx(10, 2.0, 1) == [0]
    assert idx(10, 2.0, -1, fps=1) == [0, 9]  # floor(2 s x 1 fps)
    assert idx(10, 2.0, 3, fps=4) == [0, 4, 9]  # num_frames is the smaller cap
    assert idx(10, 0.1, -1, fps=1) == [0]  # floor(0.1) = 0, at least one


@pytest.mark.parametrize("container", list(CONTAINERS))
def test_decoded_frames_and_metadata(container):
    """A real video file's frames decoded back: the kept ones' colours (within the
    codec's loss), vLLM's metadata, and every frame with num_frames -1."""
    data = write_video(SOLID, container)
    frames, meta = load_video(video_url(data, f"video/{container}"),
                              sampling=VideoSampling(4))
    assert meta == {"total_num_frames": 10, "fps": 5.0, "duration": 2.0,
                    "video_backend": "pyav", "frames_indices": [0, 3, 6, 9],
                    "do_sample_frames": False}
    assert frames.dtype == np.uint8 and frames.shape == (4, 16, 24, 3)
    assert np.abs(frames.astype(int) - SOLID[[0, 3, 6, 9]]).max() <= 12
    every, meta = load_video(video_url(data), sampling=VideoSampling(-1))
    assert meta["frames_indices"] == list(range(10)) and meta["do_sample_frames"]
    assert np.abs(every.astype(int) - SOLID).max() <= 12
    _, meta = load_video(video_url(data), sampling=VideoSampling(-1, fps=1.0))
    assert meta["frames_indices"] == [0, 9]


# HF's VideoMetadata.sampled_fps and Qwen-VL's video positions: transformers 5.x (the Qwen
# video tests' reference, tests/test_qwen_video.py)
NEEDS_TRANSFORMERS_5 = pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                                          reason="HF's video reference is transformers 5.x's")


@NEEDS_TRANSFORMERS_5
def test_sampled_fps_is_hfs(qwen):
    """The kept frames' rate the positions use is HF's VideoMetadata.sampled_fps of the
    metadata: 4 of 10 frames at 5 fps are 2 fps, a temporal patch (2 frames) 1 s."""
    from transformers.video_utils import VideoMetadata

    from loraplex.engine.qwen_videos import QwenVideoProcessor, _sampled_fps
    from tests.test_qwen_video import _processor

    frames, meta = load_video(video_url(write_video(SOLID)), sampling=VideoSampling(4))
    hf = VideoMetadata(**{k: meta[k] for k in ("total_num_frames", "fps", "duration",
                                               "frames_indices")})
    assert _sampled_fps(meta) == hf.sampled_fps == 2.0
    proc = QwenVideoProcessor(str(qwen["base"]), _processor(qwen["base"]).config)
    assert proc((frames, meta)).second_per_grid_t == 1.0


def test_gif_sampled_alike():
    """An animated GIF (PIL, no PyAV needed) is sampled by the same rule, its fps from
    its frames' durations."""
    frames = paletted(5, frames=6)
    got, meta = load_video(gif_url(frames, ms=250), sampling=VideoSampling(3))
    assert np.array_equal(got, frames[[0, 2, 5]])
    assert meta == {"total_num_frames": 6, "fps": 4.0, "duration": 1.5,
                    "video_backend": "pil", "frames_indices": [0, 2, 5],
                    "do_sample_frames": False}


def test_no_decoder_names_the_extra(monkeypatch):
    """Without PyAV (its import failing) a video file is a ValueError naming the extra;
    an animated GIF still decodes."""
    has_av = importlib.util.find_spec("av") is not None
    mp4 = video_url(write_video(SOLID)) if has_av else "data:video/mp4;base64,AAAAIGZ0eXA="
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    with pytest.raises(ValueError, match=re.escape("pip install 'loraplex[video]'")):
        load_video(mp4)
    got, _ = load_video(gif_url(paletted(1)))
    assert np.array_equal(got, paletted(1))


def test_corrupt_and_non_video_bytes():
    """Bytes no decoder reads, and a file cut short, are ValueErrors."""
    pytest.importorskip("av")
    data = write_video(SOLID)
    for bad in (b"\x00\x00\x00\x20ftypisom" + b"\x00" * 64, data[: len(data) // 3]):
        with pytest.raises(ValueError, match="cannot decode the video"):
            load_video(video_url(bad))


def test_options_as_vllm_checks_them(tmp_path):
    """media_io_kwargs' video num_frames / fps (JSON too) and --allowed-local-media-path
    (vLLM's wording) checked at start-up; the directory kept resolved."""
    mm = MultiModalConfig.from_args(None, None, str(tmp_path / "."), FOUR)
    assert (mm.video_num_frames, mm.video_fps) == (4, -1.0)
    assert mm.allowed_local_media_path == str(tmp_path.resolve())
    assert MultiModalConfig.from_args(None, None).video_num_frames == 32  # vLLM's default
    assert MultiModalConfig.from_args(
        None, None, media_io_kwargs={"video": {"num_frames": -1, "fps": 2}}).video_fps == 2.0
    for kwargs, match in (({"video": {"num_frames": 0}}, "num_frames must be"),
                          ({"video": {"fps": 0}}, "fps must be"),
                          ({"video": {"frames": 4}}, "unknown option 'frames'"),
                          ({"audio": {}}, "only \"video\""),
                          ("{not json", "not valid JSON")):
        with pytest.raises(ValueError, match=match):
            MultiModalConfig.from_args(None, None, media_io_kwargs=kwargs)
    (tmp_path / "f").write_text("x")
    for path, match in ((tmp_path / "nope", "does not exist"),
                        (tmp_path / "f", "must be a directory")):
        with pytest.raises(ValueError, match=re.escape(
                f"Invalid `--allowed-local-media-path`: The path {path}")) as info:
            MultiModalConfig.from_args(None, None, str(path))
        assert match in str(info.value)


def test_file_urls_under_the_allowed_path(tmp_path):
    """file:// is read only below the allowed directory, after resolving `..` and
    symlinks (a link inside to a file outside is refused; a link to the directory
    itself is followed); without the flag, or in multi_modal_data, it is refused."""
    allowed, outside = tmp_path / "media", tmp_path / "other"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    (allowed / "sub" / "a.bin").write_bytes(b"inside")
    (outside / "b.bin").write_bytes(b"outside")
    (allowed / "link.bin").symlink_to(outside / "b.bin")
    (tmp_path / "alias").symlink_to(allowed)
    conn = MediaConnector(MultiModalConfig.from_args(
        None, None, str(tmp_path / "alias")).allowed_local_media_path)
    assert conn.fetch(f"file://{allowed}/sub/a.bin", "video") == (b"inside", "")
    assert conn.fetch(f"file://{tmp_path}/alias/sub/a.bin", "video")[0] == b"inside"
    for url in (f"file://{outside}/b.bin", f"file://{allowed}/sub/../../other/b.bin",
                f"file://{allowed}/link.bin", f"file://{allowed}"):
        with pytest.raises(ValueError, match=re.escape(
                f"must be a subpath of `--allowed-local-media-path {allowed}`.")):
            conn.fetch(url, "video")
    with pytest.raises(ValueError, match="cannot read the video file"):
        conn.fetch(f"file://{allowed}/missing.mp4", "video")
    with pytest.raises(ValueError, match=re.escape(
            "Cannot load local files without `--allowed-local-media-path`.")):
        MediaConnector().fetch(f"file://{allowed}/sub/a.bin", "image")
    with pytest.raises(ValueError, match="read in chat messages only"):
        fetch_media(f"file://{allowed}/sub/a.bin", "image", None)


@pytest.fixture(scope="module")
def qwen(tiny_root):
    base = _with_video_config(make_tiny_qwen_vl(tiny_root / "qwen25vl_files" / "base",
                                                seed=180))
    return with_adapters(base, seed=181)


def _hf_second_per_grid(meta: dict) -> float:
    """HF's Qwen2_5_VLProcessor's rule: temporal_patch_size / metadata.sampled_fps."""
    from transformers.video_utils import VideoMetadata

    keys = ("total_num_frames", "fps", "duration", "frames_indices")
    return 2 / VideoMetadata(**{k: meta[k] for k in keys}).sampled_fps


def _moving(seed: int) -> np.ndarray:
    """Ten 24 x 16 frames of coarse random blocks (a codec keeps them roughly)."""
    rng = np.random.default_rng(seed)
    return np.repeat(np.repeat(rng.integers(0, 256, (10, 4, 6, 3), dtype=np.uint8), 4, 1),
                     4, 2)


@NEEDS_TRANSFORMERS_5
def test_chat_with_mp4_matches_frames_and_hf(qwen, tmp_path):
    """LLM.chat with an mp4 video_url (data: and file://, media_io_kwargs num_frames 4)
    gives the tokens and logprobs of multi_modal_data={"video": (its decoded frames,
    metadata)} and HF's on those frames (second_per_grid_ts by HF's sampled_fps), under
    the base and an adapter; without the flag a file:// URL is refused."""
    from loraplex import LoRARequest

    base = qwen["base"]
    data = write_video(_moving(1))
    (tmp_path / "clip.mp4").write_bytes(data)
    frames, meta = load_video(video_url(data), sampling=VideoSampling(4))
    assert meta["frames_indices"] == [0, 3, 6, 9]
    llm = make_llm(base, enable_lora=True, max_lora_rank=8,
                   media_io_kwargs={"video": {"num_frames": 4}},
                   allowed_local_media_path=str(tmp_path))
    text = f"<|im_start|>user\n{VIDEO}What happens?<|im_end|>\n<|im_start|>assistant\n"
    lora = LoRARequest("r8", 1, str(qwen["r8"]))
    outs = []
    for url, adapter in ((video_url(data), None), (f"file://{tmp_path}/clip.mp4", lora)):
        conv = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": "What happens?"}]}]
        outs += llm.chat(conv, GREEDY, use_tqdm=False, chat_template=VIDEO_TEMPLATE,
                         lora_request=adapter)
    ids = tokenizer(str(base))(text, add_special_tokens=False).input_ids  # as the chat's
    direct = llm.generate([{"prompt_token_ids": ids,
                            "multi_modal_data": {"video": (frames, meta)}}],
                          GREEDY, use_tqdm=False)
    assert outs[0].prompt_token_ids == direct[0].prompt_token_ids
    assert outs[0].outputs[0].token_ids == direct[0].outputs[0].token_ids
    assert outs[0].outputs[0].cumulative_logprob == pytest.approx(
        direct[0].outputs[0].cumulative_logprob, abs=1e-5)
    check(outs[:1], base, [(text, [], [(frames, meta)], None)], add_special_tokens=False)
    inp = hf_inputs(base, text, [], [(frames, meta)], add_special_tokens=False)
    inp["second_per_grid_ts"] = torch.tensor([_hf_second_per_grid(meta)])
    got = outs[1].outputs[0].token_ids
    ref = reference_logprobs(base, qwen["r8"], inp, got[:-1])[inp["input_ids"].shape[1] - 1:]
    assert_matches_reference(outs[1], ref, qwen["r8"])
    refused = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": f"file://{tmp_path}/clip.mp4"}}]}]
    with pytest.raises(ValueError, match="Cannot load local files without"):
        make_llm(base).chat(refused, GREEDY, use_tqdm=False, chat_template=VIDEO_TEMPLATE)


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                    reason="transformers 5's get_rope_index")
def test_server_video_files(qwen, tmp_path):
    """Over a real server (the openai client): an mp4 data: URL gets HF's greedy tokens
    on its decoded frames; the same file by file:// under --allowed-local-media-path
    (and a PNG image_url so) the same reply as by data:; a file outside, a `..` escape
    and a corrupt video fail alone with a 400; the server carries on."""
    base = qwen["base"]
    allowed, outside = tmp_path / "media", tmp_path / "other"
    allowed.mkdir()
    outside.mkdir()
    data = write_video(_moving(2))
    for where in (allowed, outside):
        (where / "clip.mp4").write_bytes(data)
    im = image(3, (24, 16))
    im.save(allowed / "still.png")
    frames, meta = load_video(video_url(data), sampling=VideoSampling(4))
    text = f"<|im_start|>user\n{VIDEO}What happens?<|im_end|>\n<|im_start|>assistant\n"
    inp = hf_inputs(base, text, [], [(frames, meta)], add_special_tokens=False)
    inp["second_per_grid_ts"] = torch.tensor([_hf_second_per_grid(meta)])
    want = greedy_reference(lambda reply: reference_logprobs(base, None, inp, reply),
                            GREEDY.max_tokens)
    args = ["--max-model-len", "256", "--dtype", "float32", "--chat-template", VIDEO_TEMPLATE,
            "--allowed-local-media-path", str(allowed), "--media-io-kwargs", FOUR]
    with RemoteServer(base, args) as server:
        client = server.get_client()
        model = client.models.list().data[0].id

        def chat(url: str, kind: str = "video_url") -> list[int]:
            return chat_token_ids(client, model, [{"type": kind, kind: {"url": url}},
                                                  {"type": "text", "text": "What happens?"}],
                                  GREEDY.max_tokens)

        assert chat(video_url(data)) == want
        assert chat(f"file://{allowed}/clip.mp4") == want
        assert chat(f"file://{allowed}/still.png", "image_url") == chat(data_url(im),
                                                                         "image_url")
        for url, match in ((f"file://{outside}/clip.mp4", "must be a subpath of"),
                           (f"file://{allowed}/../other/clip.mp4", "must be a subpath of"),
                           (video_url(data[: len(data) // 3]), "cannot decode the video")):
            with pytest.raises(openai.BadRequestError) as info:
                chat(url)
            assert info.value.status_code == 400
            assert re.search(match, info.value.body["message"]), info.value.body
        assert chat(video_url(data)) == want  # the server still serves

