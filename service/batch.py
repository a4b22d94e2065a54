"""Batch inference jobs: ``stn batch INPUT OUTPUT`` rectifies many images offline (docs/BATCH.md).

The same runtime, preprocessing and conventions as the server: every image goes through
``service.pipeline`` (``prepare_array`` -> batched ``localise`` -> ``rectify`` -> ``result_json``)
on a ``service.runtime.ModelRuntime``; decoding and limits are ``service.images``'.

::

    INPUT (folder | glob | manifest) --resolve_inputs--> Items (source key, path read, output path)
    Job (OUTPUT/.stn-batch: job.json, journal.jsonl, tmp/) --todo--> items not done yet
    engine: local (threads: decode || batched localise || sample+encode+write) or ray (service.batch_ray)
    Job.finish --> OUTPUT/results.jsonl, OUTPUT/errors.jsonl (sorted by source), Summary

Public API: :class:`BatchConfig`, :func:`run_job` (-> :class:`Summary`), :func:`resolve_inputs`,
:func:`resolve_model_path`, :func:`load_batch_model`, :func:`read_image`, :func:`finish_image`,
:func:`encode_output`, :func:`parse_size`, :class:`Job`; the CLI hooks :func:`configure_batch`,
:func:`run_batch`, :func:`configure_bench_batch`, :func:`run_bench_batch`.

Nothing lost, nothing doubled: every output is written to ``OUTPUT/.stn-batch/tmp`` and renamed
into place (atomic on one filesystem); then one line is appended to ``OUTPUT/.stn-batch/journal.jsonl``.
A re-run of the same command reads the journal, skips images whose record and output exist,
redoes the rest, and writes the reports from the journal, sorted by source: the outputs and the
reports of an interrupted-then-resumed job are byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from service import images
    from service.pipeline import Prepared
    from service.runtime import ModelRuntime

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")  # what a folder or glob picks up
MANIFEST_SUFFIXES = (".txt", ".lst", ".csv", ".jsonl")  # one path per line; CSV / JSONL with a `path` column
OUTPUT_FORMATS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}  # --format -> output suffix
STATE_DIR = ".stn-batch"  # inside OUTPUT: job.json, journal.jsonl, tmp/ (never an output path)
RESULTS, ERRORS = "results.jsonl", "errors.jsonl"
ENGINES = ("local", "ray")


class BatchError(RuntimeError):
    """A job that cannot start (no model, no input, OUTPUT holds another job); the message says what to do."""


# ---- inputs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One image of the job."""

    source: str  # path relative to the input root, POSIX separators: the key of the job and `source` in the reports
    path: str  # absolute path that is read
    output: str  # path of the rectified image relative to OUTPUT, POSIX separators


@dataclass
class Inputs:
    """What INPUT names: the images, and entries refused before reading (they go to errors.jsonl)."""

    root: Path  # sources are relative to it; no file outside it is read
    items: list[Item]
    rejected: list[dict[str, str]] = field(default_factory=list)  # {"source": ..., "error": ...}


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _manifest_entries(path: Path) -> list[str]:
    """Paths listed by a manifest: one per line (.txt, .lst), or the `path` column (.csv, .jsonl)."""
    text = path.read_text(encoding="utf-8-sig")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise BatchError(f"{path}: a CSV manifest needs a `path` column (has: {reader.fieldnames})")
        return [row["path"].strip() for row in reader if (row.get("path") or "").strip()]
    if suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BatchError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("path"), str):
                raise BatchError(f"{path}:{n}: each line must be an object with a string `path`")
            out.append(row["path"].strip())
        return out
    return [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]


def _glob_root(pattern: str) -> Path:
    """The folder before the first wildcard of a glob."""
    parts = Path(pattern).parts
    fixed = []
    for p in parts:
        if glob.has_magic(p):
            break
        fixed.append(p)
    return Path(*fixed) if fixed else Path(".")


