"""PEFT's lora_bias (lora_B with a bias: W x + s * (B A x + b)) against HF + PEFT, fp32: a
mixed batch of the base, an adapter with biases on every linear (q/k/v and gate/up
packed, o and down alone) and one without, over one slot (so a slot's bias is set and
cleared as adapters swap), prompts whole and chunked; and the refusals, each failing
only its request."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from loraplex import LoRARequest
from loraplex.lora.errors import LoRAError
from tests.engine_utils import GREEDY, check_mixed_batch, make_llm
from tests.fixtures import edited_copy, make_peft_adapter


@pytest.fixture(scope="module")
def adapters(tiny_models, tiny_root: Path) -> dict[str, Path]:
    base = tiny_models["llama"]
    root = tiny_root / "lora_bias"
    return {"bias_all": make_peft_adapter(base, root / "bias_all", r=8, seed=61,
                                          target_modules="all-linear", lora_bias=True),
            "bias_qv": make_peft_adapter(base, root / "bias_qv", r=4, lora_alpha=16,
                                         seed=62, lora_bias=True),
            "plain": make_peft_adapter(base, root / "plain", r=4, seed=63)}


@pytest.mark.parametrize("budget", [None, 5])
def test_mixed_batch_matches_peft(budget, adapters, tiny_models, prompts):
    base = tiny_models["llama"]
    saved = load_file(str(adapters["bias_all"] / "adapter_model.safetensors"))
    assert sum(k.endswith("lora_B.default.bias") or k.endswith("lora_B.bias")
               for k in saved) >= 7 * 2  # every linear of both layers has one
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8,
                   **({"max_num_batched_tokens": budget} if budget else {}))
    check_mixed_batch(llm, base, adapters, prompts, extra=3)


def test_biased_slots_decode_eagerly(adapters, tiny_models, prompts):
    """A slot holding biases is one the model runner decodes outside CUDA graphs (the
    bias is a per-step host decision, as DoRA's scales), and leaves that set with it."""
    llm = make_llm(tiny_models["llama"], enable_lora=True, max_loras=1, max_lora_rank=8)
    manager = llm.llm_engine.lora_manager
    for name, eager in (("bias_qv", {0}), ("plain", set())):
        llm.generate([{"prompt_token_ids": prompts[0]}], GREEDY, use_tqdm=False,
                     lora_request=LoRARequest(name, 1 + len(name), str(adapters[name])))
        assert manager.eager_slots == eager


def test_refusals_fail_alone(adapters, tiny_models, tmp_path, prompts):
    llm = make_llm(tiny_models["llama"], enable_lora=True, max_loras=1, max_lora_rank=8)
    src = adapters["bias_qv"]

    def drop_bias_flag(c):
        c["lora_bias"] = False

    def wrong_shape(t):
        key = next(k for k in t if k.endswith(".bias"))
        t[key] = t[key][:-1].clone()
        return t

    cases = [
        (edited_copy(src, tmp_path / "flag", drop_bias_flag),
         "has a lora_B bias for .* but lora_bias is not true"),
        (edited_copy(src, tmp_path / "shape", tensors=wrong_shape), "lora_B bias has shape"),
        (make_peft_adapter(tiny_models["llama"], tmp_path / "head", r=4, seed=64,
                           target_modules=["q_proj", "lm_head"], lora_bias=True),
         "lora_B bias .* on .*lm_head.*not on embed_tokens, lm_head"),
    ]
    for i, (path, match) in enumerate(cases):
        with pytest.raises(LoRAError, match=match):
            llm.llm_engine.prepare_lora(LoRARequest(f"bad{i}", 10 + i, str(path)))
    out = llm.generate([{"prompt_token_ids": prompts[0]}], GREEDY, use_tqdm=False,
                       lora_request=LoRARequest("ok", 1, str(src)))
    assert len(out[0].outputs[0].token_ids) == GREEDY.max_tokens
