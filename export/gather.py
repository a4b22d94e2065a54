"""The ``gather`` lowering of ``grid_sample``: core ONNX ops only, no ``GridSample``.

For runtimes that have no ``GridSample`` (and no ``com.microsoft`` contrib ops). The
result equals ``torch.nn.functional.grid_sample`` for 4-D inputs:

- ``image`` is ``[N, C, H, W]``, ``grid`` is ``[N, Hout, Wout, 2]`` with ``grid[..., 0]``
  the x (width) and ``grid[..., 1]`` the y (height) coordinate, normalized so that -1
  and +1 are the corner pixels' centers (``align_corners=True``) or the image's outer
  edges (``align_corners=False``); the output is ``[N, C, Hout, Wout]``.
- Unnormalize: ``ix = ((x + 1) * W - 1) / 2`` (``align_corners=False``) or
  ``ix = (x + 1) / 2 * (W - 1)`` (``True``), ATen's scalar/CUDA order of float ops
  (bit-equal to the CPU kernel's ``(x + 1) * (W / 2) - 0.5`` unless that one is fused
  into an FMA; either way a half-pixel tie computes exactly).
- Padding: ``zeros``: taps outside the image contribute 0; ``border``: coordinates are
  clipped to ``[0, W - 1]``; ``reflection``: coordinates are reflected over
  ``[-0.5, W - 0.5]`` (``align_corners=False``) or ``[0, W - 1]`` (``True``), then clipped.
- ``bilinear`` weighs the 4 neighbouring pixels; ``nearest`` rounds half to even
  (ONNX ``Round``, like torch's ``nearbyint``).

All sizes (N, C, H, W, Hout, Wout) are read with ``Shape`` at run time, so every axis may
be dynamic. The image is flattened to ``[N, C, H*W]`` and sampled with one
``GatherElements`` whose int32 linear indices ``y * W + x`` (computed once per output
point and tap, expanded over C) always lie inside the image: an out-of-image tap reads
pixel 0 and its weight is multiplied by 0. Needs ``H * W < 2**31``.

Non-finite grid values behave as in torch (CPU): with ``border``/``reflection`` NaN
becomes 0 before clipping; with ``zeros`` a NaN or infinite coordinate gives NaN
(bilinear) or 0 (nearest). Far outside the image, ``reflection`` uses an exact ``fmod``,
so for coordinates many thousands of image sizes away it can differ from torch's
rounding-prone reflection.
"""

from __future__ import annotations

from onnx import TensorProto
from onnxscript import opset18 as op

SUPPORTED_MODES = ("bilinear", "nearest")
SUPPORTED_PADDING_MODES = ("zeros", "border", "reflection")


def _scalar(value: float, like):  # noqa: ANN001, ANN202
    """A scalar constant of ``like``'s float type."""
    return op.CastLike(op.Constant(value_float=value), like)


def _ints(*values: int):  # noqa: ANN202
    """A 1-D int64 constant."""
    return op.Constant(value_ints=list(values))


def _unnormalize(coord, size_f, align_corners: bool):  # noqa: ANN001, ANN202
    """Normalized [-1, 1] coordinate to pixel units (ATen's ``grid_sampler_unnormalize``)."""
    one = _scalar(1.0, coord)
    two = _scalar(2.0, coord)
    if align_corners:
        return op.Mul(op.Div(op.Add(coord, one), two), op.Sub(size_f, one))
    return op.Div(op.Sub(op.Mul(op.Add(coord, one), size_f), one), two)


def _reflect(coord, size_f, align_corners: bool):  # noqa: ANN001, ANN202
    """Reflect ``coord`` into ``[low, low + span]`` (ATen's ``reflect_coordinates``).

    ``low, span = 0, size - 1`` with ``align_corners``, else ``-0.5, size``. Folding at
    ``low`` and ``low + span`` is periodic with period ``2 * span``:
    ``extra = fmod(|coord - low|, 2 * span)``, ``result = min(extra, 2 * span - extra) + low``.
    """
    one = _scalar(1.0, coord)
    two = _scalar(2.0, coord)
    if align_corners:
        # size == 1 gives an empty span (ATen returns 0); any positive period does, since
        # the result is clipped to [0, size - 1] = [0, 0] afterwards.
        twice_span = op.Max(op.Mul(op.Sub(size_f, one), two), one)
        centered = op.Abs(coord)
    else:
        low = _scalar(-0.5, coord)
        twice_span = op.Mul(size_f, two)
        centered = op.Abs(op.Sub(coord, low))
    extra = op.Mod(centered, twice_span, fmod=1)
    reflected = op.Min(extra, op.Sub(twice_span, extra))
    if align_corners:
        return reflected
    return op.Add(reflected, low)


