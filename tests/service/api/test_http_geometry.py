"""Geometry over HTTP (the real app in a real uvicorn): points and boxes mapped by ``POST /v1/rectify`` for
affine, projective and TPS models, checked against OpenCV on the returned matrices and against the pixels of
the rectified image; coverage; bad points."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image

from models import frames
from service import geometry
from tests.service.support import live_server

PROBLEM = "application/problem+json"
BENT = (frames.tps_control_points((4, 4)) + np.random.default_rng(7).normal(0, 0.06, (16, 2))).astype(np.float32)


def export_fixed(path: Path, name: str, params: np.ndarray, **cfg: object) -> Path:
    """A model whose theta is ``params`` whatever the image (zero regression weights, bias = params)."""
    import torch

    from export.onnx_export import export_onnx, info_for
    from models.stn import SpatialTransformer, STNConfig

    m = SpatialTransformer(STNConfig(**cfg))
    with torch.no_grad():
        m.localisation.regressor.weight.zero_()
        m.localisation.regressor.bias.copy_(torch.as_tensor(np.asarray(params, np.float32).ravel()))
    export_onnx(m, path, info_for(m, {}, "onnx", name, "1", "tests/service/api/test_http_geometry.py"))
    return path


@pytest.fixture(scope="module")
def fixed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    d = tmp_path_factory.mktemp("fixed-models")
    small = dict(in_channels=1, loc_size=(32, 32), output_size=(40, 30))
    export_fixed(d / "zoom.onnx", "zoom", [0.5, 0, 0, 0, 0.5, 0], transform="affine", **small)  # all inside
    export_fixed(d / "shift.onnx", "shift", [0.5, 0, 1.0, 0, 0.5, 0], transform="affine", **small)  # half off
    export_fixed(d / "bent.onnx", "bent", BENT, transform="tps", **small)
    with live_server(model_dir=d, max_queue_delay_ms=1, workers=2) as s:
        yield s


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def rectify(srv, image: np.ndarray, **params: object) -> httpx.Response:  # noqa: ANN001
    params = {k: json.dumps(v) if isinstance(v, list) else v for k, v in params.items()}
    return httpx.post(srv.url + "/v1/rectify", params=params, content=png(image),
                      headers={"content-type": "image/png"}, timeout=30)


def dot_image(h: int, w: int, centre: tuple[float, float], sigma: float = 2.5) -> np.ndarray:
    """A dark RGB image with one bright Gaussian dot at ``centre`` (x, y) in pixel coordinates."""
    y, x = np.mgrid[0:h, 0:w]
    g = np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * sigma**2))
    return np.repeat((20 + 235 * g).astype(np.uint8)[..., None], 3, axis=2)


def textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    a = cv2.GaussianBlur(np.random.default_rng(seed).random((h, w, 3)).astype(np.float32), (0, 0), 3)
    return ((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)


@pytest.mark.parametrize("model", ["affine", "projective"])
def test_points_and_boxes_agree_with_opencv_on_the_returned_matrix(server, model: str) -> None:  # noqa: ANN001
    pts_in = [[10.0, 12.5], [70.25, 40.0], [120.0, 90.0], [-30.0, 5.0]]
    boxes_in = [[20.0, 15.0, 60.0, 45.0]]
    image = textured(97, 131, seed=3)[..., :1].repeat(3, 2) if model == "affine" else textured(97, 131, seed=3)
    r = rectify(server, image, model=model, size="64x48", points=pts_in, boxes=boxes_in)
    assert r.status_code == 200, r.text
    [res] = r.json()["results"]
    m = np.asarray(res["input_px_from_output_px"])
    ref = cv2.perspectiveTransform(np.asarray(pts_in)[None], np.linalg.inv(m))[0]
    assert res["points_frame"] == "input" and "points_input_px" not in res
    np.testing.assert_allclose(res["points_output_px"], ref, atol=1e-6)
    inside = [(-0.5 <= x <= 63.5 and -0.5 <= y <= 47.5) for x, y in ref]
    assert res["points_status"] == ["inside" if i else "outside" for i in inside]
    [box] = res["boxes_output_px"]
    x0, y0, x1, y1 = boxes_in[0]
    corners = cv2.perspectiveTransform(np.array([[[x0, y0], [x1, y0], [x1, y1], [x0, y1]]]), np.linalg.inv(m))[0]
    np.testing.assert_allclose(box["corners"], corners, atol=1e-6)
    np.testing.assert_allclose(box["bbox"], [*corners.min(0), *corners.max(0)], atol=1e-6)
    assert 0.0 <= res["coverage"] <= 1.0

    # and back: output points -> input points with the matrix itself
    pts_out = [[0.0, 0.0], [63.0, 47.0], [31.5, 20.0]]
    r = rectify(server, image, model=model, size="64x48", points=pts_out, points_frame="output")
    [res] = r.json()["results"]
    ref = cv2.perspectiveTransform(np.asarray(pts_out)[None], np.asarray(res["input_px_from_output_px"]))[0]
    np.testing.assert_allclose(res["points_input_px"], ref, atol=1e-6)


def test_tps_input_to_output_and_back_returns_the_point(fixed_server) -> None:  # noqa: ANN001
    """The server solves the TPS inverse (input -> output); sending its answer back (output -> input, the TPS
    itself) returns the point within geometry.TPS_TOLERANCE_PX (1e-3 px: where the solver stops)."""
    image = textured(150, 200, seed=1)
    q = [[83.4, 61.7], [10.0, 10.0], [190.5, 140.0], [100.0, 75.0]]
    r = rectify(fixed_server, image, model="bent", size="160x120", points=q)
    assert r.status_code == 200, r.text
    [res] = r.json()["results"]
    assert "unmapped" not in res["points_status"] and res["points_status"][0] == "inside", res["points_status"]
    np.testing.assert_allclose(res["control_points"], BENT, atol=1e-6)
    r = rectify(fixed_server, image, model="bent", size="160x120", points=res["points_output_px"],
                points_frame="output")
    [back] = r.json()["results"]
    assert np.abs(np.asarray(back["points_input_px"]) - q).max() <= geometry.TPS_TOLERANCE_PX


@pytest.mark.parametrize(("fixture", "model"), [("fixed_server", "bent"), ("server", "tps"),
                                                ("server", "projective"), ("fixed_server", "zoom")])
def test_bright_dot_is_where_its_point_maps(request, fixture: str, model: str) -> None:  # noqa: ANN001
    """A bright dot drawn in the upload at q shows in the rectified image at the point the server maps q to."""
    srv = request.getfixturevalue(fixture)
    q = (83.4, 61.7)
    r = rectify(srv, dot_image(150, 200, q), model=model, size="160x120", points=[list(q)])
    assert r.status_code == 200, r.text
    [res] = r.json()["results"]
    assert res["points_status"] == ["inside"]
    px, py = res["points_output_px"][0]
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(res["image"])))).astype(np.float64).mean(axis=2)
    weight = np.clip(out - (out.max() + 20) / 2, 0, None)  # the dot's upper half, above the background
    ys, xs = np.mgrid[0 : out.shape[0], 0 : out.shape[1]]
    centroid = ((weight * xs).sum() / weight.sum(), (weight * ys).sum() / weight.sum())
    assert out.max() > 150
    assert np.hypot(centroid[0] - px, centroid[1] - py) < 0.75, (centroid, (px, py))


def test_coverage_inside_and_off_image(fixed_server) -> None:  # noqa: ANN001
    image = textured(60, 80)
    [zoom] = rectify(fixed_server, image, model="zoom").json()["results"]
    [shift] = rectify(fixed_server, image, model="shift").json()["results"]
    assert zoom["coverage"] == 1.0 and shift["coverage"] == 0.5
    # the right half of the shifted output is padding: black in the image
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(shift["image"]))))
    assert out[:, 16:].max() == 0 and out[:, :14].mean() > 20
    r = rectify(fixed_server, image, model="shift", format="png", points=[[79.0, 30.0], [0.0, 0.0]])
    assert r.status_code == 200 and json.loads(r.headers["x-stn-coverage"]) == 0.5
    assert json.loads(r.headers["x-stn-points-status"]) == ["inside", "outside"]


@pytest.mark.parametrize(("params", "needle"), [
    ({"points": "[[1, 2]"}, "points must be JSON"),
    ({"points": "[1, 2]"}, "points[0] must be a list of 2 numbers"),
    ({"points": "[[NaN, 1]]"}, "NaN"),
    ({"points": "[[1e309, 1]]"}, "finite"),
    ({"points": json.dumps([[1, 2]] * (geometry.MAX_POINTS + 1))}, f"at most {geometry.MAX_POINTS}"),
    ({"boxes": "[[5, 5, 1, 1]]"}, "x0 <= x1"),
    ({"points": "[[1, 2]]", "points_frame": "upload"}, "points_frame must be one of input, output"),
])
def test_bad_points_are_400_with_a_reason(server, params: dict, needle: str) -> None:  # noqa: ANN001
    r = httpx.post(server.url + "/v1/rectify", params={"model": "tps", **params}, content=png(textured(30, 30)),
                   headers={"content-type": "image/png"})
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    assert needle in r.json()["detail"], r.json()["detail"]


def test_points_are_documented_in_openapi(server) -> None:  # noqa: ANN001
    op = httpx.get(server.url + "/openapi.json").json()["paths"]["/v1/rectify"]["post"]
    names = {p["name"]: p for p in op["parameters"]}
    assert {"points", "boxes", "points_frame"} <= set(names)
    assert names["points_frame"]["schema"]["enum"] == ["input", "output"]
