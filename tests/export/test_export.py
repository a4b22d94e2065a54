"""Export: every family and lowering matches PyTorch in onnxruntime; metadata and contract hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from export.contract import ContractError, split
from export.lowerings import check_lowering, translation
from export.metadata import MetadataError, ModelInfo, read_props
from export.onnx_export import check_parity, export_checkpoint, export_onnx, info_for
from models import frames
from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.sampler import grid_sample
from models.stn import SpatialTransformer, STNConfig
from models.transforms import TRANSFORMS

ROOT = Path(__file__).resolve().parents[2]


def _stn(family: str, **kw) -> SpatialTransformer:
    torch.manual_seed(0)
    stn = SpatialTransformer(STNConfig(transform=family, **kw))
    torch.nn.init.normal_(stn.localisation.regressor.weight, std=0.02)  # off the identity
    return stn.eval()


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# every family with its own parameters, and the projective family's corner parametrisation
FAMILY_CASES = [*((f, "matrix") for f in TRANSFORMS), ("projective", "corners")]


@pytest.mark.parametrize(("family", "parametrisation"), FAMILY_CASES)
def test_each_family_exports_and_matches_with_dynamic_batch(family: str, parametrisation: str, tmp_path: Path) -> None:
    stn = _stn(family, output_size=(24, 20), parametrisation=parametrisation)
    path = tmp_path / f"{family}.onnx"
    report = export_onnx(stn, path, info_for(stn, {}, "onnx", family, "1", "test"))
    assert report.max_abs_diff < 1e-4
    info = ModelInfo.from_props(read_props(onnx.load(path)))
    assert (info.transform, info.parametrisation) == (family, parametrisation)  # the service reads theta as usual
    sess = _session(path)
    assert [i.name for i in sess.get_inputs()] == ["image"]
    assert [o.name for o in sess.get_outputs()] == ["rectified", "theta"]
    for n, (h, w) in [(1, (28, 28)), (5, (61, 33))]:
        x = torch.rand(n, 1, h, w)
        rect, theta = sess.run(None, {"image": x.numpy()})
        with torch.no_grad():
            ref_rect, ref_theta = stn(x)
        assert rect.shape == (n, 1, 24, 20)
        np.testing.assert_allclose(rect, ref_rect.numpy(), atol=1e-4)
        np.testing.assert_allclose(theta, ref_theta.numpy(), atol=1e-5)


def test_grid_generator_is_a_matmul(tmp_path: Path) -> None:
    stn = _stn("affine")
    export_onnx(stn, tmp_path / "m.onnx", info_for(stn, {}, "onnx", "m", "1", "test"))
    ops = [n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node]
    assert "MatMul" in ops and "AffineGrid" not in ops and "ReduceSum" not in ops
    assert ops.count("GridSample") == 1


class _Sampler(torch.nn.Module):
    def __init__(self, mode: str, padding: str) -> None:
        super().__init__()
        self.mode, self.padding = mode, padding

    def forward(self, image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return grid_sample(image, grid, self.mode, self.padding)


def _available_lowerings() -> list[str]:
    out = ["onnx", "contrib"]
    try:
        translation("gather")
        out.append("gather")
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("lowering", _available_lowerings())
@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
def test_each_lowering_and_padding_mode_matches_torch(lowering: str, mode: str, padding: str, tmp_path: Path) -> None:
    """The sampler alone, on random inputs with sample points outside the image: max |diff| <= 1e-5."""
    try:
        check_lowering(lowering, mode, padding, 18)
    except ValueError as e:
        assert lowering == "gather" and mode == "bicubic" and "does not support" in str(e)
        return
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 9, 13, generator=g)
    grid = torch.rand(2, 6, 7, 2, generator=g) * 3.2 - 1.6
    path = tmp_path / "s.onnx"
    torch.onnx.export(_Sampler(mode, padding).eval(), (x, grid), path, dynamo=True, opset_version=18,
                      input_names=["x", "grid"], output_names=["y"],
                      dynamic_shapes={"image": {0: "N", 2: "H", 3: "W"}, "grid": {0: "N", 1: "h", 2: "w"}},
                      custom_translation_table={torch.ops.stn.grid_sample.default: translation(lowering)})
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    domains = {n.domain for n in model.graph.node if n.op_type == "GridSample"}
    assert domains == ({"com.microsoft"} if lowering == "contrib" else {""} if lowering == "onnx" else set())
    sess = _session(path)
    for n, (h, w), (gh, gw) in [(2, (9, 13), (6, 7)), (3, (17, 5), (11, 4))]:  # other sizes at run time
        xi = torch.rand(n, 3, h, w, generator=g)
        gi = torch.rand(n, gh, gw, 2, generator=g) * 3.2 - 1.6
        y = sess.run(None, {"x": xi.numpy(), "grid": gi.numpy()})[0]
        ref = F.grid_sample(xi, gi, mode=mode, padding_mode=padding, align_corners=False).numpy()
        assert np.abs(y - ref).max() <= 1e-5, f"{lowering}/{mode}/{padding}: {np.abs(y - ref).max()}"


def test_onnx_lowering_writes_opset16_attribute_values(tmp_path: Path) -> None:
    stn = _stn("affine")
    export_onnx(stn, tmp_path / "m.onnx", info_for(stn, {}, "onnx", "m", "1", "test"), opset=19)
    node = next(n for n in onnx.load(tmp_path / "m.onnx").graph.node if n.op_type == "GridSample")
    assert onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "mode")) == b"bilinear"


def test_onnx_lowering_refuses_opset_20_with_a_reason() -> None:
    with pytest.raises(ValueError, match="TensorRT.*--opset 19, or --grid-sample contrib or gather"):
        check_lowering("onnx", "bilinear", "zeros", 20)
    with pytest.raises(ValueError, match="unknown grid-sample lowering"):
        check_lowering("cuda", "bilinear", "zeros", 18)


def test_metadata_round_trips(tmp_path: Path) -> None:
    stn = _stn("tps", in_channels=3, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7), padding_mode="border")
    meta = {"classes": ["a", "b"], "dataset": "toy", "metrics": {"err": 0.5}, "created_by": "stn train x"}
    info = info_for(stn, meta, "contrib", "toy-tps", "7", "stn train x && stn export y")
    export_onnx(stn, tmp_path / "m.onnx", info, lowering="contrib")
    model = onnx.load(tmp_path / "m.onnx")
    props = read_props(model)
    for key in ("name", "version", "transform", "in_channels", "loc_size", "output_size", "mean", "std",
                "align_corners", "padding_mode", "interpolation", "grid_sample", "classes", "dataset", "metrics",
                "created_by"):
        assert f"stn.{key}" in props, key
    assert ModelInfo.from_props(props) == info
    # onnxruntime sees the same metadata (that is how the service reads it).
    assert ModelInfo.from_props(_session(tmp_path / "m.onnx").get_modelmeta().custom_metadata_map) == info


def test_metadata_errors_name_the_key() -> None:
    with pytest.raises(MetadataError, match="lack stn.name"):
        ModelInfo.from_props({"stn.version": '"1"'})
    good = info_for(_stn("affine"), {}, "onnx", "m", "1", "x").to_props()
    with pytest.raises(MetadataError, match="not JSON"):
        ModelInfo.from_props({**good, "stn.mean": "[0.5"})
    with pytest.raises(MetadataError, match="unknown transform"):
        ModelInfo.from_props({**good, "stn.transform": '"shear"'})


@pytest.mark.parametrize("family", ["affine", "projective", "tps"])
def test_contract_split_matches_full_model_at_any_output_size(family: str, tmp_path: Path) -> None:
    stn = _stn(family, output_size=(20, 24))
    info = info_for(stn, {}, "onnx", "m", "1", "x")
    export_onnx(stn, tmp_path / "m.onnx", info)
    model = onnx.load(tmp_path / "m.onnx")
    full = _session(tmp_path / "m.onnx")
    subs = split(model, info)
    resize, loc, sampler = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                            for m in (subs.resize, subs.localiser, subs.sampler))
    x = np.random.default_rng(0).random((1, 1, 45, 38), dtype=np.float32)
    rect, theta = full.run(None, {"image": x})
    small = resize.run(None, {"image": x})[0]
    assert small.shape == (1, 1, 28, 28)
    batch = np.concatenate([small, small * 0.5])  # localisation batches across requests
    theta2 = loc.run(None, {"loc_input": batch})[0]
    np.testing.assert_array_equal(theta2[:1], theta)
    rect2 = sampler.run(None, {"image": x, "theta": theta, "base_grid": frames.base_grid(family, (20, 24))})[0]
    np.testing.assert_array_equal(rect2, rect)
    big = sampler.run(None, {"image": x, "theta": theta, "base_grid": frames.base_grid(family, (50, 31))})[0]
    with torch.no_grad():
        ref = stn.sample(torch.from_numpy(x), torch.from_numpy(theta), (50, 31)).numpy()
    np.testing.assert_allclose(big, ref, atol=1e-5)


@pytest.mark.parametrize("family,lowering", [("projective", "onnx"), ("affine", "contrib"), ("tps", "gather")])
def test_contract_split_resize_and_sampler_take_any_channels(family: str, lowering: str, tmp_path: Path) -> None:
    """A gray model's resize and sampler run on 3 channels (a server samples uploads in their own colour):
    each channel comes out as if sampled alone; the localiser keeps the model's channel."""
    if lowering not in _available_lowerings():
        pytest.skip(f"{lowering} lowering not available")
    stn = _stn(family, output_size=(20, 24))
    info = info_for(stn, {}, lowering, "m", "1", "x")
    export_onnx(stn, tmp_path / "m.onnx", info)
    subs = split(onnx.load(tmp_path / "m.onnx"), info)
    dims = {m: [d.dim_param or d.dim_value for d in getattr(subs, m).graph.input[0].type.tensor_type.shape.dim]
            for m in ("resize", "localiser", "sampler")}
    assert dims["resize"][1] == dims["sampler"][1] == "C" and dims["localiser"][1] == 1
    resize, loc, sampler = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                            for m in (subs.resize, subs.localiser, subs.sampler))
    x = np.random.default_rng(1).random((1, 3, 37, 52), dtype=np.float32)
    theta = loc.run(None, {"loc_input": resize.run(None, {"image": x[:, :1]})[0]})[0]
    small = resize.run(None, {"image": x})[0]
    rect = sampler.run(None, {"image": x, "theta": theta, "base_grid": frames.base_grid(family, (20, 24))})[0]
    assert small.shape == (1, 3, 28, 28) and rect.shape == (1, 3, 20, 24)
    for c in range(3):
        one = x[:, c:c + 1]
        np.testing.assert_allclose(small[:, c:c + 1], resize.run(None, {"image": one})[0], atol=1e-6)
        alone = sampler.run(None, {"image": one, "theta": theta, "base_grid": frames.base_grid(family, (20, 24))})[0]
        np.testing.assert_allclose(rect[:, c:c + 1], alone, atol=1e-6)


