"""Per-model inference statistics in the shape of Triton's statistics extension (``GET /v2/models/stats``).

What is counted (since the server started; a model unloaded and loaded again keeps its counts):

- ``inference_stats.success`` / ``fail``: inference requests (``/v1/rectify`` and ``/v2/.../infer``)
  that were admitted and then answered 200 / anything else, with their whole duration in ns
  (from admission to the response, body read included). Requests shed before admission (503)
  are not counted, as Triton counts only requests its scheduler took.
- ``inference_count``: images of the successful requests (Triton counts batch elements);
  ``execution_count``: localisation batches run; ``last_inference``: ms since the epoch.
- ``inference_stats.queue``: time each image waited for its localisation batch;
  ``compute_infer``: the batch's localiser run; ``batch_stats``: the same per batch size.

The other durations Triton reports (``compute_input``, ``compute_output``, cache) are 0: decoding,
resizing and sampling run on the worker pool per image and are in the Prometheus metrics
(``stn_compute_time_seconds``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

_ZERO = ("compute_input", "compute_output", "cache_hit", "cache_miss")


def _duration() -> dict[str, int]:
    return {"count": 0, "ns": 0}


class ModelStats:
    """The counters of one model (see module docstring)."""

    def __init__(self) -> None:
        self.success = _duration()
        self.fail = _duration()
        self.queue = _duration()
        self.compute_infer = _duration()
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference = 0
        self.batches: dict[int, dict[str, int]] = {}  # batch size -> compute_infer duration

    def as_triton(self, name: str, version: str) -> dict[str, Any]:
        stats = {"success": dict(self.success), "fail": dict(self.fail), "queue": dict(self.queue),
                 "compute_infer": dict(self.compute_infer), **{k: _duration() for k in _ZERO}}
        return {
            "name": name, "version": version, "last_inference": self.last_inference,
            "inference_count": self.inference_count, "execution_count": self.execution_count,
            "inference_stats": stats,
            "batch_stats": [{"batch_size": n, "compute_input": _duration(), "compute_infer": dict(d),
                             "compute_output": _duration()} for n, d in sorted(self.batches.items())],
        }


class InferenceStats:
    """Statistics of every model seen, by served name; thread-safe (batches end on a batcher thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, ModelStats] = {}

    def _get(self, model: str) -> ModelStats:
        if model not in self._models:
            self._models[model] = ModelStats()
        return self._models[model]

    def request(self, model: str, images: int, seconds: float, ok: bool) -> None:
        """One admitted inference request ended: 200 (``ok``) or not, after ``seconds``."""
        ns = int(seconds * 1e9)
        with self._lock:
            m = self._get(model)
            d = m.success if ok else m.fail
            d["count"] += 1
            d["ns"] += ns
            if ok:
                m.inference_count += images
                m.last_inference = int(time.time() * 1000)

    def batch(self, model: str, size: int, queue_seconds: Sequence[float], compute_seconds: float) -> None:
        """One localisation batch ran (the dynamic batcher's observer)."""
        ns = int(compute_seconds * 1e9)
        with self._lock:
            m = self._get(model)
            m.execution_count += 1
            m.queue["count"] += len(queue_seconds)
            m.queue["ns"] += int(sum(queue_seconds) * 1e9)
            m.compute_infer["count"] += 1
            m.compute_infer["ns"] += ns
            b = m.batches.setdefault(size, _duration())
            b["count"] += 1
            b["ns"] += ns

    def model(self, name: str, version: str) -> dict[str, Any]:
        """The Triton ``$model_stat`` object of one model (zeros when it never ran)."""
        with self._lock:
            m = self._models.get(name) or ModelStats()
            return m.as_triton(name, version)
