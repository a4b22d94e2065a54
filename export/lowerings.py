"""How ``stn::grid_sample`` lowers to ONNX: one translation function per lowering.

- ``onnx``: the standard ``GridSample`` with opset-16 attribute values (``bilinear``,
  ``nearest``, ``bicubic``). GridSample-20 renamed them (``linear``/``cubic``), which
  TensorRT's ONNX parser silently reads as nearest, so this lowering needs opset <= 19.
- ``contrib``: onnxruntime's ``com.microsoft::GridSample`` (same attribute values).
- ``gather``: core ONNX ops only (``export.gather``), for runtimes with no GridSample;
  bilinear and nearest.
- ``native``: our ``ai.stn::GridSample`` (the ``native`` package's library; the model then needs
  it). The exporter fuses affine-like and projective samplers into ``ai.stn::Warp``
  (``export.native_sampler.fuse_warp``).
"""

from __future__ import annotations

from collections.abc import Callable

import onnxscript
from onnx.defs import OpSchema
from onnxscript import opset18 as op

from export.metadata import LOWERINGS

MIN_OPSET = 18  # the torch dynamo exporter's floor
MAX_OPSET_ONNX = 19  # GridSample-20 renames the modes (see module docstring)

_SUPPORTED_MODES = {
    "onnx": ("bilinear", "nearest", "bicubic"),
    "contrib": ("bilinear", "nearest", "bicubic"),
    "gather": ("bilinear", "nearest"),
    "native": ("bilinear", "nearest", "bicubic"),
}

_MS_DOMAIN = onnxscript.values.Opset("com.microsoft", 1)


def _grid_sample_schema(domain: str) -> OpSchema:
    """GridSample's schema (opset-16 attribute values) in a custom domain."""
    return OpSchema(
        "GridSample",
        domain,
        1,
        inputs=[OpSchema.FormalParameter("X", "T1"), OpSchema.FormalParameter("Grid", "T2")],
        outputs=[OpSchema.FormalParameter("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)"], ""), ("T2", ["tensor(float)"], "")],
        attributes=[
            OpSchema.Attribute("mode", OpSchema.AttrType.STRING, "bilinear | nearest | bicubic"),
            OpSchema.Attribute("padding_mode", OpSchema.AttrType.STRING, "zeros | border | reflection"),
            OpSchema.Attribute("align_corners", OpSchema.AttrType.INT, "0 | 1"),
        ],
    )


_MS_GRID_SAMPLE_SCHEMA = _grid_sample_schema("com.microsoft")


def grid_sample_onnx(image, grid, mode: str, padding_mode: str, align_corners: bool):  # noqa: ANN001, ANN201
    """Standard ONNX GridSample, opset-16 attribute values."""
    return op.GridSample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=int(align_corners))


def grid_sample_contrib(image, grid, mode: str, padding_mode: str, align_corners: bool):  # noqa: ANN001, ANN201
    """onnxruntime's com.microsoft::GridSample."""
    ms_grid_sample = onnxscript.values.Op(_MS_DOMAIN, "GridSample", _MS_GRID_SAMPLE_SCHEMA)
    return ms_grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=int(align_corners))


_STN_DOMAIN = onnxscript.values.Opset("ai.stn", 1)
_STN_GRID_SAMPLE_SCHEMA = _grid_sample_schema("ai.stn")


def grid_sample_native(image, grid, mode: str, padding_mode: str, align_corners: bool):  # noqa: ANN001, ANN201
    """Our ai.stn::GridSample (needs the native library at run time)."""
    stn_grid_sample = onnxscript.values.Op(_STN_DOMAIN, "GridSample", _STN_GRID_SAMPLE_SCHEMA)
    return stn_grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=int(align_corners))


def check_lowering(lowering: str, mode: str, padding_mode: str, opset: int) -> None:
    """Refuse, with a message that says what to do instead, a combination that cannot export."""
    if lowering not in LOWERINGS:
        raise ValueError(f"unknown grid-sample lowering {lowering!r}; choose one of {', '.join(LOWERINGS)}")
    if mode not in _SUPPORTED_MODES[lowering]:
        others = [k for k, v in _SUPPORTED_MODES.items() if mode in v]
        raise ValueError(
            f"the {lowering!r} lowering does not support {mode!r} interpolation "
            f"(it supports {', '.join(_SUPPORTED_MODES[lowering])}); use --grid-sample {' or '.join(others)}"
        )
    if padding_mode not in ("zeros", "border", "reflection"):
        raise ValueError(f"unknown padding mode {padding_mode!r}; choose zeros, border or reflection")
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is below {MIN_OPSET}, the lowest the torch exporter writes")
    if lowering == "onnx" and opset > MAX_OPSET_ONNX:
        raise ValueError(
            f"the 'onnx' lowering writes GridSample with opset-16 attribute values and needs opset <= "
            f"{MAX_OPSET_ONNX} (GridSample-20 renames bilinear to 'linear', which TensorRT reads as nearest); "
            f"use --opset {MAX_OPSET_ONNX}, or --grid-sample contrib or gather"
        )


def translation(lowering: str) -> Callable:
    """The translation function for ``lowering``."""
    if lowering == "onnx":
        return grid_sample_onnx
    if lowering == "contrib":
        return grid_sample_contrib
    if lowering == "native":
        return grid_sample_native
    if lowering == "gather":
        from export.gather import grid_sample_gather

        return grid_sample_gather
    raise ValueError(f"unknown grid-sample lowering {lowering!r}; choose one of {', '.join(LOWERINGS)}")
