"""GPTQ and AWQ mixtures of experts (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE
with a plain MLP layer) with LoRA adapters, against HF + PEFT on the dequantized weights.

tests/quantized_fixtures.py quantizes each expert's linears as AutoGPTQ / AutoAWQ pack
them (the routers stay plain, but in one case: GPTQModel's Qwen3-MoE quantize mlp.gate,
which loads dequantized); the reference model holds the same integers dequantized in
fp32. The experts stay packed (PackedIntFusedExperts); under the Triton interpreter the
CUDA path (the GPTQ / AWQ kernel per expert) is held against the torch one.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from loraplex import SamplingParams
from loraplex.layers.experts import FusedExperts
from loraplex.layers.moe import GateLinear
from loraplex.layers.quantization import QuantConfig
from loraplex.layers.quantized_experts import PackedIntFusedExperts
from tests.engine_utils import GREEDY, check_against_hf, check_mixed_batch, make_llm
from tests.fixtures import make_peft_adapter, make_tiny_model
from tests.quantized_fixtures import (
    quantize_awq,
    quantize_gptq,
    write_compressed_tensors,
    write_quantized,
)

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5

# arch -> (its sparse block, its experts' gate / up / down leaves, make_tiny_model options)
# (Qwen2-MoE's shared expert at 32 so every input count is whole groups of 16)
ARCHS = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2"), {}),
    "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"),
                  {"shared_expert_intermediate_size": 32}),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"), {}),
}

CASES = {  # name -> (arch, method, write_quantized options)
    "mixtral_gptq4_g32": ("mixtral", "gptq", {"group_size": 32}),
    # TheBloke's Mixtral AWQ leaves "gate" (the router) plain; layer 1's experts left
    # plain too: one layer of packed experts beside one of plain ones
    "mixtral_awq4_g32_layer1_plain": ("mixtral", "awq", {
        "group_size": 32, "skip": ("gate", "layers.1.block_sparse_moe.experts")}),
    "qwen2_moe_gptq4_act_order": ("qwen2_moe", "gptq", {"group_size": 16, "desc_act": True}),
    "qwen2_moe_awq4_g16": ("qwen2_moe", "awq", {"group_size": 16}),
    "qwen3_moe_gptq8_sym_v2": ("qwen3_moe", "gptq", {"bits": 8, "group_size": -1, "sym": True,
                                                     "fmt": "gptq_v2"}),
    # the router packed too (8 bits: 4 experts are one int32 of outputs)
    "qwen3_moe_gptq8_act_order_router": ("qwen3_moe", "gptq", {
        "bits": 8, "group_size": 16, "desc_act": True, "router": True}),
}


def _experts_adapter(leaves: tuple[str, ...]) -> dict:
    """LoRA on the experts (and q_proj) as PEFT makes it on this transformers: on 5.x's
    3-D expert parameters, on 4.x's per-expert modules; an alpha pattern so a wrong
    scale shows."""
    if TRANSFORMERS_5:
        return dict(r=6, lora_alpha=12, target_modules=["q_proj"],
                    target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                    rank_pattern={"gate_up_proj": 4}, alpha_pattern={"down_proj": 30})
    return dict(r=6, lora_alpha=12, target_modules=["q_proj", *leaves],
                alpha_pattern={leaves[0]: 30})


def _adapters(arch: str) -> dict[str, dict]:
    """Three ranks: attention only, all linears (the router, the shared expert and its
    gate), the experts."""
    return {"r4_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            "r8_all": dict(r=8, lora_alpha=16, target_modules="all-linear", scale=0.2),
            "r6_experts": _experts_adapter(ARCHS[arch][1])}


@pytest.fixture(scope="module")
def moe_models(tiny_root: Path) -> dict[str, tuple[Path, dict[str, Path]]]:
    """arch -> (plain tiny model, its adapters by name)."""
    out = {}
    for seed, (arch, (_, _, opts)) in enumerate(ARCHS.items()):
        root = tiny_root / "quantized_moe" / arch
        base = make_tiny_model(root / "base", arch, seed=90 + seed, **opts)
        out[arch] = (base, {name: make_peft_adapter(base, root / name, seed=95 + seed + i,
                                                    **spec)
                            for i, (name, spec) in enumerate(_adapters(arch).items())})
    return out


@pytest.fixture(scope="module")
def quantized_moe(tiny_root: Path, moe_models) -> dict[str, tuple[Path, Path]]:
    """case -> (quantized checkpoint, dequantized reference)."""
    out = {}
    for case, (arch, method, opts) in CASES.items():
        root = tiny_root / "quantized_moe" / case
        root.mkdir(parents=True, exist_ok=True)
        out[case] = write_quantized(moe_models[arch][0], root, method, **opts)
    return out


def _experts(llm, layer: int) -> FusedExperts:
    block = llm.llm_engine.model.model.layers[layer]
    experts = getattr(block, block.ffn_name).experts
    return getattr(experts, "base_layer", experts)


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_moe_with_mixed_adapters_matches_hf_peft(case, moe_models, quantized_moe,
                                                           prompts):
    """Base + adapters of ranks 4, 8 and 6 (on the experts) in one batch, two slots: each
    output HF + PEFT's on the dequantized weights, each adapter changing it."""
    arch, method, _ = CASES[case]
    quant_dir, ref_dir = quantized_moe[case]
    adapters = moe_models[arch][1]
    llm = make_llm(quant_dir, enable_lora=True, max_loras=2, max_lora_rank=16)
    experts = _experts(llm, 0)
    assert isinstance(experts, PackedIntFusedExperts) and experts.cfg.method == method
    assert experts.w13.dtype == torch.int32
    if case == "qwen2_moe_gptq4_act_order":
        assert experts.act_order == {"w13": True, "w2": True}
    if "layer1_plain" in case:
        assert type(_experts(llm, 1)) is FusedExperts
    if "router" in case:  # dequantized into the plain router as it loaded
        router = llm.llm_engine.model.model.layers[0].mlp.gate
        router = getattr(router, "base_layer", router)
        assert isinstance(router, GateLinear) and router.weight.dtype == torch.float32
        want = load_file(str(ref_dir / "model.safetensors"))["model.layers.0.mlp.gate.weight"]
        assert not torch.equal(want, load_file(str(moe_models[arch][0] / "model.safetensors"))[
            "model.layers.0.mlp.gate.weight"])  # the reference's router is quantized
        torch.testing.assert_close(router.weight.cpu(), want)
    check_mixed_batch(llm, ref_dir, adapters, prompts)


