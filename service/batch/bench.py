"""``stn bench batch``: the local batch engine vs a naive loop and the bare model, side by side in one run.

- **local**: ``service.batch.run.run_job`` (the engine of ``stn batch``) on a folder of generated JPEGs.
- **naive**: one image at a time: read, decode (``service.images.decode``), normalize, the *full* exported
  model through onnxruntime (default session options), encode (PNG), write. No overlap, no batching.
- **bare**: the full model through onnxruntime, batched, on the same images decoded beforehand: only
  ``session.run`` is timed; the ceiling for the model part.
- **ray** (optional): ``run_job`` with the Ray Data engine on a local Ray.

The report says where the time goes (seconds per stage) and ends with one JSON line of throughputs
and ratios (``local_vs_naive``, ...). Without ``--model``, the benches' stand-in model and images
(``service.standin``: no torch here, the model is exported by a subprocess once).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.metadata import ModelInfo
from service import images
from service.batch.run import BatchConfig, resolve_model_path, run_job
from service.runtime import resolve_providers
from service.settings import Settings, cpu_threads
from service.standin import make_jpegs, standin_model


def bench_model(model: str | None, folder: Path) -> Path:
    """``--model`` (a file, a folder, a name in STN_MODEL_DIR), else the benches' stand-in model (exported once
    into ``folder``): numbers that do not move with models/default."""
    if model is not None:
        return resolve_model_path(model)
    return standin_model(folder)[0]


def make_images(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """``n`` JPEGs of ``size`` (h, w) in ``folder``/img (``service.standin.make_jpegs``; kept for the next run)."""
    d = folder / "img"
    marker = folder / f"generated-standin-{n}-{size[1]}x{size[0]}-{seed}"
    files = [d / f"{i // 500:02d}" / f"img{i:05d}.jpg" for i in range(n)]
    if marker.exists():
        return files
    shutil.rmtree(d, ignore_errors=True)
    for start in range(0, n, 100):  # in chunks: 2,000 JPEGs are not all held in memory
        for f, data in zip(files[start:start + 100], make_jpegs(min(100, n - start), size[1], size[0],
                                                                 seed * 1_000_003 + start), strict=True):
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(data)
    marker.write_text("ok\n")
    return files


def _full_session(model_path: Path):  # noqa: ANN202 (onnxruntime.InferenceSession)
    """The full exported model in onnxruntime with default session options (what a naive user would do)."""
    return ort.InferenceSession(str(model_path), providers=resolve_providers(Settings().session_config().providers))


def naive_loop(model_path: Path, files: list[Path], out: Path, fmt: str) -> tuple[float, dict[str, float]]:
    """Read -> decode -> infer (full model, one image) -> encode -> write, one image at a time; (seconds, stages)."""
    info = ModelInfo.from_file(model_path)
    sess = _full_session(model_path)
    mean = np.asarray(info.mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(info.std, np.float32).reshape(-1, 1, 1)
    limits = images.Limits()
    stages = {"read_decode": 0.0, "infer": 0.0, "encode": 0.0, "write": 0.0}
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for f in files:
        t = time.perf_counter()
        a = images.to_channels(images.decode(f.read_bytes(), limits, f.name).array, info.in_channels)
        t1 = time.perf_counter()
        rect = sess.run(["rectified"], {"image": ((a - mean) / std)[None].astype(np.float32)})[0][0]
        t2 = time.perf_counter()
        data = images.encode(rect * std + mean, fmt)
        t3 = time.perf_counter()
        (out / (f.stem + images.suffix(fmt))).write_bytes(data)
        t4 = time.perf_counter()
        for k, dt in zip(stages, (t1 - t, t2 - t1, t3 - t2, t4 - t3), strict=True):
            stages[k] += dt
    return time.perf_counter() - t0, stages


def decode_all(model_path: Path, files: list[Path]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The images decoded beforehand for the bare model (uint8 HWC, to keep 2,000 of them small), mean, std."""
    info = ModelInfo.from_file(model_path)
    limits = images.Limits()
    decoded = [images.to_uint8(images.to_channels(images.decode(f.read_bytes(), limits, f.name).array,
                                                  info.in_channels)) for f in files]
    return (decoded, np.asarray(info.mean, np.float32).reshape(1, -1, 1, 1),
            np.asarray(info.std, np.float32).reshape(1, -1, 1, 1))


