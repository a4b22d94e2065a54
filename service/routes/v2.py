"""Open Inference Protocol (KServe v2, as Triton speaks it), so existing Triton/KServe clients work.

The model is served as its ONNX contract says: input ``image`` FP32 [N, C, H, W] *normalized*
with the model's mean/std, outputs ``rectified`` FP32 [N, C, h, w] (at the model's output
size, in the same normalized space: zeros padding is 0 there) and ``theta``. Inputs and
outputs travel as JSON ``data`` or with the binary tensor data extension
(``Inference-Header-Content-Length``). Localisation goes through the same dynamic batcher as /v1.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from export.metadata import INPUT_IMAGE, OUTPUT_RECTIFIED, OUTPUT_THETA
from service.dynamic_batcher import QueueFullError, QueueTimeoutError
from service.errors import Problem
from service.runtime import ModelRuntime
from service.state import AuthDep, ServiceState, StateDep

router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])
models_router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"], dependencies=[AuthDep])

HEADER_LENGTH = "Inference-Header-Content-Length"
SERVER_NAME = "stn"
SERVER_VERSION = "0.1.0"


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> Problem:
    return Problem(status, detail, headers, error=detail)  # `error`: what Triton clients read


@router.get("", summary="Server metadata")
async def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": ["binary_tensor_data"]}


@router.get("/health/live", summary="Server live")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="Server ready", response_model=None)
async def ready(state: StateDep) -> dict | Response:
    if state.ready:
        return {"ready": True}
    return JSONResponse({"ready": False, "error": "not ready (see /readyz)"}, status_code=503)


def _model(state: ServiceState, name: str, version: str | None) -> ModelRuntime:
    try:
        runtime = state.get_model(name)
    except Problem as p:
        raise _problem(p.status, p.detail, p.headers) from None
    if version not in (None, "", runtime.info.version):
        raise _problem(404, f"model {name!r} has version {runtime.info.version!r}, not {version!r}")
    return runtime


def model_metadata(runtime: ModelRuntime) -> dict[str, Any]:
    info = runtime.info
    c, (h, w) = info.in_channels, info.output_size
    return {
        "name": runtime.name,
        "versions": [info.version],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": INPUT_IMAGE, "datatype": "FP32", "shape": [-1, c, -1, -1]}],
        "outputs": [
            {"name": OUTPUT_RECTIFIED, "datatype": "FP32", "shape": [-1, c, h, w]},
            {"name": OUTPUT_THETA, "datatype": "FP32", "shape": [-1, *info.theta_shape]},
        ],
        "parameters": {"transform": info.transform, "mean": list(info.mean), "std": list(info.std),
                       "loc_size": list(info.loc_size), "providers": runtime.providers},
    }


@models_router.get("/models/{name}", summary="Model metadata")
@models_router.get("/models/{name}/versions/{version}", summary="Model metadata (one version)")
async def get_model_metadata(name: str, state: StateDep, version: str | None = None) -> dict:
    return model_metadata(_model(state, name, version))


@models_router.get("/models/{name}/ready", summary="Model ready", response_model=None)
@models_router.get("/models/{name}/versions/{version}/ready", summary="Model ready (one version)",
                   response_model=None)
async def model_ready(name: str, state: StateDep, version: str | None = None) -> dict | Response:
    try:
        _model(state, name, version)
    except Problem as p:
        return JSONResponse({"name": name, "ready": False, "error": p.detail}, status_code=p.status)
    return {"name": name, "ready": True}


def _parse_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    try:
        if header_length is not None:
            n = int(header_length)
            if n < 0 or n > len(body):
                raise ValueError(f"{HEADER_LENGTH}={n} but the body has {len(body)} bytes")
            return json.loads(body[:n]), body[n:]
        return json.loads(body), b""
    except (ValueError, UnicodeDecodeError) as e:
        raise _problem(400, f"the inference request is not valid JSON: {e}") from None


def _input_tensor(request: dict[str, Any], binary: bytes, c: int) -> np.ndarray:
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _problem(400, f"the request needs `inputs` with one tensor named {INPUT_IMAGE!r}")
    offset, found = 0, None
    for inp in inputs:  # binary inputs are laid out in request order
        size = (inp.get("parameters") or {}).get("binary_data_size")
        if inp.get("name") == INPUT_IMAGE:
            found = (inp, size, offset)
        if size is not None:
            offset += int(size)
    if found is None:
        raise _problem(400, f"no input named {INPUT_IMAGE!r} (got {[i.get('name') for i in inputs]})")
    inp, size, start = found
    if inp.get("datatype") != "FP32":
        raise _problem(400, f"input {INPUT_IMAGE!r} must be FP32, got {inp.get('datatype')!r}")
    shape = inp.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(d, int) and d >= 1 for d in shape)):
        raise _problem(400, f"input {INPUT_IMAGE!r} must have shape [N, {c}, H, W], got {shape!r}")
    if shape[1] != c:
        raise _problem(400, f"this model takes {c} channel(s): shape [N, {c}, H, W], got {shape}")
    count = int(np.prod(shape))
    try:
        if size is not None:
            if int(size) != count * 4 or start + int(size) > len(binary):
                raise ValueError(f"binary_data_size {size} does not hold {shape} FP32 values")
            return np.frombuffer(binary, np.float32, count, start).reshape(shape)
        data = np.asarray(inp.get("data"), dtype=np.float32)
        if data.size != count:
            raise ValueError(f"`data` has {data.size} values; shape {shape} needs {count}")
        return data.reshape(shape)
    except (ValueError, TypeError) as e:
        raise _problem(400, f"input {INPUT_IMAGE!r}: {e}") from None


@models_router.post("/models/{name}/infer", summary="Inference (Open Inference Protocol)")
@models_router.post("/models/{name}/versions/{version}/infer", summary="Inference (one version)")
async def infer(name: str, request: Request, state: StateDep, version: str | None = None) -> Response:
    runtime = _model(state, name, version)
    s = state.settings
    state.check_room(runtime.name, 1, error="queue full")
    length = request.headers.get("content-length")
    budget = s.max_upload_bytes * s.max_files + 64 * 1024
    if length and length.isdigit() and int(length) > budget:
        raise _problem(413, f"the request is {length} bytes; the limit is {budget}")
    chunks, total = [], 0
    async for chunk in request.stream():  # bounded even without a Content-Length (chunked uploads)
        total += len(chunk)
        if total > budget:
            raise _problem(413, f"the request exceeds {budget} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    req, binary = _parse_request(body, request.headers.get(HEADER_LENGTH))
    image = _input_tensor(req, binary, runtime.info.in_channels)
    n, _, h, w = image.shape
    if h * w > s.max_image_pixels:
        raise _problem(413, f"images of {w}x{h} exceed {s.max_image_pixels} pixels (STN_MAX_IMAGE_PIXELS)")
    if n > s.max_files:
        raise _problem(413, f"{n} images; at most {s.max_files} per request (STN_MAX_FILES)")
    state.admit(runtime.name, n, error="queue full")
    handed_over = False

    def front() -> tuple[Any, np.ndarray]:
        up = runtime.upload(image)
        return up, runtime.resize(up)  # the input is already normalized; resize is linear

    try:
        async with asyncio.timeout(s.request_timeout_s):
            try:
                up, loc = await state.workers.run(front)
            finally:
                state.prepared(runtime.name, n)
                handed_over = True
            theta = np.stack(await state.batchers[runtime.name].submit_many(list(loc)))
            rectified = await state.workers.run(runtime.sample, up, theta, None)
    except QueueFullError as e:
        raise _problem(503, f"the queue is full ({e})", {"Retry-After": "1"}) from None
    except (TimeoutError, QueueTimeoutError):
        raise _problem(503, f"no result within {s.request_timeout_s:g}s", {"Retry-After": "1"}) from None
    finally:
        if not handed_over:
            state.prepared(runtime.name, n)
        state.release(runtime.name, n)
    state.metrics.images.labels(runtime.name).inc(n)
    return _response(req, runtime, {OUTPUT_RECTIFIED: rectified, OUTPUT_THETA: theta})


def _response(req: dict[str, Any], runtime: ModelRuntime, tensors: dict[str, np.ndarray]) -> Response:
    params = req.get("parameters") or {}
    default_binary = bool(params.get("binary_data_output", False))
    wanted = req.get("outputs") or [{"name": k} for k in tensors]
    outputs, blobs = [], []
    for o in wanted:
        oname = o.get("name")
        if oname not in tensors:
            raise _problem(400, f"unknown output {oname!r}; this model has {list(tensors)}")
        t = np.ascontiguousarray(tensors[oname], np.float32)
        entry: dict[str, Any] = {"name": oname, "datatype": "FP32", "shape": list(t.shape)}
        if bool((o.get("parameters") or {}).get("binary_data", default_binary)):
            raw = t.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = t.ravel().tolist()
        outputs.append(entry)
    out: dict[str, Any] = {"model_name": runtime.name, "model_version": runtime.info.version, "outputs": outputs}
    if "id" in req:
        out["id"] = req["id"]
    header = json.dumps(out).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})
