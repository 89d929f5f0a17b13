"""Kimi-Linear (models/kimi_linear.py: KDA layers, layers/kda.py, beside latent attention
without positions, DeepSeek-V3's experts) against HF transformers 5 + PEFT (fp32).

A tiny random KimiLinearForCausalLM, hidden 64, 4 layers (KDA, MLA, KDA, MLA): KDA of 4
heads of 16 with a 4-tap conv; MLA of 4 heads (nope 16, rope 8 never rotated, v 12, a
24-wide latent); a dense first layer, then 8 experts of 32 in 4 groups (2 eligible), 2 per
token, a correction bias, a scaling, one shared expert. The hub's names as transformers 5
saves them (block_sparse_moe, w1 / w3 / w2, the forget gate's parameters on the layer).
Adapters of ranks 4 (KDA's projections and MLA's q / kv_b) and 8 (every linear and the
experts through target_parameters): the base and both in one batch over one slot, in
chunks of 5 tokens with a KDA chunk of 4 (so prefill chunks split the rule's chunks);
prefix caching through the state snapshots; a layer-level check of KDA against HF's
layer (prefill in two chunks, then decode steps); a too-high rank refused alone.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from loraplex import LoRARequest, SamplingParams
from loraplex.layers.gated_delta_net import DeltaRuleMixer
from loraplex.layers.kda import KimiDeltaAttention
from loraplex.layers.mamba2 import MambaBatch
from loraplex.lora.errors import LoRAError
from loraplex.models.kimi_linear import kda_args
from loraplex.models.registry import build_model
from tests.engine_utils import GREEDY, check_against_hf, check_mixed_batch, lora_requests, make_llm
from tests.expert_adapters import check_merged_adapter, per_expert_adapter
from tests.fixtures import _reinit_, make_peft_adapter, make_tokenizer
from tests.server_utils import check_rank_refused

pytest.importorskip("transformers.models.kimi_linear",
                    reason=f"transformers {transformers.__version__} has no Kimi-Linear")

LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
CONFIG = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
              kv_lora_rank=24, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16,
              v_head_dim=12, num_experts=8, num_experts_per_token=2, num_shared_experts=1,
              num_expert_group=4, topk_group=2, routed_scaling_factor=2.5,
              layer_types=LAYER_TYPES, mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
              linear_attn_config={"head_dim": 16, "num_heads": 4, "short_conv_kernel_size": 4},
              bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
KDA = ["q_proj", "k_proj", "v_proj", "f_a_proj", "f_b_proj", "b_proj", "g_a_proj",
       "g_b_proj", "o_proj"]
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def kimi_config(vocab_size: int, **overrides):
    return transformers.KimiLinearConfig(vocab_size=vocab_size, **{**CONFIG, **overrides})


def make_model(out: Path, seed: int) -> Path:
    """The tiny base: large-std weights, decays of the hub's range (A in [1, 16])."""
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(kimi_config(len(tok)), dtype=torch.float32)
    _reinit_(model, seed, 0.1)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.self_attn, "forget_gate"):
                gate = layer.self_attn.forget_gate
                gate.A_log.copy_(torch.empty(gate.A_log.shape).uniform_(0, 2.7, generator=gen))
                gate.dt_bias.copy_(torch.randn(gate.dt_bias.shape, generator=gen) - 2)
            if hasattr(layer.mlp, "experts"):
                bias = layer.mlp.gate.e_score_correction_bias
                bias.copy_(0.3 * torch.randn(bias.shape, generator=gen))
    model.eval().save_pretrained(str(out))
    return out


def make_base_and_adapters(root: Path, seed: int) -> tuple[Path, dict[str, Path]]:
    """The tiny base and its adapters of ranks 4 (KDA's projections and kv_b_proj) and 8
    (every linear, the experts through target_parameters)."""
    base = make_model(root / "base", seed)
    specs = {"r4_kda": dict(r=4, lora_alpha=8, target_modules=KDA + ["kv_b_proj"],
                            seed=seed + 1),
             "r8_all": dict(r=8, lora_alpha=16, target_modules="all-linear", seed=seed + 2,
                            target_parameters=EXPERTS)}
    return base, {n: make_peft_adapter(base, root / n, **s) for n, s in specs.items()}


