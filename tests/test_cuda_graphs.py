"""Decode CUDA graphs (worker/cuda_graph.py), the GPU memory profile and host syncs.

CPU: the batch-size choice, the enforce_eager / cuda_graph_sizes plumbing, no graphs on
the CPU, the KV budget arithmetic, the capture-failure fallback, and the graph runner's
whole replay path (padding, per-size LoRA metadata, base/LoRA graph choice, the start-up
check) with a stand-in graph that re-runs the captured step eagerly (Triton attention
under the interpreter). GPU: real graphs against enforce_eager and against HF + PEFT
(fp32 and bf16), adapters swapped into slots under captured graphs, one host sync per
decode step, and the KV cache sized by a profile run.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

import tests.test_attention  # noqa: F401  (on the CPU: Triton under the interpreter)
from loraplex import EngineArgs, SamplingParams
from loraplex.lora.layers import LinearWithLoRA
from loraplex.worker import cuda_graph
from loraplex.worker.context import DecodeBuffers
from loraplex.worker.cuda_graph import (
    CUDAGraphRunner,
    capture_decode_graphs,
    capture_sizes,
    graphs_unavailable,
    padded_size,
)
from loraplex.worker.model_runner import GPUMemoryProfile
from tests.engine_utils import check_against_hf, lora_requests, make_llm
from tests.fixtures import hf_logprobs

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
GiB = 2**30

# Requests over the base and four adapters of ranks 4-16 that finish one after another, so
# decode batches of 5, 4, 3, ... are padded to the captured 8, 4, 4, ...; with max_loras=2
# the last two adapters take the slots of the first two while the graphs captured before
# any adapter existed keep replaying.
NAMES = [None, "r8_all", "r4_qv", None, None, "r16_rslora", "r8_patterns"]
MAX_TOKENS = [12, 4, 5, 9, 3, 8, 6]


def _generate(llm, reqs, prompts, dtype_logprobs: int = 3):
    batch = [prompts[i % len(prompts)] for i in range(len(NAMES))]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                             logprobs=dtype_logprobs) for n in MAX_TOKENS]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params,
                        lora_request=[reqs[n] if n else None for n in NAMES], use_tqdm=False)
    return outs, batch


# ---- CPU: sizes, plumbing, arithmetic -------------------------------------------------

def test_capture_sizes():
    default = capture_sizes(256)
    assert default[:6] == [1, 2, 4, 8, 16, 24] and default[-1] == 256
    assert {64, 128, 192} <= set(default) and default == sorted(set(default))
    assert capture_sizes(100)[-2:] == [96, 100]  # max_num_seqs itself: every batch has one
    assert capture_sizes(1) == [1] and capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(256, (48,)) == [1, 2, 4, 8, 16, 24, 32, 40, 48]  # one value: up to it
    assert capture_sizes(16, (8, 1, 32, 4)) == [1, 4, 8]  # several: exactly those that fit
    assert capture_sizes(600)[-3:] == [512, 576, 600]


def test_padded_size():
    sizes = [1, 2, 4, 8, 16]
    assert [padded_size(n, sizes) for n in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    assert padded_size(17, sizes) is None  # larger than any: eager


def test_graphs_unavailable_reasons():
    cuda = torch.device("cuda")
    assert graphs_unavailable(torch.device("cpu"), False, "triton", False) == "not a CUDA device"
    assert graphs_unavailable(cuda, True, "triton", True) == "enforce_eager=True"
    assert "attention backend 'torch'" in graphs_unavailable(cuda, False, "torch", False)
    assert graphs_unavailable(cuda, False, "triton", False) is None
    assert "mixture-of-experts" in graphs_unavailable(cuda, False, "triton", False, True)


def test_enforce_eager_and_sizes_reach_the_model_config():
    from transformers import LlamaConfig

    hf = LlamaConfig(max_position_embeddings=512)

    def model_config(**kw):
        return EngineArgs(model="x", device="cpu", **kw).create_engine_config(hf).model_config

    assert not model_config().enforce_eager and model_config().cuda_graph_sizes is None
    assert model_config(enforce_eager=True).enforce_eager
    assert model_config(cuda_graph_sizes=[1, 2, 4]).cuda_graph_sizes == (1, 2, 4)
    assert model_config(cuda_graph_sizes="1,2, 8").cuda_graph_sizes == (1, 2, 8)  # the CLI's
    assert model_config(cuda_graph_sizes=32).cuda_graph_sizes == (32,)
    for bad in ("1,x", [0, 4], []):
        with pytest.raises(ValueError, match="cuda_graph_sizes"):
            model_config(cuda_graph_sizes=bad)


def test_enforce_eager_is_not_warned_as_ignored(caplog):
    from transformers import LlamaConfig

    with caplog.at_level(logging.WARNING, logger="loraplex.engine.arg_utils"):
        EngineArgs(model="x", device="cpu", enforce_eager=True).create_engine_config(
            LlamaConfig(max_position_embeddings=512))
    assert "enforce_eager" not in caplog.text


def test_no_graphs_on_cpu(tiny_models, prompts):
    llm = make_llm(tiny_models["llama"], device="cpu", max_num_seqs=4)
    runner = llm.llm_engine.model_runner
    assert runner.cuda_graphs is None and runner.memory_profile is None
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:3]], params, use_tqdm=False)
    assert runner.num_eager_decode_steps == 2


@pytest.mark.skipif(CUDA, reason="stubs torch.cuda's current device")
def test_steps_make_the_engines_gpu_current_on_their_thread(cuda_current_devices, tiny_models,
                                                            prompts):
    """Triton kernels, graph capture and CUDA events use the thread's current device, so an
    engine on cuda:1 stepping on the async engine's own thread must make cuda:1 current
    there. The engine runs on the CPU; only the device bookkeeping is stubbed."""
    import threading

    llm = make_llm(tiny_models["llama"], device="cpu", max_num_seqs=2)
    engine = llm.llm_engine
    engine.add_request("a", {"prompt_token_ids": prompts[0]},
                       SamplingParams(temperature=0.0, max_tokens=2))
    engine.model_config.device = torch.device("cuda", 1)  # as built for device="cuda:1"
    worker = threading.Thread(target=engine.step)
    worker.start()
    worker.join()
    assert cuda_current_devices == {worker.ident: 1}


def test_profile_run_on_cpu(tiny_models):
    """The GPU profile's forward + sampler (GPU-only in the engine) runs: every adapter slot
    in use, max_num_seqs rows of logits, every sampling option."""
    llm = make_llm(tiny_models["qwen3"], device="cpu", enable_lora=True, max_loras=3,
                   max_num_seqs=16, max_model_len=64)
    runner = llm.llm_engine.model_runner
    for layer in runner.attention_layers:  # as at profile time: no KV cache yet
        layer.k_cache = layer.v_cache = torch.empty(0)
    runner._profile_run(1000)  # 16 sequences of 62-63 tokens
    runner._profile_run(5)  # fewer tokens than sequences


def test_kv_budget_from_the_profile():
    prof = GPUMemoryProfile(total=80 * GiB, free=62 * GiB, weights=16 * GiB,
                            activation_peak=2 * GiB, utilization=0.9)
    assert prof.kv_budget == int(0.9 * 80 * GiB) - 18 * GiB  # 54 GiB: the utilization binds
    shared = GPUMemoryProfile(80 * GiB, 30 * GiB, 16 * GiB, 2 * GiB, 0.9)
    assert shared.kv_budget == 28 * GiB  # another process holds memory: what is free binds
    assert GPUMemoryProfile(80 * GiB, 60 * GiB, 16 * GiB, 2 * GiB, 0.2).kv_budget == 0
    assert "activation peak 2.00 GiB" in prof.describe()


def test_decode_buffers_pad_tokens():
    buffers = DecodeBuffers(4, 3, torch.device("cpu"))
    buffers.fill_tokens([7, 8, 9, 10], [5, 6, 7, 8])
    ids, pos = buffers.fill_tokens([3], [11], padded_batch=2)
    assert ids.tolist() == [3, 0] and pos.tolist() == [11, 0]
    with pytest.raises(ValueError, match="does not fit"):
        buffers.fill_tokens([1, 2, 3], [0, 0, 0], padded_batch=2)
    with pytest.raises(ValueError, match="does not fit"):
        buffers.fill_tokens([1], [0], padded_batch=5)


def test_capture_failure_falls_back_to_eager(monkeypatch, caplog):
    """On a GPU a failed capture is logged with its exception and decode stays eager (here
    the CUDA calls are stubbed so the fallback runs on the CPU too)."""
    def broken_capture(self):
        raise RuntimeError("simulated capture failure")

    monkeypatch.setattr(cuda_graph, "graphs_unavailable", lambda *a: None)
    monkeypatch.setattr(CUDAGraphRunner, "capture", broken_capture)
    for name in ("synchronize", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 0)
    buffers = DecodeBuffers(4, 2, torch.device("cpu"))
    with caplog.at_level(logging.ERROR, logger="loraplex.worker.cuda_graph"):
        got = capture_decode_graphs(torch.nn.Linear(1, 1), buffers, 4, 32, 0, False, None,
                                    "triton")
    assert got is None
    assert "CUDA graph capture failed" in caplog.text and "simulated capture" in caplog.text


# ---- CPU: the replay path with a stand-in graph -----------------------------------------

class _EagerGraph:
    """Stands in for torch.cuda.CUDAGraph: replay() runs the captured step again, eagerly,
    over the same static buffers and into the same output tensor, as a graph would."""

    def __init__(self, runner: CUDAGraphRunner, bs: int, lora: bool) -> None:
        self.runner, self.bs, self.lora = runner, bs, lora
        self.out = runner._forward(bs, runner._context(bs, lora))

    def replay(self) -> None:
        self.out.copy_(self.runner._forward(self.bs, self.runner._context(self.bs, self.lora)))


def use_stand_in_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Graphs captured from now on are _EagerGraphs; call before the engine is built (its
    attention backend must be Triton's: pad rows need slot -1)."""
    monkeypatch.setenv("LORAPLEX_ATTENTION_BACKEND", "triton")
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)

    def capture_one(self, bs, lora, pool):
        self._prepare_capture(bs, lora)
        graph = _EagerGraph(self, bs, lora)
        return graph, graph.out

    monkeypatch.setattr(CUDAGraphRunner, "_capture_one", capture_one)


