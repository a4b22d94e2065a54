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
import math
import re
import zlib
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from export.metadata import INPUT_IMAGE, OUTPUT_RECTIFIED, OUTPUT_THETA
from service.api.admission import BudgetedResponse, grid_floats, image_cost
from service.api.batcher import QueueFullError, QueueTimeoutError
from service.api.errors import Problem
from service.api.routes import content_encoding
from service.api.state import AuthDep, ServiceState, StateDep
from service.runtime import ModelRuntime

router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])
models_router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"], dependencies=[AuthDep])

HEADER_LENGTH = "Inference-Header-Content-Length"
OUTPUTS = (OUTPUT_RECTIFIED, OUTPUT_THETA)  # every model's outputs
SERVER_NAME = "stn"
SERVER_VERSION = "0.1.0"


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> Problem:
    return Problem(status, detail, headers, error=detail)  # `error`: what Triton clients read


@router.get("", summary="Server metadata")
async def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": SERVER_VERSION,
            "extensions": ["binary_tensor_data", "model_repository", "model_configuration", "statistics"]}


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


def _stats(state: ServiceState, runtimes: list[ModelRuntime]) -> dict[str, Any]:
    return {"model_stats": [state.stats.model(r.name, r.info.version) for r in runtimes]}


@models_router.get("/models/stats", summary="Inference statistics of every model (Triton's statistics extension)")
async def get_all_stats(state: StateDep) -> dict:
    return _stats(state, [state.models[k] for k in sorted(state.models)])


@models_router.get("/models/{name}/stats", summary="Inference statistics of one model")
async def get_model_stats(name: str, state: StateDep) -> dict:
    return _stats(state, [_model(state, name, None)])


@models_router.get("/models/{name}/versions/{version}/stats", summary="Inference statistics (one version)")
async def get_model_version_stats(name: str, version: str, state: StateDep) -> dict:
    return _stats(state, [_model(state, name, version)])


def model_config(runtime: ModelRuntime, state: ServiceState) -> dict[str, Any]:
    """The model as Triton's model configuration (``config.pbtxt`` as JSON) describes it: what tritonclient's
    ``get_model_config`` returns. Dimensions exclude the batch axis; a request holds at most STN_MAX_FILES."""
    info, s = runtime.info, state.settings
    c, (h, w) = info.in_channels, info.output_size
    params = {"transform": info.transform, "model_name": info.name, "file": runtime.path.name,
              "mean": json.dumps(list(info.mean)), "std": json.dumps(list(info.std)),
              "loc_size": json.dumps(list(info.loc_size)), "grid_sample": info.grid_sample,
              "providers": json.dumps(runtime.providers)}
    return {
        "name": runtime.name, "platform": "onnxruntime_onnx", "backend": "onnxruntime",
        "version_policy": {"specific": {"versions": [info.version]}},
        "max_batch_size": s.max_files,
        "input": [{"name": INPUT_IMAGE, "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": [c, -1, -1]}],
        "output": [{"name": OUTPUT_RECTIFIED, "data_type": "TYPE_FP32", "dims": [c, h, w]},
                   {"name": OUTPUT_THETA, "data_type": "TYPE_FP32", "dims": list(info.theta_shape)}],
        "dynamic_batching": {  # the localiser's batcher (STN_MAX_BATCH_SIZE, STN_MAX_QUEUE_DELAY_MS, ...)
            "preferred_batch_size": [s.max_batch_size],
            "max_queue_delay_microseconds": int(s.max_queue_delay_ms * 1000),
            "default_queue_policy": {"timeout_action": "REJECT", "max_queue_size": s.max_queue_size,
                                     "default_timeout_microseconds": int(s.request_timeout_s * 1e6)},
        },
        "instance_group": [{"name": runtime.name, "count": 1,
                            "kind": "KIND_CPU" if runtime.device == "cpu" else "KIND_GPU"}],
        "parameters": {k: {"string_value": str(v)} for k, v in params.items()},
    }


@models_router.get("/models/{name}/config", summary="Model configuration (Triton's, as JSON)")
async def get_model_config(name: str, state: StateDep) -> dict:
    return model_config(_model(state, name, None), state)


