"""Triton-style dynamic batching on asyncio: a bounded queue, a max batch size, a max queue delay.

Callers ``await submit_many(values, timeout)``; a loop task gathers queued values into a
batch (up to ``max_batch_size``, waiting at most ``max_queue_delay_s`` after the oldest one
arrived) and runs ``run_batch(values) -> results`` in a worker thread, so the event loop
stays free. While one batch runs, the next one fills: under load batches grow by themselves.

- The queue is bounded: :class:`QueueFullError` at once when the values do not fit.
- A caller waiting longer than its timeout gets :class:`QueueTimeoutError`; its values are
  dropped from the queue if they have not started.
- A batch that raises is retried one value at a time, so a failing value fails only its caller.
- ``expected()`` (optional) says how many values are on their way (e.g. images still being
  decoded). The batcher waits for batch-mates only while some are expected: a lone request
  on an idle server is not delayed by ``max_queue_delay_s``, and a busy one still batches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The queue cannot take the values now; retry later."""


class QueueTimeoutError(TimeoutError):
    """The values waited longer than the caller's timeout."""


@dataclass(slots=True)
class _Item:
    value: Any
    future: asyncio.Future
    enqueued: float


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


BatchObserver = Callable[[int, Sequence[float], float], None]  # (batch size, queue seconds per item, compute seconds)


class DynamicBatcher:
    """Gathers values from concurrent callers into batches for ``run_batch`` (see module docstring)."""

    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], *, max_batch_size: int = 32,
                 max_queue_delay_s: float = 0.002, max_queue_size: int = 256, name: str = "batcher",
                 on_batch: BatchObserver | None = None, expected: Callable[[], int] | None = None) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_queue_delay_s < 0:
            raise ValueError("max_batch_size and max_queue_size must be >= 1 and max_queue_delay_s >= 0")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.name = name
        self.on_batch = on_batch
        self.expected = expected
        self._queue: deque[_Item] = deque()
        self._waiter: asyncio.Future | None = None  # set when values arrive (cheaper than an Event + wait_for)
        self._running = False
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-batch")

    @property
    def depth(self) -> int:
        """Values waiting (not yet in a running batch)."""
        return len(self._queue)

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self._task is None:
            self._running = True
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"{self.name}-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(QueueFullError("the server is shutting down"))
        self._queue.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit_many(self, values: Sequence[Any], timeout: float | None = None) -> list[Any]:
        """Queue all ``values`` (or none: QueueFullError) and wait for their results, in order."""
        if self._task is None:
            raise RuntimeError(f"{self.name}: start() the batcher first")
        self._purge_cancelled()
        if len(self._queue) + len(values) > self.max_queue_size:
            raise QueueFullError(f"the queue holds {len(self._queue)} of {self.max_queue_size} images")
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        items = [_Item(v, loop.create_future(), now) for v in values]
        self._queue.extend(items)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        try:
            async with asyncio.timeout(timeout):
                return [await i.future for i in items]
        except TimeoutError:
            raise QueueTimeoutError(f"no result within {timeout:.3g}s") from None
        finally:
            for i in items:  # on timeout or cancellation, the loop skips these
                if not i.future.done():
                    i.future.cancel()

    async def submit(self, value: Any, timeout: float | None = None) -> Any:
        return (await self.submit_many([value], timeout))[0]

    def _purge_cancelled(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()

    async def _wait_for_arrival(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = loop.call_later(timeout, _wake, waiter) if timeout is not None else None
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._waiter = None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._purge_cancelled()
            if not self._queue:
                await self._wait_for_arrival(None)
                continue
            deadline = self._queue[0].enqueued + self.max_queue_delay_s
            while len(self._queue) < self.max_batch_size:
                if self.expected is not None and self.expected() <= 0:
                    break
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                await self._wait_for_arrival(remaining)
            batch: list[_Item] = []
            while self._queue and len(batch) < self.max_batch_size:
                item = self._queue.popleft()
                if not item.future.done():
                    batch.append(item)
            if not batch:
                continue
            started = time.perf_counter()
            try:
                outcomes = await loop.run_in_executor(self._executor, self._run_safely, [i.value for i in batch])
            except Exception as e:  # noqa: BLE001 (never let the loop die)
                outcomes = [e] * len(batch)
            compute = time.perf_counter() - started
            if self.on_batch is not None:
                try:
                    self.on_batch(len(batch), [started - i.enqueued for i in batch], compute)
                except Exception:  # noqa: BLE001
                    log.exception("%s: batch observer failed", self.name)
            for item, outcome in zip(batch, outcomes, strict=True):
                if item.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    item.future.set_exception(outcome)
                else:
                    item.future.set_result(outcome)

    def _run_safely(self, values: list[Any]) -> list[Any]:
        """Results, or per-value exceptions: a failing batch is retried one value at a time."""
        try:
            results = list(self.run_batch(values))
            if len(results) != len(values):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(values)} values")
            return results
        except Exception as e:  # noqa: BLE001
            if len(values) == 1:
                return [e]
            log.warning("%s: a batch of %d failed (%s); retrying one by one", self.name, len(values), e)
            return [self._run_safely([v])[0] for v in values]
