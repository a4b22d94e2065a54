"""The demo page: ``GET /`` and its assets (``service/api/static/``: HTML, CSS, plain JavaScript), and the sample photo.

The page and the photo are open (they hold no secrets); the page calls ``/v1`` with the API key
the user types in (kept in the tab's ``sessionStorage``, sent as ``X-API-Key``).
"""

from __future__ import annotations

import functools
from html import escape
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from service.api.errors import Problem
from service.settings import default_model_dir

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"  # package data (pyproject.toml)
STATIC_PATH = "/static"  # where the page's assets are mounted

router = APIRouter(tags=["page"], include_in_schema=False)

# The page runs only its own script and styles and talks only to this server; its images are blob: URLs of the
# uploads and results. Should anything it shows ever carry markup, the browser runs none of it: the API key the
# user typed (sessionStorage) cannot be sent elsewhere, and no other site may frame the page.
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                               "connect-src 'self'; base-uri 'self'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def sample_path() -> Path:
    """The bundled sample photo: ``sample.jpg`` in the package's default model folder (may not exist)."""
    return default_model_dir() / "sample.jpg"


@functools.cache
def _index_html() -> str:
    """The page's HTML, read once (package data; not read on the event loop for every visit)."""
    return (STATIC_DIR / "index.html").read_text(encoding="utf-8")


@router.get("/")
async def index(request: Request) -> HTMLResponse:
    """The page, its ``<base href>`` set to where the app is served (STN_ROOT_PATH behind a proxy): every URL in
    the page and its script is relative, so it works under any path prefix."""
    root = request.scope.get("root_path", "").rstrip("/")
    return HTMLResponse(_index_html().replace('<base href="/">', f'<base href="{escape(root, quote=True)}/">', 1),
                        headers=PAGE_HEADERS)


@router.api_route("/sample.jpg", methods=["GET", "HEAD"])
async def sample() -> FileResponse:
    """The sample photo, or 404 when none is bundled (the page then hides its "try the sample" button)."""
    path = sample_path()
    if not path.is_file():
        raise Problem(404, f"no sample photo is bundled with this installation ({path} does not exist)")
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "no-cache"})


class _RevalidatedFiles(StaticFiles):
    """Starlette's StaticFiles, with ``Cache-Control: no-cache``: a browser asks again each time (304 while the file
    is the same), where heuristic freshness (a tenth of the file's age) could pair a cached old ``page.js`` with the
    ``/`` of a new release for days."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.setdefault("Cache-Control", "no-cache")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response


def static_files() -> StaticFiles:
    """The page's assets, to mount at :data:`STATIC_PATH`."""
    return _RevalidatedFiles(directory=STATIC_DIR)
