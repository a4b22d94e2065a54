"""Issue 12's defects, each reproduced against the real server (uvicorn on 127.0.0.1, real sockets).

Items: 1 cost-based admission and byte-bounded grid caches; 2 uploads inside the limits;
3 header caps; 4 /v2 schema validation; 5 aborted uploads are 499; 8 abandoned work is
cancelled; 9 queue depth counts admitted images; 10 the OpenAPI document; 11 minimal
/readyz with keys; 12 the pixel limit's 413, no DecompressionBombWarning, ``filename*=``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import sys
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from test_frontdoor import read_response
from test_http_v1 import assert_problem, metric

from tests.service.support import live_server, progressive_jpeg


def png(w: int, h: int, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, "PNG")
    return buf.getvalue()


def raw_request(url: str, head: str, body: bytes = b"") -> socket.socket:
    """A socket that has sent ``head`` (CRLF line endings added) and ``body``, left open."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
    return sock


def read_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except TimeoutError:
        pass
    return out


def stalled(url: str, head: str, body: bytes, wait: float) -> tuple[bytes, float]:
    """Send a request head and the first bytes of its body, then nothing: what comes back, and after how long."""
    t0 = time.monotonic()
    with raw_request(url, head, body) as sock:
        reply = read_all(sock, timeout=wait)
    return reply, time.monotonic() - t0


def wait_for(cond, timeout: float = 10.0, every: float = 0.02) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return False


# ---- 1. memory is bounded by what images cost --------------------------------------------------

def test_a_request_over_the_memory_budget_gets_413_naming_the_setting(model_dir: Path) -> None:
    with live_server(model_dir=model_dir, memory_budget_mb=64) as srv:
        r = httpx.post(srv.url + "/v1/rectify", params={"model": "affine", "size": "2000x2000"},
                       files={"file": ("tiny.png", png(8, 8), "image/png")}, timeout=30)
        assert_problem(r, 413, "STN_MEMORY_BUDGET_MB")
        # a declared 6000x6000 image (a few kB of PNG) costs its decoded pixels, not its bytes
        r = httpx.post(srv.url + "/v1/rectify", params={"model": "affine"},
                       files={"file": ("bomb.png", png(6000, 6000), "image/png")}, timeout=30)
        assert_problem(r, 413, "STN_MEMORY_BUDGET_MB")
        ok = httpx.post(srv.url + "/v1/rectify", params={"model": "affine", "size": "64x64"},
                        files={"file": ("tiny.png", png(8, 8), "image/png")}, timeout=30)
        assert ok.status_code == 200, ok.text
        assert srv.state.admission.reserved_bytes == 0


def test_held_uploads_count_against_the_budget_503_not_413(model_dir: Path) -> None:
    """A body being read reserves its bytes: a request that would fit alone gets 503 with Retry-After."""
    with live_server(model_dir=model_dir, memory_budget_mb=64, max_upload_bytes=40 * 1024 * 1024) as srv:
        stalled = raw_request(srv.url, "POST /v1/rectify?model=affine HTTP/1.1\nHost: x\n"
                                       f"Content-Type: image/png\nContent-Length: {36 * 1024 * 1024}\n", b"\x89PNG")
        try:
            assert wait_for(lambda: srv.state.admission.reserved_bytes > 0)
            r = httpx.post(srv.url + "/v1/rectify", params={"model": "affine", "size": "1400x1400"},  # ~51 MB
                           files={"file": ("tiny.png", png(8, 8), "image/png")}, timeout=30)
            body = assert_problem(r, 503, "memory budget")
            assert r.headers["retry-after"] == "1" and body["request_id"]
        finally:
            stalled.close()
        assert wait_for(lambda: srv.state.admission.reserved_bytes == 0)


def noise_png(w: int, h: int) -> bytes:
    """An RGB PNG of noise: about 3 bytes a pixel, so its body is much longer than its header."""
    import numpy as np

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG",
                                                                                               compress_level=1)
    return buf.getvalue()


