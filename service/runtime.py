"""onnxruntime sessions for stn models: provider choice, loading, the three sub-models, warm-up.

Public API (used by the HTTP app and by batch engines; no HTTP, no asyncio, no torch):

- :func:`resolve_providers` (requested execution providers -> the usable ones, probing GPU
  providers once per process and warning once when one falls back to CPU);
  :func:`provider_status` (usable, or why not, naming the missing library: ``stn doctor``).
- :class:`SessionConfig` (providers and thread counts) and :func:`load_model` (one ``.onnx``
  file -> :class:`ModelRuntime`, or :class:`ModelLoadError` with a reason a person can act on).
- :func:`model_files` (the ``*.onnx`` files of a folder) and :func:`load_model_dir` (all of
  them -> :class:`LoadedModels`: ready models and failure reasons, by file stem);
  :func:`load_and_warm` (one file, loaded and warmed up: what the server's model repository reloads).
- :class:`ModelRuntime`: ``info`` (:class:`export.metadata.ModelInfo`), ``providers``,
  ``upload`` (array -> :class:`DeviceImage`), ``resize``, ``normalize``, ``localise``
  (batched), ``sample`` (any output size), ``base_grid``, ``warmup``, ``describe``.

Each model is split (``export.contract.split``) into ``resize``, ``localiser`` and ``sampler``
sessions, so localisation can be batched across images of different sizes while each image
is sampled at its own full resolution and at any output size. Every method is thread-safe
(onnxruntime's ``run`` is) and releases the GIL while onnxruntime computes.

Normalization: the contract's ``image`` input is normalized with the model's mean/std. The
service resizes the *raw* [0, 1] image with the exported ``resize`` sub-model and normalizes
the small copy afterwards (resize is linear, so this equals resizing the normalized image),
feeds that to the localiser, and feeds the *raw* image to the sampler: zeros padding is then
black, and OpenCV's ``warpAffine`` with its default ``borderValue=0`` reproduces the result.

Native sampler: when the ``native`` library is present (and ``SessionConfig.native_sampler`` is
not ``off``), every session registers it and the sampler sub-model is rebuilt on the ``ai.stn``
ops (``export.native_sampler.sampler_model``) whatever lowering the file was exported with; a
model exported with ``--grid-sample native`` always needs it. ``describe()["sampler"]`` says which.

On a GPU provider the full-resolution image is uploaded once (:meth:`ModelRuntime.upload`) and
bound with IO binding to both the resize and the sampler sessions.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

import native
from export import native_sampler
from export.contract import ContractError, split
from export.metadata import (
    BASE_GRID,
    INPUT_IMAGE,
    LOC_INPUT,
    OUTPUT_RECTIFIED,
    OUTPUT_THETA,
    MetadataError,
    ModelInfo,
)
from models import frames

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
GPU_DEVICES = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}

_probe_lock = threading.Lock()
_probed: dict[str, bool] = {}


class ModelLoadError(RuntimeError):
    """A model file that cannot be served; the message says why."""


def _probe_model() -> bytes:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=8).SerializeToString()


def _provider_works(provider: str) -> bool:
    with _probe_lock:
        if provider not in _probed:
            ort.set_default_logger_severity(4)  # the failed CUDA load logs errors; we log one warning instead
            try:  # onnxruntime print()s its "EP Error" banner: keep stdout clean (`stn doctor --json`)
                with contextlib.redirect_stdout(io.StringIO()):
                    sess = ort.InferenceSession(_probe_model(), providers=[provider, CPU])
                _probed[provider] = provider in sess.get_providers()
            except Exception:  # noqa: BLE001 (any failure means: not usable)
                _probed[provider] = False
            finally:
                ort.set_default_logger_severity(2)
            if not _probed[provider]:
                log.warning("%s is not usable here (no GPU, or its CUDA/cuDNN libraries are missing); "
                            "falling back to the next provider", provider)
        return _probed[provider]


_PROVIDER_LIBRARIES = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "tensorrt",
                       "MIGraphXExecutionProvider": "migraphx", "ROCMExecutionProvider": "rocm"}


def provider_status(provider: str) -> tuple[bool, str]:
    """(usable, why not): a provider is usable when a session runs on it (:func:`_provider_works`).

    When it is not, the reason names what is missing: the provider absent from this build, or
    the first shared library its plugin cannot load (e.g. ``libcublasLt.so.13``), or a plugin
    that loads but cannot create a session (no GPU visible, a driver too old).
    """
    available = ort.get_available_providers()
    if provider not in available:
        return False, f"not in this onnxruntime build (it has {', '.join(available)})"
    if provider == CPU or _provider_works(provider):
        return True, ""
    short = _PROVIDER_LIBRARIES.get(provider)
    if short:
        lib = Path(ort.__file__).parent / "capi" / f"libonnxruntime_providers_{short}.so"
        if not lib.is_file():
            return False, f"{lib} is missing from the onnxruntime install"
        try:
            ctypes.CDLL(str(lib))
        except OSError as e:
            return False, f"{lib.name} cannot load a library it needs: {e}"
    return False, ("its libraries load, but a session on it fails (no GPU visible to this process, or a driver "
                   "older than its CUDA runtime)")


def resolve_providers(requested: Sequence[str]) -> list[str]:
    """The requested execution providers that work here, in order; CPU is always last resort."""
    available = set(ort.get_available_providers())
    usable = []
    for p in requested:
        if p not in available:
            log.warning("execution provider %s is not in this onnxruntime build (has: %s); skipped",
                        p, ", ".join(sorted(available)))
            continue
        if p == CPU or _provider_works(p):
            usable.append(p)
    if CPU not in usable:
        usable.append(CPU)
    return usable


@dataclass(frozen=True)
class SessionConfig:
    """How sessions are created: providers (already resolved or not) and thread counts."""

    providers: tuple[str, ...] = ("CUDAExecutionProvider", CPU)
    intra_op_threads: int = 1  # 0: onnxruntime decides
    inter_op_threads: int = 1
    io_binding: bool | None = None  # None: on GPU providers only
    native_sampler: str = "auto"  # auto: the native sampler when its library is present; on: required; off: never

    def session_options(self) -> ort.SessionOptions:
        """Options of every session. ``load_model`` turns onnxruntime's CPU arena off for the sessions that see
        full-resolution images (resize, sampler): the arena keeps its high-water mark for the process's life,
        so one 4000x4000 rectification left 200 MB (affine) to 490 MB (TPS) held outside the memory budget.
        Without it those tensors are malloc'd and freed per run (0 to 3 % more CPU per image measured on the
        document rectifier, docs/BENCHMARKS.md); the localiser's small fixed-size tensors keep it."""
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = self.inter_op_threads
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-waiting between requests
        return so


