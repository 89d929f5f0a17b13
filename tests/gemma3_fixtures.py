"""A tiny random Gemma 3 (Gemma3ForConditionalGeneration: SigLIP tower, pooled projector,
Gemma 3 text model with a sliding-window layer), its processor, PEFT adapters on it, and
HF transformers (+ PEFT) as the reference on images: the ground truth of
tests/test_gemma3_images.py.

Its tokenizer is the session's byte-level BPE (tests/fixtures.py) without the regex split
and with newline merges ("\\n\\n", "\\n\\n\\n", "\\n\\n\\n\\n" are single tokens, as in Gemma's
own vocabulary), so the "\\n\\n" an image's expansion adds merges with a neighbouring "\\n"
as HF's text-level expansion makes it; and Gemma 3's three image tokens."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from loraplex import SamplingParams
from tests.fixtures import _reinit_, _trained_tokenizer
from tests.llava_fixtures import data_url, image  # noqa: F401  (re-exported for the tests)
from tests.multimodal_fixtures import (
    assert_matches_reference,
    hf_multimodal,
    make_multimodal_adapter,
)

BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
TOKENS_PER_IMAGE = 16  # 56 x 56 pixels in 8 x 8 patches, average-pooled 2 x 2
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
ASK = "User: <start_of_image>\nWhat is this? Model:"
# Gemma 3's template's shape: image parts become <start_of_image>
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<start_of_image>"
    "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer(out: Path) -> Any:
    """The session tokenizer with newline merges and Gemma 3's three image tokens."""
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(_trained_tokenizer().to_str())
    # no regex split: whitespace runs are not cut by what follows them (SentencePiece's way)
    spec["pre_tokenizer"]["use_regex"] = False
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    nl = "\u010a"  # byte-level BPE's "\n"
    for left, right in ((nl, nl), (nl * 2, nl), (nl * 2, nl * 2)):
        vocab[left + right] = len(vocab)
        merges.append([left, right] if merges and isinstance(merges[0], list)
                      else f"{left} {right}")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>",
        eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        clean_up_tokenization_spaces=False, model_max_length=512,
        extra_special_tokens={"boi_token": BOI, "eoi_token": EOI, "image_token": SOFT})
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out))
    return tok


def make_tiny_gemma3(out: Path, seed: int, window: int = 6) -> Path:
    """A 2-layer Gemma 3 (a sliding-window layer of `window`, a global one), a 2-layer
    SigLIP tower, every weight drawn with std 0.2 (so an image changes the output), saved
    with HF's Gemma3Processor."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    text = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        pad_token_id=3, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=24,
        sliding_window=window, layer_types=["sliding_attention", "full_attention"])
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, image_size=56, patch_size=7,
                                vision_use_head=False)
    ids = tok.convert_tokens_to_ids
    cfg = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                       mm_tokens_per_image=TOKENS_PER_IMAGE, image_token_index=ids(SOFT),
                       boi_token_index=ids(BOI), eoi_token_index=ids(EOI))
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    _reinit_(model, seed, 0.2)
    model.save_pretrained(str(out))
    images = Gemma3ImageProcessor(size={"height": 56, "width": 56})
    Gemma3Processor(image_processor=images, tokenizer=tok, image_seq_length=TOKENS_PER_IMAGE,
                    chat_template=CHAT_TEMPLATE).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def with_adapters(base: Path, seed: int) -> dict[str, Path]:
    """`base` and three adapters of different ranks on language-model modules."""
    lm = r".*language_model.*\."
    return {"base": base,
            "r8": make_multimodal_adapter(base, base.parent / "r8", r=8, seed=seed),
            "r4": make_multimodal_adapter(base, base.parent / "r4", r=4, seed=seed + 1,
                                      targets=lm + "(k_proj|o_proj|gate_proj)"),
            "r2": make_multimodal_adapter(base, base.parent / "r2", r=2, seed=seed + 2,
                                      targets=lm + "(q_proj|up_proj)")}


@functools.lru_cache(maxsize=4)
def processor(base: str) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(base)


def hf_inputs(base: Path, prompt: str, images: list, add_special_tokens: bool = True,
              options: dict | None = None) -> dict[str, torch.Tensor]:
    """What HF's processor makes of a prompt and its images (each <start_of_image>
    expanded, token_type_ids marking the image tokens); `options`: its images kwargs
    (pan-and-scan's)."""
    return dict(processor(str(base))(text=prompt, images=images or None,
                                     add_special_tokens=add_special_tokens,
                                     return_tensors="pt", **(options or {})))


@torch.no_grad()
def hf_logprobs(base: Path, adapter: Path | None, ids: list[int],
                pixel_values: torch.Tensor | None) -> torch.Tensor:
    """[len(ids), vocab] log-softmax of HF's Gemma 3 over `ids` with the images' pixels,
    the image tokens' bidirectional attention from token_type_ids (as generate() has it
    at prefill; the tokens after the prompt are text)."""
    model = hf_multimodal(str(base), None if adapter is None else str(adapter))
    soft = processor(str(base)).tokenizer.convert_tokens_to_ids(SOFT)
    ids_t = torch.tensor([ids])
    kw: dict[str, Any] = {"token_type_ids": (ids_t == soft).long()}
    if pixel_values is not None:
        kw["pixel_values"] = pixel_values
    logits = model(input_ids=ids_t, **kw).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def check(outs, base: Path, jobs: list[tuple[str, list, Path | None]],
          add_special_tokens: bool = True, options: list[dict | None] | None = None) -> None:
    """Each output's prompt is HF's processor's, its tokens HF's greedy ones (a pick off
    HF's argmax only at a near-tie) and its logprobs HF's within 1e-4. `options`: each
    job's processor kwargs for HF's processor (pan-and-scan's)."""
    for out, (prompt, images, adapter), opts in zip(outs, jobs, options or [None] * len(jobs),
                                                    strict=True):
        inp = hf_inputs(base, prompt, images, add_special_tokens, opts)
        ids = inp["input_ids"][0].tolist()
        assert out.prompt_token_ids == ids
        got = out.outputs[0].token_ids
        ref = hf_logprobs(base, adapter, ids + got[:-1], inp.get("pixel_values"))[len(ids) - 1:]
        assert_matches_reference(out, ref, adapter)
