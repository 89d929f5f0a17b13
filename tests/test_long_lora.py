"""Long-context LoRA (LongLoRA; vLLM's --long-lora-scaling-factors) against HF + PEFT
(fp32): an adapter whose adapter_config.json context_length is f x the base's
max_position_embeddings is served with rope scaled linearly by f, its reference an HF
model with rope_scaling linear f, in mixed batches with the base and plain adapters (which
keep the base's rope), prompts past the base's length, through decode graphs; refused
by name without the factor, while the engine carries on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from loraplex import LoRARequest
from loraplex.layers.rotary import RotaryEmbedding
from loraplex.lora.errors import LoRAError
from tests.engine_utils import GREEDY, check_against_hf, lora_requests, make_llm
from tests.fixtures import edited_copy, make_peft_adapter, make_tiny_model

BASE_POSITIONS = 64  # the tiny base's max_position_embeddings


@pytest.fixture(scope="module")
def long_models(tiny_root: Path) -> dict[str, Path]:
    """The base (64 positions), the same weights (the same seed) under linear rope x2 and
    x4 (the HF references), a plain adapter, and LongLoRA adapters of 128 and 256 positions."""
    root = tiny_root / "long_lora"
    base = make_tiny_model(root / "base", "llama", seed=40, max_position_embeddings=64)
    out = {"base": base, "plain": make_peft_adapter(base, root / "plain", r=4, seed=41)}
    for f in (2, 4):
        out[f"ref{f}"] = make_tiny_model(root / f"ref{f}", "llama", seed=40,
                                         max_position_embeddings=64,
                                         rope_scaling={"rope_type": "linear",
                                                       "factor": float(f)})
        lora = make_peft_adapter(base, root / f"lora{f}_weights", r=8, seed=41 + f,
                                 target_modules="all-linear")
        out[f"long{f}"] = edited_copy(lora, root / f"long{f}", lambda c, f=f: c.update(
            context_length=BASE_POSITIONS * f))
    return out


def test_the_rope_table_has_a_block_per_factor():
    rope = RotaryEmbedding(8, 16, 10000.0, lora_factors=(2.0, 4.0))
    plain = RotaryEmbedding(8, 64, 10000.0)
    assert rope.lora_offsets == {1.0: 0, 2.0: 64, 4.0: 128} and len(rope.cos) == 3 * 64
    assert torch.equal(rope.cos[:64], plain.cos)
    for f, start in ((2.0, 64), (4.0, 128)):
        linear = RotaryEmbedding(8, 64, 10000.0, {"rope_type": "linear", "factor": f})
        assert torch.allclose(rope.cos[start:start + 64], linear.cos)
        assert torch.allclose(rope.sin[start:start + 64], linear.sin)
    with pytest.raises(ValueError, match="this model's rope is 'llama3'"):
        RotaryEmbedding(8, 16, 10000.0, {"rope_type": "llama3", "factor": 8.0,
                                          "original_max_position_embeddings": 8},
                        lora_factors=(2.0,))


def _check(outs, models, names, batch):
    """Each output against HF + PEFT on its own rope: the base's for the base and plain
    adapters, linear x f for a long-context one."""
    for out, name, prompt in zip(outs, names, batch, strict=True):
        if name is not None and name.startswith("long"):
            base, adapter = models["ref" + name[4:]], models[name]
        else:
            base, adapter = models["base"], models[name] if name else None
        check_against_hf([out], base, [adapter], [prompt])


@pytest.mark.parametrize("budget", [None, 16])
def test_mixed_batch_matches_peft(budget, long_models, prompts):
    """The base, a plain adapter and LongLoRA adapters x2 and x4 in one batch over two
    slots, prompts up to past the base's 64 positions; budget 16: prompts in chunks."""
    llm = make_llm(long_models["base"], enable_lora=True, max_loras=2, max_lora_rank=8,
                   long_lora_scaling_factors=(2.0, 4.0), max_model_len=256,
                   max_num_batched_tokens=budget)
    reqs = lora_requests({n: long_models[n] for n in ("plain", "long2", "long4")})
    long_prompt = (prompts[-1] * 4)[:90]  # 90 + 8 > 64 positions: the base's length passed
    names = ["long4", None, "long2", "plain", "long4", "long2"]
    batch = [prompts[0], prompts[1], prompts[2], prompts[3], long_prompt, prompts[0]]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY, use_tqdm=False,
                        lora_request=[reqs[n] if n else None for n in names])
    _check(outs, long_models, names, batch)
    assert outs[0].outputs[0].token_ids != outs[5].outputs[0].token_ids  # x4 is not x2


