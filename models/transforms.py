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
"""

from __future__ import annotations

import numpy as np
import torch

from models import frames


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
        """Sampling grid [N, h, w, 2] from theta and a base grid [h, w, D]: one MatMul."""
        return torch.matmul(base_grid, theta.transpose(1, 2).unsqueeze(1))

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

    def grid(self, theta: torch.Tensor, base_grid: torch.Tensor) -> torch.Tensor:
        xyz = torch.matmul(base_grid, theta.transpose(1, 2).unsqueeze(1))
        z = xyz[..., 2:3]
        # Keep the sign, avoid dividing by ~0 (points at infinity sample padding).
        z = torch.where(z.abs() < 1e-6, torch.full_like(z, 1e-6), z)
        return xyz[..., :2] / z


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

    def grid(self, theta: torch.Tensor, base_grid: torch.Tensor) -> torch.Tensor:
        return torch.matmul(base_grid, theta.unsqueeze(1))


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