# llm-compressor's W4A16 / W8A16 mixtures (RedHatAI's Qwen3-30B-A3B-quantized.w4a16, ...):
# case -> (arch, write_compressed_tensors options)
CT_CASES = {
    "mixtral_ct_w4a16_g32": ("mixtral", dict(bits=4, group_size=32)),
    "qwen2_moe_ct_w4a16_asym_act_order": ("qwen2_moe", dict(bits=4, group_size=16, sym=False,
                                                            actorder=True)),
    "qwen3_moe_ct_w8a16_channel_naive": ("qwen3_moe", dict(bits=8, group_size=-1,
                                                           fmt="naive-quantized")),
}


@pytest.fixture(scope="module")
def ct_moe(tiny_root: Path, moe_models) -> dict[str, tuple[Path, Path]]:
    out = {}
    for case, (arch, opts) in CT_CASES.items():
        root = tiny_root / "quantized_moe" / case
        root.mkdir(parents=True, exist_ok=True)
        out[case] = write_compressed_tensors(moe_models[arch][0], root, case, **opts)
    return out


@pytest.mark.parametrize("case", list(CT_CASES))
def test_compressed_tensors_moe_with_mixed_adapters_matches_hf_peft(case, moe_models, ct_moe,
                                                                    prompts):
    """compressed-tensors int experts, converted to GPTQ's layout as they load: base +
    adapters of ranks 4, 8 and 6 (on the experts) over two slots, as HF + PEFT computes on
    the dequantized weights."""
    arch, opts = CT_CASES[case]
    quant_dir, ref_dir = ct_moe[case]
    llm = make_llm(quant_dir, enable_lora=True, max_loras=2, max_lora_rank=16)
    experts = _experts(llm, 0)
    assert isinstance(experts, PackedIntFusedExperts)
    assert experts.cfg.method == "compressed-tensors" and experts.w13.dtype == torch.int32
    assert experts.act_order["w13"] == bool(opts.get("actorder"))
    check_mixed_batch(llm, ref_dir, moe_models[arch][1], prompts)


