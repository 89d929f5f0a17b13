"""Causal self-attention over a paged KV cache.

K/V of every token are written into fixed-size blocks of a preallocated cache at
`slot_mapping`; sequences find their tokens through their block table. Two backends,
picked per model runner by `attention_backend`:

- triton (CUDA): kernels in triton_attention.py read K/V straight from the cache
  blocks; decode and prefill, GQA, CUDA-graph-safe decode.
- torch (CPU, or forced): prefill runs SDPA over the step's own K/V padded per
  sequence (a later chunk of a prompt: over its sequence's blocks, gathered from the
  cache once the chunk's K/V are written); decode keeps the batch's K/V contiguous
  across steps in a per-layer mirror (one new token appended per step; rebuilt from the
  blocks when the batch changes, or gathered into scratch buffers when it would not
  fit), then SDPA per group of rows of similar context length (`decode_groups`; the
  runner orders rows longest first). GQA is handled by SDPA.

Attention sinks (gpt-oss): a learned logit per head joins every query's softmax as one
more key with no value, so a head can attend to "nothing":
softmax([scale q k^T, sink])[:-1] v. The torch path writes that softmax out (as it does
for a softcap); the kernels start each row's online softmax with the sink.

Chunked local attention (Llama 4's rope layers, `chunk` C): a query at position p sees
only the keys of its own chunk, p - p % C <= k <= p. Like a sliding window it is a lower
bound on the key position (_first_key), in the torch masks and the kernels alike.

FP8 KV cache (kv_cache_dtype fp8, as vLLM): the cache holds K / k_scale and V / v_scale
saturated to the FP8 range and rounded (quantize_kv); reads multiply back (in fp32, then
the model's dtype). The scales are per layer: the checkpoint's k_scale / v_scale (or one
kv_scale), else 1.0. A prefill's own K/V are used as computed; everything read from the
cache (earlier chunks, decode) went through FP8. The torch decode mirror holds the
dequantized values, so it appends each new token rounded as the cache has it.

MLA's latent (layers/mla.py, `values_are_keys`): one KV head that is both K and V, so
v_cache is k_cache; the torch path writes and reads it once (the Triton store writes the
same values twice into the one tensor). On the torch path MLA runs its prefill rows
itself, in the decompressed form, through three hooks: `store`, `gathered_keys` (a
sequence's cached latents) and `decode` (a mixed step's decode rows, absorbed).

ALiBi (BLOOM, MPT: `alibi_slopes`): each head adds slope_h x (key position) to its scores,
a linear bias per head instead of positions (any per-query constant, as MPT's relative
form has, leaves the softmax as it is); Falcon-RW's (`alibi_bf16_scale`) rounds the
position and that product to bfloat16, then scales it, as HF's code does. The torch path writes that
softmax out; the kernels add it to each tile's scores.

KV sharing (Gemma 4, `reads_kv_of`): a layer that attends over an earlier layer's cache
writes nothing; it shares that layer's cache tensors and torch decode mirror.

LORAPLEX_ATTENTION_BACKEND=auto|torch|triton forces one; triton on CPU tensors runs
under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import itertools
import math
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from loraplex import envs
from loraplex.backends import optional_module, triton_kernels
from loraplex.worker.context import StepContext, get_context

_KERNELS = "loraplex.layers.triton_attention"


def _triton_attention() -> ModuleType | None:
    return optional_module(_KERNELS)


def attention_backend(device: torch.device) -> str:
    """"triton" for CUDA when triton imports, else "torch"; the env var forces one."""
    kernels = triton_kernels("LORAPLEX_ATTENTION_BACKEND", envs.LORAPLEX_ATTENTION_BACKEND,
                             device.type == "cuda", _KERNELS)
    return "torch" if kernels is None else "triton"


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def quantize_kv(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x / scale (as x * fp32(1 / scale), the kernels' op) saturated to the FP8 range
    (e4m3fn has no inf: an overflow would be NaN) and rounded to nearest, even."""
    fmax = torch.finfo(dtype).max
    return (x.float() * (1.0 / scale)).clamp_(-fmax, fmax).to(dtype)


