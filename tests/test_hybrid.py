"""Hybrid Mamba2 + attention models: Granite 4.0 (GraniteMoeHybridForCausalLM) against HF
transformers + PEFT (fp32).

A tiny random GraniteMoeHybrid (mamba, attention, mamba, attention layers; 4 experts, 2
per token, and a shared MLP; NoPE; Granite's multipliers): the Mamba2 mixer alone against
HF's layer (a prompt in chunks that carry the state, then decode steps); the whole model
in mixed batches (base + adapters of different ranks on the attention, the mixers'
in_proj / out_proj, the shared MLP and the experts) with chunked prefill and mixed prefill / decode
steps; a rope / dense / untied variant; an attention-only one (-micro, prefix caching
kept); Granite 3.x MoE (GraniteMoe, GraniteMoeShared); preemption; the state slot freed by
an abort and reused; shared prompts from the prefix cache; the state memory and its refusal;
speculative decoding refused; the server with the openai client.
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, GraniteMoeHybridConfig

from loraplex import SamplingParams
from loraplex.layers.mamba2 import Mamba2Args, Mamba2Mixer, MambaBatch
from loraplex.worker.mamba_state import state_bytes_per_slot
from tests.engine_utils import (
    GREEDY,
    check_against_hf,
    check_mixed_batch,
    lora_requests,
    make_llm,
    run_staggered,
)
from tests.fixtures import _reinit_, hf_greedy, make_peft_adapter, make_tokenizer
from tests.server_utils import RemoteServer, token_ids_of

ADAPTERS = {
    "r4_attn": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], seed=61),
    "r8_mamba": dict(r=8, lora_alpha=16, target_modules=["in_proj", "out_proj"], seed=62),
    "r16_all": dict(r=16, lora_alpha=16, target_modules="all-linear", seed=63),
    "r6_experts": dict(r=6, lora_alpha=12, target_modules=["k_proj"], seed=64,
                       target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
}
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
# transformers 5's names; 4.x's config takes the hub's (mamba / attention)
MAMBA, ATTENTION = ("linear_attention", "full_attention") if TRANSFORMERS_5 else ("mamba",
                                                                                  "attention")
# transformers 4.56's gated norm normalizes a mixer's output over all its groups at once,
# 5.x's (and vLLM's) group by group: the two agree with one group, as every Granite 4.0
# checkpoint has; 4.x is checked there
GROUPS = 2 if TRANSFORMERS_5 else 1
# the models are checked against transformers 5 (PEFT's target_parameters on its fused
# experts; 4.56's GraniteMoeParallelExperts and its router's nn.Linear, which PEFT's
# all-linear takes, are other layouts): on 4.x only the mixer is
ONLY_5 = pytest.mark.skipif(not TRANSFORMERS_5, reason="checked against transformers 5")
LAYER_TYPES = [MAMBA, ATTENTION, MAMBA, ATTENTION]


def hybrid_config(vocab_size: int, **overrides) -> GraniteMoeHybridConfig:
    """Mixers of 4 heads of 32 in 2 groups (1 on transformers 4), 16 states, chunks of 8 (several per prompt)."""
    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=48,
              shared_intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
              mamba_n_heads=4, mamba_n_groups=GROUPS, mamba_d_state=16, mamba_d_conv=4,
              mamba_expand=2, mamba_chunk_size=8, layer_types=LAYER_TYPES,
              embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
              logits_scaling=1.5, position_embedding_type="nope", max_position_embeddings=512,
              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return GraniteMoeHybridConfig(**{**kw, **overrides})


def make_hybrid(out: Path, seed: int = 60, **overrides) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hybrid_config(len(tok), **overrides),
                                             dtype=torch.float32)
    _reinit_(model, seed, 0.2)
    model.eval().save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def granite(tiny_root: Path) -> tuple[Path, dict[str, Path]]:
    base = make_hybrid(tiny_root / "granite_hybrid" / "base")
    return base, {name: make_peft_adapter(base, tiny_root / "granite_hybrid" / name, **spec)
                  for name, spec in ADAPTERS.items()}


def mixer_in_chunks(mixer: torch.nn.Module, x: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A state layer (Mamba2 / Mamba-1 mixer, gated DeltaNet) on 30 tokens `x` in slot 1 of
    its states: a prompt in chunks of 13 and 14 (the second from the state the first
    left), then 3 decode steps (the recurrence); and the first chunk again, fresh (it must
    ignore what the slot holds). (the 30 rows, the fresh chunk's 13)"""
    got = [mixer(x[:13], MambaBatch([(0, 13, 1, True)])),
           mixer(x[13:27], MambaBatch([(0, 14, 1, False)]))]
    got += [mixer(x[t:t + 1], MambaBatch([], 0, torch.tensor([1]))) for t in range(27, 30)]
    return torch.cat(got), mixer(x[:13], MambaBatch([(0, 13, 1, True)]))


