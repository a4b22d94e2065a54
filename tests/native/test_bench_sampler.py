"""`stn bench sampler` runs every contender (a smoke test; the numbers live in docs/BENCHMARKS.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import native

ROOT = Path(__file__).resolve().parents[2]


def test_bench_sampler_smoke() -> None:
    out = subprocess.run([sys.executable, "-m", "stn", "bench", "sampler", "--sizes", "16", "--batch-sizes", "2",
                          "--threads", "1", "--rounds", "1", "--min-seconds", "0.01"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    expected = ["ort-gridsample", "torch", "opencv"] + (["native-warp", "native-grid"] if native.available() else [])
    for name in expected:
        assert f" {name} " in out.stdout, out.stdout
    if native.available():
        assert "16_b2_t1_native-warp_vs_torch" in out.stdout.splitlines()[-1]
    else:
        assert "NOT available" in out.stdout
