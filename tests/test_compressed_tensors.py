"""llm-compressor's weight-only int checkpoints (compressed-tensors W4A16 / W8A16) with
LoRA adapters, against HF + PEFT on the dequantized weights (with int8 activations too:
tests/test_compressed_tensors_w8a8.py).

Two writers: tests/quantized_fixtures.py's own (pack-quantized and naive-quantized,
act-order g_idx, which today's compressed-tensors no longer writes), and the
compressed-tensors package itself (its ModelCompressor, as llm-compressor saves), whose
own decompression is then the reference; transformers decompresses those checkpoints to
the same weights. The layers convert to GPTQ's layout, so the GPTQ kernel runs them:
checked under the Triton interpreter against the torch path.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex import SamplingParams
from loraplex.layers.quantization import CompressedTensorsLinear, QuantConfig, QuantLinear
from tests.engine_utils import (
    GREEDY,
    check_against_hf,
    check_base_and_adapter,
    lora_requests,
    make_llm,
)
from tests.fixtures import edited_copy
from tests.quantized_fixtures import (
    pack_cols,
    pack_rows,
    quantize_ct_int,
    write_compressed_tensors,
    write_with_compressed_tensors,
)

HAS_CT = importlib.util.find_spec("compressed_tensors") is not None
needs_ct = pytest.mark.skipif(not HAS_CT, reason="compressed-tensors is not installed")
ADAPTERS = ("r4_qv", "r8_all", "r16_rslora")

CASES = {  # name -> (writer, options); "package": the compressed-tensors package writes it
    "int4_g32": ("ours", {}),
    "int4_g32_asym": ("ours", {"sym": False}),
    "int8_channel": ("ours", {"bits": 8, "group_size": -1}),
    "int4_actorder_asym": ("ours", {"sym": False, "actorder": True}),
    "int8_naive_asym": ("ours", {"bits": 8, "group_size": -1, "sym": False,
                                 "fmt": "naive-quantized"}),
    "package_int4_g32_asym": ("package", {"sym": False}),
    "package_int8_channel": ("package", {"bits": 8, "group_size": -1}),
}


@pytest.fixture(scope="module")
def ct_models(tiny_root: Path, tiny_models) -> dict[str, tuple[Path, Path]]:
    """case -> (checkpoint, dequantized reference) of the llama tiny model, written on
    first use."""
    root = tiny_root / "compressed_tensors"
    root.mkdir(parents=True, exist_ok=True)

    class Lazy(dict):
        def __missing__(self, case: str) -> tuple[Path, Path]:
            writer, opts = CASES[case]
            if writer == "package" and not HAS_CT:
                pytest.skip("compressed-tensors is not installed")
            write = write_with_compressed_tensors if writer == "package" else \
                write_compressed_tensors
            self[case] = write(tiny_models["llama"], root, case, **opts)
            return self[case]
    return Lazy()


def _layer(bits: int, group_size: int, sym: bool, sizes: list[int], n_in: int = 64,
           actorder: bool = False, naive: bool = False
           ) -> tuple[CompressedTensorsLinear, torch.Tensor]:
    """A layer of sub-projections `sizes` loaded from our fixture's tensors, and W^T."""
    cfg = QuantConfig("compressed-tensors", bits, group_size, implicit_zero=sym)
    layer = CompressedTensorsLinear(n_in, sizes, False, cfg)
    offset, deqs = 2 ** (bits - 1), []
    for shard, size in enumerate(sizes):
        w = torch.randn(size, n_in, generator=torch.Generator().manual_seed(shard))
        q, scale, zero, g_idx, deq = quantize_ct_int(w, bits=bits, group_size=group_size,
                                                     sym=sym, actorder=actorder, seed=7)
        tensors = {"weight_scale": scale}
        if naive:
            tensors["weight"] = q.to(torch.int8)
        else:
            tensors["weight_packed"] = pack_cols(q + offset, bits)
            tensors["weight_shape"] = torch.tensor([size, n_in])
        if not sym:
            tensors["weight_zero_point"] = zero.to(torch.int8) if naive else \
                pack_rows(zero + offset, bits)
        if actorder:
            tensors["weight_g_idx"] = g_idx.to(torch.int32)
        for name, t in tensors.items():
            layer.load_shard(name, t, shard)
        deqs.append(deq)
    layer.finish_loading()
    return layer, torch.cat(deqs).t()


@pytest.mark.parametrize(("bits", "group_size", "sym", "actorder", "naive"), [
    (4, 32, True, False, False), (4, 16, False, False, False), (8, -1, True, False, False),
    (8, 32, False, True, False), (4, 32, False, True, False), (8, -1, False, False, True),
    (4, 32, True, False, True)])