@torch.no_grad()
def test_mixer_matches_hf_layer():
    """A 30-token input through HF's GraniteMoeHybridMambaLayer at once, and through ours
    as a prompt in chunks of 13 and 14 (each from the state the last left, the chunked
    scan over several 8-token scan chunks) and 3 decode steps (the recurrence)."""
    from transformers.models.granitemoehybrid.modeling_granitemoehybrid import (
        GraniteMoeHybridMambaLayer,
    )
    torch.manual_seed(0)
    cfg = hybrid_config(64)
    hf = GraniteMoeHybridMambaLayer(cfg, 0).float()
    for p in hf.parameters():
        p.normal_(0, 0.3)
    m = Mamba2Args(4, cfg.mamba_d_head, 16, GROUPS, 4, 128, 8)
    ours = Mamba2Mixer(64, m)
    ours.load_state_dict(hf.state_dict())
    ours.conv_state = torch.zeros(3, m.conv_dim, 3)
    ours.ssm_state = torch.zeros(3, 4, 32, 16)
    x = torch.randn(30, 64)
    want = hf(x[None])[0]
    got, again = mixer_in_chunks(ours, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # a fresh first chunk ignores whatever the slot held
    torch.testing.assert_close(again, want[:13], atol=1e-5, rtol=1e-5)


@ONLY_5
@pytest.mark.parametrize("budget", [None, 7])
def test_mixed_batch_matches_peft(budget, granite, prompts):
    """The base and four adapters (attention; the mixers' in_proj / out_proj; every
    linear, the shared MLP's too; the experts, target_parameters) over two slots; budget 7: prompts prefilled in chunks
    that carry the state, beside other sequences' decodes."""
    base, adapters = granite
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=16, block_size=8,
                   max_num_batched_tokens=budget)
    assert max(len(p) for p in prompts) > 7
    check_mixed_batch(llm, base, adapters, prompts, extra=3)
    engine = llm.llm_engine
    assert engine.block_manager.states is not None  # prefix caching with state snapshots
    if budget:
        assert engine.model_runner.num_mixed_steps > 0
    assert engine.model_runner.mamba_state.num_free_slots == engine.model_runner.max_num_seqs


@ONLY_5
def test_staggered_arrivals(granite, prompts):
    """Requests arriving while others decode (budget 6): steps that prefill chunks of some
    sequences and decode others, each sequence's rows from its own state slot."""
    base, adapters = granite
    reqs = lora_requests(adapters)
    llm = make_llm(base, enable_lora=True, max_loras=3, max_lora_rank=16, block_size=8,
                   max_num_batched_tokens=6)
    names = [None, "r8_mamba", "r16_all", "r4_attn", None]
    jobs = [(2 * i, prompts[(i + 2) % len(prompts)], reqs[n] if n else None)
            for i, n in enumerate(names)]
    outs, mixed = run_staggered(llm.llm_engine, jobs, GREEDY)
    assert mixed > 0
    check_against_hf(outs, base, [adapters[n] if n else None for n in names],
                     [p for _, p, _ in jobs])


@ONLY_5
def test_rope_dense_untied_variant(tiny_root, prompts):
    """position_embedding_type "rope", no experts (num_local_experts 0: the shared MLP
    alone), lm_head untied, attention first: the base and an adapter on the shared MLP."""
    base = make_hybrid(tiny_root / "granite_hybrid_dense" / "base", seed=70,
                       position_embedding_type="rope", num_local_experts=0,
                       tie_word_embeddings=False, layer_types=LAYER_TYPES[::-1])
    adapters = {"r8_mlp": make_peft_adapter(
        base, tiny_root / "granite_hybrid_dense" / "r8_mlp", r=8, lora_alpha=16,
        target_modules=["input_linear", "output_linear", "lm_head"], seed=71)}
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8, block_size=8,
                   max_num_batched_tokens=9)
    layers = llm.llm_engine.model.model.layers
    assert layers[0].self_attn.rotary is not None and layers[0].block_sparse_moe is None
    check_mixed_batch(llm, base, adapters, prompts, extra=2)


