"""Quantized checkpoints of Gemma 4 (models/gemma4.py: its MoE fixture, experts beside the
MLP) and Gemma 3n (models/gemma3n.py: AltUp, LAuReL), models/gemma_quant.py, with LoRA
adapters trained on the unquantized base, against HF transformers + PEFT on the
dequantized weights in fp32 (as tests/test_hybrid_quantized.py: the reference holds the
very values the checkpoint encodes).

The checkpoints: `fp8` blocks of [32, 32] (partial ones on the narrow projections),
compressed-tensors FP8 per channel and int W4A16, GPTQ and AWQ 4-bit, written as their
quantizers lay them out (tests/quantized_fixtures.py), and llm-compressor's FP8_DYNAMIC
(FP8 weights per channel, each Linear's input FP8 per token) written by the
compressed-tensors package; and `quantization="bitsandbytes"` (NF4 as it loads) on the
plain dense Gemma 4.
Every case quantizes attention, the MLPs and the per-layer embeddings' gate and
projection (LAuReL's and AltUp's stream projections too); per_layer_model_projection is
left plain by the not-convert list in some, as real checkpoints leave it. Gemma 4's
routers and AltUp's small router / coefficient linears are quantized in FP8 and load
dequantized (GateLinear); Gemma 4's experts stay plain. Each runs the base
and adapters of ranks 4 and 8 (the experts too, through PEFT's target_parameters) over
one slot in one batch, prompts prefilled in chunks beside other decodes; each format
once, to keep the file fast.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from loraplex.layers.moe import GateLinear
from loraplex.layers.quantization import QuantConfig, QuantLinear
from loraplex.models.gemma_quant import GemmaPlainExperts, check_gemma_quant
from tests.engine_utils import check_mixed_batch, make_llm
from tests.quantized_fixtures import write_compressed_tensors, write_fp8, write_quantized

VERSION = f"transformers {transformers.__version__}"
# every linear of Gemma 4's and Gemma 3n's decoders (not Gemma 4's fused experts)
GEMMA_LINEARS = re.compile(
    r"\.((q|k|v|o|gate|up|down)_proj|per_layer_(input_gate|projection|model_projection)"
    r"|linear_(left|right)|altup_(unembed_)?projections\.\d+|modality_router"
    r"|(prediction|correction)_coefs|router\.proj)\.weight$")
PLE_PLAIN = ("model.per_layer_model_projection",)  # as real checkpoints' ignore lists


# kind -> (seed, the fixture's config overrides); gemma4_dense: E2B's shape (no experts, a
# v_proj on every layer), lm_head apart from the embedding (the compressed-tensors
# package saves no tied tensors), every linear's inputs a multiple of bitsandbytes'
# 64-value blocks
KINDS: dict[str, tuple[int, dict[str, Any]]] = {
    "gemma4": (810, {}), "gemma3n": (830, {}),
    "gemma4_dense": (820, dict(enable_moe_block=False, attention_k_eq_v=False,
                               tie_word_embeddings=False, intermediate_size=128,
                               hidden_size_per_layer_input=64))}


def _make_base(kind: str, root: Path) -> tuple[Path, dict[str, Path]]:
    """The tiny plain base of `kind` and adapters of ranks 4 (q/v) and 8 (every target,
    the experts' through target_parameters)."""
    family = "gemma3n" if kind == "gemma3n" else "gemma4"
    pytest.importorskip(f"transformers.models.{family}", reason=f"{VERSION} has no {family}")
    from tests.fixtures import make_peft_adapter

    if family == "gemma3n":
        from tests.gemma3n_fixtures import make_gemma3n as make
        from tests.test_gemma3n import ALL_TARGETS
    else:
        from tests.gemma4_fixtures import make_gemma4 as make
        from tests.test_gemma4 import ALL_TARGETS
    seed, overrides = KINDS[kind]
    base = make(root / "base", seed=seed, **overrides)
    experts = ["experts.gate_up_proj", "experts.down_proj"] if kind == "gemma4" else None
    return base, {
        "r4_qv": make_peft_adapter(base, root / "r4_qv", r=4, seed=seed + 1),
        "r8_all": make_peft_adapter(base, root / "r8_all", r=8, target_modules=ALL_TARGETS,
                                    target_parameters=experts, seed=seed + 2)}


@pytest.fixture(scope="module")
def bases(tiny_root: Path):
    """kind -> (plain base, its adapters), each made on first use."""
    return functools.cache(lambda kind: _make_base(kind, tiny_root / "gemma_quant" / kind))


def _writer(write: Any, **opts: Any) -> Any:
    """A tests/quantized_fixtures.py writer of (base, root) over Gemma's linears."""
    return functools.partial(write, linears=GEMMA_LINEARS, **opts)


# case -> (model, checkpoint writer, the HF modules it leaves plain): each format once
# (the file's time; compressed-tensors' FP8_DYNAMIC: test_gemma4_fp8_dynamic). Gemma 4's
# routers (4 outputs) and AltUp's router (3 outputs) and coefficients (3 inputs) are too
# narrow to pack as int32 (GPTQ's zeros, AWQ, compressed-tensors): left plain there,
# quantized (and dequantized as they load) in FP8
GEMMA4_ROUTERS = tuple(f"model.layers.{i}.router.proj" for i in range(4))
CASES: dict[str, tuple[str, Any, tuple[str, ...]]] = {
    "gemma4_fp8_block": ("gemma4", _writer(write_fp8, fmt="fp8", strategy="block",
                                           block=(32, 32), skip=PLE_PLAIN),
                         PLE_PLAIN),
    "gemma4_ct_w4a16": ("gemma4", _writer(
        write_compressed_tensors, name="ct", group_size=8, ignore=PLE_PLAIN + GEMMA4_ROUTERS),
                        PLE_PLAIN),
    "gemma4_gptq4": ("gemma4", _writer(write_quantized, method="gptq", group_size=8,
                                       skip=("router",)), ()),
    "gemma4_awq4": ("gemma4", _writer(write_quantized, method="awq", group_size=8,
                                      skip=("router",) + PLE_PLAIN),
                    PLE_PLAIN),
    "gemma3n_ct_fp8_channel": ("gemma3n", _writer(
        write_fp8, fmt="compressed-tensors", strategy="channel", skip=PLE_PLAIN), PLE_PLAIN),
}


def _case_dir(tiny_root: Path, name: str) -> Path:
    """The directory of one case's checkpoints, made."""
    root = tiny_root / "gemma_quant" / name
    root.mkdir(parents=True, exist_ok=True)
    return root


def _write_case(case: str, tiny_root: Path, bases) -> tuple[Path, Path, dict[str, Path]]:
    kind, write, _ = CASES[case]
    base, adapters = bases(kind)
    return (*write(base, _case_dir(tiny_root, case)), adapters)


@pytest.fixture(scope="module")
def checkpoints(tiny_root: Path, bases):
    """case -> (quantized checkpoint, dequantized reference, adapters), each made on first
    use."""
    return functools.cache(lambda case: _write_case(case, tiny_root, bases))


def _quantized(module: torch.nn.Module) -> bool:
    return isinstance(getattr(module, "base_layer", module), QuantLinear)


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_gemma_with_mixed_adapters_matches_hf_peft(case, checkpoints, prompts):
    """The base and adapters of ranks 4 and 8 over one slot, prompts prefilled in chunks
    of 7: HF + PEFT's tokens and logprobs on the dequantized weights; the projections stay
    quantized, the not-convert list's modules, the routers and the experts plain."""
    quant_dir, ref_dir, adapters = checkpoints(case)
    llm = make_llm(quant_dir, enable_lora=True, max_loras=1, max_lora_rank=16, block_size=8,
                   max_num_batched_tokens=7)
    model = llm.llm_engine.model.model
    layer = model.layers[1]
    assert _quantized(layer.self_attn.qkv_proj) and _quantized(layer.mlp.down_proj)
    assert _quantized(layer.per_layer_input_gate)
    assert _quantized(model.per_layer_model_projection) == (CASES[case][2] != PLE_PLAIN)
    if CASES[case][0] == "gemma4":
        assert isinstance(layer.router.proj, GateLinear) and not _quantized(layer.router.proj)
        assert type(getattr(layer.experts, "base_layer", layer.experts)) is GemmaPlainExperts
    else:
        assert _quantized(layer.laurel.linear_left) and _quantized(model.altup_projections[0])
        assert isinstance(layer.altup.modality_router, GateLinear)
    check_mixed_batch(llm, ref_dir, adapters, prompts, extra=1)


def test_gemma4_fp8_dynamic(tiny_root, bases, prompts):
    """llm-compressor's FP8_DYNAMIC on the dense Gemma 4 (RedHat's *-FP8-dynamic), written
    by the compressed-tensors package, every Linear's input FP8 per token: the base and
    both adapters against HF + PEFT running the package's fake-quantized forward."""
    from tests.ct_float_fixtures import write_ct_float
    from tests.engine_utils import GREEDY, check_fake_quant_against_hf, lora_requests

    base, adapters = bases("gemma4_dense")
    quant_dir, ref_dir = write_ct_float(base, _case_dir(tiny_root, "gemma4_fp8_dynamic"),
                                       "FP8_DYNAMIC", prompts[:3])
    llm = make_llm(quant_dir, enable_lora=True, max_loras=2, max_lora_rank=16)
    model = llm.llm_engine.model.model
    assert _quantized(model.layers[0].self_attn.o_proj)
    assert _quantized(model.per_layer_model_projection)
    reqs = lora_requests(adapters)
    names = [None, *sorted(adapters)]
    batch = [prompts[i % len(prompts)] for i in range(len(names))]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY,
                        lora_request=[reqs[n] if n else None for n in names], use_tqdm=False)
    check_fake_quant_against_hf(outs, ref_dir, [adapters[n] if n else None for n in names],
                                batch)


