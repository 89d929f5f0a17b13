"""LLaVA (LlavaForConditionalGeneration) with images, against HF transformers' LLaVA (+ PEFT)
on the same weights and the same processor outputs, fp32: the prompt's placeholders
expanded as HF's processor does, greedy tokens HF's and logprobs within 1e-4, for image
requests under the base and two adapters beside text requests (adapter slots fewer than
adapters; chunked prefill splitting an image's placeholders); prefix caching that never
shares K/V across images; LLM.chat and the server's chat route with image parts; and the
refusals (a model without a vision tower, placeholders that do not match the images, an
undecodable image), each failing only its request; Anthropic's Messages API's image blocks
served as the chat route's image parts."""

from __future__ import annotations

import io
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex import LoRARequest, SamplingParams
from loraplex.lora.errors import LoRAError
from tests.engine_utils import make_llm
from tests.fixtures import make_tiny_model
from tests.llava_fixtures import (
    ASK,
    GREEDY,
    TOKENS_PER_IMAGE,
    check,
    data_url,
    hf_inputs,
    hf_logprobs,
    image,
    make_tiny_llava,
    processor,
    with_adapters,
)
from tests.multimodal_fixtures import chat_token_ids, make_multimodal_adapter, request
from tests.server_utils import RemoteServer

pytest.importorskip("PIL")


@pytest.fixture(scope="module")
def llava(tiny_root: Path) -> dict[str, Path]:
    return with_adapters(make_tiny_llava(tiny_root / "llava" / "base", seed=90), seed=91)


@pytest.mark.parametrize("layout", ["saved", "hub", "in_memory"])
def test_checkpoint_layouts(layout, llava, tmp_path):
    """The hub's files (`vision_tower.vision_model.*`, `language_model.model.*`),
    transformers 4.52+'s (`model.vision_tower.vision_model.*`, `model.language_model.*`)
    and whatever this transformers saves all load to HF's model."""
    base = llava["base"]
    if layout != "saved":
        base = Path(shutil.copytree(llava["base"], tmp_path / layout))
        path = str(base / "model.safetensors")

        def rename(name: str) -> str:
            name = re.sub(r"^(model\.)?vision_tower\.(vision_model\.)?", "vision_tower.", name)
            name = re.sub(r"^(model\.)?multi_modal_projector\.", "multi_modal_projector.", name)
            name = re.sub(r"^(model\.language_model\.|language_model\.model\.)",
                          "language_model.model.", name)
            name = re.sub(r"^(language_model\.)?lm_head\.", "language_model.lm_head.", name)
            name = name.replace("vision_tower.", "vision_tower.vision_model.", 1)
            if layout == "in_memory":
                name = re.sub(r"^(vision_tower|multi_modal_projector)\.", r"model.\1.", name)
                name = name.replace("language_model.model.", "model.language_model.", 1)
                name = name.replace("language_model.lm_head.", "lm_head.", 1)
            return name

        save_file({rename(k): v for k, v in load_file(path).items()}, path,
                  metadata={"format": "pt"})
    llm = make_llm(base)
    img = image(1)
    outs = llm.generate([request(ASK, [img])], GREEDY, use_tqdm=False)
    check(outs, llava["base"], [(ASK, [img], None)])


