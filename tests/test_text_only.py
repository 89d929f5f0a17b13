"""Gemma 3's multimodal checkpoints (Gemma3ForConditionalGeneration) on text (their
images: tests/test_gemma3_images.py): the language model loads from the hub layout
(`language_model.model.*`; vision tower and projector skipped, this checkpoint having no
image processor), and adapters trained on the whole model (its vision tower's LoRA
too) match HF + PEFT on the multimodal model with text inputs, in mixed batches; the
older adapter layout (`language_model.model.*`) is read the same way."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex import LoRARequest
from loraplex.lora.errors import LoRAError
from tests.engine_utils import GREEDY, check_against_hf, check_mixed_batch, make_llm
from tests.fixtures import make_peft_adapter, make_tiny_model


def make_gemma3_multimodal(root: Path, seed: int) -> Path:
    """A tiny Gemma3ForConditionalGeneration: the tiny Gemma 3 text model's weights as its
    language model, a random SigLIP tower (2 x 2 patches -> 4 image tokens)."""
    from transformers import AutoModelForCausalLM, Gemma3Config, Gemma3ForConditionalGeneration

    # tied, as the real ones (transformers 4 ties by the text config, 5 by the whole one's)
    text_dir = make_tiny_model(root / "text", "gemma3", seed=seed, tie_word_embeddings=True)
    text = AutoModelForCausalLM.from_pretrained(str(text_dir), dtype=torch.float32)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=text.config.to_dict(), vision_config=vision,
                       mm_tokens_per_image=4, image_token_index=511, boi_token_index=509,
                       eoi_token_index=510)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    missing = model.model.language_model.load_state_dict(text.model.state_dict())
    assert not missing.missing_keys and not missing.unexpected_keys
    out = root / "multimodal"
    model.save_pretrained(str(out))
    for f in text_dir.glob("*token*"):  # the tokenizer
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def gemma3mm(tiny_root: Path) -> dict[str, Path]:
    root = tiny_root / "gemma3mm"
    base = make_gemma3_multimodal(root, seed=80)
    return {
        "base": base,
        # all-linear: the vision tower's fc1 / fc2 / out_proj / q,k,v too
        "all": make_peft_adapter(base, root / "all", r=8, seed=81, target_modules="all-linear"),
        # q_proj / v_proj: the text model's and the tower's alike
        "qv": make_peft_adapter(base, root / "qv", r=4, seed=82,
                                target_modules=["q_proj", "v_proj"]),
    }


def test_checkpoint_layout(gemma3mm):
    """transformers 5 saves the hub's layout; 4.52-4.x the in-memory one: both load."""
    names = set(load_file(str(gemma3mm["base"] / "model.safetensors")))
    assert any(n.startswith(("language_model.model.layers.", "model.language_model.layers."))
               for n in names)
    assert any(n.startswith(("vision_tower.", "model.vision_tower.")) for n in names)
    adapter = set(load_file(str(gemma3mm["all"] / "adapter_model.safetensors")))
    assert any(".vision_tower." in k for k in adapter)
    assert any(".language_model.layers." in k for k in adapter)


@pytest.mark.parametrize("budget", [None, 6])
def test_adapters_match_peft_on_the_multimodal_model(budget, gemma3mm, prompts):
    llm = make_llm(gemma3mm["base"], enable_lora=True, max_loras=1, max_lora_rank=8,
                   max_num_batched_tokens=budget)
    assert type(llm.llm_engine.model).__name__ == "LlamaForCausalLM"
    check_mixed_batch(llm, gemma3mm["base"], {n: gemma3mm[n] for n in ("all", "qv")}, prompts)


def test_older_adapter_layout(gemma3mm, tmp_path, prompts):
    """transformers < 4.52 named the language model `language_model.model.*`."""
    old = shutil.copytree(gemma3mm["qv"], tmp_path / "old")
    path = str(old / "adapter_model.safetensors")
    tensors = load_file(path)
    save_file({re.sub(r"^base_model\.model\.model\.language_model\.",
                      "base_model.model.language_model.model.", k): v
               for k, v in tensors.items()}, path)
    assert any(k.startswith("base_model.model.language_model.model.") for k in load_file(path))
    llm = make_llm(gemma3mm["base"], enable_lora=True, max_lora_rank=8)
    outs = llm.generate([{"prompt_token_ids": prompts[1]}], GREEDY, use_tqdm=False,
                        lora_request=LoRARequest("old", 1, str(old)))
    check_against_hf(outs, gemma3mm["base"], [gemma3mm["qv"]], [prompts[1]])


def test_vision_only_adapter_is_refused(gemma3mm, tmp_path, prompts):
    only = shutil.copytree(gemma3mm["all"], tmp_path / "vision_only")
    path = str(only / "adapter_model.safetensors")
    save_file({k: v for k, v in load_file(path).items() if ".vision_tower." in k}, path)
    llm = make_llm(gemma3mm["base"], enable_lora=True, max_lora_rank=8)
    with pytest.raises(LoRAError, match="but on the vision tower / projector, which LoRA "
                                        "is not applied to"):
        llm.generate([{"prompt_token_ids": prompts[0]}], GREEDY, use_tqdm=False,
                     lora_request=LoRARequest("vision", 1, str(only)))
    out = llm.generate([{"prompt_token_ids": prompts[0]}], GREEDY, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == GREEDY.max_tokens


def test_without_image_processor_images_are_refused(gemma3mm, prompts):
    """Saved without its image processor (as here), a Gemma 3 checkpoint is served on
    text: image requests are refused, alone (tests/test_gemma3_images.py has them)."""
    from PIL import Image

    llm = make_llm(gemma3mm["base"])
    assert llm.llm_engine.vision is None
    with pytest.raises(ValueError, match="not supported yet by model .*no vision tower"):
        llm.generate({"prompt_token_ids": prompts[0],
                      "multi_modal_data": {"image": Image.new("RGB", (8, 8))}}, GREEDY,
                     use_tqdm=False)
    out = llm.generate([{"prompt_token_ids": prompts[0]}], GREEDY, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == GREEDY.max_tokens