@ONLY_5
def test_attention_only_micro(tiny_root, prompts):
    """Granite 4.0 -micro's shape: the same class with attention layers only (rope, dense):
    no state slots, prefix caching kept on, a shared prefix served from the cache."""
    base = make_hybrid(tiny_root / "granite_micro" / "base", seed=72, num_local_experts=0,
                       position_embedding_type="rope", layer_types=[ATTENTION] * 2,
                       num_hidden_layers=2)
    llm = make_llm(base, block_size=8)
    engine = llm.llm_engine
    assert engine.model_runner.mamba_state is None and engine.block_manager.enable_caching
    batch = [prompts[-1], prompts[-1] + prompts[1][1:]]
    outs = [llm.generate([{"prompt_token_ids": p}], GREEDY, use_tqdm=False)[0] for p in batch]
    assert outs[1].num_cached_tokens > 0
    check_against_hf(outs, base, [None, None], batch)


@pytest.mark.parametrize("config,extra", [("GraniteMoeConfig", {}),
                                          ("GraniteMoeSharedConfig",
                                           {"shared_intermediate_size": 96})])
@ONLY_5
def test_granite3_moe(config, extra, tiny_root, prompts):
    """Granite 3.x MoE (GraniteMoeForCausalLM; GraniteMoeSharedForCausalLM with the shared
    MLP), attention only: the same layers without mixers. The base and adapters on every
    linear and on the experts, in chunks."""
    import transformers

    out = tiny_root / config
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    cfg = getattr(transformers, config)(
        vocab_size=len(tok), hidden_size=64, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, embedding_multiplier=2.0, residual_multiplier=0.5,
        attention_multiplier=0.2, logits_scaling=1.5, attention_bias=True,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        **extra)
    torch.manual_seed(73)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _reinit_(model, 73, 0.2)
    model.eval().save_pretrained(str(out / "base"))
    tok.save_pretrained(str(out / "base"))
    base = out / "base"
    adapters = {"r8_all": make_peft_adapter(base, out / "r8_all", r=8, lora_alpha=16,
                                            target_modules="all-linear", seed=74),
                "r4_experts": make_peft_adapter(
                    base, out / "r4_experts", r=4, lora_alpha=8, target_modules=["v_proj"],
                    target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                    seed=75)}
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=8, block_size=8,
                   max_num_batched_tokens=9)
    layer = llm.llm_engine.model.model.layers[0]
    assert (layer.shared_mlp is not None) == bool(extra) and layer.mamba is None
    check_mixed_batch(llm, base, adapters, prompts, extra=2)


@ONLY_5
def test_preemption_recomputes_the_state(granite, prompts):
    """A KV cache of 12 blocks of 8 for 6 requests: preempted sequences give their state
    slot back and recompute from the prompt (their first chunk from zeros) exactly."""
    base, adapters = granite
    check_preemption(base, adapters, [None, "r16_all", "r8_mamba", None, "r4_attn", "r16_all"],
                     prompts, max_tokens=24, max_loras=3, max_lora_rank=16, num_blocks=12)


def check_preemption(base: Path, adapters: dict[str, Path], names: list[str | None],
                     prompts: list[list[int]], *, max_tokens: int = 20, max_loras: int = 2,
                     max_lora_rank: int = 8, num_blocks: int = 10, shift: int = 0) -> None:
    """`names`' requests (None: the base) in a KV cache of `num_blocks` blocks of 8: some
    are preempted, give their state slot back and recompute from the prompt exactly (the
    hybrid tests' check, tests/test_mamba_hybrids.py's and test_nemotron_moe.py's too)."""
    reqs = lora_requests(adapters)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                            logprobs=1)
    llm = make_llm(base, enable_lora=True, max_loras=max_loras, max_lora_rank=max_lora_rank,
                   max_model_len=64, num_gpu_blocks_override=num_blocks, block_size=8,
                   max_num_batched_tokens=16)
    batch = [prompts[(i + shift) % len(prompts)] for i in range(len(names))]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params,
                        lora_request=[reqs[n] if n else None for n in names], use_tqdm=False)
    engine = llm.llm_engine
    assert engine.scheduler.num_preemptions > 0
    assert engine.model_runner.mamba_state.num_free_slots == engine.model_runner.max_num_seqs
    check_against_hf(outs, base, [adapters[n] if n else None for n in names], batch)


