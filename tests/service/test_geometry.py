"""service.geometry: coverage, points and boxes in both directions, for every family (no server; the HTTP
side is tests/service/api/test_http_geometry.py)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from models import frames
from service import geometry

RNG = np.random.default_rng(12)


def brute_coverage(mapping: geometry.Mapping) -> float:
    """Every output pixel centre mapped, the fraction inside the input's extent."""
    h, w = mapping.output_size
    ys, xs = np.mgrid[0:h, 0:w]
    pts, ok = mapping.to_input(np.stack([xs.ravel(), ys.ravel()], axis=-1).astype(np.float64))
    hi, wi = mapping.input_size
    inside = ok & (pts[:, 0] >= -0.5) & (pts[:, 0] <= wi - 0.5) & (pts[:, 1] >= -0.5) & (pts[:, 1] <= hi - 0.5)
    return float(inside.mean())


def bent_tps(grid: tuple[int, int] = (4, 4), amount: float = 0.08, seed: int = 0) -> np.ndarray:
    return frames.tps_control_points(grid) + np.random.default_rng(seed).normal(0, amount, (grid[0] * grid[1], 2))


@pytest.mark.parametrize("trial", range(40))
def test_homogeneous_coverage_is_exact(trial: int) -> None:
    """The row-by-row closed form counts exactly the pixels that brute force finds, for random affine and
    projective transforms (many partly off-image, some past the horizon)."""
    rng = np.random.default_rng(trial)
    theta = (np.eye(3)[:2] + rng.normal(0, 0.6, (2, 3))) if trial % 2 else (np.eye(3) + rng.normal(0, 0.5, (3, 3)))
    family = "affine" if theta.shape == (2, 3) else "projective"
    m = geometry.Mapping(family, theta, (int(rng.integers(5, 80)), int(rng.integers(5, 80))),
                         (int(rng.integers(3, 60)), int(rng.integers(3, 60))))
    assert geometry.coverage(m) == pytest.approx(brute_coverage(m), abs=1e-12)


def test_coverage_identity_inside_off_image_and_collapsed() -> None:
    inside = np.array([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]])  # zoom into the centre: every sample inside
    half = np.array([[0.5, 0.0, 1.0], [0.0, 0.5, 0.0]])  # x from 0.5 to 1.5: the left half of the output inside
    off = np.array([[1.0, 0.0, 2.5], [0.0, 1.0, 0.0]])  # beside the image
    collapsed = np.array([[0.0, 0.0, 5.0], [0.0, 0.0, 5.0]])  # every output pixel reads one point, off-image
    assert geometry.coverage(geometry.Mapping("affine", np.eye(3)[:2], (90, 70), (40, 30))) == 1.0
    assert geometry.coverage(geometry.Mapping("affine", inside, (90, 70), (40, 30))) == 1.0
    assert geometry.coverage(geometry.Mapping("affine", half, (90, 70), (40, 30))) == 0.5
    assert geometry.coverage(geometry.Mapping("affine", off, (90, 70), (40, 30))) == 0.0
    assert geometry.coverage(geometry.Mapping("affine", collapsed, (90, 70), (40, 30))) == 0.0
    assert geometry.coverage(geometry.Mapping("projective", np.eye(3), (90, 70), (40, 30))) == 1.0
    # TPS: identity control points cover; shifted ones by half
    ctrl = frames.tps_control_points((4, 4))
    assert geometry.coverage(geometry.Mapping("tps", ctrl, (90, 70), (40, 30))) == 1.0
    shifted = ctrl * 0.5 + [1.0, 0.0]
    assert geometry.coverage(geometry.Mapping("tps", shifted, (90, 70), (40, 30))) == 0.5
    assert geometry.coverage(geometry.Mapping("tps", ctrl + [3.0, 0.0], (90, 70), (40, 30))) == 0.0


def test_tps_coverage_exact_when_small_and_close_when_sampled() -> None:
    theta = bent_tps(amount=0.3, seed=4) * 1.3  # partly off-image
    small = geometry.Mapping("tps", theta, (80, 100), (25, 32))  # every pixel is sampled
    assert geometry.coverage(small) == pytest.approx(brute_coverage(small), abs=1e-12)
    big = geometry.Mapping("tps", theta, (800, 1000), (300, 400))  # 32 x 32 of 300 x 400 pixels
    exact = brute_coverage(big)
    assert 0.2 < exact < 0.95
    assert geometry.coverage(big) == pytest.approx(exact, abs=0.03)  # a grid 1/32 of a side apart


@pytest.mark.parametrize("family", ["affine", "projective"])
def test_points_agree_with_opencv_perspective_transform(family: str) -> None:
    theta = (np.eye(3)[:2] + RNG.normal(0, 0.1, (2, 3))) if family == "affine" else np.eye(3) + RNG.normal(0, 0.1, (3, 3))
    m = geometry.Mapping(family, theta, (120, 160), (50, 70))
    pts_in = RNG.uniform(0, 150, (30, 2))
    out, ok = m.to_output(pts_in)
    ref = cv2.perspectiveTransform(pts_in[None], np.linalg.inv(m.input_px_from_output_px))[0]
    assert ok.all() and np.allclose(out, ref, atol=1e-9)
    back, ok = m.to_input(out)
    assert ok.all() and np.allclose(back, pts_in, atol=1e-9)


def test_projective_point_at_infinity_is_unmapped() -> None:
    theta = np.array([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0]])  # z = x: the line x = 0 goes to infinity
    m = geometry.Mapping("projective", theta, (64, 64), (64, 64))
    x_px = frames.px_from_norm((64, 64))[0, 2]  # output pixel whose normalized x is 0
    out = geometry.map_query(m, geometry.Query(np.array([[x_px, 10.0], [40.0, 10.0]]), frame="output"))
    assert out["points_input_px"][0] is None and out["points_status"][0] == "unmapped"
    assert out["points_input_px"][1] is not None


@pytest.mark.parametrize("seed", range(5))
def test_tps_inverse_round_trip(seed: int) -> None:
    """input -> output (solved) -> input (the TPS itself, exact) returns the point: the solver stops at a
    residual under TPS_TOLERANCE_PX (1e-3 input px), so the round trip is within that."""
    theta = bent_tps(amount=0.08, seed=seed)
    m = geometry.Mapping("tps", theta, (200, 300), (120, 160))
    # points of the upload that the output shows (so an inverse exists): images of output points, plus noise
    src = np.stack([RNG.uniform(-0.4, 159.4, 400), RNG.uniform(-0.4, 119.4, 400)], axis=-1)
    q = m.to_input(src)[0]
    out, ok = m.to_output(q)
    assert ok.all()
    back = m.to_input(out)[0]
    assert np.abs(back - q).max() <= geometry.TPS_TOLERANCE_PX
    # the TPS is injective here (small bend), so the solution is the point it came from
    assert np.abs(out - src).max() < 1e-2


def test_tps_inverse_reports_what_does_not_converge() -> None:
    """A TPS folded onto itself (every control point at the same place, the output collapses) has no inverse
    at most input points: they are reported unmapped, not returned as a wrong answer."""
    theta = np.zeros((16, 2)) + [0.2, -0.1]
    m = geometry.Mapping("tps", theta, (100, 100), (40, 40))
    out = geometry.map_query(m, geometry.Query(np.array([[5.0, 5.0], [90.0, 20.0]])))
    assert out["points_output_px"] == [None, None] and out["points_status"] == ["unmapped", "unmapped"]
    assert geometry.coverage(m) == 1.0  # the collapse reads one inside point: coverage says inside, ...
    off = geometry.Mapping("tps", theta + [3.0, 0.0], (100, 100), (40, 40))
    assert geometry.coverage(off) == 0.0  # ... and 0 when that point is off the image


def test_boxes_corners_and_bbox() -> None:
    theta = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]])  # a quarter turn (square images)
    m = geometry.Mapping("affine", theta, (100, 100), (100, 100))
    out = geometry.map_query(m, geometry.Query(boxes=np.array([[10.0, 20.0, 40.0, 30.0], [-50, -50, -20, -20]])))
    box, off = out["boxes_output_px"]
    corners = np.array(box["corners"])
    ref = m.to_output(np.array([[10.0, 20], [40, 20], [40, 30], [10, 30]]))[0]
    assert np.allclose(corners, ref)
    assert np.allclose(box["bbox"], [*corners.min(0), *corners.max(0)]) and box["status"] == "inside"
    assert off["status"] == "outside"
    partial = geometry.map_query(m, geometry.Query(boxes=np.array([[-20.0, 10, 20, 30]])))["boxes_output_px"][0]
    assert partial["status"] == "partial"


def test_tps_box_bbox_follows_bent_edges() -> None:
    """A TPS bends a box's edges: its bounding box holds every point of the mapped outline, not only the
    corners."""
    theta = bent_tps(amount=0.15, seed=9)
    m = geometry.Mapping("tps", theta, (200, 200), (200, 200))
    [box] = geometry.map_query(m, geometry.Query(boxes=np.array([[20.0, 20.0, 180.0, 180.0]]),
                                                 frame="output"))["boxes_input_px"]
    t = np.linspace(0, 1, 400)[:, None]
    edge = np.concatenate([[20, 20] + t * [160, 0], [180, 20] + t * [0, 160], [20, 180] + t * [160, 0],
                           [20, 20] + t * [0, 160]])
    dense = m.to_input(edge)[0]
    x0, y0, x1, y1 = box["bbox"]
    slack = 0.5  # 16 samples per edge of a smooth curve: the extreme between two samples is within this
    assert x0 <= dense[:, 0].min() + slack and y0 <= dense[:, 1].min() + slack
    assert x1 >= dense[:, 0].max() - slack and y1 >= dense[:, 1].max() - slack
    assert np.allclose(box["corners"], m.to_input(np.array([[20.0, 20], [180, 20], [180, 180], [20, 180]]))[0])


@pytest.mark.parametrize(("points", "boxes", "frame", "needle"), [
    ("[[1, 2]", None, None, "JSON"),
    ("{}", None, None, "list"),
    ("[[1, 2, 3]]", None, None, "points[0]"),
    ("[[1, true]]", None, None, "points[0]"),
    ('[[1, "2"]]', None, None, "points[0]"),
    ("[[NaN, 2]]", None, None, "NaN"),
    ("[[1e400, 2]]", None, None, "finite"),
    ("[[1e7, 2]]", None, None, "finite"),
    ("[[" + "9" * 400 + ", 2]]", None, None, "finite"),
    ("[" * 100_000 + "]" * 100_000, None, None, "nested"),
    (str([[1, 2]] * (geometry.MAX_POINTS + 1)), None, None, f"at most {geometry.MAX_POINTS}"),
    (None, "[[1, 2, 3]]", None, "boxes[0]"),
    (None, "[[10, 0, 5, 5]]", None, "x0 <= x1"),
    ("[[1, 2]]", None, "sideways", "points_frame"),
])
def test_parse_query_rejects_with_a_reason(points: str | None, boxes: str | None, frame: str | None,
                                           needle: str) -> None:
    with pytest.raises(ValueError, match=None) as e:
        geometry.parse_query(points, boxes, frame)
    assert needle.lower() in str(e.value).lower(), str(e.value)


def test_parse_query_reads_points_and_boxes() -> None:
    assert geometry.parse_query(None, None, None) is None
    q = geometry.parse_query("[[1, 2.5], [-3, 4]]", "[[0, 0, 10, 5]]", "output")
    assert q.frame == "output" and q.target == "input"
    assert q.points.tolist() == [[1, 2.5], [-3, 4]] and q.boxes.tolist() == [[0, 0, 10, 5]]
    assert geometry.parse_query("[]", None, None).points.shape == (0, 2)


def test_describe_keeps_the_pipeline_fields() -> None:
    d = geometry.describe("projective", np.eye(3), (30, 40), (30, 40))
    assert set(d) == {"input_px_from_output_px", "output_px_from_input_px", "coverage"}
    assert np.allclose(d["input_px_from_output_px"], np.eye(3)) and d["coverage"] == 1.0
    t = geometry.describe("tps", frames.tps_control_points((3, 3)), (30, 40), (30, 40), (3, 3))
    assert set(t) == {"control_points", "source_points_px", "target_points_px", "coverage"}
    assert np.allclose(t["source_points_px"], t["target_points_px"])


def test_singular_transform_is_described_not_raised() -> None:
    """A collapsed affine theta (every output pixel reads one point) has no inverse: the description says so
    (``output_px_from_input_px`` null, points unmapped, coverage 0 off-image) instead of failing."""
    collapsed = np.array([[0.0, 0.0, 5.0], [0.0, 0.0, 5.0]])
    d = geometry.describe("affine", collapsed, (90, 70), (40, 30), query=geometry.Query(np.array([[3.0, 4.0]])))
    assert d["output_px_from_input_px"] is None and d["coverage"] == 0.0
    assert d["points_output_px"] == [None] and d["points_status"] == ["unmapped"]
