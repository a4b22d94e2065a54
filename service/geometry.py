"""A result's geometry in pixels, for every transform family: the transform itself (pixel matrices, or the
TPS's control points), ``coverage``, and points and boxes mapped between the upload and the rectified image.

Conventions are ``models.frames``' (pixel centres at integers, theta maps output to input). The *extent* of
an image of (H, W) pixels is ``[-0.5, W - 0.5] x [-0.5, H - 0.5]`` in its pixel coordinates (the outer edges
of its pixel grid); a point is *inside* an image when it lies in that extent.

- ``input`` -> ``output`` (a point of the upload, where is it in the rectified image?): affine and projective
  through ``output_px_from_input_px``; TPS has no closed-form inverse, so each point is solved for:
  Levenberg-Marquardt on the TPS (output -> input, exact) from the nearest point of a dense lookup grid.
- ``output`` -> ``input``: ``input_px_from_output_px`` (affine, projective), the TPS itself.
- A box ``[x0, y0, x1, y1]`` maps as its four corners (TL, TR, BR, BL) and the axis-aligned bounding box of
  the mapped shape (for TPS, whose edges bend, of :data:`BOX_EDGE_SAMPLES` points along each edge).
- ``coverage``: the fraction of output pixels whose sample point lies inside the upload (1 when the output
  shows only the upload; near 0 for a collapsed or off-image transform). Exact for affine and projective
  (counted row by row in closed form, O(h)); for TPS, the fraction of an evenly spread subset of at most
  :data:`TPS_COVERAGE_SAMPLES` x :data:`TPS_COVERAGE_SAMPLES` output pixels (every pixel when the output is
  no larger).

Public API: :func:`describe` (what ``POST /v1/rectify`` and ``results.jsonl`` add to each result),
:func:`parse_query` (the request's ``points``, ``boxes``, ``points_frame`` -> :class:`Query`),
:class:`Mapping` (one transform, both directions), :func:`coverage`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models import frames

Size = tuple[int, int]  # (height, width)

MAX_POINTS = 1024  # points per request
MAX_BOXES = 256  # boxes per request
MAX_COORDINATE = 1e6  # |x|, |y| of a requested point or box, in pixels
POINT_FRAMES = ("input", "output")  # the frame the request's points and boxes are given in
TPS_TOLERANCE_PX = 1e-3  # an inverted TPS point converged when it maps back within this many input pixels
TPS_MAX_ITERATIONS = 50
TPS_LOOKUP = 25  # the inverse's starting points: a TPS_LOOKUP^2 grid over [-1.5, 1.5]^2 of the output
TPS_COVERAGE_SAMPLES = 32
BOX_EDGE_SAMPLES = 16  # points per box edge whose images bound a TPS-mapped box


# ---- the request -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Query:
    """Points [P, 2] and boxes [B, 4] (x0, y0, x1, y1) in pixels of ``frame`` (``input``: the upload as the
    user sees it, after EXIF orientation; ``output``: the rectified image), to map into the other frame."""

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    frame: str = "input"

    @property
    def target(self) -> str:
        return "output" if self.frame == "input" else "input"


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _parse_list(text: str, what: str, width: int, limit: int, example: str) -> np.ndarray:
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        reason = "it is nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ValueError(f"{what} must be JSON like {example}; {reason}") from None
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a JSON list like {example}; got {type(value).__name__}")
    if len(value) > limit:
        raise ValueError(f"{len(value)} {what}; at most {limit} per request")
    out = np.zeros((len(value), width))
    for i, item in enumerate(value):
        if (not isinstance(item, list) or len(item) != width
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in item)):
            raise ValueError(f"{what}[{i}] must be a list of {width} numbers, like {example}; got {item!r:.80}")
        try:
            row = [float(v) for v in item]
        except OverflowError:  # an integer too large for a float
            row = [math.inf]
        if not all(math.isfinite(v) and abs(v) <= MAX_COORDINATE for v in row):
            raise ValueError(f"{what}[{i}] must hold finite numbers within ±{MAX_COORDINATE:g} pixels; got {item!r:.80}")
        out[i] = row
    return out


def parse_query(points: str | None, boxes: str | None, frame: str | None) -> Query | None:
    """The request's ``points`` (JSON ``[[x, y], ...]``), ``boxes`` (JSON ``[[x0, y0, x1, y1], ...]``, x0 <= x1,
    y0 <= y1) and ``points_frame`` (``input``, the default, or ``output``); None when neither is sent.
    ValueError saying what is wrong (the server answers 400 with it)."""
    frame = frame or "input"
    if frame not in POINT_FRAMES:
        raise ValueError(f"points_frame must be one of {', '.join(POINT_FRAMES)}; got {frame!r}")
    if not points and not boxes:
        return None
    p = _parse_list(points, "points", 2, MAX_POINTS, "[[12.5, 40], [300, 220]]") if points else np.zeros((0, 2))
    b = _parse_list(boxes, "boxes", 4, MAX_BOXES, "[[10, 20, 110, 70]]") if boxes else np.zeros((0, 4))
    bad = np.flatnonzero((b[:, 0] > b[:, 2]) | (b[:, 1] > b[:, 3]))
    if len(bad):
        raise ValueError(f"boxes[{bad[0]}] must be [x0, y0, x1, y1] with x0 <= x1 and y0 <= y1; got {b[bad[0]].tolist()}")
    return Query(p, b, frame)


# ---- one transform, both directions ------------------------------------------------------------
class Mapping:
    """One result's transform between output pixels and input pixels, both directions, any family.

    :meth:`to_input` and :meth:`to_output` take points [P, 2] in pixels and return the mapped points [P, 2]
    and a bool mask [P] of the points that map at all (projective: not at infinity; TPS inverse: converged).
    """

    def __init__(self, transform: str, theta: np.ndarray, input_size: Size, output_size: Size,
                 tps_grid: Size = (4, 4)) -> None:
        self.transform, self.input_size, self.output_size = transform, tuple(input_size), tuple(output_size)
        self.theta = np.asarray(theta, np.float64)
        self.tps_grid = (int(tps_grid[0]), int(tps_grid[1]))
        if transform == "tps":
            self.input_px_from_output_px = self.output_px_from_input_px = None
        else:
            self.input_px_from_output_px = frames.input_px_from_output_px(self.theta, input_size, output_size)
            try:
                self.output_px_from_input_px = frames.inverse_px(self.input_px_from_output_px)
            except np.linalg.LinAlgError:  # singular: the output collapsed onto a line or a point of the input
                self.output_px_from_input_px = None
        self._lookup: tuple[np.ndarray, np.ndarray] | None = None

    # TPS in normalized coordinates: f(output point) = tps_weights(p) @ theta
    def _tps(self, p_norm: np.ndarray) -> np.ndarray:
        return frames.tps_warp(p_norm, self.theta, self.tps_grid)

    def to_input(self, points_out_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pts = np.asarray(points_out_px, np.float64).reshape(-1, 2)
        if self.transform != "tps":
            return _apply(self.input_px_from_output_px, pts)
        n = _apply(frames.norm_from_px(self.output_size), pts)[0]
        return _apply(frames.px_from_norm(self.input_size), self._tps(n))[0], np.ones(len(pts), bool)

    def to_output(self, points_in_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pts = np.asarray(points_in_px, np.float64).reshape(-1, 2)
        if self.transform == "tps":
            return self._tps_inverse(pts)
        if self.output_px_from_input_px is None:
            return np.full_like(pts, np.nan), np.zeros(len(pts), bool)
        return _apply(self.output_px_from_input_px, pts)

    def _tps_inverse(self, q_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Output points p with TPS(p) = q, by Levenberg-Marquardt (the TPS and its Jacobian are exact) from the
        lookup grid's point nearest q; residuals measured in input pixels."""
        if not len(q_px):
            return np.zeros((0, 2)), np.zeros(0, bool)
        h, w = self.input_size
        scale = np.array([w / 2.0, h / 2.0])  # normalized -> pixel lengths in the input
        q = _apply(frames.norm_from_px(self.input_size), q_px)[0]
        if self._lookup is None:
            t = np.linspace(-1.5, 1.5, TPS_LOOKUP)
            gy, gx = np.meshgrid(t, t, indexing="ij")
            grid = np.stack([gx.ravel(), gy.ravel()], axis=-1)
            self._lookup = (grid, self._tps(grid) * scale)
        grid, mapped = self._lookup
        qs = q * scale
        nearest = np.empty(len(q), np.int64)
        for i in range(0, len(q), 1024):  # [1024, TPS_LOOKUP^2] distances at a time
            dx = qs[i : i + 1024, 0:1] - mapped[None, :, 0]
            dy = qs[i : i + 1024, 1:2] - mapped[None, :, 1]
            nearest[i : i + 1024] = (dx * dx + dy * dy).argmin(axis=1)
        p = grid[nearest]
        r = (self._tps(p) - q) * scale
        cost = (r**2).sum(-1)
        lam = np.full(len(q), 1e-3)
        for _ in range(TPS_MAX_ITERATIONS):
            active = (cost > (TPS_TOLERANCE_PX * 1e-3) ** 2) & (lam < 1e10)  # not there, and not stuck
            if not active.any():
                break
            idx = np.flatnonzero(active)
            # d residual_px / d p_norm: [P, 2 (residual), 2 (p)]
            jac = frames.tps_jacobian(p[idx], self.theta, self.tps_grid) * scale[None, :, None]
            jtj = np.einsum("pci,pcj->pij", jac, jac)
            jtr = np.einsum("pci,pc->pi", jac, r[idx])
            damp = lam[idx, None, None] * (np.trace(jtj, axis1=1, axis2=2)[:, None, None] / 2 + 1e-12) * np.eye(2)
            a = jtj + damp
            det = a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]
            det = np.where(np.abs(det) > 1e-300, det, 1e-300)
            step = np.stack([a[:, 1, 1] * jtr[:, 0] - a[:, 0, 1] * jtr[:, 1],
                             a[:, 0, 0] * jtr[:, 1] - a[:, 1, 0] * jtr[:, 0]], axis=-1) / det[:, None]
            candidate = p[idx] - step
            r_new = (self._tps(candidate) - q[idx]) * scale
            cost_new = (r_new**2).sum(-1)
            better = np.isfinite(cost_new) & (cost_new < cost[idx])
            good = idx[better]
            p[good], r[good], cost[good] = candidate[better], r_new[better], cost_new[better]
            lam[good] = np.maximum(lam[good] / 10.0, 1e-12)
            lam[idx[~better]] *= 10.0
        ok = np.sqrt(cost) <= TPS_TOLERANCE_PX
        return _apply(frames.px_from_norm(self.output_size), p)[0], ok

    def forward(self, frame: str) -> Any:
        """The map from ``frame``'s pixels into the other frame's."""
        return self.to_output if frame == "input" else self.to_input