def test_an_upload_is_reserved_in_its_own_colour_not_the_models(model_dir: Path) -> None:
    """Uploads are decoded and rectified in their own colour (issue 10), but admission reserved them in the
    model's channels: an RGB upload to the gray model was reserved at 12 bytes a pixel and decoded at 23 to 28.
    With a 20 MiB budget a 1000x1000 RGB PNG (3 MB body + 28 MB decoded) can never fit: 413 (before: 200,
    about twice the budget in use); the same size in gray (1 MB + 12 MB) fits."""
    import numpy as np

    gray = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (1000, 1000), dtype=np.uint8)).save(
        gray, "PNG", compress_level=1)
    with live_server(model_dir=model_dir, memory_budget_mb=20) as srv:
        url = srv.url + "/v1/rectify"
        r = httpx.post(url, params={"model": "affine"}, content=noise_png(1000, 1000),
                       headers={"content-type": "image/png"}, timeout=60)
        assert_problem(r, 413, "STN_MEMORY_BUDGET_MB")
        r = httpx.post(url, params={"model": "affine"}, content=gray.getvalue(), headers={"content-type": "image/png"},
                       timeout=60)
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("kind", ["raw", "multipart"])
def test_a_body_is_sized_from_its_image_header_503_and_413_before_the_rest_arrives(model_dir: Path,
                                                                                    kind: str) -> None:
    """The memory an image will cost is reserved as soon as its header is in, not after the whole body."""
    big = noise_png(1000, 1000)  # about 3 MB; decoded in its own colour (RGB), about 28 MB (image_cost)
    if kind == "multipart":
        big = (b'--BOUNDARY\r\nContent-Disposition: form-data; name="file"; filename="noise.png"\r\n'
               b"Content-Type: image/png\r\n\r\n" + big + b"\r\n--BOUNDARY--\r\n")
    ctype = "image/png" if kind == "raw" else "multipart/form-data; boundary=BOUNDARY"
    head = f"POST /v1/rectify?model=affine{{}} HTTP/1.1\nHost: x\nContent-Type: {ctype}\nContent-Length: {len(big)}\n"
    start, rest = big[:200_000], big[200_000:]
    with live_server(model_dir=model_dir, memory_budget_mb=40, body_timeout_s=30) as srv:
        first = raw_request(srv.url, head.format(""), start)  # fits alone: 3 MB of body + 28 MB of image
        try:
            assert wait_for(lambda: srv.state.admission.reserved_bytes > 28e6), srv.state.admission.reserved_bytes
            second = raw_request(srv.url, head.format(""), start)  # its body fits, its image does not: 503
            try:
                second.settimeout(10)
                status, headers, body = read_response(second.makefile("rb"))
                assert status == 503 and "memory budget" in json.loads(body)["detail"], body
                assert headers["retry-after"] == "1"
                second.sendall(rest + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # the rest is discarded
                assert read_response(second.makefile("rb"))[0] == 200  # and the connection serves the next request
            finally:
                second.close()
            third = raw_request(srv.url, head.format("&size=2000x2000"), start)  # can never fit: 413
            try:
                third.settimeout(10)
                status, _, body = read_response(third.makefile("rb"))
                assert status == 413 and "STN_MEMORY_BUDGET_MB" in json.loads(body)["detail"], body
            finally:
                third.close()
            first.sendall(rest)
            first.settimeout(30)
            status, headers, body = read_response(first.makefile("rb"))
            assert status == 200, body[:300]
        finally:
            first.close()
        assert wait_for(lambda: srv.state.admission.reserved_bytes == 0 and srv.state.admission.uploads == 0)
        # a body too short to hold the whole header is decided once it is in, as before
        r = httpx.post(srv.url + "/v1/rectify", params={"model": "affine"}, content=b"\x89PNG\r\n\x1a\n" + b"x" * 70_000,
                       headers={"content-type": "image/png"}, timeout=30)
        assert_problem(r, 400, "could not be read")


def test_a_connection_answered_before_its_body_is_closed_when_idle_or_stalled(model_dir: Path) -> None:
    """An answer from the image's header comes before the rest of the body; uvicorn then discards the rest,
    but its arrival cancels the keep-alive timer and nothing re-armed it: such connections stayed open for
    good. Now a finished one idles out like any other, and a stalled one is closed by the body timeout."""
    big = noise_png(1000, 1000)  # 12 MB decoded: over a 1 MB budget, refused from its header (413)
    head = (f"POST /v1/rectify?model=affine HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(big)}\r\n\r\n").encode()
    with live_server(model_dir=model_dir, memory_budget_mb=1, max_upload_bytes=8 * 2**20, body_timeout_s=2.0,
                     uvicorn={"timeout_keep_alive": 2}) as srv:
        finished, stalled = (socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(2))
        try:
            for sock in (finished, stalled):
                sock.sendall(head + big[:200_000])
                assert read_response(sock.makefile("rb"))[0] == 413
            finished.sendall(big[200_000:])
            for sock in (finished, stalled):
                t0 = time.monotonic()
                assert read_all(sock, timeout=8) == b"", "still open"
                assert time.monotonic() - t0 < 7
        finally:
            finished.close()
            stalled.close()


def test_an_early_answer_to_a_client_that_asked_to_close_is_not_lost_to_a_reset(model_dir: Path) -> None:
    """Python's urllib sends ``Connection: close`` and the whole body before it reads. An answer given before the
    body was in (a 413 from the image's header, a 400 from a broken multipart body) made uvicorn close with the
    rest of the body unread, so the kernel reset the connection and urllib raised "connection reset" instead of
    the answer. Now the connection half-closes, discards the rest of the body, and closes when it is in (or when
    nothing arrives for a second: a stalled client is not kept)."""
    import urllib.error
    import urllib.request

    big = noise_png(1000, 1000)  # 3 MB, 12 MB decoded: over a 10 MB budget, refused from its header (413)
    broken = b"x" * 6_000_000 + b"\r\n--b--\r\n"  # a multipart body without its first boundary: 400
    with live_server(model_dir=model_dir, memory_budget_mb=10, max_upload_bytes=8 * 2**20) as srv:
        url = srv.url + "/v1/rectify?model=affine"
        for body, ctype, status, needle in ((big, "image/png", 413, b"STN_MEMORY_BUDGET_MB"),
                                            (broken, "multipart/form-data; boundary=b", 400, b"multipart")):
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(urllib.request.Request(url, data=body, headers={"Content-Type": ctype}),
                                       timeout=30)
            assert caught.value.code == status and needle in caught.value.read()
        head = (f"POST /v1/rectify?model=affine HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                f"Content-Type: image/png\r\nContent-Length: {len(big)}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:  # stalls after 200 KB
            sock.sendall(head + big[:200_000])
            t0 = time.monotonic()
            answer = read_all(sock, timeout=8)
            assert answer.startswith(b"HTTP/1.1 413") and time.monotonic() - t0 < 4, answer[:80]


def test_images_sized_early_and_at_the_end_are_each_reserved_once(model_dir: Path) -> None:
    """A small file (sized once the body is in) and a large one (sized from its first bytes) in one request:
    each image's cost is reserved once (twice would not fit the budget: 413)."""
    big = noise_png(1000, 1000)  # 3 MB body + 28 MB decoded (RGB; 31e6 bytes); with the image twice (59e6) over 40 MiB
    with live_server(model_dir=model_dir, memory_budget_mb=40) as srv:
        r = httpx.post(srv.url + "/v1/rectify", params={"model": "affine"}, timeout=60,
                       files=[("file", ("small.png", png(8, 8), "image/png")), ("file", ("big.png", big, "image/png"))])
        assert r.status_code == 200, r.text
        assert [(res["filename"], res["input_width"]) for res in r.json()["results"]] == [("small.png", 8), ("big.png", 1000)]
        assert wait_for(lambda: srv.state.admission.reserved_bytes == 0 and srv.state.inflight.get("affine") == 0)


def test_an_image_with_a_long_header_does_not_stall_the_event_loop(model_dir: Path) -> None:
    """A valid PNG with 8 MB of empty chunks before its pixels: Pillow's header reader walks them in Python
    for about 2 s. Sized on the event loop (as before), /healthz waited that long; now at most 1000 chunks are
    walked (libpng's default limit), and the image is refused with the reason."""
    import threading

    from test_header_size import jpeg_with_comments, spam_png, two_ihdr_png

    data = spam_png(8)
    with live_server(model_dir=model_dir) as srv:
        latencies: list[float] = []
        done = threading.Event()

        def probe() -> None:
            with httpx.Client(base_url=srv.url, timeout=30) as client:
                while not done.is_set():
                    t0 = time.perf_counter()
                    assert client.get("/healthz").status_code == 200
                    latencies.append(time.perf_counter() - t0)
                    time.sleep(0.02)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            assert wait_for(lambda: len(latencies) >= 1)
            r = httpx.post(srv.url + "/v1/rectify", params={"model": "affine", "format": "png"}, content=data,
                           headers={"content-type": "image/png"}, timeout=120)
            seen = len(latencies)
            assert wait_for(lambda: len(latencies) >= seen + 2)  # probes after the answer too
        finally:
            done.set()
            prober.join(30)
        assert_problem(r, 400, "more than 1000 chunks before its image data")
        assert max(latencies) < 1.0, f"/healthz took up to {max(latencies):.2f} s"
        for name, body, reason in (("two.png", two_ihdr_png(), "second IHDR"),
                                   ("notes.jpg", jpeg_with_comments(2000), "more than 1024 segments")):
            r = httpx.post(srv.url + "/v1/rectify", params={"model": "affine"}, timeout=30,
                           files={"file": (name, body, "application/octet-stream")})
            assert_problem(r, 400, reason)


def test_a_response_nobody_reads_counts_against_the_budget_until_the_connection_is_dropped(model_dir: Path) -> None:
    """A client that never reads its 9 MB PNG: what the kernel cannot take stays in the server's memory.
    It counts as reserved (new work is shed while too much waits to be read), and after STN_BODY_TIMEOUT_S
    without progress the connection is dropped with it (before: counted nowhere, held as long as the client
    kept the connection open)."""
    img = noise_png(200, 150)
    with live_server(model_dir=model_dir, body_timeout_s=2.0) as srv:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the kernel holds little
        sock.connect(("127.0.0.1", srv.port))
        try:
            sock.sendall(f"POST /v1/rectify?model=affine&format=png&size=4000x4000 HTTP/1.1\r\nHost: x\r\n"
                         f"Content-Type: image/png\r\nContent-Length: {len(img)}\r\n\r\n".encode() + img)
            assert wait_for(lambda: srv.state.admission.requests == 0 and srv.state.admission.reserved_bytes > 0,
                            timeout=60)  # the work is done; the unread response is what is reserved
            assert srv.state.admission.reserved_bytes > 2**20
            assert wait_for(lambda: srv.state.admission.reserved_bytes == 0, timeout=15)
            head, received = read_all(sock, timeout=5).split(b"\r\n\r\n", 1)
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            assert head.startswith(b"HTTP/1.1 200") and len(received) < length  # cut off, the client can tell
        finally:
            sock.close()
        r = httpx.post(srv.url + "/v1/rectify", params={"model": "affine", "size": "4000x4000", "format": "png"},
                       content=img, headers={"content-type": "image/png"}, timeout=60)  # a reading client is served
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG")


def test_base_grid_cache_is_bounded_in_bytes(model_dir: Path) -> None:
    from service.runtime import GRID_CACHE_BYTES, SessionConfig, load_model_dir

    loaded = load_model_dir(model_dir / "affine.onnx", SessionConfig(providers=("CPUExecutionProvider",)), None)
    model = loaded.models["affine"]
    for k in range(6):  # 6 x 12 MB grids
        model.base_grid((1000, 1000 - k))
    assert 0 < model.grid_cache_bytes <= GRID_CACHE_BYTES
    model.base_grid((3000, 3000))  # 108 MB: computed, never kept
    assert model.grid_cache_bytes <= GRID_CACHE_BYTES


# ---- 2. uploads inside the limits --------------------------------------------------------------

def test_a_stalled_body_gets_408_and_the_connection_is_closed(model_dir: Path) -> None:
    with live_server(model_dir=model_dir, body_timeout_s=1.0) as srv:
        reply, seconds = stalled(srv.url, "POST /v1/rectify?model=affine HTTP/1.1\nHost: x\nContent-Type: image/png\n"
                                          "Content-Length: 100000\n", b"\x89PNG\r\n", wait=8)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"STN_BODY_TIMEOUT_S" in reply and seconds < 6
        assert wait_for(lambda: srv.state.admission.uploads == 0 and srv.state.admission.reserved_bytes == 0)


def test_concurrent_loads_of_one_model_share_one_load(model_dir: Path, caplog, monkeypatch) -> None:  # noqa: ANN001
    """Eight clients ask to reload the same model file at once: each is answered, by one load (a load warms the
    model: seconds of CPU for a large one; here each load is made to last 0.5 s, so that all eight overlap it).
    Before, they queued on the model's lock and reloaded it eight times, one after another."""
    import threading

    from service.api import repository

    real = repository.load_and_warm

    def slow_load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(repository, "load_and_warm", slow_load)
    url = "/v2/repository/models/affine/load"
    with live_server(model_dir=model_dir) as srv, caplog.at_level("INFO", logger="service.api.repository"):
        def reloads() -> int:
            return sum("model affine reloaded" in r.getMessage() for r in caplog.records)

        barrier, codes = threading.Barrier(8), []

        def ask() -> None:
            barrier.wait()
            codes.append(httpx.post(srv.url + url, timeout=60).status_code)

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert codes == [200] * 8
        assert reloads() == 1
        assert httpx.post(srv.url + url, timeout=60).status_code == 200  # a later request reloads again
        assert reloads() == 2
        assert not srv.state.repository._loads  # finished loads are not kept (nor the runtimes they returned)


def test_a_stalled_body_on_any_route_loses_its_connection(model_dir: Path) -> None:
    """A route outside admission (the repository's JSON body) has no 408 of its own: the protocol closes the
    connection 2 s after STN_BODY_TIMEOUT_S, and the app counts a client disconnect. Before, it waited for ever."""
    with live_server(model_dir=model_dir, body_timeout_s=1.0) as srv:
        reply, seconds = stalled(srv.url, "POST /v2/repository/index HTTP/1.1\nHost: x\n"
                                          "Content-Type: application/json\nContent-Length: 100\n", b"{", wait=10)
        assert reply == b"" and seconds < 8
        assert wait_for(lambda: metric(httpx.get(srv.url + "/metrics").text, "stn_requests_total",
                                       route="/v2/repository/index", status="499") == 1)

def test_uploads_beyond_the_cap_get_503_before_their_body(model_dir: Path) -> None:
    with live_server(model_dir=model_dir, max_uploads=2, body_timeout_s=30) as srv:
        socks = [raw_request(srv.url, "POST /v1/rectify?model=affine HTTP/1.1\nHost: x\nContent-Type: image/png\n"
                                      "Content-Length: 5000\n", b"\x89PNG") for _ in range(2)]
        try:
            assert wait_for(lambda: srv.state.admission.uploads == 2)
            r = httpx.post(srv.url + "/v1/rectify", params={"model": "affine"},
                           files={"file": ("tiny.png", png(8, 8), "image/png")}, timeout=10)
            assert_problem(r, 503, "STN_MAX_UPLOADS")
            t0 = time.perf_counter()
            assert httpx.get(srv.url + "/healthz").status_code == 200
            assert time.perf_counter() - t0 < 1.0
        finally:
            for s in socks:
                s.close()
        assert wait_for(lambda: srv.state.admission.uploads == 0)


def test_v2_body_is_parsed_off_the_event_loop_after_admission(server) -> None:  # noqa: ANN001
    """A JSON body waits for admission; a full memory budget answers 503 before it is read."""
    adm = server.state.admission
    saved = adm.reserved_bytes
    adm.reserved_bytes = adm.budget_bytes  # the budget is taken (as by other requests)
    try:
        body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}]}
        r = httpx.post(server.url + "/v2/models/affine/infer", json=body)
        assert r.status_code == 503 and "memory budget" in r.json()["error"]
    finally:
        adm.reserved_bytes = saved


