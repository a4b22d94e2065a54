"""Invariants of the STN module: identity, gradients, clear errors (frames' conventions: test_frames.py)."""

from __future__ import annotations

import pytest
import torch

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