class DeviceImage:
    """A full-resolution image [N, C, H, W] float32 in [0, 1], on the host and, on a GPU, on the device."""

    __slots__ = ("array", "ortvalue")

    def __init__(self, array: np.ndarray, ortvalue: ort.OrtValue | None = None) -> None:
        self.array = array
        self.ortvalue = ortvalue

    @property
    def size(self) -> tuple[int, int]:
        return int(self.array.shape[-2]), int(self.array.shape[-1])


GRID_CACHE_BYTES = 64 * 1024 * 1024  # per model: base grids kept for reuse, least recently used first out


def base_grid_bytes(transform: str, output_size: tuple[int, int], tps_grid: tuple[int, int] = (4, 4)) -> int:
    """float32 bytes of models.frames.base_grid for ``output_size`` (without computing it)."""
    h, w = output_size
    return 4 * h * w * frames.base_grid_depth(transform, tps_grid)  # [h, w, 3] or [h, w, K]


class ModelRuntime:
    """One loaded stn model: its metadata and its resize, localiser and sampler sessions."""

    def __init__(self, name: str, path: Path, info: ModelInfo, sessions: dict[str, ort.InferenceSession],
                 config: SessionConfig) -> None:
        self.name = name
        self.path = path
        self.info = info
        self._resize = sessions["resize"]
        self._localiser = sessions["localiser"]
        self._sampler = sessions["sampler"]
        self.providers: list[str] = self._sampler.get_providers()
        self.device = next((GPU_DEVICES[p] for p in self.providers if p in GPU_DEVICES), "cpu")
        self.io_binding = (self.device != "cpu") if config.io_binding is None else config.io_binding
        self._mean = np.asarray(info.mean, np.float32).reshape(-1, 1, 1)
        self._inv_std = (1.0 / np.asarray(info.std, np.float32)).reshape(-1, 1, 1)
        self._grids: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._grid_lock = threading.Lock()
        self.warmed_up = False
        self.load_seconds = 0.0
        self.sampler: dict[str, Any] = {"implementation": "exported", "op": info.grid_sample, "library": None}

    # ---- pieces -------------------------------------------------------------------------
    def upload(self, image: np.ndarray) -> DeviceImage:
        """Wrap [C, H, W] or [N, C, H, W] float32 in [0, 1], any C; on a GPU, copy it to the device once."""
        a = image[None] if image.ndim == 3 else image
        self._check_image(a)
        a = np.ascontiguousarray(a, dtype=np.float32)
        value = ort.OrtValue.ortvalue_from_numpy(a, self.device, 0) if self.io_binding else None
        return DeviceImage(a, value)

    def resize(self, image: DeviceImage) -> np.ndarray:
        """The exported resize sub-model: [N, C, H, W] -> [N, C, lh, lw], any C (no normalization)."""
        return self._run(self._resize, {INPUT_IMAGE: image}, LOC_INPUT)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """(x - mean) / std per channel, for [C, h, w] or [N, C, h, w]."""
        return ((x - self._mean) * self._inv_std).astype(np.float32, copy=False)

    def localise(self, loc_batch: np.ndarray) -> np.ndarray:
        """Normalized [N, C, lh, lw] -> theta [N, *info.theta_shape]."""
        c, (lh, lw) = self.info.in_channels, self.info.loc_size
        if loc_batch.ndim != 4 or loc_batch.shape[1:] != (c, lh, lw):
            raise ValueError(f"localiser input must be [N, {c}, {lh}, {lw}], got {list(loc_batch.shape)}")
        return self._run(self._localiser, {LOC_INPUT: np.ascontiguousarray(loc_batch, np.float32)}, OUTPUT_THETA)

    def sample(self, image: DeviceImage, theta: np.ndarray, output_size: tuple[int, int] | None = None) -> np.ndarray:
        """The exported sampler at full resolution: [N, C, H, W] (any C) + theta [N, ...] -> [N, C, h, w]."""
        size = tuple(output_size or self.info.output_size)
        theta = np.ascontiguousarray(theta, np.float32).reshape(-1, *self.info.theta_shape)
        if theta.shape[0] != image.array.shape[0]:
            raise ValueError(f"{image.array.shape[0]} images but {theta.shape[0]} thetas")
        return self._run(self._sampler, {INPUT_IMAGE: image, OUTPUT_THETA: theta, BASE_GRID: self.base_grid(size)},
                         OUTPUT_RECTIFIED)

    def base_grid(self, output_size: tuple[int, int]) -> np.ndarray | ort.OrtValue:
        """models.frames.base_grid for this model's family at ``output_size`` (cached; on the device on GPU)."""
        key = (int(output_size[0]), int(output_size[1]))
        with self._grid_lock:
            if key in self._grids:
                self._grids.move_to_end(key)
                return self._grids[key]
        grid = frames.base_grid(self.info.transform, key, self.info.tps_grid)
        if self.io_binding:
            grid = ort.OrtValue.ortvalue_from_numpy(grid, self.device, 0)
        nbytes = base_grid_bytes(self.info.transform, key, self.info.tps_grid)
        if nbytes > GRID_CACHE_BYTES:  # too big to keep: computed per request (admission counts it)
            return grid
        with self._grid_lock:
            self._grids[key] = grid
            while sum(base_grid_bytes(self.info.transform, k, self.info.tps_grid) for k in self._grids) > GRID_CACHE_BYTES:
                self._grids.popitem(last=False)
        return grid

    @property
    def grid_cache_bytes(self) -> int:
        """Bytes held by the cached base grids (at most GRID_CACHE_BYTES)."""
        with self._grid_lock:
            return sum(base_grid_bytes(self.info.transform, k, self.info.tps_grid) for k in self._grids)

    def warmup(self, max_batch_size: int = 1) -> float:
        """Run every session once at the model's sizes (and the localiser at 1 and max batch); returns seconds."""
        t0 = time.perf_counter()
        c, (lh, lw) = self.info.in_channels, self.info.loc_size
        image = self.upload(np.zeros((1, c, lh * 2, lw * 2), np.float32))
        loc = self.normalize(self.resize(image))
        for n in sorted({1, max_batch_size}):
            theta = self.localise(np.repeat(loc, n, axis=0))
        self.sample(image, theta[:1])
        self.warmed_up = True
        return time.perf_counter() - t0

    def describe(self) -> dict[str, Any]:
        """What /v1/models shows: metadata, providers, sizes."""
        info = self.info
        return {
            "name": self.name, "version": info.version, "file": self.path.name, "model_name": info.name,
            "transform": info.transform, "in_channels": info.in_channels, "loc_size": list(info.loc_size),
            "output_size": list(info.output_size), "mean": list(info.mean), "std": list(info.std),
            "interpolation": info.interpolation, "padding_mode": info.padding_mode, "grid_sample": info.grid_sample,
            "tps_grid": list(info.tps_grid) if info.transform == "tps" else None,
            "theta_shape": list(info.theta_shape), "classes": list(info.classes) if info.classes else None,
            "dataset": info.dataset, "metrics": info.metrics, "created_by": info.created_by,
            "providers": self.providers, "io_binding": self.io_binding, "warmed_up": self.warmed_up,
            "sampler": dict(self.sampler),
            "sessions": {"resize": self._resize.get_providers(), "localiser": self._localiser.get_providers(),
                         "sampler": self._sampler.get_providers()},
        }

    # ---- internals ----------------------------------------------------------------------
    def _check_image(self, a: np.ndarray) -> None:
        if a.ndim != 4 or a.shape[1] < 1:  # any C: resize and sampler act on every channel alike
            raise ValueError(f"image must be [N, C, H, W], got {list(a.shape)}")

    def _run(self, sess: ort.InferenceSession, feeds: dict[str, Any], output: str) -> np.ndarray:
        if not self.io_binding:
            plain = {k: (v.array if isinstance(v, DeviceImage) else v) for k, v in feeds.items()}
            return sess.run([output], plain)[0]
        binding = sess.io_binding()
        for k, v in feeds.items():
            if isinstance(v, DeviceImage):
                v = v.ortvalue if v.ortvalue is not None else v.array
            if isinstance(v, ort.OrtValue):
                binding.bind_ortvalue_input(k, v)
            else:
                binding.bind_cpu_input(k, np.ascontiguousarray(v))
        binding.bind_output(output, "cpu")
        sess.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


