"""Qwen3.5's videos (Qwen3_5ForConditionalGeneration: Qwen3-VL's tower without DeepStack
over the gated DeltaNet language model) against HF transformers 5 + PEFT, fp32.

HF serves them with Qwen3-VL's processor (Qwen3VLProcessor, Qwen3VLVideoProcessor: each
temporal patch's `<t seconds>` and its pads between vision start / end) and Qwen2-VL's
get_rope_index over the video grids split per temporal patch; the tower embeds a video
as images. The checkpoint is tests/test_qwen3_next.py's `conditional` with a video
processor config beside it; the reference's inputs are HF's processor's
(tests/test_qwen3_vl_video.py's hf_inputs: frames of valid sizes, taken as given).
Checked: prompt ids and M-RoPE positions, greedy tokens and logprobs within 1e-4 for a
mixed batch (videos under the base and the adapter, image + video, text; whole and
chunked prefill through the DeltaNet state), the same on Qwen3.5-MoE
(Qwen3_5MoeForConditionalGeneration), limit_mm_per_prompt's "video", bad videos
failing alone, and the server's chat with an image and a GIF video_url, a bad video a 400.
"""

from __future__ import annotations

import json
import re

import openai
import pytest
import torch
import transformers

from loraplex import LoRARequest
from tests.engine_utils import make_llm, refused_alone
from tests.llava_fixtures import data_url, image
from tests.multimodal_fixtures import (
    chat_token_ids,
    greedy_reference,
    hf_logprobs,
    hf_multimodal,
    tokenizer,
)

pytest.importorskip("transformers.models.qwen3_5",
                    reason=f"transformers {transformers.__version__} has no Qwen3.5")

from tests.multimodal_fixtures import LANGUAGE_MODEL, make_multimodal_adapter  # noqa: E402
from tests.qwen2_vl_fixtures import IMAGE  # noqa: E402
from tests.server_utils import RemoteServer  # noqa: E402
from tests.test_qwen3_next import (  # noqa: E402
    conditional,  # noqa: F401 (the fixture)
    make_qwen3_5_vl,
)
from tests.test_qwen3_vl_video import (  # noqa: E402
    ASK,
    BOTH,
    GREEDY,
    STEPS,
    TEXT,
    THEN,
    VIDEO_CONFIG,
    _processor,
    check,
    hf_inputs,
    request,
)
from tests.test_qwen_video import VIDEO, VIDEO_TEMPLATE, gif_url, paletted, video  # noqa: E402


@pytest.fixture(scope="module")
def qwen35(conditional):  # noqa: F811
    """The Qwen3.5 checkpoint with Qwen3VLVideoProcessor settings (4-pixel patches, at
    most 8192 pixels over a video's frames) and its adapter r8."""
    (conditional["base"] / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "Qwen3VLVideoProcessor", **VIDEO_CONFIG}))
    return conditional


@pytest.fixture(scope="module")
def qwen35_moe(tiny_root):
    """A Qwen3_5MoeForConditionalGeneration checkpoint: `conditional`'s tower beside the
    4-layer Qwen3.5-MoE language model (4 experts, 2 per token, a shared expert), the same
    video processor, and an adapter on its attention and DeltaNets (r8)."""
    root = tiny_root / "gdn_qwen3_5_moe_vl"
    base = make_qwen3_5_vl(root / "base", 334, moe=True)
    (base / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "Qwen3VLVideoProcessor", **VIDEO_CONFIG}))
    return {"base": base, "r8": make_multimodal_adapter(
        base, root / "r8", r=8, seed=335,
        targets=LANGUAGE_MODEL + "(in_proj_qkv|out_proj|q_proj|v_proj)")}


def test_prompt_and_positions_are_hfs(qwen35):
    """A video alone (timestamps from the metadata), an image then a video, two videos
    around an image: the expanded ids are HF's processor's, the 3-D positions and delta
    Qwen3_5Model.get_rope_index's."""
    base = qwen35["base"]
    proc, tok = _processor(base), tokenizer(str(base))
    assert proc.video is not None and proc.modalities == ("image", "video")
    hf = hf_multimodal(str(base), None)
    odd = (video(1, 5), STEPS)
    for prompt, ims, vids in ((ASK, [], [odd]), (BOTH, [image(2)], [video(3, 6, (32, 24))]),
                              (THEN, [image(4, (40, 24))], [video(5, 2), odd])):
        inp = hf_inputs(base, prompt, ims, vids)
        ids, inputs = proc(tok(prompt).input_ids, ims or None, videos=vids)
        assert ids == inp["input_ids"][0].tolist()
        assert [inputs.sizes[i] for i in inputs.videos] == [
            tuple(g) for g in inp["video_grid_thw"].tolist()]
        ref, delta = hf.model.get_rope_index(
            input_ids=inp["input_ids"], mm_token_type_ids=inp["mm_token_type_ids"],
            image_grid_thw=inp.get("image_grid_thw"), video_grid_thw=inp["video_grid_thw"])
        assert torch.equal(inputs.mrope, ref[:, 0]) and inputs.mrope_delta == int(delta)


