"""Llama 4 (Llama4ForConditionalGeneration: Scout, Maverick) with images, against HF
transformers' Llama 4 (+ PEFT) on the same weights, fp32: the tiling HF's image processor
picks (its own functions, read from its source: the processor itself needs torchvision,
which is not installed here; with torchvision, its pixels too), each <|image|> expanded as
Llama4Processor writes it (`_prompt_split_image`: tiles of <|patch|> rows with
<|tile_x_separator|> / <|tile_y_separator|>, the global view after <|image|>), the
tower's features HF's, and greedy tokens HF's with logprobs within 1e-4 for a mixed batch
(base and two adapters over one slot; text, a tiled and an untiled image), whole and
chunked prefill; prefix caching that never shares K/V across images; LLM.chat and the
server's chat route with image parts; the refusals, each failing only its request."""

from __future__ import annotations

import ast
import importlib
import inspect
import math
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import torch

from loraplex import LoRARequest, SamplingParams
from tests.engine_utils import make_llm
from tests.llama4_fixtures import (
    IMAGE_CHAT_TEMPLATE,
    MAX_TILES,
    ROWS_PER_TILE,
    TILE,
    TRANSFORMERS_MAJOR,
    fix_hf4_moe_routing,
    make_llama4_images,
)
from tests.llava_fixtures import data_url, image
from tests.multimodal_fixtures import (
    assert_matches_reference,
    chat_token_ids,
    hf_multimodal,
    make_multimodal_adapter,
    request,
)
from tests.server_utils import RemoteServer

pytest.importorskip("PIL")

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
ASK = "User: <|image|> What is this? Model:"
TWO = "User: <|image|> and <|image|>: which is brighter? Model:"
TEXT = "User: What is the capital of France? Model:"
# (width, height): one tile (no global view), 1 x 2 tiles + the global view, 2 x 2 + it
ONE, WIDE, BIG = (20, 24), (60, 30), (56, 56)


@pytest.fixture(scope="module")
def llama4img(tiny_root: Path) -> dict[str, Path]:
    if TRANSFORMERS_MAJOR < 5:
        fix_hf4_moe_routing()
    base = make_llama4_images(tiny_root / "llama4img" / "base", seed=80)
    lm = r".*language_model.*\."
    return {"base": base,
            "r8": make_multimodal_adapter(base, base.parent / "r8", r=8, seed=81),
            "r4": make_multimodal_adapter(base, base.parent / "r4", r=4, seed=82,
                                          targets=lm + "(k_proj|o_proj|gate_proj)")}


def hf_tiling() -> dict[str, Any]:
    """HF's canvas functions, compiled from image_processing_llama4.py's source (the
    module imports torchvision at its top)."""
    import transformers.models.llama4 as pkg
    from transformers.image_utils import SizeDict

    path = Path(pkg.__file__).parent / "image_processing_llama4.py"
    if not path.exists():
        path = path.with_name("image_processing_llama4_fast.py")
    tree = ast.parse(path.read_text())
    names = {"get_factors", "get_max_res_without_distortion", "find_supported_resolutions",
             "get_best_fit"}
    tree.body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    ns: dict[str, Any] = {"torch": torch, "math": math, "defaultdict": defaultdict,
                          "lru_cache": lru_cache, "SizeDict": SizeDict}
    exec(compile(tree, str(path), "exec"), ns)
    return ns