def load_model(path: str | Path, config: SessionConfig, name: str | None = None) -> ModelRuntime:
    """Load, validate and split one stn ONNX file; raise ModelLoadError with the reason."""
    path = Path(path)
    name = name or path.stem
    t0 = time.perf_counter()
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    try:
        proto = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 (protobuf raises DecodeError and friends)
        raise ModelLoadError(f"{path.name}: not a readable ONNX file ({type(e).__name__}: {e})") from None
    try:
        info = ModelInfo.from_proto(proto)
        if info.in_channels not in (1, 3, 4):
            raise MetadataError(f"stn.in_channels={info.in_channels}: images are served as 1, 3 or 4 channels")
        subs = split(proto, info)
    except (MetadataError, ContractError) as e:
        raise ModelLoadError(f"{path.name}: {e}") from None
    providers = resolve_providers(config.providers)
    register, use_native = _native_plan(path, proto, config)
    sampler = subs.sampler
    if use_native:
        sampler = native_sampler.sampler_model(info, like=proto)
    sessions = {}
    library = None
    for part, sub in (("resize", subs.resize), ("localiser", subs.localiser), ("sampler", sampler)):
        so = config.session_options()
        if part != "localiser":  # full-resolution images: no arena (see SessionConfig.session_options)
            so.enable_cpu_mem_arena = False
        try:
            if register:
                library = native.register(so, providers)
            sessions[part] = ort.InferenceSession(sub.SerializeToString(), so, providers=providers)
        except Exception as e:  # noqa: BLE001 (onnxruntime raises its own exception types)
            raise ModelLoadError(f"{path.name}: onnxruntime cannot load its {part}: {e}") from None
    runtime = ModelRuntime(name, path, info, sessions, config)
    if use_native or info.grid_sample == "native":
        runtime.sampler = {"implementation": "native", "op": native_sampler.op_name(info), "library": library}
    runtime.load_seconds = time.perf_counter() - t0
    return runtime


