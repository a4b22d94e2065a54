"""Transform families: from the localisation net's raw parameters to theta, and the grid generator.

Every family maps its raw parameter vector [N, P] to theta (output -> input, normalized,
see ``models.frames``) and turns theta plus a base grid into a sampling grid with one
MatMul (which is how it exports to ONNX: no AffineGrid, no Mul+ReduceSum).

=========== ===== ============ =============================================================
family      P     theta        raw parameters
=========== ===== ============ =============================================================
affine      6     [N, 2, 3]    the 2x3 matrix, row-major
similarity  4     [N, 2, 3]    (angle rad, log scale, tx, ty): s R(angle) | t
attention   3     [N, 2, 3]    (log scale, tx, ty): the paper's attention (crop) transform
projective  8     [N, 3, 3]    the homography's first 8 entries, row-major; H[2,2] = 1
projective  8     [N, 3, 3]    parametrisation "corners": the output's corners TL, TR, BR, BL in the
 (corners)                     input, (x, y) each, as offsets from the identity's (``frames.OUTPUT_CORNERS``)
tps         2K    [N, K, 2]    source control points (x, y), K = grid h x grid w
=========== ===== ============ =============================================================

The identity transform is the zero vector for similarity, attention and projective corners,
and the flattened identity theta for the others; the regression layer's bias starts there.

The corner parametrisation (``ProjectiveCorners``) regresses points the loss can compare
directly with a page's known corners (all eight numbers in the same units, unlike the
homography's entries); theta is the closed-form square-to-quadrilateral homography
(:func:`square_to_quad`, Heckbert 1989): a few products and one division, no linear solve,
so it exports as plain ops and ``theta`` stays the projective [3, 3] of the contract.

Function first (kornia's ``warp_affine``): the grid generator and the whole spatial transform
are plain functions with shape checks, :func:`sampling_grid` (per family:
:func:`affine_sampling_grid`, :func:`projective_sampling_grid`, :func:`tps_sampling_grid`) and
:func:`spatial_transform` (grid generator, then ``models.sampler.grid_sample``); a family's
``grid`` and ``models.stn.SpatialTransformer`` call them.
"""

from __future__ import annotations

import numpy as np
import torch

from models import frames
from models.sampler import grid_sample

# ----------------------------------------------------------------------------- the grid generator
# Plain functions with shape checks; the families and SpatialTransformer call them. Each is one
# MatMul (how it exports to ONNX), written once.


def _check_base_grid(base_grid: torch.Tensor, depth: int, what: str) -> None:
    if base_grid.dim() != 3 or base_grid.shape[-1] != depth:
        raise ValueError(f"{what} needs a base grid [h, w, {depth}] (models.frames.base_grid), "
                         f"got shape {list(base_grid.shape)}")


def _check_theta_shape(theta: torch.Tensor, shape: tuple[int, int], what: str) -> None:
    if theta.dim() != 3 or tuple(theta.shape[1:]) != tuple(shape):
        raise ValueError(f"{what} theta must be [N, {shape[0]}, {shape[1]}], got shape {list(theta.shape)}")


def affine_sampling_grid(theta: torch.Tensor, base_grid: torch.Tensor) -> torch.Tensor:
    """Sampling grid [N, h, w, 2] of affine theta [N, 2, 3] on a base grid [h, w, 3]: ``base @ theta^T``.

    Convention (docs/DESIGN.md, ``models.frames``): theta maps output to input, normalized,
    ``align_corners=False``; the base grid holds (x, y, 1) at the output's pixel centres
    (``frames.affine_base_grid``); the grid holds, per output pixel, the normalized (x, y) of
    the input point to sample, as ``F.grid_sample`` reads it (``F.affine_grid``'s result).
    """
    _check_theta_shape(theta, (2, 3), "affine")
    _check_base_grid(base_grid, 3, "an affine theta")
    return torch.matmul(base_grid, theta.transpose(1, 2).unsqueeze(1))


