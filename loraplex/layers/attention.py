"""Causal self-attention over a paged KV cache (torch path: CPU, and the GPU fallback).

K/V of every token are written into fixed-size blocks of a preallocated cache at
`slot_mapping`. Prefill attends over the step's own K/V (padded per sequence); decode
gathers each sequence's blocks through its block table. GQA is handled by SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.worker.context import get_context


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        # set by the model runner once the cache is allocated: [num_blocks, block_size, KVH, D]
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [T, H, D], k/v: [T, KVH, D] -> out: [T, H * D]
        ctx = get_context()
        if self.k_cache.numel():
            self.k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(
                0, ctx.slot_mapping, k)
            self.v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(
                0, ctx.slot_mapping, v)
        if ctx.is_prefill:
            out = self._prefill(q, k, v, ctx)
        else:
            out = self._decode(q, ctx)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _prefill(self, q, k, v, ctx) -> torch.Tensor:
        b, length = ctx.padded_index.shape
        idx = ctx.padded_index.reshape(-1)

        def padded(x: torch.Tensor) -> torch.Tensor:  # [T, h, D] -> [B, h, L, D]
            return x.index_select(0, idx).view(b, length, x.shape[1], -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            padded(q), padded(k), padded(v), attn_mask=ctx.prefill_mask,
            is_causal=ctx.prefill_mask is None, scale=self.scale, enable_gqa=True)
        out = out.transpose(1, 2).reshape(b * length, self.num_heads, self.head_dim)
        return out if ctx.valid_rows is None else out.index_select(0, ctx.valid_rows)

    def _decode(self, q, ctx) -> torch.Tensor:
        b, nblocks = ctx.block_tables.shape
        block_size = self.k_cache.shape[1]
        flat = ctx.block_tables.reshape(-1)
        # gather each sequence's blocks into scratch buffers reused by every layer of the
        # step (a fresh multi-MB tensor per layer costs page faults on the CPU)
        k = torch.index_select(self.k_cache, 0, flat, out=_scratch(ctx, "k", self.k_cache, flat))
        v = torch.index_select(self.v_cache, 0, flat, out=_scratch(ctx, "v", self.v_cache, flat))
        k = k.view(b, nblocks * block_size, self.num_kv_heads, -1)  # [B, S, KVH, D]
        v = v.view(b, nblocks * block_size, self.num_kv_heads, -1)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=ctx.decode_mask,
            scale=self.scale, enable_gqa=True)  # [B, H, 1, D]
        return out.squeeze(2)


def _scratch(ctx, name: str, cache: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    shape = (flat.shape[0], *cache.shape[1:])
    buf = ctx.scratch.get(name)
    if buf is None or buf.shape != shape or buf.dtype != cache.dtype:
        buf = ctx.scratch[name] = torch.empty(shape, dtype=cache.dtype, device=cache.device)
    return buf
