"""models.train and ``stn train``: losses go down, files are written, errors are clear."""

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
from PIL import Image

from models import classifier, cli, data, distortions, evaluate, frames, transforms
from models import train as T
from models.checkpoint import load_checkpoint
from models.classifier import STCNN, SmallCNN
from models.stn import SpatialTransformer

ROOT = Path(__file__).resolve().parents[2]
STN = ROOT / ".venv" / "bin" / "stn"


def _quick(data_path: Path, **kw) -> T.TrainConfig:  # noqa: ANN003
    base = dict(data=str(data_path), steps=40, batch_size=32, lr=3e-3, threads=2, progress=False, seed=0)
    base.update(kw)
    return T.TrainConfig(**base)


def _went_down(history: list[float], k: int = 8) -> tuple[float, float]:
    first, last = float(np.mean(history[:k])), float(np.mean(history[-k:]))
    assert last < first, f"loss did not go down: first {k} steps {first:.4f}, last {k} steps {last:.4f}"
    return first, last


# ---------------------------------------------------------------------------------- CLI surface


def test_cli_choices_match_the_library() -> None:
    assert cli.DISTORTION_CHOICES == distortions.DISTORTIONS
    assert cli.TRANSFORM_CHOICES == transforms.TRANSFORMS
    assert cli.HEAD_CHOICES == tuple(classifier.HEADS)
    assert cli.DEFAULT_DATA == data.DEFAULT_DATA


def test_cli_module_does_not_import_torch() -> None:
    code = "import sys, models.cli; assert 'torch' not in sys.modules, 'models.cli imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ------------------------------------------------------------------------------- loss pieces


def test_boundary_penalty_and_outside_fraction() -> None:
    inside = torch.rand(2, 8, 8, 2) * 2 - 1
    assert T.boundary_penalty(inside, 1.5).item() == 0.0
    far = inside + torch.tensor([3.0, 0.0])
    assert T.boundary_penalty(far, 1.5).item() > 1.0
    torch.testing.assert_close(T.outside_fraction(inside), torch.zeros(2))
    torch.testing.assert_close(T.outside_fraction(far), torch.ones(2))


