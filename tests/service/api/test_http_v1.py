"""The real app in a real uvicorn on 127.0.0.1: /v1, ops, errors, batching, limits, auth."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from test_runtime_pipeline import smooth_image, warp_reference

from tests.service.support import live_server

PROBLEM = "application/problem+json"


def encode(a: np.ndarray, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, fmt, **kw)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    a = np.asarray(Image.open(io.BytesIO(data))).astype(np.float32) / 255.0
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def assert_problem(r: httpx.Response, status: int, needle: str = "") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM), r.headers
    body = r.json()
    assert body["status"] == status and body["detail"]
    assert needle.lower() in body["detail"].lower(), body["detail"]
    return body


# ---- ops ---------------------------------------------------------------------------------------

def test_health_ready_models(server) -> None:  # noqa: ANN001
    assert httpx.get(server.url + "/healthz").json() == {"status": "live"}
    assert httpx.get(server.url + "/readyz").json()["ready"] is True
    models = httpx.get(server.url + "/v1/models").json()
    names = {m["name"]: m for m in models["models"]}
    assert set(names) == {"affine", "projective", "tps"} and models["failed"] == []
    for m in names.values():
        assert m["providers"] == ["CPUExecutionProvider"] and m["batching"]["max_batch_size"] >= 1
    assert names["tps"]["transform"] == "tps" and names["projective"]["in_channels"] == 3


# ---- /v1/rectify ---------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["affine", "projective"])
def test_json_result_reproduced_by_opencv(server, model: str) -> None:  # noqa: ANN001
    c = 1 if model == "affine" else 3
    src = smooth_image(97, 131, c, seed=3)
    r = httpx.post(server.url + "/v1/rectify", params={"model": model, "size": "64x48"},
                   files={"file": ("s.png", encode(src), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == model and body["model_version"] == "1"
    [res] = body["results"]
    assert (res["filename"], res["width"], res["height"]) == ("s.png", 64, 48)
    assert np.asarray(res["theta"]).shape == ((2, 3) if model == "affine" else (3, 3))
    got = decode_png(base64.b64decode(res["image"]))
    ref = warp_reference(src, res["input_px_from_output_px"], (48, 64))
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1.5 / 255  # PNG quantization only


def test_tps_returns_control_points(server) -> None:  # noqa: ANN001
    r = httpx.post(server.url + "/v1/rectify?model=tps", content=encode(smooth_image(60, 90, 3)),
                   headers={"content-type": "image/png"})
    [res] = r.json()["results"]
    assert "control_points" in res and "input_px_from_output_px" not in res
    assert (res["width"], res["height"]) == (40, 24)  # the model's own output size


def test_multi_image_multipart_keeps_order(server) -> None:  # noqa: ANN001
    srcs = [smooth_image(50 + 10 * i, 70 + 7 * i, 1, seed=i) for i in range(4)]
    files = [("file", (f"f{i}.png", encode(s), "image/png")) for i, s in enumerate(srcs)]
    r = httpx.post(server.url + "/v1/rectify?model=affine", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["f0.png", "f1.png", "f2.png", "f3.png"]
    for src, res in zip(srcs, results, strict=True):
        assert (res["input_width"], res["input_height"]) == (src.shape[1], src.shape[0])
        ref = warp_reference(src, res["input_px_from_output_px"], (42, 42))
        assert np.abs(decode_png(base64.b64decode(res["image"])) - ref).max() <= 1.5 / 255


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_image_response_with_headers(server, fmt: str) -> None:  # noqa: ANN001
    src = smooth_image(80, 100, 3, seed=5)
    r = httpx.post(server.url + f"/v1/rectify?model=projective&format={fmt}&size=50x40",
                   content=encode(src, "JPEG", quality=95), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == f"image/{fmt}"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == fmt.upper() and img.size == (50, 40)
    m = json.loads(r.headers["x-stn-input-px-from-output-px"])
    assert np.asarray(m).shape == (3, 3) and np.asarray(json.loads(r.headers["x-stn-theta"])).shape == (3, 3)
    assert r.headers["x-stn-model"] == "projective" and r.headers["x-stn-input-size"] == "100x80"


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_quality_of_an_image_response(server, fmt: str) -> None:  # noqa: ANN001
    src = encode(smooth_image(300, 400, 3, seed=7) ^ np.random.default_rng(7).integers(0, 40, (300, 400, 3),
                                                                                          dtype=np.uint8), "PNG")
    url = server.url + f"/v1/rectify?model=affine&format={fmt}&size=300x300"

    def post(query: str = "") -> httpx.Response:
        return httpx.post(url + query, content=src, headers={"content-type": "image/png"})

    low, default, high = post("&quality=5"), post(), post("&quality=100")
    for r in (low, default, high):
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (300, 300), r.text
    assert len(low.content) * 2 < len(default.content) < len(high.content), (len(low.content), len(default.content))
    assert post("&quality=90").content == default.content  # the default is images.DEFAULT_QUALITY
    for bad in ("0", "101", "-5", "9.5", "%D9%A1", ""):  # out of range, not an integer, a non-ASCII digit, empty
        assert_problem(post("&quality=" + bad), 400, "quality must be an integer from 1 to 100")


def test_quality_only_with_a_lossy_format(server) -> None:  # noqa: ANN001
    png = encode(smooth_image(20, 20, 1))
    for query in ("format=png&quality=50", "quality=50", "format=json&quality=50"):
        assert_problem(httpx.post(server.url + "/v1/rectify?" + query, content=png,
                                  headers={"content-type": "image/png"}), 400, "quality applies to format=jpeg or")


def test_a_malformed_multipart_body_says_why_and_logs_nothing(server, caplog) -> None:  # noqa: ANN001
    bodies = [b"garbage\r\n",
              b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\nbad line\r\n\r\nx\r\n--xyz--\r\n']
    with caplog.at_level("INFO"):
        for body in bodies:
            r = httpx.post(server.url + "/v1/rectify", content=body,
                           headers={"content-type": "multipart/form-data; boundary=xyz"})
            detail = assert_problem(r, 400, "the multipart body could not be parsed")["detail"]
            assert re.search(r"Invalid multipart data\. (Expected boundary character|Found invalid character)", detail)
    # before: python-multipart logged a WARNING for each such body, so any client could add lines to the log
    assert not [rec for rec in caplog.records if rec.name.startswith("python_multipart")], caplog.text


def test_default_model_when_absent(server) -> None:  # noqa: ANN001
    r = httpx.post(server.url + "/v1/rectify", content=encode(smooth_image(30, 30, 1)),
                   headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.json()["model"] == httpx.get(server.url + "/v1/models").json()["default"]


def test_exif_frame(server) -> None:  # noqa: ANN001
    """Matrices are in the frame of the image as displayed (EXIF orientation applied)."""
    src = smooth_image(40, 90, 3)
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 CCW on display
    r = httpx.post(server.url + "/v1/rectify?model=projective", content=encode(src, "JPEG", exif=exif.tobytes()),
                   headers={"content-type": "image/jpeg"})
    res = r.json()["results"][0]
    assert (res["input_width"], res["input_height"]) == (40, 90)


# ---- batching ------------------------------------------------------------------------------------

def test_concurrent_requests_are_batched_and_get_their_own_results(model_dir: Path) -> None:
    with live_server(model_dir=model_dir, max_queue_delay_ms=100, max_batch_size=16, workers=4) as srv:
        srcs = [smooth_image(40 + i, 60 + 2 * i, 1, seed=i) for i in range(12)]

        def one(i: int) -> tuple[int, dict]:
            r = httpx.post(srv.url + "/v1/rectify?model=affine", timeout=30,
                           files={"file": (f"{i}.png", encode(srcs[i]), "image/png")})
            return i, r.json()["results"][0]

        with ThreadPoolExecutor(12) as pool:
            out = list(pool.map(one, range(12)))
        for i, res in out:
            assert res["filename"] == f"{i}.png"
            assert (res["input_width"], res["input_height"]) == (60 + 2 * i, 40 + i)
            ref = warp_reference(srcs[i], res["input_px_from_output_px"], (42, 42))
            assert np.abs(decode_png(base64.b64decode(res["image"])) - ref).max() <= 1.5 / 255
        text = httpx.get(srv.url + "/metrics").text
        count = metric(text, "stn_batch_size_count", model="affine")
        total = metric(text, "stn_batch_size_sum", model="affine")
        assert count >= 1 and total == 12 and total / count > 1, (count, total)
        assert metric(text, "stn_batch_size_bucket", model="affine", le="1.0") < count  # some batch > 1
        assert metric(text, "stn_requests_total", route="/v1/rectify", status="200") == 12
        assert metric(text, "stn_queue_time_seconds_count", model="affine") == 12
        assert metric(text, "stn_compute_time_seconds_count", model="affine", stage="localise") == count
        assert "stn_queue_depth" in text and "stn_request_duration_seconds_bucket" in text


@contextlib.contextmanager
def slow_localiser(srv, model: str = "affine") -> Iterator[threading.Event]:  # noqa: ANN001
    """Hold the model's localiser until the yielded event is set (the server runs in this process)."""
    runtime = srv.state.models[model]
    release = threading.Event()
    original = runtime.localise

    def held(batch):  # noqa: ANN001, ANN202
        release.wait(10)
        return original(batch)

    runtime.localise = held
    try:
        yield release
    finally:
        release.set()
        runtime.localise = original


