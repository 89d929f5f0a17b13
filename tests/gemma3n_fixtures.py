"""A tiny random Gemma 3n text model, saved as Gemma3nForCausalLM or, with its weights
under model.language_model.*, as Gemma3nForConditionalGeneration (stand-in tower tensors:
HF's MobileNetV5 tower needs timm).

Five layers, sliding sliding full sliding full (window 6); the last two reuse layers 1's
and 2's K/V (KV sharing, where HF's reference runs it: HF_KV_SHARING); AltUp over 3 streams, LAuReL of rank 8, per-layer embeddings of
8 (the last 4 token ids past their table, where HF runs them), MLP widths per layer, activation sparsity on
layers 0 and 2; final logits capped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.fixtures import SPECIAL_TOKENS, _reinit_, make_tokenizer

LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention",
               "sliding_attention", "full_attention"]
WINDOW = 6


def _hf_kv_sharing() -> bool:
    """Whether HF's Gemma 3n shares K/V in a forward without a cache (the reference
    logprobs'): transformers 5 (its config's kv_sharing_modes). 4.56's reusing layers then
    compute K/V of their own, with weights the cached path never uses; its
    Gemma3nForCausalLM also indexes the per-layer table with every id (no row 0 for the
    ids past it)."""
    try:
        from transformers import Gemma3nTextConfig
    except ImportError:
        return False
    return hasattr(Gemma3nTextConfig, "kv_sharing_modes")


HF_KV_SHARING = _hf_kv_sharing()
PLE_MISSING = 4 if HF_KV_SHARING else 0  # token ids past vocab_size_per_layer_input


def gemma3n_config(vocab_size: int, **overrides):
    from transformers import Gemma3nTextConfig

    fields = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=[96, 80, 96, 112, 96],
        num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        layer_types=list(LAYER_TYPES), sliding_window=WINDOW, final_logit_softcapping=20.0,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=vocab_size - PLE_MISSING,
        num_kv_shared_layers=2 if HF_KV_SHARING else 0, altup_num_inputs=3, altup_active_idx=0, laurel_rank=8,
        activation_sparsity_pattern=[0.95, 0.0, 0.6, 0.0, 0.0],
        max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1e6,
        rope_local_base_freq=1e4,
        bos_token_id=SPECIAL_TOKENS.index("<s>"), eos_token_id=SPECIAL_TOKENS.index("</s>"),
        pad_token_id=SPECIAL_TOKENS.index("<pad>"), tie_word_embeddings=True)
    return Gemma3nTextConfig(**{**fields, **overrides})


@torch.no_grad()
def make_gemma3n(out_dir: Path, seed: int = 0, **overrides) -> Path:
    """The tiny Gemma3nForCausalLM checkpoint (fp32, random weights of std 0.1, AltUp's
    output scale among them). `overrides`: other config fields."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    tok = make_tokenizer(out_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(gemma3n_config(len(tok), **overrides),
                                             dtype=torch.float32)
    _reinit_(model, seed, 0.1)
    model.eval()
    model.save_pretrained(str(out_dir))
    return out_dir


@torch.no_grad()
def as_conditional_generation(text_dir: Path, out_dir: Path) -> Path:
    """The same text weights as Gemma3nForConditionalGeneration saves them
    (model.language_model.*), its config a Gemma3nConfig around the text one, and a
    stand-in tensor for each tower and embedder (never loaded on text)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, Gemma3nConfig

    out_dir = Path(out_dir)
    make_tokenizer(out_dir)
    text = AutoConfig.from_pretrained(str(text_dir))
    config = Gemma3nConfig(text_config=text.to_dict())
    config.architectures = ["Gemma3nForConditionalGeneration"]
    config.save_pretrained(str(out_dir))
    weights = {k.replace("model.", "model.language_model.", 1): v
               for k, v in load_file(str(Path(text_dir) / "model.safetensors")).items()
               if not k.startswith("lm_head.")}
    for name in ("vision_tower.timm_model.conv_stem.conv.weight",
                 "audio_tower.subsample_conv_projection.input_proj_linear.weight",
                 "embed_vision.embedding.weight", "embed_audio.embedding_projection.weight"):
        weights[f"model.{name}"] = torch.zeros(4, 4)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def as_conditional_adapter(adapter_dir: Path, out_dir: Path) -> Path:
    """A text model's PEFT adapter under the names PEFT gives it on the whole model
    (model.language_model.layers.N...)."""
    from safetensors.torch import load_file, save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    save_file({k.replace("base_model.model.model.", "base_model.model.model.language_model.",
                         1): v for k, v in weights.items()},
              str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg))
    return out_dir
