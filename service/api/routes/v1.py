"""``/v1``: images in, rectified images and transforms out."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from service import geometry, images, pipeline
from service.api.admission import BudgetedResponse, Ticket, grid_floats, image_cost
from service.api.batcher import QueueFullError, QueueTimeoutError
from service.api.errors import Problem
from service.api.multipart import HeaderCallback, parse_form
from service.api.routes import content_encoding
from service.api.state import AuthDep, ServiceState, StateDep
from service.runtime import ModelRuntime

router = APIRouter(prefix="/v1", tags=["v1"], dependencies=[AuthDep])

_MULTIPART_SLACK = 64 * 1024  # boundaries and part headers


def parse_size(size: str | None, max_pixels: int) -> tuple[int, int] | None:
    """``WxH`` -> (h, w); Problem 400 when malformed or over STN_MAX_OUTPUT_PIXELS."""
    if size is None or size == "":
        return None
    try:
        h, w = images.parse_size(size)
    except ValueError as e:
        raise Problem(400, str(e)) from None
    if w * h > max_pixels:
        raise Problem(400, f"size {w}x{h} is {w * h} pixels; the limit is {max_pixels} (STN_MAX_OUTPUT_PIXELS)")
    return h, w


def parse_quality(text: str | None, fmt: str) -> int:
    """The ``quality`` query parameter of a ``format=jpeg|webp`` response (default ``images.DEFAULT_QUALITY``);
    Problem 400 when malformed, out of range, or given with a format that has none (PNG is lossless, JSON's
    images are PNG)."""
    if text is None:
        return images.DEFAULT_QUALITY
    if fmt not in ("jpeg", "webp"):
        raise Problem(400, f"quality applies to format=jpeg or format=webp, not format={fmt}")
    try:
        return images.parse_quality(text)
    except ValueError as e:
        raise Problem(400, str(e)) from None


def _too_large(e: images.ImageError) -> Problem:
    if isinstance(e, images.UnsupportedFormatError):
        return Problem(415, str(e))
    return Problem(413 if isinstance(e, images.ImageTooLargeError) else 400, str(e))


def body_cap(request: Request, state: ServiceState) -> int:
    """The most bytes this request's body may hold: its Content-Length, capped by the route's limit."""
    s = state.settings
    multipart = request.headers.get("content-type", "").split(";")[0].strip().lower() == "multipart/form-data"
    cap = s.max_upload_bytes * s.max_files + _MULTIPART_SLACK if multipart else s.max_upload_bytes
    length = request.headers.get("content-length", "")
    return min(int(length), cap) if length.isdigit() else cap


def upload_size(data: bytes, filename: str, limits: images.Limits) -> tuple[int, int] | None:
    """(width, height) from an upload's header in bounded time, on the event loop (Problem 400/413/415 when
    bad); None when only Pillow's header reader can tell: then :func:`pillow_size`, on a worker thread."""
    try:
        return images.header_size(data, limits, filename)
    except images.ImageError as e:
        raise _too_large(e) from None


def pillow_size(data: bytes, filename: str, limits: images.Limits) -> tuple[int, int]:
    """(width, height) from Pillow's header reader (Python over every chunk before the pixels: not on the loop)."""
    try:
        return images.open_checked(data, limits, filename).size
    except images.ImageError as e:
        raise _too_large(e) from None


def size_cost(model: ModelRuntime, size: tuple[int, int], output_size: tuple[int, int], data: bytes) -> int:
    """:func:`service.api.admission.image_cost` of a (width, height) upload for ``model``, in the upload's own
    colour as its header declares it (``images.declared_layout`` of its first bytes, ``data``)."""
    layout = images.declared_layout(data)
    return image_cost(layout.channels, (size[1], size[0]), output_size, grid_floats(model.info), extra=layout.extra,
                      wide=layout.wide)


PEEKS = (64 * 1024, 256 * 1024, 1024 * 1024, 4 * 1024 * 1024)  # bytes of an image arriving at which its header is tried


