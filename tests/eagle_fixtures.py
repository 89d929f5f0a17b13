"""Tiny random EAGLE heads on disk in the public formats, and a reference of their
drafting math in plain torch (from the formulas, not loraplex's code).

EAGLE-1 (yuhuili/EAGLE-LLaMA3-Instruct-8B's layout): a Llama config of one layer,
pytorch_model.bin with fc.weight / fc.bias, layers.0.* (no input_layernorm) and
embed_tokens (the public heads ship the target's copy; here a random one, which must
not be loaded: the target's is used), no lm_head (the target's). EAGLE-3 (yuhuili/EAGLE3-LLaMA3.1-Instruct-8B's):
architectures LlamaForCausalLMEagle3, draft_vocab_size, pytorch_model.bin with
midlayer.*, fc.weight [H, 3H], norm.weight, lm_head.weight [draft vocab, H], d2t, t2d;
or the speculators format (RedHatAI's): config with transformer_layer_config and
speculators_model_type "eagle3", model.safetensors with layers.0.*.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def _layer_config(target: Path, **over) -> dict:
    cfg = json.loads((target / "config.json").read_text())
    keep = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "rms_norm_eps", "vocab_size", "max_position_embeddings", "hidden_act",
            "rope_theta", "rope_parameters", "head_dim")
    out = {k: cfg[k] for k in keep if k in cfg}
    out.update({"model_type": "llama", "num_hidden_layers": 1, **over})
    return out


def _layer_tensors(prefix: str, h: int, in_dim: int, heads: int, kv_heads: int, hd: int,
                   inter: int, gen: torch.Generator, std: float) -> dict[str, torch.Tensor]:
    def r(*shape: int) -> torch.Tensor:
        return std * torch.randn(*shape, generator=gen)

    return {
        f"{prefix}.self_attn.q_proj.weight": r(heads * hd, in_dim),
        f"{prefix}.self_attn.k_proj.weight": r(kv_heads * hd, in_dim),
        f"{prefix}.self_attn.v_proj.weight": r(kv_heads * hd, in_dim),
        f"{prefix}.self_attn.o_proj.weight": r(h, heads * hd),
        f"{prefix}.mlp.gate_proj.weight": r(inter, h),
        f"{prefix}.mlp.up_proj.weight": r(inter, h),
        f"{prefix}.mlp.down_proj.weight": r(h, inter),
        f"{prefix}.post_attention_layernorm.weight": 1 + 0.1 * torch.randn(h, generator=gen),
    }


def make_eagle1_head(target: Path, out: Path, seed: int = 0, std: float = 0.2,
                     fc_bias: bool = True, **over) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    cfg = _layer_config(target, architectures=["LlamaForCausalLM"], **over)
    (out / "config.json").write_text(json.dumps(cfg))
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // heads
    gen = torch.Generator().manual_seed(seed)
    t = _layer_tensors("layers.0", h, h, heads, cfg["num_key_value_heads"], hd,
                       cfg["intermediate_size"], gen, std)
    t["fc.weight"] = std * torch.randn(h, 2 * h, generator=gen)
    if fc_bias:
        t["fc.bias"] = std * torch.randn(h, generator=gen)
    t["embed_tokens.weight"] = torch.randn(cfg["vocab_size"], h, generator=gen)
    torch.save(t, out / "pytorch_model.bin")
    return out


def make_eagle3_head(target: Path, out: Path, seed: int = 0, std: float = 0.2,
                     draft_vocab: int | None = None, speculators: bool = False,
                     aux_ids: list[int] | None = None, **over) -> Path:
    """`draft_vocab`: the head's vocabulary, the target's first ids but every third one
    (d2t maps them); None: the target's whole vocabulary (still through a d2t of zeros)."""
    out.mkdir(parents=True, exist_ok=True)
    layer = _layer_config(target, **over)
    vocab, h = layer["vocab_size"], layer["hidden_size"]
    dv = draft_vocab or vocab
    top = {"draft_vocab_size": dv}
    if aux_ids is not None:
        top["eagle_aux_hidden_state_layer_ids"] = aux_ids
    if speculators:
        cfg = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
               "transformer_layer_config": layer, "norm_before_residual": True, **top}
    else:
        cfg = {**layer, "architectures": ["LlamaForCausalLMEagle3"], **top}
    (out / "config.json").write_text(json.dumps(cfg))
    heads = layer["num_attention_heads"]
    hd = layer.get("head_dim") or h // heads
    gen = torch.Generator().manual_seed(seed)
    prefix = "layers.0" if speculators else "midlayer"
    t = _layer_tensors(prefix, h, 2 * h, heads, layer["num_key_value_heads"], hd,
                       layer["intermediate_size"], gen, std)
    t[f"{prefix}.input_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=gen)
    t[f"{prefix}.hidden_norm.weight"] = 1 + 0.1 * torch.randn(h, generator=gen)
    t["fc.weight"] = std * torch.randn(h, 3 * h, generator=gen)
    t["norm.weight"] = 1 + 0.1 * torch.randn(h, generator=gen)
    t["lm_head.weight"] = std * torch.randn(dv, h, generator=gen)
    ids = list(range(vocab)) if dv == vocab else [i for i in range(vocab) if i % 3 != 2][:dv]
    t["d2t"] = torch.tensor(ids) - torch.arange(dv)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[ids] = True
    t["t2d"] = t2d
    if speculators:
        save_file({k: v.contiguous() for k, v in t.items()}, str(out / "model.safetensors"))
    else:
        torch.save(t, out / "pytorch_model.bin")
    return out


# ---- the reference ----------------------------------------------------------------------
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [T, heads, d] rotated by positions 0..T-1 (halves, as Llama)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(x.shape[0], dtype=torch.float64)[:, None] * inv[None]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None].float()
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None].float()
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _layer(t: dict, p: str, x: torch.Tensor, residual: torch.Tensor, cfg: dict
           ) -> torch.Tensor:
    """One Llama layer over rows 0..T-1 (causal): residual + attn(x), then the MLP."""
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    h = cfg["hidden_size"]
    hd = cfg.get("head_dim") or h // heads
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta",
                                                                            10000.0)
    n = x.shape[0]
    q = _rope((x @ t[f"{p}.self_attn.q_proj.weight"].T).view(n, heads, hd), theta)
    k = _rope((x @ t[f"{p}.self_attn.k_proj.weight"].T).view(n, kv, hd), theta)
    v = (x @ t[f"{p}.self_attn.v_proj.weight"].T).view(n, kv, hd)
    k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / hd ** 0.5
    scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
    attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, heads * hd)
    hid = residual + attn @ t[f"{p}.self_attn.o_proj.weight"].T
    m = _rms(hid, t[f"{p}.post_attention_layernorm.weight"], cfg["rms_norm_eps"])
    act = torch.nn.functional.silu(m @ t[f"{p}.mlp.gate_proj.weight"].T) * (
        m @ t[f"{p}.mlp.up_proj.weight"].T)
    return hid + act @ t[f"{p}.mlp.down_proj.weight"].T


