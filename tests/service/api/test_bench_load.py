"""The load generators of ``stn bench serve`` (service.api.bench) against a real server: what they count.

The overload figure is only as good as its load generator, so its two connection modes are
checked here on a short, low-rate run (not a measurement: a few dozen requests).
"""

from __future__ import annotations

import asyncio
import os

import pytest

from service.api.bench import closed_loop, make_jpegs, open_loop
from tests.service.support import LiveServer

PATH = "/v1/rectify?model=affine&format=png"


@pytest.mark.parametrize("mode", ["new", "pool"])
def test_open_loop_counts_answers_and_the_connections_it_opened(server: LiveServer, mode: str) -> None:
    bodies = make_jpegs(2, 96, 64)
    out = asyncio.run(open_loop("127.0.0.1", server.port, PATH, bodies, 40.0, 1.0, 0.25, connections=mode))
    sent = 50  # 40/s for 1.25 s
    assert out["connections"] == mode and out["failed"] == 0 and out["shed_503"] == 0, out
    assert 20 <= out["goodput"] <= 50, out  # the 200s completed in the 1 s window, per second
    if mode == "new":
        assert out["opened"] == sent, out
    else:  # a request waits for no one: a connection is opened only when none is idle
        assert 1 <= out["opened"] <= sent // 2, out
    assert out["health_probes"] > 0


def test_open_loop_refuses_an_unknown_connection_mode(server: LiveServer) -> None:
    with pytest.raises(ValueError, match="new' or 'pool"):
        asyncio.run(open_loop("127.0.0.1", server.port, PATH, [b""], 1.0, 0.1, 0.0, connections="reuse"))


def test_closed_loop_reads_each_answer_whole(server: LiveServer) -> None:
    level = asyncio.run(closed_loop("127.0.0.1", server.port, PATH, make_jpegs(2, 96, 64), 2, 0.5, 0.1, os.getpid()))
    summary = level.summary()
    assert summary["errors"] == 0 and summary["throughput"] > 0, summary
