"""Qwen3-VL with images, against HF transformers (+ PEFT) on the same weights, fp32: the
vision tower's embeddings and DeepStack features, the interleaved M-RoPE rotation and
the positions against HF's own functions; greedy tokens HF's and logprobs within 1e-4
for a mixed batch (one image, two of different sizes, none; the base and two adapters of
different ranks over one slot; whole and chunked prefill, chunks cutting through images);
prefix caching keyed on the image, cached blocks holding image rows; the server's chat
route with an image_url, LLM.chat; bad inputs refused alone (Qwen3-VL-MoE:
tests/test_qwen3_vl_moe.py)."""

from __future__ import annotations

import re

import openai
import pytest
import torch

from loraplex import LoRARequest
from loraplex.engine.qwen_images import QwenImageProcessor
from loraplex.layers.rotary import RotaryEmbedding
from loraplex.models.mrope import mrope_positions
from loraplex.models.qwen3_vl import Qwen3Vision, Qwen3VisionConfig
from tests.engine_utils import make_llm
from tests.llava_fixtures import data_url, image
from tests.multimodal_fixtures import (
    chat_token_ids,
    greedy_reference,
    hf_multimodal,
    make_multimodal_adapter,
    request,
)
from tests.qwen2_vl_fixtures import (
    ASK,
    GREEDY,
    IMAGE,
    check,
    hf_inputs,
    hf_logprobs,
    make_tiny_qwen3_vl,
    with_adapters,
)
from tests.server_utils import RemoteServer
from tests.test_qwen2_vl import TEXT, TWO

pytest.importorskip("PIL")
# transformers 4.57+ (not the 4.56 floor) has Qwen3-VL
pytest.importorskip("transformers.models.qwen3_vl")


@pytest.fixture(scope="module")
def qwen3(tiny_root):
    return with_adapters(make_tiny_qwen3_vl(tiny_root / "qwen3vl" / "base", seed=80), seed=81)


def _tower(base) -> tuple[Qwen3Vision, object]:
    """Our tower with the checkpoint's weights, and HF's model."""
    hf = hf_multimodal(str(base), None)
    ours = Qwen3Vision(Qwen3VisionConfig.from_hf(hf.config)).eval()
    for name, p in hf.state_dict().items():
        if ".visual." in f".{name}":
            ours.load_weight(name, p)
    ours.check_loaded(str(base))
    return ours, hf


