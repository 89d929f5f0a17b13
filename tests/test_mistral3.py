"""Mistral 3 (Mistral3ForConditionalGeneration: Mistral Small 3.1 / 3.2, Magistral Small,
Ministral 3, Devstral Small 2) against HF transformers (+ PEFT) on the same weights, fp32:
its language model on text (a Mistral, or a Ministral 3 with YaRN and Llama 4's query
scaling), greedy tokens HF's and logprobs within 1e-4, under the base and two adapters
of different ranks over fewer slots than adapters."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import openai
import pytest
from safetensors.torch import load_file, save_file

from loraplex import LoRARequest
from tests.engine_utils import make_llm
from tests.llava_fixtures import data_url, image
from tests.mistral3_fixtures import (
    ASK,
    GREEDY,
    IMAGE_TOKENS,
    check,
    hf_inputs,
    hf_logprobs,
    make_tiny_mistral3,
    tokenizer,
    with_adapters,
)
from tests.multimodal_fixtures import chat_token_ids, make_multimodal_adapter, request
from tests.server_utils import RemoteServer

pytest.importorskip("PIL")
if int(__import__("transformers").__version__.split(".")[0]) < 5:  # pragma: no cover
    pytest.skip("Mistral 3 is checked against transformers 5 only so far (4.56 lacks "
                "Ministral 3 and PixtralImageProcessorPil)", allow_module_level=True)

LONG = ("USER: Once upon a time there was a little girl who lived in a village near the "
        "forest. The quick brown fox jumps over the lazy dog. What happened next? ASSISTANT:")


@pytest.fixture(scope="module", params=["mistral", "ministral3"])
def mistral3(request, tiny_root: Path) -> dict[str, Path]:
    base = make_tiny_mistral3(tiny_root / f"mistral3_{request.param}" / "base", seed=70,
                              text=request.param)
    return with_adapters(base, seed=71)


def test_text_matches_hf(mistral3):
    """Text requests under the base and two adapters (one slot): HF's model's outputs;
    the long prompt runs past Ministral 3's original context (its query scaling)."""
    llm = make_llm(mistral3["base"], enable_lora=True, max_loras=1, max_lora_rank=8)
    jobs = [(LONG, [], None), (LONG, [], "r8"), (LONG, [], "r4"),
            ("USER: What is the capital of France? ASSISTANT:", [], "r8")]
    loras = {"r8": LoRARequest("r8", 1, str(mistral3["r8"])),
             "r4": LoRARequest("r4", 2, str(mistral3["r4"]))}
    outs = llm.generate([request(p, ims) for p, ims, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[loras[n] if n else None for *_, n in jobs])
    check(outs, mistral3["base"], [(p, ims, mistral3[n] if n else None) for p, ims, n in jobs])
    assert len({tuple(o.outputs[0].token_ids) for o in outs[:3]}) == 3


@pytest.mark.parametrize(("max_loras", "budget"), [(1, None), (2, 12)])
def test_mixed_batch_with_images_matches_hf(max_loras, budget, mistral3):
    """Image requests under the base and two adapters, a text request, two images of
    different sizes in one prompt, in one call; `budget` 12 < an image's 20 [IMG]
    tokens: its expansion is split over prefill chunks (the tower's output reused)."""
    llm = make_llm(mistral3["base"], enable_lora=True, max_loras=max_loras, max_lora_rank=8,
                   max_num_batched_tokens=budget)
    a, b = image(1), image(2, (30, 50))
    two = "USER: [IMG] and [IMG]: which is brighter? ASSISTANT:"
    jobs = [(ASK, [a], None), (ASK, [a], "r8"), (ASK, [a], "r4"), (ASK, [b], "r8"),
            ("USER: What is the capital of France? ASSISTANT:", [], "r4"),
            (two, [a, b], None), (two, [b, a], "r8")]
    loras = {"r8": LoRARequest("r8", 1, str(mistral3["r8"])),
             "r4": LoRARequest("r4", 2, str(mistral3["r4"]))}
    outs = llm.generate([request(p, ims) for p, ims, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[loras[n] if n else None for *_, n in jobs])
    check(outs, mistral3["base"], [(p, ims, mistral3[n] if n else None) for p, ims, n in jobs])
    tok = tokenizer(str(mistral3["base"]))
    img, brk, end = tok.convert_tokens_to_ids(IMAGE_TOKENS)
    ids = outs[0].prompt_token_ids  # 32 x 40 pixels: 4 rows of 5, a break after each
    assert ids.count(img) == 20 and ids.count(brk) == 3 and ids.count(end) == 1
    assert ids[ids.index(img) + 5] == brk and ids.index(end) == ids.index(img) + 23
    assert len({tuple(o.outputs[0].token_ids) for o in outs[:3]}) == 3
    assert outs[1].outputs[0].token_ids != outs[3].outputs[0].token_ids  # the image counts


def test_prefix_cache_never_shares_across_images(mistral3):
    """The same text with another image of the same size: only the blocks before the
    image's first token are shared; the same image again: all but the last block."""
    llm = make_llm(mistral3["base"], enable_prefix_caching=True, block_size=8)
    prompt = "USER: Once upon a time there was a little girl who lived in a village. " + ASK[6:]
    a, b = image(1), image(2)
    runs = [llm.generate([request(prompt, [img])], GREEDY, use_tqdm=False)[0]
            for img in (a, b, a)]
    check(runs, mistral3["base"], [(prompt, [img], None) for img in (a, b, a)])
    ids = runs[0].prompt_token_ids
    first_image = ids.index(tokenizer(str(mistral3["base"])).convert_tokens_to_ids("[IMG]"))
    assert runs[0].num_cached_tokens == 0
    assert runs[1].num_cached_tokens == first_image // 8 * 8 > 0
    assert runs[2].num_cached_tokens == (len(ids) - 1) // 8 * 8
    assert runs[0].outputs[0].token_ids != runs[1].outputs[0].token_ids


def test_chat_with_image_parts(mistral3):
    """LLM.chat: an image_url part (data URL) and an image_pil part become `[IMG]` in the
    template's text, the images the request's."""
    llm = make_llm(mistral3["base"])
    a, b = image(1), image(3, (50, 20))
    conv = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(a)}},
        {"type": "text", "text": "What is this? And "},
        {"type": "image_pil", "image_pil": b}]}]
    outs = llm.chat(conv, GREEDY, use_tqdm=False)
    text = "<|user|>[IMG]\nWhat is this? And [IMG]\n\n<|assistant|>"
    check(outs, mistral3["base"], [(text, [a, b], None)], add_special_tokens=False)