def test_dummy_weights_for_a_compressed_tensors_moe(ct_moe, prompts):
    """Symmetric experts keep their midpoint zeros under random weights."""
    llm = make_llm(ct_moe["mixtral_ct_w4a16_g32"][0], load_format="dummy")
    experts = _experts(llm, 0)
    assert experts.w13_scales.min() > 0 and experts.w13.unique().numel() > 100
    assert experts.w13_qzeros.unique().tolist() == [0x88888888 - 2**32]  # 8 in every nibble
    out = llm.generate({"prompt_token_ids": prompts[0]}, SamplingParams(max_tokens=4),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_quantized_experts_stay_packed(quantized_moe):
    """4-bit experts hold a fraction of their fp32 bytes, and no plain weight."""
    llm = make_llm(quantized_moe["mixtral_gptq4_g32"][0])
    for layer in (0, 1):
        experts = _experts(llm, layer)
        assert isinstance(experts, PackedIntFusedExperts)
        held = sum(t.numel() * t.element_size()
                   for t in (*experts.parameters(), *experts.buffers()))
        e, h, i = experts.num_experts, experts.hidden_size, experts.intermediate_size
        assert held < 0.2 * (e * 3 * h * i * 4)  # 4-bit values, a scale and zero per 32
        assert not any(p.is_floating_point() for p in experts.parameters())


@pytest.mark.parametrize("case", ["qwen2_moe_gptq4_act_order", "mixtral_awq4_g32_layer1_plain"])
def test_dummy_weights_for_a_quantized_moe(case, quantized_moe, prompts):
    """load_format="dummy" fills the packed experts too: random integers, scales > 0."""
    llm = make_llm(quantized_moe[case][0], load_format="dummy")
    experts = _experts(llm, 0)
    assert isinstance(experts, PackedIntFusedExperts)
    assert experts.w13_scales.min() > 0 and experts.w2_scales.min() > 0
    assert experts.w13.unique().numel() > 100
    out = llm.generate({"prompt_token_ids": prompts[0]}, SamplingParams(max_tokens=4),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_gptq_dynamic_rules_leave_modules_plain(moe_models, tiny_root, prompts):
    """GPTQModel's `dynamic` "-:" rules (regexes from the start of the module's name) leave
    what they match unquantized: here layer 1's experts."""
    from loraplex import LoRARequest

    base, adapters = moe_models["qwen2_moe"]
    root = tiny_root / "quantized_moe" / "dynamic"
    root.mkdir(parents=True, exist_ok=True)
    quant_dir, ref_dir = write_quantized(base, root, "gptq", group_size=16,
                                         skip=("layers.1.mlp.experts",))
    cfg = json.loads((quant_dir / "config.json").read_text())
    del cfg["quantization_config"]["modules_to_not_convert"]
    cfg["quantization_config"]["dynamic"] = {r"-:.*\.layers\.1\.mlp\.experts\.": {}}
    (quant_dir / "config.json").write_text(json.dumps(cfg))
    llm = make_llm(quant_dir, enable_lora=True, max_lora_rank=16)
    assert isinstance(_experts(llm, 0), PackedIntFusedExperts)
    assert type(_experts(llm, 1)) is FusedExperts
    lora = LoRARequest("experts", 1, str(adapters["r6_experts"]))
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], GREEDY,
                        lora_request=[None, lora], use_tqdm=False)
    check_against_hf(outs, ref_dir, [None, adapters["r6_experts"]], prompts[:2])


