"""Drive the demo page in Debian's Chromium through Playwright (no browser download, ever).

Shared by tests/service/api/test_page.py and by the README's screenshot, which this file makes when run:

    python -m tests.service.api.browser docs/images/page.png

(a real ``stn serve`` app on 127.0.0.1 with the bundled models; the images are the bundled sample
photo ``models/default/sample.jpg`` when it exists, else distorted inputs cut from
``models/default/sheet.png``).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = os.environ.get("STN_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1100, "height": 900}


def chromium_missing() -> str:
    """Why the browser cannot run here ("" when it can)."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        return f"{CHROMIUM} not found (apt-get install chromium; .ci/run installs it)"
    return ""


@contextlib.contextmanager
def browser_context(**options: object) -> Iterator[object]:
    """A Playwright BrowserContext on Debian's Chromium with a fresh user-data dir (removed afterwards)."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="stn-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, viewport=VIEWPORT,
            accept_downloads=True, **options)
        try:
            yield context
        finally:
            context.close()


def open_page(context, url: str, expect_models: str = "loaded", errors: list | None = None):  # noqa: ANN001, ANN201
    """A new tab on the page at ``url``, once its model list has loaded (or failed, ``expect_models="error"``).

    Uncaught JavaScript errors of the page are appended to ``errors`` when given.
    """
    page = context.new_page()
    if errors is not None:
        page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_selector(f"body[data-models={expect_models}]", timeout=10_000)
    return page


def upload(page, files: list[Path], wait: bool = True, timeout_ms: int = 20_000) -> list:  # noqa: ANN001
    """Choose ``files`` in the page's file input; wait until each card is done or failed; return the cards."""
    before = page.locator("#results .card").count()
    page.set_input_files("#files", [str(f) for f in files])
    cards = page.locator("#results .card")
    if wait:
        page.wait_for_function(
            "n => [...document.querySelectorAll('#results .card')].slice(0, n)"
            ".every(c => c.dataset.state === 'done' || c.dataset.state === 'error')",
            arg=len(files), timeout=timeout_ms)
    assert cards.count() == before + len(files)
    return [cards.nth(i) for i in range(len(files))]


def sheet_inputs(out_dir: Path, tiles: tuple[tuple[int, int], ...] = ((0, 3), (2, 6))) -> list[Path]:
    """Distorted Fashion-MNIST inputs (the first tile of a triple) cut from the bundled model's sheet.png."""
    from PIL import Image

    sheet = Image.open(Path(__file__).resolve().parents[3] / "models" / "default" / "sheet.png")
    paths = []
    for r, c in tiles:  # 126-pixel tiles, 6 px apart within a triple, 8 px between triples and rows
        x0, y0 = 8 + (c // 3) * 398 + (c % 3) * 132, 8 + r * 134
        tile = sheet.crop((x0, y0, x0 + 126, y0 + 126))
        path = out_dir / f"fashion-{r}-{c}.png"
        buf = io.BytesIO()
        tile.convert("L").save(buf, "PNG")
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def screenshot(context, url: str, files: list[Path], out: Path) -> None:  # noqa: ANN001
    """Open the page, rectify ``files``, and save the page with the results as a small PNG (256 colours)."""
    from PIL import Image

    page = open_page(context, url)
    cards = upload(page, files)
    for card in cards:
        assert card.get_attribute("data-state") == "done", card.inner_text()
    page.wait_for_function("[...document.images].every(i => i.complete)")
    shot = Image.open(io.BytesIO(page.screenshot(full_page=True)))
    page.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    shot.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


def main(argv: list[str]) -> int:
    from service.api.routes.page import sample_path
    from tests.service.support import live_server

    if len(argv) != 1:
        print(__doc__)
        return 2
    if why := chromium_missing():
        print(f"cannot take the screenshot: {why}")
        return 1
    out = Path(argv[0])
    with tempfile.TemporaryDirectory() as tmp, live_server() as srv:
        files = [sample_path()] if sample_path().is_file() else sheet_inputs(Path(tmp))
        with browser_context() as context:
            screenshot(context, srv.url, files, out)
    print(f"wrote {out} ({out.stat().st_size} bytes) from {', '.join(f.name for f in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