@models_router.get("/models/{name}/versions/{version}/config", summary="Model configuration (one version)")
async def get_model_version_config(name: str, version: str, state: StateDep) -> dict:
    return model_config(_model(state, name, version), state)


@models_router.get("/models/{name}", summary="Model metadata")
async def get_model_metadata(name: str, state: StateDep) -> dict:
    return model_metadata(_model(state, name, None))


@models_router.get("/models/{name}/versions/{version}", summary="Model metadata (one version)")
async def get_model_version_metadata(name: str, version: str, state: StateDep) -> dict:
    return model_metadata(_model(state, name, version))


def _ready(state: ServiceState, name: str, version: str | None) -> dict | Response:
    try:
        _model(state, name, version)
    except Problem as p:
        return JSONResponse({"name": name, "ready": False, "error": p.detail}, status_code=p.status)
    return {"name": name, "ready": True}


@models_router.get("/models/{name}/ready", summary="Model ready", response_model=None)
async def model_ready(name: str, state: StateDep) -> dict | Response:
    return _ready(state, name, None)


@models_router.get("/models/{name}/versions/{version}/ready", summary="Model ready (one version)",
                   response_model=None)
async def model_version_ready(name: str, version: str, state: StateDep) -> dict | Response:
    return _ready(state, name, version)


class _Parameters(BaseModel):
    """Request/tensor parameters: the ones we read are typed, others are accepted and ignored."""

    model_config = ConfigDict(extra="allow", strict=True)
    binary_data_size: int | None = Field(None, ge=0)
    binary_data: bool | None = None
    binary_data_output: bool | None = None


