"""models.evaluate: poses, spreads and pose consistency on synthetic thetas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import distortions as D
from models import evaluate as E
from models import frames
from models.transforms import similarity_theta


def _similarity(n: int, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    angle = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 2.0
    scale = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    tx, ty = (torch.rand(2, n, generator=g, dtype=torch.float64) - 0.5)
    return similarity_theta(angle, scale, tx, ty), {"angle": angle, "scale": scale, "tx": tx, "ty": ty}


def _matrix(theta: torch.Tensor) -> torch.Tensor:
    """[N, 3, 3] float64 tensor of frames.theta_to_matrix (the one conversion)."""
    return torch.from_numpy(frames.theta_to_matrix(theta))


def _inverse_2x3(theta: torch.Tensor) -> torch.Tensor:
    return torch.linalg.inv(_matrix(theta))[:, :2]


def test_pose_of_similarity() -> None:
    theta, p = _similarity(20)
    pose = E.pose_from_theta(theta)
    torch.testing.assert_close(pose["angle"], p["angle"])
    torch.testing.assert_close(pose["log_scale"], torch.log(p["scale"]))
    torch.testing.assert_close(pose["tx"], p["tx"])
    torch.testing.assert_close(pose["ty"], p["ty"])


def test_pose_of_general_affine_uses_closest_similarity() -> None:
    theta = torch.tensor([[[2.0, 0.0, 0.1], [0.0, 0.5, -0.2]]])  # anisotropic scale, no rotation
    pose = E.pose_from_theta(theta)
    assert pose["angle"].item() == 0.0 and pose["log_scale"].item() == pytest.approx(0.0)
    shear = torch.tensor([[[1.0, 0.3, 0.0], [0.0, 1.0, 0.0]]])
    assert E.pose_from_theta(shear)["angle"].item() == pytest.approx(math.atan2(-0.3, 2.0))


def test_pose_takes_single_and_batched_theta_of_every_shape() -> None:
    theta, _ = _similarity(3)
    batched = E.pose_from_theta(theta)
    single = E.pose_from_theta(theta[1])  # unbatched [2, 3]
    assert all(v.shape == (1,) and float(v[0]) == pytest.approx(float(batched[k][1])) for k, v in single.items())
    assert E.pose_from_theta(np.eye(3))["log_scale"].shape == (1,)  # numpy, projective
    with pytest.raises(ValueError, match=r"got shape \[2, 4, 4\]"):
        E.pose_from_theta(torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="one theta or a batch"):
        E.pose_from_theta(torch.zeros(2, 2, 2, 3))


def test_projective_pose_is_linearised_at_centre() -> None:
    h = torch.tensor([[[1.0, 0.0, 0.2], [0.0, 1.0, 0.0], [0.3, 0.0, 1.0]]])
    pose = E.pose_from_theta(h)
    # Jacobian at the origin: A - t v^T = [[1 - 0.06, 0], [0, 1]]
    assert pose["tx"].item() == pytest.approx(0.2) and pose["log_scale"].item() == pytest.approx(0.5 * math.log(0.94))


def test_tps_pose_is_its_affine_part() -> None:
    ctrl = torch.from_numpy(frames.tps_control_points((4, 4)))
    theta, p = _similarity(2)
    m = _matrix(theta)
    source = ctrl @ m[:, :2, :2].transpose(1, 2) + m[:, :2, 2].unsqueeze(1)  # an affine TPS
    pose = E.pose_from_theta(source)
    torch.testing.assert_close(pose["angle"], p["angle"])
    torch.testing.assert_close(pose["tx"], p["tx"])


def test_circular_std() -> None:
    assert E.circular_std(torch.full((10,), 1.3)) == pytest.approx(0.0, abs=1e-6)
    # wrap-around: angles either side of +-pi are close together
    assert E.circular_std(torch.tensor([math.pi - 0.01, -math.pi + 0.01])) == pytest.approx(0.01, rel=1e-3)
    # small spread: close to the ordinary std
    angles = torch.randn(10000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.05
    assert E.circular_std(angles) == pytest.approx(float(angles.std()), rel=0.01)
    # uniform on (-90, 90) degrees: R = sin(pi/2) / (pi/2)
    uniform = torch.linspace(-math.pi / 2, math.pi / 2, 100001, dtype=torch.float64)
    assert E.circular_std(uniform) == pytest.approx(math.sqrt(-2 * math.log(2 / math.pi)), rel=1e-4)


def test_pose_spread_keys_and_units() -> None:
    theta, p = _similarity(500)
    spread = E.pose_spread(_matrix(theta))
    assert tuple(spread) == E.SPREAD_KEYS
    assert spread["angle_deg"] == pytest.approx(math.degrees(E.circular_std(p["angle"])))
    assert spread["log_scale"] == pytest.approx(float(torch.log(p["scale"]).std(correction=0)))
    assert spread["tx"] == pytest.approx(float(p["tx"].std(correction=0)))
    assert E.pose_spread(_matrix(theta[:1])) == {"angle_deg": 0.0, "log_scale": 0.0, "tx": 0.0, "ty": 0.0}


@pytest.mark.parametrize("name", ["R", "RTS", "TC", "P"])
def test_exact_inverse_prediction_has_zero_residual_spread(name: str) -> None:
    d = D.distort(name, torch.rand(64, 1, 28, 28), torch.Generator().manual_seed(1))
    inverse = torch.linalg.inv(_matrix(d.theta))
    pred = inverse if d.family == "projective" else inverse[:, :2]
    result = E.pose_consistency(d.theta, pred)
    assert all(v < 1e-6 for v in result["residual"].values())
    assert result["distortion"]["tx"] > 0.05 or result["distortion"]["angle_deg"] > 5


def test_inverse_up_to_a_constant_pose_is_still_consistent() -> None:
    # An ST-CNN may rectify to its own canonical pose (here: rotated 20 degrees and zoomed): consistent all the same.
    d = D.distort("RTS", torch.rand(64, 1, 28, 28), torch.Generator().manual_seed(2))
    canonical = _matrix(similarity_theta(torch.tensor([0.35]), torch.tensor([0.6]), torch.tensor([0.1]),
                                                   torch.tensor([0.0])))
    pred = (torch.linalg.inv(_matrix(d.theta)) @ canonical)[:, :2]
    residual = E.pose_consistency(d.theta, pred)["residual"]
    assert all(v < 1e-6 for v in residual.values())


@pytest.mark.parametrize("name", ["R", "RTS", "P", "E", "TC"])
def test_identity_prediction_residual_equals_distortion_spread(name: str) -> None:
    d = D.distort(name, torch.rand(64, 1, 28, 28), torch.Generator().manual_seed(3))
    identity = torch.eye(3)[:2].expand(64, 2, 3)
    result = E.pose_consistency(d.theta, identity, d.tps_grid if d.family == "tps" else None)
    for key in E.SPREAD_KEYS:
        assert result["residual"][key] == pytest.approx(result["distortion"][key], abs=1e-9)


def test_tps_prediction_and_missing_prediction() -> None:
    d = D.distort("RTS", torch.rand(8, 1, 28, 28), torch.Generator().manual_seed(4))
    ctrl = torch.from_numpy(frames.tps_control_points((4, 4)))
    inverse = torch.linalg.inv(_matrix(d.theta))
    tps_pred = ctrl @ inverse[:, :2, :2].transpose(1, 2) + inverse[:, :2, 2].unsqueeze(1)  # the inverse as a TPS
    residual = E.pose_consistency(d.theta, tps_pred, pred_tps_grid=(4, 4))["residual"]
    assert all(v < 1e-6 for v in residual.values())
    assert E.pose_consistency(d.theta, None)["residual"] is None
    with pytest.raises(ValueError, match="8 distortion thetas but 3"):
        E.residual_matrices(d.theta, inverse[:3])


def test_classification_error() -> None:
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    assert E.classification_error(logits, torch.tensor([0, 1, 1, 1])) == 0.25
    assert E.classification_error(torch.tensor([1, 1]), torch.tensor([1, 0])) == 0.5
    with pytest.raises(ValueError, match="predictions"):
        E.classification_error(logits, torch.tensor([0, 1]))
