"""Qwen3-Next, Qwen3.5 and Qwen3.5-MoE (models/qwen3_next.py: gated DeltaNet layers
beside gated attention) against HF transformers 5 + PEFT (fp32).

Tiny random models, hidden 64, 4 layers (DeltaNet, attention, DeltaNet, attention):
DeltaNets of 2 key heads of 16 and 4 value heads of 8; attention of 4 heads of 16 (2 KV
heads), output-gated, a quarter of each head rotated (Qwen3-Next) or half of it by
interleaved M-RoPE (Qwen3.5); Qwen3-Next's and Qwen3.5-MoE's feed-forward 4 experts of
32, 2 per token, plus a sigmoid-gated shared expert of 48 (Qwen3-Next's layer 2 a dense
MLP: mlp_only_layers); Qwen3.5's a SwiGLU MLP. Each: the base and adapters of two ranks
(the DeltaNets' projections with q / v; every linear and, on the mixtures, the experts
and the router through target_parameters) in one batch, prompts prefilled in chunks of
7 that carry the state beside other sequences' decodes; a KV cache too small for all
requests at once, so sequences are preempted and recompute their state; the experts
stored fused; an adapter on a module the model lacks, refused alone. Qwen3.5's
ForConditionalGeneration checkpoint (Qwen3-VL's tower without DeepStack): image and text
prompts under the base and an adapter trained on the whole model, whole and chunked
(its videos, and the server's image and video chat: tests/test_qwen3_5_video.py).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from loraplex import LoRARequest
from loraplex.layers.gated_delta_net import GatedDeltaNet
from loraplex.layers.quantization import QuantConfig
from loraplex.lora.errors import LoRAError
from loraplex.models.registry import build_model
from tests.engine_utils import (
    GREEDY,
    check_against_hf,
    check_mixed_batch,
    lora_requests,
    make_llm,
)
from tests.fixtures import _reinit_, make_peft_adapter, make_tokenizer
from tests.llava_fixtures import image
from tests.multimodal_fixtures import (
    LANGUAGE_MODEL,
    make_multimodal_adapter,
    request,
)
from tests.qwen2_vl_fixtures import ASK, CHAT_TEMPLATE, VISION, check
from tests.qwen2_vl_fixtures import GREEDY as VL_GREEDY
from tests.test_hybrid import check_preemption
from tests.test_qwen2_vl import TEXT, TWO

pytest.importorskip("transformers.models.qwen3_next",
                    reason=f"transformers {transformers.__version__} has no Qwen3-Next")
pytest.importorskip("transformers.models.qwen3_5",
                    reason=f"transformers {transformers.__version__} has no Qwen3.5")

LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
COMMON = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, layer_types=LAYER_TYPES,
              linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
              linear_value_head_dim=8, linear_conv_kernel_dim=4, max_position_embeddings=512,
              bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
EXPERTS = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
               shared_expert_intermediate_size=48)


def qwen3_next_config(vocab_size: int):
    return transformers.Qwen3NextConfig(vocab_size=vocab_size, **COMMON, **EXPERTS,
                                        intermediate_size=96, mlp_only_layers=[2])


# Qwen3.5's interleaved M-RoPE over half of each head (4 frequencies); on text every
# axis has the token's position
QWEN3_5_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                "mrope_section": [2, 1, 1], "mrope_interleaved": True}


def qwen3_5_config(vocab_size: int):
    return transformers.Qwen3_5TextConfig(vocab_size=vocab_size, **COMMON, intermediate_size=96,
                                          rope_parameters=QWEN3_5_ROPE)


def qwen3_5_moe_config(vocab_size: int):
    return transformers.Qwen3_5MoeTextConfig(vocab_size=vocab_size, **COMMON, **EXPERTS,
                                             rope_parameters=QWEN3_5_ROPE)


CONFIGS = {"qwen3_next": qwen3_next_config, "qwen3_5": qwen3_5_config,
           "qwen3_5_moe": qwen3_5_moe_config}
FUSED = ["in_proj_qkvz", "in_proj_ba", "out_proj"]
SPLIT = ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"]
ON_EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
# the adapters of each, ranks 4 and 8: (target_modules, target_parameters)
ADAPTER_TARGETS = {
    "qwen3_next": ((FUSED + ["q_proj", "v_proj"], None), ("all-linear", ON_EXPERTS)),
    "qwen3_5": ((SPLIT + ["q_proj", "v_proj"], None), ("all-linear", None)),
    "qwen3_5_moe": ((SPLIT + ["q_proj", "v_proj"], None), ("all-linear", ON_EXPERTS)),
}


def make_model(out: Path, kind: str, seed: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind](len(tok)), dtype=torch.float32)
    _reinit_(model, seed, 0.1)  # (at 0.2 HF's own decode and prefill differ by 1e-4)
    model.eval().save_pretrained(str(out))
    return out


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request, tiny_root: Path) -> tuple[str, Path, dict[str, Path]]:
    kind = request.param
    seed = 300 + 10 * list(CONFIGS).index(kind)
    root = tiny_root / f"gdn_{kind}"
    base = make_model(root / "base", kind, seed)
    (mixer, mixer_params), (every, every_params) = ADAPTER_TARGETS[kind]
    specs = {"r4_mixer": dict(r=4, lora_alpha=8, target_modules=mixer, seed=seed + 1),
             "r8_all": dict(r=8, lora_alpha=16, target_modules=every, seed=seed + 2,
                            target_parameters=every_params)}
    return kind, base, {n: make_peft_adapter(base, root / n, **s) for n, s in specs.items()}


def test_mixed_batch_in_chunks(model, prompts):
    """The base and both adapters over two slots, prompts prefilled in chunks of 7 (each
    from the state the last left) beside other sequences' decodes: HF + PEFT's tokens."""
    kind, base, adapters = model
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=16, block_size=8,
                   max_num_batched_tokens=7)
    assert max(len(p) for p in prompts) > 7
    check_mixed_batch(llm, base, adapters, prompts, extra=3)
    engine = llm.llm_engine
    runner = engine.model_runner
    assert runner.num_mixed_steps > 0 and engine.block_manager.states is not None
    assert runner.mamba_state.num_free_slots == runner.max_num_seqs
    assert len(runner.attention_layers) == 2
    assert [isinstance(m, GatedDeltaNet) for m in runner.mixers] == [True, True]


def test_preemption_recomputes_the_state(model, prompts):
    """10 KV blocks of 8 for 5 requests: preempted sequences give their state slot back
    and recompute from the prompt exactly."""
    _, base, adapters = model
    check_preemption(base, adapters, [None, "r8_all", "r4_mixer", None, "r8_all"], prompts,
                     max_lora_rank=16)


def _fused_experts(base: Path, out: Path) -> Path:
    """A copy of `base` with each layer's experts fused as Qwen3.5-MoE's hub files (and
    transformers 5's own layout) hold them: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, out)
    for f in out.glob("*.safetensors"):
        tensors, fused = load_file(str(f)), {}
        for name in sorted(tensors):
            head, _, rest = name.partition(".experts.")
            if not rest:
                fused[name] = tensors[name]
                continue
            expert, leaf = rest.split(".")[0], rest.split(".")[1]
            fused.setdefault((head, leaf), {})[int(expert)] = tensors[name]
        for key in [k for k in fused if isinstance(k, tuple)]:
            head, leaf = key
            if leaf == "gate_proj":
                ups = fused.pop((head, "up_proj"))
                gates = fused.pop(key)
                fused[f"{head}.experts.gate_up_proj"] = torch.stack(
                    [torch.cat([gates[e], ups[e]]) for e in sorted(gates)])
        for key in [k for k in fused if isinstance(k, tuple)]:
            downs = fused.pop(key)
            fused[f"{key[0]}.experts.down_proj"] = torch.stack([downs[e] for e in sorted(downs)])
        save_file(fused, str(f), metadata={"format": "pt"})
    return out


def test_fused_experts_checkpoint(model, prompts):
    """The experts stored fused (gate_up_proj [E, 2I, H], down_proj [E, H, I]) load as
    the per-expert ones: the base and the experts adapter equal HF + PEFT's."""
    kind, base, adapters = model
    if kind == "qwen3_5":
        pytest.skip("Qwen3.5 (dense) has no experts")
    fused = _fused_experts(base, base.parent / "fused")
    with safe_open(str(next(fused.glob("*.safetensors"))), "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()  # noqa: SIM118
    llm = make_llm(fused, enable_lora=True, max_loras=1, max_lora_rank=16, block_size=8)
    reqs = lora_requests(adapters)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], GREEDY,
                        lora_request=[None, reqs["r8_all"]], use_tqdm=False)
    check_against_hf(outs, base, [None, adapters["r8_all"]], prompts[:2])


