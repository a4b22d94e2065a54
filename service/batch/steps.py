"""The per-image work both engines share: load the model, decode, prepare, finish (sample, encode), the record.

Every step is ``service.pipeline``'s (the server's code path); this module only adds the batch job's words:
the results.jsonl record, the error line's reason, and the stage timer.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from service import images, pipeline
from service.batch.inputs import BatchError, Item, read_image
from service.runtime import ModelLoadError, ModelRuntime, load_model
from service.settings import Settings


class Timer:
    """Seconds spent per stage, summed over threads (CPU-seconds of the workers, not wall time)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def merge(self, seconds: dict[str, float]) -> None:
        for k, v in seconds.items():
            self.add(k, v)


def load_batch_model(path: str | os.PathLike, providers: Iterable[str] | None = None) -> ModelRuntime:
    """Load and warm up a model the way the server does (its session settings, ``providers`` overriding
    STN_PROVIDERS); BatchError with the reason when it cannot."""
    try:
        model = load_model(Path(path), Settings().session_config(providers))
    except ModelLoadError as e:
        raise BatchError(str(e)) from None
    model.warmup()
    return model


def reason(e: BaseException) -> str:
    """An exception as the error line of errors.jsonl (the server's wording for image errors)."""
    if isinstance(e, images.ImageError | BatchError):
        return str(e)
    if isinstance(e, OSError):
        return f"could not read: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
    return f"{type(e).__name__}: {e}"


def prepare_item(model: ModelRuntime, item: Item, limits: images.Limits,
                 timer: Timer) -> tuple[pipeline.Prepared | None, str | None]:
    """Read, decode and prepare one image: (Prepared, None), or (None, the reason it failed)."""
    try:
        with timer("read_decode"):
            decoded = read_image(item.path, limits, item.source)
        with timer("prepare"):
            return pipeline.prepare_array(model, decoded.array, item.source, decoded.bits), None
    except Exception as e:  # noqa: BLE001 (any unreadable file is an error line; the job goes on)
        return None, reason(e)


def result_record(model: ModelRuntime, result: pipeline.Rectified, item: Item) -> dict[str, Any]:
    """One line of results.jsonl: the ``POST /v1/rectify`` result object (``pipeline.describe``) without the
    filename, with the source and output paths and the model's name and version."""
    d = pipeline.describe(model, result)
    d.pop("filename", None)
    return {"source": item.source, "output": item.output, **d, "model": model.info.name,
            "model_version": model.info.version}


def finish_image(model: ModelRuntime, item: Item, prepared: pipeline.Prepared, theta: np.ndarray, fmt: str,
                 quality: int, size: tuple[int, int] | None,
                 timer: Timer | None = None) -> tuple[bytes, dict[str, Any]]:
    """Sample at full resolution and encode (``pipeline.finish``), and build the results.jsonl record."""
    result = pipeline.finish(model, prepared, theta, size, fmt, quality, timer or Timer())
    return result.encoded, result_record(model, result, item)
