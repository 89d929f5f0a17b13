"""Mistral 3 (Mistral3ForConditionalGeneration: Mistral Small 3.1 / 3.2, Magistral Small,
Ministral 3, Devstral Small 2) against HF transformers (+ PEFT) on the same weights, fp32:
its language model on text (a Mistral, or a Ministral 3 with YaRN and Llama 4's query
scaling), greedy tokens HF's and logprobs within 1e-4, under the base and two adapters
of different ranks over fewer slots than adapters."""

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
    hf_logprobs,
    make_tiny_mistral3,
    tokenizer,
    with_adapters,
)
from tests.multimodal_fixtures import request

pytest.importorskip("PIL")

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