def test_image_embeddings_and_deepstack_match_hf(qwen3):
    """Two images of different sizes in one call (the position table resampled to each
    grid): HF's merged embeddings and both DeepStack features, in HF's order."""
    base = qwen3["base"]
    ours, hf = _tower(base)
    inp = hf_inputs(base, TWO, [image(1, (52, 40)), image(2, (24, 40))])
    grids = [tuple(g) for g in inp["image_grid_thw"].tolist()]
    assert len(grids) == 2 and grids[0] != grids[1]
    with torch.no_grad():
        out = hf.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"],
                                          return_dict=True)
    ref = torch.stack([torch.cat(out.pooler_output),
                       *(torch.cat(f) for f in out.deepstack_features)], dim=1)
    got = ours(inp["pixel_values"], grids)
    assert got.shape == ref.shape == (sum(t * h * w for t, h, w in grids) // 4, 3, 64)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got - ref).abs().max()


def test_interleaved_mrope_matches_hf_rotary(qwen3):
    """Our rotation of random (t, h, w) positions is HF's Qwen3VLTextRotaryEmbedding's
    (interleaved axes), and differs from the sectioned (Qwen2-VL) layout."""
    hf = hf_multimodal(str(qwen3["base"]), None)
    text = hf.config.text_config
    rope = RotaryEmbedding(16, 512, 10000.0, mrope_section=(2, 3, 3), mrope_interleaved=True)
    sectioned = RotaryEmbedding(16, 512, 10000.0, mrope_section=(2, 3, 3))
    pos = torch.randint(0, 200, (3, 11), generator=torch.Generator().manual_seed(0))
    q, k = torch.randn(11, 4, 16), torch.randn(11, 2, 16)
    cos, sin = hf.model.language_model.rotary_emb(q, pos[:, None])
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

    ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    for got, want in zip(rope(pos, q, k), ref, strict=True):
        assert torch.allclose(got, want[0].transpose(0, 1), atol=1e-6)
    assert not torch.allclose(sectioned(pos, q, k)[0], rope(pos, q, k)[0], atol=1e-3)
    assert text.rope_parameters["mrope_section"] == [2, 3, 3]


def test_positions_match_hf_get_rope_index(qwen3):
    """Qwen3-VL's get_rope_index (images: Qwen2-VL's rule) for one image, two (adjacent
    and apart) and none."""
    base = qwen3["base"]
    hf = hf_multimodal(str(base), None)
    c = Qwen3VisionConfig.from_hf(hf.config)
    for prompt, ims in ((ASK, [image(1)]), (TWO, [image(1, (52, 40)), image(2, (24, 40))]),
                        (f"A {IMAGE}{IMAGE} B", [image(3), image(4, (40, 24))]),
                        (TEXT, [])):
        inp = hf_inputs(base, prompt, ims)
        grid = inp.get("image_grid_thw", torch.zeros(0, 3, dtype=torch.long))
        ref, delta = hf.model.get_rope_index(inp["input_ids"], inp["mm_token_type_ids"], grid)
        got, d = mrope_positions(inp["input_ids"][0].tolist(), c.image_token_id,
                                 [tuple(g) for g in grid.tolist()], c.merge_size)
        assert torch.equal(got, ref[:, 0]) and d == int(delta)
        assert (d != 0) == bool(ims)


def test_processor_expands_as_hf(qwen3):
    base = qwen3["base"]
    ims = [image(1, (52, 40)), image(2, (24, 40))]
    proc = QwenImageProcessor(str(base), Qwen3VisionConfig.from_hf(
        hf_multimodal(str(base), None).config))
    inp = hf_inputs(base, TWO, ims)
    ids, images = proc(hf_inputs(base, TWO, [])["input_ids"][0].tolist(), ims)
    assert ids == inp["input_ids"][0].tolist()
    assert torch.equal(images.pixel_values, inp["pixel_values"])


@pytest.mark.parametrize("budget", [None, 16])
def test_mixed_batch_matches_hf(budget, qwen3):
    """Image requests under the base and two adapters (of ranks 8 and 4, one slot), two
    images of different sizes in one prompt, text requests, in one call; budget 16:
    chunked prefill splits images' placeholders, their DeepStack rows and positions."""
    base = qwen3["base"]
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8,
                   max_num_batched_tokens=budget)
    a, b = image(1, (52, 40)), image(2, (24, 40))
    jobs = [(ASK, [a], None), (ASK, [a], "r8"), (ASK, [a], "r4"), (ASK, [b], "r8"),
            (TEXT, [], "r4"), (TEXT, [], None), (TWO, [a, b], None), (TWO, [b, a], "r8")]
    loras = {"r8": LoRARequest("r8", 1, str(qwen3["r8"])),
             "r4": LoRARequest("r4", 2, str(qwen3["r4"]))}
    outs = llm.generate([request(p, ims) for p, ims, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[loras[n] if n else None for *_, n in jobs])
    check(outs, base, [(p, ims, qwen3[n] if n else None) for p, ims, n in jobs])
    assert len({tuple(o.outputs[0].token_ids) for o in outs[:3]}) == 3
    assert outs[1].outputs[0].token_ids != outs[3].outputs[0].token_ids


def test_prefix_cache_never_shares_across_images(qwen3):
    """The same text with another image (of the same size): only the blocks before the
    image are shared; the same image again: all but the last block, image rows included
    (their K/V hold the DeepStack features)."""
    base = qwen3["base"]
    llm = make_llm(base, enable_prefix_caching=True, block_size=8)
    prompt = "USER: Once upon a time there was a little girl who lived. " + ASK[6:]
    a, b = image(1), image(2)
    runs = [llm.generate([request(prompt, [im])], GREEDY, use_tqdm=False)[0]
            for im in (a, b, a)]
    check(runs, base, [(prompt, [im], None) for im in (a, b, a)])
    ids = runs[0].prompt_token_ids
    first = ids.index(llm.get_tokenizer().convert_tokens_to_ids("<|image_pad|>"))
    assert runs[0].num_cached_tokens == 0
    assert runs[1].num_cached_tokens == first // 8 * 8 > 0
    assert runs[2].num_cached_tokens == (len(ids) - 1) // 8 * 8 > first + 8
    assert runs[0].outputs[0].token_ids != runs[1].outputs[0].token_ids


def test_bad_inputs_fail_alone(qwen3):
    """A one-frame video, more images than placeholders, an undecodable image: each refused at
    add_request with its reason while an image request already queued runs on to HF's
    tokens."""
    base = qwen3["base"]
    engine = make_llm(base).llm_engine
    a = image(1)
    engine.add_request("good", request(ASK, [a]), GREEDY)
    bad = [({"prompt": ASK, "multi_modal_data": {"video": [a]}}, "at least 2 frames"),
           ({"prompt": ASK, "multi_modal_data": {"image": [a, a]}},
            "1 image placeholder token.* for 2 image"),
           ({"prompt": ASK, "multi_modal_data": {"image": ["data:image/png;base64,AAAA"]}},
            "cannot decode the image")]
    for i, (prompt, message) in enumerate(bad):
        with pytest.raises(ValueError, match=message):
            engine.add_request(f"bad{i}", prompt, GREEDY)
    done = []
    while engine.has_unfinished_requests():
        done += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in done] == ["good"]
    check(done, base, [(ASK, [a], None)])


