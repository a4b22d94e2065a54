"""``/v1``: images in, rectified images and transforms out."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from service import images, pipeline
from service.dynamic_batcher import QueueFullError, QueueTimeoutError
from service.errors import Problem
from service.runtime import ModelRuntime
from service.state import AuthDep, ServiceState, StateDep

router = APIRouter(prefix="/v1", tags=["v1"], dependencies=[AuthDep])

_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")
_MULTIPART_SLACK = 64 * 1024  # boundaries and part headers


def parse_size(size: str | None, max_pixels: int) -> tuple[int, int] | None:
    """``WxH`` -> (h, w); Problem 400 when malformed or over STN_MAX_OUTPUT_PIXELS."""
    if size is None or size == "":
        return None
    m = _SIZE.match(size)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise Problem(400, f"size must be WIDTHxHEIGHT with positive integers, like 256x128; got {size!r}")
    w, h = int(m.group(1)), int(m.group(2))
    if w * h > max_pixels:
        raise Problem(400, f"size {w}x{h} is {w * h} pixels; the limit is {max_pixels} (STN_MAX_OUTPUT_PIXELS)")
    return h, w


def _too_large(e: images.ImageError) -> Problem:
    return Problem(413 if isinstance(e, images.ImageTooLargeError) else 400, str(e))


async def read_uploads(request: Request, state: ServiceState) -> list[tuple[str, bytes]]:
    """(filename, bytes) of each image: multipart ``file`` parts or a raw ``image/*`` body; limits first."""
    s = state.settings
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    length = request.headers.get("content-length")
    if ctype == "multipart/form-data":
        budget = s.max_upload_bytes * s.max_files + _MULTIPART_SLACK
        if length and length.isdigit() and int(length) > budget:
            raise Problem(413, f"the request is {length} bytes; at most {s.max_files} files of "
                               f"{s.max_upload_bytes} bytes each are accepted")
        try:
            form = await request.form(max_files=s.max_files + 1, max_fields=100)
        except Exception as e:  # noqa: BLE001 (multipart parse errors)
            detail = getattr(e, "detail", str(e))
            if "Too many files" in str(detail):
                raise Problem(413, f"too many files; at most {s.max_files} per request (STN_MAX_FILES)") from None
            raise Problem(400, f"the multipart body could not be parsed: {detail}") from None
        files = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
        if not files:
            others = [k for k in form.keys()]
            raise Problem(400, "no image: send one or more multipart parts named `file`"
                               + (f" (got parts {others})" if others else ""))
        if len(files) > s.max_files:
            raise Problem(413, f"{len(files)} files; at most {s.max_files} per request (STN_MAX_FILES)")
        out = []
        for i, f in enumerate(files):
            name = f.filename or f"file{i}"
            part_type = (f.content_type or "").split(";")[0].strip().lower()
            if part_type and not (part_type.startswith("image/") or part_type == "application/octet-stream"):
                raise Problem(415, f"part {name!r} has content type {part_type!r}; send images (image/*)")
            if f.size is not None:
                try:
                    images.check_bytes(f.size, state.limits, name)
                except images.ImageError as e:
                    raise _too_large(e) from None
            out.append((name, await f.read()))
        await form.close()
        return out
    if ctype.startswith("image/"):
        if length and length.isdigit():
            try:
                images.check_bytes(int(length), state.limits, "the body")
            except images.ImageError as e:
                raise _too_large(e) from None
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > s.max_upload_bytes:
                raise Problem(413, f"the body exceeds {s.max_upload_bytes} bytes (STN_MAX_UPLOAD_BYTES)")
            chunks.append(chunk)
        name = request.headers.get("x-filename") or "image"
        return [(name, b"".join(chunks))]
    raise Problem(415, f"content type {ctype or '(none)'!r} is not accepted: send multipart/form-data with "
                       "`file` parts, or a raw body with an image/* content type (e.g. image/jpeg)")


async def rectify_uploads(state: ServiceState, model: ModelRuntime, uploads: list[tuple[str, bytes]],
                          output_size: tuple[int, int] | None, fmt: str) -> list[tuple[pipeline.Rectified, bytes]]:
    """Decode in parallel, localise through the dynamic batcher, sample and encode in parallel."""
    loop = asyncio.get_running_loop()
    ex, m = state.executor, state.metrics
    name = model.name

    def prepare(filename: str, data: bytes) -> pipeline.Prepared:
        t0 = time.perf_counter()
        p = pipeline.prepare(model, data, state.limits, filename)
        m.compute_time.labels(name, "prepare").observe(time.perf_counter() - t0)
        return p

    def finish(item: pipeline.Prepared, theta) -> tuple[pipeline.Rectified, bytes]:  # noqa: ANN001
        t0 = time.perf_counter()
        r = pipeline.rectify(model, item, theta, output_size)
        encoded = images.encode(r.image, "png" if fmt == "json" else fmt)
        m.compute_time.labels(name, "rectify").observe(time.perf_counter() - t0)
        return r, encoded

    handed_over = False
    try:
        prepared = await asyncio.gather(*(loop.run_in_executor(ex, prepare, f, d) for f, d in uploads),
                                        return_exceptions=True)
        for p in prepared:
            if isinstance(p, images.ImageError):
                raise _too_large(p)
            if isinstance(p, BaseException):
                raise p
        state.prepared(name, len(uploads))
        handed_over = True
        thetas = await state.batchers[name].submit_many([p.loc for p in prepared])
    except QueueFullError as e:
        raise Problem(503, f"the queue is full ({e}); retry after a moment", {"Retry-After": "1"}) from None
    finally:
        if not handed_over:
            state.prepared(name, len(uploads))
    results = await asyncio.gather(*(loop.run_in_executor(ex, finish, p, t) for p, t in zip(prepared, thetas, strict=True)))
    m.images.labels(name).inc(len(results))
    return results


@router.post("/rectify", summary="Rectify images", response_model=None)
async def rectify(
    request: Request,
    state: StateDep,
    model: str | None = Query(None, description="model name (default: the default model)"),
    size: str | None = Query(None, description="WIDTHxHEIGHT of the rectified output (default: the model's)"),
    format: Literal["json", "png", "jpeg"] = Query("json", description="json, or one image as png/jpeg"),
) -> Response:
    runtime = state.get_model(model)
    output_size = parse_size(size, state.settings.max_output_pixels)
    state.check_room(runtime.name, 1)  # a full queue answers 503 before the body is read
    uploads = await read_uploads(request, state)
    if format != "json" and len(uploads) != 1:
        raise Problem(400, f"format={format} returns one image; send one file, or use format=json for {len(uploads)}")
    state.admit(runtime.name, len(uploads))
    try:
        results = await asyncio.wait_for(rectify_uploads(state, runtime, uploads, output_size, format),
                                         state.settings.request_timeout_s)
    except (TimeoutError, QueueTimeoutError):
        raise Problem(503, f"no result within {state.settings.request_timeout_s:g}s (STN_REQUEST_TIMEOUT_S); "
                           "the server is overloaded, retry later", {"Retry-After": "1"}) from None
    finally:
        state.release(runtime.name, len(uploads))
    info = runtime.info
    if format == "json":
        return JSONResponse({
            "model": runtime.name,
            "model_version": info.version,
            "results": [pipeline.result_json(runtime, r, enc) for r, enc in results],
        })
    r, encoded = results[0]
    geo = pipeline.geometry(info.transform, r.theta, r.input_size, r.output_size, info.tps_grid)
    headers = {
        "X-STN-Model": runtime.name,
        "X-STN-Model-Version": info.version,
        "X-STN-Input-Size": f"{r.input_size[1]}x{r.input_size[0]}",
        "X-STN-Theta": json.dumps(r.theta.tolist()),
        **{"X-STN-" + "-".join(w.capitalize() for w in k.split("_")): json.dumps(v) for k, v in geo.items()},
    }
    return Response(encoded, media_type=images.media_type(format), headers=headers)


@router.get("/models", summary="Served models: metadata, providers, batching settings")
async def list_models(state: StateDep) -> dict:
    s = state.settings
    batching = {"max_batch_size": s.max_batch_size, "max_queue_delay_ms": s.max_queue_delay_ms,
                "max_queue_size": s.max_queue_size, "request_timeout_s": s.request_timeout_s}
    models = []
    for name in sorted(state.models):
        d = state.models[name].describe()
        d.update(ready=True, default=(name == state.default_model), batching=batching,
                 queue_depth=state.batchers[name].depth if name in state.batchers else 0)
        models.append(d)
    failed = [{"name": k, "ready": False, "reason": v} for k, v in sorted(state.loaded.failures.items())]
    return {"ready": state.ready, "default": state.default_model, "models": models, "failed": failed,
            "limits": {"max_upload_bytes": s.max_upload_bytes, "max_image_pixels": s.max_image_pixels,
                       "max_files": s.max_files, "max_output_pixels": s.max_output_pixels}}
