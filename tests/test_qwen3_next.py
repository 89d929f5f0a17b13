"""Qwen3-Next, Qwen3.5 and Qwen3.5-MoE (models/qwen3_next.py: gated DeltaNet layers
beside gated attention) against HF transformers 5 + PEFT (fp32).

Tiny random models, hidden 64, 4 layers (DeltaNet, attention, DeltaNet, attention):
DeltaNets of 2 key heads of 16 and 4 value heads of 8; attention of 4 heads of 16 (2 KV
heads), a quarter of each head rotated, output-gated; Qwen3-Next's and Qwen3.5-MoE's
feed-forward 4 experts of 32, 2 per token, plus a sigmoid-gated shared expert of 48 (Qwen3-
Next's layer 2 a dense MLP: mlp_only_layers); Qwen3.5's a SwiGLU MLP. Each: the base and
adapters of two ranks (the DeltaNets' projections with q / v; every linear and, on the
mixtures, the experts through target_parameters) in one batch, prompts prefilled in
chunks of 7 that carry the state beside other sequences' decodes; then a KV cache too
small for all requests at once, so sequences are preempted and recompute their state.
Qwen3.5's ForConditionalGeneration checkpoint (a vision tower beside the language model)
is served on text: an adapter trained on the whole model, and the server refusing an
image with a 400 and carrying on.
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from loraplex.layers.gated_delta_net import GatedDeltaNet
from loraplex.lora.errors import LoRAError
from loraplex.models.registry import build_model
from tests.engine_utils import check_mixed_batch, lora_requests, make_llm
from tests.fixtures import _reinit_, hf_greedy, make_peft_adapter, make_tokenizer
from tests.server_utils import RemoteServer, token_ids_of
from tests.test_hybrid import check_preemption

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


def qwen3_5_config(vocab_size: int):
    return transformers.Qwen3_5TextConfig(vocab_size=vocab_size, **COMMON, intermediate_size=96)


def qwen3_5_moe_config(vocab_size: int):
    return transformers.Qwen3_5MoeTextConfig(vocab_size=vocab_size, **COMMON, **EXPERTS)


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
    assert runner.num_mixed_steps > 0 and not engine.block_manager.enable_caching
    assert runner.mamba_state.num_free_slots == runner.max_num_seqs
    assert len(runner.attention_layers) == 2
    assert [isinstance(m, GatedDeltaNet) for m in runner.mixers] == [True, True]


def test_preemption_recomputes_the_state(model, prompts):
    """10 KV blocks of 8 for 5 requests: preempted sequences give their state slot back
    and recompute from the prompt exactly."""
    _, base, adapters = model
    check_preemption(base, adapters, [None, "r8_all", "r4_mixer", None, "r8_all"], prompts,
                     max_lora_rank=16)
