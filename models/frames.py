"""Coordinate frames and grid bases, in numpy (no torch: the service imports this).

Convention (the one place it is written down in code; see docs/DESIGN.md):

- Normalized coordinates are in [-1, 1], x before y, ``align_corners=False``: the centre
  of pixel index i of an axis of size S is at ``(2 i + 1) / S - 1``.
- Pixel coordinates put pixel centres at integers; (0, 0) is the centre of the top-left
  pixel, x to the right, y down.
- **theta maps output to input**: for every output point it gives the normalized input
  point to sample. Affine theta is [2, 3], projective [3, 3] (divide by the third
  coordinate), TPS theta is the K source control points [K, 2].
- Matrices are named ``<to>_from_<from>``: ``input_px_from_output_px`` maps an output
  pixel (x, y, 1) to input pixel coordinates; with it OpenCV's
  ``warpAffine/warpPerspective(src, M, (w, h), flags=INTER_LINEAR | WARP_INVERSE_MAP)``
  reproduces the rectified image. :func:`theta_to_matrix` is the one conversion of theta to
  ``input_norm_from_output_norm`` [3, 3] (numpy; ``models.evaluate`` and the pixel matrices use it).
- A *base grid* is what the grid generator multiplies theta by: ``[h, w, D]`` float32 for
  an output of h x w pixels; ``grid = base_grid @ theta^T`` (affine, D = 3 holding
  (x, y, 1)), ``base_grid @ H^T`` then divide by z (projective), ``base_grid @ points``
  (TPS, D = K: the thin-plate kernel with the system matrix inverse folded in).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

Size = tuple[int, int]  # (height, width), always in that order


def check_size(size: Size, name: str = "size") -> tuple[int, int]:
    """``size`` as (height, width) ints; ValueError naming ``name`` and the value unless both are >= 1."""
    if len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1:
        raise ValueError(f"{name} must be (height, width) with both >= 1, got {size!r}")
    return int(size[0]), int(size[1])


def norm_from_px(size: Size) -> np.ndarray:
    """3x3 matrix taking pixel coordinates (x, y, 1) of an image of ``size`` to normalized."""
    h, w = check_size(size, "size")
    return np.array([[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0], [0.0, 0.0, 1.0]])


def px_from_norm(size: Size) -> np.ndarray:
    """Inverse of :func:`norm_from_px`."""
    h, w = check_size(size, "size")
    return np.array([[w / 2.0, 0.0, (w - 1.0) / 2.0], [0.0, h / 2.0, (h - 1.0) / 2.0], [0.0, 0.0, 1.0]])


def theta_to_matrix(theta: np.ndarray, tps_grid: Size | None = None) -> np.ndarray:
    """``input_norm_from_output_norm`` as float64 3x3 matrices, the one theta -> matrix conversion.

    Takes theta of any family with any leading (batch) axes and returns ``[..., 3, 3]``:

    - affine ``[..., 2, 3]``: the row (0, 0, 1) appended (exact);
    - projective ``[..., 3, 3]``: scaled so that ``[2, 2] == 1`` (left as is where it is ~0;
      the homography is the same either way);
    - TPS ``[..., K, 2]`` (source control points): the least-squares *affine* map taking the
      target control points (:func:`tps_control_points` of ``tps_grid``; a square grid when
      None) to them. An approximation (exact when the TPS is affine), for poses and metrics;
      :func:`input_px_from_output_px` refuses TPS theta.

    Accepts anything ``np.asarray`` takes (a CPU torch tensor without grad included).
    """
    t = np.asarray(theta, dtype=np.float64)
    if t.shape == (2, 3):  # the common case, kept cheap (the service makes two pixel matrices per image)
        return np.vstack([t, [0.0, 0.0, 1.0]])
    if t.ndim >= 2 and t.shape[-2:] == (2, 3):
        bottom = np.broadcast_to(np.array([0.0, 0.0, 1.0]), (*t.shape[:-2], 1, 3))
        return np.concatenate([t, bottom], axis=-2)
    if t.ndim >= 2 and t.shape[-2:] == (3, 3):
        return _unit_scale(t)
    if t.ndim >= 2 and t.shape[-1] == 2 and t.shape[-2] >= 4:
        ctrl = tps_control_points(_tps_grid_for(t.shape[-2], tps_grid))  # [K, 2]
        design = np.concatenate([ctrl, np.ones((len(ctrl), 1))], axis=1)  # [K, 3]: (x, y, 1)
        fit = np.swapaxes(np.linalg.pinv(design) @ t, -1, -2)  # [..., 2, 3]: target -> source
        return theta_to_matrix(fit)
    raise ValueError(f"theta must be [..., 2, 3] (affine), [..., 3, 3] (projective) or [..., K, 2] "
                     f"(TPS control points, K >= 4), got shape {list(t.shape)}")


def _tps_grid_for(k: int, tps_grid: Size | None) -> tuple[int, int]:
    """The TPS control grid (rows, cols) of a theta with ``k`` points: ``tps_grid``, checked, or the square one."""
    if tps_grid is not None:
        gh, gw = int(tps_grid[0]), int(tps_grid[1])
        if gh * gw != k:
            raise ValueError(f"tps_grid {gh}x{gw} has {gh * gw} control points but theta has {k}")
        return gh, gw
    side = math.isqrt(k)
    if side * side != k:
        raise ValueError(f"TPS theta with {k} control points: pass tps_grid (it is not square)")
    return side, side


def _pixel_matrix_theta(theta: np.ndarray) -> np.ndarray:
    t = np.asarray(theta, dtype=np.float64)
    if t.ndim < 2 or t.shape[-1] != 3:
        raise ValueError(f"pixel matrices need an affine [..., 2, 3] or projective [..., 3, 3] theta, got shape "
                         f"{list(t.shape)} (a TPS has no matrix: map its control points instead)")
    return theta_to_matrix(t)


def _unit_scale(m: np.ndarray) -> np.ndarray:
    """Homogeneous matrices [..., 3, 3] scaled so that [2, 2] == 1 (left as is where it is ~0)."""
    if m.ndim == 2:
        z = m[2, 2]
        return m / z if abs(z) > 1e-12 else m
    z = m[..., 2:3, 2:3]
    return m / np.where(np.abs(z) > 1e-12, z, 1.0)


def input_px_from_output_px(theta: np.ndarray, input_size: Size, output_size: Size) -> np.ndarray:
    """3x3 matrix mapping output pixel (x, y, 1) to input pixel coordinates (homogeneous).

    ``px_from_norm(input) @ theta_to_matrix(theta) @ norm_from_px(output)``, scaled so that
    ``[2, 2] == 1``; leading (batch) axes of theta are kept.
    """
    m = px_from_norm(input_size) @ _pixel_matrix_theta(theta) @ norm_from_px(output_size)
    return _unit_scale(m)


def theta_from_pixel_matrix(input_px_from_output_px: np.ndarray, input_size: Size, output_size: Size) -> np.ndarray:
    """theta as a 3x3 matrix (``[2, 2] == 1``) from ``input_px_from_output_px``: the inverse of that function.

    ``norm_from_px(input) @ input_px_from_output_px @ px_from_norm(output)``, for the sizes the
    pixel matrix was made for. An affine pixel matrix gives a last row (0, 0, 1): then
    ``theta[..., :2, :]`` is the affine theta.
    """
    m = np.asarray(input_px_from_output_px, dtype=np.float64)
    if m.ndim < 2 or m.shape[-2:] != (3, 3):
        raise ValueError(f"input_px_from_output_px must be [..., 3, 3], got shape {list(m.shape)}")
    return _unit_scale(norm_from_px(input_size) @ m @ px_from_norm(output_size))


def output_px_from_input_px(theta: np.ndarray, input_size: Size, output_size: Size) -> np.ndarray:
    """Inverse of :func:`input_px_from_output_px`: maps input points into the rectified frame."""
    return inverse_px(input_px_from_output_px(theta, input_size, output_size))


def inverse_px(m: np.ndarray) -> np.ndarray:
    """The inverse of a 3x3 pixel matrix (``output_px_from_input_px`` from ``input_px_from_output_px`` and
    back), scaled so that its [2, 2] is 1 (when not ~0)."""
    return _unit_scale(np.linalg.inv(m))


def centres(n: int) -> np.ndarray:
    """Normalized coordinates (float64) of the centres of ``n`` pixels along one axis (align_corners=False)."""
    return (2.0 * np.arange(n) + 1.0) / n - 1.0


def pixel_centres(size: Size) -> tuple[np.ndarray, np.ndarray]:
    """Normalized x and y of the pixel centres of an image of ``size``: two [h, w] arrays."""
    h, w = check_size(size, "size")
    gy, gx = np.meshgrid(centres(h), centres(w), indexing="ij")
    return gx, gy


def affine_base_grid(output_size: Size) -> np.ndarray:
    """[h, w, 3] float32 of (x, y, 1) at output pixel centres (affine and projective families).

    Written into its float32 array directly: built from float64 [h, w] planes (as :func:`pixel_centres`
    gives them) it peaked at five times its own size, about 1 GB for a 4000x4000 output."""
    h, w = check_size(output_size, "size")
    grid = np.empty((h, w, 3), np.float32)
    grid[..., 0] = centres(w).astype(np.float32)
    grid[..., 1] = centres(h).astype(np.float32)[:, None]
    grid[..., 2] = 1.0
    return grid


def tps_control_points(grid_size: Size) -> np.ndarray:
    """Target control points [K, 2] (x, y) of a TPS: a regular grid spanning [-1, 1]^2, row-major."""
    gh, gw = check_size(grid_size, "tps grid")
    if gh < 2 or gw < 2:
        raise ValueError(f"tps grid must be at least 2x2, got {gh}x{gw}")
    ys, xs = np.meshgrid(np.linspace(-1, 1, gh), np.linspace(-1, 1, gw), indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def _tps_kernel(points: np.ndarray, ctrl: np.ndarray) -> np.ndarray:
    """U(r) = r^2 log r^2 between every point [P,2] and control point [K,2] -> [P, K]."""
    dx = points[:, None, 0] - ctrl[None, :, 0]
    dy = points[:, None, 1] - ctrl[None, :, 1]
    d2 = dx * dx + dy * dy
    positive = d2 > 0
    return np.where(positive, d2 * np.log(np.where(positive, d2, 1.0)), 0.0)


@lru_cache(maxsize=16)
def _tps_ctrl(grid_size: Size) -> np.ndarray:
    """:func:`tps_control_points`, computed once per grid (read-only)."""
    ctrl = tps_control_points(grid_size)
    ctrl.flags.writeable = False
    return ctrl


@lru_cache(maxsize=16)
def _tps_coeffs(grid_size: Size) -> np.ndarray:
    """[K+3, K]: the TPS's kernel and affine coefficients as a linear function of its source points."""
    ctrl = tps_control_points(grid_size)
    k = len(ctrl)
    system = np.zeros((k + 3, k + 3))
    system[:k, :k] = _tps_kernel(ctrl, ctrl)
    system[:k, k] = 1.0
    system[:k, k + 1 :] = ctrl
    system[k, :k] = 1.0
    system[k + 1 :, :k] = ctrl.T
    coeffs = np.linalg.inv(system)[:, :k]
    coeffs.flags.writeable = False
    return coeffs


