"""GPTQ and AWQ bases with LoRA adapters, against HF + PEFT on the dequantized weights.

The quantized checkpoints are written by tests/quantized_fixtures.py with AutoGPTQ's and
AutoAWQ's packing; the reference model holds the same integers dequantized in fp32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex import SamplingParams
from loraplex.layers.quantization import AWQLinear, GPTQLinear, QuantConfig, QuantLinear, unpack
from tests.engine_utils import (
    GREEDY,
    check_against_hf,
    check_base_and_adapter,
    lora_requests,
    make_llm,
)
from tests.fixtures import edited_copy, hf_greedy
from tests.quantized_fixtures import (
    pack_cols,
    pack_rows,
    quantize_awq,
    quantize_gptq,
    write_quantized,
)
from tests.server_utils import RemoteServer, token_ids_of

ADAPTERS = ("r4_qv", "r8_all", "r16_rslora")

CASES = {  # name -> (method, options)
    "gptq4_g32": ("gptq", {}),
    "gptq4_act_order": ("gptq", {"desc_act": True}),
    "gptq8_sym_one_group_v2": ("gptq", {"bits": 8, "group_size": -1, "sym": True,
                                        "fmt": "gptq_v2"}),
    "gptq2_sym": ("gptq", {"bits": 2, "group_size": 16, "sym": True}),
    "awq4_g32": ("awq", {}),
}


@pytest.fixture(scope="module")
def quantized(tiny_root: Path, tiny_models) -> dict[str, tuple[Path, Path]]:
    """case -> (quantized checkpoint, dequantized reference), of the llama tiny model."""
    out = {}
    for case, (method, opts) in CASES.items():
        root = tiny_root / "quantized" / case
        root.mkdir(parents=True, exist_ok=True)
        out[case] = write_quantized(tiny_models["llama"], root, method, **opts)
    return out


def test_unpack_reads_the_documented_bit_layouts():
    # GPTQ qweight: 8 consecutive inputs per int32, lowest nibble first
    assert unpack(torch.tensor([[0x76543210]], dtype=torch.int32), 4, dim=0).flatten() \
        .tolist() == list(range(8))
    # AWQ: nibble k holds output column (0, 2, 4, 6, 1, 3, 5, 7)[k]
    awq = torch.tensor([[0x75316420]], dtype=torch.int32)
    assert unpack(awq, 4, dim=1, nibble_of=(0, 4, 1, 5, 2, 6, 3, 7)).tolist() == [list(range(8))]
    # the top nibble survives the sign of the int32 (arithmetic shift)
    top = torch.tensor([[-0x10000000]], dtype=torch.int32)  # 0xF0000000
    assert unpack(top, 4, dim=1).tolist() == [[0, 0, 0, 0, 0, 0, 0, 15]]
    assert unpack(torch.tensor([[0x030201FF]], dtype=torch.int32), 8, dim=1).tolist() == \
        [[255, 1, 2, 3]]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fixture_packing_round_trips_through_the_loader_unpack(bits):
    q = torch.randint(0, 2**bits, (64, 48), generator=torch.Generator().manual_seed(bits))
    assert torch.equal(unpack(pack_rows(q, bits), bits, dim=0), q.to(torch.int32))
    assert torch.equal(unpack(pack_cols(q, bits), bits, dim=1), q.to(torch.int32))


@pytest.mark.parametrize(("desc_act", "group_size"), [(False, 16), (True, 16), (False, 4)])
def test_gptq_layer_dequantizes_to_the_reference(desc_act, group_size):
    """Plain groups take the slot-by-slot path; act-order and groups smaller than an
    int32's values the gather."""
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
    tensors, deq = quantize_gptq(w, group_size=group_size, desc_act=desc_act)
    layer = GPTQLinear(64, [96], False, QuantConfig("gptq", 4, group_size, zero_offset=1,
                                                   desc_act=desc_act))
    for name, t in tensors.items():
        layer.load_shard(name, t, 0)
    assert layer.act_order == desc_act
    torch.testing.assert_close(layer.dequantize(torch.float32).t(), deq, rtol=0, atol=0)
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), x @ deq.t())


