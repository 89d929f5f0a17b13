"""The batched LoRA ops (torch backend) against PEFT's one line, token by token.

Helpers here (`make_weights`, `per_token_reference`) are shared with the Triton tests.
"""

from __future__ import annotations

import pytest
import torch

from loraplex.layers.linear import Linear
from loraplex.lora import ops
from loraplex.lora.layers import LinearWithLoRA
from loraplex.lora.meta import LoRABatchMeta
from loraplex.lora.ops import torch_ops

CPU = torch.device("cpu")


def make_weights(ranks: list[int], max_rank: int, d_in: int, sizes: list[int],
                 pad: float = 0.0, gen: torch.Generator | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slot buffers as LinearWithLoRA holds them; `pad` fills past each slot's rank."""
    n, slots = len(sizes), len(ranks)
    a = torch.full((slots, max_rank, n, d_in), pad)
    b = torch.full((slots, sum(sizes), max_rank), pad)
    for s, r in enumerate(ranks):
        a[s, :r] = torch.randn(r, n, d_in, generator=gen) / d_in ** 0.5
        b[s, :, :r] = torch.randn(sum(sizes), r, generator=gen) / r ** 0.5
    return a, b, torch.tensor(ranks, dtype=torch.int32)


def per_token_reference(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                        ranks: list[int], token_slots: list[int], sizes: list[int]
                        ) -> torch.Tensor:
    """y[i, cols_k] += B_k[s] @ (A_k[s] @ x[i]) in float64, one token and slice at a time."""
    out = y.double().clone()
    for i, s in enumerate(token_slots):
        if s < 0 or ranks[s] == 0:
            continue
        r, col = ranks[s], 0
        for k, size in enumerate(sizes):
            t = a[s, :r, k].double() @ x[i].double()
            out[i, col:col + size] += b[s, col:col + size, :r].double() @ t
            col += size
    return out


def _case(token_slots, ranks, max_rank=64, d_in=48, sizes=(40, 8, 8), pad=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a, b, lora_ranks = make_weights(ranks, max_rank, d_in, list(sizes), pad, gen)
    x = torch.randn(len(token_slots), d_in, generator=gen)
    y = torch.randn(len(token_slots), sum(sizes), generator=gen)
    want = per_token_reference(y, x, a, b, ranks, token_slots, list(sizes)).float()
    return x, y, a, b, lora_ranks, want


DECODE = [2, -1, 0, 2, 3, -1, 0, 0, 1, 3]
PREFILL = [1] * 9 + [-1] * 4 + [3] * 30 + [0] * 2 + [2] * 17  # one segment per sequence
# one adapter for every token (the plain-matmul path), and one beside base tokens (not)
WHOLE_BATCH, ONE_TOKEN, ONE_WITH_BASE = [1] * 7, [3], [-1, 1, 1, -1]


@pytest.mark.parametrize("token_slots", [DECODE, PREFILL, WHOLE_BATCH, ONE_TOKEN, ONE_WITH_BASE],
                         ids=["decode", "prefill", "whole_batch", "one_token", "one_with_base"])
@pytest.mark.parametrize("sizes", [(40, 8, 8), (24, 24), (32,)], ids=["qkv", "gate_up", "o"])
def test_add_lora_matches_per_token_reference(token_slots, sizes):
    ranks = [8, 64, 16, 32]  # one slot per rank class, so no bucket reads any padding
    x, y, a, b, lora_ranks, want = _case(token_slots, ranks, sizes=sizes, pad=float("nan"))
    got = y.clone()
    ops.add_lora(got, x, a, b, lora_ranks, LoRABatchMeta.make(token_slots, CPU), list(sizes))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("token_slots", [[0, 1, 2, 3, 1], [2, 2, 0]], ids=["four", "two"])
def test_adapters_sharing_a_rank_class_with_no_base_token(token_slots):
    """Every token has an adapter and one bucket holds them all: still one slot each.
    (Zero padding: a bucket reads up to its widest rank, LinearWithLoRA's invariant.)"""
    ranks = [16, 12, 16, 9]  # one rank class
    x, y, a, b, lora_ranks, want = _case(token_slots, ranks, max_rank=16)
    got = y.clone()
    ops.add_lora(got, x, a, b, lora_ranks, LoRABatchMeta.make(token_slots, CPU), [40, 8, 8])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("token_slots", [WHOLE_BATCH, DECODE], ids=["whole_batch", "decode"])
def test_bf16_outputs_get_fp32_products_rounded_once(token_slots):
    ranks = [8, 64, 16, 32]
    x, y, a, b, lora_ranks, _ = _case(token_slots, ranks)
    x, y, a, b = (v.bfloat16() for v in (x, y, a, b))
    want = per_token_reference(y, x, a, b, ranks, token_slots, [40, 8, 8]).bfloat16()
    got = y.clone()
    ops.add_lora(got, x, a, b, lora_ranks, LoRABatchMeta.make(token_slots, CPU), [40, 8, 8])
    torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2)


def test_only_a_batch_all_on_one_adapter_takes_the_plain_matmul_path():
    ranks = [8, 64, 16, 32]
    for token_slots, slot in ((WHOLE_BATCH, 1), (ONE_TOKEN, 3), (ONE_WITH_BASE, None),
                              (DECODE, None), ([0, 0, 2], None), ([1, 1, 1, 3], None)):
        buckets = LoRABatchMeta.make(token_slots, CPU).rank_buckets(ranks)
        assert [b.whole_batch_slot for b in buckets if slot is not None] == (
            [slot] if slot is not None else []), token_slots
        assert slot is not None or all(b.whole_batch_slot is None for b in buckets)
    # a slot without weights in this layer leaves its tokens out: not the whole batch
    assert LoRABatchMeta.make([0, 0, 2], CPU).rank_buckets([8, 0, 0, 0])[0].whole_batch_slot is None


def test_ranks_in_one_class_share_a_bucket_and_padding_is_zero():
    ranks = [20, 32, 0, 24]  # 20, 24, 32 -> one bucket of rank 32; slot 2 has no weights here
    slots = [0, 1, 2, 3, -1, 1, 2]
    x, y, a, b, lora_ranks, want = _case(slots, ranks)
    meta = LoRABatchMeta.make(slots, CPU)
    [bucket] = meta.rank_buckets(ranks)
    assert bucket.rank == 32 and bucket.slots.tolist() == [0, 1, 3]
    got = y.clone()
    ops.add_lora(got, x, a, b, lora_ranks, meta, [40, 8, 8])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[[2, 4, 6]], y[[2, 4, 6]])  # rank-0 slot and base rows untouched


