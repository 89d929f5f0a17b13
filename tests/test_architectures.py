"""Gemma, Gemma 2, Gemma 3, Phi-3, Granite, OLMo 2, Mixtral, Qwen2-MoE and Qwen3-MoE against
HF transformers + PEFT (fp32): mixed batches of the base and adapters of different ranks
and targets, more adapters than max_loras.

Gemma: GeGLU, its RMSNorm (1 + w, scaled in fp32), embeddings x sqrt(hidden) (the
embedding's LoRA scaled with them), tied lm_head. Gemma 2: norms after attention and the
MLP too, query_pre_attn_scalar, attention-score and final-logit softcaps (small caps in
the tiny config, so they bite), through the torch and the Triton attention. Granite: its
embedding, residual and attention multipliers and logits scaling. OLMo 2: norms after the
sublayers only, q and k normalized over all heads (an adapter on k_proj, before that norm).
Mixtral, Qwen2-MoE and Qwen3-MoE:
a sparse mixture of experts (top-2 of 4 here; Qwen3-MoE's weights not renormalized, and
a layer with a plain MLP; Qwen2-MoE's shared expert) under LoRA on the attention, the
router, the shared expert and the experts (per-expert modules, or transformers 5's
target_parameters on the fused experts). Phi-3: checkpoints and adapters
with q/k/v and gate/up fused (qkv_proj, gate_up_proj: one LoRA A for the whole module),
LongRoPE (Phi-3 128k, Phi-3.5): short and long frequencies on either side of the
pretraining window, switching as HF's generate switches, and partial rotary (Phi-4-mini).
Sliding-window attention (Mistral, Gemma 2) through the torch and the Triton attention.
Gemma 3 (text): Gemma 2's layout with q/k norm, a local layer (window, its own rope base)
and a global one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import transformers
from safetensors.torch import load_file, save_file

import tests.test_attention  # noqa: F401  (on the CPU: Triton under the interpreter)
from loraplex import LoRARequest, SamplingParams
from loraplex.lora import experts as experts_lora
from loraplex.lora.errors import LoRAError
from loraplex.lora.experts import ExpertsWithLoRA
from tests.engine_utils import GREEDY, check_against_hf, check_mixed_batch, lora_requests, make_llm
from tests.fixtures import EXTRA_ARCHS, hf_greedy, make_peft_adapter, make_tiny_model
from tests.handmade_lora import merged_checkpoint, write_lora_adapter

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def _experts_lora(r: int, alpha: int, seed: int, leaves: list[str]) -> dict:
    """An adapter on a mixture of experts' experts (and q_proj), as PEFT makes it on this
    transformers: on the 3-D expert parameters (5.x: target_parameters), or on each
    expert's modules named `leaves` (4.x; Qwen's also match the plain MLPs); with rank
    and alpha patterns, so a wrong scale shows."""
    if TRANSFORMERS_5:  # each parameter with its own scale (PEFT matches the patterns)
        return dict(r=r, lora_alpha=alpha, seed=seed, target_modules=["q_proj"],
                    target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                    rank_pattern={"gate_up_proj": 4}, alpha_pattern={"down_proj": 30})
    return dict(r=r, lora_alpha=alpha, seed=seed, target_modules=["q_proj", *leaves],
                alpha_pattern={leaves[0]: 30})


ADAPTERS = {  # arch -> name -> make_peft_adapter options
    "gemma": {
        "r4_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=41),
        "r8_all": dict(r=8, lora_alpha=16, target_modules="all-linear", seed=42),
        "r16_vocab": dict(r=16, lora_alpha=16, seed=43,
                          target_modules=["o_proj", "down_proj", "embed_tokens", "lm_head"]),
    },
    "gemma2": {
        "r4_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=47),
        "r8_all": dict(r=8, lora_alpha=16, target_modules="all-linear", seed=50),
        "r16_vocab": dict(r=16, lora_alpha=16, seed=49,
                          target_modules=["o_proj", "gate_proj", "embed_tokens", "lm_head"]),
    },
    "mixtral": {  # r8_all: the router and (with r6_experts) the experts too
        "r4_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=51),
        # (all-linear at scale 0.3 moves HF's fp32 logprobs 3.8e-5 off their fp64 values,
        # loraplex's 1.3e-5 (transformers 4): the 1e-4 check would measure HF's rounding)
        "r8_all": dict(r=8, lora_alpha=16, target_modules="all-linear", seed=52, scale=0.2),
        "r16_vocab": dict(r=16, lora_alpha=16, target_modules=["o_proj", "lm_head"], seed=53),
        "r6_experts": _experts_lora(6, 12, 70, ["w1", "w2", "w3"]),
    },
    "qwen3_moe": {
        "r4_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=54),
        "r8_all": dict(r=8, lora_alpha=16, target_modules="all-linear", seed=55),
        "r16_vocab": dict(r=16, lora_alpha=16, target_modules=["k_proj", "embed_tokens"],
                          seed=56),
        "r6_experts": _experts_lora(6, 12, 71, ["down_proj"]),
    },
    "granite": {
        "r4_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=57),
        "r8_all": dict(r=8, lora_alpha=16, target_modules="all-linear", seed=58),
        "r16_vocab": dict(r=16, lora_alpha=16, target_modules=["embed_tokens", "lm_head"],
                          seed=59),
    },
    "olmo2": {
        "r4_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=60),
        "r8_all": dict(r=8, lora_alpha=16, target_modules="all-linear", seed=61),
        "r16_k": dict(r=16, lora_alpha=16, target_modules=["k_proj", "down_proj"], seed=62),
    },
    "gemma3": {  # (its embedding's LoRA: test_gemma3_embedding_lora_is_scaled)
        "r4_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=63),
        "r8_all": dict(r=8, lora_alpha=16, target_modules="all-linear", seed=64),
        "r16_vocab": dict(r=16, lora_alpha=16, target_modules=["k_proj", "lm_head"], seed=65),
    },
    "qwen2_moe": {  # r8_all: the router, the shared expert and its gate
        "r4_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=67),
        "r8_all": dict(r=8, lora_alpha=16, target_modules="all-linear", seed=68),
        "r16_vocab": dict(r=16, lora_alpha=16, target_modules=["o_proj", "lm_head"], seed=69),
        "r6_experts": _experts_lora(6, 12, 72, ["gate_proj", "up_proj"]),
    },
    "phi3": {
        "r4_qkv": dict(r=4, lora_alpha=8, target_modules=["qkv_proj"], seed=44),
        "r8_all": dict(r=8, lora_alpha=16, target_modules="all-linear", seed=45),
        "r16_mlp": dict(r=16, lora_alpha=32, target_modules=["gate_up_proj", "down_proj"],
                        rank_pattern={"down_proj": 4}, seed=46),
    },
}


SEEDS = {"gemma": 20, "phi3": 21, "gemma2": 22, "mixtral": 23, "qwen3_moe": 24,
         "granite": 25, "olmo2": 26, "gemma3": 27, "qwen2_moe": 28}


@pytest.fixture(scope="module")
def arch_models(tiny_root: Path) -> dict[str, tuple[Path, dict[str, Path]]]:
    out = {}
    for arch in EXTRA_ARCHS:
        base = make_tiny_model(tiny_root / "archs" / arch, arch, seed=SEEDS[arch],
                               tie_word_embeddings=arch.startswith("gemma"))
        out[arch] = (base, {name: make_peft_adapter(base, tiny_root / "archs" / f"{arch}_{name}",
                                                    **spec)
                            for name, spec in ADAPTERS[arch].items()})
    return out


@pytest.mark.parametrize("arch", EXTRA_ARCHS)
@pytest.mark.parametrize("budget", [None, 6])
def test_mixed_batch_matches_peft(arch, budget, arch_models, prompts):
    """Base + three adapters, two slots; budget 6: prompts prefilled in chunks."""
    base, adapters = arch_models[arch]
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=16,
                   max_num_batched_tokens=budget)
    check_mixed_batch(llm, base, adapters, prompts)


@pytest.mark.parametrize("budget", [None, 6])
def test_gemma2_with_triton_attention(monkeypatch, budget, arch_models, prompts):
    """Gemma 2's score cap in the Triton kernels (under the interpreter on the CPU):
    prefill, chunks over cached context, decode."""
    monkeypatch.setenv("LORAPLEX_ATTENTION_BACKEND", "triton")
    base, adapters = arch_models["gemma2"]
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=16, block_size=8,
                   max_num_batched_tokens=budget)
    assert llm.llm_engine.model_runner.attn_backend == "triton"
    check_mixed_batch(llm, base, adapters, prompts, extra=2)


MOE = {  # arch -> (the sparse block, its expert size, the expert leaves of its checkpoints)
    "mixtral": ("block_sparse_moe", 128, ("w1", "w2", "w3")),
    "qwen3_moe": ("mlp", 48, ("gate_proj", "up_proj", "down_proj")),
    "qwen2_moe": ("mlp", 48, ("gate_proj", "up_proj", "down_proj")),
}


def _per_expert_adapter(base: Path, out: Path, block: str, leaves: tuple[str, ...], r: int,
                        seed: int, edit: dict | None = None) -> Path:
    """A PEFT adapter as transformers 4 saves LoRA on a mixture of experts: a module per
    expert and projection (experts.{e}.w1 ...), written directly, since transformers 5
    has no such modules (its PEFT converts them when it loads them, the reference here)."""
    cfg = json.loads((base / "config.json").read_text())
    hidden = cfg["hidden_size"]
    size = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    modules = [(f"model.layers.{layer}.{block}.experts.{e}.{leaf}",
                *((size, hidden) if leaf in ("w2", "down_proj") else (hidden, size)))
               for layer in range(cfg["num_hidden_layers"])
               if layer not in (cfg.get("mlp_only_layers") or [])
               for e in range(cfg.get("num_local_experts") or cfg["num_experts"])
               for leaf in leaves]
    return write_lora_adapter(out, modules, r, seed, list(leaves), base, edit)


def _peft_reads_per_expert(arch: str) -> bool:
    """transformers 4 has a module per expert; 5's PEFT converts such adapters for the
    models it has a mapping for (not Qwen2-MoE: it leaves them out, silently)."""
    return not TRANSFORMERS_5 or arch != "qwen2_moe"


@pytest.mark.parametrize("long_run", [1, 10**6], ids=["matmul_per_run", "gathered"])
@pytest.mark.parametrize("arch", list(MOE))
def test_moe_experts_are_stacked_and_take_lora(arch, long_run, arch_models, tmp_path,
                                               prompts, monkeypatch):
    """The checkpoint's per-expert weights are stacked per layer (Qwen3-MoE's layer 1 keeps
    its plain MLP). An adapter saved per expert (transformers 4's layout, vLLM's) serves in
    one batch with the base and others: it matches HF on the merged weights, and HF + PEFT
    where PEFT reads it; the others match HF + PEFT. Both ways of computing the experts'
    LoRA: matmuls per adapter run, and runs gathered into one batched matmul."""
    monkeypatch.setattr(experts_lora, "_LONG_RUN", long_run)
    base, adapters = arch_models[arch]
    block, size, leaves = MOE[arch]
    per_expert = _per_expert_adapter(base, tmp_path / "per_expert", block, leaves, r=4, seed=73)
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=16)
    layers = llm.llm_engine.model.model.layers
    experts = getattr(layers[0], block).experts
    assert isinstance(experts, ExpertsWithLoRA)
    w13, w2 = experts.base_layer.w13, experts.base_layer.w2
    assert w13.shape == (4, 2 * size, 64) and w2.shape == (4, 64, size)
    assert (arch == "qwen3_moe") == hasattr(getattr(layers[1], "mlp", None), "gate_up_proj")
    manager = llm.llm_engine.lora_manager  # the memory plan counts the experts' slots
    slot_buffers = sum(b.numel() * b.element_size() for layer in manager.layers.values()
                       for n, b in layer.named_buffers() if b.is_floating_point()
                       and not n.startswith(("base_layer", "extra_vocab")))
    assert slot_buffers == manager.slot_bytes_per_rank() * 16 * 2

    paths = {"per_expert": per_expert, "r4_qv": adapters["r4_qv"],
             "r6_experts": adapters["r6_experts"]}
    reqs = lora_requests(paths)
    batch = [(prompts[0], None), (prompts[0], "per_expert"), (prompts[1], "r6_experts"),
             (prompts[2], "per_expert"), (prompts[1], "r4_qv"), (prompts[3], None)]
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in batch], GREEDY,
                        lora_request=[reqs[n] if n else None for _, n in batch],
                        use_tqdm=False)
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids
    mine = [i for i, (_, n) in enumerate(batch) if n == "per_expert"]
    others = [i for i in range(len(batch)) if i not in mine]
    merged = merged_checkpoint(base, per_expert, tmp_path / "merged")
    check_against_hf([outs[i] for i in mine], merged, [None] * len(mine),
                     [batch[i][0] for i in mine])
    if _peft_reads_per_expert(arch):
        check_against_hf([outs[i] for i in mine], base, [per_expert] * len(mine),
                         [batch[i][0] for i in mine])
    check_against_hf([outs[i] for i in others], base,
                     [paths[batch[i][1]] if batch[i][1] else None for i in others],
                     [batch[i][0] for i in others])


def _fused_experts_edit(path: Path) -> None:
    """A ParamWrapper pair one rank short for each expert: consistent shapes, but not the
    config's r x experts."""
    tensors = load_file(str(path / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("experts.lora_A.weight"))
    tensors[key] = tensors[key][:-4]
    b = key.replace("lora_A", "lora_B")
    tensors[b] = tensors[b][:, :-4].contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"))


BAD_EXPERT_ADAPTERS = {  # what is wrong -> (edit of a per-expert adapter's config or files,
    # the error's words)
    "expert past the model's": ("expert", ".experts.9.", "is past the model's 4 experts"),
    "unknown parameter": ("config", {"target_parameters": ["experts.w13"]},
                          "targets the parameter 'experts.w13'"),
    "rank above the bound": ("config", {"r": 32}, "max_lora_rank=16"),
}


@pytest.mark.parametrize("arch", ["mixtral"])
def test_bad_expert_adapters_fail_alone(arch, arch_models, tmp_path, prompts):
    """Each broken adapter on the experts fails alone with a message naming the fault; a
    request for a good adapter on the same engine carries on."""
    base, adapters = arch_models[arch]
    block, _, leaves = MOE[arch]
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=16)
    engine = llm.llm_engine
    cases = list(BAD_EXPERT_ADAPTERS.values())
    if TRANSFORMERS_5:  # a fused (target_parameters) adapter with a truncated A
        cases.append(("fused", adapters["r6_experts"], "not r x experts = 6 x 4"))
    for i, (kind, edit, message) in enumerate(cases):
        path = tmp_path / f"bad{i}"
        if kind == "fused":
            shutil.copytree(edit, path)
            _fused_experts_edit(path)
        else:
            _per_expert_adapter(base, path, block, leaves, r=4, seed=80 + i,
                                edit=edit if kind == "config" else None)
        if kind == "expert":
            tensors = load_file(str(path / "adapter_model.safetensors"))
            save_file({k.replace(".experts.3.", edit): v for k, v in tensors.items()},
                      str(path / "adapter_model.safetensors"))
        req = LoRARequest(f"bad{i}", 10 + i, str(path))
        with pytest.raises(LoRAError, match=re.escape(message)):
            engine.add_lora(req)
    ok = llm.generate([{"prompt_token_ids": prompts[1]}], SamplingParams(max_tokens=3),
                      lora_request=LoRARequest("ok", 1, str(adapters["r6_experts"])),
                      use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 3


def _peft_scales_embedding_lora() -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return hasattr(BaseTunerLayer, "_get_embed_scale")


@pytest.mark.skipif(not _peft_scales_embedding_lora(), reason="this PEFT adds the LoRA of a "
                    "scaled embedding (Gemma 3's) unscaled; later PEFT scales it, as merging "
                    "it into the weights does, and so does loraplex")
def test_gemma3_embedding_lora_is_scaled(arch_models, tmp_path, prompts):
    """Gemma 3's embedding multiplies by sqrt(hidden) inside the module: the LoRA on it is
    scaled with it (PEFT's _get_embed_scale; as if merged into the table)."""
    base = arch_models["gemma3"][0]
    adapter = make_peft_adapter(base, tmp_path / "emb", r=8, lora_alpha=16, seed=66,
                                target_modules=["embed_tokens", "v_proj"])
    llm = make_llm(base, enable_lora=True, max_lora_rank=8)
    check_mixed_batch(llm, base, {"emb": adapter}, prompts, extra=2)


def test_phi3_fused_modules_are_one_lora_slice(arch_models):
    llm = make_llm(arch_models["phi3"][0], enable_lora=True, max_lora_rank=16)
    layer = llm.llm_engine.model.model.layers[0].self_attn.qkv_proj
    assert layer.output_sizes == [layer.base_layer.out_features]
    targets = llm.llm_engine.lora_manager.targets.shapes
    assert "model.layers.0.self_attn.qkv_proj" in targets
    assert "model.layers.0.self_attn.q_proj" not in targets


def _edited_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# the legacy key, which transformers 4 (Phi3Config checks it) and 5 both read
LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0],
            "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 12.0, 16.0]}


