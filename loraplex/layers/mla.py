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
stored twice). Two forms of attention over it, as vLLM's MLA:

- decode rows (and every row on the Triton path): absorbed. With W_UK_h / W_UV_h head
  h's K and V rows of kv_b_proj,

    q_latent_h = W_UK_h^T q_nope_h                       [T, H, kv_lora_rank]
    o_h        = softmax(scale [q_latent_h, q_rope_h] . [c, kr]) [c, kr]   (rope cut)
    out_h      = W_UV_h o_h                              [T, H, v]

  since q_nope_h . (W_UK_h c) = (W_UK_h^T q_nope_h) . c: a decode step reads the latent
  once for every head, never a per-head K or V.
- prefill rows on the torch path: decompressed. Each prefilling sequence's latents (its
  cached context, earlier chunks or a prefix-cache hit, read back from the cache; its new
  rows as computed) go through kv_b_proj under the sequence's adapter, K_h = [kn_h, kr],
  V_h = vn_h, then causal SDPA: each query-key pair costs a nope + rope wide dot and a v
  wide value instead of kv_lora_rank + rope and kv_lora_rank (~3.4x fewer FLOPs at
  DeepSeek's 128 / 64 / 128 against 512), for kv_b_proj over the context once a layer.

CUDA keeps the absorbed form for prefill too: the Triton prefill kernel takes one head
dim for q, K and V and reads a chunk's context as K and V from the cache blocks, so the
decompressed form there would need V padded to K's width and the context's per-head K
and V materialized in a paged layout, or a kernel that decompresses latent tiles (not
done; nothing measured without a GPU). LoRA on kv_b_proj in
either form: layers/mla_lora.py; every other projection is a plain module under its HF
name, before or after the cache, so LoRA adapters target each of them as usual.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.layers.attention import Attention
from loraplex.layers.linear import make_linear
from loraplex.layers.mla_lora import kv_b_lora
from loraplex.layers.norm import RMSNorm
from loraplex.layers.quantization import QuantConfig, QuantLinear
from loraplex.layers.rotary import RotaryEmbedding
from loraplex.worker.context import StepContext, get_context

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
        ctx = get_context()
        if ctx.attn_backend != "torch" or not ctx.is_prefill:  # all rows absorbed
            v = self._absorbed(q_nope, q_rope, cache, slice(0, t),
                               lambda q, kv: self.attn(q, kv, kv))
        else:  # the prompts' rows decompressed, a mixed step's decode rows absorbed
            n = t - (0 if ctx.decode is None else ctx.decode.slot_mapping.shape[0])
            self.attn.store(cache, cache)
            v = self._decompressed(q_nope[:n], q_rope[:n], cache[:n, 0], ctx)
            if n < t:
                v = torch.cat([v, self._absorbed(q_nope[n:], q_rope[n:], cache[n:],
                                                 slice(n, t),
                                                 lambda q, kv: self.attn.decode(q, kv, kv))])
        return self.o_proj(v.reshape(t, h * m.v_head_dim))

    def _absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor,
                  rows: slice, attend: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                  ) -> torch.Tensor:
        """Each head's output [t, H, v] for the step's `rows` in the absorbed form;
        attend(q, latent) runs attention over the cached latents."""
        m, t, h = self.mla, q_nope.shape[0], self.num_heads
        w_uk, w_uv = self._kv_b_weight(q_nope.dtype)
        lora = kv_b_lora(self.kv_b_proj, h, m.qk_nope_head_dim, rows)
        if lora is not None:
            q_nope = lora.scale_query(q_nope)
        q_latent = torch.einsum("thn,hnc->thc", q_nope, w_uk)  # [t, H, C]
        if lora is not None:
            lora.add_query(q_latent, q_nope)
        q = torch.cat([q_latent, q_rope], dim=-1)  # [t, H, C + rope]
        out = attend(q, cache)  # [t, H * (C + rope)]: V is the latent
        o_latent = out.view(t, h, m.latent_dim)[..., :m.kv_lora_rank]  # [t, H, C]
        v = torch.einsum("thc,hvc->thv", o_latent, w_uv)  # [t, H, v]
        return v if lora is None else lora.add_value(v, o_latent)

    def _decompressed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, new: torch.Tensor,
                      ctx: StepContext) -> torch.Tensor:
        """The prefill rows' output [n, H, v] in the decompressed form (torch path): each
        sequence's latents, its cached context's (read back from the cache) and its new
        rows' (as computed), through kv_b_proj with the sequence's adapter, then causal
        attention over K = [k_nope, k_rope] per head and V. new: the rows' [n, C + rope]."""
        m, h = self.mla, self.num_heads
        b, length = ctx.padded_index.shape
        idx = ctx.padded_index.reshape(-1)
        if ctx.context_lens is None:  # every sequence starts at position 0
            latents = new.index_select(0, idx).view(b, length, m.latent_dim)
        else:  # [B, width]; the new rows put back as computed (an FP8 cache rounds them)
            latents = self.attn.gathered_keys(ctx, new.dtype)[:, :, 0]
            width = latents.shape[1]
            q_pos = ctx.prefill_positions[0]  # [B, L]: the padded rows' positions
            dest = (torch.arange(b, device=new.device)[:, None] * width + q_pos).view(-1)
            if ctx.valid_rows is not None:
                dest = dest.index_select(0, ctx.valid_rows)
            latents.view(-1, m.latent_dim).index_copy_(0, dest, new)
        keys, values = self._decompress(latents, ctx)  # [B, H, width, nope + rope], v
        # V zero-padded to K's width: SDPA's fused CPU kernel wants one head dim (with V
        # narrower it falls back to the unfused one, ~3x slower at 192 / 128)
        values = F.pad(values, (0, max(m.qk_head_dim - m.v_head_dim, 0)))
        q = torch.cat([q_nope, q_rope], dim=-1).index_select(0, idx)
        q = q.view(b, length, h, m.qk_head_dim).transpose(1, 2)  # [B, H, L, nope + rope]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=ctx.prefill_mask,
                                             is_causal=ctx.prefill_mask is None,
                                             scale=m.scale)[..., :m.v_head_dim]  # [B, H, L, v]
        out = out.transpose(1, 2).reshape(b * length, h, m.v_head_dim)
        return out if ctx.valid_rows is None else out.index_select(0, ctx.valid_rows)

    def _decompress(self, latents: torch.Tensor, ctx: StepContext
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per head K = [kv_b_proj's K rows c, k_rope] [B, H, W, nope + rope] and V [B, H,
        W, v] of latents [B, W, C + rope], kv_b_proj under each sequence's adapter (PEFT's:
        on its output)."""
        m, h = self.mla, self.num_heads
        b, w = latents.shape[:2]
        c, k_rope = latents.split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        c = c.reshape(b * w, m.kv_lora_rank)
        kv = getattr(self.kv_b_proj, "base_layer", self.kv_b_proj)(c)  # [B W, H (nope + v)]
        lora = kv_b_lora(self.kv_b_proj, h, m.qk_nope_head_dim, slice(None))
        if lora is not None:  # a sequence's rows all have its slot: its first row's
            slots = lora.slots.index_select(0, ctx.padded_index[:, 0])  # [B]
            kv = lora.for_rows(slots[:, None].expand(b, w).reshape(-1)).add_to_output(kv, c)
        k_nope, v = kv.view(b, w, h, -1).split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        keys = torch.cat([k_nope, k_rope[:, :, None].expand(b, w, h, m.qk_rope_head_dim)],
                         dim=-1)
        return keys.transpose(1, 2), v.transpose(1, 2)