def test_awq_layer_packs_sub_projections_side_by_side():
    gen = torch.Generator().manual_seed(1)
    ws = [torch.randn(n, 64, generator=gen) for n in (64, 32, 32)]  # q, k, v
    layer = AWQLinear(64, [64, 32, 32], False, QuantConfig("awq", 4, 32))
    deqs = []
    for shard, w in enumerate(ws):
        tensors, deq = quantize_awq(w, group_size=32)
        for name, t in tensors.items():
            layer.load_shard(name, t, shard)
        deqs.append(deq)
    torch.testing.assert_close(layer.dequantize(torch.float32).t(), torch.cat(deqs),
                               rtol=0, atol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_base_with_mixed_adapters_matches_hf_peft(case, quantized, tiny_adapters,
                                                            prompts):
    """Base + three adapters of ranks 4, 8, 16 in one batch, more adapters than slots."""
    quant_dir, ref_dir = quantized[case]
    reqs = lora_requests({n: tiny_adapters["llama"][n] for n in ADAPTERS})
    names = [None, *sorted(reqs)]
    llm = make_llm(quant_dir, enable_lora=True, max_loras=2, max_lora_rank=16)
    model = llm.llm_engine.model
    assert isinstance(model.model.layers[0].self_attn.qkv_proj.base_layer, QuantLinear)
    batch = [prompts[i % len(prompts)] for i in range(2 * len(names))]
    loras = [names[i % len(names)] for i in range(len(batch))]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY,
                        lora_request=[reqs[n] if n else None for n in loras], use_tqdm=False)
    check_against_hf(outs, ref_dir, [tiny_adapters["llama"][n] if n else None for n in loras],
                     batch)