def projective_sampling_grid(theta: torch.Tensor, base_grid: torch.Tensor) -> torch.Tensor:
    """Sampling grid [N, h, w, 2] of a homography theta [N, 3, 3] on a base grid [h, w, 3].

    Convention: as :func:`affine_sampling_grid`, then divided by the third coordinate; where
    its magnitude is below 1e-6 it is replaced by 1e-6 with its sign kept (points at infinity
    sample padding). ``theta`` need not have ``[2, 2] == 1``.
    """
    _check_theta_shape(theta, (3, 3), "projective")
    _check_base_grid(base_grid, 3, "a projective theta")
    xyz = torch.matmul(base_grid, theta.transpose(1, 2).unsqueeze(1))
    z = xyz[..., 2:3]
    # Keep the sign, avoid dividing by ~0 (points at infinity sample padding).
    z = torch.where(z.abs() < 1e-6, torch.full_like(z, 1e-6), z)
    return xyz[..., :2] / z


def tps_sampling_grid(points: torch.Tensor, base_grid: torch.Tensor) -> torch.Tensor:
    """Sampling grid [N, h, w, 2] of a TPS from its source control points [N, K, 2]: ``base @ points``.

    Convention: the target control points are ``frames.tps_control_points`` (a regular grid
    over [-1, 1]^2 of the output, row-major); ``points`` are where they land in the input
    (normalized). The base grid [h, w, K] is ``frames.tps_base_grid`` (the thin-plate kernel
    with the system matrix's inverse folded in), so the TPS interpolates its control points.
    """
    if points.dim() != 3 or points.shape[-1] != 2:
        raise ValueError(f"tps theta must be source control points [N, K, 2], got shape {list(points.shape)}")
    _check_base_grid(base_grid, points.shape[1], f"a tps theta of {points.shape[1]} control points")
    return torch.matmul(base_grid, points.unsqueeze(1))


_GRID_OF_FAMILY = {"affine": affine_sampling_grid, "similarity": affine_sampling_grid,
                   "attention": affine_sampling_grid, "projective": projective_sampling_grid,
                   "tps": tps_sampling_grid}


def _family_grid(family: str):  # noqa: ANN202
    if family not in _GRID_OF_FAMILY:
        raise ValueError(f"unknown transform {family!r}; choose one of {', '.join(frames.TRANSFORMS)}")
    return _GRID_OF_FAMILY[family]


def sampling_grid(theta: torch.Tensor, family: str, output_size: frames.Size, tps_grid: frames.Size = (4, 4),
                  base_grid: torch.Tensor | None = None) -> torch.Tensor:
    """The grid generator: sampling grid [N, h, w, 2] of ``theta`` for an ``output_size`` (h, w) output.

    Convention (docs/DESIGN.md "Conventions", ``models.frames``): theta maps **output to
    input** in normalized coordinates ([-1, 1], x before y, ``align_corners=False``); its
    shape is ``[N, *frames.theta_shape(family, tps_grid)]``: affine-like [N, 2, 3],
    projective [N, 3, 3], TPS source control points [N, K, 2] of a ``tps_grid`` (rows, cols)
    control grid. The grid holds, per output pixel centre, the normalized input (x, y) to
    sample, as ``F.grid_sample`` reads it.

    ``base_grid``: ``frames.base_grid(family, output_size, tps_grid)`` as a tensor, when the
    caller keeps one (``SpatialTransformer``'s buffer, which the exporter names); computed on
    theta's device and dtype otherwise. ValueError naming the shape for a wrong theta or base.
    """
    grid_of = _family_grid(family)
    _check_theta_shape(theta, frames.theta_shape(family, tps_grid), family)
    h, w = frames.check_size(output_size, "output_size")
    if base_grid is None:
        base_grid = torch.from_numpy(frames.base_grid(family, (h, w), tps_grid)).to(theta.device, theta.dtype)
    elif base_grid.dim() != 3 or tuple(base_grid.shape[:2]) != (h, w):
        raise ValueError(f"base_grid must be [{h}, {w}, D] for output_size {(h, w)}, got shape {list(base_grid.shape)}")
    return grid_of(theta, base_grid)


