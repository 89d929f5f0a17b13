"""Phi-4-multimodal (transformers' native Phi4MultimodalForCausalLM) against HF's model
(+ PEFT) on the same weights, fp32: the image embeddings (our torch image processor's crops
through our tower vs HF's tower on the same crops and masks), a mixed batch greedy-identical
to HF with logprobs within 1e-4 (text on the base, images under the checkpoint's
vision-lora, text under a user adapter), default_mm_loras, bad inputs failing alone, and the
chat route over a real server."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from loraplex import LoRARequest, SamplingParams
from tests.engine_utils import make_llm
from tests.multimodal_fixtures import assert_matches_reference, request, wav_b64, wav_bytes
from tests.phi4mm_fixtures import (
    AUDIO,
    IMAGE,
    hf_image_token_count,
    hf_reference,
    make_tiny_phi4mm,
)
from tests.qwen2_audio_fixtures import clip

if int(__import__("transformers").__version__.split(".")[0]) < 5:  # pragma: no cover
    pytest.skip("Phi-4-multimodal is checked against transformers 5 only so far (4.56's "
                "native port lays out its image processor otherwise and its outputs differ "
                "on the same weights)", allow_module_level=True)

GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3)
ASK = IMAGE + "What is in this picture?"


@pytest.fixture(scope="module")
def phi(tiny_root: Path) -> dict[str, Path]:
    return make_tiny_phi4mm(tiny_root / "phi4mm", seed=60)


def picture(seed: int, width: int, height: int) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(x.numpy())


def hf_image_kwargs(llm, images: list[Image.Image]) -> dict:
    """HF's model inputs for `images` as its processor lays them out (crops padded to
    the most crops, masks, the padded sizes), from our crops."""
    proc = llm.llm_engine.image_processor
    c = proc.config
    crops = [proc.crops(im) for im in images]
    most = max(len(x) for x in crops)
    pixels, masks, sizes = [], [], []
    for im, x in zip(images, crops):
        size = (im.height, im.width, proc.dynamic_hd)
        m = llm.llm_engine.vision.crop_masks(size).float()
        pad = most - len(x)
        pixels.append(torch.cat([x, torch.zeros(pad, *x.shape[1:])]))
        masks.append(torch.cat([m, torch.ones(pad, *m.shape[1:])]))
        rows, cols = c.sub_mask(size).shape
        sizes.append([rows * c.patch_size, cols * c.patch_size])
    return {"image_pixel_values": torch.stack(pixels), "image_attention_mask": torch.stack(masks),
            "image_sizes": torch.tensor(sizes)}


def hf_audio_kwargs(clips: list) -> dict:
    """HF's feature extractor's inputs for 16 kHz clips (one: no attention mask)."""
    from transformers import Phi4MultimodalFeatureExtractor

    f = Phi4MultimodalFeatureExtractor()(
        [c[0] for c in clips] if len(clips) > 1 else clips[0][0], sampling_rate=16000,
        return_tensors="pt")
    return {"audio_input_features": f["audio_input_features"],
            "audio_embed_sizes": f["audio_embed_sizes"],
            "audio_attention_mask": f.get("audio_attention_mask")}


@torch.no_grad()
def hf_logprobs(base: Path, adapter: Path | None, ids: list[int], llm, items) -> torch.Tensor:
    model = hf_reference(str(base), None if adapter is None else str(adapter))
    images = [x for x in items if isinstance(x, Image.Image)]
    clips = [x for x in items if isinstance(x, tuple)]
    kw = hf_image_kwargs(llm, images) if images else {}
    kw.update(hf_audio_kwargs(clips) if clips else {})
    logits = model(input_ids=torch.tensor([ids]), **kw).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def check(llm, outs, paths, jobs) -> None:
    """Each output vs HF (+ PEFT); a job: (prompt, its images and (16 kHz) clips,
    adapter)."""
    for out, (_, images, adapter) in zip(outs, jobs, strict=True):
        ids, got = out.prompt_token_ids, out.outputs[0].token_ids
        ref = hf_logprobs(paths["base"], paths[adapter] if adapter else None,
                          ids + got[:-1], llm, images)[len(ids) - 1:]
        assert_matches_reference(out, ref, adapter)


@torch.no_grad()
def test_image_embeddings_match_hf(phi):
    """Our tower + HD stitching + projection on our crops is HF's image embedding on the
    same crops (one crop, a 2 x 1 grid with padding below, a 1 x 2 grid with padding
    right), within 1e-5; the token counts are Phi4MultimodalImageProcessor's rule."""
    llm = make_llm(phi["base"], max_model_len=2048)
    engine = llm.llm_engine
    images = [picture(1, 50, 40), picture(2, 60, 100), picture(3, 90, 30)]
    token = llm.get_tokenizer().convert_tokens_to_ids(IMAGE)
    ids, inputs = engine.image_processor([1, token, 5, token, token], images)
    got = engine.vision(inputs.pixel_values, inputs.sizes)
    model = hf_reference(str(phi["base"]), None)
    embed = model.model.embed_tokens_extend.image_embed
    base = torch.zeros(1, len(ids), model.config.hidden_size)
    want = embed(torch.tensor([ids]), base, **hf_image_kwargs(llm, images))[0]
    rows = torch.tensor(inputs.positions)
    assert got.shape == (len(rows), model.config.hidden_size)
    torch.testing.assert_close(got, want[rows], atol=1e-5, rtol=1e-5)
    counts = [engine.vision.config.tokens_for(s) for s in inputs.sizes]
    assert counts == [hf_image_token_count(im.height, im.width) for im in images]