def test_offline_refusals_fail_only_their_request(mistral3):
    llm = make_llm(mistral3["base"])
    engine, a = llm.llm_engine, image(1)
    with pytest.raises(ValueError, match=r"1 image placeholder token.*for 2 image"):
        llm.generate(request(ASK, [a, a]), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=r"2 image placeholder token.*for 1 image"):
        llm.generate(request(ASK + " [IMG]", [a]), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=r"not the expansion of 1 image"):
        llm.generate(request(ASK + "[IMG_BREAK]", [a]), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="cannot decode the image"):
        llm.generate(request(ASK, ["data:image/png;base64,AAAA"]), GREEDY, use_tqdm=False)
    ids = tokenizer(str(mistral3["base"]))(ASK).input_ids
    expanded, inputs = engine.image_processor(ids, [a])
    brk = tokenizer(str(mistral3["base"])).convert_tokens_to_ids("[IMG_BREAK]")
    broken = [t for i, t in enumerate(expanded) if i != expanded.index(brk)]  # a row merged
    with pytest.raises(ValueError, match="processed image inputs do not match"):
        llm.generate({"prompt_token_ids": broken, "multi_modal_data": {"image": inputs}},
                     GREEDY, use_tqdm=False)
    assert not engine.has_unfinished_requests()
    # processed beforehand (the server's way) and raw: both HF's
    outs = llm.generate([{"prompt_token_ids": expanded, "multi_modal_data": {"image": inputs}},
                         request(ASK, [a])], GREEDY, use_tqdm=False)
    check(outs, mistral3["base"], [(ASK, [a], None)] * 2)


