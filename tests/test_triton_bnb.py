"""The fused bitsandbytes 4-bit dequantize-matmul kernel against the torch dequantize path.

Without CUDA the kernel runs on CPU tensors under TRITON_INTERPRET=1 (fp32, exact up to
summation order) and every launch is also compiled for sm_90. With CUDA the same checks
run compiled, in fp16 / bf16. The layers are built by the in-flight NF4 quantizer and by
hand with the FP4 table, so bitsandbytes itself is not needed here.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from loraplex.layers.quantization import BnB4bitLinear, QuantConfig
from tests.engine_utils import check_engine_on_kernel
from tests.triton_compile import compile_for_h100, import_kernels

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

triton_bnb = import_kernels("loraplex.layers.quantization.triton_bnb")
interpreted = pytest.mark.skipif(CUDA or not triton_bnb._INTERPRETED,
                                 reason="interpreter tests run where there is no CUDA")


def make_layer(k: int, sizes: list[int], quant_type: str = "nf4", bias: bool = False,
               seed: int = 0) -> BnB4bitLinear:
    """A layer of sub-projections `sizes`, NF4-quantized from random weights (FP4: random
    codes and absmax under the FP4 table)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = QuantConfig("bitsandbytes", 4, 64, quant_type=quant_type, prequantized=False)
    layer = BnB4bitLinear(k, sizes, bias, cfg)
    if quant_type == "nf4":
        for shard, n in enumerate(sizes):
            layer.load_shard("weight", torch.randn(n, k, generator=gen), shard)
    else:
        layer.fill_random(gen)
    if bias:
        layer.bias.data = torch.randn(sum(sizes), generator=gen)
    return layer


@interpreted
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("m", [1, 7, 40])
def test_kernel_matches_torch_dequantize(quant_type, m):
    """N = 80 (two sub-projections) and K = 192 are not multiples of the tiles."""
    layer = make_layer(192, [48, 32], quant_type, bias=m == 7)
    x = torch.randn(m, 192, generator=torch.Generator().manual_seed(m))
    want = layer.torch_matmul(x) + (layer.bias if layer.bias is not None else 0)
    torch.testing.assert_close(triton_bnb.quant_matmul(x, layer), want, rtol=1e-5, atol=1e-4)


@interpreted
@pytest.mark.parametrize("ways", [None, 2, 3, 5])
def test_kernel_split_over_k(ways):
    """K = 384: three 128-wide K blocks, split unevenly, or more ways than blocks."""
    layer = make_layer(384, [64], seed=3)
    x = torch.randn(2, 384, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(triton_bnb.quant_matmul(x, layer, ways=ways),
                               layer.torch_matmul(x), rtol=1e-5, atol=1e-4)


@interpreted
def test_engine_on_the_kernel_matches_the_torch_path(tiny_models, tiny_adapters, prompts,
                                                     monkeypatch):
    """The in-flight NF4 base with an adapter, its linears on the kernel: the same tokens
    and logprobs as the torch path (the torch path is held against HF + PEFT in
    tests/test_bitsandbytes.py)."""
    check_engine_on_kernel(triton_bnb, monkeypatch, tiny_models["llama"],
                           tiny_adapters["llama"]["r8_all"], prompts, quantization="bitsandbytes")


_LAUNCHES = """
from loraplex.layers.quantization import BnB4bitLinear, QuantConfig
from loraplex.layers.quantization import triton_bnb as T
T.code4_gemm_kernel = Capture(T.code4_gemm_kernel)
cfg = QuantConfig("bitsandbytes", 4, 64, quant_type="nf4")
for dtype in (torch.bfloat16, torch.float16):
    for layer in (BnB4bitLinear(4096, [4096, 1024, 1024], False, cfg),
                  BnB4bitLinear(4096, [14336, 14336], False, cfg)):
        for m in (1, 48, 512):
            T.quant_matmul(torch.zeros(m, 4096, dtype=dtype), layer)
"""


@pytest.mark.skipif(CUDA, reason="with CUDA the GPU test compiles the kernel for real")
def test_kernel_compiles_for_h100():
    assert compile_for_h100(_LAUNCHES) == 12


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 16, 200])
def test_kernel_on_gpu(quant_type, dtype, m):
    layer = make_layer(1024, [768, 256], quant_type).to(DEVICE)
    x = torch.randn(m, 1024, device=DEVICE, dtype=dtype)
    want = layer.torch_matmul(x.float())
    got = triton_bnb.quant_matmul(x, layer).float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())

