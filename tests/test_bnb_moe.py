"""bitsandbytes 4-bit mixtures of experts (Mixtral, Qwen2-MoE with its shared expert,
Qwen3-MoE with a plain MLP layer) with LoRA adapters, against HF + PEFT on the dequantized
weights.

`quantization="bitsandbytes"` on a plain checkpoint quantizes each expert to NF4 as it
loads (the routers stay plain); a checkpoint as transformers 4's load_in_4bit saves it
holds a Params4bit per expert projection and router (the routers are dequantized while
loading). The references come from bitsandbytes' own quantize_4bit / dequantize_4bit
(tests/quantized_fixtures.write_bnb4). The experts stay packed (BnB4bitFusedExperts);
under the Triton interpreter the CUDA path (the 4-bit kernel per expert) is held against
the torch one.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraplex import SamplingParams
from loraplex.layers.experts import FusedExperts
from loraplex.layers.moe import GateLinear
from loraplex.layers.quantization import QuantConfig
from loraplex.layers.quantization.bitsandbytes import quantize_nf4
from loraplex.layers.quantization.codes4 import dequantize_codes4
from loraplex.layers.quantized_experts import BnB4bitFusedExperts
from tests.engine_utils import check_mixed_batch, make_llm
from tests.fixtures import make_peft_adapter, make_tiny_model
from tests.quantized_fixtures import write_bnb4
from tests.test_quantized_moe import ARCHS, _adapters, _edited, _experts, _routing

# bitsandbytes' blocks are 64 inputs: the Qwen experts (and shared expert) at 64
SIZES = {"mixtral": {}, "qwen2_moe": {"moe_intermediate_size": 64,
                                      "shared_expert_intermediate_size": 64},
         "qwen3_moe": {"moe_intermediate_size": 64}}

CASES = {  # name -> (arch, write_bnb4 options)
    "mixtral_in_flight_nf4": ("mixtral", dict(prequantized=False)),
    "qwen3_moe_in_flight_nf4": ("qwen3_moe", dict(prequantized=False)),
    # the routers (the shared expert's gate too) 4-bit, as transformers 4 saves them
    "qwen2_moe_prequantized_nf4_double": ("qwen2_moe", dict(prequantized=True,
                                                            double_quant=True)),
}


@pytest.fixture(scope="module")
def bnb_moe_models(tiny_root: Path) -> dict[str, tuple[Path, dict[str, Path]]]:
    """arch -> (plain tiny model in bitsandbytes' blocks, its adapters by name)."""
    out = {}
    for seed, arch in enumerate(SIZES):
        root = tiny_root / "bnb_moe" / arch
        base = make_tiny_model(root / "base", arch, seed=110 + seed,
                               **{**ARCHS[arch][2], **SIZES[arch]})
        out[arch] = (base, {name: make_peft_adapter(base, root / name, seed=115 + seed + i,
                                                    **spec)
                            for i, (name, spec) in enumerate(_adapters(arch).items())})
    return out


@pytest.fixture(scope="module")
def bnb_moe(tiny_root: Path, bnb_moe_models) -> dict[str, tuple[Path, Path]]:
    """case -> (checkpoint, bitsandbytes' dequantized reference)."""
    pytest.importorskip("bitsandbytes")
    return {case: write_bnb4(bnb_moe_models[arch][0], tiny_root / "bnb_moe", case, **opts)
            for case, (arch, opts) in CASES.items()}


def _llm(case: str, bnb_moe, **kw):
    opts = CASES[case][1]
    return make_llm(bnb_moe[case][0], **kw,
                    **({} if opts["prequantized"] else {"quantization": "bitsandbytes"}))


@pytest.mark.parametrize("case", list(CASES))
def test_bnb_moe_with_mixed_adapters_matches_hf_peft(case, bnb_moe_models, bnb_moe, prompts):
    """Base + adapters of ranks 4, 8 and 6 (on the experts) in one batch, two slots: each
    output HF + PEFT's on bitsandbytes' dequantized weights; the routers plain (a
    prequantized one's dequantized as it loads)."""
    arch, opts = CASES[case]
    llm = _llm(case, bnb_moe, enable_lora=True, max_loras=2, max_lora_rank=16)
    experts = _experts(llm, 0)
    assert isinstance(experts, BnB4bitFusedExperts)
    assert experts.cfg.prequantized == opts["prequantized"] and experts.w13.dtype == torch.uint8
    block = llm.llm_engine.model.model.layers[0]
    router = getattr(block, block.ffn_name).gate
    router = getattr(router, "base_layer", router)
    assert isinstance(router, GateLinear) and router.weight.dtype == torch.float32
    ref = load_file(str(bnb_moe[case][1] / "model.safetensors"))
    torch.testing.assert_close(router.weight.cpu(), ref[f"model.layers.0.{ARCHS[arch][0]}"
                                                        ".gate.weight"])
    if arch == "qwen2_moe":
        shared_gate = getattr(block, block.ffn_name).shared_expert_gate
        shared_gate = getattr(shared_gate, "base_layer", shared_gate)
        torch.testing.assert_close(shared_gate.weight.cpu(),
                                   ref["model.layers.0.mlp.shared_expert_gate.weight"])
    check_mixed_batch(llm, bnb_moe[case][1], bnb_moe_models[arch][1], prompts)


def test_bnb_experts_stay_packed(bnb_moe):
    """Two 4-bit codes per byte and an fp32 absmax per 64: under a sixth of fp32's bytes."""
    llm = _llm("mixtral_in_flight_nf4", bnb_moe)
    for layer in (0, 1):
        experts = _experts(llm, layer)
        held = sum(t.numel() * t.element_size()
                   for t in (*experts.parameters(), *experts.buffers()))
        e, h, i = experts.num_experts, experts.hidden_size, experts.intermediate_size
        assert held < 0.15 * (e * 3 * h * i * 4)
        assert not any(p.is_floating_point() for p in experts.parameters())


def test_dummy_weights_for_a_bnb_moe(bnb_moe_models, prompts):
    """load_format="dummy" with quantization="bitsandbytes": random codes, absmax > 0."""
    llm = make_llm(bnb_moe_models["qwen2_moe"][0], load_format="dummy",
                   quantization="bitsandbytes")
    experts = _experts(llm, 0)
    assert isinstance(experts, BnB4bitFusedExperts)
    assert experts.w13_absmax.min() > 0 and experts.w2.unique().numel() > 200
    out = llm.generate({"prompt_token_ids": prompts[0]}, SamplingParams(max_tokens=4),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


LEAVES = {"gate_proj": (slice(0, 64), (64, 128)), "up_proj": (slice(64, 128), (64, 128)),
          "down_proj": (slice(None), (128, 64))}  # leaf -> (its rows of the stack, shape)


def _bnb_experts(source: str, e: int = 4) -> tuple[BnB4bitFusedExperts, FusedExperts]:
    """Random experts (H 128, I 64) loaded tensor by tensor as the loader does, and plain
    experts on their dequantized weights. source: "in_flight" (plain weights, quantized
    here; the reference dequantizes them in torch) or "nf4" / "fp4" / "nf4_double" (each
    projection a Params4bit from bitsandbytes, the reference its dequantize_4bit)."""
    prequantized = source != "in_flight"
    cfg = QuantConfig("bitsandbytes", 4, 64, quant_type="fp4" if source == "fp4" else "nf4",
                      prequantized=prequantized)
    packed, plain = BnB4bitFusedExperts(128, 64, e, cfg), FusedExperts(128, 64, e)
    gen = torch.Generator().manual_seed(5)
    for expert in range(e):
        for leaf, (rows, shape) in LEAVES.items():
            w = 0.1 * torch.randn(shape, generator=gen)
            stack = plain.w2 if leaf == "down_proj" else plain.w13
            if prequantized:
                from bitsandbytes.functional import dequantize_4bit as bnb_dequantize
                from bitsandbytes.functional import quantize_4bit

                q, qs = quantize_4bit(w, blocksize=64, quant_type=cfg.quant_type,
                                      compress_statistics=source.endswith("double"))
                pieces = {"weight": q, **{f"weight.{k}": v
                                          for k, v in qs.as_dict(packed=True).items()}}
                for kind, t in reversed(pieces.items()):  # in any order
                    packed.load_expert(expert, leaf, t, kind)
                stack.data[expert, rows] = bnb_dequantize(q, qs)
            else:
                packed.load_expert(expert, leaf, w)
                q, absmax = quantize_nf4(w, 64)
                stack.data[expert, rows] = dequantize_codes4(q, absmax, packed.code,
                                                             torch.float32, high_first=True)
    packed.finish_loading()
    return packed, plain


def _bnb_version() -> tuple[int, ...]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(v) for v in version("bitsandbytes").split(".")[:2])
    except PackageNotFoundError:
        return (0, 0)


@pytest.mark.parametrize("source", ["in_flight", "nf4", "fp4", "nf4_double"])
def test_bnb_experts_compute_the_dequantized_experts(source):
    """Loaded expert by expert (gate's and up's rows stacked in w13), the experts give
    what plain experts on the dequantized weights give. bitsandbytes before 0.50
    dequantizes FP4 on the CPU with its table rounded to four decimals (0.6667 for 2/3);
    its CUDA kernel, 0.50's CPU path and loraplex use the exact values: there the
    outputs differ by up to 4e-4 (a wrong table entry would be 0.005 of a block's absmax
    off, or more)."""
    if source != "in_flight":
        pytest.importorskip("bitsandbytes")
    packed, plain = _bnb_experts(source)
    x, weights, chosen = _routing(9, 4, seed=8, hidden=128)
    tol = 5e-4 if source == "fp4" and _bnb_version() < (0, 50) else 1e-5
    torch.testing.assert_close(packed(x, weights, chosen), plain(x, weights, chosen),
                               rtol=tol, atol=tol)


@pytest.mark.skipif(torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="interpreter tests run where there is no CUDA")
def test_bnb_experts_on_the_kernel(monkeypatch):
    """The CUDA path, each expert with tokens through the 4-bit kernel (under the
    interpreter here), gives the torch path's output."""
    from tests.triton_compile import import_kernels, torch_and_triton

    triton_bnb = import_kernels("loraplex.layers.quantization.triton_bnb")
    if not triton_bnb._INTERPRETED:
        pytest.skip("needs the Triton interpreter")
    packed, _ = _bnb_experts("in_flight")
    x, weights, chosen = _routing(6, 4, seed=9, hidden=128)
    out, calls = torch_and_triton(monkeypatch, triton_bnb, lambda: packed(x, weights, chosen))
    assert len(calls) == 2 * len(chosen.unique())  # w13 and w2 of each expert with tokens
    torch.testing.assert_close(out["triton"], out["torch"], rtol=1e-5, atol=1e-5)


def test_unsupported_or_inconsistent_bnb_moe_checkpoints(bnb_moe_models, bnb_moe, tmp_path):
    prequantized = bnb_moe["qwen2_moe_prequantized_nf4_double"][0]
    expert = "model.layers.0.mlp.experts.2.up_proj.weight"

    def quant_config(**changes):
        return lambda cfg: cfg["quantization_config"].update(changes)
    cases = [
        (_edited(prequantized, tmp_path / "int8", config=quant_config(
            load_in_4bit=False, load_in_8bit=True)),
         "bitsandbytes 8-bit Qwen2MoeForCausalLM models are not supported yet"),
        (_edited(prequantized, tmp_path / "missing", tensors=lambda t: {
            k: v for k, v in t.items() if k != f"{expert}.nested_absmax"}),
         "lacks 1 expert projections, e.g. expert 2's up projection (found ['weight', "
         "'weight.absmax', 'weight.nested_quant_map', 'weight.quant_map', "
         "'weight.quant_state.bitsandbytes__nf4']"),
        (_edited(prequantized, tmp_path / "some_plain", config=quant_config(
            llm_int8_skip_modules=["experts.1."])),
         "leaves only some of a mixture's experts unquantized"),
        # transformers 5's load_in_4bit leaves the experts plain when it saves
        (_edited(bnb_moe_models["mixtral"][0], tmp_path / "plain_experts", config=lambda c:
                 c.update(quantization_config=json.loads((prequantized / "config.json")
                                                         .read_text())["quantization_config"])),
         "expert 0 w1.weight is a plain torch.float32 weight where config.json's "
         "quantization_config says 4-bit values should be"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            make_llm(path)
    small = make_tiny_model(tmp_path / "qwen3_moe_48", "qwen3_moe")  # experts' I = 48
    with pytest.raises(ValueError, match=re.escape(
            "hidden_size 64 and the experts' intermediate_size 48 must be multiples of its "
            "64-input blocks")):
        make_llm(small, quantization="bitsandbytes")
