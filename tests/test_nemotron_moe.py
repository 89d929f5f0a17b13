"""Nemotron-H's mixture-of-experts layers (models/nemotron_h_moe.py; NVIDIA-Nemotron-3-Nano)
against HF transformers 5 + PEFT (fp32).

A tiny random model, hidden 64, layers "ME*E": a Mamba2 mixer, a MoE, attention without
positions, a MoE; each MoE 8 ungated squared-ReLU experts of 48 in 2 groups (the best
group eligible), 2 per token, a correction bias, weights renormalized and scaled by 1.5,
shared experts of 32. The hub's layout (experts.{e}.up_proj / down_proj, as transformers 5
saves) and transformers 5's fused one (experts.up_proj [E, I, H], down_proj [E, H, I]).
Adapters: rank 4 on the mixers' in_proj and q / v; rank 8 on every linear (the shared
experts too) and the experts (target_parameters); one per expert (experts.{e}.up_proj ...,
written directly: transformers 5 has no such modules), checked on the merged weights.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from loraplex import LoRARequest, SamplingParams
from loraplex.lora.errors import LoRAError
from loraplex.lora.experts import ExpertsWithLoRA
from loraplex.models.registry import build_model
from tests.engine_utils import check_against_hf, check_mixed_batch, lora_requests, make_llm
from tests.fixtures import _reinit_, make_peft_adapter, make_tokenizer
from tests.handmade_lora import merged_checkpoint, write_lora_adapter
from tests.test_hybrid import check_preemption

pytestmark = pytest.mark.skipif(
    not hasattr(transformers, "NemotronHConfig")
    or not hasattr(transformers.NemotronHConfig(), "n_routed_experts"),
    reason=f"transformers {transformers.__version__} has no NemotronH with experts")

EXPERTS, SIZE, HIDDEN = 8, 48, 64


def nemotron_moe_config(vocab_size: int, latent: int | None = None):
    return transformers.NemotronHConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=96,
        layers_block_type=["linear_attention", "moe", "full_attention", "moe"],
        mamba_num_heads=4, mamba_head_dim=32, ssm_state_size=16, n_groups=2, conv_kernel=4,
        expand=2, chunk_size=8, tie_word_embeddings=False, n_routed_experts=EXPERTS,
        num_experts_per_tok=2, moe_intermediate_size=SIZE,
        moe_shared_expert_intermediate_size=32, n_group=2, topk_group=1,
        routed_scaling_factor=1.5, norm_topk_prob=True, moe_latent_size=latent)


def make_model(out: Path, seed: int, latent: int | None = None) -> Path:
    """Saved as transformers 5 saves it: per expert, under backbone."""
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(nemotron_moe_config(len(tok), latent),
                                             dtype=torch.float32)
    _reinit_(model, seed, 0.2)
    gen = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():  # a correction bias that changes the choice
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))
    model.eval().save_pretrained(str(out))
    return out


def fused_copy(base: Path, out: Path) -> Path:
    """The checkpoint with each layer's experts fused, up_proj [E, I, H] and down_proj
    [E, H, I], under model. (what transformers 5 holds; it loads these as they are)."""
    out.mkdir(parents=True)
    for f in base.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(base / "model.safetensors"))
    fused: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        if ".experts." not in name:
            fused[name.replace("backbone.", "model.", 1)] = tensors[name]
            continue
        layer, _, rest = name.partition(".experts.")
        leaf = rest.split(".")[1]
        key = f"{layer.replace('backbone.', 'model.', 1)}.experts.{leaf}"
        if key not in fused:
            fused[key] = torch.stack([tensors[f"{layer}.experts.{e}.{leaf}.weight"]
                                      for e in range(EXPERTS)])
    save_file(fused, str(out / "model.safetensors"))
    return out


@pytest.fixture(scope="module")
def nemotron_moe(tiny_root: Path) -> tuple[Path, dict[str, Path]]:
    root = tiny_root / "nemotron_moe"
    base = make_model(root / "base", 140)
    specs = {"r4_mixer": dict(r=4, lora_alpha=8, target_modules=["in_proj", "q_proj", "v_proj"],
                              seed=141),
             "r8_experts": dict(r=8, lora_alpha=16, seed=142,
                                target_modules=["in_proj", "q_proj", "k_proj", "v_proj",
                                                "o_proj", "up_proj", "down_proj"],
                                target_parameters=["experts.up_proj", "experts.down_proj"])}
    return base, {n: make_peft_adapter(base, root / n, **s) for n, s in specs.items()}


def test_mixed_batch_in_chunks(nemotron_moe, prompts):
    """The base and both adapters (one on the experts) in one batch, prompts prefilled in
    chunks of 7 beside other sequences' decodes: HF + PEFT's tokens and logprobs."""
    base, adapters = nemotron_moe
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=8, block_size=8,
                   max_num_batched_tokens=7)
    layers = llm.llm_engine.model.model.layers
    assert [layer.kind for layer in layers] == ["mamba", "moe", "attention", "moe"]
    experts = layers[1].mixer.experts
    assert isinstance(experts, ExpertsWithLoRA)
    assert experts.base_layer.w13.shape == (EXPERTS, SIZE, HIDDEN)
    check_mixed_batch(llm, base, adapters, prompts, extra=3)
    runner = llm.llm_engine.model_runner
    assert runner.num_mixed_steps > 0 and len(runner.attention_layers) == 1


def test_preemption_recomputes_the_state(nemotron_moe, prompts):
    """10 KV blocks of 8 for 5 requests: preempted sequences recompute their state."""
    base, adapters = nemotron_moe
    check_preemption(base, adapters, [None, "r8_experts", "r4_mixer", None, "r8_experts"],
                     prompts, shift=1)


def _per_expert_adapter(base: Path, out: Path, r: int, seed: int) -> Path:
    """LoRA on every expert's up_proj and down_proj, a module each (vLLM's layout)."""
    modules = [(f"backbone.layers.{layer}.mixer.experts.{e}.{leaf}", d_in, d_out)
               for layer in (1, 3) for e in range(EXPERTS)
               for leaf, (d_in, d_out) in (("up_proj", (HIDDEN, SIZE)),
                                           ("down_proj", (SIZE, HIDDEN)))]
    return write_lora_adapter(out, modules, r, seed, ["up_proj", "down_proj"], base)


def test_fused_checkpoint_and_per_expert_adapter(nemotron_moe, tmp_path, prompts):
    """transformers 5's fused experts load as the hub's per-expert ones do; an adapter per
    expert serves beside the base and a target_parameters one: it matches HF on the merged
    weights, the others HF + PEFT."""
    base, adapters = nemotron_moe
    fused = fused_copy(base, tmp_path / "fused")
    per_expert = _per_expert_adapter(base, tmp_path / "per_expert", r=4, seed=143)
    paths = {"per_expert": per_expert, "r8_experts": adapters["r8_experts"]}
    reqs = lora_requests(paths)
    llm = make_llm(fused, enable_lora=True, max_loras=2, max_lora_rank=8)
    batch = [(prompts[0], None), (prompts[0], "per_expert"), (prompts[1], "r8_experts"),
             (prompts[2], "per_expert")]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in batch], params,
                        lora_request=[reqs[n] if n else None for _, n in batch],
                        use_tqdm=False)
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids
    merged = merged_checkpoint(base, per_expert, tmp_path / "merged")
    check_against_hf([outs[1], outs[3]], merged, [None, None], [prompts[0], prompts[2]])
    check_against_hf([outs[0], outs[2]], base, [None, adapters["r8_experts"]],
                     [prompts[0], prompts[1]])


def test_latent_projection(tiny_root, prompts):
    """moe_latent_size: the experts run in a latent of 32 between fc1_latent_proj and
    fc2_latent_proj (the router and the shared experts on the hidden state); an adapter on
    both projections and the experts beside the base, in chunks of 9."""
    root = tiny_root / "nemotron_moe_latent"
    base = make_model(root / "base", 150, latent=32)
    adapters = {"r4_latent": make_peft_adapter(
        base, root / "r4_latent", r=4, lora_alpha=8, seed=151,
        target_modules=["fc1_latent_proj", "fc2_latent_proj"],
        target_parameters=["experts.up_proj", "experts.down_proj"])}
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=4, block_size=8,
                   max_num_batched_tokens=9)
    mixer = llm.llm_engine.model.model.layers[1].mixer
    assert mixer.experts.base_layer.w13.shape == (EXPERTS, SIZE, 32)
    assert hasattr(mixer.fc1_latent_proj, "base_layer")  # wrapped for LoRA
    check_mixed_batch(llm, base, adapters, prompts, extra=1)


def test_bad_expert_adapters_fail_alone(nemotron_moe, tmp_path, prompts):
    """A LoRA on a gate these experts lack, or on an expert past the 8, fails alone with a
    message naming it; the engine serves a good adapter after them."""
    base, adapters = nemotron_moe
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8)
    cases = {".experts.5.gate_proj.": "a LoRA on a gate projection, which these experts do "
                                      "not have",
             ".experts.9.up_proj.": "is past the model's 8 experts"}
    for i, (edit, message) in enumerate(cases.items()):
        path = _per_expert_adapter(base, tmp_path / f"bad{i}", r=4, seed=144 + i)
        tensors = load_file(str(path / "adapter_model.safetensors"))
        save_file({k.replace(".experts.5.up_proj.", edit): v for k, v in tensors.items()},
                  str(path / "adapter_model.safetensors"))
        with pytest.raises(LoRAError, match=re.escape(message)):
            llm.llm_engine.add_lora(LoRARequest(f"bad{i}", 10 + i, str(path)))
    ok = llm.generate([{"prompt_token_ids": prompts[1]}], SamplingParams(max_tokens=3),
                      lora_request=LoRARequest("ok", 1, str(adapters["r8_experts"])),
                      use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 3


def test_other_shared_expert_counts_refused():
    """n_shared_experts other than 1 (where transformers and vLLM build different shared
    MLPs) is refused by name at start-up."""
    cfg = nemotron_moe_config(64)
    cfg.n_shared_experts, cfg.architectures = 2, ["NemotronHForCausalLM"]
    with pytest.raises(ValueError, match=r"n_shared_experts=2 is not supported"):
        build_model(cfg)
