"""service.runtime and service.pipeline without HTTP: loading, providers, consistency with OpenCV."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from PIL import Image

from models import frames
from service import images, pipeline
from service.runtime import CPU, ModelLoadError, SessionConfig, load_model, load_model_dir, resolve_providers

CPU_ONLY = SessionConfig(providers=(CPU,))


def smooth_image(h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    """uint8 [h, w] or [h, w, c] with structure at several scales (so a warp shows)."""
    rng = np.random.default_rng(seed)
    a = rng.random((h, w, c)).astype(np.float32)
    a = cv2.GaussianBlur(a, (0, 0), 3).reshape(h, w, c)
    a = (a - a.min()) / (a.max() - a.min() + 1e-9)
    a = (a * 255).astype(np.uint8)
    return a[..., 0] if c == 1 else a


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def warp_reference(src_u8: np.ndarray, matrix: list[list[float]], out_size: tuple[int, int]) -> np.ndarray:
    """OpenCV with input_px_from_output_px and WARP_INVERSE_MAP, on [0, 1] floats, border 0 -> [C, h, w]."""
    h, w = out_size
    src = src_u8.astype(np.float32) / 255.0
    m = np.asarray(matrix, np.float64)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    if np.allclose(m[2], [0, 0, 1]):
        out = cv2.warpAffine(src, m[:2], (w, h), flags=flags)
    else:
        out = cv2.warpPerspective(src, m, (w, h), flags=flags)
    return out[None] if out.ndim == 2 else out.transpose(2, 0, 1)


@pytest.fixture(scope="module")
def runtimes(model_dir: Path) -> dict:
    loaded = load_model_dir(model_dir, CPU_ONLY)
    assert not loaded.failures
    return loaded.models


def test_cuda_requested_falls_back_to_cpu_without_crash() -> None:
    providers = resolve_providers(["CUDAExecutionProvider", CPU])
    assert providers[-1] == CPU
    assert resolve_providers(["NoSuchExecutionProvider"]) == [CPU]


def test_load_reports_providers_and_describes(runtimes: dict) -> None:
    for name, rt in runtimes.items():
        assert rt.providers and rt.providers[-1] == CPU
        d = rt.describe()
        assert d["name"] == name and d["warmed_up"] and d["theta_shape"] == list(rt.info.theta_shape)


@pytest.mark.parametrize("name", ["affine", "projective"])
@pytest.mark.parametrize("output_size", [None, (50, 70)])
def test_rectified_matches_opencv(runtimes: dict, name: str, output_size: tuple | None) -> None:
    rt = runtimes[name]
    src = smooth_image(123, 157, rt.info.in_channels)
    [r] = pipeline.rectify_images(rt, [("x.png", png(src))], images.Limits(), output_size)
    geo = pipeline.geometry(rt.info.transform, r.theta, r.input_size, r.output_size)
    ref = warp_reference(src, geo["input_px_from_output_px"], r.output_size)
    assert r.image.shape == ref.shape
    assert np.abs(ref - r.image).max() < 1e-4
    product = np.asarray(geo["output_px_from_input_px"]) @ np.asarray(geo["input_px_from_output_px"])
    np.testing.assert_allclose(product / product[2, 2], np.eye(3), atol=1e-9)  # inverse up to homogeneous scale


def test_localiser_sees_the_normalized_small_copy(runtimes: dict, model_dir: Path) -> None:
    """Resize-then-normalize equals the exported model on the normalized image (theta and rectified)."""
    import onnxruntime as ort

    rt = runtimes["projective"]
    src = smooth_image(64, 80, 3)
    x = src.transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    mean, std = np.asarray(rt.info.mean).reshape(1, -1, 1, 1), np.asarray(rt.info.std).reshape(1, -1, 1, 1)
    full = ort.InferenceSession(str(model_dir / "projective.onnx"), providers=[CPU])
    rect_ref, theta_ref = full.run(["rectified", "theta"], {"image": ((x - mean) / std).astype(np.float32)})
    p = pipeline.prepare_array(rt, x[0])
    [theta] = pipeline.localise(rt, [p])
    np.testing.assert_allclose(theta, theta_ref[0], atol=1e-5)
    r = pipeline.rectify(rt, p, theta)
    # raw image sampled, then normalized: equal where the sample is inside the image (padding differs: black vs 0)
    inside = pipeline.rectify(rt, pipeline.prepare_array(rt, np.ones_like(x[0])), theta).image > 0.999
    np.testing.assert_allclose(((r.image - mean[0]) / std[0])[inside], rect_ref[0][inside], atol=1e-4)


def test_io_binding_path_matches_plain_run(model_dir: Path) -> None:
    plain = load_model(model_dir / "tps.onnx", CPU_ONLY)
    bound = load_model(model_dir / "tps.onnx", SessionConfig(providers=(CPU,), io_binding=True))
    assert bound.io_binding and not plain.io_binding
    src = smooth_image(90, 60, 3).transpose(2, 0, 1).astype(np.float32) / 255
    a, b = pipeline.prepare_array(plain, src), pipeline.prepare_array(bound, src)
    [ta], [tb] = pipeline.localise(plain, [a]), pipeline.localise(bound, [b])
    np.testing.assert_allclose(ta, tb, atol=1e-6)
    np.testing.assert_allclose(pipeline.rectify(plain, a, ta, (33, 44)).image,
                               pipeline.rectify(bound, b, tb, (33, 44)).image, atol=1e-6)


def test_tps_geometry_control_points(runtimes: dict) -> None:
    rt = runtimes["tps"]
    src = smooth_image(80, 120, 3)
    [r] = pipeline.rectify_images(rt, [("t.png", png(src))], images.Limits(), (40, 60))
    geo = pipeline.geometry("tps", r.theta, r.input_size, r.output_size, rt.info.tps_grid)
    assert set(geo) == {"control_points", "source_points_px", "target_points_px", "coverage"}
    k = rt.info.tps_grid[0] * rt.info.tps_grid[1]
    assert np.asarray(geo["control_points"]).shape == (k, 2)
    # the source points, in input pixels, are the normalized theta mapped by the pixel convention
    src_px = np.asarray(geo["source_points_px"])
    np.testing.assert_allclose(src_px[:, 0], (r.theta[:, 0] + 1) * 120 / 2 - 0.5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(geo["target_points_px"])[[0, -1]], [[-0.5, -0.5], [59.5, 39.5]])


def test_batched_localisation_equals_one_by_one(runtimes: dict) -> None:
    rt = runtimes["affine"]
    items = [pipeline.prepare_array(rt, smooth_image(40 + 9 * i, 50 + 5 * i, 1, i)[None].astype(np.float32) / 255)
             for i in range(5)]
    batched = pipeline.localise(rt, items)
    for item, theta in zip(items, batched, strict=True):
        np.testing.assert_allclose(theta, pipeline.localise(rt, [item])[0], atol=1e-5)


def test_load_failures_are_reasons_not_crashes(tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "good.onnx").write_bytes((model_dir / "affine.onnx").read_bytes())
    (tmp_path / "corrupt.onnx").write_bytes(b"\x08\x07garbage" * 100)
    proto = onnx.load(str(model_dir / "affine.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "nometa.onnx"))
    proto = onnx.load(str(model_dir / "affine.onnx"))
    for node in proto.graph.node:  # break the contract: no tensor named loc_input any more
        node.input[:] = ["renamed" if n == "loc_input" else n for n in node.input]
        node.output[:] = ["renamed" if n == "loc_input" else n for n in node.output]
    onnx.save(proto, str(tmp_path / "nocontract.onnx"))
    with caplog.at_level(logging.ERROR):
        loaded = load_model_dir(tmp_path, CPU_ONLY)
    assert list(loaded.models) == ["good"]
    assert "not a readable ONNX" in loaded.failures["corrupt"]
    assert "not an stn model" in loaded.failures["nometa"]
    assert "loc_input" in loaded.failures["nocontract"]
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "missing.onnx", CPU_ONLY)
    assert "no .onnx model" in next(iter(load_model_dir(tmp_path / "empty", CPU_ONLY).failures.values()))


def test_service_imports_no_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "import service.api.app, service.pipeline, service.runtime, service.api.cli, service.api.routes.v1, service.api.routes.v2\n"
            "from service.api.app import create_app; create_app()\n"
            "assert sys.modules['torch'] is None\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr


def test_geometry_builds_the_pixel_matrix_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """``output_px_from_input_px`` is the inverse of the matrix already built, not a second construction."""
    calls = []
    original = frames.input_px_from_output_px

    def counting(*args: object) -> np.ndarray:
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(frames, "input_px_from_output_px", counting)
    theta = np.array([[0.9, 0.1, 0.05], [-0.1, 0.8, 0.0], [0.02, 0.01, 1.0]])
    geo = pipeline.geometry("projective", theta, (120, 160), (60, 80))
    assert len(calls) == 1
    np.testing.assert_allclose(geo["output_px_from_input_px"],
                               frames.output_px_from_input_px(theta, (120, 160), (60, 80)), atol=1e-12)
    product = np.asarray(geo["output_px_from_input_px"]) @ np.asarray(geo["input_px_from_output_px"])
    np.testing.assert_allclose(product / product[2, 2], np.eye(3), atol=1e-9)
