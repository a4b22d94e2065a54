"""The model repository while the server runs: load, reload and unload models without downtime.

Triton's model repository extension (``POST /v2/repository/index``, ``.../models/{name}/load``,
``.../unload``, which tritonclient's ``get_model_repository_index``, ``load_model`` and
``unload_model`` call) and, with ``STN_MODEL_POLL_S`` > 0, polling of the model folder.

The served name of a model is its file stem in ``STN_MODEL_DIR`` (as at startup). Rules:

- **Loaded and warmed before it takes traffic**: a (re)load runs :func:`service.runtime.load_and_warm`
  on a thread (onnx parse, metadata and contract checks, sessions, one warm-up run); only then is
  the new :class:`ModelRuntime` swapped in (:meth:`ServiceState.install`, on the event loop).
- **In-flight requests finish on their version**: a request holds the ModelRuntime it got at
  admission, and its images are localised by that runtime (:meth:`ServiceState.localise`), so a
  swap never mixes versions inside one request; the old runtime is freed with its last request.
- **A failed load leaves the old version serving**: the reason is kept and shown in the index
  (``reason``), in ``/v1/models`` (``load_error``) and in the load response (400 with ``error``).
- **Half-copied files are never loaded**: the poller acts on a file only once its (size, mtime)
  is unchanged across two polls, and every load must parse, pass the checks, create its sessions
  and run its warm-up; a file whose (size, mtime) changes while it loads is rejected. A file that
  stays truncated therefore fails its load (reported) and the old version keeps serving; the next
  complete write of it is loaded.
- The poller loads new and changed files, and unloads a model whose file was removed. A model
  unloaded by request is not reloaded by the poller until its file changes (and a load request
  always reads the file anew).
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.api.errors import Problem
from service.runtime import ModelLoadError, ModelRuntime, load_and_warm, model_files

if TYPE_CHECKING:
    from service.api.state import ServiceState

log = logging.getLogger(__name__)

Signature = tuple[int, int]  # (size in bytes, mtime in ns) of a model file
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # a served name: a file stem, no path


def signature(path: Path) -> Signature | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class ModelRepository:
    """Loads, reloads and unloads the models of one :class:`ServiceState` (see module docstring)."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self.settled: dict[str, Signature | None] = {}  # the version of each file last acted on
        self.seen: dict[str, Signature | None] = {}  # the poller's previous observation of each file
        self.errors: dict[str, str] = {}  # the last failed (re)load of a model that still serves its previous version
        self.unloaded: set[str] = set()  # unloaded by request
        self.loading: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._loads: dict[str, tuple[Signature | None, asyncio.Task]] = {}  # loads waiting or running, by name
        self._missing = False  # the folder was missing at the last poll (warned once)

    # ---- files ------------------------------------------------------------------------------------------
    @property
    def folder(self) -> Path:
        return Path(self.state.settings.model_dir)

    def files(self) -> dict[str, Path]:
        """Served name -> file, for every model file of the folder."""
        return {p.stem: p for p in model_files(self.folder)}

    def path(self, name: str) -> Path:
        """The file of ``name``; Problem 400 for a name that cannot be a file stem."""
        if not NAME.match(name):
            raise Problem(400, f"{name!r} is not a model name (letters, digits, '.', '_', '-'; the file stem "
                               "of a .onnx file in the model folder)")
        folder = self.folder
        return folder if folder.is_file() and folder.stem == name else folder / f"{name}.onnx"

    def remember(self, loaded: dict[str, Signature | None]) -> None:
        """The files loaded (or failed) at startup, with the signature taken before they were read."""
        self.settled.update(loaded)
        self.seen.update(loaded)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    # ---- load and unload ------------------------------------------------------------------------------
    async def load(self, name: str) -> ModelRuntime:
        """(Re)load ``name`` from its file; Problem 404 without a file, 400 with the reason when it fails.

        Requests for the same file while its load is waiting or running share that load and its outcome: each
        would otherwise reload it once more, one after another (a load warms the model: seconds of CPU)."""
        path = self.path(name)
        sig = signature(path)
        pending = self._loads.get(name)
        if pending is None or pending[0] != sig:
            task = asyncio.ensure_future(self._load_file(name, path))
            task.add_done_callback(lambda t: self._load_done(name, t))
            pending = self._loads[name] = (sig, task)
        return await asyncio.shield(pending[1])  # a client that leaves does not cancel the others' load

    def _load_done(self, name: str, task: asyncio.Task) -> None:
        """A finished load is no longer shared (nor its runtime kept alive here), and its outcome is retrieved
        even if no client waits for it."""
        if self._loads.get(name, (None, None))[1] is task:
            del self._loads[name]
        if not task.cancelled():
            task.exception()

    async def _load_file(self, name: str, path: Path) -> ModelRuntime:
        async with self._lock(name):
            if not path.is_file():
                raise Problem(404, f"no model file {path.name} in the model folder (STN_MODEL_DIR); "
                                   f"files: {', '.join(sorted(self.files())) or 'none'}")
            return await self._load(name, path)

    async def _load(self, name: str, path: Path) -> ModelRuntime:
        s, state = self.state.settings, self.state
        before = signature(path)
        self.loading.add(name)
        try:
            runtime = await asyncio.to_thread(load_and_warm, path, state.session_config,
                                              s.max_batch_size if s.warmup else None)
            if signature(path) != before:
                raise ModelLoadError(f"{path.name} changed while it was being loaded (still being copied?); "
                                     "it is loaded once it stays unchanged")
        except ModelLoadError as e:
            reason = str(e)
            self.settled[name] = before
            serving = state.models.get(name)
            if serving is not None:
                self.errors[name] = reason
                log.error("model %s: the new file failed to load; version %s keeps serving: %s",
                          name, serving.info.version, reason)
            else:
                state.loaded.failures[name] = reason
                log.error("model %s not loaded: %s", name, reason)
            raise Problem(400, f"failed to load {name!r}: {reason}") from None
        finally:
            self.loading.discard(name)
        old = state.models.get(name)
        state.install(runtime)
        state.loaded.failures.pop(name, None)
        state.loaded.failures.pop(str(s.model_dir), None)  # "no .onnx model in ..." no longer holds
        self.settled[name] = before
        self.errors.pop(name, None)
        self.unloaded.discard(name)
        log.info("model %s %s: version %s (%s, %s) in %.2fs", name, "reloaded" if old else "loaded",
                 runtime.info.version, runtime.info.transform, path.name, runtime.load_seconds)
        return runtime

    async def unload(self, name: str) -> None:
        """Stop serving ``name`` (requests in flight finish); Problem 404 when no such model is known."""
        path = self.path(name)
        async with self._lock(name):
            known = name in self.state.models or name in self.state.loaded.failures or path.is_file()
            if not known:
                raise Problem(404, f"unknown model {name!r}; served models: "
                                   f"{', '.join(sorted(self.state.models)) or 'none'}")
            self.settled[name] = signature(path)
            self.errors.pop(name, None)
            self.state.loaded.failures.pop(name, None)
            self.unloaded.add(name)
            if self.state.uninstall(name) is not None:
                log.info("model %s unloaded", name)

    # ---- the index ---------------------------------------------------------------------------------
    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """Triton's ``$repository_index_response``: every model of the folder or loaded, with its state."""
        state = self.state
        names = set(self.files()) | set(state.models) | {k for k in state.loaded.failures if NAME.match(k)}
        out = []
        for name in sorted(names):
            runtime = state.models.get(name)
            if runtime is not None:
                entry = {"name": name, "version": runtime.info.version, "state": "READY",
                         "reason": (f"still serving version {runtime.info.version}: the last load failed: "
                                    f"{self.errors[name]}") if name in self.errors else ""}
            elif name in self.loading:
                entry = {"name": name, "state": "LOADING", "reason": ""}
            elif name in state.loaded.failures:
                entry = {"name": name, "state": "UNAVAILABLE", "reason": state.loaded.failures[name]}
            else:
                entry = {"name": name, "state": "UNAVAILABLE",
                         "reason": "unloaded" if name in self.unloaded else "not loaded"}
            if not ready_only or entry["state"] == "READY":
                out.append(entry)
        return out

    # ---- polling ---------------------------------------------------------------------------------
    async def poll(self) -> None:
        """One look at the folder: load files that are new or changed and stable, unload removed ones."""
        files = await asyncio.to_thread(self._listing)
        if files is None:  # a missing folder (an unmounted volume) is not "every model removed"
            if not self._missing:
                log.warning("model folder %s is missing; models stay as they are until it is back", self.folder)
            self._missing = True
            return
        self._missing = False
        for name, (_, sig) in files.items():
            previous = self.seen.get(name)
            self.seen[name] = sig
            if sig is None or sig != previous or sig == self.settled.get(name) or self._lock(name).locked():
                continue  # gone, still changing, already acted on, or being loaded
            try:
                await self.load(name)
            except Problem as p:
                log.debug("poll: %s", p.detail)
        for name in set(self.seen) - set(files):
            del self.seen[name]
        for name in set(self.state.models) - set(files):
            if not self._lock(name).locked():
                log.info("model %s: its file was removed from %s", name, self.folder)
                await self.unload(name)
                self.unloaded.discard(name)
        for name in [k for k in self.state.loaded.failures if k not in files and NAME.match(k)]:
            self.state.loaded.failures.pop(name, None)  # a failed file that was removed: nothing to report

    def _listing(self) -> dict[str, tuple[Path, Signature | None]] | None:
        """Every model file with its signature; None when the folder is missing or moved while it was listed
        (an empty listing of a folder renamed mid-poll must not read as "every model removed")."""
        def identity() -> tuple[int, int] | None:
            try:
                st = self.folder.stat()
            except OSError:
                return None
            return st.st_dev, st.st_ino

        before = identity()
        files = {n: (p, signature(p)) for n, p in self.files().items()}
        if before is None or identity() != before:
            return None
        return files

    async def poll_forever(self, interval_s: float) -> None:
        while not self.state.admission.draining:  # no new versions while the server drains
            await asyncio.sleep(interval_s)
            try:
                await self.poll()
            except Exception:  # noqa: BLE001 (the poller must survive anything the folder does)
                log.exception("polling %s failed", self.folder)
