"""Async helpers for the server: merge request streams, cancel handlers of gone clients."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request

T = TypeVar("T")


async def merge_async_iterators(*iterators: AsyncIterator[T]) -> AsyncIterator[tuple[int, T]]:
    """Yield (index, item) from several async iterators as items arrive.

    On exit (error, cancel, or the consumer closing us) every unfinished iterator is
    cancelled and closed, which aborts its engine request.
    """
    if len(iterators) == 1:
        async for item in iterators[0]:
            yield 0, item
        return
    loop = asyncio.get_running_loop()
    pending = {loop.create_task(_anext(it)): (i, it) for i, it in enumerate(iterators)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i, it = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                pending[loop.create_task(_anext(it))] = (i, it)
                yield i, item
    finally:
        for task, (_, it) in pending.items():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            with contextlib.suppress(BaseException):
                await it.aclose()


async def _anext(it: AsyncIterator[T]) -> T:
    return await it.__anext__()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def with_cancellation(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Cancel the handler (and so abort its engine requests) when the client disconnects.

    The handler must take the raw ``Request`` as keyword ``raw_request``.
    """

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        request: Request = kwargs["raw_request"]
        work = asyncio.ensure_future(handler(*args, **kwargs))
        watch = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            work.cancel()
            watch.cancel()
            raise
        if work in done:
            watch.cancel()
            return work.result()
        work.cancel()
        with contextlib.suppress(BaseException):
            await work
        return None

    return wrapper
