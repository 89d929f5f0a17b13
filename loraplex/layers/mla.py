"""Multi-head latent attention (MLA: DeepSeek-V2, DeepSeek-V3, Kimi-K2, Moonlight), as
HF's DeepseekV2Attention / DeepseekV3Attention compute it:

    q      = q_proj(x)  or  q_b_proj(rms(q_a_proj(x)))          [T, H, nope + rope]
    c, kr  = kv_a_proj_with_mqa(x) split [kv_lora_rank, rope]   the latent, one rope key
    kn, v  = kv_b_proj(rms(c)) per head split [nope, v]
    q_rope, kr rotated (kr shared by every head); the nope parts are not
    out    = o_proj(softmax(scale q . [kn, kr]) v)

scale = (nope + rope)^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (HF's
yarn_apply_mscale). The latent norms use eps 1e-6 whatever rms_norm_eps says (HF's).

The paged cache holds the latent, as vLLM's: per token and layer the normalized c and
the rotated kr, [c, kr] of kv_lora_rank + rope values, one "KV head" that every head
reads (MQA), and the same tensor serves as V (Attention's values_are_keys: nothing is
stored twice). Attention runs in the absorbed form, for prefill and decode alike: with
W_UK_h / W_UV_h head h's K and V rows of kv_b_proj,

    q_latent_h = W_UK_h^T q_nope_h                       [T, H, kv_lora_rank]
    o_h        = softmax(scale [q_latent_h, q_rope_h] . [c, kr]) [c, kr]   (rope cut)
    out_h      = W_UV_h o_h                              [T, H, v]

since q_nope_h . (W_UK_h c) = (W_UK_h^T q_nope_h) . c. vLLM decompresses K and V for
prefill instead (fewer FLOPs for long prompts: each key is then nope + rope wide, not
kv_lora_rank + rope); one form here keeps a later chunk of a prompt, or a prefix-cache
hit, attending over cached latents exactly as its own tokens and as decode do. LoRA on
kv_b_proj is absorbed the same way (layers/mla_lora.py); every other projection is a
plain module under its HF name, before or after the cache, so LoRA adapters target each
of them as usual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from loraplex.layers.attention import Attention
from loraplex.layers.linear import make_linear
from loraplex.layers.mla_lora import kv_b_lora
from loraplex.layers.norm import RMSNorm
from loraplex.layers.quantization import QuantConfig, QuantLinear
from loraplex.layers.rotary import RotaryEmbedding

LATENT_NORM_EPS = 1e-6  # HF builds q_a_layernorm / kv_a_layernorm with the default eps


@dataclass(frozen=True)
class MLAArgs:
    q_lora_rank: int | None  # None: one q_proj (DeepSeek-V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    scale: float  # the softmax scale (with YaRN's mscale^2)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values per token and layer in the cache: [c, kr]."""
        return self.kv_lora_rank + self.qk_rope_head_dim


def mla_softmax_scale(qk_head_dim: int, rope_scaling: dict | None) -> float:
    """qk_head_dim^-0.5, times mscale^2 where a scaled rope names mscale_all_dim (HF's
    yarn_apply_mscale: DeepSeek scales every dimension's scores, not only the rotated)."""
    scale = qk_head_dim ** -0.5
    params = rope_scaling or {}
    m_all = params.get("mscale_all_dim")
    if params.get("rope_type", params.get("type", "default")) != "default" and m_all:
        factor = float(params["factor"])
        mscale = 1.0 if factor <= 1 else 0.1 * float(m_all) * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


def _names(prefix: str, leaf: str) -> tuple[str, ...]:
    return (f"{prefix}.{leaf}",)


class MLAAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mla: MLAArgs, bias: bool,
                 quant: QuantConfig | None, rotary: RotaryEmbedding, prefix: str) -> None:
        """`bias`: attention_bias (on q_a_proj, kv_a_proj_with_mqa and o_proj, as HF)."""
        super().__init__()
        self.num_heads, self.mla = num_heads, mla
        q_out = num_heads * mla.qk_head_dim
        if mla.q_lora_rank is None:
            self.q_proj = make_linear(hidden_size, [q_out], False, quant,
                                      _names(prefix, "q_proj"))
        else:
            self.q_a_proj = make_linear(hidden_size, [mla.q_lora_rank], bias, quant,
                                        _names(prefix, "q_a_proj"))
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = make_linear(mla.q_lora_rank, [q_out], False, quant,
                                        _names(prefix, "q_b_proj"))
        self.kv_a_proj_with_mqa = make_linear(
            hidden_size, [mla.kv_lora_rank + mla.qk_rope_head_dim], bias, quant,
            _names(prefix, "kv_a_proj_with_mqa"))
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = make_linear(mla.kv_lora_rank,
                                     [num_heads * (mla.qk_nope_head_dim + mla.v_head_dim)],
                                     False, quant, _names(prefix, "kv_b_proj"))
        self.o_proj = make_linear(num_heads * mla.v_head_dim, [hidden_size], bias, quant,
                                  _names(prefix, "o_proj"))
        self.rotary = rotary
        self.attn = Attention(num_heads, 1, mla.latent_dim, mla.scale, values_are_keys=True)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.mla.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def _kv_b_weight(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's base W per head: W_UK [H, nope, C] and W_UV [H, v, C] (a quantized
        one dequantized, every step)."""
        base = getattr(self.kv_b_proj, "base_layer", self.kv_b_proj)  # under LoRA
        w = base.dequantize(torch.float32).T if isinstance(base, QuantLinear) else base.weight
        w = w.to(dtype).view(self.num_heads, -1, self.mla.kv_lora_rank)
        return w[:, :self.mla.qk_nope_head_dim], w[:, self.mla.qk_nope_head_dim:]

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        m, t, h = self.mla, x.shape[0], self.num_heads
        q_nope, q_rope = self._query(x).view(t, h, m.qk_head_dim).split(
            [m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)  # [T, H, nope], [T, H, rope]
        latent, k_rope = self.kv_a_proj_with_mqa(x).split(
            [m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)  # [T, C], [T, rope]
        q_rope, k_rope = self.rotary(positions, q_rope, k_rope.unsqueeze(1))  # k: [T, 1, rope]
        cache = torch.cat([self.kv_a_layernorm(latent).unsqueeze(1), k_rope], dim=-1)
        w_uk, w_uv = self._kv_b_weight(x.dtype)
        lora = kv_b_lora(self.kv_b_proj, h, m.qk_nope_head_dim)
        if lora is not None:
            q_nope = lora.scale_query(q_nope)
        q_latent = torch.einsum("thn,hnc->thc", q_nope, w_uk)  # [T, H, C]
        if lora is not None:
            lora.add_query(q_latent, q_nope)
        q = torch.cat([q_latent, q_rope], dim=-1)  # [T, H, C + rope]
        out = self.attn(q, cache, cache)  # [T, H * (C + rope)]: V is the latent
        o_latent = out.view(t, h, m.latent_dim)[..., :m.kv_lora_rank]  # [T, H, C]
        v = torch.einsum("thc,hvc->thv", o_latent, w_uv)  # [T, H, v]
        if lora is not None:
            v = lora.add_value(v, o_latent)
        return self.o_proj(v.reshape(t, h * m.v_head_dim))
