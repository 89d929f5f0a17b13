"""LFM2-VL (Lfm2VlForConditionalGeneration) with images against HF transformers (+ PEFT) on
the same weights, fp32: the prompt ids and pixels HF's Lfm2VlProcessor gives (tiles and a
thumbnail, `<|img_row_R_col_C|>` markers, `<|image_start|>` / `<|image_end|>`; its
resize standing in for torchvision's where that is absent: tests/lfm2_vl_fixtures.py),
greedy tokens HF's and logprobs within 1e-4 for a mixed batch (text and image requests,
the base and two adapters of different ranks over one slot, prompts in chunks that cut
through images); LoRA on the SigLIP2 tower and projector (enable_tower_connector_lora);
prefix caching on the hybrid (the same image hits, another misses at its block); bad
images failing alone, offline and over HTTP with the openai client."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import transformers

from loraplex import LoRARequest, SamplingParams
from tests.engine_utils import make_llm
from tests.llava_fixtures import data_url, image
from tests.multimodal_fixtures import (
    LANGUAGE_MODEL,
    assert_matches_reference,
    chat_token_ids,
    check_image_refusals,
    request,
)
from tests.server_utils import RemoteServer

pytest.importorskip("PIL")
if not hasattr(transformers, "Lfm2VlConfig"):
    pytest.skip(f"transformers {transformers.__version__} has no LFM2-VL",
                allow_module_level=True)

from tests.lfm2_vl_fixtures import (  # noqa: E402 (after the skip: it needs Lfm2VlConfig)
    hf_logprobs,
    hf_processor,
    hf_processor_of,
    make_adapter,
    make_tiny_lfm2_vl,
)

GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3)
ASK = "User: <image> What is this? Assistant:"
TWO = "User: <image> and <image>: which is brighter? Assistant:"
TEXT = "User: What is the capital of France? Assistant:"
# (width, height): one image of 4 x 4 patches; 2 tiles down + a thumbnail; 4 tiles across
SMALL, TALL, WIDE = (12, 20), (40, 64), (100, 20)


@pytest.fixture(scope="module")
def lfm2vl(tiny_root: Path) -> dict[str, Path]:
    root = tiny_root / "lfm2_vl_images"
    base = make_tiny_lfm2_vl(root / "base", seed=120)
    return {"base": base,
            "r8": make_adapter(base, root / "r8", 8, 121,
                               LANGUAGE_MODEL + "(q_proj|v_proj|in_proj|w1)"),
            "r4": make_adapter(base, root / "r4", 4, 122,
                               LANGUAGE_MODEL + "(k_proj|out_proj|w2)"),
            "tower": make_adapter(base, root / "tower", 4, 123,
                                  r".*(language_model.*\.q_proj|vision_tower.*\."
                                  r"(q_proj|fc1|patch_embedding)"
                                  r"|multi_modal_projector\.linear_1)")}


def loras(paths: dict[str, Path]) -> dict[str, LoRARequest]:
    return {name: LoRARequest(name, i + 1, str(paths[name]))
            for i, name in enumerate(("r8", "r4", "tower"))}


def check(outs, paths: dict[str, Path], jobs: list[tuple[str, list, str | None]],
          **options: Any) -> None:
    """Each output's prompt is HF's processor's (on the text with the tokenizer's BOS
    before it, as the engine tokenizes a text prompt; `options`: the processor's image
    options), its tokens and logprobs HF's."""
    for out, (prompt, images, name) in zip(outs, jobs, strict=True):
        inputs = hf_processor(paths["base"], "<s>" + prompt, images, **options)
        ids = inputs["input_ids"][0].tolist()
        assert out.prompt_token_ids == ids, (prompt, name)
        got = out.outputs[0].token_ids
        ref = hf_logprobs(paths["base"], paths[name] if name else None, inputs,
                          got[:-1])[len(ids) - 1:]
        assert_matches_reference(out, ref, name)


