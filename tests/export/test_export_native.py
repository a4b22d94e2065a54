"""`--grid-sample native`: the ai.stn ops in the file, fused Warp for affine-like and projective
families, parity against PyTorch, metadata, and a clear refusal without the library."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import native
from export.contract import split
from export.metadata import ModelInfo, read_props
from export.native_sampler import uses_native
from export.onnx_export import export_onnx, info_for
from models.checkpoint import save_checkpoint
from models.stn import SpatialTransformer, STNConfig
from models.transforms import TRANSFORMS

ROOT = Path(__file__).resolve().parents[2]
STATUS = native.status()
needs_library = pytest.mark.skipif(not STATUS["available"], reason=f"native library not built: {STATUS['reason']}")


def _stn(family: str, **kw) -> SpatialTransformer:
    torch.manual_seed(0)
    stn = SpatialTransformer(STNConfig(transform=family, **kw))
    torch.nn.init.normal_(stn.localisation.regressor.weight, std=0.02)
    return stn.eval()


@needs_library
@pytest.mark.parametrize("family", [pytest.param(f, marks=[] if f in ("projective", "tps") else pytest.mark.slow)
                                    for f in TRANSFORMS])  # affine: the CLI test below
def test_native_lowering_exports_every_family(family: str, tmp_path: Path) -> None:
    stn = _stn(family, output_size=(24, 20), mode="bilinear" if family != "projective" else "bicubic",
               padding_mode="border" if family == "similarity" else "zeros")
    path = tmp_path / "m.onnx"
    report = export_onnx(stn, path, info_for(stn, {}, "native", family, "1", "test"), lowering="native")
    model = onnx.load(path)
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    fused = family != "tps"
    assert ("ai.stn", "Warp" if fused else "GridSample") in ops
    assert ("", "GridSample") not in ops and uses_native(model)
    if fused:  # no grid generator left: coordinates come from theta inside the op
        assert ("ai.stn", "GridSample") not in ops and ("", "Div") not in ops
    assert report.sampler == ("ai.stn::Warp" if fused else "ai.stn::GridSample") and report.max_abs_diff < 1e-4
    info = ModelInfo.from_props(read_props(model))
    assert info.grid_sample == "native"
    assert "native sampler library" in report.summary()
    subs = split(model, info)  # the contract's sub-models still cut out
    assert uses_native(subs.sampler) and not uses_native(subs.localiser)
    so = ort.SessionOptions()
    native.register(so)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = torch.rand(3, 1, 37, 45)
    rect, theta = sess.run(None, {"image": x.numpy()})
    with torch.no_grad():
        ref = stn.sample(x, torch.from_numpy(theta))
    assert np.abs(rect - ref.numpy()).max() < 1e-5


@needs_library
def test_cli_export_native_says_it_needs_the_library(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c.pt", _stn("affine"), {"name": "cli", "version": "1"})
    out = subprocess.run([sys.executable, "-m", "stn", "export", str(tmp_path / "c.pt"), "-o", str(tmp_path / "c.onnx"),
                          "--grid-sample", "native"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "lowering=native" in out.stdout and "sampler=ai.stn::Warp" in out.stdout
    assert "native sampler library" in out.stdout


def test_native_export_without_the_library_is_refused_with_the_reason(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c.pt", _stn("affine"), {"name": "cli", "version": "1"})
    env = {**os.environ, "STN_NATIVE_LIBRARY": str(tmp_path / "missing.so")}
    out = subprocess.run([sys.executable, "-m", "stn", "export", str(tmp_path / "c.pt"), "-o", str(tmp_path / "c.onnx"),
                          "--grid-sample", "native"], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert out.returncode == 2 and "needs the native sampler library" in out.stderr and "missing.so" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "c.onnx").exists()
