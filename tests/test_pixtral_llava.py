"""Pixtral-12B in HF's layout (mistral-community/pixtral-12b: `LlavaForConditionalGeneration`
with a `pixtral` vision config, LLaVA's projector, one `[IMG]` per patch, rows closed by
`[IMG_BREAK]`, the image by `[IMG_END]`) against HF transformers (+ PEFT) on the same
weights, fp32: greedy tokens HF's and logprobs within 1e-4, under the base and two
adapters of different ranks over fewer slots than adapters; offline chat and the
server's chat route; bad inputs fail alone. (Tower LoRA: tests/test_tower_lora.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex import LoRARequest
from tests.engine_utils import make_llm
from tests.llava_fixtures import data_url, image
from tests.mistral3_fixtures import (
    ASK,
    GREEDY,
    IMAGE_TOKENS,
    check,
    hf_inputs,
    tokenizer,
    with_adapters,
)
from tests.multimodal_fixtures import request
from tests.pixtral_fixtures import check_chat_server, make_tiny_pixtral

pytest.importorskip("PIL")
if int(__import__("transformers").__version__.split(".")[0]) < 5:  # pragma: no cover
    pytest.skip("Pixtral is checked against transformers 5 only so far (4.56 lacks "
                "PixtralImageProcessorPil)", allow_module_level=True)


@pytest.fixture(scope="module")
def pixtral(tiny_root: Path) -> dict[str, Path]:
    return with_adapters(make_tiny_pixtral(tiny_root / "pixtral_llava" / "base", seed=80),
                         seed=81)


def test_mixed_batch_with_images_matches_hf(pixtral):
    """Image requests under the base and two adapters (one slot), a text request, two
    images of different sizes in one prompt, in one call; a budget of 12 tokens splits an
    image's 24 over prefill chunks."""
    llm = make_llm(pixtral["base"], enable_lora=True, max_loras=1, max_lora_rank=8,
                   max_num_batched_tokens=12)
    assert type(llm.llm_engine.vision).__name__ == "PixtralVision"
    a, b = image(1), image(2, (30, 50))
    two = "USER: [IMG] and [IMG]: which is brighter? ASSISTANT:"
    jobs = [(ASK, [a], None), (ASK, [a], "r8"), (ASK, [a], "r4"), (ASK, [b], "r8"),
            ("USER: What is the capital of France? ASSISTANT:", [], "r4"),
            (two, [a, b], None), (two, [b, a], "r8")]
    loras = {"r8": LoRARequest("r8", 1, str(pixtral["r8"])),
             "r4": LoRARequest("r4", 2, str(pixtral["r4"]))}
    outs = llm.generate([request(p, ims) for p, ims, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[loras[n] if n else None for *_, n in jobs])
    check(outs, pixtral["base"], [(p, ims, pixtral[n] if n else None) for p, ims, n in jobs])
    img, brk, end = tokenizer(str(pixtral["base"])).convert_tokens_to_ids(IMAGE_TOKENS)
    ids = outs[0].prompt_token_ids  # 32 x 40 pixels, 8-pixel patches: 4 rows of 5
    assert ids.count(img) == 20 and ids.count(brk) == 3 and ids.count(end) == 1
    assert len({tuple(o.outputs[0].token_ids) for o in outs[:3]}) == 3
    assert outs[1].outputs[0].token_ids != outs[3].outputs[0].token_ids  # the image counts


def test_chat_and_refusals_fail_alone(pixtral):
    """LLM.chat's image parts become `[IMG]` in the template's text (HF's output); a
    prompt without a placeholder for its image, too many images for limit_mm_per_prompt
    and an undecodable image each fail their call only."""
    llm = make_llm(pixtral["base"], limit_mm_per_prompt={"image": 2})
    a, b = image(1), image(3, (50, 20))
    conv = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(a)}},
        {"type": "text", "text": "What is this? And "},
        {"type": "image_pil", "image_pil": b}]}]
    text = "<|user|>[IMG]\nWhat is this? And [IMG]\n\n<|assistant|>"
    check(llm.chat(conv, GREEDY, use_tqdm=False), pixtral["base"], [(text, [a, b], None)],
          add_special_tokens=False)
    with pytest.raises(ValueError, match=r"0 image placeholder token.*for 1 image"):
        llm.generate(request("USER: What is this? ASSISTANT:", [a]), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=r"At most 2 image"):
        llm.generate(request(ASK, [a, a, a]), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="cannot decode the image"):
        llm.generate(request(ASK, ["data:image/png;base64,AAAA"]), GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    check(llm.generate([request(ASK, [a])], GREEDY, use_tqdm=False), pixtral["base"],
          [(ASK, [a], None)])


def test_server_chat_with_image_parts(pixtral):
    """The chat route with an image_url part, under the base and an adapter: HF's greedy
    tokens; a bad image and a second image past the limit fail with a 400, the server
    carrying on."""
    a = image(2, (30, 50))
    text = "<|user|>[IMG]\nWhat is this?\n<|assistant|>"
    inputs = hf_inputs(pixtral["base"], text, [a], add_special_tokens=False)
    check_chat_server(pixtral["base"], pixtral, a, "What is this?", inputs)
