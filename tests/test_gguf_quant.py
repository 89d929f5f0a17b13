"""A GGUF file's Q8_0 / Q4_0 matrices kept quantized in GPTQ's layout (models/gguf_quant.py).

The packed weights dequantize to exactly what the `gguf` package's dequantization gives
(random blocks: any code, any finite fp16 scale, negative ones too, as Q4_0 writes), the
engine on them gives what it gives on the file dequantized (hf_overrides'
quantization_config null) and what HF's GGUF model + PEFT gives, with adapters in a mixed
batch; a file of mixed types keeps only whole packed layers of its main type; the GPTQ
kernel runs them under TRITON_INTERPRET=1. (test_gguf.py and test_gguf_moe.py run their
Q8_0 / Q4_0 files through this path too.)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from loraplex import LoRARequest
from loraplex.layers.quantization import GPTQLinear, QuantConfig
from loraplex.layers.quantization.linear import PackedIntWeight
from tests.engine_utils import GREEDY, check_against_hf, make_llm
from tests.fixtures import make_peft_adapter, make_tiny_model

gguf = pytest.importorskip("gguf")

from loraplex.models.gguf_quant import codes_and_scales, to_gptq  # noqa: E402
from tests.gguf_fixtures import write_gguf  # noqa: E402 (needs gguf)

TYPES = {"Q8_0": (8, 34), "Q4_0": (4, 18)}  # bits, bytes a block


def random_blocks(type_name: str, rows: int, inputs: int, seed: int) -> np.ndarray:
    """Random bytes of a [rows, inputs] tensor of this type: random codes, finite fp16
    scales of either sign (the bytes GGUFReader maps: [rows, bytes per row])."""
    rng = np.random.default_rng(seed)
    size = TYPES[type_name][1]
    raw = rng.integers(0, 256, (rows, inputs // 32, size), dtype=np.uint8)
    scales = (rng.standard_normal((rows, inputs // 32)) * 0.05).astype(np.float16)
    raw[..., :2] = scales[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("type_name", list(TYPES))
def test_packed_weights_dequantize_to_exactly_ggufs(type_name):
    """GPTQ's torch dequantize of the packed codes (fp32, and fp16 / bf16: one rounding of
    the exact value) against gguf.dequantize, bit for bit; 96 inputs: three blocks."""
    bits = TYPES[type_name][0]
    raw = random_blocks(type_name, 40, 96, seed=bits)
    want = torch.from_numpy(gguf.dequantize(raw, gguf.GGMLQuantizationType[type_name]))
    codes, scales = codes_and_scales(raw, type_name)
    packed = to_gptq(codes, scales, bits)
    assert packed["qweight"].shape == (96 * bits // 32, 40) and packed["scales"].dtype == \
        torch.float16
    weight = PackedIntWeight(QuantConfig("gptq", bits, 32, fp16_scales=True), **packed,
                             g_idx=torch.arange(96, dtype=torch.int32) // 32)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(weight.dequantize(dtype).T, want.to(dtype)), dtype
    # a stack of experts ([E, rows, bytes]) reads expert by expert the same
    stack = np.stack([raw, random_blocks(type_name, 40, 96, seed=9)])
    codes3, scales3 = codes_and_scales(stack, type_name)
    assert np.array_equal(codes3[0], codes) and np.array_equal(scales3[0], scales)


@pytest.fixture(scope="module")
def llama(tiny_root: Path) -> tuple[Path, dict[str, Path]]:
    base = make_tiny_model(tiny_root / "gguf-quant" / "llama", "llama", seed=91)
    specs = {"r4_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=92),
             "r16_all": dict(r=16, lora_alpha=16, target_modules="all-linear", seed=93)}
    return base, {n: make_peft_adapter(base, tiny_root / "gguf-quant" / n, **s)
                  for n, s in specs.items()}


def _file(llama, type_name: str, **kw) -> Path:
    folder = llama[0].parent / f"llama-{type_name}-{len(kw)}"
    folder.mkdir(exist_ok=True)
    return write_gguf(llama[0], folder / "model.gguf", type_name, **kw)


@pytest.mark.parametrize("type_name", list(TYPES))
def test_engine_on_the_packed_file_as_dequantized_and_as_hf_peft(type_name, llama, prompts,
                                                                   caplog):
    """Every decoder linear a GPTQLinear of the file's bits (lm_head and the embedding
    plain), a half / a quarter... of the fp32 bytes; greedy tokens and logprobs as on the
    same file dequantized and as HF + PEFT, base and two adapters in one batch."""
    path, (hf_dir, ad) = _file(llama, type_name), llama
    bits = TYPES[type_name][0]
    with caplog.at_level("INFO", logger="loraplex.models.gguf_loader"):
        llm = make_llm(path, tokenizer=str(hf_dir), enable_lora=True, max_lora_rank=16)
    assert f"of {type_name} matrices kept quantized" in caplog.text
    model = llm.llm_engine.model
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        layer = model.model.layers[1].get_submodule(name).base_layer
        assert isinstance(layer, GPTQLinear) and layer.cfg.bits == bits, name
        assert layer.qweight.numel() * 4 == layer.in_features * layer.out_features * bits // 8
        assert layer.scales.dtype == torch.float16
    assert getattr(model.lm_head, "base_layer", model.lm_head).weight.dtype == torch.float32
    plain = make_llm(path, tokenizer=str(hf_dir), enable_lora=True, max_lora_rank=16,
                     hf_overrides={"quantization_config": None})
    assert not isinstance(plain.llm_engine.model.model.layers[1].mlp.down_proj.base_layer,
                          GPTQLinear)
    reqs = [None, LoRARequest("r4_qv", 1, str(ad["r4_qv"])),
            LoRARequest("r16_all", 2, str(ad["r16_all"]))]
    jobs = [(p, r) for p in prompts[:3] for r in reqs]
    args = ([{"prompt_token_ids": p} for p, _ in jobs], GREEDY)
    outs = llm.generate(*args, lora_request=[r for _, r in jobs])
    ref = plain.generate(*args, lora_request=[r for _, r in jobs])
    for got, want in zip(outs, ref, strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs, strict=True):
            for t in a:  # the same weights: only the matmul's summation order differs
                assert abs(a[t].logprob - b[t].logprob) < 1e-5
    check_against_hf(outs, path, [ad[r.lora_name] if r else None for _, r in jobs],
                     [p for p, _ in jobs], atol=3e-4)


def test_a_file_of_mixed_types_keeps_whole_layers_of_its_main_type(llama, prompts):
    """Q4_0 most of it; v_proj Q8_0 (so q/k/v, one packed layer, stay plain), down_proj of
    layer 0 F16 (plain) and up_proj of layer 1 Q8_0 (gate/up plain there): the rest kept
    as 4-bit GPTQ; outputs as HF's on the file."""
    path = _file(llama, "Q4_0", types={"v_proj": "Q8_0", "layers.0.mlp.down_proj": "F16",
                                       "layers.1.mlp.up_proj": "Q8_0"})
    llm = make_llm(path, tokenizer=str(llama[0]))
    layers = llm.llm_engine.model.model.layers
    packed = {f"{i}.{n}": isinstance(layers[i].get_submodule(n), GPTQLinear)
              for i in range(2) for n in ("self_attn.qkv_proj", "self_attn.o_proj",
                                          "mlp.gate_up_proj", "mlp.down_proj")}
    assert packed == {"0.self_attn.qkv_proj": False, "0.self_attn.o_proj": True,
                      "0.mlp.gate_up_proj": True, "0.mlp.down_proj": False,
                      "1.self_attn.qkv_proj": False, "1.self_attn.o_proj": True,
                      "1.mlp.gate_up_proj": False, "1.mlp.down_proj": True}
    assert layers[0].self_attn.o_proj.cfg.bits == 4
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], GREEDY)
    check_against_hf(outs, path, [None, None], prompts[:2], atol=3e-4)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("type_name", list(TYPES))
