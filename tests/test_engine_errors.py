"""Bad input fails alone with a clear error; the engine and every other request carry on."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from loraplex import LLM, EngineArgs, LoRARequest, SamplingParams
from loraplex.lora.errors import LoRAError
from tests.engine_utils import GREEDY, check_against_hf, make_llm
from tests.fixtures import edited_copy, make_peft_adapter, quantized_copy


@pytest.fixture(scope="module")
def llm(tiny_models):
    return make_llm(tiny_models["llama"], enable_lora=True, max_loras=2, max_lora_rank=8,
                    max_model_len=64)


def _assert_still_serves(llm, prompt, lora=None):
    out = llm.generate([{"prompt_token_ids": prompt}], GREEDY, lora_request=lora,
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == GREEDY.max_tokens


def test_bad_adapters_fail_alone(llm, tiny_adapters, tmp_path, prompts):
    ad = tiny_adapters["llama"]
    good = LoRARequest("good", 1, str(ad["r8_all"]))
    cases = {
        "missing path": (LoRARequest("nope", 10, str(tmp_path / "nowhere")), "does not exist"),
        "rank too high": (LoRARequest("big", 11, str(ad["r16_rslora"])), "--max-lora-rank 16"),
        "modules_to_save": (LoRARequest("mts", 13, str(edited_copy(
            ad["r4_qv"], tmp_path / "mts", lambda c: c.update(modules_to_save=["lm_head"])))),
            "modules_to_save"),
        "lora_bias with DoRA": (LoRARequest("bias", 15, str(edited_copy(
            ad["r4_qv"], tmp_path / "bias", lambda c: c.update(lora_bias=True, use_dora=True)))),
            "lora_bias=true with use_dora=true"),
        "unknown target": (LoRARequest("fc1", 14, str(edited_copy(
            ad["r4_qv"], tmp_path / "fc1", lambda c: c.update(target_modules=["fc1"])))),
            "not found in the model"),
    }
    added = tmp_path / "added"
    shutil.copytree(ad["r4_qv"], added)
    vocab = llm.llm_engine.model.args.vocab_size
    (added / "added_tokens.json").write_text(json.dumps({"<new>": vocab, "<bos>": 1}))
    cases["tokens past the vocabulary"] = (LoRARequest("added", 19, str(added)),
                                           "past the base vocabulary")
    no_cfg = tmp_path / "nocfg"
    shutil.copytree(ad["r4_qv"], no_cfg)
    (no_cfg / "adapter_config.json").unlink()
    cases["no config"] = (LoRARequest("nocfg", 17, str(no_cfg)), "adapter_config.json")
    # the weights are read off the step loop when a request needs them: these fail the
    # request (finish_reason "error" with the message), not add_request
    corrupt = tmp_path / "corrupt"
    shutil.copytree(ad["r4_qv"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    other = make_peft_adapter(_wide_model(tmp_path), tmp_path / "wide_lora", r=4, seed=2)
    late_cases = {
        "corrupt safetensors": (LoRARequest("corrupt", 16, str(corrupt)), "cannot read"),
        "shape mismatch": (LoRARequest("wide", 18, str(other)), "do not fit"),
        "DoRA without magnitudes": (LoRARequest("dora", 12, str(edited_copy(
            ad["r4_qv"], tmp_path / "dora", lambda c: c.update(use_dora=True)))),
            "use_dora=true but no lora_magnitude_vector"),
    }

    engine = llm.llm_engine
    engine.add_request("ok", {"prompt_token_ids": prompts[0]}, GREEDY, lora_request=good)
    for name, (req, message) in cases.items():
        with pytest.raises(LoRAError, match=message):
            engine.add_request(f"bad-{name}", {"prompt_token_ids": prompts[1]}, GREEDY,
                               lora_request=req)
        assert f"bad-{name}" not in engine.requests, name
    for name, (req, _) in late_cases.items():
        engine.add_request(f"late-{name}", {"prompt_token_ids": prompts[1]}, GREEDY,
                           lora_request=req)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert sorted(done) == sorted(["ok"] + [f"late-{n}" for n in late_cases])
    assert len(done["ok"].outputs[0].token_ids) == GREEDY.max_tokens
    assert done["ok"].error is None
    assert done["ok"].outputs[0].lora_request is good  # vLLM's CompletionOutput field
    for name, (req, message) in late_cases.items():
        out = done[f"late-{name}"]
        assert out.outputs[0].finish_reason == "error" and out.outputs[0].token_ids == []
        assert out.outputs[0].lora_request is req
        assert message in out.error, (name, out.error)
    _assert_still_serves(llm, prompts[2], good)


def _wide_model(tmp_path):
    from tests.fixtures import make_tiny_model

    return make_tiny_model(tmp_path / "wide", "llama", hidden_size=96, num_heads=4,
                           num_kv_heads=2)


def test_same_id_other_path_is_an_error(llm, tiny_adapters, prompts):
    ad = tiny_adapters["llama"]
    llm.llm_engine.add_lora(LoRARequest("x", 30, str(ad["r4_qv"])))
    with pytest.raises(LoRAError, match="already used"):
        llm.llm_engine.add_lora(LoRARequest("y", 30, str(ad["r8_all"])))
    _assert_still_serves(llm, prompts[0], LoRARequest("x", 30, str(ad["r4_qv"])))


def test_bad_prompts_and_params(llm, prompts):
    engine = llm.llm_engine
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("long", {"prompt_token_ids": [5] * 64}, GREEDY)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", {"prompt_token_ids": []}, GREEDY)
    with pytest.raises(ValueError, match="out of range"):
        engine.add_request("oov", {"prompt_token_ids": [10**7]}, GREEDY)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    engine.add_request("dup", {"prompt_token_ids": prompts[0]}, GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", {"prompt_token_ids": prompts[0]}, GREEDY)
    engine.abort_request("dup")
    assert not engine.has_unfinished_requests()
    # a bad prompt inside a generate() call fails the call, and aborts what it queued
    with pytest.raises(ValueError):
        llm.generate([{"prompt_token_ids": prompts[0]}, {"prompt_token_ids": []}], GREEDY,
                     use_tqdm=False)
    assert not engine.has_unfinished_requests()
    _assert_still_serves(llm, prompts[1])


def test_lora_off_and_unknown_kwargs(tiny_models, tiny_adapters, prompts):
    base = tiny_models["llama"]
    with pytest.raises(TypeError, match="not_an_option"):
        LLM(model=str(base), not_an_option=1)
    llm = make_llm(base, enforce_eager=True)  # a vLLM option with no effect here: accepted
    with pytest.raises(ValueError, match="enable_lora=True"):
        llm.generate([{"prompt_token_ids": prompts[0]}], GREEDY,
                     lora_request=LoRARequest("a", 1, str(tiny_adapters["llama"]["r4_qv"])),
                     use_tqdm=False)
    _assert_still_serves(llm, prompts[0])


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        from loraplex import LLMEngine

        LLMEngine.from_engine_args(EngineArgs(model=str(tmp_path)))


def test_adapter_deleted_after_eviction_fails_only_its_requests(tiny_models, tiny_adapters,
                                                                tmp_path, prompts):
    base, ad = tiny_models["llama"], tiny_adapters["llama"]
    doomed = tmp_path / "doomed"
    shutil.copytree(ad["r4_qv"], doomed)
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8, max_cpu_loras=1)
    engine = llm.llm_engine
    engine.add_lora(LoRARequest("doomed", 1, str(doomed)))
    engine.add_lora(LoRARequest("other", 2, str(ad["r8_all"])))  # evicts 'doomed' from host
    shutil.rmtree(doomed)
    engine.add_request("a", {"prompt_token_ids": prompts[0]}, GREEDY,
                       lora_request=LoRARequest("doomed", 1, str(doomed)))
    engine.add_request("b", {"prompt_token_ids": prompts[1]}, GREEDY)
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outs["a"].outputs[0].finish_reason == "error" and "doomed" in outs["a"].error
    assert outs["b"].outputs[0].finish_reason == "length"


def test_generate_raises_for_unreadable_adapter_weights(llm, tiny_models, tiny_adapters,
                                                        tmp_path, prompts):
    """The engine reports the failed read as an errored output; LLM.generate and LLM.chat
    raise it (as vLLM does), abort the call's other requests and serve the next call."""
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_adapters["llama"]["r4_qv"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    bad = LoRARequest("corrupt", 40, str(corrupt))
    batch = [{"prompt_token_ids": prompts[0]}, {"prompt_token_ids": prompts[1]}]
    with pytest.raises(LoRAError, match="cannot read"):
        llm.generate(batch, GREEDY, lora_request=[None, bad], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    with pytest.raises(LoRAError, match="corrupt"):
        llm.chat([{"role": "user", "content": "Hi"}], GREEDY, lora_request=bad,
                 use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    out = llm.generate(batch[:1], GREEDY, use_tqdm=False)
    check_against_hf(out, tiny_models["llama"], [None], [prompts[0]])
    assert out[0].outputs[0].lora_request is None


def test_multimodal_and_unknown_prompt_keys_are_refused(llm, prompts):
    engine = llm.llm_engine
    text = "What is the capital of France?"
    with pytest.raises(ValueError, match="multimodal inputs are not supported yet"):
        llm.generate({"prompt": text, "multi_modal_data": {"image": object()}}, GREEDY,
                     use_tqdm=False)
    with pytest.raises(ValueError, match="multimodal"):
        engine.add_request("mm", {"prompt_token_ids": prompts[0],
                                  "multi_modal_data": {"audio": [0.0]}}, GREEDY)
    for key in ("token_type_ids", "promt"):
        with pytest.raises(ValueError, match=repr(key)):
            engine.add_request(key, {"prompt": text, key: "x"}, GREEDY)
    with pytest.raises(ValueError, match="enable_prompt_embeds=True"):  # off by default
        engine.add_request("embeds", {"prompt_embeds": "x"}, GREEDY)
    assert not engine.has_unfinished_requests()
    # empty multimodal fields and mm_processor_kwargs ask for nothing: accepted
    out = llm.generate({"prompt_token_ids": prompts[0], "multi_modal_data": None,
                        "mm_processor_kwargs": {}}, GREEDY, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == GREEDY.max_tokens


@pytest.mark.parametrize(("quant_method", "message"), [
    ("hqq", "quant_method='hqq'.*not supported yet"),
    ("gguf", "quant_method='gguf'.*not supported yet"),
    # loaded methods whose config or weights do not fit (tests/test_fp8.py: the rest)
    ("fp8", "says FP8 .float8_e4m3fn. values should be"),
    ("compressed-tensors", "compressed-tensors checkpoint .format ''.*not supported yet"),
])
def test_quantized_checkpoint_is_refused(tiny_models, tmp_path, quant_method, message):
    model = quantized_copy(tiny_models["llama"], tmp_path / "quant", quant_method)
    with pytest.raises(ValueError, match=message):
        make_llm(model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_a_gpu_is_a_clear_error(tiny_models):
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        make_llm(tiny_models["llama"], device="cuda")


def test_max_logprobs(tiny_models, prompts):
    """vLLM's max_logprobs bounds logprobs and prompt_logprobs per engine (20 by default;
    -1: no bound)."""
    from tests.engine_utils import make_llm

    base = tiny_models["llama"]
    with pytest.raises(ValueError, match=r"logprobs must be <= max_logprobs \(20\), got 21"):
        make_llm(base).generate(["Hi"], SamplingParams(logprobs=21), use_tqdm=False)
    wide = make_llm(base, max_logprobs=30)
    with pytest.raises(ValueError, match=r"prompt_logprobs must be <= max_logprobs \(30\)"):
        wide.generate(["Hi"], SamplingParams(prompt_logprobs=31), use_tqdm=False)
    out = wide.generate([{"prompt_token_ids": prompts[0]}],
                        SamplingParams(max_tokens=1, logprobs=25), use_tqdm=False)[0]
    assert len(out.outputs[0].logprobs[0]) >= 25
    out = make_llm(base, max_logprobs=-1).generate(
        [{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=1, logprobs=100),
        use_tqdm=False)[0]
    assert len(out.outputs[0].logprobs[0]) >= 100
