"""What the app holds while it runs (models, batchers, thread pool, metrics) and the request dependencies."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, Request

from service.api.admission import Admission, WorkWindow
from service.api.batcher import DynamicBatcher
from service.api.errors import Problem
from service.api.metrics import Metrics
from service.api.repository import ModelRepository, signature
from service.api.stats import InferenceStats
from service.api.workers import CoalescingExecutor, tune_malloc
from service.runtime import LoadedModels, ModelRuntime, choose_default, load_model_dir
from service.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MODEL_TTL_S = 1.0  # how long ServiceState.default_model keeps its answer while the models stay the same


class ServiceState:
    """Everything heavy, created in the app's lifespan; routes get it through :data:`StateDep`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.limits = settings.limits
        self.loaded = LoadedModels()
        self.batchers: dict[str, DynamicBatcher] = {}  # one per served name, across its versions (see localise)
        self.admission = Admission(settings, self.metrics)  # budgets: images, memory, uploads (service.api.admission)
        self.window = WorkWindow(settings.work_window or settings.max_batch_size)  # images decoded at once (/v1)
        self.stats = InferenceStats()  # Triton's statistics extension (GET /v2/models/stats)
        self.admission.on_finish = self.stats.request
        self.repository = ModelRepository(self)  # load/unload while serving; STN_MODEL_POLL_S
        self.session_config = settings.session_config()
        self._tasks: set[asyncio.Task] = set()  # the folder's poller, batchers being retired
        self.workers: CoalescingExecutor | None = None  # decode, resize, sample, encode
        self.loading = True
        self.started = time.time()
        self._default: tuple[tuple[str, ...], float, str | None] | None = None  # (models, until, name)

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
        """STN_DEFAULT_MODEL, else the model the folder's DEFAULT file names, else the first by name.

        Asked by every request that names no model (the front door's 503s included), so the answer is
        kept until the served models change or a second has passed: an edited DEFAULT file takes effect
        within a second, without a read of it on the event loop per request.
        """
        key, now = tuple(self.models), time.monotonic()
        kept = self._default
        if kept is not None and kept[0] == key and now < kept[1]:
            return kept[2]
        name = choose_default(self.models, self.settings.model_dir, self.settings.default_model)
        self._default = (key, now + DEFAULT_MODEL_TTL_S, name)
        return name

    async def start(self) -> None:
        """Load every model in a thread (the loop keeps answering /healthz), then start their batchers."""
        s = self.settings
        tune_malloc(s.malloc_keep_mb * 1024 * 1024)
        self.workers = CoalescingExecutor(s.worker_threads)
        config = s.session_config()
        self.session_config = config
        try:
            files = {name: signature(path) for name, path in self.repository.files().items()}
            self.loaded = await asyncio.to_thread(load_model_dir, s.model_dir, config,
                                                  s.max_batch_size if s.warmup else None)
            self.repository.remember(files)
            for model in self.models.values():
                self.install(model)
        except Exception as e:  # noqa: BLE001 (report, never crash the process)
            log.exception("loading models failed")
            self.loaded.failures[str(s.model_dir)] = f"loading failed: {type(e).__name__}: {e}"
        finally:
            self.loading = False
        if s.model_poll_s > 0:
            self._spawn(self.repository.poll_forever(s.model_poll_s), "stn-model-poll")
        self.metrics.ready.set(1 if self.ready else 0)
        if self.ready:
            log.info("ready: %d model(s) (%s); default %s", len(self.models), ", ".join(sorted(self.models)),
                     self.default_model)
        else:
            log.error("not ready: %s", "; ".join(f"{k}: {v}" for k, v in self.loaded.failures.items()) or "no models")

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for b in self.batchers.values():
            await b.stop()
        if self.workers is not None:
            self.workers.shutdown()

    # ---- models appearing and disappearing (service.api.repository) ------------------------------------
    def install(self, model: ModelRuntime) -> None:
        """Serve ``model`` under its name from now on (a new model, or a new version replacing the old one).

        Requests holding the previous version finish on it (:meth:`localise`); its sessions are freed
        with the last of them.
        """
        name = model.name
        self.loaded.models[name] = model
        self.inflight.setdefault(name, 0)
        self.preparing.setdefault(name, 0)
        self._batcher(name)
        self.metrics.queue_depth.labels(name).set(self.inflight[name])
        self.metrics.ready.set(1 if self.ready else 0)

    def uninstall(self, name: str) -> ModelRuntime | None:
        """Stop serving ``name``: new requests get 404; its batcher stops once its requests in flight are done."""
        model = self.loaded.models.pop(name, None)
        if model is not None:
            self._spawn(self._retire(name), f"stn-retire-{name}")
        self.metrics.ready.set(1 if self.ready else 0)
        return model

    async def _retire(self, name: str) -> None:
        deadline = time.monotonic() + self.settings.grace_s
        while self.inflight.get(name, 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if name in self.models:  # loaded again meanwhile
            return
        batcher = self.batchers.pop(name, None)
        if batcher is not None:
            await batcher.stop()
        if not self.inflight.get(name, 0):
            self.inflight.pop(name, None)
            self.preparing.pop(name, None)
            try:
                self.metrics.queue_depth.remove(name)
            except KeyError:
                pass

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _batcher(self, name: str) -> DynamicBatcher:
        batcher = self.batchers.get(name)
        if batcher is None:
            batcher = self.batchers[name] = self._make_batcher(name)
            batcher.start()
        return batcher

    async def localise(self, model: ModelRuntime, locs: list[np.ndarray]) -> list[np.ndarray]:
        """theta for each normalized localiser input, from ``model`` itself (the version the request holds),
        through the dynamic batcher of its name."""
        return await self._batcher(model.name).submit_many([(model, loc) for loc in locs])

    def _make_batcher(self, name: str) -> DynamicBatcher:
        s = self.settings

        def run_batch(items: list[tuple[ModelRuntime, np.ndarray]]) -> list[np.ndarray]:
            out: list[Any] = [None] * len(items)
            groups: dict[int, list[int]] = {}  # by runtime: one group, two while a new version takes over
            for i, (model, _) in enumerate(items):
                groups.setdefault(id(model), []).append(i)
            for idx in groups.values():
                model = items[idx[0]][0]
                for i, theta in zip(idx, model.localise(np.stack([items[i][1] for i in idx])), strict=True):
                    out[i] = theta
            return out

        def on_batch(size: int, queue_seconds: list[float], compute: float) -> None:
            self.metrics.observe_batch(name, size, queue_seconds, compute)
            self.stats.batch(name, size, queue_seconds, compute)

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
