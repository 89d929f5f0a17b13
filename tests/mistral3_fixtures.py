"""A tiny random Mistral 3 (Mistral3ForConditionalGeneration: a Pixtral tower, the patch
merger and MLP projector, a Mistral or Ministral 3 language model), its image processor
and tokenizer (with `[IMG]`, `[IMG_BREAK]`, `[IMG_END]`), PEFT adapters on it, and HF
transformers (+ PEFT) as the reference: the ground truth of tests/test_mistral3.py.

HF's PixtralProcessor needs torchvision, which this environment lacks: the reference
prompt is expanded here by its rule (each `[IMG]` becomes, per row of merged patches,
that many `[IMG]` and an `[IMG_BREAK]`, the last one `[IMG_END]`), its pixels from the
checkpoint's image processor with PixtralProcessor's patch size (patch x merge)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loraplex import SamplingParams
from tests.fixtures import _reinit_, make_tokenizer
from tests.multimodal_fixtures import (  # noqa: F401 (some re-exported for the tests)
    assert_matches_reference,
    check_jobs,
    hf_logprobs,
    hf_multimodal,
    image_processor,
    make_multimodal_adapter,
    tokenizer,
    with_adapters,
)

IMAGE_TOKENS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
PATCH, MERGE = 4, 2  # a placeholder per 8 x 8 pixels
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
ASK = "USER: [IMG]What is this? ASSISTANT:"


def make_tiny_mistral3(out: Path, seed: int, text: str = "mistral") -> Path:
    """A 2-layer language model (`text`: "mistral", or "ministral3" with YaRN and
    Llama 4's query scaling past 16 positions) behind a 2-layer Pixtral tower on 4-pixel
    patches, merged 2 x 2; images up to 64 pixels a side; weights std 0.2."""
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        PixtralImageProcessorPil,
    )

    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    tok.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    image_token = tok.convert_tokens_to_ids("[IMG]")
    lm = dict(model_type=text, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
              pad_token_id=3, tie_word_embeddings=False, sliding_window=None)
    if text == "ministral3":
        lm["rope_parameters"] = {
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0,
            "original_max_position_embeddings": 32, "max_position_embeddings": 512,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
            "llama_4_scaling_beta": 0.5}
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2, image_size=64,
                  patch_size=PATCH, hidden_act="silu",
                  rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    cfg = Mistral3Config(text_config=lm, vision_config=vision, image_token_index=image_token,
                         spatial_merge_size=MERGE, projector_hidden_act="gelu",
                         multimodal_projector_bias=False, vision_feature_layer=-1,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(cfg).eval()
    _reinit_(model, seed, 0.2)
    model.save_pretrained(str(out))
    PixtralImageProcessorPil(size={"longest_edge": 64},
                             patch_size={"height": PATCH, "width": PATCH}
                             ).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def hf_inputs(base: Path, prompt: str, images: list, add_special_tokens: bool = True
              ) -> dict[str, torch.Tensor]:
    """The prompt's ids with each `[IMG]` expanded (PixtralProcessor's rule), the pixels
    and image_sizes, from HF's tokenizer and image processor."""
    tok = tokenizer(str(base))
    ids = tok(prompt, add_special_tokens=add_special_tokens).input_ids
    img, brk, end = tok.convert_tokens_to_ids(IMAGE_TOKENS)
    out: dict[str, torch.Tensor] = {}
    if images:  # (a LLaVA with a Pixtral tower: no merge; tests/pixtral_fixtures.py)
        cfg = json.loads((base / "config.json").read_text())
        step = cfg["vision_config"]["patch_size"] * cfg.get("spatial_merge_size", 1)
        out = dict(image_processor(str(base))(
            images=images, patch_size={"height": step, "width": step}, return_tensors="pt"))
        sizes = iter(out["image_sizes"].tolist())

        def expand(size: list[int]) -> list[int]:
            rows = ([img] * (size[1] // step) + [brk]) * (size[0] // step)
            return rows[:-1] + [end]
        ids = [x for t in ids for x in (expand(next(sizes)) if t == img else [t])]
    out["input_ids"] = torch.tensor([ids])
    return out


def check(outs, base: Path, jobs: list[tuple[str, list, Path | None]],
          add_special_tokens: bool = True) -> None:
    """check_jobs with this model's hf_inputs."""
    check_jobs(outs, base, jobs, hf_inputs, add_special_tokens)
