"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.errors import problem_response
from service.state import StateDep

router = APIRouter(tags=["ops"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict:
    return {"status": "live"}


@router.get("/readyz", summary="Readiness: every model loaded and warmed up", response_model=None)
async def readyz(state: StateDep) -> dict | Response:
    body = {"ready": state.ready, "loading": state.loading, "models": sorted(state.models),
            "failed": state.loaded.failures}
    if state.ready:
        return body
    detail = ("models are still loading" if state.loading else
              "not ready: " + ("; ".join(f"{k}: {v}" for k, v in state.loaded.failures.items()) or "no model loaded"))
    return problem_response(503, detail, "/readyz", {"Retry-After": "1"}, **body)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(state: StateDep) -> Response:
    for name, b in state.batchers.items():
        state.metrics.queue_depth.labels(name).set(b.depth)
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