def tps_weights(points_norm: np.ndarray, grid_size: Size) -> np.ndarray:
    """[P, K] float64 such that ``tps_weights(p, grid) @ source_points`` is the TPS warp of the normalized
    output points p [P, 2] (output -> input, as theta): the base grid at any points, not only pixel centres."""
    ctrl = _tps_ctrl((int(grid_size[0]), int(grid_size[1])))
    pts = np.asarray(points_norm, np.float64).reshape(-1, 2)
    feats = np.concatenate([_tps_kernel(pts, ctrl), np.ones((len(pts), 1)), pts], axis=1)
    return feats @ _tps_coeffs((int(grid_size[0]), int(grid_size[1])))


def tps_warp(points_norm: np.ndarray, source_points: np.ndarray, grid_size: Size) -> np.ndarray:
    """The TPS with ``source_points`` (theta, [K, 2]) at normalized output points [P, 2] -> normalized input
    points [P, 2]: ``tps_weights(p, grid) @ source_points`` without the [P, K] weights."""
    ctrl = _tps_ctrl((int(grid_size[0]), int(grid_size[1])))
    pts = np.asarray(points_norm, np.float64).reshape(-1, 2)
    k = len(ctrl)
    c = _tps_coeffs((int(grid_size[0]), int(grid_size[1]))) @ np.asarray(source_points, np.float64)  # [K+3, 2]
    return _tps_kernel(pts, ctrl) @ c[:k] + c[k] + pts @ c[k + 1 :]