def test_phi3_longrope_matches_hf(tmp_path):
    """A pretraining window of 24: a short prompt whose output crosses it (HF switches to
    the long frequencies at the crossing, keeping the cached K/V) and a long prompt (long
    throughout), on the base and with an adapter, in one batch."""
    base = make_tiny_model(tmp_path / "phi3_long", "phi3", seed=9,
                           original_max_position_embeddings=24, rope_scaling=LONGROPE)
    adapter = make_peft_adapter(base, tmp_path / "phi3_long_lora", r=8,
                                target_modules=["qkv_proj", "down_proj"], seed=10)
    short, long = [1, *range(40, 52)], [1, *range(60, 100)]
    lora = LoRARequest("a", 1, str(adapter))
    jobs = [(short, None), (long, None), (short, lora), (long, lora)]
    llm = make_llm(base, enable_lora=True, max_lora_rank=8)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=2)
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in jobs], params,
                        lora_request=[r for _, r in jobs], use_tqdm=False)
    for out, (prompt, r) in zip(outs, jobs):
        assert out.outputs[0].token_ids == hf_greedy(base, adapter if r else None, prompt, 20)
    # teacher-forced logprobs use HF's long frequencies for the whole sequence: the same
    # as generation only where the prompt is past the window already
    check_against_hf([outs[1], outs[3]], base, [None, adapter], [long, long])


