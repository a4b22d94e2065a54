"""Graceful drain: `stn serve` in its own process, SIGTERM while work is in flight (issue 12, defect 7)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image
from test_http_v1 import metric

from tests.service.support import ROOT, free_port


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, "PNG")
    return buf.getvalue()


def test_sigterm_drains_in_flight_work_then_exits_0(model_dir: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "STN_MODEL_DIR": str(model_dir), "STN_PORT": str(port), "STN_HOST": "127.0.0.1",
           "STN_PROVIDERS": "CPUExecutionProvider", "STN_WORKERS": "1", "STN_SHUTDOWN_GRACE_S": "60",
           "STN_REQUEST_TIMEOUT_S": "60", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "stn", "serve"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            time.sleep(0.1)
        files = [("file", (f"{i}.png", png(8, 8), "image/png")) for i in range(3)]
        result: dict[str, httpx.Response] = {}

        def client() -> None:
            result["r"] = httpx.post(url + "/v1/rectify", params={"model": "affine", "size": "1500x1500"},
                                     files=files, timeout=90)

        t = threading.Thread(target=client)
        t.start()
        deadline = time.monotonic() + 30
        while metric(httpx.get(url + "/metrics").text, "stn_queue_depth", model="affine") < 3:
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 2
        while httpx.get(url + "/readyz", timeout=2).status_code != 503:
            assert time.monotonic() < deadline, "readiness did not turn 503"
            time.sleep(0.02)
        new = httpx.post(url + "/v1/rectify", params={"model": "affine"},
                         files={"file": ("n.png", png(8, 8), "image/png")}, timeout=10)
        assert new.status_code == 503 and new.headers["retry-after"] == "1", new.text
        assert "shutting down" in new.json()["detail"]
        t.join(90)
        assert result["r"].status_code == 200, result["r"].text[:300]
        assert len(result["r"].json()["results"]) == 3
        assert proc.wait(30) == 0
        log = proc.stdout.read().decode()
        assert "draining" in log and "Traceback" not in log, log[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
