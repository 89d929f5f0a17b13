"""gpt-oss (GptOssForCausalLM) against HF transformers + PEFT (fp32).

What sets it apart, each made to matter on the tiny model: attention sinks (a learned
logit per head in every softmax), biases on q/k/v and o, alternating sliding-window (6
here) and global layers, YaRN rope, and a mixture of experts whose router has a bias and
softmaxes its top-k logits, whose experts have biases and a clamped SwiGLU (a limit of
1.5 that bites; transformers 4 clamps at 7.0 whatever the config says, so there the
tiny model's config says 7.0), stored fused, transposed and with gate and up
interleaved. Adapters: on
the attention (all-linear reaches only it: the router and experts are not nn.Linear), on
lm_head, and on the experts through PEFT's target_parameters, several in one batch with
the base over fewer slots; through the torch and the Triton attention (interpreted on
the CPU), in whole prompts and chunks.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import tests.test_attention  # noqa: F401  (on the CPU: Triton under the interpreter)
from loraplex import LoRARequest, SamplingParams
from loraplex.layers.rotary import RotaryEmbedding
from tests.engine_utils import GREEDY, check_against_hf, check_mixed_batch, make_llm
from tests.fixtures import edited_copy, make_peft_adapter, make_tiny_model

ADAPTERS = {
    "r4_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=91),
    "r8_all": dict(r=8, lora_alpha=16, target_modules="all-linear", seed=92),
    "r16_lm": dict(r=16, lora_alpha=16, target_modules=["o_proj", "lm_head"], seed=93),
    "r6_experts": dict(r=6, lora_alpha=12, target_modules=["k_proj"], seed=94,
                       target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
}


@pytest.fixture(scope="module")
def gpt_oss(tiny_root: Path) -> tuple[Path, dict[str, Path]]:
    base = make_tiny_model(tiny_root / "gpt_oss" / "base", "gpt_oss", seed=90,
                           intermediate_size=64)  # MXFP4 blocks: 32 inputs
    return base, {name: make_peft_adapter(base, tiny_root / "gpt_oss" / name, **spec)
                  for name, spec in ADAPTERS.items()}


@pytest.mark.parametrize("backend,budget", [("torch", None), ("torch", 6), ("triton", 6)])
def test_mixed_batch_matches_peft(backend, budget, gpt_oss, prompts, monkeypatch):
    """The base and four adapters (attention, lm_head, experts) over two slots, prompts
    longer than the window; budget 6: prefilled in chunks that read the cache."""
    monkeypatch.setenv("LORAPLEX_ATTENTION_BACKEND", backend)
    base, adapters = gpt_oss
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=16, block_size=8,
                   max_num_batched_tokens=budget)
    assert llm.llm_engine.model_runner.attn_backend == backend
    assert max(len(p) for p in prompts) > 6
    check_mixed_batch(llm, base, adapters, prompts, extra=3)


def test_checkpoint_layout(gpt_oss):
    """The fused, transposed, interleaved experts land de-interleaved in w13 / b13, the
    router keeps its checkpoint name and bias, each attention its sinks."""
    from safetensors.torch import load_file

    base, _ = gpt_oss
    hf = load_file(str(base / "model.safetensors"))
    layer = make_llm(base).llm_engine.model.model.layers[0]
    experts = layer.mlp.experts
    gate_up = hf["model.layers.0.mlp.experts.gate_up_proj"]  # [E, H, 2I]
    torch.testing.assert_close(experts.w13[1, :64], gate_up[1, :, 0::2].T)
    torch.testing.assert_close(experts.w13[1, 64:], gate_up[1, :, 1::2].T)
    torch.testing.assert_close(experts.b13[2, 64:],
                               hf["model.layers.0.mlp.experts.gate_up_proj_bias"][2, 1::2])
    torch.testing.assert_close(experts.w2[3], hf["model.layers.0.mlp.experts.down_proj"][3].T)
    torch.testing.assert_close(layer.mlp.router.bias, hf["model.layers.0.mlp.router.bias"])
    torch.testing.assert_close(layer.self_attn.sinks, hf["model.layers.0.self_attn.sinks"])
    assert layer.self_attn.o_proj.bias is not None


def test_each_trait_changes_the_output(gpt_oss, prompts, tmp_path):
    """Sinks, the swiglu limit (a tighter one), YaRN and the window each move the greedy
    tokens of the tiny model, so the parity tests above hold each of them to HF."""
    base, _ = gpt_oss
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    job = [{"prompt_token_ids": prompts[-1]}]
    want = make_llm(base).generate(job, params, use_tqdm=False)[0].outputs[0].token_ids

    def rope_default(cfg: dict) -> None:
        key = "rope_parameters" if "rope_parameters" in cfg else "rope_scaling"
        cfg[key] = {"rope_type": "default", "rope_theta": 150000.0}
        cfg.pop("rope_scaling", None) if key == "rope_parameters" else None

    variants = {
        "no sinks": dict(tensors=lambda t: {k: (v.fill_(-1e4) if k.endswith("sinks") else v)
                                            for k, v in t.items()}),
        "tighter clamp": dict(edit=lambda c: c.update(swiglu_limit=0.5)),
        "no yarn": dict(edit=rope_default),
        "no window": dict(edit=lambda c: c.update(sliding_window=None)),
    }
    for name, change in variants.items():
        variant = edited_copy(base, tmp_path / name.replace(" ", "_"), config="config.json",
                              weights="model.safetensors", **change)
        got = make_llm(variant).generate(job, params, use_tqdm=False)[0].outputs[0].token_ids
        assert got != want, name


def test_yarn_matches_hf():
    """YaRN's frequencies and attention factor as HF computes them: truncated or not,
    mscale's ratio, a given attention_factor, a factor derived from the positions."""
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for extra in ({"truncate": True}, {"truncate": False}, {"mscale": 1.0, "mscale_all_dim": 0.5},
                  {"attention_factor": 1.3}):
        scaling = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 150000.0,
                   "original_max_position_embeddings": 128, **extra}
        cfg = GptOssConfig(hidden_size=64, num_attention_heads=4, head_dim=16,
                           max_position_embeddings=512, rope_scaling=dict(scaling),
                           rope_theta=150000.0)
        inv_freq, attention = ROPE_INIT_FUNCTIONS["yarn"](cfg, None)  # (4.x: device)
        rotary = RotaryEmbedding(16, 512, 150000.0, scaling)
        freqs = torch.outer(torch.arange(512, dtype=torch.float32), inv_freq)
        torch.testing.assert_close(rotary.cos, freqs.cos() * attention, atol=1e-6, rtol=0)
        torch.testing.assert_close(rotary.sin, freqs.sin() * attention, atol=1e-6, rtol=0)
        assert attention > 1.0


