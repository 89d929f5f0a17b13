"""AsyncLLMEngine: an asyncio front over the (single-threaded) LLMEngine.

One background task runs ``step()`` on a dedicated one-worker thread; every other
engine call goes through that same thread, so calls never overlap and new requests
join the running batch between steps. `from_engine_args` builds the engine on that
thread too: on the CPU the thread that loads the model keeps an OpenMP team, and a second
team beside the stepping thread's slows every step (worker/cpu_threads.py). Each request
gets a stream (async generator of cumulative RequestOutputs). Closing a stream early
(client gone) aborts the request.
Adapter files are read on other threads (``prepare_lora``) so loads never stall steps.

Which adapters exist is the engine's own state (``list_loras``), read on the engine
thread in the same call that queues a request: there is no copy here to go stale when
a load, an unload and requests race.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from loraplex.engine.arg_utils import EngineArgs
from loraplex.engine.llm_engine import LLMEngine
from loraplex.inputs import PromptType
from loraplex.lora.adapter import PackedLoRA
from loraplex.lora.errors import LoRAError
from loraplex.lora.request import LoRARequest
from loraplex.metrics import Metrics
from loraplex.outputs import PoolingRequestOutput, RequestOutput
from loraplex.pooling_params import PoolingParams
from loraplex.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")


def _engine_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(1, thread_name_prefix="loraplex-engine")


class EngineDeadError(RuntimeError):
    """The engine failed while running a request (a server bug, not the request's fault)."""


class EngineStoppedError(RuntimeError):
    """The engine was shut down."""


class LoRANotLoadedError(LoRAError):
    """A request names an adapter id the engine does not hold (now): unloaded or replaced
    since the caller looked it up, with ``load_lora=False``. Look the name up again."""


@dataclass
class _Stream:
    model_name: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None
    num_tokens: int = 0
    prompt_tokens: int = 0
    finished: bool = False


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, model_name: str | None = None,
                 metrics: Metrics | None = None,
                 executor: ThreadPoolExecutor | None = None) -> None:
        """`executor`: the one-worker pool that built `engine` (from_engine_args)."""
        self.engine = engine
        self.model_name = model_name or engine.model_config.name
        self.metrics = metrics
        self._executor = executor or _engine_thread()
        self._streams: dict[str, _Stream] = {}
        self._forget: set[str] = set()  # unloaded models whose metrics go with their last stream
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._stopped = False
        self.errored: BaseException | None = None  # last step failure, for /health and logs
        self.stats = None

    @classmethod
    def from_engine_args(cls, args: EngineArgs, **kw: Any) -> AsyncLLMEngine:
        """Build the engine on the thread that will step it (blocks until it is built)."""
        executor = _engine_thread()
        try:
            engine = executor.submit(LLMEngine.from_engine_args, args).result()
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(engine, executor=executor, **kw)

    # ---- plumbing ---------------------------------------------------------------------
    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the engine thread (between steps)."""
        if self._stopped:
            raise EngineStoppedError("the engine is shut down")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def start(self) -> None:
        if self._loop_task is None:
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())

    async def shutdown(self) -> None:
        self._stopped = True
        if self._wake is not None:
            self._wake.set()
        if self._loop_task is not None:
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for rid in list(self._streams):
            self._finish_stream(rid, EngineStoppedError("the server is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def is_running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    def _step(self) -> tuple[list[RequestOutput], bool]:
        outputs = self.engine.step()
        self._refresh_stats()
        return outputs, self.engine.has_unfinished_requests()

    def _refresh_stats(self) -> None:
        self.stats = self.engine.get_stats()
        if self.metrics is not None:
            self.metrics.update_engine(self.stats)

    async def _run_loop(self) -> None:
        """Step while there is work; sleep on an event otherwise (no busy spin)."""
        assert self._wake is not None
        while not self._stopped:
            self._wake.clear()  # before the step: a request added during it re-sets it
            try:
                outputs, busy = await self.run(self._step)
            except EngineStoppedError:
                break
            except Exception as e:
                logger.exception("engine step failed; failing the requests in flight")
                self.errored = e
                await self._fail_all(e)
                continue
            now = time.monotonic()
            for out in outputs:
                self._dispatch(out, now)
            if not busy:
                await self._wake.wait()
            else:
                await asyncio.sleep(0)  # let handlers add requests and read streams

    async def _fail_all(self, exc: BaseException) -> None:
        """Drop every request from the engine, then fail their streams (in that order, so
        a client that sees the error sees the engine already clean). Only the streams
        present now: a request added while we abort is not part of the failed step."""
        ids = list(self._streams)

        def abort_all() -> None:
            self.engine.abort_request(list(self.engine.requests))
            self._refresh_stats()
        try:
            await self.run(abort_all)
        except Exception:
            logger.exception("could not abort requests after a failed step")
        for rid in ids:
            self._finish_stream(rid, EngineDeadError(f"engine step failed: {exc!r}"), "error")

    def _dispatch(self, out: RequestOutput | PoolingRequestOutput, now: float) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        if isinstance(out, PoolingRequestOutput):  # one output, no tokens generated
            stream.queue.put_nowait(out)
            if out.finished:
                self._finish_stream(out.request_id, None, "error" if out.error else "stop")
            return
        n = sum(len(c.token_ids) for c in out.outputs)
        if n > stream.num_tokens and self.metrics is not None:
            first = stream.first_token is None
            since = stream.arrival if first else stream.last_token
            self._record(self.metrics.observe_token, stream.model_name, now - since, first)
        if n > stream.num_tokens:
            stream.first_token = stream.first_token or now
            stream.last_token = now
            stream.num_tokens = n
        stream.queue.put_nowait(out)
        if out.finished:
            reason = "error" if out.error else (out.outputs[0].finish_reason or "stop")
            self._finish_stream(out.request_id, None, reason)

    def _finish_stream(self, request_id: str, exc: BaseException | None,
                       reason: str = "error") -> None:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        if exc is not None:
            stream.queue.put_nowait(exc)
        if self.metrics is not None:
            self._record(self.metrics.observe_finished, stream.model_name, reason,
                         stream.prompt_tokens, stream.num_tokens,
                         time.monotonic() - stream.arrival)
        self._stream_gone(stream.model_name)

    @staticmethod
    def _record(observe: Callable[..., None], *args: Any) -> None:
        """Metrics bookkeeping runs in the loop that serves every request: a failure
        there is logged, never raised into it."""
        try:
            observe(*args)
        except Exception:
            logger.exception("metrics bookkeeping failed (%s)", observe.__name__)

    # ---- metrics of unloaded models ---------------------------------------------------
    def forget_model_metrics(self, model_name: str) -> None:
        """Drop an unloaded adapter's metric series, once its last request in flight is
        done: one finishing later would bring them back, and nothing would drop them."""
        if self.metrics is None:
            return
        self._forget.add(model_name)
        self._stream_gone(model_name)

    def keep_model_metrics(self, model_name: str) -> None:
        """The name is served again (loaded after an unload): its series stay."""
        self._forget.discard(model_name)

    def _stream_gone(self, model_name: str) -> None:
        if model_name in self._forget and all(
                s.model_name != model_name for s in self._streams.values()):
            self._forget.discard(model_name)
            self._record(self.metrics.forget_model, model_name)

    # ---- requests ---------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: PromptType,
                          sampling_params: SamplingParams | PoolingParams,
                          lora_request: LoRARequest | None = None, *, load_lora: bool = True,
                          priority: int = 0) -> AsyncGenerator[RequestOutput, None]:
        """Queue a request; return its stream. Raises ValueError (LoRAError for a bad
        adapter) when it is rejected. The caller must iterate the stream to its end or
        close it (or call ``abort``): that is what frees the request's KV blocks.
        `priority`: as in LLMEngine.add_request. PoolingParams on a pooling engine: one
        PoolingRequestOutput, finished.

        An adapter the engine does not hold is read on a worker thread and registered
        (vLLM's behaviour); with ``load_lora=False`` it raises LoRANotLoadedError instead,
        for callers (the server) whose adapter ids are only valid while registered.
        """
        self.start()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        name = lora_request.lora_name if lora_request is not None else self.model_name
        stream = _Stream(name)
        self._streams[request_id] = stream
        args = (request_id, prompt, sampling_params, lora_request, priority)
        try:
            if not await self.run(self._add_now, *args, None):
                if not load_lora:
                    raise LoRANotLoadedError(
                        f"LoRA adapter {lora_request.lora_name!r} (id "
                        f"{lora_request.lora_int_id}) is not loaded: it was unloaded or "
                        "replaced")
                await self.run(self._add_now, *args, await self.prepare_lora(lora_request))
        except BaseException:
            self._streams.pop(request_id, None)
            self._stream_gone(name)
            if not self._stopped:  # cancelled mid-add: the engine may hold it already
                self._executor.submit(self.engine.abort_request, request_id)
            raise
        if self._streams.get(request_id) is not stream:  # failed by a step error meanwhile
            self._executor.submit(self.engine.abort_request, request_id)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            stream.prompt_tokens = len(prompt["prompt_token_ids"])
        elif isinstance(prompt, list):
            stream.prompt_tokens = len(prompt)
        assert self._wake is not None
        self._wake.set()
        return self._iterate(request_id, stream)

    def _add_now(self, request_id: str, prompt: PromptType,
                 params: SamplingParams | PoolingParams,
                 lora: LoRARequest | None, priority: int, prepared: PackedLoRA | None
                 ) -> bool:
        """On the engine thread: queue the request if its adapter is registered (or
        ``prepared`` registers it). False, with nothing queued, if the adapter is missing."""
        if lora is not None:
            if prepared is not None:
                self.engine.add_lora(lora, prepared)
            elif not self.engine.has_lora(lora.lora_int_id):
                return False
        self.engine.add_request(request_id, prompt, params, lora, priority)
        return True

    async def _iterate(self, request_id: str, stream: _Stream
                       ) -> AsyncGenerator[RequestOutput, None]:
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                if stream.prompt_tokens == 0:
                    stream.prompt_tokens = int(item.metrics.get("num_prompt_tokens", 0))
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._abort_now(request_id)

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams,
                       request_id: str, lora_request: LoRARequest | None = None, *,
                       priority: int = 0) -> AsyncGenerator[RequestOutput, None]:
        """Stream cumulative RequestOutputs (vLLM's signature); the last is finished.
        Leaving the loop early aborts the request."""
        stream = await self.add_request(request_id, prompt, sampling_params, lora_request,
                                        priority=priority)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()
            self._abort_now(request_id)

    async def encode(self, prompt: PromptType, pooling_params: PoolingParams,
                     request_id: str, lora_request: LoRARequest | None = None, *,
                     priority: int = 0) -> AsyncGenerator[PoolingRequestOutput, None]:
        """vLLM's: a pooling request's one finished PoolingRequestOutput, as a stream."""
        async for out in self.generate(prompt, pooling_params, request_id, lora_request,
                                       priority=priority):
            yield out

    def _abort_now(self, request_id: str) -> None:
        """Abort without awaiting (safe in a cancelled task's finally)."""
        if request_id not in self._streams or self._stopped:
            return
        self._finish_stream(request_id, None, "abort")

        def abort() -> None:
            self.engine.abort_request(request_id)
            self._refresh_stats()
        self._executor.submit(abort)
        logger.info("aborted request %s", request_id)

    async def abort(self, request_id: str) -> None:
        self._abort_now(request_id)

    # ---- adapters ---------------------------------------------------------------------
    async def prepare_lora(self, lora_request: LoRARequest) -> PackedLoRA:
        """Read and validate the adapter on an adapter-loader thread (raises LoRAError)."""
        return await asyncio.wrap_future(self.engine.prepare_lora_in_background(lora_request))

    async def add_lora(self, lora_request: LoRARequest) -> bool:
        """Register an adapter, validated fully and read off the engine thread. False if
        this adapter is registered already (LoRAError if its id names another one)."""
        if await self.run(self.engine.has_lora, lora_request.lora_int_id):
            return await self.run(self.engine.add_lora, lora_request)
        prepared = await self.prepare_lora(lora_request)
        return await self.run(self.engine.add_lora, lora_request, prepared)

    async def remove_lora(self, lora_int_id: int) -> bool:
        """Unregister; requests running on it finish on its weights first (the engine's
        rule), and from now on no new request can use this id."""
        return await self.run(self.engine.remove_lora, lora_int_id)

    async def list_loras(self) -> set[int]:
        return await self.run(self.engine.list_loras)

    async def pin_lora(self, lora_int_id: int) -> bool:
        return await self.run(self.engine.pin_lora, lora_int_id)

    async def reset_prefix_cache(self) -> bool:
        return await self.run(self.engine.reset_prefix_cache)

    async def get_stats(self):
        def stats():
            self._refresh_stats()
            return self.stats
        return await self.run(stats)

    async def check_health(self) -> None:
        if self._stopped:
            raise EngineStoppedError("the engine is shut down")
        if self._loop_task is not None and self._loop_task.done():
            raise EngineDeadError("the engine loop has stopped")

    def get_tokenizer(self):
        return self.engine.tokenizer