@pytest.fixture(scope="module")
def kimi(tiny_root: Path) -> tuple[Path, dict[str, Path]]:
    return make_base_and_adapters(tiny_root / "kimi_linear", 700)


def _small_kda_chunks(llm, size: int = 4) -> None:
    """The engine's KDA layers with the rule's chunk of `size` (HF's is 64)."""
    for m in llm.llm_engine.model_runner.mixers:
        m.m = replace(m.m, chunk_size=size)


def test_mixed_batch_in_chunks(kimi, prompts):
    """The base and both adapters (more than the one slot) in one batch, prompts prefilled
    in chunks of 5 that split the KDA's chunks of 4, beside other sequences' decodes: HF +
    PEFT's tokens, logprobs within 1e-4."""
    base, adapters = kimi
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8, block_size=8,
                   max_num_batched_tokens=5)
    _small_kda_chunks(llm)
    check_mixed_batch(llm, base, adapters, prompts, extra=3)
    runner = llm.llm_engine.model_runner
    assert runner.num_mixed_steps > 0
    assert [type(m) for m in runner.mixers] == [KimiDeltaAttention] * 2
    assert len(runner.attention_layers) == 2
    assert runner.mamba_state.num_free_slots == runner.max_num_seqs


def test_whole_prompts(kimi, prompts):
    """Whole prompts, the hub's chunk of 64: the base and an adapter as HF + PEFT."""
    base, adapters = kimi
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=8)
    req = lora_requests(adapters)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[-2:]] * 2, GREEDY,
                        lora_request=[None, None, req["r8_all"], req["r4_kda"]],
                        use_tqdm=False)
    check_against_hf(outs, base, [None, None, adapters["r8_all"], adapters["r4_kda"]],
                     prompts[-2:] * 2)


def test_hub_named_expert_adapter(kimi, prompts, tmp_path):
    """LoRA on each expert under the hub's names (block_sparse_moe.experts.N.w1 / w3 / w2,
    vLLM's) beside the base and a PEFT adapter over one slot: as HF computes the merged
    base."""
    base, adapters = kimi
    ref = tmp_path / "merged"
    adapter = per_expert_adapter(base, tmp_path / "hub_experts", ref,
                                 experts=".block_sparse_moe.experts.", leaves=("w1", "w3", "w2"))
    check_merged_adapter(base, ref, adapter, ("r4_kda", adapters["r4_kda"]), prompts)


def _remote_code_name(key: str) -> str:
    """A PEFT key of transformers 5's Kimi-Linear as the hub's remote code (modeling_kimi.py)
    names it: the forget gate's projections on the layer, the experts' block
    `block_sparse_moe`."""
    return key.replace(".forget_gate.", ".").replace(".mlp.shared_experts.",
                                                     ".block_sparse_moe.shared_experts.")


def test_remote_code_named_adapter(kimi, prompts, tmp_path):
    """An adapter trained on the hub's remote code names the forget gate
    `self_attn.f_a_proj` / `f_b_proj` and the shared expert `block_sparse_moe.shared_experts`
    (PEFT on transformers 5 reads those names too): beside the base and the same weights
    under transformers 5's names, over one slot, both give HF + PEFT's tokens."""
    from safetensors.torch import load_file

    from tests.fixtures import edited_copy

    base, _ = kimi
    ours = make_peft_adapter(base, tmp_path / "t5", r=4, lora_alpha=8, seed=703,
                             target_modules=KDA + ["gate_proj", "up_proj", "down_proj"])
    hub = edited_copy(ours, tmp_path / "hub", tensors=lambda t: {
        _remote_code_name(k): v for k, v in t.items()})
    keys = list(load_file(str(hub / "adapter_model.safetensors")))
    assert any(".self_attn.f_b_proj." in k for k in keys)
    assert any(".block_sparse_moe.shared_experts.down_proj." in k for k in keys)
    assert not any("forget_gate" in k or ".mlp.shared" in k for k in keys)
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8)
    reqs = lora_requests({"hub": hub, "t5": ours})
    names = [None, "hub", "t5", "hub"]
    batch = [prompts[0]] * 3 + [prompts[3]]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY,
                        lora_request=[reqs[n] if n else None for n in names], use_tqdm=False)
    check_against_hf(outs, base, [None, ours, ours, ours], batch)
    assert outs[1].outputs[0].token_ids == outs[2].outputs[0].token_ids \
        != outs[0].outputs[0].token_ids


