"""What the image tests (LLaVA, LLaVA-NeXT, Gemma 3, Qwen2-VL) share: HF's own model of a
multimodal checkpoint (+ PEFT) as the reference, and PEFT adapters on its language
model."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

LANGUAGE_MODEL = r".*language_model.*\."  # a regex prefix for the language model's modules


def load_multimodal(base: Path) -> torch.nn.Module:
    """The checkpoint's own class (LLaVA's, LLaVA-NeXT's, Gemma 3's, Qwen-VL's), fp32."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(base), dtype=torch.float32).eval()


def with_peft(model: torch.nn.Module, adapter: str | None) -> torch.nn.Module:
    """`model` under the PEFT adapter saved at `adapter` (None: as it is)."""
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    return model


@functools.lru_cache(maxsize=16)
def hf_multimodal(base: str, adapter: str | None) -> torch.nn.Module:
    """HF's model (+ PEFT) in fp32: the reference."""
    return with_peft(load_multimodal(Path(base)), adapter)


def make_multimodal_adapter(base: Path, out: Path, r: int, seed: int,
                            targets: str = LANGUAGE_MODEL + "(q_proj|v_proj|down_proj)",
                            scale: float = 0.3, target_parameters: list[str] | None = None,
                            model: torch.nn.Module | None = None) -> Path:
    """A PEFT LoRA adapter on the whole model (`targets`: a regex over its module names,
    the language model's q / v / down by default; `target_parameters`: PEFT's LoRA on
    parameters, transformers 5's fused experts), A and B random. `model`: the HF model
    of `base` where AutoModelForImageTextToText does not load it (the audio models)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model if model is not None else load_multimodal(base), LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0,
        target_parameters=target_parameters))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(out))
    return out


def assert_matches_reference(out, ref: torch.Tensor, adapter: Path | None) -> None:
    """`out`'s tokens are HF's greedy ones (off HF's argmax only at a near-tie) and its
    logprobs HF's within 1e-4; `ref`: HF's log-softmax at each generated position."""
    got = out.outputs[0].token_ids
    for step, (tok, lps) in enumerate(zip(got, out.outputs[0].logprobs, strict=True)):
        best = int(ref[step].argmax())
        assert tok == best or ref[step, best] - ref[step, tok] < 1e-4, (adapter, step)
        for t, lp in lps.items():
            assert abs(lp.logprob - ref[step, t].item()) < 1e-4, (adapter, step, t)


def request(prompt: str, images: list) -> dict | str:
    """A generate() prompt with its images (a plain string without)."""
    return {"prompt": prompt, "multi_modal_data": {"image": images}} if images else prompt


def chat_token_ids(client, model: str, content: list, max_tokens: int = 6,
                   prompt_tokens: int | None = None) -> list[int]:
    """A greedy chat over the server (the openai client) with one user message of
    `content` parts: the reply's token ids (and its usage's prompt tokens checked, where
    `prompt_tokens` is given)."""
    resp = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], temperature=0,
        max_tokens=max_tokens, logprobs=True,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    assert prompt_tokens is None or resp.usage.prompt_tokens == prompt_tokens
    return [int(c.token.split(":", 1)[1]) for c in resp.choices[0].logprobs.content]


def without_torchvision(relative: str, name: str) -> Any:
    """A transformers module that imports torchvision at its top (not installed here),
    loaded as `name` with torchvision stubbed, for HF's functions that never call it:
    `relative`, its path under transformers' package."""
    import importlib.util
    import sys
    import types

    import transformers

    if name not in sys.modules:
        stubs = {m: sys.modules.get(m) or types.ModuleType(m) for m in
                 ("torchvision", "torchvision.transforms", "torchvision.transforms.v2")}
        stubs["torchvision.transforms.v2"].functional = types.SimpleNamespace()
        saved = {m: sys.modules.get(m) for m in stubs}
        sys.modules.update(stubs)
        try:
            spec = importlib.util.spec_from_file_location(
                name, Path(transformers.__file__).parent / relative)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        finally:
            for m, old in saved.items():
                if old is None:
                    sys.modules.pop(m, None)
    return sys.modules[name]


def check_chat_refusals(client, model: str, cases: list[tuple[list, str]],
                        max_tokens: int = 6) -> None:
    """Each case's content parts fail over the chat route with a 400 in OpenAI's error
    shape, its message matching the case's regex."""
    import re

    import openai
    import pytest

    for parts, match in cases:
        with pytest.raises(openai.BadRequestError) as info:
            chat_token_ids(client, model, parts, max_tokens)
        assert info.value.status_code == 400
        assert re.search(match, info.value.body["message"]), info.value.body


def check_image_refusals(client, model: str, content: list) -> None:
    """Over the chat route of a server started with --limit-mm-per-prompt {"image": 1}:
    a broken image and a second image (`content`'s first part again) each fail with a
    400 in OpenAI's error shape, saying why."""
    broken = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    check_chat_refusals(client, model, [([broken], "cannot decode the image"),
                                        ([*content, content[0]], "At most 1 image")])


def greedy_reference(logprobs_of, max_tokens: int) -> list[int]:
    """The reference's greedy reply, token by token: `logprobs_of(reply so far)` is its
    log-softmax over the prompt and those tokens."""
    reply: list[int] = []
    for _ in range(max_tokens):
        reply.append(int(logprobs_of(reply)[-1].argmax()))
    return reply