@pytest.mark.parametrize("rope", ["default", "longrope"])
def test_phi3_partial_rotary_matches_hf(rope, tmp_path):
    """Phi-4-mini's partial rotary (there 0.75 of each head, with LongRoPE): here half of
    each 16-dim head is rotated, the rest passes through; with an adapter on qkv_proj, and
    with LongRoPE past its pretraining window."""
    scaling = None if rope == "default" else {
        "type": "longrope", "short_factor": [1.0, 1.2, 1.8, 3.0],
        "long_factor": [1.0, 2.0, 5.0, 9.0]}
    base = make_tiny_model(tmp_path / "partial", "phi3", seed=12, rope_scaling=scaling,
                           original_max_position_embeddings=24, partial_rotary_factor=0.5,
                           tie_word_embeddings=True)
    adapter = make_peft_adapter(base, tmp_path / "partial_lora", r=8,
                                target_modules=["qkv_proj", "o_proj"], seed=13)
    llm = make_llm(base, enable_lora=True, max_lora_rank=8)
    assert llm.llm_engine.model.model.rotary.rotary_dim == 8
    short, long = [1, *range(40, 52)], [1, *range(60, 100)]
    lora = LoRARequest("a", 1, str(adapter))
    jobs = [(short, None), (long, lora), (short, lora)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in jobs], params,
                        lora_request=[r for _, r in jobs], use_tqdm=False)
    for out, (prompt, r) in zip(outs, jobs):
        assert out.outputs[0].token_ids == hf_greedy(base, adapter if r else None, prompt, 16)
    if rope == "longrope":
        return
    odd = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.2}
    bad = _edited_config(base, tmp_path / "odd", partial_rotary_factor=0.2, rope_parameters=odd)
    with pytest.raises(ValueError, match="partial_rotary_factor=0.2 gives 3 rotary"):
        make_llm(bad)
    # a full-rotary engine on these weights differs: the partial path is what matched
    full = _edited_config(base, tmp_path / "full", partial_rotary_factor=1.0,
                          rope_parameters={**odd, "partial_rotary_factor": 1.0})
    assert make_llm(full).generate([{"prompt_token_ids": short}], params, use_tqdm=False)[
        0].outputs[0].token_ids != outs[0].outputs[0].token_ids


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
@pytest.mark.parametrize("backend,budget", [("torch", None), ("torch", 5), ("triton", 5)])
def test_sliding_window_matches_hf(arch, backend, budget, monkeypatch, tmp_path, prompts):
    """A window of 6 (Mistral: every layer; Gemma 2: its even layers, the odd ones attend
    globally) under prompts and outputs longer than it: prefill, chunks reading the cached
    context through the window, decode; with an adapter. The window changes the output
    (a model without it answers otherwise)."""
    monkeypatch.setenv("LORAPLEX_ATTENTION_BACKEND", backend)
    base = make_tiny_model(tmp_path / arch, arch, seed=30, sliding_window=6)
    adapter = make_peft_adapter(base, tmp_path / "lora", r=4, seed=31,
                                target_modules=["q_proj", "v_proj"])
    llm = make_llm(base, enable_lora=True, max_lora_rank=8, block_size=8,
                   max_num_batched_tokens=budget)
    assert llm.llm_engine.model_config.max_model_len == 256  # not capped at the window
    batch = [prompts[-1], prompts[-2], prompts[2]]
    loras = [None, LoRARequest("a", 1, str(adapter)), None]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, lora_request=loras,
                        use_tqdm=False)
    check_against_hf(outs, base, [None, adapter, None], batch)
    full = _edited_config(base, tmp_path / "full", sliding_window=None)
    other = make_llm(full).generate([{"prompt_token_ids": batch[0]}], params, use_tqdm=False)
    assert other[0].outputs[0].token_ids != outs[0].outputs[0].token_ids


@pytest.mark.parametrize("dtype, lora_dtype", [("bfloat16", "float32"),
                                               ("float32", "bfloat16")])
def test_moe_expert_lora_in_another_dtype(dtype, lora_dtype, arch_models, prompts):
    """--lora-dtype other than the model's: the experts' LoRA computes in fp32 and rounds
    once into the activations, as the projections' LoRA does."""
    base, adapters = arch_models["mixtral"]
    llm = make_llm(base, enable_lora=True, max_lora_rank=16, dtype=dtype,
                   lora_dtype=lora_dtype)
    req = LoRARequest("experts", 1, str(adapters["r6_experts"]))
    outs = llm.generate([{"prompt_token_ids": prompts[0]}] * 2, GREEDY,
                        lora_request=[req, None], use_tqdm=False)
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids
