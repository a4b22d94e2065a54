"""models.frames: the coordinate conventions of docs/DESIGN.md, tested as invariants.

Pixel centres, normalized coordinates, the direction of theta (output -> input), the pixel
matrices and their inverses, the one theta -> 3x3 conversion, the TPS direction, and that
OpenCV's inverse-map warps reproduce the project's sampler.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import frames
from models.transforms import sampling_grid, spatial_transform


def _random_theta(family: str, rng: np.random.Generator) -> np.ndarray:
    angle, scale = rng.uniform(-0.8, 0.8), rng.uniform(0.6, 1.3)
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    theta = np.array([[c, -s, rng.uniform(-0.3, 0.3)], [s * 1.1, c * 0.9, rng.uniform(-0.3, 0.3)]])
    if family == "projective":
        theta = np.vstack([theta, [rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2), rng.uniform(0.8, 1.2)]])
    return theta


def _apply(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Homogeneous 3x3 ``m`` applied to points [P, 2]."""
    p = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ m.T
    return p[:, :2] / p[:, 2:]


# ------------------------------------------------------------------------------------ pixel centres


@pytest.mark.parametrize("size", [(1, 1), (5, 8), (28, 28), (37, 23)])
def test_pixel_centre_convention(size: tuple[int, int]) -> None:
    """Pixel i of an axis of size S has its centre at (2i + 1)/S - 1; -1 and 1 are the outer pixel edges."""
    h, w = size
    gx, gy = frames.pixel_centres(size)
    assert gx.shape == gy.shape == (h, w)
    np.testing.assert_allclose(gx[0], (2 * np.arange(w) + 1) / w - 1)
    np.testing.assert_allclose(gy[:, 0], (2 * np.arange(h) + 1) / h - 1)
    norm_from_px = frames.norm_from_px(size)
    corners_px = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [w - 0.5, h - 0.5], [-0.5, h - 0.5]])
    np.testing.assert_allclose(_apply(norm_from_px, corners_px), frames.OUTPUT_CORNERS, atol=1e-12)
    ij = np.stack(np.meshgrid(np.arange(w), np.arange(h)), -1).reshape(-1, 2).astype(np.float64)
    np.testing.assert_allclose(_apply(norm_from_px, ij), np.stack([gx, gy], -1).reshape(-1, 2), atol=1e-12)
    np.testing.assert_allclose(frames.px_from_norm(size) @ norm_from_px, np.eye(3), atol=1e-12)


def test_base_grid_is_torch_affine_grid_at_the_identity() -> None:
    """The (x, y) of the affine base grid is what F.affine_grid gives for the identity, align_corners=False."""
    base = frames.affine_base_grid((7, 11))
    ref = F.affine_grid(torch.eye(3, dtype=torch.float64)[None, :2], [1, 1, 7, 11], align_corners=False)[0]
    np.testing.assert_allclose(base[..., :2], ref.numpy(), atol=1e-6)
    np.testing.assert_array_equal(base[..., 2], 1.0)


def test_sizes_are_checked_by_name() -> None:
    with pytest.raises(ValueError, match=r"size must be \(height, width\) with both >= 1, got \(0, 3\)"):
        frames.norm_from_px((0, 3))
    with pytest.raises(ValueError, match="tps grid must be at least 2x2, got 1x4"):
        frames.tps_control_points((1, 4))
    with pytest.raises(ValueError, match="unknown transform 'shear'"):
        frames.base_grid("shear", (4, 4))


@pytest.mark.parametrize(("family", "shape"), [("affine", (2, 3)), ("similarity", (2, 3)), ("attention", (2, 3)),
                                               ("projective", (3, 3)), ("tps", (12, 2))])
def test_theta_shape_and_base_grid_depth(family: str, shape: tuple[int, int]) -> None:
    assert frames.theta_shape(family, (3, 4)) == shape
    depth = 12 if family == "tps" else 3
    assert frames.base_grid_depth(family, (3, 4)) == depth
    assert frames.base_grid(family, (5, 6), (3, 4)).shape == (5, 6, depth)


# ----------------------------------------------------------------------- theta and pixel matrices


@pytest.mark.parametrize("family", ["affine", "projective"])
def test_pixel_matrix_maps_output_pixels_where_the_grid_generator_samples(family: str) -> None:
    """input_px_from_output_px(theta) @ (x, y, 1) == the sampling grid at output pixel (x, y), in input pixels."""
    rng = np.random.default_rng(0)
    theta = _random_theta(family, rng)
    in_size, out_size = (37, 52), (19, 24)
    grid = sampling_grid(torch.from_numpy(theta)[None], family, out_size)[0].numpy()  # [h, w, 2] normalized
    sampled_px = _apply(frames.px_from_norm(in_size), grid.reshape(-1, 2))
    ij = np.stack(np.meshgrid(np.arange(out_size[1]), np.arange(out_size[0])), -1).reshape(-1, 2).astype(np.float64)
    m = frames.input_px_from_output_px(theta, in_size, out_size)
    np.testing.assert_allclose(_apply(m, ij), sampled_px, atol=2e-5)  # the base grid is float32
    assert m[2, 2] == pytest.approx(1.0)


def test_pixel_matrix_of_identity_is_a_scale() -> None:
    m = frames.input_px_from_output_px(np.array([[1.0, 0, 0], [0, 1.0, 0]]), (100, 200), (50, 100))
    # output pixel (0,0) centre maps to input (0.5, 0.5): the centre of a 2x2 block.
    np.testing.assert_allclose(m @ [0, 0, 1], [0.5, 0.5, 1])
    np.testing.assert_allclose(m @ [99, 49, 1], [198.5, 98.5, 1])


@pytest.mark.parametrize("family", ["affine", "projective"])
def test_theta_and_pixel_matrix_round_trip(family: str) -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        theta = _random_theta(family, rng)
        in_size = tuple(int(v) for v in rng.integers(5, 400, 2))
        out_size = tuple(int(v) for v in rng.integers(5, 400, 2))
        m = frames.input_px_from_output_px(theta, in_size, out_size)
        back = frames.theta_from_pixel_matrix(m, in_size, out_size)
        np.testing.assert_allclose(back, frames.theta_to_matrix(theta), atol=1e-10)
        if family == "affine":
            np.testing.assert_allclose(back[:2], theta, atol=1e-10)
            np.testing.assert_allclose(m[2], [0, 0, 1], atol=1e-12)  # an affine theta gives an affine matrix


@pytest.mark.parametrize("family", ["affine", "projective"])
def test_output_px_from_input_px_is_the_inverse(family: str) -> None:
    rng = np.random.default_rng(4)
    theta = _random_theta(family, rng)
    fwd = frames.input_px_from_output_px(theta, (40, 60), (30, 30))
    inv = frames.output_px_from_input_px(theta, (40, 60), (30, 30))
    np.testing.assert_allclose(fwd @ inv / (fwd @ inv)[2, 2], np.eye(3), atol=1e-10)
    assert inv[2, 2] == pytest.approx(1.0)
    points = rng.uniform(0, 30, (20, 2))
    np.testing.assert_allclose(_apply(inv, _apply(fwd, points)), points, atol=1e-9)


def test_pixel_matrices_keep_batch_axes() -> None:
    rng = np.random.default_rng(5)
    thetas = np.stack([_random_theta("projective", rng) for _ in range(4)])
    batched = frames.input_px_from_output_px(thetas, (40, 60), (30, 20))
    assert batched.shape == (4, 3, 3)
    for t, m in zip(thetas, batched, strict=True):
        np.testing.assert_allclose(m, frames.input_px_from_output_px(t, (40, 60), (30, 20)), atol=1e-12)
    inverse = frames.output_px_from_input_px(thetas, (40, 60), (30, 20))
    np.testing.assert_allclose(batched @ inverse / (batched @ inverse)[:, 2:, 2:], np.eye(3)[None].repeat(4, 0),
                               atol=1e-10)


def test_warp_points_follows_theta_output_to_input() -> None:
    """theta maps output to input: the output's centre samples the input at theta's translation."""
    theta = np.array([[0.5, 0.0, 0.25], [0.0, 0.5, -0.5]])
    np.testing.assert_allclose(frames.warp_points(theta, np.array([[0.0, 0.0], [1.0, 1.0]])),
                               [[0.25, -0.5], [0.75, 0.0]])
    with pytest.raises(ValueError, match=r"got shape \[16, 2\].*TPS"):
        frames.warp_points(frames.tps_control_points((4, 4)), np.zeros((1, 2)))


# ----------------------------------------------------------------------- the one conversion to 3x3


def test_theta_to_matrix_of_each_family_and_batch() -> None:
    affine = np.array([[1.2, 0.1, 0.3], [-0.2, 0.9, 0.1]])
    m = frames.theta_to_matrix(affine)
    assert m.shape == (3, 3) and m.dtype == np.float64
    np.testing.assert_array_equal(m, np.vstack([affine, [0, 0, 1]]))
    batch = np.stack([affine, 2 * affine, -affine])
    mb = frames.theta_to_matrix(torch.from_numpy(batch))  # a CPU tensor is accepted as it is
    assert mb.shape == (3, 3, 3)
    np.testing.assert_array_equal(mb[:, 2], np.tile([0.0, 0.0, 1.0], (3, 1)))
    h = np.array([[1.1, 0.2, 0.1], [0.0, 0.9, 0.0], [0.1, 0.0, 2.0]])
    np.testing.assert_allclose(frames.theta_to_matrix(5.0 * h), h / 2.0)  # scaled to [2, 2] == 1
    np.testing.assert_allclose(frames.theta_to_matrix(np.stack([h, 3 * h]))[1], h / 2.0)
    with pytest.raises(ValueError, match=r"theta must be .*got shape \[2, 4, 4\]"):
        frames.theta_to_matrix(np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match=r"got shape \[6\]"):
        frames.theta_to_matrix(np.zeros(6))


def test_theta_to_matrix_fits_a_tps_by_its_affine_part() -> None:
    """A TPS's source points are where the target grid lands: an affine TPS gives back its affine map."""
    ctrl = frames.tps_control_points((4, 4))
    affine = np.array([[[0.8, -0.3, 0.1], [0.3, 0.8, -0.2]], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    source = ctrl @ np.swapaxes(affine[:, :, :2], 1, 2) + affine[:, None, :, 2]  # [2, 16, 2]
    np.testing.assert_allclose(frames.theta_to_matrix(source), frames.theta_to_matrix(affine), atol=1e-12)
    np.testing.assert_allclose(frames.theta_to_matrix(ctrl), np.eye(3), atol=1e-12)  # unbatched identity
    with pytest.raises(ValueError, match="pass tps_grid"):
        frames.theta_to_matrix(np.zeros((1, 6, 2)))
    assert frames.theta_to_matrix(np.zeros((1, 6, 2)), (2, 3)).shape == (1, 3, 3)
    with pytest.raises(ValueError, match="tps_grid 3x3 has 9 control points but theta has 6"):
        frames.theta_to_matrix(np.zeros((1, 6, 2)), (3, 3))
    with pytest.raises(ValueError, match=r"pixel matrices need .*got shape \[16, 2\]"):
        frames.input_px_from_output_px(ctrl, (10, 10), (10, 10))  # a TPS has no exact matrix


# ------------------------------------------------------------------------------------------ the TPS


def test_tps_base_grid_is_identity_at_control_points() -> None:
    ctrl = frames.tps_control_points((4, 4))
    base = frames.tps_base_grid((16, 16), (4, 4))
    gx, gy = frames.pixel_centres((16, 16))
    np.testing.assert_allclose(base @ ctrl, np.stack([gx, gy], -1), atol=1e-5)


def test_tps_direction_source_points_are_where_target_points_sample() -> None:
    """theta[k] is the input point that the output's control point k samples (output -> input, as affine)."""
    rng = np.random.default_rng(6)
    ctrl = frames.tps_control_points((3, 3))  # target points at -1, 0, 1: 0 is the centre pixel of an odd size
    source = ctrl + rng.uniform(-0.2, 0.2, ctrl.shape)
    grid = sampling_grid(torch.from_numpy(source)[None], "tps", (5, 7), tps_grid=(3, 3))[0].numpy()
    np.testing.assert_allclose(grid[2, 3], source[4], atol=1e-6)  # the centre control point (row 1, col 1)
    # An affine TPS samples exactly as the affine theta it was made from.
    theta = np.array([[0.9, 0.2, 0.1], [-0.1, 1.1, -0.2]])
    affine_source = ctrl @ theta[:, :2].T + theta[:, 2]
    tps = sampling_grid(torch.from_numpy(affine_source)[None], "tps", (5, 7), tps_grid=(3, 3))
    aff = sampling_grid(torch.from_numpy(theta)[None], "affine", (5, 7))
    torch.testing.assert_close(tps, aff, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------- OpenCV agrees


@pytest.mark.parametrize("family", ["affine", "projective"])
@pytest.mark.parametrize("sizes", [((40, 60), (30, 30)), ((37, 23), (50, 41))])
def test_pixel_matrix_reproduces_rectified_with_opencv(family: str, sizes) -> None:  # noqa: ANN001
    """warpAffine/warpPerspective(src, input_px_from_output_px, WARP_INVERSE_MAP) == spatial_transform."""
    cv2 = pytest.importorskip("cv2")
    (ih, iw), (oh, ow) = sizes
    rng = np.random.default_rng(1)
    # A smooth image so that the OpenCV's fixed-point bilinear weights (1/32 px) stay within tolerance.
    yy, xx = np.mgrid[0:ih, 0:iw]
    img = (0.5 + 0.25 * np.sin(xx / 5.0) + 0.25 * np.cos(yy / 7.0)).astype(np.float32)
    theta = _random_theta(family, rng)
    ours = spatial_transform(torch.from_numpy(img)[None, None], torch.tensor(theta, dtype=torch.float32)[None],
                             family, (oh, ow))[0, 0].numpy()
    m = frames.input_px_from_output_px(theta, (ih, iw), (oh, ow))
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    if family == "affine":
        ref = cv2.warpAffine(img, m[:2], (ow, oh), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    else:
        ref = cv2.warpPerspective(img, m, (ow, oh), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    # Compare where the sample point is well inside the image (border pixels blend with padding differently).
    pts = np.stack(np.meshgrid(np.arange(ow), np.arange(oh)), -1).reshape(-1, 2).astype(np.float64)
    src = _apply(m, pts)
    inside = ((src[:, 0] > 1) & (src[:, 0] < iw - 2) & (src[:, 1] > 1) & (src[:, 1] < ih - 2)).reshape(oh, ow)
    assert inside.sum() > 0.3 * inside.size
    np.testing.assert_allclose(ours[inside], ref[inside], atol=2e-2)
    # And the inverse maps input points into the rectified frame.
    inv = frames.output_px_from_input_px(theta, (ih, iw), (oh, ow))
    np.testing.assert_allclose(_apply(inv, src), pts, atol=1e-6)
