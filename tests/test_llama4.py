"""Llama 4 on text against HF transformers + PEFT (fp32): Llama4ForCausalLM and a
Llama4ForConditionalGeneration served on its language model (tests/llama4_fixtures.py:
chunked attention in chunks of 4 on the rope layers, a temperature-tuned NoPE layer,
top-1 sigmoid-routed experts with a shared expert interleaved with dense MLPs, q/k norm,
llama3 rope).

Adapters of different ranks on q/k/v/o, the dense and shared MLPs and (PEFT's
target_parameters) the fused experts; mixed batches over max_loras=1, whole and chunked
prefill, prefix caching, the Triton kernels (under the interpreter on the CPU). Prompts
span up to ten chunks; generations cross chunk boundaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import tests.test_attention  # noqa: F401  (on the CPU: Triton under the interpreter)
from loraplex import LoRARequest, SamplingParams
from loraplex.lora.errors import LoRAError
from loraplex.models.registry import build_model
from loraplex.models.text_only import text_only_config
from tests import fixtures
from tests.engine_utils import check_against_hf, check_mixed_batch, check_shared_prefixes, make_llm
from tests.fixtures import make_peft_adapter
from tests.llama4_fixtures import CHUNK, fix_hf4_moe_routing, make_llama4, make_llama4_multimodal

EXPERTS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]
# every linear PEFT can run on Llama 4 (its router returns a tuple, which PEFT's LoRA
# layer cannot wrap: all-linear fails in HF's forward)
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LONG = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, logprobs=2)


TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


@pytest.fixture(scope="module", autouse=True)
def _hf_reference_moe():
    """On transformers 4.x, HF's reference with its MoE routing as transformers 5 has it
    (4.56's Llama4TextMoe pairs a forward's tokens with the wrong router scores:
    tests/llama4_fixtures.py `fix_hf4_moe_routing`); loraplex's config and checkpoint
    reading on 4.x checked against it."""
    if TRANSFORMERS_5:
        yield
        return
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    original = Llama4TextMoe.forward
    fix_hf4_moe_routing()
    yield
    Llama4TextMoe.forward = original


# the experts' LoRA (PEFT's target_parameters): PEFT 0.17 on transformers 4 saves it in
# the layout before 0.19.1 (test_experts_lora_saved_by_older_peft)
EXPERTS_LORA = {"target_parameters": EXPERTS}


@pytest.fixture(scope="module")
def llama4(tiny_root: Path) -> dict[str, Path]:
    root = tiny_root / "llama4"
    base = make_llama4(root / "base", seed=40)
    return {
        "base": base,
        # q/k/v/o, the dense and shared MLPs and the experts
        "r8_all": make_peft_adapter(base, root / "r8_all", r=8, seed=41,
                                    target_modules=LINEARS, **EXPERTS_LORA),
        "r4_qv": make_peft_adapter(base, root / "r4_qv", r=4, seed=42,
                                   target_modules=["q_proj", "v_proj", "down_proj"]),
    }


def _adapters(models: dict[str, Path]) -> dict[str, Path]:
    return {n: models[n] for n in ("r8_all", "r4_qv")}


def test_config_flags(llama4):
    """The registry reads the layer kinds as HF builds them."""
    from transformers import AutoConfig

    model = build_model(AutoConfig.from_pretrained(str(llama4["base"])))
    l4 = model.args.llama4
    assert l4.chunk_size == CHUNK and l4.chunked_layers == (0, 1, 2)
    assert model.args.nope_layers == (3,) and l4.moe_layers == (1, 3)
    layers = model.model.layers
    assert [layer.self_attn.attn.chunk for layer in layers] == [CHUNK] * 3 + [0]
    assert [type(layer.feed_forward).__name__ for layer in layers] == [
        "LlamaMLP", "Llama4MoE", "LlamaMLP", "Llama4MoE"]
    assert layers[3].self_attn.temperature is not None and layers[3].self_attn.rotary is None
    assert all(layer.self_attn.l2_qk_eps is not None for layer in layers[:3])
    assert model.args.host_routed  # its experts grouped on the host: no decode graphs


@pytest.mark.parametrize("budget", [None, 6])
def test_mixed_batch_matches_peft(budget, llama4, prompts):
    """Base and two adapters (ranks 8 and 4) in one batch over one slot; whole prompts,
    then chunks of 6 tokens (not a multiple of the attention chunk)."""
    llm = make_llm(llama4["base"], enable_lora=True, max_loras=1, max_lora_rank=8,
                   max_num_batched_tokens=budget)
    check_mixed_batch(llm, llama4["base"], _adapters(llama4), prompts)


def test_long_generations_match_peft(llama4, prompts):
    """The longest prompts (about ten chunks) and 14 tokens each (several more chunks),
    block size 8 (a chunk of attention starts mid-block), chunked prefill of 5."""
    llm = make_llm(llama4["base"], enable_lora=True, max_loras=1, max_lora_rank=8,
                   block_size=8, max_num_batched_tokens=5)
    batch = [prompts[-1], prompts[-2], prompts[-3]]
    reqs = [None, LoRARequest("r8_all", 1, str(llama4["r8_all"])),
            LoRARequest("r4_qv", 2, str(llama4["r4_qv"]))]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], LONG, lora_request=reqs,
                        use_tqdm=False)
    check_against_hf(outs, llama4["base"], [None, llama4["r8_all"], llama4["r4_qv"]], batch)


def test_prefix_caching(llama4, prompts):
    """Requests starting from cached blocks of their own weights' prefix (block size 8):
    their first chunk of attention reads keys from the cache."""
    check_shared_prefixes(llama4["base"], _adapters(llama4), prompts)


@pytest.mark.parametrize("budget", [None, 5])
def test_triton_attention(monkeypatch, budget, llama4, prompts):
    """The chunk bound in the Triton kernels (under the interpreter on the CPU): prefill,
    chunks over cached context, decode."""
    monkeypatch.setenv("LORAPLEX_ATTENTION_BACKEND", "triton")
    llm = make_llm(llama4["base"], enable_lora=True, max_loras=1, max_lora_rank=8,
                   block_size=8, max_num_batched_tokens=budget)
    assert llm.llm_engine.model_runner.attn_backend == "triton"
    check_mixed_batch(llm, llama4["base"], _adapters(llama4), prompts, extra=1)


def _as_saved_by_old_peft(adapter: Path, out: Path, version: str | None) -> Path:
    """`adapter`'s experts LoRA as PEFT before 0.19.1 saves the same LoRA (A of the input,
    B of the output as transformers holds Llama 4's experts, [E, in, out]; its delta
    einsum "o r e, e r i -> e i o", where from 0.19.1 it is "-> e o i" with A and B the
    other way round), with adapter_config.json's `peft_version` set to `version` (None:
    left out, as before PEFT 0.18)."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.pop("peft_version")
    if version is not None:
        cfg["peft_version"] = version
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    e, r = 4, cfg["r"]
    for key in [k for k in tensors if ".experts." in k and ".lora_A." in k]:
        a, b = tensors[key], tensors[key.replace(".lora_A.", ".lora_B.")]
        new_delta = torch.einsum("ore,eri->eoi", b.reshape(b.shape[0], r, e),
                                 a.reshape(e, r, a.shape[1]))
        old_a = b.reshape(b.shape[0], r, e).permute(2, 1, 0).reshape(e * r, b.shape[0])
        old_b = a.reshape(e, r, a.shape[1]).permute(2, 1, 0).reshape(a.shape[1], r * e)
        old_delta = torch.einsum("ore,eri->eio", old_b.reshape(old_b.shape[0], r, e),
                                 old_a.reshape(e, r, old_a.shape[1]))
        torch.testing.assert_close(old_delta, new_delta)  # the same LoRA
        tensors[key], tensors[key.replace(".lora_A.", ".lora_B.")] = old_a, old_b
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


