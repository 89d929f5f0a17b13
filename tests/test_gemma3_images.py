"""Gemma 3 (Gemma3ForConditionalGeneration) with images, against HF transformers' Gemma 3
(+ PEFT) on the same weights and the same processor outputs, fp32: each <start_of_image>
expanded as HF's Gemma3Processor does (newline merges included), the image tokens
attending to each other both ways, greedy tokens HF's and logprobs within 1e-4 for image
requests under the base and three adapters beside text requests (adapter slots fewer
than adapters); chunked prefill that never splits an image; prefix caching that never
shares K/V across images; the image embeddings HF's; LLM.chat and the server's chat and
responses routes with image parts; and the refusals, each failing only its request."""

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
from loraplex.engine.images import ImageInputs
from tests.engine_utils import make_llm
from tests.gemma3_fixtures import (
    ASK,
    GREEDY,
    SOFT,
    TOKENS_PER_IMAGE,
    check,
    data_url,
    hf_inputs,
    hf_logprobs,
    image,
    make_tiny_gemma3,
    processor,
    with_adapters,
)
from tests.multimodal_fixtures import (
    chat_token_ids,
    hf_multimodal,
    make_multimodal_adapter,
    request,
)
from tests.server_utils import RemoteServer

pytest.importorskip("PIL")

INTRO = "User: Once upon a time there was a little girl who lived in a village. "


TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
# the sliding-window layer's window: 6 (< TOKENS_PER_IMAGE), so an image's tokens seeing
# each other both ways meet the window. transformers 5 bounds them by it too
# (modeling_gemma3.py `create_masks_for_vision_model`: AND(window, OR(causal, image)));
# transformers 4.56 lets them see the whole image past it (its Gemma3Model.forward passes
# the image mask to create_sliding_window_causal_mask as or_mask_function: OR(AND(causal,
# window), image)). The two agree wherever an image fits in the window (every Gemma 3
# checkpoint: 256 tokens, a window of 1024): on 4.x the window is an image's length, and
# everything else is checked against it
WINDOW = 6 if TRANSFORMERS_5 else TOKENS_PER_IMAGE


@pytest.fixture(scope="module")
def gemma3(tiny_root: Path) -> dict[str, Path]:
    return with_adapters(make_tiny_gemma3(tiny_root / "gemma3img" / "base", seed=70,
                                          window=WINDOW), seed=71)