def bare_model(model_path: Path, decoded: tuple[list[np.ndarray], np.ndarray, np.ndarray], batch_size: int) -> float:
    """Seconds of ``session.run`` alone for all images (decoded and normalized beforehand), batched."""
    sess = _full_session(model_path)
    arrays, mean, std = decoded
    total = 0.0
    for i in range(0, len(arrays), batch_size):
        chunk = np.stack(arrays[i:i + batch_size])
        chunk = chunk.transpose(0, 3, 1, 2) if chunk.ndim == 4 else chunk[:, None]
        x = ((chunk.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
        t = time.perf_counter()
        sess.run(["rectified", "theta"], {"image": x})
        total += time.perf_counter() - t
    return total


def _stages(stages: dict[str, float]) -> str:
    total = sum(stages.values()) or 1.0
    return ", ".join(f"{k} {v:.2f}s ({100 * v / total:.0f}%)" for k, v in stages.items())


def run(args: argparse.Namespace) -> int:
    folder = Path(args.data_dir or Path(tempfile.gettempdir()) / "stn-bench-batch")
    folder.mkdir(parents=True, exist_ok=True)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets) - {"local", "naive", "bare", "ray"}
    if unknown:
        print(f"unknown targets {sorted(unknown)}; use local, naive, bare, ray", file=sys.stderr)
        return 2
    h, w = args.image_size
    t = time.perf_counter()
    files = make_images(folder, args.images, (h, w))
    print(f"{len(files)} JPEGs of {w}x{h} in {folder / 'img'} (ready in {time.perf_counter() - t:.1f}s)")
    model_path = bench_model(args.model, folder)
    workers = cpu_threads(args.workers)
    print(f"model {model_path}; output {args.format}; batch {args.batch_size}; local engine workers {workers}; "
          f"{os.cpu_count()} CPUs; {args.repeat} interleaved round(s), best kept; load average "
          f"{os.getloadavg()[0]:.1f} at start")
    n = len(files)
    decoded = decode_all(model_path, files) if "bare" in targets else None
    best: dict[str, tuple[float, float, str]] = {}  # target -> (images/s, CPU ms per image, details)
    for r in range(args.repeat):
        for target in targets:
            out = folder / f"out-{target}"
            shutil.rmtree(out, ignore_errors=True)
            cpu0 = time.process_time()
            if target in ("local", "ray"):
                cfg = BatchConfig(input=str(folder / "img"), output=str(out), model=str(model_path),
                                        format=args.format, batch_size=args.batch_size, workers=workers,
                                        engine=target, progress=False, ray_num_cpus=os.cpu_count())
                s = run_job(cfg)
                assert s.ok == n, f"{target}: {s.failed} images failed"
                secs, details = s.run_s, f"stages, seconds summed over workers: {_stages(s.stages)}"
            elif target == "naive":
                secs, stages = naive_loop(model_path, files, out, args.format)
                details = f"stages: {_stages(stages)}"
            else:
                secs = bare_model(model_path, decoded, args.batch_size)
                details = f"session.run only, batch {args.batch_size}, images decoded beforehand"
            cpu_ms = (time.process_time() - cpu0) / n * 1e3
            rate = n / secs
            line = f"{target:<6} {rate:8.1f} img/s {secs:7.2f}s"
            if target != "ray":  # ray's work runs in other processes
                line += f" {cpu_ms:6.2f} CPU-ms/img"
            print(f"round {r + 1}: {line}  ({details})", flush=True)
            if target not in best or rate > best[target][0]:
                best[target] = (rate, cpu_ms, line + f"  ({details})")
            shutil.rmtree(out, ignore_errors=True)
    print("best of the rounds:")
    for target in targets:
        print("  " + best[target][2])
    rates = {k: v[0] for k, v in best.items()}
    summary: dict[str, float | int] = {"images": n, **{f"{k}_img_s": round(v, 1) for k, v in rates.items()}}
    if "naive" in rates:
        for k in rates:
            if k != "naive":
                summary[f"{k}_vs_naive"] = round(rates[k] / rates["naive"], 2)
    if "bare" in rates and "local" in rates:
        summary["local_vs_bare"] = round(rates["local"] / rates["bare"], 2)
    print(json.dumps(summary))
    return 0
