"""vLLM's two multimodal options on a tiny LLaVA, against HF transformers (+ PEFT), fp32:
`limit_mm_per_prompt` (a prompt with more images than allowed fails alone, a chat's
before its images are fetched; {"image": 0} serves the checkpoint on text without its
vision tower) and `default_mm_loras` (a prompt with images whose request names no
adapter runs under the modality's adapter; text prompts and requests naming an adapter
are left as they are), offline and over a real server."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from loraplex import LoRARequest
from loraplex.config import MultiModalConfig
from loraplex.engine.llm_engine import DEFAULT_MM_LORA_IDS
from tests.engine_utils import make_llm
from tests.fixtures import make_tiny_model
from tests.llava_fixtures import (
    ASK,
    GREEDY,
    check,
    data_url,
    hf_inputs,
    hf_logprobs,
    image,
    make_tiny_llava,
    processor,
    with_adapters,
)
from tests.multimodal_fixtures import chat_token_ids, request
from tests.server_utils import RemoteServer

pytest.importorskip("PIL")

TEXT = "USER: What is the capital of France? ASSISTANT:"
TWO = "USER: <image> and <image>: which is brighter? ASSISTANT:"


@pytest.fixture(scope="module")
def llava(tiny_root: Path) -> dict[str, Path]:
    return with_adapters(make_tiny_llava(tiny_root / "mm_options" / "base", seed=70), seed=71)


@pytest.mark.parametrize("given", [{"image": 1}, '{"image": {"count": 1}}', "image=1"])
def test_limit_refuses_only_the_prompt_over_it(given, llava):
    """vLLM's three spellings; two images in one prompt fail alone, before any image is
    processed; the engine serves on."""
    llm = make_llm(llava["base"], limit_mm_per_prompt=given)
    a, b = image(1), image(2)
    with pytest.raises(ValueError, match=r"At most 1 image\(s\) may be provided in one "
                                         r"prompt, got 2"):
        llm.generate(request(TWO, [a, "not even an image"]), GREEDY, use_tqdm=False)
    conv = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(a)}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    with pytest.raises(ValueError, match=r"messages\[0\]: At most 1 image"):
        llm.chat(conv, GREEDY, use_tqdm=False)  # the second is never decoded
    assert not llm.llm_engine.has_unfinished_requests()
    outs = llm.generate([request(ASK, [b]), TEXT], GREEDY, use_tqdm=False)
    check(outs, llava["base"], [(ASK, [b], None), (TEXT, [], None)])


def test_limit_zero_serves_on_text_without_the_tower(llava):
    llm = make_llm(llava["base"], limit_mm_per_prompt={"image": 0}, enable_lora=True,
                   max_lora_rank=8)
    engine = llm.llm_engine
    assert engine.vision is None and engine.image_placeholder is None
    r8 = LoRARequest("r8", 1, str(llava["r8"]))
    outs = llm.generate([TEXT, TEXT], GREEDY, use_tqdm=False, lora_request=[None, r8])
    check(outs, llava["base"], [(TEXT, [], None), (TEXT, [], llava["r8"])])
    with pytest.raises(ValueError, match=r"At most 0 image\(s\)"):
        llm.generate(request(ASK, [image(1)]), GREEDY, use_tqdm=False)


def test_default_mm_lora_runs_image_prompts_that_name_no_adapter(llava):
    """One slot, three adapters in play (the image default, r8 and r4 asked by name): an
    image prompt without an adapter runs under the default; a text prompt without one,
    and an image prompt naming one, are left as they are."""
    llm = make_llm(llava["base"], enable_lora=True, max_loras=1, max_lora_rank=8,
                   default_mm_loras={"image": str(llava["r8"])})
    default = llm.llm_engine.default_mm_loras["image"]
    assert (default.lora_name, default.lora_int_id) == ("image", DEFAULT_MM_LORA_IDS + 1)
    a = image(1)
    r4 = LoRARequest("r4", 1, str(llava["r4"]))
    jobs = [(ASK, [a], None), (TEXT, [], None), (ASK, [a], r4), (TEXT, [], r4)]
    outs = llm.generate([request(p, ims) for p, ims, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[lora for *_, lora in jobs])
    check(outs, llava["base"], [(ASK, [a], llava["r8"]), (TEXT, [], None),
                                (ASK, [a], llava["r4"]), (TEXT, [], llava["r4"])])
    assert outs[0].lora_request == default and outs[1].lora_request is None
    plain = make_llm(llava["base"]).generate(request(ASK, [a]), GREEDY, use_tqdm=False)
    assert plain[0].outputs[0].token_ids != outs[0].outputs[0].token_ids  # it counted


@pytest.mark.parametrize(("kw", "match"), [
    ({"limit_mm_per_prompt": {"images": 1}}, "unknown modality 'images'"),
    ({"limit_mm_per_prompt": {"image": -1}}, "image=-1: give a count >= 0"),
    ({"limit_mm_per_prompt": {"image": True}}, "give a count"),
    ({"limit_mm_per_prompt": "image=two"}, "give JSON like"),
    ({"limit_mm_per_prompt": "{image: 1}"}, "not valid JSON"),
    ({"default_mm_loras": {"image": "x"}}, "default_mm_loras needs enable_lora"),
    ({"default_mm_loras": {"image": ""}, "enable_lora": True}, "give the adapter's path"),
])
def test_bad_options_are_refused_at_start(kw, match, llava):
    with pytest.raises(ValueError, match=match):
        make_llm(llava["base"], **kw)


def test_default_mm_lora_needs_a_modality_the_model_takes(llava, tiny_root):
    with pytest.raises(ValueError, match="takes no video inputs"):
        make_llm(llava["base"], enable_lora=True, max_lora_rank=8,
                 default_mm_loras={"video": str(llava["r8"])})
    text = make_tiny_model(tiny_root / "mm_options_text", "llama", seed=5)
    with pytest.raises(ValueError, match="takes no image inputs"):
        make_llm(text, enable_lora=True, default_mm_loras={"image": str(llava["r8"])})
    with pytest.raises(ValueError, match="takes no image inputs"):  # no image allowed
        make_llm(llava["base"], enable_lora=True, max_lora_rank=8,
                 limit_mm_per_prompt={"image": 0},
                 default_mm_loras={"image": str(llava["r8"])})


def test_unit_counts_and_defaults():
    config = MultiModalConfig.from_args(None, None)
    assert config.takes("image") and config.limit_per_prompt == {}
    config.check_count("image", 10_000)  # no limit unless asked
    config = MultiModalConfig.from_args({"image": 2, "video": 0}, None)
    assert config.takes("image") and not config.takes("video")
    config.check_count("image", 2)
    with pytest.raises(ValueError, match="At most 2"):
        config.check_count("image", 3)


def test_server_default_mm_lora_and_limit(llava):
    """The default adapter is listed under its modality's name and serves a base image
    chat (HF + PEFT's tokens); a chat over the limit is a 400 and the server goes on."""
    a = image(1)
    content = [{"type": "image_url", "image_url": {"url": data_url(a)}},
               {"type": "text", "text": "What is this?"}]
    args = ["--max-model-len", "256", "--dtype", "float32", "--enable-lora",
            "--max-lora-rank", "8", "--default-mm-loras", f'{{"image": "{llava["r8"]}"}}',
            "--limit-mm-per-prompt", '{"image": 1}']
    base = str(llava["base"])
    text = "<|user|><image>\nWhat is this?\n<|assistant|>"
    inp = hf_inputs(llava["base"], text, [a])
    ids = processor(base)(text=text, images=[a], add_special_tokens=False,
                          return_tensors="pt")["input_ids"][0].tolist()
    with RemoteServer(llava["base"], args) as server:
        client = server.get_client()
        assert {m.id for m in client.models.list().data} == {base, "image"}
        for model in (base, "image"):
            got = chat_token_ids(client, model, content)
            ref = hf_logprobs(llava["base"], llava["r8"], ids + got[:-1], inp["pixel_values"])
            assert got == ref[len(ids) - 1:].argmax(-1).tolist(), model
        with pytest.raises(openai.BadRequestError) as info:
            chat_token_ids(client, base, [*content[:1], *content])
        assert info.value.status_code == 400
        assert "At most 1 image(s) may be provided in one prompt" in info.value.body["message"]
        got = chat_token_ids(client, base, [{"type": "text", "text": "What is this?"}])
        plain = "<|user|>What is this?\n<|assistant|>"
        ids = processor(base).tokenizer(plain, add_special_tokens=False).input_ids
        ref = hf_logprobs(llava["base"], None, ids + got[:-1], None)  # text: the base
        assert got == ref[len(ids) - 1:].argmax(-1).tolist()
