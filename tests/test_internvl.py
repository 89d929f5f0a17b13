"""InternVL (transformers' native InternVLForConditionalGeneration: InternVL3 / InternVL3.5
"-hf") against HF transformers (+ PEFT) on the same weights, fp32: the prompt ids HF's
processor's rule gives (tiles, thumbnail, `<img>` ... `</img>`), greedy tokens HF's and
logprobs within 1e-4, for text and image requests under the base and two adapters of
different ranks in one batch, over a Qwen2 and a Qwen3 language model; LoRA on the tower
and projector (enable_tower_connector_lora); the chat route over HTTP; bad inputs fail
alone."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import openai
import pytest
from safetensors.torch import load_file, save_file

from loraplex import LoRARequest
from tests.engine_utils import make_llm
from tests.internvl_fixtures import (
    ASK,
    GREEDY,
    SEQ,
    check,
    hf_inputs,
    hf_logprobs,
    make_tiny_internvl,
    tokenizer,
    with_adapters,
)
from tests.llava_fixtures import data_url, image
from tests.multimodal_fixtures import chat_token_ids, make_multimodal_adapter, request
from tests.server_utils import RemoteServer

pytest.importorskip("PIL")

TEXT = "USER: What is the capital of France? ASSISTANT:"


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def internvl(request, tiny_root):
    base = make_tiny_internvl(tiny_root / f"internvl_{request.param}" / "base", seed=80,
                              text=request.param)
    return with_adapters(base, seed=81)


@pytest.fixture(scope="module")
def internvl_llama(tiny_root):
    """A Llama language model with lm_head tied to the embedding."""
    base = make_tiny_internvl(tiny_root / "internvl_llama" / "base", seed=82, text="llama",
                              tied=True)
    return with_adapters(base, seed=83)


def loras(paths) -> dict[str, LoRARequest]:
    return {"r8": LoRARequest("r8", 1, str(paths["r8"])),
            "r4": LoRARequest("r4", 2, str(paths["r4"]))}


def run_mixed_batch(paths) -> list:
    """A text request, image requests under the base and two adapters (ranks 8 and 4),
    a wide image cut into 3 tiles and a thumbnail, two images in one prompt, in one
    call: the prompt ids HF's processor's, its tokens and logprobs HF's. Then one more
    image alone under the base (the last output)."""
    llm = make_llm(paths["base"], enable_lora=True, max_loras=2, max_lora_rank=8)
    a, wide = image(1, (16, 16)), image(2, (50, 20))
    two = "USER: <IMG_CONTEXT> and <IMG_CONTEXT>: which is brighter? ASSISTANT:"
    jobs = [(TEXT, [], None), (ASK, [a], None), (ASK, [a], "r8"), (ASK, [wide], "r4"),
            (two, [wide, a], "r8")]
    outs = llm.generate([request(p, ims) for p, ims, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[loras(paths)[n] if n else None for *_, n in jobs])
    check(outs, paths["base"], [(p, ims, paths[n] if n else None) for p, ims, n in jobs])
    return [*outs, llm.generate(request(ASK, [image(3, (16, 16))]), GREEDY,
                                use_tqdm=False)[0]]


def test_mixed_batch_matches_hf(internvl):
    """run_mixed_batch over Qwen2 and Qwen3; the wide image's `<img>`, 4 tiles of
    `<IMG_CONTEXT>`, `</img>`; the adapter and the image change the output."""
    outs = run_mixed_batch(internvl)
    tok = tokenizer(str(internvl["base"]))
    start, context, end = tok.convert_tokens_to_ids(["<img>", "<IMG_CONTEXT>", "</img>"])
    ids = outs[3].prompt_token_ids  # 50 x 20 pixels: 3 tiles across and the thumbnail
    first = ids.index(start)
    assert ids[first + 1:first + 1 + 4 * SEQ] == [context] * (4 * SEQ)
    assert ids[first + 1 + 4 * SEQ] == end and ids.count(context) == 4 * SEQ
    assert len({tuple(o.outputs[0].token_ids) for o in outs[1:3]}) == 2  # the adapter counts
    assert outs[1].outputs[0].token_ids != outs[-1].outputs[0].token_ids  # the image counts


def test_llama_tied_mixed_batch_matches_hf(internvl_llama):
    """The same batch over a Llama language model whose lm_head is its embedding."""
    run_mixed_batch(internvl_llama)


def test_tower_connector_lora_matches_peft(internvl, tmp_path):
    """enable_tower_connector_lora: an adapter's LoRA on InternViT's q_proj (the language
    model's name too) and projection_layer and the projector's linear_1, beside the
    language model's, in one batch with the base: PEFT's output."""
    both = make_multimodal_adapter(
        internvl["base"], tmp_path / "tower", r=4, seed=95,
        targets=r".*(language_model.*\.q_proj|vision_tower.*\.(q_proj|projection_layer)"
                r"|multi_modal_projector\.linear_1)")
    llm = make_llm(internvl["base"], enable_lora=True, max_lora_rank=8,
                   enable_tower_connector_lora=True)
    a = image(1, (50, 20))
    outs = llm.generate([request(ASK, [a]), request(ASK, [a])], GREEDY, use_tqdm=False,
                        lora_request=[None, LoRARequest("tower", 1, str(both))])
    check(outs, internvl["base"], [(ASK, [a], None), (ASK, [a], both)])
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids


def test_offline_refusals_fail_only_their_request(internvl):
    """Too many images (limit_mm_per_prompt), placeholders that do not match (an expanded
    run without its `<img>` / `</img>` is read as that many placeholders, as HF's
    processor reads it), a broken image: each a ValueError of its own; the engine serves
    on."""
    llm = make_llm(internvl["base"], limit_mm_per_prompt={"image": 1})
    a = image(1, (16, 16))
    with pytest.raises(ValueError, match="At most 1 image"):
        llm.generate(request(ASK + "<IMG_CONTEXT>", [a, a]), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=r"2 image placeholder token.*for 1 image"):
        llm.generate(request(ASK + "<IMG_CONTEXT>", [a]), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="cannot decode the image"):
        llm.generate(request(ASK, ["data:image/png;base64,AAAA"]), GREEDY, use_tqdm=False)
    ids = tokenizer(str(internvl["base"]))(ASK).input_ids
    expanded, inputs = llm.llm_engine.image_processor(ids, [a])
    # the expansion's <IMG_CONTEXT> run without its <img> and </img>: one per token
    bare = [t for i, t in enumerate(expanded)
            if i not in (inputs.positions[0] - 1, inputs.positions[-1] + 1)]
    with pytest.raises(ValueError, match=rf"{SEQ} image placeholder token.*for 1 image"):
        llm.generate({"prompt_token_ids": bare, "multi_modal_data": {"image": [a]}}, GREEDY,
                     use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    # processed beforehand (the server's way, already expanded) and raw: both HF's
    outs = llm.generate([{"prompt_token_ids": expanded, "multi_modal_data": {"image": inputs}},
                         request(ASK, [a])], GREEDY, use_tqdm=False)
    check(outs, internvl["base"], [(ASK, [a], None)] * 2)


@pytest.mark.parametrize("internvl", ["qwen2"], indirect=True)  # (one server is enough)
def test_chat_and_server(internvl):
    """LLM.chat with an image part, and the chat route over HTTP (the openai client, a
    data URL) under the base and an adapter: HF's greedy tokens; too many images and a
    broken image fail alone with a 400."""
    base, a = internvl["base"], image(2, (50, 20))
    text = "<|user|><IMG_CONTEXT>\nWhat is this?\n<|assistant|>"
    content = [{"type": "image_url", "image_url": {"url": data_url(a)}},
               {"type": "text", "text": "What is this?"}]
    llm = make_llm(base)
    outs = llm.chat([{"role": "user", "content": content}], GREEDY, use_tqdm=False)
    check(outs, base, [(text, [a], None)], add_special_tokens=False)
    del llm
    inp = hf_inputs(base, text, [a], add_special_tokens=False)
    ids = inp["input_ids"][0].tolist()
    args = ["--max-model-len", "512", "--dtype", "float32", "--enable-lora",
            "--max-lora-rank", "8", "--lora-modules", f"r8={internvl['r8']}",
            "--limit-mm-per-prompt", '{"image": 1}']
    with RemoteServer(base, args) as server:
        client = server.get_client()
        for model, adapter in ((str(base), None), ("r8", internvl["r8"])):
            got = chat_token_ids(client, model, content, prompt_tokens=len(ids))
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


def test_hub_checkpoint_layout(internvl, tmp_path):
    """The hub's files' names (`vision_tower.*`, `multi_modal_projector.*`,
    `language_model.model.*`, `language_model.lm_head.*`) load as transformers 5's do."""
    base = Path(shutil.copytree(internvl["base"], tmp_path / "hub"))
    path = str(base / "model.safetensors")

    def rename(name: str) -> str:
        name = re.sub(r"^model\.(vision_tower|multi_modal_projector)\.", r"\1.", name)
        name = name.replace("model.language_model.", "language_model.model.", 1)
        return re.sub(r"^lm_head\.", "language_model.lm_head.", name)
    tensors = load_file(path)
    save_file({rename(k): v for k, v in tensors.items()}, path, metadata={"format": "pt"})
    assert any(k.startswith("vision_tower.") for k in load_file(path))
    a = image(1, (50, 20))
    outs = make_llm(base).generate([request(ASK, [a]), TEXT], GREEDY, use_tqdm=False)
    check(outs, internvl["base"], [(ASK, [a], None), (TEXT, [], None)])
