"""Which threads run torch ops (worker/cpu_threads.py): on the CPU the step loop's OpenMP
team must be the process's only one, or every small op of a step waits for a sleeping
worker to wake. Helper threads run their torch ops single-threaded, and the async engine
builds its model on the thread that steps it.

Teams are counted as OS threads that Python did not start (Linux /proc)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from loraplex import EngineArgs, LoRARequest
from loraplex.engine.async_engine import AsyncLLMEngine
from loraplex.engine.llm_engine import LLMEngine
from loraplex.lora.loader import AdapterLoader
from loraplex.worker.cpu_threads import (
    _omp_set_num_threads,
    run_torch_ops_single_threaded,
    torch_openmp_library,
)

needs_openmp_team = pytest.mark.skipif(
    _omp_set_num_threads() is None or (os.cpu_count() or 1) < 2,
    reason="needs torch's OpenMP runtime (Linux) and 2+ cores: else there is no team")


@pytest.fixture(autouse=True)
def two_torch_threads():
    """Teams need 2+ torch threads; tests/conftest.py gives pytest-xdist's workers one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 2))
    yield
    torch.set_num_threads(threads)


def _native_threads() -> int:
    """OS threads of this process that Python did not start: OpenMP workers among them."""
    return len(os.listdir("/proc/self/task")) - threading.active_count()


def _parallel_work() -> None:
    """Big enough for torch to split across its threads (the grain size is 32K elements)."""
    x = torch.randn(1 << 22)
    (x * 2).to(torch.bfloat16)


def _native_threads_added_by(body: Callable[[], None]) -> int:
    """Native threads alive after `body` ran on a fresh thread, while that thread lives
    (a thread's OpenMP team lasts as long as the thread)."""
    _parallel_work()  # this thread's own team exists before the count
    before = _native_threads()
    ran, release = threading.Event(), threading.Event()

    def run() -> None:
        body()
        ran.set()
        release.wait()
    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert ran.wait(60)
        return _native_threads() - before
    finally:
        release.set()
        thread.join()


@needs_openmp_team
def test_a_single_threaded_helper_gets_no_openmp_team_and_changes_no_other_thread():
    def single() -> None:
        run_torch_ops_single_threaded()
        _parallel_work()
        assert torch.get_num_threads() == 1

    threads = torch.get_num_threads()
    assert _native_threads_added_by(single) == 0
    assert torch.get_num_threads() == threads
    seen = []  # a thread started afterwards still gets every torch thread
    _native_threads_added_by(lambda: seen.append(torch.get_num_threads()))
    assert seen == [threads]
    # the control: without it, the helper's parallel op starts a team of its own
    assert _native_threads_added_by(_parallel_work) >= 1


@needs_openmp_team
def test_adapter_loader_threads_run_torch_ops_without_an_openmp_team():
    """Packing an adapter is parallel torch work; on a loader thread with a team of its
    own it slowed every later decode step with LoRA from 26 to 46 ms (2 cores)."""
    _parallel_work()
    before = _native_threads()
    loader = AdapterLoader(lambda req: _parallel_work(), 1)
    try:
        loader.submit(LoRARequest("a", 1, "/nowhere"))
        loader.wait_any(timeout=60)
        assert loader.poll().keys() == {1}
        assert _native_threads() == before  # the loader thread lives on: so would a team
    finally:
        loader.shutdown()


def test_async_engine_builds_the_model_on_the_thread_that_steps_it(monkeypatch, tiny_models):
    """Loading the model is parallel torch work: built on the caller's thread, the caller
    keeps a team beside the engine thread's (a base decode step 21 -> 29 ms on 2 cores)."""
    built_on = []
    build = LLMEngine.from_engine_args

    def spy_build(args):
        built_on.append(threading.get_ident())
        return build(args)
    monkeypatch.setattr(LLMEngine, "from_engine_args", staticmethod(spy_build))
    args = EngineArgs(model=str(tiny_models["llama"]), dtype="float32", max_model_len=64,
                      cpu_kv_cache_gib=0.02)

    async def main() -> None:
        engine = AsyncLLMEngine.from_engine_args(args)
        try:
            assert built_on == [await engine.run(threading.get_ident)]
            assert built_on[0] != threading.get_ident()
        finally:
            await engine.shutdown()
    asyncio.run(main())


@needs_openmp_team
def test_torch_openmp_found_beside_another_wheels_copy():
    """sentencepiece (mistral_common's) brings its own libgomp, mapped before torch's:
    the runtime whose team is limited must be torch's own."""
    pytest.importorskip("sentencepiece")
    import sentencepiece  # noqa: F401  (maps its libgomp copy)

    home = Path(torch.__file__).parent
    assert Path(torch_openmp_library()).parent in (home / "lib", home.with_name("torch.libs"))
