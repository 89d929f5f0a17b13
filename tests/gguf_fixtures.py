"""GGUF files of the tiny test models, written as llama.cpp's convert_hf_to_gguf.py writes them.

The tensors get llama.cpp's names (the `gguf` package's own name map), Llama's q/k rows are
permuted for llama.cpp's rope layout, Gemma's norms stored as 1 + w, 1-D tensors stay F32
and the matrices are F16 or quantized with `gguf.quants.quantize` (Q8_0 by default); the
metadata holds the config's sizes, the tokenizer (byte-level BPE: tokens, types, merges,
special ids) and the chat template. Needs the `gguf` package (tests skip without it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

# HF model_type -> llama.cpp architecture (the ones these tests write)
GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
              "phi3": "phi3", "gemma2": "gemma2", "gemma3_text": "gemma3",
              "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "minimax_m2": "minimax-m2"}
QK = 32  # Q8_0 / Q4_0 block: inputs per scale


def _permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's rotary halves interleaved in pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _write_tokenizer(writer, hf_dir: Path) -> None:
    """The byte-level BPE of tests/fixtures.py as llama.cpp's "gpt2" vocabulary."""
    import gguf

    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = tok["model"]["vocab"]
    special = {t["id"]: t["content"] for t in tok["added_tokens"]}
    tokens = [""] * (max([*vocab.values(), *special]) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    for i, text in special.items():
        tokens[i] = text
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
             for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = {t: i for i, t in special.items()}
    writer.add_bos_token_id(ids["<s>"])
    writer.add_eos_token_id(ids["</s>"])
    writer.add_pad_token_id(ids["<pad>"])
    writer.add_unk_token_id(ids["<unk>"])
    writer.add_add_bos_token(True)
    template = config.get("chat_template")
    if template is None and (hf_dir / "chat_template.jinja").exists():
        template = (hf_dir / "chat_template.jinja").read_text()
    if template:
        writer.add_chat_template(template)


def _moe_stacked(tensors: dict[str, torch.Tensor]):
    """(HF name, fp32 array) of each tensor, a mixture's experts stacked per layer and
    projection as llama.cpp stores them: experts.{e}.gate_proj.weight [I, H] ->
    experts.gate_proj.weight [E, I, H] (its ffn_gate_exps)."""
    stacks: dict[str, dict[int, np.ndarray]] = {}
    for name, tensor in tensors.items():
        w = tensor.to(torch.float32).numpy()
        head, sep, rest = name.partition(".experts.")
        if not sep:
            yield name, w
            continue
        expert, _, leaf = rest.partition(".")
        stacks.setdefault(f"{head}.experts.{leaf}", {})[int(expert)] = w
    for name, experts in stacks.items():
        yield name, np.stack([experts[e] for e in sorted(experts)])


def write_gguf(hf_dir: Path, out: Path, quant: str = "Q8_0", name: str = "tiny",
               rope_scaling: str | None = None, types: dict[str, str] | None = None) -> Path:
    """The tiny HF checkpoint in `hf_dir` as a GGUF file `out`; `quant`: the matrices' type
    (F16, F32, or a type `gguf.quants.quantize` writes: Q8_0, Q4_0 ...); `rope_scaling`:
    a `rope.scaling.type` key to write (its factor 2); `types`: other types for the
    matrices whose HF names contain a key (a file of mixed types, as llama.cpp's K-quant
    mixes are)."""
    import gguf

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = GGUF_ARCHS[cfg["model_type"]]
    n_layers, n_head, n_kv = (cfg["num_hidden_layers"], cfg["num_attention_heads"],
                              cfg["num_key_value_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(name)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    rope = cfg.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_rope_dimension_count(cfg.get("rotary_dim") or head_dim)
    if rope_scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling))
        writer.add_rope_scaling_factor(2.0)
    if arch in ("qwen3", "gemma2", "gemma3", "qwen2moe", "qwen3moe", "minimax-m2"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(cfg["sliding_window"])
    if arch in ("qwen2moe", "qwen3moe"):  # convert_hf_to_gguf.py's Qwen2MoeModel
        writer.add_expert_count(cfg.get("num_experts") or cfg["num_local_experts"])
        writer.add_expert_used_count(cfg["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if arch == "qwen2moe":
            writer.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    if arch == "minimax-m2":  # convert_hf_to_gguf.py's MiniMaxM2Model
        writer.add_expert_count(cfg["num_local_experts"])
        writer.add_expert_used_count(cfg["num_experts_per_tok"])
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        writer.add_expert_feed_forward_length(cfg["intermediate_size"])
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    _write_tokenizer(writer, hf_dir)
    names = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), n_layers)
    for hf_name, w in _moe_stacked(load_file(str(hf_dir / "model.safetensors"))):
        if cfg.get("tie_word_embeddings") and hf_name == "lm_head.weight":
            continue
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            w = _permute(w, n_head, n_head)
        elif arch == "llama" and hf_name.endswith("k_proj.weight"):
            w = _permute(w, n_head, n_kv)
        elif arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            w = w + 1  # llama.cpp's Gemma norms multiply by w, HF's by 1 + w
        w = w.squeeze()  # Qwen2-MoE's shared_expert_gate [1, H] is stored as [H]
        # MiniMax-M2's router bias: llama.cpp's exp_probs_b.bias
        hf_name = hf_name.replace("e_score_correction_bias", "e_score_correction.bias")
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = f"{names.get_name(base)}.{suffix}"
        qtype = gguf.GGMLQuantizationType[next(
            (t for k, t in (types or {}).items() if k in hf_name), quant)]
        # F32: vectors and the routers (llama.cpp never quantizes ffn_gate_inp); F16: a
        # matrix whose rows are no whole number of blocks (the converter's fallback)
        if w.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32 or ".ffn_gate_inp" in gguf_name:
            writer.add_tensor(gguf_name, w.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16 or w.shape[-1] % QK:
            writer.add_tensor(gguf_name, w.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