@pytest.mark.parametrize("budget", [None, 16])
def test_mixed_batch_matches_hf(budget, qwen35):
    """Video requests under the base and the adapter, an image + video one, two videos
    around an image and a text request in one batch; budget 16: prefill chunks cutting
    through the videos' frames and timestamps. HF's greedy tokens, logprobs within 1e-4."""
    base = qwen35["base"]
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8,
                   max_num_batched_tokens=budget)
    a, b, im = (video(1, 5), STEPS), video(2, 6, (32, 24)), image(3, (52, 40))
    jobs = [(ASK, [], [a], None), (ASK, [], [a], "r8"), (BOTH, [im], [b], "r8"),
            (THEN, [im], [b, a], None), (TEXT, [], [], None)]
    r8 = LoRARequest("r8", 1, str(qwen35["r8"]))
    outs = llm.generate([request(p, ims, vids) for p, ims, vids, _ in jobs], GREEDY,
                        use_tqdm=False, lora_request=[r8 if n else None for *_, n in jobs])
    check(outs, base, [(p, ims, vids, qwen35[n] if n else None) for p, ims, vids, n in jobs])
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids


def test_moe_video_matches_hf(qwen35_moe):
    """Qwen3.5-MoE: a video under the base and the adapter, an image + video and a text
    request in one batch, chunked; HF's greedy tokens, logprobs within 1e-4."""
    base = qwen35_moe["base"]
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8,
                   max_num_batched_tokens=16)
    a, im = (video(1, 5), STEPS), image(3)
    jobs = [(ASK, [], [a], None), (ASK, [], [a], "r8"), (BOTH, [im], [a], "r8"),
            (TEXT, [], [], None)]
    r8 = LoRARequest("r8", 1, str(qwen35_moe["r8"]))
    outs = llm.generate([request(p, ims, vids) for p, ims, vids, _ in jobs], GREEDY,
                        use_tqdm=False, lora_request=[r8 if n else None for *_, n in jobs])
    check(outs, base, [(p, ims, vids, qwen35_moe[n] if n else None)
                       for p, ims, vids, n in jobs])


def test_limit_and_bad_videos_fail_alone(qwen35):
    """limit_mm_per_prompt {"video": 1}: two videos refused; a video of one frame, one
    without its placeholder, and one too long for max_model_len fail at add_request and
    queue nothing; the good video request beside them finishes with HF's tokens."""
    base = qwen35["base"]
    engine = make_llm(base, max_model_len=128, limit_mm_per_prompt={"video": 1}).llm_engine
    engine.add_request("good", request(ASK, [], [video(1)]), GREEDY)
    bad = [(request(f"{VIDEO}{VIDEO}", [], [video(1), video(2)]), r"At most 1 video\(s\)"),
           (request(ASK, [], [video(1, 1)]), "at least 2 frames"),
           (request(TEXT, [], [video(1)]), r"0 video placeholder token\(s\).*for 1 video"),
           (request(ASK, [], [video(1, 40, (32, 32))]), "max_model_len is 128")]
    outs = refused_alone(engine, bad, GREEDY)
    assert [o.request_id for o in outs] == ["good"]
    check(outs, base, [(ASK, [], [video(1)], None)])


def test_server_image_and_video_chat(qwen35):
    """The official client's chats: a data-URL image on the base and a GIF video_url (2
    fps) under the adapter get HF (+ PEFT)'s greedy tokens; an undecodable video fails
    alone with a 400; the server still serves."""
    base = qwen35["base"]
    n = GREEDY.max_tokens
    a = image(1, (52, 40))
    pictured = [{"type": "image_url", "image_url": {"url": data_url(a)}},
                {"type": "text", "text": "What is this?"}]
    turn = "<|im_start|>user\n{}{}<|im_end|>\n<|im_start|>assistant\n"
    img_inp = hf_inputs(base, turn.format(IMAGE, "What is this?"), [a], [],
                        add_special_tokens=False)
    want_image = greedy_reference(lambda r: hf_logprobs(base, None, img_inp, r), n)
    frames = paletted(2)
    filmed = [{"type": "video_url", "video_url": {"url": gif_url(frames)}},
              {"type": "text", "text": "What happens?"}]
    vid_inp = hf_inputs(base, turn.format(VIDEO, "What happens?"), [],
                        [(frames, {"fps": 2.0})], add_special_tokens=False)
    want_video = greedy_reference(lambda r: hf_logprobs(base, qwen35["r8"], vid_inp, r), n)
    args = ["--max-model-len", "256", "--dtype", "float32", "--chat-template", VIDEO_TEMPLATE,
            "--enable-lora", "--max-lora-rank", "8", "--lora-modules", f"r8={qwen35['r8']}"]
    with RemoteServer(base, args) as server:
        client = server.get_client()
        model = client.models.list().data[0].id
        assert chat_token_ids(client, model, pictured, n,
                              len(img_inp["input_ids"][0])) == want_image
        assert chat_token_ids(client, "r8", filmed, n,
                              len(vid_inp["input_ids"][0])) == want_video
        with pytest.raises(openai.BadRequestError) as info:
            chat_token_ids(client, "r8", [{"type": "video_url", "video_url": {
                "url": "data:video/mp4;base64,AAAA"}}], n)
        assert info.value.status_code == 400
        assert re.search("cannot decode the video", info.value.body["message"])
        assert chat_token_ids(client, "r8", filmed, n) == want_video
        assert chat_token_ids(client, model, pictured, n) == want_image
