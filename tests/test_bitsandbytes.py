"""bitsandbytes bases with LoRA adapters (QLoRA serving), against HF transformers + PEFT.

The checkpoints are written by transformers with bitsandbytes itself (BitsAndBytesConfig,
on the CPU): 4-bit NF4 and FP4, with and without double quantization, and 8-bit. The
reference is HF + PEFT on a plain checkpoint holding the weights as bitsandbytes' own
functions dequantize them (`dequantize_4bit`, `int8_vectorwise_dequant`), in fp32:
bitsandbytes' CPU matmul itself runs in lower precision (1e-2 off an fp32 matmul of the
same weights here), and its LLM.int8 also rounds the activations. `quantization=
"bitsandbytes"` on a plain checkpoint quantizes it while loading, as transformers'
`load_in_4bit` does.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.layers.quantization import BnB4bitLinear, BnB8bitLinear
from loraplex.layers.quantization.bitsandbytes import FP4_CODE, NF4_CODE, quantize_nf4
from tests.engine_utils import GREEDY, check_against_hf, lora_requests, make_llm
from tests.fixtures import edited_copy, hf_logprobs

bnb = pytest.importorskip("bitsandbytes")

ADAPTERS = ("r4_qv", "r8_all", "r16_rslora")
CASES = {  # name -> BitsAndBytesConfig options
    "nf4_double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                       bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}


def _quantize_with_transformers(src: Path, dst: Path, options: dict) -> Path:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(bnb_4bit_compute_dtype=torch.float32, **options)
    model = AutoModelForCausalLM.from_pretrained(str(src), quantization_config=cfg,
                                                 dtype=torch.float32, device_map="cpu")
    model.save_pretrained(str(dst))
    for f in src.iterdir():  # the tokenizer
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, dst / f.name)
    return dst


def _dequantized_reference(quant_dir: Path, src: Path, dst: Path) -> Path:
    """`src` with every quantized linear replaced by bitsandbytes' dequantization of
    `quant_dir`'s (transformers loads it, bitsandbytes dequantizes it)."""
    from bitsandbytes.functional import dequantize_4bit, int8_vectorwise_dequant
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(quant_dir), dtype=torch.float32,
                                                 device_map="cpu")
    raw = load_file(str(quant_dir / "model.safetensors"))
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    # bitsandbytes' CPU backend rounds FP4's table (0.6667 for 2/3); its CUDA kernel and
    # the checkpoint's quant_map hold the exact values
    try:
        tables = importlib.import_module("bitsandbytes.backends.utils").CODE
    except (ImportError, AttributeError):  # older releases: no rounded table to fix
        tables = {}
    saved_fp4 = tables.get("fp4")
    if saved_fp4 is not None:
        tables["fp4"] = torch.tensor(FP4_CODE)
    try:
        n = 0
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                w = module.weight
                state[f"{name}.weight"] = dequantize_4bit(w.data, w.quant_state).float()
                n += 1
            elif isinstance(module, bnb.nn.Linear8bitLt):
                state[f"{name}.weight"] = int8_vectorwise_dequant(raw[f"{name}.weight"],
                                                                  raw[f"{name}.SCB"]).float()
                n += 1
    finally:
        if saved_fp4 is not None:
            tables["fp4"] = saved_fp4
    assert n == 14  # 7 linears in each of the 2 layers
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def bnb_models(tiny_root: Path, tiny_models) -> dict[str, tuple[Path, Path]]:
    """case -> (quantized checkpoint, reference dir for HF + PEFT)."""
    src, out = tiny_models["llama"], {}
    for case, options in CASES.items():
        quant = _quantize_with_transformers(src, tiny_root / "bnb" / case, options)
        out[case] = (quant, _dequantized_reference(quant, src, tiny_root / "bnb" / f"{case}_ref"))
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_bnb_base_with_mixed_adapters_matches_hf_peft(case, bnb_models, tiny_adapters,
                                                      prompts):
    """Base + three adapters of ranks 4/8/16 in one batch, two slots."""
    quant, ref = bnb_models[case]
    adapters = {n: tiny_adapters["llama"][n] for n in ADAPTERS}
    reqs = lora_requests(adapters)
    names = [None, *ADAPTERS, None, *ADAPTERS]
    llm = make_llm(quant, enable_lora=True, max_loras=2, max_lora_rank=16)
    batch = [prompts[i % len(prompts)] for i in range(len(names))]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY,
                        lora_request=[reqs[n] if n else None for n in names], use_tqdm=False)
    check_against_hf(outs, ref, [adapters[n] if n else None for n in names], batch)
    layer = llm.llm_engine.model.model.layers[0].mlp.gate_up_proj.base_layer
    assert isinstance(layer, BnB4bitLinear if "4bit" in json.dumps(CASES[case])
                      else BnB8bitLinear)