def test_image_features_match_hf(gemma3):
    """SigLIP tower + pooled projector: HF's get_image_features within 1e-5."""
    llm = make_llm(gemma3["base"])
    pixels = hf_inputs(gemma3["base"], "<start_of_image> <start_of_image>",
                       [image(1), image(2, (70, 50))])["pixel_values"]
    ours = llm.llm_engine.vision(pixels, [(56, 56)] * 2)
    with torch.no_grad():
        ref = hf_multimodal(str(gemma3["base"]), None).model.get_image_features(
            pixel_values=pixels)
    ref = getattr(ref, "pooler_output", ref)  # transformers 4.x: the tensor itself
    assert ours.shape == (2 * TOKENS_PER_IMAGE, ref.shape[-1])
    torch.testing.assert_close(ours, ref.flatten(0, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["hub", "in_memory"])
def test_checkpoint_layouts(layout, gemma3, tmp_path):
    """The hub's files (`vision_tower.vision_model.*`, `language_model.model.*`) and
    transformers 4.52+'s (`model.vision_tower.vision_model.*`, `model.language_model.*`)
    load to HF's model (what this transformers saves: every other test)."""
    base = Path(shutil.copytree(gemma3["base"], tmp_path / layout))
    path = str(base / "model.safetensors")

    def rename(name: str) -> str:
        name = re.sub(r"^(model\.)?vision_tower\.(vision_model\.)?", "vision_tower.vision_model.",
                      name)
        name = re.sub(r"^(model\.)?multi_modal_projector\.", "multi_modal_projector.", name)
        name = re.sub(r"^(model\.language_model\.|language_model\.model\.)",
                      "language_model.model.", name)
        if layout == "in_memory":
            name = re.sub(r"^(vision_tower|multi_modal_projector)\.", r"model.\1.", name)
            name = name.replace("language_model.model.", "model.language_model.", 1)
        return name

    tensors = {rename(k): v for k, v in load_file(path).items()}
    assert any(k.startswith(("vision_tower.vision_model.", "model.vision_tower.vision_model."))
               for k in tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    llm = make_llm(base)
    img = image(1)
    outs = llm.generate([request(ASK, [img])], GREEDY, use_tqdm=False)
    check(outs, gemma3["base"], [(ASK, [img], None)])


@pytest.mark.parametrize(("max_loras", "budget"), [(1, None), (2, 24)])
def test_mixed_batch_matches_hf(max_loras, budget, gemma3):
    """Image requests under the base and three adapters (more than the slots), a text
    request, two images in one prompt, in one call. `budget` 24: prompts are chunked,
    never inside an image (its 16 tokens in one step)."""
    llm = make_llm(gemma3["base"], enable_lora=True, max_loras=max_loras, max_lora_rank=8,
                   max_num_batched_tokens=budget)
    a, b = image(1), image(2, (30, 50))
    two = "User: <start_of_image> and <start_of_image>: which is brighter? Model:"
    jobs = [(ASK, [a], None), (ASK, [a], "r8"), (ASK, [a], "r4"), (ASK, [b], "r8"),
            ("User: What is the capital of France? Model:", [], "r4"),
            (two, [a, b], None), (two, [b, a], "r2"), (ASK, [b], "r2")]
    loras = {n: LoRARequest(n, i, str(gemma3[n])) for i, n in enumerate(("r8", "r4", "r2"), 1)}
    outs = llm.generate([request(p, ims) for p, ims, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[loras[n] if n else None for *_, n in jobs])
    check(outs, gemma3["base"], [(p, ims, gemma3[n] if n else None) for p, ims, n in jobs])
    # HF's expansion: "\n\n<start_of_image>", 16 soft tokens, "<end_of_image>\n\n"; the
    # "\n\n" after it merged with the prompt's "\n" into one "\n\n\n" token
    tok = processor(str(gemma3["base"])).tokenizer
    assert outs[0].prompt_token_ids.count(tok.convert_tokens_to_ids(SOFT)) == TOKENS_PER_IMAGE
    assert tok.encode("\n\n\n", add_special_tokens=False)[0] in outs[0].prompt_token_ids
    first = {tuple(o.outputs[0].token_ids) for o in outs[:3]}
    assert len(first) == 3, "an adapter left the image request's output unchanged"
    assert outs[1].outputs[0].token_ids != outs[3].outputs[0].token_ids  # the image counts


@pytest.mark.parametrize("budget", [None, 24])
def test_triton_attention_matches_hf(budget, gemma3, monkeypatch):
    """The CUDA path's attention (the Triton kernels, under the interpreter here): the
    image tokens' key_limit in the prefill kernel; budget 24: chunks with cached context,
    mixed steps with running decodes."""
    import tests.test_attention  # noqa: F401  (on the CPU: Triton under the interpreter)

    monkeypatch.setenv("LORAPLEX_ATTENTION_BACKEND", "triton")
    llm = make_llm(gemma3["base"], enable_lora=True, max_loras=2, max_lora_rank=8,
                   max_num_batched_tokens=budget, block_size=8)
    assert llm.llm_engine.model_runner.attn_backend == "triton"
    a, b = image(1), image(2, (30, 50))
    two = INTRO + "<start_of_image> and <start_of_image>: which? Model:"
    jobs = [(ASK, [a], None), (two, [a, b], "r8"), ("User: Hi there. Model:", [], "r4"),
            (ASK, [b], "r4")]
    loras = {n: LoRARequest(n, i, str(gemma3[n])) for i, n in enumerate(("r8", "r4"), 1)}
    outs = llm.generate([request(p, ims) for p, ims, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[loras[n] if n else None for *_, n in jobs])
    check(outs, gemma3["base"], [(p, ims, gemma3[n] if n else None) for p, ims, n in jobs])


def test_chunked_prefill_never_splits_an_image(gemma3):
    """Long text before the image, a budget that would cut it: the chunk stops before the
    image, which runs whole in the next step; HF's output."""
    llm = make_llm(gemma3["base"], max_num_batched_tokens=20)
    prompt = INTRO + "<start_of_image>\nWhat is this? Model:"
    ids, inputs = llm.llm_engine.image_processor(
        processor(str(gemma3["base"])).tokenizer(prompt).input_ids, [image(3)])
    first = inputs.ranges[0][0]
    assert first % 20 > 4, "the test needs a budget that would end inside the image"
    assert inputs.chunk_len(0, 20) == 20 and inputs.chunk_len(20, 20) == first - 20
    assert inputs.chunk_len(first - 2, 10) == 2 and inputs.chunk_len(first, 10) == 0
    assert inputs.chunk_len(first + 3, 20) == 20 and inputs.chunk_len(first + 3, 10) == 0
    outs = llm.generate([request(prompt, [image(3)]), request(prompt, [image(4)])], GREEDY,
                        use_tqdm=False)
    check(outs, gemma3["base"], [(prompt, [image(3)], None), (prompt, [image(4)], None)])


def test_prefix_cache_never_shares_across_images(gemma3):
    """The same text with another image: only the blocks before the image's first one
    are shared; the same image again: the whole prompt but its last block."""
    llm = make_llm(gemma3["base"], enable_prefix_caching=True, block_size=8)
    prompt = INTRO + "<start_of_image>\nWhat is this? Model:"
    a, b = image(1), image(2)
    runs = [llm.generate([request(prompt, [img])], GREEDY, use_tqdm=False)[0]
            for img in (a, b, a)]
    check(runs, gemma3["base"], [(prompt, [img], None) for img in (a, b, a)])
    ids = runs[0].prompt_token_ids
    first_image = ids.index(processor(str(gemma3["base"])).tokenizer.convert_tokens_to_ids(SOFT))
    assert runs[0].num_cached_tokens == 0
    assert runs[1].num_cached_tokens == first_image // 8 * 8 > 0
    assert runs[2].num_cached_tokens == (len(ids) - 1) // 8 * 8
    assert runs[0].outputs[0].cumulative_logprob != runs[1].outputs[0].cumulative_logprob


def test_prefix_cache_hit_ending_inside_an_image(gemma3):
    """The same image with other text after it: the cached prefix ends inside the image
    (its block also holds the text that differs), so the next chunk starts mid-image;
    the cached image K/V were computed with the whole image, the rest of it attends to
    them: HF's output."""
    llm = make_llm(gemma3["base"], enable_prefix_caching=True, block_size=16)
    intro = "User: Once upon a time there was a girl. <start_of_image>\n"
    prompts = [intro + "What is this? Model:", intro + "Where is it? Model:"]
    runs = [llm.generate([request(p, [image(1)])], GREEDY, use_tqdm=False)[0]
            for p in prompts]
    check(runs, gemma3["base"], [(p, [image(1)], None) for p in prompts])
    first = runs[1].prompt_token_ids.index(
        processor(str(gemma3["base"])).tokenizer.convert_tokens_to_ids(SOFT))
    assert first < runs[1].num_cached_tokens < first + TOKENS_PER_IMAGE


def test_expanded_prompt_ids_are_taken_as_they_are(gemma3):
    """prompt_token_ids HF's processor expanded already (soft tokens and all): kept."""
    llm = make_llm(gemma3["base"])
    ids = hf_inputs(gemma3["base"], ASK, [image(2)])["input_ids"][0].tolist()
    outs = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": image(2)}},
                        GREEDY, use_tqdm=False)
    check(outs, gemma3["base"], [(ASK, [image(2)], None)])


def test_chat_with_image_parts(gemma3):
    """LLM.chat: an image_url part (data URL) and an image_pil part become the template's
    <start_of_image>, the images the request's."""
    llm = make_llm(gemma3["base"])
    a, b = image(1), image(3)
    conv = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(a)}},
        {"type": "text", "text": "What is this? And "},
        {"type": "image_pil", "image_pil": b}]}]
    outs = llm.chat(conv, GREEDY, use_tqdm=False)
    text = "<|user|><start_of_image>What is this? And <start_of_image>\n<|assistant|>"
    check(outs, gemma3["base"], [(text, [a, b], None)], add_special_tokens=False)
    wide, on = image(5, (120, 40)), {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 20}
    conv = [{"role": "user", "content": [{"type": "image_pil", "image_pil": wide},
                                         {"type": "text", "text": "Hm?"}]}]
    outs = llm.chat(conv, GREEDY, use_tqdm=False, mm_processor_kwargs=on)  # vLLM's keyword
    check(outs, gemma3["base"], [("<|user|><start_of_image>Hm?\n<|assistant|>", [wide], None)],
          add_special_tokens=False, options=[on])


