"""Batched multi-LoRA ops in plain torch: the CPU path and the oracle for the Triton kernels.

For every token i with adapter slot s = idx[i] >= 0 and every packed slice k (PEFT's one
line, batched; B carries the adapter's scaling, folded in at load time):

    shrink:  t[i, k] = A[s, :r, k] @ x[i]              r = lora_ranks[s], the slot's real rank
    expand:  y[i, cols_k] += B[s, cols_k, :r] @ t[i, k]

    x [T, in]   a_stacked [S, R, n, in]   b_stacked [S, sum(out_k), R]   y [T, sum(out_k)]
    buf [P, T, n, R] fp32: t = buf.sum(0) (P partial sums over `in`; 1 here, split-K in
    Triton). Entries past a slot's rank and rows of base tokens (slot -1) are undefined.

Slots are padded to R in the buffers (A rank-major, so a slot's first r ranks of every
slice are one block). The active slots are grouped into a few rank buckets
(`LoRABatchMeta.rank_buckets`) and a bucket touches only its first `rank` ranks, so r=8
adapters beside r=64 ones cost r=8. Per bucket: one bmm for the shrink of all slices, one
per slice for the expand, in fp32, over views of the slot buffers, plus a gather and a
scatter of token rows: no loop over adapters. A hot adapter's long segment is split over
several rows when that saves more padded rows than the weight copies it costs
(`meta._rows_per_group`); the weights are copied, not viewed, when rows repeat a slot or
the bucket's slots are not evenly spaced. When one adapter has every token of the step
(one adapter for a whole batch), its bucket skips the batching: two plain matmuls per
slice, as PEFT does, which on the CPU costs a third of the gather/bmm/scatter chain.
"""

from __future__ import annotations

import itertools

import torch

from loraplex.lora.meta import LoRABatchMeta, RankBucket


def _buckets(meta: LoRABatchMeta, lora_ranks: torch.Tensor, max_rank: int) -> list[RankBucket]:
    # Reading ranks off a GPU would sync every layer: there the fallback pays the padding.
    ranks = lora_ranks.tolist() if lora_ranks.device.type == "cpu" else [max_rank] * len(lora_ranks)
    return meta.rank_buckets(ranks)


def _slots(stacked: torch.Tensor, bucket: RankBucket) -> torch.Tensor:
    """stacked[bucket.slots] as a view where it can be (slots are handed out lowest first, so
    usually a range), else a copy of only what the caller kept (the rank rows)."""
    if bucket.slot_slice is not None:
        return stacked[bucket.slot_slice]
    return stacked.index_select(0, bucket.slots)


def _shrink_bucket(x: torch.Tensor, a_stacked: torch.Tensor, b: RankBucket) -> torch.Tensor:
    """t [G, Tmax, n, r] = A[s, :r] @ x for the bucket's tokens, padded per row to Tmax."""
    (g, tmax), (_, _, n, d_in) = b.gather.shape, a_stacked.shape
    xs = x.index_select(0, b.gather.flatten()).view(g, tmax, d_in).float()
    a = _slots(a_stacked[:, :b.rank], b).float().reshape(g, b.rank * n, d_in)
    t = torch.bmm(xs, a.transpose(1, 2)).view(g, tmax, b.rank, n)
    return t.transpose(2, 3).contiguous()  # small; each slice's ranks contiguous for the bmm


def _expand_bucket(t: torch.Tensor, b_stacked: torch.Tensor, y: torch.Tensor, b: RankBucket,
                   output_sizes: list[int]) -> None:
    """y[i, cols_k] += B[s, cols_k, :r] @ t[i, k] for each slice k, from t [G, Tmax, n, r]."""
    w = _slots(b_stacked[:, :, :b.rank], b).float()  # [G, sum(out), r]
    ends = list(itertools.accumulate(output_sizes))
    delta = torch.cat([torch.bmm(t[:, :, k], w[:, end - out:end].transpose(1, 2))
                       for k, (out, end) in enumerate(zip(output_sizes, ends))], dim=2)
    delta = delta.flatten(0, 1).index_select(0, b.scatter_pos)  # [N, sum(out)]
    y.index_add_(0, b.scatter_tok, delta.to(y.dtype))  # whole rows: far faster than per slice


def _add_whole_batch(y: torch.Tensor, x: torch.Tensor, a_stacked: torch.Tensor,
                     b_stacked: torch.Tensor, slot: int, rank: int,
                     output_sizes: list[int]) -> None:
    """y[:, cols_k] += (x @ A[s, :r, k].T) @ B[s, cols_k, :r].T: every token uses slot s."""
    _, _, n, d_in = a_stacked.shape
    a = a_stacked[slot, :rank].reshape(rank * n, d_in).float()
    t = (x.float() @ a.T).view(-1, rank, n)  # [T, r, n]
    w = b_stacked[slot, :, :rank].float()  # [sum(out), r]
    for k, (out, end) in enumerate(zip(output_sizes, itertools.accumulate(output_sizes))):
        if y.dtype == torch.float32:
            y[:, end - out:end].addmm_(t[:, :, k], w[end - out:end].T)
        else:  # fp32 products, one rounding into y
            y[:, end - out:end] += (t[:, :, k] @ w[end - out:end].T).to(y.dtype)


def lora_shrink(x: torch.Tensor, a_stacked: torch.Tensor, lora_ranks: torch.Tensor,
                meta: LoRABatchMeta) -> torch.Tensor:
    """buf[0, i, k, :r] = A[s, :r, k] @ x[i] for every token i with a slot s."""
    _, rank, n, _ = a_stacked.shape
    buf = torch.zeros(1, x.shape[0], n, rank, dtype=torch.float32, device=x.device)
    for b in _buckets(meta, lora_ranks, rank):
        t = _shrink_bucket(x, a_stacked, b).flatten(0, 1).index_select(0, b.scatter_pos)
        buf[0, b.scatter_tok, :, :b.rank] = t
    return buf


def lora_expand(buf: torch.Tensor, b_stacked: torch.Tensor, y: torch.Tensor,
                lora_ranks: torch.Tensor, meta: LoRABatchMeta, output_sizes: list[int]) -> None:
    """y[i, cols_k] += B[s, cols_k, :r] @ buf.sum(0)[i, k, :r], in place, for each slice k."""
    t = buf[0] if buf.shape[0] == 1 else buf.sum(0)  # [T, n, R]
    for b in _buckets(meta, lora_ranks, b_stacked.shape[2]):
        tb = t.index_select(0, b.gather.flatten())[:, :, :b.rank]  # [G * Tmax, n, r]
        _expand_bucket(tb.reshape(*b.gather.shape, *tb.shape[1:]), b_stacked, y, b, output_sizes)


def add_lora(y: torch.Tensor, x: torch.Tensor, a_stacked: torch.Tensor,
             b_stacked: torch.Tensor, lora_ranks: torch.Tensor, meta: LoRABatchMeta,
             output_sizes: list[int]) -> None:
    """y += B[s] (A[s] x) for every token whose slot s >= 0; base tokens are untouched.

    Per bucket, shrink then expand on the padded [G, Tmax] batch, no trip through buf."""
    for b in _buckets(meta, lora_ranks, b_stacked.shape[2]):
        if b.whole_batch_slot is not None:
            _add_whole_batch(y, x, a_stacked, b_stacked, b.whole_batch_slot, b.rank,
                             output_sizes)
        else:
            _expand_bucket(_shrink_bucket(x, a_stacked, b), b_stacked, y, b, output_sizes)
