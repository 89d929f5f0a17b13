"""More Llama-family architectures against HF transformers + PEFT (fp32), each a mixed
batch of the base and two adapters over one slot, prompts prefilled whole and in chunks:

- Llama with its optional biases (attention_bias, mlp_bias: q/k/v/o and the MLP's);
- SmolLM3: layers without rotary positions (NoPE, its no_rope_layers);
- EXAONE 4: norms after the sublayers (OLMo 2's layout), q/k norm per head, a local
  layer (window, rotary) and a global one (NoPE);
- Seed-OSS: biases on q/k/v, o and the MLP, each its own flag;
- Ministral: local and global layers by layer_types;
- Ernie 4.5: rotary on interleaved pairs (2i, 2i + 1), biases everywhere;
- GLM-4 (GLM's and GLM-4-0414's): gate_up_proj fused in the checkpoint (and in adapters:
  one LoRA A), q/k/v biases, half of each head rotated on interleaved pairs; GLM-4-0414's
  norms on each sublayer's input and output, under its own names;
- Hunyuan (dense): q/k norm after the rotation (its query_layernorm / key_layernorm),
  "dynamic" rope with a fixed alpha (a stretched base), q/k/v/o biases.
- Arcee and Nemotron: an MLP without a gate (up, squared ReLU, down), biases; Nemotron's
  LayerNorm with its weight stored as w - 1, and half of each head rotated;
- StarCoder2: an ungated GELU MLP under its own names (c_fc, c_proj: adapters target
  those), LayerNorm with biases, a sliding window;
- GLM-4.5 (MoE): experts routed by grouped sigmoid scores with a correction bias and a
  scaling, an ungated shared expert, a dense first layer, q/k norm, partial rotary; LoRA on
  the experts too;
- Cohere (Command R): attention and MLP side by side on one normed input, LayerNorm
  without bias, q/k norm with a weight per head, rotary on interleaved pairs, logits
  scaled; Cohere 2: its local layers rotated, the global one NoPE;
- OLMo 3: OLMo 2's norms after the sublayers and q/k norm over all heads, a local layer
  (window) and a global one, YaRN on the global one only (each layer type's own rope);
- OLMoE: q/k norm over all heads, experts (top-2 of 4, weights not renormalized) in every
  layer; LoRA on the experts too;
- MiniMax-M2: experts chosen by sigmoid scores plus a correction bias (kept beside the
  router in its checkpoints), weighted by the unbiased scores renormalized; q/k norm
  over all heads, partial rotary;
- ERNIE 4.5 (MoE): experts chosen by softmax scores plus a correction bias (kept in
  moe_statics in its checkpoints, [1, E]), weighted by the softmax scores renormalized, a
  shared expert, a dense first layer, rotary on interleaved pairs; LoRA on the experts
  too; and with use_bias (biases on q/k/v/o, the dense and shared MLPs and lm_head, none
  on the experts; adapters that add tokens refused, as on Phi);
- Hunyuan-A13B (MoE): Hunyuan's attention (above), experts routed by softmax scores (top-k
  renormalized, the router under its name `wg`), a shared MLP beside them in every
  layer; LoRA on the experts and the shared MLP too;
- dots.llm1: Qwen3's attention with q/k/v/o biases and a local (window) layer, GLM-4.5's
  grouped sigmoid routing, shared expert and dense first layer; LoRA on the experts too;
- Apertus: an ungated MLP with xIELU (its learned parameters per layer), q/k norm, Llama 3
  rope scaling, biases (transformers 4.x's reference computes xIELU in bf16: skipped);
- Phi-1.5 / Phi-2: attention and an fc1 / fc2 GELU MLP side by side on one LayerNorm,
  partial rotary, q/k LayerNorm (or none), biases everywhere, lm_head's too; adapters on
  its attention output `dense`;
- StableLM 2: LayerNorm, partial rotary, q/k/v biases; sequential, or parallel, with a
  LayerNorm per head on q and k (StableLM 2 12B's; transformers 5 only) or not;
- GPT-NeoX: q/k/v fused per head, parallel residual on two LayerNorms or sequential,
  partial rotary; adapters under its names (query_key_value, embed_in, embed_out ...);
- OLMo 1: LayerNorm without parameters, q/k/v clamped (clip_qkv), biases;
- Helium: rotary on interleaved pairs, q/k/v and MLP biases;
- Phi-3.5-MoE: experts routed by its sparsemixer (a jitter eps that masks), LayerNorm,
  LongRoPE scaled by its config's mscale, q/k/v/o and lm_head biases; LoRA on the experts.

A transformers without the architecture (the floors job's, for some) skips it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from loraplex.lora.errors import LoRAError
from loraplex.lora.request import LoRARequest
from tests.engine_utils import GREEDY, check_mixed_batch, make_llm
from tests.fixtures import (
    edited_copy,
    make_added_tokens_adapter,
    make_peft_adapter,
    make_tiny_model,
)

ARCHS = {"llama_bias": "LlamaConfig", "smollm3": "SmolLM3Config",
         "exaone4": "Exaone4Config", "seed_oss": "SeedOssConfig",
         "ministral": "MinistralConfig", "ernie4_5": "Ernie4_5Config",
         "glm": "GlmConfig", "glm4": "Glm4Config", "hunyuan": "HunYuanDenseV1Config",
         "arcee": "ArceeConfig", "nemotron": "NemotronConfig",
         "starcoder2": "Starcoder2Config", "cohere": "CohereConfig",
         "cohere2": "Cohere2Config", "glm4_moe": "Glm4MoeConfig", "olmo3": "Olmo3Config",
         "olmoe": "OlmoeConfig", "minimax_m2": "MiniMaxM2Config",
         "ernie4_5_moe": "Ernie4_5_MoeConfig", "hunyuan_moe": "HunYuanMoEV1Config",
         "dots1": "Dots1Config", "apertus": "ApertusConfig", "phi": "PhiConfig",
         "phi2": "PhiConfig", "stablelm": "StableLmConfig",
         "stablelm_parallel": "StableLmConfig", "stablelm_qk": "StableLmConfig",
         "olmo": "OlmoConfig",
         "helium": "HeliumConfig", "gpt_neox": "GPTNeoXConfig",
         "gpt_neox_sequential": "GPTNeoXConfig", "phimoe": "PhimoeConfig",
         "ernie4_5_moe_bias": "Ernie4_5_MoeConfig"}
# entries that are another's fixture with config overrides: (its fixture, the overrides)
VARIANTS = {"ernie4_5_moe_bias": ("ernie4_5_moe", {"use_bias": True})}
ADAPTERS = {
    "r4_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "r8_all": dict(r=8, lora_alpha=16, target_modules="all-linear"),
}
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
GLM4_MOE_ADAPTERS = {  # the experts, at 2r on gate_up (PEFT 0.21 on transformers 5 turns
    # gate/up/down_proj, by list or regex, into the experts' parameters, and leaves the
    # dense layer's and the shared expert's MLPs out; those are Qwen2-MoE's, tested there)
    "r4_qv": ADAPTERS["r4_qv"],
    "r8_mlp": dict(r=8, lora_alpha=16,
                   target_modules=["k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "r6_experts": dict(r=6, lora_alpha=12, target_modules=["q_proj"],
                       target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    if TRANSFORMERS_5 else dict(r=6, lora_alpha=12, target_modules=["q_proj", "down_proj"]),
}
GLM_ADAPTERS = {  # its fused gate_up_proj too
    "r4_qv": ADAPTERS["r4_qv"],
    "r8_mlp": dict(r=8, lora_alpha=16, target_modules=["k_proj", "gate_up_proj", "down_proj"]),
}


NEOX_ADAPTERS = {  # its own names: the fused q/k/v, the MLP's, the embeddings and lm_head
    "r4_qkv": dict(r=4, lora_alpha=8, target_modules=["query_key_value", "dense_4h_to_h",
                                                       "embed_in", "embed_out"]),
    "r8_all": ADAPTERS["r8_all"],
}


PHIMOE_ADAPTERS = {  # the experts too: transformers 5's fused ones through
    # target_parameters, 4.x's per-expert w1 / w3 / w2 and its router (gate)
    "r4_qv": ADAPTERS["r4_qv"],
    "r6_experts": dict(r=6, lora_alpha=12, target_modules=["k_proj", "o_proj"],
                       target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    if TRANSFORMERS_5 else dict(r=6, lora_alpha=12,
                                target_modules=["k_proj", "o_proj", "w1", "w3", "w2", "gate"]),
}


MOE_ARCHS = ("glm4_moe", "olmoe", "minimax_m2", "ernie4_5_moe", "hunyuan_moe", "dots1",
             "phimoe", "ernie4_5_moe_bias")


def _adapters(arch: str) -> dict[str, dict]:
    if arch == "phimoe":
        return PHIMOE_ADAPTERS
    if arch in MOE_ARCHS:
        return GLM4_MOE_ADAPTERS
    if arch.startswith("gpt_neox"):
        return NEOX_ADAPTERS
    return GLM_ADAPTERS if arch.startswith("glm") else ADAPTERS


@pytest.fixture(scope="module")
def models(tiny_root: Path) -> dict[str, tuple[Path, dict[str, Path]]]:
    class Lazy(dict):
        def __missing__(self, arch: str) -> tuple[Path, dict[str, Path]]:
            if not hasattr(transformers, ARCHS[arch]):
                pytest.skip(f"this transformers ({transformers.__version__}) has no {arch}")
            if arch == "ernie4_5_moe_bias" and not TRANSFORMERS_5:
                pytest.skip("transformers 4.x puts use_bias's biases on ERNIE 4.5 MoE's "
                            "experts too (5.x and vLLM do not): test_ernie_moe_biased_experts")
            root = tiny_root / "more_archs"
            seed = 80 + list(ARCHS).index(arch)
            kind, overrides = VARIANTS.get(arch, (arch, {}))
            base = make_tiny_model(root / arch, kind, seed=seed, **overrides)
            self[arch] = (base, {name: make_peft_adapter(base, root / f"{arch}_{name}",
                                                         seed=seed + i, **spec)
                                 for i, (name, spec) in enumerate(
                                     _adapters(arch).items())})
            return self[arch]
    return Lazy()


@pytest.mark.parametrize("budget", [None, 6])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_mixed_batch_matches_peft(arch, budget, models, prompts):
    if arch == "apertus" and not TRANSFORMERS_5:
        pytest.skip("transformers 4.x builds Apertus's xIELU parameters in bf16 whatever the "
                    "model's dtype, so its fp32 reference is not fp32 there")
    if arch == "stablelm_qk" and not TRANSFORMERS_5:
        pytest.skip("transformers 4.x cannot build StableLM with qk_layernorm (its weight "
                    "init zeroes the bias its per-head LayerNorms do not have)")
    base, adapters = models[arch]
    llm = make_llm(base, enable_lora=True, max_loras=1,
                   max_lora_rank=16 if arch in MOE_ARCHS else 8,  # PEFT: gate_up at 2r
                   **({"enable_chunked_prefill": True, "max_num_batched_tokens": budget}
                      if budget else {}))
    check_mixed_batch(llm, base, adapters, prompts, extra=2)


def test_cohere2_without_a_window_rotates_no_layer():
    """Cohere 2 rotates q/k only in its sliding-window layers: with no window (a config
    may say sliding_window=None) HF rotates none, so none of ours may either."""
    if not hasattr(transformers, "Cohere2Config"):
        pytest.skip(f"this transformers ({transformers.__version__}) has no Cohere 2")
    from loraplex.models.registry import build_model

    config = transformers.Cohere2Config(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=2, sliding_window=None,
        architectures=["Cohere2ForCausalLM"])
    assert build_model(config).args.nope_layers == (0, 1, 2, 3)
    config.sliding_window = 8
    assert build_model(config).args.nope_layers == tuple(
        i for i, t in enumerate(config.layer_types) if t != "sliding_attention")


def test_layers_past_num_hidden_layers_are_skipped(models, tmp_path, caplog):
    """GLM-4.5's and DeepSeek-V3's checkpoints ship a multi-token prediction layer after
    the last one (model.layers.{num_hidden_layers}.*, experts and all): skipped, in one log
    line, not a warning per tensor; the model is the same."""
    base, _ = models["glm4_moe"]
    copy = tmp_path / "with_mtp"
    shutil.copytree(base, copy)
    weights = load_file(str(copy / "model.safetensors"))
    mtp = {k.replace("model.layers.1.", "model.layers.2."): v.clone()
           for k, v in weights.items() if k.startswith("model.layers.1.")}
    mtp["model.layers.2.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(mtp, str(copy / "model-mtp.safetensors"))
    prompt = {"prompt_token_ids": [1, 43, 76, 9]}
    want = make_llm(base).generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    with caplog.at_level(logging.INFO, logger="loraplex.models.loader"):
        got = make_llm(copy).generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == want.token_ids
    loader_lines = [r for r in caplog.records if r.name == "loraplex.models.loader"]
    assert len(loader_lines) == 1 and f"skipped {len(mtp)} checkpoint tensors" in \
        loader_lines[0].getMessage()


def test_rope_tables_hold_only_the_served_positions(tiny_models, prompts):
    """The rope tables hold max_model_len positions, not max_position_embeddings (Llama 4
    Scout's is 10M: 5 GB of tables), and the outputs are the same."""
    small = make_llm(tiny_models["llama"], max_model_len=64)
    full = make_llm(tiny_models["llama"], max_model_len=512)  # its max_position_embeddings
    for llm, rows in ((small, 64), (full, 512)):
        rotary = llm.llm_engine.model.model.rotary
        assert rotary.cos.shape[0] == rotary.sin.shape[0] == rows
    ids = [{"prompt_token_ids": p[:40]} for p in prompts]
    assert [o.outputs[0].token_ids for o in small.generate(ids, GREEDY, use_tqdm=False)] == \
        [o.outputs[0].token_ids for o in full.generate(ids, GREEDY, use_tqdm=False)]


def test_ernie_moe_biased_experts_are_refused(tmp_path):
    """A use_bias checkpoint as transformers 4.x saves it (biases on the experts, which
    5.x's and loraplex's experts have not) is refused at load, naming why."""
    if TRANSFORMERS_5 or not hasattr(transformers, "Ernie4_5_MoeConfig"):
        pytest.skip(f"transformers {transformers.__version__} saves no ERNIE 4.5 MoE with "
                    "biased experts")
    base = make_tiny_model(tmp_path / "ernie", "ernie4_5_moe", seed=3, use_bias=True)
    with pytest.raises(ValueError, match="unexpected expert tensor .*bias.*ERNIE 4.5 MoE"):
        make_llm(base)


@pytest.mark.parametrize("arch", ["phi", "ernie4_5_moe_bias"])
def test_adapters_that_bring_lm_head_rows_are_refused(arch, models, prompts, tmp_path):
    """Phi's and ERNIE 4.5 MoE's (use_bias) lm_head has a bias: an adapter that adds
    tokens fails alone with a clear error (its rows would be served without one), the
    engine serving the next request; whole lm_head tables (modules_to_save) are refused at
    start-up."""
    base, adapters = models[arch]
    added = make_added_tokens_adapter(base, tmp_path / "added")
    llm = make_llm(base, enable_lora=True, max_lora_rank=16 if arch in MOE_ARCHS else 8)
    with pytest.raises(LoRAError, match="adds 3 tokens past the base vocabulary of 512: not "
                                        "supported on a model whose lm_head has a bias"):
        llm.llm_engine.add_request("added", {"prompt_token_ids": prompts[0]}, GREEDY,
                                   lora_request=LoRARequest("added", 1, str(added)))
    check_mixed_batch(llm, base, adapters, prompts, extra=0)
    with pytest.raises(ValueError, match="--enable-lora-modules-to-save is not supported on "
                                         "a model whose lm_head has a bias"):
        make_llm(base, enable_lora=True, enable_lora_modules_to_save=True,
                 lora_target_modules=["q_proj", "embed_tokens", "lm_head"])


def test_unsupported_options_are_refused_at_start_up():
    """What HF's code does that loraplex does not is refused before anything loads: xIELU
    outside Apertus, Phi-3.5-MoE routed to other than two experts."""
    from loraplex.models.registry import build_model

    config = transformers.ArceeConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, hidden_act="xielu",
        architectures=["ArceeForCausalLM"])
    with pytest.raises(ValueError, match="hidden_act='xielu' is not supported for "
                                         "ArceeForCausalLM"):
        build_model(config)
    config = transformers.PhimoeConfig(  # its sparsemixer picks two experts, no more
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=3, architectures=["PhimoeForCausalLM"])
    with pytest.raises(ValueError, match="num_experts_per_tok=3 is not supported"):
        build_model(config)
    config.num_experts_per_tok = 2
    assert build_model(config).args.sparsemixer_eps == config.router_jitter_noise


def test_pythia_checkpoints_causal_mask_buffers_are_skipped(models, tmp_path, caplog):
    """Pythia's checkpoints hold each layer's causal-mask buffers (attention.bias,
    attention.masked_bias): skipped without a warning each, the model the same."""
    base, _ = models["gpt_neox"]

    def with_buffers(tensors: dict) -> dict:
        for i in range(2):
            tensors[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(
                1, 1, 8, 8, dtype=torch.bool).tril()
            tensors[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        return tensors

    copy = edited_copy(base, tmp_path / "pythia", tensors=with_buffers,
                       weights="model.safetensors")
    prompt = {"prompt_token_ids": [1, 43, 76, 9]}
    want = make_llm(base).generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    with caplog.at_level(logging.WARNING, logger="loraplex.models.loader"):
        got = make_llm(copy).generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == want.token_ids
    assert not [r for r in caplog.records if r.name == "loraplex.models.loader"]