def test_full_queue_gets_503_at_once(model_dir: Path) -> None:
    with live_server(model_dir=model_dir, max_queue_size=1) as srv, slow_localiser(srv) as release:
        body = encode(smooth_image(30, 30, 1))
        first: dict = {}

        def slow() -> None:
            first["r"] = httpx.post(srv.url + "/v1/rectify?model=affine", content=body, timeout=30,
                                    headers={"content-type": "image/png"})

        t = threading.Thread(target=slow)
        t.start()
        deadline = time.monotonic() + 5
        while srv.state.inflight.get("affine", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
        r = httpx.post(srv.url + "/v1/rectify?model=affine", content=body, headers={"content-type": "image/png"})
        assert time.monotonic() - t0 < 1.0
        assert_problem(r, 503, "queue")
        assert r.headers["retry-after"]
        release.set()
        t.join(10)
        assert first["r"].status_code == 200


def test_request_timeout_gets_503(model_dir: Path) -> None:
    with live_server(model_dir=model_dir, request_timeout_s=0.2) as srv, slow_localiser(srv):
        r = httpx.post(srv.url + "/v1/rectify?model=affine", content=encode(smooth_image(30, 30, 1)),
                       headers={"content-type": "image/png"}, timeout=10)
        assert_problem(r, 503, "no result within")
        assert r.headers["retry-after"]


# ---- bad input -----------------------------------------------------------------------------------

def test_bad_inputs(server) -> None:  # noqa: ANN001
    url = server.url + "/v1/rectify"
    png = encode(smooth_image(20, 20, 1))
    assert_problem(httpx.post(url, content=b"garbage", headers={"content-type": "image/png"}), 400, "not a supported")
    assert_problem(httpx.post(url, files={"file": ("x.gif", b"GIF89a" + b"\0" * 40, "image/gif")}), 400)
    assert_problem(httpx.post(url, content=png, headers={"content-type": "text/plain"}), 415, "content type")
    assert_problem(httpx.post(url, content=png), 415)
    assert_problem(httpx.post(url, files={"file": ("a.txt", b"hello", "text/plain")}), 415)
    assert_problem(httpx.post(url, files={"other": ("a.png", png, "image/png")}), 400, "`file`")
    assert_problem(httpx.post(url + "?model=nope", content=png, headers={"content-type": "image/png"}), 404, "nope")
    assert_problem(httpx.post(url + "?size=12by3", content=png, headers={"content-type": "image/png"}), 400, "size")
    assert_problem(httpx.post(url + "?format=gif", content=png, headers={"content-type": "image/png"}), 400)
    two = [("file", ("a.png", png, "image/png")), ("file", ("b.png", png, "image/png"))]
    assert_problem(httpx.post(url + "?format=png", files=two), 400, "one image")
    assert_problem(httpx.get(server.url + "/v1/nothing-here"), 404)


def test_bad_image_in_a_multi_file_request_names_it(server) -> None:  # noqa: ANN001
    png = encode(smooth_image(20, 20, 1))
    files = [("file", ("ok.png", png, "image/png")), ("file", ("broken.png", png[:40], "image/png"))]
    body = assert_problem(httpx.post(server.url + "/v1/rectify", files=files), 400)
    assert "broken.png" in body["detail"]


def test_a_bad_image_does_not_affect_concurrent_requests(server) -> None:  # noqa: ANN001
    good, bad = encode(smooth_image(30, 40, 1)), b"\x89PNG\r\n\x1a\n" + b"\0" * 100

    def post(data: bytes) -> int:
        return httpx.post(server.url + "/v1/rectify?model=affine", content=data, timeout=30,
                          headers={"content-type": "image/png"}).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(post, [good, bad] * 6))
    assert codes == [200, 400] * 6


