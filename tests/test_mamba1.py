"""Mamba-1 models: Mamba, FalconMamba and Jamba (layers/mamba1.py, models/mamba1.py)
against HF transformers + PEFT (fp32).

Tiny random models, hidden 64, mixers of d_inner 128, 8 states, convolutions of 4 taps,
dt rank 6, scans of 4 rows at a time (several per prompt chunk):
- Mamba: 2 mixer layers, tied embeddings; FalconMamba: the same with its weightless
  norms on dt, B and C.
- Jamba: mixer, attention, mixer, mixer (attn_layer_period 3, offset 1); layers 1 and 3
  a mixture of 4 experts of 48, 2 per token (softmax top-k, not renormalized), the
  others a SwiGLU MLP of 48; weighted dt / B / C norms.
Each: the mixers alone against HF's layer (a prompt in chunks carrying the state, then
decode steps); the base and adapters of ranks 4 (in_proj / x_proj, Jamba's q / v too) and
8 (Mamba: with the embeddings; Jamba: every linear and its experts, PEFT's
target_parameters), in one batch, prompts prefilled in chunks of 7 beside other
sequences' decodes; preemption. PEFT refuses out_proj on Mamba and FalconMamba, and HF 5
computes dt from dt_proj.weight directly (PEFT's dt_proj LoRA never runs there), so an
adapter on dt_proj and out_proj (and Jamba's router) is checked against HF on the merged
weights. An adapter of too high a rank is refused alone, in the engine and over HTTP;
prefix caching with state snapshots, speculative decoding refused; a Jamba without experts, and one
whose checkpoint fuses its experts (transformers 5's in-memory layout).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from loraplex import LoRARequest
from loraplex.layers.mamba1 import Mamba1Args, Mamba1Mixer
from loraplex.worker.mamba_state import state_bytes_per_slot
from tests.engine_utils import GREEDY, check_against_hf, check_mixed_batch, make_llm
from tests.fixtures import _reinit_, load_hf_model, make_tokenizer
from tests.handmade_lora import (
    fused_experts_checkpoint,
    merged_checkpoint,
    write_lora_adapter,
)
from tests.server_utils import check_rank_refused
from tests.test_hybrid import check_preemption, mixer_in_chunks

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
HIDDEN, INNER, STATES, RANK, EXPERTS = 64, 128, 8, 6, 4
MIXER = dict(hidden_size=HIDDEN, state_size=STATES, conv_kernel=4, expand=2,
             time_step_rank=RANK, bos_token_id=1, eos_token_id=2, pad_token_id=3)


def mamba_config(vocab_size: int):
    return transformers.MambaConfig(vocab_size=vocab_size, num_hidden_layers=2, **MIXER,
                                    tie_word_embeddings=True)


def falcon_mamba_config(vocab_size: int):
    return transformers.FalconMambaConfig(vocab_size=vocab_size, num_hidden_layers=2,
                                          **MIXER, mixer_rms_eps=1e-5,
                                          tie_word_embeddings=False)


def jamba_config(vocab_size: int):
    return transformers.JambaConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=48,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        attn_layer_period=3, attn_layer_offset=1, expert_layer_period=2,
        expert_layer_offset=1, num_experts=EXPERTS, num_experts_per_tok=2,
        mamba_d_state=STATES, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=RANK,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        tie_word_embeddings=False,
        **({} if TRANSFORMERS_5 else {"use_mamba_kernels": False}))  # (4.x: else refused
    # without CUDA kernels; 5.x picks the torch path itself)


CONFIGS = {"mamba": mamba_config, "falcon_mamba": falcon_mamba_config, "jamba": jamba_config}
# the PEFT adapters of each, ranks 4 and 8 (no out_proj on Mamba / FalconMamba: PEFT
# refuses it; no dt_proj anywhere: HF 5 never runs its LoRA)
JAMBA_ALL = ["in_proj", "x_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj",
             "gate_proj", "up_proj", "down_proj"]
ADAPTER_TARGETS = {
    "mamba": (["in_proj", "x_proj"], ["in_proj", "x_proj", "embeddings"], None),
    "falcon_mamba": (["in_proj", "x_proj"], ["in_proj", "x_proj", "embeddings"], None),
    "jamba": (["in_proj", "x_proj", "q_proj", "v_proj"], JAMBA_ALL,
              ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]),
}


def _skip_reason(kind: str) -> str | None:
    if kind == "jamba" and not TRANSFORMERS_5:
        return ("Jamba is checked against transformers 5 (4.x's holds its experts as "
                "modules, another PEFT layout)")
    if not TRANSFORMERS_5:
        return ("transformers 4's Mamba returns its state as cache_params, no "
                "past_key_values, which the HF reference (fixtures.hf_greedy) threads")
    return None


# Jamba's weights drawn smaller: at 0.2 its hidden states grow into the thousands and fp32
# rounding alone moves a logprob by ~1e-4 (HF against itself summed in another order);
# at 0.1 ours are within 1e-5 of HF's
INIT_STD = {"jamba": 0.1}


def make_model(out: Path, kind: str, seed: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind](len(tok)), dtype=torch.float32)
    _reinit_(model, seed, INIT_STD.get(kind, 0.2))
    model.eval().save_pretrained(str(out))
    return out


def make_adapter(base: Path, out: Path, r: int, targets: list[str],
                 parameters: list[str] | None, seed: int) -> Path:
    """A PEFT adapter with random A and B (PEFT's B starts at zeros)."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    extra = {"target_parameters": parameters} if parameters else {}
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r,
                                             target_modules=targets, lora_dropout=0.0,
                                             **extra))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module", params=list(CONFIGS))
