"""Bamba, Mamba2 and Nemotron-H (models/mamba_hybrid.py) against HF transformers + PEFT
(fp32).

Tiny random models, hidden 64, mixers of 4 heads of 32 in 2 groups (1 on transformers 4),
16 states, scan chunks of 8: Bamba (mixer, attention, mixer, attention; half of each head
rotated; SwiGLU MLPs), Mamba2 (2 mixers, no attention at all: no KV cache), Nemotron-H
(mixer, attention without positions, squared-ReLU MLP, mixer; one per layer). Each: the
base and adapters of two ranks (the mixers' in_proj / out_proj with attention's q / v,
and every linear) in one batch, prompts prefilled in chunks of 7 that carry the state
beside other sequences' decodes; then a KV cache too small for all requests at once
(Mamba2's: too few blocks, each holding nothing), so sequences are preempted and
recompute their state from the prompt.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from loraplex.layers.mamba2 import Mamba2Args, Mamba2Mixer, MambaBatch
from loraplex.models.registry import build_model
from tests.engine_utils import (
    GREEDY,
    check_against_hf,
    check_mixed_batch,
    make_llm,
)
from tests.fixtures import _reinit_, make_peft_adapter, make_tokenizer
from tests.test_hybrid import check_preemption

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
# transformers 4.56's gated norm normalizes over all groups at once (test_hybrid.py)
GROUPS = 2 if TRANSFORMERS_5 else 1
MAMBA = dict(hidden_size=64, num_hidden_layers=4, max_position_embeddings=512,
             bos_token_id=1, eos_token_id=2, pad_token_id=3)
ATTENTION = dict(num_attention_heads=4, num_key_value_heads=2)


def bamba_config(vocab_size: int):
    return transformers.BambaConfig(
        vocab_size=vocab_size, **MAMBA, **ATTENTION, intermediate_size=96,
        attn_layer_indices=[1, 3], mamba_n_heads=4, mamba_n_groups=GROUPS, mamba_d_state=16,
        mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8, tie_word_embeddings=False)


def mamba2_config(vocab_size: int):
    kw = {k: v for k, v in MAMBA.items() if k != "max_position_embeddings"}
    return transformers.Mamba2Config(
        vocab_size=vocab_size, **{**kw, "num_hidden_layers": 2}, num_heads=4, head_dim=32,
        expand=2, state_size=16, n_groups=GROUPS, conv_kernel=4, chunk_size=8,
        tie_word_embeddings=TRANSFORMERS_5)  # (4.56 cannot save Mamba2's tied lm_head)


def nemotron_h_config(vocab_size: int):
    kw = {k: v for k, v in MAMBA.items() if k != "num_hidden_layers"}
    return transformers.NemotronHConfig(
        vocab_size=vocab_size, **kw, **ATTENTION, head_dim=16, intermediate_size=96,
        layers_block_type=["linear_attention", "full_attention", "mlp", "linear_attention"],
        mamba_num_heads=4, mamba_head_dim=32, ssm_state_size=16, n_groups=GROUPS,
        conv_kernel=4, expand=2, chunk_size=8, tie_word_embeddings=False)


def falcon_h1_config(vocab_size: int):
    """2 layers (each attends beside its mixer), every muP multiplier away from 1, the
    mixers' gated norm after the gate."""
    return transformers.FalconH1Config(
        vocab_size=vocab_size, **{**MAMBA, "num_hidden_layers": 2}, **ATTENTION,
        intermediate_size=96, mamba_d_ssm=None, mamba_n_heads=4, mamba_n_groups=GROUPS,
        mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8,
        mamba_rms_norm=True, mamba_norm_before_gate=True, tie_word_embeddings=False,
        embedding_multiplier=1.5, lm_head_multiplier=0.8, key_multiplier=0.9,
        attention_in_multiplier=1.2, attention_out_multiplier=0.8, mlp_multipliers=[0.7, 1.3],
        ssm_multipliers=[0.5, 1.5, 0.8, 1.2, 0.9], ssm_in_multiplier=1.1,
        ssm_out_multiplier=0.7)


def zamba2_config(vocab_size: int):
    """Mixers, three of them after a shared block: blocks 0, 1, 0 (the last reuses the
    first's weights), each invocation with its own q / k / v and gate_up adapters of rank
    8; rope in the blocks."""
    return transformers.Zamba2Config(
        vocab_size=vocab_size, **MAMBA, num_attention_heads=4, num_key_value_heads=4,
        layers_block_type=["hybrid", "mamba", "hybrid", "hybrid"], intermediate_size=96,
        n_mamba_heads=4, mamba_ngroups=GROUPS, mamba_d_state=16, mamba_d_conv=4,
        mamba_expand=2, chunk_size=8, num_mem_blocks=2, use_shared_attention_adapter=True,
        adapter_rank=8, use_mem_rope=True, tie_word_embeddings=True)


