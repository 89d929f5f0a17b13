"""Idefics3 and SmolVLM (Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration)
against HF transformers (+ PEFT) on the same weights, fp32: the prompt ids HF's processor
writes (tiles, `<row_i_col_j>`, the global view, with and without splitting, several
images), greedy tokens HF's and logprobs within 1e-4 for text and image requests under the
base and two adapters of different ranks in one batch (more adapters than slots), an
image cut by a chunked prefill, prefix caching with images, LoRA on the tower and
connector, the chat route over HTTP; bad inputs fail alone."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoConfig

from loraplex import LoRARequest
from tests.engine_utils import make_llm
from tests.idefics3_fixtures import (
    ASK,
    GREEDY,
    LANGUAGE_MODEL,
    SEQ,
    check,
    hf_inputs,
    hf_logprobs,
    hf_positions,
    hf_positions_are_trained,
    make_multimodal_adapter,
    make_tiny_idefics3,
    tokenizer,
    with_adapters,
)
from tests.llava_fixtures import data_url, image
from tests.multimodal_fixtures import chat_token_ids, request
from tests.server_utils import RemoteServer

pytest.importorskip("PIL")
# on the tests that compare image outputs with HF's model
images_vs_hf = pytest.mark.skipif(
    not hf_positions_are_trained(),
    reason="this transformers (4.x) gives SigLIP's patches positions one bucket lower than "
           "the trained models' (transformers 5's, vLLM's): no reference for image outputs")

TEXT = "User: What is the capital of France?<end_of_utterance>\nAssistant:"
TWO = "User:<image> and <image>: which is brighter?<end_of_utterance>\nAssistant:"
# (seeds whose random models never write an <image> token: HF would read it as one)
SEEDS = {"smolvlm": 90, "idefics3": 97}
LONG = ("User: Once upon a time there was a girl who lived in a house by the sea, and "
        "every day she looked at pictures.<image>What is this?<end_of_utterance>\nAssistant:")


@pytest.fixture(scope="module", params=["smolvlm", "idefics3"])
def model(request, tiny_root):
    """SmolVLM, and Idefics3 with lm_head tied to the embedding."""
    base = make_tiny_idefics3(tiny_root / request.param / "base", seed=SEEDS[request.param],
                              family=request.param, tied=request.param == "idefics3")
    return with_adapters(base, seed=91)


@pytest.fixture(scope="module")
def smolvlm(tiny_root):
    base = make_tiny_idefics3(tiny_root / "smolvlm_one" / "base", seed=92)
    return with_adapters(base, seed=93)


def loras(paths) -> dict[str, LoRARequest]:
    return {"r8": LoRARequest("r8", 1, str(paths["r8"])),
            "r4": LoRARequest("r4", 2, str(paths["r4"]))}


def ids_of(base: Path, *tokens: str) -> list[int]:
    return tokenizer(str(base)).convert_tokens_to_ids(list(tokens))


@images_vs_hf
@pytest.mark.parametrize("side", [4, 19, 26, 32])
def test_tower_positions_are_hf(side):
    """A whole tile's patch positions are HF's bucketized ones: 26 x 26 (Idefics3's 364
    pixels), 32 x 32 (SmolVLM's 512), and 19 x 19, where float rounding makes them other
    than the patches' indices."""
    from loraplex.models.idefics3 import position_ids

    assert torch.equal(position_ids(side, side), hf_positions(side))


@pytest.mark.parametrize("splitting", [True, False])
@pytest.mark.parametrize("family", ["smolvlm", "idefics3"])
def test_prompt_ids_match_hf_processor(family, splitting, tiny_root):
    """The engine's prompt ids and pixels for one, two and three images of several sizes
    (a square one 2 x 2 tiles, a wide one 1 x 2, a tall one 2 x 1, with splitting; each
    its global view alone without) are HF's processor's; the /tokenize count (`expand`)
    the same. No model output compared: this runs on every transformers."""
    from transformers import AutoConfig

    from loraplex.engine.idefics3_images import Idefics3ImageProcessor
    from loraplex.engine.images import vision_config

    base = make_tiny_idefics3(tiny_root / f"prompt_{family}_{splitting}", seed=98,
                              family=family, splitting=splitting)
    proc = Idefics3ImageProcessor(str(base), vision_config(AutoConfig.from_pretrained(base)),
                                  tokenizer(str(base)))
    a, wide, tall = image(1, (16, 16)), image(2, (50, 20)), image(3, (9, 30))
    three = "<image>x<image>\n<image>" + TWO
    for prompt, images in ((ASK, [a]), (TWO, [wide, tall]), (three, [tall, a, wide, a, a])):
        ref = hf_inputs(base, prompt, images)
        ids = tokenizer(str(base))(prompt).input_ids
        got, inputs = proc(ids, images)
        assert got == ref["input_ids"][0].tolist() == proc.expand(ids, images)
        assert inputs.pixel_values.equal(ref["pixel_values"][0])  # every tile, in order


@images_vs_hf
def test_mixed_batch_matches_hf(model):
    """A text request, image requests under the base and two adapters (ranks 8 and 4; one
    slot: more adapters than slots), a square image (2 x 2 tiles), a wide one (1 x 2), two
    images in one prompt, in one call: the prompt ids HF's processor's, tokens and
    logprobs HF's. The adapter and the image change the output."""
    paths = model
    llm = make_llm(paths["base"], enable_lora=True, max_loras=1, max_lora_rank=8)
    a, wide = image(1, (16, 16)), image(2, (50, 20))
    jobs = [(TEXT, [], None), (ASK, [a], None), (ASK, [a], "r8"), (ASK, [wide], "r4"),
            (TWO, [wide, a], "r8"), (TEXT, [], "r4")]
    outs = llm.generate([request(p, ims) for p, ims, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[loras(paths)[n] if n else None for *_, n in jobs])
    check(outs, paths["base"], [(p, ims, paths[n] if n else None) for p, ims, n in jobs])
    image_id, row_2_2, global_id = ids_of(paths["base"], "<image>", "<row_2_col_2>",
                                          "<global-img>")
    square, wide_ids = outs[1].prompt_token_ids, outs[3].prompt_token_ids
    assert square.count(image_id) == 5 * SEQ and row_2_2 in square  # 2 x 2 tiles + global
    assert wide_ids.count(image_id) == 3 * SEQ and row_2_2 not in wide_ids  # 1 x 2 + global
    assert outs[4].prompt_token_ids.count(global_id) == 2
    assert len({tuple(o.outputs[0].token_ids) for o in outs[1:3]}) == 2  # the adapter counts
    other = llm.generate(request(ASK, [image(3, (16, 16))]), GREEDY, use_tqdm=False)[0]
    assert outs[1].outputs[0].token_ids != other.outputs[0].token_ids  # the image counts


@images_vs_hf
def test_prompt_ids_without_splitting(tiny_root):
    """do_image_splitting false: each image its global view alone (`<global-img>` and
    image_seq_len `<image>` between two `<fake_token_around_image>`), whatever its size:
    HF's ids and outputs."""
    base = make_tiny_idefics3(tiny_root / "smolvlm_unsplit" / "base", seed=94,
                              splitting=False)
    llm = make_llm(base)
    a, wide = image(1, (16, 16)), image(2, (50, 20))
    jobs = [(ASK, [wide], None), (TWO, [a, wide], None)]
    outs = llm.generate([request(p, ims) for p, ims, _ in jobs], GREEDY, use_tqdm=False)
    check(outs, base, jobs)
    fake, image_id, global_id = ids_of(base, "<fake_token_around_image>", "<image>",
                                       "<global-img>")
    ids = outs[0].prompt_token_ids
    first = ids.index(fake)
    assert ids[first:first + SEQ + 3] == [fake, global_id, *[image_id] * SEQ, fake]
    assert outs[1].prompt_token_ids.count(image_id) == 2 * SEQ


@images_vs_hf
def test_image_cut_by_chunked_prefill(smolvlm):
    """A budget of 16 tokens a step: the image's tokens span several chunks (its tower
    runs once, each chunk takes its rows); beside a text request and an adapter's: HF's
    output."""
    paths = smolvlm
    llm = make_llm(paths["base"], enable_lora=True, max_lora_rank=8,
                   max_num_batched_tokens=16)
    a = image(4, (16, 16))
    ids, inputs = llm.llm_engine.image_processor(tokenizer(str(paths["base"]))(LONG).input_ids,
                                                 [a])
    first, span = inputs.ranges[0]
    assert first // 16 != (first + span - 1) // 16, "the image must cross a chunk boundary"
    jobs = [(LONG, [a], None), (LONG, [a], "r8"), (TEXT, [], None)]
    outs = llm.generate([request(p, ims) for p, ims, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[loras(paths)[n] if n else None for *_, n in jobs])
    check(outs, paths["base"], [(p, ims, paths[n] if n else None) for p, ims, n in jobs])


@images_vs_hf
def test_prefix_cache_same_image_hits_other_misses(smolvlm):
    """The same text with another image: only the blocks before the image's first token
    are shared; the same image again: the whole prompt but its last block. HF's output."""
    base = smolvlm["base"]
    llm = make_llm(base, enable_prefix_caching=True, block_size=8)
    a, b = image(1, (16, 16)), image(2, (16, 16))
    runs = [llm.generate([request(LONG, [img])], GREEDY, use_tqdm=False)[0]
            for img in (a, b, a)]
    check(runs, base, [(LONG, [img], None) for img in (a, b, a)])
    ids = runs[0].prompt_token_ids
    first = ids.index(ids_of(base, "<fake_token_around_image>")[0])
    assert runs[0].num_cached_tokens == 0
    assert runs[1].num_cached_tokens == first // 8 * 8 > 0
    assert runs[2].num_cached_tokens == (len(ids) - 1) // 8 * 8
    assert runs[0].outputs[0].token_ids != runs[1].outputs[0].token_ids


@images_vs_hf
def test_tower_connector_lora_matches_peft(model, tmp_path):
    """enable_tower_connector_lora: an adapter's LoRA on the SigLIP tower's q_proj (the
    language model's name too), out_proj and fc1 and the connector's projection, beside
    the language model's q_proj; and one on "all-linear" (PEFT's list of leaf names: the
    tower's fc1 / fc2 / out_proj, the connector's proj, every projection of the language
    model); in one batch with the base: PEFT's outputs."""
    both = make_multimodal_adapter(
        model["base"], tmp_path / "tower", r=4, seed=95,
        targets=LANGUAGE_MODEL + r"q_proj|.*vision_model.*\.(q_proj|out_proj|fc1)"
                r"|.*modality_projection\.proj")
    every = make_multimodal_adapter(model["base"], tmp_path / "all", r=2, seed=96,
                                    targets="all-linear", scale=0.1)
    llm = make_llm(model["base"], enable_lora=True, max_lora_rank=8,
                   enable_tower_connector_lora=True)
    a = image(1, (50, 20))
    outs = llm.generate([request(ASK, [a])] * 3, GREEDY, use_tqdm=False,
                        lora_request=[None, LoRARequest("tower", 1, str(both)),
                                      LoRARequest("all", 2, str(every))])
    check(outs, model["base"], [(ASK, [a], None), (ASK, [a], both), (ASK, [a], every)])
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 3


@images_vs_hf
def test_offline_refusals_fail_only_their_request(smolvlm):
    """Too many images (limit_mm_per_prompt), placeholders that do not match the images,
    a broken image: each a ValueError of its own; the engine serves on, the server's way
    (processed beforehand) too."""
    base = smolvlm["base"]
    llm = make_llm(base, limit_mm_per_prompt={"image": 1})
    a = image(1, (16, 16))
    with pytest.raises(ValueError, match="At most 1 image"):
        llm.generate(request(TWO, [a, a]), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=r"2 image placeholder token.*for 1 image"):
        llm.generate(request(ASK + "<image>", [a]), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="cannot decode the image"):
        llm.generate(request(ASK, ["data:image/png;base64,AAAA"]), GREEDY, use_tqdm=False)
    ids = tokenizer(str(base))(ASK).input_ids
    expanded, inputs = llm.llm_engine.image_processor(ids, [a])
    # an expansion with a tile marker dropped: neither one <image> an image nor HF's
    broken = [t for t in expanded if t != ids_of(base, "<row_1_col_2>")[0]]
    with pytest.raises(ValueError, match=rf"{5 * SEQ} image placeholder token.*for 1 image"):
        llm.generate({"prompt_token_ids": broken, "multi_modal_data": {"image": [a]}}, GREEDY,
                     use_tqdm=False)
    # HF's expansion and one more <image>: not one image's expansion either
    with pytest.raises(ValueError, match=rf"{5 * SEQ + 1} image placeholder token.*for 1 "):
        llm.generate({"prompt_token_ids": expanded + ids_of(base, "<image>"),
                      "multi_modal_data": {"image": [a]}}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="do not match"):
        llm.generate({"prompt_token_ids": expanded[1:],  # every position one off
                      "multi_modal_data": {"image": inputs}}, GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    # processed beforehand (the server's way), HF's expansion with raw images, and raw
    outs = llm.generate([{"prompt_token_ids": expanded, "multi_modal_data": {"image": inputs}},
                         {"prompt_token_ids": expanded, "multi_modal_data": {"image": [a]}},
                         request(ASK, [a])], GREEDY, use_tqdm=False)
    check(outs, base, [(ASK, [a], None)] * 3)


@images_vs_hf
def test_chat_and_server(smolvlm):
    """The chat route over HTTP (the openai client, a data URL) under the base and an
    adapter: HF's greedy tokens; a broken image and too many images fail alone with a
    400, and the server serves on."""
    base, a = smolvlm["base"], image(2, (50, 20))
    text = "<|user|><image>\nWhat is this?\n<|assistant|>"
    content = [{"type": "image_url", "image_url": {"url": data_url(a)}},
               {"type": "text", "text": "What is this?"}]
    inp = hf_inputs(base, text, [a], add_special_tokens=False)
    ids = inp["input_ids"][0].tolist()
    args = ["--max-model-len", "512", "--dtype", "float32", "--enable-lora",
            "--max-lora-rank", "8", "--lora-modules", f"r8={smolvlm['r8']}",
            "--limit-mm-per-prompt", '{"image": 1}']
    with RemoteServer(base, args) as server:
        client = server.get_client()
        for name, adapter in ((str(base), None), ("r8", smolvlm["r8"])):
            got = chat_token_ids(client, name, content, prompt_tokens=len(ids))
            ref = hf_logprobs(base, adapter, inp, got[:-1])
            assert got == ref[len(ids) - 1:].argmax(-1).tolist()
        for parts, match in (
                ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
                 "cannot decode the image"),
                ([*content, content[0]], "At most 1 image")):
            with pytest.raises(openai.BadRequestError) as info:
                chat_token_ids(client, str(base), parts)
            assert re.search(match, info.value.body["message"]), info.value.body
        assert len(chat_token_ids(client, str(base), content)) == GREEDY.max_tokens


def test_adapter_names_of_older_peft(smolvlm, tmp_path):
    """An adapter whose modules are named `model.text_model.*` (PEFT on the
    conditional-generation model, transformers 4 and 5 alike) loads onto the language
    model: its keys say so, and it is served (the mixed batch checks its output)."""
    from safetensors.torch import load_file

    keys = load_file(str(Path(smolvlm["r8"]) / "adapter_model.safetensors"))
    assert all(".model.text_model.layers." in k for k in keys)
    copy = Path(shutil.copytree(smolvlm["r8"], tmp_path / "r8"))
    llm = make_llm(smolvlm["base"], enable_lora=True, max_lora_rank=8)
    out = llm.generate(TEXT, GREEDY, use_tqdm=False,
                       lora_request=LoRARequest("copy", 1, str(copy)))
    check([out[0]], smolvlm["base"], [(TEXT, [], copy)])


def test_all_linear_adapter_without_tower_lora(smolvlm, tmp_path):
    """An "all-linear" adapter (its target_modules PEFT's list of leaf names, the tower's
    fc1 / fc2 / out_proj and the connector's proj among them) on an engine without tower
    LoRA: served, its tower part left out (as vLLM does); on text, where the tower never
    runs, PEFT's output."""
    every = make_multimodal_adapter(smolvlm["base"], tmp_path / "all", r=2, seed=96,
                                    targets="all-linear", scale=0.1)
    llm = make_llm(smolvlm["base"], enable_lora=True, max_lora_rank=8)
    out = llm.generate(TEXT, GREEDY, use_tqdm=False,
                       lora_request=LoRARequest("all", 1, str(every)))
    check([out[0]], smolvlm["base"], [(TEXT, [], every)])


def test_unsupported_configs_refused(smolvlm, tmp_path):
    """At start-up: a scale_factor that does not fold the tower's patch grid evenly, and
    an image processor whose tiles are not the tower's size, each with why."""
    import json

    from loraplex.engine.idefics3_images import Idefics3ImageProcessor
    from loraplex.models.idefics3 import Idefics3VisionConfig

    hf = AutoConfig.from_pretrained(smolvlm["base"])
    hf.scale_factor = 3
    with pytest.raises(ValueError, match="scale_factor 3 must fold the tower's 4 x 4"):
        Idefics3VisionConfig.from_hf(hf)
    base = Path(shutil.copytree(smolvlm["base"], tmp_path / "base"))
    path = base / "preprocessor_config.json"
    cfg = json.loads(path.read_text())
    cfg["max_image_size"] = {"longest_edge": 32}
    path.write_text(json.dumps(cfg))
    config = Idefics3VisionConfig.from_hf(AutoConfig.from_pretrained(base))
    with pytest.raises(ValueError, match="cuts 32-pixel tiles, the vision tower takes 16"):
        Idefics3ImageProcessor(str(base), config, tokenizer(str(base)))
