"""The OpenAPI document, made to match what the service answers.

FastAPI documents a 422 for every operation with parameters; this service answers 400
problem+json instead (``service.api.errors``), plus 401/404/408/413/415/503 where they happen,
images from ``/v1/rectify?format=png|jpeg|webp`` and Prometheus text from ``/metrics``. This
module rewrites each operation's ``responses`` accordingly (schemathesis checks them in
``tests/service/test_schema_fuzz.py``).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.api.errors import PROBLEM_JSON

PROBLEM_SCHEMA = {
    "type": "object",
    "description": "RFC 9457 problem details; /v2 errors also carry `error` (what Triton clients read)",
    "properties": {
        "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
        "detail": {"type": "string"}, "instance": {"type": "string"}, "request_id": {"type": "string"},
        "error": {"type": "string"},
    },
    "required": ["type", "title", "status", "detail"],
}
REASONS = {
    400: "Bad request: malformed parameters, body or image (the detail says what)",
    401: "An API key is needed or not valid (STN_API_KEYS)",
    404: "Unknown model or version",
    408: "The body did not arrive within STN_BODY_TIMEOUT_S",
    413: "Over a limit: bytes, pixels, files, memory budget",
    415: "Content type or Content-Encoding not accepted, or an image format that STN_IMAGE_FORMATS leaves out",
    503: "Not ready, overloaded, or shutting down; retry after Retry-After seconds",
}
WORK = (400, 401, 404, 408, 413, 415, 503)  # POST /v1/rectify, POST /v2/.../infer
MODEL = (400, 401, 404, 503)  # GET /v2/models/..., /v1/models
_JSON_OBJECT = {"application/json": {"schema": {"type": "object"}}}
_BINARY = {"schema": {"type": "string", "format": "binary"}}


def _problems(codes: tuple[int, ...]) -> dict[str, Any]:
    return {str(c): {"description": REASONS[c],
                     "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            for c in codes}


def _responses(path: str, method: str, responses: dict[str, Any]) -> dict[str, Any]:
    ok = responses.get("200", {"description": "OK"})
    out: dict[str, Any] = {"200": ok}
    if path == "/v1/rectify":
        ok["content"] = {"application/json": {"schema": {"type": "object"}}, "image/png": _BINARY,
                         "image/jpeg": _BINARY, "image/webp": _BINARY}
        ok["description"] = "JSON results (format=json), or one rectified image (format=png|jpeg|webp)"
        out.update(_problems(WORK))
    elif path.endswith("/infer"):
        ok["content"] = {**_JSON_OBJECT, "application/octet-stream": _BINARY}
        ok["description"] = "the inference response (JSON, or JSON then binary tensors)"
        out.update(_problems(WORK))
    elif path == "/metrics":
        ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
    elif path == "/readyz":
        out.update(_problems((503,)))
    elif path == "/v2/health/ready":
        out["503"] = {"description": "not ready", "content": _JSON_OBJECT}
    elif path.endswith("/ready") and path.startswith("/v2/models"):
        out.update({str(c): {"description": REASONS[c], "content": _JSON_OBJECT} for c in (404, 503)})
        out.update(_problems((400, 401)))
    elif path.startswith("/v2/repository"):
        out.update(_problems((400, 401, 404, 413) if "/models/" in path else (400, 401, 413)))
    elif path.startswith("/v2/models") or path.startswith("/v1/"):
        out.update(_problems(MODEL))
    return out


def install(app: FastAPI) -> None:
    """Replace ``app.openapi`` by one that documents the real responses (built once, cached)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, summary=app.summary,
                              description=app.description, routes=app.routes)
            for path, ops in doc.get("paths", {}).items():
                for method, op in ops.items():
                    op["responses"] = _responses(path, method, op.get("responses", {}))
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
            schemas["Problem"] = PROBLEM_SCHEMA
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