def test_the_gptq_kernel_runs_the_packed_file(type_name, llama, prompts, monkeypatch):
    """LORAPLEX_QUANT_BACKEND=triton: the GPTQ kernel (interpreted on the CPU, compiled on
    CUDA) on the kept matrices and their fp16 scales, with an adapter: as HF + PEFT."""
    from tests.triton_compile import import_kernels

    triton_gemm = import_kernels("loraplex.layers.quantization.triton_gemm")
    if not torch.cuda.is_available() and not triton_gemm._INTERPRETED:
        pytest.skip("Triton runs here only on a GPU or under TRITON_INTERPRET=1")
    path, (hf_dir, ad) = _file(llama, type_name), llama
    monkeypatch.setenv("LORAPLEX_QUANT_BACKEND", "triton")
    calls, real = [], triton_gemm.quant_matmul
    monkeypatch.setattr(triton_gemm, "quant_matmul",
                        lambda x, layer: calls.append(layer) or real(x, layer))
    llm = make_llm(path, tokenizer=str(hf_dir), enable_lora=True, max_lora_rank=16)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], GREEDY,
                        lora_request=[None, LoRARequest("a", 1, str(ad["r4_qv"]))])
    layer = llm.llm_engine.model.model.layers[0].mlp.down_proj.base_layer
    assert any(c is layer for c in calls)
    check_against_hf(outs, path, [None, ad["r4_qv"]], prompts[:2], atol=3e-4)


def test_another_quantization_on_a_packed_file_is_refused(llama):
    """quantization="fp8" would re-quantize weights that are kept packed: refused, the
    message naming the way to dequantize first; with it, fp8 applies as on any plain
    checkpoint."""
    path = _file(llama, "Q8_0")
    with pytest.raises(ValueError, match=r"quantization='fp8' on a GGUF file .* "
                                         r"\{\"quantization_config\": null\}"):
        make_llm(path, tokenizer=str(llama[0]), quantization="fp8")
    llm = make_llm(path, tokenizer=str(llama[0]), quantization="fp8",
                   hf_overrides={"quantization_config": None})
    assert llm.llm_engine.model_config.quantization.method == "fp8"


