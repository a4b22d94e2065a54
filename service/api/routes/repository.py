"""Triton's model repository extension under ``/v2/repository`` (``service.api.repository`` does the work).

tritonclient's ``get_model_repository_index``, ``load_model`` and ``unload_model`` call these.
API keys guard them like the rest of ``/v2``; errors are problem+json with ``error``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, ConfigDict, ValidationError

from service.api.errors import Problem
from service.api.repository import NAME
from service.api.state import AuthDep, StateDep

router = APIRouter(prefix="/v2/repository", tags=["v2 (Open Inference Protocol)"], dependencies=[AuthDep])

MAX_BODY = 64 * 1024  # these requests carry a few flags


class _IndexRequest(BaseModel):
    model_config = ConfigDict(strict=True)
    ready: bool = False


class _LoadRequest(BaseModel):
    model_config = ConfigDict(strict=True)
    parameters: dict[str, Any] = {}


async def _body(request: Request, model: type[BaseModel]) -> Any:
    """The optional JSON body, validated (an empty body is the defaults); Problem 400/413 with the reason."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise Problem(413, f"the request is {length} bytes; a repository request holds at most {MAX_BODY}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > MAX_BODY:
            raise Problem(413, f"the request exceeds {MAX_BODY} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks).strip()
    try:
        data = json.loads(raw) if raw else {}
        return model.model_validate(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        if isinstance(e, ValidationError):
            reasons = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(the body)'}: {err['msg']}"
                                for err in e.errors()[:5])
            raise Problem(400, f"invalid request: {reasons}") from None
        raise Problem(400, f"the body is not valid JSON: {e}") from None


ModelName = Annotated[str, Path(pattern=NAME.pattern, description="the model's served name: the stem of its .onnx "
                                                                  "file in STN_MODEL_DIR")]


def _body_doc(properties: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": False, "content": {"application/json": {"schema": {
        "type": "object", "properties": properties}}}}}


@router.post("/index", summary="Model repository index (every model of the folder, with its state)",
             openapi_extra=_body_doc({"ready": {"type": "boolean", "description": "only models ready to serve"}}))
async def index(request: Request, state: StateDep) -> list[dict]:
    body = await _body(request, _IndexRequest)
    return state.repository.index(ready_only=body.ready)


_PARAMETERS = {"parameters": {"type": "object", "description": "accepted and ignored, except `config` and "
                              "`file:*` (not supported: models load from STN_MODEL_DIR)"}}


@router.post("/models/{name}/load", summary="Load or reload a model from its file (warmed before it serves)",
             openapi_extra=_body_doc(_PARAMETERS))
async def load(name: ModelName, request: Request, state: StateDep) -> dict:
    state.repository.path(name)  # 400 for a name that cannot be a file
    body = await _body(request, _LoadRequest)
    overrides = sorted(k for k in body.parameters if k == "config" or k.startswith("file:"))
    if overrides:
        raise Problem(400, f"load parameters {overrides} are not supported: this server loads models from their "
                           ".onnx files in STN_MODEL_DIR (copy the file there, then load it)")
    runtime = await state.repository.load(name)
    return {"name": name, "version": runtime.info.version, "state": "READY"}


@router.post("/models/{name}/unload", summary="Unload a model (requests in flight finish)",
             openapi_extra=_body_doc(_PARAMETERS))
async def unload(name: ModelName, request: Request, state: StateDep) -> dict:
    state.repository.path(name)
    await _body(request, _LoadRequest)
    await state.repository.unload(name)
    return {"name": name, "state": "UNAVAILABLE"}