def _clip(coord, size_f):  # noqa: ANN001, ANN202
    """Clip ``coord`` to ``[0, size - 1]``, NaN to 0 (ATen's ``clip_coordinates``)."""
    zero = _scalar(0.0, coord)
    return op.Min(op.Where(op.Greater(coord, zero), coord, zero), op.Sub(size_f, _scalar(1.0, coord)))


def _source_coordinate(coord, size_f, padding_mode: str, align_corners: bool):  # noqa: ANN001, ANN202
    """ATen's ``grid_sampler_compute_source_index``: unnormalize, then apply the padding."""
    coord = _unnormalize(coord, size_f, align_corners)
    if padding_mode == "border":
        coord = _clip(coord, size_f)
    elif padding_mode == "reflection":
        coord = _clip(_reflect(coord, size_f, align_corners), size_f)
    return coord


def _in_range(index_f, size_f):  # noqa: ANN001, ANN202
    """Whether the integer-valued float ``index_f`` lies in ``[0, size)`` (false for NaN)."""
    return op.And(op.GreaterOrEqual(index_f, _scalar(0.0, index_f)), op.Less(index_f, size_f))


def _safe_index(index_f, valid):  # noqa: ANN001, ANN202
    """``index_f`` as int32, replaced by 0 where it is not ``valid``."""
    return op.Cast(op.Where(valid, index_f, _scalar(0.0, index_f)), to=TensorProto.INT32)


def _masked(weight, valid):  # noqa: ANN001, ANN202
    """``weight * valid``: 0 for an out-of-image tap, NaN kept NaN as in torch."""
    return op.Mul(weight, op.CastLike(valid, weight))