def test_split_refuses_a_model_without_contract_names() -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    model = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    with pytest.raises(ContractError, match="no tensor named 'image'"):
        split(model, info_for(_stn("affine"), {}, "onnx", "m", "1", "x"))


def test_parity_check_catches_a_wrong_model(tmp_path: Path) -> None:
    stn = _stn("affine")
    export_onnx(stn, tmp_path / "m.onnx", info_for(stn, {}, "onnx", "m", "1", "x"))
    other = _stn("affine")
    torch.nn.init.normal_(other.localisation.regressor.weight, std=0.2)
    with pytest.raises(Exception, match="differs from PyTorch"):
        check_parity(other, tmp_path / "m.onnx")


def test_checkpoint_round_trip_and_export(tmp_path: Path) -> None:
    stn = _stn("similarity")
    save_checkpoint(tmp_path / "c.pt", stn, {"name": "sim", "version": "3", "created_by": "stn train --x"})
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert ckpt.kind == "stn" and ckpt.stn_config == stn.config
    report = export_checkpoint(tmp_path / "c.pt", tmp_path / "c.onnx", command="stn export c.pt")
    info = ModelInfo.from_props(read_props(onnx.load(report.path)))
    assert (info.name, info.version, info.transform) == ("sim", "3", "similarity")
    assert info.created_by == "stn train --x && stn export c.pt"


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_checkpoint(bad)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an stn checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_an_output_that_cannot_be_written_is_a_clear_error(tmp_path: Path) -> None:
    # before: a folder as the output exported, checked parity, then failed in os.replace with a traceback
    save_checkpoint(tmp_path / "c.pt", _stn("affine"), {"name": "cli", "version": "1"})
    (tmp_path / "a-file").write_text("x")
    for output, says in ((tmp_path, f"{tmp_path} is a folder: give the .onnx file to write (e.g. "
                                    f"{tmp_path / 'cli.onnx'})"),
                         (tmp_path / "a-file" / "m.onnx", "a folder on its path is a file")):
        proc = subprocess.run([sys.executable, "-m", "stn", "export", str(tmp_path / "c.pt"), "-o", str(output)],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "c.pt"]  # no .tmp left behind


def test_cli_export_end_to_end(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c.pt", _stn("affine"), {"name": "cli", "version": "1"})
    stn_cmd = [sys.executable, "-m", "stn"]
    out = subprocess.run([*stn_cmd, "export", str(tmp_path / "c.pt"), "-o", str(tmp_path / "c.onnx"),
                          "--grid-sample", "contrib"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "lowering=contrib" in out.stdout and "opset=18" in out.stdout and "max|diff|=" in out.stdout
    bad = subprocess.run([*stn_cmd, "export", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "x.onnx")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
    refused = subprocess.run([*stn_cmd, "export", str(tmp_path / "c.pt"), "-o", str(tmp_path / "x.onnx"),
                              "--opset", "20"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert refused.returncode == 2 and "TensorRT" in refused.stderr