def reference_drafts(method: str, head: Path, embed: torch.Tensor, target_lm_head: torch.Tensor,
                     tokens: list[int], features: torch.Tensor, k: int,
                     given: list[int] | None = None) -> tuple[list[int], list[torch.Tensor]]:
    """The head's k greedy drafts after `tokens` (n of them), from the target's features
    of positions 0..n-2 ([n - 1, F]): rows p = 0..n-2 read token p + 1 and feature p, each
    draft row the draft before it and the row before's output; every forward over all
    rows (no cache). With `given`: those drafts fed instead of the argmax. Returns the
    drafts and the logits each came from ([target vocab] each)."""
    raw = json.loads((head / "config.json").read_text())
    cfg = raw.get("transformer_layer_config") or raw
    files = list(head.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file
        t = load_file(str(files[0]))
    else:
        t = torch.load(head / "pytorch_model.bin", weights_only=True)
    t = {n.replace("midlayer.", "layers.0."): v.float() for n, v in t.items()}
    eps = cfg["rms_norm_eps"]
    ids = list(tokens[1:])
    if method == "eagle3":
        feats = features @ t["fc.weight"].T
    else:
        feats = features
    drafts: list[int] = []
    all_logits: list[torch.Tensor] = []
    for j in range(k):
        e = embed[torch.tensor(ids)]
        if method == "eagle":
            x = torch.cat([e, feats], -1) @ t["fc.weight"].T + t.get("fc.bias", 0)
            out = _layer(t, "layers.0", x, x, cfg)
            logits = out[-1] @ target_lm_head.T
        else:
            normed = _rms(feats, t["layers.0.hidden_norm.weight"], eps)
            res = normed if raw.get("norm_before_residual") else feats
            x = torch.cat([_rms(e, t["layers.0.input_layernorm.weight"], eps), normed], -1)
            out = _layer(t, "layers.0", x, res, cfg)
            small = _rms(out[-1], t["norm.weight"], eps) @ t["lm_head.weight"].T
            logits = torch.full((embed.shape[0],), float("-inf"))
            logits[torch.arange(small.shape[0]) + t["d2t"].long()] = small
        token = int(logits.argmax()) if given is None else given[j]
        drafts.append(token)
        all_logits.append(logits)
        ids.append(token)
        feats = torch.cat([feats, out[-1:]])
    return drafts, all_logits


@torch.no_grad()
def hf_features(model: torch.nn.Module, tokens: list[int], aux_ids: list[int] | None
                ) -> torch.Tensor:
    """The HF (+ PEFT) target's features of every position of `tokens`: its final hidden
    state after the norm (EAGLE-1), or the inputs of layers aux_ids concatenated in layer
    order (EAGLE-3), caught by hooks on its modules."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kept: dict[int, torch.Tensor] = {}
    hooks = []
    if aux_ids is None:
        hooks.append(base.model.norm.register_forward_hook(
            lambda m, a, out: kept.__setitem__(-1, out[0])))
    else:
        for i in sorted(set(aux_ids)):
            hooks.append(base.model.layers[i].register_forward_pre_hook(
                lambda m, a, kw, i=i: kept.__setitem__(i, (a[0] if a else
                                                           kw["hidden_states"])[0]),
                with_kwargs=True))
    try:
        model(input_ids=torch.tensor([tokens]))
    finally:
        for h in hooks:
            h.remove()
    return torch.cat([kept[i] for i in sorted(kept)], dim=-1).float()
