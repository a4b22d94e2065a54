"""RFC 9457 problem details (``application/problem+json``) for every error the service returns."""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class Problem(Exception):
    """An error response: status, a human ``detail``, optional headers and extra members."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None, **extra: object) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


CLIENT_CLOSED = 499  # nginx's "client closed request": counted in metrics, never sent (nobody is listening)


class ClientGone(Exception):
    """The client disconnected before its response; its work was dropped (HTTP 499 in metrics)."""


def problem_body(status: int, detail: str, instance: str = "", **extra: object) -> dict:
    """The RFC 9457 members of a problem (``type``, ``title``, ``status``, ``detail``, ``instance``) plus ``extra``."""
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    body = {"type": "about:blank", "title": phrase, "status": status, "detail": detail}
    if instance:
        body["instance"] = instance
    body.update(extra)
    return body


def problem_response(status: int, detail: str, instance: str = "", headers: dict[str, str] | None = None,
                     **extra: object) -> JSONResponse:
    return JSONResponse(problem_body(status, detail, instance, **extra), status_code=status, headers=headers,
                        media_type=PROBLEM_JSON)


def install(app: FastAPI) -> None:
    """Register handlers so that every error, including FastAPI's own, is problem+json."""

    def _extra(request: Request, detail: str) -> dict[str, object]:
        extra: dict[str, object] = {}
        rid = request.scope.get("state", {}).get("request_id")
        if rid:
            extra["request_id"] = rid  # service.api.middleware.RequestIdMiddleware
        if request.url.path.startswith("/v2"):
            extra["error"] = detail  # what Triton clients read
        return extra

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.detail, request.url.path, exc.headers,
                                **{**_extra(request, exc.detail), **exc.extra})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}; see /docs for the API"
        return problem_response(exc.status_code, detail, request.url.path, dict(exc.headers or {}),
                                **_extra(request, detail))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        detail = "invalid request: " + "; ".join(parts)
        return problem_response(400, detail, request.url.path, **_extra(request, detail))

    @app.exception_handler(ClientDisconnect)
    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: Exception) -> Response:
        log.info("%s %s: the client disconnected before its response", request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        detail = f"internal error ({type(exc).__name__}); the server log has the details"
        return problem_response(500, detail, request.url.path, **_extra(request, detail))