def test_the_plan_keeps_only_what_gptqs_layout_can_hold():
    """quant_plan on a tensor table: the main type by weights of the matrices it may keep
    (Q4_0 here: the Q8_0 embedding does not count), never the embedding, lm_head or a router; a matrix whose rows GPTQ
    cannot pack its zeros along (36 outputs at 4 bits: 8 a word) stays plain, and so do
    its siblings in the packed layer (q/k/v), each a module to leave unconverted."""
    from types import SimpleNamespace

    from loraplex.models.gguf_quant import quant_plan

    def tensor(name, type_name, rows, inputs=64):
        return SimpleNamespace(name=name, tensor_type=SimpleNamespace(name=type_name),
                               n_elements=rows * inputs, shape=[inputs, rows])

    table = [tensor("token_embd.weight", "Q8_0", 4096), tensor("output.weight", "Q6_K", 4096),
             tensor("blk.0.ffn_gate_inp.weight", "Q4_0", 8),
             tensor("blk.0.attn_q.weight", "Q4_0", 64), tensor("blk.0.attn_k.weight", "Q4_0", 36),
             tensor("blk.0.attn_v.weight", "Q4_0", 32),
             tensor("blk.0.attn_output.weight", "Q4_0", 64),
             tensor("blk.0.ffn_down.weight", "Q8_0", 64), tensor("blk.0.ffn_up.weight", "Q4_0", 128)]
    layer = "model.layers.0."
    modules = {"token_embd.weight": ["model.embed_tokens"], "output.weight": ["lm_head"],
               "blk.0.ffn_gate_inp.weight": [layer + "mlp.gate"],
               **{f"blk.0.{g}.weight": [layer + h] for g, h in (
                   ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                   ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                   ("ffn_down", "mlp.down_proj"), ("ffn_up", "mlp.up_proj"))}}
    plan = quant_plan(table, modules)
    assert plan.bits == 4 and plan.type_name == "Q4_0"
    assert plan.kept == {"blk.0.attn_output.weight", "blk.0.ffn_up.weight"}
    assert plan.skipped == [layer + m for m in ("mlp.down_proj", "self_attn.k_proj",
                                                "self_attn.q_proj", "self_attn.v_proj")]


@pytest.mark.parametrize("type_name", list(TYPES))
def test_under_bf16_the_packed_weights_are_the_dequantized_ones(type_name, llama, prompts):
    """dtype bfloat16: each packed matrix dequantizes to the very bf16 weights the
    dequantized load holds (the fp16 scales kept: one rounding of the exact value, not
    two), so both engines give the same greedy tokens."""
    path, hf_dir = _file(llama, type_name), str(llama[0])
    packed = make_llm(path, tokenizer=hf_dir, dtype="bfloat16")
    plain = make_llm(path, tokenizer=hf_dir, dtype="bfloat16",
                     hf_overrides={"quantization_config": None})
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        ours = packed.llm_engine.model.model.layers[0].get_submodule(name)
        theirs = plain.llm_engine.model.model.layers[0].get_submodule(name)
        assert isinstance(ours, GPTQLinear)
        assert torch.equal(ours.dequantize(torch.bfloat16).T, theirs.weight), name
    args = ([{"prompt_token_ids": p} for p in prompts[:3]], GREEDY)
    assert [o.outputs[0].token_ids for o in packed.generate(*args)] == \
        [o.outputs[0].token_ids for o in plain.generate(*args)]


_LAUNCHES = """
from loraplex.layers.quantization import GPTQLinear, QuantConfig
from loraplex.layers.quantization import triton_gemm as T
T._quant_gemm_kernel = Capture(T._quant_gemm_kernel)
torch.set_default_dtype(torch.bfloat16)  # as the engine builds a bf16 model
for bits in (8, 4):
    cfg = QuantConfig("gptq", bits, 32, fp16_scales=True)
    layer = GPTQLinear(2048, [4096, 512, 512], False, cfg)
    assert layer.scales.dtype == torch.float16
    for m in (1, 512):
        T.quant_matmul(torch.zeros(m, 2048, dtype=torch.bfloat16), layer)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or torch.cuda.is_available(),
                    reason="needs triton; with CUDA the kernel test above runs compiled")
def test_the_kernel_compiles_for_h100_with_fp16_scales_and_bf16_activations():
    """The GPTQ kernel's launches for GGUF's layers (fp16 scales beside bf16 activations,
    group size 32, 8 and 4 bits) compile for sm_90."""
    from tests.triton_compile import compile_for_h100

    assert compile_for_h100(_LAUNCHES) == 4