@pytest.mark.parametrize("name", ["RTS", "P", "E"])
def test_grid_loss_target_is_the_inverse(name: str) -> None:
    """Mapping the ideal rectifier's sampling points through theta_D lands on the upright frame points."""
    up = torch.rand(4, 1, 28, 28)
    d = distortions.distort(name, up, torch.Generator().manual_seed(0))
    canvas = tuple(d.images.shape[-2:])
    out_size = canvas
    placement = torch.from_numpy(frames.theta_to_matrix(distortions.frame_theta((28, 28), out_size, 4)))
    base = torch.from_numpy(frames.affine_base_grid((8, 8))[..., :2]).double().unsqueeze(0).expand(4, 8, 8, 2)
    target = T._apply_matrix(placement, base)
    if d.family == "tps":
        # theta_D is only known as a warp field: check it at the canvas pixel centres, where it is exact
        fam = transforms.make_transform("tps", d.tps_grid)
        field = fam.grid(d.theta, fam.base_grid(canvas))
        pixel_points = torch.from_numpy(frames.affine_base_grid(canvas)[..., :2]).expand(4, *canvas, 2)
        torch.testing.assert_close(T.map_through_distortion(d, pixel_points), field, atol=1e-5, rtol=0)
        return
    ideal = torch.linalg.inv(torch.from_numpy(frames.theta_to_matrix(d.theta))) @ placement  # output -> distorted
    points = T._apply_matrix(ideal, base).float()
    torch.testing.assert_close(T.map_through_distortion(d, points).double(), target, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------- training


def test_classify_steps_reduce_the_loss(tiny_idx: Path) -> None:
    result = T.train(_quick(tiny_idx, distortion="RTS", steps=30, batch_size=16))
    _went_down(result.history)
    assert isinstance(result.model, STCNN) and not result.model.training
    m = result.metrics
    assert 0.0 <= m["test_error"] <= 1.0 and m["test_examples"] == 24 and m["steps"] == 30
    assert set(m["pose_consistency"]) == {"residual", "distortion"}
    assert set(m["pose_consistency"]["residual"]) == set(evaluate.SPREAD_KEYS)
    assert m["collapsed_fraction"] == 0.0 and result.files == {}


def test_rectify_steps_reduce_the_loss(tiny_idx: Path) -> None:
    result = T.train(_quick(tiny_idx, mode="rectify", distortion="RTS", steps=60))
    first, last = _went_down(result.history)
    assert last < 0.8 * first
    assert isinstance(result.model, SpatialTransformer)
    m = result.metrics
    assert "test_error" not in m and m["test_image_l1"] > 0 and m["test_grid_mse"] >= 0
    pc = m["pose_consistency"]
    assert pc["residual"]["log_scale"] < pc["distortion"]["log_scale"]


def test_localisation_lr_multiplier(tiny_idx: Path) -> None:
    splits = data.load_dataset(tiny_idx)
    config = _quick(tiny_idx, loc_lr_mult=0.25)
    model = T.build_model(config, splits)
    opt = T._optimizer(model, config)
    loc_ids = {id(p) for p in model.stn.localisation.parameters()}
    lrs = {("loc" if id(g["params"][0]) in loc_ids else "head"): g["lr"] for g in opt.param_groups}
    assert lrs == {"head": pytest.approx(3e-3), "loc": pytest.approx(0.25 * 3e-3)}
    n = sum(len(g["params"]) for g in opt.param_groups)
    assert n == len(list(model.parameters()))


def test_cnn_baseline_and_other_families(tiny_idx: Path) -> None:
    cnn = T.train(_quick(tiny_idx, model="cnn", distortion="TC", steps=5))
    assert isinstance(cnn.model, SmallCNN) and cnn.metrics["pose_consistency"]["residual"] is None
    assert "collapsed_fraction" not in cnn.metrics
    tps = T.train(_quick(tiny_idx, mode="rectify", distortion="E", transform="tps", steps=3, output_size=(20, 20)))
    assert tps.model.config.output_size == (20, 20) and tps.model.config.loc_size == (28, 28)
    proj = T.train(_quick(tiny_idx, distortion="P", transform="projective", steps=3))
    assert proj.model.stn.config.transform == "projective"


def test_grid_head_keeps_the_layout_and_round_trips(tiny_idx: Path, tmp_path: Path) -> None:
    """The "grid" head: any input size, a matched CNN baseline, stored in the checkpoint."""
    from models.classifier import ClassifierConfig, count_parameters, matched_baseline
    from models.stn import STNConfig

    torch.manual_seed(0)
    grid = SmallCNN(1, ClassifierConfig(head="grid")).eval()
    for size in (28, 42, 60):
        assert grid(torch.rand(2, 1, size, size)).shape == (2, 10)
    # unlike global average pooling (invariant up to border effects), it sees where things are
    gap = SmallCNN(1, ClassifierConfig(head="gap")).eval()
    image = torch.zeros(1, 1, 28, 28)
    image[..., 4:10, 4:10] = 1.0
    shifted = torch.roll(image, shifts=(12, 12), dims=(2, 3))

    def change(model: SmallCNN) -> float:  # relative change of the pooled features (before the FC layers)
        with torch.no_grad():
            a, b = model.net[:-4](image), model.net[:-4](shifted)
        return float((a - b).norm() / a.norm())

    assert change(gap) < 0.1 and change(grid) > 0.3, (change(gap), change(grid))
    stn_cfg = STNConfig(loc_size=(42, 42), output_size=(42, 42), std=(0.35,))
    head = ClassifierConfig(head="grid")
    baseline = matched_baseline(stn_cfg, head)
    assert baseline.config.head == "grid"
    assert abs(count_parameters(baseline) / count_parameters(STCNN(stn_cfg, head)) - 1) < 0.05
    with pytest.raises(ValueError, match="unknown classifier head 'avg'"):
        ClassifierConfig(head="avg")
    with pytest.raises(T.ConfigError, match="unknown head"):
        T.train(_quick(tiny_idx, head="avg"))
    result = T.train(_quick(tiny_idx, head="grid", steps=2, out=str(tmp_path / "run")))
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt.head_config.head == "grid" and isinstance(ckpt.build(), STCNN)
    assert result.meta["train_config"]["head"] == "grid"


def test_training_is_deterministic(tiny_idx: Path) -> None:
    a = T.train(_quick(tiny_idx, steps=3, batch_size=16))
    b = T.train(_quick(tiny_idx, steps=3, batch_size=16))
    c = T.train(_quick(tiny_idx, steps=3, batch_size=16, seed=1))
    assert a.history == b.history and a.history != c.history
    assert a.metrics["test_error"] == b.metrics["test_error"]


def test_train_on_given_splits_does_not_mutate_them(tiny_idx: Path) -> None:
    splits = data.load_dataset(tiny_idx)
    result = T.train(_quick(tiny_idx, steps=2, limit_train=10, limit_test=5), splits=splits)
    assert result.metrics["train_examples"] == 10 and result.metrics["test_examples"] == 5
    assert len(splits.train) == 96 and len(splits.test) == 24


def test_image_folder_rectify(tiny_upright_folder: Path) -> None:
    result = T.train(_quick(tiny_upright_folder, mode="rectify", distortion="R", steps=4, batch_size=8))
    assert result.meta["classes"] == [] and result.metrics["test_examples"] == 4
    with pytest.raises(T.ConfigError, match="no labels"):
        T.train(_quick(tiny_upright_folder, mode="classify"))


def test_config_errors(tiny_idx: Path, tmp_path: Path) -> None:
    with pytest.raises(T.ConfigError, match="rectify mode trains the STN alone"):
        T.train(_quick(tiny_idx, mode="rectify", model="cnn"))
    with pytest.raises(T.ConfigError, match="unknown transform 'foo'"):
        T.train(_quick(tiny_idx, transform="foo"))
    with pytest.raises(T.ConfigError, match="unknown distortion"):
        T.train(_quick(tiny_idx, distortion="Z"))
    with pytest.raises(T.ConfigError, match="loc_size must be at least 16"):
        T.train(_quick(tiny_idx, loc_size=(8, 8)))
    with pytest.raises(data.DataError, match="does not exist"):
        T.train(_quick(tmp_path / "missing"))


def test_write_sheet(tmp_path: Path) -> None:
    sheet = {"input": torch.rand(5, 1, 42, 42), "rectified": torch.rand(5, 1, 28, 28), "upright": torch.rand(5, 1, 28, 28)}
    T.write_sheet(tmp_path / "s.png", sheet)
    with Image.open(tmp_path / "s.png") as im:
        assert im.format == "PNG" and im.mode == "L" and im.height > 42 * 2 and im.width > (42 + 56) * 4
    T.write_sheet(tmp_path / "rgb.png", {"input": torch.rand(2, 3, 10, 10), "upright": torch.rand(2, 3, 10, 10)})
    with Image.open(tmp_path / "rgb.png") as im:
        assert im.mode == "RGB"


# -------------------------------------------------------------------------------- stn train CLI


def _stn(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([str(STN), "train", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.skipif(not STN.exists(), reason="project not installed in .venv")
def test_cli_end_to_end(tiny_idx: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--data", str(tiny_idx), "--steps", "4", "--batch-size", "16", "--threads", "1", "--out", str(out),
            "--distortion", "RTS", "--seed", "3"]
    proc = _stn(*args)
    assert proc.returncode == 0, proc.stderr
    assert "test error" in proc.stdout and "pose spread" in proc.stdout
    assert "train classify" in proc.stderr  # the tqdm bar
    ckpt = load_checkpoint(out / "checkpoint.pt")  # weights_only=True inside
    assert ckpt.kind == "st-cnn"
    meta = ckpt.meta
    assert meta["name"] and meta["version"] == T.MODEL_VERSION
    assert meta["dataset"] == f"{tiny_idx.name} RTS" and meta["classes"] == ["0", "1", "2"]
    assert meta["created_by"] == "stn train " + " ".join(args)
    assert meta["metrics"]["steps"] == 4 and math.isfinite(meta["metrics"]["test_error"])
    assert ckpt.stn_config.output_size == (42, 42) and ckpt.stn_config.loc_size == (42, 42)
    model = ckpt.build()
    logits, rectified, theta = model(torch.zeros(2, 1, 42, 42))
    assert logits.shape == (2, 3) and theta.shape == (2, 2, 3)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pose_consistency"] == meta["metrics"]["pose_consistency"]
    with Image.open(out / "sheet.png") as im:
        assert im.format == "PNG"


@pytest.mark.skipif(not STN.exists(), reason="project not installed in .venv")
def test_cli_rectify_image_folder(tiny_upright_folder: Path, tmp_path: Path) -> None:
    proc = _stn("--data", str(tiny_upright_folder), "--mode", "rectify", "--distortion", "R", "--steps", "2",
                "--batch-size", "8", "--threads", "1", "--no-progress", "--out", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert ckpt.kind == "stn" and ckpt.meta["classes"] == []
    assert isinstance(ckpt.build_stn(), SpatialTransformer)


@pytest.mark.skipif(not STN.exists(), reason="project not installed in .venv")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "/no/such/folder"], "data path /no/such/folder does not exist"),
        (["--transform", "foo"], "invalid choice: 'foo'"),
    ],
)
def test_cli_errors_exit_2_without_traceback(tmp_path: Path, args: list[str], message: str) -> None:
    proc = _stn(*args, "--out", str(tmp_path / "x"))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x" / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--distortion", "XYZ"], "invalid choice: 'XYZ'"),
        (["--data", "{upright}", "--mode", "rectify", "--loc-size", "8", "8"], "loc_size must be at least 16"),
        (["--steps", "0"], "must be >= 1"),
        (["--mode", "rectify", "--model", "cnn"], "rectify mode trains the STN alone"),
        (["--data", "{upright}"], "--mode rectify"),
    ],
)
def test_cli_errors_in_process(tiny_upright_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                               args: list[str], message: str) -> None:
    from stn.cli import main

    args = [a.replace("{upright}", str(tiny_upright_folder)) for a in args]
    try:
        code = main(["train", *args, "--no-progress", "--out", str(tmp_path / "x")])
    except SystemExit as e:  # argparse errors
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------- real data (slow)


