"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from service.api.errors import PROBLEM_JSON
from service.api.frontdoor import readiness
from service.api.state import StateDep

router = APIRouter(tags=["ops"])


# Both are answered by service.api.frontdoor before routing (ahead of any work); these routes document
# them and answer when the app runs without the door's middleware.
@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict:
    return {"status": "live"}


@router.get("/readyz", summary="Readiness: every model loaded and warmed up", response_model=None)
async def readyz(state: StateDep) -> dict | Response:
    """With STN_API_KEYS set, only ``ready``/``loading`` (no model names, paths or errors: /v1/models has them)."""
    status, body, problem = readiness(state)
    if not problem:
        return body
    return JSONResponse(body, status, {"Retry-After": "1"}, media_type=PROBLEM_JSON)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
