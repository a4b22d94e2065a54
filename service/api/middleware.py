"""Pure ASGI middleware that runs before FastAPI routing: request ids and early load shedding.

- :class:`RequestIdMiddleware`: ``X-Request-ID`` from the client (printable ASCII, at most
  128 characters) or a new one; echoed in every response, put in problem+json bodies
  (``request_id``) and in log lines (the ``request_id`` attribute of every record, see
  :class:`RequestIdFilter`).
- :class:`ShedMiddleware`: work routes (``POST``) get 503 + ``Retry-After`` at once, before
  the body is read or FastAPI is entered, when no new work fits at all (draining, the memory
  budget reserved, every upload slot taken): shedding costs a few microseconds, so health and
  readiness keep answering under overload.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import uuid

from service.api.admission import Admission
from service.api.errors import PROBLEM_JSON

REQUEST_ID = contextvars.ContextVar("stn_request_id", default="-")
_VALID_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


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
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"").decode("latin-1")
        rid = given if _VALID_ID.match(given) else uuid.uuid4().hex
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


WORK_PATHS = re.compile(r"^/(v1/rectify|v2/models/[^/]+(/versions/[^/]+)?/infer)$")


class ShedMiddleware:
    def __init__(self, app, admission: Admission) -> None:  # noqa: ANN001 (ASGI app)
        self.app = app
        self.admission = admission

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] == "http" and scope["method"] == "POST" and WORK_PATHS.match(scope["path"]):
            problem = self.admission.shed()
            if problem is not None:
                body = {"type": "about:blank", "title": "Service Unavailable", "status": 503,
                        "detail": problem.detail, "instance": scope["path"],
                        "request_id": scope.get("state", {}).get("request_id", "")}
                if scope["path"].startswith("/v2"):
                    body["error"] = problem.detail
                raw = json.dumps(body).encode()
                headers = [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(raw)).encode()),
                           (b"retry-after", b"1"), (b"connection", b"close")]
                await send({"type": "http.response.start", "status": 503, "headers": headers})
                await send({"type": "http.response.body", "body": raw})
                return
        await self.app(scope, receive, send)
