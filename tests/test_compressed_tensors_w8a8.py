"""compressed-tensors W8A8 (int8 weights and int8 activations, llm-compressor's W8A8
scheme) with LoRA adapters, against HF + PEFT running the compressed-tensors package's own
forward (each Linear's input quantized as the scheme says) on the same checkpoint, saved
"frozen" (tests/quantized_fixtures.write_ct_w8a8).

Dynamic per-token activations, static per-tensor ones (symmetric and with a zero point),
int4 weights with int8 activations (W4A8); the quantizer against the package's, the merge
of static scales of sub-projections calibrated apart, refusals.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex import SamplingParams
from loraplex.layers.quantization import CompressedTensorsLinear
from loraplex.layers.quantization.int8_activations import ActivationQuant, merged_static
from tests.engine_utils import GREEDY, check_fake_quant_against_hf, lora_requests, make_llm
from tests.fixtures import edited_copy
from tests.quantized_fixtures import write_ct_w8a8

pytestmark = pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None,
                                reason="compressed-tensors is not installed")
ADAPTERS = ("r4_qv", "r8_all", "r16_rslora")
CASES = {  # name -> write_ct_w8a8's options
    "dynamic": {},
    "static": {"static": True},
    "static_asym": {"static": True, "sym": False},
    "w4a8_g32_dynamic": {"weight_bits": 4, "group_size": 32},
}


@pytest.fixture(scope="module")
def w8a8_models(tiny_root: Path, tiny_models, prompts) -> dict[str, tuple[Path, Path]]:
    """case -> (checkpoint, frozen reference) of the llama tiny model, written on first
    use; static scales calibrated on the test prompts."""
    root = tiny_root / "compressed_tensors_w8a8"
    root.mkdir(parents=True, exist_ok=True)

    class Lazy(dict):
        def __missing__(self, case: str) -> tuple[Path, Path]:
            self[case] = write_ct_w8a8(tiny_models["llama"], root, case,
                                       calibration=prompts[:3], **CASES[case])
            return self[case]
    return Lazy()


@pytest.mark.parametrize("case", list(CASES))
def test_w8a8_base_with_mixed_adapters_matches_hf_peft(case, w8a8_models, tiny_adapters,
                                                       prompts):
    """Base + adapters of ranks 4, 8, 16 in one batch over two slots, prefills chunked:
    each output is HF + PEFT's on the package's fake-quantized forward."""
    quant_dir, ref_dir = w8a8_models[case]
    llm = make_llm(quant_dir, enable_lora=True, max_loras=2, max_lora_rank=16,
                   enable_chunked_prefill=True, max_num_batched_tokens=8)
    qkv = llm.llm_engine.model.model.layers[0].self_attn.qkv_proj.base_layer
    assert isinstance(qkv, CompressedTensorsLinear)
    assert qkv.activations == ActivationQuant(dynamic="static" not in case,
                                              symmetric=not case.endswith("asym"))
    adapters = {n: tiny_adapters["llama"][n] for n in ADAPTERS}
    reqs = lora_requests(adapters)
    names = [None, *ADAPTERS] * 2
    batch = [prompts[i % len(prompts)] for i in range(len(names))]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY,
                        lora_request=[reqs[n] if n else None for n in names], use_tqdm=False)
    check_fake_quant_against_hf(outs, ref_dir, [adapters[n] if n else None for n in names], batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["dynamic", "static", "static_asym"])
def test_fake_quantize_is_the_packages(kind, dtype):
    """ActivationQuant rounds as compressed-tensors' forward_quantize does, bit for bit,
    rows of very different sizes, an all-zero row and values past a static range."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 5, 64, generator=gen) * torch.logspace(-3, 2, 5)[:, None]).to(dtype)
    x[0, 1] = 0
    args = QuantizationArgs(num_bits=8, type="int", strategy="token" if kind == "dynamic"
                            else "tensor", dynamic=kind == "dynamic",
                            symmetric=kind != "static_asym")
    module = torch.nn.Module()
    module.quantization_status = None  # forward_quantize reads it for weights only
    scale = torch.tensor([0.37], dtype=dtype)
    zero = torch.tensor([-17], dtype=torch.int8)
    module.input_scale, module.input_zero_point = scale, zero if kind == "static_asym" \
        else torch.zeros(1, dtype=torch.int8)
    want = forward_quantize(module, x, "input", args)
    quant = ActivationQuant(dynamic=kind == "dynamic", symmetric=kind != "static_asym")
    got = quant.fake_quantize(x.view(-1, 64), scale, zero).view_as(x)  # the engine's rows
    assert got.dtype == dtype and torch.equal(got, want)