def _native_plan(path: Path, proto: onnx.ModelProto, config: SessionConfig) -> tuple[bool, bool]:
    """(register the native library in every session, run the sampler on the native ops)."""
    setting = config.native_sampler
    if setting not in ("auto", "on", "off"):
        raise ModelLoadError(f"native_sampler must be auto, on or off, got {setting!r}")
    needs = native_sampler.uses_native(proto)
    if setting == "off" and not needs:
        return False, False
    st = native.status()
    if not st["available"]:
        if needs:
            raise ModelLoadError(f"{path.name}: exported with --grid-sample native, it needs the native sampler "
                                 f"library: {st['reason']}")
        if setting == "on":
            raise ModelLoadError(f"{path.name}: STN_NATIVE_SAMPLER=on but the native sampler library is "
                                 f"unavailable: {st['reason']}")
        native.warn_unavailable_once("each model samples with its exported lowering")
        return False, False
    return True, setting != "off"


@dataclass
class LoadedModels:
    """The outcome of loading a model folder: ready models and failures, by served name."""

    models: dict[str, ModelRuntime] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


def model_files(model_dir: str | Path) -> list[Path]:
    """``*.onnx`` files in ``model_dir`` (sorted), or directly the file when given one."""
    p = Path(model_dir)
    if p.is_file():
        return [p]
    return sorted(q for q in p.glob("*.onnx") if q.is_file()) if p.is_dir() else []


