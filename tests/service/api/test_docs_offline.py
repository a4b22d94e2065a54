"""``/docs`` and ``/redoc`` work offline: every asset comes from this server (``fastapi-offline``'s Swagger UI and
ReDoc files), open without a key; in a real browser with every other host blocked, Swagger UI renders the API."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.service.api.browser import browser_context, chromium_missing
from tests.service.support import live_server

URLS = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|url:\s*'([^']+)'""")


def test_docs_pages_reference_only_this_server(model_dir: Path) -> None:
    with live_server(model_dir=model_dir, api_keys="k1") as srv:
        for page in ("/docs", "/redoc"):
            r = httpx.get(srv.url + page)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), page
            refs = [a or b for a, b in URLS.findall(r.text)]
            assert len(refs) >= 3, (page, refs)
            for ref in refs:  # same-origin paths only: nothing from a CDN, no protocol-relative URL
                assert ref.startswith("/") and not ref.startswith("//"), (page, ref)
                asset = httpx.get(srv.url + ref)  # open: no API key, like the demo page's assets
                assert asset.status_code == 200 and len(asset.content) > 100, (page, ref, asset.status_code)
            assert "cdn" not in r.text.lower() and "https://" not in r.text, page
        assert '"validatorUrl": null' in httpx.get(srv.url + "/docs").text
        assert httpx.get(srv.url + "/v2/repository/index").status_code in (401, 405)  # the API stays closed


@pytest.mark.skipif(bool(chromium_missing()), reason=chromium_missing() or "chromium available")
def test_swagger_ui_renders_offline_in_a_browser(model_dir: Path) -> None:
    with live_server(model_dir=model_dir) as srv:
        ours = urlsplit(srv.url).netloc
        requested, blocked, errors = [], [], []

        def only_this_server(route) -> None:  # noqa: ANN001
            url = route.request.url
            requested.append(url)
            if urlsplit(url).netloc != ours:
                blocked.append(url)
                route.abort()
            else:
                route.continue_()

        with browser_context() as context:
            context.route("**/*", only_this_server)
            page = context.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.url + "/docs")
            page.wait_for_selector(".opblock", timeout=20_000)
            paths = page.locator(".opblock-summary-path").all_inner_texts()
            title = page.locator(".info .title").inner_text()
        assert not blocked and not errors, (blocked, errors)
        assert any(u.endswith("/static-offline-docs/swagger-ui-bundle.js") for u in requested)
        assert title.startswith("stn")
        spec = httpx.get(srv.url + "/openapi.json").json()["paths"]
        flat = [p.replace("\u200b", "") for p in paths]
        for path in ("/v1/rectify", "/v2/repository/index", "/v2/models/{name}/infer"):
            assert path in flat, (path, flat[:10])
        assert len(flat) == sum(len(ops) for ops in spec.values())