def test_chat_with_image_parts(qwen3):
    base = qwen3["base"]
    a, b = image(1, (52, 40)), image(3)
    conv = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(a)}},
        {"type": "text", "text": "What is this? And "},
        {"type": "image_pil", "image_pil": b}]}]
    outs = make_llm(base).chat(conv, GREEDY, use_tqdm=False)
    text = f"<|im_start|>user\n{IMAGE}What is this? And {IMAGE}<|im_end|>\n<|im_start|>assistant\n"
    check(outs, base, [(text, [a, b], None)], add_special_tokens=False)


def test_lora_on_the_vision_tower_left_out(qwen3, tmp_path, caplog):
    both = make_multimodal_adapter(
        qwen3["base"], tmp_path / "both", r=4, seed=93,
        targets=r".*(language_model.*\.q_proj|visual.*\.(qkv|linear_fc1))")
    llm = make_llm(qwen3["base"], enable_lora=True, max_lora_rank=8)
    with caplog.at_level("WARNING"):
        out = llm.generate(request(ASK, [image(1)]), GREEDY, use_tqdm=False,
                           lora_request=LoRARequest("both", 1, str(both)))
    assert "left out (LoRA applies to the language model only)" in caplog.text
    assert len(out[0].outputs[0].token_ids) == GREEDY.max_tokens


def test_server_chat_with_data_url_image(qwen3):
    """The official client's chat request with a data-URL image gets HF's greedy tokens;
    a video part fails alone with a 400; the server still serves."""
    base = qwen3["base"]
    a = image(1, (52, 40))
    content = [{"type": "image_url", "image_url": {"url": data_url(a)}},
               {"type": "text", "text": "What is this?"}]
    inp = hf_inputs(base, f"<|im_start|>user\n{IMAGE}What is this?<|im_end|>\n"
                          "<|im_start|>assistant\n", [a], add_special_tokens=False)
    ids = inp["input_ids"][0].tolist()
    want = greedy_reference(lambda reply: hf_logprobs(base, None, inp, reply), GREEDY.max_tokens)
    with RemoteServer(base, ["--max-model-len", "256", "--dtype", "float32"]) as server:
        client = server.get_client()
        model = client.models.list().data[0].id

        def chat(content: list) -> list[int]:
            return chat_token_ids(client, model, content, GREEDY.max_tokens, len(ids))

        assert chat(content) == want
        with pytest.raises(openai.BadRequestError) as info:
            chat([{"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}])
        assert info.value.status_code == 400
        assert re.search("video_url", info.value.body["message"]), info.value.body
        assert chat(content) == want


def test_prompt_embeds_beside_deepstack_images(qwen3):
    """A prompt given as embeddings (no DeepStack features) prefilled in the same step as
    an image prompt (with them): each is what it is alone."""
    base = qwen3["base"]
    llm = make_llm(base, enable_prompt_embeds=True)
    ids = llm.get_tokenizer().encode(TEXT)
    with torch.no_grad():
        embeds = hf_multimodal(str(base), None).get_input_embeddings()(torch.tensor(ids))
    a = image(1, (52, 40))
    image_out, embeds_out, ids_out = llm.generate(
        [request(ASK, [a]), {"prompt_embeds": embeds}, {"prompt_token_ids": ids}], GREEDY,
        use_tqdm=False)
    check([image_out], base, [(ASK, [a], None)])
    assert embeds_out.outputs[0].token_ids == ids_out.outputs[0].token_ids