def spatial_transform(image: torch.Tensor, theta: torch.Tensor, family: str, output_size: frames.Size,
                      mode: str = "bilinear", padding_mode: str = "zeros", tps_grid: frames.Size = (4, 4),
                      base_grid: torch.Tensor | None = None) -> torch.Tensor:
    """Warp ``image`` [N, C, H, W] by ``theta`` into [N, C, h, w]: :func:`sampling_grid`, then the sampler.

    Convention (docs/DESIGN.md "Conventions", ``models.frames``): theta maps **output to
    input**, normalized, ``align_corners=False``, one per image (shapes as in
    :func:`sampling_grid`); the image is read at its own resolution (H, W need not relate to
    ``output_size`` (h, w): normalized theta does not depend on resolution); ``mode``
    (bilinear, nearest, bicubic) and ``padding_mode`` (zeros, border, reflection) as
    ``F.grid_sample``'s, through the ``stn::grid_sample`` op (``models.sampler``), which the
    exporter lowers. The result equals OpenCV's ``warpAffine``/``warpPerspective`` with
    ``frames.input_px_from_output_px`` and ``WARP_INVERSE_MAP`` (bilinear, zeros padding).
    """
    if image.dim() != 4:
        raise ValueError(f"image must be [N, C, H, W], got shape {list(image.shape)}")
    if theta.dim() != 3 or theta.shape[0] != image.shape[0]:
        raise ValueError(f"theta must be one per image, [{image.shape[0]}, ...] for {image.shape[0]} images, "
                         f"got shape {list(theta.shape)}")
    grid = sampling_grid(theta, family, output_size, tps_grid, base_grid)
    return grid_sample(image, grid, mode, padding_mode, align_corners=False)


class TransformFamily:
    """Base class: a family knows its parameter count, identity, theta, and grid generator."""

    name: str = ""
    n_params: int = 0
    parametrisation: str = "matrix"  # one of frames.PARAMETRISATIONS

    def identity_params(self) -> torch.Tensor:
        raise NotImplementedError

    def theta_from_params(self, params: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def base_grid(self, output_size: frames.Size) -> torch.Tensor:
        return torch.from_numpy(frames.base_grid(self.name, output_size))

    def grid(self, theta: torch.Tensor, base_grid: torch.Tensor) -> torch.Tensor:
        """Sampling grid [N, h, w, 2] from theta and a base grid [h, w, D]: the family's grid function."""
        return _family_grid(self.name)(theta, base_grid)

    def _check_params(self, params: torch.Tensor) -> None:
        if params.dim() != 2 or params.shape[1] != self.n_params:
            raise ValueError(
                f"{self.name} transform takes parameters [N, {self.n_params}], got shape {list(params.shape)}"
            )


class Affine(TransformFamily):
    name = "affine"
    n_params = 6

    def identity_params(self) -> torch.Tensor:
        return torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])

    def theta_from_params(self, params: torch.Tensor) -> torch.Tensor:
        self._check_params(params)
        return params.reshape(-1, 2, 3)


class Similarity(TransformFamily):
    name = "similarity"
    n_params = 4

    def identity_params(self) -> torch.Tensor:
        return torch.zeros(4)

    def theta_from_params(self, params: torch.Tensor) -> torch.Tensor:
        self._check_params(params)
        angle, log_scale, tx, ty = params.unbind(1)
        s = torch.exp(log_scale)
        c, si = s * torch.cos(angle), s * torch.sin(angle)
        return torch.stack([c, -si, tx, si, c, ty], dim=1).reshape(-1, 2, 3)


class Attention(TransformFamily):
    name = "attention"
    n_params = 3

    def identity_params(self) -> torch.Tensor:
        return torch.zeros(3)

    def theta_from_params(self, params: torch.Tensor) -> torch.Tensor:
        self._check_params(params)
        log_scale, tx, ty = params.unbind(1)
        s = torch.exp(log_scale)
        zero = torch.zeros_like(s)
        return torch.stack([s, zero, tx, zero, s, ty], dim=1).reshape(-1, 2, 3)


class Projective(TransformFamily):
    name = "projective"
    n_params = 8

    def identity_params(self) -> torch.Tensor:
        return torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])

    def theta_from_params(self, params: torch.Tensor) -> torch.Tensor:
        self._check_params(params)
        one = torch.ones_like(params[:, :1])
        return torch.cat([params, one], dim=1).reshape(-1, 3, 3)