def test_lora_on_the_vision_tower(mistral3, tmp_path, caplog):
    """LoRA applies to the language model (vLLM's rule): an adapter's LoRA on the Pixtral
    tower (whose q_proj shares the language model's name) and the projector is left out
    with a warning."""
    both = make_multimodal_adapter(
        mistral3["base"], tmp_path / "both", r=4, seed=93,
        targets=r".*(language_model.*\.q_proj|vision_tower.*\.q_proj|merging_layer|linear_1)")
    llm = make_llm(mistral3["base"], enable_lora=True, max_lora_rank=8)
    with caplog.at_level("WARNING"):
        out = llm.generate(request(ASK, [image(1)]), GREEDY, use_tqdm=False,
                           lora_request=LoRARequest("both", 1, str(both)))
    assert "left out (LoRA applies to the language model only)" in caplog.text
    assert len(out[0].outputs[0].token_ids) == GREEDY.max_tokens


def test_server_chat_with_image_parts(mistral3):
    """The chat route with an image_url part, under the base and an adapter: HF's greedy
    tokens; /tokenize gives the expanded ids; bad inputs fail alone with a 400."""
    a = image(2, (30, 50))
    content = [{"type": "image_url", "image_url": {"url": data_url(a)}},
               {"type": "text", "text": "What is this?"}]
    args = ["--max-model-len", "256", "--dtype", "float32", "--enable-lora",
            "--max-lora-rank", "8", "--lora-modules", f"r8={mistral3['r8']}"]
    text = "<|user|>[IMG]\nWhat is this?\n<|assistant|>"
    inp = hf_inputs(mistral3["base"], text, [a], add_special_tokens=False)
    ids = inp["input_ids"][0].tolist()
    with RemoteServer(mistral3["base"], args) as server:
        client = server.get_client()
        base = str(mistral3["base"])
        for model, adapter in ((base, None), ("r8", mistral3["r8"])):
            got = chat_token_ids(client, model, content)
            ref = hf_logprobs(mistral3["base"], adapter, inp, got[:-1])
            assert got == ref[len(ids) - 1:].argmax(-1).tolist()
        tok = server.post("/tokenize", {"model": base, "messages": [
            {"role": "user", "content": content}]})
        assert tok.status_code == 200, tok.text
        assert tok.json()["tokens"] == ids
        for parts, match in (
                ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
                 "cannot decode the image"),
                ([*content, {"type": "text", "text": " [IMG]"}],
                 "2 image placeholder token.*for 1 image")):
            with pytest.raises(openai.BadRequestError) as info:
                chat_token_ids(client, base, parts)
            assert re.search(match, info.value.body["message"]), info.value.body
        assert len(chat_token_ids(client, base, content)) == GREEDY.max_tokens  # still serving


@pytest.mark.parametrize("layout", ["in_memory", "no_tie_flag"])
def test_checkpoint_layouts(layout, mistral3, tmp_path):
    """transformers 4.52+'s in-memory names (`model.language_model.*`,
    `model.vision_tower.*`, `lm_head.*`) load; a config.json without the top-level
    tie_word_embeddings (Mistral3Config defaults it to true) over an untied checkpoint:
    HF keeps lm_head apart, and so does loraplex."""
    base = Path(shutil.copytree(mistral3["base"], tmp_path / layout))
    if layout == "in_memory":
        path = str(base / "model.safetensors")

        def rename(name: str) -> str:
            name = re.sub(r"^(vision_tower|multi_modal_projector)\.", r"model.\1.", name)
            name = name.replace("language_model.model.", "model.language_model.", 1)
            return name.replace("language_model.lm_head.", "lm_head.", 1)
        save_file({rename(k): v for k, v in load_file(path).items()}, path,
                  metadata={"format": "pt"})
    else:
        cfg = json.loads((base / "config.json").read_text())
        del cfg["tie_word_embeddings"]
        (base / "config.json").write_text(json.dumps(cfg))
    llm = make_llm(base)
    a = image(1)
    outs = llm.generate([request(ASK, [a]), LONG], GREEDY, use_tqdm=False)
    check(outs, base, [(ASK, [a], None), (LONG, [], None)])
