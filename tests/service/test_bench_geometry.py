"""``stn bench geometry`` runs and reports every family and contender (a smoke test; speed is measured by running
the bench itself, docs/BENCHMARKS.md)."""

from __future__ import annotations

import json

from stn.cli import main


def test_bench_geometry_reports_every_family(capsys) -> None:  # noqa: ANN001
    assert main(["bench", "geometry", "--repeats", "1", "--number", "1", "--points", "4"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["geometry_us"]
    assert set(last) == {"affine", "projective", "tps"}
    for rows in last.values():
        assert {"matrices", "describe", "describe + points"} <= set(rows) and 0.5 < rows["coverage"] < 1.0
        assert all(rows[k]["median_us"] > 0 for k in ("matrices", "describe", "describe + points"))
