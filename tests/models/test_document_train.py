"""The document trainer on the classic trainer's machinery: keyed photos, resume, devices, torchrun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import _same_weights, _weights  # tests/models/test_train.py (the classic trainer's resume tests)

from models import document_train as dt
from models import documents as docs
from models.checkpoint import load_checkpoint
from models.train import ConfigError, TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny_photos(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small photos and pools (rendering 48 + 48 pool entries would take most of a test's time)."""
    monkeypatch.setattr(dt, "TRAIN_PHOTO_SIDES", (64, 96))
    monkeypatch.setattr(dt, "TRAIN_POOL", 4)


def _config(out: Path, **kw) -> TrainConfig:  # noqa: ANN003
    base = dict(mode="rectify", distortion="document", transform="projective", steps=8, batch_size=6, lr=2e-3,
                loc_size=(32, 32), output_size=(42, 30), limit_test=8, threads=2, workers=0, progress=False,
                out=str(out), created_by="test")
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------- the data


def _keyed(seed: int = 3) -> docs.DocumentGenerator:
    return docs.DocumentGenerator("train", seed=seed, photo_long_side=(48, 64), pool_pages=3, pool_backgrounds=3,
                                  refresh=4, background_size=64, page_width=96, keyed=True)


def test_keyed_generator_makes_any_photo_again() -> None:
    along = _keyed()
    photos = [along() for _ in range(30)]  # 7 refreshes: every slot re-rendered at least twice
    jumped = _keyed()
    for index in (21, 5, 29, 0):  # forwards and backwards, as a resumed run or another worker seeks
        jumped.seek(index)
        again = jumped()
        assert np.array_equal(again.photo, photos[index].photo) and np.array_equal(again.corners, photos[index].corners)
    assert not np.array_equal(photos[1].photo, photos[2].photo)
    assert not np.array_equal(_keyed(seed=4)().photo, photos[0].photo)  # the seed matters
    with pytest.raises(ValueError, match="keyed generator"):
        docs.DocumentGenerator("train", seed=0, pool_pages=1, pool_backgrounds=1, photo_long_side=(48, 64)).seek(3)


def test_step_photos_do_not_depend_on_the_process_that_makes_them() -> None:
    options = dict(photo_long_side=(48, 64), pool_pages=3, pool_backgrounds=3, refresh=4, background_size=64,
                   page_width=96)
    one = dt.StepPhotos((24, 24), 0, 4, lanes=2, **options)
    x5, y5 = one[5]
    assert x5.shape == (4, 3, 24, 24) and y5.shape == (4, 4, 2) and x5.dtype == y5.dtype == torch.float32
    for step in (0, 9, 3, 7):  # any order, as workers and a resumed run make them
        one[step]
    x5b, y5b = dt.StepPhotos((24, 24), 0, 4, lanes=2, **options)[5]
    assert torch.equal(x5, x5b) and torch.equal(y5, y5b)
    assert not torch.equal(one[3][1], y5)  # another batch of the same lane
    other_rank = dt.StepPhotos((24, 24), 0, 4, rank=1, lanes=2, **options)[5]
    assert not torch.equal(other_rank[1], y5)  # each rank composes its own photos


# --------------------------------------------------------------------------------- training


@pytest.mark.slow  # three short runs and a worker process: about 15 s on 2 shared cores
def test_interrupted_and_resumed_document_run_ends_with_the_same_weights(tiny_photos: None, tmp_path: Path) -> None:
    cfg = _config(tmp_path / "whole", steps=6, limit_test=4, eval_every=3)
    whole = train(cfg)
    assert not (tmp_path / "whole" / "last.pt").exists()  # finished: checkpoint.pt is the result
    assert [e["step"] for e in whole.metrics["evals"]] == [3]

    def interrupt(step: int, loss: float) -> None:
        if step == 4:
            raise KeyboardInterrupt

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(replace(cfg, out=str(out), save_every=2), on_step=interrupt)
    saved = load_checkpoint(out / "last.pt")
    assert saved.train_state["step"] == 4 and len(saved.train_state["history"]) == 4  # saved at the interruption
    assert not (out / "checkpoint.pt").exists()
    # the photo stream's lanes are the run's: resuming with a worker process draws the same photos
    resumed = train(replace(cfg, out=str(out), save_every=2, workers=1, resume=str(out / "last.pt")))
    _same_weights(_weights(whole.model), _weights(resumed.model))
    assert resumed.history == whole.history
    assert resumed.metrics["corner_error_median"] == whole.metrics["corner_error_median"]
    assert resumed.metrics["evals"] == whole.metrics["evals"]
    assert resumed.metrics["steps"] == 6 and resumed.metrics["workers"] == 1
    _same_weights(_weights(whole.model), load_checkpoint(out / "checkpoint.pt").build().state_dict())