def resolve_inputs(spec: str | os.PathLike, output: str | os.PathLike, fmt: str = "png",
                   input_root: str | os.PathLike | None = None) -> Inputs:
    """INPUT -> the job's items, sorted by source.

    INPUT is a folder (walked recursively; files with an image suffix), a manifest (``.txt``/``.lst``:
    one path per line, ``#`` comments; ``.csv``/``.jsonl``: a ``path`` column; relative paths are
    relative to the manifest's folder), a single image, or a glob (``**`` recurses).

    The input root (``input_root``, default: the folder, the manifest's folder, or the glob's fixed
    prefix) is what sources and outputs are relative to. An entry outside it, lexically (``..``) or
    through a symlink, is refused (errors.jsonl), so no output path can leave OUTPUT and no file
    outside the root is read. Files inside OUTPUT are ignored; symlinked folders are not followed.
    Output paths mirror sources with the format's suffix (``a/b.jpg`` -> ``a/b.png``); where two
    sources would share one (``b.jpg``, ``b.png``) both keep their full name (``b.jpg.png``).
    """
    spec_s = os.fspath(spec)
    p = Path(spec_s)
    out_real = os.path.realpath(output)
    entries: list[str] = []  # paths to read (relative to the current folder, or absolute)
    shown: list[str] | None = None  # how each entry is named in errors.jsonl when refused (manifest: as written)
    rejected: list[dict[str, str]] = []
    if p.is_dir():
        root = Path(input_root or p)
        for dirpath, dirnames, filenames in os.walk(p, followlinks=False):
            keep = []
            for d in sorted(dirnames):
                full = os.path.join(dirpath, d)
                if os.path.realpath(full) == out_real or (dirpath == os.fspath(p) and d == STATE_DIR):
                    continue
                if os.path.islink(full):
                    rejected.append({"source": Path(os.path.relpath(full, root)).as_posix(),
                                     "error": "a symlinked folder; not followed"})
                    continue
                keep.append(d)
            dirnames[:] = keep
            entries += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_SUFFIXES)]
    elif p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES:
        root = Path(input_root or p.parent)
        shown = _manifest_entries(p)
        entries = [e if os.path.isabs(e) else os.path.join(p.parent, e) for e in shown]
    elif p.is_file():
        root = Path(input_root or p.parent)
        entries = [spec_s]
    else:
        root = Path(input_root or _glob_root(spec_s))
        entries = sorted(f for f in glob.glob(spec_s, recursive=True)
                         if os.path.isfile(f) and f.lower().endswith(IMAGE_SUFFIXES))
        if not entries:
            raise BatchError(f"{spec_s}: no such folder, manifest or image, and no image matches it as a glob")
    root_abs = os.path.abspath(root)
    root_real = os.path.realpath(root)
    if _is_within(root_real, out_real):
        raise BatchError(f"the input root {root_abs} is OUTPUT or inside it; write the outputs elsewhere")
    rels: dict[str, str] = {}  # source -> absolute path
    for n, e in enumerate(entries):
        name = shown[n] if shown is not None else e
        full = os.path.normpath(os.path.abspath(e))
        rel = os.path.relpath(full, root_abs)
        source = Path(rel).as_posix()
        if rel == os.curdir or rel.split(os.sep)[0] == os.pardir:
            rejected.append({"source": name, "error": f"outside the input root {root_abs}; no output may leave OUTPUT "
                                                   "(pass --input-root to widen it)"})
            continue
        real = os.path.realpath(full)
        if _is_within(real, out_real) or _is_within(full, out_real):
            continue  # our own outputs (OUTPUT inside INPUT)
        if not _is_within(real, root_real):
            rejected.append({"source": source, "error": f"resolves through a symlink to {real}, outside the input "
                                                        f"root {root_abs}; not read"})
            continue
        if source.split("/")[0] == STATE_DIR:
            rejected.append({"source": source, "error": f"{STATE_DIR}/ is reserved for the job's state"})
            continue
        rels.setdefault(source, full)  # a source listed twice is processed once
    suffix = OUTPUT_FORMATS[fmt]
    plain = {s: str(Path(s).with_suffix(suffix).as_posix()) for s in rels}
    counts: dict[str, int] = {}
    for o in plain.values():
        counts[o] = counts.get(o, 0) + 1
    reserved = {RESULTS, ERRORS}
    items = []
    for s in sorted(rels):
        o = plain[s]
        if counts[o] > 1 or o in reserved:
            o = s + suffix
        items.append(Item(s, rels[s], o))
    rejected.sort(key=lambda r: r["source"])
    return Inputs(Path(root_abs), items, rejected)