def test_layer_dequantizes_sub_projections_to_the_reference(bits, group_size, sym, actorder,
                                                            naive):
    """q, k, v (64, 32, 32 rows) side by side, exactly the fixture's dequantized weights."""
    layer, want = _layer(bits, group_size, sym, [64, 32, 32], actorder=actorder, naive=naive)
    assert layer.act_order == actorder
    torch.testing.assert_close(layer.dequantize(torch.float32), want, rtol=0, atol=0)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ want)


@needs_ct
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("packed_dim", [0, 1])
def test_fixture_packs_as_the_package_does(bits, packed_dim):
    """Our writer's packing (signed + 2^(bits-1), lowest bits first) is the package's."""
    from compressed_tensors.compressors import pack_to_int32

    q = torch.randint(-2 ** (bits - 1), 2 ** (bits - 1), (64, 96),
                      generator=torch.Generator().manual_seed(bits), dtype=torch.int64)
    ours = pack_cols(q + 2 ** (bits - 1), bits) if packed_dim == 1 else \
        pack_rows(q + 2 ** (bits - 1), bits)
    assert torch.equal(pack_to_int32(q.to(torch.int8), bits, packed_dim=packed_dim), ours)


@pytest.mark.parametrize("case", list(CASES))
def test_compressed_tensors_base_with_mixed_adapters_matches_hf_peft(case, ct_models,
                                                                     tiny_adapters, prompts):
    """Base + three adapters of ranks 4, 8, 16 in one batch, more adapters than slots."""
    quant_dir, ref_dir = ct_models[case]
    reqs = lora_requests({n: tiny_adapters["llama"][n] for n in ADAPTERS})
    names = [None, *sorted(reqs)]
    llm = make_llm(quant_dir, enable_lora=True, max_loras=2, max_lora_rank=16)
    qkv = llm.llm_engine.model.model.layers[0].self_attn.qkv_proj.base_layer
    assert isinstance(qkv, CompressedTensorsLinear)
    assert qkv.act_order == ("actorder" in case)
    batch = [prompts[i % len(prompts)] for i in range(2 * len(names))]
    loras = [names[i % len(names)] for i in range(len(batch))]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY,
                        lora_request=[reqs[n] if n else None for n in loras], use_tqdm=False)
    check_against_hf(outs, ref_dir, [tiny_adapters["llama"][n] if n else None for n in loras],
                     batch)