def test_qwen3_with_yarn_matches_hf(tmp_path, prompts):
    """YaRN as Qwen3's long-context configs set it (truncated correction range)."""
    base = make_tiny_model(tmp_path / "qwen3", "qwen3", seed=95, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128})
    adapter = make_peft_adapter(base, tmp_path / "lora", r=4, seed=96,
                                target_modules=["q_proj", "v_proj"])
    llm = make_llm(base, enable_lora=True, max_lora_rank=8)
    batch = prompts[:2]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY,
                        lora_request=[None, LoRARequest("a", 1, str(adapter))], use_tqdm=False)
    check_against_hf(outs, base, [None, adapter], batch)


def test_quantized_gpt_oss_is_refused(gpt_oss, tmp_path):
    """A quantization other than mxfp4 on gpt-oss fails at start-up, naming the model."""
    base, _ = gpt_oss
    fp8 = edited_copy(base, tmp_path / "fp8", lambda c: c.update(
        quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic"}),
        config="config.json")
    with pytest.raises(ValueError, match=re.escape("fp8-quantized GptOssForCausalLM")):
        make_llm(fp8)


def _mxfp4_pair(base: Path, tmp: Path) -> tuple[Path, Path]:
    """(an MXFP4 copy of `base` as OpenAI ships gpt-oss: the experts' {gate_up,down}_proj
    as _blocks / _scales, quantization_config mxfp4; the same values dequantized, as a
    plain checkpoint HF + PEFT reads)."""
    from loraplex.layers.quantization import mxfp4

    packed: dict[str, torch.Tensor] = {}
    plain: dict[str, torch.Tensor] = {}

    def quantize_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in tensors.items():
            if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                out[name] = t
                continue
            rows = t.transpose(1, 2)  # [E, in, out] -> [E, out, in], as the blocks are
            q, s = zip(*(mxfp4.quantize(w) for w in rows))
            q, s = torch.stack(q), torch.stack(s)
            out[f"{name}_blocks"] = q.view(*q.shape[:2], -1, 16)
            out[f"{name}_scales"] = s
            packed[name] = q
            plain[name] = torch.stack([mxfp4.dequantize(a, b, torch.float32)
                                       for a, b in zip(q, s)]).transpose(1, 2).contiguous()
        return out

    quantized = edited_copy(base, tmp / "mxfp4", lambda c: c.update(quantization_config={
        "quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
            "lm_head"]}), tensors=quantize_experts, config="config.json",
        weights="model.safetensors")
    dequantized = edited_copy(base, tmp / "dequantized", tensors=lambda t: {**t, **plain},
                              weights="model.safetensors")
    return quantized, dequantized


