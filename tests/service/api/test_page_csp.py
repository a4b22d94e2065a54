"""The demo page under its own Content-Security-Policy, enforced by Chromium.

Its own module: the other browser tests share one Chromium whose context bypasses the policy (Playwright's
``wait_for_function``, while it polls, evaluates its predicate from a string, which the policy forbids), and
Playwright's sync API runs one browser at a time.
"""

from __future__ import annotations

from pathlib import Path

import httpx
from test_page import skip_without_chromium, write
from test_runtime_pipeline import smooth_image

from tests.service.api.browser import browser_context


def test_page_works_under_its_content_security_policy(server, tmp_path: Path) -> None:  # noqa: ANN001
    """The page's CSP (its own script and styles, blob: images, calls to this server only): the models load, an
    upload is rectified and its result shown, and the browser reports no violation."""
    skip_without_chromium()
    r = httpx.get(server.url + "/")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    with browser_context() as ctx:
        messages: list[str] = []
        page = ctx.new_page()
        page.on("console", lambda m: messages.append(m.text))
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-models=loaded]", timeout=10_000)
        page.set_input_files("#files", [str(write(tmp_path / "csp.png", smooth_image(64, 48, 3, seed=9)))])
        page.wait_for_selector("#results .card[data-state=done]", timeout=20_000)
        assert page.locator("#results .card img.result").evaluate("i => i.naturalWidth") > 0
        assert page.evaluate("getComputedStyle(document.body).margin") != "8px"  # page.css applied
        assert not [m for m in messages if "Content Security Policy" in m], messages
        page.close()