def stand_in_graph_runner(runner) -> CUDAGraphRunner:
    """Decode graphs of batch 1, 2, 4, 8 for a CPU engine's model runner (uncaptured)."""
    return CUDAGraphRunner(runner.model, runner.decode_buffers, [1, 2, 4, 8],
                           runner.max_model_len, runner.max_loras)


def llm_with_decode_graphs(monkeypatch: pytest.MonkeyPatch, base, **kw):
    """An LLM (make_llm's, with `kw`) whose decode steps replay graphs: real ones on a GPU,
    on the CPU stand-ins captured at batch 1, 2, 4, 8 (the Triton attention backend)."""
    if not CUDA:
        use_stand_in_graphs(monkeypatch)
    llm = make_llm(base, **kw)
    runner = llm.llm_engine.model_runner
    if not CUDA:
        runner.cuda_graphs = stand_in_graph_runner(runner)
        runner.cuda_graphs.capture()
    return llm


@pytest.mark.skipif(CUDA, reason="the real graphs run on the GPU (test_graphs_match_eager)")
def test_replay_path_with_stand_in_graphs(monkeypatch, tiny_models, tiny_adapters, prompts):
    use_stand_in_graphs(monkeypatch)
    base, adapters = tiny_models["qwen2"], tiny_adapters["qwen2"]
    reqs = lora_requests(adapters)
    llm = make_llm(base, device="cpu", enable_lora=True, max_loras=2, max_lora_rank=16,
                   max_num_seqs=8, block_size=8, max_model_len=64)
    runner = llm.llm_engine.model_runner
    graphs = stand_in_graph_runner(runner)
    lora_layers = [m for m in runner.model.modules() if isinstance(m, LinearWithLoRA)]
    ranks_in_lora_checks = []
    check = CUDAGraphRunner._check

    def recording_check(self, bs, lora):
        forward = self._forward

        def seen(bs, ctx):
            if ctx.lora_meta is not None:  # the largest rank in use by a row of the batch
                ranks_in_lora_checks.append(max(
                    (m.slot_ranks[s] for m in lora_layers for s in ctx.lora_meta.active_slot_list),
                    default=0))
            return forward(bs, ctx)
        self._forward = seen
        check(self, bs, lora)
        del self._forward

    monkeypatch.setattr(CUDAGraphRunner, "_check", recording_check)
    graphs.capture()  # includes the start-up check against eager
    assert sorted(graphs.graphs) == [(bs, lora) for bs in (1, 2, 4, 8) for lora in (False, True)]
    # the LoRA graphs were checked doing LoRA work, and left every slot empty
    assert len(ranks_in_lora_checks) == 2 * 4 and min(ranks_in_lora_checks) > 0  # eager, replay
    for m in lora_layers:
        assert not any(m.slot_ranks) and not m.lora_ranks.any()
        assert not m.lora_a_stacked.any() and not m.lora_b_stacked.any()
    runner.cuda_graphs = graphs
    outs, batch = _generate(llm, reqs, prompts)
    assert graphs.num_replays > 0 and runner.num_eager_decode_steps == 0
    check_against_hf(outs, base, [adapters[n] if n else None for n in NAMES], batch)
    assert llm.llm_engine.lora_manager.stats.host_hits >= 4  # 4 adapters through 2 slots

    # a check that fails half-way still leaves every slot empty (the check runs before any
    # adapter is loaded: empty the slots the generation above left, as at start-up)
    for m in lora_layers:
        for slot in range(2):
            m.reset_lora(slot)

    def broken_replay():
        raise RuntimeError("replay failed")

    graphs.graphs[1, True][0].replay = broken_replay
    with pytest.raises(RuntimeError, match="replay failed"), torch.inference_mode():
        graphs._check(1, True)  # as capture() calls it
    assert not any(any(m.slot_ranks) or m.lora_a_stacked.any() for m in lora_layers)