@pytest.mark.skipif(not TRANSFORMERS_5, reason="PEFT 0.21's layout is the reference")
def test_experts_lora_saved_by_older_peft(tmp_path, prompts):
    """PEFT read a 3-D parameter's in and out the other way round before 0.19.1: the same
    experts LoRA saved by PEFT 0.17 / 0.18 (no `peft_version`, "0.18.1") and 0.19.0 gives
    the outputs HF + PEFT 0.21 gives with the LoRA as 0.21 saves it, in one batch with it
    and the base. hidden_size = intermediate_size, so down_proj's A and B fit either
    reading and only adapter_config.json's `peft_version` tells them apart."""
    base = make_llama4(tmp_path / "base", seed=45, intermediate_size=64)
    adapter = make_peft_adapter(base, tmp_path / "new", r=4, seed=46,
                                target_modules=["q_proj"], target_parameters=EXPERTS)
    old = {v: _as_saved_by_old_peft(adapter, tmp_path / f"old_{v}", v)
           for v in (None, "0.18.1", "0.19.0")}
    names = [None, "new", *old]
    paths = {"new": adapter, **old}
    reqs = [LoRARequest(str(n), i + 1, str(paths[n])) if i else None
            for i, n in enumerate(names)]
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=8)
    outs = llm.generate([{"prompt_token_ids": prompts[0]}] * len(names), LONG,
                        lora_request=reqs, use_tqdm=False)
    check_against_hf(outs, base, [None] + [adapter] * (len(names) - 1),
                     [prompts[0]] * len(names))
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids


@pytest.mark.skipif(not TRANSFORMERS_5, reason="PEFT 0.21's layout is the reference")
def test_experts_lora_read_by_its_shapes(llama4, tmp_path, prompts):
    """A LoRA whose shapes fit only the reading its `peft_version` does not imply (as
    gpt-oss trained on transformers 4, which marks nothing `is_transposed`, by PEFT 0.19.1
    or later) is read the way it fits: here an adapter in the layout before 0.19.1
    labelled 0.21.2 (hidden 64, intermediate 48: every pair fits one reading only)."""
    adapter = _as_saved_by_old_peft(llama4["r8_all"], tmp_path / "mislabelled", "0.21.2")
    llm = make_llm(llama4["base"], enable_lora=True, max_lora_rank=8)
    outs = llm.generate([{"prompt_token_ids": prompts[1]}], LONG, use_tqdm=False,
                        lora_request=LoRARequest("mislabelled", 1, str(adapter)))
    check_against_hf(outs, llama4["base"], [llama4["r8_all"]], [prompts[1]])


def test_router_lora_refused(llama4, tmp_path, prompts):
    """all-linear puts a LoRA on the router too, which PEFT itself cannot run (HF's router
    returns a tuple): such an adapter is refused, the engine serves on."""
    adapter = make_peft_adapter(llama4["base"], tmp_path / "router", r=4, seed=43,
                                target_modules="all-linear")
    llm = make_llm(llama4["base"], enable_lora=True, max_lora_rank=8)
    with pytest.raises(LoRAError, match="target module 'router' not found"):
        llm.generate([{"prompt_token_ids": prompts[0]}], LONG, use_tqdm=False,
                     lora_request=LoRARequest("router", 1, str(adapter)))
    out = llm.generate([{"prompt_token_ids": prompts[0]}], LONG, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == LONG.max_tokens


# ---- Llama4ForConditionalGeneration (Scout, Maverick) on text -------------------------

class _WholeModel:
    """AutoModelForCausalLM for tests/fixtures.py that builds the whole multimodal model
    (PEFT adapters trained on it, and HF's reference outputs of it on text)."""

    @staticmethod
    def from_pretrained(path: str, **kw):
        from transformers import Llama4ForConditionalGeneration

        return Llama4ForConditionalGeneration.from_pretrained(path, **kw)


@pytest.fixture(scope="module")
def llama4mm(tiny_root: Path) -> dict[str, Path]:
    root = tiny_root / "llama4mm"
    base = make_llama4_multimodal(root / "base", seed=50)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fixtures, "AutoModelForCausalLM", _WholeModel)
        return {
            "base": base,
            # the vision tower's and projector's linears too (its attention shares the
            # language model's q/k/v/o_proj names)
            "all": make_peft_adapter(base, root / "all", r=8, seed=51,
                                     target_modules=[*LINEARS, "fc1", "fc2", "linear_1"],
                                     **EXPERTS_LORA),
            "qv": make_peft_adapter(base, root / "qv", r=4, seed=52,
                                    target_modules=["q_proj", "v_proj"]),
        }


