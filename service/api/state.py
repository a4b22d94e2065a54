"""What the app holds while it runs (models, batchers, thread pool, metrics) and the request dependencies."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Annotated

import numpy as np
from fastapi import Depends, Request

from service import images
from service.api.admission import Admission
from service.api.batcher import DynamicBatcher
from service.api.errors import Problem
from service.api.metrics import Metrics
from service.api.workers import CoalescingExecutor, tune_malloc
from service.runtime import LoadedModels, ModelRuntime, SessionConfig, choose_default, load_model_dir
from service.settings import Settings

log = logging.getLogger(__name__)


class ServiceState:
    """Everything heavy, created in the app's lifespan; routes get it through :data:`StateDep`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.limits = images.Limits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels,
                                    formats=tuple(settings.image_formats))
        self.loaded = LoadedModels()
        self.batchers: dict[str, DynamicBatcher] = {}
        self.admission = Admission(settings, self.metrics)  # budgets: images, memory, uploads (service.api.admission)
        self.workers: CoalescingExecutor | None = None  # decode, resize, sample, encode
        self.loading = True
        self.started = time.time()

    @property
    def inflight(self) -> dict[str, int]:
        """Images admitted and not finished, per model."""
        return self.admission.inflight

    @property
    def preparing(self) -> dict[str, int]:
        """Of those, images not yet handed to the batcher."""
        return self.admission.preparing

    @property
    def models(self) -> dict[str, ModelRuntime]:
        return self.loaded.models

    @property
    def ready(self) -> bool:
        """Loaded and warmed up: at least one model, and with STN_STRICT_READINESS no failures."""
        if self.loading or not self.models or self.admission.draining:
            return False
        return not (self.settings.strict_readiness and self.loaded.failures)

    @property
    def default_model(self) -> str | None:
        """STN_DEFAULT_MODEL, else the model the folder's DEFAULT file names, else the first by name."""
        return choose_default(self.models, self.settings.model_dir, self.settings.default_model)

    async def start(self) -> None:
        """Load every model in a thread (the loop keeps answering /healthz), then start their batchers."""
        s = self.settings
        tune_malloc(s.malloc_keep_mb * 1024 * 1024)
        self.workers = CoalescingExecutor(s.worker_threads)
        config = SessionConfig(providers=tuple(s.providers), intra_op_threads=s.intra_op_threads,
                               inter_op_threads=s.inter_op_threads, native_sampler=s.native_sampler)
        try:
            self.loaded = await asyncio.to_thread(load_model_dir, s.model_dir, config,
                                                  s.max_batch_size if s.warmup else None)
            for name, model in self.models.items():
                self.batchers[name] = self._make_batcher(model)
                self.batchers[name].start()
                self.inflight[name] = 0
                self.preparing[name] = 0
                self.metrics.queue_depth.labels(name).set(0)
        except Exception as e:  # noqa: BLE001 (report, never crash the process)
            log.exception("loading models failed")
            self.loaded.failures[str(s.model_dir)] = f"loading failed: {type(e).__name__}: {e}"
        finally:
            self.loading = False
        self.metrics.ready.set(1 if self.ready else 0)
        if self.ready:
            log.info("ready: %d model(s) (%s); default %s", len(self.models), ", ".join(sorted(self.models)),
                     self.default_model)
        else:
            log.error("not ready: %s", "; ".join(f"{k}: {v}" for k, v in self.loaded.failures.items()) or "no models")

    async def stop(self) -> None:
        for b in self.batchers.values():
            await b.stop()
        if self.workers is not None:
            self.workers.shutdown()

    def _make_batcher(self, model: ModelRuntime) -> DynamicBatcher:
        s, name = self.settings, model.name

        def run_batch(locs: list[np.ndarray]) -> list[np.ndarray]:
            return list(model.localise(np.stack(locs)))

        def on_batch(size: int, queue_seconds: list[float], compute: float) -> None:
            self.metrics.observe_batch(name, size, queue_seconds, compute)

        return DynamicBatcher(run_batch, max_batch_size=s.max_batch_size, max_queue_delay_s=s.max_queue_delay_ms / 1e3,
                              max_queue_size=s.max_queue_size, name=f"localise-{name}", on_batch=on_batch,
                              expected=lambda: self.preparing.get(name, 0))

    def get_model(self, name: str | None, **extra: object) -> ModelRuntime:
        """The named (or default) model; Problem 404 if unknown, 503 if not loaded (yet)."""
        if self.loading:
            raise Problem(503, "models are still loading; retry shortly (see /readyz)", {"Retry-After": "1"}, **extra)
        key = name or self.default_model
        if key in self.models:
            return self.models[key]
        if key in self.loaded.failures:
            raise Problem(503, f"model {key!r} failed to load: {self.loaded.failures[key]}", **extra)
        known = ", ".join(sorted(self.models)) or "none"
        if key is None:
            raise Problem(503, f"no model is loaded (STN_MODEL_DIR={self.settings.model_dir})", **extra)
        raise Problem(404, f"unknown model {key!r}; served models: {known}", **extra)


async def get_state(request: Request) -> ServiceState:
    return request.app.state.stn


StateDep = Annotated[ServiceState, Depends(get_state)]  # async: FastAPI runs sync dependencies in a thread pool, a hop per request


async def require_api_key(request: Request, state: StateDep) -> None:
    """With STN_API_KEYS set, an ``X-API-Key`` header or ``Authorization: Bearer <key>`` must match one."""
    keys = state.settings.api_keys
    if not keys:
        return
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if given is None:
        raise Problem(401, "this server needs an API key: send it as `X-API-Key: <key>` or "
                           "`Authorization: Bearer <key>`", {"WWW-Authenticate": "Bearer"})
    if not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
        raise Problem(401, "the API key is not valid", {"WWW-Authenticate": "Bearer"})


AuthDep = Depends(require_api_key)
