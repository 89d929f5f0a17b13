"""The Triton LoRA kernels against the torch reference.

Without CUDA the kernels run on CPU tensors under TRITON_INTERPRET=1 (small shapes: the
interpreter runs every program in Python). With CUDA the same checks run compiled, on
bigger shapes, plus a CUDA-graph replay. The weights' rank padding holds NaN for the
kernels (zeros for the reference): a kernel that reads past a slot's rank fails.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from loraplex.lora import ops
from loraplex.lora.meta import LoRABatchMeta
from loraplex.lora.ops import torch_ops
from tests.test_lora_ops import make_weights
from tests.triton_compile import compile_for_h100, import_kernels

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

CUDA = torch.cuda.is_available()


triton_ops = import_kernels("loraplex.lora.ops.triton_ops")
DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
interpreted = pytest.mark.skipif(CUDA or not triton_ops._INTERPRETED,
                                 reason="interpreter tests run where there is no CUDA")
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _case(token_slots, ranks, d_in, sizes, dtype, max_rank=64, seed=0):
    """(x, y, a_nan, b_nan, a_zero, b_zero, lora_ranks) on DEVICE in `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    a, b, lora_ranks = make_weights(ranks, max_rank, d_in, sizes, 0.0, gen)
    rank_ax = torch.arange(max_rank)
    pad_a = rank_ax[None, :, None, None] >= lora_ranks[:, None, None, None]
    pad_b = rank_ax[None, None, :] >= lora_ranks[:, None, None]
    x = torch.randn(len(token_slots), d_in, generator=gen)
    y = torch.randn(len(token_slots), sum(sizes), generator=gen)
    out = [x, y, a.masked_fill(pad_a, float("nan")), b.masked_fill(pad_b, float("nan")), a, b]
    return [t.to(DEVICE, dtype) for t in out] + [lora_ranks.to(DEVICE)]


def _reference(y, x, a, b, lora_ranks, token_slots, sizes):
    """torch_ops on the CPU, the oracle, whatever device the case lives on."""
    want = y.cpu().clone()
    torch_ops.add_lora(want, x.cpu(), a.cpu(), b.cpu(), lora_ranks.cpu(),
                       LoRABatchMeta.make(token_slots, torch.device("cpu")), sizes)
    return want.to(y.device)


def _check_add_lora(token_slots, ranks, d_in, sizes, dtype, meta=None):
    x, y, a_nan, b_nan, a, b, lora_ranks = _case(token_slots, ranks, d_in, sizes, dtype)
    meta = meta or LoRABatchMeta.make(token_slots, DEVICE)
    want, got = _reference(y, x, a, b, lora_ranks, token_slots, sizes), y.clone()
    triton_ops.add_lora(got, x, a_nan, b_nan, lora_ranks, meta, sizes)
    base = [i for i, s in enumerate(token_slots) if s < 0 or ranks[s] == 0]
    assert torch.equal(got[base], y[base])  # base tokens and rank-0 slots untouched
    torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])


# slots 0..5: mixed ranks, slot 4 has no weights in this layer
RANKS = [8, 64, 16, 24, 0, 40]
DECODE = [2, -1, 0, 5, 3, 4, 1, -1, 0]  # one token per sequence
PREFILL = [1] * 21 + [-1] * 3 + [5] * 7 + [0] * 2 + [3] * 18  # segments of different lengths
SIZES = {"qkv": [48, 16, 16], "gate_up": [40, 40], "o": [32]}


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("slots", [DECODE, PREFILL], ids=["decode", "prefill"])
@pytest.mark.parametrize("proj", list(SIZES))
def test_add_lora_interpreted(proj, slots, dtype):
    _check_add_lora(slots, RANKS, 40, SIZES[proj], dtype)


@interpreted
@pytest.mark.parametrize("max_split_k", [1, 32])
def test_shrink_partials_sum_to_reference(monkeypatch, max_split_k):
    monkeypatch.setattr(triton_ops, "MAX_SPLIT_K", max_split_k)  # 1: one split, many K steps
    slots, d_in = DECODE + [1, 1], 300
    x, _, a_nan, _, a, _, lora_ranks = _case(slots, RANKS, d_in, SIZES["qkv"], torch.float32)
    meta = LoRABatchMeta.make(slots, DEVICE)
    buf = triton_ops.lora_shrink(x, a_nan, lora_ranks, meta)
    assert buf.shape[0] == (1 if max_split_k == 1 else 3)  # ceil(300 / 128) splits
    want = torch_ops.lora_shrink(x, a, lora_ranks, meta)[0]
    for i, s in enumerate(slots):
        if s >= 0:
            r = RANKS[s]
            torch.testing.assert_close(buf.sum(0)[i, :, :r], want[i, :, :r], rtol=1e-4, atol=1e-4)


@interpreted
def test_expand_adds_split_partials():
    slots = PREFILL
    _, y, _, b_nan, _, b, lora_ranks = _case(slots, RANKS, 8, SIZES["gate_up"], torch.float32)
    meta = LoRABatchMeta.make(slots, DEVICE)
    buf = torch.randn(3, len(slots), 2, 64)
    want, got = y.clone(), y.clone()
    torch_ops.lora_expand(buf, b, want, lora_ranks, meta, SIZES["gate_up"])
    triton_ops.lora_expand(buf, b_nan, got, lora_ranks, meta, SIZES["gate_up"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@interpreted
def test_preallocated_meta_refilled_between_steps():
    """The graph pattern: one meta of fixed capacity, refilled in place, new ranks too."""
    meta = LoRABatchMeta(max_tokens=64, max_loras=6, device=DEVICE)
    grid_bound = meta.max_tiles
    for step, ranks in ((DECODE, RANKS), (PREFILL, [16, 8, 64, 8, 0, 24])):
        meta.prepare(step)
        assert meta.max_tiles == grid_bound
        _check_add_lora(step, ranks, 24, SIZES["qkv"], torch.float32, meta)


@interpreted
def test_backend_env_forces_triton_on_cpu(monkeypatch):
    monkeypatch.setenv("LORAPLEX_LORA_BACKEND", "triton")
    x, y, _, _, a, b, lora_ranks = _case(DECODE, RANKS, 16, SIZES["o"], torch.float32)
    assert ops.backend(x) is triton_ops
    want, got = _reference(y, x, a, b, lora_ranks, DECODE, SIZES["o"]), y.clone()
    ops.add_lora(got, x, a, b, lora_ranks, LoRABatchMeta.make(DECODE, DEVICE), SIZES["o"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


_LAUNCHES = """
from loraplex.lora.meta import LoRABatchMeta
from loraplex.lora.ops import triton_ops as T
T._shrink_kernel, T._expand_kernel = Capture(T._shrink_kernel), Capture(T._expand_kernel)
for dtype, sizes, slots in ((torch.bfloat16, [64, 16, 16], [0, 1, -1, 1]),  # decode tiles
                           (torch.float32, [32], [0] * 20)):  # a 20-row segment: 64-row tiles
    meta, r = LoRABatchMeta.make(slots, torch.device("cpu")), torch.zeros(2, dtype=torch.int32)
    x, y = torch.zeros(len(slots), 512, dtype=dtype), torch.zeros(len(slots), sum(sizes), dtype=dtype)
    a = torch.zeros(2, 16, len(sizes), 512, dtype=dtype)
    b = torch.zeros(2, sum(sizes), 16, dtype=dtype)
    T.add_lora(y, x, a, b, r, meta, sizes)
"""


@pytest.mark.skipif(CUDA, reason="with CUDA the GPU tests compile the kernels for real")
def test_kernels_compile_for_h100():
    """The interpreter accepts code the compiler rejects: compile for sm_90 (no GPU needed),
    within an H100's shared memory."""
    assert compile_for_h100(_LAUNCHES) == 4


# ---- on a GPU: compiled kernels, model-sized shapes, graph replay ----------------------

GPU_RANKS = [8, 64, 16, 32, 0, 40, 8, 64] * 4  # 32 slots


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("proj,d_in,sizes", [("qkv", 4096, [4096, 1024, 1024]),
                                             ("gate_up", 2048, [8192, 8192]),
                                             ("down", 14336, [4096])])
@pytest.mark.parametrize("batch", ["decode32x32", "decode32x1", "prefill"])
def test_add_lora_gpu(batch, proj, d_in, sizes, dtype):
    gen = torch.Generator().manual_seed(1)
    if batch == "decode32x32":
        slots = list(range(32))
        slots[5] = slots[17] = -1
    elif batch == "decode32x1":
        slots = [3] * 32
    else:
        lens = torch.randint(1, 300, (6,), generator=gen).tolist()
        slots = [s for s, n in zip([1, -1, 7, 3, 4, 12], lens) for _ in range(n)]
    _check_add_lora(slots, GPU_RANKS, d_in, sizes, dtype)


@needs_cuda
def test_cuda_graph_replays_new_slots_and_ranks():
    sizes, d_in, batch = [1024, 256, 256], 1024, 16
    meta = LoRABatchMeta(max_tokens=batch, max_loras=8, device=DEVICE)
    x, y, _, _, a, b, lora_ranks = _case([0] * batch, [16] * 8, d_in, sizes, torch.bfloat16)
    out = torch.empty_like(y)
    meta.prepare([0] * batch)

    def step():
        out.copy_(y)
        triton_ops.add_lora(out, x, a, b, lora_ranks, meta, sizes)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for slots, ranks in (([1, -1, 2, 2, 5, 0, 7, 3] * 2, [16] * 8),
                         ([6] * 10 + [-1] * 6, [8, 8, 8, 8, 8, 8, 4, 8])):
        meta.prepare(slots)
        lora_ranks.copy_(torch.tensor(ranks, dtype=torch.int32))
        graph.replay()
        want = _reference(y, x, a, b, lora_ranks, slots, sizes)
        torch.testing.assert_close(out.float(), want.float(), rtol=3e-2, atol=3e-2)
