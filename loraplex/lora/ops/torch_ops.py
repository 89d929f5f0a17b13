"""Batched multi-LoRA ops in plain torch: the CPU path and the oracle for the Triton kernels.

For every token i with adapter slot s = idx[i] >= 0 and every packed slice k (PEFT's one
line, batched; B carries the adapter's scaling, folded in at load time):

    shrink:  t[i, k] = A[s, k, :r] @ x[i]              r = lora_ranks[s], the slot's real rank
    expand:  y[i, cols_k] += B[s, cols_k, :r] @ t[i, k]

    x [T, in]   a_stacked [S, n, R, in]   b_stacked [S, sum(out_k), R]   y [T, sum(out_k)]
    buf [P, T, n, R] fp32: t = buf.sum(0) (P partial sums over `in`; 1 here, split-K in
    Triton). Entries past a slot's rank and rows of base tokens (slot -1) are undefined.

Slots are padded to R in the buffers. The active slots are grouped into a few rank
buckets (`LoRABatchMeta.rank_buckets`) and a bucket touches only its first `rank`
columns, so r=8 adapters beside r=64 ones cost r=8. Per bucket and packed slice each op
is one bmm in fp32 over views of the slot buffers (a copy only when the bucket's slots are
not evenly spaced), plus a gather and a scatter of token rows: no loop over adapters.
"""

from __future__ import annotations

import torch

from loraplex.lora.meta import LoRABatchMeta, RankBucket


def _buckets(meta: LoRABatchMeta, lora_ranks: torch.Tensor, max_rank: int) -> list[RankBucket]:
    # Reading ranks off a GPU would sync every layer: there the fallback pays the padding.
    ranks = lora_ranks.tolist() if lora_ranks.device.type == "cpu" else [max_rank] * len(lora_ranks)
    return meta.rank_buckets(ranks)


def _slots(stacked: torch.Tensor, bucket: RankBucket) -> torch.Tensor:
    """stacked[bucket.slots] as a view where it can be (slots are handed out lowest first, so
    usually a range), else a copy of only what the caller kept (the rank columns)."""
    if bucket.slot_slice is not None:
        return stacked[bucket.slot_slice]
    return stacked.index_select(0, bucket.slots)


def lora_shrink(x: torch.Tensor, a_stacked: torch.Tensor, lora_ranks: torch.Tensor,
                meta: LoRABatchMeta) -> torch.Tensor:
    """buf[0, i, k, :r] = A[s, k, :r] @ x[i] for every token i with a slot s."""
    _, n, rank, _ = a_stacked.shape
    buf = torch.zeros(1, x.shape[0], n, rank, dtype=torch.float32, device=x.device)
    for b in _buckets(meta, lora_ranks, rank):
        r = b.rank
        xs = x[b.gather].float()  # [G, Tmax, in]
        for k in range(n):
            a_k = _slots(a_stacked[:, k, :r], b).float()  # [G, r, in]
            t = torch.bmm(xs, a_k.transpose(1, 2))  # [G, Tmax, r]
            buf[0, b.scatter_tok, k, :r] = t.flatten(0, 1)[b.scatter_pos]
    return buf


def lora_expand(buf: torch.Tensor, b_stacked: torch.Tensor, y: torch.Tensor,
                lora_ranks: torch.Tensor, meta: LoRABatchMeta, output_sizes: list[int]) -> None:
    """y[i, cols_k] += B[s, cols_k, :r] @ buf.sum(0)[i, k, :r], in place, for each slice k."""
    t = buf[0] if buf.shape[0] == 1 else buf.sum(0)  # [T, n, R]
    for b in _buckets(meta, lora_ranks, b_stacked.shape[2]):
        r = b.rank
        tb = t[b.gather]  # [G, Tmax, n, R]
        w = _slots(b_stacked[:, :, :r], b).float()  # [G, sum(out), r]
        col = 0
        for k, out_k in enumerate(output_sizes):
            delta = torch.bmm(tb[:, :, k, :r], w[:, col:col + out_k].transpose(1, 2))
            delta = delta.flatten(0, 1)[b.scatter_pos].to(y.dtype)  # [N, out_k]
            y[:, col:col + out_k].index_add_(0, b.scatter_tok, delta)
            col += out_k


def add_lora(y: torch.Tensor, x: torch.Tensor, a_stacked: torch.Tensor,
             b_stacked: torch.Tensor, lora_ranks: torch.Tensor, meta: LoRABatchMeta,
             output_sizes: list[int]) -> None:
    """y += B[s] (A[s] x) for every token whose slot s >= 0; base tokens are untouched."""
    buf = lora_shrink(x, a_stacked, lora_ranks, meta)
    lora_expand(buf, b_stacked, y, lora_ranks, meta, output_sizes)
