"""Tiny random Llama 4 checkpoints: a Llama4ForCausalLM (text) and a
Llama4ForConditionalGeneration (a vision tower beside the same kind of language model).

Sizes chosen so every Llama 4 feature bites on a short prompt: chunked local attention
with chunks of 4 tokens on the rope layers, one NoPE global layer (the last) with
attention temperature tuning at floor_scale 2, MoE layers (4 experts, top-1, a shared
expert) interleaved with dense ones (intermediate_size_mlp), q/k L2 norm, llama3 rope."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import transformers

from tests.fixtures import SPECIAL_TOKENS, _reinit_, make_tokenizer

CHUNK = 4  # attention_chunk_size: prompts of 10-60 tokens cross many chunks
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


def llama4_text_config(vocab_size: int, **overrides: Any) -> Any:
    from transformers import Llama4TextConfig

    kw: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=48,
        intermediate_size_mlp=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        rms_norm_eps=1e-6, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=2,  # layers 1 and 3 MoE, 0 and 2 dense
        no_rope_layers=[1, 1, 1, 0],  # layer 3 NoPE (global), 0-2 chunked rope layers
        attention_chunk_size=CHUNK, use_qk_norm=True, attn_temperature_tuning=True,
        floor_scale=2, attn_scale=0.5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64},
        bos_token_id=SPECIAL_TOKENS.index("<s>"), eos_token_id=SPECIAL_TOKENS.index("</s>"),
        pad_token_id=SPECIAL_TOKENS.index("<pad>"))
    kw.update(overrides)
    if TRANSFORMERS_MAJOR < 5:  # 4.x ignores rope_parameters: its rope_scaling, rope_theta
        rope = dict(kw.pop("rope_parameters"))
        kw["rope_theta"] = rope.pop("rope_theta")
        kw["rope_scaling"] = rope
    return Llama4TextConfig(**kw)


def fix_hf4_moe_routing() -> None:
    """transformers 4.56's Llama4TextMoe.forward weights the experts' input by
    `router_scores.reshape(-1, 1)`: the scores are [tokens, experts] but the routed input
    is expert-major (hidden_states.repeat(E, 1)), so with more than one token in a
    forward each row gets another token's (or expert's) score; transformers 5 transposes
    them first. The weights are the same in both versions: for HF's reference on 4.x
    (tests only), its forward with transformers 5's line."""
    from transformers.models.llama4 import modeling_llama4 as hf

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_scores, router_logits = self.router(hidden_states)
        routed_in = hidden_states.repeat(router_scores.shape[1], 1)
        routed_in = routed_in * router_scores.transpose(0, 1).reshape(-1, 1)
        routed_out = self.experts(routed_in)
        out = self.shared_expert(hidden_states)
        out.add_(routed_out.reshape(router_scores.shape[1], -1, routed_out.shape[-1]).sum(0))
        return out, router_logits

    hf.Llama4TextMoe.forward = forward


def make_llama4(out_dir: Path, seed: int = 0, **overrides: Any) -> Path:
    """A tiny Llama4ForCausalLM checkpoint (config, safetensors, tokenizer)."""
    from transformers import Llama4ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out_dir)
    torch.manual_seed(seed)
    model = Llama4ForCausalLM(llama4_text_config(len(tok), **overrides)).eval()
    _reinit_(model, seed, 0.2)
    model.save_pretrained(str(out_dir))
    return out_dir


def make_llama4_multimodal(out_dir: Path, seed: int = 0) -> Path:
    """A tiny Llama4ForConditionalGeneration: the language model as above, a random
    one-layer vision tower and projector."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out_dir)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14,
                  vision_output_dim=32, projector_input_dim=32, projector_output_dim=32,
                  pixel_shuffle_ratio=0.5)
    cfg = Llama4Config(text_config=llama4_text_config(len(tok)).to_dict(),
                       vision_config=vision, image_token_index=len(tok) - 1,
                       boi_token_index=len(tok) - 2, eoi_token_index=len(tok) - 3)
    torch.manual_seed(seed)
    model = Llama4ForConditionalGeneration(cfg).eval()
    _reinit_(model, seed, 0.2)
    model.save_pretrained(str(out_dir))
    return out_dir


def copy_tokenizer(src: Path, dst: Path) -> None:
    for f in Path(src).glob("*token*"):
        shutil.copy(f, Path(dst) / f.name)


# ---- Llama4ForConditionalGeneration with images (tests/test_llama4_images.py) ---------

IMAGE_TOKENS = ("<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>",
                "<|tile_x_separator|>", "<|tile_y_separator|>")
TILE = 28  # a tile's side: 4 x 4 patches of 7 pixels, pixel-shuffled to 2 x 2 = 4 rows
ROWS_PER_TILE = 4
MAX_TILES = 4  # the image processor's max_patches: canvases of up to 4 tiles
# Llama 4's template's shape: image parts become <|image|>
IMAGE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<|image|>"
    "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_llama4_images(out_dir: Path, seed: int) -> Path:
    """A tiny Llama4ForConditionalGeneration whose images tile: the language model above,
    a 2-layer vision tower on 28 x 28 tiles (4 x 4 patches, 4 rows a tile after the pixel
    shuffle), every weight drawn with std 0.2, saved with HF's Llama4Processor (up to 4
    tiles an image) and a tokenizer with Llama 4's image tokens."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out_dir)
    tok.add_tokens(list(IMAGE_TOKENS), special_tokens=True)
    tok.chat_template = IMAGE_CHAT_TEMPLATE
    ids = tok.convert_tokens_to_ids
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, image_size=TILE, patch_size=7,
                  vision_output_dim=48, projector_input_dim=48, projector_output_dim=48,
                  pixel_shuffle_ratio=0.5, rope_parameters={"rope_type": "default",
                                                            "rope_theta": 100.0})
    if TRANSFORMERS_MAJOR < 5:
        vision["rope_theta"] = vision.pop("rope_parameters")["rope_theta"]
    cfg = Llama4Config(text_config=llama4_text_config(len(tok)).to_dict(),
                       vision_config=vision, image_token_index=ids("<|patch|>"),
                       boi_token_index=ids("<|image_start|>"),
                       eoi_token_index=ids("<|image_end|>"))
    torch.manual_seed(seed)
    model = Llama4ForConditionalGeneration(cfg).eval()
    _reinit_(model, seed, 0.2)
    model.save_pretrained(str(out_dir))
    # what Llama4ImageProcessor(size=TILE, max_patches=MAX_TILES).save_pretrained writes
    # (HF's processor itself needs torchvision)
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Llama4ImageProcessor", "processor_class": "Llama4Processor",
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "size": {"height": TILE, "width": TILE}, "max_patches": MAX_TILES,
        "resize_to_max_canvas": False, "resample": 2, "rescale_factor": 1 / 255,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    (out_dir / "processor_config.json").write_text(json.dumps({
        "processor_class": "Llama4Processor", "patch_size": 7, "pixel_shuffle_ratio": 0.5}))
    tok.save_pretrained(str(out_dir))
    return out_dir