@pytest.mark.parametrize(("max_loras", "budget"), [(1, None), (2, 12)])
def test_mixed_batch_matches_hf(max_loras, budget, llava):
    """Image requests under the base and two adapters, a text request, two images in one
    prompt, in one call; `budget` 12 < 16 placeholders: an image's run is split over
    prefill chunks (the tower's output reused by the later chunk)."""
    llm = make_llm(llava["base"], enable_lora=True, max_loras=max_loras, max_lora_rank=8,
                   max_num_batched_tokens=budget)
    a, b = image(1), image(2, (30, 50))
    two = "USER: <image> and <image>: which is brighter? ASSISTANT:"
    jobs = [(ASK, [a], None), (ASK, [a], "r8"), (ASK, [a], "r4"), (ASK, [b], "r8"),
            ("USER: What is the capital of France? ASSISTANT:", [], "r4"),
            (two, [a, b], None), (two, [b, a], "r8")]
    loras = {"r8": LoRARequest("r8", 1, str(llava["r8"])),
             "r4": LoRARequest("r4", 2, str(llava["r4"]))}
    outs = llm.generate([request(p, ims) for p, ims, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[loras[n] if n else None for *_, n in jobs])
    check(outs, llava["base"], [(p, ims, llava[n] if n else None) for p, ims, n in jobs])
    unexpanded = processor(str(llava["base"])).tokenizer(ASK).input_ids
    assert len(outs[0].prompt_token_ids) == len(unexpanded) + TOKENS_PER_IMAGE - 1
    first = {tuple(o.outputs[0].token_ids) for o in outs[:3]}
    assert len(first) == 3, "an adapter left the image request's output unchanged"
    assert outs[1].outputs[0].token_ids != outs[3].outputs[0].token_ids  # the image counts


def test_prefix_cache_never_shares_across_images(llava):
    """The same text with another image: only the blocks before the image's first one
    are shared; the same image again: the whole prompt but its last block."""
    llm = make_llm(llava["base"], enable_prefix_caching=True, block_size=8)
    intro = "USER: Once upon a time there was a little girl who lived in a village. "
    prompt = intro + "<image>\nWhat is this? ASSISTANT:"
    a, b = image(1), image(2)
    runs = [llm.generate([request(prompt, [img])], GREEDY, use_tqdm=False)[0]
            for img in (a, b, a)]
    check(runs, llava["base"], [(prompt, [img], None) for img in (a, b, a)])
    ids = runs[0].prompt_token_ids
    first_image = ids.index(processor(str(llava["base"])).tokenizer.convert_tokens_to_ids(
        "<image>"))
    assert runs[0].num_cached_tokens == 0
    assert runs[1].num_cached_tokens == first_image // 8 * 8 > 0
    assert runs[2].num_cached_tokens == (len(ids) - 1) // 8 * 8
    assert runs[0].outputs[0].token_ids != runs[1].outputs[0].token_ids


def test_chat_with_image_parts(llava):
    """LLM.chat: an image_url part (data URL) and an image_pil part become the template's
    placeholder, the images the request's."""
    llm = make_llm(llava["base"])
    a, b = image(1), image(3)
    conv = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(a)}},
        {"type": "text", "text": "What is this? And "},
        {"type": "image_pil", "image_pil": b}]}]
    outs = llm.chat(conv, GREEDY, use_tqdm=False)
    text = "<|user|><image>\nWhat is this? And <image>\n\n<|assistant|>"
    check(outs, llava["base"], [(text, [a, b], None)], add_special_tokens=False)


