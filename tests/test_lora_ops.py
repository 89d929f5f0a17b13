"""The batched LoRA op against PEFT's one line, token by token."""

from __future__ import annotations

import torch

from loraplex.lora import ops
from loraplex.lora.meta import LoRABatchMeta


def test_add_lora_matches_per_token_reference():
    torch.manual_seed(0)
    slots, rank, d_in, sizes = 4, 8, 32, [24, 8, 8]
    a = torch.randn(slots, len(sizes) * rank, d_in)
    b = [torch.randn(slots, out, rank) for out in sizes]
    token_slots = [2, -1, 0, 2, 3, -1, 0, 0, 1, 3]
    x = torch.randn(len(token_slots), d_in)
    y = torch.randn(len(token_slots), sum(sizes))
    want = y.clone()
    for i, s in enumerate(token_slots):  # y += B (A x), per token and sub-projection
        if s < 0:
            continue
        off = 0
        for k, out in enumerate(sizes):
            a_k = a[s, k * rank:(k + 1) * rank]
            want[i, off:off + out] += b[k][s] @ (a_k @ x[i])
            off += out
    for active in (token_slots, [s if s in (0, 2) else -1 for s in token_slots]):
        got = y.clone()
        meta = LoRABatchMeta.make(active, torch.device("cpu"))
        ops.add_lora(got, x, a, b, meta, sizes, rank)
        expect = want if active is token_slots else _expected_subset(y, want, active)
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


def _expected_subset(y, want, active):
    out = y.clone()
    for i, s in enumerate(active):
        if s >= 0:
            out[i] = want[i]
    return out
