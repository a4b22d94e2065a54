"""The front door: answers that need no route, given before FastAPI is entered.

- ``GET /healthz`` and ``GET /readyz``: liveness and readiness, answered ahead of any work.
- ``POST`` to a work route (``/v1/rectify``, ``/v2/models/{name}[/versions/{v}]/infer``) when no
  new work fits now (draining, the memory budget reserved, every upload slot taken, the model's
  queue full: :meth:`service.api.admission.Admission.shed`): 503 + ``Retry-After``, before the body
  is read.

:class:`FrontDoor` decides (a few microseconds: no routing, no dependencies, no body); two
doors use it: :class:`FrontDoorMiddleware` (pure ASGI, any server) and, under ``stn serve``,
uvicorn's HTTP protocol itself (``service.api.server``), which answers from its parser callback
without building an ASGI scope or starting a task. Under overload a shed request then costs a
small fraction of a served image, and probes are answered in the same event-loop callback that
parsed them (see docs/BENCHMARKS.md, "Overload").
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, unquote_plus

from service.api.errors import PROBLEM_JSON, problem_body

if TYPE_CHECKING:
    from service.api.state import ServiceState

WORK_PATHS = re.compile(r"^/(?:v1/rectify|v2/models/(?P<model>[^/]+)(?:/versions/[^/]+)?/infer)$")
LIVE_PAYLOAD = {"status": "live"}
LIVE = json.dumps(LIVE_PAYLOAD).encode()
RETRY = [(b"retry-after", b"1")]


@dataclass(slots=True)
class Answer:
    """A response decided at the door: status, JSON payload, the route template (for metrics)."""

    status: int
    payload: dict  # the JSON body; a problem's gets ``request_id`` when rendered
    route: str
    problem: bool = False
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    close: bool = False  # a shed request: its body is not wanted (Connection: close from the ASGI door; stn serve's
    # protocol reads and discards the body and keeps the connection, see service.api.server)

    def body(self, request_id: str = "") -> bytes:
        if self.payload is LIVE_PAYLOAD:
            return LIVE
        if self.problem and request_id:
            return json.dumps({**self.payload, "request_id": request_id}).encode()
        return json.dumps(self.payload).encode()

    @property
    def content_type(self) -> bytes:
        return (PROBLEM_JSON if self.problem else "application/json").encode()


def readiness(state: ServiceState) -> tuple[int, dict, bool]:
    """(status, body, is a problem) of ``/readyz``.

    With STN_API_KEYS set, only ``ready``/``loading`` (no model names, paths or errors: /v1/models has them).
    """
    minimal = bool(state.settings.api_keys)
    body: dict = {"ready": state.ready, "loading": state.loading}
    if not minimal:
        body.update(models=sorted(state.models), failed=state.loaded.failures)
    if state.ready:
        return 200, body, False
    if state.admission.draining:
        detail = "the server is shutting down"
    elif state.loading:
        detail = "models are still loading"
    elif minimal:
        detail = "not ready: no model is serving (details at /v1/models, with a key)"
    else:
        detail = "not ready: " + ("; ".join(f"{k}: {v}" for k, v in state.loaded.failures.items())
                                  or "no model loaded")
    return 503, problem_body(503, detail, "/readyz", **body), True


class FrontDoor:
    """Decides :class:`Answer` s for one app's state (see module docstring)."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self._counted: dict[tuple[str, str, int], tuple[Any, Any]] = {}  # (route, method, status) -> metric children

    def answer(self, method: str, path: str, query: bytes = b"") -> Answer | None:
        """The answer to give at once, or None: the request goes on to the app."""
        if method == "GET" or method == "HEAD":  # HEAD: the same answer, without its body
            if path == "/healthz":
                return Answer(200, LIVE_PAYLOAD, "/healthz")
            if path == "/readyz":
                status, body, problem = readiness(self.state)
                return Answer(status, body, "/readyz", problem, RETRY if problem else [])
            return None
        if method != "POST":
            return None
        m = WORK_PATHS.match(path)
        if m is None:
            return None
        problem = self.state.admission.shed(self._model(m.group("model"), query))
        if problem is None:
            return None
        extra = {"error": problem.detail} if path.startswith("/v2") else {}
        return Answer(503, problem_body(503, problem.detail, path, **extra), path, True,
                      [(k.lower().encode(), v.encode()) for k, v in problem.headers.items()], close=True)

    def _model(self, in_path: str | None, query: bytes) -> str | None:
        """The model a work request is for (None when it cannot be told cheaply: the route decides)."""
        if in_path is not None:
            return unquote(in_path)
        if b"model=" in query:  # the last `model=` wins, as in Starlette's query_params
            named = [part[6:] for part in query.split(b"&") if part.startswith(b"model=")]
            if named and named[-1]:
                return unquote_plus(named[-1].decode("latin-1"))
        models = self.state.models
        if len(models) == 1:
            return next(iter(models))
        return self.state.default_model if models else None

    def record(self, answer: Answer, method: str, started: float) -> None:
        """Count an answer given outside the ASGI stack in the app's metrics (as MetricsMiddleware would)."""
        key = (answer.route, method, answer.status)
        children = self._counted.get(key)
        if children is None:  # labels() takes a lock and builds a key each time: look it up once
            metrics = self.state.metrics
            children = (metrics.requests.labels(answer.route, method, str(answer.status)),
                        metrics.latency.labels(answer.route))
            self._counted[key] = children
        children[0].inc()
        children[1].observe(time.perf_counter() - started)


ROUTE_KEY = "stn.route"  # scope key: the route template of an answer given by the door (for MetricsMiddleware)


class FrontDoorMiddleware:
    """Pure ASGI middleware giving the door's answers (inside RequestId and Metrics, before routing)."""

    def __init__(self, app, door: FrontDoor) -> None:  # noqa: ANN001 (ASGI app)
        self.app = app
        self.door = door

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] == "http":
            path, root = scope["path"], scope.get("root_path", "")
            if root and path.startswith(root):  # uvicorn puts STN_ROOT_PATH in front of the path
                path = path[len(root):]
            answer = self.door.answer(scope["method"], path, scope.get("query_string", b""))
            if answer is not None:
                scope[ROUTE_KEY] = answer.route
                raw = answer.body(scope.get("state", {}).get("request_id", ""))
                headers = [(b"content-type", answer.content_type), (b"content-length", str(len(raw)).encode()),
                           *answer.headers]
                if answer.close:
                    headers.append((b"connection", b"close"))
                await send({"type": "http.response.start", "status": answer.status, "headers": headers})
                await send({"type": "http.response.body", "body": raw})
                return
        await self.app(scope, receive, send)