async def read_uploads(request: Request, state: ServiceState,
                       header: HeaderCallback | None = None) -> list[tuple[str, bytes]]:
    """(filename, bytes) of each image: multipart ``file`` parts or a raw ``image/*`` body; limits first.

    ``header(index, name, start)``: for each image still arriving (the ``index``-th of the
    returned list), called with its first bytes once they pass each of :data:`PEEKS` (at most
    four times) until it returns True: the image's header is in them (sizes known), so admission
    can answer before the rest of the body is read. What it raises ends the read.
    """
    s = state.settings
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    length = request.headers.get("content-length")
    if ctype == "multipart/form-data":
        budget = s.max_upload_bytes * s.max_files + _MULTIPART_SLACK
        if length and length.isdigit() and int(length) > budget:
            raise Problem(413, f"the request is {length} bytes; at most {s.max_files} files of "
                               f"{s.max_upload_bytes} bytes each are accepted")
        try:
            form = await parse_form(request, max_files=s.max_files + 1, max_fields=100, header=header, peeks=PEEKS)
        except (ClientDisconnect, Problem):
            raise
        except Exception as e:  # noqa: BLE001 (multipart parse errors)
            detail = getattr(e, "detail", str(e))
            if e.__cause__ is not None:  # python-multipart's own reason, under Starlette's "Invalid multipart data."
                detail = f"{detail} {e.__cause__}"
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
        name = request.headers.get("x-filename") or "image"
        chunks, total, peeks = [], 0, list(PEEKS) if header is not None else []
        async for chunk in request.stream():
            total += len(chunk)
            if total > s.max_upload_bytes:
                raise Problem(413, f"the body exceeds {s.max_upload_bytes} bytes (STN_MAX_UPLOAD_BYTES)")
            chunks.append(chunk)
            if peeks and total >= peeks[0]:
                while peeks and total >= peeks[0]:
                    peeks.pop(0)
                if header(0, name, b"".join(chunks)):
                    peeks = []
        return [(name, b"".join(chunks))]
    raise Problem(415, f"content type {ctype or '(none)'!r} is not accepted: send multipart/form-data with "
                       "`file` parts, or a raw body with an image/* content type (e.g. image/jpeg)")


def image_headers(model: ModelRuntime, result: pipeline.Rectified,
                  query: geometry.Query | None = None) -> dict[str, str]:
    """The X-STN-* headers of a ``format=png|jpeg`` response (the JSON fields, JSON-encoded)."""
    info = model.info
    geo = pipeline.geometry(info.transform, result.theta, result.input_size, result.output_size, info.tps_grid,
                            query)
    return {
        "X-STN-Model": model.name,
        "X-STN-Model-Version": info.version,
        "X-STN-Input-Size": f"{result.input_size[1]}x{result.input_size[0]}",
        "X-STN-Theta": json.dumps(np.asarray(result.theta).tolist()),
        **{"X-STN-" + "-".join(w.capitalize() for w in k.split("_")): json.dumps(v) for k, v in geo.items()},
    }


async def rectify_uploads(state: ServiceState, model: ModelRuntime, uploads: list[tuple[str, bytes]],
                          output_size: tuple[int, int] | None, fmt: str, ticket: Ticket,
                          query: geometry.Query | None = None,
                          declared: list[tuple[int, int]] | None = None,
                          quality: int = images.DEFAULT_QUALITY) -> list[Any]:
    """Decode in parallel, localise through the dynamic batcher, then sample, encode and describe in parallel,
    holding room in the server's work window (``state.window``) from the decode to the encode.

    Returns per image the ``results[i]`` JSON object (``fmt="json"``), else ``(encoded, headers)``;
    everything per image runs on the worker threads, the event loop only routes.
    """
    workers, name = state.workers, model.name
    prepare_time = state.metrics.compute_time.labels(name, "prepare")
    rectify_time = state.metrics.compute_time.labels(name, "rectify")

    def prepare(filename: str, data: bytes, size: tuple[int, int] | None) -> pipeline.Prepared:
        t0 = time.perf_counter()
        p = pipeline.prepare(model, data, state.limits, filename, size)
        prepare_time.observe(time.perf_counter() - t0)
        return p

    def finish(item: pipeline.Prepared, theta: np.ndarray) -> Any:
        t0 = time.perf_counter()
        r = pipeline.finish(model, item, theta, output_size, "png" if fmt == "json" else fmt, quality)
        out = (pipeline.result_json(model, r, query=query) if fmt == "json"
               else (r.encoded, image_headers(model, r, query)))
        rectify_time.observe(time.perf_counter() - t0)
        return out

    async with state.window.hold(len(uploads)):  # admitted images are decoded a window at a time
        ticket.start_preparing(len(uploads))
        try:
            sizes = declared or [None] * len(uploads)
            if len(uploads) == 1:
                prepared = [await workers.run(prepare, *uploads[0], sizes[0])]
            else:
                prepared = await asyncio.gather(*(workers.run(prepare, f, d, size)
                                                  for (f, d), size in zip(uploads, sizes, strict=True)),
                                                return_exceptions=True)
                for p in prepared:
                    if isinstance(p, BaseException):
                        raise p
            ticket.prepared()
            thetas = await state.localise(model, [p.loc for p in prepared])
        except images.ImageError as e:
            raise _too_large(e) from None
        except QueueFullError as e:
            raise Problem(503, f"the queue is full ({e}); retry after a moment", {"Retry-After": "1"}) from None
        finally:
            ticket.prepared()
        if len(prepared) == 1:
            results = [await workers.run(finish, prepared[0], thetas[0])]
        else:
            results = await asyncio.gather(*(workers.run(finish, p, t)
                                             for p, t in zip(prepared, thetas, strict=True)))
    state.metrics.images.labels(name).inc(len(results))
    return results


