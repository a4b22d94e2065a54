"""Running the app in uvicorn: header caps, and a graceful drain on SIGTERM.

- **Header caps.** uvicorn's httptools protocol (what ``uvicorn[standard]`` picks) has no limit
  on the request head: httptools joins a header's pieces as they arrive, so a 128 MiB header
  took 15.5 s of event-loop time. :class:`CappedHttpToolsProtocol` counts the head's bytes and
  lines as they arrive, *before* the parser sees them, and answers 431 and closes the
  connection past ``STN_MAX_HEADER_BYTES`` or ``STN_MAX_HEADERS``. (With ``http="h11"``,
  h11's own ``h11_max_incomplete_event_size`` is set to the same byte cap.)
- **The front door in the protocol.** :class:`CappedHttpToolsProtocol` also asks the app's
  :class:`service.api.frontdoor.FrontDoor` as soon as a request's head is parsed: health,
  readiness and 503s for work that does not fit now are written from the parser callback, with
  no ASGI scope, task or FastAPI; a shed request's body is read and discarded (within
  ``STN_BODY_TIMEOUT_S``), so the client reads the 503 rather than a reset, and the connection stays
  open for its next request (a retry need not reconnect), unless the client asked for ``100 Continue``.
- **Pipelining.** uvicorn parses every request a read holds (a 256 KiB read holds thousands of
  small ones) and resumes reading after each answer, so a client that pipelines without reading
  its answers made the server parse, answer and buffer without bound (five such connections: 1.3 GB
  and /healthz stalled for seconds). Here a read may hold at most ``STN_MAX_PIPELINED`` request
  heads: at the next one parsing stops, the requests taken are answered, and the connection is
  half-closed (the client retries the rest, RFC 9112 9.3.2) and closed a second later. Reading
  stays paused while pipelined requests wait their turn and while the client reads nothing of
  what was written (the transport's buffer over its high-water mark).
- **Slow senders and idle connections.** uvicorn waits for a request head without limit, and a
  fresh connection that sends nothing is never timed out: about a thousand such connections used
  up the process's file descriptors (limit 1024) and the service stopped accepting, probes
  included. A request head must arrive within ``STN_HEAD_TIMEOUT_S`` of the connection's opening
  or of its first byte (else 408, or a plain close when nothing came), and at most
  ``STN_MAX_CONNECTIONS`` are open: the connection past it closes the oldest one waiting for a
  head (idle keep-alive connections included), or itself when every connection is busy with a
  request. ``stn_connections_closed_total`` counts both, by reason.
- **Slow bodies.** Work routes answer 408 when a body misses ``STN_BODY_TIMEOUT_S``; any other
  route's body (the repository's JSON) gets the connection closed 2 s after that (a backstop for
  every route: uvicorn has no body timeout).
- **Lingering close.** uvicorn closes after an answer when the request (``Connection: close``) or the answer
  asks it; with the request's body still arriving (a 400/413 answered early), the unread body made the kernel
  reset the connection, and clients that send the whole body before reading (Python's urllib) got "connection
  reset" instead of the answer. The response cycle's transport turns that close into a half-close, the rest of
  the body is discarded, and the connection closes once it is in (or when nothing arrives for a second).
- **Upgrade headers are ignored** (RFC 9110 7.8: a server may). httptools takes a request with
  ``Connection: Upgrade`` to have no body, so ``curl --http2`` (an ``Upgrade: h2c`` offer) had its
  upload dropped and got 400 "image is empty", and a WebSocket offer to /healthz broke the
  connection with a logged traceback. The header is renamed ``x-ignored-upgrade`` before the parser
  sees it, however the head is cut into reads (the few bytes at a read's end that could begin the name
  wait for the next read), so such requests are served as HTTP/1.1; the app has no WebSocket routes
  (uvicorn runs with ``ws="none"``).
- **What the parser refuses, and what it should.** A malformed request gets a problem+json 400 with
  llhttp's reason (uvicorn answered in plain text and logged a WARNING per request); a request line of
  another version (llhttp takes ``HTTP/2.0`` and ``HTTP/0.9``) gets 505; an HTTP/1.1 request without
  exactly one ``Host`` gets 400 (RFC 9112 3.2). Refusals are logged at INFO: a client must not be able to
  write to the server's log at will.
- **Bodies in tiny pieces.** Each piece of a body (a chunk of a chunked body, a read of the rest) costs
  the event loop a callback, and uvicorn copies what it holds of the body at each: one client sending
  1-byte chunks stalled /healthz for 0.75 s. Past ``small_pieces_allowed`` pieces a body must average
  ``min_piece_bytes`` a piece, else 400 and the connection closes.
- **Slow readers.** A client that stops reading its response (the transport's buffer stays over its
  high-water mark, writing paused) for ``STN_BODY_TIMEOUT_S`` has its connection aborted, which
  drops what is buffered for it; responses count against the memory budget while they are sent
  (:class:`service.api.admission.BudgetedResponse`).
- **Drain.** :class:`DrainingServer`: on SIGTERM readiness turns 503 at once, new work gets
  503 with ``Retry-After`` (``service.api.frontdoor``), admitted work finishes for
  up to ``STN_SHUTDOWN_GRACE_S`` (default: the request timeout + 5 s), then uvicorn shuts down
  and the process exits 0. A second signal (or SIGINT) exits at once, as uvicorn does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import time
from http import HTTPStatus
from types import FrameType
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import uvicorn

from service.api.errors import PROBLEM_JSON
from service.api.frontdoor import Answer, FrontDoor
from service.api.middleware import request_id

if TYPE_CHECKING:
    from service.api.state import ServiceState
    from service.settings import Settings

log = logging.getLogger(__name__)

try:
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is not installed: uvicorn uses h11, capped by its own setting
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

_END = b"\r\n\r\n"
_UPGRADE_NAME = b"\r\nupgrade:"  # renamed before parsing: the service speaks HTTP/1.1 only
_UPGRADE = re.compile(re.escape(_UPGRADE_NAME), re.IGNORECASE)


def _rename_upgrade(head: bytes) -> bytes:
    return _UPGRADE.sub(b"\r\nx-ignored-upgrade:", head)


def _upgrade_prefix(data: bytes) -> int:
    """How many bytes at the end of ``data`` could begin ``\r\nupgrade:`` (any case): 0 to 9."""
    tail = data[1 - len(_UPGRADE_NAME):]
    at = tail.find(b"\r")
    while at >= 0:
        if _UPGRADE_NAME.startswith(tail[at:].lower()):
            return len(tail) - at
        at = tail.find(b"\r", at + 1)
    return 0


STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}


if HttpToolsProtocol is not None:

    class _StopParsing(Exception):  # noqa: N818 (a signal, not an error)
        """Raised from a parser callback: nothing more of this read is parsed (it holds more pipelined requests
        than a connection may send, or the connection is closing after a lingering close)."""

    class _Parser(httptools.HttpRequestParser):
        """httptools' parser, whose ``feed_data`` stops quietly (no 400) when the protocol raised
        :class:`_StopParsing` (the parser is done with: nothing more is fed to it), and hands a malformed
        request to the protocol (:meth:`CappedHttpToolsProtocol._malformed`) instead of raising: uvicorn
        logged a WARNING for each one (a line in the server's log per request, at any client's will) and
        answered in plain text without the reason."""

        def __init__(self, protocol: CappedHttpToolsProtocol) -> None:
            super().__init__(protocol)
            self._protocol = protocol

        def feed_data(self, data: bytes) -> None:
            try:
                super().feed_data(data)
            except httptools.HttpParserCallbackError as exc:
                if not isinstance(exc.__context__, _StopParsing):
                    raise  # a defect of ours: uvicorn logs it and answers 400
            except httptools.HttpParserUpgrade:
                raise
            except httptools.HttpParserError as exc:
                self._protocol._malformed(str(exc))

    class _LingeringTransport:
        """The connection's transport as uvicorn's response cycle sees it: its ``close()`` while the request's body
        is still arriving becomes the protocol's lingering close (:meth:`CappedHttpToolsProtocol._linger`)."""

        __slots__ = ("_protocol",)

        def __init__(self, protocol: CappedHttpToolsProtocol) -> None:
            self._protocol = protocol

        def __getattr__(self, name: str) -> Any:
            return getattr(self._protocol.transport, name)

        def close(self) -> None:
            self._protocol._linger()

    class CappedHttpToolsProtocol(HttpToolsProtocol):  # type: ignore[misc,valid-type]
        """HttpToolsProtocol that refuses heads over ``max_head_bytes`` bytes or ``max_headers`` fields
        and gives the ``front_door``'s answers itself (see module docstring)."""

        max_head_bytes = 65536
        max_headers = 100
        front_door: FrontDoor | None = None
        body_timeout_s = 20.0  # a shed request's body must arrive within this, else the connection closes
        # ...and a client must read: writing paused (its buffer full) this long aborts the connection
        max_pipelined = 16  # request heads one read may hold; at the next, the connection ends after answering these
        head_timeout_s = 10.0  # a request head must arrive within this of the connection's opening or its first byte
        max_connections = 10000
        # A body's pieces (each chunk of a chunked body, each read of the rest) cost the event loop a callback, and
        # uvicorn copies what it holds of the body at each: in 1-byte chunks, one client stalled /healthz for 0.75 s
        min_piece_bytes = 128  # past small_pieces_allowed pieces, a body must average this much a piece, else 400
        small_pieces_allowed = 1024
        linger_idle_s = 1.0  # a lingering close (answered, closing, body still arriving) ends when nothing arrives this long
        waiting: dict = {}  # noqa: RUF012 (replaced per server in http_protocol) connections waiting for a head, oldest first

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.parser = _Parser(self)
            try:  # as uvicorn sets it on its own parser
                self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
            except AttributeError:  # httptools < 0.6.3
                pass
            self._heads_in_read = 0  # request heads parsed from the current read
            self._pipeline_full = False  # a read held too many: answer what was taken, then end the connection
            self._ending = False
            self._discard_left = 65536  # bytes discarded while ending; then reading stops until the close
            self._body_pieces = self._body_bytes = 0  # the current request's body so far (on_body calls, bytes)
            self._head_bytes = 0  # bytes of the current request's head seen so far
            self._head_lines = 0
            self._in_head = True
            self._tail = b""  # last bytes of the previous chunk (a terminator may straddle chunks)
            self._held = b""  # the end of a head's read that may begin "\r\nupgrade:", not yet given to the parser
            self._refused = False
            self._answered: bool | None = None  # the door answered this request: True keep-alive, False close
            self._close_timer: asyncio.TimerHandle | None = None
            self._send_timer: asyncio.TimerHandle | None = None  # running while writing is paused
            self._body_pending = False  # a request's head is parsed, its body not yet all in
            self._head_open = False  # a request's first byte is in, its head not yet complete
            self._head_timer: asyncio.TimerHandle | None = None
            self._lingering = False  # answered and closing; the rest of the request's body is read and discarded
            self._linger_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > self.max_connections and not self._make_room():
                self._count_closed("refused")
                transport.abort()  # every other connection is busy with a request: this one is not taken
                return
            self.waiting[self] = None
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

        def _make_room(self) -> bool:
            """Close the oldest connection waiting for a request head (False when there is none)."""
            for victim in self.waiting:
                del self.waiting[victim]
                victim._count_closed("evicted")
                # No request of it is in progress. close(), not abort(): an idle connection's last answer may
                # still be in its buffer, and is sent first (a client that reads nothing is dropped by the
                # send timer); with nothing buffered it closes at once.
                victim.transport.close()
                return True
            return False

        def _count_closed(self, reason: str) -> None:
            if self.front_door is not None:
                self.front_door.state.metrics.connections_closed.labels(reason).inc()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_open = True
            self._body_pieces = self._body_bytes = 0
            # A door answer earlier in this read armed the keep-alive timer (the connection looked idle); this
            # request begins in the same read, so nothing else cancels it and it would cut the request short.
            self._unset_keepalive_if_required()

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or self._refused or self._ending:
                return
            self._count_closed("head_timeout")
            if not self._head_open:  # nothing came: no request to answer
                self.waiting.pop(self, None)
                self.transport.close()
                return
            self._refuse(408, f"the request head did not arrive within {self.head_timeout_s:g}s "
                              "(STN_HEAD_TIMEOUT_S)")

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def on_response_complete(self) -> None:
            if self._lingering:  # closing: no pipelined request is started, no keep-alive timer armed
                return
            super().on_response_complete()
            if self.transport.is_closing():
                return
            # uvicorn resumes reading after every answer: keep it paused while pipelined requests wait their turn
            # (each read would add up to max_pipelined more) or the client reads nothing of what was written
            if self.pipeline or self.flow.write_paused:
                self.flow.pause_reading()
            if self._pipeline_full and not self.pipeline and (self.cycle is None or self.cycle.response_complete):
                self._end_after_answers()
            elif not self.pipeline and not self._head_open:  # idle: waits for its next head (uvicorn's keep-alive timeout)
                self.waiting[self] = None
            # Answered before its body was in: uvicorn discards the rest, but the rest's arrival cancels the
            # keep-alive timer and nothing re-arms it. The body must be in within the body timeout.
            if self._body_pending and self._close_timer is None:
                self._close_timer = self.loop.call_later(self.body_timeout_s, self._close)

        def _idle_after_early_answer(self) -> None:
            """The discarded body is in: the connection is idle, so uvicorn's keep-alive timeout applies again."""
            if not self.transport.is_closing() and self.timeout_keep_alive_task is None:
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                    self.timeout_keep_alive_handler)

        def pause_writing(self) -> None:
            super().pause_writing()
            self.flow.pause_reading()  # the client reads nothing: parse and answer nothing more of what it sends
            if self._send_timer is None:
                self._send_timer = self.loop.call_later(self.body_timeout_s, self._send_timed_out)

        def resume_writing(self) -> None:
            super().resume_writing()
            self._cancel_send_timer()
            if not self.pipeline:
                self.flow.resume_reading()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_send_timer()
            self._cancel_head_timer()
            self.waiting.pop(self, None)
            super().connection_lost(exc)

        def _cancel_send_timer(self) -> None:
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None

        def _send_timed_out(self) -> None:
            """The client read nothing of its response for STN_BODY_TIMEOUT_S: drop the connection and what is
            buffered for it (close() would wait for the buffer to drain, which it never does)."""
            self._send_timer = None
            log.info("a client read none of its response for %.0f s (STN_BODY_TIMEOUT_S); connection aborted",
                     self.body_timeout_s)
            self.transport.abort()

        def data_received(self, data: bytes) -> None:
            if self._refused:  # answered 431; the connection closes shortly
                return
            if self._pipeline_full:  # too many pipelined: discarded unparsed while the connection ends, up to a bound
                self._discard_left -= len(data)
                if self._discard_left < 0:
                    self.flow.pause_reading()
                return
            self._heads_in_read = 0
            if self._lingering:
                self._arm_linger()
            if self._in_head:
                window = self._tail + data
                end = window.find(_END)
                head = data if end < 0 else data[: max(0, end + len(_END) - len(self._tail))]
                self._head_bytes += len(head)
                self._head_lines += head.count(b"\n")
                self._tail = window[-3:]
                if self._head_bytes > self.max_head_bytes or self._head_lines > self.max_headers + 2:
                    what = (f"more than {self.max_head_bytes} bytes (STN_MAX_HEADER_BYTES)"
                            if self._head_bytes > self.max_head_bytes
                            else f"more than {self.max_headers} fields (STN_MAX_HEADERS)")
                    self._refuse(431, f"the request head has {what}; send fewer or smaller headers")
                    return
                # `Upgrade` is renamed in what the parser is given of the head; the bytes at the end of a read
                # that could begin the name are held back to the next read, so the name is never split
                held, self._held = self._held, b""
                if end >= 0:
                    self._in_head = False
                    if held or _UPGRADE.search(head):  # (else the read goes on as it came: no copy)
                        data = _rename_upgrade(held + head) + data[len(head):]
                else:
                    data = held + data if held else data
                    keep = _upgrade_prefix(data)
                    if keep:
                        data, self._held = data[:-keep], data[-keep:]
                    data = _rename_upgrade(data)
            super().data_received(data)
            if self._head_open and self._head_timer is None and not self._refused:  # a head is arriving in pieces
                self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)
            elif self._body_pending and self._close_timer is None and not self.transport.is_closing():
                # A body is arriving in pieces. Work routes answer 408 after STN_BODY_TIMEOUT_S themselves; this
                # closes the connection a little later whatever the route (the app sees a disconnect: 499).
                self._close_timer = self.loop.call_later(self.body_timeout_s + 2.0, self._close)

        def on_message_complete(self) -> None:
            if self._lingering:  # the discarded body is in: close (nothing is left unread) and parse no further
                self._close()
                raise _StopParsing
            self._head_bytes = self._head_lines = 0
            self._in_head = True
            self._tail = self._held = b""
            self._body_pending = False
            self._cancel_close_timer()  # the body is in
            if self._answered is None:
                answered_early = self.cycle is not None and self.cycle.response_complete
                super().on_message_complete()
                if answered_early:  # the app answered before its body was in (a 503/413 from the image's header)
                    self._idle_after_early_answer()
                return
            keep_alive, self._answered = self._answered, None
            if not keep_alive:  # the whole body is read: closing now sends no reset over the answer
                self._close()
            elif not self.transport.is_closing():
                self.on_response_complete()  # keep-alive timer, next request

        def on_headers_complete(self) -> None:
            self._head_open = False
            self._cancel_head_timer()
            self.waiting.pop(self, None)  # a request is in progress: its connection is no longer the one to close
            self._heads_in_read += 1
            if self._heads_in_read > self.max_pipelined:
                self._stop_pipeline()
                raise _StopParsing  # stops the parser in this read: the rest is never parsed
            version = self.parser.get_http_version()
            if version not in ("1.0", "1.1"):  # llhttp takes 0.9 and 2.0 request lines
                self._refuse(505, f"HTTP/{version} is not supported: this server speaks HTTP/1.1 (and 1.0)")
                raise _StopParsing
            hosts = sum(1 for name, _ in self.headers if name == b"host")
            if hosts > 1 or (hosts == 0 and version == "1.1"):
                self._refuse(400, "an HTTP/1.1 request must have exactly one Host header (RFC 9112 3.2); "
                                  f"this one has {hosts}")
                raise _StopParsing
            self._body_pending = True
            door = self.front_door
            if door is not None and (self.cycle is None or self.cycle.response_complete) and not self.parser.should_upgrade():
                started = time.perf_counter()
                method = self.parser.get_method().decode("ascii")
                url = httptools.parse_url(self.url)
                path = url.path.decode("latin-1")
                answer = door.answer(method, unquote(path) if "%" in path else path, url.query or b"")
                if answer is not None:
                    self._give(answer, with_body=method != "HEAD")
                    door.record(answer, method, started)
                    return
            super().on_headers_complete()
            if self.cycle is not None:
                self.cycle.transport = _LingeringTransport(self)  # type: ignore[assignment]

        def on_body(self, body: bytes) -> None:
            self._body_pieces += 1
            self._body_bytes += len(body)
            if self._body_pieces > self.small_pieces_allowed and \
                    self._body_pieces * self.min_piece_bytes > self._body_bytes:
                self._count_closed("small_pieces")
                self._refuse_or_close(400, f"the body came in {self._body_pieces} pieces of {self._body_bytes} "
                                           f"bytes in all; send chunks of {self.min_piece_bytes} bytes or more on average")
                raise _StopParsing
            if self._answered is None:
                super().on_body(body)  # else: the body of an answered request is discarded

        def _give(self, answer: Answer, with_body: bool = True) -> None:
            # A shed's body is read and discarded, so its connection stays open for the client's next request,
            # unless the client waits for 100 Continue before its body (it may never send it: close).
            keep_alive = (not (answer.close and self.expect_100_continue) and self.parser.should_keep_alive()
                          and self.parser.get_http_version() != "1.0")
            self._answered = keep_alive
            rid = request_id(next((v for k, v in self.headers if k == b"x-request-id"), b""))
            raw = answer.body(rid)
            head = [STATUS_LINES[answer.status], b"content-type: ", answer.content_type,
                    b"\r\ncontent-length: ", str(len(raw)).encode(), b"\r\nx-request-id: ", rid.encode(), b"\r\n"]
            for k, v in answer.headers:
                head += [k, b": ", v, b"\r\n"]
            if not keep_alive:
                head.append(b"connection: close\r\n")
            if self.transport.is_closing():
                return
            self.transport.write(b"".join([*head, b"\r\n", raw if with_body else b""]))
            if not keep_alive and self.expect_100_continue:  # the client waits for 100 before its body: none comes
                self._close()
            else:  # the body (if any) is discarded as it arrives; it must be in within the body timeout
                self._close_timer = self.loop.call_later(self.body_timeout_s, self._close)

        def _cancel_close_timer(self) -> None:
            if self._close_timer is not None:
                self._close_timer.cancel()
                self._close_timer = None

        def _close(self) -> None:
            self._cancel_close_timer()
            if self._linger_timer is not None:
                self._linger_timer.cancel()
                self._linger_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def _linger(self) -> None:
            """Close after an answer, as uvicorn does when the request (``Connection: close``, HTTP/1.0) or the
            answer asks it; but while the request's body is still arriving, closing now would leave it unread and
            the kernel would reset the connection: Python's urllib, which sends the whole body before reading and
            asks to close, got "connection reset" instead of a 400 or 413 answered early. So half-close (the
            answer is flushed, then the end of the stream), read and discard the rest of the body, and close once
            it is in, after :attr:`linger_idle_s` with nothing arriving, or at the body's deadline (RFC 9112 9.6)."""
            if not self._body_pending or self.transport.is_closing():
                self._close()
                return
            self._lingering = True
            self.waiting.pop(self, None)
            self.flow.resume_reading()
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self._arm_linger()
            if self._close_timer is None:
                self._close_timer = self.loop.call_later(self.body_timeout_s, self._close)

        def _arm_linger(self) -> None:
            if self._linger_timer is not None:
                self._linger_timer.cancel()
            self._linger_timer = self.loop.call_later(self.linger_idle_s, self._close)

        def _stop_pipeline(self) -> None:
            """A read held more than max_pipelined request heads: answer those taken, then end the connection."""
            self._pipeline_full = True
            log.info("a client pipelined more than %d requests in one read (STN_MAX_PIPELINED); its connection ends "
                     "once those are answered", self.max_pipelined)
            if not self.pipeline and (self.cycle is None or self.cycle.response_complete):
                self._end_after_answers()  # else on_response_complete does, after the last one

        def _end_after_answers(self) -> None:
            """Half-close once the answers are written (the client sees their end and retries the rest of its
            pipeline), discard what still arrives, and close a second later (closing with unread data would send a
            reset, which can destroy answers the client has not read yet)."""
            if self._ending or self.transport.is_closing():
                return
            self._ending = True
            self._cancel_close_timer()
            self.flow.resume_reading()  # discarded unparsed (data_received): the client's next bytes are not left unread
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self._close_timer = self.loop.call_later(1.0, self._close)

        def _unsupported_upgrade_warning(self) -> None:
            # An upgrade offer the renaming missed (one pipelined behind another request in the same read): uvicorn
            # serves it as HTTP/1.1 and logged two WARNINGs per request; INFO, as for the other refusals.
            log.info("an Upgrade offer was ignored; the request is served as HTTP/1.1")

        def _malformed(self, reason: str) -> None:
            """The parser refused the request (llhttp's reason: "Invalid method encountered", "Invalid header value
            char"): 400 with it, and close."""
            self._refuse_or_close(400, f"malformed HTTP/1.1 request: {reason}")

        def _refuse_or_close(self, status: int, detail: str) -> None:
            """:meth:`_refuse`, or only the close when an answer has begun: one is being written, or the request
            whose body is arriving was answered already (the door's 503, an early 413): a second answer to it would
            be read as the answer to the client's next request."""
            cycle = self.cycle
            begun = (cycle is not None and cycle.response_started and not cycle.response_complete) or (
                self._body_pending and (self._answered is not None or self._lingering
                                        or (cycle is not None and cycle.response_started)))
            if not begun:
                self._refuse(status, detail)
                return
            log.info("closed a connection: %s (its answer was given)", detail)
            self._close()

        def _refuse(self, status: int, detail: str) -> None:
            """Answer a request that will not be served (431 head too large, 408 head too slow, 400 malformed or
            without its one Host, 505 not HTTP/1.x), and close."""
            self._cancel_head_timer()
            log.info("refused a request: %s", detail)  # not above INFO: a client must not write to the log at will
            body = json.dumps({"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status,
                               "detail": detail}).encode()
            head = STATUS_LINES[status] + (f"content-type: {PROBLEM_JSON}\r\ncontent-length: {len(body)}\r\n"
                                           "connection: close\r\n\r\n").encode()
            if not self.transport.is_closing():
                self.transport.write(head + body)
                # Close after a moment, discarding what still arrives: closing with unread data would
                # reset the connection before the client reads the 431.
                self._refused = True
                asyncio.get_running_loop().call_later(1.0, self.transport.close)


