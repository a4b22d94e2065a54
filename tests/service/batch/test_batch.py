"""``stn batch``: inputs (folder, manifest, glob), outputs and reports, safety, resume after kill, the Ray engine.

"Equal outputs" means: the same set of files under OUTPUT, byte for byte, leaving out the job's
own state folder ``OUTPUT/.stn-batch/`` (journal order depends on scheduling); results.jsonl and
errors.jsonl are part of the comparison.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service import images, pipeline
from service.batch import cli
from service.batch.inputs import STATE_DIR, BatchError, resolve_inputs
from service.batch.job import Job, JobSpec
from service.batch.run import ENGINES, BatchConfig, resolve_model_path, run_job
from service.runtime import SessionConfig, load_model
from tests.service.support import progressive_jpeg

ROOT = Path(__file__).resolve().parents[3]
CPU = ("CPUExecutionProvider",)

GOOD = ["a0.jpg", "a1.jpg", "gray.png", "rgba.png", "palette.png", "sub/b0.png", "sub/b1.jpg", "sub/same.jpg",
        "sub/same.png", "sub/deep/c0.webp", "sub/deep/c1.bmp", "alias.jpg"]
BAD = ["bad.jpg", "empty.jpg", "sub/trunc.png", "link_out.jpg", "linkdir", "sub/deep/c2.tiff"]  # TIFF: opt-in


def _img(rng: np.random.Generator, h: int, w: int, c: int = 3) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 3) % 256], -1)[..., :c]
    return np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)


def make_tree(root: Path) -> tuple[Path, Path]:
    """INPUT folder with nested folders, mixed formats and modes, corrupt files and symlinks; and a folder outside."""
    rng = np.random.default_rng(0)
    src, outside = root / "in", root / "outside"
    for d in (src / "sub" / "deep", outside):
        d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_img(rng, 70, 90)).save(outside / "secret.jpg")
    Image.fromarray(_img(rng, 60, 80)).save(src / "a0.jpg", quality=90)
    Image.fromarray(_img(rng, 97, 61)).save(src / "a1.jpg", quality=80)
    Image.fromarray(_img(rng, 50, 50)[..., 0]).save(src / "gray.png")
    Image.fromarray(np.dstack([_img(rng, 40, 64), np.full((40, 64), 200, np.uint8)])).save(src / "rgba.png")
    Image.fromarray(_img(rng, 33, 45)).convert("P").save(src / "palette.png")
    Image.fromarray(_img(rng, 55, 75)).save(src / "sub" / "b0.png")
    Image.fromarray(_img(rng, 64, 48)).save(src / "sub" / "b1.jpg")
    Image.fromarray(_img(rng, 30, 30)).save(src / "sub" / "same.jpg")
    Image.fromarray(_img(rng, 31, 31)).save(src / "sub" / "same.png")
    Image.fromarray(_img(rng, 45, 81)).save(src / "sub" / "deep" / "c0.webp", quality=80)
    Image.fromarray(_img(rng, 36, 36)).save(src / "sub" / "deep" / "c1.bmp")
    Image.fromarray(_img(rng, 28, 52)).save(src / "sub" / "deep" / "c2.tiff")
    (src / "bad.jpg").write_bytes(b"this is not a jpeg at all")
    (src / "empty.jpg").write_bytes(b"")
    good_png = io.BytesIO()
    Image.fromarray(_img(rng, 80, 80)).save(good_png, "PNG")
    (src / "sub" / "trunc.png").write_bytes(good_png.getvalue()[:200])
    (src / "notes.txt").write_text("not an image: ignored")
    (src / "link_out.jpg").symlink_to(outside / "secret.jpg")
    (src / "alias.jpg").symlink_to(src / "a0.jpg")  # inside the root: allowed
    (src / "linkdir").symlink_to(outside, target_is_directory=True)
    return src, outside


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` except the job's state, by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and STATE_DIR not in p.relative_to(folder).parts}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_tree(tmp_path_factory.mktemp("batch"))


@pytest.fixture(scope="module")
def rgb_model(model_dir: Path):  # noqa: ANN201
    m = load_model(model_dir / "projective.onnx", SessionConfig(providers=CPU))
    m.warmup()
    return m


def config(src: Path | str, out: Path | str, model_dir: Path, **kw: object) -> BatchConfig:
    kw.setdefault("model", str(model_dir / "projective.onnx"))
    return BatchConfig(input=str(src), output=str(out), providers=CPU, progress=False, batch_size=4, workers=2, **kw)


@pytest.fixture(scope="module")
def local_run(tree: tuple[Path, Path], model_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    out = tmp_path_factory.mktemp("local") / "out"
    summary = run_job(config(tree[0], out, model_dir))
    return out, summary


def test_folder_job_outputs_reports_and_errors(local_run, tree, rgb_model, model_dir) -> None:  # noqa: ANN001
    out, summary = local_run
    src, outside = tree
    expected_outputs = {"a0.png", "a1.png", "gray.png", "rgba.png", "palette.png", "sub/b0.png", "sub/b1.png",
                        "sub/same.jpg.png", "sub/same.png.png", "sub/deep/c0.png", "sub/deep/c1.png",
                        "alias.png"}  # not sub/deep/c2.tiff: TIFF is opt-in (STN_IMAGE_FORMATS)
    assert set(files_of(out)) == expected_outputs | {"results.jsonl", "errors.jsonl", "skipped.jsonl"}
    h, w = rgb_model.info.output_size
    for rel in expected_outputs:
        with Image.open(out / rel) as im:  # each in its upload's colour (gray stays gray), whatever the model's
            assert im.format == "PNG" and im.size == (w, h) and im.mode == ("L" if rel == "gray.png" else "RGB")

    results = read_jsonl(out / "results.jsonl")
    assert [r["source"] for r in results] == sorted(GOOD)
    for r in results:
        assert set(r) >= {"source", "output", "theta", "input_px_from_output_px", "output_px_from_input_px",
                          "width", "height", "input_width", "input_height", "model", "model_version"}
        assert (r["model"], r["model_version"]) == ("projective", "1")
        assert (r["height"], r["width"]) == (h, w)
        assert (out / r["output"]).is_file()
        with Image.open(src / r["source"]) as im:
            assert (r["input_width"], r["input_height"]) == im.size
        assert 0.0 <= r["coverage"] <= 1.0  # service.geometry.describe, as the server's results
        m = np.array(r["input_px_from_output_px"]) @ np.array(r["output_px_from_input_px"])
        np.testing.assert_allclose(m / m[2, 2], np.eye(3), atol=1e-9)

    errors = {e["source"]: e["error"] for e in read_jsonl(out / "errors.jsonl")}
    assert sorted(errors) == sorted(BAD)
    assert "not a supported image" in errors["bad.jpg"] and "empty" in errors["empty.jpg"]
    assert "outside the input root" in errors["link_out.jpg"] and "not followed" in errors["linkdir"]
    assert "STN_IMAGE_FORMATS" in errors["sub/deep/c2.tiff"]  # the server's setting: TIFF only when listed
    assert sorted(p.name for p in outside.iterdir()) == ["secret.jpg"]  # nothing written outside OUTPUT

    assert (summary.ok, summary.failed, summary.processed, summary.skipped) == (len(GOOD), len(BAD), 16, 0)
    assert summary.not_images == 1 and read_jsonl(out / "skipped.jsonl") == [
        {"source": "notes.txt", "reason": "not an image (by its suffix)"}]
    assert summary.total == len(GOOD) + len(BAD) and summary.images_per_s > 0
    assert {"read_decode", "localise", "sample", "encode", "write"} <= set(summary.stages)
    assert any("images/s" in line for line in summary.lines())


def test_same_implementation_as_the_server(local_run, tree, rgb_model) -> None:  # noqa: ANN001
    """Output bytes and record equal what service.pipeline (the server's code path) gives for the same file."""
    out, _ = local_run
    src, _ = tree
    records = {r["source"]: r for r in read_jsonl(out / "results.jsonl")}
    for name in ("a1.jpg", "sub/deep/c0.webp", "rgba.png"):
        [res] = pipeline.rectify_images(rgb_model, [(name, (src / name).read_bytes())], images.Limits())
        assert (out / records[name]["output"]).read_bytes() == images.encode(res.image, "png")
        server = pipeline.result_json(rgb_model, res)
        for key in ("theta", "input_px_from_output_px", "output_px_from_input_px", "width", "input_height",
                    "coverage"):
            assert records[name][key] == server[key], key


def test_rerun_skips_everything_and_changes_nothing(local_run, tree, model_dir) -> None:  # noqa: ANN001
    out, _ = local_run
    before = files_of(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    summary = run_job(config(tree[0], out, model_dir))
    assert (summary.processed, summary.skipped) == (len(BAD) - 2, len(GOOD))  # failures are retried (not symlinks)
    assert files_of(out) == before
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}


def test_tiff_when_stn_image_formats_lists_it(tree, model_dir, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The batch job reads STN_IMAGE_FORMATS as the server does: TIFF is decoded once listed."""
    import shutil

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(tree[0] / "sub" / "deep" / "c2.tiff", src / "c2.tiff")
    monkeypatch.setenv("STN_IMAGE_FORMATS", "jpeg,png,webp,bmp,tiff")
    summary = run_job(config(src, tmp_path / "out", model_dir))
    assert (summary.ok, summary.failed) == (1, 0)
    [record] = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert record["source"] == "c2.tiff" and (record["input_width"], record["input_height"]) == (52, 28)


def test_other_settings_in_the_same_output_are_refused(local_run, tree, model_dir, tmp_path) -> None:  # noqa: ANN001
    out, _ = local_run
    with pytest.raises(BatchError, match="other settings"):
        run_job(config(tree[0], out, model_dir, format="jpeg"))
    copy = tmp_path / "out"
    run_job(config(tree[0], copy, model_dir))
    s = run_job(config(tree[0], copy, model_dir, format="jpeg", overwrite=True))
    assert s.processed == 16 and s.skipped == 0
    assert (copy / "a0.jpg").is_file()


@pytest.mark.parametrize("fmt,size,pil_format", [("jpeg", (20, 50), "JPEG"), ("webp", None, "WEBP")])
def test_formats_and_size(tree, model_dir, tmp_path, fmt, size, pil_format) -> None:  # noqa: ANN001
    out = tmp_path / "out"
    s = run_job(config(tree[0] / "sub", out, model_dir, format=fmt, size=size))
    assert s.ok == 6 and s.failed == 2  # trunc.png, and c2.tiff (TIFF is opt-in)
    suffix = images.suffix(fmt)
    for r in read_jsonl(out / "results.jsonl"):
        assert r["output"].endswith(suffix)
        with Image.open(out / r["output"]) as im:
            assert im.format == pil_format
            if size:
                assert im.size == (size[1], size[0]) and (r["height"], r["width"]) == size


def test_gray_model_and_cli_size(tree, model_dir, tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "out"
    rc = cli.main([str(tree[0] / "sub" / "deep"), str(out), "--model", str(model_dir / "affine.onnx"),
                     "--size", "33x21", "--providers", "CPUExecutionProvider", "--no-progress", "--workers", "1"])
    assert rc == 1  # some failed: c2.tiff (TIFF is opt-in, STN_IMAGE_FORMATS)
    [error] = read_jsonl(out / "errors.jsonl")
    assert error["source"].endswith("c2.tiff") and "TIFF" in error["error"]
    assert len(read_jsonl(out / "results.jsonl")) == 2
    for r in read_jsonl(out / "results.jsonl"):
        with Image.open(out / r["output"]) as im:  # colour uploads stay colour with a gray localiser
            assert im.mode == "RGB" and im.size == (33, 21)
        assert np.array(r["theta"]).shape == (2, 3)


def test_manifests_refuse_traversal(tree, model_dir, tmp_path) -> None:  # noqa: ANN001
    src, outside = tree
    entries = ["a0.jpg", "sub/b0.png", "sub/../a1.jpg", "a0.jpg", "../outside/secret.jpg", str(outside / "secret.jpg"),
               str(src / "sub" / "deep" / "c0.webp"), "missing.jpg", "link_out.jpg"]
    want_ok = ["a0.jpg", "a1.jpg", "sub/b0.png", "sub/deep/c0.webp"]
    manifests = {
        "list.txt": "# a comment\n" + "\n".join(entries) + "\n",
        "list.csv": "id,path\n" + "".join(f"{i},{e}\n" for i, e in enumerate(entries)),
        "list.jsonl": "".join(json.dumps({"path": e, "label": i}) + "\n" for i, e in enumerate(entries)),
    }
    outs = {}
    for name, text in manifests.items():
        manifest = src / name
        manifest.write_text(text)
        try:
            out = tmp_path / name
            run_job(config(manifest, out, model_dir))
        finally:
            manifest.unlink()
        assert [r["source"] for r in read_jsonl(out / "results.jsonl")] == want_ok
        errors = {e["source"]: e["error"] for e in read_jsonl(out / "errors.jsonl")}
        assert "outside the input root" in errors["../outside/secret.jpg"]
        assert "outside the input root" in errors[str(outside / "secret.jpg")]
        assert "outside the input root" in errors["link_out.jpg"]
        assert "could not read" in errors["missing.jpg"]
        assert sorted(p.name for p in outside.iterdir()) == ["secret.jpg"]
        outs[name] = files_of(out)
    assert outs["list.txt"] == outs["list.csv"] == outs["list.jsonl"]


def test_pipes_and_devices_are_error_lines_not_hangs(model_dir, tmp_path) -> None:  # noqa: ANN001
    """A named pipe among the images (open waits for a writer for ever) and /dev/zero in a manifest (never ends):
    each is a line in errors.jsonl naming what it is, and the job ends. Before, the job hung on the pipe."""
    import os

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_img(np.random.default_rng(0), 40, 50)).save(src / "ok.png")
    os.mkfifo(src / "pipe.jpg")
    (src / "list.txt").write_text("ok.png\npipe.jpg\n/dev/zero\n")
    for spec, extra in ((src, []), (src / "list.txt", ["--input-root", "/"])):
        out = tmp_path / f"out-{len(extra)}"
        proc = subprocess.run([sys.executable, "-m", "stn", "batch", str(spec), str(out), "--model",
                               str(model_dir / "projective.onnx"), "--providers", "CPUExecutionProvider",
                               "--no-progress", *extra], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr
        assert [r["source"].rsplit("/", 1)[-1] for r in read_jsonl(out / "results.jsonl")] == ["ok.png"]
        errors = {e["source"].rsplit("/", 1)[-1]: e["error"] for e in read_jsonl(out / "errors.jsonl")}
        assert "a named pipe (FIFO), not a regular file" in errors["pipe.jpg"], errors
        if extra:
            assert "a character device, not a regular file" in errors["zero"], errors


def test_a_jpeg_with_too_many_scans_is_an_error_line_not_minutes_of_decoding(model_dir, tmp_path) -> None:  # noqa: ANN001
    """Each scan of a progressive JPEG is a pass of the decoder over the image, however few bytes it takes:
    one with more than images.MAX_JPEG_SCANS is refused before decoding, as the server refuses it (400).
    A standard progressive JPEG (10 scans) and one with exactly the limit are rectified."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "progressive.jpg").write_bytes(progressive_jpeg(200, 150, 10))
    (src / "at-limit.jpg").write_bytes(progressive_jpeg(200, 150, images.MAX_JPEG_SCANS))
    (src / "bomb.jpg").write_bytes(progressive_jpeg(200, 150, images.MAX_JPEG_SCANS + 1))
    summary = run_job(config(src, tmp_path / "out", model_dir))
    assert (summary.ok, summary.failed) == (2, 1)
    [error] = read_jsonl(tmp_path / "out" / "errors.jsonl")
    assert error["source"] == "bomb.jpg" and f"more than {images.MAX_JPEG_SCANS} scans" in error["error"], error


def test_glob_input(tree, model_dir, tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "out"
    run_job(config(str(tree[0] / "sub" / "**" / "*.png"), out, model_dir))
    assert [r["source"] for r in read_jsonl(out / "results.jsonl")] == ["b0.png", "same.png"]
    assert [e["source"] for e in read_jsonl(out / "errors.jsonl")] == ["trunc.png"]
    with pytest.raises(BatchError, match="no image matches"):
        run_job(config(str(tree[0] / "nothing*.png"), tmp_path / "o2", model_dir))


def test_symlink_in_output_cannot_lead_outside(tree, model_dir, tmp_path) -> None:  # noqa: ANN001
    src, _ = tree
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").symlink_to(elsewhere, target_is_directory=True)
    s = run_job(config(src, out, model_dir))
    assert list(elsewhere.iterdir()) == []
    errors = {e["source"]: e["error"] for e in read_jsonl(out / "errors.jsonl")}
    assert "outside OUTPUT" in errors["sub/b0.png"] and "outside OUTPUT" in errors["sub/deep/c0.webp"]
    assert s.ok == 6  # a0, a1, gray, rgba, palette, alias


def test_no_model_is_a_clear_error(tree, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("STN_MODEL_DIR", str(tmp_path / "empty"))
    with pytest.raises(BatchError, match="no .onnx model"):
        resolve_model_path(None)
    assert cli.main([str(tree[0]), str(tmp_path / "o"), "--no-progress"]) == 2


@pytest.mark.parametrize("args", [["--quality", "0"], ["--quality", "101"], ["--quality", "9x"],
                                  ["--batch-size", "0"], ["--workers", "-1"], ["--ray-actors", "-1"],
                                  ["--ray-num-cpus", "0"]])
def test_numbers_out_of_range_are_usage_errors(tree, tmp_path, capsys, args) -> None:  # noqa: ANN001
    # before: --quality -5 failed every WebP image ("invalid configuration"), 150 was taken, --workers -1 was a
    # traceback, --batch-size 0 silently became the default
    with pytest.raises(SystemExit) as e:
        cli.main([str(tree[0]), str(tmp_path / "o"), "--no-progress", "--format", "webp", *args])
    err = capsys.readouterr().err.splitlines()[-1]
    assert e.value.code == 2 and err.startswith(f"stn batch: error: argument {args[0]}: ") and "must be" in err, err
    assert not (tmp_path / "o").exists()


def test_a_job_refuses_numbers_out_of_range(tree, model_dir, tmp_path) -> None:  # noqa: ANN001
    for kw, says in (({"quality": 0}, "quality must be"), ({"quality": 101}, "quality must be"),
                     ({"batch_size": 0}, "--batch-size"), ({"workers": -1}, "--workers"),
                     ({"ray_actors": -1}, "--ray-actors"), ({"ray_num_cpus": 0}, "--ray-num-cpus")):
        with pytest.raises(BatchError, match=says):
            run_job(dataclasses.replace(config(tree[0], tmp_path / "o", model_dir, format="webp"), **kw))
    assert not (tmp_path / "o").exists()


def test_quality_reaches_the_encoder(tree, model_dir, tmp_path) -> None:  # noqa: ANN001
    sizes = {}
    for q in (5, 95):
        run_job(config(tree[0] / "a0.jpg", tmp_path / str(q), model_dir, format="jpeg", quality=q, size=(200, 200)))
        sizes[q] = (tmp_path / str(q) / "a0.jpg").stat().st_size
    assert sizes[5] * 2 < sizes[95], sizes


def test_bad_settings_are_one_line_not_a_traceback(tree, tmp_path, monkeypatch, capsys) -> None:  # noqa: ANN001
    monkeypatch.setenv("STN_MAX_BATCH_SIZE", "0")
    assert cli.main([str(tree[0]), str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "STN_MAX_BATCH_SIZE='0': Input should be greater than or equal to 1" in err and "Traceback" not in err


def test_default_model_resolution(model_dir, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("STN_MODEL_DIR", str(model_dir))
    assert resolve_model_path(None).name == "affine.onnx"  # the first by name, as the server
    monkeypatch.setenv("STN_DEFAULT_MODEL", "tps")
    assert resolve_model_path(None).name == "tps.onnx"
    assert resolve_model_path("projective").name == "projective.onnx"
    assert resolve_model_path(str(model_dir / "affine.onnx")).name == "affine.onnx"


def test_parse_size_and_parser() -> None:
    import argparse

    assert cli.size_arg(" 64x32 ") == (32, 64) and cli.ENGINES == ENGINES
    with pytest.raises(argparse.ArgumentTypeError, match="WIDTHxHEIGHT"):
        cli.size_arg("64")
    p = argparse.ArgumentParser()
    cli.configure_batch(p)
    args = p.parse_args(["in", "out", "--format", "webp", "--size", "10x20", "--engine", "ray"])
    assert (args.format, args.size, args.engine) == ("webp", (20, 10), "ray")
    q = argparse.ArgumentParser()
    cli.configure_bench_batch(q)
    assert q.parse_args([]).images == 2000


def _cli(src: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "service.batch", str(src), str(out), "--model", str(model), "--providers",
            "CPUExecutionProvider", "--no-progress", *extra]


def _journal_lines(out: Path) -> int:
    j = out / STATE_DIR / "journal.jsonl"
    return j.read_text().count("\n") if j.exists() else 0


def _interrupt(cmd: list[str], out: Path, sig: int, after_lines: int, expect_rc: int, timeout: float = 60) -> None:
    """Start the job, send ``sig`` once ``after_lines`` images are journaled; check the exit code."""
    # A shell that runs us in the background starts its children with SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: restore the default, as a terminal's Ctrl-C finds it.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + timeout
    try:
        while _journal_lines(out) < after_lines and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        running = proc.poll() is None
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert running, f"the job ended before it could be interrupted: rc {proc.returncode}\n{stdout}\n{stderr}"
    assert proc.returncode == expect_rc, f"rc {proc.returncode}, expected {expect_rc}\n{stdout}\n{stderr}"


@pytest.mark.slow
def test_resume_after_ctrl_c_and_kill_9_equals_a_clean_run(model_dir, tmp_path) -> None:  # noqa: ANN001
    """Ctrl-C, then kill -9, in the middle of the job; the third run completes it: the same bytes as a clean run."""
    rng = np.random.default_rng(1)
    src = tmp_path / "in"
    for i in range(48):
        d = src / f"part{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_img(rng, 120 + i, 160)).save(d / f"img{i:03d}.jpg", quality=85)
    (src / "part1" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    model = model_dir / "projective.onnx"
    slow = ["--size", "400x400", "--workers", "1", "--batch-size", "4"]  # tens of ms per image: a window to interrupt

    clean = tmp_path / "clean"
    done = subprocess.run(_cli(src, clean, model, *slow), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr  # one image failed
    assert "48 rectified, 1 failed" in done.stdout and "1 image(s) failed" in done.stderr

    out = tmp_path / "resumed"
    _interrupt(_cli(src, out, model, *slow), out, signal.SIGINT, after_lines=8, expect_rc=130)
    first = _journal_lines(out)
    assert 8 <= first < 49 and not (out / "results.jsonl").exists()
    _interrupt(_cli(src, out, model, *slow), out, signal.SIGKILL, after_lines=first + 8, expect_rc=-signal.SIGKILL)
    assert not (out / "results.jsonl").exists()
    # a half-written temporary file, as kill -9 during a write leaves one
    (out / STATE_DIR / "tmp" / "999-1-1.tmp").write_bytes(b"partial")
    resumed = subprocess.run(_cli(src, out, model, *slow), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 1, resumed.stderr
    assert "done by an earlier run" in resumed.stdout

    assert files_of(out) == files_of(clean)
    results = read_jsonl(out / "results.jsonl")
    assert len(results) == 48 and len({r["source"] for r in results}) == 48
    assert [e["source"] for e in read_jsonl(out / "errors.jsonl")] == ["part1/broken.jpg"]
    assert not (out / STATE_DIR / "tmp").exists()


@pytest.mark.slow
def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(model_dir, tmp_path) -> None:  # noqa: ANN001
    """Before: both ran every image, appended to one journal at offsets each took for its own, and both died at the
    end with a JSONDecodeError traceback, leaving no reports. Now the second is refused at once (exit 2) and the
    first completes; once it has, a run on the same OUTPUT resumes as before."""
    rng = np.random.default_rng(2)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(192):
        Image.fromarray(_img(rng, 120 + i % 8, 160)).save(src / f"img{i:03d}.jpg", quality=85)
    model, out = model_dir / "projective.onnx", tmp_path / "out"
    # about 6 s of work where the second run needs under 1 s to start and be refused
    slow = ["--size", "1400x1400", "--workers", "1", "--batch-size", "4"]
    first = subprocess.Popen(_cli(src, out, model, *slow), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 60
        while _journal_lines(out) < 4 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert first.poll() is None, "the first run ended before a second could start"
        second = subprocess.run(_cli(src, out, model, *slow), cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first run ended while the second ran: the test proves nothing"
        stdout, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.returncode == 2, second.stderr
    assert f"another stn batch (process {first.pid}) is writing to {out}" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, stderr
    results = read_jsonl(out / "results.jsonl")
    assert len(results) == 192 and len({r["source"] for r in results}) == 192 and _journal_lines(out) == 192
    again = subprocess.run(_cli(src, out, model, *slow), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "192 done by an earlier run" in again.stdout, again.stderr


def test_a_job_holds_its_output_until_released(tree, model_dir, tmp_path) -> None:  # noqa: ANN001
    src, out = tree[0], tmp_path / "out"
    inputs = resolve_inputs(str(src), str(out))
    spec = JobSpec("m", "1", "0" * 64, "png", 90, None)
    holder = Job(out, inputs, spec)
    with pytest.raises(BatchError, match=rf"another stn batch \(process {os.getpid()}\) is writing to"):
        Job(out, inputs, spec)
    with pytest.raises(BatchError, match="another stn batch"):
        Job(out, inputs, spec, overwrite=True)  # --overwrite too: it would remove the running job's state
    (out / STATE_DIR / "journal.jsonl").write_text("{}\n")
    holder.release()
    again = Job(out, inputs, spec, overwrite=True)  # clears the state, keeps the lock file it holds
    assert sorted(p.name for p in (out / STATE_DIR).iterdir()) == ["job.json", "journal", "journal.jsonl", "lock",
                                                                    "tmp"]
    assert (out / STATE_DIR / "journal.jsonl").read_text() == ""
    again.release()


def test_an_output_that_cannot_be_a_folder_is_one_line(tree, model_dir, tmp_path, capsys) -> None:  # noqa: ANN001
    # before: a FileExistsError traceback from os.makedirs
    (tmp_path / "a-file").write_text("x")
    for out in (tmp_path / "a-file", tmp_path / "a-file" / "below"):
        rc = cli.main([str(tree[0]), str(out), "--model", str(model_dir / "affine.onnx"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and f"stn batch: cannot use {out} as OUTPUT: it, or a folder on its way, is a file" in err, err
        assert "Traceback" not in err


def test_an_empty_input_or_output_is_refused(tree, model_dir, tmp_path, monkeypatch, capsys) -> None:  # noqa: ANN001
    # before: `stn batch "$UNSET" out` rectified everything under the current folder, and an empty OUTPUT wrote there
    monkeypatch.chdir(tmp_path)
    for args, name in (([" ", "out"], "INPUT"), ([str(tree[0]), ""], "OUTPUT")):
        assert cli.main([*args, "--model", str(model_dir / "affine.onnx"), "--no-progress"]) == 2
        assert f"stn batch: {name} is empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_filesystem_without_locks_still_runs(tree, model_dir, tmp_path, monkeypatch, caplog) -> None:  # noqa: ANN001
    import fcntl

    def no_locks(fd: int, op: int) -> None:
        raise OSError(37, "No locks available")  # ENOLCK, as NFS without lockd answers

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="service.batch.job"):
        s = run_job(config(tree[0], tmp_path / "out", model_dir))
    assert s.ok == 12 and "cannot lock" in caplog.text and "would not be detected" in caplog.text


def test_batch_never_imports_torch(tree, model_dir, tmp_path) -> None:  # noqa: ANN001
    code = ("import sys; from service.batch import bench, cli, ray_data, run; "
            f"rc = cli.main([{str(tree[0] / 'sub')!r}, {str(tmp_path / 'o')!r}, '--model', "
            f"{str(model_dir / 'tps.onnx')!r}, '--providers', 'CPUExecutionProvider', '--no-progress']); "
            "assert rc == 1, rc; assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(read_jsonl(tmp_path / "o" / "results.jsonl")) == 6  # and c2.tiff refused: TIFF is opt-in


@pytest.mark.slow
def test_ray_engine_gives_the_local_engines_outputs(local_run, tree, model_dir, tmp_path) -> None:  # noqa: ANN001
    """The Ray Data engine on a local Ray with 2 CPUs: the same bytes as the local engine; then a resume."""
    ray = pytest.importorskip("ray")
    local_out, _ = local_run
    out = tmp_path / "ray"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_job(config(tree[0], out, model_dir, engine="ray", ray_actors=1))
        assert (summary.ok, summary.failed, summary.engine) == (len(GOOD), len(BAD), "ray")
        assert files_of(out) == files_of(local_out)
        # the workers wrote the outputs and the journal (one shard per batch); the driver wrote no journal line
        assert (out / STATE_DIR / "journal.jsonl").read_text() == ""
        shards = sorted((out / STATE_DIR / "journal").iterdir())
        assert len(shards) >= 2
        # resume: a shard lost and one cut mid-line, as an interruption would; the Ray engine redoes just those
        shards[-1].unlink()
        lines = shards[0].read_text().splitlines(keepends=True)
        shards[0].write_text("".join(lines[:-1]) + lines[-1][:20])
        (out / "results.jsonl").unlink()
        kept = sum('"result"' in line for shard in shards[:-1] for line in shard.read_text().splitlines(keepends=True)
                   if line.endswith("\n"))
        again = run_job(config(tree[0], out, model_dir, engine="ray", ray_actors=1))
        assert (again.skipped, again.processed) == (kept, 16 - kept)
        assert files_of(out) == files_of(local_out)
    finally:
        ray.shutdown()


def test_bench_batch_runs_and_ends_with_the_ratios(model_dir, tmp_path, capsys) -> None:  # noqa: ANN001
    import argparse

    p = argparse.ArgumentParser()
    cli.configure_bench_batch(p)
    args = p.parse_args(["--images", "12", "--image-size", "64x48", "--data-dir", str(tmp_path), "--repeat", "1",
                         "--batch-size", "4", "--model", str(model_dir / "projective.onnx")])
    assert cli.run_bench_batch(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    last = json.loads(out[-1])
    assert last["images"] == 12 and {"local_vs_naive", "bare_vs_naive", "local_vs_bare"} <= set(last)
    assert any("read_decode" in line and "encode" in line for line in out)


def test_output_inside_input_is_not_read_back(tree, model_dir, tmp_path) -> None:  # noqa: ANN001
    import shutil

    src = tmp_path / "in"
    shutil.copytree(tree[0] / "sub" / "deep", src)
    out = src / "rectified"
    first = run_job(config(src, out, model_dir))
    again = run_job(config(src, out, model_dir))
    assert first.ok == 2 and (again.total, again.skipped, again.processed) == (3, 2, 1)  # c2.tiff: TIFF is opt-in
    assert [r["source"] for r in read_jsonl(out / "results.jsonl")] == ["c0.webp", "c1.bmp"]
    with pytest.raises(BatchError, match="inside it"):
        run_job(config(src, src, model_dir))


def test_default_marker_names_the_default(model_dir, tmp_path, monkeypatch, caplog) -> None:  # noqa: ANN001
    """A folder's DEFAULT file names its default model (server and batch alike); a stale one falls back."""
    import shutil

    from service.runtime import choose_default

    folder = tmp_path / "models"
    shutil.copytree(model_dir, folder)
    monkeypatch.delenv("STN_DEFAULT_MODEL", raising=False)
    monkeypatch.setenv("STN_MODEL_DIR", str(folder))
    (folder / "DEFAULT").write_text("\nprojective\n")
    assert resolve_model_path(None).name == "projective.onnx"
    assert resolve_model_path(str(folder)).name == "projective.onnx"
    assert choose_default(["affine", "projective", "tps"], folder) == "projective"
    assert choose_default(["affine", "projective", "tps"], folder, configured="tps") == "tps"  # STN_DEFAULT_MODEL wins
    (folder / "DEFAULT").write_text("gone\n")
    assert choose_default(["tps", "affine"], folder) == "affine"
    assert "names 'gone'" in caplog.text
    assert resolve_model_path(None).name == "affine.onnx"


def _memory_copy(src: Path, prefix: str) -> None:
    """The files of ``src`` (symlinks left out: an object store has none) into fsspec's in-memory filesystem."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for p in sorted(src.rglob("*")):
        if p.is_file() and not p.is_symlink() and not any(q.is_symlink() for q in p.relative_to(src).parents
                                                           if q != Path(".") and (src / q).is_symlink()):
            fs.pipe_file(f"{prefix}/{p.relative_to(src).as_posix()}", p.read_bytes())


def _memory_files(prefix: str) -> dict[str, bytes]:
    from service.batch.inputs import url_to_fs

    fs, root = url_to_fs(prefix)
    return {f[len(root) + 1:]: fs.cat_file(f) for f in sorted(fs.find(root)) if f"/{STATE_DIR}/" not in f}


def test_uris_memory_and_file_give_the_same_bytes(local_run, tree, model_dir, tmp_path) -> None:  # noqa: ANN001
    """INPUT and OUTPUT as fsspec URIs: memory:// (in this process: the local engine) and file://; the outputs and
    reports equal a local run's on the same images, and a re-run resumes from the journal's shards."""
    import fsspec

    local_out, _ = local_run
    src, _ = tree
    _memory_copy(src, "memory://job/in")
    summary = run_job(config("memory://job/in", "memory://job/out", model_dir))
    symlinked = {"alias.png", "link_out.jpg", "linkdir"}  # local symlinks: no such thing in memory://
    assert (summary.ok, summary.failed, summary.not_images) == (len(GOOD) - 1, len(BAD) - 2, 1)
    got = _memory_files("memory://job/out")
    want = {k: v for k, v in files_of(local_out).items() if k not in symlinked}
    assert set(got) == set(want)
    for name in set(want) - {"results.jsonl", "errors.jsonl"}:
        assert got[name] == want[name], name

    def lines(data: bytes, drop: set[str]) -> list[dict]:
        return [r for r in map(json.loads, data.decode().splitlines()) if r["source"] not in drop | {"alias.jpg"}]

    assert lines(got["results.jsonl"], symlinked) == lines(want["results.jsonl"], symlinked)
    assert lines(got["errors.jsonl"], symlinked) == lines(want["errors.jsonl"], symlinked)
    fs = fsspec.filesystem("memory")
    assert fs.find(f"/job/out/{STATE_DIR}/journal")  # the journal as shards: object stores do not append
    again = run_job(config("memory://job/in", "memory://job/out", model_dir))
    assert (again.skipped, again.processed) == (len(GOOD) - 1, len(BAD) - 2)  # failures are retried
    assert _memory_files("memory://job/out") == got
    # a manifest in memory://, entries relative to it
    fs.pipe_file("/job/in/list.txt", b"a0.jpg\nsub/b0.png\n../elsewhere.jpg\n")
    run_job(config("memory://job/in/list.txt", "memory://job/m", model_dir))
    m = _memory_files("memory://job/m")
    assert [r["source"] for r in lines(m["results.jsonl"], set())] == ["a0.jpg", "sub/b0.png"]
    assert "outside the input root" in lines(m["errors.jsonl"], set())[0]["error"]

    out = tmp_path / "file"
    run_job(config(f"file://{src}", f"file://{out}", model_dir))
    assert files_of(out) == files_of(local_out)


def test_ray_engine_refuses_memory_uris(tree, model_dir) -> None:  # noqa: ANN001
    with pytest.raises(BatchError, match="memory:// lives in one process"):
        run_job(config("memory://job/in", "memory://job/ray", model_dir, engine="ray"))


def test_exit_codes(tree, model_dir, tmp_path, capsys, monkeypatch) -> None:  # noqa: ANN001
    """0: all rectified; 1: some failed (counted in the summary); 2: bad arguments."""
    monkeypatch.setenv("STN_IMAGE_FORMATS", "JPEG,PNG,WEBP,BMP,TIFF")  # sub/deep/c2.tiff decodes
    args = ["--model", str(model_dir / "projective.onnx"), "--providers", "CPUExecutionProvider", "--no-progress"]
    assert cli.main([str(tree[0] / "sub" / "deep"), str(tmp_path / "ok"), *args]) == 0
    assert cli.main([str(tree[0] / "sub"), str(tmp_path / "some"), *args]) == 1
    out, err = capsys.readouterr()
    assert "7 rectified, 1 failed" in out and "1 image(s) failed" in err
    with pytest.raises(SystemExit) as e:
        cli.main([str(tree[0]), str(tmp_path / "bad"), "--size", "12", *args])
    assert e.value.code == 2
    assert cli.main([str(tree[0] / "nothing*.png"), str(tmp_path / "none"), *args]) == 2