def test_token_counts_are_hf_processors():
    """Our count of `<|image|>` tokens per image size is HF's processor's, over grids
    with padding right, below, none, and past dynamic_hd's 36 crops (the closest ratio)."""
    from loraplex.models.phi4mm import Phi4MMVisionConfig

    c = Phi4MMVisionConfig(32, 64, 2, 2, 64, 2, "gelu", 1e-6, 64, 0, 2)
    for h, w in [(40, 50), (100, 60), (30, 90), (64, 64), (128, 192), (65, 64), (33, 700),
                 (500, 400), (1000, 30), (13, 20)]:
        assert c.tokens_for((h, w, 36)) == hf_image_token_count(h, w), (h, w)


def test_mixed_batch_matches_hf(phi):
    """One call: text on the base, an image under the checkpoint's vision-lora (r 8), two
    images in one prompt on the base, text under a user adapter (r 4), an image under
    the speech-lora (r 320, the largest rank); a 64-token budget splits every image over
    prefill chunks."""
    llm = make_llm(phi["base"], enable_lora=True, max_lora_rank=320, max_loras=3,
                   max_num_batched_tokens=64, max_num_seqs=8, max_model_len=2048)
    a, b = picture(1, 50, 40), picture(2, 60, 100)
    two = IMAGE + " and " + IMAGE + "?"
    jobs = [("Hello there, how are you?", [], None), (ASK, [a], "vision"),
            (two, [a, b], None), ("Hello there, how are you?", [], "user"),
            (ASK, [b], "speech")]
    reqs = {n: LoRARequest(n, i + 1, str(phi[n]))
            for i, n in enumerate(("vision", "user", "speech"))}
    outs = llm.generate([request(p, c) for p, c, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[reqs.get(n) for *_, n in jobs])
    check(llm, outs, phi, jobs)
    token = llm.get_tokenizer().convert_tokens_to_ids(IMAGE)
    # 50 x 40: one crop, resized to 64 x 51, 26 of 32 patch rows unpadded -> 13 x 16
    # pooled: 13 * 17 + 1 + 16 * 17
    assert outs[1].prompt_token_ids.count(token) == 494
    cum = [o.outputs[0].cumulative_logprob for o in outs]
    assert abs(cum[0] - cum[3]) > 1e-2  # the user adapter counts


def test_default_mm_lora_runs_images_under_vision_lora(phi):
    """default_mm_loras={"image": vision-lora}: an image prompt naming no adapter runs
    under it (HF + PEFT's), a text prompt on the base, an image prompt naming the user
    adapter under that one."""
    llm = make_llm(phi["base"], enable_lora=True, max_lora_rank=8, max_model_len=2048,
                   default_mm_loras={"image": str(phi["vision"])})
    a = picture(4, 70, 40)
    user = LoRARequest("user", 1, str(phi["user"]))
    outs = llm.generate([request(ASK, [a]), "Hello there", request(ASK, [a])], GREEDY,
                        use_tqdm=False, lora_request=[None, None, user])
    check(llm, outs, phi, [(ASK, [a], "vision"), ("Hello there", [], None),
                           (ASK, [a], "user")])


def test_bad_inputs_fail_alone(phi):
    llm = make_llm(phi["base"], max_model_len=2048)
    a = picture(1, 50, 40)
    bad = [({"image": [a, a]}, "1 image placeholder token.*for 2 image"),
           ({"image": [picture(5, 400, 4)]}, "too extreme an aspect ratio"),
           ({"image": [picture(6, 2000, 2000)]}, "max_model_len"),
           ({"video": [a]}, r"\['video'\] is not supported")]
    for data, message in bad:
        with pytest.raises(ValueError, match=message):
            llm.generate({"prompt": ASK, "multi_modal_data": data}, GREEDY, use_tqdm=False)
    tok = llm.get_tokenizer()
    ids, inputs = llm.llm_engine.image_processor(tok(ASK).input_ids, [a])
    with pytest.raises(ValueError, match="do not match the prompt's"):
        llm.generate({"prompt_token_ids": ids[1:], "multi_modal_data": {"image": inputs}},
                     GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    check(llm, llm.generate([request(ASK, [a])], GREEDY, use_tqdm=False), phi,
          [(ASK, [a], None)])


def mm(prompt: str, items: list) -> dict | str:
    images = [x for x in items if isinstance(x, Image.Image)]
    clips = [x for x in items if isinstance(x, tuple)]
    data = ({"image": images} if images else {}) | ({"audio": clips} if clips else {})
    return {"prompt": prompt, "multi_modal_data": data} if data else prompt


@torch.no_grad()
def test_audio_embeddings_match_hf(phi):
    """The conformer + speech projection on our features (HF's extractor's) is HF's audio
    embedding, one clip at a time: 0.5 s, 1.3 s, and 41 s (past 500 encoder positions:
    folded into 500-long chunks as HF folds it), within 1e-4; the token counts HF's."""
    llm = make_llm(phi["base"], max_model_len=4096)
    engine = llm.llm_engine
    model = hf_reference(str(phi["base"]), None)
    embed = model.model.embed_tokens_extend.audio_embed
    token = llm.get_tokenizer().convert_tokens_to_ids(AUDIO)
    for seconds in (0.5, 1.3, 41.0):
        c = clip(int(seconds * 10), seconds=seconds)
        ids, inputs = engine.image_processor([1, token, 5], audio=[c])
        got = engine.vision(inputs.pixel_values, inputs.sizes)
        kw = hf_audio_kwargs([c])
        assert inputs.sizes[0][2] == int(kw["audio_embed_sizes"][0]) == got.shape[0]
        base = torch.zeros(1, len(ids), model.config.hidden_size)
        want = embed(torch.tensor([ids]), base, **kw)[0][torch.tensor(inputs.positions)]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert engine.image_processor.expand([1, token, 5], [c]) == ids


def test_mixed_modalities_batch_matches_hf(phi):
    """One call: text on the base, an image under the vision-lora, audio under the
    speech-lora (r 320), text under a user adapter, an image and a clip in one prompt (the
    clip through HF's vision_speech projection) on the base, an 8 kHz clip (resampled);
    HF's greedy tokens, logprobs within 1e-4."""
    llm = make_llm(phi["base"], enable_lora=True, max_lora_rank=320, max_loras=3,
                   max_num_batched_tokens=64, max_num_seqs=8, max_model_len=2048)
    a, b = picture(1, 50, 40), clip(2, seconds=0.7)
    slow = clip(3, seconds=0.6, rate=8000)
    from loraplex.engine.audio import resample

    slow16 = (resample(torch.from_numpy(slow[0]), 8000, 16000).numpy(), 16000)
    hello, listen = "Hello there, how are you?", AUDIO + "Transcribe this."
    both = IMAGE + " and " + AUDIO + "?"
    jobs = [(hello, [], None), (ASK, [a], "vision"), (listen, [b], "speech"),
            (hello, [], "user"), (both, [a, b], None), (listen, [slow], "speech")]
    reqs = {n: LoRARequest(n, i + 1, str(phi[n]))
            for i, n in enumerate(("vision", "user", "speech"))}
    outs = llm.generate([mm(p, c) for p, c, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[reqs.get(n) for *_, n in jobs])
    check(llm, outs, phi, [(p, [slow16] if c and c[0] is slow else c, n) for p, c, n in jobs])
    cum = [o.outputs[0].cumulative_logprob for o in outs]
    assert abs(cum[0] - cum[3]) > 1e-2


def test_default_mm_loras_by_modality(phi):
    """default_mm_loras={"image": vision-lora, "audio": speech-lora} (rank 320 under
    max_lora_rank 320): image prompts run under the first, audio ones under the second,
    text on the base, a prompt with both on the base (vLLM's rule)."""
    llm = make_llm(phi["base"], enable_lora=True, max_lora_rank=320, max_model_len=2048,
                   default_mm_loras={"image": str(phi["vision"]), "audio": str(phi["speech"])})
    a, b = picture(4, 70, 40), clip(5, seconds=0.5)
    listen, both = AUDIO + "Transcribe this.", IMAGE + AUDIO
    jobs = [(ASK, [a], "vision"), (listen, [b], "speech"), ("Hello", [], None),
            (both, [a, b], None)]
    outs = llm.generate([mm(p, c) for p, c, _ in jobs], GREEDY, use_tqdm=False)
    check(llm, outs, phi, jobs)


def _decoded(c: tuple) -> tuple:

    from loraplex.engine.audio_decode import decode_audio

    return decode_audio(wav_bytes(c))


def test_chat_with_image_and_audio_parts(phi):
    """LLM.chat: an image_url part and an input_audio part in one message become the
    tokenizer's `<|image|>` / `<|audio|>` placeholders; the reply HF's (the audio through
    the vision_speech projection, as HF picks it with an image in the prompt)."""
    from tests.llava_fixtures import data_url

    llm = make_llm(phi["base"], max_model_len=2048)
    a, b = picture(7, 50, 40), clip(8, seconds=0.5)
    conv = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(a)}},
        {"type": "input_audio", "input_audio": {"data": wav_b64(b), "format": "wav"}},
        {"type": "text", "text": "Both?"}]}]
    out = llm.chat(conv, GREEDY, use_tqdm=False)[0]
    text = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": f"{IMAGE}\n{AUDIO}\nBoth?"}], tokenize=False,
        add_generation_prompt=True)
    tok = llm.get_tokenizer()
    want = llm.llm_engine.image_processor(tok(text, add_special_tokens=False).input_ids, [a],
                                          audio=[_decoded(b)])[0]
    assert out.prompt_token_ids == want
    check(llm, [out], phi, [(text, [a, _decoded(b)], None)])