def test_limits_bytes_pixels_files(model_dir: Path) -> None:
    with live_server(model_dir=model_dir, max_upload_bytes=50_000, max_image_pixels=100_000, max_files=2) as srv:
        url = srv.url + "/v1/rectify?model=affine"
        noisy = (np.random.default_rng(0).random((300, 300)) * 255).astype(np.uint8)
        big = encode(noisy)
        assert len(big) > 50_000
        assert_problem(httpx.post(url, content=big, headers={"content-type": "image/png"}), 413, "bytes")
        assert_problem(httpx.post(url, files={"file": ("big.png", big, "image/png")}), 413, "bytes")
        bomb = encode(np.zeros((2000, 2000), np.uint8))  # 4 Mpx, a few kB
        assert len(bomb) < 50_000
        assert_problem(httpx.post(url, content=bomb, headers={"content-type": "image/png"}), 413, "pixels")
        small = encode(smooth_image(20, 20, 1))
        three = [("file", (f"{i}.png", small, "image/png")) for i in range(3)]
        assert_problem(httpx.post(url, files=three), 413, "files")
        assert httpx.post(url, files=three[:2]).status_code == 200


def test_api_keys(model_dir: Path) -> None:
    with live_server(model_dir=model_dir, api_keys="k1,k2") as srv:
        url = srv.url + "/v1/rectify?model=affine"
        png = encode(smooth_image(20, 20, 1))
        h = {"content-type": "image/png"}
        assert_problem(httpx.post(url, content=png, headers=h), 401, "API key")
        assert_problem(httpx.post(url, content=png, headers={**h, "x-api-key": "wrong"}), 401, "not valid")
        assert httpx.post(url, content=png, headers={**h, "x-api-key": "k2"}).status_code == 200
        assert httpx.post(url, content=png, headers={**h, "authorization": "Bearer k1"}).status_code == 200
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/healthz").status_code == 200  # probes stay open
        assert httpx.get(srv.url + "/readyz").status_code == 200


