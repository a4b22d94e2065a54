"""The model repository while serving (Triton's repository extension, STN_MODEL_POLL_S), model config and
statistics, with the real tritonclient[http] against the real server on real files in its model folder."""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_http_v1 import encode
from test_runtime_pipeline import smooth_image

from tests.service.support import MODEL_SPECS, export_model, live_server

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402


def key() -> dict[str, str]:
    return {"X-API-Key": "k1"}  # a new dict each call: tritonclient adds its own headers to the one it is given


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The bytes of two versions of one small gray affine model (other weights, version "1" and "2")."""
    d = tmp_path_factory.mktemp("versions")
    return {v: export_model(d / f"v{v}.onnx", "m", seed=10 + int(v), version=v, **MODEL_SPECS["affine"]).read_bytes()
            for v in ("1", "2")}


def write(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically (what a deploy tool does: write beside it, then rename)."""
    tmp = path.with_suffix(".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def wait_for(predicate, timeout: float = 20.0, what: str = "") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def infer(client, x: np.ndarray, **kw):  # noqa: ANN001, ANN201
    inp = tritonclient_http.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("m", [inp], headers=key(), **kw)


def test_tritonclient_repository_config_and_statistics(tmp_path: Path, versions: dict[str, bytes]) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    write(folder / "m.onnx", versions["1"])
    with live_server(model_dir=folder, api_keys="k1", max_queue_delay_ms=1) as srv:
        client = tritonclient_http.InferenceServerClient(srv.url.removeprefix("http://"))
        try:
            # API keys guard the repository like the rest of /v2; every error carries `error`
            with pytest.raises(InferenceServerException, match="API key"):
                client.get_model_repository_index()
            r = httpx.post(srv.url + "/v2/repository/models/m/unload")
            assert r.status_code == 401 and "error" in r.json()

            assert client.get_model_repository_index(headers=key()) == [
                {"name": "m", "version": "1", "state": "READY", "reason": ""}]
            meta = client.get_server_metadata(headers=key())
            assert {"model_repository", "statistics", "model_configuration"} <= set(meta["extensions"])

            config = client.get_model_config("m", headers=key())
            assert config["name"] == "m" and config["platform"] == "onnxruntime_onnx"
            assert config["input"] == [{"name": "image", "data_type": "TYPE_FP32", "format": "FORMAT_NCHW",
                                        "dims": [1, -1, -1]}]
            assert config["output"][0] == {"name": "rectified", "data_type": "TYPE_FP32", "dims": [1, 42, 42]}
            assert config["output"][1]["dims"] == [2, 3]
            assert config["max_batch_size"] == srv.state.settings.max_files
            assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 256
            with pytest.raises(InferenceServerException, match="unknown model"):
                client.get_model_config("nope", headers=key())

            # statistics: two successes (3 images), one failure, in Triton's shape
            x = np.zeros((2, 1, 30, 30), np.float32)
            infer(client, x)
            infer(client, x[:1])
            with pytest.raises(InferenceServerException, match="1 channel"):
                infer(client, np.zeros((1, 3, 30, 30), np.float32))
            stats = client.get_inference_statistics("m", headers=key())["model_stats"]
            assert [(s["name"], s["version"]) for s in stats] == [("m", "1")]
            s = stats[0]
            assert s["inference_stats"]["success"]["count"] == 2 and s["inference_stats"]["success"]["ns"] > 0
            assert s["inference_stats"]["fail"]["count"] == 1
            assert s["inference_count"] == 3 and s["execution_count"] >= 1 and s["last_inference"] > 0
            assert s["inference_stats"]["compute_infer"]["count"] == s["execution_count"]
            assert sum(b["compute_infer"]["count"] for b in s["batch_stats"]) == s["execution_count"]
            assert client.get_inference_statistics(headers=key())["model_stats"][0]["name"] == "m"

            # reload with a new version: loaded, warmed, then serving
            write(folder / "m.onnx", versions["2"])
            client.load_model("m", headers=key())
            assert client.get_model_metadata("m", headers=key())["versions"] == ["2"]
            assert infer(client, x).get_response()["model_version"] == "2"

            # a broken replacement: 400 with the reason; version 2 keeps serving, the reason is reported
            write(folder / "m.onnx", versions["1"][: len(versions["1"]) // 2])
            with pytest.raises(InferenceServerException, match="failed to load 'm'") as e:
                client.load_model("m", headers=key())
            assert e.value.status() == "400"
            assert infer(client, x).get_response()["model_version"] == "2"
            (entry,) = client.get_model_repository_index(headers=key())
            assert entry["state"] == "READY" and entry["version"] == "2"
            assert "still serving version 2" in entry["reason"] and "not a readable ONNX" in entry["reason"]
            (listed,) = httpx.get(srv.url + "/v1/models", headers=key()).json()["models"]
            assert listed["version"] == "2" and "not a readable ONNX" in listed["load_error"]
            with pytest.raises(InferenceServerException, match="not supported"):
                client.load_model("m", headers=key(), config="{}")

            # unload: the model is gone from /v2 and from the metrics; loading again works
            client.unload_model("m", headers=key())
            assert not client.is_model_ready("m", headers=key())
            with pytest.raises(InferenceServerException, match="unknown model"):
                infer(client, x)
            assert client.get_model_repository_index(headers=key()) == [
                {"name": "m", "state": "UNAVAILABLE", "reason": "unloaded"}]
            assert client.get_model_repository_index(headers=key(), query_params=None) != []
            assert httpx.post(srv.url + "/v2/repository/index", json={"ready": True}, headers=key()).json() == []
            wait_for(lambda: 'stn_queue_depth{model="m"}' not in httpx.get(srv.url + "/metrics").text,
                     what="the unloaded model's queue depth to leave /metrics")
            assert "m" not in srv.state.batchers and "m" not in srv.state.inflight
            assert httpx.get(srv.url + "/readyz").status_code == 503  # nothing is served now
            assert "\nstn_ready 0.0" in httpx.get(srv.url + "/metrics").text

            with pytest.raises(InferenceServerException, match="no model file nope.onnx"):
                client.load_model("nope", headers=key())
            r = httpx.post(srv.url + "/v2/repository/models/a..b%2F/load", headers=key())
            assert r.status_code in (400, 404) and "error" in r.json()
            r = httpx.post(srv.url + "/v2/repository/index", content=b"[1]", headers=key())
            assert r.status_code == 400 and "error" in r.json()
            with pytest.raises(InferenceServerException, match="failed to load"):
                client.load_model("m", headers=key())  # still the truncated file
            write(folder / "m.onnx", versions["1"])
            client.load_model("m", headers=key())
            assert client.is_model_ready("m", headers=key())
            assert infer(client, x).get_response()["model_version"] == "1"
            assert httpx.get(srv.url + "/readyz").status_code == 200
            assert "\nstn_ready 1.0" in httpx.get(srv.url + "/metrics").text
        finally:
            client.close()


def test_polling_swaps_versions_under_traffic(tmp_path: Path, versions: dict[str, bytes]) -> None:
    """Real files copied into the watched folder mid-traffic: every request succeeds, each on one version;
    a half-copied file is never served (the old version keeps serving); a new file appears, a removed one goes."""
    folder = tmp_path / "models"
    folder.mkdir()
    write(folder / "m.onnx", versions["1"])
    png = encode(smooth_image(60, 80, 1, seed=3), "PNG")
    with live_server(model_dir=folder, model_poll_s=0.1, max_queue_delay_ms=1) as srv:
        seen: dict[int, list[tuple[int, str, np.ndarray | None]]] = defaultdict(list)
        stop = threading.Event()

        def traffic(worker: int) -> None:
            deadline = time.monotonic() + 90
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                while not stop.is_set() and time.monotonic() < deadline and len(seen[worker]) < 5000:
                    r = c.post("/v1/rectify?model=m", content=png, headers={"content-type": "image/png"})
                    body = r.json()
                    version = body.get("model_version", "")
                    theta = np.asarray(body["results"][0]["theta"]).ravel() if r.status_code == 200 else None
                    seen[worker].append((r.status_code, version, theta))

        threads = [threading.Thread(target=traffic, args=(i,), daemon=True) for i in range(3)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: all(len(seen[i]) >= 3 for i in range(3)), what="traffic")
            # a copy that stalls half way: tried once it is stable, fails its load, version 1 keeps serving
            (folder / "m.onnx").write_bytes(versions["2"][: len(versions["2"]) // 2])
            wait_for(lambda: "m" in srv.state.repository.errors, what="the half file's load to fail")
            assert srv.state.models["m"].info.version == "1"
            index = httpx.post(srv.url + "/v2/repository/index").json()
            assert index[0]["state"] == "READY" and "still serving version 1" in index[0]["reason"]
            # the copy completes (written in place, not renamed): loaded once stable, then it serves
            with (folder / "m.onnx").open("ab") as f:
                f.write(versions["2"][len(versions["2"]) // 2:])
            wait_for(lambda: any(v == "2" for w in seen.values() for _, v, _ in w[-3:]), what="version 2")
            assert "m" not in srv.state.repository.errors
            # a new model file appears, then is removed
            write(folder / "n.onnx", versions["1"])
            wait_for(lambda: "n" in srv.state.models, what="the new model n")
            assert httpx.get(srv.url + "/v2/models/n/ready").status_code == 200
            (folder / "n.onnx").unlink()
            wait_for(lambda: "n" not in srv.state.models, what="n to be unloaded")
            assert httpx.get(srv.url + "/v2/models/n/ready").status_code == 404
            # the folder itself vanishing (an unmounted volume) unloads nothing
            folder.rename(tmp_path / "away")
            time.sleep(0.5)
            assert "m" in srv.state.models
            (tmp_path / "away").rename(folder)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=35)
        results = [r for w in seen.values() for r in w]
        assert {status for status, _, _ in results} == {200}, [r[:2] for r in results if r[0] != 200][:5]
        thetas: dict[str, list] = defaultdict(list)
        for _, version, theta in results:
            thetas[version].append(theta)
        # each version's localiser gave one theta for this image: no request mixed two versions
        assert set(thetas) == {"1", "2"}
        spread = {v: np.ptp(np.stack(t), axis=0).max() for v, t in thetas.items()}
        assert max(spread.values()) < 1e-4, spread
        assert np.abs(thetas["1"][0] - thetas["2"][0]).max() > 1e-3
        for w in seen.values():  # one client's requests switch versions once, never back
            order = [v for _, v, _ in w]
            assert order == sorted(order)


def test_a_folder_moved_while_it_is_listed_unloads_nothing(tmp_path: Path, versions: dict[str, bytes]) -> None:
    """The race behind a flaky CI run: the folder was there when the poller looked, then renamed away before the
    listing, which came back empty. That must read as "folder missing", never as "every model removed"."""
    folder = tmp_path / "models"
    folder.mkdir()
    write(folder / "m.onnx", versions["1"])
    with live_server(model_dir=folder, model_poll_s=0.05, max_queue_delay_ms=1) as srv:
        repo = srv.state.repository
        original = repo.files
        moved = threading.Event()

        def files_then_the_folder_moves() -> dict[str, Path]:
            if moved.is_set():
                return original()
            folder.rename(tmp_path / "away")  # the unmount lands between the poller's look and its listing
            moved.set()
            return original()

        repo.files = files_then_the_folder_moves
        try:
            wait_for(moved.is_set, what="a poll to list the folder")
            time.sleep(0.3)  # several more polls with the folder gone
            assert "m" in srv.state.models
            assert httpx.get(srv.url + "/v2/models/m/ready").status_code == 200
        finally:
            repo.files = original
            (tmp_path / "away").rename(folder)
        time.sleep(0.3)  # back: still the same version, nothing reloaded or lost
        assert srv.state.models["m"].info.version == "1"