# ---- model -------------------------------------------------------------------------------------
def resolve_model_path(model: str | None = None) -> Path:
    """``--model``: an .onnx file, a folder (its default model), or a model name in STN_MODEL_DIR.

    Without it: the server's default (``service.runtime.choose_default``): STN_DEFAULT_MODEL in
    STN_MODEL_DIR, else the model its ``DEFAULT`` file names, else the first by name there;
    STN_MODEL_DIR defaults to the bundled ``models/default/``.
    """
    from service.runtime import choose_default, model_files
    from service.settings import Settings

    settings = Settings()
    if model is not None and Path(model).is_file():
        return Path(model)
    folder = Path(model) if model is not None and Path(model).is_dir() else settings.model_dir
    name = settings.default_model if model is None or Path(model).is_dir() else model
    files = model_files(folder)
    if not files:
        raise BatchError(f"no .onnx model in {folder}: pass --model FILE.onnx (or a folder, or set STN_MODEL_DIR)")
    name = name or choose_default([f.stem for f in files], folder)
    if name:
        named = [f for f in files if f.stem == name]
        if not named:
            raise BatchError(f"no model {name!r} in {folder} (has: {', '.join(f.stem for f in files)})")
        return named[0]
    return files[0]


def session_config(providers: Iterable[str] | None = None):  # noqa: ANN201 (service.runtime.SessionConfig)
    """The server's session settings (STN_PROVIDERS, STN_INTRA_OP_THREADS, ...), providers overridable."""
    from service.runtime import SessionConfig
    from service.settings import Settings

    s = Settings()
    return SessionConfig(providers=tuple(providers or s.providers), intra_op_threads=s.intra_op_threads,
                         inter_op_threads=s.inter_op_threads, native_sampler=s.native_sampler)


def load_batch_model(path: str | os.PathLike, providers: Iterable[str] | None = None) -> ModelRuntime:
    """Load and warm up a model the way the server does; BatchError with the reason when it cannot."""
    from service.runtime import ModelLoadError, load_model

    try:
        model = load_model(path, session_config(providers))
    except ModelLoadError as e:
        raise BatchError(str(e)) from None
    model.warmup()
    return model


def default_limits() -> images.Limits:
    """The server's image limits (STN_MAX_UPLOAD_BYTES, STN_MAX_IMAGE_PIXELS, STN_IMAGE_FORMATS)."""
    from service import images
    from service.settings import Settings

    s = Settings()
    return images.Limits(max_bytes=s.max_upload_bytes, max_pixels=s.max_image_pixels,
                         formats=tuple(s.image_formats))


# ---- one image ---------------------------------------------------------------------------------
def read_image(path: str, limits: images.Limits, name: str) -> images.Decoded:
    """Read and decode one file in its own colour (size checked before reading); images.ImageError or OSError
    on failure."""
    from service import images

    images.check_bytes(os.path.getsize(path), limits, name)
    with open(path, "rb") as f:
        data = f.read()
    return images.decode(data, limits, name)