def test_adapter_on_a_missing_module_fails_alone(model, prompts):
    """An adapter whose target is no module of the model (Qwen3-Next's in_proj_qkvz on
    Qwen3.5, Qwen3.5's in_proj_qkv on Qwen3-Next) is refused by name; the base and a
    good adapter run on."""
    kind, base, adapters = model
    wrong = "in_proj_qkv" if kind == "qwen3_next" else "in_proj_qkvz"
    right = "in_proj_qkvz" if kind == "qwen3_next" else "in_proj_qkv"
    bad = base.parent / "bad"
    shutil.copytree(adapters["r4_mixer"], bad, dirs_exist_ok=True)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(bad / "adapter_model.safetensors"))
    save_file({k.replace(f".{right}.", f".{wrong}."): v for k, v in tensors.items()},
              str(bad / "adapter_model.safetensors"))
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=16, block_size=8)
    with pytest.raises(LoRAError, match=f"target module .*{wrong}.* not found"):
        llm.generate([{"prompt_token_ids": prompts[0]}], GREEDY,
                     lora_request=LoRARequest("bad", 9, str(bad)), use_tqdm=False)
    reqs = lora_requests(adapters)
    outs = llm.generate([{"prompt_token_ids": prompts[1]}] * 2, GREEDY,
                        lora_request=[None, reqs["r4_mixer"]], use_tqdm=False)
    check_against_hf(outs, base, [None, adapters["r4_mixer"]], [prompts[1]] * 2)


