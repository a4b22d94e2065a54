"""The ``gather`` lowering of grid_sample: core ONNX ops only, equal to F.grid_sample.

Each case exports a tiny module around a test-local custom op (``stntest::grid_sample``,
independent of ``models.sampler``) with dynamic N/H/W/Hout/Wout, then runs it in
onnxruntime on shapes other than the export shapes.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from export.gather import grid_sample_gather


@torch.library.custom_op("stntest::grid_sample", mutates_args=())
def gs(image: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str, align_corners: bool) -> torch.Tensor:
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


@gs.register_fake
def _(image, grid, mode, padding_mode, align_corners):  # noqa: ANN001, ANN202
    return image.new_empty((image.shape[0], image.shape[1], grid.shape[1], grid.shape[2]))


class _Sampler(nn.Module):
    def __init__(self, mode: str, padding_mode: str, align_corners: bool) -> None:
        super().__init__()
        self.mode = mode
        self.padding_mode = padding_mode
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return torch.ops.stntest.grid_sample(x, g, self.mode, self.padding_mode, self.align_corners)


def _export(path: Path, mode: str, padding_mode: str, align_corners: bool) -> onnx.ModelProto:
    x = torch.rand(2, 3, 5, 7)
    g = torch.rand(2, 4, 6, 2) * 3.2 - 1.6
    torch.onnx.export(
        _Sampler(mode, padding_mode, align_corners).eval(),
        (x, g),
        str(path),
        dynamo=True,
        input_names=["x", "g"],
        output_names=["y"],
        dynamic_shapes={"x": {0: "N", 2: "H", 3: "W"}, "g": {0: "N", 1: "h", 2: "w"}},
        custom_translation_table={torch.ops.stntest.grid_sample.default: grid_sample_gather},
        opset_version=18,
    )
    return onnx.load(str(path))


# (N, C, H, W, Hout, Wout): the first differs from the export shapes in every dynamic axis,
# then a single-pixel-wide image and a single-output-point grid, then a one-row image.
# C is static (3) in the exported model.
_RUN_SHAPES = [(3, 3, 9, 6, 5, 8), (1, 3, 4, 1, 1, 1), (4, 3, 1, 5, 7, 3)]


@pytest.mark.parametrize(
    ("mode", "padding_mode", "align_corners"),
    list(itertools.product(["bilinear", "nearest"], ["zeros", "border", "reflection"], [False, True])),
)
def test_gather_matches_grid_sample(tmp_path: Path, mode: str, padding_mode: str, align_corners: bool) -> None:
    path = tmp_path / "gs.onnx"
    model = _export(path, mode, padding_mode, align_corners)
    onnx.checker.check_model(model, full_check=True)
    op_types = {node.op_type for node in model.graph.node}
    assert "GridSample" not in op_types
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    assert "GatherElements" in op_types

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    cases = []
    for n, c, h, w, h_out, w_out in _RUN_SHAPES:
        g = torch.rand(n, h_out, w_out, 2, generator=gen) * 3.2 - 1.6
        g[0, 0, 0] = torch.tensor([1.0, -1.0])  # exact corners
        cases.append((torch.randn(n, c, h, w, generator=gen), g))
    # Many image sizes away (several reflections), and every multiple of 1/8 in [-2, 2]:
    # on a 4x4 image these include exact half-pixel ties for both align_corners values.
    far = torch.stack(torch.meshgrid(torch.linspace(-9, 9, 13), torch.linspace(-7, 8, 11), indexing="xy"), -1)
    eighths = torch.arange(-16, 17, dtype=torch.float32) / 8
    ties = torch.stack(torch.meshgrid(eighths, eighths, indexing="xy"), -1)
    image = torch.randn(2, 3, 4, 4, generator=gen)
    cases += [(image, far.expand(2, -1, -1, -1)), (image, ties.expand(2, -1, -1, -1))]
    # Non-finite coordinates (and, but for reflection, a huge one) behave as in torch.
    special = [float("nan"), float("inf"), float("-inf"), 0.3] + ([] if padding_mode == "reflection" else [1e30])
    values = torch.tensor(special)
    odd = torch.stack(torch.meshgrid(values, values, indexing="xy"), -1)
    cases.append((image, odd.expand(2, -1, -1, -1)))

    for x, g in cases:
        expected = F.grid_sample(x, g, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
        (got,) = session.run(["y"], {"x": x.numpy(), "g": g.contiguous().numpy()})
        assert got.shape == tuple(expected.shape)
        np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-5)  # NaN == NaN


def test_gather_rejects_bicubic(tmp_path: Path) -> None:
    """The exporter wraps the translation's ValueError in OnnxExporterError (a RuntimeError);
    the ValueError stays in the ``__cause__`` chain and its text in the message."""
    with pytest.raises(torch.onnx.OnnxExporterError, match="does not support 'bicubic'") as excinfo:
        _export(tmp_path / "gs.onnx", "bicubic", "zeros", False)
    causes = []
    err: BaseException | None = excinfo.value
    while err is not None:
        causes.append(err)
        err = err.__cause__
    value_errors = [e for e in causes if type(e) is ValueError]
    assert value_errors, [type(e) for e in causes]
    message = str(value_errors[0])
    assert "'gather'" in message and "'onnx' or 'contrib'" in message


def test_gather_rejects_bicubic_directly() -> None:
    with pytest.raises(ValueError, match="does not support 'bicubic'"):
        grid_sample_gather(None, None, "bicubic", "zeros", False)
    with pytest.raises(ValueError, match="padding mode 'wrap'"):
        grid_sample_gather(None, None, "bilinear", "wrap", False)