def with_adapters(base: Path, seed: int) -> dict[str, Path]:
    """`base` and two adapters beside it on different language-model modules: r8 (q, v,
    down) and r4 (k, o, gate)."""
    return {"base": base,
            "r8": make_multimodal_adapter(base, base.parent / "r8", r=8, seed=seed),
            "r4": make_multimodal_adapter(base, base.parent / "r4", r=4, seed=seed + 1,
                                          targets=LANGUAGE_MODEL + "(k_proj|o_proj|gate_proj)")}


@functools.lru_cache(maxsize=8)
def tokenizer(base: str) -> Any:
    """The checkpoint's tokenizer (cached)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


def our_processor(base: Path) -> Any:
    """loraplex's processor of the checkpoint's multi_modal_data, as the engine loads it
    (engine/multimodal_prompt.py's load_processor)."""
    from transformers import AutoConfig

    from loraplex.engine.images import vision_config
    from loraplex.engine.multimodal_prompt import load_processor

    config = vision_config(AutoConfig.from_pretrained(str(base)))
    return load_processor(str(base), config, tokenizer(str(base)))


@functools.lru_cache(maxsize=8)
def image_processor(base: str) -> Any:
    """The checkpoint's HF image processor (cached)."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(base)


@torch.no_grad()
def hf_logprobs(base: Path, adapter: Path | None, inputs: dict[str, torch.Tensor],
                more: list[int], positions: torch.Tensor | None = None) -> torch.Tensor:
    """[len(ids) + len(more), vocab] log-softmax of HF's model (+ PEFT) over the prompt's
    processed `inputs` and `more` tokens after them, in one forward: its own positions
    (Qwen-VL's M-RoPE ones), or `positions` [3, len(ids) + len(more)] where given."""
    model = hf_multimodal(str(base), None if adapter is None else str(adapter))
    kw = dict(inputs)
    if positions is not None:
        kw["position_ids"] = positions[:, None]
    kw["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([more], dtype=torch.long)],
                                dim=1)
    if "mm_token_type_ids" in inputs:  # Qwen-VL's: the new tokens are text
        kw["mm_token_type_ids"] = torch.cat(
            [inputs["mm_token_type_ids"], torch.zeros(1, len(more), dtype=torch.int)], dim=1)
    return torch.log_softmax(model(**kw).logits[0].float(), dim=-1)


def check_jobs(outs, base: Path, jobs: list[tuple[str, list, Path | None]],
               hf_inputs: Any, add_special_tokens: bool = True) -> None:
    """Each output's prompt is the reference's (`hf_inputs(base, prompt, images,
    add_special_tokens)`, HF's processing), its tokens HF's greedy ones (off HF's argmax
    only at a near-tie) and its logprobs HF's within 1e-4."""
    for out, (prompt, images, adapter) in zip(outs, jobs, strict=True):
        inp = hf_inputs(base, prompt, images, add_special_tokens)
        ids = inp["input_ids"][0].tolist()
        assert out.prompt_token_ids == ids
        got = out.outputs[0].token_ids
        ref = hf_logprobs(base, adapter, inp, got[:-1])[len(ids) - 1:]
        assert_matches_reference(out, ref, adapter)


def audio_prompt(prompt: str, clips: list) -> dict | str:
    """`prompt` with its audio clips as multi_modal_data (the prompt alone without)."""
    return {"prompt": prompt, "multi_modal_data": {"audio": clips}} if clips else prompt


def at_16k(c: tuple[Any, int]) -> Any:
    """The waveform HF's feature extractor is given: 16 kHz (ours resampled, as vLLM
    resamples)."""
    from loraplex.engine.audio import resample

    return resample(torch.from_numpy(c[0]), c[1], 16000).numpy()


def check_audio(outs, paths: dict[str, Path], jobs: list[tuple[str, list, str | None]],
                hf_logprobs: Any) -> None:
    """Each output's tokens and logprobs HF's (+ PEFT's), as assert_matches_reference
    holds them; `hf_logprobs(base, adapter, ids, waveforms at 16 kHz)`: the model's
    reference log-softmax over `ids`."""
    for out, (_, clips, adapter) in zip(outs, jobs, strict=True):
        ids, got = out.prompt_token_ids, out.outputs[0].token_ids
        ref = hf_logprobs(paths["base"], paths[adapter] if adapter else None,
                          ids + got[:-1], [at_16k(c) for c in clips])[len(ids) - 1:]
        assert_matches_reference(out, ref, adapter)


def wav_bytes(c: tuple[Any, int]) -> bytes:
    """A clip (a float waveform in [-1, 1], its rate) as a 16-bit mono WAV file, as a client
    uploads it."""
    import io
    import wave

    import numpy as np

    buf = io.BytesIO()
    with wave.open(buf, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(c[1])
        f.writeframes(np.round(np.asarray(c[0], np.float64) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def wav_b64(c: tuple[Any, int]) -> str:
    """wav_bytes as base64: a chat `input_audio` part's data."""
    import base64

    return base64.b64encode(wav_bytes(c)).decode()


def check_media_refused(client: Any, model: str) -> None:
    """A chat message with an image, and one with an audio clip, are each a 400 over the
    openai client, on a model served on text (its towers not loaded)."""
    import openai
    import pytest

    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    audio = {"type": "input_audio", "input_audio": {
        "data": wav_b64(([0.0] * 1600, 16000)), "format": "wav"}}
    for part, word in ((image, "image inputs are not supported"), (audio, "audio")):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=model, max_tokens=2, messages=[{
                "role": "user", "content": [part, {"type": "text", "text": "What is this?"}]}])
        assert info.value.status_code == 400 and word in info.value.body["message"]
