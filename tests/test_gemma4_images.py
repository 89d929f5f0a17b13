"""Gemma 4 (Gemma4ForConditionalGeneration) with images, against HF transformers' Gemma 4
(+ PEFT) on the same weights and HF's Gemma4Processor, fp32: the tower and embedder's
output, the prompt ids (each <|image|> expanded to boi, its soft tokens, eoi), greedy
tokens and logprobs of a mixed batch (text, images on the base and on adapters of two
ranks), LoRA on the tower and embedder (enable_tower_connector_lora), LLM.chat and the
server's chat route with an image_url part, and the refusals (too many images, an image
that does not decode, audio), each failing only its request."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch

pytest.importorskip("transformers.models.gemma4",
                    reason="transformers < 5.5 has no Gemma 4 (the floors' 4.56)")
pytest.importorskip("PIL")

from loraplex import LoRARequest, SamplingParams  # noqa: E402
from tests.engine_utils import make_llm  # noqa: E402
from tests.gemma4_image_fixtures import (  # noqa: E402
    check_against_hf,
    hf_inputs,
    make_tiny_gemma4_vision,
    processor,
)
from tests.llava_fixtures import data_url, image  # noqa: E402
from tests.multimodal_fixtures import (  # noqa: E402
    LANGUAGE_MODEL,
    chat_token_ids,
    hf_logprobs,
    hf_multimodal,
    make_multimodal_adapter,
    request,
    wav_b64,
)
from tests.server_utils import RemoteServer  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
ASK = "User: <|image|>\nWhat is this? Model:"
TWO = "User: <|image|> and <|image|>: which is brighter? Model:"


@pytest.fixture(scope="module")
def gemma4(tiny_root: Path) -> dict[str, Path]:
    base = make_tiny_gemma4_vision(tiny_root / "gemma4img" / "base", seed=80)
    return {"base": base,
            "r8": make_multimodal_adapter(base, base.parent / "r8", r=8, seed=81,
                                          targets=LANGUAGE_MODEL + "(q_proj|o_proj|down_proj)"),
            "r4": make_multimodal_adapter(base, base.parent / "r4", r=4, seed=82,
                                          targets=LANGUAGE_MODEL + "(k_proj|gate_proj)")}


@pytest.fixture(scope="module")
def gemma4_blocks(tiny_root: Path) -> dict[str, Path]:
    """use_bidirectional_attention "vision": image tokens both ways on the sliding layers."""
    base = make_tiny_gemma4_vision(tiny_root / "gemma4blocks" / "base", seed=84,
                                   image_blocks=True)
    return {"base": base,
            "r8": make_multimodal_adapter(base, base.parent / "r8", r=8, seed=85,
                                          targets=LANGUAGE_MODEL + "(q_proj|o_proj|down_proj)")}


def check(outs, base: Path, jobs: list[tuple[str, list, Path | None]],
          add_special_tokens: bool = True) -> None:
    """HF's prompt ids, tokens and logprobs (check_against_hf); `jobs`: (prompt, images,
    adapter)."""
    check_against_hf(outs, base, [(p, i, [], [], a) for p, i, a in jobs], add_special_tokens)


def test_image_features_match_hf(gemma4):
    """Tower + pooler + standardize + embedder: HF's get_image_features within 1e-5, for
    two images of different shapes (different soft token counts)."""
    llm = make_llm(gemma4["base"])
    images = [image(1), image(2, (90, 30))]
    inp = hf_inputs(gemma4["base"], TWO, images)
    grids = [llm.llm_engine.image_processor.config.grid((i.height, i.width)) for i in images]
    pixels = torch.cat([p[:r * c].flatten() for p, (r, c) in zip(inp["pixel_values"], grids)])
    ours = llm.llm_engine.vision(pixels, grids)
    with torch.no_grad():
        ref = hf_multimodal(str(gemma4["base"]), None).model.get_image_features(
            inp["pixel_values"], inp["image_position_ids"]).pooler_output
    assert len(ref) == 2 and ref[0].shape[0] != ref[1].shape[0]
    torch.testing.assert_close(ours, torch.cat(ref), atol=1e-5, rtol=0)


def test_prompt_ids_match_hf_processor(gemma4):
    """Each <|image|> expanded as Gemma4Processor expands it (its soft token count from the
    image's size); an expanded prompt is taken as it is; a count mismatch is refused."""
    from transformers import AutoConfig

    from loraplex.engine.images import vision_config
    from loraplex.engine.multimodal_prompt import load_processor

    base = str(gemma4["base"])
    tok = processor(base).tokenizer
    ours = load_processor(base, vision_config(AutoConfig.from_pretrained(base)), tok)
    for prompt, images in ((ASK, [image(1)]), (TWO, [image(2, (90, 30)), image(3, (20, 200))]),
                           ("<|image|>", [image(4, (300, 300))])):
        ids = tok.encode(prompt)
        want = hf_inputs(gemma4["base"], prompt, images)["input_ids"][0].tolist()
        got, inputs = ours.process(ids, {"image": images})
        assert got == want
        assert len(inputs.positions) == sum(t == tok.image_token_id for t in want)
        assert ours.process(want, {"image": images})[0] == want
    with pytest.raises(ValueError, match="1 image placeholder token.*for 2 image"):
        ours.process(tok.encode(ASK), {"image": [image(1), image(2)]})


def test_mixed_batch_matches_hf(gemma4):
    """A text request, image requests on the base and on adapters of two ranks (more
    adapters than slots), two images in one prompt: HF's tokens and logprobs."""
    llm = make_llm(gemma4["base"], enable_lora=True, max_loras=1, max_lora_rank=8)
    a, b = image(1), image(2, (90, 30))
    jobs = [(ASK, [a], None), (ASK, [a], "r8"), (ASK, [a], "r4"), (ASK, [b], "r8"),
            ("User: What is the capital of France? Model:", [], "r4"), (TWO, [a, b], None),
            (TWO, [b, a], "r4")]
    loras = {n: LoRARequest(n, i, str(gemma4[n])) for i, n in enumerate(("r8", "r4"), 1)}
    outs = llm.generate([request(p, ims) for p, ims, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[loras[n] if n else None for *_, n in jobs])
    check(outs, gemma4["base"], [(p, ims, gemma4[n] if n else None) for p, ims, n in jobs])
    assert len({tuple(o.outputs[0].token_ids) for o in outs[:3]}) == 3
    assert outs[0].outputs[0].token_ids != outs[5].outputs[0].token_ids  # the image counts


@pytest.mark.parametrize("budget", [None, 80])
def test_image_blocks_match_hf(budget, gemma4_blocks):
    """use_bidirectional_attention "vision": HF's mask (the sliding layers AND(window,
    OR(causal, same image)), the full layers causal) in a batch of image and text requests
    on the base and an adapter; `budget` 80: prompts chunked, never inside an image."""
    llm = make_llm(gemma4_blocks["base"], enable_lora=True, max_lora_rank=8,
                   max_num_batched_tokens=budget)
    a, b = image(1), image(2, (90, 30))
    # the replies of a prompt ending with its image are within the window of the image's
    # rows on the sliding layers, so the full layers' rule over those rows shows there
    end = "User: Say what you see <|image|>"
    jobs = [(ASK, [a], None), (ASK, [b], "r8"), (TWO, [a, b], None), (end, [b], None),
            (end, [a], "r8"), ("User: What is the capital of France? Model:", [], "r8")]
    r8 = LoRARequest("r8", 1, str(gemma4_blocks["r8"]))
    outs = llm.generate([request(p, ims) for p, ims, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[r8 if n else None for *_, n in jobs])
    check(outs, gemma4_blocks["base"],
          [(p, ims, gemma4_blocks[n] if n else None) for p, ims, n in jobs])


def test_image_blocks_triton_attention_matches_hf(gemma4_blocks, monkeypatch):
    """The CUDA path's attention (the Triton kernels, under the interpreter here): the
    sliding layers' key_limit over an image, the full layers' none; chunks with cached
    context beside a decode."""
    import tests.test_attention  # noqa: F401  (on the CPU: Triton under the interpreter)

    monkeypatch.setenv("LORAPLEX_ATTENTION_BACKEND", "triton")
    llm = make_llm(gemma4_blocks["base"], max_num_batched_tokens=80, block_size=8)
    assert llm.llm_engine.model_runner.attn_backend == "triton"
    a, b = image(1), image(2, (90, 30))
    jobs = [(TWO, [a, b], None), ("User: Say what you see <|image|>", [b], None),
            ("User: Hi there. Model:", [], None)]
    outs = llm.generate([request(p, ims) for p, ims, _ in jobs], GREEDY, use_tqdm=False)
    check(outs, gemma4_blocks["base"], jobs)


def test_tower_connector_lora_matches_peft(gemma4, tmp_path):
    """enable_tower_connector_lora: an adapter on the tower's q_proj, its patch
    projection and the embedder, and the language model's q_proj: PEFT's tokens."""
    both = make_multimodal_adapter(
        gemma4["base"], tmp_path / "tower", r=4, seed=83,
        targets=r".*(language_model.*\.q_proj|vision_tower.*(q_proj\.linear|input_proj)"
                r"|embed_vision\.embedding_projection)")
    llm = make_llm(gemma4["base"], enable_lora=True, max_lora_rank=8,
                   enable_tower_connector_lora=True)
    a = image(1)
    outs = llm.generate([request(ASK, [a])] * 2, GREEDY, use_tqdm=False,
                        lora_request=[None, LoRARequest("tower", 1, str(both))])
    check(outs, gemma4["base"], [(ASK, [a], None), (ASK, [a], both)])


def test_chat_and_offline_refusals(gemma4):
    """LLM.chat with an image_url part (the template's <|image|>); too many images, an
    image that does not decode and audio refused, each alone."""
    llm = make_llm(gemma4["base"], limit_mm_per_prompt={"image": 2})
    a = image(1)
    conv = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(a)}},
        {"type": "text", "text": "What is this?"}]}]
    outs = llm.chat(conv, GREEDY, use_tqdm=False)
    check(outs, gemma4["base"], [("<|user|><|image|>What is this?\n<|assistant|>", [a], None)],
          add_special_tokens=False)
    with pytest.raises(ValueError, match="At most 2 image"):
        llm.generate(request("<|image|>" * 3, [a] * 3), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="cannot decode the image"):
        llm.generate(request(ASK, ["data:image/png;base64,AAAA"]), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="multi_modal_data"):
        llm.generate({"prompt": ASK, "multi_modal_data": {"audio": ([0.0] * 160, 16000)}},
                     GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    check(llm.generate(request(ASK, [a]), GREEDY, use_tqdm=False), gemma4["base"],
          [(ASK, [a], None)])


@pytest.fixture(scope="module")
def server(gemma4):
    args = ["--max-model-len", "256", "--dtype", "float32", "--enable-lora",
            "--max-lora-rank", "8", "--lora-modules", f"r8={gemma4['r8']}",
            "--limit-mm-per-prompt", '{"image": 1}']
    with RemoteServer(gemma4["base"], args) as s:
        yield s


def test_server_chat_with_image(server, gemma4):
    """/v1/chat/completions with an image_url part on the base and an adapter: HF's greedy
    tokens over HF's processor's prompt; two images (over the limit), an image that does
    not decode and an audio part: a 400 each, the server serving on."""
    a = image(1)
    content = [{"type": "image_url", "image_url": {"url": data_url(a)}},
               {"type": "text", "text": "What is this?"}]
    text = "<|user|><|image|>What is this?\n<|assistant|>"
    inp = hf_inputs(gemma4["base"], text, [a], add_special_tokens=False)
    ids = inp["input_ids"][0].tolist()
    client = server.get_client()
    for model, adapter in ((str(gemma4["base"]), None), ("r8", gemma4["r8"])):
        got = chat_token_ids(client, model, content, prompt_tokens=len(ids))
        ref = hf_logprobs(gemma4["base"], adapter, inp, got[:-1])[len(ids) - 1:]
        assert got == ref.argmax(-1).tolist(), model
    bad = {"too many": ([content[0], content[0]], "At most 1 image"),
           "broken": ([{"type": "image_url", "image_url": {
               "url": "data:image/png;base64,AAAA"}}], "cannot decode the image"),
           "audio": ([{"type": "input_audio", "input_audio": {
               "data": wav_b64(([0.0] * 1600, 16000)), "format": "wav"}}], "audio")}
    for parts, message in bad.values():
        with pytest.raises(openai.BadRequestError) as info:
            chat_token_ids(client, str(gemma4["base"]), parts)
        assert info.value.status_code == 400 and message in info.value.body["message"], \
            info.value.body
    assert len(chat_token_ids(client, "r8", content)) == GREEDY.max_tokens