def tps_jacobian(points_norm: np.ndarray, source_points: np.ndarray, grid_size: Size) -> np.ndarray:
    """[P, 2, 2]: d :func:`tps_warp` / d(x, y) at normalized output points [P, 2]; ``J[p, i, j]`` is the
    derivative of input coordinate i by output coordinate j."""
    ctrl = _tps_ctrl((int(grid_size[0]), int(grid_size[1])))
    pts = np.asarray(points_norm, np.float64).reshape(-1, 2)
    k = len(ctrl)
    c = _tps_coeffs((int(grid_size[0]), int(grid_size[1]))) @ np.asarray(source_points, np.float64)  # [K+3, 2]
    dx = pts[:, None, 0] - ctrl[None, :, 0]
    dy = pts[:, None, 1] - ctrl[None, :, 1]
    d2 = dx * dx + dy * dy
    positive = d2 > 0
    g = np.where(positive, 2.0 * (np.log(np.where(positive, d2, 1.0)) + 1.0), 0.0)  # dU/dx = (x - cx) g
    # the kernel part, then the affine part (d/dx of (1, x, y) is (0, 1, 0), d/dy is (0, 0, 1))
    return np.stack([(g * dx) @ c[:k], (g * dy) @ c[:k]], axis=-1) + c[k + 1 :].T[None]


