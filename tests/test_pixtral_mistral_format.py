"""Mistral's own format with a vision encoder (Pixtral-12B-2409's layout; Mistral Small
3.1's, with the patch merger and the projector's norm): params.json's `vision_encoder`,
consolidated.safetensors' `vision_encoder.*`, `vision_language_adapter.*`,
`patch_merger.*`, `pre_mm_projector_norm.*`, images encoded by mistral_common (chat and
prompt ids under tokenizer_mode "mistral", which "auto" picks here).

The reference is HF transformers (+ PEFT) on the HF checkpoint the Mistral-format one
was written from (tests/pixtral_fixtures.py), fp32, its input ids and pixels
mistral_common's own encoding of the same conversation: greedy tokens HF's, logprobs
within 1e-4, under the base, two language-model adapters of different ranks and one
with LoRA on the tower and projector too (--enable-tower-connector-lora), in one batch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from loraplex import LoRARequest
from tests.engine_utils import make_llm
from tests.llava_fixtures import image
from tests.mistral3_fixtures import GREEDY
from tests.multimodal_fixtures import (
    assert_matches_reference,
    hf_logprobs,
    make_multimodal_adapter,
    with_adapters,
)
from tests.pixtral_fixtures import (
    TEKKEN_IMAGE_TOKEN,
    check_chat_server,
    make_tiny_pixtral,
    write_pixtral_mistral_format,
)

pytest.importorskip("PIL")
pytest.importorskip("mistral_common")
pytest.importorskip("cv2", reason="mistral_common encodes images with OpenCV "
                    "(opencv-python-headless, loraplex[mistral])")
if int(__import__("transformers").__version__.split(".")[0]) < 5:  # pragma: no cover
    pytest.skip("Pixtral is checked against transformers 5 only so far",
                allow_module_level=True)

from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk  # noqa: E402
from mistral_common.protocol.instruct.messages import UserMessage  # noqa: E402
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402

ASK = "What is this?"


_MADE: dict[str, dict[str, Path]] = {}


def _make(tiny_root: Path, kind: str) -> dict[str, Path]:
    """The HF model (Pixtral-12B's LLaVA, or a Mistral 3), adapters on it (r8, r4: the
    language model's; all: every linear, tower and projector included) and its copy in
    Mistral's format ("mistral"); made once a session."""
    if kind not in _MADE:
        root = tiny_root / f"pixtral_mistral_{kind}"
        base = make_tiny_pixtral(root / "base", seed=90, mistral3=kind == "mistral3",
                                 tekken=True)
        out = with_adapters(base, seed=91)
        out["all"] = make_multimodal_adapter(base, root / "all", r=8, seed=93,
                                             targets="all-linear", scale=0.2)
        out["mistral"] = write_pixtral_mistral_format(base, root / "mistral")
        _MADE[kind] = out
    return _MADE[kind]


@pytest.fixture(scope="module", params=["llava", "mistral3"])
def pixtral(request, tiny_root: Path) -> dict[str, Path]:
    return _make(tiny_root, request.param)


@pytest.fixture(scope="module")
def small31(tiny_root: Path) -> dict[str, Path]:
    """Mistral Small 3.1's layout (patch merger, projector norm)."""
    return _make(tiny_root, "mistral3")


def conversation(parts: list) -> list[dict]:
    """One user message of text and PIL image parts, as the OpenAI chat form."""
    return [{"role": "user", "content": [
        {"type": "text", "text": p} if isinstance(p, str) else
        {"type": "image_pil", "image_pil": p} for p in parts]}]


def reference_inputs(mistral_dir: Path, parts: list) -> dict[str, torch.Tensor]:
    """mistral_common's own encoding of the message: its ids, its images zero-padded to
    the largest as HF's pixel_values, their sizes as image_sizes."""
    tok = MistralTokenizer.from_file(str(mistral_dir / "tekken.json"))
    chunks = [TextChunk(text=p) if isinstance(p, str) else ImageChunk(image=p) for p in parts]
    enc = tok.encode_chat_completion(ChatCompletionRequest(
        messages=[UserMessage(content=chunks)]))
    out = {"input_ids": torch.tensor([enc.tokens])}
    if enc.images:
        h = max(im.shape[1] for im in enc.images)
        w = max(im.shape[2] for im in enc.images)
        pixels = torch.zeros(len(enc.images), 3, h, w)
        for i, im in enumerate(enc.images):
            pixels[i, :, :im.shape[1], :im.shape[2]] = torch.from_numpy(im)
        out["pixel_values"] = pixels
        out["image_sizes"] = torch.tensor([im.shape[1:] for im in enc.images])
    return out


def check(outs, paths: dict[str, Path], jobs: list[tuple[list, str | None]]) -> None:
    """Each output's prompt is mistral_common's encoding of its message, its tokens and
    logprobs HF's (+ PEFT's) on them."""
    for out, (parts, adapter) in zip(outs, jobs, strict=True):
        inp = reference_inputs(paths["mistral"], parts)
        ids = inp["input_ids"][0].tolist()
        assert out.prompt_token_ids == ids
        ref = hf_logprobs(paths["base"], paths[adapter] if adapter else None, inp,
                          out.outputs[0].token_ids[:-1])[len(ids) - 1:]
        assert_matches_reference(out, ref, adapter)


def test_chat_mixed_batch_matches_hf(pixtral):
    """Mistral's format loads as the HF model (the vision tower's q / k permuted back):
    chats with images of two sizes, two images in one message and text alone, under the
    base, r8, r4 and an adapter with LoRA on the tower too, over two slots, in one call."""
    llm = make_llm(pixtral["mistral"], enable_lora=True, enable_tower_connector_lora=True,
                   max_loras=2, max_lora_rank=8)
    engine = llm.llm_engine
    assert engine.tokenizer_mode == "mistral" and engine.mistral_format.weights
    assert type(engine.vision).__name__ == "PixtralVision"
    a, b = image(1), image(2, (30, 50))
    jobs = [([a, ASK], None), ([a, ASK], "r8"), ([b, ASK], "r4"), ([a, ASK], "all"),
            (["Which is brighter: ", a, " or ", b, "?"], "all"), (["Hello there"], "r8"),
            ([b, ASK], None)]
    loras = {n: LoRARequest(n, i, str(pixtral[n])) for i, n in enumerate(("r8", "r4", "all"), 1)}
    outs = llm.chat([conversation(p) for p, _ in jobs], GREEDY, use_tqdm=False,
                    lora_request=[loras[n] if n else None for _, n in jobs])
    check(outs, pixtral, jobs)
    ids = outs[0].prompt_token_ids  # 32 x 40 pixels in 8-pixel tokens: 4 rows of 5
    assert ids.count(TEKKEN_IMAGE_TOKEN) == 20 and ids.count(12) == 3 and ids.count(13) == 1
    tokens = [o.outputs[0].token_ids for o in outs]
    assert len({tuple(t) for t in tokens[:4]}) == 4  # the adapters and the tower's LoRA count


def test_prompt_ids_and_refusals_fail_alone(pixtral):
    """prompt_token_ids with one `[IMG]` id per image are expanded by mistral_common's
    grid (HF's output); "[IMG]" in a text prompt is text to mistral_common (a clear
    error), as is a missing placeholder, too many images and an undecodable one: each
    fails its call only."""
    llm = make_llm(pixtral["mistral"], limit_mm_per_prompt={"image": 1})
    a = image(3, (50, 20))
    ref = reference_inputs(pixtral["mistral"], [a, ASK])["input_ids"][0].tolist()
    first, last = ref.index(TEKKEN_IMAGE_TOKEN), ref.index(13)
    ids = ref[:first] + [TEKKEN_IMAGE_TOKEN] + ref[last + 1:]
    prompt = {"prompt_token_ids": ids, "multi_modal_data": {"image": [a]}}
    with pytest.raises(ValueError, match=r"0 image placeholder.*reads \"\[IMG\]\".*as text"):
        llm.generate({"prompt": "[IMG]" + ASK, "multi_modal_data": {"image": [a]}}, GREEDY,
                     use_tqdm=False)
    with pytest.raises(ValueError, match=r"At most 1 image"):
        llm.generate({**prompt, "multi_modal_data": {"image": [a, a]}}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="cannot decode the image"):
        llm.generate({**prompt, "multi_modal_data": {"image": ["data:image/png;base64,AAAA"]}},
                      GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    outs = llm.generate(prompt, GREEDY, use_tqdm=False)
    check(outs, pixtral, [([a, ASK], None)])


def test_server_chat(small31):
    """The chat route (tokenizer, config and weights "auto": Mistral's) with an image_url
    part under the base and an adapter: HF's greedy tokens; bad images and one too many
    fail with a 400, the server carrying on."""
    pixtral = small31
    a = image(2, (30, 50))
    check_chat_server(pixtral["mistral"], pixtral, a, ASK,
                      reference_inputs(pixtral["mistral"], [a, ASK]))


def test_hf_layout_under_mistral_tokenizer(small31, tmp_path):
    """An HF-format Mistral 3 with Mistral's tokenizer beside it (tokenizer_mode
    "mistral", no HF image processor): its chats' images take mistral_common's encoding
    too, HF's output on them."""
    hf = Path(shutil.copytree(small31["base"], tmp_path / "hf"))
    shutil.copy(small31["mistral"] / "tekken.json", hf / "tekken.json")
    llm = make_llm(hf, tokenizer_mode="mistral")
    assert not llm.llm_engine.mistral_format.weights
    jobs = [([image(1), ASK], None), ([image(2, (30, 50)), ASK], None)]
    outs = llm.chat([conversation(p) for p, _ in jobs], GREEDY, use_tqdm=False)
    check(outs, small31, jobs)
