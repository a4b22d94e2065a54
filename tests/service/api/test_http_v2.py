"""Open Inference Protocol (KServe v2) with the real tritonclient[http] against the real server."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image
from test_runtime_pipeline import smooth_image

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture()
def client(server):  # noqa: ANN001, ANN201
    c = tritonclient_http.InferenceServerClient(server.url.removeprefix("http://"))
    yield c
    c.close()


def test_health_and_metadata(client) -> None:  # noqa: ANN001
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tps") and not client.is_model_ready("nope")
    meta = client.get_model_metadata("projective")
    assert meta["name"] == "projective" and meta["versions"] == ["1"]
    assert meta["inputs"][0] == {"name": "image", "datatype": "FP32", "shape": [-1, 3, -1, -1]}
    assert {o["name"] for o in meta["outputs"]} == {"rectified", "theta"}
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("nope")


def normalized(src_u8: np.ndarray, meta: dict) -> np.ndarray:
    mean = np.asarray(meta["parameters"]["mean"], np.float32).reshape(-1, 1, 1)
    std = np.asarray(meta["parameters"]["std"], np.float32).reshape(-1, 1, 1)
    x = src_u8.astype(np.float32) / 255.0
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    return ((x - mean) / std).astype(np.float32)


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("model", ["affine", "projective", "tps"])
def test_tritonclient_round_trip_matches_v1(server, client, model: str, binary: bool) -> None:  # noqa: ANN001
    meta = client.get_model_metadata(model)
    c = meta["inputs"][0]["shape"][1]
    srcs = [smooth_image(70, 90, c, seed=s) for s in (1, 2)]
    batch = np.stack([normalized(s, meta) for s in srcs])
    inp = tritonclient_http.InferInput("image", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch, binary_data=binary)
    outs = [tritonclient_http.InferRequestedOutput(n, binary_data=binary) for n in ("rectified", "theta")]
    result = client.infer(model, [inp], outputs=outs)
    rectified, theta = result.as_numpy("rectified"), result.as_numpy("theta")
    assert rectified.shape == (2, c, *meta["outputs"][0]["shape"][2:])

    for i, src in enumerate(srcs):
        buf = io.BytesIO()
        Image.fromarray(src).save(buf, "PNG")
        res = httpx.post(server.url + f"/v1/rectify?model={model}", content=buf.getvalue(),
                         headers={"content-type": "image/png"}).json()["results"][0]
        np.testing.assert_allclose(theta[i], np.asarray(res["theta"]), atol=1e-4)
        # v1 samples the raw image (black padding); v2 the normalized one (0 padding): compare inside
        v1 = np.asarray(Image.open(io.BytesIO(base64.b64decode(res["image"])))).astype(np.float32) / 255
        v1 = v1[None] if v1.ndim == 2 else v1.transpose(2, 0, 1)
        mean = np.asarray(meta["parameters"]["mean"]).reshape(-1, 1, 1)
        std = np.asarray(meta["parameters"]["std"]).reshape(-1, 1, 1)
        v2 = rectified[i] * std + mean
        inside = np.abs(rectified[i]) > 0  # padded samples are exactly 0 in v2
        interior = np.zeros_like(inside)
        interior[:, 2:-2, 2:-2] = inside[:, 2:-2, 2:-2]
        assert interior.mean() > 0.5
        assert np.abs(v2 - v1)[interior].max() <= 1.5 / 255


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_compressed_requests_are_inflated(client, algorithm: str) -> None:  # noqa: ANN001
    """tritonclient compresses request bodies on request (`request_compression_algorithm`), as Triton accepts:
    the same answer as uncompressed (before: 400, the compressed bytes read as JSON)."""
    x = np.stack([normalized(smooth_image(40, 50, 1, seed=3), client.get_model_metadata("affine"))])
    results = []
    for kw in ({}, {"request_compression_algorithm": algorithm}):
        inp = tritonclient_http.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        results.append(client.infer("affine", [inp], **kw).as_numpy("theta"))
    np.testing.assert_array_equal(results[0], results[1])


def test_compressed_bodies_are_bounded_and_unknown_encodings_refused(model_dir) -> None:  # noqa: ANN001
    """A gzip body that inflates past the request limit gets 413 without inflating it all (a bomb: about 1 MB of
    spaces per kB sent); a corrupt one 400; an encoding other than gzip and deflate 415, as does any encoding of an
    image sent to /v1 (images are compressed already)."""
    import gzip

    from tests.service.support import live_server

    with live_server(model_dir=model_dir, max_upload_bytes=2**20, max_files=2) as srv:
        url = srv.url + "/v2/models/affine/infer"
        cap = 2 * 2**20 + 64 * 1024
        bomb = gzip.compress(b"[" + b" " * (cap + 1024) + b"]", compresslevel=9)
        assert len(bomb) < cap // 500
        r = httpx.post(url, content=bomb, headers={"content-type": "application/json", "content-encoding": "gzip"})
        assert r.status_code == 413 and "inflates to more than" in r.json()["error"], r.text
        r = httpx.post(url, content=b"\x1f\x8b not gzip", headers={"content-encoding": "gzip"})
        assert r.status_code == 400 and "does not inflate" in r.json()["error"], r.text
        r = httpx.post(url, content=b"{}", headers={"content-encoding": "br"})
        assert r.status_code == 415 and "'br'" in r.json()["error"], r.text
        buf = io.BytesIO()
        Image.new("L", (40, 30)).save(buf, "PNG")
        r = httpx.post(srv.url + "/v1/rectify?model=affine", content=gzip.compress(buf.getvalue()),
                       headers={"content-type": "image/png", "content-encoding": "gzip"})
        assert r.status_code == 415 and "Content-Encoding 'gzip'" in r.json()["detail"], r.text


def test_infer_errors(client) -> None:  # noqa: ANN001
    x = np.zeros((1, 3, 20, 20), np.float32)  # affine takes one channel
    inp = tritonclient_http.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="channel"):
        client.infer("affine", [inp])
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("nope", [inp])


def test_raw_json_infer(server) -> None:  # noqa: ANN001
    body = {"id": "r1", "inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8],
                                    "data": [0.0] * 64}]}
    r = httpx.post(server.url + "/v2/models/affine/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "r1" and out["model_name"] == "affine"
    shapes = {o["name"]: o["shape"] for o in out["outputs"]}
    assert shapes == {"rectified": [1, 1, 42, 42], "theta": [1, 2, 3]}
    bad = httpx.post(server.url + "/v2/models/affine/infer", content=b"{nope", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "error" in bad.json()
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200
    assert httpx.get(server.url + "/v2").json()["extensions"] == ["binary_tensor_data", "model_repository",
                                                                  "model_configuration", "statistics"]


def test_infer_body_limit(model_dir) -> None:  # noqa: ANN001
    from tests.service.support import live_server

    with live_server(model_dir=model_dir, max_upload_bytes=1000, max_files=1) as srv:
        big = np.zeros((1, 1, 200, 200), np.float32)
        body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(big.shape), "data": big.ravel().tolist()}]}
        r = httpx.post(srv.url + "/v2/models/affine/infer", json=body)
        assert r.status_code == 413 and "error" in r.json()

        def chunks():  # no Content-Length: chunked transfer encoding
            yield b'{"inputs": ['
            for _ in range(100):
                yield b" " * 1000

        r = httpx.post(srv.url + "/v2/models/affine/infer", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