_TPS_BAND_POINTS = 65536  # output pixels per band of tps_base_grid (its float64 temporaries: about 60 MB)


def tps_base_grid(output_size: Size, grid_size: Size) -> np.ndarray:
    """[h, w, K] float32 such that ``grid = base @ source_points`` is the TPS warp.

    The target control points (:func:`tps_control_points`) sit in the output frame; the
    source points (theta, [K, 2]) are where they land in the input. The system matrix is
    inverted here, once, so the model's forward pass is a MatMul.

    Computed a band of rows at a time (the float64 kernel of all pixels at once peaked at ten times the grid:
    11 GB for a 4000x4000 output with 16 control points).
    """
    h, w = check_size(output_size, "size")
    xs, ys = centres(w), centres(h)
    grid = np.empty((h, w, base_grid_depth("tps", grid_size)), np.float32)
    rows = max(1, _TPS_BAND_POINTS // w)
    for top in range(0, h, rows):
        gy, gx = np.meshgrid(ys[top:top + rows], xs, indexing="ij")
        grid[top:top + rows] = tps_weights(np.stack([gx.ravel(), gy.ravel()], axis=-1), grid_size).reshape(
            len(gy), w, -1)
    return grid


def warp_points(theta: np.ndarray, points_norm: np.ndarray) -> np.ndarray:
    """Apply an affine/projective theta to normalized points [P, 2] (output -> input)."""
    m = _pixel_matrix_theta(theta)
    p = np.concatenate([np.asarray(points_norm, np.float64), np.ones((len(points_norm), 1))], axis=1) @ m.T
    return p[:, :2] / p[:, 2:3]


# The transform families, named once here (numpy-only, so the service and the light CLI can read them).
AFFINE_FAMILIES = ("affine", "similarity", "attention")  # theta [2, 3]
HOMOGENEOUS_FAMILIES = (*AFFINE_FAMILIES, "projective")  # base grid (x, y, 1); TPS has its own kernel basis
TRANSFORMS = (*HOMOGENEOUS_FAMILIES, "tps")
# How the localiser's raw output becomes theta: "matrix" (the family's own parameters, models.transforms'
# table) or "corners" (projective only: the output's four corners in the input, as offsets from the
# identity's; theta is the square-to-quadrilateral homography). The exported theta is the family's either way.
PARAMETRISATIONS = ("matrix", "corners")
# The outer corners of every output's pixel grid in normalized coordinates (align_corners=False):
# output pixels (-0.5, -0.5), (w-0.5, -0.5), (w-0.5, h-0.5), (-0.5, h-0.5), i.e. TL, TR, BR, BL.
OUTPUT_CORNERS = ((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0))


def theta_shape(transform: str, tps_grid: Size = (4, 4)) -> tuple[int, int]:
    """One example's theta shape for a transform family: (2, 3) affine-like, (3, 3) projective, (K, 2) TPS."""
    if transform in AFFINE_FAMILIES:
        return (2, 3)
    if transform == "projective":
        return (3, 3)
    if transform == "tps":
        gh, gw = check_size(tps_grid, "tps grid")
        return (gh * gw, 2)
    raise ValueError(f"unknown transform {transform!r}; known: {', '.join(TRANSFORMS)}")


def base_grid_depth(transform: str, tps_grid: Size = (4, 4)) -> int:
    """D of a family's base grid [h, w, D]: 3 ((x, y, 1)) for affine-like and projective, K for TPS."""
    k = theta_shape(transform, tps_grid)[0]
    return k if transform == "tps" else 3


def base_grid(transform: str, output_size: Size, tps_grid: Size = (4, 4)) -> np.ndarray:
    """The grid generator's base for a transform family and output size ([h, w, D] float32)."""
    if transform in HOMOGENEOUS_FAMILIES:
        return affine_base_grid(output_size)
    if transform == "tps":
        return tps_base_grid(output_size, tps_grid)
    raise ValueError(f"unknown transform {transform!r}; known: {', '.join(TRANSFORMS)}")
