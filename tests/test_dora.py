"""DoRA adapters (PEFT's use_dora) against HF + PEFT (fp32): mixed batches with the base and
plain adapters over fewer slots than adapters, a base with biases, prompts in chunks, decode
graphs (a batch with DoRA decodes eagerly), a quantized base, over HTTP; a malformed DoRA
adapter fails alone while the engine carries on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from loraplex import LoRARequest
from loraplex.lora import dora
from tests.engine_utils import GREEDY, check_against_hf, check_mixed_batch, lora_requests, make_llm
from tests.fixtures import edited_copy, make_peft_adapter


def _dora_adapters(base: Path, root: Path) -> dict[str, Path]:
    return {
        "dora_qv": make_peft_adapter(base, root / "dora_qv", r=4, lora_alpha=8, seed=70,
                                     target_modules=["q_proj", "v_proj"], use_dora=True),
        "dora_all": make_peft_adapter(base, root / "dora_all", r=8, lora_alpha=16, seed=71,
                                      target_modules="all-linear", use_dora=True),
        "dora_rslora": make_peft_adapter(base, root / "dora_rslora", r=16, lora_alpha=16,
                                         seed=72, target_modules=["o_proj", "down_proj"],
                                         use_dora=True, use_rslora=True),
    }


@pytest.fixture(scope="module")
def dora_adapters(tiny_root: Path, tiny_models) -> dict[str, dict[str, Path]]:
    """llama (no biases) and qwen2 (biases on q/k/v, which DoRA leaves unscaled)."""
    return {arch: _dora_adapters(tiny_models[arch], tiny_root / "dora" / arch)
            for arch in ("llama", "qwen2")}


def test_magnitude_scale_is_m_over_the_row_norm():
    gen = torch.Generator().manual_seed(0)
    w, a, b, m = (torch.randn(s, generator=gen) for s in ((6, 5), (2, 5), (6, 2), (6,)))
    g = dora.magnitude_scale(w, a, b, m)
    assert torch.allclose(g, m / (w + b @ a).norm(dim=1))
    dora._ROWS_PER_CHUNK_ELEMS = 5  # one row at a time: the same
    try:
        assert torch.allclose(dora.magnitude_scale(w, a, b, m), g)
    finally:
        dora._ROWS_PER_CHUNK_ELEMS = 1 << 24


@pytest.mark.parametrize("arch,budget", [("llama", None), ("qwen2", None), ("llama", 6)])
def test_mixed_batch_matches_peft(arch, budget, tiny_models, tiny_adapters, dora_adapters,
                                  prompts):
    """Base, three DoRA adapters of ranks 4-16 and two plain ones through two slots, so
    DoRA and plain adapters take each other's slots; budget 6: prompts in chunks."""
    base = tiny_models[arch]
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=16,
                   max_num_batched_tokens=budget)
    plain = {n: tiny_adapters[arch][n] for n in ("r4_qv", "r8_all")}
    check_mixed_batch(llm, base, {**dora_adapters[arch], **plain}, prompts)
    for layer in llm.llm_engine.lora_manager.layers.values():  # a plain one's slot is g = 1
        for slot, is_dora in enumerate(layer.slot_dora):
            if not is_dora and layer.magnitude_scale is not None:
                assert torch.equal(layer.magnitude_scale[slot],
                                   torch.ones_like(layer.magnitude_scale[slot]))


def test_plain_deployments_hold_nothing_for_dora(tiny_models, tiny_adapters, prompts):
    llm = make_llm(tiny_models["llama"], enable_lora=True, max_loras=2, max_lora_rank=8)
    llm.generate([{"prompt_token_ids": prompts[0]}], GREEDY, use_tqdm=False,
                 lora_request=LoRARequest("r4_qv", 1, str(tiny_adapters["llama"]["r4_qv"])))
    manager = llm.llm_engine.lora_manager
    assert not manager.eager_slots
    assert all(layer.magnitude_scale is None for layer in manager.layers.values())


def test_decode_with_graphs_goes_eager_for_dora(monkeypatch, tiny_models, tiny_adapters,
                                                dora_adapters, prompts):
    """Decode graphs (stand-ins on the CPU) hold no DoRA rescaling: a batch with a DoRA
    adapter decodes eagerly, one without replays a graph, and both equal HF + PEFT."""
    from tests.test_cuda_graphs import llm_with_decode_graphs

    base = tiny_models["llama"]
    llm = llm_with_decode_graphs(monkeypatch, base, enable_lora=True, max_loras=2,
                                 max_lora_rank=16, max_num_seqs=8, block_size=8,
                                 max_model_len=64)
    runner = llm.llm_engine.model_runner
    paths = {"dora_all": dora_adapters["llama"]["dora_all"], **tiny_adapters["llama"]}
    reqs = lora_requests(paths)
    tol = 2e-3 if torch.cuda.is_available() else 1e-4
    for names, graphs in ((["r4_qv", None, "r8_all"], True), (["dora_all", None, "r4_qv"], False)):
        replays, eager = runner.cuda_graphs.num_replays, runner.num_eager_decode_steps
        batch = prompts[:len(names)]
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY, use_tqdm=False,
                            lora_request=[reqs[n] if n else None for n in names])
        if graphs:
            assert runner.cuda_graphs.num_replays > replays
            assert runner.num_eager_decode_steps == eager
        else:
            assert runner.num_eager_decode_steps > eager
            assert runner.cuda_graphs.num_replays == replays
        check_against_hf(outs, base, [paths[n] if n else None for n in names], batch, tol)