def _fp8_experts(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.float8_e4m3fn) if k.endswith("experts.gate_up_proj") else v
            for k, v in t.items()} | {"model.layers.0.experts.gate_up_proj_scale":
                                      torch.ones(4, 48)}


def _per_expert_packed(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in t.items() if not k.startswith("model.layers.0.experts.")}
    out["model.layers.0.experts.0.gate_proj.weight_packed"] = torch.zeros(24, 8,
                                                                          dtype=torch.int32)
    return out


@pytest.mark.parametrize(("edit", "match"), [
    (_fp8_experts, r"quantized Gemma 4 experts are not supported yet \(got "
                   r"experts\.gate_up_proj"),
    (_per_expert_packed, r"quantized Gemma 4 experts are not supported yet \(got "
                         r"experts\.0\.gate_proj\.weight_packed"),
], ids=["fp8_fused", "ct_per_expert"])
def test_quantized_gemma4_experts_refused(edit, match, checkpoints, tiny_root):
    """A Gemma 4 checkpoint whose experts are quantized (fused FP8, or split per expert
    and packed as W4A16) is refused by name, saying what loads."""
    from tests.fixtures import edited_copy

    quant_dir = checkpoints("gemma4_gptq4")[0]
    bad = tiny_root / "gemma_quant" / f"gemma4_experts_{edit.__name__}"
    if not bad.exists():
        edited_copy(quant_dir, bad, tensors=edit, config="config.json",
                    weights="model.safetensors")
    with pytest.raises(ValueError, match=match):
        make_llm(bad)


