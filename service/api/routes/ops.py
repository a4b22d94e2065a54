"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.errors import problem_response
from service.api.state import StateDep

router = APIRouter(tags=["ops"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict:
    return {"status": "live"}


@router.get("/readyz", summary="Readiness: every model loaded and warmed up", response_model=None)
async def readyz(state: StateDep) -> dict | Response:
    """With STN_API_KEYS set, only ``ready``/``loading`` (no model names, paths or errors: /v1/models has them)."""
    minimal = bool(state.settings.api_keys)
    body: dict = {"ready": state.ready, "loading": state.loading}
    if not minimal:
        body.update(models=sorted(state.models), failed=state.loaded.failures)
    if state.ready:
        return body
    if state.admission.draining:
        detail = "the server is shutting down"
    elif state.loading:
        detail = "models are still loading"
    elif minimal:
        detail = "not ready: no model is serving (details at /v1/models, with a key)"
    else:
        detail = "not ready: " + ("; ".join(f"{k}: {v}" for k, v in state.loaded.failures.items())
                                  or "no model loaded")
    return problem_response(503, detail, "/readyz", {"Retry-After": "1"}, **body)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