class _Input(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str
    datatype: str
    shape: list[int]
    parameters: _Parameters | None = None
    data: list | None = None  # values checked when converted (np.asarray), not here


class _Output(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str
    parameters: _Parameters | None = None


class InferenceRequest(BaseModel):
    """The inference request of the Open Inference Protocol (what this server reads of it)."""

    model_config = ConfigDict(strict=True)
    id: str | None = None
    parameters: _Parameters | None = None
    inputs: list[_Input] = Field(min_length=1)
    outputs: list[_Output] | None = None


def _validation_reason(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(the request)"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def _header_length(request: Request) -> int | None:
    """The ``Inference-Header-Content-Length`` of a request with binary tensors (None without); Problem 400 unless
    ASCII digits (int() would take ``²`` only to raise, and ``١`` and ``1_0``)."""
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return None
    if not re.fullmatch(r"[0-9]{1,15}", value.strip()):
        raise _problem(400, f"{HEADER_LENGTH} must be the JSON header's length in bytes; got {value!r}")
    return int(value)


def _parse_request(body: bytes, header_length: int | None) -> tuple[dict[str, Any], bytes]:
    """JSON header and binary tail, validated against :class:`InferenceRequest` (Problem 400 with the reason).

    Runs on a worker thread: parsing a large body must not stall the event loop.
    """
    n = header_length
    if n is not None and n > len(body):
        raise _problem(400, f"{HEADER_LENGTH} is {n}, but the body has {len(body)} bytes")
    try:
        if n is not None:
            req, binary = json.loads(body[:n]), body[n:]
        else:
            req, binary = json.loads(body), b""
    except RecursionError:
        raise _problem(400, "the inference request is nested too deeply to be a valid request") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise _problem(400, f"the inference request is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise _problem(400, f"the inference request must be a JSON object, got {type(req).__name__}")
    try:
        InferenceRequest.model_validate(req)
    except ValidationError as e:
        raise _problem(400, f"invalid inference request: {_validation_reason(e)}") from None
    except RecursionError:
        raise _problem(400, "the inference request is nested too deeply to be a valid request") from None
    for what, items in (("input", req["inputs"]), ("output", req.get("outputs") or [])):
        names = [item["name"] for item in items]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:  # which one would count? and each repeated output would be built and sent again, unreserved
            raise _problem(400, f"{what} {twice[0]!r} is named more than once; name each {what} once")
    unknown = [o["name"] for o in req.get("outputs") or [] if o["name"] not in OUTPUTS]
    if unknown:
        raise _problem(400, f"unknown output {unknown[0]!r}; the models have {list(OUTPUTS)}")
    return req, binary


def _parsed_cost(body: bytes, header_length: int | None) -> int:
    """An upper bound of the memory a request body takes once its JSON is parsed and validated (the body, binary
    tail included, and the JSON's Python objects), counted at C speed on a worker. Every JSON value becomes a
    Python object, and a short text makes many: 12 MB of ``0.5,`` took 167 MB, of ``[0],`` 349 MB and of
    ``{},`` 258 MB (a flat float tensor in JSON: about 4.4 times its text). So: per element separator 64 bytes
    (an object and its slot), per list 80 more, per object 96 and per key 80 (tests/service/test_image_cost.py
    checks the bound)."""
    text = body[: min(len(body) if header_length is None else header_length, len(body))]
    return len(body) + 64 * (text.count(b",") + 1) + 80 * text.count(b"[") + 96 * text.count(b"{") + 80 * text.count(b":")


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
    count = math.prod(shape)  # exact: np.prod wraps around at 2**63
    try:
        if size is not None:
            if int(size) != count * 4 or start + int(size) > len(binary):
                raise ValueError(f"binary_data_size {size} does not hold {shape} FP32 values")
            data = np.frombuffer(binary, np.float32, count, start).reshape(shape)
        else:
            with np.errstate(over="ignore"):  # a JSON number beyond float32 becomes inf: refused below
                data = np.asarray(inp.get("data"), dtype=np.float32)
            if data.size != count:
                raise ValueError(f"`data` has {data.size} values; shape {shape} needs {count}")
            data = data.reshape(shape)
    except (ValueError, TypeError) as e:
        raise _problem(400, f"input {INPUT_IMAGE!r}: {e}") from None
    # one pass, no temporary: a float64 sum of float32 values cannot overflow, and NaN or inf carries through it
    if not np.isfinite(data.sum(dtype=np.float64)):
        raise _problem(400, f"input {INPUT_IMAGE!r} holds NaN or infinite values (or values beyond float32); "
                            "send finite FP32 values")
    return data


@models_router.post("/models/{name}/infer", summary="Inference (Open Inference Protocol)")
async def infer(name: str, request: Request, state: StateDep) -> Response:
    return await _infer(state, request, name, None)


@models_router.post("/models/{name}/versions/{version}/infer", summary="Inference (one version)")
async def infer_version(name: str, version: str, request: Request, state: StateDep) -> Response:
    return await _infer(state, request, name, version)


ENCODINGS = ("gzip", "deflate")  # request bodies tritonclient can compress (request_compression_algorithm)


def _inflate(body: bytes, cap: int) -> bytes:
    """A gzip or deflate (zlib) body, inflated to at most ``cap`` bytes (Problem 413 beyond, 400 when corrupt)."""
    d = zlib.decompressobj(32 + zlib.MAX_WBITS)  # either header, told apart by zlib
    try:
        out = d.decompress(body, cap + 1)
    except zlib.error as e:
        raise _problem(400, f"the compressed body does not inflate: {e}") from None
    if len(out) > cap:
        raise _problem(413, f"the request inflates to more than {cap} bytes")
    if not d.eof:
        raise _problem(400, "the compressed body is cut short")
    return out


def _body_cap(request: Request, state: ServiceState, compressed: bool) -> tuple[int, int]:
    """(the most bytes the body may have, what to reserve for it: the body, and its parse when it is JSON)."""
    s = state.settings
    budget = s.max_upload_bytes * s.max_files + 64 * 1024
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > budget:
        raise _problem(413, f"the request is {length} bytes; the limit is {budget}")
    # a compressed body's size says nothing of what it inflates to: reserved as a body of unknown length
    size = min(int(length), budget) if length.isdigit() and not compressed else budget
    binary = request.headers.get(HEADER_LENGTH) is not None
    # JSON numbers become Python objects: at least 4 times the text (a flat tensor); what the parse will really
    # hold is reserved once the body is in (_parsed_cost)
    return budget, size if binary else 4 * size


async def _infer(state: ServiceState, request: Request, name: str, version: str | None) -> Response:
    runtime = _model(state, name, version)
    s = state.settings
    compressed = content_encoding(request, ENCODINGS, _problem) is not None
    header_length = _header_length(request)
    budget, reserve = _body_cap(request, state, compressed)
    async with state.admission.admit(runtime.name, body_bytes=reserve) as ticket:  # `error`: the detail (errors.install)
        async with ticket.reading():
            chunks, total = [], 0
            async for chunk in request.stream():  # bounded even without a Content-Length (chunked uploads)
                total += len(chunk)
                if total > budget:
                    raise _problem(413, f"the request exceeds {budget} bytes")
                chunks.append(chunk)
        body = b"".join(chunks)
        del chunks
        if compressed:
            body = await state.workers.run(_inflate, body, budget)
        # what the parse will hold, reserved before it (413 when it can never fit, 503 when it does not fit now)
        parsed = await state.workers.run(_parsed_cost, body, header_length)
        ticket.reserve_bytes(max(0, parsed - ticket.bytes), "the request's JSON")
        req, binary = await state.workers.run(_parse_request, body, header_length)
        image = await state.workers.run(_input_tensor, req, binary, runtime.info.in_channels)
        n, c, h, w = image.shape
        if h * w > s.max_image_pixels:
            raise _problem(413, f"images of {w}x{h} exceed {s.max_image_pixels} pixels (STN_MAX_IMAGE_PIXELS)")
        if n > s.max_files:
            raise _problem(413, f"{n} images; at most {s.max_files} per request (STN_MAX_FILES)")
        info = runtime.info
        ticket.grow(n, n * image_cost(c, (h, w), info.output_size, grid_floats(info)), f"{n} image(s) of {w}x{h}")
        if _json_output(req, OUTPUT_RECTIFIED):  # written as JSON numbers: each a Python float, then text
            oh, ow = info.output_size
            ticket.reserve_bytes(JSON_OUTPUT_BYTES * n * c * oh * ow, "the response's JSON")

        def front() -> tuple[Any, np.ndarray]:
            up = runtime.upload(image)
            return up, runtime.resize(up)  # the input is already normalized; resize is linear

        try:
            async with ticket.watch(request), asyncio.timeout(s.request_timeout_s):
                try:
                    up, loc = await state.workers.run(front)
                finally:
                    ticket.prepared()
                theta = np.stack(await state.localise(runtime, list(loc)))
                rectified = await state.workers.run(runtime.sample, up, theta, None)
        except QueueFullError as e:
            raise _problem(503, f"the queue is full ({e})", {"Retry-After": "1"}) from None
        except (TimeoutError, QueueTimeoutError):
            raise _problem(503, f"no result within {s.request_timeout_s:g}s", {"Retry-After": "1"}) from None
        state.metrics.images.labels(runtime.name).inc(n)
        body, media_type, headers = await state.workers.run(
            _response, req, runtime, {OUTPUT_RECTIFIED: rectified, OUTPUT_THETA: theta})
    # the tensors can be large (4 bytes a pixel and channel): counted in the budget until sent
    return BudgetedResponse(body, state.admission, media_type=media_type, headers=headers)


# bytes a JSON output value holds while the response is built: a Python float and its list slot (32), its text
# (about 22: float32 values print with up to 17 digits) and the text's bytes; measured 82 (tests/service/test_image_cost.py)
JSON_OUTPUT_BYTES = 96


def _json_output(req: dict[str, Any], name: str) -> bool:
    """Whether output ``name`` is sent as JSON ``data`` (not with the binary tensor extension), as :func:`_response` decides."""
    default_binary = bool((req.get("parameters") or {}).get("binary_data_output", False))
    for o in req.get("outputs") or [{"name": name}]:
        if o.get("name") == name:
            return not bool((o.get("parameters") or {}).get("binary_data", default_binary))
    return False


def _response(req: dict[str, Any], runtime: ModelRuntime,
              tensors: dict[str, np.ndarray]) -> tuple[bytes, str, dict[str, str]]:
    """The infer response's (body, media type, headers): JSON, or JSON then the binary outputs."""
    wanted = req.get("outputs") or [{"name": k} for k in tensors]
    outputs, blobs = [], []
    for o in wanted:
        oname = o.get("name")  # known and named once: _parse_request
        t = np.ascontiguousarray(tensors[oname], np.float32)
        entry: dict[str, Any] = {"name": oname, "datatype": "FP32", "shape": list(t.shape)}
        if not _json_output(req, oname):
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
        return header, "application/json", {}
    return header + b"".join(blobs), "application/octet-stream", {HEADER_LENGTH: str(len(header))}