def test_malformed_dora_adapters_fail_alone(tiny_root, tiny_models, tiny_adapters,
                                            dora_adapters, tmp_path, prompts):
    base = tiny_models["llama"]
    src = dora_adapters["llama"]["dora_qv"]
    no_magnitude = edited_copy(src, tmp_path / "no_magnitude", tensors=lambda t: {
        k: v for k, v in t.items() if "q_proj.lora_magnitude" not in k})
    not_dora = edited_copy(src, tmp_path / "not_dora", lambda c: c.update(use_dora=False))
    wrong_shape = edited_copy(src, tmp_path / "wrong_shape", tensors=lambda t: {
        k: v[:-1] if "v_proj.lora_magnitude" in k else v for k, v in t.items()})
    on_embedding = make_peft_adapter(base, tmp_path / "on_embedding", r=4, seed=73,
                                     target_modules=["embed_tokens", "q_proj"], use_dora=True)
    cases = [
        (no_magnitude, r"use_dora=true but no lora_magnitude_vector for "
                       r"'model\.layers\.\d\.self_attn\.q_proj'"),
        (not_dora, r"\(DoRA\) but use_dora is not true in adapter_config\.json"),
        (wrong_shape, r"v_proj's lora_magnitude_vector has shape \(31,\), not \(32,\)"),
        (on_embedding, "DoRA is supported on linear projections, not on embed_tokens"),
    ]
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=16)
    engine = llm.llm_engine
    for i, (path, _) in enumerate(cases):
        engine.add_request(f"bad{i}", {"prompt_token_ids": prompts[0]}, GREEDY,
                           lora_request=LoRARequest(f"bad{i}", 10 + i, str(path)))
    good = LoRARequest("dora_qv", 1, str(src))
    engine.add_request("good", {"prompt_token_ids": prompts[1]}, GREEDY, lora_request=good)
    engine.add_request("base", {"prompt_token_ids": prompts[2]}, GREEDY)
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    for i, (_, message) in enumerate(cases):
        out = done[f"bad{i}"]
        assert out.outputs[0].finish_reason == "error"
        assert re.search(message, out.error), out.error
    check_against_hf([done["good"], done["base"]], base, [src, None], prompts[1:3])


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantized_base(method, tiny_root, tiny_models, dora_adapters, prompts):
    """The norm is taken over the dequantized weight, as PEFT does (reference: HF + PEFT
    on the same integers dequantized in fp32)."""
    from loraplex.layers.quantization import QuantLinear
    from tests.quantized_fixtures import write_quantized

    root = tiny_root / "dora_quantized" / method
    root.mkdir(parents=True, exist_ok=True)
    quant_dir, ref_dir = write_quantized(tiny_models["llama"], root, method)
    paths = {n: dora_adapters["llama"][n] for n in ("dora_qv", "dora_all")}
    reqs = lora_requests(paths)
    llm = make_llm(quant_dir, enable_lora=True, max_loras=2, max_lora_rank=16)
    assert isinstance(llm.llm_engine.model.model.layers[0].mlp.gate_up_proj.base_layer,
                      QuantLinear)
    names = ["dora_all", None, "dora_qv"]
    batch = prompts[:3]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY, use_tqdm=False,
                        lora_request=[reqs[n] if n else None for n in names])
    check_against_hf(outs, ref_dir, [paths[n] if n else None for n in names], batch)


def test_over_http(tiny_models, dora_adapters, prompts):
    """`loraplex serve --lora-modules` with a DoRA adapter, and one loaded at runtime, by
    name with the openai client: equal to HF + PEFT."""
    from tests.fixtures import hf_greedy
    from tests.server_utils import RemoteServer, token_ids_of

    base, paths = tiny_models["qwen2"], dora_adapters["qwen2"]
    args = ["--served-model-name", "tiny", "--enable-lora", "--max-lora-rank", "16",
            "--dtype", "float32", "--max-model-len", "128", "--cpu-kv-cache-gib", "0.05",
            "--lora-modules", f"dora_all={paths['dora_all']}"]
    env = {"LORAPLEX_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    with RemoteServer(base, args, env=env) as server:
        r = server.post("/v1/load_lora_adapter",
                        {"lora_name": "dora_qv", "lora_path": str(paths["dora_qv"])})
        assert r.status_code == 200, r.text
        client = server.get_client()
        for model in ("dora_all", "dora_qv"):
            r = client.completions.create(
                model=model, prompt=prompts[0], max_tokens=6, temperature=0, logprobs=1,
                extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
            assert token_ids_of(r.choices[0].logprobs) == hf_greedy(base, paths[model],
                                                                    prompts[0], 6)
