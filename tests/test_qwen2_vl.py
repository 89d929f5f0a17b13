"""Qwen2.5-VL and Qwen2-VL with images, against HF transformers (+ PEFT) on the same
weights, fp32: the vision tower's embeddings (windows, merger order) and the M-RoPE
positions and deltas against HF's own functions; greedy tokens HF's and logprobs within
1e-4 for a mixed batch (one image, two images of different sizes, none; the base and two
adapters of different ranks over one slot; chunked prefill); prefix caching keyed on the
image; LLM.chat; the server's chat route with an image_url (an undecodable image: a 400)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import openai
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from loraplex import LoRARequest
from loraplex.engine.qwen_images import QwenImageProcessor
from loraplex.engine.sequence import Sequence
from loraplex.models.mrope import mrope_positions
from loraplex.models.qwen2_vl import QwenVision, QwenVisionConfig
from loraplex.worker.mrope import mrope_step_positions
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
    make_tiny_qwen_vl,
    tokenizer,
    with_adapters,
)
from tests.server_utils import RemoteServer

pytest.importorskip("PIL")
TWO = f"USER: {IMAGE} and {IMAGE}: which is brighter? ASSISTANT:"
TEXT = "USER: What is the capital of France? ASSISTANT:"


TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


@pytest.fixture(scope="module")
def qwen25(tiny_root):
    return with_adapters(make_tiny_qwen_vl(tiny_root / "qwen25vl" / "base", seed=70), seed=71)


@pytest.fixture(scope="module")
def qwen2(tiny_root):
    base = make_tiny_qwen_vl(tiny_root / "qwen2vl" / "base", seed=72, qwen25=False)
    return {"base": base, "r4": make_multimodal_adapter(base, base.parent / "r4", r=4, seed=73)}


def _tower(base) -> tuple[QwenVision, object]:
    """Our tower with the checkpoint's weights, and HF's model."""
    hf = hf_multimodal(str(base), None)
    c = QwenVisionConfig.from_hf(hf.config)
    ours = QwenVision(c).eval()
    for name, p in hf.state_dict().items():
        if ".visual." in f".{name}":
            ours.load_weight(name, p)
    ours.check_loaded(str(base))
    return ours, hf


@pytest.mark.parametrize("which", ["qwen25", "qwen2"])
def test_image_embeddings_match_hf(which, request):
    """Two images of different sizes in one call (several windows each, Qwen2.5-VL) give
    HF's get_image_features within 1e-5, in HF's merged order."""
    base = request.getfixturevalue(which)["base"]
    ours, hf = _tower(base)
    inp = hf_inputs(base, TWO, [image(1, (52, 40)), image(2, (24, 40))])
    grids = [tuple(g) for g in inp["image_grid_thw"].tolist()]
    assert len(grids) == 2 and grids[0] != grids[1]
    with torch.no_grad():
        kw = {"return_dict": True} if TRANSFORMERS_5 else {}  # 4.x: the images' tuple
        ref = hf.get_image_features(inp["pixel_values"], inp["image_grid_thw"], **kw)
        ref = torch.cat(getattr(ref, "pooler_output", ref))
    got = ours(inp["pixel_values"], grids)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


def _rope_index(hf, input_ids, mm_token_type_ids, grids):
    """HF's get_rope_index: transformers 5's takes the image tokens' types, 4.x's finds
    them from the config's image_token_id."""
    if TRANSFORMERS_5:
        return hf.model.get_rope_index(input_ids, mm_token_type_ids, grids)
    return hf.model.get_rope_index(input_ids, grids)


def test_positions_match_hf_get_rope_index(qwen25):
    """3-D positions and the decode delta, for one image, two (adjacent and apart) and none."""
    base = qwen25["base"]
    hf = hf_multimodal(str(base), None)
    c = QwenVisionConfig.from_hf(hf.config)
    for prompt, ims in ((ASK, [image(1)]), (TWO, [image(1, (52, 40)), image(2, (24, 40))]),
                        (f"A {IMAGE}{IMAGE} B", [image(3), image(4, (40, 24))])):
        inp = hf_inputs(base, prompt, ims)
        ref, delta = _rope_index(hf, inp["input_ids"], inp.get("mm_token_type_ids"),
                                 inp["image_grid_thw"])
        got, d = mrope_positions(inp["input_ids"][0].tolist(), c.image_token_id,
                                 [tuple(g) for g in inp["image_grid_thw"].tolist()],
                                 c.merge_size)
        assert torch.equal(got, ref[:, 0]) and d == int(delta) and d != 0