# ---- 3. header caps ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bytes", "count"])
def test_oversized_heads_get_431_and_a_closed_connection(server, kind: str) -> None:  # noqa: ANN001
    if kind == "bytes":
        head = "GET /healthz HTTP/1.1\nHost: x\nX-Big: " + "a" * (1024 * 1024) + "\n"
    else:
        head = "GET /healthz HTTP/1.1\nHost: x\n" + "".join(f"X-H{i}: {i}\n" for i in range(500))
    t0 = time.monotonic()
    sock = raw_request(server.url, head)
    reply = read_all(sock, timeout=5)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
    assert (b"STN_MAX_HEADER_BYTES" if kind == "bytes" else b"STN_MAX_HEADERS") in reply
    assert time.monotonic() - t0 < 3
    ok = httpx.get(server.url + "/healthz", headers={f"X-H{i}": "v" * 100 for i in range(50)})
    assert ok.status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/v1/models", "/v1/rectify?model=affine"])
def test_a_request_without_exactly_one_host_gets_400(server, path: str) -> None:  # noqa: ANN001
    """RFC 9112 3.2: a server MUST answer 400 to an HTTP/1.1 request without a Host header, and to any with two
    (a proxy and the server may each read another one: the shape of cache-poisoning and routing attacks). Both
    were served. HTTP/1.0 needs none."""
    method = "POST" if "rectify" in path else "GET"
    img = png(64, 48)
    extra = f"Content-Type: image/png\nContent-Length: {len(img)}\n" if method == "POST" else ""
    body = img if method == "POST" else b""
    for hosts in ("", "Host: a\nHost: b\n"):
        with raw_request(server.url, f"{method} {path} HTTP/1.1\n{hosts}{extra}", body) as sock:
            reply = read_all(sock, timeout=5)
        assert reply.startswith(b"HTTP/1.1 400") and b"exactly one Host" in reply, reply[:300]
        assert b"HTTP/1.1 200" not in reply  # the request was not served as well
    with raw_request(server.url, f"{method} {path} HTTP/1.0\n{extra}", body) as sock:
        status, _, _ = read_response(sock.makefile("rb"))
    assert status == 200
    with raw_request(server.url, f"{method} {path} HTTP/1.1\nhOsT: x\n{extra}", body) as sock:
        status, _, _ = read_response(sock.makefile("rb"))
    assert status == 200