def test_offline_refusals_fail_only_their_request(gemma3):
    llm = make_llm(gemma3["base"], enable_lora=True, max_lora_rank=8)
    a = image(1)
    with pytest.raises(ValueError, match="1 <start_of_image> token.*for 2 image"):
        llm.generate(request(ASK, [a, a]), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="cannot decode the image"):
        llm.generate(request(ASK, ["data:image/png;base64,AAAA"]), GREEDY, use_tqdm=False)
    for kwargs, message in (({"do_pan_and_scan": True, "num_crops": 2},
                             "'num_crops' is not an option.*takes: do_pan_and_scan"),
                            ({"do_pan_and_scan": "yes"}, "do_pan_and_scan must be true or"),
                            ({"pan_and_scan_max_num_crops": 0}, "an integer >= 1")):
        with pytest.raises(ValueError, match=message):
            llm.generate({**request(ASK, [a]), "mm_processor_kwargs": kwargs}, GREEDY,
                         use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    check(llm.generate(request(ASK, [a]), GREEDY, use_tqdm=False), gemma3["base"],
          [(ASK, [a], None)])
    small = make_llm(gemma3["base"], max_num_batched_tokens=12)
    with pytest.raises(ValueError, match="image takes 16 tokens.*max_num_batched_tokens"):
        small.generate(request(ASK, [a]), GREEDY, use_tqdm=False)
    assert len(small.generate("Hi", GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 6


def test_pan_and_scan_from_the_processor_config(gemma3, tmp_path):
    """A checkpoint whose image processor config turns pan-and-scan on (and a crop size
    the tiny images reach): crops, as vLLM reads that config (HF's image processor reads
    it too, but HF's Gemma3Processor passes its own default, False, over it: the
    reference is given the options); an mm_processor_kwargs key the processor does not
    take is refused at start-up."""
    base = Path(shutil.copytree(gemma3["base"], tmp_path / "pas"))
    # transformers 5 nests the image processor's in processor_config.json, 4.x saves it
    # as preprocessor_config.json
    path = base / "processor_config.json"
    cfg = json.loads(path.read_text()) if path.exists() else {}
    saved = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 20}
    if "image_processor" in cfg:
        cfg["image_processor"].update(saved)
    else:
        path = base / "preprocessor_config.json"
        cfg = {**json.loads(path.read_text()), **saved}
    path.write_text(json.dumps(cfg))
    processor.cache_clear()
    llm = make_llm(base)
    wide = image(5, (120, 40))
    outs = llm.generate([request(ASK, [wide])], GREEDY, use_tqdm=False)
    assert len(hf_inputs(base, ASK, [wide], options=saved)["pixel_values"]) == 4  # 3 crops
    check(outs, base, [(ASK, [wide], None)], options=[saved])
    with pytest.raises(ValueError, match="'image_size' is not an option"):
        make_llm(gemma3["base"], mm_processor_kwargs='{"image_size": 28}')


def test_pan_and_scan_mixed_batch_matches_hf(gemma3):
    """vLLM's mm_processor_kwargs {"do_pan_and_scan": true} for the engine, a request's
    own over it (fewer crops, or none): a wide and a tall image each cut into crops, each
    crop an image of its own after "Here is the original image ..." (its own
    bidirectional block, prefilled whole within a 24-token budget), beside a square one
    and text, under the base and two adapters in one call: HF's prompt, greedy tokens and
    logprobs."""
    on = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 20}
    llm = make_llm(gemma3["base"], enable_lora=True, max_loras=2, max_lora_rank=8,
                   max_num_batched_tokens=24, mm_processor_kwargs=on)
    wide, tall, square = image(5, (120, 40)), image(6, (40, 100)), image(7, (56, 56))
    squat = image(8, (78, 60))  # 1.3 x as wide: rounds to 1 crop, HF makes it 2
    two = "User: <start_of_image> and <start_of_image>: which? Model:"
    fewer, off = {"pan_and_scan_max_num_crops": 2}, {"do_pan_and_scan": False}
    jobs = [(ASK, [wide], None, {}), (ASK, [wide], "r8", {}), (two, [tall, square], "r4", {}),
            (ASK, [tall], "r8", fewer), (ASK, [wide], None, off), (ASK, [squat], "r4", {}),
            ("User: What is the capital of France? Model:", [], "r4", {})]
    loras = {n: LoRARequest(n, i, str(gemma3[n])) for i, n in enumerate(("r8", "r4"), 1)}
    prompts = [{**request(p, ims), "mm_processor_kwargs": kw} if ims else p
               for p, ims, _, kw in jobs]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False,
                        lora_request=[loras[n] if n else None for _, _, n, _ in jobs])
    check(outs, gemma3["base"], [(p, ims, gemma3[n] if n else None) for p, ims, n, _ in jobs],
          options=[{**on, **kw} for *_, kw in jobs])
    soft = processor(str(gemma3["base"])).tokenizer.convert_tokens_to_ids(SOFT)
    images = [o.prompt_token_ids.count(soft) // TOKENS_PER_IMAGE for o in outs]
    assert images == [4, 4, 5, 3, 1, 3, 0]  # wide, tall: 3 crops (max 2: 2); square: none
    assert outs[0].outputs[0].token_ids != outs[4].outputs[0].token_ids  # the crops count


def test_lora_on_the_vision_tower(gemma3, tmp_path, caplog):
    """LoRA applies to the language model (vLLM's rule): an adapter's LoRA on the tower is
    left out with a warning."""
    both = make_multimodal_adapter(gemma3["base"], tmp_path / "both", r=4, seed=73,
                               targets=r".*(language_model.*\.q_proj|vision_tower.*fc1)")
    llm = make_llm(gemma3["base"], enable_lora=True, max_lora_rank=8)
    with caplog.at_level("WARNING"):
        out = llm.generate(request(ASK, [image(1)]), GREEDY, use_tqdm=False,
                           lora_request=LoRARequest("both", 1, str(both)))
    assert "left out (LoRA applies to the language model only)" in caplog.text
    assert len(out[0].outputs[0].token_ids) == GREEDY.max_tokens


def test_image_blocks_mask():
    """Unit: image tokens see their whole image, text stays causal, a later chunk's mask
    holds the image's keys by position."""
    from loraplex.layers.attention import image_blocks, torch_prefill_layout
    from loraplex.worker.context import StepContext

    ctx = StepContext(is_prefill=True, slot_mapping=torch.zeros(6, dtype=torch.long))
    torch_prefill_layout(ctx, [6], torch.device("cpu"))
    image_blocks(ctx, [[(1, 3)]])
    mask = ctx.prefill_mask[0, 0]
    assert mask[1, 3] and mask[3, 1] and mask[2, 3] and not mask[0, 1] and not mask[3, 4]
    assert mask.tril().sum() == 21 and mask.triu(1).sum() == 3
    ctx = StepContext(is_prefill=True, slot_mapping=torch.zeros(4, dtype=torch.long))
    torch_prefill_layout(ctx, [4], torch.device("cpu"), starts=[8], width=16)
    image_blocks(ctx, [[(9, 2)]])
    mask = ctx.prefill_mask[0, 0]
    assert mask[1, 10] and not mask[0, 9] and not mask[2, 12] and mask[0, :9].all()
    inputs = ImageInputs(torch.zeros(1), list(range(9, 11)), [(9, 2)], [b"h"],
                         bidirectional=True)
    assert inputs.chunk_len(8, 2) == 1 and inputs.chunk_len(9, 1) == 0


def test_server_chat_with_data_url_image(gemma3):
    """The chat route's image_url parts (base and adapter: HF's greedy tokens), an
    undecodable image a 400 alone, /v1/responses' input_image parts and /tokenize of
    such messages: HF's expanded prompt."""
    a = image(1)
    content = [{"type": "image_url", "image_url": {"url": data_url(a)}},
               {"type": "text", "text": "What is this?"}]
    args = ["--max-model-len", "256", "--dtype", "float32", "--enable-lora",
            "--max-lora-rank", "8", "--lora-modules", f"r8={gemma3['r8']}",
            "--limit-mm-per-prompt", '{"image": 1}']  # (an image's crops are not counted)
    base = str(gemma3["base"])
    text = "<|user|><start_of_image>What is this?\n<|assistant|>"
    inp = hf_inputs(gemma3["base"], text, [a], add_special_tokens=False)
    ids = inp["input_ids"][0].tolist()
    with RemoteServer(gemma3["base"], args) as server:
        client = server.get_client()
        for model, adapter in ((base, None), ("r8", gemma3["r8"])):
            got = chat_token_ids(client, model, content)
            ref = hf_logprobs(gemma3["base"], adapter, ids + got[:-1], inp["pixel_values"])
            assert got == ref[len(ids) - 1:].argmax(-1).tolist()
        with pytest.raises(openai.BadRequestError) as info:
            chat_token_ids(client, base, [{"type": "image_url", "image_url": {
                "url": "data:image/png;base64,AAAA"}}])
        err = info.value.body
        assert err["type"] == "BadRequestError" and info.value.status_code == 400, err
        assert "cannot decode the image" in err["message"]
        resp = client.responses.create(
            model=base, max_output_tokens=4, temperature=0,
            input=[{"role": "user", "content": [
                {"type": "input_image", "image_url": data_url(a)},
                {"type": "input_text", "text": "What is this?"}]}])
        # max_output_tokens reached: "incomplete"; the prompt is HF's expansion
        assert resp.usage.input_tokens == len(ids) and resp.usage.output_tokens == 4
        tok = server.post("/tokenize", {"model": base, "messages": [
            {"role": "user", "content": content}]})
        assert tok.status_code == 200, tok.text
        assert tok.json()["tokens"] == ids and tok.json()["count"] == len(ids)
        _pan_and_scan_over_http(server, client, gemma3, text)
        assert len(chat_token_ids(client, base, content)) == GREEDY.max_tokens  # still serving


def _pan_and_scan_over_http(server, client, gemma3, text: str) -> None:
    """A chat request's mm_processor_kwargs (vLLM's extra): a wide image's crops in its
    prompt (usage and /tokenize count them), under an adapter: HF's greedy tokens; a key
    the processor does not take, and a value of the wrong kind, a 400 each."""
    wide = image(5, (120, 40))
    options = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 20}
    content = [{"type": "image_url", "image_url": {"url": data_url(wide)}},
               {"type": "text", "text": "What is this?"}]
    inp = hf_inputs(gemma3["base"], text, [wide], add_special_tokens=False, options=options)
    ids = inp["input_ids"][0].tolist()
    assert len(inp["pixel_values"]) == 4  # the image and 3 crops
    resp = client.chat.completions.create(
        model="r8", messages=[{"role": "user", "content": content}], temperature=0,
        max_tokens=4, logprobs=True, extra_body={
            "ignore_eos": True, "return_tokens_as_token_ids": True,
            "mm_processor_kwargs": options})
    got = [int(c.token.split(":", 1)[1]) for c in resp.choices[0].logprobs.content]
    assert resp.usage.prompt_tokens == len(ids)
    ref = hf_logprobs(gemma3["base"], gemma3["r8"], ids + got[:-1], inp["pixel_values"])
    assert got == ref[len(ids) - 1:].argmax(-1).tolist()
    tok = server.post("/tokenize", {"model": "r8", "mm_processor_kwargs": options,
                                    "messages": [{"role": "user", "content": content}]})
    assert tok.status_code == 200, tok.text
    assert tok.json()["tokens"] == ids
    for bad, message in (({"do_pan_and_scan": True, "crop": 2}, "'crop' is not an option"),
                         ({"do_pan_and_scan": 1}, "must be true or false")):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model="r8", messages=[{"role": "user", "content": content}], max_tokens=2,
                extra_body={"mm_processor_kwargs": bad})
        err = info.value.body
        assert info.value.status_code == 400 and message in err["message"], err
        assert err["param"] == "mm_processor_kwargs", err
