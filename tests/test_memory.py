"""The adapter slots and the KV cache share one budget; configs that cannot work are refused.
(The CPU budget, cpu_kv_cache_gib: these engines run on the CPU even where a GPU exists.)"""

from __future__ import annotations

import platform
import sys

import pytest

from loraplex import LoRARequest
from tests.engine_utils import make_llm


def _slot_buffer_bytes(engine) -> int:
    total = 0
    for layer in engine.lora_manager.layers.values():
        total += layer.lora_a_stacked.numel() * layer.lora_a_stacked.element_size()
        total += sum(b.numel() * b.element_size() for b in layer.lora_b_stacked)
    extra = engine.lora_manager.extra_vocab  # the rows of added tokens (default: 256)
    if extra is not None:
        total += sum(b.numel() * b.element_size()
                     for b in (extra.input_embeddings, extra.output_embeddings))
    return total


def test_slots_come_out_of_the_cpu_budget(tiny_models):
    kw = dict(cpu_kv_cache_gib=0.04, max_num_seqs=4096, max_model_len=128, device="cpu")
    few = make_llm(tiny_models["llama"], enable_lora=True, max_loras=1, max_lora_rank=16, **kw)
    many = make_llm(tiny_models["llama"], enable_lora=True, max_loras=64, max_lora_rank=16,
                    **kw)
    for llm in (few, many):
        plan = llm.llm_engine.memory
        assert plan.lora_slot_bytes == _slot_buffer_bytes(llm.llm_engine)
        assert plan.kv_bytes + plan.lora_slot_bytes <= int(0.04 * 2**30)
        assert plan.budget_bytes - plan.kv_bytes - plan.lora_slot_bytes < plan.kv_block_bytes
    assert many.llm_engine.model_runner.num_blocks < few.llm_engine.model_runner.num_blocks
    plan = many.llm_engine.memory
    # how many slots of a rank fit: the slots, plus what the KV cache beyond one sequence holds
    spare_kv = plan.kv_bytes - (128 // plan.block_size) * plan.kv_block_bytes
    assert plan.max_slots(16) == (plan.lora_slot_bytes + spare_kv) // plan.slot_bytes(16)
    # a slot costs its rank's A/B plus the added-token rows, whatever the rank
    assert plan.slot_bytes(8) == 8 * plan.bytes_per_rank + plan.fixed_slot_bytes > 0
    assert plan.max_slots(8) == (plan.lora_slot_bytes + spare_kv) // plan.slot_bytes(8) \
        > plan.max_slots(16)
    assert "slots this budget could hold by rank" in plan.describe(16)


def test_config_that_cannot_work_is_refused(tiny_models):
    with pytest.raises(ValueError, match="adapter slots need .* lower max_loras"):
        make_llm(tiny_models["llama"], enable_lora=True, max_loras=4096, max_lora_rank=64,
                 cpu_kv_cache_gib=0.01, device="cpu")
    plan = make_llm(tiny_models["llama"], enable_lora=True, max_loras=1, max_lora_rank=64,
                    cpu_kv_cache_gib=0.01, device="cpu").llm_engine.memory
    # a budget where 20 slots leave KV for 128 tokens: max_model_len=256 cannot work
    budget = 20 * plan.slot_bytes(64) + (128 // plan.block_size) * plan.kv_block_bytes
    with pytest.raises(ValueError, match="holds 128 tokens after the adapter slots took"):
        make_llm(tiny_models["llama"], enable_lora=True, max_loras=20, max_lora_rank=64,
                 cpu_kv_cache_gib=budget / 2**30, max_model_len=256, device="cpu")
    make_llm(tiny_models["llama"], enable_lora=True, max_loras=20, max_lora_rank=64,
             cpu_kv_cache_gib=budget / 2**30, max_model_len=128, device="cpu")  # this one fits


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                    reason="mallopt thresholds are glibc's")
def test_cpu_engine_keeps_freed_memory_with_glibc():
    """glibc accepts the thresholds that keep freed activation buffers in the heap."""
    from loraplex.worker.cpu_allocator import KEEP_BYTES, keep_freed_memory

    assert keep_freed_memory(KEEP_BYTES)


def test_host_tier_bound_is_a_full_slot_per_adapter(tiny_models, tiny_adapters, tmp_path):
    """The host tier keeps adapters in the slot layout: an adapter on every LoRA layer
    (all linears, the embedding and lm_head) at max_lora_rank takes exactly one slot's
    bytes, a smaller one less, and the start-up line bounds the tier by max_cpu_loras
    such slots."""
    from tests.fixtures import make_peft_adapter

    base = tiny_models["llama"]
    # no added-token rows here (tests/test_added_tokens.py counts them): a slot is its ranks
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=8,
                   max_cpu_loras=5, device="cpu", lora_extra_vocab_size=0)
    engine = llm.llm_engine
    ad = {**tiny_adapters["llama"], "everything": make_peft_adapter(
        base, tmp_path / "everything", r=8, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
            "embed_tokens", "lm_head"])}
    plan, manager = engine.memory, engine.lora_manager

    def host_bytes(name: str, lora_int_id: int) -> int:
        packed = manager.prepare(LoRARequest(name, lora_int_id, str(ad[name])))
        return sum(t.numel() * t.element_size() for pair in packed.layers.values()
                   for t in pair if t is not None)  # (None: no DoRA scales)
    assert host_bytes("everything", 1) == plan.slot_bytes(8)
    vocab_layers = sum(manager.layers[n].slot_bytes_per_rank()
                       for n in ("model.embed_tokens", "lm_head"))
    assert host_bytes("r8_all", 3) == plan.slot_bytes(8) - 8 * vocab_layers
    assert 0 < host_bytes("r4_qv", 2) < plan.slot_bytes(8)
    assert plan.host_tier_bytes(5, 8) == 5 * plan.slot_bytes(8)
    assert "host tier: 5 adapters" in plan.describe(8, 5)
