"""--lora-target-modules: only the named modules get adapter slots (less slot memory); an
adapter on another module is refused by name, and the others carry on."""

from __future__ import annotations

import re

import pytest

from loraplex import EngineArgs, LoRARequest, SamplingParams
from loraplex.engine.arg_utils import _parse_names
from loraplex.lora.errors import LoRAError
from loraplex.lora.experts import ExpertsWithLoRA
from loraplex.lora.layers import LinearWithLoRA
from tests.engine_utils import GREEDY, check_against_hf, make_llm
from tests.test_architectures import arch_models  # noqa: F401  (the fixture)
from tests.test_server_cli import _serve_parser


def _wrapped(llm) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name in llm.llm_engine.lora_manager.layers}


def test_only_the_named_modules_get_slots(tiny_models, tiny_adapters, prompts):
    """q_proj serves q/k/v (one packed slot layer); an adapter on q and v matches HF +
    PEFT; one on the MLP is refused at registration and at load (all-linear names no
    modules in its config), while the engine serves the others."""
    base, adapters = tiny_models["llama"], tiny_adapters["llama"]
    full = make_llm(base, enable_lora=True, max_lora_rank=16)
    llm = make_llm(base, enable_lora=True, max_lora_rank=16,
                   lora_target_modules=["q_proj", "o_proj"])
    assert _wrapped(llm) == {"qkv_proj", "o_proj"}
    assert not any(isinstance(m, LinearWithLoRA) for m in
                   llm.llm_engine.model.model.layers[0].mlp.modules())
    manager = llm.llm_engine.lora_manager
    assert manager.slot_bytes_per_rank() < full.llm_engine.lora_manager.slot_bytes_per_rank()

    engine = llm.llm_engine
    with pytest.raises(LoRAError, match="targets '(gate|up|down)_proj', which has no adapter "
                       "slots: the engine was started with --lora-target-modules q_proj "
                       "k_proj v_proj o_proj;"):
        engine.add_lora(LoRARequest("mlp", 7, str(adapters["r8_patterns"])))
    with pytest.raises(LoRAError, match="which has no adapter slots"):
        engine.add_lora(LoRARequest("all", 8, str(adapters["r8_all"])))
    ok = LoRARequest("qv", 1, str(adapters["r4_qv"]))
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], GREEDY,
                        lora_request=[ok, None], use_tqdm=False)
    check_against_hf(outs, base, [adapters["r4_qv"], None], prompts[:2])


def test_moe_without_expert_slots(arch_models, prompts):  # noqa: F811
    """Attention only on a mixture of experts: no expert slots (the bulk of a MoE's slot
    memory); an adapter on the experts is refused by name."""
    base, adapters = arch_models["mixtral"]
    llm = make_llm(base, enable_lora=True, max_lora_rank=16,
                   lora_target_modules="q_proj,k_proj,v_proj,o_proj")
    assert not any(isinstance(m, ExpertsWithLoRA) for m in llm.llm_engine.model.modules())
    no_slots = r"targets '(experts\.(gate_up|down)_proj|w[123])', which has no adapter slots"
    with pytest.raises(LoRAError, match=no_slots):
        llm.llm_engine.add_lora(LoRARequest("experts", 5, str(adapters["r6_experts"])))
    ok = LoRARequest("qv", 1, str(adapters["r4_qv"]))
    outs = llm.generate([{"prompt_token_ids": prompts[0]}], GREEDY, lora_request=ok,
                        use_tqdm=False)
    check_against_hf(outs, base, [adapters["r4_qv"]], prompts[:1])


def test_unknown_module_fails_at_start(tiny_models, arch_models):  # noqa: F811
    with pytest.raises(ValueError, match=re.escape(
            "lora_target_modules: experts not in this model (it supports q_proj, k_proj")):
        make_llm(tiny_models["llama"], enable_lora=True, lora_target_modules=["experts"])
    # a name the architecture knows but this model lacks (Mixtral has no dense MLP)
    with pytest.raises(ValueError, match="lora_target_modules down_proj: no such module"):
        make_llm(arch_models["mixtral"][0], enable_lora=True, lora_target_modules="down_proj")


@pytest.mark.parametrize("flags, want", [
    (["--lora-target-modules", "q_proj", "v_proj"], ("q_proj", "v_proj")),
    (["--lora-target-modules", "q_proj,o_proj"], ("q_proj", "o_proj")),
    (["--lora-target-modules", "all"], None),
    ([], None),
])
def test_flag(flags, want):
    """Space- or comma-separated, as SGLang's; all (or nothing) is every module."""
    from loraplex.entrypoints.api_server import _engine_args

    ns = _serve_parser().parse_args(["m", "--enable-lora", *flags])
    ns.model = ns.model_tag
    args = _engine_args(ns)
    assert isinstance(args, EngineArgs)
    assert _parse_names(args.lora_target_modules) == want  # what LoRAConfig gets


def test_default_is_every_module(tiny_models, prompts):
    """Without the flag every supported module has slots, as before."""
    llm = make_llm(tiny_models["llama"], enable_lora=True, max_lora_rank=8)
    assert _wrapped(llm) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj",
                             "embed_tokens", "lm_head"}
    out = llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=2),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2
