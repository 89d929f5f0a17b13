"""Quantized Kimi-Linear checkpoints (models/kimi_linear.py through models/hybrid_quant.py):
the KDA layers' projections (the forget gate's f_a_proj / f_b_proj, b_proj, the output
gate's g_a_proj / g_b_proj too), the latent attention's, the dense MLP's, the shared
expert's and each expert's (w1 / w3 / w2, under the hub's `block_sparse_moe` names)
quantized; the router, convs, A_log, dt_bias and norms plain. Each case runs the base and
adapters of ranks 4 (KDA's projections and kv_b_proj) and 8 (every linear and the experts
through target_parameters) over one slot, prompts prefilled in chunks beside other decodes,
against HF transformers + PEFT on the dequantized weights in fp32 (the tiny model of
tests/test_kimi_linear.py; the formats as tests/test_hybrid_quantized.py writes them).
The not-convert lists name modules under the hub's names, as real checkpoints do. The
cases: `fp8` blocks, compressed-tensors W4A16, GPTQ and AWQ (compressed-tensors FP8 runs
the FP8 linears and experts the `fp8` case does, with per-channel scales: checked on the
hybrids in tests/test_hybrid_quantized.py). Then transformers 5's layout (forget_gate
names, fused FP8 experts), fused experts refused with their reason, and the formats
refused by name.
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
from loraplex.models.kimi_linear import KIMI_LINEAR, kimi_linear_flags
from tests.engine_utils import (
    GREEDY,
    check_against_hf,
    check_mixed_batch,
    lora_requests,
    make_llm,
)
from tests.quantized_fixtures import write_compressed_tensors, write_fp8, write_quantized

pytest.importorskip("transformers.models.kimi_linear",
                    reason=f"transformers {transformers.__version__} has no Kimi-Linear")

# every projection a quantizer packs: KDA's, MLA's, the MLPs', the experts' (not the
# router, `block_sparse_moe.gate`)
KIMI_LINEARS = re.compile(r"\.((q|k|v|o|f_a|f_b|b|g_a|g_b|kv_b|gate|up|down)_proj"
                          r"|kv_a_proj_with_mqa|w[123])\.weight$")
# b_proj has 4 outputs (one per head), fewer than an int32 packs (the hub's has 32): left
# plain under the packed int formats
B_PROJ = ("self_attn.b_proj",)
KDA_B_PROJ = ("model.layers.0.self_attn.b_proj", "model.layers.2.self_attn.b_proj")
LAYER1_EXPERTS = tuple(f"model.layers.1.block_sparse_moe.experts.{e}.{leaf}"
                       for e in range(8) for leaf in ("w1", "w3", "w2"))
FP8_PLAIN = ("model.layers.0.self_attn.f_a_proj", "model.layers.2.self_attn.g_b_proj",
             "model.layers.1.self_attn.kv_b_proj")


def _fp8(fmt: str, strategy: str, **opts: Any):
    return lambda base, root: write_fp8(base, root, fmt, strategy, linears=KIMI_LINEARS,
                                        **opts)


def _packed(method: str, **opts: Any):
    return lambda base, root: write_quantized(base, root, method, linears=KIMI_LINEARS,
                                              **opts)


# case -> (checkpoint writer, the modules (our names) left plain)
CASES: dict[str, tuple[Any, tuple[str, ...]]] = {
    "fp8_block": (_fp8("fp8", "block", block=(32, 32), skip=FP8_PLAIN), FP8_PLAIN),
    # layer 1's experts left plain by exact hub names (llm-compressor's `ignore`)
    "ct_w4a16": (lambda base, root: write_compressed_tensors(
        base, root, "ct", group_size=8, ignore=LAYER1_EXPERTS + KDA_B_PROJ,
        linears=KIMI_LINEARS),
        ("model.layers.1.mlp.experts",)),
    # layer 1's whole block (experts, shared experts) left plain by its hub name
    "gptq4": (_packed("gptq", group_size=8, skip=(*B_PROJ, "model.layers.1.block_sparse_moe")),
              ("model.layers.0.self_attn.b_proj", "model.layers.1.mlp.experts",
               "model.layers.1.mlp.shared_experts.down_proj")),
    "awq4": (_packed("awq", group_size=8, skip=B_PROJ), ("model.layers.2.self_attn.b_proj",)),
}


@pytest.fixture(scope="module")
def kimi_base(tiny_root: Path) -> tuple[Path, dict[str, Path]]:
    from tests.test_kimi_linear import make_base_and_adapters

    return make_base_and_adapters(tiny_root / "kimi_quant", 720)


def _quantized(module: torch.nn.Module) -> bool:
    inner = getattr(module, "base_layer", module)
    return isinstance(inner, QuantLinear | FP8FusedExperts | PackedIntFusedExperts)


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_kimi_linear_with_mixed_adapters_matches_hf_peft(case, kimi_base, tiny_root,
                                                                   prompts):
    """The base and adapters of ranks 4 and 8 over one slot, prompts prefilled in chunks
    of 5: HF + PEFT's tokens on the dequantized weights; KDA's and MLA's projections and
    the experts stay quantized, the not-convert list's modules plain."""
    base, adapters = kimi_base
    write, plain = CASES[case]
    root = tiny_root / "kimi_quant" / case
    root.mkdir(parents=True, exist_ok=True)
    quant_dir, ref_dir = write(base, root)
    llm = make_llm(quant_dir, enable_lora=True, max_loras=1, max_lora_rank=8, block_size=8,
                   max_num_batched_tokens=5)
    model = llm.llm_engine.model
    layers = model.model.layers
    kda, mla = layers[2].self_attn, layers[3].self_attn
    assert all(_quantized(getattr(kda, n)) for n in ("q_proj", "f_b_proj", "g_a_proj",
                                                     "o_proj"))
    assert _quantized(mla.kv_a_proj_with_mqa) and _quantized(layers[0].mlp.down_proj)
    assert _quantized(layers[3].mlp.experts) and _quantized(layers[3].mlp.shared_experts.down_proj)
    assert not any(_quantized(model.get_submodule(n)) for n in plain)
    assert not _quantized(layers[1].mlp.gate)
    if case != "fp8_block":
        check_mixed_batch(llm, ref_dir, adapters, prompts[1:3], extra=1)
        return
    # HF within 1e-3: r8_all's logprob of one top token at step 1 of prompts[1] differs
    # from HF's by 7e-4 here, and by 4.5e-4 on the unquantized base too (main's code as
    # well): the tiny model's sensitivity, not FP8's, for the engine on the dequantized
    # reference gives this checkpoint's tokens and logprobs (within 1e-5)
    reqs = lora_requests(adapters)
    names = [None, *sorted(adapters), "r8_all"]
    batch = [prompts[1]] * 3 + [prompts[2]]
    runs = [engine.generate([{"prompt_token_ids": p} for p in batch], GREEDY, use_tqdm=False,
                            lora_request=[reqs[n] if n else None for n in names])
            for engine in (llm, make_llm(ref_dir, enable_lora=True, max_loras=1,
                                         max_lora_rank=8, block_size=8,
                                         max_num_batched_tokens=5))]
    for got, want in zip(*runs, strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for lg, lw in zip(got.outputs[0].logprobs, want.outputs[0].logprobs, strict=True):
            assert all(abs(lg[t].logprob - lw[t].logprob) < 1e-5 for t in lw)
    check_against_hf(runs[0], ref_dir, [adapters[n] if n else None for n in names], batch,
                     atol=1e-3)


def test_unservable_formats_refused_by_name():
    """NVFP4 (its experts), MXFP4 and bitsandbytes 8-bit Kimi-Linear checkpoints are
    refused, naming what loads; FP8 and GPTQ pass."""
    from tests.test_kimi_linear import kimi_config

    cfg = kimi_config(64)
    for quant, what in ((QuantConfig("nvfp4", 4, 16), "nvfp4-quantized"),
                        (QuantConfig("mxfp4", 4, 32), "mxfp4-quantized"),
                        (QuantConfig("bitsandbytes", 8, -1), "bitsandbytes 8-bit")):
        with pytest.raises(ValueError, match=f"{what} {KIMI_LINEAR} checkpoints are not "
                           "supported yet: loraplex loads FP8"):
            kimi_linear_flags(cfg, KIMI_LINEAR, quant)
    for quant in (QuantConfig("fp8", 8, -1), QuantConfig("gptq", 4, 32)):
        assert kimi_linear_flags(cfg, KIMI_LINEAR, quant)["mamba_layers"] == (0, 2)


def _transformers5_name(key: str) -> str:
    """A hub-named key as transformers 5's modules name it: the forget gate's parameters
    under `forget_gate`, the experts' block `mlp`."""
    key = re.sub(r"\.self_attn\.(f_a_proj|f_b_proj|dt_bias|A_log)", r".self_attn.forget_gate.\1",
                 key)
    return key.replace(".block_sparse_moe.", ".mlp.")


def _fused(tensors: dict[str, torch.Tensor], suffixes: tuple[str, ...]
           ) -> dict[str, torch.Tensor]:
    """The experts' tensors (each `suffix`: weight, weight_scale_inv...) fused as
    transformers 5 saves them: experts.gate_up_proj{_suffix} [E, 2I, ...] (w1's rows,
    then w3's) and experts.down_proj{_suffix} [E, H, ...]."""
    out = {k: v for k, v in tensors.items() if ".experts." not in k}
    for layer in range(1, 4):
        experts = f"model.layers.{layer}.mlp.experts"
        for suffix in suffixes:
            w1, w3, w2 = ([tensors[f"{experts}.{e}.{w}.{suffix}"] for e in range(8)]
                          for w in ("w1", "w3", "w2"))
            tail = suffix.removeprefix("weight") if suffix.startswith("weight") \
                else f"_{suffix}"
            out[f"{experts}.gate_up_proj{tail}"] = torch.stack(
                [torch.cat(pair) for pair in zip(w1, w3, strict=True)])
            out[f"{experts}.down_proj{tail}"] = torch.stack(w2)
    return out


def test_transformers5_names_in_checkpoint_and_not_convert_list(kimi_base, tiny_root, prompts):
    """The FP8 checkpoint as transformers 5 saves it: the forget gate's tensors and the
    not-convert list under its module names (self_attn.forget_gate.f_a_proj), the experts
    `mlp.experts` fused (gate_up_proj and down_proj FP8 [E, ...] with their _scale_inv):
    the same modules plain, the same tokens and logprobs as the hub's layout."""
    from tests.fixtures import edited_copy

    base, _ = kimi_base
    root = tiny_root / "kimi_quant" / "t5_names"
    root.mkdir(parents=True, exist_ok=True)
    hub_named, _ = _fp8("fp8", "block", block=(32, 32), skip=FP8_PLAIN)(base, root)

    def rename_list(cfg: dict) -> None:
        qc = cfg["quantization_config"]
        qc["modules_to_not_convert"] = [_transformers5_name(m) for m in
                                        qc["modules_to_not_convert"]]
    t5_named = edited_copy(hub_named, root / "t5_named", rename_list, config="config.json",
                           weights="model.safetensors", tensors=lambda t: _fused(
                               {_transformers5_name(k): v for k, v in t.items()},
                               ("weight", "weight_scale_inv")))
    assert "model.layers.0.self_attn.forget_gate.f_a_proj" in (
        t5_named / "config.json").read_text()
    outs = []
    for path in (hub_named, t5_named):
        llm = make_llm(path)
        layers = llm.llm_engine.model.model.layers
        assert not _quantized(layers[0].self_attn.f_a_proj)
        assert _quantized(layers[2].self_attn.f_a_proj) and _quantized(layers[1].mlp.experts)
        outs.append(llm.generate([{"prompt_token_ids": prompts[2]}], GREEDY, use_tqdm=False)[0])
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    for a, b in zip(outs[0].outputs[0].logprobs, outs[1].outputs[0].logprobs, strict=True):
        assert {t: lp.logprob for t, lp in a.items()} == {t: lp.logprob for t, lp in b.items()}


def test_fused_experts_refused_with_reason(kimi_base, tiny_root):
    """Fused experts tensors this model cannot take are refused naming why: GPTQ's packed
    ints fused as transformers 5 lays experts out (quantized fused experts load in FP8
    only), and plain fused ones where the checkpoint's experts come one by one."""
    from tests.fixtures import edited_copy

    base, _ = kimi_base
    root = tiny_root / "kimi_quant" / "fused_refused"
    root.mkdir(parents=True, exist_ok=True)
    gptq, _ = _packed("gptq", group_size=8, skip=B_PROJ)(base, root)
    cases = [
        (edited_copy(gptq, root / "gptq_fused", weights="model.safetensors", config="config.json",
                     tensors=lambda t: _fused({_transformers5_name(k): v for k, v in t.items()},
                                              ("qweight", "scales", "qzeros", "g_idx"))),
         r"experts tensor 'down_proj_g_idx' \(torch.int32, \(8, 32\)\) is part of a "
         r"quantized fused experts tensor .* loraplex loads those in FP8 .* Save the "
         r"checkpoint's experts per expert"),
        (edited_copy(base, root / "plain_fused", weights="model.safetensors",
                     config="config.json", tensors=lambda t: _fused(
                         {_transformers5_name(k): v for k, v in t.items()}, ("weight",))),
         r"unexpected experts tensor 'down_proj' \(torch.float32, \(8, 64, 32\)\) in the "
         r"checkpoint: these experts load one expert at a time"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=message):
            make_llm(path)
    # experts that take plain fused tensors (Qwen3-VL-MoE's) given an FP8 one
    from loraplex.layers.experts import FusedExperts

    with pytest.raises(ValueError, match=r"'gate_up_proj' \(torch.float8_e4m3fn, \(2, 16, 8\)\) "
                       "is part of a quantized fused experts tensor"):
        FusedExperts(8, 8, 2, fused=True).load_fused(
            "gate_up_proj", torch.zeros(2, 16, 8).to(torch.float8_e4m3fn))


def test_fused_fp8_experts_unblocked_scales():
    """transformers 5's unblocked FP8 experts: gate_up_proj's scale one per half (gate's,
    up's: [E, 2, 1]), down_proj's one per tensor ([E, 1, 1]); each expert computes its
    weights dequantized with them."""
    from loraplex.layers.quantization.fp8 import FP8

    experts = FP8FusedExperts(16, 8, 2, QuantConfig("fp8", 8, -1))
    gen = torch.Generator().manual_seed(4)
    q13, q2 = (torch.randn(shape, generator=gen).to(FP8) for shape in ((2, 16, 16), (2, 16, 8)))
    s13, s2 = torch.rand(2, 2, 1, generator=gen) + 0.5, torch.rand(2, 1, 1, generator=gen) + 0.5
    for name, tensor in (("gate_up_proj_scale_inv", s13), ("down_proj", q2),
                         ("gate_up_proj", q13), ("down_proj_scale_inv", s2)):
        experts.load_fused(name, tensor)
    experts.finish_loading()
    x = torch.randn(3, 16, generator=gen)
    for e in range(2):
        w13 = q13[e].float() * s13[e].repeat_interleave(8, dim=0)
        torch.testing.assert_close(experts.project(e, "w13", x), x @ w13.T)
        torch.testing.assert_close(experts.project(e, "w2", x[:, :8]),
                                   x[:, :8] @ (q2[e].float() * s2[e]).T)