def test_rank_buckets_touch_only_their_rank():
    meta = LoRABatchMeta.make([0, 1, 2, 3, 1], CPU)
    buckets = meta.rank_buckets([8, 64, 8, 16])
    assert [(bk.rank, bk.slots.tolist()) for bk in buckets] == [(8, [0, 2]), (64, [1]), (16, [3])]
    assert buckets[0].slot_slice == slice(0, 3, 2)  # evenly spaced: weights are a view
    assert meta.rank_buckets([8, 64, 8, 16]) is buckets  # memoized for the step
    [only] = meta.rank_buckets([8, 0, 5, 8])  # a rank-0 slot has nothing to add
    assert only.rank == 8 and only.slots.tolist() == [0, 2, 3] and only.slot_slice is None
    assert only.gather.tolist() == [[0], [2], [3]] and only.scatter_tok.tolist() == [0, 2, 3]


def test_a_hot_segment_is_split_not_padded_into_every_row():
    # one adapter with a long prompt beside many one-token ones (a Zipf prefill): padding
    # every slot to 60 rows would be 12 x 60; split, the batch stays under 2x the real rows
    slots = [0] * 60 + [s for s in range(1, 12)] + [-1, 3]
    ranks = [16] * 12
    x, y, a, b, lora_ranks, want = _case(slots, ranks, max_rank=16)
    meta = LoRABatchMeta.make(slots, CPU)
    [bucket] = meta.rank_buckets(ranks)
    real = sum(s >= 0 for s in slots)
    assert bucket.gather.numel() <= 2 * real + 12 and len(bucket.slots) <= 2 * 12
    assert bucket.slots.tolist().count(0) > 1 and bucket.slot_slice is None
    assert sorted(bucket.scatter_tok.tolist()) == [i for i, s in enumerate(slots) if s >= 0]
    got = y.clone()
    ops.add_lora(got, x, a, b, lora_ranks, meta, [40, 8, 8])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    buf = torch_ops.lora_shrink(x, a, lora_ranks, meta)
    got = y.clone()
    torch_ops.lora_expand(buf, b, got, lora_ranks, meta, [40, 8, 8])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_shrink_and_expand_through_the_buffer():
    slots, ranks = [1, 0, -1, 1], [8, 16]
    x, y, a, b, lora_ranks, want = _case(slots, ranks, max_rank=16, sizes=(24, 24))
    meta = LoRABatchMeta.make(slots, CPU)
    buf = torch_ops.lora_shrink(x, a, lora_ranks, meta)
    assert buf.shape == (1, 4, 2, 16) and buf.dtype == torch.float32
    torch.testing.assert_close(buf[0, 0, 1, :16], a[1, :, 1] @ x[0])
    got = y.clone()
    torch_ops.lora_expand(buf, b, got, lora_ranks, meta, [24, 24])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_meta_tiles_and_in_place_prepare():
    meta = LoRABatchMeta(max_tokens=40, max_loras=4, device=CPU, block_m=4)
    buffers = [t.data_ptr() for t in (meta.tile_slot, meta.sorted_token_ids, meta.num_tiles)]
    for step in ([3] * 9 + [-1, 0, 0], [1, -1, 2, 1], []):
        meta.prepare(step)
        assert [t.data_ptr() for t in (meta.tile_slot, meta.sorted_token_ids,
                                       meta.num_tiles)] == buffers
        n = int(meta.num_tiles)
        covered = []
        for t in range(n):
            rows = meta.sorted_token_ids[meta.tile_start[t]:meta.tile_start[t] + meta.tile_len[t]]
            assert 1 <= len(rows) <= 4 and all(step[i] == meta.tile_slot[t] for i in rows)
            covered += rows.tolist()
        assert sorted(covered) == [i for i, s in enumerate(step) if s >= 0]
        assert (meta.tile_slot[n:] == -1).all() and n <= meta.max_tiles
        assert meta.token_lora_indices[:len(step)].tolist() == step
    assert meta.no_lora
    with pytest.raises(ValueError, match="41 tokens"):
        meta.prepare([0] * 41)


