"""The local engine of ``stn batch``: threads on one machine.

A pool of CPU threads reads, decodes and resizes images ahead while the calling thread localises full
batches; the same pool samples and encodes each image, and a small I/O pool writes it (so a slow disk
does not hold a CPU worker). Bounded: at most a few batches of images are in memory.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from service import images, pipeline
from service.batch.inputs import Item
from service.batch.job import Job
from service.batch.steps import Timer, finish_image, prepare_item, reason
from service.runtime import ModelRuntime


def run_local(job: Job, model: ModelRuntime, limits: images.Limits, fmt: str, quality: int,
              size: tuple[int, int] | None, batch_size: int, workers: int, bar: Any, timer: Timer) -> None:
    """Rectify ``job.todo``, writing outputs and journal lines as they finish."""
    batch = max(1, batch_size)
    window = max(2 * batch, 4 * workers)

    def prepare(item: Item) -> tuple[Item, pipeline.Prepared | None, str | None]:
        return item, *prepare_item(model, item, limits, timer)

    def write(item: Item, data: bytes, record: dict[str, Any]) -> None:
        with timer("write"):
            job.write_result(item, data, record)

    def finish(item: Item, prepared: pipeline.Prepared, theta: np.ndarray) -> Future | None:
        try:
            data, record = finish_image(model, item, prepared, theta, fmt, quality, size, timer)
            return io_pool.submit(write, item, data, record)
        except Exception as e:  # noqa: BLE001
            job.write_error(item, reason(e))
            return None

    todo = iter(job.todo)
    exhausted = False
    decoding: set[Future] = set()
    finishing: set[Future] = set()
    writing: set[Future] = set()
    ready: list[tuple[Item, pipeline.Prepared]] = []
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
