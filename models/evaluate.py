"""Evaluation: classification error and pose consistency, as plain functions on tensors.

**Pose consistency.** A distortion ``theta_D`` maps distorted-normalized to upright-normalized
coordinates (``models.distortions``); the STN's ``theta_pred`` maps its output (rectified)
frame to the distorted input. Their composition, as 3x3 matrices,

    residual = theta_D @ theta_pred        (rectified -> distorted -> upright)

is the pose of the rectified image relative to the upright one. A rectifier need not
produce exactly the upright pose (an ST-CNN picks its own canonical pose and zoom), but a
working one produces the *same* pose for every input, so the spread of the residual over a
test set is much smaller than the spread of the distortion itself (the residual of the
identity prediction). Spread = circular standard deviation of the rotation angle (degrees),
standard deviation of the log scale, and of the translation x and y (normalized units of the
upright image).

Pose of a 3x3 matrix: affine ``[[a11, a12, tx], [a21, a22, ty], [0, 0, 1]]`` gives
``angle = atan2(a21 - a12, a11 + a22)`` (the rotation of the closest similarity),
``scale = sqrt(|det|)``, translation (tx, ty). A homography is linearised at the centre
(normalized with H[2,2] = 1, its Jacobian at the origin is ``A - t v^T``); a TPS (theta
``[N, K, 2]``) is replaced by the least-squares affine fit of its control points. Matrices
come from ``models.frames.theta_to_matrix``, the project's one theta -> 3x3 conversion.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from models import frames

SPREAD_KEYS = ("angle_deg", "log_scale", "tx", "ty")


def _matrices(theta: torch.Tensor | np.ndarray, tps_grid: frames.Size | None = None) -> torch.Tensor:
    """[N, 3, 3] float64 (CPU) of ``frames.theta_to_matrix``, for a batch or a single theta."""
    t = theta.detach().cpu().double().numpy() if isinstance(theta, torch.Tensor) else np.asarray(theta, np.float64)
    m = torch.from_numpy(frames.theta_to_matrix(t, tps_grid))
    if m.dim() == 2:
        return m.unsqueeze(0)
    if m.dim() != 3:
        raise ValueError(f"theta must be one theta or a batch [N, ...] of them, got shape {list(t.shape)}")
    return m


def pose_from_matrix(matrix: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example ``angle`` (radians), ``log_scale``, ``tx``, ``ty`` of [N, 3, 3] matrices (module doc)."""
    m = _matrices(matrix)
    a, t, v = m[:, :2, :2], m[:, :2, 2], m[:, 2, :2]
    lin = a - t.unsqueeze(2) * v.unsqueeze(1)  # Jacobian at the origin (== a for affine)
    angle = torch.atan2(lin[:, 1, 0] - lin[:, 0, 1], lin[:, 0, 0] + lin[:, 1, 1])
    det = torch.linalg.det(lin).abs().clamp(min=1e-300)
    return {"angle": angle, "log_scale": 0.5 * torch.log(det), "tx": t[:, 0], "ty": t[:, 1]}


def pose_from_theta(theta: torch.Tensor, tps_grid: frames.Size | None = None) -> dict[str, torch.Tensor]:
    """:func:`pose_from_matrix` of ``frames.theta_to_matrix(theta)`` (a TPS by its least-squares affine fit)."""
    return pose_from_matrix(_matrices(theta, tps_grid))


def residual_matrices(theta_distortion: torch.Tensor, theta_pred: torch.Tensor,
                      distortion_tps_grid: frames.Size | None = None,
                      pred_tps_grid: frames.Size | None = None) -> torch.Tensor:
    """``theta_D @ theta_pred`` as [N, 3, 3]: rectified -> distorted -> upright."""
    d = _matrices(theta_distortion, distortion_tps_grid)
    p = _matrices(theta_pred, pred_tps_grid)
    if d.shape[0] != p.shape[0]:
        raise ValueError(f"{d.shape[0]} distortion thetas but {p.shape[0]} predicted thetas")
    return d @ p


def circular_std(angles: torch.Tensor) -> float:
    """Circular standard deviation ``sqrt(-2 ln R)`` of angles in radians (0 for identical angles)."""
    angles = torch.as_tensor(angles, dtype=torch.float64).reshape(-1)
    if angles.numel() == 0:
        return float("nan")
    r = torch.hypot(torch.cos(angles).mean(), torch.sin(angles).mean()).clamp(1e-300, 1.0)
    return float(torch.sqrt((-2.0 * torch.log(r)).clamp(min=0.0))) + 0.0  # + 0.0: no "-0.0"


def pose_spread(matrices: torch.Tensor) -> dict[str, float]:
    """Spread of the poses of [N, 3, 3] matrices: circular std of the angle (degrees), std of
    log scale, tx, ty (population std: 0 for a single matrix)."""
    pose = pose_from_matrix(matrices)
    return {
        "angle_deg": math.degrees(circular_std(pose["angle"])),
        "log_scale": float(pose["log_scale"].std(correction=0)),
        "tx": float(pose["tx"].std(correction=0)),
        "ty": float(pose["ty"].std(correction=0)),
    }


def pose_consistency(theta_distortion: torch.Tensor, theta_pred: torch.Tensor | None,
                     distortion_tps_grid: frames.Size | None = None,
                     pred_tps_grid: frames.Size | None = None) -> dict[str, dict[str, float] | None]:
    """``{"residual": spread of theta_D @ theta_pred, "distortion": spread of theta_D}``.

    ``theta_pred=None`` (a model without a transformer) gives ``residual: None``.
    """
    dist = _matrices(theta_distortion, distortion_tps_grid)
    out: dict[str, dict[str, float] | None] = {"residual": None, "distortion": pose_spread(dist)}
    if theta_pred is not None:
        out["residual"] = pose_spread(residual_matrices(dist, theta_pred, None, pred_tps_grid))
    return out


def classification_error(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of examples whose arg-max class (logits [N, K], or predicted classes [N]) is wrong."""
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    pred = logits.argmax(dim=1) if logits.dim() == 2 else logits
    if pred.shape != labels.shape:
        raise ValueError(f"{pred.shape[0]} predictions but labels of shape {list(labels.shape)}")
    if labels.numel() == 0:
        return float("nan")
    return float((pred != labels).double().mean())


__all__ = [
    "SPREAD_KEYS", "pose_from_matrix", "pose_from_theta", "residual_matrices", "circular_std",
    "pose_spread", "pose_consistency", "classification_error",
]
