"""Admission: what a request may cost, decided before the work is done, in one place for /v1 and /v2.

Budgets, all checked on the event loop in O(1) (no await between check and reserve):

- **images in flight per model** (``STN_MAX_QUEUE_SIZE``): admitted and not finished, whether
  decoding, queued for localisation or computing (exported as ``stn_queue_depth``). A request
  counts as one image from its admission, while its body is read, until its images are known
  (:meth:`Ticket.grow`): so the door's cheap check (:meth:`Admission.shed`) sees every request it
  let through, and a full queue is shed before the body is read rather than after;
- **memory** (``STN_MEMORY_BUDGET_MB``): the estimated bytes of every admitted request: its body
  while it is held, then per image the decoded arrays and the sampled output (:func:`image_cost`);
- **uploads** (``STN_MAX_UPLOADS``): request bodies being read at once; each must arrive within
  ``STN_BODY_TIMEOUT_S`` (else 408 and the connection is closed).

Admitted is not yet decoded: :class:`WorkWindow` (``STN_WORK_WINDOW``) lets only so many images
(all models) be decoded and worked on at once; the other admitted images wait, first come first
served, as the compressed bodies they arrived as. Decoding everything admitted at once would not
finish sooner: a few hundred decoded images in flight no longer fit the CPU's caches, and each
then costs over half as much CPU again (docs/BENCHMARKS.md, "Overload").

Protocol (both front ends)::

    async with state.admission.admit(model, body_bytes=declared) as ticket:  # 503 before the body is read
        body = await ticket.read(request.stream())   # or: async with ticket.reading(): ...
        ticket.grow(images=n, cost=..., preparing=False)  # 503 (413 if it can never fit) before decoding
        async with window.hold(n):                    # wait for room to decode (first come, first served)
            ticket.start_preparing(n)                 # the batcher now expects these images
        async with ticket.watch(request):             # the client leaves: its work is cancelled (499)
            ... work ...
    # everything released here, whatever happened

A request that alone exceeds a budget gets 413 (it can never fit); one that does not fit *now*
gets 503 with ``Retry-After``. While the server drains (SIGTERM) every new request gets 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from service.api.errors import ClientGone, Problem

if TYPE_CHECKING:
    from starlette.requests import Request

    from service.api.metrics import Metrics
    from service.settings import Settings

log = logging.getLogger(__name__)

MB = 1024 * 1024
RETRY = {"Retry-After": "1"}


def grid_floats(info: Any) -> int:
    """Float planes the sampler holds per output pixel besides the image (``image_cost``'s
    ``grid_floats_per_px``) for a model's ``info``: the base grid (x, y, 1), or for TPS its K kernel
    weights plus the runtime's copies of the sampling grid (measured: a TPS output peaked about three planes
    above the base grid and the sampling grid; four are counted)."""
    if info.transform == "tps":
        return info.tps_grid[0] * info.tps_grid[1] + 4
    return 3


def image_cost(channels: int, input_size: tuple[int, int], output_size: tuple[int, int],
               grid_floats_per_px: int = 3, *, extra: bool = False, wide: bool = False) -> int:
    """Estimated peak bytes of one image in the pipeline (an upper bound, not a measurement).

    ``channels``: what the image is decoded and rectified in (1 or 3: the upload's colour,
    ``images.declared_layout``, not the model's). Input (H, W): the decoded 8-bit image (up to 4 bytes
    a pixel) and two float32 copies (the array, and the contiguous copy the sampler reads); a fourth
    sample folded in while decoding (``extra``: alpha, CMYK's K) adds 14 bytes a pixel, samples over 8
    bits (``wide``) 8 (the decoder's own copies). Output (h, w): the float32 base grid and sampling grid
    (``grid_floats_per_px`` + 2 floats: :func:`grid_floats`), the float32 result, its 8-bit copy and the
    encoder's buffer. Both bounds are checked against measured peaks in tests/service/test_image_cost.py.
    """
    (h, w), (oh, ow) = input_size, output_size
    per_px = 4 + 8 * channels + 14 * extra + 8 * wide
    return h * w * per_px + oh * ow * (4 * (grid_floats_per_px + 2) + 4 * channels + 2 * channels)


class Admission:
    """The budgets of one app (see module docstring)."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.budget_bytes = settings.memory_budget_mb * MB
        self.inflight: dict[str, int] = {}  # images admitted and not finished, per model
        self.preparing: dict[str, int] = {}  # of those, images not yet handed to the batcher
        self.reserved_bytes = 0  # estimated bytes of all admitted requests
        self.uploads = 0  # bodies being read
        self.requests = 0  # admitted requests not finished (the drain waits for 0)
        self.draining = False
        self.on_finish: Callable[[str, int, float, bool], None] | None = None  # (model, images, seconds, ok): stats

    # ---- checks -----------------------------------------------------------------------------
    def shed(self, model: str | None = None) -> Problem | None:
        """The cheap early check (before routing): a Problem 503 when no new work (for ``model``) fits now."""
        if self.draining:
            return Problem(503, "the server is shutting down; retry on another instance", RETRY)
        if self.reserved_bytes >= self.budget_bytes:
            return Problem(503, f"the server is at its memory budget ({self.settings.memory_budget_mb} MB, "
                                "STN_MEMORY_BUDGET_MB); retry after a moment", RETRY)
        if self.uploads >= self.settings.max_uploads:
            return Problem(503, f"{self.uploads} uploads are being read (STN_MAX_UPLOADS); retry after a moment",
                           RETRY)
        if model is not None and self.inflight.get(model, 0) >= self.settings.max_queue_size:
            return self.queue_full(model)
        return None

    def queue_full(self, model: str, **extra: object) -> Problem:
        used, limit = self.inflight.get(model, 0), self.settings.max_queue_size
        return Problem(503, f"the queue of model {model!r} is full ({used} of {limit} images in flight; "
                            "STN_MAX_QUEUE_SIZE); retry after a moment", RETRY, **extra)

    def check_room(self, model: str, n: int, held: int = 0, **extra: object) -> None:
        """Problem 503 at once when ``n`` more images do not fit in the model's queue (``held`` of them
        are already counted: a request's provisional image), 413 when ``n`` never fits."""
        used, limit = self.inflight.get(model, 0) - held, self.settings.max_queue_size
        if n > limit:
            raise Problem(413, f"{n} images; the queue of a model holds {limit} (STN_MAX_QUEUE_SIZE)", **extra)
        if used + n > limit:
            raise self.queue_full(model, **extra)

    def check_bytes(self, cost: int, what: str, **extra: object) -> None:
        """Problem 413 when ``cost`` alone exceeds the memory budget, 503 when it does not fit now."""
        budget = self.budget_bytes
        if cost > budget:
            raise Problem(413, f"{what} needs about {cost / MB:.0f} MB of memory; the server's budget is "
                               f"{self.settings.memory_budget_mb} MB (STN_MEMORY_BUDGET_MB): send smaller "
                               "images or ask for a smaller size", **extra)
        if self.reserved_bytes + cost > budget:
            raise Problem(503, f"the server is at its memory budget ({self.reserved_bytes / MB:.0f} of "
                               f"{self.settings.memory_budget_mb} MB reserved, STN_MEMORY_BUDGET_MB); "
                               "retry after a moment", RETRY, **extra)

    # ---- the protocol -------------------------------------------------------------------------
    @asynccontextmanager
    async def admit(self, model: str, *, body_bytes: int = 0, **extra: object) -> AsyncIterator[Ticket]:
        """Admit a request for ``model`` whose body will hold ``body_bytes``; everything is released on exit."""
        if self.draining:
            raise Problem(503, "the server is shutting down; retry on another instance", RETRY, **extra)
        self.check_room(model, 1, **extra)
        if body_bytes and self.uploads >= self.settings.max_uploads:
            raise Problem(503, f"{self.uploads} uploads are being read (STN_MAX_UPLOADS); retry after a moment",
                          RETRY, **extra)
        self.check_bytes(body_bytes, "the request body", **extra)
        ticket = Ticket(self, model, extra)
        ticket._hold_provisional()
        ticket._reserve(0, body_bytes)
        self.requests += 1
        started, ok = time.perf_counter(), False
        try:
            yield ticket
            ok = True
        finally:
            self.requests -= 1
            images = ticket.images
            ticket._release_all()
            if self.on_finish is not None:
                self.on_finish(model, images, time.perf_counter() - started, ok)

    def _changed(self, model: str) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(model).set(self.inflight.get(model, 0))
            self.metrics.memory_reserved.set(self.reserved_bytes)

    def _add_bytes(self, n: int) -> None:
        """Reserve (n > 0) or release (n < 0) bytes that belong to no model's queue (a response being sent)."""
        self.reserved_bytes = max(0, self.reserved_bytes + n)
        if self.metrics is not None:
            self.metrics.memory_reserved.set(self.reserved_bytes)


class BudgetedResponse(Response):
    """A response whose body counts against the memory budget until it is handed to the connection.

    A finished result no longer belongs to its request's ticket, but a client that does not read keeps
    what the kernel cannot take in memory: of 20 such clients of 8.8 MB PNGs, 5 held 44 MB outside the
    budget, for as long as they kept their connections. The body is sent in
    :attr:`CHUNK` pieces, so the server's flow control (writing paused while the connection's buffer is
    full) holds back the rest, and its bytes stay reserved (``Admission.reserved_bytes``) until the last
    piece is written; new work is shed while too much waits to be read. A client that reads nothing for
    STN_BODY_TIMEOUT_S loses the connection (``service.api.server``), which ends the wait.
    """

    CHUNK = 1024 * 1024

    def __init__(self, content: bytes, admission: Admission, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.admission = admission

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = self.body
        self.admission._add_bytes(len(body))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            view = memoryview(body)
            for start in range(0, max(1, len(body)), self.CHUNK):
                end = start + self.CHUNK
                await send({"type": "http.response.body", "body": bytes(view[start:end]), "more_body": end < len(body)})
        finally:
            self.admission._add_bytes(-len(body))
        if self.background is not None:
            await self.background()


class Ticket:
    """One admitted request's reservations (see :meth:`Admission.admit`)."""

    def __init__(self, admission: Admission, model: str, extra: dict[str, object]) -> None:
        self.admission = admission
        self.model = model
        self.extra = extra
        self.images = 0
        self.bytes = 0
        self.preparing = 0
        self.provisional = 0  # the one image a request counts for until its images are known (grow)
        self.uploading = False

    def _reserve(self, images: int, nbytes: int) -> None:
        a = self.admission
        a.inflight[self.model] = a.inflight.get(self.model, 0) + images
        a.reserved_bytes += nbytes
        self.images += images
        self.bytes += nbytes
        a._changed(self.model)

    def grow(self, images: int, cost: int, what: str = "the request", preparing: bool = True) -> None:
        """Reserve ``images`` more images and ``cost`` more bytes, or Problem 503/413 (nothing reserved).

        ``preparing``: the images are about to be prepared (the batcher expects them); False when they
        first wait for the :class:`WorkWindow` (then :meth:`start_preparing` once they hold it).
        """
        self.admission.check_room(self.model, images, self.provisional, **self.extra)
        self._check_fits(cost, what)
        self._drop_provisional()
        self._reserve(images, cost)
        if preparing:
            self.start_preparing(images)

    def reserve_bytes(self, cost: int, what: str = "the request") -> None:
        """Reserve ``cost`` more bytes for what the request already holds (its parsed body, say), or Problem
        413 (the request can never fit) / 503 (not now); its images are unchanged."""
        self._check_fits(cost, what)
        self._reserve(0, cost)

    def _check_fits(self, cost: int, what: str) -> None:
        a = self.admission
        if self.bytes + cost > a.budget_bytes:  # the whole request can never fit: 413
            a.check_bytes(self.bytes + cost, what, **self.extra)
        a.check_bytes(cost, what, **self.extra)  # does not fit now: 503

    def _hold_provisional(self) -> None:  # (metrics: the _reserve that follows in admit)
        self.provisional = 1
        a = self.admission
        a.inflight[self.model] = a.inflight.get(self.model, 0) + 1

    def _drop_provisional(self) -> None:
        if self.provisional:
            a = self.admission
            a.inflight[self.model] = max(0, a.inflight.get(self.model, 0) - self.provisional)
            self.provisional = 0

    def start_preparing(self, n: int) -> None:
        """``n`` admitted images are being prepared now: the batcher waits for them as batch-mates."""
        a = self.admission
        a.preparing[self.model] = a.preparing.get(self.model, 0) + n
        self.preparing += n

    def prepared(self, n: int | None = None) -> None:
        """``n`` (default: all) images are queued for localisation or failed: the batcher stops expecting them."""
        n = self.preparing if n is None else min(n, self.preparing)
        a = self.admission
        a.preparing[self.model] = max(0, a.preparing.get(self.model, 0) - n)
        self.preparing -= n

    def _release_all(self) -> None:
        self.prepared()
        self._end_upload()
        self._drop_provisional()
        a = self.admission
        a.inflight[self.model] = max(0, a.inflight.get(self.model, 0) - self.images)
        a.reserved_bytes = max(0, a.reserved_bytes - self.bytes)
        self.images = self.bytes = 0
        a._changed(self.model)

    def _end_upload(self) -> None:
        if self.uploading:
            self.uploading = False
            self.admission.uploads -= 1

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[None]:
        """The body is read inside: counted as an upload, and cut off after STN_BODY_TIMEOUT_S (408)."""
        s = self.admission.settings
        self.uploading = True
        self.admission.uploads += 1
        try:
            async with asyncio.timeout(s.body_timeout_s):
                yield
        except TimeoutError:
            raise Problem(408, f"the request body did not arrive within {s.body_timeout_s:g}s "
                               "(STN_BODY_TIMEOUT_S)", {"Connection": "close"}, **self.extra) from None
        finally:
            self._end_upload()

    @asynccontextmanager
    async def watch(self, request: Request) -> AsyncIterator[None]:
        """Cancel the work inside when the client disconnects (ClientGone, counted as 499).

        Call once the body is read: the next ASGI message is then ``http.disconnect``. The
        cancelled awaits drop their images from the batcher's queue and the worker pool
        before they run (work already running on a thread finishes and is thrown away).
        """
        task = asyncio.current_task()
        gone = False

        async def wait_for_disconnect() -> None:
            nonlocal gone
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    gone = True
                    if task is not None:
                        task.cancel()
                    return

        watcher = asyncio.create_task(wait_for_disconnect(), name="stn-disconnect-watch")
        try:
            yield
        except asyncio.CancelledError:
            if gone and task is not None:
                task.uncancel()
                raise ClientGone("the client disconnected; its work was cancelled") from None
            raise
        finally:
            watcher.cancel()


class WorkWindow:
    """At most ``size`` images (all models) decoded and worked on at once; the rest wait in arrival order.

    ``async with window.hold(n):`` waits until ``n`` more images fit (a request with more images
    than the window takes the whole window), first come first served: a large request is not
    overtaken by smaller ones behind it. Cancelled waiters (client gone, request timeout) leave
    the line; room granted to a waiter cancelled at that moment is given back.
    """

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self.used = 0
        self._line: deque[tuple[int, asyncio.Future]] = deque()

    @property
    def waiting(self) -> int:
        """Images waiting for room."""
        return sum(n for n, f in self._line if not f.done())

    @asynccontextmanager
    async def hold(self, n: int) -> AsyncIterator[None]:
        n = max(1, min(n, self.size))
        if not self._line and self.used + n <= self.size:
            self.used += n
        else:
            granted = asyncio.get_running_loop().create_future()
            self._line.append((n, granted))
            try:
                await granted
            except BaseException:
                if granted.done() and not granted.cancelled():  # room was given as the wait was cancelled
                    self._give_back(n)
                else:
                    granted.cancel()
                    self._admit_waiting()  # the line's head may have been this one
                raise
        try:
            yield
        finally:
            self._give_back(n)

    def _give_back(self, n: int) -> None:
        self.used -= n
        self._admit_waiting()

    def _admit_waiting(self) -> None:
        line = self._line
        while line:
            n, granted = line[0]
            if granted.done():  # cancelled while waiting
                line.popleft()
                continue
            if self.used + n > self.size:
                return
            line.popleft()
            self.used += n
            granted.set_result(None)
