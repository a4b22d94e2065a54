"""The native sampler ops in onnxruntime: torch's grid_sample semantics case for case, ONNX's own
GridSample conformance cases, results independent of the thread count, clear errors."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

import native
from models.transforms import make_transform

ROOT = Path(__file__).resolve().parents[2]
STATUS = native.status()
pytestmark = pytest.mark.skipif(not STATUS["available"], reason=f"native library not built: {STATUS['reason']}")

MODES = ("bilinear", "nearest", "bicubic")
PADDINGS = ("zeros", "border", "reflection")
F32 = TensorProto.FLOAT


def _session(model: bytes, threads: int = 1) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    native.register(so)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _close(out: np.ndarray, ref: np.ndarray, what: str, atol: float = 1e-5) -> None:
    assert out.shape == ref.shape, what
    assert np.array_equal(np.isnan(out), np.isnan(ref)), f"{what}: NaN at different places"
    d = np.abs(np.nan_to_num(out) - np.nan_to_num(ref))
    assert d.max(initial=0.0) <= atol, f"{what}: max |diff| {d.max():.3g}"


# (N, C, H, W, h, w): batch 1 and many, C 1..4, 1x1 and 1xN images, grids larger than the image
SHAPES = [(1, 3, 17, 23, 9, 31), (5, 1, 12, 9, 7, 6), (2, 4, 1, 1, 3, 5), (3, 2, 1, 13, 4, 6), (1, 3, 13, 1, 5, 4),
          (1, 1, 40, 37, 45, 41)]


@pytest.mark.parametrize("mode,padding,align_corners", list(itertools.product(MODES, PADDINGS, (False, True))))
def test_grid_sample_matches_torch(mode: str, padding: str, align_corners: bool) -> None:
    """Every mode x padding x align_corners; points outside the image, NaN and +-inf in the grid;
    the same bits with one and two threads."""
    g = torch.Generator().manual_seed(0)
    model = native.op_model("GridSample", mode, padding, align_corners)
    one, two = _session(model, 1), _session(model, 2)
    for shape in SHAPES:
        n, c, h_in, w_in, h, w = shape
        x = torch.randn(n, c, h_in, w_in, generator=g)
        grid = torch.rand(n, h, w, 2, generator=g) * 3.0 - 1.5
        grid[0, 0, 0, 0] = float("nan")
        grid[0, 0, 1 % w, 1] = float("inf")
        grid[-1, -1, -1] = torch.tensor([-float("inf"), 0.25])
        grid[-1, 0, -1] = torch.tensor([1.0, -1.0])  # exactly on the edges
        ref = F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=align_corners).numpy()
        feeds = {"X": x.numpy(), "G": grid.numpy()}
        y1 = one.run(None, feeds)[0]
        y2 = two.run(None, feeds)[0]
        _close(y1, ref, f"{mode}/{padding}/ac={align_corners} {shape}")
        assert np.array_equal(y1, y2, equal_nan=True), f"thread count changed the result at {shape}"


def _theta(family: str, n: int, g: torch.Generator) -> torch.Tensor:
    if family == "projective":
        t = torch.eye(3).repeat(n, 1, 1) + torch.randn(n, 3, 3, generator=g) * 0.2
        t[:, 2, 2] = 1.0
        return t
    return torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).repeat(n, 1, 1) + torch.randn(n, 2, 3, generator=g) * 0.4


@pytest.mark.parametrize("family", ["affine", "projective"])
@pytest.mark.parametrize("mode,padding,align_corners", list(itertools.product(MODES, PADDINGS, (False, True))))
def test_warp_matches_torch_grid_generator_and_sampler(family: str, mode: str, padding: str,
                                                       align_corners: bool) -> None:
    """Warp == grid_sample(image, the model's grid generator at the output's base coordinates)."""
    g = torch.Generator().manual_seed(1)
    model = native.op_model("Warp", mode, padding, align_corners)
    one, two = _session(model, 1), _session(model, 2)
    transform = make_transform(family)
    for n, c, h_in, w_in, h, w in [(1, 3, 31, 27, 17, 23), (4, 2, 9, 14, 11, 8), (2, 1, 1, 1, 3, 2)]:
        # a smooth image: the coordinate pass rounds differently from torch's matmul by an ulp
        x = F.interpolate(torch.rand(n, c, 4, 4, generator=g), size=(h_in, w_in), mode="bilinear")
        theta = _theta(family, n, g)
        if align_corners:
            xs, ys = torch.linspace(-1, 1, w) if w > 1 else torch.zeros(1), torch.linspace(-1, 1, h) if h > 1 else torch.zeros(1)
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            base = torch.stack([gx, gy, torch.ones_like(gx)], -1)
        else:
            base = transform.base_grid((h, w))
        ref = F.grid_sample(x, transform.grid(theta, base), mode=mode, padding_mode=padding,
                            align_corners=align_corners).numpy()
        feeds = {"X": x.numpy(), "T": theta.numpy(), "S": np.zeros((h, w, 3), np.float32)}
        y1 = one.run(None, feeds)[0]
        _close(y1, ref, f"{family} {mode}/{padding}/ac={align_corners} {(n, c, h_in, w_in, h, w)}")
        assert np.array_equal(y1, two.run(None, feeds)[0], equal_nan=True)


def _conformance_cases() -> list:
    from onnx.backend.test.case.node import collect_testcases

    return [c for c in collect_testcases("GridSample") if len(c.model.graph.input[0].type.tensor_type.shape.dim) == 4]


def test_onnx_gridsample_conformance_cases_pass_on_the_native_op() -> None:
    """onnx.backend.test.case.node.gridsample (4-D cases), with the node moved into our domain, at the
    ONNX backend runner's own tolerance (rtol 1e-3, atol 1e-7: some expected values are printed to 4
    digits); and within 1e-5 of torch on the same inputs."""
    cases = _conformance_cases()
    assert len(cases) >= 10
    for case in cases:
        model = onnx.ModelProto()
        model.CopyFrom(case.model)
        for node in model.graph.node:
            if node.op_type == "GridSample":
                node.domain = native.DOMAIN
        model.opset_import.append(helper.make_opsetid(native.DOMAIN, 1))
        sess = _session(model.SerializeToString())
        for inputs, outputs in case.data_sets:
            feeds = {i.name: v for i, v in zip(model.graph.input, inputs, strict=True)}
            got = sess.run(None, feeds)[0]
            np.testing.assert_allclose(got, outputs[0], rtol=1e-3, atol=1e-7, err_msg=case.name)
            attrs = {a.name: helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
            mode = attrs.get("mode", b"linear" if model.opset_import[0].version >= 20 else b"bilinear").decode()
            ref = F.grid_sample(torch.from_numpy(inputs[0]), torch.from_numpy(inputs[1]),
                                mode={"linear": "bilinear", "cubic": "bicubic"}.get(mode, mode),
                                padding_mode=attrs.get("padding_mode", b"zeros").decode(),
                                align_corners=bool(attrs.get("align_corners", 0))).numpy()
            _close(got, ref, case.name)


@pytest.mark.parametrize("feeds,message", [
    ({"X": np.zeros((1, 3, 4), np.float32), "G": np.zeros((1, 2, 2, 2), np.float32)}, "X must be [N, C, H, W]"),
    ({"X": np.zeros((1, 3, 4, 4), np.float32), "G": np.zeros((2, 2, 2, 2), np.float32)}, "Grid must be [N, h, w, 2]"),
    ({"X": np.zeros((1, 3, 4, 4), np.float32), "G": np.zeros((1, 2, 2, 3), np.float32)}, "Grid must be [N, h, w, 2]"),
    ({"X": np.zeros((1, 3, 0, 4), np.float32), "G": np.zeros((1, 2, 2, 2), np.float32)}, "empty spatial size"),
])
def test_bad_shapes_are_clear_errors(feeds: dict, message: str) -> None:
    sess = _session(native.op_model("GridSample", "bilinear", "zeros", False))
    with pytest.raises(Exception, match=message.replace("[", r"\[").replace("]", r"\]")):
        sess.run(None, feeds)


def test_bad_theta_and_attribute_are_clear_errors() -> None:
    sess = _session(native.op_model("Warp", "bilinear", "zeros", False))
    with pytest.raises(Exception, match=r"theta must be \[N, 2, 3\]"):
        sess.run(None, {"X": np.zeros((1, 1, 4, 4), np.float32), "T": np.zeros((1, 3, 2), np.float32),
                        "S": np.zeros((2, 2, 3), np.float32)})
    with pytest.raises(Exception, match="unknown mode 'area'"):
        _session(native.op_model("GridSample", "area", "zeros", False))


def test_empty_batch_and_empty_output() -> None:
    sess = _session(native.op_model("GridSample", "bilinear", "zeros", False))
    y = sess.run(None, {"X": np.zeros((0, 3, 4, 4), np.float32), "G": np.zeros((0, 2, 2, 2), np.float32)})[0]
    assert y.shape == (0, 3, 2, 2)
    y = sess.run(None, {"X": np.ones((1, 2, 4, 4), np.float32), "G": np.zeros((1, 0, 3, 2), np.float32)})[0]
    assert y.shape == (1, 2, 0, 3)


def test_status_shape_and_cuda_library() -> None:
    st = native.status()
    assert {"available", "path", "reason", "cuda"} <= set(st)
    assert st["available"] is True and st["reason"] == "" and Path(st["path"]).is_file()
    assert "GridSample" in st["info"] and "Warp" in st["info"]
    cuda_lib = native.library_path(cuda=True)
    if cuda_lib.exists():
        # built where nvcc was found: it must load (dlopen, symbols, registration) and compute on the CPU
        assert st["cuda"] is True, st["cuda_reason"]
    else:
        assert st["cuda"] is False and "not built" in st["cuda_reason"]


def _status_in_subprocess(env_path: str) -> dict:
    code = "import json, native; print(json.dumps(native.status()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env={**__import__("os").environ, "STN_NATIVE_LIBRARY": env_path, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    import json

    return json.loads(out.stdout)


def test_missing_or_broken_library_says_why(tmp_path: Path) -> None:
    missing = _status_in_subprocess(str(tmp_path / "nope.so"))
    assert missing["available"] is False and "does not exist" in missing["reason"] and missing["path"] is None
    broken = tmp_path / "broken.so"
    broken.write_bytes(b"not an ELF file")
    st = _status_in_subprocess(str(broken))
    assert st["available"] is False and "cannot load" in st["reason"]
    with pytest.raises(native.NativeUnavailable, match="cannot load"):
        import os

        old = os.environ.get("STN_NATIVE_LIBRARY")
        os.environ["STN_NATIVE_LIBRARY"] = str(broken)
        try:
            native.register(ort.SessionOptions())
        finally:
            if old is None:
                del os.environ["STN_NATIVE_LIBRARY"]
            else:
                os.environ["STN_NATIVE_LIBRARY"] = old


# Runs every case of an .npz file on the native ops and saves the outputs; run in a subprocess, as
# the bilinear path (AVX2 or baseline) is chosen once per process (STN_NATIVE_ISA).
_RUN_CASES = """
import sys, numpy as np, onnxruntime as ort, native
cases = np.load(sys.argv[1])
out = {}
for key in sorted({k.split(":")[0] for k in cases.files}):
    op, padding, ac = key.split("|")[:3]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    native.register(so)
    sess = ort.InferenceSession(native.op_model(op, "bilinear", padding, bool(int(ac))), so,
                                providers=["CPUExecutionProvider"])
    inputs = ["X", "T", "S"] if op == native.WARP else ["X", "G"]
    out[key] = sess.run(None, {n: cases[key + ":" + n] for n in inputs})[0]