def mamba1(request, tiny_root: Path) -> tuple[str, Path, dict[str, Path]]:
    kind = request.param
    if (reason := _skip_reason(kind)) is not None:
        pytest.skip(reason)
    seed = 300 + 10 * list(CONFIGS).index(kind)
    root = tiny_root / f"mamba1_{kind}"
    base = make_model(root / "base", kind, seed)
    small, every, parameters = ADAPTER_TARGETS[kind]
    return kind, base, {
        "r4_mixer": make_adapter(base, root / "r4_mixer", 4, small, None, seed + 1),
        "r8_all": make_adapter(base, root / "r8_all", 8, every, parameters, seed + 2)}


def _hf_mixer(kind: str):
    """HF's mixer of `kind` and our args for it."""
    if kind == "jamba":
        from transformers.models.jamba.modeling_jamba import JambaMambaMixer
        cfg = jamba_config(64)
        return JambaMambaMixer(cfg, 0), "weighted", cfg.rms_norm_eps
    if kind == "falcon_mamba":
        from transformers.models.falcon_mamba.modeling_falcon_mamba import FalconMambaMixer
        cfg = falcon_mamba_config(64)
        try:  # (transformers 5.25's initializes its norms before it builds them: skipped)
            hf = FalconMambaMixer(cfg, 0, initialize_mixer_weights=False)
        except TypeError:  # 4.x's has no such argument
            hf = FalconMambaMixer(cfg, 0)
        return hf, "plain", cfg.mixer_rms_eps
    from transformers.models.mamba.modeling_mamba import MambaMixer
    return MambaMixer(mamba_config(64), 0), "", 1e-6


@pytest.mark.parametrize("kind", list(CONFIGS))
@torch.no_grad()
def test_mixer_matches_hf_layer(kind):
    """A 30-token input through HF's mixer at once, and through ours as a prompt in chunks
    of 13 and 14 (each from the state the last left, scanned 4 rows at a time) and 3
    decode steps (the recurrence); a fresh first chunk ignores what the slot held."""
    torch.manual_seed(1)
    hf, norm, eps = _hf_mixer(kind)
    for name, p in hf.named_parameters():
        p.copy_(1 + 0.1 * torch.randn(p.shape) if "layernorm" in name
                else 0.3 * torch.randn(p.shape))
    ours = Mamba1Mixer(HIDDEN, Mamba1Args(INNER, STATES, 4, RANK, bcdt_norm=norm,
                                          norm_eps=eps, scan_chunk=4))
    ours.load_state_dict(hf.state_dict())
    ours.conv_state, ours.ssm_state = torch.zeros(3, INNER, 3), torch.zeros(3, INNER, STATES)
    x = torch.randn(30, HIDDEN)
    want = hf(x[None])[0]
    got, again = mixer_in_chunks(ours, x)
    scale = want.abs().max()  # (random weights of 0.3: outputs in the hundreds)
    torch.testing.assert_close(got / scale, want / scale, atol=1e-6, rtol=0)
    torch.testing.assert_close(again / scale, want[:13] / scale, atol=1e-6, rtol=0)


