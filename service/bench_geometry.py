"""``stn bench geometry``: what a result's geometry costs (``service.geometry.describe``), per transform family,
side by side with the pixel matrices alone (what a result carried before coverage and points), in one run.

Per family (affine, projective, TPS) at one input and output size: ``matrices`` (the pixel matrices, or the
TPS's control points in pixels: ``models.frames`` only), ``describe`` (those plus ``coverage``), and
``describe + points`` (plus N points and N/4 boxes mapped input -> output: the TPS inverse for TPS). Median
and min of the repeats, in microseconds per result; one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np

from models import frames
from service import geometry


def _thetas(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {  # near the identity, partly off-image: the row-by-row coverage count, not its shortcut
        "affine": np.array([[1.05, 0.1, 0.08], [-0.1, 1.05, 0.0]]) + rng.normal(0, 0.01, (2, 3)),
        "projective": np.eye(3) + [[0.05, 0.1, 0.08], [-0.1, 0.05, 0.0], [0.1, 0.05, 0.0]],
        "tps": frames.tps_control_points((4, 4)) * 1.05 + rng.normal(0, 0.04, (16, 2)),
    }


def _matrices(family: str, theta: np.ndarray, input_size: tuple[int, int], output_size: tuple[int, int]) -> object:
    if family == "tps":
        return (theta @ frames.px_from_norm(input_size)[:2, :2].T).tolist()
    return (frames.input_px_from_output_px(theta, input_size, output_size).tolist(),
            frames.output_px_from_input_px(theta, input_size, output_size).tolist())


def _time(fn: Callable[[], object], repeats: int, number: int) -> tuple[float, float]:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - t0) / number * 1e6)
    return statistics.median(runs), min(runs)


def bench_geometry(input_size: tuple[int, int] = (1200, 1600), output_size: tuple[int, int] = (424, 300),
                   points: int = 16, repeats: int = 7, number: int = 20, seed: int = 0) -> dict[str, dict]:
    """{family: {contender: {"median_us", "min_us"}}}."""
    rng = np.random.default_rng(seed)
    h, w = input_size
    query = geometry.Query(np.stack([rng.uniform(0, w - 1, points), rng.uniform(0, h - 1, points)], axis=-1),
                           np.array([[w * 0.2, h * 0.2, w * 0.6, h * 0.5]] * max(1, points // 4)))
    out: dict[str, dict] = {}
    for family, theta in _thetas(seed).items():
        contenders = {
            "matrices": lambda f=family, t=theta: _matrices(f, t, input_size, output_size),
            "describe": lambda f=family, t=theta: geometry.describe(f, t, input_size, output_size),
            "describe + points": lambda f=family, t=theta: geometry.describe(f, t, input_size, output_size,
                                                                             query=query),
        }
        out[family] = {}
        for name, fn in contenders.items():
            med, best = _time(fn, repeats, number)
            out[family][name] = {"median_us": round(med, 1), "min_us": round(best, 1)}
        out[family]["coverage"] = geometry.describe(family, theta, input_size, output_size)["coverage"]
    return out


def configure_bench_geometry(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-size", default="1600x1200", help="WIDTHxHEIGHT of the upload (default 1600x1200)")
    p.add_argument("--output-size", default="300x424", help="WIDTHxHEIGHT of the result (default 300x424, A4)")
    p.add_argument("--points", type=int, default=16, help="points mapped per result (and points/4 boxes)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per contender (median and min reported)")
    p.add_argument("--number", type=int, default=20, help="calls per timed run")


def _size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return h, w


def run_bench_geometry(args: argparse.Namespace) -> int:
    result = bench_geometry(_size(args.input_size), _size(args.output_size), args.points, args.repeats, args.number)
    print(f"geometry per result, upload {args.input_size}, output {args.output_size}, {args.points} points "
          f"(microseconds: median / min of {args.repeats} runs of {args.number})")
    for family, rows in result.items():
        cells = "  ".join(f"{k}: {v['median_us']:.0f} / {v['min_us']:.0f}" for k, v in rows.items() if k != "coverage")
        print(f"  {family:<10} {cells}  (coverage {rows['coverage']:.3f})")
    print(json.dumps({"geometry_us": result}))
    return 0
