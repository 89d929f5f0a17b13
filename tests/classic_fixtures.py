"""Tiny random checkpoints of the older decoder families (models/classic.py): their HF
configs name their sizes otherwise (n_embd, ffn_dim, ...), so they are built here rather
than through fixtures._arch_config's Llama-shaped fields."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM

from tests.fixtures import SPECIAL_TOKENS, _reinit_, make_tokenizer

_IDS = dict(bos_token_id=SPECIAL_TOKENS.index("<s>"), eos_token_id=SPECIAL_TOKENS.index("</s>"),
            pad_token_id=SPECIAL_TOKENS.index("<pad>"))
# name -> (config class, its fields): hidden 64, 4 heads (CodeGen 8), 2 layers, MLP 128
CLASSIC_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    # StarCoder 1: multi-query attention, learned positions, tied embeddings
    "gpt_bigcode": ("GPTBigCodeConfig", dict(
        n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=512, multi_query=True,
        activation_function="gelu_pytorch_tanh")),
    # ... without multi_query (q/k/v per head) nor the 1/sqrt(d) scale, exact GELU
    "gpt_bigcode_mha": ("GPTBigCodeConfig", dict(
        n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=512, multi_query=False,
        scale_attn_weights=False, activation_function="gelu", tie_word_embeddings=False)),
    # Falcon-7B: multi-query, attention and MLP side by side on one LayerNorm
    "falcon_7b": ("FalconConfig", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_hidden_size=128,
        max_position_embeddings=512, multi_query=True, parallel_attn=True, bias=False)),
    # Falcon-40B / 180B: 2 KV groups of 2 queries, two LayerNorms (ln_attn, ln_mlp)
    "falcon_40b": ("FalconConfig", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
        ffn_hidden_size=128, max_position_embeddings=512, new_decoder_architecture=True,
        bias=False, rope_theta=1000.0)),
    # Falcon2-11B: the new architecture's KV groups on one LayerNorm
    "falcon_11b": ("FalconConfig", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
        ffn_hidden_size=128, max_position_embeddings=512, new_decoder_architecture=True,
        num_ln_in_parallel_attn=1, bias=False)),
    # one after the other, q/k/v per head, biases (a rotary Falcon-RW)
    "falcon_sequential": ("FalconConfig", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_hidden_size=128,
        max_position_embeddings=512, multi_query=False, parallel_attn=False, bias=True,
        tie_word_embeddings=False)),
    # OPT-125m's shape: learned positions at p + 2, ReLU, biases, LayerNorm before (its
    # lm_head untied: tied, this tiny one's output ignores the adapters)
    "opt": ("OPTConfig", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
        word_embed_proj_dim=64, max_position_embeddings=512, tie_word_embeddings=False)),
    # GPT-J: parallel sublayers on one LayerNorm, rotary on interleaved pairs of the
    # first 8 of 16 head dims, lm_head with a bias
    "gptj": ("GPTJConfig", dict(
        n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=512, rotary_dim=8)),
    # CodeGen: GPT-J's layer, q/k/v fused in 4 shards of 2 heads each (q, v, k in each)
    "codegen": ("CodeGenConfig", dict(
        n_embd=64, n_layer=2, n_head=8, n_inner=128, n_positions=512, n_ctx=512,
        rotary_dim=4)),
    # BLOOM: ALiBi over 6 heads (4 slopes of one sequence, 2 of the next), embeddings
    # LayerNorm'd, q/k/v per head
    "bloom": ("BloomConfig", dict(hidden_size=48, n_layer=2, n_head=6)),
    # MPT: ALiBi over 6 heads with its own slopes (alibi_bias_max 8: HF's MptModel reads
    # none), q/k/v clamped, its softmax_scale, no biases
    "mpt": ("MptConfig", dict(d_model=48, n_layers=2, n_heads=6, max_seq_len=512,
                              attn_config=dict(clip_qkv=0.8, softmax_scale=0.3))),
}


def has_config(arch: str) -> bool:
    """This transformers has the architecture's config class."""
    return hasattr(transformers, CLASSIC_CONFIGS[arch][0])


def make_classic_model(out_dir: Path, arch: str, seed: int, **overrides: Any) -> Path:
    """A tiny random checkpoint of `arch` (CLASSIC_CONFIGS) with the shared tokenizer;
    large-std weights (fixtures._reinit_), LayerNorm weights near 1 whatever their name
    (ln_1, ln_attn ...)."""
    out_dir = Path(out_dir)
    tok = make_tokenizer(out_dir)
    config_class, fields = CLASSIC_CONFIGS[arch]
    config = getattr(transformers, config_class)(
        vocab_size=len(tok), **_IDS, **{**fields, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _reinit_(model, seed, 0.2)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm) and module.weight is not None:
                module.weight.copy_(1.0 + 0.05 * torch.randn(module.weight.shape,
                                                             generator=gen))
    model.eval().save_pretrained(str(out_dir))
    return out_dir