def test_unsupported_methods_are_refused_by_name(bases, tiny_root):
    """MXFP4 (gpt-oss's) on Gemma 3n is refused naming what loads, offline through the
    engine too; the linear formats pass."""
    from tests.fixtures import edited_copy

    with pytest.raises(ValueError, match="mxfp4-quantized Gemma 4 checkpoints are not "
                       "supported yet: loraplex loads FP8"):
        check_gemma_quant(QuantConfig("mxfp4", 4, 32), "Gemma 4")
    for method in ("fp8", "compressed-tensors", "nvfp4", "gptq", "awq", "bitsandbytes"):
        check_gemma_quant(QuantConfig(method, 4, 32), "Gemma 3n")
    base, _ = bases("gemma3n")
    bad = tiny_root / "gemma_quant" / "gemma3n_mxfp4"
    if not bad.exists():
        edited_copy(base, bad, lambda c: c.update(quantization_config={
            "quant_method": "mxfp4"}), config="config.json")
    with pytest.raises(ValueError, match="mxfp4-quantized Gemma 3n checkpoints"):
        make_llm(bad)


def test_gemma4_quantized_to_nf4_as_it_loads(tiny_root, bases, prompts):
    """quantization="bitsandbytes" on the plain dense Gemma 4 (QLoRA's base): its
    projections NF4 as they load (the per-layer embeddings' too); the base and adapters
    trained on the plain model against HF + PEFT on the NF4 values dequantized."""
    from loraplex.layers.quantization import BnB4bitLinear
    from tests.quantized_fixtures import write_bnb4

    base, adapters = bases("gemma4_dense")
    plain, ref_dir = write_bnb4(base, _case_dir(tiny_root, "gemma4_nf4"), "nf4",
                                prequantized=False, linears=GEMMA_LINEARS)
    llm = make_llm(plain, quantization="bitsandbytes", enable_lora=True, max_loras=1,
                   max_lora_rank=16, block_size=8, max_num_batched_tokens=7)
    model = llm.llm_engine.model.model
    for module in (model.layers[3].mlp.down_proj, model.layers[0].per_layer_projection,
                   model.per_layer_model_projection):
        assert isinstance(getattr(module, "base_layer", module), BnB4bitLinear)
    check_mixed_batch(llm, ref_dir, adapters, prompts, extra=1)


