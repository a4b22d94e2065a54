"""Pure ASGI middleware that runs before FastAPI routing: request ids.

:class:`RequestIdMiddleware`: ``X-Request-ID`` from the client (printable ASCII, at most 128
characters) or a new one (:func:`request_id`); echoed in every response, put in problem+json
bodies (``request_id``) and in log lines (the ``request_id`` attribute of every record, see
:class:`RequestIdFilter`). Early answers (health, readiness, load shedding) are
``service.api.frontdoor``'s.
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid

REQUEST_ID = contextvars.ContextVar("stn_request_id", default="-")
_VALID_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


def request_id(given: bytes) -> str:
    """The client's ``X-Request-ID`` value when valid (printable ASCII, 1-128 characters), else a new id."""
    text = given.decode("latin-1")
    return text if _VALID_ID.match(text) else uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (``-`` outside a request) so formats can show it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class RequestIdMiddleware:
    def __init__(self, app) -> None:  # noqa: ANN001 (ASGI app)
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(next((v for k, v in scope["headers"] if k == b"x-request-id"), b""))
        scope.setdefault("state", {})["request_id"] = rid
        token = REQUEST_ID.set(rid)

        async def send_with_id(message) -> None:  # noqa: ANN001
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


class HeadAsGetMiddleware:
    """``HEAD`` on any route is its ``GET`` without the body (RFC 9110 9.3.2: every general-purpose server supports
    both; FastAPI routes list GET only, so load balancers' and monitors' HEAD probes got 405). The app sees a copy
    of the scope saying GET; the server, whose scope still says HEAD, sends the head and drops the body."""

    def __init__(self, app) -> None:  # noqa: ANN001 (ASGI app)
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)
