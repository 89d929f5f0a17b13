"""LLaVA-NeXT (LlavaNextForConditionalGeneration) with images, against HF transformers'
LLaVA-NeXT (+ PEFT) on the same weights and the same processor outputs, fp32: each image's
placeholder count HF's processor's (it depends on the image's size), greedy tokens HF's
and logprobs within 1e-4 for wide, tall and square pictures (different tile grids and
unpadding) beside a text request, under two adapters over one slot, with prefill chunks
splitting an image's placeholders; both checkpoint namings of `image_newline`; the chat
route with a data-URL image; placeholder mismatches failing only their request."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import openai
import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex import LoRARequest
from loraplex.models.llava import LlavaVisionConfig
from tests.engine_utils import make_llm
from tests.llava_fixtures import (
    ASK,
    GREEDY,
    IMAGE_TOKEN,
    check,
    data_url,
    hf_logprobs,
    image,
    processor,
    with_adapters,
)
from tests.llava_next_fixtures import make_tiny_llava_next
from tests.multimodal_fixtures import request
from tests.server_utils import RemoteServer

pytest.importorskip("PIL")

# (width, height): 1 x 3 tiles less a patch row above and below, 3 x 1 less a patch column
# each side, 2 x 2 as it is, 2 x 2 less two rows above and below
WIDE, TALL, SQUARE, SQUAT = (90, 20), (20, 90), (40, 40), (70, 40)


@pytest.fixture(scope="module")
def next_model(tiny_root: Path) -> dict[str, Path]:
    return with_adapters(make_tiny_llava_next(tiny_root / "llava_next" / "base", seed=80),
                         seed=81)


def test_placeholder_count_is_hf_processors(next_model):
    """Unit: tokens_for gives the `<image>` count HF's LlavaNextProcessor expands an image
    of any size to; 'full' (a CLS in each tile, which HF's layout has no room for) is
    refused."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(str(next_model["base"]))
    config = LlavaVisionConfig.from_hf(hf)
    proc = processor(str(next_model["base"]))
    token = proc.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for w, h in [WIDE, TALL, SQUARE, SQUAT, (60, 20), (35, 50), (28, 28), (100, 13),
                 (9, 90), (57, 29)]:
        ids = proc(text="<image>", images=[image(0, (w, h))])["input_ids"][0]
        assert config.tokens_for((h, w)) == list(ids).count(token), (w, h)
    hf.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="LLaVA-NeXT is supported with .*'default'"):
        LlavaVisionConfig.from_hf(hf)


@pytest.mark.parametrize("change", [{"vision_feature_select_strategy": "full"},
                                    {"image_grid_pinpoints": [[28, 42], [42, 28]]}])
def test_refused_settings_have_no_reference(change, next_model):
    """Why loraplex refuses LLaVA-NeXT's "full" strategy and pinpoints that are not whole
    tiles: HF's own model fails on an image with them (if a transformers release runs
    them, this fails, and they can be matched)."""
    from transformers import AutoConfig, AutoProcessor, LlavaNextForConditionalGeneration

    hf = AutoConfig.from_pretrained(str(next_model["base"]))
    for key, value in change.items():
        setattr(hf, key, value)
    with pytest.raises(ValueError, match="HF's and vLLM's LLaVA-NeXT run no other"):
        LlavaVisionConfig.from_hf(hf)
    proc = AutoProcessor.from_pretrained(str(next_model["base"]))  # (not the cached one)
    proc.image_processor.image_grid_pinpoints = hf.image_grid_pinpoints
    proc.vision_feature_select_strategy = hf.vision_feature_select_strategy
    inp = proc(text="<image>", images=[image(0, WIDE)], return_tensors="pt")
    with torch.no_grad(), pytest.raises(RuntimeError):
        LlavaNextForConditionalGeneration(hf).eval()(**inp)