CONFIGS = {"bamba": bamba_config, "mamba2": mamba2_config, "nemotron_h": nemotron_h_config,
           "falcon_h1": falcon_h1_config, "zamba2": zamba2_config}
# the adapters of each, of ranks 4 and 8: the mixers' projections (with attention's q / v
# where there is attention), and every linear. PEFT refuses LoRA on the mixers' out_proj
# of Mamba2 and Nemotron-H (HF's fused kernels read its weight), so theirs leave it out
# (Bamba's and Granite's are checked); Mamba2's second adapter is on its embeddings.
ADAPTER_TARGETS = {
    "bamba": (["in_proj", "out_proj", "q_proj", "v_proj"], "all-linear"),
    "mamba2": (["in_proj"], ["in_proj", "embeddings"]),
    "nemotron_h": (["in_proj", "q_proj", "v_proj"],
                   ["in_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
    "zamba2": (["in_proj", "out_proj", "q_proj", "v_proj"],
               ["in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj",
                "down_proj", "linear"]),
    "falcon_h1": (["in_proj", "q_proj", "v_proj"],
                  ["in_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                   "down_proj"]),
}


# Zamba2's weights and LoRA weights are drawn smaller: at the others' scale its mixers'
# dt falls below its time_step_min, where HF's prefill clamps it and HF's decode does not
# (loraplex clamps in both: test_decode_clamps_dt_as_a_prefill), so the HF reference
# would disagree with itself
INIT_STD, ADAPTER_SCALE = {"zamba2": 0.1}, {"zamba2": 0.1}


def _skip_reason(kind: str) -> str | None:
    if kind == "nemotron_h" and not hasattr(transformers, "NemotronHConfig"):
        return f"transformers {transformers.__version__} has no NemotronH"
    if kind == "zamba2" and not TRANSFORMERS_5:
        return "transformers 4's Zamba2 ties its blocks' adapters per layer (another layout)"
    if kind == "mamba2" and not TRANSFORMERS_5:  # (its cache_params, not past_key_values)
        return "transformers 4's Mamba2 keeps its state apart from past_key_values, which " \
               "the HF reference (fixtures.hf_greedy) threads"
    return None


def make_model(out: Path, kind: str, seed: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind](len(tok)), dtype=torch.float32)
    _reinit_(model, seed, INIT_STD.get(kind, 0.2))
    model.eval().save_pretrained(str(out))
    return out


@pytest.fixture(scope="module", params=list(CONFIGS))
def hybrid(request, tiny_root: Path) -> tuple[str, Path, dict[str, Path]]:
    kind = request.param
    if (reason := _skip_reason(kind)) is not None:
        pytest.skip(reason)
    seed = 80 + 10 * list(CONFIGS).index(kind)
    root = tiny_root / f"mamba_hybrid_{kind}"
    base = make_model(root / "base", kind, seed)
    mixer, every = ADAPTER_TARGETS[kind]
    scale = ADAPTER_SCALE.get(kind, 0.3)
    specs = {"r4_mixer": dict(r=4, lora_alpha=8, target_modules=mixer, seed=seed + 1,
                              scale=scale),
             "r8_all": dict(r=8, lora_alpha=16, target_modules=every, seed=seed + 2,
                            scale=scale)}
    return kind, base, {n: make_peft_adapter(base, root / n, **s) for n, s in specs.items()}


def test_mixed_batch_in_chunks(hybrid, prompts):
    """The base and both adapters over two slots, prompts prefilled in chunks of 7 (each
    from the state the last left) beside other sequences' decodes: HF + PEFT's tokens."""
    kind, base, adapters = hybrid
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=8, block_size=8,
                   max_num_batched_tokens=7)
    assert max(len(p) for p in prompts) > 7
    check_mixed_batch(llm, base, adapters, prompts, extra=3)
    runner = llm.llm_engine.model_runner
    assert runner.num_mixed_steps > 0
    assert runner.mamba_state.num_free_slots == runner.max_num_seqs
    if kind == "zamba2":  # blocks 0, 1, 0: the third's weights are the first's
        blocks = [llm.llm_engine.model.model.layers[i].shared_transformer for i in (0, 2, 3)]
        assert blocks[2].pre_ff_layernorm.weight is blocks[0].pre_ff_layernorm.weight
        assert blocks[1].pre_ff_layernorm.weight is not blocks[0].pre_ff_layernorm.weight
    assert len(runner.attention_layers) == {"bamba": 2, "mamba2": 0, "nemotron_h": 1,
                                            "falcon_h1": 2, "zamba2": 3}[kind]


def test_preemption_recomputes_the_state(hybrid, prompts):
    """10 KV blocks of 8 for 5 requests: preempted sequences give their state slot back
    and recompute from the prompt exactly (Mamba2's blocks hold no bytes, yet count)."""
    kind, base, adapters = hybrid
    check_preemption(base, adapters, [None, "r8_all", "r4_mixer", None, "r8_all"],
                     prompts, shift=1)


def test_mamba2_has_no_kv_cache(tiny_root, prompts):
    """Mamba2 has no attention layer: a KV block costs nothing, so there are as many as
    max_num_seqs sequences of max_model_len take (the scheduler still counts them), the
    budget goes to the state slots, and with no max_model_len given a config without
    max_position_embeddings serves 2048 positions."""
    if (reason := _skip_reason("mamba2")) is not None:
        pytest.skip(reason)
    base = make_model(tiny_root / "mamba2_no_kv" / "base", "mamba2", 95)
    llm = make_llm(base, max_model_len=None, max_num_seqs=4, block_size=8)
    runner = llm.llm_engine.model_runner
    assert not runner.attention_layers and runner._bytes_per_block() == 0
    assert runner.max_model_len == 2048 and runner.num_blocks == 4 * 2048 // 8
    out = llm.generate([{"prompt_token_ids": prompts[2]}], GREEDY, use_tqdm=False)
    check_against_hf(out, base, [None], [prompts[2]])


def test_unsupported_layer_kinds_refused():
    """A layer kind none of these models has is refused by name (Nemotron-H's "moe" layers
    are served: test_nemotron_moe.py)."""
    if (reason := _skip_reason("nemotron_h")) is not None:
        pytest.skip(reason)
    cfg = nemotron_h_config(64)
    cfg.layers_block_type = ["linear_attention", "hybrid", "full_attention", "mlp"]
    cfg.architectures = ["NemotronHForCausalLM"]
    with pytest.raises(ValueError, match=r"layer types \['hybrid'\] are not supported"):
        build_model(cfg)


def test_falcon_h1_without_mixer_norm(tiny_root, prompts):
    """Falcon-H1 with mamba_rms_norm off (y * silu(z), no norm weight in the checkpoint)
    and tied embeddings: the base and an adapter on the mixers and the MLP, in chunks."""
    cfg = falcon_h1_config
    root = tiny_root / "falcon_h1_no_norm"
    tok = make_tokenizer(root / "base")
    model_cfg = cfg(len(tok))
    model_cfg.mamba_rms_norm, model_cfg.tie_word_embeddings = False, True
    torch.manual_seed(96)
    model = AutoModelForCausalLM.from_config(model_cfg, dtype=torch.float32)
    _reinit_(model, 96, 0.2)
    model.eval().save_pretrained(str(root / "base"))
    base = root / "base"
    adapters = {"r8": make_peft_adapter(base, root / "r8", r=8, lora_alpha=16, seed=97,
                                        target_modules=["in_proj", "gate_proj", "down_proj"])}
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8, block_size=8,
                   max_num_batched_tokens=9)
    assert llm.llm_engine.model.model.layers[0].mamba.norm is None
    check_mixed_batch(llm, base, adapters, prompts, extra=2)


@torch.no_grad()
def test_decode_clamps_dt_as_a_prefill():
    """A time_step_limit that clamps most of dt (Zamba2's is (time_step_min, inf)): 12
    tokens as one prefill, and as a prefill of 5 then 7 decode steps, give the same
    outputs and state (a preempted sequence's recompute equals its decode)."""
    torch.manual_seed(3)
    m = Mamba2Args(4, 32, 16, 2, 4, 128, 8, time_step_limit=(0.9, 1.5))
    mixer = Mamba2Mixer(64, m)
    for p in mixer.parameters():
        p.normal_(0, 0.3)
    mixer.conv_state = torch.zeros(2, m.conv_dim, 3)
    mixer.ssm_state = torch.zeros(2, 4, 32, 16)
    x = torch.randn(12, 64)
    want = mixer(x, MambaBatch([(0, 12, 0, True)]))
    got = [mixer(x[:5], MambaBatch([(0, 5, 1, True)]))]
    got += [mixer(x[t:t + 1], MambaBatch([], 0, torch.tensor([1]))) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(got), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixer.ssm_state[1], mixer.ssm_state[0], atol=1e-5, rtol=1e-5)