@pytest.mark.parametrize("budget", [None, 6])
def test_multimodal_checkpoint_on_text(monkeypatch, budget, llama4mm, prompts):
    from safetensors.torch import load_file

    names = set(load_file(str(llama4mm["all"] / "adapter_model.safetensors")))
    assert any(".vision_model." in n for n in names)
    assert any(".layers.1.feed_forward.experts." in n for n in names)
    monkeypatch.setattr(fixtures, "AutoModelForCausalLM", _WholeModel)
    llm = make_llm(llama4mm["base"], enable_lora=True, max_loras=1, max_lora_rank=8,
                   max_num_batched_tokens=budget)
    assert llm.llm_engine.model.args.llama4 is not None
    check_mixed_batch(llm, llama4mm["base"], {n: llama4mm[n] for n in ("all", "qv")},
                      prompts)


def test_multimodal_images_refused(llama4mm, prompts):
    """Saved without its image processor: served on text, images refused (with one:
    tests/test_llama4_images.py)."""
    from PIL import Image
    from transformers import AutoConfig

    _, spec = text_only_config(AutoConfig.from_pretrained(str(llama4mm["base"])))
    assert spec is not None and spec.images
    llm = make_llm(llama4mm["base"])
    assert llm.llm_engine.vision is None
    with pytest.raises(ValueError, match="multimodal inputs are not supported"):
        llm.generate({"prompt_token_ids": prompts[0],
                      "multi_modal_data": {"image": Image.new("RGB", (8, 8))}}, LONG,
                     use_tqdm=False)
    out = llm.generate([{"prompt_token_ids": prompts[0]}], LONG, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == LONG.max_tokens




# ---- bitsandbytes 4-bit, quantized as it loads ----------------------------------------

def _dequantized_experts(ref_dir: Path) -> None:
    """The reference's fused experts through bitsandbytes' NF4 (blocks of 64 inputs), one
    [out, in] matrix per expert and projection, as the engine quantizes them."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    from safetensors.torch import load_file, save_file

    def nf4(w):  # [out, in]
        q, qs = quantize_4bit(w.contiguous().float(), blocksize=64, quant_type="nf4")
        return dequantize_4bit(q, qs).to(w.dtype)

    path = str(ref_dir / "model.safetensors")
    state = load_file(path)
    for key, w in state.items():
        if key.endswith("experts.gate_up_proj"):  # [E, H, 2I]: gate's columns, then up's
            i = w.shape[2] // 2
            state[key] = torch.stack([torch.cat([nf4(x[:, :i].T).T, nf4(x[:, i:].T).T], 1)
                                      for x in w])
        elif key.endswith("experts.down_proj"):  # [E, I, H]
            state[key] = torch.stack([nf4(x.T).T for x in w])
    save_file(state, path, metadata={"format": "pt"})


def test_bitsandbytes_in_flight_matches_dequantized(tiny_root, prompts):
    """quantization="bitsandbytes" on a plain Llama 4 checkpoint: every linear and each
    expert NF4 as it loads (the router plain), with adapters on the experts too, against
    HF + PEFT on bitsandbytes' dequantized weights."""
    pytest.importorskip("bitsandbytes")
    from tests.quantized_fixtures import write_bnb4

    root = tiny_root / "llama4_bnb"
    base = make_llama4(root / "base", seed=60, intermediate_size=64,
                       intermediate_size_mlp=128)  # bitsandbytes' blocks are 64 inputs
    adapters = {
        "r8_all": make_peft_adapter(base, root / "r8_all", r=8, seed=61,
                                    target_modules=LINEARS, **EXPERTS_LORA),
        "r4_qv": make_peft_adapter(base, root / "r4_qv", r=4, seed=62,
                                   target_modules=["q_proj", "v_proj"]),
    }
    quant, ref = write_bnb4(base, root, "nf4", prequantized=False)
    _dequantized_experts(ref)
    llm = make_llm(quant, quantization="bitsandbytes", enable_lora=True, max_loras=1,
                   max_lora_rank=8, max_num_batched_tokens=6)
    moe = llm.llm_engine.model.model.layers[1].feed_forward
    assert moe.experts.base_layer.w13.dtype == torch.uint8  # the experts stay packed
    check_mixed_batch(llm, ref, adapters, prompts, extra=2)
