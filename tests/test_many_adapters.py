"""Thousands of adapters: cheap registration, loads off the step loop, prefetch, a mix of
200 adapters over 4 slots that matches every request served alone."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex import LoRARequest, SamplingParams
from loraplex.lora.errors import LoRAError
from tests.engine_utils import make_llm

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)


def _derived_adapters(sources: list[Path], out: Path, n: int) -> list[Path]:
    """n distinct real PEFT dirs: each copies a source's config and rescales its tensors."""
    dirs = []
    for i in range(n):
        src, dst = sources[i % len(sources)], out / f"lora{i:04d}"
        dst.mkdir(parents=True)
        shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
        gen = torch.Generator().manual_seed(i)
        tensors = {k: (v * (1 + 0.5 * torch.randn(v.shape, generator=gen))).contiguous()
                   for k, v in load_file(src / "adapter_model.safetensors").items()}
        save_file(tensors, dst / "adapter_model.safetensors")
        dirs.append(dst)
    return dirs


@pytest.fixture(scope="module")
def many(tmp_path_factory, tiny_adapters):
    ad = tiny_adapters["llama"]
    root = tmp_path_factory.mktemp("many")
    return _derived_adapters([ad["r4_qv"], ad["r8_all"], ad["r16_rslora"]], root, 200)


@pytest.fixture(scope="module")
def llm(tiny_models):
    return make_llm(tiny_models["llama"], enable_lora=True, max_loras=4, max_cpu_loras=16,
                    max_lora_rank=16, max_num_seqs=16, max_model_len=128)


def _drain(engine, on_step=None) -> dict:
    done = {}
    while engine.has_unfinished_requests():
        outs = engine.step()
        if on_step is not None:
            on_step(outs)
        done.update({o.request_id: o for o in outs if o.finished})
    return done


def test_register_ten_thousand_without_reading_weights(llm, tiny_adapters, prompts):
    engine = llm.llm_engine
    path = str(tiny_adapters["llama"]["r8_all"])
    for i in range(10_000):
        engine.register_lora(LoRARequest(f"reg{i}", 100_000 + i, path))
    stats = engine.get_stats()
    assert stats.num_registered_loras >= 10_000 and stats.num_host_loras == 0
    req = LoRARequest("reg9999", 100_000 + 9999, path)
    engine.add_request("one", {"prompt_token_ids": prompts[0]}, PARAMS, lora_request=req)
    out = _drain(engine)["one"]
    assert out.error is None and len(out.outputs[0].token_ids) == PARAMS.max_tokens
    for i in range(10_000):
        engine.remove_lora(100_000 + i)


