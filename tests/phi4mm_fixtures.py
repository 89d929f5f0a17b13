"""A tiny random Phi-4-multimodal (transformers' native Phi4MultimodalForCausalLM: a Phi-3
language model, the SigLIP image embedding with its HD crops, the conformer audio
embedding) with tiny PEFT adapters in the checkpoint's layout (`vision-lora/`,
`speech-lora/`: PEFT folders on the language model's fused qkv_proj / gate_up_proj and
o_proj / down_proj), and HF's model (+ PEFT) as the reference of tests/test_phi4mm.py.

The vision side keeps the real model's token arithmetic: 32 x 32 patches per crop (here 64
pixels of 2), pooled to 16 x 16, so HF's processor's hard-coded 256 + 16 count holds."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from tests.fixtures import _reinit_, make_tokenizer
from tests.multimodal_fixtures import with_peft, without_torchvision

IMAGE, AUDIO = "<|image|>", "<|audio|>"
CROP = 64
LM = r"model\.layers\.\d+\."  # the language model's modules (not the towers')


def make_tiny_phi4mm(out: Path, seed: int) -> dict[str, Path]:
    """{"base": the checkpoint, "vision": its vision-lora (r 8), "speech": its speech-lora
    (r 320, the checkpoint's rank), "user": a user adapter (r 4)}."""
    from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM

    base = out / "base"
    base.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(base)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE, AUDIO]})
    image_id, audio_id = tok.convert_tokens_to_ids([IMAGE, AUDIO])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=2, image_size=CROP, patch_size=2, crop_size=CROP,
                  image_token_id=image_id)
    audio = dict(hidden_size=32, intermediate_size=48, num_blocks=2, num_attention_heads=2,
                 ext_pw_out_channel=32, depthwise_separable_out_channel=32,
                 depthwise_seperable_out_channel=32,  # (transformers 4.x's spelling)
                 nemo_conv_channels=16, input_size=80, time_reduction=8,
                 bias_max_distance=50, chunk_size=-1, left_chunk=18,
                 audio_token_id=audio_id)
    cfg = Phi4MultimodalConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        original_max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
        pad_token_id=3, tie_word_embeddings=True,
        # Phi-4-mini's rope: longrope over 3/4 of each head (its short factors here)
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.75,
                         "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                         "long_factor": [1.5, 2.0, 3.0, 4.0, 6.0, 8.0]},
        vision_config=vision, audio_config=audio)
    torch.manual_seed(seed)
    model = Phi4MultimodalForCausalLM(cfg).eval()
    _reinit_(model, seed, 0.2)
    model.save_pretrained(str(base))
    tok.save_pretrained(str(base))
    (base / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Phi4MultimodalImageProcessor",
        "size": {"height": CROP, "width": CROP}, "patch_size": 2, "dynamic_hd": 36,
        "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "rescale_factor": 1 / 255,
        "do_rescale": True, "do_normalize": True, "resample": 3}))
    return {"base": base,
            "vision": _adapter(base, base / "vision-lora", 8, seed + 1,
                               LM + "(self_attn.qkv_proj|self_attn.o_proj|mlp.gate_up_proj|"
                               "mlp.down_proj)"),
            "speech": _adapter(base, base / "speech-lora", 320, seed + 2,
                               LM + "(self_attn.qkv_proj|mlp.gate_up_proj|mlp.down_proj)"),
            "user": _adapter(base, out / "user", 4, seed + 3, LM + "(self_attn.o_proj)")}


def _adapter(base: Path, out: Path, r: int, seed: int, targets: str) -> Path:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(hf_model(str(base)), LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                # the same size of update at any rank (B A sums r products)
                p.copy_(0.3 * (8 / r) ** 0.25 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(out))
    return out


def hf_model(base: str) -> torch.nn.Module:
    from transformers import Phi4MultimodalForCausalLM

    return Phi4MultimodalForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


@functools.lru_cache(maxsize=8)
def hf_reference(base: str, adapter: str | None) -> torch.nn.Module:
    return with_peft(hf_model(base), adapter)


def hf_image_token_count(height: int, width: int) -> int:
    """Phi4MultimodalImageProcessor.get_number_of_image_tokens (HF's own count) for the
    tiny checkpoint's crops. Its module imports torchvision (not installed) for the
    resize it never calls here: it is loaded with that import stubbed."""
    module = without_torchvision(
        "models/phi4_multimodal/image_processing_phi4_multimodal.py",
        "transformers.models.phi4_multimodal._image_processing_no_torchvision")
    proc = module.Phi4MultimodalImageProcessor(size={"height": CROP, "width": CROP},
                                               patch_size=2)
    return proc.get_number_of_image_tokens(height, width, {})