def test_quantized_weights_stay_packed(quantized):
    """The decoder's linears hold int32-packed weights: a fraction of the fp32 bytes."""
    llm = make_llm(quantized["gptq4_g32"][0])
    linears = [m for m in llm.llm_engine.model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 2 * 4  # 2 layers x (qkv, o, gate_up, down)
    held = sum(p.numel() * p.element_size() for m in linears for p in m.parameters())
    fp32 = sum(m.in_features * m.out_features * 4 for m in linears)
    assert held < 0.2 * fp32  # 4-bit values + an fp32 scale and a 4-bit zero per 32
    assert not any(hasattr(m, "weight") for m in linears)


def test_qwen2_qkv_bias_and_modules_left_unquantized(tiny_root, tiny_models, tiny_adapters,
                                                     prompts):
    root = tiny_root / "quantized" / "qwen2_skip"
    root.mkdir(parents=True, exist_ok=True)
    quant_dir, ref_dir = write_quantized(tiny_models["qwen2"], root, "awq",
                                         skip=("layers.1.mlp",))
    llm = make_llm(quant_dir, enable_lora=True, max_lora_rank=16)
    layers = llm.llm_engine.model.model.layers
    assert isinstance(layers[0].mlp.down_proj.base_layer, QuantLinear)
    assert not isinstance(layers[1].mlp.down_proj.base_layer, QuantLinear)
    check_base_and_adapter(llm, ref_dir, tiny_adapters["qwen2"]["r8_all"], prompts)


def test_dummy_weights_for_a_quantized_config(quantized):
    llm = make_llm(quantized["awq4_g32"][0], load_format="dummy")
    out = llm.generate({"prompt_token_ids": [1, 5, 9]}, SamplingParams(max_tokens=4),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_quantization_flag_is_checked_against_the_checkpoint(quantized, tiny_models):
    gptq, _ = quantized["gptq4_g32"]
    make_llm(gptq, quantization="gptq_marlin")  # vLLM's kernel name: the same weights
    with pytest.raises(ValueError, match="quantized with 'gptq'"):
        make_llm(gptq, quantization="awq")
    with pytest.raises(ValueError, match="no quantization_config"):
        make_llm(tiny_models["llama"], quantization="gptq")
    with pytest.raises(ValueError, match="quantization='gguf' needs a GGUF file as the model"):
        make_llm(tiny_models["llama"], quantization="gguf")


@pytest.mark.parametrize(("case", "changes", "message"), [
    ("gptq4_g32", {"bits": 3}, "bits=3 is not supported"),
    ("gptq4_g32", {"checkpoint_format": "marlin"}, "checkpoint_format='marlin'"),
    ("gptq4_g32", {"lm_head": True}, "quantized lm_head"),
    ("gptq4_g32", {"group_size": 48}, "not a whole number of groups of 48"),
    ("gptq4_g32", {"group_size": 16}, "does not fit shard"),
    ("awq4_g32", {"version": "gemv"}, "version='gemv'"),
    ("awq4_g32", {"modules_to_not_convert": ["q_proj"]}, "leaves only some of them"),
])
def test_unsupported_or_inconsistent_quantized_checkpoints(quantized, tmp_path, case, changes,
                                                           message):
    bad = edited_copy(quantized[case][0], tmp_path / "bad",
                      lambda c: c["quantization_config"].update(changes), config="config.json")
    with pytest.raises(ValueError, match=message):
        make_llm(bad)


def test_plain_weights_under_a_quantization_config_are_a_clear_error(tmp_path, tiny_models):
    dst = shutil.copytree(tiny_models["llama"], tmp_path / "plain")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config does not match the weights"):
        make_llm(dst)


def test_act_order_must_agree_across_packed_sub_projections(quantized, tmp_path):
    dst = shutil.copytree(quantized["gptq4_act_order"][0], tmp_path / "mixed_g_idx")
    path = dst / "model.safetensors"
    state = load_file(str(path))
    key = "model.layers.0.self_attn.k_proj.g_idx"
    state[key] = state[key].flip(0).contiguous()
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="different g_idx"):
        make_llm(dst)


def test_seed_004_gptq_server_with_an_adapter(quantized, tiny_adapters, prompts):
    """Seed 004's `vllm serve ...-GPTQ --enable-lora --quantization gptq --lora-modules`,
    on a real server driven by the openai client."""
    quant_dir, ref_dir = quantized["gptq4_act_order"]
    adapter = tiny_adapters["llama"]["r8_all"]
    args = ["--enable-lora", "--quantization", "gptq", "--lora-modules",
            f"my-adapter={adapter}", "--dtype", "float32", "--cpu-kv-cache-gib", "0.05",
            "--max-model-len", "256"]
    with RemoteServer(quant_dir, args) as server:
        client = server.get_client()
        assert {m.id for m in client.models.list().data} == {str(quant_dir), "my-adapter"}
        for model, adapter_dir in ((str(quant_dir), None), ("my-adapter", adapter)):
            res = client.completions.create(model=model, prompt=prompts[1], max_tokens=6,
                                            temperature=0.0, logprobs=1,
                                            extra_body={"ignore_eos": True,
                                                        "return_tokens_as_token_ids": True})
            got = token_ids_of(res.choices[0].logprobs)
            assert got == hf_greedy(ref_dir, adapter_dir, prompts[1], 6), model


@pytest.mark.parametrize(("case", "side_file", "side"), [
    ("gptq4_act_order", "quantize_config.json",  # AutoGPTQ's, no quant_method in it
     {"bits": 4, "group_size": 32, "desc_act": True, "sym": False, "true_sequential": True}),
    ("awq4_g32", "quant_config.json",  # AutoAWQ's older key names
     {"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"}),
])
def test_quantization_settings_beside_config_json(quantized, tmp_path, prompts, case,
                                                  side_file, side):
    """Older checkpoints keep the settings in a file of their own, not in config.json."""
    quant_dir, ref_dir = quantized[case]
    dst = shutil.copytree(quant_dir, tmp_path / "old_style")
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["quantization_config"]
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / side_file).write_text(json.dumps(side))
    llm = make_llm(dst)
    assert llm.llm_engine.model_config.quantization.method == CASES[case][0]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], GREEDY,
                        use_tqdm=False)
    check_against_hf(outs, ref_dir, [None, None], prompts[:2])



def test_not_convert_names_follow_the_checkpoint_renames():
    """A checkpoint whose names are not ours (Mamba's and Nemotron-H's `backbone.`) lists
    its plain modules under its names: substrings and compressed-tensors' regexes alike
    end up naming our modules, and names without the renamed part stay as they are."""
    from loraplex.models.mamba_hybrid import MIXER_BLOCK_RENAMES
    quant = QuantConfig("gptq", 4, 32, modules_to_not_convert=(
        "backbone.layers.0.mixer.in_proj", r"re:backbone\.layers\.1\.mixer\.out_proj$",
        "lm_head", "re:.*x_proj$"))
    ours = quant.renamed(MIXER_BLOCK_RENAMES)
    for name, plain in (("model.layers.0.mixer.in_proj", True),
                        ("model.layers.1.mixer.out_proj", True),
                        ("model.layers.1.mixer.in_proj", False),
                        ("model.layers.2.mixer.x_proj", True), ("lm_head", True)):
        assert ours.skips(name) is plain, name
        assert not quant.skips(name) or name.endswith(("x_proj", "lm_head")), name
