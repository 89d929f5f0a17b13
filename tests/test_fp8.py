"""FP8 bases (float8_e4m3fn weights) with LoRA adapters, against HF + PEFT on the same
FP8 values dequantized in fp32: the `fp8` format (Qwen / DeepSeek / transformers: per
tensor, or per block with weight_scale_inv; activation_scheme static, its
activation_scale unused as transformers on the CPU leaves it) and llm-compressor's
compressed-tensors, weight-only (per tensor, channel or block; its `ignore` list; with
FP8 activations: tests/test_ct_float_activations.py), partial blocks, DoRA on top,
quantization="fp8" on a plain checkpoint; what does not fit is refused with a clear
message."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.layers.quantization import FP8Linear
from tests.engine_utils import GREEDY, check_against_hf, lora_requests, make_llm
from tests.fixtures import edited_copy
from tests.quantized_fixtures import quantize_fp8, write_fp8

ADAPTERS = ("r4_qv", "r8_all", "r16_rslora")
# logprobs: the dequantized weights are bit-identical to the reference's, but with
# compressed-tensors' 16 x 32 blocks one top logprob is 1.9e-4 to 2.8e-4 off HF's,
# depending on the machine's CPU kernels (fp32 sums in another order, over weights of a
# wider range); the other cases are within 7e-5. A wrong scale or block is off by 1e-2+
ATOL = 5e-4
CASES = {  # name -> (format, strategy, options)
    "fp8_block": ("fp8", "block", {"block": (24, 24)}),  # 64 / 24: partial blocks
    "fp8_tensor": ("fp8", "tensor", {}),
    "ct_channel": ("compressed-tensors", "channel", {
        "skip": ("model.layers.1.mlp.down_proj", r"re:.*layers\.0\.self_attn\.o_proj$")}),
    "ct_tensor": ("compressed-tensors", "tensor", {}),
    # transformers' activation_scheme "static": weight-only, as transformers runs it on the
    # CPU (its activation_scale unused)
    "fp8_tensor_static": ("fp8", "tensor", {"static_inputs": True}),
    "ct_block": ("compressed-tensors", "block", {"block": (16, 32)}),
}


@pytest.fixture(scope="module")
def fp8_models(tiny_root: Path, tiny_models) -> dict[str, tuple[Path, Path]]:
    out = {}
    for case, (fmt, strategy, opts) in CASES.items():
        root = tiny_root / "fp8" / case
        root.mkdir(parents=True, exist_ok=True)
        out[case] = write_fp8(tiny_models["llama"], root, fmt, strategy, **opts)
    return out


def _mixed_batch(llm, ref_dir: Path, adapters: dict[str, Path], prompts) -> None:
    reqs = lora_requests(adapters)
    names = [None, *sorted(reqs)]
    batch = [prompts[i % len(prompts)] for i in range(2 * len(names))]
    loras = [names[i % len(names)] for i in range(len(batch))]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY,
                        lora_request=[reqs[n] if n else None for n in loras], use_tqdm=False)
    check_against_hf(outs, ref_dir, [adapters[n] if n else None for n in loras], batch, ATOL)


@pytest.mark.parametrize("case", list(CASES))
def test_fp8_base_with_mixed_adapters_matches_hf_peft(case, fp8_models, tiny_adapters,
                                                       prompts):
    """Base + adapters of ranks 4, 8, 16 in one batch over two slots; the weights stay
    FP8 in memory, the layers the checkpoint left out stay plain."""
    quant_dir, ref_dir = fp8_models[case]
    llm = make_llm(quant_dir, enable_lora=True, max_loras=2, max_lora_rank=16)
    layers = llm.llm_engine.model.model.layers
    qkv = layers[0].self_attn.qkv_proj.base_layer
    assert isinstance(qkv, FP8Linear) and qkv.weight.dtype == torch.float8_e4m3fn
    if case == "ct_channel":  # its ignore list: an exact name and a regex
        assert not isinstance(layers[1].mlp.down_proj.base_layer, FP8Linear)
        assert not isinstance(layers[0].self_attn.o_proj.base_layer, FP8Linear)
        assert isinstance(layers[0].mlp.down_proj.base_layer, FP8Linear)
    _mixed_batch(llm, ref_dir, {n: tiny_adapters["llama"][n] for n in ADAPTERS}, prompts)


def test_dora_on_an_fp8_base(fp8_models, tiny_root, tiny_models, prompts):
    """DoRA's norms are taken over the dequantized FP8 weight."""
    from tests.fixtures import make_peft_adapter

    quant_dir, ref_dir = fp8_models["fp8_block"]
    dora = make_peft_adapter(tiny_models["llama"], tiny_root / "fp8_dora", r=8, seed=74,
                             target_modules="all-linear", use_dora=True)
    llm = make_llm(quant_dir, enable_lora=True, max_loras=1, max_lora_rank=8)
    _mixed_batch(llm, ref_dir, {"dora": dora}, prompts)