def _apply(matrix: np.ndarray, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 homogeneous matrix on points [P, 2] -> (points, mask of those not at infinity)."""
    h = pts @ matrix[:2, :2].T + matrix[:2, 2]
    z = pts @ matrix[2, :2] + matrix[2, 2]
    ok = np.abs(z) > 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        out = h / np.where(ok, z, np.nan)[:, None]
    return out, ok


def _inside(pts: np.ndarray, size: Size) -> np.ndarray:
    h, w = size
    with np.errstate(invalid="ignore"):
        return (pts[:, 0] >= -0.5) & (pts[:, 0] <= w - 0.5) & (pts[:, 1] >= -0.5) & (pts[:, 1] <= h - 0.5)


# ---- coverage ----------------------------------------------------------------------------------
def _coverage_homogeneous(input_px_from_output_px: np.ndarray, input_size: Size, output_size: Size) -> float:
    """Exact count of output pixel centres whose sample point lies in the input's extent, row by row.

    Along a row y, X, Y and the homogeneous Z of the sample point are linear in x; "inside" is
    ``L_i(x) / Z(x) >= 0`` for the four edges' linear functions L_i. It is constant between the roots of
    the L_i and Z (at most 5 per row), so each row is cut there and each piece's integers counted at once.
    """
    (h_in, w_in), (h, w) = input_size, output_size
    m = input_px_from_output_px
    # the common case at once: Z of one sign over the output (so the pixel centres' samples fill the convex
    # quadrilateral of the corner pixels' samples), and those four inside the input: every pixel is
    corners = np.array([[0.0, 0.0, 1.0], [w - 1.0, 0.0, 1.0], [w - 1.0, h - 1.0, 1.0], [0.0, h - 1.0, 1.0]]) @ m.T
    z = corners[:, 2]
    if np.all(z > 1e-12) or np.all(z < -1e-12):
        x, y = corners[:, 0] / z, corners[:, 1] / z
        if x.min() >= -0.5 and x.max() <= w_in - 0.5 and y.min() >= -0.5 and y.max() <= h_in - 0.5:
            return 1.0
    y = np.arange(h, dtype=np.float64)[:, None]
    lo_x, hi_x, lo_y, hi_y = -0.5, w_in - 0.5, -0.5, h_in - 0.5
    # each linear function as (slope a, offset b(y)): value = a x + b
    ax, bx = m[0, 0], m[0, 1] * y + m[0, 2]
    ay, by = m[1, 0], m[1, 1] * y + m[1, 2]
    az, bz = m[2, 0], m[2, 1] * y + m[2, 2]
    slopes = np.array([ax - lo_x * az, hi_x * az - ax, ay - lo_y * az, hi_y * az - ay, az])
    offsets = np.concatenate([bx - lo_x * bz, hi_x * bz - bx, by - lo_y * bz, hi_y * bz - by, bz], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        roots = np.where(slopes != 0, -offsets / np.where(slopes != 0, slopes, 1.0), -1.0)
    cuts = np.sort(np.clip(roots, -0.5, w - 0.5), axis=1)
    bounds = np.concatenate([np.full((h, 1), -0.5), cuts, np.full((h, 1), w - 0.5)], axis=1)  # [h, 7]
    mid = (bounds[:, :-1] + bounds[:, 1:]) / 2  # [h, 6]
    z = slopes[4] * mid + offsets[:, 4:5]
    inside = np.abs(z) > 1e-12
    for i in range(4):  # 2-D steps: numpy reduces a [h, 4, 6] array along its middle axis far more slowly
        inside &= (slopes[i] * mid + offsets[:, i : i + 1]) * z >= 0
    counts = np.floor(bounds[:, 1:]) - np.floor(bounds[:, :-1])  # integers n with lo < n <= hi
    return float((counts * inside).sum() / (h * w))


def coverage(mapping: Mapping) -> float:
    """The fraction of output pixels whose sample point lies inside the upload (see the module docstring)."""
    if mapping.transform != "tps":
        return _coverage_homogeneous(mapping.input_px_from_output_px, mapping.input_size, mapping.output_size)
    h, w = mapping.output_size
    # the pixel at the middle of each of n equal bands (the midpoint rule: no weight piled on the border rows)
    ys = np.unique(np.floor((np.arange(min(h, TPS_COVERAGE_SAMPLES)) + 0.5) * h / min(h, TPS_COVERAGE_SAMPLES)))
    xs = np.unique(np.floor((np.arange(min(w, TPS_COVERAGE_SAMPLES)) + 0.5) * w / min(w, TPS_COVERAGE_SAMPLES)))
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    pts, ok = mapping.to_input(np.stack([gx.ravel(), gy.ravel()], axis=-1))
    return float((ok & _inside(pts, mapping.input_size)).mean())


# ---- what a result reports ---------------------------------------------------------------------
def _rows(m: np.ndarray) -> list[list[float]]:
    return [[float(v) for v in row] for row in np.asarray(m)]


def _points_json(pts: np.ndarray, ok: np.ndarray) -> list[list[float] | None]:
    return [[float(x), float(y)] if good else None for (x, y), good in zip(pts, ok, strict=True)]


def _status(ok: np.ndarray, inside: np.ndarray) -> list[str]:
    return ["unmapped" if not good else "inside" if ins else "outside" for good, ins in zip(ok, inside, strict=True)]


def map_query(mapping: Mapping, query: Query) -> dict[str, Any]:
    """``points_<target>_px`` ([x, y], null where a point does not map), ``points_status`` (``inside`` /
    ``outside`` the target image, or ``unmapped``: at infinity for projective, not converged for the TPS
    inverse), and ``boxes_<target>_px`` (``corners`` TL, TR, BR, BL, ``bbox`` [x0, y0, x1, y1] of the mapped
    shape, ``status``: ``inside``, ``partial``, ``outside`` or ``unmapped``)."""
    to_frame = query.target
    size = mapping.output_size if to_frame == "output" else mapping.input_size
    h, w = size
    forward = mapping.forward(query.frame)
    out: dict[str, Any] = {"points_frame": query.frame}
    pts, ok = forward(query.points)
    out[f"points_{to_frame}_px"] = _points_json(pts, ok)
    out["points_status"] = _status(ok, ok & _inside(pts, size))
    boxes = []
    if len(query.boxes):
        n = BOX_EDGE_SAMPLES if mapping.transform == "tps" else 1
        t = np.arange(n) / n
        x0, y0, x1, y1 = (query.boxes[:, i : i + 1] for i in range(4))
        # the outline TL -> TR -> BR -> BL -> TL, n points per edge starting at each corner: [B, 4n, 2]
        xs = np.concatenate([x0 + (x1 - x0) * t, x1 + 0 * t, x1 + (x0 - x1) * t, x0 + 0 * t], axis=1)
        ys = np.concatenate([y0 + 0 * t, y0 + (y1 - y0) * t, y1 + 0 * t, y1 + (y0 - y1) * t], axis=1)
        outline, ok = forward(np.stack([xs, ys], axis=-1).reshape(-1, 2))
        outline, ok = outline.reshape(len(query.boxes), 4 * n, 2), ok.reshape(len(query.boxes), 4 * n)
        for shape, good in zip(outline, ok, strict=True):
            corners = shape[::n]
            if not good.all():
                boxes.append({"corners": _points_json(corners, good[::n]), "bbox": None, "status": "unmapped"})
                continue
            bx0, by0 = shape.min(axis=0)
            bx1, by1 = shape.max(axis=0)
            if _inside(shape, size).all():
                status = "inside"
            elif bx1 < -0.5 or by1 < -0.5 or bx0 > w - 0.5 or by0 > h - 0.5:
                status = "outside"
            else:
                status = "partial"
            boxes.append({"corners": _rows(corners), "bbox": [float(bx0), float(by0), float(bx1), float(by1)],
                          "status": status})
    out[f"boxes_{to_frame}_px"] = boxes
    return out


def describe(transform: str, theta: np.ndarray, input_size: Size, output_size: Size, tps_grid: Size = (4, 4),
             query: Query | None = None) -> dict[str, Any]:
    """A result's geometry, in the uploaded image's frame: what ``POST /v1/rectify`` (and a batch job's
    ``results.jsonl``) reports besides sizes, theta and the image.

    Affine/projective: ``input_px_from_output_px`` and ``output_px_from_input_px`` (3x3, see
    ``models.frames``; the latter None when the transform is singular, a collapsed output). TPS: ``control_points`` is theta (normalized source points, [K, 2]);
    ``source_points_px`` are the same points in input pixels, ``target_points_px`` where they
    land in the rectified image (the regular grid of ``models.frames.tps_control_points``).
    Every family: ``coverage``, and with a :class:`Query` its points and boxes (:func:`map_query`).
    """
    mapping = Mapping(transform, theta, input_size, output_size, tps_grid)
    if transform == "tps":
        tgt_px = _apply(frames.px_from_norm(output_size), frames.tps_control_points(tps_grid))[0]
        out: dict[str, Any] = {
            "control_points": _rows(mapping.theta),
            "source_points_px": _rows(_apply(frames.px_from_norm(input_size), mapping.theta)[0]),
            "target_points_px": _rows(tgt_px),
        }
    else:
        inverse = mapping.output_px_from_input_px
        out = {"input_px_from_output_px": _rows(mapping.input_px_from_output_px),
               "output_px_from_input_px": None if inverse is None else _rows(inverse)}
    out["coverage"] = coverage(mapping)
    if query is not None:
        out.update(map_query(mapping, query))
    return out