def test_periodic_saves_are_resumable_by_default(tiny_photos: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 ) -> None:
    monkeypatch.setattr(dt, "SAVE_EVERY", 3)  # the default period (500 steps) when --save-every is not given

    def crash(step: int, loss: float) -> None:
        if step == 4:
            raise RuntimeError("crash")  # not an interruption: the periodic save at 3 is what is left

    cfg = _config(tmp_path / "r", steps=5, limit_test=4)
    with pytest.raises(RuntimeError, match="crash"):
        train(cfg, on_step=crash)
    saved = load_checkpoint(tmp_path / "r" / "last.pt")
    assert saved.train_state["step"] == 3 and saved.build_stn().config.parametrisation == "corners"
    with pytest.raises(ConfigError, match=r"--lr 0.002 -> 0.01"):  # other options than the run's own are refused
        train(replace(cfg, lr=0.01, resume=str(tmp_path / "r" / "last.pt")))
    resumed = train(replace(cfg, resume=str(tmp_path / "r" / "last.pt")))
    assert resumed.metrics["steps"] == 5 and len(resumed.history) == 5


def test_amp_bf16_on_the_cpu(tiny_photos: None, tmp_path: Path) -> None:
    result = train(_config(tmp_path / "bf16", steps=3, limit_test=4, device="auto", amp="bf16"))
    m = result.metrics
    assert m["amp"] == "bf16" and m["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert math.isfinite(m["final_train_loss"]) and m["world_size"] == 1 and m["steps_per_second"] > 0
    assert next(result.model.parameters()).dtype == torch.float32  # autocast, not a cast of the weights


def test_device_errors_name_the_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--amp fp16 needs a CUDA device"):
        train(_config(tmp_path / "x", amp="fp16", device="cpu"))
    with pytest.raises(ConfigError, match="--device must be auto, cpu, cuda or cuda:N"):
        train(_config(tmp_path / "x", device="gpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cli_device_cuda_without_cuda_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "stn", "train", "--mode", "rectify", "--distortion", "document",
                           "--transform", "projective", "--device", "cuda", "--steps", "1", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    assert "--device cuda: no CUDA device is usable here" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_torchrun_two_ranks_on_gloo_with_workers(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "ddp"
    args = ["--mode", "rectify", "--distortion", "document", "--transform", "projective", "--steps", "4",
            "--batch-size", "4", "--loc-size", "32", "32", "--output-size", "42", "30", "--limit-test", "4",
            "--threads", "1", "--workers", "1", "--save-every", "2", "--eval-every", "2", "--out", str(out),
            "--max-minutes", "30"]  # a time limit: the ranks agree on the clock every step (an all-reduce)
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "stn", "train", *args],
                          capture_output=True, text=True, timeout=400, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("corner error on 4 held-out photos") == 1, proc.stdout  # rank 0 alone reports
    assert "2 rank(s)" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.json", "sheet.png"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 4 and m["workers"] == 1 and m["train_examples"] == 16
    assert [e["step"] for e in m["evals"]] == [2]
    from export.onnx_export import export_checkpoint

    export_checkpoint(out / "checkpoint.pt", tmp_path / "doc.onnx")
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "doc.onnx"), providers=["CPUExecutionProvider"])
    rectified, theta = session.run(["rectified", "theta"], {"image": np.random.rand(1, 3, 64, 48).astype(np.float32)})
    assert rectified.shape == (1, 3, 42, 30) and theta.shape == (1, 3, 3)
