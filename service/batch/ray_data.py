"""The Ray Data engine of ``stn batch`` (``--engine ray``): the same job, scaled out over a Ray cluster.

::

    driver: Job (resume) -> the items still to do -> ray.data.from_items(rows: source, path, output)
      -> map_batches(RectifyActor, ActorPoolStrategy(size=N), num_gpus=1 if GPUs)
           each actor, per batch: read + decode (service.images), pipeline.prepare_array, one batched
           localise, pipeline.finish (sample, encode), then writes the outputs and one journal shard
           (OUTPUT/.stn-batch/journal/<uuid>.jsonl) itself, and returns per image only where its line is
      -> driver: iter_batches -> progress, Job.add_shard (the index of the journal), then the same reports

The driver's load does not grow with image bytes: it plans, tracks progress and merges reports. Every
image goes through the same functions as the local engine (``service.batch.steps``), so the outputs and
reports are the same bytes. Workers read INPUT and write OUTPUT themselves: on a cluster both must be
storage every node reaches at the same path or URI (NFS, a mounted bucket, ``s3://``). ``memory://``
lives in one process and is refused. Ray itself is imported on use (heavy and optional). See docs/BATCH.md.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from service import images, pipeline
from service.batch.inputs import BatchError, Item
from service.batch.job import Job, Store, journal_line
from service.batch.steps import Timer, finish_image, load_batch_model, prepare_item, reason


class RectifyActor:
    """One onnxruntime model per actor; per batch of rows: decode, prepare, batched localise, sample, encode,
    write the outputs and one journal shard."""

    def __init__(self, model_bytes: bytes, model_name: str, providers: tuple[str, ...] | None, fmt: str,
                 quality: int, size: tuple[int, int] | None, output: str, limits: images.Limits) -> None:
        with tempfile.TemporaryDirectory(prefix="stn-batch-model-") as folder:  # loaded into memory, then removed
            path = Path(folder) / model_name
            path.write_bytes(model_bytes)
            self.model = load_batch_model(path, providers)
        self.fmt, self.quality, self.size = fmt, quality, size
        self.store = Store(output)
        self.limits = limits

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        items = [Item(str(s), str(p), str(o)) for s, p, o in zip(batch["source"], batch["path"], batch["output"],
                                                                  strict=True)]
        timer = Timer()
        lines: list[str] = [""] * len(items)
        outputs: list[str] = [""] * len(items)
        prepared: list[tuple[int, pipeline.Prepared]] = []
        for i, item in enumerate(items):
            p, error = prepare_item(self.model, item, self.limits, timer)
            if p is None:
                lines[i] = journal_line(item.source, error=error or "unknown error")
            else:
                prepared.append((i, p))
        with timer("localise"):
            thetas = pipeline.localise(self.model, [p for _, p in prepared])
        for (i, p), theta in zip(prepared, thetas, strict=True):
            item = items[i]
            try:
                data, record = finish_image(self.model, item, p, theta, self.fmt, self.quality, self.size, timer)
            except Exception as e:  # noqa: BLE001
                lines[i] = journal_line(item.source, error=reason(e))
                continue
            with timer("write"):
                error = self.store.write_output(item, data)
            if error is None:
                lines[i], outputs[i] = journal_line(item.source, record), item.output
            else:
                lines[i] = journal_line(item.source, error=error)
        with timer("write"):
            shard = self.store.write_shard(lines)  # after the outputs it lists: a lost shard only means redoing them
        offsets = np.cumsum([0] + [len(line.encode("utf-8")) for line in lines])
        n = len(items)
        return {"source": batch["source"], "output": np.array(outputs, dtype=object),
                "shard": np.array([shard] * n, dtype=object), "offset": offsets[:-1].astype(np.int64),
                "length": np.diff(offsets).astype(np.int64),
                "timing": np.array([json.dumps(timer.seconds)] + [""] * (n - 1), dtype=object)}


def run_ray(job: Job, model_path: Path, limits: images.Limits, fmt: str, quality: int, size: tuple[int, int] | None,
            batch_size: int, providers: tuple[str, ...] | None, address: str | None, num_cpus: int | None,
            actors: int, bar: Any, timer: Timer) -> None:
    """Run the items still to do through Ray Data; the workers write, the driver indexes the journal shards."""
    if job.store.uri.startswith("memory://") or any(it.path.startswith("memory://") for it in job.todo[:1]):
        raise BatchError("memory:// lives in one process, which Ray's workers are not: use --engine local, or a "
                         "filesystem every worker reaches (a shared folder, s3://, gs://)")
    import ray  # heavy and optional (the `ray` extra): loaded when this engine runs

    started = False
    t0 = time.perf_counter()
    address = address or os.environ.get("RAY_ADDRESS")  # as `ray.init()` itself reads it
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            started = True
    timer.add("ray_start", time.perf_counter() - t0)
    try:
        if not job.todo:
            return
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        pool = actors or (gpus if gpus else max(1, cpus - 1))  # one CPU left for Ray's own tasks
        batch = max(1, batch_size)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.verbose_stats_logs = False
        rows = [{"source": it.source, "path": it.path, "output": it.output} for it in job.todo]
        blocks = max(1, min(len(rows) // batch + 1, 4 * cpus))
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
        providers = providers or (("CUDAExecutionProvider", "CPUExecutionProvider") if gpus else
                                  ("CPUExecutionProvider",))
        ds = ds.map_batches(RectifyActor, batch_size=batch, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=pool),
                            num_gpus=1 if gpus else 0, num_cpus=1,
                            fn_constructor_kwargs={"model_bytes": model_path.read_bytes(),
                                                   "model_name": model_path.name, "providers": providers,
                                                   "fmt": fmt, "quality": quality, "size": size,
                                                   "output": job.store.uri, "limits": limits})
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
            n = len(out["source"])
            job.add_entries((str(out["source"][i]), str(out["output"][i]) or None, str(out["shard"][i]),
                             int(out["offset"][i]), int(out["length"][i])) for i in range(n))
            bar.update(n)
            for t in out["timing"]:
                if t:  # each actor call reports its stage times on its first row
                    timer.merge(json.loads(str(t)))
    finally:
        if started:
            ray.shutdown()