_RECTIFY_PARAMETERS = [  # documented here, read by hand below (see rectify's docstring)
    {"name": "model", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "model name (default: the default model, see /v1/models)"},
    {"name": "size", "in": "query", "required": False,
     "schema": {"type": "string", "pattern": "^([0-9]{1,6}[xX][0-9]{1,6})?$"},
     "description": "WIDTHxHEIGHT of the rectified output (default: the model's output size)"},
    {"name": "format", "in": "query", "required": False,
     "schema": {"type": "string", "enum": ["json", "png", "jpeg", "webp"], "default": "json"},
     "description": "json (default), or png/jpeg/webp: one rectified image as the body, the transform in X-STN-* headers"},
    {"name": "quality", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": images.QUALITY[0], "maximum": images.QUALITY[1],
                "default": images.DEFAULT_QUALITY},
     "description": "JPEG / WebP quality of a `format=jpeg|webp` body (1: smallest file, 100: best image); "
                    "other formats do not take it (400)"},
    {"name": "points", "in": "query", "required": False, "schema": {"type": "string"},
     "description": f"JSON [[x, y], ...], at most {geometry.MAX_POINTS}: pixel points of `points_frame` to map into "
                    "the other frame of every result (`points_output_px` or `points_input_px`, `points_status`)"},
    {"name": "boxes", "in": "query", "required": False, "schema": {"type": "string"},
     "description": f"JSON [[x0, y0, x1, y1], ...], at most {geometry.MAX_BOXES}: pixel boxes of `points_frame` to "
                    "map (`boxes_output_px` or `boxes_input_px`: corners, bounding box, status)"},
    {"name": "points_frame", "in": "query", "required": False,
     "schema": {"type": "string", "enum": list(geometry.POINT_FRAMES), "default": "input"},
     "description": "input (the upload, after EXIF orientation; the default) or output (the rectified image): "
                    "the frame `points` and `boxes` are given in"},
]
_RECTIFY_BODY = {"content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"},
                 "description": "images (JPEG, PNG, WebP, BMP; TIFF when STN_IMAGE_FORMATS lists it)"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
}}
FORMATS = ("json", *images.ENCODINGS)


@router.post("/rectify", summary="Rectify images", response_model=None,
             openapi_extra={"parameters": _RECTIFY_PARAMETERS, "requestBody": _RECTIFY_BODY})