# ---- GPU: real graphs --------------------------------------------------------------------

def _graph_llm(base, **kw):
    kw.setdefault("max_num_seqs", 8)
    return make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=16, **kw)


@gpu
@pytest.mark.parametrize("sizes", [None, "1,2"])  # all batches replay / only batches <= 2
def test_graphs_match_eager(sizes, tiny_models, tiny_adapters, prompts):
    base, adapters = tiny_models["llama"], tiny_adapters["llama"]
    reqs = lora_requests(adapters)
    graphed = _graph_llm(base, cuda_graph_sizes=sizes)
    runner = graphed.llm_engine.model_runner
    assert runner.cuda_graphs is not None
    assert runner.cuda_graphs.sizes == ([1, 2, 4, 8] if sizes is None else [1, 2])
    outs, batch = _generate(graphed, reqs, prompts)
    eager = _graph_llm(base, enforce_eager=True)
    assert eager.llm_engine.model_runner.cuda_graphs is None
    want, _ = _generate(eager, reqs, prompts)
    assert runner.cuda_graphs.num_replays > 0
    assert (runner.num_eager_decode_steps == 0) == (sizes is None)
    for got, ref in zip(outs, want, strict=True):
        assert got.outputs[0].token_ids == ref.outputs[0].token_ids
        for a, b in zip(got.outputs[0].logprobs, ref.outputs[0].logprobs, strict=True):
            for t, lp in b.items():
                assert abs(a[t].logprob - lp.logprob) < 1e-4
    check_against_hf(outs, base, [adapters[n] if n else None for n in NAMES], batch)
    # more adapters than slots: later ones were swapped into slots the graphs read
    assert graphed.llm_engine.lora_manager.stats.host_hits >= 4