@pytest.mark.slow
@pytest.mark.skipif(not Path(data.DEFAULT_DATA).is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_rectifier_shrinks_the_pose_spread() -> None:
    result = T.train(T.TrainConfig(mode="rectify", distortion="RTS", steps=300, batch_size=64, lr=3e-3,
                                   limit_train=6400, limit_test=500, threads=2, progress=False))
    pc = result.metrics["pose_consistency"]  # measured: angle 14.7 vs 26.9 deg, tx 0.071 vs 0.37
    assert pc["residual"]["angle_deg"] < 0.7 * pc["distortion"]["angle_deg"]
    assert pc["residual"]["tx"] < 0.4 * pc["distortion"]["tx"]
    assert pc["residual"]["ty"] < 0.4 * pc["distortion"]["ty"]


def test_init_stn_starts_classify_from_a_rectifier(tiny_idx: Path, tmp_path: Path) -> None:
    """--init-stn: the ST-CNN starts with the rectifier's transformer, and its history names both runs."""
    rect = T.train(_quick(tiny_idx, mode="rectify", distortion="RTS", steps=5, out=str(tmp_path / "r"),
                          created_by="stn train --mode rectify"))
    cls = T.train(_quick(tiny_idx, distortion="RTS", steps=1, lr=1e-12,  # Adam moves by ~lr: nothing
                         init_stn=str(tmp_path / "r" / "checkpoint.pt"),
                         out=str(tmp_path / "c"), created_by="stn train --mode classify"))
    for (name, p), q in zip(rect.model.state_dict().items(), cls.model.stn.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, msg=f"{name} not copied")
    assert cls.meta["created_by"] == "stn train --mode rectify && stn train --mode classify"
    with pytest.raises(T.ConfigError, match="--init-stn.*STN config"):
        T.train(_quick(tiny_idx, distortion="R", steps=1, init_stn=str(tmp_path / "r" / "checkpoint.pt")))
    with pytest.raises(T.ConfigError, match="--init-stn.*does not exist"):
        T.train(_quick(tiny_idx, distortion="RTS", steps=1, init_stn=str(tmp_path / "nope.pt")))


# ------------------------------------------------------------- devices, workers, resume, ranks


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (max abs diff {(a[k].float() - b[k].float()).abs().max():.3g})"


def test_batches_do_not_depend_on_the_process_that_makes_them(tiny_idx: Path) -> None:
    splits = data.load_dataset(tiny_idx)
    cfg = _quick(tiny_idx, batch_size=16)
    one = T.TrainBatches(splits.train, cfg, 16, 6)
    up5, lab5, d5 = one[5]
    for step in (0, 11, 7):  # any order, as workers and a resumed run make them
        one[step]
    again = T.TrainBatches(splits.train, cfg, 16, 6)[5]
    assert torch.equal(up5, again[0]) and torch.equal(lab5, again[1]) and torch.equal(d5.images, again[2].images)
    # rank r of 2 takes every other example of the same global batch, distorted with its own draws
    r0, r1 = (T.TrainBatches(splits.train, cfg, 16, 6, rank=r, world=2)[5] for r in (0, 1))
    assert torch.equal(r0[0], up5[0::2]) and torch.equal(r1[0], up5[1::2])
    assert not torch.equal(r0[2].theta, d5.theta[0::2])
    assert not torch.equal(one[6][0], up5)  # next step, next slice (epoch 1 starts at step 6: a new permutation)


def test_data_workers_give_the_same_run(tiny_idx: Path) -> None:
    a = T.train(_quick(tiny_idx, steps=8, batch_size=16))
    b = T.train(_quick(tiny_idx, steps=8, batch_size=16, workers=2))
    assert a.history == b.history
    _same_weights(_weights(a.model), _weights(b.model))
    assert b.metrics["workers"] == 2 and b.metrics["device"] == "cpu" and b.metrics["world_size"] == 1


def test_interrupted_and_resumed_run_ends_with_the_same_weights(tiny_idx: Path, tmp_path: Path) -> None:
    # 96 examples / 16 = 6 steps an epoch: the run crosses epochs; --eval-every runs between steps in both
    cfg = _quick(tiny_idx, steps=15, batch_size=16, eval_every=4)
    whole = T.train(replace(cfg, out=str(tmp_path / "whole")))
    assert not (tmp_path / "whole" / "last.pt").exists()  # finished: checkpoint.pt is the result

    def interrupt(step: int, loss: float) -> None:
        if step == 9:
            raise KeyboardInterrupt

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        T.train(replace(cfg, out=str(out), save_every=5), on_step=interrupt)
    saved = load_checkpoint(out / "last.pt")
    assert saved.train_state["step"] == 9 and len(saved.train_state["history"]) == 9  # saved at the interruption
    assert not (out / "checkpoint.pt").exists()
    resumed = T.train(replace(cfg, out=str(out), save_every=5, workers=1, resume=str(out / "last.pt")))
    _same_weights(_weights(whole.model), _weights(resumed.model))
    assert resumed.history == whole.history and resumed.metrics["test_error"] == whole.metrics["test_error"]
    assert [e["step"] for e in resumed.metrics["evals"]] == [4, 8, 12] == [e["step"] for e in whole.metrics["evals"]]
    _same_weights(_weights(whole.model), load_checkpoint(out / "checkpoint.pt").build().state_dict())


def test_resume_from_a_periodic_save(tiny_idx: Path, tmp_path: Path) -> None:
    cfg = _quick(tiny_idx, mode="rectify", distortion="RTS", steps=12, batch_size=16, out=str(tmp_path / "r"),
                 save_every=5)
    whole = T.train(replace(cfg, out=str(tmp_path / "whole")))

    def crash(step: int, loss: float) -> None:
        if step == 7:
            raise RuntimeError("crash")  # not an interruption: nothing is saved, the periodic save at 5 is usable

    with pytest.raises(RuntimeError, match="crash"):
        T.train(cfg, on_step=crash)
    assert load_checkpoint(tmp_path / "r" / "last.pt").train_state["step"] == 5
    # other options than the run's own are refused, naming them
    with pytest.raises(T.ConfigError, match=r"--lr 0.003 -> 0.01"):
        T.train(replace(cfg, lr=0.01, resume=str(tmp_path / "r" / "last.pt")))
    with pytest.raises(T.ConfigError, match="a finished checkpoint has no training state"):
        T.train(replace(cfg, resume=str(tmp_path / "whole" / "checkpoint.pt")))
    resumed = T.train(replace(cfg, resume=str(tmp_path / "r" / "last.pt")))
    _same_weights(_weights(whole.model), _weights(resumed.model))


def test_device_and_precision_options(tiny_idx: Path) -> None:
    result = T.train(_quick(tiny_idx, steps=3, batch_size=16, device="auto", amp="bf16"))
    assert result.metrics["amp"] == "bf16" and math.isfinite(result.metrics["final_train_loss"])
    assert result.metrics["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    with pytest.raises(T.ConfigError, match="--amp fp16 needs a CUDA device"):
        T.train(_quick(tiny_idx, amp="fp16", device="cpu"))
    with pytest.raises(T.ConfigError, match="unknown amp 'fp8'"):
        T.train(_quick(tiny_idx, amp="fp8"))
    with pytest.raises(T.ConfigError, match="--device must be auto, cpu, cuda or cuda:N"):
        T.train(_quick(tiny_idx, device="gpu"))
    if not torch.cuda.is_available():
        with pytest.raises(T.ConfigError, match="--device cuda: no CUDA device is usable here"):
            T.train(_quick(tiny_idx, device="cuda"))


def test_progress_lines_when_not_a_terminal(tiny_idx: Path, tmp_path: Path) -> None:
    code = ("import sys; from stn.cli import main; "
            f"sys.exit(main(['train', '--data', {str(tiny_idx)!r}, '--steps', '6', '--batch-size', '16', "
            f"'--threads', '1', '--eval-every', '3', '--out', {str(tmp_path / 'o')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("train classify")]
    assert any("step 6/6 loss=" in ln for ln in lines), proc.stderr
    assert any("step 3/6 eval test_error" in ln for ln in lines), proc.stderr
    assert "\r" not in proc.stderr  # no bar redraws in a log file
    assert "device cpu, amp off, 1 rank(s)" in proc.stdout


@pytest.mark.slow
def test_torchrun_two_ranks_on_gloo(tiny_idx: Path, tmp_path: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "ddp"
    args = ["--data", str(tiny_idx), "--steps", "6", "--batch-size", "16", "--threads", "1", "--save-every", "3",
            "--out", str(out)]
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "stn", "train", *args],
                          capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("test error") == 1 and "2 rank(s)" in proc.stdout  # rank 0 alone reports
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.json", "sheet.png"]
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt.meta["metrics"]["world_size"] == 2 and ckpt.meta["metrics"]["steps"] == 6
    assert ckpt.kind == "st-cnn" and isinstance(ckpt.build(), STCNN)
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
