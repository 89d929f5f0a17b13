"""Background adapter loads: read + validate on worker threads, never on the step loop.

    step loop:  submit(id) ... poll() -> {id: PackedLoRA | LoRAError}   (non-blocking)
    worker:     read adapter_config.json + weights, validate, scale   (load_adapter)

A load is submitted once per adapter however many requests wait for it; the step loop
picks finished loads up at the start of the next step and keeps serving everyone else
meanwhile. Every adapter read's wall time (here or by a direct load) is recorded for
the load-latency metric.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

import torch

from loraplex.lora.adapter import PackedLoRA
from loraplex.lora.errors import LoRAError
from loraplex.lora.request import LoRARequest
from loraplex.worker.cpu_threads import run_torch_ops_single_threaded
from loraplex.worker.device import use_device

logger = logging.getLogger(__name__)

LoadResult = PackedLoRA | LoRAError
T = TypeVar("T")


class AdapterLoader:
    def __init__(self, load_fn: Callable[[LoRARequest], PackedLoRA], num_workers: int = 2,
                 device: torch.device | None = None) -> None:
        self._load_fn = load_fn
        self._executor = ThreadPoolExecutor(
            num_workers, thread_name_prefix="loraplex-lora",
            initializer=functools.partial(_start_worker, device))
        self._inflight: dict[int, Future] = {}
        self.latencies: list[float] = []  # seconds per finished load (drain_latencies)

    def __contains__(self, lora_int_id: int) -> bool:
        return lora_int_id in self._inflight

    @property
    def num_inflight(self) -> int:
        return len(self._inflight)

    def submit(self, req: LoRARequest) -> bool:
        """Start loading `req` unless it is already loading. True if a load was started."""
        if req.lora_int_id in self._inflight:
            return False
        self._inflight[req.lora_int_id] = self._executor.submit(self._load, req)
        return True

    def _load(self, req: LoRARequest) -> LoadResult:
        try:
            return self._load_fn(req)
        except LoRAError as e:
            return e
        except Exception as e:  # an I/O or parsing failure we did not foresee: still per-adapter
            logger.exception("loading adapter %r failed", req.lora_name)
            return LoRAError(f"LoRA adapter {req.lora_name!r}: loading failed: {e!r}")

    def run(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """`fn(*args)` on a worker thread, for a caller that waits for it itself: not an
        in-flight load (poll never returns it), and its errors are raised by the future."""
        return self._executor.submit(fn, *args)

    def record(self, seconds: float) -> None:
        """Note one adapter read (from any thread: list.append is atomic)."""
        self.latencies.append(seconds)

    def poll(self) -> dict[int, LoadResult]:
        """Finished loads since the last poll (never blocks)."""
        done: dict[int, LoadResult] = {}
        for lora_id, fut in list(self._inflight.items()):
            if fut.done():
                del self._inflight[lora_id]
                done[lora_id] = fut.result()
        return done

    def drain_latencies(self) -> list[float]:
        """Load times recorded since the last call."""
        out, self.latencies = self.latencies, []
        return out

    def wait_any(self, timeout: float) -> None:
        """Block until some load finishes (or `timeout`): for an engine with nothing else to do."""
        if self._inflight:
            wait(list(self._inflight.values()), timeout=timeout, return_when=FIRST_COMPLETED)

    def cancel(self, lora_int_id: int) -> None:
        """Forget a load (the adapter was unregistered); a running read finishes unseen."""
        fut = self._inflight.pop(lora_int_id, None)
        if fut is not None:
            fut.cancel()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _start_worker(device: torch.device | None) -> None:
    # no OpenMP team of its own beside the step loop's (worker/cpu_threads.py); pinning
    # host memory makes a CUDA context on the thread's current device: with cuda:N the
    # workers pin from cuda:N, not from GPU 0 (a context there costs memory)
    run_torch_ops_single_threaded()
    if device is not None:
        use_device(device)