np.savez(sys.argv[2], **out)
print(native.status()["info"])
"""


def test_avx2_and_baseline_bilinear_paths_give_the_same_bits(tmp_path: Path) -> None:
    """The explicit AVX2 bilinear path and the baseline one agree bit for bit, border blocks and NaN included."""
    if not STATUS["info"].endswith("path avx2"):
        pytest.skip(f"this CPU runs the baseline path only ({STATUS['info']})")
    rng = np.random.default_rng(3)
    cases: dict[str, np.ndarray] = {}
    # (C, H, W, h, w): widths around the 8-pixel block, a large mostly-interior warp, 1-pixel images
    shapes = [(3, 37, 53, 29, 67), (1, 20, 20, 9, 8), (4, 11, 9, 13, 7), (2, 1, 1, 3, 9), (3, 64, 80, 61, 83)]
    for i, (c, h_in, w_in, h, w) in enumerate(shapes):
        x = rng.random((2, c, h_in, w_in), dtype=np.float32)
        for padding, ac in itertools.product(PADDINGS, (0, 1)):
            grid = (rng.random((2, h, w, 2), dtype=np.float32) * 2.6 - 1.3).astype(np.float32)
            grid[0, :, : w // 2] *= 0.5  # a run of pixels wholly inside
            grid.reshape(-1)[rng.choice(grid.size, 5, replace=False)] = [np.nan, np.inf, -np.inf, 1e30, -1e30]
            key = f"GridSample|{padding}|{ac}|{i}"
            cases.update({f"{key}:X": x, f"{key}:G": grid})
            theta = np.array([[[0.9, -0.2, 0.05], [0.25, 0.95, -0.1]], [[1.3, 0.1, 0.2], [-0.1, 1.2, 0.0]]], np.float32)
            key = f"Warp|{padding}|{ac}|{i}"
            cases.update({f"{key}:X": x, f"{key}:T": theta, f"{key}:S": np.zeros((h, w, 3), np.float32)})
    np.savez(tmp_path / "cases.npz", **cases)
    outs = {}
    for isa in ("default", "baseline"):
        env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "STN_NATIVE_ISA": isa}
        proc = subprocess.run([sys.executable, "-c", _RUN_CASES, str(tmp_path / "cases.npz"), str(tmp_path / f"{isa}.npz")],
                              capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().endswith("path avx2" if isa == "default" else "path baseline"), proc.stdout
        outs[isa] = np.load(tmp_path / f"{isa}.npz")
    assert set(outs["default"].files) == set(outs["baseline"].files) and len(outs["default"].files) == 60
    for key in outs["default"].files:
        a, b = outs["default"][key], outs["baseline"][key]
        assert a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32)), key
