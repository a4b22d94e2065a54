"""The service's sampler on the native ops: every model (exported with any lowering) samples on
ai.stn when the library is present, with the exported lowering's results; a setting turns it off;
a missing or broken library falls back (auto) or is a clear load error (on, or a native export)."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest

import native
from export.metadata import MetadataError, ModelInfo, read_props, write_props
from service.runtime import ModelLoadError, SessionConfig, load_model

STATUS = native.status()
needs_library = pytest.mark.skipif(not STATUS["available"], reason=f"native library not built: {STATUS['reason']}")
CPU = ("CPUExecutionProvider",)


@needs_library
@pytest.mark.parametrize("name", ["affine", "projective", "tps"])
def test_every_family_samples_natively_like_its_exported_lowering(model_dir: Path, name: str) -> None:
    on = load_model(model_dir / f"{name}.onnx", SessionConfig(providers=CPU, intra_op_threads=2))
    off = load_model(model_dir / f"{name}.onnx", SessionConfig(providers=CPU, native_sampler="off"))
    expected_op = "ai.stn::GridSample" if name == "tps" else "ai.stn::Warp"
    assert on.describe()["sampler"] == {"implementation": "native", "op": expected_op, "library": STATUS["path"]}
    assert off.describe()["sampler"]["implementation"] == "exported"
    rng = np.random.default_rng(0)
    c = on.info.in_channels
    # a smooth image (coordinates rounded an ulp differently from the exported MatMul move samples by a hair)
    coarse = rng.random((2, c, 6, 6), dtype=np.float32)
    image = np.kron(coarse, np.ones((1, 1, 9, 11), np.float32))[:, :, :50, :61]
    image = (image + np.roll(image, 1, axis=-1) + np.roll(image, 1, axis=-2)) / 3
    theta = off.localise(off.normalize(off.resize(off.upload(image))))
    for size in (None, (33, 47)):
        a = on.sample(on.upload(image), theta, size)
        b = off.sample(off.upload(image), theta, size)
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-4, np.abs(a - b).max()


def _native_export_of(src: Path, dst: Path) -> Path:
    """What `stn export --grid-sample native` writes before fusing: the sampler in the ai.stn domain."""
    model = onnx.load(src)
    for node in model.graph.node:
        if node.op_type == "GridSample":
            node.domain = "ai.stn"
    model.opset_import.append(onnx.helper.make_opsetid("ai.stn", 1))
    props = read_props(model)
    info = ModelInfo.from_props(props)
    write_props(model, ModelInfo(**{**info.__dict__, "grid_sample": "native"}))
    onnx.save(model, dst)
    return dst


def test_missing_or_broken_library_falls_back_or_refuses(model_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    broken = tmp_path / "broken.so"
    broken.write_bytes(b"\x7fELF but not really")
    native_model = _native_export_of(model_dir / "affine.onnx", tmp_path / "native.onnx")
    monkeypatch.setenv("STN_NATIVE_LIBRARY", str(broken))
    monkeypatch.setattr(native, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="native"):
        rt = load_model(model_dir / "affine.onnx", SessionConfig(providers=CPU))
    assert rt.describe()["sampler"]["implementation"] == "exported"
    assert any("native sampler not in use" in r.getMessage() and "cannot load" in r.getMessage()
               for r in caplog.records)
    image = np.random.default_rng(1).random((1, 1, 30, 40), dtype=np.float32)
    assert rt.sample(rt.upload(image), np.array([[[1, 0, 0], [0, 1, 0]]], np.float32)).shape == (1, 1, 42, 42)
    with pytest.raises(ModelLoadError, match="STN_NATIVE_SAMPLER=on but the native sampler library is unavailable"):
        load_model(model_dir / "affine.onnx", SessionConfig(providers=CPU, native_sampler="on"))
    with pytest.raises(ModelLoadError, match="exported with --grid-sample native, it needs the native sampler"):
        load_model(native_model, SessionConfig(providers=CPU, native_sampler="off"))


@needs_library
def test_a_native_export_loads_even_with_the_setting_off(model_dir: Path, tmp_path: Path) -> None:
    native_model = _native_export_of(model_dir / "projective.onnx", tmp_path / "native.onnx")
    rt = load_model(native_model, SessionConfig(providers=CPU, native_sampler="off"))
    assert rt.describe()["sampler"]["implementation"] == "native" and rt.info.grid_sample == "native"
    rt.warmup()


def test_metadata_accepts_the_native_lowering() -> None:
    assert "native" in __import__("export.metadata", fromlist=["LOWERINGS"]).LOWERINGS
    with pytest.raises(MetadataError):
        ModelInfo(name="m", version="1", transform="affine", in_channels=1, loc_size=(8, 8), output_size=(8, 8),
                  mean=(0.0,), std=(1.0,), grid_sample="cuda").validate()


@needs_library
def test_server_reports_the_native_sampler(server) -> None:  # noqa: ANN001
    models = httpx.get(server.url + "/v1/models").json()["models"]
    assert models and all(m["sampler"]["implementation"] == "native" for m in models)
    assert {m["name"]: m["sampler"]["op"] for m in models} == {
        "affine": "ai.stn::Warp", "projective": "ai.stn::Warp", "tps": "ai.stn::GridSample"}
