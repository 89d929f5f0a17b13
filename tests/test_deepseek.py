"""DeepSeek-V3 and DeepSeek-V2 (layers/mla.py, models/deepseek.py) against HF transformers
+ PEFT (fp32), a mixed batch of the base and two adapters over one slot, prompts prefilled
whole and in chunks:

- V3: q through q_a_proj -> q_a_layernorm -> q_b_proj, YaRN (its mscale^2 on the softmax
  scale), rotary on interleaved pairs, grouped sigmoid routing (4 groups of 2, 2
  eligible) with a non-zero correction bias and a scaling, a shared expert, a dense first
  layer; K and V head dims that differ (the cache holds the latent: tests/test_mla_cache.py);
- V2 (V2-Lite's layout): one q_proj, softmax routing limited to the best group, a
  scaling, a shared expert, a dense first layer;
- GLM-4.7-Flash (Glm4MoeLiteForCausalLM): V3's attention and routing, its dense layer
  named by mlp_layer_types (the middle one here).

Adapters of different ranks on every attention projection and on the experts (as PEFT
makes them on transformers 5); on the dense layer's MLP and the shared experts (which
PEFT 0.21 on transformers 5 turns into the experts' parameters, so the adapter is
written by hand and checked against HF with those deltas merged into the weights); and
per expert, as transformers 4 saves it (checked the same way).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import tests.test_attention  # noqa: F401  (on the CPU: Triton under the interpreter)
from loraplex.layers.mla import mla_softmax_scale
from loraplex.models.registry import build_model
from tests.engine_utils import GREEDY, check_against_hf, check_mixed_batch, lora_requests, make_llm
from tests.expert_adapters import check_merged_adapter, per_expert_adapter
from tests.fixtures import _reinit_, make_peft_adapter, make_tokenizer

if not hasattr(transformers, "DeepseekV3Config"):
    pytest.skip(f"this transformers ({transformers.__version__}) has no DeepSeek-V3",
                allow_module_level=True)

_COMMON = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
               n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
               first_k_dense_replace=1, kv_lora_rank=24, qk_nope_head_dim=16,
               qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=512,
               rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=3)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        "rope_theta": 10000.0}
CONFIGS: dict[str, dict[str, Any]] = {
    "v3": dict(q_lora_rank=32, n_group=4, topk_group=2, routed_scaling_factor=2.5,
               norm_topk_prob=True, rope_scaling=YARN),
    # one group of 4 eligible: top-2 of all 8 would often differ (with 2 of 4 groups
    # eligible and top-2 they never could)
    "v2": dict(q_lora_rank=None, n_group=2, topk_group=1, topk_method="group_limited_greedy",
               routed_scaling_factor=1.5, norm_topk_prob=False),
    # GLM-4.7-Flash: V3's attention and routing; its dense layers by mlp_layer_types (one
    # after a sparse one here, which first_k_dense_replace could not say)
    "glm_lite": dict(q_lora_rank=32, n_group=4, topk_group=2, routed_scaling_factor=1.8,
                     norm_topk_prob=True, rope_scaling=YARN,
                     mlp_layer_types=["sparse", "dense", "sparse"]),
}
CONFIG_CLASSES = {"v3": "DeepseekV3Config", "v2": "DeepseekV2Config",
                  "glm_lite": "Glm4MoeLiteConfig"}
ATTENTION = {"v3": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
             "v2": ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]}
ATTENTION["glm_lite"] = ATTENTION["v3"]
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
MLP_MODULES = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
               "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj",
               "mlp.shared_experts.down_proj")


def _config(version: str, vocab: int, **overrides: Any) -> Any:
    if not hasattr(transformers, CONFIG_CLASSES[version]):
        pytest.skip(f"this transformers ({transformers.__version__}) has no {version}")
    common = dict(_COMMON)
    if version == "glm_lite":  # (its layers' kinds come from mlp_layer_types)
        del common["first_k_dense_replace"]
    cls = getattr(transformers, CONFIG_CLASSES[version])
    return cls(vocab_size=vocab, **common, **{**CONFIGS[version], **overrides})


def make_deepseek(out: Path, version: str, seed: int, **overrides: Any) -> Path:
    """A tiny random DeepSeek checkpoint; V3's correction bias non-zero (it changes
    which experts are chosen)."""
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(version, len(tok), **overrides),
                                             dtype=torch.float32)
    _reinit_(model, seed, 0.2)
    if version != "v2":
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for layer in model.model.layers:
                if hasattr(layer.mlp, "experts"):
                    bias = layer.mlp.gate.e_score_correction_bias
                    bias.copy_(0.3 * torch.randn(bias.shape, generator=gen))
    model.eval().save_pretrained(str(out))
    return out


def mlp_adapter(base: Path, out: Path, ref_base: Path, seed: int, r: int = 4) -> Path:
    """A PEFT adapter on o_proj plus, written by hand, LoRA on the dense layer's MLP and
    every shared expert (rank r, alpha 2r); `ref_base`: the base with those deltas merged
    (the reference for this adapter together with its PEFT part, `out`.peft)."""
    peft_dir = make_peft_adapter(base, out.with_suffix(".peft"), r=r, lora_alpha=2 * r,
                                 target_modules=["o_proj"], seed=seed)
    gen = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    tensors = load_file(str(peft_dir / "adapter_model.safetensors"))
    with torch.no_grad():
        for name, module in model.named_modules():
            if not (name.endswith(MLP_MODULES) and isinstance(module, torch.nn.Linear)):
                continue
            a = 0.3 * torch.randn(r, module.in_features, generator=gen)
            b = 0.3 * torch.randn(module.out_features, r, generator=gen)
            module.weight += b @ a * 2.0  # alpha / r
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
    model.save_pretrained(str(ref_base))
    make_tokenizer(ref_base)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    cfg["target_modules"] = ["o_proj", "gate_proj", "up_proj", "down_proj"]
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def deepseek(tiny_root: Path) -> dict[str, tuple[Path, dict[str, Path]]]:
    """version -> (base, {adapter name -> dir}), built on first use."""
    class Lazy(dict):
        def __missing__(self, version: str) -> tuple[Path, dict[str, Path]]:
            root = tiny_root / "deepseek"
            seed = {"v3": 90, "v2": 95, "glm_lite": 85}[version]
            base = make_deepseek(root / version, version, seed)
            specs = {"r4_attn": dict(r=4, lora_alpha=8, target_modules=ATTENTION[version]),
                     "r8_experts": dict(r=8, lora_alpha=16, target_modules=["kv_b_proj"],
                                        target_parameters=EXPERTS)}
            self[version] = (base, {name: make_peft_adapter(
                base, root / f"{version}_{name}", seed=seed + i, **spec)
                for i, (name, spec) in enumerate(specs.items())})
            return self[version]
    return Lazy()


@pytest.mark.parametrize("budget", [None, 6])
@pytest.mark.parametrize("version", ["v3", "v2", "glm_lite"])
def test_mixed_batch_matches_peft(version, budget, deepseek, prompts):
    base, adapters = deepseek[version]
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8,
                   **({"enable_chunked_prefill": True, "max_num_batched_tokens": budget}
                      if budget else {}))
    check_mixed_batch(llm, base, adapters, prompts, extra=2)


@pytest.mark.parametrize("version", ["v3", "v2"])
def test_dense_and_shared_mlp_lora(version, deepseek, prompts, tiny_root):
    """LoRA on the dense layer's MLP and the shared experts, beside the base and another
    adapter over one slot: each row as HF computes it (this adapter: its merged base)."""
    base, adapters = deepseek[version]
    root = tiny_root / "deepseek"
    ref_base = root / f"{version}_mlp_merged"
    adapter = mlp_adapter(base, root / f"{version}_mlp", ref_base, seed=7)
    reqs = lora_requests({"mlp": adapter, "r4_attn": adapters["r4_attn"]})
    batch = [(None, prompts[0]), ("mlp", prompts[0]), ("r4_attn", prompts[1]),
             ("mlp", prompts[2])]
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8,
                   enable_chunked_prefill=True, max_num_batched_tokens=6)
    outs = llm.generate([{"prompt_token_ids": p} for _, p in batch], GREEDY,
                        lora_request=[reqs[n] if n else None for n, _ in batch],
                        use_tqdm=False)
    for out, (name, prompt) in zip(outs, batch, strict=True):
        ref = (ref_base, adapter.with_suffix(".peft")) if name == "mlp" else \
            (base, adapters[name] if name else None)
        check_against_hf([out], ref[0], [ref[1]], [prompt])
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids


@pytest.mark.parametrize("version", ["v3", "v2"])
def test_per_expert_adapter(version, deepseek, prompts, tmp_path):
    """An adapter saved per expert (transformers 4's layout, vLLM's; the checkpoint has a
    module per expert, as DeepSeek's ship and transformers 5 saves them) serves beside the
    base and another adapter over one slot: as HF computes the base with its deltas
    merged."""
    base, adapters = deepseek[version]
    ref = tmp_path / "merged"
    adapter = per_expert_adapter(base, tmp_path / "per_expert", ref)
    check_merged_adapter(base, ref, adapter, ("r4_attn", adapters["r4_attn"]), prompts)


@pytest.mark.parametrize("budget", [None, 6])
def test_v3_with_triton_attention(monkeypatch, budget, deepseek, prompts):
    """MLA through the Triton kernels (under the interpreter on the CPU): the latent as one
    KV head that is also V, prefill, chunks over cached context, decode."""
    monkeypatch.setenv("LORAPLEX_ATTENTION_BACKEND", "triton")
    base, adapters = deepseek["v3"]
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8, block_size=8,
                   max_num_batched_tokens=budget)
    assert llm.llm_engine.model_runner.attn_backend == "triton"
    check_mixed_batch(llm, base, adapters, prompts, extra=1)


def test_v3_rotary_on_halves_without_yarn(tiny_root, prompts):
    """rope_interleave=False (halves rotate together) and a plain rope (no mscale), with
    only one group of experts (Kimi-K2's n_group=1): the base as HF computes it."""
    base = make_deepseek(tiny_root / "deepseek" / "v3_halves", "v3", 97, rope_interleave=False,
                         rope_scaling=None, n_group=1, topk_group=1)
    llm = make_llm(base)
    assert not llm.llm_engine.model_runner.model.args.rope_interleaved
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:3]], GREEDY,
                        use_tqdm=False)
    check_against_hf(outs, base, [None] * 3, prompts[:3])


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                    reason="transformers 4's DeepSeek-V2 gives its experts biases with "
                    "mlp_bias (5's does not; no released config sets it)")
