"""A tiny random Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration), Qwen2-VL or Qwen3-VL, its image
processor and tokenizer (with Qwen's vision tokens and a Qwen-VL-style chat template),
PEFT adapters on it, and HF transformers (+ PEFT) as the reference: the ground truth of
tests/test_qwen2_vl.py and tests/test_qwen3_vl.py.

HF's Qwen2VLProcessor needs torchvision (its video processor), which this environment
lacks: the reference prompt is expanded here by its rule (each `<|image_pad|>` becomes
grid_t * grid_h * grid_w / merge_size^2 of them, the grid from HF's image processor)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

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

VISION = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
ASK = f"USER: {IMAGE}What is this? ASSISTANT:"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}" + IMAGE +
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tiny_qwen_vl(out: Path, seed: int, qwen25: bool = True) -> Path:
    """A 2-layer Qwen2 language model (head_dim 16, mrope_section [2, 3, 3]) behind a
    3-block vision tower on 4-pixel patches (Qwen2.5-VL: windows of 16 pixels, 2 x 2
    merge blocks, block 1 attending to the whole image); weights std 0.2."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
    )

    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    tok.add_special_tokens({"additional_special_tokens": VISION})
    tok.chat_template = CHAT_TEMPLATE
    ids = dict(zip(("vision_start_token_id", "image_token_id", "vision_end_token_id",
                    "video_token_id"), tok.convert_tokens_to_ids(VISION), strict=True))
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1,
                eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3]})
    if int(transformers.__version__.split(".")[0]) < 5:  # 4.x: the sections in rope_scaling
        del text["rope_parameters"]
        text.update(rope_theta=10000.0,
                    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    if qwen25:
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2,
                      patch_size=4, temporal_patch_size=2, spatial_merge_size=2,
                      window_size=16, fullatt_block_indexes=[1], out_hidden_size=64)
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    else:
        vision = dict(depth=3, embed_dim=32, mlp_ratio=2, num_heads=2, hidden_size=64,
                      patch_size=4, temporal_patch_size=2, spatial_merge_size=2)
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        model = Qwen2VLForConditionalGeneration(cfg)
    cfg.tie_word_embeddings = False
    torch.manual_seed(seed)
    model = model.eval()
    _reinit_(model, seed, 0.2)
    model.save_pretrained(str(out))
    Qwen2VLImageProcessor(size={"shortest_edge": 64, "longest_edge": 64 * 64}, patch_size=4,
                          merge_size=2, temporal_patch_size=2).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def make_tiny_qwen3_vl(out: Path, seed: int, moe: bool = False) -> Path:
    """A 3-layer Qwen3 language model (head_dim 16, q/k norm, interleaved mrope_section
    [2, 3, 3]) behind a 3-block Qwen3-VL tower on 4-pixel patches (a 4 x 4 learned
    position table, 2 x 2 merge blocks) with DeepStack from blocks 0 and 1 into the
    decoder's layers 0 and 1; weights std 0.2. `moe`: a Qwen3-VL-MoE language model, 4
    experts of size 48 (so neither of the checkpoint's expert layouts is square) top-2 in
    layers 0 and 2, layer 1 a dense MLP (`mlp_only_layers`)."""
    import transformers
    from transformers import Qwen2VLImageProcessor

    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    tok.add_special_tokens({"additional_special_tokens": VISION})
    tok.chat_template = CHAT_TEMPLATE
    ids = dict(zip(("vision_start_token_id", "image_token_id", "vision_end_token_id",
                    "video_token_id"), tok.convert_tokens_to_ids(VISION), strict=True))
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1,
                eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    if moe:
        text.update(moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                    decoder_sparse_step=1, mlp_only_layers=[1])
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64,
                  num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
    name = "Qwen3VLMoe" if moe else "Qwen3VL"
    cfg = getattr(transformers, f"{name}Config")(text_config=text, vision_config=vision,
                                                  **ids)
    cfg.tie_word_embeddings = False
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}ForConditionalGeneration")(cfg).eval()
    _reinit_(model, seed, 0.2)
    model.save_pretrained(str(out))
    Qwen2VLImageProcessor(size={"shortest_edge": 64, "longest_edge": 64 * 64}, patch_size=4,
                          merge_size=2, temporal_patch_size=2).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def hf_inputs(base: Path, prompt: str, images: list, add_special_tokens: bool = True
              ) -> dict[str, torch.Tensor]:
    """The prompt's ids with each image's pad expanded (Qwen2VLProcessor's rule), the
    pixels, image_grid_thw and mm_token_type_ids, from HF's tokenizer and image processor."""
    tok = tokenizer(str(base))
    ids = tok(prompt, add_special_tokens=add_special_tokens).input_ids
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    out: dict[str, torch.Tensor] = {}
    if images:
        out = dict(image_processor(str(base))(images=images, return_tensors="pt"))
        counts = iter((out["image_grid_thw"].prod(-1) // 4).tolist())
        ids = [x for t in ids for x in ([pad] * next(counts) if t == pad else [t])]
    out["input_ids"] = torch.tensor([ids])
    out["mm_token_type_ids"] = (out["input_ids"] == pad).int()
    return out


def check(outs, base: Path, jobs: list[tuple[str, list, Path | None]],
          add_special_tokens: bool = True) -> None:
    """check_jobs with this model's hf_inputs."""
    check_jobs(outs, base, jobs, hf_inputs, add_special_tokens)
