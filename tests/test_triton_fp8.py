"""The fused FP8 dequantize-matmul kernel against the torch dequantize path.

Without CUDA the kernel runs on CPU tensors under TRITON_INTERPRET=1 (fp32, exact up to
summation order) and every launch is also compiled for sm_90. With CUDA the same checks
run compiled, in fp16 / bf16.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from loraplex.layers.quantization import FP8Linear, QuantConfig
from tests.engine_utils import check_engine_on_kernel
from tests.quantized_fixtures import quantize_fp8
from tests.triton_compile import compile_for_h100, import_kernels

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

triton_fp8 = import_kernels("loraplex.layers.quantization.triton_fp8")
interpreted = pytest.mark.skipif(CUDA or not triton_fp8._INTERPRETED,
                                 reason="interpreter tests run where there is no CUDA")


def make_layer(k: int, sizes: list[int], strategy: str, block: tuple[int, int] = (32, 64),
               bias: bool = False, seed: int = 0) -> FP8Linear:
    """A layer of sub-projections `sizes` with FP8 weights of random values: one scale per
    sub-projection, per row, or per block."""
    gen = torch.Generator().manual_seed(seed)
    cfg = QuantConfig("fp8", 8, block[1] if strategy == "block" else -1,
                      fp8_block=block if strategy == "block" else None)
    layer = FP8Linear(k, sizes, bias, cfg)
    for shard, n in enumerate(sizes):
        q, scale, _ = quantize_fp8(torch.randn(n, k, generator=gen), strategy, block)
        layer.load_shard("weight", q, shard)
        layer.load_shard("weight_scale", scale, shard)
    if bias:
        layer.bias.data = torch.randn(sum(sizes), generator=gen)
    return layer


@interpreted
@pytest.mark.parametrize("strategy", ["tensor", "channel", "block"])
@pytest.mark.parametrize("m", [1, 7, 40])
def test_kernel_matches_torch_dequantize(strategy, m):
    """N = 80 (two sub-projections) and K = 200: neither a multiple of the tiles, and the
    last 64-input block partial."""
    layer = make_layer(200, [48, 32], strategy, bias=m == 7)
    x = torch.randn(m, 200, generator=torch.Generator().manual_seed(m))
    want = layer.torch_matmul(x) + (layer.bias if layer.bias is not None else 0)
    torch.testing.assert_close(triton_fp8.quant_matmul(x, layer), want, rtol=1e-5, atol=1e-4)


@interpreted
@pytest.mark.parametrize("ways", [None, 2, 3, 5])
def test_kernel_split_over_k(ways):
    layer = make_layer(384, [64], "block", seed=3)
    x = torch.randn(2, 384, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(triton_fp8.quant_matmul(x, layer, ways=ways),
                               layer.torch_matmul(x), rtol=1e-5, atol=1e-4)


@interpreted
def test_engine_on_the_kernel_matches_the_torch_path(tiny_models, tiny_adapters, prompts,
                                                     monkeypatch):
    """quantization="fp8" on the tiny llama with an adapter, its linears on the kernel: the
    same tokens and logprobs as the torch path (held against HF + PEFT in test_fp8.py)."""
    check_engine_on_kernel(triton_fp8, monkeypatch, tiny_models["llama"],
                           tiny_adapters["llama"]["r8_all"], prompts, quantization="fp8")


_LAUNCHES = """
from loraplex.layers.quantization import FP8Linear, QuantConfig
from loraplex.layers.quantization import triton_fp8 as T
T._fp8_gemm_kernel = Capture(T._fp8_gemm_kernel)
for cfg in (QuantConfig("fp8", 8, 128, fp8_block=(128, 128)), QuantConfig("fp8", 8, -1)):
    for dtype in (torch.bfloat16, torch.float16):
        for layer in (FP8Linear(4096, [4096, 1024, 1024], False, cfg),
                      FP8Linear(4096, [14336, 14336], False, cfg)):
            for m in (1, 48, 512):
                T.quant_matmul(torch.zeros(m, 4096, dtype=dtype), layer)
"""


@pytest.mark.skipif(CUDA, reason="with CUDA the GPU test compiles the kernel for real")
def test_kernel_compiles_for_h100():
    assert compile_for_h100(_LAUNCHES) == 24


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("strategy", ["channel", "block"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 16, 200])
def test_kernel_on_gpu(strategy, dtype, m):
    layer = make_layer(1024, [768, 256], strategy, block=(128, 128)).to(DEVICE)
    x = torch.randn(m, 1024, device=DEVICE, dtype=dtype)
    want = layer.torch_matmul(x.float())
    got = triton_fp8.quant_matmul(x, layer).float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@interpreted
def test_fp8_experts_on_the_kernel(monkeypatch):
    """A mixture's FP8 experts (per-block scales) through the kernel, one expert
    projection at a time: the torch path's output."""
    from loraplex.layers.quantized_experts import FP8FusedExperts

    gen = torch.Generator().manual_seed(5)
    experts = FP8FusedExperts(64, 48, 4, QuantConfig("fp8", 8, 32, fp8_block=(16, 32)))
    experts.fill_random(gen)
    x = torch.randn(6, 64, generator=gen)
    weights = torch.rand(6, 2, generator=gen)
    chosen = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(6)])
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("LORAPLEX_QUANT_BACKEND", backend)
        out[backend] = experts(x, weights, chosen)
    torch.testing.assert_close(out["triton"], out["torch"], rtol=1e-4, atol=1e-4)