@pytest.mark.parametrize("rate", [16000, 8000, 44100])
def test_audio_count_without_features(phi, rate):
    """expand() (the chat route's and /tokenize's count) counts each clip's placeholders
    from its length alone: HF's extractor's audio_embed_sizes (__call__)."""
    import numpy as np

    llm = make_llm(phi["base"], max_model_len=4096)
    proc = llm.llm_engine.image_processor
    ids = [7, proc.audio_placeholder, 9]
    gen = np.random.default_rng(rate)
    for n in [rate // 40, rate // 10 + 1, rate // 4 - 1, rate + 3, 3 * rate + 159]:
        clips = [(gen.standard_normal(n).astype(np.float32) * 0.1, rate)]
        assert proc.expand(ids, [], clips) == proc(ids, audio=clips)[0], n


def test_audio_bad_inputs_and_limits(phi):
    """A clip shorter than one window, a clip without its placeholder, and a 2-D waveform
    fail alone; {"audio": 0}: images served, audio refused, the audio encoder not built."""
    import numpy as np

    llm = make_llm(phi["base"], max_model_len=2048)
    listen = AUDIO + "Transcribe this."
    bad = [({"audio": [(np.zeros(300, np.float32), 16000)]}, "too short"),
           ({"audio": [clip(1), clip(2)]}, "1 audio placeholder token.*for 2 audio"),
           ({"audio": [(np.zeros((2, 4000), np.float32), 16000)]}, "must be 1-D")]
    for data, message in bad:
        with pytest.raises(ValueError, match=message):
            llm.generate({"prompt": listen, "multi_modal_data": data}, GREEDY,
                         use_tqdm=False)
    check(llm, llm.generate([mm(listen, [clip(1)])], GREEDY, use_tqdm=False), phi,
          [(listen, [clip(1)], None)])
    images_only = make_llm(phi["base"], max_model_len=2048, limit_mm_per_prompt={"audio": 0})
    assert not hasattr(images_only.llm_engine.vision, "audio_embed")
    with pytest.raises(ValueError, match="At most 0 audio"):
        images_only.generate(mm(listen, [clip(1)]), GREEDY, use_tqdm=False)
    a = picture(1, 50, 40)
    check(images_only, images_only.generate([mm(ASK, [a])], GREEDY, use_tqdm=False), phi,
          [(ASK, [a], None)])


def test_server_chat_with_image_and_audio(phi):
    """The chat route over a real server with default_mm_loras: an image_url part runs
    under the vision-lora, an input_audio part under the speech-lora (HF + PEFT's greedy
    replies); an undecodable image gets a 400 alone and the server goes on;
    /v1/audio/transcriptions runs the clip under the speech-lora too."""
    import json

    import openai

    from tests.llava_fixtures import data_url
    from tests.multimodal_fixtures import chat_token_ids, greedy_reference
    from tests.server_utils import RemoteServer

    a, b = picture(9, 50, 40), clip(10, seconds=0.5)
    image_part = {"type": "image_url", "image_url": {"url": data_url(a)}}
    audio_part = {"type": "input_audio", "input_audio": {"data": wav_b64(b), "format": "wav"}}
    question = {"type": "text", "text": "What is this?"}
    args = ["--max-model-len", "2048", "--dtype", "float32", "--enable-lora",
            "--max-lora-rank", "320", "--default-mm-loras",
            json.dumps({"image": str(phi["vision"]), "audio": str(phi["speech"])})]
    llm = make_llm(phi["base"], max_model_len=2048)
    tok = llm.get_tokenizer()
    wants = []
    for mark, item, adapter in ((IMAGE, a, "vision"), (AUDIO, _decoded(b), "speech")):
        text = tok.apply_chat_template([{"role": "user", "content": f"{mark}\nWhat is this?"}],
                                       tokenize=False, add_generation_prompt=True)
        ids = llm.llm_engine.image_processor(
            tok(text, add_special_tokens=False).input_ids,
            *([[item]] if mark == IMAGE else [None, [item]]))[0]
        wants.append((len(ids), greedy_reference(
            lambda reply, ids=ids, item=item, adapter=adapter: hf_logprobs(
                phi["base"], phi[adapter], ids + reply, llm, [item]), 5)))
    text = tok.apply_chat_template([{"role": "user", "content": AUDIO + "can you transcribe "
                                     "the speech into a written format?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = llm.llm_engine.image_processor(tok.encode(text), audio=[_decoded(b)])[0]
    reply = greedy_reference(lambda r: hf_logprobs(phi["base"], phi["speech"], ids + r, llm,
                                                   [_decoded(b)]), 5)
    # (a byte-level token left incomplete at the end is held back by the detokenizer)
    transcript = tok.decode(reply, skip_special_tokens=True).rstrip("\ufffd")
    with RemoteServer(phi["base"], args) as server:
        client = server.get_client()
        model = str(phi["base"])
        for part, (n, want) in zip((image_part, audio_part), wants):
            assert chat_token_ids(client, model, [part, question], max_tokens=5,
                                  prompt_tokens=n) == want
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=model, max_tokens=4, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {
                    "url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]}])
        assert info.value.status_code == 400 and "cannot decode" in info.value.message
        assert chat_token_ids(client, model, [audio_part, question], max_tokens=5) \
            == wants[1][1]
        got = client.audio.transcriptions.create(
            model=model, file=("a.wav", wav_bytes(b)), temperature=0.0,
            extra_body={"max_completion_tokens": 5})
        assert got.text == transcript


def test_crops_follow_hf_processor_steps(phi):
    """HF's processor needs torchvision (absent), so its steps are checked one by one on
    images where they are plain: a 128 x 128 image fills a 2 x 2 grid unresized (each crop
    its quarter, rescaled and normalized to [-1, 1], row by row; the global view the
    whole bicubic-resized to one crop); a 50 x 40 image is resized to 64 x 51 and padded
    white below (1.0 once normalized), and its global view is the padded image's."""
    import numpy as np

    llm = make_llm(phi["base"], max_model_len=2048)
    proc = llm.llm_engine.image_processor
    grid = picture(11, 128, 128)
    x = torch.from_numpy(np.array(grid)).permute(2, 0, 1).float() / 255 * 2 - 1
    crops = proc.crops(grid)
    assert crops.shape == (5, 3, 64, 64)
    for i, (top, left) in enumerate([(0, 0), (0, 64), (64, 0), (64, 64)], start=1):
        torch.testing.assert_close(crops[i], x[:, top:top + 64, left:left + 64], atol=1e-6,
                                   rtol=0)
    glob = torch.nn.functional.interpolate(x[None], size=[64, 64], mode="bicubic",
                                           align_corners=False)[0]
    torch.testing.assert_close(crops[0], glob, atol=1e-5, rtol=0)
    small = proc.crops(picture(12, 50, 40))
    assert small.shape == (2, 3, 64, 64)
    assert torch.all(small[1, :, 51:] == 1.0) and not torch.all(small[1, :, 50] == 1.0)
    glob = torch.nn.functional.interpolate(small[1:2], size=[64, 64], mode="bicubic",
                                           align_corners=False)[0]
    torch.testing.assert_close(small[0], glob, atol=1e-5, rtol=0)