def grid_sample_gather(image, grid, mode: str, padding_mode: str, align_corners: bool):  # noqa: ANN001, ANN201
    """``grid_sample`` from core ONNX ops (GatherElements); see the module docstring.

    ``image`` [N, C, H, W] and ``grid`` [N, Hout, Wout, 2] (x, y in [-1, 1]) give
    [N, C, Hout, Wout]. Raises ``ValueError`` for an unsupported mode or padding mode.
    """
    if mode not in SUPPORTED_MODES:
        raise ValueError(
            f"the 'gather' grid-sample lowering does not support {mode!r} interpolation "
            f"(it supports {', '.join(SUPPORTED_MODES)}); use the 'onnx' or 'contrib' lowering "
            f"(--grid-sample onnx or contrib), which export {mode!r} as GridSample"
        )
    if padding_mode not in SUPPORTED_PADDING_MODES:
        raise ValueError(
            f"the 'gather' grid-sample lowering does not support padding mode {padding_mode!r} "
            f"(it supports {', '.join(SUPPORTED_PADDING_MODES)})"
        )
    align_corners = bool(align_corners)

    # Run-time sizes, each a 1-D int64 tensor of one element (w_i: int32, for the indices).
    n = op.Shape(image, start=0, end=1)
    c = op.Shape(image, start=1, end=2)
    h = op.Shape(image, start=2, end=3)
    w = op.Shape(image, start=3, end=4)
    h_out = op.Shape(grid, start=1, end=2)
    w_out = op.Shape(grid, start=2, end=3)
    points = op.Mul(h_out, w_out)
    w_i = op.Cast(w, to=TensorProto.INT32)
    h_f = op.CastLike(h, grid)
    w_f = op.CastLike(w, grid)

    # [N, Hout, Wout, 2] -> x, y: [N, P] in pixel units, padding applied.
    flat_grid = op.Reshape(grid, op.Concat(n, points, _ints(2), axis=0))
    x, y = op.Split(flat_grid, axis=2, num_outputs=2)  # Split: much faster than Gather in onnxruntime
    x = op.Squeeze(x, _ints(2))
    y = op.Squeeze(y, _ints(2))
    x = _source_coordinate(x, w_f, padding_mode, align_corners)
    y = _source_coordinate(y, h_f, padding_mode, align_corners)

    flat_image = op.Reshape(image, op.Concat(n, c, op.Mul(h, w), axis=0))  # [N, C, H*W]
    per_channel = op.Concat(_ints(1), c, _ints(1), axis=0)  # expands [N, 1, K] to [N, C, K]

    if mode == "nearest":
        x_r = op.Round(x)
        y_r = op.Round(y)
        if padding_mode == "zeros":
            valid = op.And(_in_range(x_r, w_f), _in_range(y_r, h_f))
            x_i = _safe_index(x_r, valid)
            y_i = _safe_index(y_r, valid)
        else:  # clipped to [0, size - 1]: always inside
            x_i = op.Cast(x_r, to=TensorProto.INT32)
            y_i = op.Cast(y_r, to=TensorProto.INT32)
        index = op.Unsqueeze(op.Add(op.Mul(y_i, w_i), x_i), _ints(1))  # [N, 1, P]
        sampled = op.GatherElements(flat_image, op.Expand(index, per_channel), axis=2)  # [N, C, P]
        if padding_mode == "zeros":
            sampled = op.Where(op.Unsqueeze(valid, _ints(1)), sampled, _scalar(0.0, sampled))
        return op.Reshape(sampled, op.Concat(n, c, h_out, w_out, axis=0))

    # Bilinear: taps x0 = floor(x), x1 = x0 + 1 (same for y), weights as in ATen's CPU kernel.
    one = _scalar(1.0, x)
    x0 = op.Floor(x)
    y0 = op.Floor(y)
    x1 = op.Add(x0, one)
    y1 = op.Add(y0, one)
    wx1 = op.Sub(x, x0)  # weight of the east column
    wx0 = op.Sub(one, wx1)
    wy1 = op.Sub(y, y0)  # weight of the south row
    wy0 = op.Sub(one, wy1)

    # Validity per axis; with border/reflection x0, y0 are always inside (x, y are clipped).
    vx1 = _in_range(x1, w_f)
    vy1 = _in_range(y1, h_f)
    wx1 = _masked(wx1, vx1)
    wy1 = _masked(wy1, vy1)
    x1_i = _safe_index(x1, vx1)
    y1_i = _safe_index(y1, vy1)
    if padding_mode == "zeros":
        vx0 = _in_range(x0, w_f)
        vy0 = _in_range(y0, h_f)
        wx0 = _masked(wx0, vx0)
        wy0 = _masked(wy0, vy0)
        x0_i = _safe_index(x0, vx0)
        y0_i = _safe_index(y0, vy0)
    else:
        x0_i = op.Cast(x0, to=TensorProto.INT32)
        y0_i = op.Cast(y0, to=TensorProto.INT32)

    row0 = op.Mul(y0_i, w_i)
    row1 = op.Mul(y1_i, w_i)
    # Taps nw, ne, sw, se, concatenated along the point axis: [N, 4P]. One GatherElements
    # of all four beats four (onnxruntime's Expand and GatherElements dominate the run time).
    index = op.Concat(op.Add(row0, x0_i), op.Add(row0, x1_i), op.Add(row1, x0_i), op.Add(row1, x1_i), axis=1)
    weight = op.Concat(op.Mul(wy0, wx0), op.Mul(wy0, wx1), op.Mul(wy1, wx0), op.Mul(wy1, wx1), axis=1)

    index = op.Expand(op.Unsqueeze(index, _ints(1)), per_channel)  # [N, C, 4P]
    sampled = op.GatherElements(flat_image, index, axis=2)  # [N, C, 4P]
    sampled = op.Reshape(sampled, op.Concat(n, c, _ints(4), points, axis=0))  # [N, C, 4, P]
    weight = op.Reshape(weight, op.Concat(n, _ints(1), _ints(4), points, axis=0))  # [N, 1, 4, P]
    out = op.ReduceSum(op.Mul(sampled, weight), _ints(2), keepdims=0)  # [N, C, P]
    return op.Reshape(out, op.Concat(n, c, h_out, w_out, axis=0))
