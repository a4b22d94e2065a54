"""STN_IMAGE_FORMATS over HTTP (the real app in a real uvicorn): TIFF is refused with 415 naming the setting
by default, in a raw body and in a multipart part, and served once the setting lists it."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from tests.service.support import live_server

PROBLEM = "application/problem+json"


def tiff() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(buf, "TIFF")
    return buf.getvalue()


def test_tiff_is_415_by_default(server) -> None:  # noqa: ANN001
    raw = httpx.post(server.url + "/v1/rectify?model=affine", content=tiff(), headers={"content-type": "image/tiff"})
    part = httpx.post(server.url + "/v1/rectify?model=affine", files={"file": ("scan.tif", tiff(), "image/tiff")})
    for r in (raw, part):
        assert r.status_code == 415, r.text
        assert r.headers["content-type"].startswith(PROBLEM)
        assert "STN_IMAGE_FORMATS" in r.json()["detail"] and "TIFF" in r.json()["detail"]
    assert "scan.tif is TIFF" in part.json()["detail"]


def test_tiff_when_listed(model_dir: Path) -> None:
    with live_server(model_dir=model_dir, image_formats="JPEG,PNG,TIFF", warmup=False) as srv:
        r = httpx.post(srv.url + "/v1/rectify?model=affine", content=tiff(), headers={"content-type": "image/tiff"})
        assert r.status_code == 200, r.text
        assert (r.json()["results"][0]["input_width"], r.json()["results"][0]["input_height"]) == (40, 30)
        webp = io.BytesIO()
        Image.new("RGB", (8, 8)).save(webp, "WEBP")
        r = httpx.post(srv.url + "/v1/rectify?model=affine", content=webp.getvalue(),
                       headers={"content-type": "image/webp"})
        assert r.status_code == 415 and "send JPEG, PNG, TIFF (STN_IMAGE_FORMATS)" in r.json()["detail"]
