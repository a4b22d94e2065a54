"""models.transforms, function first: the grid generator and the spatial transform as plain functions.

The functions agree with torch's own ``F.affine_grid``/``F.grid_sample``, the module calls them,
gradients reach theta and the image, and wrong shapes are errors that name the shape received.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import frames
from models.stn import SpatialTransformer, STNConfig, identity_theta
from models.transforms import (
    affine_sampling_grid,
    make_transform,
    projective_sampling_grid,
    sampling_grid,
    spatial_transform,
    tps_sampling_grid,
)

FAMILIES = list(frames.TRANSFORMS)


def _theta(family: str, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A random theta near the identity, of the family's shape."""
    g = torch.Generator().manual_seed(seed)
    base = identity_theta(family, n).to(dtype)
    return base + 0.15 * torch.randn(base.shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
def test_affine_spatial_transform_is_torch_affine_grid_and_grid_sample(mode: str, padding: str) -> None:
    x = torch.rand(3, 2, 23, 31, generator=torch.Generator().manual_seed(1))
    theta = _theta("affine", 3)
    ours = spatial_transform(x, theta, "affine", (17, 12), mode, padding)
    grid = F.affine_grid(theta, [3, 2, 17, 12], align_corners=False)
    ref = F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=False)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_projective_with_affine_last_row_is_the_affine() -> None:
    theta = _theta("affine", 2, seed=2, dtype=torch.float64)
    h = torch.cat([theta, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(2, 1, 3)], dim=1)
    torch.testing.assert_close(sampling_grid(7.0 * h, "projective", (9, 5)), sampling_grid(theta, "affine", (9, 5)))


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_theta_returns_the_input(family: str) -> None:
    x = torch.rand(2, 3, 14, 10)
    out = spatial_transform(x, identity_theta(family, 2), family, (14, 10))
    torch.testing.assert_close(out, x, atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_module_calls_the_function(family: str) -> None:
    """SpatialTransformer.sample is spatial_transform with the config's options, at its own and other sizes."""
    torch.manual_seed(0)
    cfg = STNConfig(transform=family, output_size=(12, 16), padding_mode="border", mode="bicubic")
    stn = SpatialTransformer(cfg).eval()
    x = torch.rand(2, 1, 30, 26)
    theta = _theta(family, 2)
    for size in (None, (7, 9)):
        out = stn.sample(x, theta, size)
        ref = spatial_transform(x, theta, family, size or cfg.output_size, "bicubic", "border", cfg.tps_grid)
        assert torch.equal(out, ref)
    fam = make_transform(family, cfg.tps_grid)
    assert torch.equal(fam.grid(theta, stn.base_grid), sampling_grid(theta, family, (12, 16), cfg.tps_grid))


@pytest.mark.parametrize("family", ["affine", "projective", "tps"])
def test_gradients_reach_theta_and_image(family: str) -> None:
    x = torch.rand(2, 1, 6, 5, dtype=torch.float64, requires_grad=True)
    theta = _theta(family, 2, seed=3, dtype=torch.float64).requires_grad_(True)
    torch.autograd.gradcheck(lambda a, t: spatial_transform(a, t, family, (4, 3), tps_grid=(4, 4)), (x, theta))


def test_per_family_functions_check_their_shapes() -> None:
    base3 = torch.from_numpy(frames.affine_base_grid((4, 5)))
    with pytest.raises(ValueError, match=r"affine theta must be \[N, 2, 3\], got shape \[2, 3, 3\]"):
        affine_sampling_grid(torch.zeros(2, 3, 3), base3)
    with pytest.raises(ValueError, match=r"projective theta must be \[N, 3, 3\], got shape \[3, 3\]"):
        projective_sampling_grid(torch.eye(3), base3)
    with pytest.raises(ValueError, match=r"base grid \[h, w, 3\].*got shape \[4, 5, 16\]"):
        affine_sampling_grid(torch.zeros(1, 2, 3), torch.from_numpy(frames.tps_base_grid((4, 5), (4, 4))))
    with pytest.raises(ValueError, match=r"tps theta must be source control points \[N, K, 2\], got shape \[1, 16\]"):
        tps_sampling_grid(torch.zeros(1, 16), base3)
    with pytest.raises(ValueError, match=r"16 control points needs a base grid \[h, w, 16\].*got shape \[4, 5, 3\]"):
        tps_sampling_grid(torch.zeros(1, 16, 2), base3)


def test_sampling_grid_and_spatial_transform_name_what_they_got() -> None:
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"similarity theta must be \[N, 2, 3\], got shape \[2, 6\]"):
        sampling_grid(torch.zeros(2, 6), "similarity", (4, 4))
    with pytest.raises(ValueError, match=r"tps theta must be \[N, 9, 2\], got shape \[2, 16, 2\]"):
        sampling_grid(identity_theta("tps", 2), "tps", (4, 4), tps_grid=(3, 3))
    with pytest.raises(ValueError, match="unknown transform 'shear'.*affine"):
        sampling_grid(torch.zeros(2, 2, 3), "shear", (4, 4))
    with pytest.raises(ValueError, match=r"output_size must be \(height, width\).*got \(0, 4\)"):
        sampling_grid(identity_theta("affine", 2), "affine", (0, 4))
    base = torch.from_numpy(frames.affine_base_grid((5, 5)))
    with pytest.raises(ValueError, match=r"base_grid must be \[4, 4, D\] for output_size \(4, 4\), got shape \[5, 5, 3\]"):
        sampling_grid(identity_theta("affine", 2), "affine", (4, 4), base_grid=base)
    with pytest.raises(ValueError, match=r"image must be \[N, C, H, W\], got shape \[8, 8\]"):
        spatial_transform(x[0, 0], identity_theta("affine", 1), "affine", (4, 4))
    with pytest.raises(ValueError, match=r"theta must be one per image, \[2, ...\] for 2 images, got shape \[3, 2, 3\]"):
        spatial_transform(x, identity_theta("affine", 3), "affine", (4, 4))
    with pytest.raises(ValueError, match="unknown padding mode 'wrap'"):
        spatial_transform(x, identity_theta("affine", 2), "affine", (4, 4), padding_mode="wrap")