def test_prompt_ids_and_pixels_match_hf_processor(lfm2vl):
    """Images that fit one tile, that split into tiles down or across (with the
    thumbnail; one whose grid is a tie), tiny and square ones, two in a prompt: the
    expanded ids and the patches are HF's processor's (its padding cut off), each image's
    layout its spatial shapes; `expand` counts the same ids without pixels; an expanded
    prompt is kept as is."""
    base = lfm2vl["base"]
    llm = make_llm(base)
    proc, tok = llm.llm_engine.image_processor, llm.get_tokenizer()
    # (48, 64): 1 x 2 and 2 x 2 tiles equally near its aspect ratio, HF's tie rule picks
    sizes = [SMALL, TALL, WIDE, (64, 40), (30, 30), (7, 9), (33, 70), (50, 50), (48, 64)]
    for images in [[image(i, s)] for i, s in enumerate(sizes)] + [
            [image(1, TALL), image(2, SMALL)]]:
        prompt = ASK if len(images) == 1 else TWO
        hf = hf_processor(base, prompt, images)
        ids = tok(prompt, add_special_tokens=False).input_ids
        got, inputs = proc(ids, images)
        assert got == hf["input_ids"][0].tolist(), [im.size for im in images]
        assert proc.expand(ids, images) == got
        mask = hf["pixel_attention_mask"].bool()
        assert inputs.pixel_values.equal(hf["pixel_values"][mask])
        grids = [g for layout in inputs.sizes for g in _grids(layout)]
        assert grids == [tuple(s) for s in hf["spatial_shapes"].tolist()]
        assert proc(got, images)[0] == got  # already expanded
    tall = proc.tokens.image(proc.hf.layout((64, 40)))
    markers = tok.convert_ids_to_tokens([t for t in tall if t != proc.placeholder])
    assert markers == ["<|image_start|>", "<|img_row_1_col_1|>", "<|img_row_2_col_1|>",
                       "<|img_thumbnail|>", "<|image_end|>"]


def _grids(layout):
    from loraplex.models.lfm2_vl import tile_grids

    return tile_grids(layout)