@pytest.mark.parametrize(("raw", "says"), [
    ("G@T /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"Invalid method"),
    ("GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n", b"header value"),
    ("POST /v1/rectify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", b"chunk size"),
    ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"malformed HTTP/1.1 request"),
])
def test_a_malformed_request_gets_a_problem_with_the_parsers_reason_and_no_warning(server, caplog, raw: str,  # noqa: ANN001
                                                                                   says: bytes) -> None:
    """uvicorn answered "Invalid HTTP request received." in plain text and logged it as a WARNING: a line in the
    server's log per request, at any client's will. Now problem+json with llhttp's reason, logged at INFO."""
    with caplog.at_level("INFO"):
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(raw.encode("latin-1"))
            reply = read_all(sock, timeout=3)
    assert reply.startswith(b"HTTP/1.1 400") and b"application/problem+json" in reply, reply[:300]
    assert says in reply, reply
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_a_malformed_body_after_its_answer_gets_no_second_answer(model_dir: Path) -> None:
    """The door answers a request it sheds at once and discards its body; a malformed chunk in that body made the
    protocol write a 400 as well, which a keep-alive client would read as the answer to its next request. The
    connection is closed instead (as when an answer is being written)."""
    with live_server(model_dir=model_dir, max_uploads=1, body_timeout_s=30) as srv:
        hold = raw_request(srv.url, "POST /v1/rectify?model=affine HTTP/1.1\nHost: x\nContent-Type: image/png\n"
                                    "Content-Length: 5000\n", b"\x89PNG")
        try:
            assert wait_for(lambda: srv.state.admission.uploads == 1)
            with raw_request(srv.url, "POST /v1/rectify?model=affine HTTP/1.1\nHost: x\nContent-Type: image/png\n"
                                      "Transfer-Encoding: chunked\n", b"4\r\nabcd\r\n") as sock:
                time.sleep(0.3)  # the 503 is written; then the body goes on, malformed
                sock.sendall(b"zz\r\n")
                t0 = time.monotonic()
                reply = read_all(sock, timeout=5)
                closed_after = time.monotonic() - t0
        finally:
            hold.close()
    assert reply.startswith(b"HTTP/1.1 503") and b"STN_MAX_UPLOADS" in reply, reply[:300]
    assert reply.count(b"HTTP/1.1 ") == 1, reply
    assert closed_after < 4, closed_after  # closed, not left waiting for the rest of the body


@pytest.mark.parametrize("version", ["2.0", "0.9"])
def test_a_request_line_of_another_http_version_gets_505(server, version: str) -> None:  # noqa: ANN001
    """llhttp parses `HTTP/2.0` and `HTTP/0.9` request lines, and they were served as HTTP/1.1."""
    with raw_request(server.url, f"GET /healthz HTTP/{version}\nHost: x\n") as sock:
        reply = read_all(sock, timeout=3)
    assert reply.startswith(b"HTTP/1.1 505") and f"HTTP/{version} is not supported".encode() in reply, reply[:300]


