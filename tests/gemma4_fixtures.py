"""A tiny random Gemma 4 text model (transformers >= 5.5), saved as Gemma4ForCausalLM or,
with its weights under model.language_model.*, as Gemma4ForConditionalGeneration.

Four layers, sliding / full alternating (window 6), the full ones wider (head_dim 32, one
KV head, values = keys) with the proportional rope on a quarter of their dimensions;
the last two layers reuse the first two's K/V (KV sharing) with a double-wide MLP;
per-layer embeddings of 8; experts beside the MLP (4, top 2); final logits capped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.fixtures import SPECIAL_TOKENS, _reinit_, make_tokenizer

LAYER_TYPES = ["sliding_attention", "full_attention"] * 2
WINDOW = 6


def gemma4_config(vocab_size: int, **overrides):
    from transformers import Gemma4TextConfig

    fields = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, layer_types=list(LAYER_TYPES), sliding_window=WINDOW,
        final_logit_softcapping=20.0, hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=vocab_size, attention_k_eq_v=True, num_kv_shared_layers=2,
        use_double_wide_mlp=True, enable_moe_block=True, num_experts=4, top_k_experts=2,
        moe_intermediate_size=24, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                               "rope_theta": 1e6}},
        bos_token_id=SPECIAL_TOKENS.index("<s>"), eos_token_id=SPECIAL_TOKENS.index("</s>"),
        pad_token_id=SPECIAL_TOKENS.index("<pad>"), tie_word_embeddings=True)
    return Gemma4TextConfig(**{**fields, **overrides})


@torch.no_grad()
def make_gemma4(out_dir: Path, seed: int = 0, **overrides) -> Path:
    """The tiny Gemma4ForCausalLM checkpoint (fp32, random weights of std 0.1: varied
    enough that adapters change the greedy tokens; layer scalars and router scales off 1,
    so they matter). `overrides`: config fields other than these (E2B's shape: no experts,
    a v_proj on every layer)."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    tok = make_tokenizer(out_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(gemma4_config(len(tok), **overrides),
                                             dtype=torch.float32)
    _reinit_(model, seed, 0.1)
    gen = torch.Generator().manual_seed(seed + 1)
    for layer in model.model.layers:
        layer.layer_scalar.copy_(0.8 + 0.4 * torch.rand(1, generator=gen))
        if layer.enable_moe_block:
            for p in (layer.router.scale, layer.router.per_expert_scale):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
    model.eval()
    model.save_pretrained(str(out_dir))
    return out_dir


@torch.no_grad()
def as_conditional_generation(text_dir: Path, out_dir: Path) -> Path:
    """The same text weights in HF's Gemma4ForConditionalGeneration (their names
    model.language_model.*) beside tiny random vision and audio towers, saved as HF saves
    it."""
    from transformers import AutoConfig, AutoModelForCausalLM, Gemma4Config
    from transformers import Gemma4ForConditionalGeneration as HFGemma4

    out_dir = Path(out_dir)
    make_tokenizer(out_dir)
    config = Gemma4Config(
        text_config=AutoConfig.from_pretrained(str(text_dir)).to_dict(),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                           patch_size=4, pooling_kernel_size=2, position_embedding_size=64),
        audio_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          subsampling_conv_channels=[8, 4], output_proj_dims=32,
                          conv_kernel_size=3))
    model = HFGemma4(config)
    text = AutoModelForCausalLM.from_pretrained(str(text_dir), dtype=torch.float32)
    model.model.language_model.load_state_dict(text.model.state_dict())
    model.save_pretrained(str(out_dir))
    return out_dir