@gpu
def test_chunks_and_cached_prefixes_with_graphs(tiny_models, tiny_adapters, prompts):
    """On the GPU: later chunks of a prompt and prompts after a cached prefix go through
    the compiled Triton prefill kernel's cached-context path (eager mixed steps), decode
    through graphs; every output equals HF + PEFT's."""
    from tests.engine_utils import GREEDY, check_shared_prefixes, run_staggered

    base, adapters = tiny_models["llama"], tiny_adapters["llama"]
    check_shared_prefixes(base, adapters, prompts)
    reqs = lora_requests(adapters)
    names = [None, "r8_all", "r4_qv", None, "r16_rslora"]
    jobs = [(2 * i, prompts[-1 - i % 2], reqs[n] if n else None) for i, n in enumerate(names)]
    llm = _graph_llm(base, max_num_batched_tokens=6, block_size=8)
    outs, mixed = run_staggered(llm.llm_engine, jobs, GREEDY)
    runner = llm.llm_engine.model_runner
    assert mixed > 0 and runner.num_mixed_steps > 0 and runner.cuda_graphs.num_replays > 0
    check_against_hf(outs, base, [adapters[n] if n else None for n in names],
                     [p for _, p, _ in jobs])


@gpu
def test_decode_step_syncs_once(tiny_models, tiny_adapters, prompts):
    """A decode step (graphs or eager, greedy or every sampling option) waits for the
    device once: when it reads the sampled tokens."""
    base, adapters = tiny_models["qwen3"], tiny_adapters["qwen3"]
    reqs = lora_requests(adapters)
    plain = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    fancy = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, min_p=0.01, seed=3,
                           repetition_penalty=1.1, presence_penalty=0.2,
                           frequency_penalty=0.1, min_tokens=4, logprobs=2, max_tokens=6)
    for eager in (False, True):
        engine = _graph_llm(base, enforce_eager=eager).llm_engine
        for name in ("r8_all", "r4_qv"):
            engine.add_lora(reqs[name])  # loaded now: the first step prefills all four
        for i, (params, name) in enumerate([(plain, None), (fancy, "r8_all"),
                                            (plain, "r4_qv"), (fancy, None)]):
            engine.add_request(str(i), {"prompt_token_ids": prompts[i]}, params,
                               lora_request=reqs[name] if name else None)
        while len(engine.scheduler.running) < 4:
            engine.step()  # prefills (and adapter loads)
        engine.step()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                outs = engine.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert len(outs) == 4
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) == 1, (eager, [str(w.message) for w in syncs])