@needs_ct
def test_transformers_decompresses_the_package_checkpoint_to_our_weights(ct_models):
    """transformers (with compressed-tensors) loads the package-written checkpoint
    dequantized: every linear equals what our layers dequantize. Symmetric: transformers
    5.25 with compressed-tensors 0.20.1 refuses the shapes of packed asymmetric zeros."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    quant_dir, _ = ct_models["package_int8_channel"]
    dequantize = ({"dequantize": True} if "dequantize" in inspect.signature(
        CompressedTensorsConfig.__init__).parameters else {"run_compressed": False})
    hf = AutoModelForCausalLM.from_pretrained(
        str(quant_dir), dtype=torch.float32,
        quantization_config=CompressedTensorsConfig(**dequantize))
    ours = make_llm(quant_dir).llm_engine.model.model.layers
    for i, layer in enumerate(hf.model.layers):
        for packed, parts in (("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj",
                                                      "self_attn.v_proj")),
                              ("self_attn.o_proj", ("self_attn.o_proj",)),
                              ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
                              ("mlp.down_proj", ("mlp.down_proj",))):
            want = torch.cat([layer.get_submodule(p).weight for p in parts])
            got = ours[i].get_submodule(packed).dequantize(torch.float32).t()
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{i} {packed}")


def test_qwen2_bias_and_an_ignored_module(tiny_root, tiny_models, tiny_adapters, prompts):
    root = tiny_root / "compressed_tensors" / "qwen2"
    root.mkdir(parents=True, exist_ok=True)
    quant_dir, ref_dir = write_compressed_tensors(
        tiny_models["qwen2"], root, "int4_ignore", sym=False,
        ignore=("model.layers.1.mlp.down_proj",))
    llm = make_llm(quant_dir, enable_lora=True, max_lora_rank=16)
    layers = llm.llm_engine.model.model.layers
    assert isinstance(layers[0].mlp.down_proj.base_layer, CompressedTensorsLinear)
    assert not isinstance(layers[1].mlp.down_proj.base_layer, QuantLinear)
    assert layers[0].self_attn.qkv_proj.base_layer.bias is not None
    check_base_and_adapter(llm, ref_dir, tiny_adapters["qwen2"]["r8_all"], prompts)


def test_weights_stay_packed_and_dummy_weights(ct_models):
    quant_dir = ct_models["int4_g32"][0]
    llm = make_llm(quant_dir)
    linears = [m for m in llm.llm_engine.model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 2 * 4
    held = sum(t.numel() * t.element_size() for m in linears
               for t in (*m.parameters(), *m.buffers()))
    assert held < 0.25 * sum(m.in_features * m.out_features * 4 for m in linears)
    dummy = make_llm(quant_dir, load_format="dummy")
    out = dummy.generate({"prompt_token_ids": [1, 5, 9]}, SamplingParams(max_tokens=4),
                         use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def _group(q: dict) -> dict:
    return q["config_groups"]["group_0"]


@pytest.mark.parametrize(("case", "edit", "message"), [
    ("int4_g32", lambda q: q.update(format="marlin-24"),
     "compressed-tensors checkpoint (format 'marlin-24'"),
    ("int4_g32", lambda q: _group(q)["weights"].update(num_bits=3), "num_bits=3 are not supported"),
    ("int4_g32", lambda q: _group(q)["weights"].update(strategy="tensor"),
     "strategy='tensor'"),
    ("int4_g32", lambda q: q["config_groups"].update(group_1={
        "targets": ["re:.*down_proj"], "weights": {**_group(q)["weights"], "num_bits": 8}}),
     "different int weight schemes"),
    ("int4_g32", lambda q: _group(q).update(targets=["re:.*self_attn.*"]),
     "targeting ['re:.*self_attn.*']"),
    ("int4_g32", lambda q: q.update(ignore=[]), "quantized lm_head"),
    ("int4_g32", lambda q: q.update(transform_config={"config_groups": {"u": {}}}),
     "with a transform_config"),
    ("int4_g32", lambda q: _group(q)["weights"].update(symmetric=False),
     "sub-projection 0 of this layer is incomplete"),
    ("int4_g32_asym", lambda q: _group(q)["weights"].update(symmetric=True),
     "weight_zero_point where its config says symmetric"),
    ("int4_g32", lambda q: _group(q)["weights"].update(group_size=16), "does not fit shard"),
])
def test_unsupported_or_inconsistent_checkpoints_are_refused(ct_models, tmp_path, case, edit,
                                                             message):
    bad = edited_copy(ct_models[case][0], tmp_path / "bad",
                      lambda c: edit(c["quantization_config"]), config="config.json")
    with pytest.raises(ValueError, match=re.escape(message)):
        make_llm(bad)


def test_a_missing_scale_and_plain_weights_are_refused(ct_models, tiny_models, tmp_path):
    dst = shutil.copytree(ct_models["int4_g32"][0], tmp_path / "no_scale")
    state = load_file(str(dst / "model.safetensors"))
    del state["model.layers.0.self_attn.k_proj.weight_scale"]
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="sub-projection 1 of this layer is incomplete"):
        make_llm(dst)
    plain = shutil.copytree(tiny_models["llama"], tmp_path / "plain")
    cfg = json.loads((plain / "config.json").read_text())
    cfg["quantization_config"] = json.loads(
        (ct_models["int4_g32"][0] / "config.json").read_text())["quantization_config"]
    (plain / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="the config does not match the weights"):
        make_llm(plain)


if importlib.util.find_spec("triton") is not None:
    from tests.triton_compile import import_kernels

    triton_gemm = import_kernels("loraplex.layers.quantization.triton_gemm")
    INTERPRETED = not torch.cuda.is_available() and triton_gemm._INTERPRETED
else:
    INTERPRETED = False


@pytest.mark.skipif(not INTERPRETED, reason="interpreter tests run where there is no CUDA")
@pytest.mark.parametrize(("bits", "group_size", "sym", "actorder"), [
    (4, 32, True, False), (4, 32, False, True), (8, -1, True, False), (8, 16, False, False)])
@pytest.mark.parametrize("m", [1, 40])
def test_gptq_kernel_runs_these_layers_as_the_torch_path(bits, group_size, sym, actorder, m):
    """The converted layer through the fused GPTQ kernel (TRITON_INTERPRET=1, fp32): the
    same as its torch dequantize-then-matmul; K = 96 and N = 80 exercise the masks."""
    layer, _ = _layer(bits, group_size, sym, [48, 32], n_in=96, actorder=actorder)
    x = torch.randn(m, 96, generator=torch.Generator().manual_seed(m))
    want = x @ layer.dequantize(torch.float32)
    torch.testing.assert_close(triton_gemm.quant_matmul(x, layer), want, rtol=1e-5, atol=1e-4)