def test_gemma3n_reusing_layers_quantized_kv_skipped(checkpoints, tiny_root, prompts):
    """A Gemma 3n checkpoint saved from transformers 4.56 holds the KV-sharing layers' own
    k/v projections (never run with a cache), quantized as the rest: skipped as they load,
    the outputs those of the checkpoint without them."""
    from tests.engine_utils import GREEDY
    from tests.fixtures import edited_copy
    from tests.gemma3n_fixtures import HF_KV_SHARING

    if not HF_KV_SHARING:
        pytest.skip(f"{VERSION}'s tiny Gemma 3n has no KV-sharing layers")
    quant_dir = checkpoints("gemma3n_ct_fp8_channel")[0]
    extra = tiny_root / "gemma_quant" / "gemma3n_fp8_shared_kv"
    fp8 = torch.full((32, 64), 448.0).to(torch.float8_e4m3fn)
    if not extra.exists():
        edited_copy(quant_dir, extra, tensors=lambda t: t | {
            f"model.layers.{i}.self_attn.{m}.{kind}": value.clone() for i in (3, 4)
            for m in ("k_proj", "v_proj")
            for kind, value in (("weight", fp8), ("weight_scale", torch.ones(32, 1)))},
            config="config.json", weights="model.safetensors")
    outs = [make_llm(d).generate([{"prompt_token_ids": prompts[2]}], GREEDY, use_tqdm=False)
            for d in (quant_dir, extra)]
    assert outs[0][0].outputs[0].token_ids == outs[1][0].outputs[0].token_ids


def test_gemma4_int_packed_router_refused_by_name(bases, tiny_root):
    """A W4A16 Gemma 4 whose routers were packed too (4 outputs: no whole int32) is refused
    naming the router and how to leave it out."""
    base, _ = bases("gemma4")
    root = tiny_root / "gemma_quant" / "gemma4_ct_router"
    if not root.exists():
        root.mkdir(parents=True)
        write_compressed_tensors(base, root, "ct", linears=GEMMA_LINEARS, group_size=8,
                                 ignore=PLE_PLAIN)
    with pytest.raises(ValueError, match=r"model\.layers\.\d\.router\.proj\.weight_\w+: "
                       r"compressed-tensors: output sizes \[4\] .* must leave them "
                       r"unquantized: its ignore"):
        make_llm(root / "ct_quant")


def test_gemma3n_conditional_generation_compressed_tensors(checkpoints, tiny_root, prompts):
    """The FP8 Gemma 3n as Gemma3nForConditionalGeneration saves it (its tensors and its
    ignore list under model.language_model.*, regexes for the towers, as llm-compressor
    writes them): the not-convert list read under the text model's names, its outputs
    those of the text checkpoint (held against HF + PEFT above)."""
    import json

    from tests.engine_utils import GREEDY
    from tests.gemma3n_fixtures import as_conditional_generation

    quant_dir = checkpoints("gemma3n_ct_fp8_channel")[0]
    whole = tiny_root / "gemma_quant" / "gemma3n_ct_fp8_whole"
    if not whole.exists():
        as_conditional_generation(quant_dir, whole)
        cfg = json.loads((whole / "config.json").read_text())
        quant = json.loads((quant_dir / "config.json").read_text())["quantization_config"]
        quant["ignore"] = ["lm_head", "model.language_model.per_layer_model_projection",
                           r"re:.*(vision|audio)_tower.*", r"re:.*embed_(vision|audio).*"]
        cfg["quantization_config"] = quant
        (whole / "config.json").write_text(json.dumps(cfg))
    llms = [make_llm(d) for d in (quant_dir, whole)]
    model = llms[1].llm_engine.model.model
    assert not _quantized(model.per_layer_model_projection)
    assert _quantized(model.layers[0].self_attn.qkv_proj)
    outs = [llm.generate([{"prompt_token_ids": prompts[2]}], GREEDY, use_tqdm=False)[0]
            for llm in llms]
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    for a, b in zip(outs[0].outputs[0].logprobs, outs[1].outputs[0].logprobs, strict=True):
        assert all(abs(a[t].logprob - lp.logprob) < 1e-5 for t, lp in b.items())