def _layer_tensors(method: str, opts: dict, e: int, h: int, i: int, seed: int
                   ) -> tuple[dict[tuple[int, str], dict[str, torch.Tensor]], torch.Tensor,
                              torch.Tensor]:
    """Random experts quantized by the fixtures: {(expert, leaf): tensors}, and the
    dequantized w13 [E, 2I, H] (gate's rows, then up's) and w2 [E, H, I]."""
    gen = torch.Generator().manual_seed(seed)
    quantize = quantize_gptq if method == "gptq" else quantize_awq
    tensors, w13, w2 = {}, torch.empty(e, 2 * i, h), torch.empty(e, h, i)
    for expert in range(e):
        for leaf, (rows, shape) in {"gate_proj": (slice(0, i), (i, h)),
                                    "up_proj": (slice(i, 2 * i), (i, h)),
                                    "down_proj": (slice(None), (h, i))}.items():
            # act-order: gate and up share their permutation (one seed per expert's pair)
            pair = 2 * expert + (leaf == "down_proj")
            t, deq = quantize(0.1 * torch.randn(shape, generator=gen), seed=pair, **opts)
            tensors[expert, leaf] = t
            (w2 if leaf == "down_proj" else w13)[expert, rows] = deq
    return tensors, w13, w2


LAYER_CASES = {  # name -> (method, QuantConfig options, fixture options)
    "gptq4_g16": ("gptq", dict(bits=4, group_size=16, zero_offset=1), dict(group_size=16)),
    "gptq4_act_order": ("gptq", dict(bits=4, group_size=16, zero_offset=1, desc_act=True),
                        dict(group_size=16, desc_act=True)),
    "gptq8_one_group": ("gptq", dict(bits=8, group_size=-1, zero_offset=1),
                        dict(bits=8, group_size=-1)),
    "awq4_g16": ("awq", dict(bits=4, group_size=16), dict(group_size=16)),
}


def _loaded_experts(name: str, e: int = 4, h: int = 64, i: int = 48
                    ) -> tuple[PackedIntFusedExperts, FusedExperts]:
    """The same random experts packed (loaded tensor by tensor, as the loader does) and
    plain on their dequantized weights."""
    method, cfg_opts, fix_opts = LAYER_CASES[name]
    tensors, w13, w2 = _layer_tensors(method, fix_opts, e, h, i, seed=7)
    packed = PackedIntFusedExperts(h, i, e, QuantConfig(method, **cfg_opts))
    for (expert, leaf), ts in tensors.items():
        for kind, t in ts.items():
            packed.load_expert(expert, leaf, t, kind)
    packed.finish_loading()
    plain = FusedExperts(h, i, e)
    plain.w13.data, plain.w2.data = w13, w2
    return packed, plain


