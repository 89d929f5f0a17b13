"""Causal self-attention over a paged KV cache.

K/V of every token are written into fixed-size blocks of a preallocated cache at
`slot_mapping`; sequences find their tokens through their block table. Two backends,
picked per model runner by `attention_backend`:

- triton (CUDA): kernels in triton_attention.py read K/V straight from the cache
  blocks; decode and prefill, GQA, CUDA-graph-safe decode.
- torch (CPU, or forced): prefill runs SDPA over the step's own K/V padded per
  sequence; decode gathers each sequence's blocks through its block table into scratch
  buffers, then SDPA. GQA is handled by SDPA.

LORAPLEX_ATTENTION_BACKEND=auto|torch|triton forces one; triton on CPU tensors runs
under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.worker.context import StepContext, get_context

_CHOICES = ("auto", "torch", "triton")


@functools.cache
def _triton_attention() -> ModuleType | None:
    try:
        from loraplex.layers import triton_attention
    except ImportError:
        return None
    return triton_attention


def attention_backend(device: torch.device) -> str:
    """"triton" for CUDA when triton imports, else "torch"; the env var forces one."""
    choice = os.getenv("LORAPLEX_ATTENTION_BACKEND", "auto").strip().lower()
    if choice not in _CHOICES:
        raise ValueError(f"LORAPLEX_ATTENTION_BACKEND={choice!r}: expected one of {_CHOICES}")
    if choice == "torch" or (choice == "auto" and device.type != "cuda"):
        return "torch"
    if _triton_attention() is not None:
        if device.type != "cuda" and os.getenv("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError("LORAPLEX_ATTENTION_BACKEND=triton on a CPU device needs "
                               "TRITON_INTERPRET=1")
        return "triton"
    if choice == "triton":
        raise RuntimeError("LORAPLEX_ATTENTION_BACKEND=triton but triton does not import")
    return "torch"


def decode_splits(batch: int, num_kv_heads: int, max_context_len: int,
                  device: torch.device) -> int:
    """Context splits per sequence for the triton decode kernel (host upper bounds only)."""
    return _triton_attention().decode_num_splits(batch, num_kv_heads, max_context_len, device)


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
        if ctx.attn_backend == "triton":
            out = self._triton(q, k, v, ctx)
        else:
            if self.k_cache.numel():
                self.k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(
                    0, ctx.slot_mapping, k)
                self.v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(
                    0, ctx.slot_mapping, v)
            out = self._prefill(q, k, v, ctx) if ctx.is_prefill else self._decode(q, ctx)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _triton(self, q, k, v, ctx: StepContext) -> torch.Tensor:
        ta = _triton_attention()
        has_cache = self.k_cache.numel() > 0
        if has_cache:
            ta.store_kvcache(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
        if ctx.is_prefill:
            with_ctx = has_cache and ctx.context_lens is not None
            return ta.prefill_attention(
                q, k, v, ctx.cu_seqlens_q, ctx.max_seqlen_q, self.scale,
                *((self.k_cache, self.v_cache, ctx.block_tables, ctx.context_lens)
                  if with_ctx else ()))
        return ta.paged_decode_attention(q, self.k_cache, self.v_cache, ctx.block_tables,
                                         ctx.context_lens, self.scale, ctx.decode_splits)

    def _prefill(self, q, k, v, ctx: StepContext) -> torch.Tensor:
        b, length = ctx.padded_index.shape
        idx = ctx.padded_index.reshape(-1)

        def padded(x: torch.Tensor) -> torch.Tensor:  # [T, h, D] -> [B, h, L, D]
            return x.index_select(0, idx).view(b, length, x.shape[1], -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            padded(q), padded(k), padded(v), attn_mask=ctx.prefill_mask,
            is_causal=ctx.prefill_mask is None, scale=self.scale, enable_gqa=True)
        out = out.transpose(1, 2).reshape(b * length, self.num_heads, self.head_dim)
        return out if ctx.valid_rows is None else out.index_select(0, ctx.valid_rows)

    def _decode(self, q, ctx: StepContext) -> torch.Tensor:
        b, nblocks = ctx.block_tables.shape
        block_size = self.k_cache.shape[1]
        flat = ctx.block_tables.reshape(-1)
        # gather each sequence's blocks into scratch buffers reused by every layer of the
        # step (a fresh multi-MB tensor per layer costs page faults on the CPU)
        k = torch.index_select(self.k_cache, 0, flat, out=_scratch(ctx, "k", self.k_cache, flat))
        v = torch.index_select(self.v_cache, 0, flat, out=_scratch(ctx, "v", self.v_cache, flat))
        k = k.view(b, nblocks * block_size, self.num_kv_heads, -1)  # [B, S, KVH, D]
        v = v.view(b, nblocks * block_size, self.num_kv_heads, -1)
        mask = _decode_mask(ctx, nblocks * block_size)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            scale=self.scale, enable_gqa=True)  # [B, H, 1, D]
        return out.squeeze(2)


def _decode_mask(ctx: StepContext, width: int) -> torch.Tensor:
    """[B, 1, 1, width] bool: key position < context length; built once per step."""
    mask = ctx.scratch.get("decode_mask")
    if mask is None:
        keys = torch.arange(width, device=ctx.context_lens.device)
        mask = ctx.scratch["decode_mask"] = (keys[None, :] < ctx.context_lens[:, None])[:, None, None]
    return mask


def _scratch(ctx, name: str, cache: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    shape = (flat.shape[0], *cache.shape[1:])
    buf = ctx.scratch.get(name)
    if buf is None or buf.shape != shape or buf.dtype != cache.dtype:
        buf = ctx.scratch[name] = torch.empty(shape, dtype=cache.dtype, device=cache.device)
    return buf