def test_upgrade_offers_are_ignored_and_served_as_http_1_1(server, caplog) -> None:  # noqa: ANN001
    """`curl --http2` offers `Upgrade: h2c`; httptools takes such a request to have no body, so its upload was
    dropped (400 "image is empty"). A WebSocket offer to /healthz broke the connection with a logged traceback.
    Both are now plain HTTP/1.1 requests (RFC 9110 7.8 lets a server ignore Upgrade)."""
    img = png(64, 48)
    sock = raw_request(server.url, "POST /v1/rectify?model=affine&format=png HTTP/1.1\nHost: x\n"
                                   "Connection: Upgrade, HTTP2-Settings\nUpgrade: h2c\n"
                                   "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\nContent-Type: image/png\n"
                                   f"Content-Length: {len(img)}\n", img)
    with sock:
        status, headers, body = read_response(sock.makefile("rb"))
    assert status == 200 and body.startswith(b"\x89PNG"), body[:200]
    with caplog.at_level("ERROR"):
        sock = raw_request(server.url, "GET /healthz HTTP/1.1\nHost: x\nConnection: Upgrade\nUpgrade: websocket\n"
                                       "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\nSec-WebSocket-Version: 13\n")
        with sock:
            status, _, body = read_response(sock.makefile("rb"))
        assert (status, json.loads(body)) == (200, {"status": "live"})
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_upgrade_offers_whose_head_comes_in_pieces_are_served_as_http_1_1(server, caplog) -> None:  # noqa: ANN001
    """The `Upgrade` header was renamed only when the whole head came in one read. Split (a client writing its
    head in pieces, or a slow network), an `Upgrade: h2c` POST lost its upload again (and uvicorn logged two
    WARNINGs per request), and a WebSocket offer got 403. Now the head is renamed however it is cut: here at
    every byte from the line before `Upgrade` to the line after it."""
    img = png(64, 48)
    head = (b"POST /v1/rectify?model=affine&format=png HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nContent-Type: image/png\r\n"
            + f"Content-Length: {len(img)}\r\n\r\n".encode())
    ws = (b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    host, port = server.url.removeprefix("http://").split(":")

    def send_in_two(first: bytes, second: bytes) -> tuple[int, bytes]:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(first)
            time.sleep(0.03)  # its own read
            sock.sendall(second)
            status, _, body = read_response(sock.makefile("rb"))
        return status, body

    with caplog.at_level("INFO"):
        at = head.index(b"Upgrade: h2c")
        for cut in range(at - 12, at + 14):
            status, body = send_in_two(head[:cut], head[cut:] + img)
            assert status == 200 and body.startswith(b"\x89PNG"), (cut, head[:cut][-12:], body[:200])
        at = ws.index(b"Upgrade: websocket")
        for cut in (at - 2, at - 1, at + 3, at + 8):
            status, body = send_in_two(ws[:cut], ws[cut:])
            assert (status, json.loads(body)) == (200, {"status": "live"}), cut
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_a_body_in_tiny_chunks_gets_400_before_it_stalls_the_event_loop(server) -> None:  # noqa: ANN001
    """Each chunk of a chunked body costs the event loop a callback, and uvicorn copied what it held of the body at
    each: one client sending 1-byte chunks (5 bytes on the wire each) stalled /healthz for 0.75 s. Past 1,024
    pieces a body must average 128 bytes a piece; normal chunked uploads pass (256-byte chunks too, though a
    chunk split across two reads makes two pieces)."""
    host, port = server.url.removeprefix("http://").split(":")
    noise = np.random.default_rng(0).integers(0, 256, (300, 400), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    img = buf.getvalue()  # about 120 KB

    def send(pieces: list[bytes]) -> tuple[int, bytes]:
        body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(b"POST /v1/rectify?model=affine&format=png HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            try:
                sock.sendall(body)
            except OSError:  # refused and closed while sending
                pass
            status, _, answer = read_response(sock.makefile("rb"))
        return status, answer

    before = metric(httpx.get(server.url + "/metrics").text, "stn_connections_closed_total", reason="small_pieces")
    status, answer = send([img[:64]] + [img[i:i + 1] for i in range(64, 20000)])  # 1-byte chunks
    assert status == 400 and b"pieces" in answer and b"128 bytes" in answer, answer[:300]
    after = metric(httpx.get(server.url + "/metrics").text, "stn_connections_closed_total", reason="small_pieces")
    assert after == before + 1
    for size in (256, 4096, 65536):  # uploads that chunk their bodies as clients do
        status, answer = send([img[i:i + size] for i in range(0, len(img), size)])
        assert status == 200 and answer.startswith(b"\x89PNG"), (size, answer[:300])
    assert httpx.get(server.url + "/healthz").status_code == 200


# ---- 3b. pipelining is bounded: what one connection may have parsed, answered and unread ------------

def pipelined(n: int, path: str, first: int = 0) -> bytes:
    return b"".join(f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Request-ID: p{i}\r\n\r\n".encode()
                    for i in range(first, first + n))


@pytest.mark.parametrize("path", ["/healthz", "/v1/models"])  # answered at the door; through the app
def test_pipelined_requests_beyond_the_cap_end_the_connection_after_the_answers(model_dir: Path, path: str) -> None:
    """Up to STN_MAX_PIPELINED requests in one read are answered in order on a connection that stays open; a read
    holding more gets the first STN_MAX_PIPELINED answered, then the end of the stream (FIN, not a reset: the
    client retries the rest). Before, every request a read held was parsed and answered (199,399 answers in 4 s to
    one client that read nothing)."""
    with live_server(model_dir=model_dir, max_pipelined=4) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            reader = sock.makefile("rb")
            sock.sendall(pipelined(4, path))
            assert [read_response(reader)[1]["x-request-id"] for _ in range(4)] == ["p0", "p1", "p2", "p3"]
            sock.sendall(pipelined(1, path, first=4))
            status, headers, _ = read_response(reader)
            assert (status, headers["x-request-id"]) == (200, "p4") and headers.get("connection") != "close"
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            reader = sock.makefile("rb")
            sock.sendall(pipelined(200, path))
            assert [read_response(reader)[1]["x-request-id"] for _ in range(4)] == ["p0", "p1", "p2", "p3"]
            t0 = time.monotonic()
            assert reader.read() == b""  # the end of the stream, no fifth answer
            assert time.monotonic() - t0 < 5
        assert httpx.get(srv.url + path).status_code == 200


def test_a_pipelining_client_that_reads_nothing_stops_being_read(model_dir: Path) -> None:
    """A client that pipelines requests and reads none of the answers: once the connection's send buffer is over
    its high-water mark the server stops reading (and parsing and answering) that client, so what it holds for the
    client stays within one read's answers. Before, it kept reading and answering: the answers piled up in the
    transport (five such clients took the server from 125 MB to 1.3 GB, and /healthz stalled for seconds)."""
    with live_server(model_dir=model_dir, max_pipelined=100_000) as srv:  # the cap is tested above
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", srv.port))
        sock.setblocking(False)
        batch, sent, buffered = pipelined(8, "/healthz"), 0, 0
        t0 = progress = time.monotonic()
        try:
            while time.monotonic() - t0 < 15 and time.monotonic() - progress < 1.0:
                try:
                    sent += sock.send(batch)
                    progress = time.monotonic()
                except BlockingIOError:
                    time.sleep(0.005)
                buffered = max([buffered, *(p.transport.get_write_buffer_size()
                                            for p in list(srv.server.server_state.connections))])
            assert time.monotonic() - progress >= 1.0, f"still read after {sent / 2**20:.0f} MB"  # it stopped
            assert buffered < 2 * 2**20, f"{buffered / 2**20:.1f} MB of answers held for one client"
            assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 200
        finally:
            sock.close()


# ---- 3c. slow and idle connections: a head within its timeout, connections within a cap --------------

def test_a_slow_request_head_gets_408_and_a_silent_connection_is_closed(model_dir: Path) -> None:
    """A head trickled a byte at a time gets 408 naming STN_HEAD_TIMEOUT_S; a connection that sends nothing is
    closed. Before, uvicorn waited for both without limit (see the next test for what that cost)."""
    with live_server(model_dir=model_dir, head_timeout_s=1.0) as srv:
        silent = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        slow = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        try:
            t0 = time.monotonic()
            slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            reply = b""
            while time.monotonic() - t0 < 8 and not reply:
                with contextlib.suppress(OSError):
                    slow.sendall(b"X")  # one more byte of a header name, every 0.2 s
                slow.settimeout(0.2)
                with contextlib.suppress(TimeoutError):
                    reply = slow.recv(65536)
            assert reply.startswith(b"HTTP/1.1 408") and b"STN_HEAD_TIMEOUT_S" in reply, reply[:300]
            assert time.monotonic() - t0 < 4
            silent.settimeout(5)
            assert silent.recv(1) == b""  # closed, no answer owed
            text = httpx.get(srv.url + "/metrics").text
            assert metric(text, "stn_connections_closed_total", reason="head_timeout") == 2
        finally:
            silent.close()
            slow.close()


def test_the_keep_alive_timeout_is_a_setting(model_dir: Path) -> None:
    """STN_KEEP_ALIVE_S: behind a load balancer it must outlast the balancer's idle timeout (uvicorn's 5 s was
    fixed before)."""
    with live_server(model_dir=model_dir, keep_alive_s=1.0) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            reader = sock.makefile("rb")
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(reader)[0] == 200
            time.sleep(0.5)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # idle 0.5 s: still open
            assert read_response(reader)[0] == 200
            t0 = time.monotonic()
            assert reader.read() == b""  # then idle: closed after the timeout
            assert 0.8 < time.monotonic() - t0 < 3.0  # (uvicorn's fixed 5 s before)


def test_a_request_pipelined_behind_a_door_answer_is_not_cut_by_the_keep_alive_timeout(model_dir: Path) -> None:
    """The door's answer to /healthz armed the keep-alive timer, and the work request parsed from the same read
    never cancelled it: the connection closed under the work, and its result was lost."""
    img = png(300, 200)
    with live_server(model_dir=model_dir, keep_alive_s=0.05) as srv:
        sock = raw_request(srv.url, "GET /healthz HTTP/1.1\nHost: x\n\nPOST /v1/rectify?model=affine&format=png"
                                    "&size=4000x4000 HTTP/1.1\nHost: x\nContent-Type: image/png\n"
                                    f"Content-Length: {len(img)}\n", img)
        with sock:
            reader = sock.makefile("rb")
            assert read_response(reader)[0] == 200
            t0 = time.monotonic()
            status, _, body = read_response(reader)
            assert status == 200 and body.startswith(b"\x89PNG")
            assert time.monotonic() - t0 > 0.05  # the work outlasted the keep-alive timeout


def test_connections_past_the_cap_close_the_oldest_waiting_for_a_head(model_dir: Path) -> None:
    """With STN_MAX_CONNECTIONS=8 and 8 connections that send nothing, each new connection closes the oldest of
    them and is answered; the newest stay open, and so do the answered ones (kept alive, now the youngest)."""
    with live_server(model_dir=model_dir, max_connections=8) as srv:
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(8)]
        probes: list[socket.socket] = []
        try:
            time.sleep(0.2)
            for i in range(3):
                probes.append(socket.create_connection(("127.0.0.1", srv.port), timeout=10))
                probes[-1].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                status, _, body = read_response(probes[-1].makefile("rb"))
                assert (status, json.loads(body)) == (200, {"status": "live"}), i
            for sock in idle[:3]:
                sock.settimeout(5)
                with contextlib.suppress(ConnectionResetError):
                    assert sock.recv(1) == b""  # evicted, oldest first
            for sock in idle[3:] + probes:
                sock.settimeout(0.2)
                with pytest.raises(TimeoutError):
                    sock.recv(1)  # still open
            text = httpx.get(srv.url + "/metrics").text  # one more connection: a fourth is evicted
            assert metric(text, "stn_connections_closed_total", reason="evicted") == 4
        finally:
            for sock in idle + probes:
                sock.close()


def test_connections_that_send_nothing_cannot_use_up_the_file_descriptors(model_dir: Path) -> None:
    """`stn serve` under an open-file limit of 256, with 300 connections that send nothing: /healthz is still
    answered (the connection cap is below the limit and closes the oldest idle ones). Before, the process ran out
    of descriptors and reset every new connection, probes included (measured with 1,100 against a limit of 1,024)."""
    from service.api.bench import start_server, stop_server
    from tests.service.support import ROOT, free_port

    port = free_port()
    env = {**os.environ, "STN_MODEL_DIR": str(model_dir), "STN_PROVIDERS": "CPUExecutionProvider",
           "STN_LOG_LEVEL": "warning", "PYTHONPATH": str(ROOT)}
    proc = start_server(["sh", "-c", f"ulimit -n 256 && exec {sys.executable} -m stn serve --port {port}"],
                        env, port, "/readyz")
    idle: list[socket.socket] = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        for _ in range(3):
            r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
            assert r.status_code == 200
    finally:
        for sock in idle:
            sock.close()
        stop_server(proc)


# ---- 4. /v2 infer validates its request ---------------------------------------------------------

@pytest.mark.parametrize("body", [
    "[1]", '"x"', '{"inputs":[1]}', '{"parameters":[1]}', '{"outputs":[1]}',
    '{"inputs":[{"name":"image","datatype":"FP32","shape":[1,1,8,8],"parameters":{"binary_data_size":"abc"}}]}',
    '{"inputs":[{"name":"image","datatype":"FP32","shape":[1,1,2,2],"data":[0,0,0,0]}],"outputs":[1]}',
    '{"inputs":[{"name":"image","datatype":"FP32","shape":[1,1,2,2],"data":[0,0,0,0]}],"parameters":[1]}',
    "[" * 100_000 + "]" * 100_000,
    '{"inputs":[{"name":"image","datatype":"FP32","shape":[1,1,2,2],"data":[[1,[2]],{"a":1}]}]}',
], ids=["list", "string", "inputs-item", "parameters-list", "outputs-item", "binary-size-string",
        "outputs-item-with-input", "parameters-list-with-input", "deep-nesting", "ragged-data"])
def test_v2_infer_malformed_requests_get_400_with_error(server, body: str) -> None:  # noqa: ANN001
    r = httpx.post(server.url + "/v2/models/affine/infer", content=body.encode(),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"] and r.json()["status"] == 400


def _infer_body(*data: str, outputs: str = "") -> str:
    """A /v2 infer body with one 1x1x2x2 input named image per ``data`` (JSON text), and ``outputs`` (JSON text)."""
    inputs = ",".join('{"name":"image","datatype":"FP32","shape":[1,1,2,2],"data":' + d + "}" for d in data)
    return '{"inputs":[' + inputs + "]" + (',"outputs":' + outputs if outputs else "") + "}"


@pytest.mark.parametrize("body, says", [
    (_infer_body("[0,0,0,0]", "[1,1,1,1]"), "input 'image' is named more than once"),
    (_infer_body("[0,0,0,0]", outputs='[{"name":"theta"},{"name":"theta"}]'), "output 'theta' is named more than once"),
    (_infer_body("[0,0,0,0]", outputs='[{"name":"nope"}]'), "unknown output 'nope'"),
    (_infer_body("[NaN,0,0,0]"), "holds NaN or infinite values"),
    (_infer_body("[Infinity,0,0,0]"), "holds NaN or infinite values"),
    (_infer_body("[1e39,0,0,0]"), "beyond float32"),
    ('{"inputs":[{"name":"image","datatype":"FP32","shape":[2,1,2147483648,2147483648],"data":[0]}]}',
     "needs 9223372036854775808"),
], ids=["input-twice", "output-twice", "unknown-output", "nan", "infinity", "beyond-float32", "shape-past-2**63"])
def test_v2_infer_refuses_what_it_cannot_answer_well(server, body: str, says: str) -> None:  # noqa: ANN001
    # before: a repeated output was built and sent once per mention, beyond what admission reserved (20 mentions of
    # `rectified` took the server's peak from 272 to 879 MB); a repeated input was served with one of them; NaN and
    # infinity were served, and the JSON answer held NaN, which JSON parsers other than Python's refuse; np.prod
    # wrapped a shape's size around (the 400 said "needs -4611686018427387904")
    r = httpx.post(server.url + "/v2/models/affine/infer", content=body.encode(),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text[:300]
    assert says in r.json()["error"], r.json()


@pytest.mark.parametrize("value", ["\xb2", "-5", "abc", "1_0", "99999999999999999999", "200"])
def test_v2_binary_header_length_must_be_a_length(server, value: str) -> None:  # noqa: ANN001
    # before: a superscript two (\xb2: str.isdigit() says yes, int() raises) was a 500
    raw = np.zeros((1, 1, 2, 2), np.float32).tobytes()
    header = b'{"inputs":[{"name":"image","datatype":"FP32","shape":[1,1,2,2],"parameters":{"binary_data_size":16}}]}'
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Inference-Header-Content-Length: " + value.encode("latin-1") + b"\r\n"
                     b"Content-Length: %d\r\n\r\n" % (len(header) + len(raw)) + header + raw)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert "Inference-Header-Content-Length" in json.loads(body)["error"], body


def test_v2_json_is_reserved_at_what_its_parse_holds(model_dir: Path) -> None:
    """Every JSON value becomes a Python object: 12 MB of ``[0],`` took 349 MB to parse, where 48 MB (four times
    the text) was reserved, so a 320 MB body could take 9 GB. Now the parse's cost is counted from the body before
    it is parsed: with a 256 MB budget that request gets 413 naming what it would cost (before: parsed, then 400),
    and a flat float tensor of the same size is still served."""
    rng = np.random.default_rng(0)
    flat = rng.random((1, 1, 400, 400), dtype=np.float32)  # 160,000 values in JSON text: about 3 MB
    good = {"inputs": [{"name": "image", "shape": list(flat.shape), "datatype": "FP32",
                        "data": [round(float(v), 6) for v in flat.ravel()]}]}
    nested = (b'{"inputs":[{"name":"image","shape":[3000000],"datatype":"FP32","data":[' + b"[0]," * 2_999_999
              + b"[0]]}]}")
    with live_server(model_dir=model_dir, memory_budget_mb=256) as srv:
        url = srv.url + "/v2/models/affine/infer"
        r = httpx.post(url, content=nested, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 413 and "the request's JSON needs about" in r.json()["error"], r.text[:300]
        r = httpx.post(url, json=good, timeout=60)
        assert r.status_code == 200, r.text[:300]
        assert wait_for(lambda: srv.state.admission.reserved_bytes == 0)


# ---- 5. an aborted upload is a client disconnect ----------------------------------------------------

def test_an_aborted_raw_upload_is_counted_as_499_not_500(server) -> None:  # noqa: ANN001
    before = httpx.get(server.url + "/metrics").text
    sock = raw_request(server.url, "POST /v1/rectify?model=affine HTTP/1.1\nHost: x\nContent-Type: image/png\n"
                                   "Content-Length: 100000\n", b"\x89PNG\r\n" + b"\0" * 1000)
    time.sleep(0.2)
    sock.close()

    def counted() -> bool:
        text = httpx.get(server.url + "/metrics").text
        return metric(text, "stn_requests_total", status="499") > metric(before, "stn_requests_total", status="499")

    assert wait_for(counted, 5)
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "stn_requests_total", status="500") == metric(before, "stn_requests_total", status="500")


# ---- 8, 9. abandoned work is cancelled; queue depth counts admitted images ---------------------------

def test_abandoned_work_is_cancelled_and_queue_depth_counts_admitted_images(model_dir: Path) -> None:
    with live_server(model_dir=model_dir, workers=1) as srv:
        n, boundary = 8, "b0undary"
        body = b""
        for i in range(n):
            body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{i}.png\"\r\n"
                     "Content-Type: image/png\r\n\r\n").encode() + png(8, 8) + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        # 2000x2000: 0.1 s (idle core) to seconds (shared machine) of sampling per image, on one worker
        sock = raw_request(srv.url, "POST /v1/rectify?model=affine&size=2000x2000 HTTP/1.1\nHost: x\n"
                                    f"Content-Type: multipart/form-data; boundary={boundary}\n"
                                    f"Content-Length: {len(body)}\n", body)
        try:  # the images are admitted: queue depth counts them, not just those waiting for a batch
            assert wait_for(lambda: metric(httpx.get(srv.url + "/metrics").text, "stn_queue_depth",
                                           model="affine") == n, 20)
        finally:
            sock.close()  # the client leaves
        # one more request runs after whatever the worker still had: by then the rest was skipped
        probe = httpx.post(srv.url + "/v1/rectify", params={"model": "affine"},
                           files={"file": ("p.png", png(8, 8), "image/png")}, timeout=60)
        assert probe.status_code == 200
        text = httpx.get(srv.url + "/metrics").text
        rectified = metric(text, "stn_compute_time_seconds_count", model="affine", stage="rectify") - 1
        assert rectified < n, f"{rectified:.0f} of {n} abandoned images were still sampled"
        assert metric(text, "stn_requests_total", status="499") == 1
        assert metric(text, "stn_queue_depth", model="affine") == 0


# ---- 10. the OpenAPI document matches the responses -------------------------------------------------

def test_openapi_documents_the_real_responses(server) -> None:  # noqa: ANN001
    doc = httpx.get(server.url + "/openapi.json").json()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert "422" not in op["responses"], (method, path)
    rectify = doc["paths"]["/v1/rectify"]["post"]["responses"]
    for code in ("400", "401", "404", "413", "415", "503"):
        assert "application/problem+json" in rectify[code]["content"], code
    assert {"application/json", "image/png", "image/jpeg"} <= set(rectify["200"]["content"])
    meta = doc["paths"]["/v2/models/{name}"]["get"]
    assert [p["name"] for p in meta.get("parameters", [])] == ["name"]
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


# ---- 11. /readyz stays minimal with keys -------------------------------------------------------------

def test_readyz_is_minimal_when_api_keys_are_set(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with live_server(model_dir=tmp_path, api_keys=["k"], strict_readiness=True) as srv:
        r = httpx.get(srv.url + "/readyz")
        assert r.status_code == 503
        assert str(tmp_path) not in r.text and "broken" not in r.text, r.text
        assert set(r.json()) >= {"ready", "loading"} and "failed" not in r.json()
        models = httpx.get(srv.url + "/v1/models", headers={"X-API-Key": "k"}).json()
        assert models["failed"]  # the reason is there, behind the key


# ---- 12. pixel-limit message, no DecompressionBombWarning, filename*= ---------------------------------

def test_pixel_limit_quotes_the_setting_without_pillow_warnings() -> None:
    from service import images

    limits = images.Limits(max_pixels=4000)
    for w in (70, 100):  # between Pillow's warning and error thresholds, and above both
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(images.ImageTooLargeError, match=r"limit is 4000 pixels \(STN_MAX_IMAGE_PIXELS\)"):
                images.decode(png(w, w), limits)
        assert not [c for c in caught if "DecompressionBomb" in c.category.__name__], caught


def test_a_jpeg_with_too_many_scans_gets_400_before_a_worker_decodes_it(server) -> None:  # noqa: ANN001
    """A 66 KB progressive JPEG repeating one 14-byte scan 3,000 times cost a worker about 1 s of decoding (2.2 MB
    of them at 6000x6000: 100 s, and two such uploads held every worker: every other image request got 503 after
    STN_REQUEST_TIMEOUT_S). More than images.MAX_JPEG_SCANS scans is refused with the reason, in milliseconds."""
    from service import images

    bomb = progressive_jpeg(2000, 2000, 3000)
    started = time.perf_counter()
    r = httpx.post(server.url + "/v1/rectify", params={"model": "affine"}, content=bomb,
                   headers={"content-type": "image/jpeg"}, timeout=60)
    assert_problem(r, 400, f"more than {images.MAX_JPEG_SCANS} scans")
    assert time.perf_counter() - started < 0.5, "refused before decoding"
    ok = httpx.post(server.url + "/v1/rectify", params={"model": "affine"}, content=progressive_jpeg(200, 150, 10),
                    headers={"content-type": "image/jpeg"}, timeout=60)
    assert ok.status_code == 200, ok.text


def test_multipart_part_named_only_by_filename_star(server) -> None:  # noqa: ANN001
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            "filename*=UTF-8''%C3%A9t%C3%A9.png\r\nContent-Type: image/png\r\n\r\n").encode()
    body += png(16, 16) + f"\r\n--{boundary}--\r\n".encode()
    r = httpx.post(server.url + "/v1/rectify", params={"model": "affine"}, content=body,
                   headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["filename"] == "été.png"


# ---- operations: X-Request-ID ------------------------------------------------------------------------

def test_request_id_is_echoed_and_in_problems(server) -> None:  # noqa: ANN001
    r = httpx.get(server.url + "/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = httpx.get(server.url + "/healthz").headers["x-request-id"]
    assert len(generated) == 32 and generated != httpx.get(server.url + "/healthz").headers["x-request-id"]
    bad = httpx.post(server.url + "/v1/rectify", params={"size": "nope"}, headers={"X-Request-ID": "r-9"},
                     files={"file": ("a.png", png(8, 8), "image/png")})
    assert bad.status_code == 400 and bad.json()["request_id"] == "r-9" and bad.headers["x-request-id"] == "r-9"
    v2 = httpx.post(server.url + "/v2/models/affine/infer", content=b"[1]", headers={"X-Request-ID": "r-10"})
    assert v2.json()["request_id"] == "r-10" and v2.json()["error"]
    assert json.loads(httpx.get(server.url + "/healthz", headers={"X-Request-ID": "x" * 500}).text)
    assert len(httpx.get(server.url + "/healthz", headers={"X-Request-ID": "x" * 500}).headers["x-request-id"]) == 32

