"""A thread pool for the CPU stages (decode, resize, sample, encode) that coalesces calls.

Every hand-off between the event loop and a worker thread costs a wake-up and a GIL
hand-over; on a busy server with few cores that is a sizeable share of an image's cost.
``CoalescingExecutor.run`` gathers the calls made during one event-loop iteration (under
load: several requests' images, or all images of a localisation batch) and hands them to
the threads in at most ``threads`` chunks, each chunk one hand-off each way. On an idle
server a call is its own chunk, so latency does not change; with N threads, N chunks keep
N cores busy.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)

_Call = tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future]


class CoalescingExecutor:
    """``await run(fn, *args)`` runs ``fn(*args)`` on a worker thread (see module docstring)."""

    def __init__(self, threads: int, name: str = "stn-worker") -> None:
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=name)
        self._pending: list[_Call] = []

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((fn, args, future))
        if len(self._pending) == 1:
            loop.call_soon(self._flush, loop)
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        calls, self._pending = self._pending, []
        n = min(self.threads, len(calls))
        for k in range(n):
            chunk = calls[k::n]
            self._pool.submit(self._run_chunk, loop, chunk)

    @staticmethod
    def _run_chunk(loop: asyncio.AbstractEventLoop, chunk: list[_Call]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        for fn, args, future in chunk:
            if future.cancelled():
                outcomes.append((False, None))
                continue
            try:
                outcomes.append((True, fn(*args)))
            except BaseException as e:  # noqa: BLE001 (delivered to the caller)
                outcomes.append((False, e))
        try:
            loop.call_soon_threadsafe(_deliver, chunk, outcomes)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The underlying pool (for code that wants plain ``run_in_executor``)."""
        return self._pool

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _deliver(chunk: list[_Call], outcomes: list[tuple[bool, Any]]) -> None:
    for (_, _, future), (ok, value) in zip(chunk, outcomes, strict=True):
        if future.done():
            continue
        if ok:
            future.set_result(value)
        elif value is not None:
            future.set_exception(value)
        else:
            future.cancel()


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


def tune_malloc(keep_bytes: int) -> bool:
    """Let glibc keep up to ``keep_bytes`` of freed memory instead of returning it to the OS at once.

    Images are decoded on worker threads, whose glibc arenas give freed memory back to the
    kernel eagerly; every next image then page-faults its buffers in again (about 270 minor
    faults per 384x288 image, some 25% of its CPU time on one core). Raising the trim and
    mmap thresholds (``mallopt``) keeps those pages for reuse. No-op (False) off glibc or with
    ``keep_bytes <= 0``.
    """
    if keep_bytes <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(min(keep_bytes, 2**31 - 1))) == 1
        ok = libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(min(keep_bytes, MMAP_THRESHOLD_MAX))) == 1 and ok
    except (OSError, AttributeError):
        return False
    if not ok:
        log.warning("mallopt refused the malloc thresholds; freed memory goes back to the OS eagerly")
    return ok