@gpu
def test_kv_cache_sized_by_the_profile(tiny_models):
    runners = {}
    for tokens in (2048, 32768):  # <= max_num_seqs (256) x max_model_len (256) tokens
        llm = make_llm(tiny_models["llama"], max_num_batched_tokens=tokens,
                       gpu_memory_utilization=0.5, enforce_eager=True)
        runners[tokens] = llm.llm_engine.model_runner
    small, large = (runners[t].memory_profile for t in (2048, 32768))
    assert 0 < small.activation_peak < large.activation_peak
    total = torch.cuda.mem_get_info()[1]
    assert small.total == total and small.kv_budget <= 0.5 * total - small.weights
    runner = runners[2048]
    # the tiny model's cache is capped at every sequence at full length
    assert runner.num_blocks == 256 * (256 // runner.block_size)


def _hf_bf16(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).cuda()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


@gpu
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bf16_engine_matches_peft(arch, tiny_models, tiny_adapters, prompts):
    """The engine in bf16 with graphs against HF + PEFT in bf16 on the GPU, both measured
    against HF fp32: each greedy token is the reference's pick except at a bf16 near-tie,
    and the engine's logprobs are no further from fp32 than PEFT's bf16 ones (+ slack)."""
    base, adapters = tiny_models[arch], tiny_adapters[arch]
    reqs = lora_requests(adapters)
    llm = _graph_llm(base, dtype="bfloat16")
    assert llm.llm_engine.model_runner.cuda_graphs is not None
    outs, batch = _generate(llm, reqs, prompts, dtype_logprobs=5)
    for out, name, prompt in zip(outs, NAMES, batch, strict=True):
        adapter = adapters[name] if name else None
        got = out.outputs[0].token_ids
        ids = prompt + got[:-1]
        ref32 = hf_logprobs(base, adapter, ids)[len(prompt) - 1:]
        with torch.no_grad():
            logits = _hf_bf16(base, adapter)(input_ids=torch.tensor([ids], device="cuda")).logits
        ref16 = torch.log_softmax(logits[0].float(), -1).cpu()[len(prompt) - 1:]
        err_engine = err_hf = 0.0
        for step, lp in enumerate(out.outputs[0].logprobs):
            for t, logprob in lp.items():
                err_engine = max(err_engine, abs(logprob.logprob - ref32[step, t].item()))
                err_hf = max(err_hf, abs(ref16[step, t].item() - ref32[step, t].item()))
        assert err_engine <= 2 * err_hf + 0.05, (name, err_engine, err_hf)
        tie = max(0.1, 2 * err_hf)
        for step, tok in enumerate(got):
            gap = (ref32[step].max() - ref32[step, tok]).item()
            assert gap <= tie, (name, step, tok, gap, err_hf)
        hf_tokens = ref16.argmax(-1).tolist()  # teacher-forced on the engine's prefix
        agree = sum(a == b for a, b in zip(hf_tokens, got))
        assert agree >= len(got) - 1, (name, got, hf_tokens)