async def rectify(request: Request, state: StateDep) -> Response:
    """Images in (multipart ``file`` parts or a raw ``image/*`` body), rectified images and transforms out.

    The query parameters are read from ``request.query_params`` rather than declared as
    FastAPI parameters: their per-request validation cost about 0.2 ms, some 4% of an image's
    whole cost on one CPU core (``stn bench serve``). They are documented in the OpenAPI schema.
    """
    query = request.query_params
    model, size, format = query.get("model"), query.get("size"), query.get("format") or "json"
    content_encoding(request)  # images are compressed already: 415 for gzip and the like
    if format not in FORMATS:
        raise Problem(400, f"format must be one of {', '.join(FORMATS)}; got {format!r}")
    quality = parse_quality(query.get("quality"), format)
    runtime = state.get_model(model)
    output_size = parse_size(size, state.settings.max_output_pixels)
    try:
        points = geometry.parse_query(query.get("points"), query.get("boxes"), query.get("points_frame"))
    except ValueError as e:
        raise Problem(400, str(e)) from None
    out = output_size or runtime.info.output_size

    def what(n: int) -> str:
        return f"{n} image(s) at size {out[1]}x{out[0]}"

    # admission before the body is read: a full queue, memory budget or upload count answers 503 at once
    async with state.admission.admit(runtime.name, body_bytes=body_cap(request, state)) as ticket:
        sizes: dict[int, tuple[int, int]] = {}  # upload index -> declared (width, height), its cost reserved

        def header(index: int, name: str, start: bytes) -> bool:
            """An image's header is in: reserve its cost now (503/413 before the rest of the body is read)."""
            try:
                size = upload_size(start, name, state.limits)
            except Problem as e:
                if e.status == 400:  # perhaps only the header's end is missing: decided once the body is in
                    return False
                raise
            if size is None:
                return False
            ticket.grow(1, size_cost(runtime, size, out, start), what(len(sizes) + 1), preparing=False)
            sizes[index] = size
            return True

        async with ticket.reading():
            uploads = await read_uploads(request, state, header)
        if format != "json" and len(uploads) != 1:
            raise Problem(400, f"format={format} returns one image; send one file, or use format=json for "
                               f"{len(uploads)}")
        rest = {i: upload_size(data, f, state.limits) for i, (f, data) in enumerate(uploads) if i not in sizes}
        for i, size in rest.items():
            if size is None:  # a layout the bounded reader does not know: Pillow's reader, off the event loop
                rest[i] = await state.workers.run(pillow_size, uploads[i][1], uploads[i][0], state.limits)
        if rest:
            cost = sum(size_cost(runtime, size, out, uploads[i][1]) for i, size in rest.items())
            ticket.grow(len(rest), cost, what(len(uploads)), preparing=False)
            sizes.update(rest)
        try:
            async with ticket.watch(request), asyncio.timeout(state.settings.request_timeout_s):
                results = await rectify_uploads(state, runtime, uploads, output_size, format, ticket, points,
                                                [sizes[i] for i in range(len(uploads))], quality)
        except (TimeoutError, QueueTimeoutError):
            raise Problem(503, f"no result within {state.settings.request_timeout_s:g}s (STN_REQUEST_TIMEOUT_S); "
                               "the server is overloaded, retry later", {"Retry-After": "1"}) from None
    if format == "json":
        payload = {"model": runtime.name, "model_version": runtime.info.version, "results": results}
        return BudgetedResponse(JSONResponse(payload).body, state.admission, media_type="application/json")
    encoded, headers = results[0]
    return BudgetedResponse(encoded, state.admission, media_type=images.media_type(format), headers=headers)


@router.get("/models", summary="Served models: metadata, providers, batching settings")
async def list_models(state: StateDep) -> dict:
    s = state.settings
    batching = {"max_batch_size": s.max_batch_size, "max_queue_delay_ms": s.max_queue_delay_ms,
                "max_queue_size": s.max_queue_size, "request_timeout_s": s.request_timeout_s}
    models = []
    for name in sorted(state.models):
        d = state.models[name].describe()
        d.update(ready=True, default=(name == state.default_model), batching=batching,
                 queue_depth=state.inflight.get(name, 0))
        if name in state.repository.errors:  # a newer file failed to load; this version keeps serving
            d["load_error"] = state.repository.errors[name]
        models.append(d)
    failed = [{"name": k, "ready": False, "reason": v} for k, v in sorted(state.loaded.failures.items())]
    return {"ready": state.ready, "default": state.default_model, "models": models, "failed": failed,
            "limits": {"max_upload_bytes": s.max_upload_bytes, "max_image_pixels": s.max_image_pixels,
                       "max_files": s.max_files, "max_output_pixels": s.max_output_pixels}}