def test_speculative_decoding_refused(model):
    """A recurrent state cannot roll back rejected drafts: refused at start-up."""
    _, base, _ = model
    with pytest.raises(ValueError, match="speculative decoding is not supported for hybrid"):
        make_llm(base, speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                           "prompt_lookup_max": 3})


def test_build_refusals():
    """A layer kind outside linear / full attention, and a quantized checkpoint of a
    method its experts cannot hold (tests/test_hybrid_quantized.py: those that load), are
    refused by name."""
    cfg = qwen3_5_config(64)
    cfg.layer_types = ["linear_attention", "sliding_attention", "linear_attention",
                       "full_attention"]
    with pytest.raises(ValueError, match=r"layer types \['sliding_attention'\] are not"):
        build_model(cfg)
    cfg = qwen3_next_config(64)
    with pytest.raises(ValueError, match="nvfp4-quantized Qwen3NextForCausalLM"):
        build_model(cfg, QuantConfig(method="nvfp4", bits=4, group_size=16))


def make_qwen3_5_vl(base: Path, seed: int, moe: bool = False) -> Path:
    """A tiny Qwen3_5ForConditionalGeneration checkpoint (Qwen3_5MoeForConditionalGeneration
    with `moe`: 4 experts, 2 per token, a shared expert): a 2-block Qwen3-VL tower without
    DeepStack on 4-pixel patches beside the 4-layer language model (interleaved M-RoPE
    sections [2, 1, 1] over half of each head), its image processor and tokenizer."""
    from transformers import Qwen2VLImageProcessor

    tok = make_tokenizer(base)
    tok.add_special_tokens({"additional_special_tokens": VISION})
    tok.chat_template = CHAT_TEMPLATE
    ids = dict(zip(("vision_start_token_id", "image_token_id", "vision_end_token_id",
                    "video_token_id"), tok.convert_tokens_to_ids(VISION), strict=True))
    sizes = EXPERTS if moe else {"intermediate_size": 96}
    text = dict(vocab_size=len(tok), **COMMON, **sizes, rope_parameters=QWEN3_5_ROPE)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64,
                  num_position_embeddings=16)
    config, model = ((transformers.Qwen3_5MoeConfig,
                      transformers.Qwen3_5MoeForConditionalGeneration) if moe else
                     (transformers.Qwen3_5Config, transformers.Qwen3_5ForConditionalGeneration))
    cfg = config(text_config=text, vision_config=vision, **ids)
    cfg.tie_word_embeddings = False
    torch.manual_seed(seed)
    hf = model(cfg).eval()
    _reinit_(hf, seed, 0.1)
    hf.save_pretrained(str(base))
    Qwen2VLImageProcessor(size={"shortest_edge": 64, "longest_edge": 64 * 64}, patch_size=4,
                          merge_size=2, temporal_patch_size=2).save_pretrained(str(base))
    tok.save_pretrained(str(base))
    return base


@pytest.fixture(scope="module")
def conditional(tiny_root: Path) -> dict[str, Path]:
    """A Qwen3_5ForConditionalGeneration checkpoint (make_qwen3_5_vl) and an adapter on the
    whole model (its language model's DeltaNet, attention and MLP modules)."""
    root = tiny_root / "gdn_qwen3_5_vl"
    make_qwen3_5_vl(root / "base", 330)
    adapter = make_multimodal_adapter(
        root / "base", root / "r8", r=8, seed=331,
        targets=LANGUAGE_MODEL + "(in_proj_qkv|in_proj_z|out_proj|q_proj|v_proj|down_proj)")
    return {"base": root / "base", "r8": adapter}


@pytest.mark.parametrize("budget", [None, 16])
def test_conditional_generation_with_images(budget, conditional):
    """The whole model's checkpoint: image and text prompts under the base and the
    adapter (trained on the whole model) in one batch, two images of different sizes in
    one prompt; budget 16: prefill chunks cutting through images. HF's
    ForConditionalGeneration (+ PEFT): its greedy tokens, logprobs within 1e-4."""
    base = conditional["base"]
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8,
                   max_num_batched_tokens=budget)
    engine = llm.llm_engine
    assert engine.model.args.mrope_section == (2, 1, 1)
    assert engine.model_runner.mamba_state is not None and engine.block_manager.states
    a, b = image(1, (52, 40)), image(2, (24, 40))
    jobs = [(ASK, [a], None), (ASK, [a], "r8"), (ASK, [b], "r8"), (TEXT, [], "r8"),
            (TEXT, [], None), (TWO, [a, b], None)]
    r8 = LoRARequest("r8", 1, str(conditional["r8"]))
    outs = llm.generate([request(p, ims) for p, ims, _ in jobs], VL_GREEDY, use_tqdm=False,
                        lora_request=[r8 if n else None for *_, n in jobs])
    check(outs, base, [(p, ims, conditional[n] if n else None) for p, ims, n in jobs])
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids
