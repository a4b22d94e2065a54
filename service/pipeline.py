"""The per-image pipeline, as plain functions (no HTTP, no asyncio): reused by the app and by batch engines.

::

    bytes --prepare--> Prepared (raw image at full resolution, in its own colour + normalized small copy
                                 in the model's channels)
    [Prepared.loc, ...] --ModelRuntime.localise (batched)--> theta per image
    Prepared + theta --rectify--> Rectified (sampled at full resolution, any output size)
    Rectified --encode (finish), describe / result_json--> what the API and batch jobs return

Public API:

- :func:`prepare` (bytes -> :class:`Prepared`; raises ``images.BadImageError`` /
  ``images.ImageTooLargeError``) and :func:`prepare_array` (an already decoded [C, H, W] array).
- :func:`localise` (a list of Prepared -> theta per image, one batched localiser call).
- :func:`rectify` (Prepared + theta + output size -> :class:`Rectified`).
- :func:`finish` (the back half of one image's walk: :func:`rectify`, then encode into ``Rectified.encoded``);
  the v1 route, both batch engines and the benches call it.
- :func:`geometry` (theta -> pixel matrices, or TPS control points, in the uploaded image's frame, coverage,
  points and boxes mapped: ``service.geometry``).
- :func:`describe` (Rectified -> the transform and sizes, in the uploaded image's frame) and
  :func:`result_json` (the ``results[i]`` object of ``POST /v1/rectify``: :func:`describe` plus the image).
- :func:`rectify_images` (the whole thing for a list of uploads, sequentially: the bare pipeline).

Normalization: see ``service.runtime``: the localiser gets the normalized small copy, the
sampler the raw [0, 1] image (zeros padding is black, as OpenCV's default border).

Colour: the sampler reads the upload in its own colour (``service.images``: gray stays gray,
RGB stays RGB, RGBA is composited on white, 16-bit keeps its precision until encoding),
whatever the model's channels; the transform is the same for every channel. The localiser
gets the model's channels: the small copy is resized in the upload's colour and then
converted (``images.to_channels``: gray replicated for an RGB localiser, luma for a gray one).
All matrix math comes from ``models.frames`` (conventions in its module docstring) through ``service.geometry``.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np

from service import geometry as geo
from service import images
from service.runtime import DeviceImage, ModelRuntime


@dataclass
class Prepared:
    """One decoded upload: the raw image (for the sampler) and the localiser's input."""

    filename: str
    image: DeviceImage  # [1, C, H, W] float32 in [0, 1], full resolution, the upload's own colour (C = 1 or 3)
    loc: np.ndarray  # [in_channels, lh, lw] float32, the model's channels, normalized with its mean/std
    bits: int = 8  # the upload's precision (8 or 16); a 16-bit upload gives a 16-bit PNG

    @property
    def input_size(self) -> tuple[int, int]:
        return self.image.size


@dataclass
class Rectified:
    """One result: the transform and the rectified image (float32 [C, h, w] in [0, 1])."""

    filename: str
    input_size: tuple[int, int]  # (H, W) of the image as uploaded (after EXIF orientation)
    output_size: tuple[int, int]  # (h, w) of the rectified image
    theta: np.ndarray  # as the model exports it: [2,3], [3,3] or [K,2]
    image: np.ndarray  # [C, h, w]: the upload's colour (C = 1 or 3)
    bits: int = 8  # the upload's precision: images.encode(image, "png", bits=bits) keeps it
    encoded: bytes = b""  # the image encoded by finish() (empty until then)
    format: str = ""  # the format of ``encoded`` (png, jpeg, webp)


def prepare_array(model: ModelRuntime, array: np.ndarray, filename: str = "image", bits: int = 8) -> Prepared:
    """A decoded [C, H, W] float32 image in [0, 1], any colour -> Prepared (exported resize, the
    model's channels, then normalize)."""
    image = model.upload(array)
    loc = model.normalize(images.to_channels(model.resize(image), model.info.in_channels))[0]
    return Prepared(filename, image, loc, bits)


def prepare(model: ModelRuntime, data: bytes, limits: images.Limits, filename: str = "image",
            declared: tuple[int, int] | None = None) -> Prepared:
    """Check limits, decode in the upload's own colour, resize, convert and normalize (the CPU-heavy front half).
    ``declared``: see :func:`service.images.decode`."""
    decoded = images.decode(data, limits, filename, declared)
    return prepare_array(model, decoded.array, filename, decoded.bits)


def localise(model: ModelRuntime, items: Sequence[Prepared]) -> list[np.ndarray]:
    """theta for each item, from one batched localiser call."""
    if not items:
        return []
    return list(model.localise(np.stack([p.loc for p in items])))


def rectify(model: ModelRuntime, item: Prepared, theta: np.ndarray,
            output_size: tuple[int, int] | None = None) -> Rectified:
    """Sample the full-resolution image with ``theta`` into ``output_size`` (default: the model's)."""
    size = tuple(output_size or model.info.output_size)
    out = model.sample(item.image, theta[None], size)[0]
    return Rectified(item.filename, item.input_size, (int(size[0]), int(size[1])), np.asarray(theta), out, item.bits)


def _no_timer(stage: str) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


def finish(model: ModelRuntime, item: Prepared, theta: np.ndarray, output_size: tuple[int, int] | None = None,
           fmt: str = "png", quality: int = images.DEFAULT_QUALITY,
           timer: Callable[[str], AbstractContextManager[None]] = _no_timer) -> Rectified:
    """The back half of one image's walk: sample at full resolution (:func:`rectify`, stage ``sample``), then
    encode in ``fmt`` (``images.encode``, the upload's precision for PNG; stage ``encode``) into
    ``Rectified.encoded``. :func:`describe` / :func:`result_json` say what it is."""
    with timer("sample"):
        result = rectify(model, item, theta, output_size)
    with timer("encode"):
        result.encoded = images.encode(result.image, fmt, quality, result.bits)
    result.format = fmt
    return result


def geometry(transform: str, theta: np.ndarray, input_size: tuple[int, int], output_size: tuple[int, int],
             tps_grid: tuple[int, int] = (4, 4), query: geo.Query | None = None) -> dict[str, Any]:
    """Pixel matrices (affine-like, projective) or control points (TPS), in the uploaded image's frame, the
    ``coverage``, and the ``query``'s points and boxes mapped: ``service.geometry.describe``."""
    return geo.describe(transform, theta, input_size, output_size, tps_grid, query)


def describe(model: ModelRuntime, result: Rectified, query: geo.Query | None = None) -> dict[str, Any]:
    """The ``results[i]`` object of ``POST /v1/rectify`` without the image: filename, sizes, theta, geometry
    (``query``: points and boxes to map, ``service.geometry``)."""
    h, w = result.output_size
    out: dict[str, Any] = {
        "filename": result.filename,
        "width": w,
        "height": h,
        "input_width": result.input_size[1],
        "input_height": result.input_size[0],
        "theta": np.asarray(result.theta, np.float64).tolist(),
    }
    out.update(geometry(model.info.transform, result.theta, result.input_size, result.output_size,
                        model.info.tps_grid, query))
    return out


def result_json(model: ModelRuntime, result: Rectified, encoded_png: bytes | None = None,
                query: geo.Query | None = None) -> dict[str, Any]:
    """The ``results[i]`` object of ``POST /v1/rectify`` (``image``: base64 PNG, 16-bit for a 16-bit upload):
    :func:`describe` plus the image (``encoded_png``, else the PNG that :func:`finish` made, else encoded here)."""
    out = describe(model, result, query)
    if encoded_png is None:
        encoded_png = result.encoded if result.format == "png" else images.encode(result.image, "png",
                                                                                   bits=result.bits)
    out["image"] = base64.b64encode(encoded_png).decode("ascii")
    return out


def rectify_images(model: ModelRuntime, uploads: Iterable[tuple[str, bytes]], limits: images.Limits,
                   output_size: tuple[int, int] | None = None, batch_size: int = 32,
                   fmt: str = "png") -> list[Rectified]:
    """The bare pipeline, sequentially: decode, batched localisation, then :func:`finish` (full-resolution
    sampling, encoding in ``fmt``)."""
    results: list[Rectified] = []
    pending: list[Prepared] = []

    def flush() -> None:
        for item, theta in zip(pending, localise(model, pending), strict=True):
            results.append(finish(model, item, theta, output_size, fmt))
        pending.clear()

    for filename, data in uploads:
        pending.append(prepare(model, data, limits, filename))
        if len(pending) >= batch_size:
            flush()
    flush()
    return results