def test_too_high_rank_over_http(kimi, prompts):
    """max_lora_rank 4: the rank-8 adapter is refused by name in the engine and over HTTP
    (a 400 in OpenAI's shape, then a 404), the rank-4 one serves the engine's tokens."""
    base, adapters = kimi
    check_rank_refused(base, ("r4_kda", adapters["r4_kda"]), ("r8_all", adapters["r8_all"]),
                       prompts)


def test_prefix_caching_hits_equal_misses(kimi, prompts):
    """A prompt of several blocks, again (from the cached prefix's state snapshot), and
    under an adapter: the same as the engine without prefix caching, and HF's."""
    base, adapters = kimi
    prompt = prompts[-1] + prompts[2][1:]
    req = lora_requests(adapters)["r4_kda"]
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=2)
    outs = {}
    for caching in (True, False):
        llm = make_llm(base, enable_lora=True, max_lora_rank=8, block_size=8,
                       max_num_batched_tokens=16, enable_prefix_caching=caching)
        runs = [llm.generate([{"prompt_token_ids": prompt}], params, lora_request=lr,
                             use_tqdm=False)[0] for lr in (None, None, req, req)]
        outs[caching] = runs
    hit = outs[True]
    assert [o.num_cached_tokens for o in hit] == [0, len(prompt) // 8 * 8, 0,
                                                    len(prompt) // 8 * 8]
    for got, want in zip(hit, outs[False], strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for lg, lw in zip(got.outputs[0].logprobs, want.outputs[0].logprobs, strict=True):
            assert all(abs(lg[t].logprob - lw[t].logprob) < 1e-5 for t in lw)
    check_against_hf(hit, base, [None, None, adapters["r4_kda"], adapters["r4_kda"]],
                     [prompt] * 4)


def test_kda_layer_against_hf(kimi):
    """One KDA layer with HF's weights: two sequences, each prefilled in two chunks (the
    first splitting the rule's chunk of 4), then three decode steps of both at once, as
    HF's layer computes the whole sequences."""
    from transformers.models.kimi_linear import modeling_kimi_linear as hf_kimi

    base, _ = kimi
    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    hf_layer = hf.model.layers[0].self_attn
    ours = KimiDeltaAttention(64, replace(kda_args(hf.config), chunk_size=4))
    state = {k.removeprefix("forget_gate."): v for k, v in hf_layer.state_dict().items()}
    state["q_conv1d.weight"], state["k_conv1d.weight"], state["v_conv1d.weight"] = \
        state.pop("conv1d.weight").chunk(3)
    ours.load_state_dict(state)
    ours.conv_state = torch.zeros(2, *ours.m.state_shapes()[0])
    ours.ssm_state = torch.zeros(2, *ours.m.state_shapes()[1])
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 13, 64, generator=gen)
    with torch.no_grad():
        want = hf_layer(x)
        got = torch.zeros_like(want)
        for start, end, fresh in ((0, 6, True), (6, 10, False)):
            rows = torch.cat([x[0, start:end], x[1, start:end]])
            n = end - start
            batch = MambaBatch(prefill=[(0, n, 0, fresh), (n, 2 * n, 1, fresh)],
                               decode_start=2 * n, decode_slots=None)
            out = ours(rows, batch)
            got[0, start:end], got[1, start:end] = out[:n], out[n:]
        for pos in range(10, 13):
            batch = MambaBatch(prefill=[], decode_start=0, decode_slots=torch.tensor([0, 1]))
            got[:, pos] = ours(x[:, pos], batch)
    assert isinstance(hf_layer, hf_kimi.KimiLinearDeltaAttention)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_per_channel_rule_is_the_recurrence():
    """The chunked rule with a decay per channel (chunks of 4 over 11 tokens, from a
    non-zero state) equals 11 steps of the recurrence; a per-head decay equals it too."""
    from loraplex.layers.gated_delta_net import chunk_gated_delta_rule, l2_normed
    from loraplex.layers.gated_delta_net import recurrent_gated_delta_step as step

    gen = torch.Generator().manual_seed(5)
    q, k = (l2_normed(torch.randn(11, 2, 8, generator=gen)) for _ in range(2))
    v = torch.randn(11, 2, 6, generator=gen)
    beta = torch.rand(11, 2, generator=gen)
    s0 = torch.randn(2, 8, 6, generator=gen)
    for g in (-torch.rand(11, 2, 8, generator=gen) * 2, -torch.rand(11, 2, 1, generator=gen)):
        o, s = chunk_gated_delta_rule(q, k, v, g, beta, s0, 4)
        state, outs = s0[None], []
        for t in range(11):
            out, state = step(q[t:t + 1], k[t:t + 1], v[t:t + 1], g[t:t + 1], beta[t:t + 1],
                              state)
            outs.append(out[0])
        torch.testing.assert_close(o, torch.stack(outs), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s, state[0], atol=1e-5, rtol=1e-5)


def test_too_high_rank_fails_alone(kimi, prompts, tmp_path):
    """An adapter of rank 16 over max_lora_rank 8 is refused by name at add_request while
    the base and a good adapter are queued in the same engine; they finish as HF + PEFT."""
    base, adapters = kimi
    big = make_peft_adapter(base, tmp_path / "r16", r=16, lora_alpha=16,
                            target_modules=["f_b_proj"], seed=9)
    engine = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8).llm_engine
    good = lora_requests(adapters)["r4_kda"]
    for i, lora in enumerate((None, good)):
        engine.add_request(str(i), {"prompt_token_ids": prompts[1]}, GREEDY, lora_request=lora)
    engine.step()
    with pytest.raises(LoRAError, match="rank 16 > max_lora_rank=8"):
        engine.add_request("bad", {"prompt_token_ids": prompts[0]}, GREEDY,
                           lora_request=LoRARequest("r16", 9, str(big)))
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert sorted(done) == ["0", "1"]
    check_against_hf([done["0"], done["1"]], base, [None, adapters["r4_kda"]],
                     [prompts[1]] * 2)


def test_bfloat16_keeps_dt_bias_fp32(kimi, prompts):
    """In bf16 the forget gate's dt_bias stays fp32, as HF keeps it, and the rest is
    bf16; the model generates."""
    base, _ = kimi
    llm = make_llm(base, dtype="bfloat16")
    kda = llm.llm_engine.model_runner.mixers[0]
    assert kda.dt_bias.dtype == torch.float32
    assert kda.q_proj.weight.dtype == kda.A_log.dtype == torch.bfloat16
    out = llm.generate([{"prompt_token_ids": prompts[2]}], GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == GREEDY.max_tokens


def test_config_flags():
    """What the registry reads: KDA's shape and layers, MLA's dims (no rotation), the
    experts, the dense layer; a layer kind outside the two refused (quantized checkpoints:
    tests/test_kimi_quantized.py)."""
    cfg = kimi_config(64)
    args = build_model(cfg).args
    assert args.mamba_layers == (0, 2) and args.num_attention_layers == 2
    assert (args.kda.num_v_heads, args.kda.head_k_dim, args.kda.conv_dim) == (4, 16, 192)
    assert args.mla.qk_head_dim == 24 and args.mla.scale == 24 ** -0.5
    assert args.dense_layers == (0,) and args.num_experts == 8
    assert (args.grouped_topk.num_groups, args.grouped_topk.topk_groups) == (4, 2)
    assert args.shared_expert_intermediate_size == 32
    model = build_model(cfg)
    assert sum(isinstance(m, DeltaRuleMixer) for m in model.modules()) == 2
    assert {"f_a_proj", "g_b_proj", "b_proj", "kv_b_proj", "experts"} <= set(
        model.lora_target_modules)
    cfg.layer_types = ["linear_attention", "sliding_attention"] + LAYER_TYPES[2:]
    with pytest.raises(ValueError, match=r"layer types \['sliding_attention'\]"):
        build_model(cfg)
