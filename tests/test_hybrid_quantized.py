"""Quantized checkpoints of the hybrid models (models/hybrid_quant.py): Qwen3-Next,
Qwen3.5 and Qwen3.5-MoE (gated DeltaNets), LFM2 and LFM2-MoE (short convolutions), with
LoRA adapters trained on the unquantized base (QLoRA's way), against HF transformers +
PEFT on the dequantized weights in fp32 (transformers runs neither FP8 nor packed int
checkpoints in fp32 on the CPU; the reference holds the very values the checkpoint
encodes, so a loader that unpacks or scales wrongly cannot agree with it).

The checkpoints: `fp8` block-quantized as Qwen ships Qwen3-Next-80B-A3B-FP8 (a
`weight_block_size`, here [32, 32] so the tiny matrices hold several blocks and partial
ones, and a per-module `modules_to_not_convert` list); compressed-tensors FP8 per channel
and int W4A16 written as llm-compressor lays them out (tests/quantized_fixtures.py), and
W4A16 / W8A16 written by the compressed-tensors package itself; GPTQ and AWQ as AutoGPTQ
/ AutoAWQ pack them. Every case quantizes the mixers' projections (the DeltaNets' fused
or split in_proj / out_proj, the conv blocks' in_proj / out_proj), attention, the MLPs,
the experts one linear each and the shared expert; routers, gates, convs and norms stay
plain. Each runs the base and adapters of ranks 4 and 8 (the experts too, through PEFT's
target_parameters) in one batch, prompts prefilled in chunks beside other decodes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from loraplex.layers.quantization import QuantConfig, QuantLinear
from loraplex.layers.quantized_experts import FP8FusedExperts, PackedIntFusedExperts
from loraplex.models.hybrid_quant import check_hybrid_quant
from tests.engine_utils import GREEDY, check_mixed_batch, make_llm
from tests.quantized_fixtures import (
    write_compressed_tensors,
    write_fp8,
    write_quantized,
    write_with_compressed_tensors,
)

# every projection a hybrid quantizer packs: attention's, the MLPs' and experts', the
# mixers' in_proj* / out_proj (Mamba-1's x_proj / dt_proj too), LFM2's w1 / w3 / w2
HYBRID_LINEARS = re.compile(r"\.((q|k|v|o|gate|up|down|x|dt)_proj|in_proj\w*|out_proj|w[123])"
                            r"\.weight$")
ATOL = 5e-4  # (tests/test_fp8.py's: blocked FP8 weights sum in another order than HF's)


def _qwen(root: Path, kind: str) -> tuple[Path, dict[str, Path]]:
    version = f"transformers {transformers.__version__}"
    pytest.importorskip("transformers.models.qwen3_next", reason=f"{version} has no Qwen3-Next")
    pytest.importorskip("transformers.models.qwen3_5", reason=f"{version} has no Qwen3.5")
    from tests.fixtures import make_peft_adapter
    from tests.test_qwen3_next import ADAPTER_TARGETS, make_model

    seed = 700 + 10 * list(ADAPTER_TARGETS).index(kind)
    base = make_model(root / "base", kind, seed)
    (mixer, _), (every, every_params) = ADAPTER_TARGETS[kind]
    specs = {"r4_mixer": dict(r=4, lora_alpha=8, target_modules=mixer, seed=seed + 1),
             "r8_all": dict(r=8, lora_alpha=16, target_modules=every, seed=seed + 2,
                            target_parameters=every_params)}
    return base, {n: make_peft_adapter(base, root / n, **s) for n, s in specs.items()}


def _lfm2(root: Path, kind: str) -> tuple[Path, dict[str, Path]]:
    from tests.fixtures import make_peft_adapter
    from tests.test_lfm2 import CONV, EXPERT_PARAMETERS, _skip_reason, make_model

    if (reason := _skip_reason(kind)) is not None:
        pytest.skip(reason)
    seed = 760 + 10 * (kind == "lfm2_moe")
    base = make_model(root / "base", kind, seed)
    specs = {"r4_mixer": dict(r=4, lora_alpha=8, target_modules=CONV, seed=seed + 1),
             "r8_all": dict(r=8, lora_alpha=16, target_modules="all-linear", seed=seed + 2,
                            target_parameters=EXPERT_PARAMETERS.get(kind))}
    return base, {n: make_peft_adapter(base, root / n, **s) for n, s in specs.items()}


def _mamba1(root: Path, kind: str) -> tuple[Path, dict[str, Path]]:
    from tests.test_mamba1 import ADAPTER_TARGETS, _skip_reason, make_adapter, make_model

    if (reason := _skip_reason(kind)) is not None:
        pytest.skip(reason)
    seed = 780 + 5 * list(ADAPTER_TARGETS).index(kind)
    base = make_model(root / "base", kind, seed)
    small, every, parameters = ADAPTER_TARGETS[kind]
    return base, {"r4_mixer": make_adapter(base, root / "r4_mixer", 4, small, None, seed + 1),
                  "r8_all": make_adapter(base, root / "r8_all", 8, every, parameters, seed + 2)}


MAKERS = {"qwen3_next": _qwen, "qwen3_5": _qwen, "qwen3_5_moe": _qwen, "lfm2": _lfm2,
          "lfm2_moe": _lfm2, "mamba": _mamba1, "falcon_mamba": _mamba1, "jamba": _mamba1}


@pytest.fixture(scope="module")
def bases(tiny_root: Path):
    """kind -> (plain base, its adapters), each made on first use."""
    made: dict[str, tuple[Path, dict[str, Path]]] = {}

    def get(kind: str) -> tuple[Path, dict[str, Path]]:
        if kind not in made:
            root = tiny_root / "hybrid_quant" / kind
            made[kind] = MAKERS[kind](root, kind)
        return made[kind]
    return get


def _fp8(fmt: str, strategy: str, **opts: Any):
    return lambda base, root: write_fp8(base, root, fmt, strategy, linears=HYBRID_LINEARS,
                                        **opts)


def _ct_int(**opts: Any):
    return lambda base, root: write_compressed_tensors(base, root, "ct", linears=HYBRID_LINEARS,
                                                       **opts)


def _packed(method: str, **opts: Any):
    return lambda base, root: write_quantized(base, root, method, linears=HYBRID_LINEARS,
                                              **opts)


def _ct_package(**opts: Any):
    return lambda base, root: write_with_compressed_tensors(base, root, "ctpkg", **opts)


# case -> (model, checkpoint writer, the HF modules it leaves plain); Qwen's FP8 lists
# (as Qwen3-Next-80B-A3B-FP8's) name each layer's small DeltaNet projections, router and
# shared-expert gate
QWEN3_NEXT_PLAIN = ("model.layers.0.linear_attn.in_proj_ba", "model.layers.0.mlp.gate",
                    "model.layers.0.mlp.shared_expert_gate")
QWEN3_5_PLAIN = ("model.layers.2.linear_attn.in_proj_b", "model.layers.2.linear_attn.in_proj_a")
# the tiny DeltaNets' b and a projections have 4 outputs, less than an int32 packs (real
# ones have 32 or more): left plain under the packed int formats
SMALL = ("in_proj_b", "in_proj_a")
MAMBA_PLAIN = tuple(f"backbone.layers.{i}.mixer.{p}" for i in (0, 1) for p in ("x_proj", "dt_proj"))
LFM2_PLAIN = ("model.layers.0.conv.in_proj", "model.layers.1.self_attn.out_proj")
LFM2_LAYER1_EXPERTS = tuple(f"model.layers.1.feed_forward.experts.{e}.{leaf}"
                            for e in range(8) for leaf in ("w1", "w3", "w2"))
CASES: dict[str, tuple[str, Any, tuple[str, ...]]] = {
    "qwen3_next_fp8_block": ("qwen3_next", _fp8("fp8", "block", block=(32, 32),
                                                 skip=QWEN3_NEXT_PLAIN), QWEN3_NEXT_PLAIN),
    "qwen3_5_moe_fp8_block": ("qwen3_5_moe", _fp8("fp8", "block", block=(32, 32),
                                                   skip=QWEN3_5_PLAIN[:1]), QWEN3_5_PLAIN[:1]),
    "qwen3_5_moe_ct_fp8_channel": ("qwen3_5_moe", _fp8("compressed-tensors", "channel"), ()),
    "qwen3_next_ct_w4a16": ("qwen3_next", _ct_int(group_size=16), ()),
    "qwen3_5_ct_package_w4a16": ("qwen3_5", _ct_package(group_size=32, ignore=(
        r"re:.*linear_attn\.in_proj_[ab]$",)), ()),
    "qwen3_5_moe_gptq4": ("qwen3_5_moe", _packed("gptq", group_size=16, skip=SMALL),
                          QWEN3_5_PLAIN),
    "qwen3_next_awq4": ("qwen3_next", _packed("awq", group_size=16), ()),
    # a conv block's in_proj and the attention's out_proj (its name, as the conv's)
    "lfm2_fp8_block": ("lfm2", _fp8("fp8", "block", block=(32, 32), skip=LFM2_PLAIN),
                       LFM2_PLAIN),
    "lfm2_moe_fp8_block": ("lfm2_moe", _fp8("fp8", "block", block=(32, 32)), ()),
    # layer 1's experts left plain by exact names (llm-compressor's `ignore`)
    "lfm2_moe_ct_w4a16": ("lfm2_moe", _ct_int(group_size=8, ignore=LFM2_LAYER1_EXPERTS),
                          ("model.layers.1.feed_forward.experts",)),
    "lfm2_ct_package_w8a16": ("lfm2", _ct_package(bits=8, group_size=-1), ()),
    # layer 1's experts left plain beside layer 2's packed ones
    "lfm2_moe_gptq4": ("lfm2_moe", _packed("gptq", group_size=8, sym=True,
                                           skip=("layers.1.feed_forward.experts",)),
                       ("model.layers.1.feed_forward.experts",)),
    "jamba_fp8_block": ("jamba", _fp8("fp8", "block", block=(32, 32)), ()),
    # Mamba-1's x_proj (6 + 2 x 8 outputs) and dt_proj (6 inputs) too narrow to pack:
    # left plain, under their checkpoints' names (backbone.*)
    "falcon_mamba_ct_w8a16": ("falcon_mamba", _ct_int(bits=8, group_size=-1, ignore=MAMBA_PLAIN),
                              MAMBA_PLAIN),
    "mamba_gptq4": ("mamba", _packed("gptq", group_size=32, skip=("x_proj", "dt_proj")), ()),
}


@pytest.fixture(scope="module")
def checkpoints(tiny_root: Path, bases):
    """case -> (quantized checkpoint, dequantized reference, adapters), each made on first
    use."""
    made: dict[str, tuple[Path, Path, dict[str, Path]]] = {}

    def get(case: str) -> tuple[Path, Path, dict[str, Path]]:
        if case not in made:
            kind, write, _ = CASES[case]
            base, adapters = bases(kind)
            root = tiny_root / "hybrid_quant" / case
            root.mkdir(parents=True, exist_ok=True)
            made[case] = (*write(base, root), adapters)
        return made[case]
    return get


def _quantized(module: torch.nn.Module) -> bool:
    inner = getattr(module, "base_layer", module)
    return isinstance(inner, QuantLinear | FP8FusedExperts | PackedIntFusedExperts)


def _module(model: torch.nn.Module, hf_name: str) -> torch.nn.Module:
    """Our module of an HF module name (Mamba's backbone.* is our model.*)."""
    return model.get_submodule(re.sub(r"^backbone\.", "model.", hf_name))


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_hybrid_with_mixed_adapters_matches_hf_peft(case, checkpoints, prompts):
    """The base and adapters of ranks 4 and 8 over two slots, prompts prefilled in chunks
    of 7: HF + PEFT's tokens on the dequantized weights; the mixers' projections and the
    experts stay quantized, the not-convert list's modules plain."""
    quant_dir, ref_dir, adapters = checkpoints(case)
    llm = make_llm(quant_dir, enable_lora=True, max_loras=2, max_lora_rank=16, block_size=8,
                   max_num_batched_tokens=7)
    model = llm.llm_engine.model
    mixer = next(m for m in model.modules() if hasattr(m, "out_proj")
                 and hasattr(m, "conv_state"))
    assert _quantized(mixer.out_proj)
    for name in CASES[case][2]:
        if not name.endswith("gate"):
            assert not _quantized(_module(model, name)), name
    experts = [m for n, m in model.named_modules() if n.endswith("experts")
               and n not in CASES[case][2]]
    assert all(_quantized(e) for e in experts)
    check_mixed_batch(llm, ref_dir, adapters, prompts, extra=3)


@pytest.mark.parametrize("scheme", ["FP8_DYNAMIC", "NVFP4A16"])
def test_compressed_tensors_float_schemes_on_qwen3_5(scheme, tiny_root, bases, prompts):
    """llm-compressor's FP8_DYNAMIC (each Linear's input FP8 per token) and NVFP4A16 on
    Qwen3.5 (dense), written by the compressed-tensors package, the DeltaNets' every
    projection included: the base and both adapters against HF + PEFT running the
    package's own fake-quantized forward."""
    from tests.ct_float_fixtures import write_ct_float
    from tests.engine_utils import check_fake_quant_against_hf, lora_requests

    base, adapters = bases("qwen3_5")
    root = tiny_root / "hybrid_quant" / f"qwen3_5_{scheme}"
    root.mkdir(parents=True, exist_ok=True)
    quant_dir, ref_dir = write_ct_float(base, root, scheme, prompts[:3])
    # (prompts whole: an input at a rounding boundary of its FP8 step may round the other
    # way than in HF (tests/engine_utils.py FLIP), and a DeltaNet's state carries such a
    # flip on to every later token, so chunks, whose sums run in other orders, leave
    # fewer logprobs within 1e-4 than check_fake_quant_against_hf asks of a model
    # without a state; the weight-only cases above are chunked)
    llm = make_llm(quant_dir, enable_lora=True, max_loras=2, max_lora_rank=16)
    layer = llm.llm_engine.model.model.layers[0].linear_attn
    assert all(_quantized(getattr(layer, n)) for n in
               ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"))
    reqs = lora_requests(adapters)
    names = [None, *sorted(adapters)] * 2
    batch = [prompts[i % len(prompts)] for i in range(len(names))]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY,
                        lora_request=[reqs[n] if n else None for n in names], use_tqdm=False)
    check_fake_quant_against_hf(outs, ref_dir, [adapters[n] if n else None for n in names],
                                batch)


def test_qwen3_5_moe_quantized_to_fp8_as_it_loads(tiny_root, bases, prompts):
    """quantization="fp8" on the plain Qwen3.5-MoE (vLLM's in-flight FP8): the DeltaNets',
    attention's, the shared expert's and the experts' weights FP8 with a scale per row as
    they load, routers and gates plain; against HF + PEFT on the same rounding dequantized."""
    from tests.fixtures import edited_copy
    from tests.quantized_fixtures import quantize_fp8

    base, adapters = bases("qwen3_5_moe")
    ref_dir = tiny_root / "hybrid_quant" / "qwen3_5_moe_fp8_online_ref"
    if not ref_dir.exists():
        edited_copy(base, ref_dir, tensors=lambda t: {
            k: quantize_fp8(v, "channel")[2] if HYBRID_LINEARS.search(k) else v
            for k, v in t.items()}, config="config.json", weights="model.safetensors")
    llm = make_llm(base, quantization="fp8", enable_lora=True, max_loras=2, max_lora_rank=16,
                   block_size=8, max_num_batched_tokens=7)
    layer = llm.llm_engine.model.model.layers[0]
    assert _quantized(layer.linear_attn.in_proj_b) and _quantized(layer.mlp.experts)
    check_mixed_batch(llm, ref_dir, adapters, prompts, extra=3)


def test_lfm2_quantized_to_nf4_as_it_loads(tiny_root, bases, prompts):
    """quantization="bitsandbytes" on the plain LFM2 (QLoRA's base): its conv blocks,
    attention and MLPs NF4 as they load (blocks of 64 inputs: the tiny LFM2-MoE's 24-wide
    experts would not fit); the base and adapters trained on the plain model against HF +
    PEFT on the NF4 values dequantized."""
    from loraplex.layers.quantization import BnB4bitLinear
    from tests.quantized_fixtures import write_bnb4

    base, adapters = bases("lfm2")
    root = tiny_root / "hybrid_quant" / "lfm2_nf4"
    root.mkdir(parents=True, exist_ok=True)
    plain, ref_dir = write_bnb4(base, root, "nf4", prequantized=False, linears=HYBRID_LINEARS)
    llm = make_llm(plain, quantization="bitsandbytes", enable_lora=True, max_loras=2,
                   max_lora_rank=16, block_size=8, max_num_batched_tokens=7)
    layers = llm.llm_engine.model.model.layers
    assert isinstance(layers[0].conv.in_proj.base_layer, BnB4bitLinear)
    assert isinstance(layers[1].feed_forward.down_proj.base_layer, BnB4bitLinear)
    check_mixed_batch(llm, ref_dir, adapters, prompts, extra=3)


def test_unsupported_methods_are_refused_by_name():
    """NVFP4 experts, MXFP4 (gpt-oss's) and bitsandbytes 8-bit experts are refused,
    naming what loads; the linears of a model without experts take NVFP4 and 8-bit."""
    with pytest.raises(ValueError, match=r"nvfp4-quantized Qwen3NextForCausalLM checkpoints "
                       r"are not supported yet: loraplex loads FP8"):
        check_hybrid_quant(QuantConfig("nvfp4", 4, 16), "Qwen3NextForCausalLM", experts=True)
    with pytest.raises(ValueError, match="mxfp4-quantized Lfm2ForCausalLM"):
        check_hybrid_quant(QuantConfig("mxfp4", 4, 32), "Lfm2ForCausalLM", experts=False)
    with pytest.raises(ValueError, match="bitsandbytes 8-bit JambaForCausalLM"):
        check_hybrid_quant(QuantConfig("bitsandbytes", 8, -1), "JambaForCausalLM", experts=True)
    check_hybrid_quant(QuantConfig("bitsandbytes", 8, -1), "MambaForCausalLM", experts=False)
    check_hybrid_quant(QuantConfig("nvfp4", 4, 16), "Qwen3_5ForCausalLM", experts=False)


def test_qwen3_5_moe_conditional_generation_fp8(tiny_root: Path):
    """Qwen3.5-MoE's whole-model checkpoint in FP8 blocks, as Qwen ships Qwen3.5 FP8: its
    not-convert list names the language model's modules under the whole model's names
    (`model.language_model.layers.0.linear_attn.in_proj_b`) and the tower's; those load
    plain, the rest FP8. Text and image prompts, the base and an adapter on the whole
    model: HF's ForConditionalGeneration (+ PEFT) on the dequantized weights."""
    pytest.importorskip("transformers.models.qwen3_5_moe",
                        reason=f"transformers {transformers.__version__} has no Qwen3.5-MoE")
    from loraplex import LoRARequest
    from tests.llava_fixtures import image
    from tests.multimodal_fixtures import LANGUAGE_MODEL, make_multimodal_adapter, request
    from tests.qwen2_vl_fixtures import ASK, check
    from tests.qwen2_vl_fixtures import GREEDY as VL_GREEDY
    from tests.test_qwen2_vl import TEXT
    from tests.test_qwen3_next import make_qwen3_5_vl

    root = tiny_root / "hybrid_quant" / "qwen3_5_moe_vl"
    base = make_qwen3_5_vl(root / "base", 790, moe=True)
    adapter = make_multimodal_adapter(
        base, root / "r8", r=8, seed=791,
        targets=LANGUAGE_MODEL + "(in_proj_qkv|in_proj_z|out_proj|q_proj|v_proj|down_proj)")
    plain = ("model.language_model.layers.0.linear_attn.in_proj_b",
             "model.language_model.layers.0.linear_attn.in_proj_a")
    quant_dir, ref_dir = write_fp8(base, root, "fp8", "block", block=(32, 32),
                                   skip=plain, linears=HYBRID_LINEARS)
    llm = make_llm(quant_dir, enable_lora=True, max_loras=1, max_lora_rank=8)
    layer = llm.llm_engine.model.model.layers[0].linear_attn
    assert not _quantized(layer.in_proj_b) and not _quantized(layer.in_proj_a)
    assert _quantized(layer.in_proj_qkv) and _quantized(layer.out_proj)
    jobs = [(TEXT, [], None), (TEXT, [], adapter), (ASK, [image(1, (24, 40))], adapter)]
    r8 = LoRARequest("r8", 1, str(adapter))
    outs = llm.generate([request(p, ims) for p, ims, _ in jobs], VL_GREEDY, use_tqdm=False,
                        lora_request=[r8 if a else None for *_, a in jobs])
    check(outs, ref_dir, jobs)
