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
tps         2K    [N, K, 2]    source control points (x, y), K = grid h x grid w
=========== ===== ============ =============================================================

The identity transform is the zero vector for similarity and attention, and the flattened
identity theta for the others; the regression layer's bias starts there.
"""

from __future__ import annotations

import numpy as np
import torch

from models import frames


class TransformFamily:
    """Base class: a family knows its parameter count, identity, theta, and grid generator."""

    name: str = ""
    n_params: int = 0

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


def make_transform(name: str, tps_grid: frames.Size = (4, 4)) -> TransformFamily:
    """The transform family called ``name``; ValueError listing the known ones otherwise."""
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