def test_offline_refusals_fail_only_their_request(llava, tiny_root):
    llm = make_llm(llava["base"], enable_lora=True, max_lora_rank=8)
    a = image(1)
    with pytest.raises(ValueError, match="1 image placeholder token.*for 2 image"):
        llm.generate(request(ASK, [a, a]), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="2 image placeholder token.*for 1 image"):
        llm.generate(request(ASK + " <image>", [a]), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="cannot decode the image"):
        llm.generate(request(ASK, ["data:image/png;base64,AAAA"]), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=r"\['audio'\] is not supported"):
        llm.generate({"prompt": ASK, "multi_modal_data": {"audio": [0.0]}}, GREEDY,
                     use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    check(llm.generate(request(ASK, [a]), GREEDY, use_tqdm=False), llava["base"],
          [(ASK, [a], None)])
    text = make_llm(make_tiny_model(tiny_root / "llava_text", "llama", seed=5))
    with pytest.raises(ValueError, match="not supported yet by model .*no vision tower"):
        text.generate(request("Hi", [a]), GREEDY, use_tqdm=False)


def test_lora_on_the_vision_tower(llava, tmp_path, caplog):
    """LoRA applies to the language model (vLLM's rule): an adapter's LoRA on the tower
    and projector is left out with a warning, and one with nothing else is refused."""
    both = make_multimodal_adapter(llava["base"], tmp_path / "both", r=4, seed=93,
                              targets=r".*(language_model.*\.q_proj|fc1|linear_1)")
    only = shutil.copytree(both, tmp_path / "only")
    path = str(only / "adapter_model.safetensors")
    save_file({k: v for k, v in load_file(path).items() if "language_model" not in k}, path)
    llm = make_llm(llava["base"], enable_lora=True, max_lora_rank=8)
    with caplog.at_level("WARNING"):
        out = llm.generate(request(ASK, [image(1)]), GREEDY, use_tqdm=False,
                           lora_request=LoRARequest("both", 1, str(both)))
    assert "left out (LoRA applies to the language model only)" in caplog.text
    assert len(out[0].outputs[0].token_ids) == GREEDY.max_tokens
    with pytest.raises(LoRAError, match="but on the vision tower / projector"):
        llm.generate(request(ASK, [image(1)]), GREEDY, use_tqdm=False,
                     lora_request=LoRARequest("only", 2, str(only)))


def _refused(client: openai.OpenAI, model: str, content: list, match: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat_token_ids(client, model, content)
    err = info.value.body
    assert err["type"] == "BadRequestError" and info.value.status_code == 400, err
    assert re.search(match, err["message"]), err["message"]


def test_server_chat_with_data_url_image(llava, tiny_root):
    a = image(1)
    content = [{"type": "image_url", "image_url": {"url": data_url(a)}},
               {"type": "text", "text": "What is this?"}]
    args = ["--max-model-len", "256", "--dtype", "float32", "--enable-lora",
            "--max-lora-rank", "8", "--lora-modules", f"r8={llava['r8']}"]
    with RemoteServer(llava["base"], args) as server:
        client = server.get_client()
        base = str(llava["base"])
        for model, adapter in ((base, None), ("r8", llava["r8"])):
            got = chat_token_ids(client, model, content)
            text = "<|user|><image>\nWhat is this?\n<|assistant|>"
            inp = hf_inputs(llava["base"], text, [a])
            ids = processor(base)(text=text, images=[a], add_special_tokens=False,
                                  return_tensors="pt")["input_ids"][0].tolist()
            ref = hf_logprobs(llava["base"], adapter, ids + got[:-1], inp["pixel_values"])
            assert got == ref[len(ids) - 1:].argmax(-1).tolist()
        _refused(client, base, [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64,AAAA"}}], "cannot decode the image")
        _refused(client, base, [*content, {"type": "text", "text": " <image>"}],
                 "2 image placeholder token.*for 1 image")
        _refused(client, base, [{"type": "image_url", "image_url": {"url": "ftp://x"}}],
                 "data: URL or an http")
        assert len(chat_token_ids(client, base, content)) == GREEDY.max_tokens  # still serving
    text_model = make_tiny_model(tiny_root / "llava_server_text", "llama", seed=6)
    with RemoteServer(text_model, ["--max-model-len", "128", "--dtype", "float32",
                                   "--served-model-name", "plain"]) as server:
        client = server.get_client()
        _refused(client, "plain", content, "not supported by model 'plain'.*no vision tower")
        assert len(chat_token_ids(client, "plain", content[1:])) == GREEDY.max_tokens


def test_image_hash_keys_only_the_blocks_with_placeholders():
    """Unit: an image's hash keys the blocks its placeholders are in, and only those."""
    from loraplex.engine.images import ImageInputs

    inputs = ImageInputs(torch.zeros(1), list(range(10, 26)), [(10, 16)], [b"h"])
    assert inputs.block_key(0, 8) == b"" and inputs.block_key(26, 32) == b""
    assert inputs.block_key(8, 16) == inputs.block_key(24, 32) == b"h"
    assert inputs.rows_in(8, 16) == (list(range(10, 16)), slice(0, 6))


def test_engine_takes_processed_images_as_they_are(llava, monkeypatch):
    """ImageInputs processed beforehand (what the server hands the engine) with the
    expanded ids: add_request never calls the HF image processor (a third-party object,
    its calls counted), and the output is HF's; inputs that are not the prompt's are
    refused, alone."""
    llm = make_llm(llava["base"])
    engine, a = llm.llm_engine, image(1)
    ids = processor(str(llava["base"])).tokenizer(ASK).input_ids
    expanded, inputs = engine.image_processor(ids, [a])
    hf = engine.image_processor.hf
    calls, real = [], hf.preprocess
    monkeypatch.setattr(hf, "preprocess", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    outs = llm.generate({"prompt_token_ids": expanded, "multi_modal_data": {"image": inputs}},
                        GREEDY, use_tqdm=False)
    assert calls == []
    check(outs, llava["base"], [(ASK, [a], None)])
    with pytest.raises(ValueError, match="processed image inputs do not match"):
        llm.generate({"prompt_token_ids": expanded[1:], "multi_modal_data": {"image": inputs}},
                     GREEDY, use_tqdm=False)
    llm.generate(request(ASK, [a]), GREEDY, use_tqdm=False)  # raw images: processed here
    assert calls == [1] and not engine.has_unfinished_requests()


def test_server_processes_images_on_its_encoder_thread(llava, monkeypatch):
    """The chat route runs the HF image processor on the serving layer's encoder thread,
    never on the engine's step thread; the reply is HF's."""
    import asyncio
    import threading

    from transformers import AutoTokenizer

    from loraplex import EngineArgs
    from loraplex.engine.async_engine import AsyncLLMEngine
    from loraplex.entrypoints.protocol import ChatCompletionRequest
    from loraplex.entrypoints.serving_chat import OpenAIServingChat
    from loraplex.entrypoints.serving_models import OpenAIServingModels

    base, a = llava["base"], image(1)
    content = [{"type": "image_url", "image_url": {"url": data_url(a)}},
               {"type": "text", "text": "What is this?"}]

    async def main():
        engine = AsyncLLMEngine.from_engine_args(EngineArgs(
            model=str(base), dtype="float32", max_model_len=256, cpu_kv_cache_gib=0.05))
        try:
            chat = OpenAIServingChat(engine, OpenAIServingModels(engine, ["llava"], 256, False),
                                     AutoTokenizer.from_pretrained(str(base)))
            hf = engine.engine.image_processor.hf
            threads, real = [], hf.preprocess

            def preprocess(*args, **kw):
                threads.append(threading.current_thread().name)
                return real(*args, **kw)
            monkeypatch.setattr(hf, "preprocess", preprocess)
            resp = await chat.create_chat_completion(ChatCompletionRequest(
                model="llava", messages=[{"role": "user", "content": content}], temperature=0,
                max_tokens=GREEDY.max_tokens, ignore_eos=True, logprobs=True,
                return_tokens_as_token_ids=True))
            return resp, threads
        finally:
            await engine.shutdown()
    resp, threads = asyncio.run(main())
    assert len(threads) == 1 and threads[0].startswith("loraplex-tokenize"), threads
    got = [int(c.token.split(":", 1)[1]) for c in resp.choices[0].logprobs.content]
    text = "<|user|><image>\nWhat is this?\n<|assistant|>"
    inp = processor(str(base))(text=text, images=[a], add_special_tokens=False,
                               return_tensors="pt")
    ids = inp["input_ids"][0].tolist()
    assert resp.usage.prompt_tokens == len(ids)
    ref = hf_logprobs(base, None, ids + got[:-1], inp["pixel_values"])
    assert got == ref[len(ids) - 1:].argmax(-1).tolist()


def test_one_tower_call_for_a_steps_new_images(llava):
    """Three image requests (one with two images, one with n=2) prefilled in one step: the
    vision tower runs once, on their pixels stacked, and each output is still HF's."""
    llm = make_llm(llava["base"])
    calls: list[int] = []
    llm.llm_engine.vision.register_forward_hook(
        lambda module, args, out: calls.append(args[0].shape[0]))
    a, b = image(1), image(2, (30, 50))
    two = "USER: <image> and <image>: which is brighter? ASSISTANT:"
    jobs = [(ASK, [a]), (two, [b, a]), (ASK, [b])]
    params = [GREEDY, GREEDY, SamplingParams(n=2, temperature=0.0, max_tokens=6,
                                             ignore_eos=True, logprobs=3)]
    outs = llm.generate([request(p, ims) for p, ims in jobs], params, use_tqdm=False)
    assert calls == [4]  # 1 + 2 + 1 images (the n=2 request's siblings share theirs)
    check(outs, llava["base"], [(p, ims, None) for p, ims in jobs])
    assert outs[2].outputs[1].token_ids == outs[2].outputs[0].token_ids


def test_server_responses_input_image_and_tokenize(llava):
    """/v1/responses' input_image parts are the chat route's image_url parts: the same
    reply (HF's greedy text), the same prompt tokens; /tokenize of a chat with an image
    gives the expanded ids HF's processor makes, counted as the chat route counts them
    (usage, max_tokens). Bad input fails alone, with OpenAI's error shape."""
    base = str(llava["base"])
    text = "<|user|><image>\nWhat is this?\n<|assistant|>"
    with RemoteServer(llava["base"], ["--max-model-len", "256", "--dtype", "float32"]) as server:
        client = server.get_client()
        replies = []
        for img in (image(1), image(2, (30, 50))):
            url = data_url(img)
            chat = client.chat.completions.create(
                model=base, messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "What is this?"}]}],
                temperature=0, max_tokens=GREEDY.max_tokens, extra_body={"ignore_eos": True})
            resp = client.responses.create(
                model=base, input=[{"role": "user", "content": [
                    {"type": "input_image", "image_url": url, "detail": "auto"},
                    {"type": "input_text", "text": "What is this?"}]}],
                temperature=0, max_output_tokens=GREEDY.max_tokens,
                extra_body={"ignore_eos": True})
            inp = processor(base)(text=text, images=[img], add_special_tokens=False,
                                  return_tensors="pt")
            ids = inp["input_ids"][0].tolist()
            greedy = list(ids)
            for _ in range(GREEDY.max_tokens):
                ref = hf_logprobs(llava["base"], None, greedy, inp["pixel_values"])
                greedy.append(int(ref[-1].argmax()))
            want = processor(base).tokenizer.decode(greedy[len(ids):], skip_special_tokens=True)
            assert resp.output_text == chat.choices[0].message.content == want
            assert resp.usage.input_tokens == chat.usage.prompt_tokens == len(ids)
            replies.append(want)

            tok = server.post("/tokenize", {"model": base, "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is this?"}]}]})
            assert tok.status_code == 200, tok.text
            assert tok.json()["tokens"] == ids and tok.json()["count"] == len(ids)
        assert replies[0] != replies[1]  # the image counts
        content = [{"type": "image_url", "image_url": {"url": data_url(image(1))}},
                   {"type": "text", "text": "What is this?"}]
        with pytest.raises(openai.BadRequestError) as info:  # counted expanded: one too many
            client.chat.completions.create(model=base, messages=[{"role": "user",
                                                                  "content": content}],
                                           max_tokens=256 - len(ids) + 1)
        assert f"({len(ids)} in the messages" in info.value.body["message"]
        bad = [([{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}],
                "cannot decode the image"),
               ([{"type": "input_image", "image_url": {"url": data_url(image(1))}}],
                r"needs image_url, a data: or http\(s\) URL string \(image_url given as dict"),
               ([{"type": "input_image", "image_url": "ftp://x"}], "data: URL or an http")]
        for parts, match in bad:
            with pytest.raises(openai.BadRequestError) as info:
                client.responses.create(model=base, input=[{"role": "user", "content": parts}],
                                        max_output_tokens=2)
            assert info.value.body["type"] == "BadRequestError", info.value.body
            assert re.search(match, info.value.body["message"]), info.value.body
        tok = server.post("/tokenize", {"model": base, "messages": [
            {"role": "user", "content": [*content, {"type": "text", "text": " <image>"}]}]})
        assert tok.status_code == 400, tok.text
        assert re.search("2 image placeholder token.*for 1 image", tok.json()["error"]["message"])
        assert tok.json()["error"]["type"] == "BadRequestError"
        resp = client.responses.create(model=base, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": data_url(image(1))},
            {"type": "input_text", "text": "What is this?"}]}], temperature=0,
            max_output_tokens=GREEDY.max_tokens, extra_body={"ignore_eos": True})
        assert resp.output_text == replies[0]  # still serving


