"""The fused MXFP4 dequantize-matmul kernel (gpt-oss's experts) against the torch
dequantize path.

Without CUDA the kernel runs on CPU tensors under TRITON_INTERPRET=1 (fp32, exact up to
summation order) and every launch is also compiled for sm_90. With CUDA the same checks
run compiled, in bf16 / fp16.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from loraplex.layers.quantization import mxfp4
from tests.triton_compile import compile_for_h100, import_kernels, torch_and_triton

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

triton_mxfp4 = import_kernels("loraplex.layers.quantization.triton_mxfp4")
interpreted = pytest.mark.skipif(CUDA or not triton_mxfp4._INTERPRETED,
                                 reason="interpreter tests run where there is no CUDA")


def make_matrix(n: int, k: int, bias: bool = False, seed: int = 0) -> mxfp4.MXFP4Matrix:
    """A random weight quantized to MXFP4, its blocks' scales spread over 2^-8 .. 2^2."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.exp2(torch.randint(-8, 3, (n, k // 32, 1),
                                                                   generator=gen)
                                                     ).repeat_interleave(32, -1).view(n, k)
    packed, scales = mxfp4.quantize(w)
    return mxfp4.MXFP4Matrix(packed, scales, torch.randn(n, generator=gen) if bias else None)


def torch_matmul(x: torch.Tensor, layer: mxfp4.MXFP4Matrix) -> torch.Tensor:
    y = x @ mxfp4.dequantize(layer.packed, layer.scales, x.dtype).T
    return y + layer.bias if layer.bias is not None else y


@interpreted
@pytest.mark.parametrize("m", [1, 7, 40])
def test_kernel_matches_torch_dequantize(m):
    """N = 80 and K = 224: neither a multiple of the tiles (K is one of the 32-input
    blocks, as MXFP4 requires)."""
    layer = make_matrix(80, 224, bias=m == 7)
    x = torch.randn(m, 224, generator=torch.Generator().manual_seed(m))
    torch.testing.assert_close(triton_mxfp4.quant_matmul(x, layer), torch_matmul(x, layer),
                               rtol=1e-5, atol=1e-4)


@interpreted
@pytest.mark.parametrize("ways", [None, 2, 3, 5])
def test_kernel_split_over_k(ways):
    layer = make_matrix(64, 384, seed=3)
    x = torch.randn(2, 384, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(triton_mxfp4.quant_matmul(x, layer, ways=ways),
                               torch_matmul(x, layer), rtol=1e-5, atol=1e-4)


@interpreted
def test_mxfp4_experts_on_the_kernel(monkeypatch):
    """gpt-oss's MXFP4 experts (biases, clamped SwiGLU) through the kernel, one expert
    projection at a time: the torch path's output."""
    from loraplex.layers.activation import ClampedSwiGLU
    from loraplex.layers.quantized_experts import MXFP4FusedExperts

    gen = torch.Generator().manual_seed(5)
    experts = MXFP4FusedExperts(64, 96, 4, ClampedSwiGLU())
    experts.fill_random(gen)
    x = torch.randn(6, 64, generator=gen)
    weights = torch.rand(6, 2, generator=gen)
    chosen = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(6)])
    out, _ = torch_and_triton(monkeypatch, triton_mxfp4, lambda: experts(x, weights, chosen))
    torch.testing.assert_close(out["triton"], out["torch"], rtol=1e-4, atol=1e-4)


_LAUNCHES = """
from loraplex.layers.quantization import mxfp4
from loraplex.layers.quantization import triton_mxfp4 as T
T.code4_gemm_kernel = Capture(T.code4_gemm_kernel)
for dtype in (torch.bfloat16, torch.float16):
    for n, k in ((5760, 2880), (2880, 2880)):  # gpt-oss's gate_up and down projections
        layer = mxfp4.MXFP4Matrix(torch.zeros(n, k // 2, dtype=torch.uint8),
                                  torch.zeros(n, k // 32, dtype=torch.uint8))
        for m in (1, 48, 512):
            T.quant_matmul(torch.zeros(m, k, dtype=dtype), layer)
"""


@pytest.mark.skipif(CUDA, reason="with CUDA the GPU test compiles the kernel for real")
def test_kernel_compiles_for_h100():
    assert compile_for_h100(_LAUNCHES) == 12


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 16, 200])
def test_kernel_on_gpu(dtype, m):
    layer = make_matrix(5760, 2880)
    layer = mxfp4.MXFP4Matrix(layer.packed.to(DEVICE), layer.scales.to(DEVICE))
    x = torch.randn(m, 2880, device=DEVICE, dtype=dtype)
    want = torch_matmul(x.float(), layer)
    got = triton_mxfp4.quant_matmul(x, layer).float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
