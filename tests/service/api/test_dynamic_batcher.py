"""service.api.batcher: batches form, the queue is bounded, timeouts, a failing value fails only itself."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.api.batcher import DynamicBatcher, QueueFullError, QueueTimeoutError


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_concurrent_values_are_batched_and_each_gets_its_own_result() -> None:
    sizes: list[int] = []

    def double(values: list[int]) -> list[int]:
        sizes.append(len(values))
        time.sleep(0.01)
        return [2 * v for v in values]

    async def main() -> list[int]:
        b = DynamicBatcher(double, max_batch_size=8, max_queue_delay_s=0.02, max_queue_size=100)
        b.start()
        try:
            return await asyncio.gather(*(b.submit(i) for i in range(40)))
        finally:
            await b.stop()

    assert run(main()) == [2 * i for i in range(40)]
    assert max(sizes) == 8 and sum(sizes) == 40


def test_queue_full_is_immediate() -> None:
    release = threading.Event()

    def slow(values: list[int]) -> list[int]:
        release.wait(5)
        return values

    async def main() -> None:
        b = DynamicBatcher(slow, max_batch_size=1, max_queue_delay_s=0, max_queue_size=2)
        b.start()
        try:
            first = asyncio.create_task(b.submit(0))
            await asyncio.sleep(0.05)  # 0 is running; the queue is empty again
            waiting = [asyncio.create_task(b.submit(i)) for i in (1, 2)]
            await asyncio.sleep(0.01)
            t0 = time.perf_counter()
            with pytest.raises(QueueFullError):
                await b.submit(3)
            assert time.perf_counter() - t0 < 0.05
            with pytest.raises(QueueFullError):
                await b.submit_many([4, 5, 6])
            release.set()
            assert await first == 0 and [await w for w in waiting] == [1, 2]
        finally:
            release.set()
            await b.stop()

    run(main())


def test_timeout_gives_up_and_is_dropped() -> None:
    calls: list[list[int]] = []
    release = threading.Event()

    def slow(values: list[int]) -> list[int]:
        calls.append(values)
        release.wait(5)
        return values

    async def main() -> None:
        b = DynamicBatcher(slow, max_batch_size=1, max_queue_delay_s=0, max_queue_size=10)
        b.start()
        try:
            first = asyncio.create_task(b.submit(0))
            await asyncio.sleep(0.02)
            with pytest.raises(QueueTimeoutError):
                await b.submit(1, timeout=0.05)
            release.set()
            assert await first == 0
            assert await b.submit(2) == 2
        finally:
            release.set()
            await b.stop()

    run(main())
    assert [1] not in calls, "a value whose caller timed out still ran"


def test_a_failing_value_fails_only_itself() -> None:
    def picky(values: list[int]) -> list[int]:
        if 13 in values:
            raise ValueError("13 is bad")
        return [v + 1 for v in values]

    async def main() -> list:
        b = DynamicBatcher(picky, max_batch_size=16, max_queue_delay_s=0.02, max_queue_size=100)
        b.start()
        try:
            return await asyncio.gather(*(b.submit(i) for i in range(10, 20)), return_exceptions=True)
        finally:
            await b.stop()

    out = run(main())
    assert isinstance(out[3], ValueError)
    assert [o for i, o in enumerate(out) if i != 3] == [v + 1 for v in range(10, 20) if v != 13]


def test_max_queue_delay_bounds_the_wait_of_a_lone_value() -> None:
    async def main() -> float:
        b = DynamicBatcher(lambda v: v, max_batch_size=64, max_queue_delay_s=0.05, max_queue_size=100)
        b.start()
        try:
            t0 = time.perf_counter()
            await b.submit(1)
            return time.perf_counter() - t0
        finally:
            await b.stop()

    assert 0.04 < run(main()) < 0.5


def test_coalescing_executor_chunks_calls_of_one_iteration() -> None:
    import threading as th

    from service.api.workers import CoalescingExecutor

    seen: list[str] = []

    def work(i: int) -> int:
        seen.append(th.current_thread().name)
        if i == 3:
            raise ValueError("three")
        return i * i

    async def main() -> list:
        ex = CoalescingExecutor(2)
        try:
            return await asyncio.gather(*(ex.run(work, i) for i in range(8)), return_exceptions=True)
        finally:
            ex.shutdown()

    out = run(main())
    assert isinstance(out[3], ValueError)
    assert [o for i, o in enumerate(out) if i != 3] == [i * i for i in range(8) if i != 3]
    assert len(set(seen)) <= 2