def hf_prompt(prompt: str, sizes: list[tuple[int, int]]) -> str:
    """Llama4Processor's text: each <|image|> replaced by its `_prompt_split_image` for the
    grid HF's processor picks (sizes: (width, height), PIL's)."""
    from transformers.image_utils import SizeDict
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    hf = hf_tiling()
    options = torch.tensor(hf["find_supported_resolutions"](
        max_num_chunks=MAX_TILES, patch_size=SizeDict(height=TILE, width=TILE)))
    parts = prompt.split("<|image|>")
    assert len(parts) == len(sizes) + 1
    out = parts[0]
    for (w, h), rest in zip(sizes, parts[1:], strict=True):
        canvas = hf["get_best_fit"]((h, w), options)
        grid = (int(canvas[0]) // TILE, int(canvas[1]) // TILE)
        out += Llama4Processor._prompt_split_image(None, grid, ROWS_PER_TILE) + rest
    return out


@torch.no_grad()
def hf_logprobs(base: Path, adapter: Path | None, ids: list[int],
                pixels: torch.Tensor | None) -> torch.Tensor:
    model = hf_multimodal(str(base), None if adapter is None else str(adapter))
    kw = {} if pixels is None else {"pixel_values": pixels.float()}
    logits = model(input_ids=torch.tensor([ids]), **kw).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def check(llm, outs, base: Path, jobs: list[tuple[str, list, Path | None]],
          add_special_tokens: bool = True) -> None:
    """Each output's prompt is Llama4Processor's expansion, its tokens HF's greedy ones
    and its logprobs HF's within 1e-4 (HF fed the same pixel values)."""
    tok = llm.get_tokenizer()
    for out, (prompt, images, adapter) in zip(outs, jobs, strict=True):
        text = hf_prompt(prompt, [im.size for im in images])
        ids = tok(text, add_special_tokens=add_special_tokens).input_ids
        assert out.prompt_token_ids == ids
        pixels = None
        if images:
            _, inputs = llm.llm_engine.image_processor(
                tok(prompt, add_special_tokens=add_special_tokens).input_ids, images)
            pixels = inputs.pixel_values
        got = out.outputs[0].token_ids
        ref = hf_logprobs(base, adapter, ids + got[:-1], pixels)[len(ids) - 1:]
        assert_matches_reference(out, ref, adapter)


def test_tiling_and_expansion_match_hf(llama4img):
    """Every (height, width) in a range: HF's canvas, tile grid and tokens."""
    from loraplex.models.llama4_vision import Llama4ImageTokens

    llm = make_llm(llama4img["base"])
    proc = llm.llm_engine.image_processor
    c, tok = proc.config, llm.get_tokenizer()
    assert (c.max_patches, c.tokens_per_tile) == (MAX_TILES, ROWS_PER_TILE)
    hf = hf_tiling()
    from transformers.image_utils import SizeDict

    options = torch.tensor(hf["find_supported_resolutions"](
        max_num_chunks=MAX_TILES, patch_size=SizeDict(height=TILE, width=TILE)))
    expand = Llama4ImageTokens(tok, c)
    for h in range(1, 130, 7):
        for w in range(1, 130, 9):
            assert c.canvas((h, w)) == tuple(hf["get_best_fit"]((h, w), options).tolist())
            ids = tok("<|image|>", add_special_tokens=False).input_ids
            ref = tok(hf_prompt("<|image|>", [(w, h)]), add_special_tokens=False).input_ids
            assert expand(ids, [(h, w)]) == ref
            assert expand(ref, [(h, w)]) == ref  # already expanded: kept
    assert len(proc.expand(tok(ASK).input_ids, [image(1, BIG)])) > len(tok(ASK).input_ids)


def test_pixels_match_hf_processor(llama4img):
    """With torchvision installed: HF's Llama4ImageProcessor's pixel values, exactly."""
    pytest.importorskip("torchvision")
    from transformers import Llama4ImageProcessor

    hf = Llama4ImageProcessor(size={"height": TILE, "width": TILE}, max_patches=MAX_TILES)
    llm = make_llm(llama4img["base"])
    for size in (ONE, WIDE, BIG, (90, 30), (13, 100)):
        im = image(5, size)
        ref = hf(images=[im], return_tensors="pt")
        ours = llm.llm_engine.image_processor.hf([im])
        assert torch.equal(ours["pixel_values"], ref["pixel_values"])
        assert ours["aspect_ratios"].tolist() == ref["aspect_ratios"].tolist()


def hf_pixels(im: Any) -> tuple[torch.Tensor, tuple[int, int]]:
    """HF's Llama4ImageProcessor._preprocess for one image, step by step without
    torchvision: HF's own canvas functions and split_to_tiles, torchvision's resize rule
    (uint8 natively where the CPU reports AVX2, else fp32 rounded back), zero padding
    right and below, bfloat16 rescale and normalize, the global view last."""
    import numpy as np
    import torch.nn.functional as F
    from transformers.image_transforms import split_to_tiles
    from transformers.image_utils import SizeDict

    from loraplex.engine.llama4_images import _native_uint8

    def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == size:
            return x
        if _native_uint8():
            return F.interpolate(x, size=size, mode="bilinear", antialias=True)
        y = F.interpolate(x.float(), size=size, mode="bilinear", antialias=True)
        return y.round().to(torch.uint8)

    def normalize(x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16) * (1 / 255)
        half = torch.tensor([0.5] * 3, dtype=torch.bfloat16).view(-1, 1, 1)
        return (x - half) / half

    hf = hf_tiling()
    options = torch.tensor(hf["find_supported_resolutions"](
        max_num_chunks=MAX_TILES, patch_size=SizeDict(height=TILE, width=TILE)))
    x = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)[None].contiguous()
    h, w = x.shape[-2:]
    th, tw = (int(v) for v in hf["get_best_fit"]((h, w), options))
    limit = (min(max(h, TILE), th), min(max(w, TILE), tw))
    nh, nw = hf["get_max_res_without_distortion"]((h, w), limit)
    y = resize(x, (max(nh, 1), max(nw, 1)))
    y = F.pad(y, (0, tw - y.shape[-1], 0, th - y.shape[-2]))
    tiles = split_to_tiles(normalize(y), th // TILE, tw // TILE)[0]
    if th * tw > TILE * TILE:
        tiles = torch.cat([tiles, normalize(resize(x, (TILE, TILE)))])
    return tiles, (th // TILE, tw // TILE)


@pytest.mark.skipif(not hasattr(importlib.import_module("transformers.image_transforms"),
                                 "split_to_tiles"),
                    reason="HF's split_to_tiles, the reference's tiling, is transformers 5's")
def test_pixels_follow_hf_steps(llama4img):
    """Images that tile, that do not, that would be upscaled past a tile's side (HF
    limits it): HF's steps' pixel values, exactly."""
    llm = make_llm(llama4img["base"])
    for size in (ONE, WIDE, BIG, (20, 40), (90, 30), (13, 100), (200, 150)):
        im = image(5, size)
        ours = llm.llm_engine.image_processor.hf([im])
        ref, grid = hf_pixels(im)
        assert ours["aspect_ratios"].tolist() == [list(grid)], size
        assert torch.equal(ours["pixel_values"], ref), size


def test_image_features_match_hf(llama4img):
    """The tower (2-D rope, class token, pixel shuffle, adapter) and the projector:
    HF's get_image_features within 1e-5 on a tiled image's tiles."""
    llm = make_llm(llama4img["base"])
    _, inputs = llm.llm_engine.image_processor(
        llm.get_tokenizer()(ASK).input_ids, [image(1, BIG)])
    assert inputs.pixel_values.shape == (5, 3, TILE, TILE)
    ours = llm.llm_engine.vision(inputs.pixel_values, inputs.sizes)
    hf = hf_multimodal(str(llama4img["base"]), None)
    kw = {}
    if "vision_feature_layer" in inspect.signature(hf.get_image_features).parameters:
        vc = hf.config.vision_config  # transformers 4.x asks for them
        kw = dict(vision_feature_layer=vc.vision_feature_layer,
                  vision_feature_select_strategy=vc.vision_feature_select_strategy)
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=inputs.pixel_values.float(), **kw)
    ref = getattr(ref, "pooler_output", ref)
    if kw:  # 4.x's get_image_features stops before the projector
        with torch.no_grad():
            ref = hf.multi_modal_projector(ref)
    assert ours.shape == (5 * ROWS_PER_TILE, ref.shape[-1])
    torch.testing.assert_close(ours, ref.flatten(0, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("budget", [None, 8])
def test_mixed_batch_matches_hf(budget, llama4img):
    """Base and two adapters over one slot; text, an untiled image, tiled ones, two images
    in a prompt; budget 8: prefill in chunks that cut through images (they attend
    causally, as HF's)."""
    llm = make_llm(llama4img["base"], enable_lora=True, max_loras=1, max_lora_rank=8,
                   max_num_batched_tokens=budget)
    one, wide, big = image(1, ONE), image(2, WIDE), image(3, BIG)
    jobs = [(ASK, [one], None), (ASK, [wide], "r8"), (ASK, [big], "r4"), (TEXT, [], "r8"),
            (ASK, [wide], None), (TWO, [big, one], "r4"), (ASK, [one], "r8")]
    loras = {n: LoRARequest(n, i, str(llama4img[n])) for i, n in enumerate(("r8", "r4"), 1)}
    outs = llm.generate([request(p, ims) for p, ims, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[loras[n] if n else None for *_, n in jobs])
    check(llm, outs, llama4img["base"],
          [(p, ims, llama4img[n] if n else None) for p, ims, n in jobs])
    assert outs[1].outputs[0].token_ids != outs[4].outputs[0].token_ids  # the adapter counts
    assert len({tuple(o.outputs[0].token_ids) for o in (outs[0], outs[4])}) == 2


def test_prefix_cache_never_shares_across_images(llama4img):
    """The same text with another image of the same grid: only the blocks before the
    image are shared (the global view's rows, past the tiles and separators, too: the
    image's hash spans them all); the same image again: all but the last block."""
    llm = make_llm(llama4img["base"], enable_prefix_caching=True, block_size=8)
    prompt = "User: Once upon a time there was a little girl. <|image|> What is it? Model:"
    a, b = image(1, WIDE), image(2, WIDE)
    runs = [llm.generate([request(prompt, [img])], GREEDY, use_tqdm=False)[0]
            for img in (a, b, a)]
    check(llm, runs, llama4img["base"], [(prompt, [img], None) for img in (a, b, a)])
    ids = runs[0].prompt_token_ids
    first = ids.index(llm.llm_engine.image_processor.config.boi_token_id)
    assert runs[0].num_cached_tokens == 0
    assert runs[1].num_cached_tokens == (first + 1) // 8 * 8 > 0
    assert runs[2].num_cached_tokens == (len(ids) - 1) // 8 * 8
    assert runs[0].outputs[0].cumulative_logprob != runs[1].outputs[0].cumulative_logprob


def test_chat_with_image_parts(llama4img):
    """LLM.chat: an image_url part and an image_pil part become the template's
    <|image|>, the images the request's."""
    llm = make_llm(llama4img["base"])
    assert llm.llm_engine.image_placeholder == "<|image|>"
    a, b = image(1, WIDE), image(3, ONE)
    conv = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(a)}},
        {"type": "text", "text": "What is this? And "},
        {"type": "image_pil", "image_pil": b}]}]
    outs = llm.chat(conv, GREEDY, use_tqdm=False)
    text = "<|user|><|image|>What is this? And <|image|>\n<|assistant|>"
    check(llm, outs, llama4img["base"], [(text, [a, b], None)], add_special_tokens=False)
    assert "<|image|>" in IMAGE_CHAT_TEMPLATE