def square_to_quad(corners: torch.Tensor) -> torch.Tensor:
    """The homography [N, 3, 3] mapping the square [-1, 1]^2's corners to ``corners`` [N, 4, 2].

    Corners in the order TL, TR, BR, BL (``frames.OUTPUT_CORNERS``): (-1, -1) goes to
    ``corners[:, 0]``, (1, -1) to ``corners[:, 1]``, (1, 1) to ``corners[:, 2]``, (-1, 1) to
    ``corners[:, 3]``. Heckbert's closed form maps the unit square [0, 1]^2; the square
    [-1, 1]^2 is taken there first (u = (x + 1) / 2). Not normalized to H[2, 2] = 1 (the
    contract divides by the third coordinate); a degenerate quadrilateral (three corners in
    a line) has its determinant clamped away from 0 instead of dividing by it.
    """
    if corners.dim() != 3 or corners.shape[1:] != (4, 2):
        raise ValueError(f"corners must be [N, 4, 2] (TL, TR, BR, BL; x, y), got shape {list(corners.shape)}")
    x0, x1, x2, x3 = corners[:, :, 0].unbind(1)
    y0, y1, y2, y3 = corners[:, :, 1].unbind(1)
    dx1, dx2, dx3 = x1 - x2, x3 - x2, x0 - x1 + x2 - x3
    dy1, dy2, dy3 = y1 - y2, y3 - y2, y0 - y1 + y2 - y3
    den = dx1 * dy2 - dx2 * dy1
    den = torch.where(den.abs() < 1e-6, torch.where(den < 0, -1e-6, 1e-6).to(den.dtype), den)
    g = (dx3 * dy2 - dx2 * dy3) / den
    h = (dx1 * dy3 - dx3 * dy1) / den
    one = torch.ones_like(g)
    unit = torch.stack([x1 - x0 + g * x1, x3 - x0 + h * x3, x0,
                        y1 - y0 + g * y1, y3 - y0 + h * y3, y0,
                        g, h, one], dim=1).reshape(-1, 3, 3)  # [0, 1]^2 -> quad
    unit_from_square = torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]], dtype=corners.dtype,
                                    device=corners.device)
    return torch.matmul(unit, unit_from_square)


class ProjectiveCorners(Projective):
    """Projective family, corner parametrisation: params are the output corners' offsets in the input."""

    parametrisation = "corners"

    def identity_params(self) -> torch.Tensor:
        return torch.zeros(8)

    def corners(self, params: torch.Tensor) -> torch.Tensor:
        """[N, 4, 2]: where the output's corners (TL, TR, BR, BL) land in the input, normalized."""
        self._check_params(params)
        base = torch.tensor(frames.OUTPUT_CORNERS, dtype=params.dtype, device=params.device)
        return base + params.reshape(-1, 4, 2)

    def theta_from_params(self, params: torch.Tensor) -> torch.Tensor:
        return square_to_quad(self.corners(params))


class ThinPlateSpline(TransformFamily):
    name = "tps"

    def __init__(self, grid_size: frames.Size = (4, 4)) -> None:
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.n_params = 2 * self.grid_size[0] * self.grid_size[1]

    def identity_params(self) -> torch.Tensor:
        return torch.from_numpy(frames.tps_control_points(self.grid_size).astype(np.float32)).reshape(-1)

    def theta_from_params(self, params: torch.Tensor) -> torch.Tensor:
        self._check_params(params)
        return params.reshape(-1, self.n_params // 2, 2)

    def base_grid(self, output_size: frames.Size) -> torch.Tensor:
        return torch.from_numpy(frames.tps_base_grid(output_size, self.grid_size))


TRANSFORMS = frames.TRANSFORMS


def make_transform(name: str, tps_grid: frames.Size = (4, 4), parametrisation: str = "matrix") -> TransformFamily:
    """The transform family called ``name``; ValueError listing the known ones otherwise."""
    if parametrisation not in frames.PARAMETRISATIONS:
        raise ValueError(f"unknown parametrisation {parametrisation!r}; choose one of {', '.join(frames.PARAMETRISATIONS)}")
    if parametrisation == "corners":
        if name != "projective":
            raise ValueError(f"the corners parametrisation is for the projective transform, not {name!r}")
        return ProjectiveCorners()
    if name == "affine":
        return Affine()
    if name == "similarity":
        return Similarity()
    if name == "attention":
        return Attention()
    if name == "projective":
        return Projective()
    if name == "tps":
        return ThinPlateSpline(tps_grid)
    raise ValueError(f"unknown transform {name!r}; choose one of {', '.join(TRANSFORMS)}")


def similarity_theta(angle: torch.Tensor, scale: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """Affine theta [N,2,3] of a rotation by ``angle`` (radians), isotropic ``scale``, translation."""
    return Similarity().theta_from_params(torch.stack([angle, torch.log(scale), tx, ty], dim=1))
