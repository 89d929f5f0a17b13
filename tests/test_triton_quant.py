"""The fused GPTQ / AWQ dequantize-matmul kernel against the torch dequantize path.

Without CUDA the kernel runs on CPU tensors under TRITON_INTERPRET=1 (fp32, exact up to
summation order) and every launch is also compiled for sm_90. With CUDA the same checks
run compiled, in fp16 / bf16 on model-sized shapes.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from loraplex.layers.quantization import AWQLinear, GPTQLinear, QuantConfig
from tests.engine_utils import GREEDY, check_against_hf, make_llm
from tests.quantized_fixtures import quantize_awq, quantize_gptq, write_quantized
from tests.triton_compile import compile_for_h100, import_kernels

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


triton_gemm = import_kernels("loraplex.layers.quantization.triton_gemm")
interpreted = pytest.mark.skipif(CUDA or not triton_gemm._INTERPRETED,
                                 reason="interpreter tests run where there is no CUDA")

LAYERS = {  # name -> (method, QuantConfig options, fixture options)
    "gptq4_g32": ("gptq", dict(bits=4, group_size=32, zero_offset=1), dict(group_size=32)),
    "gptq4_act_order": ("gptq", dict(bits=4, group_size=32, zero_offset=1, desc_act=True),
                        dict(group_size=32, desc_act=True)),
    "gptq8_one_group_v2": ("gptq", dict(bits=8, group_size=-1),
                           dict(bits=8, group_size=-1, sym=True, fmt="gptq_v2")),
    "gptq2_g16": ("gptq", dict(bits=2, group_size=16, zero_offset=1),
                  dict(bits=2, group_size=16, sym=True)),
    "awq4_g32": ("awq", dict(bits=4, group_size=32), dict(group_size=32)),
}


def make_layer(name: str, k: int, n: int, bias: bool, seed: int = 0):
    method, cfg_opts, fix_opts = LAYERS[name]
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    quantize = quantize_gptq if method == "gptq" else quantize_awq
    tensors, _ = quantize(w, seed=seed, **fix_opts)
    cls = GPTQLinear if method == "gptq" else AWQLinear
    layer = cls(k, [n], bias, QuantConfig(method, **cfg_opts))
    for pname, t in tensors.items():
        layer.load_shard(pname, t, 0)
    if bias:
        layer.bias.data = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1))
    return layer


@interpreted
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("m", [1, 7, 40])
def test_kernel_matches_torch_dequantize(name, m):
    """N = 80 and K = 96 are not multiples of the tiles: the masks are exercised."""
    layer = make_layer(name, 96, 80, bias=name == "gptq4_g32")
    x = torch.randn(m, 96, generator=torch.Generator().manual_seed(m))
    want = layer.dequantize(torch.float32)
    want = x @ want + (layer.bias if layer.bias is not None else 0)
    torch.testing.assert_close(triton_gemm.quant_matmul(x, layer), want, rtol=1e-5, atol=1e-4)


@interpreted
@pytest.mark.parametrize("name", ["gptq4_act_order", "awq4_g32"])
@pytest.mark.parametrize("ways", [None, 2, 3, 5])
def test_kernel_split_over_k(name, ways):
    """K = 384 is three 128-wide K blocks: split 2 gives uneven shares, 5 more ways than
    blocks (the kernel launches 3); None picks the split itself (here 3)."""
    layer = make_layer(name, 384, 64, bias=False, seed=3)
    x = torch.randn(2, 384, generator=torch.Generator().manual_seed(4))
    want = x @ layer.dequantize(torch.float32)
    got = triton_gemm.quant_matmul(x, layer, ways=ways)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@interpreted
def test_engine_on_the_kernel_matches_hf_peft(tiny_root, tiny_models, tiny_adapters, prompts,
                                              monkeypatch):
    root = tiny_root / "quantized_triton"
    root.mkdir(parents=True, exist_ok=True)
    quant_dir, ref_dir = write_quantized(tiny_models["llama"], root, "gptq", desc_act=True)
    monkeypatch.setenv("LORAPLEX_QUANT_BACKEND", "triton")
    adapter = tiny_adapters["llama"]["r8_all"]
    from loraplex import LoRARequest

    llm = make_llm(quant_dir, enable_lora=True, max_lora_rank=8)
    layer = llm.llm_engine.model.model.layers[0].mlp.down_proj.base_layer
    calls = []
    real = triton_gemm.quant_matmul
    monkeypatch.setattr(triton_gemm, "quant_matmul",
                        lambda x, lay: calls.append(lay) or real(x, lay))
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], GREEDY,
                        lora_request=[None, LoRARequest("a", 1, str(adapter))], use_tqdm=False)
    assert any(c is layer for c in calls)  # the kernel ran the layers
    check_against_hf(outs, ref_dir, [None, adapter], prompts[:2])


_LAUNCHES = """
from loraplex.layers.quantization import AWQLinear, GPTQLinear, QuantConfig
from loraplex.layers.quantization import triton_gemm as T
T._quant_gemm_kernel = Capture(T._quant_gemm_kernel)
for dtype in (torch.bfloat16, torch.float16):
    for layer in (GPTQLinear(4096, [4096, 1024, 1024], False, QuantConfig("gptq", 4, 128, 1)),
                  AWQLinear(4096, [14336], False, QuantConfig("awq", 4, 128))):
        layer = layer.to(dtype)
        for m in (1, 48, 512):
            T.quant_matmul(torch.zeros(m, 4096, dtype=dtype), layer)
"""


@pytest.mark.skipif(CUDA, reason="with CUDA the GPU test compiles the kernel for real")
def test_kernel_compiles_for_h100():
    assert compile_for_h100(_LAUNCHES) == 12


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 16, 200])
def test_kernel_on_gpu(name, dtype, m):
    layer = make_layer(name, 1024, 768, bias=False).to(DEVICE, dtype)
    x = torch.randn(m, 1024, device=DEVICE, dtype=dtype)
    want = x.float() @ layer.dequantize(torch.float32)
    got = triton_gemm.quant_matmul(x, layer).float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