def test_broken_model_is_reported_and_others_serve(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "good.onnx").write_bytes((model_dir / "affine.onnx").read_bytes())
    (tmp_path / "broken.onnx").write_bytes(b"not onnx at all")
    with live_server(model_dir=tmp_path) as srv:
        ready = httpx.get(srv.url + "/readyz")
        assert ready.status_code == 200 and ready.json()["failed"]["broken"]
        models = httpx.get(srv.url + "/v1/models").json()
        assert [m["name"] for m in models["models"]] == ["good"]
        assert models["failed"][0]["name"] == "broken" and "ONNX" in models["failed"][0]["reason"]
        png = encode(smooth_image(20, 20, 1))
        assert_problem(httpx.post(srv.url + "/v1/rectify?model=broken", content=png,
                                  headers={"content-type": "image/png"}), 503, "failed to load")
        assert httpx.post(srv.url + "/v1/rectify?model=good", content=png,
                          headers={"content-type": "image/png"}).status_code == 200
    with live_server(model_dir=tmp_path, strict_readiness=True) as srv:
        assert_problem(httpx.get(srv.url + "/readyz"), 503, "broken")


def test_no_models_is_not_ready_not_a_crash(tmp_path: Path) -> None:
    with live_server(model_dir=tmp_path / "nothing") as srv:
        assert httpx.get(srv.url + "/healthz").status_code == 200
        assert_problem(httpx.get(srv.url + "/readyz"), 503, "no .onnx model")
        assert_problem(httpx.post(srv.url + "/v1/rectify", content=b"x", headers={"content-type": "image/png"}), 503)