def test_offline_refusals_fail_only_their_request(llama4img):
    llm = make_llm(llama4img["base"])
    a = image(1, WIDE)
    with pytest.raises(ValueError, match=r"1 <\|image\|> token.*for 2 image"):
        llm.generate(request(ASK, [a, a]), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="cannot decode the image"):
        llm.generate(request(ASK, ["data:image/png;base64,AAAA"]), GREEDY, use_tqdm=False)
    tok = llm.get_tokenizer()
    # expanded for another size (a 1 x 2 grid given a one-tile image): refused
    expanded = tok(hf_prompt(ASK, [WIDE])).input_ids
    with pytest.raises(ValueError, match="not Llama4Processor's"):
        llm.generate({"prompt_token_ids": expanded,
                      "multi_modal_data": {"image": image(1, ONE)}}, GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    # the same ids with an image of their grid: taken as they are
    outs = llm.generate([request(ASK, [a]),
                         {"prompt_token_ids": expanded, "multi_modal_data": {"image": a}}],
                        GREEDY, use_tqdm=False)
    check(llm, outs, llama4img["base"], [(ASK, [a], None), (ASK, [a], None)])


def test_without_image_processor_served_on_text(llama4img, tmp_path):
    """A checkpoint saved without preprocessor_config.json: text only, images refused."""
    import shutil

    base = Path(shutil.copytree(llama4img["base"], tmp_path / "noproc"))
    (base / "preprocessor_config.json").unlink()
    llm = make_llm(base)
    assert llm.llm_engine.vision is None
    with pytest.raises(ValueError, match="multimodal inputs are not supported"):
        llm.generate(request(ASK, [image(1)]), GREEDY, use_tqdm=False)
    assert len(llm.generate(TEXT, GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 6


def test_server_chat_with_data_url_image(llama4img):
    """The chat route's image_url parts, base and adapter: HF's greedy tokens; an
    undecodable image a 400 alone."""
    import openai

    a = image(2, WIDE)
    content = [{"type": "image_url", "image_url": {"url": data_url(a)}},
               {"type": "text", "text": "What is this?"}]
    args = ["--max-model-len", "256", "--dtype", "float32", "--enable-lora",
            "--max-lora-rank", "8", "--lora-modules", f"r8={llama4img['r8']}"]
    base = str(llama4img["base"])
    llm = make_llm(llama4img["base"])
    tok = llm.get_tokenizer()
    text = "<|user|><|image|>What is this?\n<|assistant|>"
    ids = tok(hf_prompt(text, [a.size]), add_special_tokens=False).input_ids
    _, inputs = llm.llm_engine.image_processor(tok(text, add_special_tokens=False).input_ids,
                                               [a])
    with RemoteServer(llama4img["base"], args) as server:
        client = server.get_client()
        for model, adapter in ((base, None), ("r8", llama4img["r8"])):
            got = chat_token_ids(client, model, content)
            ref = hf_logprobs(llama4img["base"], adapter, ids + got[:-1], inputs.pixel_values)
            assert got == ref[len(ids) - 1:].argmax(-1).tolist()
        with pytest.raises(openai.BadRequestError) as info:
            chat_token_ids(client, base, [{"type": "image_url", "image_url": {
                "url": "data:image/png;base64,AAAA"}}])
        assert "cannot decode the image" in info.value.body["message"]
        assert len(chat_token_ids(client, base, content)) == GREEDY.max_tokens


def test_lora_on_the_vision_model(llama4img, tmp_path, caplog):
    """LoRA applies to the language model (vLLM's rule): an adapter's LoRA on the vision
    model or the projector is left out with a warning; the language model's part runs."""
    both = make_multimodal_adapter(
        llama4img["base"], tmp_path / "both", r=4, seed=83,
        targets=r".*(language_model.*\.q_proj|vision_model.*fc1|multi_modal_projector\.linear_1)")
    llm = make_llm(llama4img["base"], enable_lora=True, max_lora_rank=8)
    with caplog.at_level("WARNING"):
        out = llm.generate(request(ASK, [image(1, WIDE)]), GREEDY, use_tqdm=False,
                           lora_request=LoRARequest("both", 1, str(both)))
    assert "left out (LoRA applies to the language model only)" in caplog.text
    assert len(out[0].outputs[0].token_ids) == GREEDY.max_tokens
