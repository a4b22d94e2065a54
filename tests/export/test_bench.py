"""The export benchmark's machinery runs (a smoke test; the numbers live in docs/BENCHMARKS.md)."""

from __future__ import annotations

from pathlib import Path

import torch

import native
from export.bench import bench_model, format_table, ratios_json
from models.stn import SpatialTransformer, STNConfig


def test_bench_model_rows_for_each_contender(tmp_path: Path) -> None:
    torch.manual_seed(0)
    stn = SpatialTransformer(STNConfig(loc_size=(20, 20), output_size=(24, 24))).eval()
    lowerings = ("onnx", "gather", "native") if native.available() else ("onnx", "gather")
    rows = bench_model("tiny", stn, (1, 2), lowerings, threads=1, rounds=1, min_seconds=0.01,
                       image_size=None, providers=["CPUExecutionProvider"], workdir=tmp_path)
    contenders = {(r["batch"], r["contender"]) for r in rows}
    expected = ("torch-eager", "ort-naive", *(f"ort-{k}" for k in lowerings))
    assert contenders == {(b, c) for b in (1, 2) for c in expected}
    assert all(r["images_per_s"] > 0 for r in rows)
    assert all(r["vs_torch"] == 1.0 for r in rows if r["contender"] == "torch-eager")
    assert "ort-naive" in format_table(rows)
    assert ratios_json({"tiny_b1_vs_torch": 1.5}) == '{"tiny_b1_vs_torch": 1.5}'
