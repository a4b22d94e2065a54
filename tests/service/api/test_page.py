"""The demo page (``GET /``): served by the real app, driven in a real browser (Debian's Chromium via Playwright).

Every browser test opens the page from a real uvicorn server on 127.0.0.1, chooses real image
files in the page's file input and reads back what the page shows, against the JSON the page
received (captured from the browser's own network responses) and against ``models.frames``.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from test_http_v1 import encode, slow_localiser
from test_runtime_pipeline import smooth_image

from models import frames
from service.api.routes import page as page_route
from tests.service.api.browser import browser_context, chromium_missing, open_page, screenshot, sheet_inputs, upload
from tests.service.support import DEFAULT_MODELS, live_server

STATIC_BUDGET = 100 * 1024  # the page and its assets, in all


# ---- served by the app (no browser) -----------------------------------------------------------

def test_page_and_assets_are_served_open_and_small(model_dir: Path) -> None:
    with live_server(model_dir=model_dir, api_keys="k1") as srv:
        r = httpx.get(srv.url + "/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assets = ["/static/page.css", "/static/page.js"]
        assert '<base href="/">' in r.text  # every URL of the page is relative to it (STN_ROOT_PATH)
        for a in assets:
            assert f'"{a[1:]}"' in r.text
        total = len(r.content)
        for a in assets:
            ra = httpx.get(srv.url + a)  # open: the page holds no secret, the key guards /v1
            assert ra.status_code == 200, a
            total += len(ra.content)
            # asked again every time, so a new release's page never runs an old cached script (before: no
            # Cache-Control, and browsers kept assets for a tenth of their age); unchanged, the answer is a 304
            assert ra.headers["cache-control"] == "no-cache" and ra.headers["x-content-type-options"] == "nosniff"
            again = httpx.get(srv.url + a, headers={"If-None-Match": ra.headers["etag"]})
            assert again.status_code == 304 and again.headers["cache-control"] == "no-cache"
        on_disk = sum(p.stat().st_size for p in page_route.STATIC_DIR.iterdir())
        assert total == on_disk < STATIC_BUDGET, (total, on_disk)
        assert "cdn" not in r.text.lower() and "http://" not in r.text.replace('"http://www.w3.org/2000/svg"', "")
        # linked from /docs: the OpenAPI description that the docs page renders
        info = httpx.get(srv.url + "/openapi.json").json()["info"]
        assert "[the demo page](./)" in info["description"]  # relative: /docs sits beside it under any prefix
        assert httpx.get(srv.url + "/docs").status_code == 200
        assert httpx.get(srv.url + "/v1/models").status_code == 401  # the API itself stays closed


def test_sample_photo_endpoint(server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    missing = tmp_path / "none" / "sample.jpg"
    monkeypatch.setattr(page_route, "sample_path", lambda: missing)
    r = httpx.get(server.url + "/sample.jpg")
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")
    assert str(missing) in r.json()["detail"]
    assert httpx.head(server.url + "/sample.jpg").status_code == 404
    photo = tmp_path / "sample.jpg"
    photo.write_bytes(encode(smooth_image(48, 64, 3), "JPEG"))
    monkeypatch.setattr(page_route, "sample_path", lambda: photo)
    r = httpx.get(server.url + "/sample.jpg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == photo.read_bytes()
    assert httpx.head(server.url + "/sample.jpg").status_code == 200


# ---- in the browser -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def context() -> Iterator[object]:
    """One Chromium for this module (each test opens its own tab: its own sessionStorage). Playwright's
    ``wait_for_function``, while it polls, evaluates its predicate from a string, which the page's
    Content-Security-Policy forbids, so this context bypasses it; ``test_page_csp.py`` runs the page with it
    enforced."""
    skip_without_chromium()
    with browser_context(bypass_csp=True) as ctx:
        yield ctx


def skip_without_chromium() -> None:
    if why := chromium_missing():
        if os.environ.get("CI"):  # .ci/run installs chromium: never skip there
            pytest.fail(f"the browser tests cannot run: {why}")
        pytest.skip(why)


class Responses:
    """The /v1/rectify responses the page received (from the browser's network events)."""

    def __init__(self, page) -> None:  # noqa: ANN001
        self.items: list = []
        page.on("response", lambda r: self.items.append(r) if "/v1/rectify" in r.url else None)

    def by_filename(self) -> dict[str, dict]:
        out = {}
        for r in self.items:
            if r.status == 200:
                for res in r.json()["results"]:
                    out[res["filename"]] = res
        return out


def write(path: Path, a: np.ndarray, fmt: str = "PNG") -> Path:
    path.write_bytes(encode(a, fmt))
    return path


def corners_of(card) -> np.ndarray:  # noqa: ANN001
    return np.array(json.loads(card.locator("svg.overlay polygon.region").get_attribute("data-corners")))


def expected_corners(res: dict) -> np.ndarray:
    """The output's outer corners mapped through the JSON's ``input_px_from_output_px``."""
    w, h = res["width"], res["height"]
    pts = np.array([[-0.5, -0.5, 1], [w - 0.5, -0.5, 1], [w - 0.5, h - 0.5, 1], [-0.5, h - 0.5, 1]])
    m = np.array(res["input_px_from_output_px"]) @ pts.T
    return (m[:2] / m[2]).T


def check_result_image(page, card, res: dict, size: tuple[int, int], tmp_path: Path) -> None:  # noqa: ANN001
    """The shown and the downloaded result decode at ``size`` (w, h) and are the PNG the JSON carried."""
    w, h = size
    assert (res["width"], res["height"]) == (w, h)
    natural = card.locator("img.result").evaluate("i => [i.naturalWidth, i.naturalHeight]")
    assert natural == [w, h]
    with page.expect_download() as dl:
        card.locator("a.download").click()
    stem = res["filename"].rsplit(".", 1)[0]
    assert dl.value.suggested_filename == f"{stem}-rectified.png"
    target = tmp_path / dl.value.suggested_filename
    dl.value.save_as(target)
    assert Image.open(target).size == (w, h)
    assert target.read_bytes() == base64.b64decode(res["image"])


def test_page_rectifies_and_draws_the_sampled_region(server, context, tmp_path: Path) -> None:  # noqa: ANN001
    js_errors: list[str] = []
    page = open_page(context, server.url, errors=js_errors)
    responses = Responses(page)
    names = page.locator("#model option").evaluate_all("os => os.map(o => o.value)")
    assert names == ["affine", "projective", "tps"]
    files = {
        "affine": [write(tmp_path / "gray.png", smooth_image(50, 70, 1)),
                   write(tmp_path / "rgb.jpg", smooth_image(64, 48, 3, seed=1), "JPEG")],
        "projective": [write(tmp_path / "proj.png", smooth_image(60, 80, 3, seed=2))],
        "tps": [write(tmp_path / "tps.png", smooth_image(40, 56, 3, seed=3))],
    }
    sizes = {"affine": (64, 40), "projective": None, "tps": (33, 21)}
    for model, paths in files.items():
        page.select_option("#model", model)
        assert model in page.text_content("#model-description")
        spec = server.state.models[model].info
        size = sizes[model]
        page.fill("#width", str(size[0]) if size else "")
        page.fill("#height", str(size[1]) if size else "")
        cards = upload(page, paths)
        got = responses.by_filename()
        for path, card in zip(paths, cards, strict=True):  # the newest batch first, in its order
            assert card.get_attribute("data-filename") == path.name
            assert card.get_attribute("data-state") == "done", card.inner_text()
            res = got[path.name]
            want = size or (spec.output_size[1], spec.output_size[0])
            ih, iw = np.asarray(Image.open(path)).shape[:2]
            assert (res["input_width"], res["input_height"]) == (iw, ih)
            if model == "tps":
                rows, cols = spec.tps_grid
                src = np.array(res["source_points_px"])
                assert card.locator("svg.overlay polyline.grid").count() == rows + cols
                want_corners = src[[0, cols - 1, rows * cols - 1, (rows - 1) * cols]]
                # the grid's corner control points are the output's corners, seen through theta
                corner_norm = np.array(res["theta"])[[0, cols - 1, rows * cols - 1, (rows - 1) * cols]]
                px = frames.px_from_norm((ih, iw))
                np.testing.assert_allclose(want_corners, corner_norm @ px[:2, :2].T + px[:2, 2], atol=1e-9)
                tgt = np.array(res["target_points_px"])[[0, cols - 1, rows * cols - 1, (rows - 1) * cols]]
                np.testing.assert_allclose(tgt, [[-0.5, -0.5], [want[0] - 0.5, -0.5], [want[0] - 0.5, want[1] - 0.5],
                                                 [-0.5, want[1] - 0.5]], atol=1e-9)
            else:
                want_corners = expected_corners(res)
                matrix = frames.input_px_from_output_px(np.array(res["theta"]), (ih, iw), (want[1], want[0]))
                np.testing.assert_allclose(res["input_px_from_output_px"], matrix, atol=1e-9)
            np.testing.assert_allclose(corners_of(card), want_corners, atol=1e-9)
            numbers = json.loads(card.locator("pre.matrices").text_content())  # what "copy" copies
            assert numbers["theta"] == res["theta"]
            keys = ("control_points", "source_points_px", "target_points_px") if model == "tps" else \
                ("input_px_from_output_px", "output_px_from_input_px")
            for k in keys:
                assert numbers[k] == res[k]
            check_result_image(page, card, res, want, tmp_path)
    assert len(responses.items) == 4  # one request per image
    card = page.locator("#results .card").first
    card.locator("button.copy").click()
    page.wait_for_function("document.querySelector('#results .card button.copy').textContent === 'copied'")
    assert js_errors == []
    page.close()


def test_page_shows_the_servers_error_sentence(server, context, tmp_path: Path) -> None:  # noqa: ANN001
    js_errors: list[str] = []
    page = open_page(context, server.url, errors=js_errors)
    responses = Responses(page)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a JPEG at all")
    good = write(tmp_path / "fine.png", smooth_image(30, 30, 1))
    page.select_option("#model", "affine")
    bad_card, good_card = upload(page, [bad, good])
    assert bad_card.get_attribute("data-filename") == "broken.jpg"
    assert good_card.get_attribute("data-state") == "done"
    assert bad_card.get_attribute("data-state") == "error"
    failed = [r for r in responses.items if r.status != 200]
    assert len(failed) == 1 and failed[0].status == 400
    detail = failed[0].json()["detail"]
    assert "broken.jpg" in detail
    assert bad_card.locator(".error").text_content() == detail
    assert bad_card.locator(".error").is_visible() and not bad_card.locator(".views").is_visible()
    # a bad output size: the server's sentence again
    page.fill("#width", "0")
    page.fill("#height", "10")
    (card,) = upload(page, [good])
    assert card.get_attribute("data-state") == "error"
    assert card.locator(".error").text_content() == responses.items[-1].json()["detail"]
    assert "WIDTHxHEIGHT" in card.locator(".error").text_content()
    assert js_errors == []
    page.close()


def test_page_with_api_keys(model_dir: Path, context, tmp_path: Path) -> None:  # noqa: ANN001
    image = write(tmp_path / "keyed.png", smooth_image(36, 44, 1))
    with live_server(model_dir=model_dir, api_keys="s3cret,other") as srv:
        need_key = httpx.get(srv.url + "/v1/models").json()["detail"]
        page = open_page(context, srv.url, expect_models="error")
        assert need_key in page.text_content("#notice")  # says why
        assert page.is_visible("#notice") and "needs-key" in page.get_attribute("#key-form", "class")
        (card,) = upload(page, [image])
        assert card.get_attribute("data-state") == "error"
        assert card.locator(".error").text_content() == need_key

        page.fill("#api-key", "wrong")
        page.click("#key-form button[type=submit]")
        page.wait_for_function("document.querySelector('#notice').textContent.includes('not valid')")

        sent = []
        page.on("request", lambda r: sent.append(r.headers.get("x-api-key")) if "/v1/" in r.url else None)
        page.fill("#api-key", "s3cret")
        page.click("#key-form button[type=submit]")
        page.wait_for_selector("body[data-models=loaded]")
        assert not page.is_visible("#notice")
        assert page.evaluate("sessionStorage.getItem('stn.apiKey')") == "s3cret"
        (card,) = upload(page, [image])
        assert card.get_attribute("data-state") == "done", card.inner_text()
        assert sent and set(sent) == {"s3cret"}
        # kept in the tab: a reload still has it; a new tab does not
        page.reload()
        page.wait_for_selector("body[data-models=loaded]")
        assert page.input_value("#api-key") == "s3cret"
        other = open_page(context, srv.url, expect_models="error")
        assert other.input_value("#api-key") == ""
        other.close()
        page.close()


def test_page_retries_a_busy_server_after_retry_after(model_dir: Path, context, tmp_path: Path) -> None:  # noqa: ANN001
    image = write(tmp_path / "busy.png", smooth_image(30, 30, 1))
    with live_server(model_dir=model_dir, max_queue_size=1) as srv, slow_localiser(srv) as release:
        page = open_page(context, srv.url)
        responses = Responses(page)
        page.select_option("#model", "affine")
        first: dict = {}

        def hold_the_queue() -> None:
            first["r"] = httpx.post(srv.url + "/v1/rectify?model=affine", content=encode(smooth_image(30, 30, 1)),
                                    headers={"content-type": "image/png"}, timeout=30)

        t = threading.Thread(target=hold_the_queue)
        t.start()
        deadline = time.monotonic() + 5
        while srv.state.inflight.get("affine", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        (card,) = upload(page, [image], wait=False)
        page.wait_for_selector("#results .card[data-state=retrying]", timeout=10_000)
        assert "queue" in card.locator(".status").text_content()
        busy = responses.items[0]
        assert busy.status == 503 and busy.headers["retry-after"] == "1"
        release.set()
        page.wait_for_selector("#results .card[data-state=done]", timeout=10_000)
        t.join(10)
        assert first["r"].status_code == 200
        assert [r.status for r in responses.items][-1] == 200
        page.close()


def test_page_sample_button_and_drop(server, context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(page_route, "sample_path", lambda: tmp_path / "missing.jpg")
    page = open_page(context, server.url)
    page.wait_for_load_state("networkidle")
    assert not page.is_visible("#sample")
    photo = write(tmp_path / "sample.jpg", smooth_image(64, 48, 3, seed=7), "JPEG")
    monkeypatch.setattr(page_route, "sample_path", lambda: photo)
    page.reload()
    page.wait_for_selector("#sample", state="visible")
    page.click("#sample")
    page.wait_for_selector("#results .card[data-filename='sample.jpg'][data-state=done]")
    assert page.locator("#results .card img.result").evaluate("i => i.naturalWidth") > 0
    # drag and drop: a real DataTransfer with a file, dropped on the page
    page.evaluate("""([name, b64]) => {
        const dt = new DataTransfer();
        dt.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name, { type: 'image/png' }));
        document.querySelector('#drop').dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
    }""", ["dropped.png", base64.b64encode(encode(smooth_image(20, 24, 1))).decode()])
    page.wait_for_selector("#results .card[data-filename='dropped.png'][data-state=done]")
    page.close()


@contextlib.contextmanager
def prefix_proxy(target_port: int, prefix: str) -> Iterator[str]:
    """A reverse proxy on 127.0.0.1 that serves ``target_port`` under ``prefix`` and strips it, as an ingress
    does (its URL, with the prefix)."""
    import http.client
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def forward(self) -> None:
            if not self.path.startswith(prefix + "/"):
                self.send_error(404)
                return
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            conn = http.client.HTTPConnection("127.0.0.1", target_port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            conn.request(self.command, self.path[len(prefix):], body=body or None, headers=headers)
            r = conn.getresponse()
            data = r.read()
            self.send_response(r.status)
            for k, v in r.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_POST = do_HEAD = forward  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{proxy.server_address[1]}{prefix}"
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_page_and_docs_work_under_a_path_prefix(model_dir: Path, context, tmp_path: Path) -> None:  # noqa: ANN001
    """Behind a proxy that serves the service under /stn and strips it (STN_ROOT_PATH=/stn), the page loads its
    assets and models and rectifies an upload, and the API docs load theirs (before, every URL of the page was
    absolute: under a prefix it lost its script and styles)."""
    with live_server(model_dir=model_dir, root_path="/stn") as srv, prefix_proxy(srv.port, "/stn") as url:
        errors: list[str] = []
        page = open_page(context, url, errors=errors)
        assert page.locator("#model option").count() >= 3
        assert page.evaluate("getComputedStyle(document.body).margin") != "8px"  # page.css applied
        cards = upload(page, [write(tmp_path / "up.png", smooth_image(64, 48, 3, seed=5))])
        assert cards[0].get_attribute("data-state") == "done", cards[0].inner_text()
        assert not errors, errors
        page.goto(url + "/docs")
        page.wait_for_selector(".swagger-ui .info", timeout=10_000)  # its assets and /stn/openapi.json loaded
        page.close()


def test_screenshot(context, tmp_path: Path) -> None:  # noqa: ANN001
    """The README's screenshot, made by the same code (tests/service/api/browser.py) on the bundled model."""
    if not DEFAULT_MODELS:
        pytest.skip("models/default/*.onnx is not bundled yet")
    with live_server() as srv:
        out = tmp_path / "page.png"
        screenshot(context, srv.url, sheet_inputs(tmp_path), out)
    shot = Image.open(io.BytesIO(out.read_bytes()))
    assert shot.width == 1100 and shot.height > 600


def test_page_region_lines_up_with_an_exif_rotated_photo(server, context, tmp_path: Path) -> None:  # noqa: ANN001
    """A phone photo stored sideways (EXIF orientation 6): the browser and the server show it the same way up."""
    a = smooth_image(40, 64, 3, seed=5)  # stored 64 wide, 40 high; shown 40 wide, 64 high
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", exif=exif)
    path = tmp_path / "phone.jpg"
    path.write_bytes(buf.getvalue())
    page = open_page(context, server.url)
    responses = Responses(page)
    page.select_option("#model", "projective")
    (card,) = upload(page, [path])
    res = responses.by_filename()["phone.jpg"]
    assert (res["input_width"], res["input_height"]) == (40, 64)
    shown = card.locator("img.upload").evaluate("i => [i.naturalWidth, i.naturalHeight]")
    assert shown == [40, 64]
    assert "read differently" not in card.locator(".input-caption").text_content()
    np.testing.assert_allclose(corners_of(card), expected_corners(res), atol=1e-9)
    page.close()


def test_page_downscales_a_photo_over_the_servers_limits(model_dir: Path, context, tmp_path: Path) -> None:  # noqa: ANN001
    """Over the pixel or byte limit, the page sends the photo downscaled (upright, as JPEG) instead of getting a 413;
    under both, the file goes as it is. Before, the card showed the 413 (phone cameras write 48 MP and more)."""
    rng = np.random.default_rng(6)
    big = write(tmp_path / "big.png", smooth_image(900, 1200, 3, seed=4))            # 1.08 MP: over 0.6 MP
    noisy = write(tmp_path / "noisy.png", rng.integers(0, 255, (400, 500, 3), dtype=np.uint8))  # 600 KB: over 400 KB
    exif = Image.Exif()
    exif[0x0112] = 6                                                                     # stored sideways
    buf = io.BytesIO()
    Image.fromarray(smooth_image(900, 1200, 3, seed=5)).save(buf, "JPEG", exif=exif, quality=80)
    phone = tmp_path / "phone.jpg"
    phone.write_bytes(buf.getvalue())
    small = write(tmp_path / "small.jpg", smooth_image(300, 400, 3, seed=7), "JPEG")    # within both: sent as it is
    assert noisy.stat().st_size > 400_000 and small.stat().st_size < 400_000
    with live_server(model_dir=model_dir, max_image_pixels=600_000, max_upload_bytes=400_000, warmup=False) as srv:
        js_errors: list[str] = []
        page = open_page(context, srv.url, errors=js_errors)
        responses = Responses(page)
        page.select_option("#model", "projective")
        cards = upload(page, [big, noisy, phone, small])
        got = responses.by_filename()
        for path, card, shown in zip([big, noisy, phone, small], cards, [(1200, 900), (500, 400), (900, 1200), None],
                                     strict=True):
            assert card.get_attribute("data-state") == "done", card.inner_text()
            res = got[path.name]
            w, h = res["input_width"], res["input_height"]
            caption = card.locator(".input-caption").text_content()
            if shown is None:
                assert (w, h) == (400, 300) and card.get_attribute("data-downscaled") is None
                assert "downscaled" not in caption
                continue
            assert w * h <= 600_000 and abs(w / h - shown[0] / shown[1]) < 0.01, (path.name, w, h)
            assert card.get_attribute("data-downscaled") == f"{shown[0]}x{shown[1]}"
            assert f"downscaled here from {shown[0]}×{shown[1]}" in caption and "600,000 pixels" in caption
            assert card.locator("img.upload").evaluate("i => [i.naturalWidth, i.naturalHeight]") == [w, h]
            assert "read differently" not in caption
            np.testing.assert_allclose(corners_of(card), expected_corners(res), atol=1e-9)
        assert got["big.png"]["input_width"] * got["big.png"]["input_height"] > 0.9 * 600_000  # no smaller than needed
        assert [r.status for r in responses.items] == [200] * 4 and js_errors == []
        page.close()
