"""models.experiment and ``stn experiment paper-table``: every run trained once, summarised, resumable."""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from models import experiment as X
from models.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
STN = ROOT / ".venv" / "bin" / "stn"


def test_plan_seeds_only_the_repeated_models_and_puts_big_canvases_first() -> None:
    plan = X.Plan(distortions=("R", "P", "RTS"), transforms=("affine", "tps"), seeds=3)  # seeded: RTS and P
    runs = plan.runs()
    keys = [r.key for r in runs]
    assert len(keys) == len(set(keys))
    assert sorted(keys) == sorted(
        [f"{d}/{m}-s{s}" for d in ("P", "RTS") for m in ("cnn", "affine") for s in range(3)]
        + ["P/tps-s0", "RTS/tps-s0", "R/cnn-s0", "R/affine-s0", "R/tps-s0"])
    assert all(r.distortion == "RTS" for r in runs[:4]), "the 42x42 RTS runs go first"


def test_every_run_gets_the_same_budget(tmp_path: Path) -> None:
    budget = X.Budget(steps=7, batch_size=16, lr=2e-3, loc_lr_mult=0.5, head="grid", limit_train=100)
    configs = [X.train_config_for(r, budget, "data", tmp_path) for r in X.Plan(budget=budget).runs()]
    for c in configs:
        assert (c.steps, c.batch_size, c.lr, c.loc_lr_mult, c.head, c.limit_train, c.mode) == (
            7, 16, 2e-3, 0.5, "grid", 100, "classify")
        assert c.eval_seed == budget.eval_seed  # one distorted test set per distortion
    assert {c.model for c in configs} == {"cnn", "stn"}
    assert len({c.out for c in configs}) == len(configs)


def _check_summary(out: Path, plan: X.Plan, summary: dict) -> None:
    """results.json agrees with the runs' own metrics.json files."""
    for d in plan.distortions:
        row = summary["results"][d]
        for model in ("cnn", *plan.transforms):
            seeds = plan.seeds_for(d, model)
            errors = [json.loads((out / X.Run(d, model, s).key / "metrics.json").read_text())["test_error"]
                      for s in range(seeds)]
            cell = row[model]
            assert cell["error"]["n"] == seeds
            assert cell["error"]["mean"] == pytest.approx(statistics.fmean(errors))
            assert cell["error"]["std"] == pytest.approx(statistics.stdev(errors) if seeds > 1 else 0.0)
            if model != "cnn":
                assert set(cell["residual_spread"]) == {"angle_deg", "log_scale", "tx", "ty"}
                base = row["cnn"]["error"]["mean"]
                if base:
                    assert cell["reduction_vs_cnn"] == pytest.approx((base - cell["error"]["mean"]) / base)
                params = json.loads((out / X.Run(d, model, 0).key / "metrics.json").read_text())["parameters"]
                assert abs(row["cnn"]["parameters"] / params - 1) <= 0.10, "parameter counts must match within 10%"


@pytest.mark.slow
def test_paper_table_end_to_end_and_resume(tiny_idx: Path, tmp_path: Path) -> None:
    out = tmp_path / "table"
    cmd = [str(STN), "experiment", "paper-table", "--out", str(out), "--data", str(tiny_idx),
           "--distortions", "R", "P", "--transforms", "affine", "projective", "--seeds", "2", "--seeded", "R", "P", "--steps", "3",
           "--batch-size", "16", "--jobs", "2"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "10 to train" in first.stdout
    plan = X.Plan(distortions=("R", "P"), transforms=("affine", "projective"), seeds=2, repeat_on=("R", "P"),
                  budget=X.Budget(steps=3, batch_size=16))
    for run in plan.runs():
        folder = out / run.key
        assert {"checkpoint.pt", "metrics.json", "sheet.png"} <= {p.name for p in folder.iterdir()}, run.key
        ckpt = load_checkpoint(folder / "checkpoint.pt")
        assert ckpt.kind == ("cnn" if run.model == "cnn" else "st-cnn")
        assert ckpt.meta["metrics"]["steps"] == 3
        if run.model != "cnn":
            assert ckpt.stn_config.transform == run.model
    summary = json.loads((out / "results.json").read_text())
    _check_summary(out, plan, summary)
    md = (out / "results.md").read_text()
    assert "| ST-CNN affine |" in md and "(n=2)" in md and "Relative error reduction" in md
    figure = Image.open(out / "figure.png")
    assert figure.size[1] > 2 * 2 * 64  # two distortions, an input row and a rectified row each

    # resume: nothing is trained again; a removed run (and only it) is
    stamp = {r.key: (out / r.key / "metrics.json").stat().st_mtime_ns for r in plan.runs()}
    (out / "P/affine-s1/metrics.json").unlink()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "9 already done, 1 to train" in again.stdout
    for run in plan.runs():
        if run.key != "P/affine-s1":
            assert (out / run.key / "metrics.json").stat().st_mtime_ns == stamp[run.key], run.key
    assert (out / "P/affine-s1/metrics.json").exists()
    resumed = json.loads((out / "results.json").read_text())["results"]
    for d in plan.distortions:  # training is deterministic: the retrained run gives the same test error
        for model in ("cnn", *plan.transforms):
            assert resumed[d][model]["error"] == summary["results"][d][model]["error"], (d, model)


def test_a_failing_run_is_reported_and_the_others_finish(tiny_idx: Path, tmp_path: Path) -> None:
    """A run whose output folder cannot be written fails alone; the report says which and why."""
    plan = X.Plan(distortions=("none",), transforms=("affine",), seeds=1, budget=X.Budget(steps=2, batch_size=8))
    out = tmp_path / "out"
    (out / "none").mkdir(parents=True)
    (out / "none" / "affine-s0").write_text("a file where the run's folder should be")
    lines: list[str] = []
    summary = X.run_paper_table(plan, out, str(tiny_idx), jobs=1, progress=lines.append)
    assert len(summary["failures"]) == 1, summary["failures"]
    assert summary["failures"][0].startswith("none/affine-s0: "), summary["failures"]
    assert (out / "none/cnn-s0/metrics.json").exists(), "the CNN run still trained"
    assert "affine" not in summary["results"]["none"]
    md = (out / "results.md").read_text()
    assert "Failed runs" in md and "none/affine-s0" in md
    assert any("none/affine-s0" in line for line in lines)


@pytest.mark.parametrize(("extra", "message"), [
    (["--lr", "-1"], "lr and loc_lr_mult must be > 0"),
    (["--data", "/nonexistent/fmnist"], "does not exist"),
])
def test_bad_options_fail_once_before_training(tiny_idx: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    cmd = [str(STN), "experiment", "paper-table", "--out", str(tmp_path / "out"), "--data", str(tiny_idx),
           "--steps", "2", *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("error:") == 1
    assert not (tmp_path / "out").exists(), "nothing is written for a plan that cannot run"
