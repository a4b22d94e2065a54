"""The work window (STN_WORK_WINDOW): admitted images are decoded a window at a time, first come first served."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_http_v1 import encode
from test_runtime_pipeline import smooth_image

from service.api.admission import WorkWindow
from tests.service.support import live_server


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_window_grants_room_in_arrival_order_by_weight() -> None:
    async def main() -> list[str]:
        window, order = WorkWindow(4), []
        release = {k: asyncio.Event() for k in "abcd"}

        async def job(name: str, n: int) -> None:
            async with window.hold(n):
                order.append(name)
                assert window.used <= window.size
                await release[name].wait()

        a = asyncio.create_task(job("a", 3))
        await asyncio.sleep(0)
        b = asyncio.create_task(job("b", 2))  # does not fit beside a: waits
        await asyncio.sleep(0)
        c = asyncio.create_task(job("c", 1))  # would fit, but b is first in line: no overtaking
        await asyncio.sleep(0.01)
        assert order == ["a"] and window.used == 3 and window.waiting == 3
        release["a"].set()
        await asyncio.sleep(0.01)
        assert order == ["a", "b", "c"] and window.used == 3
        d = asyncio.create_task(job("d", 99))  # more than the window: takes all of it, once it is free
        await asyncio.sleep(0.01)
        assert order == ["a", "b", "c"]
        release["b"].set()
        release["c"].set()
        await asyncio.sleep(0.01)
        assert order == ["a", "b", "c", "d"] and window.used == 4
        release["d"].set()
        await asyncio.gather(a, b, c, d)
        assert window.used == 0 and window.waiting == 0
        return order

    assert run(main()) == ["a", "b", "c", "d"]


def test_a_cancelled_waiter_leaves_the_line_and_gives_back_what_it_was_granted() -> None:
    async def main() -> None:
        window = WorkWindow(2)
        hold_a, entered = asyncio.Event(), []

        async def job(name: str, n: int, gate: asyncio.Event | None = None) -> None:
            async with window.hold(n):
                entered.append(name)
                if gate is not None:
                    await gate.wait()

        a = asyncio.create_task(job("a", 2, hold_a))
        await asyncio.sleep(0)
        b = asyncio.create_task(job("b", 2))  # first in line
        c = asyncio.create_task(job("c", 1))  # behind b
        await asyncio.sleep(0.01)
        b.cancel()  # the client left (or timed out) while waiting: c moves up
        with pytest.raises(asyncio.CancelledError):
            await b
        hold_a.set()
        await asyncio.gather(a, c)
        assert entered == ["a", "c"] and window.used == 0

        # room granted in the same iteration as the cancel: given back, not leaked
        async with window.hold(2):
            late = asyncio.create_task(job("late", 2))
            await asyncio.sleep(0.01)
            assert window.waiting == 2
        # leaving the block granted `late` its room; it is cancelled before it could run
        late.cancel()
        with pytest.raises(asyncio.CancelledError):
            await late
        assert "late" not in entered and window.used == 0 and window.waiting == 0

    run(main())


def test_the_server_decodes_a_window_at_a_time_and_serves_everything_admitted(model_dir: Path) -> None:
    """8 concurrent requests, a window of 2: all 8 are admitted (queue depth), at most 2 are decoded
    and worked on at once, the rest wait in line, and every request gets its 200."""
    png = encode(smooth_image(300, 400, 1, seed=5), "PNG")
    with live_server(model_dir=model_dir, work_window=2, workers=2, max_queue_delay_ms=1) as srv:
        state, seen = srv.state, {"used": 0, "preparing": 0, "waiting": 0}
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                seen["used"] = max(seen["used"], state.window.used)
                seen["preparing"] = max(seen["preparing"], state.preparing.get("affine", 0))
                seen["waiting"] = max(seen["waiting"], state.window.waiting)
                time.sleep(0.0005)

        statuses: list[int] = []

        def client() -> None:
            r = httpx.post(srv.url + "/v1/rectify", params={"model": "affine", "size": "1500x1500", "format": "png"},
                           content=png, headers={"content-type": "image/png"}, timeout=60)
            statuses.append(r.status_code)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        clients = [threading.Thread(target=client) for _ in range(8)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(timeout=90)
        stop.set()
        watcher.join()
        assert statuses == [200] * 8
        assert seen["used"] <= 2 and seen["preparing"] <= 2, seen
        assert seen["waiting"] >= 1, seen  # some admitted requests did wait for room
        assert state.window.used == 0 and state.inflight["affine"] == 0
