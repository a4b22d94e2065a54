"""Service settings: one typed object read from ``STN_*`` environment variables (pydantic-settings).

Every field is listed, with its default, in the README's settings table.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:  # heavy (numpy, Pillow, onnxruntime): imported where those objects are built, so that the
    # settings schema loads with pydantic-settings alone (the compose file's check reads it so)
    from service.images import Limits
    from service.runtime import SessionConfig

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")  # what the image decoder (PIL) may decode; anything else: 415
# Of FORMATS, the ones decoded unless STN_IMAGE_FORMATS says otherwise: TIFF is opt-in, its decoder (codecs,
# compressions, tags) being Pillow's largest attack surface.
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")


def default_model_dir() -> Path:
    """``models/default/`` next to the installed ``models`` package, found without importing it (or torch)."""
    spec = importlib.util.find_spec("models")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        return Path("models/default")
    return Path(locations[0]) / "default"


def available_cpus() -> int:
    """CPUs this process may use (its affinity mask where the OS has one, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_threads(requested: int = 0) -> int:
    """The CPU-count policy of worker pools (server and batch jobs): ``requested``, else the CPUs this process
    may use, at most 8."""
    return requested or max(1, min(8, available_cpus()))


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class Settings(BaseSettings):
    """All knobs of ``stn serve``; env var = ``STN_`` + field name in upper case."""

    model_config = SettingsConfigDict(env_prefix="STN_", case_sensitive=False, extra="ignore")

    model_dir: Path = Field(default_factory=default_model_dir)  # folder of .onnx models; each file is one model
    default_model: str = ""  # model used when a request names none (default: the one model_dir/DEFAULT names, else the first by name)
    providers: Annotated[list[str], NoDecode] = ["CUDAExecutionProvider", "CPUExecutionProvider"]  # in order of preference
    host: str = "127.0.0.1"  # bind address of `stn serve`
    port: int = Field(8000, ge=0, le=65535)  # bind port of `stn serve`
    max_batch_size: int = Field(32, ge=1)  # most images per localisation batch
    max_queue_delay_ms: float = Field(2.0, ge=0)  # longest a queued image waits for a batch to fill
    max_queue_size: int = Field(256, ge=1)  # images waiting for localisation per model; beyond it: 503
    work_window: int = Field(0, ge=0)  # images decoded and worked on at once, all models (0: max_batch_size); admitted images beyond it wait undecoded
    request_timeout_s: float = Field(30.0, gt=0)  # a request waiting longer gets 503
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1)  # per image (and per raw body)
    max_image_pixels: int = Field(40_000_000, ge=1)  # width x height per image, read from the header before decoding
    max_files: int = Field(16, ge=1)  # images per request
    max_output_pixels: int = Field(16_000_000, ge=1)  # width x height of a requested `size`
    image_formats: Annotated[list[str], NoDecode] = ["JPEG", "PNG", "WEBP", "BMP"]  # comma-separated formats decoded (of JPEG, PNG, WEBP, BMP, TIFF); TIFF is opt-in; others: 415
    memory_budget_mb: int = Field(2048, ge=1)  # estimated memory of all admitted requests (bodies, decoded images, outputs); beyond it: 503
    max_uploads: int = Field(32, ge=1)  # request bodies being read at once; beyond it: 503 before the body is read
    body_timeout_s: float = Field(20.0, gt=0)  # longest a request body may take to arrive (408), and a client may read nothing of its response (dropped)
    max_header_bytes: int = Field(65536, ge=1024)  # request line and headers of one request; beyond it: 431 and close
    max_headers: int = Field(100, ge=8)  # header fields of one request; beyond it: 431 and close
    root_path: str = Field("", pattern=r"^(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)*$")  # the path prefix a reverse proxy serves the service under and strips (e.g. /stn); empty: at the root
    keep_alive_s: float = Field(5.0, gt=0)  # an idle keep-alive connection is closed after this; behind a load balancer, above its idle timeout
    head_timeout_s: float = Field(10.0, gt=0)  # longest a request head may take to arrive (from the connection's opening or the head's first byte); beyond it: 408 and close
    max_connections: int = Field(0, ge=0)  # open connections (0: the open-file limit less 128, at most 10000); beyond it the oldest waiting for a head is closed
    max_pipelined: int = Field(16, ge=1)  # requests one read of a connection may hold (HTTP pipelining); beyond it: those are answered and the connection ends
    shutdown_grace_s: float = Field(0.0, ge=0)  # on SIGTERM, how long work in flight may finish (0: request timeout + 5 s)
    intra_op_threads: int = Field(1, ge=0)  # onnxruntime threads per session run (0: onnxruntime decides); images run in parallel anyway
    inter_op_threads: int = Field(1, ge=0)  # onnxruntime inter-op threads (0: onnxruntime decides)
    workers: int = Field(0, ge=0)  # threads decoding, sampling and encoding images (0: CPUs this process may use, at most 8)
    malloc_keep_mb: int = Field(256, ge=0)  # freed memory glibc keeps for reuse (saves page faults per image; 0: glibc default)
    native_sampler: Literal["auto", "on", "off"] = "auto"  # sampler on the native ai.stn ops: auto (when the library is present), on (required), off
    warmup: bool = True  # run each model once at startup, before readiness
    model_poll_s: float = Field(0.0, ge=0)  # seconds between looks at model_dir for new, changed or removed models (0: off; load/unload through /v2/repository)
    strict_readiness: bool = False  # not ready while any model in the folder failed to load (Triton's strict readiness)
    access_log: bool = False  # uvicorn's per-request access log
    api_keys: Annotated[list[str], NoDecode] = Field([], repr=False)  # comma-separated; when set, requests need `X-API-Key` or Bearer
    cors_origins: Annotated[list[str], NoDecode] = []  # comma-separated allowed origins (default: none)
    log_level: str = "info"  # debug, info, warning, error

    @field_validator("providers", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("image_formats", mode="before")
    @classmethod
    def _formats(cls, value: object) -> object:
        value = _split_csv(value)
        if not isinstance(value, list):
            return value
        aliases = {"JPG": "JPEG", "TIF": "TIFF"}
        out = [aliases.get(str(v).upper(), str(v).upper()) for v in value]
        unknown = [v for v in out if v not in FORMATS]
        if unknown or not out:
            raise ValueError(f"image_formats must list some of {', '.join(FORMATS)}; got {value!r}")
        return list(dict.fromkeys(out))

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.lower()
        if value not in ("critical", "error", "warning", "info", "debug"):
            raise ValueError(f"log_level must be one of debug, info, warning, error, critical; got {value!r}")
        return value

    @property
    def grace_s(self) -> float:
        """Seconds work in flight may take to finish after SIGTERM (STN_SHUTDOWN_GRACE_S, else timeout + 5)."""
        return self.shutdown_grace_s or self.request_timeout_s + 5.0

    @property
    def worker_threads(self) -> int:
        """Threads decoding, sampling and encoding images (STN_WORKERS, else :func:`cpu_threads`)."""
        return cpu_threads(self.workers)

    @property
    def limits(self) -> Limits:
        """The image limits (STN_MAX_UPLOAD_BYTES, STN_MAX_IMAGE_PIXELS, STN_IMAGE_FORMATS)."""
        from service.images import Limits

        return Limits(max_bytes=self.max_upload_bytes, max_pixels=self.max_image_pixels,
                      formats=tuple(self.image_formats))

    def session_config(self, providers: Iterable[str] | None = None) -> SessionConfig:
        """How onnxruntime sessions are made: STN_PROVIDERS (or ``providers``), the thread counts and the native
        sampler setting."""
        from service.runtime import SessionConfig  # onnxruntime: loaded when a session is wanted, not with settings

        return SessionConfig(providers=tuple(providers or self.providers), intra_op_threads=self.intra_op_threads,
                             inter_op_threads=self.inter_op_threads, native_sampler=self.native_sampler)


class SettingsError(ValueError):
    """Settings that do not validate: the message names each ``STN_*`` variable, its value and what it must be."""


def _bad_setting(error: dict) -> str:
    field = str(error["loc"][0]) if error.get("loc") else ""
    name = f"STN_{field.upper()}" if field else "the STN_* settings"
    value = "(hidden)" if field == "api_keys" else repr(error.get("input"))
    if len(value) > 80:
        value = value[:77] + "..."
    return f"{name}={value}: {error['msg']}"


def load_settings(**overrides: object) -> Settings:
    """:class:`Settings` from the environment and ``overrides`` (a command's flags); :class:`SettingsError` naming
    each bad variable (``STN_PORT=99999: Input should be less than or equal to 65535``), not pydantic's
    traceback, so that the commands can say it in one line and exit 2."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as e:
        raise SettingsError("invalid settings: " + "; ".join(_bad_setting(err) for err in e.errors())) from None


@lru_cache
def get_settings() -> Settings:
    """Settings from the environment, read once (the app takes an explicit Settings in tests)."""
    return load_settings()
