"""One batch job from start to end: resolve the model and INPUT, open the job in OUTPUT, run an engine, report.

::

    INPUT (folder | glob | manifest; path or URI) --inputs.resolve_inputs--> Items (source, path, output)
    Job (OUTPUT/.stn-batch: job.json, journal) --todo--> the items not done yet
    engine: local (service.batch.local: threads) or ray (service.batch.ray_data: Ray Data, loaded on use)
    Job.finish --> OUTPUT/results.jsonl, errors.jsonl, skipped.jsonl (sorted by source) -> Summary

Nothing lost, nothing doubled: every output is written atomically, then journaled; a re-run of the same
command skips images whose record and output exist and redoes the rest, and the outputs and reports of
an interrupted-then-resumed job are byte-identical to an uninterrupted run's (docs/BATCH.md).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from service import images
from service.batch.inputs import ERRORS, RESULTS, SKIPPED, BatchError, Inputs, resolve_inputs
from service.batch.job import Job, JobSpec, sha256
from service.batch.local import run_local
from service.batch.steps import Timer, load_batch_model
from service.runtime import ModelRuntime, choose_default, model_files
from service.settings import Settings, SettingsError, cpu_threads, load_settings

ENGINES = ("local", "ray")


@dataclass
class BatchConfig:
    """One batch job (the options of ``stn batch``)."""

    input: str  # folder, glob or manifest: a local path or a URI (s3://, memory://, file://...)
    output: str  # folder for the rectified images and the reports: a local path or a URI
    model: str | None = None  # .onnx file, folder or model name; None: the server's default model
    format: str = "png"  # png, jpeg, webp
    quality: int = images.DEFAULT_QUALITY  # JPEG / WebP quality (images.QUALITY: 1 to 100)
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
    not_images: int  # files of a folder or glob that are not images (lines of skipped.jsonl)
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
               f"{self.not_images} file(s) skipped as not images; outputs in {self.output}; see {RESULTS}, {ERRORS} "
               f"and {SKIPPED} there"]
        total = sum(self.stages.values())
        if total > 0:
            out.append("time per stage (seconds summed over workers): " + ", ".join(
                f"{k} {v:.2f}s ({100 * v / total:.0f}%)" for k, v in self.stages.items()))
        return out


def batch_settings() -> Settings:
    """The server's settings from the STN_* environment; BatchError (exit 2) naming what does not validate."""
    try:
        return load_settings()
    except SettingsError as e:
        raise BatchError(str(e)) from None


def resolve_model_path(model: str | None = None) -> Path:
    """``--model``: an .onnx file, a folder (its default model), or a model name in STN_MODEL_DIR.

    Without it: the server's default (``service.runtime.choose_default``): STN_DEFAULT_MODEL in
    STN_MODEL_DIR, else the model its ``DEFAULT`` file names, else the first by name there;
    STN_MODEL_DIR defaults to the bundled ``models/default/``.
    """
    settings = batch_settings()
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


def run_job(config: BatchConfig, model: ModelRuntime | None = None) -> Summary:
    """Run one job to the end (or until interrupted: KeyboardInterrupt propagates, the journal is kept)."""
    if config.format not in images.ENCODINGS:
        raise BatchError(f"--format must be one of {', '.join(images.ENCODINGS)}, got {config.format!r}")
    if config.engine not in ENGINES:
        raise BatchError(f"--engine must be one of {', '.join(ENGINES)}, got {config.engine!r}")
    for name, value in (("INPUT", config.input), ("OUTPUT", config.output)):
        if not os.fspath(value).strip():  # an unset shell variable: Path("") is the current folder
            raise BatchError(f"{name} is empty; name a folder, glob, manifest or URI (to use the current folder, "
                             "say `.`)")
    try:
        images.check_quality(config.quality)
    except ValueError as e:
        raise BatchError(f"--{e}") from None
    for name, value, least in (("batch-size", config.batch_size, 1), ("workers", config.workers, 0),
                               ("ray-actors", config.ray_actors, 0),
                               ("ray-num-cpus", 1 if config.ray_num_cpus is None else config.ray_num_cpus, 1)):
        if value < least:
            raise BatchError(f"--{name} must be at least {least}; got {value}")
    t0 = time.perf_counter()
    settings = batch_settings()
    path = Path(model.path) if model is not None else resolve_model_path(config.model)
    if model is None:
        model = load_batch_model(path, config.providers)
    inputs = resolve_inputs(config.input, config.output, config.format, config.input_root)
    spec = JobSpec(model.info.name, model.info.version, sha256(path), config.format, config.quality,
                   list(config.size) if config.size else None)
    job = Job(config.output, inputs, spec, config.overwrite)  # holds OUTPUT until the end of the run
    try:
        return _run(config, job, model, path, settings, inputs, t0)
    finally:
        job.release()


def _run(config: BatchConfig, job: Job, model: ModelRuntime, path: Path, settings: Settings, inputs: Inputs,
         t0: float) -> Summary:
    timer = Timer()
    t_run = time.perf_counter()
    bar = tqdm(total=len(inputs.items), initial=len(job.done), unit="img", disable=not config.progress,
               dynamic_ncols=True, smoothing=0.05, desc="stn batch")
    try:
        if config.engine == "ray":
            from service.batch.ray_data import run_ray  # Ray: heavy and optional, loaded when asked for

            run_ray(job, path, settings.limits, config.format, config.quality, config.size, config.batch_size,
                    config.providers, config.ray_address, config.ray_num_cpus, config.ray_actors, bar, timer)
        else:
            run_local(job, model, settings.limits, config.format, config.quality, config.size, config.batch_size,
                      cpu_threads(config.workers), bar, timer)
    finally:
        bar.close()
        job.close()
    run_s = time.perf_counter() - t_run
    ok, failed = job.finish()
    return Summary(total=len(inputs.items) + len(inputs.rejected), processed=len(job.todo), skipped=len(job.done),
                   failed=failed, ok=ok, not_images=len(inputs.not_images), wall_s=time.perf_counter() - t0,
                   run_s=run_s, stages=dict(timer.seconds), engine=config.engine,
                   model=f"{model.info.name} v{model.info.version} ({path.name})", output=os.fspath(config.output))