def test_zipf_mix_over_200_adapters_matches_each_request_alone(llm, many, prompts, tmp_path):
    """200 registered, max_loras=4, max_cpu_loras=16, Zipf(1.0) traffic arriving over
    time, one corrupt adapter among them: every good request's tokens and logprobs equal
    the same request served alone; the corrupt adapter's requests (and only they) fail."""
    engine = llm.llm_engine
    corrupt = tmp_path / "corrupt"
    shutil.copytree(many[0], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00not safetensors" * 8)
    reqs = [LoRARequest(f"z{i}", 1000 + i, str(d)) for i, d in enumerate(many)]
    reqs[7] = LoRARequest("z7-corrupt", 1007, str(corrupt))
    for r in reqs:
        engine.register_lora(r)
    rng = random.Random(0)
    weights = [1.0 / (k + 1) for k in range(len(reqs))]
    picks = rng.choices(range(len(reqs)), weights=weights, k=90) + [7, 7]
    work = [(f"r{j}", prompts[j % len(prompts)], reqs[k]) for j, k in enumerate(picks)]
    pending = list(work)

    def arrive(_outs):  # four new requests per step, like a steady stream
        for rid, prompt, lora in pending[:4]:
            engine.add_request(rid, {"prompt_token_ids": prompt}, PARAMS, lora_request=lora)
        del pending[:4]

    arrive(None)
    done = _drain(engine, arrive)
    assert sorted(done) == sorted(rid for rid, _, _ in work)
    for rid, prompt, lora in work:
        out = done[rid]
        if lora.lora_int_id == 1007:
            assert out.outputs[0].finish_reason == "error" and "cannot read" in out.error
            continue
        assert out.error is None, out.error
        alone = llm.generate([{"prompt_token_ids": prompt}], PARAMS, lora_request=lora,
                             use_tqdm=False)[0].outputs[0]
        assert out.outputs[0].token_ids == alone.token_ids, rid
        for got, want in zip(out.outputs[0].logprobs, alone.logprobs, strict=True):
            t = next(iter(want))
            assert abs(got[t].logprob - want[t].logprob) < 1e-3  # batch-shape fp32 noise
    stats = engine.get_stats()
    distinct = {k for k in picks}
    assert stats.num_host_loras <= 16 and stats.num_slot_loras <= 4
    assert stats.lora_cache.host_misses >= len(distinct)  # every adapter read at least once
    assert stats.lora_cache.load_failures >= 1
    for r in reqs:
        engine.remove_lora(r.lora_int_id)


def test_slow_adapter_source_does_not_delay_resident_adapters(llm, tiny_adapters, prompts,
                                                              tmp_path):
    """The cold adapter's weights come through a pipe that stays empty until we say so:
    meanwhile every step still decodes the requests of the resident adapter and the base.
    Once read, its request is prefilled in a step that decodes them too (a mixed step):
    they get a token in every step from the first to the last."""
    engine = llm.llm_engine
    src = tiny_adapters["llama"]["r8_all"]
    slow = tmp_path / "slow"
    slow.mkdir()
    shutil.copy(src / "adapter_config.json", slow / "adapter_config.json")
    os.mkfifo(slow / "adapter_model.safetensors")
    warm = LoRARequest("warm", 2001, str(tiny_adapters["llama"]["r4_qv"]))
    cold = LoRARequest("cold", 2002, str(slow))
    engine.add_lora(warm)
    long = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    engine.add_request("w1", {"prompt_token_ids": prompts[0]}, long, lora_request=warm)
    engine.add_request("cold", {"prompt_token_ids": prompts[1]}, PARAMS, lora_request=cold)
    engine.add_request("w2", {"prompt_token_ids": prompts[2]}, long, lora_request=warm)
    engine.add_request("base", {"prompt_token_ids": prompts[3]}, long)

    def release() -> None:
        with open(slow / "adapter_model.safetensors", "wb") as pipe:
            pipe.write((src / "adapter_model.safetensors").read_bytes())

    try:
        for step in range(1, 9):
            counts = {o.request_id: len(o.outputs[0].token_ids) for o in engine.step()}
            assert counts == {"w1": step, "w2": step, "base": step}, counts
            assert engine.lora_manager.is_loading(2002)
    finally:
        writer = threading.Thread(target=release)
        writer.start()
    writer.join(timeout=30)
    engine.lora_manager.loader.wait_any(timeout=30)  # read; the next step picks it up
    done, step, joined = {}, 9, None
    while engine.has_unfinished_requests():
        outs = engine.step()
        counts = {o.request_id: len(o.outputs[0].token_ids) for o in outs}
        if step <= 20:
            assert {counts[r] for r in ("w1", "w2", "base")} == {step}, (step, counts)
        if counts.get("cold") == 1:
            joined = step
        done.update({o.request_id: o for o in outs if o.finished})
        step += 1
    assert joined == 9  # prefilled in the very next step, beside the three decodes
    assert done["cold"].error is None
    same_weights = LoRARequest("cold-again", 2003, str(src))
    alone = llm.generate([{"prompt_token_ids": prompts[1]}], PARAMS, lora_request=same_weights,
                         use_tqdm=False)[0]
    assert done["cold"].outputs[0].token_ids == alone.outputs[0].token_ids
    assert all(len(done[r].outputs[0].token_ids) == 20 for r in ("w1", "w2", "base"))


def test_queued_adapter_is_prefetched_before_its_turn(tiny_models, tiny_adapters, prompts):
    llm = make_llm(tiny_models["llama"], enable_lora=True, max_loras=2, max_cpu_loras=4,
                   max_lora_rank=16, max_num_seqs=2)
    engine, ad = llm.llm_engine, tiny_adapters["llama"]
    long = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    engine.add_request("a", {"prompt_token_ids": prompts[0]}, long)
    engine.add_request("b", {"prompt_token_ids": prompts[1]}, long)
    queued = LoRARequest("queued", 1, str(ad["r8_all"]))
    engine.add_request("q", {"prompt_token_ids": prompts[2]}, PARAMS, lora_request=queued)
    engine.step()  # a and b fill the batch (max_num_seqs=2); q's adapter starts loading
    assert engine.lora_manager.is_loading(1)
    engine.lora_manager.loader.wait_any(timeout=30)
    engine.step()
    assert engine.lora_manager.is_ready(1)  # in host memory ...
    assert [s.request_id for s in engine.scheduler.waiting] == ["q"]  # ... before its turn
    done = _drain(engine)
    assert done["q"].error is None and len(done["q"].outputs[0].token_ids) == 6


def test_adapter_config_errors_still_fail_at_add_request(llm, tmp_path, tiny_adapters,
                                                         prompts):
    bad = tmp_path / "big"
    shutil.copytree(tiny_adapters["llama"]["r4_qv"], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["r"] = 64
    (bad / "adapter_config.json").write_text(json.dumps(cfg))

    with pytest.raises(LoRAError, match="max-lora-rank"):
        llm.llm_engine.add_request("big", {"prompt_token_ids": prompts[0]}, PARAMS,
                                   lora_request=LoRARequest("big", 3001, str(bad)))
    assert "big" not in llm.llm_engine.requests


def test_one_read_for_many_waiting_requests(llm, tiny_adapters, prompts):
    engine = llm.llm_engine
    before = engine.get_stats()
    cold = LoRARequest("shared-cold", 4001, str(tiny_adapters["llama"]["r16_rslora"]))
    for i in range(6):
        engine.add_request(f"s{i}", {"prompt_token_ids": prompts[i % len(prompts)]}, PARAMS,
                           lora_request=cold)
    done = _drain(engine)
    after = engine.get_stats()
    assert all(done[f"s{i}"].error is None for i in range(6))
    assert after.lora_cache.host_misses - before.lora_cache.host_misses == 1
    assert len(after.lora_load_seconds) == 1  # one read (get_stats drains the list)
    engine.remove_lora(4001)


def test_a_refused_re_add_keeps_the_deferred_removal(llm, tiny_adapters, prompts):
    """remove_lora of an adapter in use waits for its requests; adding another adapter
    under that id meanwhile is refused, and the removal still happens."""
    engine = llm.llm_engine
    ad = tiny_adapters["llama"]
    first = LoRARequest("deferred", 5001, str(ad["r4_qv"]))
    engine.add_request("d", {"prompt_token_ids": prompts[0]}, PARAMS, lora_request=first)
    engine.step()
    assert engine.has_lora(5001)
    assert engine.remove_lora(5001) and 5001 not in engine.list_loras()
    assert not engine.has_lora(5001)  # a deferred removal is no longer offered
    with pytest.raises(LoRAError, match="already used"):
        engine.add_lora(LoRARequest("other", 5001, str(ad["r8_all"])))
    with pytest.raises(LoRAError, match="already used"):
        engine.register_lora(LoRARequest("other", 5001, str(ad["r8_all"])))
    _drain(engine)
    assert 5001 not in engine.lora_manager.registered  # removed once its request ended


def test_loader_threads_pin_from_the_engines_gpu(cuda_current_devices):
    """Pinning host memory makes a CUDA context on the thread's current device, so with
    cuda:1 the loader threads make cuda:1 current before their first load (stubbed here:
    no GPU)."""
    from loraplex.lora.loader import AdapterLoader

    ran_on = []
    loader = AdapterLoader(lambda req: ran_on.append(threading.get_ident()), 1,
                           torch.device("cuda", 1))
    loader.submit(LoRARequest("a", 1, "/nowhere"))
    loader.wait_any(timeout=10)
    loader.shutdown()
    assert ran_on and cuda_current_devices == {ran_on[0]: 1}
