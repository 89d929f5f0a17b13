"""A tiny HF-format Mistral checkpoint rewritten in Mistral's own format (params.json,
consolidated.safetensors, tekken.json), as Mistral's repos ship it beside the HF files.

The weights are the HF model's under Mistral's names, with q / k rows put back in the
interleaved rotary order (the inverse of HF's conversion permutation), so serving them
right needs the permutation undone. tekken.json is a byte-level BPE trained here on the
fixtures' corpus, in mistral_common's own file structure (v7: [SYSTEM_PROMPT] ...), of
exactly the tiny models' 512 ids, so the HF model's embeddings serve it.
"""

from __future__ import annotations

import base64
import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.fixtures import _CORPUS, TOKENIZER_VOCAB_SIZE

NUM_SPECIAL = 32
# mistral_common's legacy ranks 0..19 (<unk>, <s>, </s>, [INST] ... [TOOL_CONTENT]), then
# Magistral's reasoning tags
_SPECIAL = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]",
            "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]",
            "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]", "[THINK]", "[/THINK]")
_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
            r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _bpe_merges(corpus: str, count: int) -> list[bytes]:
    """`count` byte-pair merges learned greedily from the corpus' words."""
    words = Counter(tuple(bytes([b]) for b in w.encode())
                    for w in re.findall(r" ?\w+| ?[^\w\s]+|\s+", corpus))
    merges: list[bytes] = []
    while len(merges) < count:
        pairs: Counter = Counter()
        for word, n in words.items():
            for a, b in zip(word, word[1:]):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        merges.append(a + b)
        merged: Counter = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


def write_tekken(out: Path) -> Path:
    """tekken.json (v7) of TOKENIZER_VOCAB_SIZE ids: NUM_SPECIAL control tokens, then the
    256 bytes and the learned merges."""
    pieces = [bytes([i]) for i in range(256)]
    pieces += _bpe_merges(_CORPUS, TOKENIZER_VOCAB_SIZE - NUM_SPECIAL - 256)
    vocab = [{"rank": i, "token_bytes": base64.b64encode(p).decode(),
              "token_str": p.decode("utf-8", errors="replace")} for i, p in enumerate(pieces)]
    special = [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(_SPECIAL)]
    data = {"config": {"pattern": _PATTERN, "num_vocab_tokens": len(vocab),
                       "default_vocab_size": NUM_SPECIAL + len(vocab),
                       "default_num_special_tokens": NUM_SPECIAL, "version": "v7"},
            "vocab": vocab, "special_tokens": special, "version": 1, "type": "Tekken"}
    out.write_text(json.dumps(data))
    return out


def to_interleaved(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """HF's half-split q / k rows back to Mistral's interleaved order (the inverse of
    HF's convert_mistral_weights_to_hf permutation)."""
    head_dim = w.shape[0] // num_heads
    return (w.reshape(num_heads, 2, head_dim // 2, w.shape[1]).transpose(1, 2)
            .reshape(w.shape[0], w.shape[1]))


_NAMES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
          "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
          "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
          "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
          "post_attention_layernorm": "ffn_norm"}


def _mistral_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "tok_embeddings.weight"
    if name == "model.norm.weight":
        return "norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
    assert m is not None and m.group(2) in _NAMES, name
    return f"layers.{m.group(1)}.{_NAMES[m.group(2)]}.weight"


def write_mistral_format(hf_dir: Path, out: Path, *, config_json: bool = False) -> Path:
    """`hf_dir`'s model in Mistral's format in `out` (params.json, consolidated.safetensors,
    tekken.json); `config_json`: the HF config.json beside them too."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((hf_dir / "config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    tensors = {}
    for name, t in load_file(str(hf_dir / "model.safetensors")).items():
        if ".q_proj." in name:
            t = to_interleaved(t, heads)
        elif ".k_proj." in name:
            t = to_interleaved(t, kv_heads)
        tensors[_mistral_name(name)] = t.contiguous()
    save_file(tensors, str(out / "consolidated.safetensors"))
    # transformers 5's rope_parameters; 4.x's rope_scaling (rope_theta apart)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = rope.get("rope_theta") or cfg.get("rope_theta")
    params = {"dim": cfg["hidden_size"], "n_layers": cfg["num_hidden_layers"],
              "head_dim": cfg["head_dim"], "hidden_dim": cfg["intermediate_size"],
              "n_heads": heads, "n_kv_heads": kv_heads, "norm_eps": cfg["rms_norm_eps"],
              "vocab_size": cfg["vocab_size"], "rope_theta": theta,
              "max_position_embeddings": cfg["max_position_embeddings"]}
    if rope.get("rope_type", rope.get("type")) == "yarn":  # Mistral's names (beta: HF's beta_fast ...)
        params["yarn"] = {"factor": rope["factor"], "beta": rope["beta_fast"],
                          "alpha": rope["beta_slow"], "original_max_position_embeddings":
                          rope["original_max_position_embeddings"]}
    (out / "params.json").write_text(json.dumps(params))
    write_tekken(out / "tekken.json")
    if config_json:
        (out / "config.json").write_text(json.dumps(cfg))
    return out