def encode_output(array: np.ndarray, fmt: str, quality: int = 90, bits: int = 8) -> bytes:
    """float [C, h, w] in [0, 1] -> PNG / JPEG (``service.images.encode``; 16-bit PNG for ``bits=16``) or
    WebP bytes (8-bit; gray is written as RGB, WebP has no gray)."""
    from service import images

    if fmt in images.ENCODINGS:
        return images.encode(array, fmt, quality, bits)
    if fmt != "webp":
        raise ValueError(f"format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    import io

    from PIL import Image

    img = Image.fromarray(images.to_uint8(array))
    if img.mode not in ("RGB", "RGBA"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "WEBP", quality=quality, method=4)
    return buf.getvalue()


def result_record(model: ModelRuntime, result: Any, item: Item) -> dict[str, Any]:
    """One line of results.jsonl: the ``POST /v1/rectify`` result object (``pipeline.result_json``)
    without the image, with the source and output paths and the model's name and version."""
    from service import pipeline

    d = pipeline.result_json(model, result, encoded_png=b"")
    d.pop("image", None)
    d.pop("filename", None)
    return {"source": item.source, "output": item.output, **d, "model": model.info.name,
            "model_version": model.info.version}


def finish_image(model: ModelRuntime, item: Item, prepared: Prepared, theta: np.ndarray, fmt: str, quality: int,
                 size: tuple[int, int] | None, timer: Timer | None = None) -> tuple[bytes, dict[str, Any]]:
    """Sample at full resolution (``pipeline.rectify``), encode, and build the results.jsonl record."""
    from service import pipeline

    timer = timer or Timer()
    with timer("sample"):
        result = pipeline.rectify(model, prepared, theta, size)
    with timer("encode"):
        data = encode_output(result.image, fmt, quality, result.bits)
    return data, result_record(model, result, item)


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
            dt = time.perf_counter() - t0
            with self._lock:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + dt


# ---- the job's state in OUTPUT -----------------------------------------------------------------
@dataclass(frozen=True)
class JobSpec:
    """What makes two runs the same job (stored in OUTPUT/.stn-batch/job.json)."""

    model: str  # stn.name
    model_version: str
    model_sha256: str
    format: str
    quality: int
    size: list[int] | None  # [h, w]; None: the model's output size


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Job:
    """OUTPUT and its state: the journal of finished images, atomic writes, the final reports.

    Thread-safe: outputs may be written from several threads; journal lines are appended under a lock.
    """

    def __init__(self, output: str | os.PathLike, inputs: Inputs, spec: JobSpec, overwrite: bool = False) -> None:
        self.output = Path(output)
        self.inputs = inputs
        self.spec = spec
        self.state = self.output / STATE_DIR
        self.tmp = self.state / "tmp"
        self.journal_path = self.state / "journal.jsonl"
        self._lock = threading.Lock()
        self._seq = 0
        self._checked: set[str] = set()  # output folders (relative) already created and checked
        self.output.mkdir(parents=True, exist_ok=True)
        self.output_real = os.path.realpath(self.output)
        job_file = self.state / "job.json"
        if job_file.exists() and not overwrite:
            try:
                old = json.loads(job_file.read_text())
            except (OSError, json.JSONDecodeError):
                old = None
            if old != asdict(spec):
                raise BatchError(f"{self.output} holds a job with other settings ({old}); this one is {asdict(spec)}. "
                                 "Use another OUTPUT, or --overwrite to start this job over in it")
        if overwrite and self.state.exists():
            shutil.rmtree(self.state)
        shutil.rmtree(self.tmp, ignore_errors=True)  # leftovers of an interrupted run
        self.tmp.mkdir(parents=True, exist_ok=True)
        if not job_file.exists():
            self._atomic_write(job_file, json.dumps(asdict(spec), indent=1).encode())
        # source -> (output, the results.jsonl line) for a rectified image, (None, reason) for a failure;
        # kept as text, which is several times smaller than the parsed records
        self.records: dict[str, tuple[str | None, str]] = {}
        if self.journal_path.exists():
            with open(self.journal_path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by kill -9: that image is redone
                    if not isinstance(rec, dict) or not isinstance(rec.get("source"), str):
                        continue
                    if isinstance(rec.get("result"), dict):
                        self.records[rec["source"]] = (rec["result"].get("output"), json.dumps(rec["result"]))
                    else:
                        self.records[rec["source"]] = (None, str(rec.get("error", "")))
        self.done = {it.source for it in inputs.items if self._completed(it)}
        self.todo = [it for it in inputs.items if it.source not in self.done]
        self._journal = open(self.journal_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def _completed(self, item: Item) -> bool:
        output = self.records.get(item.source, (None, ""))[0]
        return output is not None and output == item.output and (self.output / item.output).is_file()

    def _atomic_write(self, dest: Path, data: bytes | Iterable[str]) -> None:
        """Write ``data`` (bytes, or text chunks) to a temporary file, then rename it to ``dest``."""
        with self._lock:
            self._seq += 1
            tmp = self.tmp / f"{os.getpid()}-{threading.get_ident()}-{self._seq}.tmp"
        if isinstance(data, bytes):
            with open(tmp, "wb") as f:
                f.write(data)
        else:
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                f.writelines(data)
        os.replace(tmp, dest)

    def output_path(self, item: Item) -> Path:
        """OUTPUT/item.output, its folders created; BatchError if a symlink would lead it outside OUTPUT."""
        dest = self.output / item.output
        parent = os.path.dirname(item.output)
        if parent in self._checked:
            return dest
        folder = self.output
        for part in Path(parent).parts:  # one level at a time: never create a folder through a symlink
            folder = folder / part
            if folder.is_symlink() and not _is_within(os.path.realpath(folder), self.output_real):
                raise BatchError(f"{folder} is a symlink to {os.path.realpath(folder)}, outside OUTPUT; not written")
            if not folder.is_dir():
                folder.mkdir(exist_ok=True)
        parent_real = os.path.realpath(dest.parent)
        if not _is_within(parent_real, self.output_real) or _is_within(parent_real, os.path.realpath(self.state)):
            raise BatchError(f"{dest.parent} leads (through a symlink) to {parent_real}, outside OUTPUT; not written")
        self._checked.add(parent)  # checked once per folder and run
        return dest

    def _append(self, source: str, output: str | None, text: str, line: str) -> None:
        with self._lock:
            self.records[source] = (output, text)
            self._journal.write(line)
            self._journal.flush()  # in the OS once written: survives kill -9

    def write_result(self, item: Item, data: bytes, record: dict[str, Any]) -> None:
        """Write the rectified image atomically, then journal its record."""
        try:
            self._atomic_write(self.output_path(item), data)
        except (OSError, BatchError) as e:
            self.write_error(item, f"could not write {item.output}: {e}")
            return
        text = json.dumps(record)
        self._append(item.source, item.output, text, f'{{"source": {json.dumps(item.source)}, "result": {text}}}\n')

    def write_error(self, item: Item, reason: str) -> None:
        self._append(item.source, None, reason, json.dumps({"source": item.source, "error": reason}) + "\n")

    def close(self) -> None:
        with self._lock:
            if not self._journal.closed:
                self._journal.flush()
                with contextlib.suppress(OSError):
                    os.fsync(self._journal.fileno())
                self._journal.close()

    def finish(self) -> tuple[int, int]:
        """Write results.jsonl and errors.jsonl (sorted by source) from the journal; (ok, failed)."""
        self.close()
        ok: list[str] = []  # items are sorted by source already
        errors = list(self.inputs.rejected)
        for it in self.inputs.items:
            output, text = self.records.get(it.source, (None, "not processed"))
            if output is not None and self._completed(it):
                ok.append(it.source)
            else:
                errors.append({"source": it.source, "error": text if output is None else "not processed"})
        errors.sort(key=lambda r: r["source"])
        self._atomic_write(self.output / RESULTS, (self.records[s][1] + "\n" for s in ok))
        self._atomic_write(self.output / ERRORS, (json.dumps(r) + "\n" for r in errors))
        shutil.rmtree(self.tmp, ignore_errors=True)
        return len(ok), len(errors)


# ---- the job -----------------------------------------------------------------------------------
@dataclass
class BatchConfig:
    """One batch job (the options of ``stn batch``)."""

    input: str  # folder, glob or manifest
    output: str  # folder for the rectified images, results.jsonl, errors.jsonl
    model: str | None = None  # .onnx file, folder or model name; None: the server's default model
    format: str = "png"  # png, jpeg, webp
    quality: int = 90  # JPEG / WebP quality
    size: tuple[int, int] | None = None  # (h, w) of the outputs; None: the model's output size
    batch_size: int = 32  # images per localisation batch
    workers: int = 0  # decode / sample / encode threads (0: the CPUs this process may use, at most 8)
    engine: str = "local"  # local or ray
    input_root: str | None = None  # sources and outputs are relative to it (default: from INPUT)
    overwrite: bool = False  # start over in an OUTPUT that holds another (or the same) job
    providers: tuple[str, ...] | None = None  # onnxruntime providers (default: STN_PROVIDERS)
    progress: bool = True  # tqdm progress bar on stderr
    ray_address: str | None = None  # an existing Ray cluster ("auto", "ray://host:10001"); None: a local Ray
    ray_num_cpus: int | None = None  # CPUs of the local Ray (None: all)
    ray_actors: int = 0  # onnxruntime actors (0: one per GPU, else the CPUs less one, at least 1)


@dataclass
class Summary:
    """What a job did: counts, wall time, throughput, and where the time went."""

    total: int  # images in INPUT (and refused entries)
    processed: int  # images rectified in this run
    skipped: int  # images already done by an earlier run
    failed: int  # lines of errors.jsonl
    ok: int  # lines of results.jsonl
    wall_s: float  # the whole command: model load, input listing, processing, reports
    run_s: float  # processing only (what the throughput is measured over)
    stages: dict[str, float]  # stage -> seconds summed over workers (read_decode, prepare, localise, sample, ...)
    engine: str
    model: str
    output: str

    @property
    def images_per_s(self) -> float:
        return self.processed / self.run_s if self.run_s > 0 else 0.0

    def lines(self) -> list[str]:
        out = [f"{self.ok} rectified, {self.failed} failed ({self.skipped} done by an earlier run, {self.processed} "
               f"in this one) in {self.wall_s:.1f}s; processing {self.run_s:.1f}s: {self.images_per_s:.1f} images/s "
               f"({self.engine} engine, model {self.model})",
               f"outputs in {self.output}; see {RESULTS} and {ERRORS} there"]
        total = sum(self.stages.values())
        if total > 0:
            out.append("time per stage (seconds summed over workers): " + ", ".join(
                f"{k} {v:.2f}s ({100 * v / total:.0f}%)" for k, v in self.stages.items()))
        return out


def _progress(total: int, initial: int, enabled: bool):  # noqa: ANN202 (tqdm)
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", disable=not enabled, dynamic_ncols=True, smoothing=0.05,
                desc="stn batch")


def cpus() -> int:
    """CPUs this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def workers_for(config: BatchConfig) -> int:
    return config.workers or min(8, cpus())


def run_job(config: BatchConfig, model: ModelRuntime | None = None) -> Summary:
    """Run one job to the end (or until interrupted: KeyboardInterrupt propagates, the journal is kept)."""
    if config.format not in OUTPUT_FORMATS:
        raise BatchError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, got {config.format!r}")
    if config.engine not in ENGINES:
        raise BatchError(f"--engine must be one of {', '.join(ENGINES)}, got {config.engine!r}")
    t0 = time.perf_counter()
    path = Path(model.path) if model is not None else resolve_model_path(config.model)
    if model is None:
        model = load_batch_model(path, config.providers)
    inputs = resolve_inputs(config.input, config.output, config.format, config.input_root)
    spec = JobSpec(model.info.name, model.info.version, _sha256(path), config.format, config.quality,
                   list(config.size) if config.size else None)
    job = Job(config.output, inputs, spec, config.overwrite)
    timer = Timer()
    t_run = time.perf_counter()
    bar = _progress(len(inputs.items), len(job.done), config.progress)
    try:
        if config.engine == "ray":
            from service.batch_ray import run_ray

            run_ray(job, config, path, model.info, bar, timer)
        else:
            run_local(job, model, config, bar, timer)
    finally:
        bar.close()
        job.close()
    run_s = time.perf_counter() - t_run
    ok, failed = job.finish()
    return Summary(total=len(inputs.items) + len(inputs.rejected), processed=len(job.todo), skipped=len(job.done),
                   failed=failed, ok=ok, wall_s=time.perf_counter() - t0, run_s=run_s, stages=dict(timer.seconds),
                   engine=config.engine, model=f"{model.info.name} v{model.info.version} ({path.name})",
                   output=str(config.output))


def run_local(job: Job, model: ModelRuntime, config: BatchConfig, bar: Any, timer: Timer) -> None:
    """The local engine: a pool of CPU threads reads, decodes and resizes images ahead while the calling
    thread localises full batches; the same pool samples and encodes each image, and a small I/O pool
    writes it (so a slow disk does not hold a CPU worker). Bounded: at most a few batches of images
    are in memory."""
    from service import pipeline

    limits = default_limits()
    batch = max(1, config.batch_size)
    workers = workers_for(config)
    window = max(2 * batch, 4 * workers)

    def prepare(item: Item) -> tuple[Item, Prepared | None, str | None]:
        try:
            with timer("read_decode"):
                decoded = read_image(item.path, limits, item.source)
            with timer("prepare"):
                return item, pipeline.prepare_array(model, decoded.array, item.source, decoded.bits), None
        except Exception as e:  # noqa: BLE001 (any unreadable file is an error line; the job goes on)
            return item, None, _reason(e)

    def write(item: Item, data: bytes, record: dict[str, Any]) -> None:
        with timer("write"):
            job.write_result(item, data, record)

    def finish(item: Item, prepared: Prepared, theta: np.ndarray) -> Future | None:
        try:
            data, record = finish_image(model, item, prepared, theta, config.format, config.quality, config.size,
                                        timer)
            return io_pool.submit(write, item, data, record)
        except Exception as e:  # noqa: BLE001
            job.write_error(item, _reason(e))
            return None

    todo = iter(job.todo)
    exhausted = False
    decoding: set[Future] = set()
    finishing: set[Future] = set()
    writing: set[Future] = set()
    ready: list[tuple[Item, Prepared]] = []
    pool = ThreadPoolExecutor(workers, thread_name_prefix="stn-batch")
    io_pool = ThreadPoolExecutor(max(2, workers // 2), thread_name_prefix="stn-batch-io")
    try:
        while True:
            while not exhausted and len(decoding) + len(ready) < window:
                item = next(todo, None)
                if item is None:
                    exhausted = True
                    break
                decoding.add(pool.submit(prepare, item))
            if len(ready) >= batch or (ready and exhausted and not decoding):
                chunk, ready = ready[:batch], ready[batch:]
                with timer("localise"):
                    thetas = pipeline.localise(model, [p for _, p in chunk])
                for (item, prepared), theta in zip(chunk, thetas, strict=True):
                    finishing.add(pool.submit(finish, item, prepared, theta))
                continue
            if not decoding and not finishing and not writing:
                break
            # the later stages first when too much is queued, so memory stays bounded
            later = finishing | writing
            waiting = later if len(later) >= window else (decoding | later)
            done, _ = wait(waiting, return_when=FIRST_COMPLETED)
            for f in done:
                if f in decoding:
                    decoding.discard(f)
                    item, prepared, error = f.result()
                    if prepared is None:
                        job.write_error(item, error or "unknown error")
                        bar.update(1)
                    else:
                        ready.append((item, prepared))
                elif f in finishing:
                    finishing.discard(f)
                    written = f.result()
                    if written is None:
                        bar.update(1)
                    else:
                        writing.add(written)
                else:
                    writing.discard(f)
                    f.result()
                    bar.update(1)
    finally:
        # on Ctrl-C: running work completes, queued decoding and sampling is dropped, queued writes finish
        pool.shutdown(wait=True, cancel_futures=True)
        io_pool.shutdown(wait=True)


def _reason(e: BaseException) -> str:
    from service import images

    if isinstance(e, images.ImageError | BatchError):
        return str(e)
    if isinstance(e, OSError):
        return f"could not read: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
    return f"{type(e).__name__}: {e}"


# ---- CLI -----------------------------------------------------------------------------------------
_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` -> (h, w)."""
    m = _SIZE.match(text or "")
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT with positive integers, like 256x128; "
                                         f"got {text!r}")
    return int(m.group(2)), int(m.group(1))


def configure_batch(p: argparse.ArgumentParser) -> None:
    p.description = ("Rectify many images offline with the server's runtime and conventions. Writes OUTPUT/<same "
                     "relative path>.<format>, OUTPUT/results.jsonl and OUTPUT/errors.jsonl; re-running the same "
                     "command after an interruption resumes (docs/BATCH.md).")
    p.add_argument("input", metavar="INPUT", help="a folder (recursive), a glob (quote it; ** recurses), or a manifest "
                                                  "(.txt/.lst: one path per line; .csv/.jsonl: a `path` column)")
    p.add_argument("output", metavar="OUTPUT", help="output folder (mirrors the inputs' relative paths)")
    p.add_argument("--model", default=None, help="an .onnx file, a folder of models, or a model name in STN_MODEL_DIR "
                                                 "(default: the server's default model)")
    p.add_argument("--format", default="png", choices=list(OUTPUT_FORMATS), help="output format (default png)")
    p.add_argument("--quality", type=int, default=90, help="JPEG / WebP quality (default 90)")
    p.add_argument("--size", type=parse_size, default=None, metavar="WxH",
                   help="size of the rectified images (default: the model's output size)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per localisation batch (default: STN_MAX_BATCH_SIZE, 32)")
    p.add_argument("--workers", type=int, default=0, help="decode/sample/encode threads (default: CPUs, at most 8)")
    p.add_argument("--engine", default="local", choices=list(ENGINES), help="local (default) or ray (Ray Data)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (e.g. auto, ray://head:10001; default: "
                                                       "start a local Ray)")
    p.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--ray-actors", type=int, default=0,
                   help="onnxruntime actors (default: one per GPU, else the CPUs less one)")
    p.add_argument("--input-root", default=None, help="folder that sources and outputs are relative to (default: the "
                                                      "folder, the manifest's folder, or the glob's fixed prefix)")
    p.add_argument("--providers", default=None, help="comma-separated onnxruntime providers (default: STN_PROVIDERS)")
    p.add_argument("--overwrite", action="store_true", help="start over in an OUTPUT that holds a job")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> BatchConfig:
    from service.settings import Settings

    return BatchConfig(
        input=args.input, output=args.output, model=args.model, format=args.format, quality=args.quality,
        size=args.size, batch_size=args.batch_size or Settings().max_batch_size, workers=args.workers,
        engine=args.engine, input_root=args.input_root, overwrite=args.overwrite,
        providers=tuple(p.strip() for p in args.providers.split(",") if p.strip()) if args.providers else None,
        progress=not args.no_progress, ray_address=args.ray_address, ray_num_cpus=args.ray_num_cpus,
        ray_actors=args.ray_actors)


