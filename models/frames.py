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
  reproduces the rectified image.
- A *base grid* is what the grid generator multiplies theta by: ``[h, w, D]`` float32 for
  an output of h x w pixels; ``grid = base_grid @ theta^T`` (affine, D = 3 holding
  (x, y, 1)), ``base_grid @ H^T`` then divide by z (projective), ``base_grid @ points``
  (TPS, D = K: the thin-plate kernel with the system matrix inverse folded in).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

Size = tuple[int, int]  # (height, width), always in that order


def _check_size(size: Size, name: str) -> tuple[int, int]:
    if len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1:
        raise ValueError(f"{name} must be (height, width) with both >= 1, got {size!r}")
    return int(size[0]), int(size[1])


def norm_from_px(size: Size) -> np.ndarray:
    """3x3 matrix taking pixel coordinates (x, y, 1) of an image of ``size`` to normalized."""
    h, w = _check_size(size, "size")
    return np.array([[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0], [0.0, 0.0, 1.0]])


def px_from_norm(size: Size) -> np.ndarray:
    """Inverse of :func:`norm_from_px`."""
    h, w = _check_size(size, "size")
    return np.array([[w / 2.0, 0.0, (w - 1.0) / 2.0], [0.0, h / 2.0, (h - 1.0) / 2.0], [0.0, 0.0, 1.0]])


def theta_as_3x3(theta: np.ndarray) -> np.ndarray:
    """``input_norm_from_output_norm`` as a 3x3 matrix from an affine [2,3] or projective [3,3] theta."""
    theta = np.asarray(theta, dtype=np.float64)
    if theta.shape == (2, 3):
        return np.vstack([theta, [0.0, 0.0, 1.0]])
    if theta.shape == (3, 3):
        return theta
    raise ValueError(f"theta must be [2,3] (affine) or [3,3] (projective), got shape {list(theta.shape)}")


def input_px_from_output_px(theta: np.ndarray, input_size: Size, output_size: Size) -> np.ndarray:
    """3x3 matrix mapping output pixel (x, y, 1) to input pixel coordinates (homogeneous)."""
    m = px_from_norm(input_size) @ theta_as_3x3(theta) @ norm_from_px(output_size)
    return m / m[2, 2] if abs(m[2, 2]) > 1e-12 else m


def output_px_from_input_px(theta: np.ndarray, input_size: Size, output_size: Size) -> np.ndarray:
    """Inverse of :func:`input_px_from_output_px`: maps input points into the rectified frame."""
    m = np.linalg.inv(input_px_from_output_px(theta, input_size, output_size))
    return m / m[2, 2] if abs(m[2, 2]) > 1e-12 else m


def pixel_centres(size: Size) -> tuple[np.ndarray, np.ndarray]:
    """Normalized x and y of the pixel centres of an image of ``size``: two [h, w] arrays."""
    h, w = _check_size(size, "size")
    xs = (2.0 * np.arange(w) + 1.0) / w - 1.0
    ys = (2.0 * np.arange(h) + 1.0) / h - 1.0
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    return gx, gy


def affine_base_grid(output_size: Size) -> np.ndarray:
    """[h, w, 3] float32 of (x, y, 1) at output pixel centres (affine and projective families)."""
    gx, gy = pixel_centres(output_size)
    return np.stack([gx, gy, np.ones_like(gx)], axis=-1).astype(np.float32)


def tps_control_points(grid_size: Size) -> np.ndarray:
    """Target control points [K, 2] (x, y) of a TPS: a regular grid spanning [-1, 1]^2, row-major."""
    gh, gw = _check_size(grid_size, "tps grid")
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


def tps_base_grid(output_size: Size, grid_size: Size) -> np.ndarray:
    """[h, w, K] float32 such that ``grid = base @ source_points`` is the TPS warp.

    The target control points (:func:`tps_control_points`) sit in the output frame; the
    source points (theta, [K, 2]) are where they land in the input. The system matrix is
    inverted here, once, so the model's forward pass is a MatMul.
    """
    gx, gy = pixel_centres(output_size)
    pts = np.stack([gx.ravel(), gy.ravel()], axis=-1)
    h, w = output_size
    return tps_weights(pts, grid_size).reshape(int(h), int(w), -1).astype(np.float32)


def warp_points(theta: np.ndarray, points_norm: np.ndarray) -> np.ndarray:
    """Apply an affine/projective theta to normalized points [P, 2] (output -> input)."""
    m = theta_as_3x3(theta)
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


def base_grid(transform: str, output_size: Size, tps_grid: Size = (4, 4)) -> np.ndarray:
    """The grid generator's base for a transform family and output size ([h, w, D] float32)."""
    if transform in HOMOGENEOUS_FAMILIES:
        return affine_base_grid(output_size)
    if transform == "tps":
        return tps_base_grid(output_size, tps_grid)
    raise ValueError(f"unknown transform {transform!r}; known: {', '.join(TRANSFORMS)}")
