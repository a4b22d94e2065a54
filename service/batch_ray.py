"""The Ray Data engine of ``stn batch`` (``--engine ray``): the same job, scaled out over a Ray cluster.

::

    driver: Job (resume, journal) -> the items still to do
      -> ray.data.from_items -> map_batches(decode_batch)            (tasks: read + decode, service.images)
      -> map_batches(RectifyActor, concurrency=N, num_gpus=1 if GPUs) (actors: pipeline.prepare_array,
                                                                       batched localise, rectify, encode)
      -> driver: iter_batches -> Job.write_result / write_error       (atomic outputs, journal, reports)

Every image goes through the same functions as the local engine (``service.batch.read_image``,
``service.pipeline``, ``service.batch.finish_image``), so the outputs and reports are the same bytes.
Workers read the input paths themselves (on a cluster INPUT must be on storage every node mounts at
the same path); the model travels as bytes to the actors; outputs are written by the driver, so
OUTPUT only needs to be on the driver's machine. See docs/BATCH.md.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from export.metadata import ModelInfo
from service.batch import BatchConfig, Item, Job, Timer, _reason, finish_image, read_image


def decode_batch(batch: dict[str, np.ndarray], max_bytes: int, max_pixels: int,
                 formats: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Rows (source, path, output) -> rows with the decoded float32 image (its own colour) as bytes + shape and
    its precision (bits), or an error."""
    from service import images

    limits = images.Limits(max_bytes=max_bytes, max_pixels=max_pixels, formats=formats or images.DEFAULT_FORMATS)
    pixels, shapes, bits, errors = [], [], [], []
    t0 = time.perf_counter()
    for path, source in zip(batch["path"], batch["source"], strict=True):
        try:
            decoded = read_image(str(path), limits, str(source))
            pixels.append(decoded.array.tobytes())
            shapes.append(list(decoded.array.shape))
            bits.append(decoded.bits)
            errors.append("")
        except Exception as e:  # noqa: BLE001 (an unreadable file is an error line)
            pixels.append(b"")
            shapes.append([0, 0, 0])
            bits.append(8)
            errors.append(_reason(e))
    return {"source": batch["source"], "path": batch["path"], "output": batch["output"],
            "pixels": np.array(pixels, dtype=object), "shape": np.array(shapes, dtype=np.int64),
            "bits": np.array(bits, dtype=np.int64),
            "error": np.array(errors, dtype=object),
            "decode_s": np.array([time.perf_counter() - t0] + [0.0] * (len(errors) - 1), dtype=np.float64)}


class RectifyActor:
    """One onnxruntime model per actor: prepare, batched localise, sample, encode (service.pipeline)."""

    def __init__(self, model_bytes: bytes, model_name: str, providers: tuple[str, ...] | None, fmt: str,
                 quality: int, size: tuple[int, int] | None) -> None:
        from service.batch import load_batch_model

        with tempfile.TemporaryDirectory(prefix="stn-batch-model-") as folder:  # loaded into memory, then removed
            path = Path(folder) / model_name
            path.write_bytes(model_bytes)
            self.model = load_batch_model(path, providers)
        self.fmt, self.quality, self.size = fmt, quality, size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from service import pipeline

        n = len(batch["source"])
        encoded: list[bytes] = [b""] * n
        records: list[str] = [""] * n
        errors = [str(e) for e in batch["error"]]
        prepared = []
        timer = Timer()
        timer.seconds["read_decode"] = float(np.sum(batch["decode_s"]))  # from decode_batch, same stage names
        for i in range(n):
            if errors[i]:
                continue
            try:
                a = np.frombuffer(batch["pixels"][i], np.float32).reshape(tuple(int(v) for v in batch["shape"][i]))
                with timer("prepare"):
                    prepared.append((i, pipeline.prepare_array(self.model, a, str(batch["source"][i]),
                                                               int(batch["bits"][i]))))
            except Exception as e:  # noqa: BLE001
                errors[i] = _reason(e)
        with timer("localise"):
            thetas = pipeline.localise(self.model, [p for _, p in prepared])
        for (i, p), theta in zip(prepared, thetas, strict=True):
            item = Item(str(batch["source"][i]), str(batch["path"][i]), str(batch["output"][i]))
            try:
                data, record = finish_image(self.model, item, p, theta, self.fmt, self.quality, self.size, timer)
                encoded[i], records[i] = data, json.dumps(record)
            except Exception as e:  # noqa: BLE001
                errors[i] = _reason(e)
        return {"source": batch["source"], "path": batch["path"], "output": batch["output"],
                "encoded": np.array(encoded, dtype=object), "record": np.array(records, dtype=object),
                "error": np.array(errors, dtype=object),
                "timing": np.array([json.dumps(timer.seconds)] + [""] * (n - 1), dtype=object)}


def run_ray(job: Job, config: BatchConfig, model_path: Path, info: ModelInfo, bar: Any, timer: Timer) -> None:
    """Run the items still to do through Ray Data; the driver writes outputs and journal lines as they come."""
    import ray

    from service.batch import default_limits

    started = False
    t0 = time.perf_counter()
    address = config.ray_address or os.environ.get("RAY_ADDRESS")  # as `ray.init()` itself reads it
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=config.ray_num_cpus, include_dashboard=False, log_to_driver=False)
            started = True
    timer.seconds["ray_start"] = time.perf_counter() - t0
    try:
        if not job.todo:
            return
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        # Ray Data fuses decode_batch into the actors when they ask for the same resources (CPU clusters):
        # then every actor decodes its own batches; one CPU is left for the tasks that are not fused
        actors = config.ray_actors or (gpus if gpus else max(1, cpus - 1))
        limits = default_limits()
        batch = max(1, config.batch_size)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.verbose_stats_logs = False
        rows = [{"source": it.source, "path": it.path, "output": it.output} for it in job.todo]
        blocks = max(1, min(len(rows) // batch + 1, 4 * cpus))
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
        ds = ds.map_batches(decode_batch, batch_size=batch, batch_format="numpy",
                            fn_kwargs={"max_bytes": limits.max_bytes, "max_pixels": limits.max_pixels,
                                       "formats": limits.formats})
        providers = config.providers or (("CUDAExecutionProvider", "CPUExecutionProvider") if gpus else
                                         ("CPUExecutionProvider",))
        ds = ds.map_batches(RectifyActor, batch_size=batch, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=actors),
                            num_gpus=1 if gpus else 0, num_cpus=1,
                            fn_constructor_kwargs={"model_bytes": model_path.read_bytes(),
                                                   "model_name": model_path.name, "providers": providers,
                                                   "fmt": config.format, "quality": config.quality,
                                                   "size": config.size})
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(out["source"])):
                item = Item(str(out["source"][i]), str(out["path"][i]), str(out["output"][i]))
                if out["error"][i]:
                    job.write_error(item, str(out["error"][i]))
                else:
                    with timer("write"):
                        job.write_result(item, bytes(out["encoded"][i]), json.loads(out["record"][i]))
                bar.update(1)
                if out["timing"][i]:  # each actor call reports its stage times on its first row
                    for k, v in json.loads(str(out["timing"][i])).items():
                        timer.seconds[k] = timer.seconds.get(k, 0.0) + v
    finally:
        if started:
            ray.shutdown()
