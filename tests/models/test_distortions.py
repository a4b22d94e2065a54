"""models.distortions: every distortion's theta reproduces its images, and its parameters mean what they say."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import distortions as D
from models import frames
from models.evaluate import pose_from_theta


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _upright(n: int = 6, size: int = 28, channels: int = 1) -> torch.Tensor:
    x = torch.rand(n, channels, size, size, generator=_gen(99))
    x[..., :3, :] = 0  # some background
    return x


@pytest.mark.parametrize("name", D.DISTORTIONS)
def test_theta_reproduces_images(name: str) -> None:
    up = _upright()
    d = D.distort(name, up, _gen())
    canvas = D.canvas_size(name, (28, 28))
    assert d.images.shape == (6, 1, *canvas)
    assert d.family == D.DISTORTION_FAMILY[name]
    expected_theta = {"affine": (6, 2, 3), "projective": (6, 3, 3), "tps": (6, 16, 2)}[d.family]
    assert tuple(d.theta.shape) == expected_theta
    again = D.warp(up, d.theta, d.family, canvas, d.tps_grid)
    if name == "TC":  # clutter comes on top (max): the warp is below it everywhere, equal off the clutter
        assert torch.all(d.images >= again - 1e-6)
        assert (d.images > again + 1e-3).any()
        clean = D.translate_clutter(up, _gen(), n_clutter=0)
        torch.testing.assert_close(clean.images, D.warp(up, clean.theta, "affine", canvas))
    else:
        torch.testing.assert_close(d.images, again)


@pytest.mark.parametrize("name", ["R", "RTS", "TC", "none"])
def test_affine_theta_matches_torch_affine_grid(name: str) -> None:
    # Independent check of the grid convention (the library never calls affine_grid).
    up = _upright()
    d = D.distort(name, up, _gen(3))
    if name == "TC":
        d = D.translate_clutter(up, _gen(3), n_clutter=0)
    grid = F.affine_grid(d.theta, [6, 1, *d.images.shape[-2:]], align_corners=False)
    torch.testing.assert_close(d.images, F.grid_sample(up, grid, align_corners=False), atol=1e-5, rtol=1e-5)


def test_canvas_sizes() -> None:
    assert D.canvas_size("RTS", (28, 28)) == (42, 42)
    assert D.canvas_size("TC", (28, 28)) == (60, 60)
    assert D.canvas_size("R", (28, 28)) == D.canvas_size("P", (28, 28)) == (28, 28)
    assert D.canvas_size("RTS", (20, 40)) == (30, 60)
    with pytest.raises(ValueError, match="unknown distortion 'X'"):
        D.canvas_size("X", (28, 28))
    with pytest.raises(ValueError, match="unknown distortion"):
        D.distort("X", _upright(), _gen())


def test_rotation_theta_has_the_right_angle() -> None:
    d = D.rotate(_upright(), _gen(5))
    angle = d.params["angle"]
    assert angle.abs().max() <= math.pi / 2 and angle.std() > 0.1
    c, s = torch.cos(angle), torch.sin(angle)
    # theta samples the upright image at R(-angle) p: content rotated by +angle
    expected = torch.stack([torch.stack([c, s, 0 * c], 1), torch.stack([-s, c, 0 * c], 1)], 1)
    torch.testing.assert_close(d.theta, expected, atol=1e-6, rtol=0)
    pose = pose_from_theta(d.theta)
    torch.testing.assert_close(pose["angle"], -angle.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(pose["log_scale"], torch.zeros(6, dtype=torch.float64), atol=1e-6, rtol=0)


def test_rotation_is_clockwise_on_screen() -> None:
    up = torch.zeros(1, 1, 28, 28)
    up[0, 0, 13:15, 22:24] = 1.0  # a dot right of centre
    theta = D.placement_theta((28, 28), (28, 28), torch.tensor([math.pi / 2]), torch.ones(1), torch.zeros(1),
                              torch.zeros(1)).float()
    rotated = D.warp(up, theta, "affine", (28, 28))
    ys, xs = torch.nonzero(rotated[0, 0] > 0.5, as_tuple=True)
    assert 21 <= ys.float().mean() <= 24 and 12 <= xs.float().mean() <= 15  # now below centre


def test_canvas_ratio_places_the_upright_image_pixel_exactly() -> None:
    # RTS with no rotation, unit scale, no translation: the 28x28 image sits in the middle of 42x42.
    up = _upright(2)
    one, zero = torch.ones(2), torch.zeros(2)
    theta = D.placement_theta((28, 28), (42, 42), zero, one, zero, zero)
    torch.testing.assert_close(theta[:, :, :2], 1.5 * torch.eye(2, dtype=torch.float64).expand(2, 2, 2))
    placed = D.warp(up, theta.float(), "affine", (42, 42))
    torch.testing.assert_close(placed[..., 7:35, 7:35], up, atol=1e-5, rtol=0)
    assert placed[..., :7, :].abs().max() < 1e-5 and placed[..., 35:, :].abs().max() < 1e-5
    torch.testing.assert_close(D.frame_theta((28, 28), (42, 42), 2), theta)
    # TC: 60x60, ratio 60/28
    torch.testing.assert_close(D.frame_theta((28, 28), (60, 60), 1)[0, 0, 0].item(), 60 / 28)


def test_rts_parameters_locate_the_content() -> None:
    # A bright 4x4 block at a known upright position lands where angle/scale/translation say.
    up = torch.zeros(16, 1, 28, 28)
    up[:, 0, 4:8, 18:22] = 1.0  # centre at pixel (x 19.5, y 5.5)
    d = D.rotate_translate_scale(up, _gen(7))
    p = d.params
    assert p["scale"].min() >= 0.7 and p["scale"].max() <= 1.2 and p["angle"].abs().max() <= math.pi / 4
    q = torch.tensor([(2 * 19.5 + 1) / 28 - 1, (2 * 5.5 + 1) / 28 - 1], dtype=torch.float64)  # upright normalized
    q_px = q * 14.0  # centred pixel units
    for i in range(16):
        a, s = p["angle"][i].double(), p["scale"][i].double()
        rot = torch.stack([torch.stack([a.cos(), -a.sin()]), torch.stack([a.sin(), a.cos()])])
        centre = torch.stack([p["tx"][i].double(), p["ty"][i].double()])
        expected = (centre + s * rot @ q_px / 21.0 + 1) * 42 / 2 - 0.5  # canvas pixel (x, y)
        mass = d.images[i, 0]
        ys, xs = torch.meshgrid(torch.arange(42.0), torch.arange(42.0), indexing="ij")
        found = torch.stack([(mass * xs).sum(), (mass * ys).sum()]) / mass.sum()
        torch.testing.assert_close(found.double(), expected, atol=0.35, rtol=0)


def test_rts_content_stays_on_canvas() -> None:
    d = D.rotate_translate_scale(torch.ones(200, 1, 28, 28), _gen(1))
    half = d.params["scale"] * 28 / 42
    assert torch.all(d.params["tx"].abs() <= 1 - half + 1e-6) and torch.all(d.params["ty"].abs() <= 1 - half + 1e-6)


def test_projective_theta_maps_landed_corners_home() -> None:
    d = D.projective(_upright(), _gen(2))
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    landed = d.params["scale"].double()[:, None, None] * corners + d.params["corner_offsets"].double()
    back = torch.stack([torch.from_numpy(frames.warp_points(t.double().numpy(), pts.numpy()))
                        for t, pts in zip(d.theta, landed, strict=True)])
    torch.testing.assert_close(back, corners.expand(6, 4, 2), atol=1e-4, rtol=0)
    assert torch.allclose(d.theta[:, 2, 2], torch.ones(6))


def test_homography_from_points_roundtrip() -> None:
    src = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])
    h_true = torch.tensor([[[1.2, 0.1, 0.3], [-0.2, 0.9, -0.1], [0.05, -0.02, 1.0]]], dtype=torch.float64)
    dst = torch.from_numpy(frames.warp_points(h_true[0].numpy(), src[0].double().numpy())).unsqueeze(0)
    torch.testing.assert_close(D.homography_from_points(src, dst), h_true)
    with pytest.raises(ValueError, match=r"\[N, 4, 2\]"):
        D.homography_from_points(src[:, :3], dst[:, :3])


def test_elastic_theta_is_scaled_jittered_grid() -> None:
    d = D.elastic(_upright(), _gen(4))
    ctrl = torch.from_numpy(frames.tps_control_points((4, 4)))
    expected = ctrl / d.params["scale"].double()[:, None, None] + d.params["point_offsets"].double()
    torch.testing.assert_close(d.theta.double(), expected, atol=1e-6, rtol=0)
    assert d.tps_grid == (4, 4)
    # with no jitter and unit scale the TPS is the identity
    flat = D.elastic(_upright(), _gen(4), scale_range=(1.0, 1.0), point_std=0.0)
    torch.testing.assert_close(flat.images, _upright(), atol=1e-5, rtol=0)


def test_clutter_comes_from_other_images() -> None:
    up = torch.zeros(4, 1, 28, 28)
    for i in range(4):
        up[i] = (i + 1) / 4.0  # each image has its own value
    d = D.translate_clutter(up, _gen(6))
    assert d.images.shape == (4, 1, 60, 60)
    assert torch.all(d.params["clutter_source"] != torch.arange(4)[:, None])
    assert d.params["clutter_canvas_xy"].shape == (4, 6, 2)
    # TC keeps scale and rotation: only translation
    pose = pose_from_theta(d.theta)
    torch.testing.assert_close(pose["angle"], torch.zeros(4, dtype=torch.float64), atol=1e-9, rtol=0)
    np.testing.assert_allclose(frames.theta_to_matrix(d.theta)[:, 0, 0], np.full(4, 60 / 28))


def test_rgb_and_determinism() -> None:
    up = _upright(3, channels=3)
    for name in D.DISTORTIONS:
        a, b = D.distort(name, up, _gen(11)), D.distort(name, up, _gen(11))
        assert a.images.shape[:2] == (3, 3)
        torch.testing.assert_close(a.images, b.images)
        torch.testing.assert_close(a.theta, b.theta)
    assert not torch.equal(D.distort("R", up, _gen(1)).theta, D.distort("R", up, _gen(2)).theta)


def test_rejects_non_float() -> None:
    with pytest.raises(ValueError, match="float"):
        D.distort("R", torch.zeros(1, 1, 28, 28, dtype=torch.uint8), _gen())