def test_v2_biases_and_greedy_routing(tiny_root, prompts):
    """V2 with attention_bias (q_a_proj, kv_a_proj_with_mqa, o_proj), mlp_bias (every MLP,
    the shared experts' too), q through q_a_proj / q_b_proj and "greedy" routing: the
    base as HF computes it."""
    base = make_deepseek(tiny_root / "deepseek" / "v2_biases", "v2", 98, attention_bias=True,
                         mlp_bias=True, q_lora_rank=32, topk_method="greedy")
    llm = make_llm(base)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:3]], GREEDY,
                        use_tqdm=False)
    check_against_hf(outs, base, [None] * 3, prompts[:3])


def _hf_config(version: str, **overrides: Any) -> Any:
    config = _config(version, 64)
    for k, v in overrides.items():
        setattr(config, k, v)
    config.architectures = [f"Deepseek{version.upper()}ForCausalLM"]
    return config


def test_config_flags():
    """What the registry reads: MLA's dims and YaRN-scaled softmax scale, interleaved
    rotary, the routing per version, the dense layers (first_k_dense_replace and
    moe_layer_freq), model_type alone naming the architecture."""
    args = build_model(_hf_config("v3")).args
    mla = args.mla
    assert (mla.q_lora_rank, mla.qk_head_dim, mla.v_head_dim) == (32, 24, 12)
    assert args.head_dim == 24 and args.num_kv_heads == 4 and args.rotary_dim == 8
    assert args.rope_interleaved and args.grouped_topk.scoring == "sigmoid"
    assert mla.scale == pytest.approx(24 ** -0.5 * (0.1 * torch.log(torch.tensor(4.0)).item()
                                                    + 1) ** 2)
    assert mla_softmax_scale(24, None) == 24 ** -0.5
    assert not build_model(_hf_config("v3", rope_interleave=False)).args.rope_interleaved
    v2 = build_model(_hf_config("v2", moe_layer_freq=2, num_hidden_layers=5)).args
    assert v2.mla.q_lora_rank is None and v2.rope_interleaved
    assert v2.dense_layers == (0, 1, 3) and v2.grouped_topk.scoring == "softmax"
    assert (v2.grouped_topk.num_groups, v2.grouped_topk.topk_groups) == (2, 1)
    greedy = build_model(_hf_config("v2", topk_method="greedy")).args.grouped_topk
    assert (greedy.num_groups, greedy.topk_groups) == (1, 1)
    config = _hf_config("v2")
    config.architectures = None
    assert build_model(config).args.mla is not None


@pytest.mark.parametrize("edit,match", [
    (dict(norm_topk_prob=True), "norm_topk_prob"),
    (dict(topk_method="noaux_tc"), "topk_method"),
])
def test_v2_refuses_what_hf_does_not_define(edit, match):
    with pytest.raises(ValueError, match=match):
        build_model(_hf_config("v2", **edit))