@ONLY_5
def test_abort_frees_the_state_slot(granite, prompts):
    """Two slots, both in use; aborting one frees its slot, which a new request then takes
    (holding the aborted one's state: a first chunk starts from zeros) and runs exactly."""
    base, adapters = granite
    llm = make_llm(base, max_num_seqs=2, block_size=8)
    engine = llm.llm_engine
    state = engine.model_runner.mamba_state
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=3)
    engine.add_request("a", {"prompt_token_ids": prompts[3]}, long)
    engine.add_request("b", {"prompt_token_ids": prompts[2]}, GREEDY)
    for _ in range(3):
        engine.step()
    assert state.num_free_slots == 0
    slots = set(state.slot_of.values())
    engine.abort_request("a")
    assert state.num_free_slots == 1
    engine.add_request("c", {"prompt_token_ids": prompts[1]}, GREEDY)
    finished = {}
    while engine.has_unfinished_requests():
        outs = engine.step()
        if "c" not in finished and state.slot_of:
            assert set(state.slot_of.values()) <= slots  # c took a's slot
        finished.update((o.request_id, o) for o in outs if o.finished)
    assert state.num_free_slots == 2
    check_against_hf([finished["b"], finished["c"]], base, [None, None], prompts[2:0:-1])


@ONLY_5
def test_shared_prompts_share_the_cached_prefix(granite, prompts):
    """n = 2 greedy siblings admitted in one step each run their own prefill (nothing is
    cached yet); the same prompt again starts after the cached blocks from the state
    snapshot kept there (tests/test_hybrid_prefix_cache.py); all equal HF."""
    base, _ = granite
    llm = make_llm(base, block_size=8)
    prompt = prompts[-1]
    assert len(prompt) > 16  # full blocks the prefix cache shares
    want = hf_greedy(base, None, prompt, 6)
    params = SamplingParams(n=2, temperature=0.0, max_tokens=6, ignore_eos=True)
    for cached in (0, (len(prompt) - 1) // 8 * 8):
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        assert [list(c.token_ids) for c in out.outputs] == [want, want]
        assert out.num_cached_tokens == cached


@ONLY_5
def test_state_memory_and_refusals(granite):
    """The state slots of max_num_seqs sequences come out of the cache budget first (the
    KV blocks get the rest); max_num_seqs is lowered to the sequences that fit, and a
    budget for none is refused; speculative decoding is refused."""
    base, _ = granite
    # (prefix caching off: its state snapshots take budget too, test_hybrid_prefix_cache.py)
    runner = make_llm(base, max_num_seqs=64, cpu_kv_cache_gib=0.004, block_size=8,
                      enable_prefix_caching=False).llm_engine.model_runner
    per_slot = state_bytes_per_slot(runner.mixers, torch.float32)
    conv_dim = 128 + 2 * GROUPS * 16  # x, B, C
    assert per_slot == 2 * (conv_dim * 3 + 4 * 32 * 16) * 4  # conv + SSM states, 2 mixers, fp32
    assert runner.num_blocks == (int(0.004 * 2**30) - 64 * per_slot) // runner._bytes_per_block()
    # 256 sequences' states do not fit: max_num_seqs drops to those whose states fit
    # beside one max_model_len KV cache (the scheduler's too); a budget for none is refused
    engine = make_llm(base, max_num_seqs=256, cpu_kv_cache_gib=0.004, block_size=8,
                      enable_prefix_caching=False).llm_engine
    kv = 32 * engine.model_runner._bytes_per_block()  # max_model_len 256 in blocks of 8
    fit = (int(0.004 * 2**30) - kv) // per_slot
    assert 1 < fit < 256
    assert engine.model_runner.max_num_seqs == engine.config.scheduler_config.max_num_seqs \
        == engine.model_runner.mamba_state.num_free_slots == fit
    with pytest.raises(ValueError, match="cannot hold one sequence: a Mamba state slot"):
        make_llm(base, cpu_kv_cache_gib=per_slot / 2**30)
    with pytest.raises(ValueError, match="speculative decoding is not supported for hybrid"):
        make_llm(base, speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                           "prompt_lookup_max": 3})


@ONLY_5
def test_server_adapter_by_model(granite, prompts):
    """`loraplex serve` with an adapter: the base and the adapter by `model` through the
    openai client equal HF + PEFT; an unknown model is a 404 and the server carries on."""
    base, adapters = granite
    args = ["--enable-lora", "--max-lora-rank", "16", "--dtype", "float32",
            "--max-model-len", "128", "--cpu-kv-cache-gib", "0.05",
            "--max-num-batched-tokens", "8",
            "--lora-modules", f"r16_all={adapters['r16_all']}"]
    with RemoteServer(base, args) as server:
        client = server.get_client()
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt=prompts[0], max_tokens=2)
        for model, adapter in ((str(base), None), ("r16_all", adapters["r16_all"])):
            r = client.completions.create(
                model=model, prompt=prompts[3], max_tokens=6, temperature=0, logprobs=1,
                extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
            assert token_ids_of(r.choices[0].logprobs) == hf_greedy(base, adapter,
                                                                    prompts[3], 6)