def test_step_positions_slice_chunks_and_shift_past_the_prompt(qwen25):
    """A step's [3, T] rows: chunks of an image prompt take their slices, tokens past the
    prompt (a recompute after preemption) index + delta, a text prompt 1-D: HF's
    get_rope_index over the prompt and its generated tokens."""
    base = qwen25["base"]
    hf = hf_multimodal(str(base), None)
    proc = QwenImageProcessor(str(base), QwenVisionConfig.from_hf(hf.config))
    ims = [image(1, (52, 40)), image(2, (24, 40))]
    ids, images = proc(hf_inputs(base, TWO, [])["input_ids"][0].tolist(), ims)
    seq = Sequence("a", 0, ids, GREEDY)
    seq.images = images
    seq.token_ids += [5, 6, 7]  # generated, then preempted: recomputed with the prompt
    text = Sequence("b", 0, [9] * 7, GREEDY)
    inp = hf_inputs(base, TWO, ims)
    full = torch.cat([inp["input_ids"], torch.tensor([[5, 6, 7]])], dim=1)
    ref = _rope_index(hf, full, (full == proc.config.image_token_id).int(),
                      inp["image_grid_thw"])[0][:, 0]
    n = len(seq.token_ids)
    cut = images.positions[3]  # inside the first image
    starts, lens = [0, cut, 0], [cut, n - cut, 7]
    flat = [*range(cut), *range(cut, n), *range(7)]
    got = mrope_step_positions([seq, seq, text], starts, lens, flat)
    assert torch.equal(got[:, :n], ref)
    assert torch.equal(got[:, n:], torch.arange(7).expand(3, -1))


def test_mrope_with_equal_axes_is_the_1d_rope():
    """Text on all three axes (a prompt without images, decode at p + delta) rotates
    exactly as the plain 1-D path does, which those rows take."""
    from loraplex.layers.rotary import RotaryEmbedding

    rope = RotaryEmbedding(16, 64, 10000.0, mrope_section=(2, 3, 3))
    q, k = torch.randn(9, 4, 16), torch.randn(9, 2, 16)
    pos = torch.arange(30, 39)
    for a, b in zip(rope(pos.expand(3, -1), q, k), rope(pos, q, k), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="must sum to 8"):
        RotaryEmbedding(16, 64, 10000.0, mrope_section=(2, 3, 4))


def test_processor_expands_as_hf(qwen25):
    base = qwen25["base"]
    ims = [image(1, (52, 40)), image(2, (24, 40))]
    proc = QwenImageProcessor(str(base), QwenVisionConfig.from_hf(hf_multimodal(str(base),
                                                                            None).config))
    inp = hf_inputs(base, TWO, ims)
    ids, images = proc(hf_inputs(base, TWO, [])["input_ids"][0].tolist(), ims)
    assert ids == inp["input_ids"][0].tolist()
    assert proc.expand(hf_inputs(base, TWO, [])["input_ids"][0].tolist(), ims) == ids
    assert torch.equal(images.pixel_values, inp["pixel_values"])