@pytest.mark.parametrize("budget", [None, 32])
def test_mixed_batch_matches_hf(budget, next_model):
    """Wide, tall and square images under the base and two adapters (one slot), a text
    request and prompts with two images, in one call; `budget` 32: every image's
    placeholders (42 to 88) are split over prefill chunks."""
    llm = make_llm(next_model["base"], enable_lora=True, max_loras=1, max_lora_rank=8,
                   max_model_len=512, max_num_batched_tokens=budget)
    wide, tall, square = image(1, WIDE), image(2, TALL), image(3, SQUARE)
    two = "USER: <image> and <image>: which is brighter? ASSISTANT:"
    jobs = [(ASK, [wide], None), (ASK, [tall], "r8"), (ASK, [square], "r4"),
            (ASK, [wide], "r8"), ("USER: What is the capital of France? ASSISTANT:", [], "r4"),
            (two, [tall, image(4, SQUAT)], None), (two, [square, wide], "r8")]
    loras = {"r8": LoRARequest("r8", 1, str(next_model["r8"])),
             "r4": LoRARequest("r4", 2, str(next_model["r4"]))}
    outs = llm.generate([request(p, ims) for p, ims, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[loras[n] if n else None for *_, n in jobs])
    check(outs, next_model["base"],
          [(p, ims, next_model[n] if n else None) for p, ims, n in jobs])
    lengths = {len(o.prompt_token_ids) for o in outs[:3]}
    assert len(lengths) == 3, "the aspect ratios should give different placeholder counts"
    assert outs[1].outputs[0].token_ids != outs[3].outputs[0].token_ids  # the image counts


@pytest.mark.parametrize("layout", ["hub", "in_memory"])
def test_image_newline_under_both_namings(layout, next_model, tmp_path):
    """The hub's names (`image_newline`, `vision_tower.vision_model.*`,
    `language_model.model.*`) and transformers 4.52+'s (`model.image_newline`,
    `model.vision_tower.vision_model.*`, `model.language_model.*`) both load to HF's
    model, whatever this transformers saves."""
    base = Path(shutil.copytree(next_model["base"], tmp_path / layout))
    path = str(base / "model.safetensors")
    outer = "model." if layout == "in_memory" else ""

    def rename(name: str) -> str:
        name = re.sub(r"^(model\.)?vision_tower\.(vision_model\.)?",
                      f"{outer}vision_tower.vision_model.", name)
        name = re.sub(r"^(model\.)?(image_newline|multi_modal_projector\.)", rf"{outer}\2", name)
        name = re.sub(r"^(model\.language_model\.|language_model\.model\.)",
                      "model.language_model." if outer else "language_model.model.", name)
        return re.sub(r"^(language_model\.)?lm_head\.",
                      "lm_head." if outer else "language_model.lm_head.", name)

    tensors = {rename(k): v for k, v in load_file(path).items()}
    assert f"{outer}image_newline" in tensors
    save_file(tensors, path, metadata={"format": "pt"})
    llm = make_llm(base, max_model_len=512)
    jobs = [(ASK, [image(4, TALL)], None), (ASK, [image(5, WIDE)], None)]
    outs = llm.generate([request(p, ims) for p, ims, _ in jobs], GREEDY, use_tqdm=False)
    check(outs, next_model["base"], jobs)


def test_offline_mismatches_fail_only_their_request(next_model):
    llm = make_llm(next_model["base"], max_model_len=512)
    a = image(1, WIDE)
    with pytest.raises(ValueError, match="1 image placeholder token.*for 2 image"):
        llm.generate(request(ASK, [a, a]), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="2 image placeholder token.*for 1 image"):
        llm.generate(request(ASK + " <image>", [a]), GREEDY, use_tqdm=False)
    engine = llm.llm_engine
    ids = processor(str(next_model["base"])).tokenizer(ASK).input_ids
    wide_ids, _ = engine.image_processor(ids, [a])
    _, tall = engine.image_processor(ids, [image(2, TALL)])  # more placeholders than a's
    with pytest.raises(ValueError, match="processed image inputs do not match"):
        llm.generate({"prompt_token_ids": wide_ids, "multi_modal_data": {"image": tall}},
                     GREEDY, use_tqdm=False)
    assert not engine.has_unfinished_requests()
    check(llm.generate(request(ASK, [a]), GREEDY, use_tqdm=False), next_model["base"],
          [(ASK, [a], None)])


def test_server_chat_with_data_url_image(next_model):
    """The chat route with an image_url data URL, under the base and an adapter: HF's
    greedy tokens; a placeholder mismatch is a 400 and the server goes on."""
    img = image(6, TALL)
    content = [{"type": "image_url", "image_url": {"url": data_url(img)}},
               {"type": "text", "text": "What is this?"}]
    args = ["--max-model-len", "512", "--dtype", "float32", "--enable-lora",
            "--max-lora-rank", "8", "--lora-modules", f"r8={next_model['r8']}"]
    base = str(next_model["base"])
    text = "<|user|><image>\nWhat is this?\n<|assistant|>"
    inp = processor(base)(text=text, images=[img], add_special_tokens=False,
                          return_tensors="pt")
    ids = inp["input_ids"][0].tolist()

    def chat(client: openai.OpenAI, model: str, parts: list) -> tuple[list[int], int]:
        resp = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": parts}], temperature=0,
            max_tokens=GREEDY.max_tokens, logprobs=True,
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        toks = [int(c.token.split(":", 1)[1]) for c in resp.choices[0].logprobs.content]
        return toks, resp.usage.prompt_tokens

    with RemoteServer(next_model["base"], args) as server:
        client = server.get_client()
        for model, adapter in ((base, None), ("r8", next_model["r8"])):
            got, prompt_tokens = chat(client, model, content)
            assert prompt_tokens == len(ids)
            ref = hf_logprobs(next_model["base"], adapter, ids + got[:-1],
                              inp["pixel_values"], inp["image_sizes"])
            assert got == ref[len(ids) - 1:].argmax(-1).tolist(), model
        with pytest.raises(openai.BadRequestError) as info:
            chat(client, base, [*content, {"type": "text", "text": " <image>"}])
        assert re.search("2 image placeholder token.*for 1 image",
                         info.value.body["message"]), info.value.body
        assert len(chat(client, base, content)[0]) == GREEDY.max_tokens  # still serving
