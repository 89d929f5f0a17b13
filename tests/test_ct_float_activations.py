"""compressed-tensors FP8 weights with FP8 activations (llm-compressor's FP8_DYNAMIC: per
token; FP8: static per tensor; FP8_BLOCK: per group of inputs) and NVFP4 weights
(NVFP4A16, and NVFP4 with NVFP4 activations), with LoRA adapters, against HF + PEFT
running the compressed-tensors package's own forward on the same checkpoint, saved
"frozen" (tests/ct_float_fixtures.py); the activation quantizers and the NVFP4
dequantization against the package's, bit for bit; refusals.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex import SamplingParams
from loraplex.layers.quantization import FP8Linear, NVFP4Linear, QuantConfig
from loraplex.layers.quantization.float_activations import (
    FloatActivationQuant,
    round_to_e2m1,
)
from tests.ct_float_fixtures import write_ct_float
from tests.engine_utils import GREEDY, check_fake_quant_against_hf, lora_requests, make_llm
from tests.fixtures import edited_copy

pytestmark = pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None,
                                reason="compressed-tensors is not installed")
ADAPTERS = ("r4_qv", "r8_all", "r16_rslora")
# scheme -> (layer class, the activation quantization it runs)
CASES = {
    "FP8_DYNAMIC": (FP8Linear, FloatActivationQuant(8, dynamic=True)),
    "FP8": (FP8Linear, FloatActivationQuant(8, dynamic=False)),
    "FP8_BLOCK": (FP8Linear, FloatActivationQuant(8, dynamic=True, group_size=32)),
    "NVFP4A16": (NVFP4Linear, None),
    "NVFP4": (NVFP4Linear, FloatActivationQuant(4, dynamic=True, group_size=16)),
}


def _package_has(*names: str) -> None:
    """Skip where the installed compressed-tensors lacks what these tests build with."""
    from compressed_tensors.quantization import quant_scheme
    from compressed_tensors.quantization.utils import helpers

    for name in names:
        if not hasattr(quant_scheme, name) and not hasattr(helpers, name):
            pytest.skip(f"compressed-tensors {importlib.metadata.version('compressed-tensors')}"
                        f" has no {name}")


@pytest.fixture(scope="module")
def ct_float_models(tiny_root: Path, tiny_models, prompts) -> dict[str, tuple[Path, Path]]:
    """scheme -> (checkpoint, frozen reference) of the llama tiny model, written on first
    use; static ranges calibrated on the test prompts."""
    root = tiny_root / "ct_float"
    root.mkdir(parents=True, exist_ok=True)

    class Lazy(dict):
        def __missing__(self, scheme: str) -> tuple[Path, Path]:
            _package_has(scheme, "generate_gparam")
            self[scheme] = write_ct_float(tiny_models["llama"], root, scheme, prompts[:3])
            return self[scheme]
    return Lazy()


@pytest.mark.parametrize("scheme", list(CASES))
def test_base_with_mixed_adapters_matches_hf_peft(scheme, ct_float_models, tiny_adapters,
                                                  prompts):
    """Base + adapters of ranks 4, 8, 16 in one batch over two slots, prefills chunked:
    each output is HF + PEFT's on the package's fake-quantized forward."""
    quant_dir, ref_dir = ct_float_models[scheme]
    llm = make_llm(quant_dir, enable_lora=True, max_loras=2, max_lora_rank=16,
                   enable_chunked_prefill=True, max_num_batched_tokens=8)
    layers = llm.llm_engine.model.model.layers
    cls, activations = CASES[scheme]
    for layer in (layers[0].self_attn.qkv_proj, layers[1].mlp.down_proj):
        assert isinstance(layer.base_layer, cls)
        assert layer.base_layer.activations == activations
    adapters = {n: tiny_adapters["llama"][n] for n in ADAPTERS}
    reqs = lora_requests(adapters)
    names = [None, *ADAPTERS] * 2
    batch = [prompts[i % len(prompts)] for i in range(len(names))]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY,
                        lora_request=[reqs[n] if n else None for n in names], use_tqdm=False)
    check_fake_quant_against_hf(outs, ref_dir, [adapters[n] if n else None for n in names],
                                batch)


def test_transformers_reads_the_fp8_checkpoint_as_the_frozen_reference(ct_float_models,
                                                                       prompts):
    """The reference is what transformers computes for the compressed checkpoint itself
    (decompressed, activations fake-quantized by the package's forward)."""
    from tests.fixtures import hf_logprobs

    quant_dir, ref_dir = ct_float_models["FP8_DYNAMIC"]
    try:
        got = hf_logprobs(quant_dir, None, prompts[2])
    except Exception as e:  # noqa: BLE001 - an older transformers' own limits
        pytest.skip(f"transformers does not load this compressed checkpoint: {e}")
    assert torch.equal(got, hf_logprobs(ref_dir, None, prompts[2]))


def test_static_scales_of_sub_projections_merge_to_the_largest():
    """q/k/v calibrated apart: one input_scale (FP8) / input_global_scale (NVFP4) for the
    packed layer, the largest, as vLLM takes; each sub-projection keeps its own weight
    global scale."""
    fp8 = FP8Linear(64, [64, 32, 32], False, QuantConfig(
        "fp8", 8, -1, input_activations=FloatActivationQuant(8, dynamic=False)))
    nvfp4 = NVFP4Linear(64, [64, 32, 32], False, QuantConfig(
        "nvfp4", 4, 16, input_activations=FloatActivationQuant(4, True, 16)))
    for shard, size in enumerate([64, 32, 32]):
        fp8.load_shard("weight", torch.zeros(size, 64, dtype=torch.float8_e4m3fn), shard)
        fp8.load_shard("weight_scale", torch.ones(1), shard)
        fp8.load_shard("input_scale", torch.tensor([0.5, 2.0, 1.0][shard]), shard)
        nvfp4.load_shard("weight_packed", torch.zeros(size, 32, dtype=torch.uint8), shard)
        nvfp4.load_shard("weight_scale", torch.ones(size, 4, dtype=torch.float8_e4m3fn), shard)
        nvfp4.load_shard("weight_global_scale", torch.tensor([10.0 * (shard + 1)]), shard)
        nvfp4.load_shard("input_global_scale", torch.tensor([[7.0, 9.0, 8.0][shard]]), shard)
    fp8.finish_loading()
    nvfp4.finish_loading()
    assert fp8.input_scale.tolist() == [2.0] and nvfp4.input_global_scale.tolist() == [9.0]
    assert nvfp4.weight_global_scale.flatten().tolist() == [10.0] * 64 + [20.0] * 32 + [30.0] * 32


def _package_args(quant: FloatActivationQuant):
    from compressed_tensors.quantization import QuantizationArgs

    if quant.bits == 4:
        return QuantizationArgs(num_bits=4, type="float", strategy="tensor_group",
                                group_size=16, dynamic="local", symmetric=True,
                                scale_dtype=torch.float8_e4m3fn)
    strategy = "tensor" if not quant.dynamic else "token" if quant.group_size == -1 \
        else "group"
    return QuantizationArgs(num_bits=8, type="float", strategy=strategy,
                            group_size=None if quant.group_size == -1 else quant.group_size,
                            dynamic=quant.dynamic, symmetric=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant", [q for _, q in CASES.values() if q is not None],
                         ids=["fp8_token", "fp8_static", "fp8_group", "nvfp4"])
def test_fake_quantize_is_the_packages(quant, dtype):
    """FloatActivationQuant rounds as compressed-tensors' forward_quantize does, bit for
    bit: tokens of very different sizes, an all-zero token, values past a static range."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 5, 64, generator=gen) * torch.logspace(-3, 2, 5)[:, None]).to(dtype)
    x[0, 1] = 0
    module = torch.nn.Module()
    module.quantization_status = None  # forward_quantize reads it for weights only
    scale = torch.tensor([0.37], dtype=dtype) if quant.bits == 8 else torch.tensor([61.0])
    if quant.bits == 4:
        module.input_global_scale = scale
    else:
        module.input_scale, module.input_zero_point = scale, None
    want = forward_quantize(module, x, "input", _package_args(quant))
    got = quant.fake_quantize(x.view(-1, 64), scale).view_as(x)  # the engine's rows
    assert got.dtype == dtype and torch.equal(got, want)


def test_e2m1_rounding_is_the_packages():
    """Every tie between two e2m1 values (0.25, 0.75, ..., 5) and the values around them
    round as the package's cast_to_fp4 rounds them (to the even code)."""
    from compressed_tensors.quantization.quant_args import FP4_E2M1_DATA

    x = torch.arange(-6, 6.001, 1 / 64)
    x = torch.cat([x, x + 1e-6, x - 1e-6])
    assert torch.equal(round_to_e2m1(x), FP4_E2M1_DATA.cast_to_fp4(x.clone()))


def test_nvfp4_dequantizes_as_the_package():
    """q, k, v (64, 32, 32 rows) with their own global scales: each W exactly what the
    package's NVFP4PackedCompressor decompresses (in its bf16), and the fp32 values the
    frozen forward computes."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    _package_has("NVFP4A16")
    args = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16,
                            dynamic=False, symmetric=True, scale_dtype=torch.float8_e4m3fn)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    layer = NVFP4Linear(64, [64, 32, 32], False, QuantConfig("nvfp4", 4, 16))
    want_bf16, want_fp32 = [], []
    for shard, size in enumerate([64, 32, 32]):
        w = torch.randn(size, 64, generator=torch.Generator().manual_seed(shard)) * (shard + 1)
        g = generate_gparam(w.amin(), w.amax())
        groups = w.view(size, 4, 16)
        scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), args, global_scale=g)
        packed = NVFP4PackedCompressor.compress(
            {"weight": w, "weight_scale": scale, "weight_global_scale": g}, scheme)
        want_bf16.append(NVFP4PackedCompressor.decompress(packed, scheme)["weight"])
        want_fp32.append(fake_quantize(w, scale, None, args, global_scale=g))
        for name, t in packed.items():
            layer.load_shard(name, t, shard)
    layer.finish_loading()
    torch.testing.assert_close(layer.dequantize_rows(torch.bfloat16), torch.cat(want_bf16),
                               rtol=0, atol=0)
    torch.testing.assert_close(layer.dequantize_rows(torch.float32), torch.cat(want_fp32),
                               rtol=0, atol=0)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ torch.cat(want_fp32).T)


def test_fp8_experts_quantize_their_inputs():
    """A mixture's FP8 experts under FP8_DYNAMIC: each projection's input is rounded per
    token first, as the Linears' are; static activations on experts are refused."""
    from loraplex.layers.quantized_experts import FP8FusedExperts

    quant = FloatActivationQuant(8, dynamic=True)
    experts = FP8FusedExperts(64, 32, 2, QuantConfig("fp8", 8, -1, input_activations=quant))
    experts.fill_random(torch.Generator().manual_seed(0))
    x = torch.randn(5, 64)
    w = experts.w13[1].float() * experts.w13_scale[1]
    torch.testing.assert_close(experts.project(1, "w13", x), quant.fake_quantize(x) @ w.T)
    static = QuantConfig("fp8", 8, -1, input_activations=FloatActivationQuant(8, False))
    with pytest.raises(ValueError, match="FP8 experts with static FP8 activations"):
        FP8FusedExperts(64, 32, 2, static)


@pytest.mark.parametrize("scheme", ["FP8", "NVFP4"])
def test_dummy_weights(scheme, ct_float_models):
    out = make_llm(ct_float_models[scheme][0], load_format="dummy").generate(
        {"prompt_token_ids": [1, 5, 9]}, SamplingParams(max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def _group(q: dict) -> dict:
    return q["config_groups"]["group_0"]


def _int4_weights(q: dict) -> None:
    q["format"] = "pack-quantized"
    _group(q).update(format="pack-quantized", weights={
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
        "group_size": 32, "dynamic": False})
    _group(q)["input_activations"].update(strategy="group", group_size=32)


@pytest.mark.parametrize(("scheme", "edit", "message"), [
    ("FP8_DYNAMIC", _int4_weights, "input activations {"),  # ... on int weights
    ("FP8_DYNAMIC", lambda q: _group(q)["input_activations"].update(strategy="tensor"),
     "are not supported on FP8 weights"),
    ("FP8_DYNAMIC", lambda q: _group(q)["input_activations"].update(symmetric=False),
     "are not supported on FP8 weights"),
    ("FP8", lambda q: _group(q)["input_activations"].update(dynamic=True, strategy="token"),
     "input_scale where its config says dynamic"),
    ("NVFP4", lambda q: _group(q)["input_activations"].update(dynamic=False),
     "are not supported on NVFP4 weights"),
    ("NVFP4", lambda q: _group(q)["weights"].update(group_size=32),
     "nvfp4-pack-quantized weights"),
    ("NVFP4", lambda q: _group(q).update(input_activations=None),
     "has an input_global_scale where its config says no activation"),
    ("NVFP4", lambda q: q.update(ignore=[]), "quantized lm_head"),
])
def test_unsupported_or_inconsistent_checkpoints_are_refused(ct_float_models, tmp_path,
                                                            scheme, edit, message):
    bad = edited_copy(ct_float_models[scheme][0], tmp_path / "bad",
                      lambda c: edit(c["quantization_config"]), config="config.json")
    with pytest.raises(ValueError, match=re.escape(message)):
        make_llm(bad)


def test_a_missing_input_scale_is_refused(ct_float_models, tmp_path):
    dst = shutil.copytree(ct_float_models["FP8"][0], tmp_path / "no_input_scale")
    state = load_file(str(dst / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.input_scale"]
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="has no input_scale, which its static input"):
        make_llm(dst)


def test_nvfp4_mixture_of_experts_is_refused(tiny_root, ct_float_models, tmp_path):
    """NVFP4 experts are not loaded: a Qwen3-MoE under an NVFP4 config is refused before
    any weight is read."""
    import json

    from tests.fixtures import make_tiny_model

    base = make_tiny_model(tiny_root / "ct_float_moe", "qwen3_moe", seed=35)
    quant = json.loads((ct_float_models["NVFP4"][0] / "config.json").read_text())
    moe = edited_copy(base, tmp_path / "moe", lambda c: c.update(
        quantization_config=quant["quantization_config"]), config="config.json")
    with pytest.raises(ValueError, match="nvfp4-quantized Qwen3MoeForCausalLM models are not"):
        make_llm(moe)


def test_over_http(ct_float_models, tiny_adapters, prompts):
    """`loraplex serve` on an NVFP4 (W4A4) base with two adapters: each request's tokens
    are HF + PEFT's greedy ones, an unknown adapter is a 404 and the server carries on."""
    import openai

    from tests.fixtures import assert_greedy_close
    from tests.server_utils import RemoteServer, token_ids_of

    quant_dir, ref_dir = ct_float_models["NVFP4"]
    paths = {n: tiny_adapters["llama"][n] for n in ("r4_qv", "r8_all")}
    args = ["--enable-lora", "--max-lora-rank", "16", "--dtype", "float32",
            "--max-model-len", "128", "--cpu-kv-cache-gib", "0.05", "--lora-modules",
            *(f"{n}={p}" for n, p in paths.items())]
    with RemoteServer(quant_dir, args) as server:
        client = server.get_client()
        for model in (str(quant_dir), "r4_qv", "r8_all"):
            r = client.completions.create(
                model=model, prompt=prompts[1], max_tokens=6, temperature=0, logprobs=1,
                extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
            assert_greedy_close(token_ids_of(r.choices[0].logprobs), ref_dir,
                                paths.get(model), prompts[1], tie_tol=0.1)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt=prompts[0], max_tokens=2)
        assert client.completions.create(model="r4_qv", prompt=prompts[0],
                                         max_tokens=2).choices[0].text is not None