def test_quantized_as_it_loads(tiny_root, tiny_models, tiny_adapters, prompts):
    """quantization="fp8" on a plain checkpoint: FP8 values with a scale per row (the
    reference: the same rounding, dequantized in fp32)."""
    base = tiny_models["llama"]
    ref_dir = tiny_root / "fp8_online_ref"
    if not ref_dir.exists():
        shutil.copytree(base, ref_dir)
        path = ref_dir / "model.safetensors"
        state = load_file(str(path))
        save_file({k: quantize_fp8(v, "channel")[2].to(v.dtype)
                   if re.search(r"\.(q|k|v|o|gate|up|down)_proj\.weight$", k) else v
                   for k, v in state.items()}, str(path), metadata={"format": "pt"})
    llm = make_llm(base, quantization="fp8", enable_lora=True, max_loras=2, max_lora_rank=16)
    assert llm.llm_engine.model.model.layers[1].mlp.gate_up_proj.base_layer.weight.dtype \
        == torch.float8_e4m3fn
    _mixed_batch(llm, ref_dir, {n: tiny_adapters["llama"][n] for n in ADAPTERS}, prompts)


def test_dummy_weights(fp8_models):
    llm = make_llm(fp8_models["ct_block"][0], load_format="dummy")
    out = llm.generate([{"prompt_token_ids": [1, 5, 9]}], GREEDY, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == GREEDY.max_tokens


def _edit(src: Path, dst: Path, quant=None, tensors=None) -> Path:
    """A copy of an FP8 checkpoint, its quantization_config changed by `quant`."""
    return edited_copy(src, dst, (lambda c: quant(c["quantization_config"])) if quant else None,
                       tensors=tensors, config="config.json", weights="model.safetensors")


def test_what_does_not_fit_is_refused(fp8_models, tiny_models, tmp_path):
    ct = fp8_models["ct_channel"][0]
    cases = [
        (_edit(ct, tmp_path / "int4", lambda q: q.update(format="pack-quantized")),
         "compressed-tensors checkpoint (format 'pack-quantized'"),
        (_edit(ct, tmp_path / "mixed", lambda q: q["config_groups"].update(
            group_1={"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
                                                        "strategy": "block"}})),
         "FP8 weights with strategies ['block', 'channel'] are not supported"),
        (_edit(fp8_models["fp8_tensor"][0], tmp_path / "e5m2",
               lambda q: q.update(fmt="e5m2")), "fp8 fmt='e5m2' is not supported"),
        (_edit(ct, tmp_path / "scale", tensors=lambda t: {
            k: v[:-1] if k.endswith("layers.0.self_attn.k_proj.weight_scale") else v
            for k, v in t.items()}), "fp8 scale of shape (31, 1) fits neither"),
        (_edit(ct, tmp_path / "no_scale", tensors=lambda t: {
            k: v for k, v in t.items() if not k.endswith("layers.1.mlp.up_proj.weight_scale")}),
         "sub-projection 1 of this layer is incomplete"),
        (_edit(ct, tmp_path / "fp8_head", tensors=lambda t: {
            **t, "lm_head.weight": t["lm_head.weight"].to(torch.float8_e4m3fn)}),
         "lm_head.weight is FP8 where the model keeps plain weights"),
    ]
    plain_weights = tmp_path / "plain_weights"
    shutil.copytree(tiny_models["llama"], plain_weights)
    cfg = json.loads((plain_weights / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3"}
    (plain_weights / "config.json").write_text(json.dumps(cfg))
    cases.append((plain_weights, "says FP8 (float8_e4m3fn) values should be"))
    for path, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            make_llm(path)


@pytest.mark.parametrize("strategy", ["block", "channel"])
def test_fp8_mixture_of_experts(strategy, tiny_root, prompts):
    """Qwen3-MoE with FP8 experts and attention (the router left plain, as Qwen3-30B-A3B-FP8
    leaves it), the base and an all-linear adapter in one batch; the experts stay FP8."""
    from loraplex.layers.quantized_experts import FP8FusedExperts
    from tests.fixtures import make_peft_adapter, make_tiny_model

    root = tiny_root / "fp8_moe" / strategy
    base = make_tiny_model(root / "base", "qwen3_moe", seed=33)
    fmt = "fp8" if strategy == "block" else "compressed-tensors"
    quant_dir, ref_dir = write_fp8(base, root, fmt, strategy, block=(16, 16))
    adapter = make_peft_adapter(base, root / "all", r=8, seed=34, target_modules="all-linear")
    llm = make_llm(quant_dir, enable_lora=True, max_loras=1, max_lora_rank=16)
    experts = llm.llm_engine.model.model.layers[0].mlp.experts
    experts = getattr(experts, "base_layer", experts)
    assert isinstance(experts, FP8FusedExperts) and experts.w13.dtype == torch.float8_e4m3fn
    _mixed_batch(llm, ref_dir, {"all": adapter}, prompts)
    dummy = make_llm(quant_dir, load_format="dummy")
    assert dummy.generate([{"prompt_token_ids": prompts[0]}], GREEDY,
                          use_tqdm=False)[0].outputs[0].token_ids
