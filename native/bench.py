"""``stn bench sampler``: the native sampler vs onnxruntime's GridSample, torch.grid_sample and
OpenCV's warpAffine, side by side in one run, at the same thread count.

One affine warp (a mild rotation, scale and shift) of a C x S x S image into S x S, for each
image size, batch size and thread count. Contenders:

- ``native-warp``: ``ai.stn::Warp`` (theta in, coordinates on the fly; what the service runs);
- ``native-grid``: ``ai.stn::GridSample`` on the precomputed grid;
- ``ort-gridsample``: onnxruntime's standard ``GridSample`` on the same grid;
- ``torch``: ``torch.nn.functional.grid_sample`` on the same grid;
- ``opencv``: ``cv2.warpAffine`` (INTER_LINEAR | WARP_INVERSE_MAP, BORDER_CONSTANT 0) image by image
  on HWC copies made before timing (its native layout), with ``models.frames.input_px_from_output_px``.

Contenders run interleaved, round after round; each number is the median over rounds. The last
line is one JSON object of ratios (``native-warp`` and ``native-grid`` vs ``torch`` and vs
``ort-gridsample``, per case).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from collections.abc import Callable

import numpy as np


def configure_bench_sampler(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 1024], help="square image sizes (default 224 1024)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts, for every contender")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each number is the median")
    p.add_argument("--min-seconds", type=float, default=0.2, help="minimum time per contender per round")


def bench_case(size: int, batch: int, threads: int, channels: int, rounds: int, min_seconds: float) -> list[dict]:
    import cv2
    import onnxruntime as ort
    import torch
    import torch.nn.functional as F

    import native
    from models import frames

    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    rng = np.random.default_rng(size + batch)
    x = rng.random((batch, channels, size, size), dtype=np.float32)
    a, s = np.deg2rad(10.0), 0.9
    theta = np.tile(np.array([[s * np.cos(a), -s * np.sin(a), 0.05], [s * np.sin(a), s * np.cos(a), -0.03]],
                             np.float32), (batch, 1, 1))
    xt, tt = torch.from_numpy(x), torch.from_numpy(theta)
    grid = F.affine_grid(tt, [batch, channels, size, size], align_corners=False).contiguous()
    grid_np = grid.numpy()
    size_like = np.zeros((size, size, 3), np.float32)
    hwc = [np.ascontiguousarray(img.transpose(1, 2, 0)) for img in x]
    m = frames.input_px_from_output_px(theta[0], (size, size), (size, size))[:2].astype(np.float64)

    def session(model: bytes, use_native: bool) -> ort.InferenceSession:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if use_native:
            native.register(so)
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])

    contenders: dict[str, Callable[[], object]] = {}
    if native.available():
        warp = session(native.op_model(native.WARP), True)
        gs = session(native.op_model(native.GRID_SAMPLE), True)
        contenders["native-warp"] = lambda: warp.run(None, {"X": x, "T": theta, "S": size_like})
        contenders["native-grid"] = lambda: gs.run(None, {"X": x, "G": grid_np})
    ort_gs = session(native.op_model(domain=""), False)
    contenders["ort-gridsample"] = lambda: ort_gs.run(None, {"X": x, "G": grid_np})

    def torch_run() -> object:
        with torch.inference_mode():
            return F.grid_sample(xt, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    contenders["torch"] = torch_run
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    contenders["opencv"] = lambda: [cv2.warpAffine(img, m, (size, size), flags=flags, borderMode=cv2.BORDER_CONSTANT,
                                                   borderValue=0) for img in hwc]
    from export.bench import time_round

    per_round: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            fn()  # warm-up
            per_round[name].append(time_round(fn, min_seconds, 2))
    return [{"size": size, "batch": batch, "threads": threads, "contender": name,
             "ms_per_batch": 1e3 * statistics.median(v)} for name, v in per_round.items()]


def run(sizes: list[int], batch_sizes: list[int], threads: list[int], channels: int = 3, rounds: int = 5,
        min_seconds: float = 0.2) -> tuple[list[dict], dict]:
    rows: list[dict] = []
    for size, batch, t in itertools.product(sizes, batch_sizes, threads):
        rows += bench_case(size, batch, t, channels, rounds, min_seconds)
    ratios = {}
    for size, batch, t in itertools.product(sizes, batch_sizes, threads):
        case = {r["contender"]: r["ms_per_batch"] for r in rows
                if (r["size"], r["batch"], r["threads"]) == (size, batch, t)}
        for mine in ("native-warp", "native-grid"):
            if mine in case:
                for other in ("torch", "ort-gridsample"):
                    ratios[f"{size}_b{batch}_t{t}_{mine}_vs_{other}"] = round(case[other] / case[mine], 2)
    return rows, ratios


def format_table(rows: list[dict]) -> str:
    lines = [f"{'size':>5} {'batch':>5} {'thr':>3} {'contender':<15} {'ms/batch':>10} {'vs torch':>8}"]
    for r in rows:
        torch_ms = next(q["ms_per_batch"] for q in rows if q["contender"] == "torch" and
                        (q["size"], q["batch"], q["threads"]) == (r["size"], r["batch"], r["threads"]))
        lines.append(f"{r['size']:>5} {r['batch']:>5} {r['threads']:>3} {r['contender']:<15} "
                     f"{r['ms_per_batch']:>10.3f} {torch_ms / r['ms_per_batch']:>7.2f}x")
    return "\n".join(lines)


def run_bench_sampler(args: argparse.Namespace) -> int:
    import native

    st = native.status()
    print(f"native sampler: {'available, ' + st['info'] if st['available'] else 'NOT available: ' + st['reason']}")
    rows, ratios = run(args.sizes, args.batch_sizes, args.threads, args.channels, args.rounds, args.min_seconds)
    print(format_table(rows))
    print(json.dumps(ratios, sort_keys=True))
    return 0
