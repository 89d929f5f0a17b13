"""Batched multi-LoRA ops in plain torch: the CPU path and the oracle for GPU kernels.

For every token i with adapter slot s = idx[i] (PEFT's one line, batched):

    shrink:  t[i] = A[s] @ x[i]              A: [S, n_slices * R, in]
    expand:  y[i, slice_k] += B_k[s] @ t[i, k*R:(k+1)*R]    B_k: [S, out_k, R]

B already carries the adapter's scaling (folded in at load time). Tokens are grouped by
slot (see LoRABatchMeta), so each op is a gather, a bmm over the G active slots, and a
scatter-add; each active adapter's A and B are read once per step.
"""

from __future__ import annotations

import torch

from loraplex.lora.meta import LoRABatchMeta


def _select_slots(stacked: torch.Tensor, meta: LoRABatchMeta) -> torch.Tensor:
    if len(meta.active_slot_list) == stacked.shape[0]:
        return stacked  # every slot active: no copy
    return stacked.index_select(0, meta.active_slots)


def lora_shrink(x: torch.Tensor, a_stacked: torch.Tensor, meta: LoRABatchMeta) -> torch.Tensor:
    """x: [T, in], a_stacked: [S, RT, in] -> buf: [G, Tmax, RT] (fp32 accumulate not needed on CPU)."""
    g, tmax = len(meta.active_slot_list), meta.max_group_len
    xs = x.index_select(0, meta.gather_idx).view(g, tmax, x.shape[1])
    a = _select_slots(a_stacked, meta).to(x.dtype)  # [G, RT, in]
    return torch.bmm(xs, a.transpose(1, 2))


def lora_expand(buf: torch.Tensor, b_stacked: list[torch.Tensor], y: torch.Tensor,
                meta: LoRABatchMeta, output_sizes: list[int], rank: int) -> None:
    """y[:, slice_k] += B_k[idx] @ buf[..., k*R:(k+1)*R] for each packed slice k, in place."""
    g, tmax = len(meta.active_slot_list), meta.max_group_len
    offset = 0
    for k, (b, out_k) in enumerate(zip(b_stacked, output_sizes, strict=True)):
        b_active = _select_slots(b, meta).to(y.dtype)  # [G, out_k, R]
        t_k = buf[:, :, k * rank:(k + 1) * rank]  # [G, Tmax, R]
        delta = torch.bmm(t_k, b_active.transpose(1, 2)).view(g * tmax, out_k)
        delta = delta.index_select(0, meta.scatter_pos)  # [N, out_k]
        y[:, offset:offset + out_k].index_add_(0, meta.scatter_tok, delta)
        offset += out_k


def add_lora(y: torch.Tensor, x: torch.Tensor, a_stacked: torch.Tensor,
             b_stacked: list[torch.Tensor], meta: LoRABatchMeta, output_sizes: list[int],
             rank: int) -> None:
    """y += LoRA(x) for every token whose slot is >= 0; tokens of the base are untouched."""
    buf = lora_shrink(x, a_stacked, meta)
    lora_expand(buf, b_stacked, y, meta, output_sizes, rank)