def test_through_decode_graphs(monkeypatch, long_models, prompts):
    from tests.test_cuda_graphs import llm_with_decode_graphs

    llm = llm_with_decode_graphs(monkeypatch, long_models["base"], enable_lora=True,
                                 max_loras=2, max_lora_rank=8, max_num_seqs=8, block_size=8,
                                 max_model_len=128, long_lora_scaling_factors=(2.0, 4.0))
    runner = llm.llm_engine.model_runner
    reqs = lora_requests({n: long_models[n] for n in ("plain", "long2", "long4")})
    names = ["long2", None, "plain", "long4"]
    batch = prompts[:4]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY, use_tqdm=False,
                        lora_request=[reqs[n] if n else None for n in names])
    assert runner.cuda_graphs.num_replays > 0 and runner.num_eager_decode_steps == 0
    _check(outs, long_models, names, batch)


def test_refused_without_its_factor(long_models, prompts):
    """Registered or requested without the factor, the adapter fails alone with the flag
    to add in its message; rope_scaling in adapter_config.json is refused, not ignored."""
    plain = make_llm(long_models["base"], enable_lora=True, max_lora_rank=8, max_model_len=64)
    with pytest.raises(LoRAError, match=re.escape(
            "context_length=256 is 4 x the base's 64 positions; start the engine with "
            "--long-lora-scaling-factors including 4")):
        plain.llm_engine.add_lora(LoRARequest("long4", 1, str(long_models["long4"])))
    two = make_llm(long_models["base"], enable_lora=True, max_lora_rank=8,
                   long_lora_scaling_factors=(2.0,), max_model_len=128)
    with pytest.raises(LoRAError, match=re.escape(
            "including 4 (it was started with --long-lora-scaling-factors 2)")):
        two.llm_engine.add_lora(LoRARequest("long4", 1, str(long_models["long4"])))
    engine = two.llm_engine
    engine.add_request("ok", {"prompt_token_ids": prompts[0]}, GREEDY,
                       lora_request=LoRARequest("long2", 2, str(long_models["long2"])))
    while engine.has_unfinished_requests():
        outs = engine.step()
    assert outs[0].error is None
    check_against_hf(outs, long_models["ref2"], [long_models["long2"]], [prompts[0]])


def test_engine_arguments_are_checked(long_models, tmp_path):
    base = long_models["base"]
    with pytest.raises(ValueError, match=re.escape("max_model_len=128 exceeds the model's "
                                                   "limit of 64 positions (long-context")):
        make_llm(base, enable_lora=True, max_model_len=128)
    with pytest.raises(ValueError, match="each factor is how many times longer"):
        make_llm(base, enable_lora=True, long_lora_scaling_factors=(0.5,))
    with pytest.raises(ValueError, match="long_lora_scaling_factors needs enable_lora"):
        make_llm(base, long_lora_scaling_factors=(2.0,))
    llama3 = make_tiny_model(tmp_path / "llama3", "llama", seed=40, max_position_embeddings=64,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                           "original_max_position_embeddings": 32,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0})
    with pytest.raises(ValueError, match="this model's rope is 'llama3'"):
        make_llm(llama3, enable_lora=True, long_lora_scaling_factors=(2.0,), max_model_len=64)
    scaled = edited_copy(long_models["plain"], tmp_path / "rope_scaling", lambda c: c.update(
        rope_scaling={"type": "linear", "factor": 2}))
    llm = make_llm(base, enable_lora=True, max_lora_rank=8, long_lora_scaling_factors=(2.0,),
                   max_model_len=64)
    with pytest.raises(LoRAError, match="rope_scaling=.* is not read"):
        llm.llm_engine.add_lora(LoRARequest("scaled", 1, str(scaled)))


def test_over_http(long_models, prompts):
    """`loraplex serve --long-lora-scaling-factors 4 --max-model-len 256` with a LongLoRA
    adapter and a plain one: each by name with the openai client equals HF + PEFT on its
    own rope, a prompt past the base's 64 positions included."""
    from tests.fixtures import hf_greedy
    from tests.server_utils import RemoteServer, token_ids_of

    args = ["--served-model-name", "tiny", "--enable-lora", "--max-lora-rank", "8",
            "--dtype", "float32", "--max-model-len", "256", "--cpu-kv-cache-gib", "0.05",
            "--long-lora-scaling-factors", "4.0", "--lora-modules",
            f"long4={long_models['long4']}", f"plain={long_models['plain']}"]
    long_prompt = (prompts[-1] * 4)[:80]
    with RemoteServer(long_models["base"], args) as server:
        client = server.get_client()
        for model, base, adapter, prompt in (
                ("long4", "ref4", "long4", long_prompt), ("long4", "ref4", "long4", prompts[0]),
                ("plain", "base", "plain", prompts[0]), ("tiny", "base", None, prompts[1])):
            r = client.completions.create(
                model=model, prompt=prompt, max_tokens=6, temperature=0, logprobs=1,
                extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
            want = hf_greedy(long_models[base], adapter and long_models[adapter], prompt, 6)
            assert token_ids_of(r.choices[0].logprobs) == want, (model, len(prompt))
