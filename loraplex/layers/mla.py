"""Multi-head latent attention (MLA: DeepSeek-V2, DeepSeek-V3, Kimi-K2, Moonlight), as
HF's DeepseekV2Attention / DeepseekV3Attention compute it:

    q      = q_proj(x)  or  q_b_proj(rms(q_a_proj(x)))          [T, H, nope + rope]
    c, kr  = kv_a_proj_with_mqa(x) split [kv_lora_rank, rope]   the latent, one rope key
    kn, v  = kv_b_proj(rms(c)) per head split [nope, v]
    q_rope, kr rotated (kr shared by every head); the nope parts are not
    out    = o_proj(softmax(scale q . [kn, kr]) v)

scale = (nope + rope)^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (HF's
yarn_apply_mscale). The latent norms use eps 1e-6 whatever rms_norm_eps says (HF's).

The paged cache holds the decompressed per-head K ([nope, rope]) and V, V padded with
zeros to K's head dimension (the cache has one head dim; the output's padding is cut
off before o_proj), so both attention backends run their usual kernels. vLLM caches the
latent c and kr instead, ~(kv_lora_rank + rope) / (2 H head_dim) of this: a later
optimization. Every projection is a plain module under its HF name, so LoRA adapters
target each of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.layers.attention import Attention
from loraplex.layers.linear import make_linear
from loraplex.layers.norm import RMSNorm
from loraplex.layers.quantization import QuantConfig
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
    def cache_head_dim(self) -> int:
        """The head dimension K and V share in the paged cache."""
        return max(self.qk_head_dim, self.v_head_dim)


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
        self.attn = Attention(num_heads, num_heads, mla.cache_head_dim, mla.scale)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.mla.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        m, t, h = self.mla, x.shape[0], self.num_heads
        q_nope, q_rope = self._query(x).view(t, h, m.qk_head_dim).split(
            [m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)  # [T, H, nope], [T, H, rope]
        latent, k_rope = self.kv_a_proj_with_mqa(x).split(
            [m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)  # [T, kv_lora_rank], [T, rope]
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(
            t, h, m.qk_nope_head_dim + m.v_head_dim)
        k_nope, v = kv.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        q_rope, k_rope = self.rotary(positions, q_rope, k_rope.unsqueeze(1))  # k: [T, 1, rope]
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(t, h, m.qk_rope_head_dim)], dim=-1)
        d = m.cache_head_dim  # zeros pad the shorter of K (and q) or V to the cache's dim
        q, k = F.pad(q, (0, d - m.qk_head_dim)), F.pad(k, (0, d - m.qk_head_dim))
        out = self.attn(q, k, F.pad(v, (0, d - m.v_head_dim)))  # [T, H * d]
        out = out.view(t, h, d)[..., :m.v_head_dim].reshape(t, h * m.v_head_dim)
        return self.o_proj(out)