@pytest.mark.parametrize("budget", [None, 16])
def test_mixed_batch_matches_hf(budget, qwen25):
    """Image requests under the base and two adapters (of ranks 8 and 4, one slot), two
    images of different sizes in one prompt, a text request, in one call; budget 16:
    chunked prefill splits images' placeholders and their 3-D positions."""
    base = qwen25["base"]
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8,
                   max_num_batched_tokens=budget)
    a, b = image(1, (52, 40)), image(2, (24, 40))
    jobs = [(ASK, [a], None), (ASK, [a], "r8"), (ASK, [a], "r4"), (ASK, [b], "r8"),
            (TEXT, [], "r4"), (TEXT, [], None), (TWO, [a, b], None), (TWO, [b, a], "r8")]
    loras = {"r8": LoRARequest("r8", 1, str(qwen25["r8"])),
             "r4": LoRARequest("r4", 2, str(qwen25["r4"]))}
    outs = llm.generate([request(p, ims) for p, ims, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[loras[n] if n else None for *_, n in jobs])
    check(outs, base, [(p, ims, qwen25[n] if n else None) for p, ims, n in jobs])
    assert len({tuple(o.outputs[0].token_ids) for o in outs[:3]}) == 3
    assert outs[1].outputs[0].token_ids != outs[3].outputs[0].token_ids


def test_hub_checkpoint_layout(qwen25, tmp_path):
    """The hub's files (transformers < 4.52: `visual.*`, `model.layers.*`, a config.json
    with the text fields at its top) load to HF's model as what this transformers saves
    does."""
    base = Path(shutil.copytree(qwen25["base"], tmp_path / "hub"))
    path = str(base / "model.safetensors")
    renamed = {re.sub(r"^model\.(visual|language_model)\.",
                      lambda m: "visual." if m[1] == "visual" else "model.", k): v
               for k, v in load_file(path).items()}
    assert any(k.startswith("visual.") for k in renamed) and "model.norm.weight" in renamed
    save_file(renamed, path, metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())  # the hub's: text fields on top,
    text = cfg.pop("text_config")  # M-RoPE as rope_scaling type "mrope"
    # (transformers 4.x saved rope_theta and rope_scaling already, its type "default")
    rope = text.pop("rope_parameters", None) or {**text.pop("rope_scaling"),
                                                 "rope_theta": text["rope_theta"]}
    cfg.update({k: v for k, v in text.items()  # (4.x's text config: its ids None)
                if k != "model_type" and not (v is None and k in cfg)},
               rope_theta=rope["rope_theta"],
               rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    cfg["vision_config"]["in_chans"] = cfg["vision_config"].pop("in_channels")
    (base / "config.json").write_text(json.dumps(cfg))
    a = image(1, (52, 40))
    outs = make_llm(base).generate([request(ASK, [a])], GREEDY, use_tqdm=False)
    check(outs, qwen25["base"], [(ASK, [a], None)])


def test_qwen2_vl_matches_hf(qwen2):
    """Qwen2-VL (LayerNorm + GELU blocks, no windows), the base and an adapter, chunked."""
    base = qwen2["base"]
    llm = make_llm(base, enable_lora=True, max_lora_rank=8, max_num_batched_tokens=16)
    a, b = image(1, (52, 40)), image(2, (24, 40))
    jobs = [(ASK, [a], None), (ASK, [a], "r4"), (TWO, [a, b], None), (TEXT, [], "r4")]
    lora = LoRARequest("r4", 1, str(qwen2["r4"]))
    outs = llm.generate([request(p, ims) for p, ims, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[lora if n else None for *_, n in jobs])
    check(outs, base, [(p, ims, qwen2[n] if n else None) for p, ims, n in jobs])
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids


def test_prefix_cache_never_shares_across_images(qwen25):
    """The same text with another image (of the same size): only the blocks before the
    image are shared; the same image again: all but the last block."""
    base = qwen25["base"]
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
    assert runs[2].num_cached_tokens == (len(ids) - 1) // 8 * 8
    assert runs[0].outputs[0].token_ids != runs[1].outputs[0].token_ids


def test_chat_with_image_parts(qwen25):
    base = qwen25["base"]
    llm = make_llm(base)
    a, b = image(1, (52, 40)), image(3)
    conv = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(a)}},
        {"type": "text", "text": "What is this? And "},
        {"type": "image_pil", "image_pil": b}]}]
    outs = llm.chat(conv, GREEDY, use_tqdm=False)
    text = f"<|im_start|>user\n{IMAGE}What is this? And {IMAGE}<|im_end|>\n<|im_start|>assistant\n"
    check(outs, base, [(text, [a, b], None)], add_special_tokens=False)


def test_lora_on_the_vision_tower_left_out(qwen25, tmp_path, caplog):
    both = make_multimodal_adapter(qwen25["base"], tmp_path / "both", r=4, seed=93,
                             targets=r".*(language_model.*\.q_proj|visual.*\.(qkv|fc1|up_proj)"
                                     r"|merger\.mlp\.0)")
    llm = make_llm(qwen25["base"], enable_lora=True, max_lora_rank=8)
    with caplog.at_level("WARNING"):
        out = llm.generate(request(ASK, [image(1)]), GREEDY, use_tqdm=False,
                           lora_request=LoRARequest("both", 1, str(both)))
    assert "left out (LoRA applies to the language model only)" in caplog.text
    assert len(out[0].outputs[0].token_ids) == GREEDY.max_tokens


def test_server_chat_with_data_url_image(qwen25):
    """The official client's chat request with a data-URL image gets HF's greedy tokens;
    /v1/responses' input_image the same reply; /tokenize the expanded ids; an
    undecodable image fails alone with a 400 in OpenAI's error shape."""
    base = qwen25["base"]
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
        resp = client.responses.create(
            model=model, input=[{"role": "user", "content": [
                {"type": "input_image", "image_url": data_url(a), "detail": "auto"},
                {"type": "input_text", "text": "What is this?"}]}],
            temperature=0, max_output_tokens=GREEDY.max_tokens, extra_body={"ignore_eos": True})
        assert resp.output_text == tokenizer(str(base)).decode(want, skip_special_tokens=True)
        tok = server.post("/tokenize", {"model": model, "messages": [
            {"role": "user", "content": content}]})
        assert tok.status_code == 200 and tok.json()["tokens"] == ids, tok.text
        with pytest.raises(openai.BadRequestError) as info:
            chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}])
        assert info.value.status_code == 400
        assert info.value.body["type"] == "BadRequestError"
        assert re.search("cannot decode the image", info.value.body["message"])
        assert chat(content) == want  # the server still serves