def test_default_bundled_model(default_server) -> None:  # noqa: ANN001
    listing = httpx.get(default_server.url + "/v1/models").json()
    models = listing["models"]
    assert models
    m = next(x for x in models if x["default"])  # what a request naming no model gets
    c = m["in_channels"]
    src = smooth_image(240, 320, c, seed=9)
    r = httpx.post(default_server.url + "/v1/rectify", files={"file": ("d.png", encode(src), "image/png")})
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert [res["height"], res["width"]] == m["output_size"]
    if "input_px_from_output_px" in res:
        ref = warp_reference(src, res["input_px_from_output_px"], (res["height"], res["width"]))
        assert np.abs(decode_png(base64.b64decode(res["image"])) - ref).max() <= 1.5 / 255
    for fmt in ("png", "jpeg"):
        r = httpx.post(default_server.url + f"/v1/rectify?format={fmt}", content=encode(src),
                       headers={"content-type": "image/png"})
        assert r.status_code == 200 and r.headers["content-type"] == f"image/{fmt}"
    srcs = [smooth_image(100 + 20 * i, 150 - 10 * i, c, seed=i) for i in range(3)]
    r = httpx.post(default_server.url + "/v1/rectify?size=96x64",
                   files=[("file", (f"m{i}.jpg", encode(s, "JPEG", quality=95), "image/jpeg")) for i, s in enumerate(srcs)])
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["m0.jpg", "m1.jpg", "m2.jpg"]
    assert all((x["width"], x["height"]) == (96, 64) for x in results)
    assert all(m["sessions"]["sampler"][-1] == "CPUExecutionProvider" for m in models)


def test_openapi_lists_the_api(server) -> None:  # noqa: ANN001
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    for p in ("/v1/rectify", "/v1/models", "/healthz", "/readyz", "/metrics", "/v2/models/{name}/infer"):
        assert p in paths
    assert re.search(r"stn_requests_total", httpx.get(server.url + "/metrics").text)


def test_cors_only_for_listed_origins(model_dir: Path) -> None:
    with live_server(model_dir=model_dir, cors_origins="https://app.example") as srv:
        pre = {"origin": "https://app.example", "access-control-request-method": "POST"}
        r = httpx.options(srv.url + "/v1/rectify", headers=pre)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = httpx.options(srv.url + "/v1/rectify", headers={**pre, "origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers



def test_counters_return_to_zero(server) -> None:  # noqa: ANN001
    """Admission bookkeeping balances after good, bad and v2 requests (no leaked in-flight images)."""
    png = encode(smooth_image(20, 20, 1))
    httpx.post(server.url + "/v1/rectify?model=affine", content=png, headers={"content-type": "image/png"})
    httpx.post(server.url + "/v1/rectify?model=affine", content=b"bad", headers={"content-type": "image/png"})
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}]}
    httpx.post(server.url + "/v2/models/affine/infer", json=body)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (server.state.inflight["affine"] or server.state.preparing["affine"]):
        time.sleep(0.01)
    assert server.state.inflight["affine"] == 0 and server.state.preparing["affine"] == 0


def test_default_marker_serves_the_named_model(model_dir, tmp_path) -> None:  # noqa: ANN001
    import shutil

    folder = tmp_path / "models"
    shutil.copytree(model_dir, folder)
    (folder / "DEFAULT").write_text("tps\n")
    with live_server(model_dir=folder, warmup=False) as s:
        assert httpx.get(s.url + "/v1/models").json()["default"] == "tps"
        r = httpx.post(s.url + "/v1/rectify", content=encode(smooth_image(30, 30, 3)), headers={"content-type": "image/png"})
        assert r.status_code == 200 and r.json()["model"] == "tps"
        # the answer is kept for a second (not read per request), so an edit takes effect within about that
        (folder / "DEFAULT").write_text("projective\n")
        edited = time.monotonic()
        while httpx.get(s.url + "/v1/models").json()["default"] != "projective":
            assert time.monotonic() - edited < 3, "an edited DEFAULT file did not take effect"
            time.sleep(0.05)
        r = httpx.post(s.url + "/v1/rectify", content=encode(smooth_image(30, 30, 3)), headers={"content-type": "image/png"})
        assert r.status_code == 200 and r.json()["model"] == "projective"