def _say(line: str) -> None:
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def run_batch(args: argparse.Namespace) -> int:
    """``stn batch``: 0 when the job completed (image failures are in errors.jsonl), 130 when interrupted, 2 when
    it could not start."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = run_job(config_from_args(args))
    except BatchError as e:
        sys.stderr.write(f"stn batch: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("stn batch: interrupted; finished images are kept. Re-run the same command to resume.\n")
        return 130
    for line in summary.lines():
        _say(line)
    return 0


def configure_bench_batch(p: argparse.ArgumentParser) -> None:
    p.description = ("The local batch engine vs a naive loop (decode -> infer -> encode, one image at a time) and the "
                     "bare model (onnxruntime, batched, on images decoded beforehand), on generated JPEGs.")
    p.add_argument("--model", default=None, help="an .onnx file, a folder or a model name (default: an affine RGB "
                                                 "bench model, 64x64 localisation, 128x128 output, exported once)")
    p.add_argument("--images", type=int, default=2000, help="number of generated JPEGs (default 2000)")
    p.add_argument("--image-size", type=parse_size, default=(240, 320), metavar="WxH",
                   help="size of the generated JPEGs (default 320x240)")
    p.add_argument("--data-dir", default=None, help="where the JPEGs are generated (kept for re-runs; default: a "
                                                    "folder under the system temp dir)")
    p.add_argument("--format", default="png", choices=list(OUTPUT_FORMATS), help="output format (default png)")
    p.add_argument("--batch-size", type=int, default=32, help="localisation batch (default 32)")
    p.add_argument("--workers", type=int, default=0, help="local engine threads (default: CPUs, at most 8)")
    p.add_argument("--targets", default="local,naive,bare", help="what to measure: local, naive, bare, ray "
                                                                 "(default local,naive,bare)")
    p.add_argument("--repeat", type=int, default=2, help="interleaved rounds; the best of each is kept (default 2)")


def run_bench_batch(args: argparse.Namespace) -> int:
    from service.bench_batch import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    """``python -m service.batch INPUT OUTPUT ...`` (the same as ``stn batch``)."""
    parser = argparse.ArgumentParser(prog="stn batch")
    configure_batch(parser)
    return run_batch(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