def test_mxfp4_experts_match_hf(gpt_oss, tmp_path, prompts):
    """gpt-oss as OpenAI ships it: MXFP4 experts, kept packed (a byte per two inputs);
    greedy tokens and logprobs equal HF + PEFT on the same values dequantized, with
    attention and expert adapters in the batch. transformers' own MXFP4 dequantizer reads
    our files as we do."""
    from safetensors.torch import load_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    base, adapters = gpt_oss
    quantized, dequantized = _mxfp4_pair(base, tmp_path)
    files = load_file(str(quantized / "model.safetensors"))
    hf_view = convert_moe_packed_tensors(files["model.layers.1.mlp.experts.down_proj_blocks"],
                                         files["model.layers.1.mlp.experts.down_proj_scales"],
                                         dtype=torch.float32)
    torch.testing.assert_close(hf_view, load_file(str(dequantized / "model.safetensors"))[
        "model.layers.1.mlp.experts.down_proj"], rtol=0, atol=0)

    names = [None, "r6_experts", "r8_all"]
    outs = {}
    for path in (quantized, dequantized):
        llm = make_llm(path, enable_lora=True, max_loras=2, max_lora_rank=16)
        outs[path] = llm.generate(
            [{"prompt_token_ids": p} for p in prompts[:3]], GREEDY, use_tqdm=False,
            lora_request=[LoRARequest(n, i + 1, str(adapters[n])) if n else None
                          for i, n in enumerate(names)])
    experts = llm.llm_engine.model.model.layers[0].mlp.experts.base_layer
    assert experts.w13.dtype == torch.float32
    experts = make_llm(quantized).llm_engine.model.model.layers[0].mlp.experts
    assert experts.w13.dtype == torch.uint8 and experts.w13.shape == (4, 128, 32)
    for packed, plain in zip(outs[quantized], outs[dequantized], strict=True):
        assert packed.outputs[0].token_ids == plain.outputs[0].token_ids
        for a, b in zip(packed.outputs[0].logprobs, plain.outputs[0].logprobs, strict=True):
            assert all(abs(a[t].logprob - b[t].logprob) < 1e-5 for t in b)
    # (this batch of three moves one fp32 logprob 1.1e-4 off HF's, on the plain weights
    # too: the check that packed = plain above is the tight one)
    check_against_hf(outs[quantized], dequantized, [adapters[n] if n else None for n in names],
                     prompts[:3], atol=2.5e-4)


def test_mxfp4_dummy_weights(gpt_oss, tmp_path, prompts):
    """load_format="dummy" (benchmarks of gpt-oss without its 13 GB): random MXFP4 experts
    and biases, finite logprobs."""
    quantized, _ = _mxfp4_pair(gpt_oss[0], tmp_path)
    llm = make_llm(quantized, load_format="dummy")
    experts = llm.llm_engine.model.model.layers[0].mlp.experts
    for bias in (experts.b13, experts.b2):  # filled, small (not torch.empty's leftovers)
        assert bias.std() > 0 and bias.abs().max() < 1
    out = llm.generate([{"prompt_token_ids": prompts[0]}], GREEDY, use_tqdm=False)[0]
    assert all(torch.isfinite(torch.tensor(lp.logprob)) for step in out.outputs[0].logprobs
               for lp in step.values())


def test_bad_mxfp4_checkpoints_are_refused(gpt_oss, tmp_path):
    """A missing scale, blocks of the wrong shape, MXFP4 on a model without gpt-oss's
    experts: each a start-up error that names it."""
    base, _ = gpt_oss
    quantized, _ = _mxfp4_pair(base, tmp_path)
    cases = {
        "lacks model": (lambda t: {k: v for k, v in t.items()
                                   if k != "model.layers.0.mlp.experts.down_proj_scales"},
                        "the checkpoint lacks down_proj_scales"),
        "shape": (lambda t: {**t, "model.layers.0.mlp.experts.down_proj_blocks":
                             t["model.layers.0.mlp.experts.down_proj_blocks"][:, :, :1]
                             .contiguous()},
                  "mxfp4 experts down_proj_blocks has shape (4, 64, 16)"),
    }
    for i, (edit, message) in enumerate(cases.values()):
        bad = edited_copy(quantized, tmp_path / f"bad{i}", tensors=edit,
                          weights="model.safetensors")
        with pytest.raises(ValueError, match=re.escape(message)):
            make_llm(bad)
    llama = make_tiny_model(tmp_path / "llama", "llama", seed=97)
    bad = edited_copy(llama, tmp_path / "llama_mxfp4", lambda c: c.update(
        quantization_config={"quant_method": "mxfp4"}), config="config.json")
    with pytest.raises(ValueError, match="mxfp4-quantized LlamaForCausalLM"):
        make_llm(bad)