_WARNED_MARKERS: set[tuple[str, str]] = set()  # (folder, name): a stale marker is reported once, not per request
DEFAULT_MARKER = "DEFAULT"  # in a model folder: names (first line) the model served when a request names none


def marked_default(model_dir: str | Path) -> str | None:
    """The served name written in ``<model_dir>/DEFAULT`` (its first non-blank line), or None without one."""
    marker = Path(model_dir) / DEFAULT_MARKER
    if not Path(model_dir).is_dir() or not marker.is_file():
        return None
    try:
        lines = [ln.strip() for ln in marker.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        log.warning("ignoring %s: %s", marker, e)
        return None
    return lines[0] if lines else None


def choose_default(names: Iterable[str], model_dir: str | Path, configured: str = "") -> str | None:
    """The default model among ``names`` (served names): ``configured`` (STN_DEFAULT_MODEL) when set, else the
    one ``<model_dir>/DEFAULT`` names when it is there, else the first by name.

    A marker naming no model of the folder is reported (warning) and skipped, so a folder whose
    default model failed to load still has a default.
    """
    if configured:
        return configured
    names = sorted(names)
    marked = marked_default(model_dir)
    if marked is not None and marked in names:
        return marked
    if marked is not None and (str(model_dir), marked) not in _WARNED_MARKERS:
        _WARNED_MARKERS.add((str(model_dir), marked))
        log.warning("%s names %r, which is not a loaded model of %s; the default is the first by name",
                    Path(model_dir) / DEFAULT_MARKER, marked, model_dir)
    return next(iter(names), None)


def load_and_warm(path: str | Path, config: SessionConfig, warmup_batch: int | None = 1) -> ModelRuntime:
    """:func:`load_model`, then its warm-up (``warmup_batch=None`` skips it): a model ready to take traffic,
    or ModelLoadError with the reason (a failed warm-up too)."""
    runtime = load_model(path, config)
    if warmup_batch is not None:
        try:
            runtime.warmup(warmup_batch)
        except Exception as e:  # noqa: BLE001 (warm-up failing means the model cannot run)
            raise ModelLoadError(f"{Path(path).name}: warm-up failed: {type(e).__name__}: {e}") from None
    return runtime


def load_model_dir(model_dir: str | Path, config: SessionConfig, warmup_batch: int | None = 1) -> LoadedModels:
    """Load every model in ``model_dir``; a failure is recorded with its reason and skips only that model.

    The served name of a model is its file stem. ``warmup_batch=None`` skips warm-up.
    """
    out = LoadedModels()
    files = model_files(model_dir)
    if not files:
        out.failures[str(model_dir)] = (f"no .onnx model in {model_dir} (set STN_MODEL_DIR to a folder of models "
                                        "exported with `stn export`)")
        return out
    for path in files:
        try:
            runtime = load_and_warm(path, config, warmup_batch)
        except ModelLoadError as e:
            log.error("model %s not loaded: %s", path.stem, e)
            out.failures[path.stem] = str(e)
            continue
        log.info("model %s (%s v%s, %s) loaded in %.2fs on %s", runtime.name, runtime.info.transform,
                 runtime.info.version, path.name, runtime.load_seconds, ", ".join(runtime.providers))
        out.models[runtime.name] = runtime
    return out