def dequantize_kv(x: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    """out = x * scale in out's dtype (an FP8 value is exact in any wider float)."""
    out.copy_(x)
    return out if scale == 1.0 else out.mul_(scale)


def decode_splits(batch: int, num_kv_heads: int, max_context_len: int,
                  device: torch.device) -> int:
    """Context splits per sequence for the triton decode kernel (host upper bounds only)."""
    return _triton_attention().decode_num_splits(batch, num_kv_heads, max_context_len, device)


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 softcap: float = 0.0, window: int = 0, chunk: int = 0,
                 values_are_keys: bool = False,
                 alibi_slopes: tuple[float, ...] | None = None,
                 alibi_bf16_scale: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.softcap = softcap  # > 0: scores are softcap * tanh(score / softcap) (Gemma 2)
        self.window = window  # > 0: a query at p sees keys at p - window < k <= p only
        self.chunk = chunk  # > 0: a query at p sees keys at p - p % chunk <= k <= p only
        # V is K (MLA's latent, layers/mla.py): v_cache is k_cache, one tensor, written and
        # read once; the caller passes k as v
        self.values_are_keys = values_are_keys
        # ALiBi: a slope per head [H] (fp32), or None
        self.alibi_slopes: torch.Tensor | None
        self.register_buffer("alibi_slopes", None if alibi_slopes is None else
                             torch.tensor(alibi_slopes, dtype=torch.float32), persistent=False)
        # > 0 (Falcon-RW): slope x position in bfloat16 (its factors too), then times this
        self.alibi_bf16_scale = alibi_bf16_scale
        # set by the model runner once the cache is allocated: [num_blocks, block_size, KVH, D]
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self._mirror: dict[str, torch.Tensor] = {}  # torch decode: see DecodeMirror
        # an FP8 cache holds K / k_scale, V / v_scale (load_kv_scale; unused otherwise)
        self.k_scale = 1.0
        self.v_scale = 1.0
        # KV sharing (Gemma 4): the layer whose cache this one attends over, writing
        # nothing (the caller passes that layer's K/V of the step); the model runner gives
        # it that layer's cache, scales and decode mirror
        self.reads_kv_of: Attention | None = None
        # Gemma 4's full layers: causal over images whose tokens the other layers see both
        # ways (image_blocks' widening, and the Triton prefill's key_limit, not applied)
        self.images_causal = False

    def load_kv_scale(self, name: str, tensor: torch.Tensor) -> None:
        """A checkpoint's KV cache scale (llm-compressor / vLLM FP8 checkpoints' per-layer
        self_attn.k_scale, v_scale, or one kv_scale for both): one positive value."""
        leaf = name.rpartition(".")[2]
        if tensor.numel() != 1:
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}: "
                             "only a per-tensor KV cache scale (one value) is supported")
        value = float(tensor.float())
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"checkpoint tensor {name} is {value}: a KV cache scale must be "
                             "positive and finite")
        if leaf in ("k_scale", "kv_scale"):
            self.k_scale = value
            if self.values_are_keys:  # one tensor, one scale: K's (as vLLM's MLA)
                self.v_scale = value
        if leaf in ("v_scale", "kv_scale") and not self.values_are_keys:
            self.v_scale = value

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                sinks: torch.Tensor | None = None) -> torch.Tensor:
        # q: [T, H, D], k/v: [T, KVH, D], sinks: [H] or None -> out: [T, H * D]
        ctx = get_context()
        self._store(k, v, ctx)
        if ctx.decode is None:
            out = self._attend(q, k, v, ctx, sinks)
        else:  # a mixed step: prompts' rows, then one row per decoding sequence
            n = q.shape[0] - ctx.decode.slot_mapping.shape[0]
            out = torch.cat([self._attend(q[:n], k[:n], v[:n], ctx, sinks),
                             self._attend(q[n:], k[n:], v[n:], ctx.decode, sinks)])
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the step's K/V alone: MLA's prefill attends in its own form (layers/mla.py),
        over what gathered_keys reads back."""
        self._store(k, v, get_context())

    def gathered_keys(self, ctx: StepContext, dtype: torch.dtype) -> torch.Tensor:
        """A prefill's sequences' cached K (the step's own too, once stored), an FP8 cache's
        dequantized: [B, width, KVH, D] in `dtype`, a scratch buffer the step reuses."""
        return self._gathered_kv(ctx, ctx.block_tables, dtype)[0]

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A mixed step's decode rows (the last ones, ctx.decode's), already stored:
        [rows, H * D]."""
        out = self._attend(q, k, v, get_context().decode, None)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    @property
    def _kv_tensors(self) -> int:
        """Cache tensors to write and read: K and V, or K alone when V is K."""
        return 1 if self.values_are_keys else 2

    def _store(self, k: torch.Tensor, v: torch.Tensor, ctx: StepContext) -> None:
        """Write the step's K/V into the cache at slot_mapping (before any attention reads
        it: a decoding sequence's new token is part of its own context)."""
        # the profile run, before the cache exists; a layer reusing another's K/V (stored)
        if not self.k_cache.numel() or self.reads_kv_of is not None:
            return
        if ctx.attn_backend == "triton":
            _triton_attention().store_kvcache(k, v, self.k_cache, self.v_cache,
                                              ctx.slot_mapping, self.k_scale, self.v_scale)
            return
        for cache, new, scale in ((self.k_cache, k, self.k_scale),
                                  (self.v_cache, v, self.v_scale))[:self._kv_tensors]:
            rows = cache.view(-1, self.num_kv_heads, self.head_dim)
            if is_fp8(cache.dtype):  # index_copy_ has no FP8 kernels: copy the bytes
                rows, new = rows.view(torch.uint8), quantize_kv(new, cache.dtype,
                                                                scale).view(torch.uint8)
            rows.index_copy_(0, ctx.slot_mapping, new)

    def _attend(self, q, k, v, ctx: StepContext, sinks: torch.Tensor | None) -> torch.Tensor:
        if ctx.attn_backend == "triton":
            return self._triton(q, k, v, ctx, sinks)
        if ctx.is_prefill:
            return self._prefill(q, k, v, ctx, sinks)
        return self._decode(q, k, v, ctx, sinks)

    def _triton(self, q, k, v, ctx: StepContext, sinks: torch.Tensor | None) -> torch.Tensor:
        ta = _triton_attention()
        if ctx.is_prefill:
            with_ctx = self.k_cache.numel() > 0 and ctx.context_lens is not None
            return ta.prefill_attention(
                q, k, v, ctx.cu_seqlens_q, ctx.max_seqlen_q, self.scale,
                *((self.k_cache, self.v_cache, ctx.block_tables, ctx.context_lens)
                  if with_ctx else ()), softcap=self.softcap, window=self.window,
                sinks=sinks, k_scale=self.k_scale, v_scale=self.v_scale,
                key_limit=None if self.images_causal else ctx.key_limit, chunk=self.chunk,
                alibi_slopes=self.alibi_slopes, alibi_bf16_scale=self.alibi_bf16_scale)
        return ta.paged_decode_attention(q, self.k_cache, self.v_cache, ctx.block_tables,
                                         ctx.context_lens, self.scale, ctx.decode_splits,
                                         softcap=self.softcap, window=self.window, sinks=sinks,
                                         k_scale=self.k_scale, v_scale=self.v_scale,
                                         chunk=self.chunk, alibi_slopes=self.alibi_slopes,
                                         alibi_bf16_scale=self.alibi_bf16_scale)

    def _prefill(self, q, k, v, ctx: StepContext, sinks: torch.Tensor | None) -> torch.Tensor:
        b, length = ctx.padded_index.shape
        idx = ctx.padded_index.reshape(-1)

        def padded(x: torch.Tensor) -> torch.Tensor:  # [T, h, D] -> [B, h, L, D]
            return x.index_select(0, idx).view(b, length, x.shape[1], -1).transpose(1, 2)

        if ctx.context_lens is None:  # every sequence starts at position 0
            keys, values = padded(k), padded(v)
        else:  # earlier chunks are in the cache: the whole [B, width] of each sequence
            keys, values = (x.transpose(1, 2) for x in
                            self._gathered_kv(ctx, ctx.block_tables, q.dtype))
        local = self.window or self.chunk
        mask = ctx.scratch.get(CAUSAL_MASK, ctx.prefill_mask) if self.images_causal \
            else ctx.prefill_mask
        out = self._sdpa(padded(q), keys, values,
                         _window_mask(ctx, self.window, self.chunk) if local else mask, sinks)
        out = out.transpose(1, 2).reshape(b * length, self.num_heads, self.head_dim)
        return out if ctx.valid_rows is None else out.index_select(0, ctx.valid_rows)

    def _decode(self, q, k, v, ctx: StepContext, sinks: torch.Tensor | None) -> torch.Tensor:
        if ctx.mirror_groups:
            parts = self._mirrored_kv(k, v, ctx)
        else:
            keys, values = self._gathered_kv(ctx, ctx.block_tables, q.dtype)
            groups = ctx.decode_groups or [(0, q.shape[0], ctx.max_context_len)]
            parts = [(a, b, keys[a:b, :w], values[a:b, :w]) for a, b, w in groups]
        mask = _decode_mask(ctx, max(part[2].shape[1] for part in parts), self.window,
                            self.chunk)
        # [rows, H, 1, D]; MLA's one latent KV head: [rows, 1, H, D], the heads as one
        # head's H queries under the same mask, so SDPA does not copy the latent per head
        # (enable_gqa does on the CPU: ~6x slower at DeepSeek-V3's 128 heads)
        heads_axis = 2 if self.values_are_keys else 1
        out = torch.cat([self._sdpa(
            q[a:b].unsqueeze(3 - heads_axis), keys.transpose(1, 2), values.transpose(1, 2),
            mask[a:b, ..., :keys.shape[1]], sinks) for a, b, keys, values in parts])
        return out.squeeze(3 - heads_axis)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """softmax(scale q k^T) v over [B, h, L, D] (mask: bool, True = attend; None =
        causal). With a softcap, sinks or ALiBi (which SDPA has no option for) written out,
        in fp32: softmax(cap * tanh(scale q k^T / cap)) v; softmax([scores, sink])[:-1] v;
        softmax(scale q k^T + slope_h j) v, key j at position j (every path lays keys out
        from each sequence's first position)."""
        if not self.softcap and sinks is None and self.alibi_slopes is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                  scale=self.scale, enable_gqa=True)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = (q.float() @ k.float().transpose(-1, -2)) * self.scale
        if self.softcap:
            scores = self.softcap * torch.tanh(scores / self.softcap)
        if self.alibi_slopes is not None:
            keys = torch.arange(scores.shape[-1], device=q.device, dtype=torch.float32)
            if self.alibi_bf16_scale:  # Falcon-RW, as HF: in bfloat16, then scaled
                keys = keys.bfloat16().float()
            bias = self.alibi_slopes.view(-1, 1, 1) * keys
            if self.alibi_bf16_scale:
                bias = bias.bfloat16().float() * self.alibi_bf16_scale
            scores = scores + bias
        if mask is None:
            mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        if sinks is None:
            return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)
        sink = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        return (probs @ v.float()).to(q.dtype)

    def _gathered_kv(self, ctx: StepContext, tables: torch.Tensor, dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sequence's blocks copied out of the cache into scratch buffers every layer
        of the step reuses, in `dtype`: [B, tables.shape[1] * block, KVH, D]."""
        b, nblocks = tables.shape
        flat = tables.reshape(-1)
        out = []
        for name, cache, scale in (("k", self.k_cache, self.k_scale),
                                   ("v", self.v_cache, self.v_scale))[:self._kv_tensors]:
            buf = _buffer(ctx.scratch, name, (flat.shape[0], *cache.shape[1:]), dtype,
                          cache.device)
            _read_blocks(cache, scale, flat, buf, ctx.scratch)
            out.append(buf.view(b, nblocks * cache.shape[1], self.num_kv_heads, self.head_dim))
        return out[0], out[-1]

    def _mirrored_kv(self, k, v, ctx: StepContext
                     ) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """Per mirror group (rows a:b): [b - a, width, KVH, D] views of the layer's mirror,
        the batch's K/V kept contiguous across decode steps, so a step appends one token
        per sequence instead of gathering every block again; rebuilt from the cache when
        the batch changes. Each group has its own capacity, so a long sequence does not
        make the short ones' rows as long."""
        block, tail = self.k_cache.shape[1], self.k_cache.shape[2:]
        sizes = [(b - a) * cap * math.prod(tail) for a, b, cap in ctx.mirror_groups]
        bufs = [(_buffer(self._mirror, name, (sum(sizes),), new.dtype, new.device), cache,
                 scale, _as_read(new, cache.dtype, scale))
                for name, cache, scale, new in (("k", self.k_cache, self.k_scale, k),
                                                ("v", self.v_cache, self.v_scale, v)
                                                )[:self._kv_tensors]]
        rows, pos = _append_index(ctx)
        parts, offset = [], 0
        for (a, b, cap), size, (_, _, width) in zip(ctx.mirror_groups, sizes, ctx.decode_groups):
            views = []
            for buf, cache, scale, new in bufs:
                group = buf[offset:offset + size].view(b - a, cap, *tail)
                if ctx.mirror_rebuild:  # the rows' block tables cut or padded to the capacity
                    tables = F.pad(ctx.block_tables[a:b], (0, cap // block - ctx.block_tables.shape[1]))
                    _read_blocks(cache, scale, tables.reshape(-1), group.view(-1, block, *tail),
                                 ctx.scratch)
                else:
                    group[rows[a:b] - a, pos[a:b]] = new[a:b]
                views.append(group[:, :width])
            parts.append((a, b, views[0], views[-1]))
            offset += size
        return parts


class DecodeMirror:
    """Plans, for the torch decode path, whether this step's batch continues the last
    decode step's (same sequences in the same order, each one token longer: the layers'
    mirrors only need the new token) or the mirrors must be rebuilt, and their layout:
    row groups of similar context length (decode_groups; rows come longest first), each
    with its own capacity (its longest context plus headroom, so most steps append).
    Mirrors hold a copy of the batch's K/V: they are used only while they fit in
    max_bytes, else decode gathers the blocks every step."""

    headroom = 32  # tokens: a rebuild every ~32 steps, 2 extra blocks copied at block size 16

    def __init__(self, block_size: int, bytes_per_token: int, max_bytes: int) -> None:
        self.block_size = block_size
        self.bytes_per_token = bytes_per_token  # K and V, all layers
        self.max_bytes = max_bytes
        self.reset()

    def reset(self) -> None:
        self._seq_ids: list[int] = []
        self._lens: list[int] = []
        self._groups: list[tuple[int, int, int]] = []  # (row start, row end, capacity)

    def plan(self, ctx: StepContext, seq_ids: list[int], lens: list[int]) -> None:
        """Set ctx.mirror_rebuild, ctx.mirror_groups ([] = no mirror) and the attention
        widths ctx.decode_groups for this step."""
        follows = (bool(self._groups) and seq_ids == self._seq_ids
                   and all(n == m + 1 for n, m in zip(lens, self._lens))
                   and all(max(lens[a:b]) <= cap for a, b, cap in self._groups))
        if not follows:
            bs = self.block_size
            groups = decode_groups(lens) or [(0, len(lens), max(lens))]
            self._groups = [(a, b, -(-(w + self.headroom) // bs) * bs) for a, b, w in groups]
            if sum((b - a) * cap for a, b, cap in self._groups) * self.bytes_per_token \
                    > self.max_bytes:
                self._groups = []
        self._seq_ids, self._lens = seq_ids, lens
        ctx.mirror_rebuild, ctx.mirror_groups = not follows, self._groups
        # a group keeps its rows while the mirror follows; its width is its longest now
        ctx.decode_groups = ([(a, b, max(lens[a:b])) for a, b, _ in self._groups]
                             if self._groups else decode_groups(lens))


def torch_prefill_layout(ctx: StepContext, lens: list[int], device: torch.device,
                         starts: list[int] | None = None, width: int = 0) -> None:
    """Metadata of the torch prefill, which pads every sequence to the longest: the flat
    row of each padded position, the causal & valid mask, the rows that hold tokens.
    With `starts` (a later chunk of a prompt), query i of sequence b sits at position
    starts[b] + i and the keys are positions 0..width-1 of the sequence's blocks."""
    length = max(lens)
    offsets = list(itertools.accumulate(lens[:-1], initial=0))
    steps = torch.arange(length, device=device)

    def tensor(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    ctx.padded_index = tensor([[st + min(i, n - 1) for i in range(length)]
                               for st, n in zip(offsets, lens)])
    ragged = any(n != length for n in lens)
    ctx.prefill_positions = (steps[None, :], steps)  # queries [1, L], keys [L]
    if starts is not None:
        q_pos = tensor(starts)[:, None] + steps  # [B, L]
        k_pos = torch.arange(width, device=device)
        ctx.prefill_positions = (q_pos, k_pos)
        end = tensor([st + n for st, n in zip(starts, lens)])
        mask = (k_pos <= q_pos[:, :, None]) & (k_pos < end[:, None, None])
        ctx.prefill_mask = mask.unsqueeze(1)  # [B, 1, L, width]
    elif ragged:
        key_valid = torch.arange(length, device=device)[None, :] < tensor(lens)[:, None]
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        ctx.prefill_mask = (causal[None] & key_valid[:, None, :]).unsqueeze(1)
    if ragged:
        ctx.valid_rows = tensor([bi * length + i for bi, n in enumerate(lens) for i in range(n)])


CAUSAL_MASK = "prefill_mask_causal"  # the prefill's mask before image_blocks widened it


def image_blocks(ctx: StepContext, blocks: list[list[tuple[int, int]]]) -> None:
    """Gemma 3's images in the torch prefill's mask: a query in image span (first, count)
    of its sequence also sees that span's later keys, so each image's tokens attend to
    each other both ways (HF's token_type_ids blocks: OR(causal, same image); a window
    is applied on top, AND, by _window_mask). `blocks[b]`: sequence b's image spans.
    An image is computed within one chunk (the scheduler's rule), so a span's keys are
    all in this step."""
    q_pos, k_pos = ctx.prefill_positions  # [B or 1, L], [width]
    b, device = len(blocks), k_pos.device
    q_pos = q_pos.expand(b, -1)
    q_img = torch.full(q_pos.shape, -1, dtype=torch.long, device=device)
    k_img = torch.full((b, k_pos.shape[0]), -1, dtype=torch.long, device=device)
    for row, spans in enumerate(blocks):
        for i, (first, count) in enumerate(spans):
            q_img[row].masked_fill_((q_pos[row] >= first) & (q_pos[row] < first + count), i)
            k_img[row].masked_fill_((k_pos >= first) & (k_pos < first + count), i)
    same = (q_img[:, :, None] == k_img[:, None, :]) & (q_img[:, :, None] >= 0)
    base = ctx.prefill_mask
    if base is None:  # causal over equal-length rows starting at 0
        base = (k_pos[None, :] <= q_pos[0][:, None])[None, None]
    ctx.scratch[CAUSAL_MASK] = base  # (what Attention.images_causal layers read)
    ctx.prefill_mask = base | same.unsqueeze(1)


def image_key_limits(blocks: list[list[tuple[int, int]]], starts: list[int],
                     lens: list[int]) -> list[int]:
    """image_blocks' rule as the Triton prefill takes it: for each prefill row (sequence
    after sequence), the last of its sequence's step rows it sees: its own (causal), or
    for an image token the last of its image (which the scheduler keeps in the chunk)."""
    out: list[int] = []
    for spans, start, n in zip(blocks, starts, lens, strict=True):
        limits = list(range(n))
        for first, count in spans:
            lo, hi = max(first - start, 0), min(first + count - start, n)
            if lo < hi:  # (an image in the cached context, or past the chunk: none)
                limits[lo:hi] = [first + count - 1 - start] * (hi - lo)
        out += limits
    return out


def decode_groups(lens: list[int]) -> list[tuple[int, int, int]] | None:
    """(start, end, width) row groups for the torch decode path, rows sorted longest
    context first: a new group starts where the context is under half its group's first,
    so one long sequence does not make every row attend over its length (the padding at
    most doubles the work). None: one group."""
    groups, start, width = [], 0, lens[0]
    for i in range(1, len(lens) + 1):
        if i == len(lens) or 2 * lens[i] < width:
            groups.append((start, i, width))
            if i < len(lens):
                start, width = i, lens[i]
        else:
            width = max(width, lens[i])  # (rows out of order stay correct, only slower)
    return groups if len(groups) > 1 else None


def _first_key(q_pos: torch.Tensor, window: int, chunk: int) -> torch.Tensor:
    """The first key position a query at q_pos sees: q_pos - window + 1 with a sliding
    window, the start of its chunk (q_pos - q_pos % chunk) with chunked attention, the
    later of both with both; 0 with neither."""
    first = torch.zeros_like(q_pos)
    if window:
        first = torch.maximum(first, q_pos - window + 1)
    if chunk:
        first = torch.maximum(first, q_pos - q_pos % chunk)
    return first


def _decode_mask(ctx: StepContext, width: int, window: int = 0, chunk: int = 0
                 ) -> torch.Tensor:
    """[B, 1, 1, width] bool: key position < context length (and, with a window or
    chunks, >= the new token's first key, _first_key); built once per step, window and
    chunk."""
    name = f"decode_mask_{window}_{chunk}"
    mask = ctx.scratch.get(name)
    if mask is None or mask.shape[-1] != width:
        keys = torch.arange(width, device=ctx.context_lens.device)[None, :]
        lens = ctx.context_lens[:, None]
        visible = keys < lens
        if window or chunk:  # the new token sits at position len - 1
            visible &= keys >= _first_key(lens.long() - 1, window, chunk)
        mask = ctx.scratch[name] = visible[:, None, None]
    return mask


def _window_mask(ctx: StepContext, window: int, chunk: int = 0) -> torch.Tensor:
    """The prefill's mask (causal & valid) with the keys before each query's first
    (_first_key: older than `window` positions, or in an earlier chunk) removed; built
    once per step, window and chunk."""
    name = f"prefill_window_{window}_{chunk}"
    mask = ctx.scratch.get(name)
    if mask is None:
        q_pos, k_pos = ctx.prefill_positions  # [B or 1, L], [width]
        near = (k_pos[None, None, :] >= _first_key(q_pos, window, chunk)[:, :, None]
                ).unsqueeze(1)
        base = ctx.prefill_mask
        if base is None:  # causal over equal-length rows starting at 0
            base = (k_pos[None, :] <= q_pos[0][:, None])[None, None]
        mask = ctx.scratch[name] = base & near
    return mask


def _append_index(ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of each sequence's new token in a [B, capacity, ...] mirror."""
    idx = ctx.scratch.get("append_index")
    if idx is None:
        lens = ctx.context_lens
        idx = ctx.scratch["append_index"] = (torch.arange(lens.shape[0], device=lens.device),
                                             lens.long() - 1)
    return idx


def _read_blocks(cache: torch.Tensor, scale: float, index: torch.Tensor, out: torch.Tensor,
                 scratch: dict[str, torch.Tensor]) -> None:
    """out = the cache's blocks at `index`; an FP8 cache's through a scratch buffer,
    dequantized into out's dtype."""
    if not is_fp8(cache.dtype):
        torch.index_select(cache, 0, index, out=out)
        return
    raw = _buffer(scratch, "fp8", out.shape, torch.uint8, cache.device)  # no FP8 index_select
    torch.index_select(cache.view(torch.uint8), 0, index, out=raw)
    dequantize_kv(raw.view(cache.dtype), scale, out)


def _as_read(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x as a read of the cache returns it: through FP8 and back for an FP8 cache."""
    if not is_fp8(cache_dtype):
        return x
    return dequantize_kv(quantize_kv(x, cache_dtype, scale), scale, torch.empty_like(x))


def _buffer(pool: dict[str, torch.Tensor], name: str, shape: tuple[int, ...],
            dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous `shape` view of pool[name], which grows when too small and is reused
    otherwise (a fresh multi-MB tensor per layer and step costs page faults on the CPU)."""
    numel = math.prod(shape)
    buf = pool.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = pool[name] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)