def test_mixed_batch_in_chunks(mamba1, prompts):
    """The base and both adapters over two slots, prompts prefilled in chunks of 7 (each
    from the state the last left) beside other sequences' decodes: HF + PEFT's tokens
    and logprobs."""
    kind, base, adapters = mamba1
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=8, block_size=8,
                   max_num_batched_tokens=7)
    assert max(len(p) for p in prompts) > 7
    check_mixed_batch(llm, base, adapters, prompts, extra=3)
    runner = llm.llm_engine.model_runner
    assert runner.num_mixed_steps > 0
    assert runner.mamba_state.num_free_slots == runner.max_num_seqs
    assert all(isinstance(m, Mamba1Mixer) for m in runner.mixers)
    assert len(runner.mixers) == {"mamba": 2, "falcon_mamba": 2, "jamba": 3}[kind]
    assert len(runner.attention_layers) == (1 if kind == "jamba" else 0)
    assert runner.mixers[0].ssm_state.shape == (runner.max_num_seqs, INNER, STATES)
    assert state_bytes_per_slot(runner.mixers, torch.float32) == \
        len(runner.mixers) * INNER * (3 + STATES) * 4
    if kind == "jamba":  # experts in layers 1 and 3
        layers = llm.llm_engine.model.model.layers
        assert [hasattr(layer.feed_forward, "experts") for layer in layers] == \
            [False, True, False, True]
    else:  # no attention: KV blocks of no bytes
        assert runner._bytes_per_block() == 0


def test_preemption_recomputes_the_state(mamba1, prompts):
    """10 KV blocks of 8 for 5 requests: preempted sequences give their state slot back
    and recompute their conv and SSM states from the prompt exactly."""
    kind, base, adapters = mamba1
    check_preemption(base, adapters, [None, "r8_all", "r4_mixer", None, "r8_all"], prompts,
                     shift=1)


# each kind's modules that a hand-written adapter targets (HF module path under the
# model, in, out): the mixers' dt_proj and out_proj, and Jamba's router
def _direct_targets(kind: str) -> list[tuple[str, int, int]]:
    if kind != "jamba":
        return [(f"backbone.layers.{i}.mixer.{leaf}", d_in, d_out) for i in range(2)
                for leaf, d_in, d_out in (("dt_proj", RANK, INNER),
                                          ("out_proj", INNER, HIDDEN))]
    return [(f"model.layers.{i}.mamba.{leaf}", d_in, d_out) for i in (0, 2, 3)
            for leaf, d_in, d_out in (("dt_proj", RANK, INNER), ("out_proj", INNER, HIDDEN))
            ] + [(f"model.layers.{i}.feed_forward.router", HIDDEN, EXPERTS) for i in (1, 3)]


def direct_adapter(kind: str, base: Path, out: Path, r: int, seed: int) -> Path:
    """LoRA on dt_proj and out_proj (and Jamba's router), written directly (PEFT refuses
    or does not run some of them here)."""
    targets = ["dt_proj", "out_proj"] + (["router"] if kind == "jamba" else [])
    return write_lora_adapter(out, _direct_targets(kind), r, seed, targets, base)


@torch.no_grad()
def hf_cached_greedy(base: Path, adapter: Path | None, prompt: list[int], n: int
                     ) -> list[int]:
    """HF's (+ PEFT's) greedy decode carrying its own state cache, which transformers 5's
    Mamba takes as `cache` only: fixtures.hf_greedy's past_key_values never reaches it,
    so check_against_hf checks Mamba's tokens teacher-forced (assert_greedy_close)."""
    model = load_hf_model(base, adapter)
    ids, cache, out = torch.tensor([prompt]), None, []
    for _ in range(n):
        res = model(input_ids=ids, cache=cache, use_cache=True)
        cache = res.cache if hasattr(res, "cache") else res.past_key_values
        out.append(int(res.logits[0, -1].argmax()))
        ids = torch.tensor([[out[-1]]])
    return out


