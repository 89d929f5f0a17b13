"""Hybrid Mamba2 + attention models: Granite 4.0 (GraniteMoeHybridForCausalLM) against HF
transformers + PEFT (fp32).

A tiny random GraniteMoeHybrid (mamba, attention, mamba, attention layers; 4 experts, 2
per token, and a shared MLP; NoPE; Granite's multipliers): the Mamba2 mixer alone against
HF's layer (a prompt in chunks that carry the state, then decode steps); the whole model
in mixed batches (base + adapters of different ranks on the attention, the mixers'
in_proj / out_proj and the shared MLP) with chunked prefill and mixed prefill / decode
steps; preemption; the state slot freed by an abort and reused; the memory refusal; the
server with the openai client.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GraniteMoeHybridConfig

from loraplex import LoRARequest, SamplingParams
from loraplex.layers.mamba2 import Mamba2Args, Mamba2Mixer, MambaBatch
from tests.engine_utils import (
    GREEDY,
    check_against_hf,
    check_mixed_batch,
    lora_requests,
    make_llm,
    run_staggered,
)
from tests.fixtures import _reinit_, make_peft_adapter, make_tokenizer

ADAPTERS = {
    "r4_attn": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], seed=61),
    "r8_mamba": dict(r=8, lora_alpha=16, target_modules=["in_proj", "out_proj"], seed=62),
    "r16_all": dict(r=16, lora_alpha=16, target_modules="all-linear", seed=63),
}
LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "full_attention"]


def hybrid_config(vocab_size: int, **overrides) -> GraniteMoeHybridConfig:
    """Mixers of 4 heads of 32 in 2 groups, 16 states, chunks of 8 (several per prompt)."""
    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=48,
              shared_intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
              mamba_n_heads=4, mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4,
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
    m = Mamba2Args(4, cfg.mamba_d_head, 16, 2, 4, 128, 8)
    ours = Mamba2Mixer(64, m)
    ours.load_state_dict(hf.state_dict())
    ours.conv_state = torch.zeros(3, m.conv_dim, 3)
    ours.ssm_state = torch.zeros(3, 4, 32, 16)
    x = torch.randn(30, 64)
    want = hf(x[None])[0]
    got = [ours(x[:13], MambaBatch([(0, 13, 1, True)])),
           ours(x[13:27], MambaBatch([(0, 14, 1, False)]))]
    got += [ours(x[t:t + 1], MambaBatch([], 0, torch.tensor([1]))) for t in range(27, 30)]
    torch.testing.assert_close(torch.cat(got), want, atol=1e-5, rtol=1e-5)
    # a fresh first chunk ignores whatever the slot held
    again = ours(x[:13], MambaBatch([(0, 13, 1, True)]))
    torch.testing.assert_close(again, want[:13], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("budget", [None, 7])
def test_mixed_batch_matches_peft(budget, granite, prompts):
    """The base and three adapters (attention; the mixers' in_proj / out_proj; every
    linear, the shared MLP's too) over two slots; budget 7: prompts prefilled in chunks
    that carry the state, beside other sequences' decodes."""
    base, adapters = granite
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=16, block_size=8,
                   max_num_batched_tokens=budget)
    assert max(len(p) for p in prompts) > 7
    check_mixed_batch(llm, base, adapters, prompts, extra=3)
    engine = llm.llm_engine
    assert not engine.block_manager.enable_caching  # turned off for a hybrid
    if budget:
        assert engine.model_runner.num_mixed_steps > 0
    assert engine.model_runner.mamba_state.num_free_slots == engine.model_runner.max_num_seqs
