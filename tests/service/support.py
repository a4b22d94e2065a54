"""Helpers for the service tests (imported as ``tests.service.support``): small models exported with
the real exporter (torch is available in tests; the service itself never imports it), and the real
app in a real uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODELS = sorted((ROOT / "models" / "default").glob("*.onnx"))

# name -> (STNConfig kwargs); small and quick to export, weights perturbed away from identity
MODEL_SPECS = {
    "affine": dict(transform="affine", in_channels=1, loc_size=(42, 42), output_size=(42, 42)),
    "projective": dict(transform="projective", in_channels=3, loc_size=(32, 32), output_size=(30, 36),
                       mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "tps": dict(transform="tps", in_channels=3, loc_size=(32, 32), output_size=(24, 40),
                mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3)),
}


def export_model(path: Path, name: str, seed: int = 0, version: str = "1", **cfg: object) -> Path:
    import torch

    from export.onnx_export import export_onnx, info_for
    from models.stn import SpatialTransformer, STNConfig

    torch.manual_seed(seed)
    m = SpatialTransformer(STNConfig(**cfg))
    torch.nn.init.normal_(m.localisation.regressor.weight, std=0.02)
    export_onnx(m, path, info_for(m, {}, "onnx", name, version, "tests/service/support.py"))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """The real app in a real uvicorn on 127.0.0.1, in a background thread."""

    def __init__(self, app, port: int, **overrides: object) -> None:  # noqa: ANN001
        import uvicorn

        from service.api.server import uvicorn_config

        self.app = app
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn_config(app, app.state.stn.settings, host="127.0.0.1", port=port, log_level="warning",
                                access_log=False, timeout_graceful_shutdown=2,  # the server's own protocol and caps
                                **overrides)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name=f"uvicorn-{port}")

    def start(self, wait_ready: bool = True, timeout: float = 60.0) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        path = "/readyz" if wait_ready else "/healthz"
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(self.url + path, timeout=2)
                if r.status_code == 200 or (wait_ready and r.status_code == 503 and not r.json().get("loading", True)):
                    return self
            if not self.thread.is_alive():
                raise RuntimeError("the server thread died at startup")
            time.sleep(0.05)
        raise TimeoutError(f"server on port {self.port} not up within {timeout}s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @property
    def state(self):  # noqa: ANN201
        return self.app.state.stn


@contextlib.contextmanager
def live_server(wait_ready: bool = True, uvicorn: dict | None = None, **settings: object) -> Iterator[LiveServer]:
    """The app on ``settings`` in a live uvicorn (``uvicorn``: overrides of its Config, e.g. ``{"http": "h11"}``)."""
    from service.api.app import create_app
    from service.settings import Settings

    settings.setdefault("providers", ["CPUExecutionProvider"])
    app = create_app(Settings(**settings))
    server = LiveServer(app, free_port(), **(uvicorn or {})).start(wait_ready=wait_ready)
    try:
        yield server
    finally:
        server.stop()


def progressive_jpeg(w: int, h: int, scans: int) -> bytes:
    """A valid progressive JPEG of a flat w x h colour with ``scans`` scans: Pillow's 10, the second of them
    (an AC scan a few bytes long) repeated. libjpeg only warns of the repeats, and each costs it a pass over
    the image (the "scan bomb": 35,000 repeats at 6000x6000 in 2.2 MB took 100 s to decode)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 130, 140)).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    pieces, pos, sos = [data[:2]], 2, []
    while data[pos + 1] != 0xD9:  # marker segments; a scan runs to the next marker that is not 0xFF00 or RSTn
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if data[pos + 1] == 0xDA:
            while not (data[end] == 0xFF and data[end + 1] not in (0, *range(0xD0, 0xD8))):
                end += 1
            sos.append(len(pieces))
        pieces.append(data[pos:end])
        pos = end
    assert len(sos) == 10 and scans >= 10
    pieces[sos[1]] *= scans - 9
    return b"".join(pieces) + data[pos:]