def test_dt_proj_out_proj_router_adapter(mamba1, tmp_path, prompts):
    """An adapter on dt_proj and out_proj (and Jamba's router, by its checkpoints' name)
    beside the base and a PEFT one in one batch, prompts in chunks of 7: it matches HF on
    the merged weights, the others HF + PEFT; greedy tokens as HF's cached decode gives
    them too."""
    kind, base, adapters = mamba1
    direct = direct_adapter(kind, base, tmp_path / "direct", r=4, seed=333)
    reqs = {"direct": LoRARequest("direct", 1, str(direct)),
            "r8_all": LoRARequest("r8_all", 2, str(adapters["r8_all"]))}
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=8, block_size=8,
                   max_num_batched_tokens=7)
    batch = [(prompts[0], None), (prompts[0], "direct"), (prompts[1], "r8_all"),
             (prompts[2], "direct")]
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in batch], GREEDY,
                        lora_request=[reqs[n] if n else None for _, n in batch],
                        use_tqdm=False)
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids
    reference = merged_checkpoint(base, direct, tmp_path / "merged")
    check_against_hf([outs[1], outs[3]], reference, [None, None], [prompts[0], prompts[2]])
    check_against_hf([outs[0], outs[2]], base, [None, adapters["r8_all"]],
                     [prompts[0], prompts[1]])
    # the same tokens as HF's own decode with its state cache
    for out, ref, adapter, prompt in ((outs[0], base, None, prompts[0]),
                                      (outs[1], reference, None, prompts[0]),
                                      (outs[2], base, adapters["r8_all"], prompts[1])):
        got = out.outputs[0].token_ids
        assert got == hf_cached_greedy(ref, adapter, prompt, len(got))


def test_rank_too_high_fails_alone(mamba1, prompts):
    """With max_lora_rank 4 the rank-8 adapter is refused by name, in the engine and over
    HTTP (a 400 in OpenAI's shape); the rank-4 one and the base serve after it."""
    kind, base, adapters = mamba1
    if kind != "mamba":
        pytest.skip("one server is enough: Mamba's")
    check_rank_refused(base, ("r4_mixer", adapters["r4_mixer"]), ("r8_all", adapters["r8_all"]),
                       prompts)


def test_hybrid_refusals(mamba1):
    """A state per sequence: prefix caching with state snapshots, speculative decoding
    refused."""
    kind, base, _ = mamba1
    if kind != "jamba":
        pytest.skip("the same rule for all three: Jamba's")
    llm = make_llm(base)
    assert llm.llm_engine.block_manager.states is not None
    with pytest.raises(ValueError, match="speculative decoding is not supported for hybrid"):
        make_llm(base, speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                           "prompt_lookup_max": 3})


def test_jamba_without_experts(tiny_root, prompts):
    """num_experts 1: every feed-forward a SwiGLU MLP (no router, no experts), attention
    in every other layer."""
    if (reason := _skip_reason("jamba")) is not None:
        pytest.skip(reason)
    root = tiny_root / "jamba_dense"
    tok = make_tokenizer(root / "base")
    cfg = jamba_config(len(tok))
    cfg.num_experts, cfg.attn_layer_period, cfg.attn_layer_offset = 1, 2, 1
    torch.manual_seed(350)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _reinit_(model, 350, INIT_STD["jamba"])
    model.eval().save_pretrained(str(root / "base"))
    llm = make_llm(root / "base", max_num_batched_tokens=9, block_size=8)
    runner = llm.llm_engine.model_runner
    assert len(runner.mixers) == 2 and len(runner.attention_layers) == 2
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:3]], GREEDY,
                        use_tqdm=False)
    check_against_hf(outs, root / "base", [None] * 3, prompts[:3])


def test_jamba_fused_experts_load_as_the_hubs(mamba1, tmp_path, prompts):
    """Jamba saved per expert (the hub's layout, transformers 5's save) and with its
    experts fused: the same tokens and logprobs, base and an adapter on the experts."""
    kind, base, adapters = mamba1
    if kind != "jamba":
        pytest.skip("only Jamba has experts")
    assert any(".experts.0.gate_proj." in k for k in load_file(str(base / "model.safetensors")))
    fused = fused_experts_checkpoint(base, tmp_path / "fused",
                                     ("gate_proj", "up_proj", "down_proj"), EXPERTS)
    req = LoRARequest("r8_all", 1, str(adapters["r8_all"]))
    outs = []
    for path in (base, fused):
        llm = make_llm(path, enable_lora=True, max_loras=1, max_lora_rank=8)
        outs.append(llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], GREEDY,
                                 lora_request=[None, req], use_tqdm=False))
    for a, b in zip(*outs, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert la.keys() == lb.keys()
            assert all(abs(la[t].logprob - lb[t].logprob) < 1e-5 for t in la)