def test_bnb_weights_stay_quantized(bnb_models):
    llm = make_llm(bnb_models["nf4_double"][0])
    layer = llm.llm_engine.model.model.layers[0].self_attn.qkv_proj
    assert layer.weight.dtype == torch.uint8
    assert layer.weight.numel() * 2 == layer.out_features * layer.in_features
    assert torch.equal(layer.code.cpu(), torch.tensor(NF4_CODE))
    int8 = make_llm(bnb_models["int8"][0]).llm_engine.model.model.layers[1].mlp.down_proj
    assert int8.weight.dtype == torch.int8


def test_nf4_quantizer_is_bitsandbytes(tiny_models):
    """The in-flight quantizer picks the codes and absmax bitsandbytes picks."""
    from bitsandbytes.functional import quantize_4bit

    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    q, absmax = quantize_nf4(w, 64)
    ref, state = quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(q.flatten(), ref.flatten())
    assert torch.allclose(absmax.flatten(), state.absmax)
    assert torch.equal(state.code.cpu().float(), torch.tensor(NF4_CODE))


def test_in_flight_quantization_matches_transformers_load_in_4bit(tmp_path, tiny_models,
                                                                  tiny_adapters, prompts):
    """vLLM's `quantization="bitsandbytes"` on a plain checkpoint: NF4 while loading, the
    same model transformers' load_in_4bit gives; with an adapter on top (QLoRA)."""
    plain = tiny_models["llama"]
    hf4 = _dequantized_reference(_quantize_with_transformers(
        plain, tmp_path / "hf_nf4", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")),
        plain, tmp_path / "hf_nf4_ref")
    adapter = tiny_adapters["llama"]["r8_all"]
    for kw in (dict(quantization="bitsandbytes"), dict(load_format="bitsandbytes")):
        llm = make_llm(plain, enable_lora=True, max_lora_rank=8, **kw)
        layer = llm.llm_engine.model.model.layers[1].self_attn.o_proj.base_layer
        assert isinstance(layer, BnB4bitLinear) and not layer.cfg.prequantized
        reqs = lora_requests({"a": adapter})
        outs = llm.generate([{"prompt_token_ids": prompts[4]}] * 2, GREEDY,
                            lora_request=[None, reqs["a"]], use_tqdm=False)
        check_against_hf(outs, hf4, [None, adapter], [prompts[4]] * 2)


def test_quantization_flag_with_bnb(bnb_models, tiny_models):
    quant = bnb_models["nf4_double"][0]
    make_llm(quant, quantization="bitsandbytes")
    with pytest.raises(ValueError, match="quantized with 'bitsandbytes'"):
        make_llm(quant, quantization="gptq")
    with pytest.raises(ValueError, match="goes with quantization='bitsandbytes'"):
        make_llm(tiny_models["llama"], load_format="bitsandbytes", quantization="awq")


def _drop(suffix: str):
    return lambda state: {k: v for k, v in state.items()
                          if not (k.endswith(suffix) and "layers.0.self_attn.k_proj" in k)}


@pytest.mark.parametrize(("case", "edit", "changes", "message"), [
    ("nf4_double", _drop("weight.nested_absmax"), {}, "sub-projection 1 of this layer is "
                                                      "incomplete"),
    ("nf4_double", None, {"bnb_4bit_quant_type": "int4"}, "bnb_4bit_quant_type='int4'"),
    ("nf4_double", None, {"load_in_4bit": False}, "neither load_in_4bit nor load_in_8bit"),
    ("int8", None, {"llm_int8_has_fp16_weight": True}, "llm_int8_has_fp16_weight"),
    ("int8", None, {"load_in_8bit": False, "load_in_4bit": True}, "8-bit weights"),
    ("nf4_double", None, {"load_in_8bit": True, "load_in_4bit": False}, "4-bit values"),
])
def test_broken_bnb_checkpoints_are_clear_errors(bnb_models, tmp_path, case, edit, changes,
                                                 message):
    bad = edited_copy(bnb_models[case][0], tmp_path / "bad",
                      (lambda c: c["quantization_config"].update(changes)) if changes else None,
                      tensors=edit, config="config.json", weights="model.safetensors")
    with pytest.raises(ValueError, match=message):
        make_llm(bad)


def test_plain_weights_under_a_bnb_config_are_a_clear_error(tmp_path, tiny_models):
    dst = shutil.copytree(tiny_models["llama"], tmp_path / "plain")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                  "bnb_4bit_quant_type": "nf4"}
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config does not match the weights"):
        make_llm(dst)


def test_dummy_weights_for_a_bnb_config(bnb_models):
    for case in ("nf4_double", "int8"):
        llm = make_llm(bnb_models[case][0], load_format="dummy")
        out = llm.generate({"prompt_token_ids": [1, 5, 9]}, GREEDY, use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == GREEDY.max_tokens


def test_reference_is_quantized_not_a_copy(bnb_models, tiny_models, prompts):
    """The references really are the quantized weights: they differ from the plain model."""
    for case in CASES:
        assert not torch.allclose(hf_logprobs(bnb_models[case][1], None, prompts[0]),
                                  hf_logprobs(tiny_models["llama"], None, prompts[0]),
                                  atol=1e-3), case
