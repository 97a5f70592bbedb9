"""Dynamic batching: images of concurrent requests gathered into one model call.

The model runs on one thread of its own, a batch at a time. While it runs, arriving images queue; when it
is free, the next batch takes what is queued (up to ``max_batch``) at once, and waits at most ``max_wait``
seconds for more only when fewer are queued (Triton's dynamic batcher works the same way: a full batch
never waits, and under load the queue fills batches by itself). A failing model call fails the images of
that batch, not the service.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Item(Generic[T, R]):
    payload: T
    future: asyncio.Future[R]


class DynamicBatcher(Generic[T, R]):
    """``await batcher.submit(x)`` -> ``run_batch([..., x, ...])``'s result for ``x``.

    ``run_batch(payloads) -> results`` (one per payload, in order) runs on the model thread.
    ``on_batch(size, seconds)`` is told each call (metrics). Use as ``async with``: the loop task starts
    on entry and, on exit, finishes the queued images before it stops.
    """

    def __init__(self, run_batch: Callable[[list[T]], Sequence[R]], max_batch: int = 32, max_wait: float = 0.005,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_wait < 0:
            raise ValueError("max_wait must not be negative")
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Item[T, R]] = asyncio.Queue()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="batchinfer-model")
        self._task: asyncio.Task[None] | None = None
        self.batches = 0

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def submit(self, payload: T) -> R:
        if self._task is None or self._task.done():
            raise RuntimeError("the batcher is not running")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(payload, future))
        return await future

    async def submit_many(self, payloads: Sequence[T]) -> list[R]:
        """Every payload of one request, each free to join whichever batch has room."""
        return list(await asyncio.gather(*(self.submit(p) for p in payloads)))

    async def __aenter__(self) -> DynamicBatcher[T, R]:
        self._task = asyncio.create_task(self._loop(), name="batchinfer-batcher")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._queue.join()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._thread.shutdown(wait=True)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(items) < self.max_batch:
                if not self._queue.empty():
                    items.append(self._queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            try:
                await self._run(loop, items)
            finally:
                for _ in items:
                    self._queue.task_done()

    async def _run(self, loop: asyncio.AbstractEventLoop, items: list[_Item[T, R]]) -> None:
        live = [item for item in items if not item.future.done()]  # a client that went away is not computed
        if not live:
            return
        start = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._thread, self.run_batch, [i.payload for i in live])
            if len(results) != len(live):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(live)} inputs")
        except Exception as exc:  # the model call failed: this batch's requests get the error, the loop goes on
            log.exception("a batch of %d failed", len(live))
            for item in live:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        finally:
            self.batches += 1
            if self.on_batch is not None:
                self.on_batch(len(live), time.perf_counter() - start)
        for item, result in zip(live, results):
            if not item.future.done():
                item.future.set_result(result)