class _Pictures(BaseHTTPRequestHandler):
    """A loopback image host for URL image sources."""
    files: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802
        data = self.files.get(self.path)
        self.send_response(200 if data else 404)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(data or b"")

    def log_message(self, *args):
        pass


def test_anthropic_messages_with_image_blocks(llava):
    """/v1/messages' image blocks (base64, and a URL fetched from a loopback host) are the
    chat route's image_url parts: the same reply and prompt tokens for the base and an
    adapter; a bad image block fails alone in Anthropic's error shape."""
    anthropic = pytest.importorskip("anthropic")
    host = ThreadingHTTPServer(("127.0.0.1", 0), _Pictures)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    png = io.BytesIO()
    image(2, (30, 50)).save(png, format="PNG")
    _Pictures.files["/b.png"] = png.getvalue()
    url = f"http://127.0.0.1:{host.server_address[1]}/b.png"
    args = ["--max-model-len", "256", "--dtype", "float32", "--enable-lora",
            "--max-lora-rank", "8", "--lora-modules", f"r8={llava['r8']}"]
    try:
        with RemoteServer(llava["base"], args) as server:
            chat = server.get_client()
            client = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0,
                                         timeout=60)
            base64_png = data_url(image(1)).removeprefix("data:image/png;base64,")
            blocks = [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                   "data": base64_png}},
                      {"type": "image", "source": {"type": "url", "url": url}}]
            replies = set()
            for model in (str(llava["base"]), "r8"):
                for block, image_url in zip(blocks, (data_url(image(1)), url)):
                    msg = client.messages.create(
                        model=model, max_tokens=GREEDY.max_tokens,
                        messages=[{"role": "user", "content": [
                            block, {"type": "text", "text": "What is this?"}]}],
                        extra_body={"temperature": 0, "ignore_eos": True})
                    ref = chat.chat.completions.create(
                        model=model, max_tokens=GREEDY.max_tokens, temperature=0,
                        messages=[{"role": "user", "content": [
                            {"type": "image_url", "image_url": {"url": image_url}},
                            {"type": "text", "text": "What is this?"}]}],
                        extra_body={"ignore_eos": True})
                    assert msg.content[0].text == ref.choices[0].message.content
                    assert msg.usage.input_tokens == ref.usage.prompt_tokens
                    assert msg.usage.output_tokens == GREEDY.max_tokens
                    replies.add(msg.content[0].text)
            assert len(replies) > 1  # the image and the adapter count
            bad = [
                ([{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                               "data": "AAAA"}}], "user", "cannot decode"),
                ([{"type": "image", "source": {"type": "url", "url": url + ".gone"}}], "user",
                 "404"),
                ([{"type": "image", "source": {"type": "file", "file_id": "f"}}], "user",
                 "an image block's source must be"),
                (blocks[:1], "assistant", "a block of type 'image' is not valid in a assistant"),
            ]
            for content, role, match in bad:
                with pytest.raises(anthropic.BadRequestError) as info:
                    client.messages.create(model="r8", max_tokens=2,
                                           messages=[{"role": role, "content": content}])
                assert info.value.body["error"]["type"] == "invalid_request_error"
                assert match in info.value.body["error"]["message"], info.value.body
            msg = client.messages.create(model="r8", max_tokens=GREEDY.max_tokens, messages=[
                {"role": "user", "content": [blocks[0], {"type": "text", "text": "Hi"}]}])
            assert msg.usage.output_tokens >= 1  # still serving
    finally:
        host.shutdown()