def _routing(tokens: int, e: int, seed: int, hidden: int = 64
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    chosen = torch.stack([torch.randperm(e, generator=gen)[:2] for _ in range(tokens)])
    return x, torch.rand(tokens, 2, generator=gen), chosen


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_packed_experts_compute_the_dequantized_experts(name):
    """Loaded expert by expert (gate's and up's columns side by side in w13), the experts
    give what plain experts on the dequantized weights give."""
    packed, plain = _loaded_experts(name)
    assert packed.act_order["w13"] == ("act_order" in name)
    x, weights, chosen = _routing(9, 4, seed=8)
    torch.testing.assert_close(packed(x, weights, chosen), plain(x, weights, chosen),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="interpreter tests run where there is no CUDA")
@pytest.mark.parametrize("name", ["gptq4_act_order", "gptq8_one_group", "awq4_g16"])
def test_packed_experts_on_the_kernel(name, monkeypatch):
    """The CUDA path, each expert with tokens through the GPTQ / AWQ kernel (under the
    interpreter here), gives the torch path's output."""
    from tests.triton_compile import import_kernels, torch_and_triton

    triton_gemm = import_kernels("loraplex.layers.quantization.triton_gemm")
    if not triton_gemm._INTERPRETED:
        pytest.skip("needs the Triton interpreter")
    packed, _ = _loaded_experts(name)
    x, weights, chosen = _routing(6, 4, seed=9)
    out, calls = torch_and_triton(monkeypatch, triton_gemm,
                                  lambda: packed(x, weights, chosen))
    assert len(calls) == 2 * len(chosen.unique())  # w13 and w2 of each expert with tokens
    torch.testing.assert_close(out["triton"], out["torch"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gptq4_act_order", "awq4_g16"])
def test_a_quantized_router_loads_dequantized(name):
    """A router of 8 experts packed in 4 bits (GPTQModel's / AutoRound's Qwen3-MoE) is
    dequantized into the plain weight once its tensors have all arrived; a plain one under
    the same config loads as it is (checkpoints that leave it plain without saying so)."""
    method, cfg_opts, fix_opts = LAYER_CASES[name]
    quantize = quantize_gptq if method == "gptq" else quantize_awq
    w = 0.1 * torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    tensors, deq = quantize(w, seed=1, **fix_opts)
    cfg = QuantConfig(method, **cfg_opts)
    router = GateLinear(64, 8, quant=cfg)
    for kind, t in tensors.items():
        router.load_shard(kind, t)
        assert router.param_of(kind) == "weight"
    router.finish_loading()
    torch.testing.assert_close(router.weight.data, deq)
    plain = GateLinear(64, 8, quant=cfg)
    plain.load_shard("weight", w)
    plain.finish_loading()
    assert torch.equal(plain.weight.data, w)
    with pytest.raises(ValueError, match="the checkpoint's config names no quantization"):
        GateLinear(64, 8).load_shard("qweight", tensors["qweight"])


def _edited(src: Path, dst: Path, config=None, tensors=None) -> Path:
    """A copy of checkpoint `src` with its config.json and / or its tensors edited."""
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        path = dst / "model.safetensors"
        save_file(tensors(load_file(str(path))), str(path), metadata={"format": "pt"})
    return dst


def test_unsupported_or_inconsistent_quantized_moe_checkpoints(moe_models, quantized_moe,
                                                               ct_moe, tmp_path):
    gptq = quantized_moe["qwen2_moe_gptq4_act_order"][0]
    expert = "model.layers.0.mlp.experts.1"

    def flip(key: str):
        return lambda t: {**t, key: t[key].flip(0).contiguous()}

    cases = [
        (_edited(gptq, tmp_path / "g_idx", tensors=flip(f"{expert}.up_proj.g_idx")),
         "expert 1's gate and up projections have different g_idx"),
        (_edited(gptq, tmp_path / "missing", tensors=lambda t: {
            k: v for k, v in t.items() if k != f"{expert}.down_proj.scales"}),
         "lacks 1 expert tensors, e.g. expert 1's down projection's scales"),
        (_edited(gptq, tmp_path / "some_plain", config=lambda c: c["quantization_config"]
                 .update(modules_to_not_convert=["experts.1."])),
         "leaves only some of a mixture's experts unquantized"),
        (_edited(gptq, tmp_path / "group", config=lambda c: c["quantization_config"]
                 .update(group_size=32)),
         "must be multiples of 8 (values per int32) and of group_size 32"),
        (_edited(gptq, tmp_path / "dynamic", config=lambda c: c["quantization_config"]
                 .update(dynamic={r"+:.*down_proj": {"bits": 8}})),
         "dynamic's positive rules: other bits or group sizes) are not supported yet"),
        (_edited(moe_models["mixtral"][0], tmp_path / "plain", config=lambda c: c.update(
            quantization_config={"quant_method": "awq", "bits": 4, "group_size": 32})),
         "awq expert 0 w1.weight: a plain weight where config.json's quantization_config "
         "(awq) says packed"),
        (_edited(moe_models["mixtral"][0], tmp_path / "ct_plain", config=lambda c: c.update(
            quantization_config=json.loads((ct_moe["mixtral_ct_w4a16_g32"][0] / "config.json"
                                            ).read_text())["quantization_config"])),
         "where config.json's quantization_config (compressed-tensors, int4) says int "
         "weights"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            make_llm(path)
