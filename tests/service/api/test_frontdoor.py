"""The front door (issue 12, defect 6): health, readiness and load shedding answered before FastAPI.

Under ``stn serve``'s protocol (httptools) the door answers from the parser callback; under any
other server (h11 here) its ASGI middleware does. Both are exercised on a real uvicorn with
real sockets.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from test_http_v1 import assert_problem, metric

from tests.service.support import live_server

PATH = "/v1/rectify?model=affine&format=png"


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, "PNG")
    return buf.getvalue()


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_response(reader: io.BufferedReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length framed) from a socket's ``makefile("rb")``."""
    status, headers = read_head(reader)
    return status, headers, reader.read(int(headers["content-length"]))


def read_head(reader: io.BufferedReader) -> tuple[int, dict[str, str]]:
    """A response's status and headers (all of a response to HEAD, which has no body)."""
    status_line = reader.readline()
    assert status_line, "connection closed before a response"
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        k, v = line.decode("latin-1").split(":", 1)
        headers[k.strip().lower()] = v.strip()
    return int(status_line.split()[1]), headers


def hold_upload_slot(url: str) -> socket.socket:
    """A POST whose body never completes: it holds one of STN_MAX_UPLOADS while open."""
    sock = connect(url)
    sock.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
                 .encode() + b"\x89PNG")
    return sock


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_head_is_get_without_the_body_at_the_door_and_in_the_app(model_dir: Path, http: str) -> None:
    """Load balancers and monitors probe with HEAD: every GET route answers it with the GET's status and
    Content-Length and no body (before, 405). The GET that follows on the same connection is framed right."""
    with live_server(model_dir=model_dir, uvicorn={"http": "h11"} if http == "h11" else None) as srv:
        sock = connect(srv.url)
        try:
            reader = sock.makefile("rb")
            for path in ("/healthz", "/readyz", "/v1/models", "/v2/health/ready", "/"):
                sock.sendall(f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                status, headers = read_head(reader)
                assert status == 200 and int(headers["content-length"]) > 0, (path, headers)
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                status, get_headers, body = read_response(reader)
                assert status == 200 and len(body) == int(headers["content-length"]), path
                assert get_headers["content-type"] == headers["content-type"], path
            sock.sendall(b"HEAD /v1/rectify HTTP/1.1\r\nHost: x\r\n\r\n")  # a POST route: not a GET either
            assert read_head(reader)[0] == 405
        finally:
            sock.close()


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_health_and_readiness_keep_the_connection_and_the_app_answers_after(model_dir: Path, http: str) -> None:
    with live_server(model_dir=model_dir, uvicorn={"http": "h11"} if http == "h11" else None) as srv:
        sock = connect(srv.url)
        try:
            reader = sock.makefile("rb")
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: probe-1\r\n\r\n"
                         b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")  # pipelined
            status, headers, body = read_response(reader)
            assert (status, json.loads(body)) == (200, {"status": "live"})
            assert headers["x-request-id"] == "probe-1" and headers.get("connection") != "close"
            status, headers, body = read_response(reader)
            assert status == 200 and json.loads(body)["ready"] is True and len(headers["x-request-id"]) == 32
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")  # the same connection reaches the app
            status, _, body = read_response(reader)
            assert status == 200 and "affine" in {m["name"] for m in json.loads(body)["models"]}
        finally:
            sock.close()
        text = httpx.get(srv.url + "/metrics").text
        assert metric(text, "stn_requests_total", route="/healthz", status="200") >= 1
        assert metric(text, "stn_requests_total", route="/readyz", status="200") >= 1


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_shed_answers_503_before_the_body_and_the_connection_survives(model_dir: Path, http: str) -> None:
    with live_server(model_dir=model_dir, max_uploads=1,
                     uvicorn={"http": "h11"} if http == "h11" else None) as srv:
        holder = hold_upload_slot(srv.url)
        try:
            assert_wait(lambda: srv.state.admission.uploads == 1)
            body = png(16, 16)
            sock = connect(srv.url)
            try:  # the head alone: the 503 comes before any of the body is sent
                sock.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                             f"Content-Length: {len(body)}\r\nX-Request-ID: shed-1\r\n\r\n".encode())
                reader = sock.makefile("rb")
                status, headers, raw = read_response(reader)
                sock.settimeout(5)
                if http == "httptools":  # stn serve's protocol discards the body and keeps the connection:
                    assert "connection" not in headers  # the client's next request (a retry) needs no new one
                    sock.sendall(body + b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")  # pipelined after it
                    again, _, listing = read_response(reader)
                    assert again == 200 and "affine" in listing.decode()
                else:  # the ASGI door (any server) cannot discard a body: it closes
                    sock.sendall(body)
                    assert headers["connection"] == "close"
            finally:
                sock.close()
            assert status == 503 and headers["retry-after"] == "1"
            assert headers["content-type"].startswith("application/problem+json")
            problem = json.loads(raw)
            assert "STN_MAX_UPLOADS" in problem["detail"] and problem["request_id"] == "shed-1"
            assert problem["instance"] == "/v1/rectify" and headers["x-request-id"] == "shed-1"
            v2 = httpx.post(srv.url + "/v2/models/affine/infer", json={"inputs": []})
            assert assert_problem(v2, 503, "STN_MAX_UPLOADS")["error"]  # Triton clients read `error`
            assert httpx.get(srv.url + "/healthz").status_code == 200
        finally:
            holder.close()
        assert_wait(lambda: srv.state.admission.uploads == 0)
        r = httpx.post(srv.url + "/v1/rectify", params={"model": "affine"}, content=png(16, 16),
                       headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        text = httpx.get(srv.url + "/metrics").text
        assert metric(text, "stn_requests_total", route="/v1/rectify", status="503") >= 1


def test_a_shed_request_waiting_for_100_continue_is_closed_and_a_stalled_body_times_out(model_dir: Path) -> None:
    with live_server(model_dir=model_dir, max_uploads=1, body_timeout_s=1.0) as srv:
        holder = hold_upload_slot(srv.url)
        try:
            assert_wait(lambda: srv.state.admission.uploads == 1)
            head = f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n"
            waiting = connect(srv.url)  # it sends no body until 100 Continue, which a shed never gets
            stalled = connect(srv.url)  # it sends a piece of its body, then nothing
            try:
                waiting.sendall((head + "Expect: 100-continue\r\n\r\n").encode())
                stalled.sendall((head + "\r\n").encode() + b"\x89PNG")
                status, headers, _ = read_response(waiting.makefile("rb"))
                assert status == 503 and headers["connection"] == "close"
                waiting.settimeout(5)
                assert waiting.recv(100) == b""  # closed at once, not after the body timeout
                reader = stalled.makefile("rb")
                status, headers, _ = read_response(reader)
                assert status == 503 and "connection" not in headers
                started = time.monotonic()
                stalled.settimeout(10)
                assert reader.read(1) == b""  # closed by the body timeout (1 s), not held open
                assert time.monotonic() - started < 5
            finally:
                waiting.close()
                stalled.close()
        finally:
            holder.close()


def test_a_full_queue_is_shed_at_the_door_for_that_model_only(model_dir: Path) -> None:
    with live_server(model_dir=model_dir, max_queue_size=1, workers=1) as srv:
        slow: dict[str, httpx.Response] = {}

        def occupy() -> None:  # one image at a large output size keeps the queue of `affine` full a while
            slow["r"] = httpx.post(srv.url + "/v1/rectify", params={"model": "affine", "size": "2500x2500"},
                                   content=png(8, 8), headers={"content-type": "image/png"}, timeout=60)

        t = threading.Thread(target=occupy)
        t.start()
        try:
            assert_wait(lambda: srv.state.inflight.get("affine", 0) == 1)
            shed = httpx.post(srv.url + PATH, content=png(8, 8), headers={"content-type": "image/png"})
            assert_problem(shed, 503, "queue of model 'affine' is full")
            other = httpx.post(srv.url + "/v1/rectify", params={"model": "projective"}, content=png(8, 8),
                               headers={"content-type": "image/png"}, timeout=60)  # admitted: waits for the worker
            assert other.status_code == 200, other.text
        finally:
            t.join(60)
        assert slow["r"].status_code == 200, slow["r"].text


def test_requests_still_uploading_count_so_the_door_sheds_before_the_next_body(model_dir: Path) -> None:
    """Two requests admitted and still sending their bodies fill a queue of 2: the third is shed at the door,
    from its head alone (before: admission counted images only once a body was in, so the third got through
    the door, was read, and only then answered 503 from the route)."""
    with live_server(model_dir=model_dir, max_queue_size=2, max_uploads=8) as srv:
        holders = [hold_upload_slot(srv.url) for _ in range(2)]
        try:
            assert_wait(lambda: srv.state.admission.uploads == 2)
            assert metric(httpx.get(srv.url + "/metrics").text, "stn_queue_depth", model="affine") == 2
            sock = connect(srv.url)
            try:
                sock.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                             "Content-Length: 100000\r\n\r\n".encode())  # no body is ever sent
                status, headers, raw = read_response(sock.makefile("rb"))
            finally:
                sock.close()
            assert status == 503 and "queue of model 'affine' is full (2 of 2" in json.loads(raw)["detail"]
            assert srv.state.admission.uploads == 2  # it never became an upload
        finally:
            for h in holders:
                h.close()
        assert_wait(lambda: srv.state.inflight.get("affine", 0) == 0 and srv.state.admission.uploads == 0)
        r = httpx.post(srv.url + "/v1/rectify", params={"model": "affine"}, content=png(16, 16),
                       headers={"content-type": "image/png"}, timeout=60)
        assert r.status_code == 200, r.text


def assert_wait(cond, timeout: float = 10.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
