"""Invariants of the STN: identity, gradients, pixel-matrix consistency with OpenCV, clear errors."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from models import frames
from models.sampler import grid_sample
from models.stn import SpatialTransformer, STNConfig, identity_theta
from models.transforms import TRANSFORMS, make_transform

FAMILIES = list(TRANSFORMS)


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_theta_returns_the_input(family: str) -> None:
    """A fresh STN starts at the identity: same-size output equals the input."""
    torch.manual_seed(0)
    stn = SpatialTransformer(STNConfig(transform=family, loc_size=(20, 24), output_size=(20, 24))).eval()
    x = torch.rand(3, 1, 20, 24)
    with torch.no_grad():
        rect, theta = stn(x)
    torch.testing.assert_close(theta, identity_theta(family, 3))
    torch.testing.assert_close(rect, x, atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_other_resolution_matches_resize(family: str) -> None:
    """theta is resolution-free: identity sampling at another size equals bilinear resize."""
    stn = SpatialTransformer(STNConfig(transform=family, output_size=(14, 10))).eval()
    x = torch.rand(2, 1, 28, 20)
    with torch.no_grad():
        rect, _ = stn(x)
    ref = torch.nn.functional.interpolate(x, size=(14, 10), mode="bilinear", align_corners=False)
    torch.testing.assert_close(rect, ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_every_parameter(family: str) -> None:
    torch.manual_seed(0)
    stn = SpatialTransformer(STNConfig(transform=family))
    # Off the identity, so the regressor's zero weights do not block the localisation convs.
    torch.nn.init.normal_(stn.localisation.regressor.weight, std=0.05)
    x = torch.rand(4, 1, 36, 30, requires_grad=True)
    rect, theta = stn(x)
    (rect.square().mean() + theta.square().mean()).backward()
    for name, p in stn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_sampler_op_gradients_match_reference() -> None:
    """The custom op's backward is grid_sample's backward."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 9, 11, dtype=torch.float64, requires_grad=True)
    g = (torch.rand(2, 5, 7, 2, dtype=torch.float64) * 2.4 - 1.2).requires_grad_(True)
    for mode in ("bilinear", "bicubic"):
        for pad in ("zeros", "border", "reflection"):
            torch.autograd.gradcheck(lambda a, b, m=mode, p=pad: grid_sample(a, b, m, p), (x, g))


def _random_theta(family: str, rng: np.random.Generator) -> np.ndarray:
    angle, scale = rng.uniform(-0.8, 0.8), rng.uniform(0.6, 1.3)
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    theta = np.array([[c, -s, rng.uniform(-0.3, 0.3)], [s * 1.1, c * 0.9, rng.uniform(-0.3, 0.3)]])
    if family == "projective":
        theta = np.vstack([theta, [rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2), 1.0]])
    return theta


@pytest.mark.parametrize("family", ["affine", "projective"])
@pytest.mark.parametrize("sizes", [((40, 60), (30, 30)), ((37, 23), (50, 41))])
def test_pixel_matrix_reproduces_rectified_with_opencv(family: str, sizes) -> None:
    """warpAffine/warpPerspective(src, input_px_from_output_px, WARP_INVERSE_MAP) == our sampler."""
    (ih, iw), (oh, ow) = sizes
    rng = np.random.default_rng(1)
    # A smooth image so that the OpenCV's fixed-point bilinear weights (1/32 px) stay within tolerance.
    yy, xx = np.mgrid[0:ih, 0:iw]
    img = (0.5 + 0.25 * np.sin(xx / 5.0) + 0.25 * np.cos(yy / 7.0)).astype(np.float32)
    theta = _random_theta(family, rng)
    fam = make_transform(family)
    grid = fam.grid(torch.tensor(theta, dtype=torch.float32)[None], fam.base_grid((oh, ow)))
    ours = grid_sample(torch.from_numpy(img)[None, None], grid, "bilinear", "zeros")[0, 0].numpy()
    m = frames.input_px_from_output_px(theta, (ih, iw), (oh, ow))
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    if family == "affine":
        ref = cv2.warpAffine(img, m[:2], (ow, oh), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    else:
        ref = cv2.warpPerspective(img, m, (ow, oh), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    # Compare where the sample point is well inside the image (border pixels blend with padding differently).
    pts = np.stack(np.meshgrid(np.arange(ow), np.arange(oh)), -1).reshape(-1, 2).astype(np.float64)
    src = np.concatenate([pts, np.ones((len(pts), 1))], 1) @ m.T
    src = src[:, :2] / src[:, 2:]
    inside = ((src[:, 0] > 1) & (src[:, 0] < iw - 2) & (src[:, 1] > 1) & (src[:, 1] < ih - 2)).reshape(oh, ow)
    assert inside.sum() > 0.3 * inside.size
    np.testing.assert_allclose(ours[inside], ref[inside], atol=2e-2)
    # And the inverse maps input points into the rectified frame.
    inv = frames.output_px_from_input_px(theta, (ih, iw), (oh, ow))
    back = np.concatenate([src, np.ones((len(src), 1))], 1) @ inv.T
    np.testing.assert_allclose(back[:, :2] / back[:, 2:], pts, atol=1e-6)


def test_pixel_matrix_of_identity_is_a_scale() -> None:
    m = frames.input_px_from_output_px(np.array([[1.0, 0, 0], [0, 1.0, 0]]), (100, 200), (50, 100))
    # output pixel (0,0) centre maps to input (0.5, 0.5): the centre of a 2x2 block.
    np.testing.assert_allclose(m @ [0, 0, 1], [0.5, 0.5, 1])
    np.testing.assert_allclose(m @ [99, 49, 1], [198.5, 98.5, 1])


def test_tps_base_grid_is_identity_at_control_points() -> None:
    ctrl = frames.tps_control_points((4, 4))
    base = frames.tps_base_grid((16, 16), (4, 4))
    gx, gy = frames.pixel_centres((16, 16))
    np.testing.assert_allclose(base @ ctrl, np.stack([gx, gy], -1), atol=1e-5)


def test_wrong_shape_input_is_a_clear_error() -> None:
    stn = SpatialTransformer(STNConfig(in_channels=1))
    with pytest.raises(ValueError, match=r"image must be \[N, 1, H, W\].*\[2, 3, 28, 28\]"):
        stn(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"image must be"):
        stn(torch.rand(28, 28))


def test_unknown_transform_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown transform 'shear'.*affine"):
        STNConfig(transform="shear")
    with pytest.raises(ValueError, match="unknown transform"):
        make_transform("rigid")
    with pytest.raises(ValueError, match="unknown padding mode"):
        STNConfig(padding_mode="wrap")


def test_wrong_parameter_count_names_the_shape() -> None:
    with pytest.raises(ValueError, match=r"affine transform takes parameters \[N, 6\], got shape \[2, 5\]"):
        make_transform("affine").theta_from_params(torch.zeros(2, 5))