def test_mixed_batch_in_chunks_matches_hf_and_peft(lfm2vl):
    """Text and image requests (one tile; tiles and a thumbnail; two images) under the
    base and adapters of ranks 8 and 4 over one slot, in one call, prompts in chunks of
    at most 16 tokens (images cut across chunks): HF's (+ PEFT's) tokens and logprobs."""
    llm = make_llm(lfm2vl["base"], enable_lora=True, max_loras=1, max_lora_rank=8,
                   max_num_batched_tokens=16, block_size=8)
    small, tall, wide = image(1, SMALL), image(2, TALL), image(3, WIDE)
    jobs = [(TEXT, [], None), (ASK, [small], None), (ASK, [small], "r8"),
            (ASK, [tall], "r4"), (TWO, [wide, small], "r8"), (TEXT, [], "r4")]
    outs = llm.generate([request(p, ims) for p, ims, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[loras(lfm2vl)[n] if n else None for *_, n in jobs])
    check(outs, lfm2vl, jobs)
    assert outs[1].outputs[0].token_ids != outs[2].outputs[0].token_ids  # the adapter
    assert len(outs[4].prompt_token_ids) > 16  # its images span chunks


def test_tower_connector_lora_matches_peft(lfm2vl):
    """enable_tower_connector_lora: an adapter's LoRA on the tower's q_proj (the language
    model's name too), fc1 and patch_embedding and the projector's linear_1, beside the
    language model's q_proj, in one batch with the base and a language-model adapter:
    PEFT's output. Without the option, its tower LoRA is left out."""
    llm = make_llm(lfm2vl["base"], enable_lora=True, max_lora_rank=8, max_loras=2,
                   enable_tower_connector_lora=True)
    tall = image(2, TALL)
    jobs = [(ASK, [tall], None), (ASK, [tall], "tower"), (ASK, [tall], "r8")]
    outs = llm.generate([request(p, ims) for p, ims, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[loras(lfm2vl)[n] if n else None for *_, n in jobs])
    check(outs, lfm2vl, jobs)
    plain = make_llm(lfm2vl["base"], enable_lora=True, max_lora_rank=8).generate(
        request(ASK, [tall]), GREEDY, lora_request=loras(lfm2vl)["tower"], use_tqdm=False)
    assert [o.logprobs for o in plain[0].outputs] != [o.logprobs for o in outs[1].outputs]


def test_prefix_cache_hits_the_same_image_only(lfm2vl):
    """The hybrid's prefix cache (state snapshots where a chunk ends on a block
    boundary: chunks of one block here): the same image again takes the cached blocks
    past it; another image of the same size only the blocks before its first
    placeholder; every output HF's."""
    llm = make_llm(lfm2vl["base"], block_size=8, max_num_batched_tokens=8)
    a, b = image(4, TALL), image(5, TALL)
    prompt = "User: tell me, in some detail please, about <image> this. Assistant:"
    first, again, other = (llm.generate(request(prompt, [im]), GREEDY, use_tqdm=False)[0]
                           for im in (a, a, b))
    start = first.prompt_token_ids.index(llm.get_tokenizer().convert_tokens_to_ids(
        "<|image_start|>"))
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens > start + 1 and again.num_cached_tokens % 8 == 0
    assert 0 < other.num_cached_tokens <= start + 1
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    check([first, other], lfm2vl, [(prompt, [a], None), (prompt, [b], None)])


def test_bad_images_fail_alone_offline(lfm2vl):
    """Too many images (limit_mm_per_prompt), a placeholder count that does not match, a
    broken image: each a ValueError of its own; the engine serves on, and processed
    inputs (the server's way) give HF's output."""
    llm = make_llm(lfm2vl["base"], limit_mm_per_prompt={"image": 1})
    a = image(1, SMALL)
    with pytest.raises(ValueError, match="At most 1 image"):
        llm.generate(request(TWO, [a, a]), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=r"2 image placeholder token.*for 1 image"):
        llm.generate(request(TWO, [a]), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="cannot decode the image"):
        llm.generate(request(ASK, ["data:image/png;base64,AAAA"]), GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    ids = llm.get_tokenizer()(ASK).input_ids
    expanded, inputs = llm.llm_engine.image_processor(ids, [a])
    outs = llm.generate([{"prompt_token_ids": expanded, "multi_modal_data": {"image": inputs}},
                         request(ASK, [a])], GREEDY, use_tqdm=False)
    check(outs, lfm2vl, [(ASK, [a], None)] * 2)
    short = replace(inputs, pixel_values=inputs.pixel_values[:-1])  # a patch short
    wrong = replace(inputs, sizes=[(1, 1, 4, 4, 6)])  # another image's layout
    for bad in (short, wrong):
        with pytest.raises(ValueError, match="do not match"):
            llm.generate({"prompt_token_ids": expanded, "multi_modal_data": {"image": bad}},
                         GREEDY, use_tqdm=False)


def test_chat_over_http(lfm2vl):
    """The chat route (the openai client, an image as a data URL) under the base and an
    adapter: HF's greedy tokens, usage counting the expanded prompt; a broken image and
    too many images fail alone with a 400."""
    base, a = lfm2vl["base"], image(2, TALL)
    text = "<|user|><image>What is this?\n<|assistant|>"
    content = [{"type": "image_url", "image_url": {"url": data_url(a)}},
               {"type": "text", "text": "What is this?"}]
    inputs = hf_processor(base, text, [a])
    ids = inputs["input_ids"][0].tolist()
    args = ["--max-model-len", "256", "--dtype", "float32", "--enable-lora",
            "--max-lora-rank", "8", "--lora-modules", f"r4={lfm2vl['r4']}",
            "--limit-mm-per-prompt", '{"image": 1}']
    with RemoteServer(base, args) as server:
        client = server.get_client()
        for model, adapter in ((str(base), None), ("r4", lfm2vl["r4"])):
            got = chat_token_ids(client, model, content, prompt_tokens=len(ids))
            ref = hf_logprobs(base, adapter, inputs, got[:-1])
            assert got == ref[len(ids) - 1:].argmax(-1).tolist()
        check_image_refusals(client, str(base), content)
        assert len(chat_token_ids(client, str(base), content, max_tokens=3)) == 3


def test_hub_checkpoint_layout(lfm2vl, tmp_path):
    """The hub's files' tower names (`model.vision_tower.vision_model.*`, as transformers
    4.57 saved them) load as transformers 5's (`model.vision_tower.*`) do."""
    import shutil

    from safetensors.torch import load_file, save_file

    base = Path(shutil.copytree(lfm2vl["base"], tmp_path / "hub"))
    path = str(base / "model.safetensors")
    tensors = load_file(path)
    renamed = {k.replace("model.vision_tower.", "model.vision_tower.vision_model.", 1): v
               for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, path, metadata={"format": "pt"})
    a = image(2, TALL)
    outs = make_llm(base).generate([request(ASK, [a]), TEXT], GREEDY, use_tqdm=False)
    check(outs, lfm2vl, [(ASK, [a], None), (TEXT, [], None)])


def test_processor_config_of_transformers_5(lfm2vl, tmp_path):
    """A checkpoint whose processor transformers 5 saved (processor_config.json holding
    the image processor, no preprocessor_config.json) serves its images as the other;
    use_image_special_tokens false is refused at start-up."""
    import json
    import shutil

    base = Path(shutil.copytree(lfm2vl["base"], tmp_path / "v5"))
    (base / "preprocessor_config.json").unlink()
    hf_processor_of(str(lfm2vl["base"])).save_pretrained(str(base))
    assert "image_processor" in json.loads((base / "processor_config.json").read_text())
    a = image(2, TALL)
    outs = make_llm(base).generate([request(ASK, [a])], GREEDY, use_tqdm=False)
    check(outs, lfm2vl, [(ASK, [a], None)])
    saved = json.loads((base / "processor_config.json").read_text())
    saved["use_image_special_tokens"] = False
    (base / "processor_config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="use_image_special_tokens"):
        make_llm(base)


def test_mm_processor_kwargs(lfm2vl):
    """vLLM's mm_processor_kwargs (the processor's image options, per request over the
    engine's): fewer tokens an image, no splitting, no thumbnail, smaller tiles; the
    prompt ids and outputs HF's processor and model give under the same options; a bad
    value or an unknown option refused alone."""
    llm = make_llm(lfm2vl["base"], mm_processor_kwargs={"max_image_tokens": 6})
    tall = image(2, TALL)
    cases = [{}, {"do_image_splitting": False}, {"use_thumbnail": False},
             {"min_tiles": 3, "max_tiles": 4, "tile_size": 8, "max_image_tokens": 4}]
    outs = llm.generate([{**request(ASK, [tall]), "mm_processor_kwargs": o} for o in cases],
                        GREEDY, use_tqdm=False)
    assert len({len(o.prompt_token_ids) for o in outs}) == len(cases)
    for out, options in zip(outs, cases, strict=True):
        check([out], lfm2vl, [(ASK, [tall], None)], **{"max_image_tokens": 6, **options})
    for bad, match in (({"max_tiles": 0}, "max_tiles must be an integer >= 1"),
                       ({"min_tiles": 5}, "min_tiles must be at most max_tiles"),
                       ({"tile_size": 12}, "tile_size 12 must be a multiple of 8"),
                       ({"crop_to_patches": True}, "'crop_to_patches' is not an option")):
        with pytest.raises(ValueError, match=match):
            llm.generate({**request(ASK, [tall]), "mm_processor_kwargs": bad}, GREEDY,
                         use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