def test_static_scales_of_sub_projections_merge_as_vllm():
    """Equal ones stay; different symmetric ones take the largest; asymmetric ones the
    range covering every sub-projection's."""
    scale, zero = merged_static(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([3.0, 3.0, 3.0]))
    assert scale.tolist() == [0.5] and zero.tolist() == [3.0]
    scale, zero = merged_static(torch.tensor([0.25, 0.5, 0.125]), None)
    assert scale.tolist() == [0.5] and zero is None
    scales, zeros = torch.tensor([0.1, 0.2]), torch.tensor([-28.0, 100.0])
    scale, zero = merged_static(scales, zeros)
    low, high = (scales * (-128 - zeros)).min(), (scales * (127 - zeros)).max()
    assert scale.item() == pytest.approx(((high - low) / 255).item())
    # the merged grid spans both ranges (to within the zero point's rounding)
    assert scale * (-128 - zero) <= low + scale and scale * (127 - zero) >= high - scale


def test_dummy_weights_and_a_missing_input_scale(w8a8_models, tmp_path):
    quant_dir, _ = w8a8_models["static_asym"]
    out = make_llm(quant_dir, load_format="dummy").generate(
        {"prompt_token_ids": [1, 5, 9]}, SamplingParams(max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    dst = shutil.copytree(quant_dir, tmp_path / "no_input_scale")
    state = load_file(str(dst / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.input_scale"]
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="has no input_scale, which its static input"):
        make_llm(dst)


def _acts(q: dict) -> dict:
    return q["config_groups"]["group_0"]["input_activations"]


@pytest.mark.parametrize(("case", "edit", "message"), [
    ("dynamic", lambda q: _acts(q).update(symmetric=False),
     "input activations {"),
    ("dynamic", lambda q: _acts(q).update(num_bits=4), "input activations {"),
    ("dynamic", lambda q: _acts(q).update(type="float"), "input activations {"),
    ("dynamic", lambda q: _acts(q).update(strategy="group", group_size=32),
     "dynamic per token (symmetric) or static per tensor"),
    ("dynamic", lambda q: q["config_groups"]["group_0"].update(output_activations={
        "num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}),
     "output activation quantization"),
    ("dynamic", lambda q: q["config_groups"].update(group_1={
        **q["config_groups"]["group_0"], "targets": ["re:.*down_proj"],
        "input_activations": None}), "different input activation schemes"),
    ("static", lambda q: _acts(q).update(dynamic=True, strategy="token"),
     "an input_scale where its config says no static"),
    ("static", lambda q: _acts(q).update(symmetric=False),
     "has no input_zero_point, which its static input activations need"),
])
def test_unsupported_or_inconsistent_w8a8_checkpoints_are_refused(w8a8_models, tmp_path, case,
                                                                  edit, message):
    bad = edited_copy(w8a8_models[case][0], tmp_path / "bad",
                      lambda c: edit(c["quantization_config"]), config="config.json")
    with pytest.raises(ValueError, match=re.escape(message)):
        make_llm(bad)


def test_zero_points_without_their_config_are_refused(w8a8_models, tmp_path):
    """An asymmetric checkpoint whose config says symmetric: its zero points have no
    place, as a symmetric one's missing zero points would compute something else."""
    bad = edited_copy(w8a8_models["static_asym"][0], tmp_path / "bad",
                      lambda c: _acts(c["quantization_config"]).update(symmetric=True),
                      config="config.json")
    with pytest.raises(ValueError, match="an input_zero_point where its config says no"):
        make_llm(bad)


def test_w8a8_experts_are_refused():
    from loraplex.layers.quantization.config import QuantConfig
    from loraplex.layers.quantized_experts import PackedIntFusedExperts

    cfg = QuantConfig("compressed-tensors", 8, -1, implicit_zero=True,
                      input_activations=ActivationQuant(dynamic=True))
    with pytest.raises(ValueError, match="experts with int8 activations"):
        PackedIntFusedExperts(64, 32, 4, cfg)