def http_protocol(settings: Settings, front_door: FrontDoor | None = None) -> Any:
    """The HTTP protocol class (or uvicorn's name for one) that enforces the settings' header caps
    and gives ``front_door``'s answers."""
    if HttpToolsProtocol is None:
        return "h11"
    return type("StnHttpToolsProtocol", (CappedHttpToolsProtocol,),
                {"max_head_bytes": settings.max_header_bytes, "max_headers": settings.max_headers,
                 "front_door": front_door, "body_timeout_s": settings.body_timeout_s,
                 "max_pipelined": settings.max_pipelined, "head_timeout_s": settings.head_timeout_s,
                 "max_connections": max_connections(settings), "waiting": {}})


def max_connections(settings: Settings) -> int:
    """STN_MAX_CONNECTIONS, or (0) the process's open-file limit less 128 for models, logs and threads, at most
    10000."""
    if settings.max_connections:
        return settings.max_connections
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 10000 if soft == resource.RLIM_INFINITY else max(16, min(10000, soft - 128))


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """uvicorn's Config for the app with the settings' bind address, logging, header caps, front door and grace."""
    door = getattr(getattr(app, "state", None), "front_door", None)
    kwargs: dict[str, Any] = dict(host=settings.host, port=settings.port, log_level=settings.log_level,
                                  access_log=settings.access_log, http=http_protocol(settings, door),
                                  h11_max_incomplete_event_size=settings.max_header_bytes,
                                  timeout_keep_alive=settings.keep_alive_s, root_path=settings.root_path,
                                  ws="none",  # no WebSocket routes: every Upgrade offer is served as HTTP/1.1
                                  timeout_graceful_shutdown=max(1, round(settings.grace_s)))
    kwargs.update(overrides)
    return uvicorn.Config(app, **kwargs)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM drains before shutting down (see module docstring)."""

    def __init__(self, config: uvicorn.Config, state: ServiceState) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        admission = self.state.admission
        if sig == signal.SIGTERM and not admission.draining and self._loop is not None and not self.should_exit:
            self._loop.call_soon_threadsafe(self.begin_drain)
            return
        super().handle_exit(sig, frame)

    def begin_drain(self) -> None:
        """Readiness 503, new work 503; exit once admitted work is done or the grace period is over."""
        if self.state.admission.draining:
            return
        self.state.admission.draining = True
        self.state.metrics.ready.set(0)
        grace = self.state.settings.grace_s
        log.info("SIGTERM: draining (%d request(s) in flight; up to %.0f s), then exiting",
                 self.state.admission.requests, grace)
        self._drain_task = asyncio.get_running_loop().create_task(self._drain(time.monotonic() + grace))

    async def _drain(self, deadline: float) -> None:
        while self.state.admission.requests > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = self.state.admission.requests
        if left:
            log.warning("grace period over: %d request(s) still in flight are cut", left)
        self.config.timeout_graceful_shutdown = max(1, round(deadline - time.monotonic()))
        self.should_exit = True


def serve(app: Any, settings: Settings) -> int:
    """Run the app until SIGTERM (drained) or SIGINT; 0 on a clean exit."""
    DrainingServer(uvicorn_config(app, settings), app.state.stn).run()
    return 0