def test_prefilled_meta_gives_the_same_result_as_a_fresh_one():
    slots, ranks = PREFILL, [8, 64, 16, 32]
    x, y, a, b, lora_ranks, want = _case(slots, ranks)
    meta = LoRABatchMeta(max_tokens=128, max_loras=4, device=CPU).prepare(DECODE)
    meta.prepare(slots)
    got = y.clone()
    ops.add_lora(got, x, a, b, lora_ranks, meta, [40, 8, 8])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_backend_choice(monkeypatch):
    x = torch.zeros(1, 1)
    monkeypatch.delenv("LORAPLEX_LORA_BACKEND", raising=False)
    assert ops.backend(x) is torch_ops  # CPU tensors: torch
    monkeypatch.setenv("LORAPLEX_LORA_BACKEND", "torch")
    assert ops.backend(x) is torch_ops
    monkeypatch.setenv("LORAPLEX_LORA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="LORAPLEX_LORA_BACKEND"):
        ops.backend(x)


def test_layer_tracks_each_slots_real_rank():
    layer = LinearWithLoRA(Linear(16, [8, 4, 4]), max_loras=3, max_rank=16, dtype=torch.float32)
    a = [torch.randn(4, 16), None, torch.randn(8, 16)]  # q at r=4, v at r=8 (rank_pattern)
    b = [torch.randn(8, 4), None, torch.randn(4, 8)]
    layer.set_lora(1, a, b)
    assert layer.slot_ranks == [0, 8, 0] and layer.lora_ranks.tolist() == [0, 8, 0]
    assert torch.equal(layer.lora_a_stacked[1, :8, 2], a[2])
    assert torch.equal(layer.lora_b_stacked[1, 12:, :8], b[2])
    assert not layer.lora_a_stacked[1, :, 1].any() and not layer.lora_b_stacked[1, :, 8:].any()
    layer.reset_lora(1)
    assert layer.slot_ranks == [0, 0, 0] and not layer.lora_ranks.any()
    assert not layer.lora_a_stacked.any() and not layer.lora_b_stacked.any()


def test_a_reused_slot_keeps_no_trace_of_its_last_adapter():
    """Slots are swapped in place (set_packed zeros only the ranks the last adapter used
    past the new one's): after r=8 -> r=6 with one slice absent, the slot reads as if it
    were fresh, also through a rank bucket of 8 that reads past the new rank."""
    sizes, d_in = [8, 4, 4], 16
    layer = LinearWithLoRA(Linear(d_in, sizes), max_loras=2, max_rank=16, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)

    def adapter(ranks):
        return ([torch.randn(r, d_in, generator=gen) if r else None for r in ranks],
                [torch.randn(out, r, generator=gen) if r else None for out, r in zip(sizes, ranks)])
    layer.set_lora(0, *adapter([8, 8, 8]))
    layer.set_lora(1, *adapter([8, 8, 8]))
    new = adapter([6, 0, 3])  # k absent, v at a lower rank (rank_pattern)
    layer.set_lora(1, *new)
    fresh = LinearWithLoRA(Linear(d_in, sizes), max_loras=2, max_rank=16, dtype=torch.float32)
    fresh.set_lora(1, *new)
    assert layer.slot_ranks[1] == 6 and layer.lora_ranks.tolist() == [8, 6]
    assert torch.equal(layer.lora_a_stacked[1], fresh.lora_a_stacked[1])
    assert torch.equal(layer.lora_b_stacked[1], fresh.lora_b_stacked[1])

    slots = [0, 1, 1, -1]
    meta = LoRABatchMeta.make(slots, CPU)
    [bucket] = meta.rank_buckets(layer.slot_ranks)
    assert bucket.rank == 8  # slot 1's ranks 6 and 7 are read: they must be zeros
    x, y = torch.randn(4, d_in, generator=gen), torch.zeros(4, sum(sizes))
    got = y.clone()
    ops.add_lora(got, x, layer.lora_a_stacked, layer.lora_b_stacked, layer.lora_ranks, meta,
                 sizes)
    want = per_token_reference(y, x, layer.lora_a_stacked, layer.lora_b_stacked, [8, 6],
                               slots, sizes)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1:3, 8:12], torch.zeros(2, 4))  # k: no adapter weights
