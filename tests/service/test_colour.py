"""Colour in and out, for every model: the sampler reads the upload in its own colour.

A real server (uvicorn on 127.0.0.1) and real batch jobs, on real PNG/JPEG files, with a gray
localiser (the test's ``affine`` model and any bundled gray model) and RGB localisers (the
test's ``projective`` model and an identity RGB model exported here). Results are checked
against OpenCV (``warpAffine``/``warpPerspective`` with ``input_px_from_output_px`` and
``WARP_INVERSE_MAP``) on the upload in its own colour, so a lost or swapped channel fails.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import cv2
import httpx
import numpy as np
import onnx
import pytest
from PIL import Image
from test_images_io import png16

from export.metadata import ModelInfo, read_props
from service import images, pipeline
from service.batch.run import BatchConfig, run_job
from service.runtime import SessionConfig, load_model
from tests.service.support import live_server

ROOT = Path(__file__).resolve().parents[2]
CPU = ("CPUExecutionProvider",)


def bundled_gray_models() -> list[Path]:
    """Bundled models (anywhere under models/) whose localiser is grayscale."""
    out = []
    for p in sorted((ROOT / "models").rglob("*.onnx")):
        info = ModelInfo.from_props(read_props(onnx.load(str(p), load_external_data=False)))
        if info.in_channels == 1:
            out.append(p)
    return out


BUNDLED_GRAY = bundled_gray_models()


def export_identity(path: Path, name: str, **cfg: object) -> Path:
    """An untrained STN as initialised (the localiser's last layer regresses the identity), exported."""
    import torch

    from export.onnx_export import export_onnx, info_for
    from models.stn import SpatialTransformer, STNConfig

    torch.manual_seed(0)
    m = SpatialTransformer(STNConfig(**cfg))
    export_onnx(m, path, info_for(m, {}, "onnx", name, "1", "tests/service/test_colour.py"))
    return path


@pytest.fixture(scope="module")
def colour_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gray (gray localiser), rgb (RGB localiser), rgbid (RGB, identity), bundled (the bundled gray model)."""
    d = tmp_path_factory.mktemp("colour-models")
    shutil.copy(model_dir / "affine.onnx", d / "gray.onnx")
    shutil.copy(model_dir / "projective.onnx", d / "rgb.onnx")
    export_identity(d / "rgbid.onnx", "rgbid", transform="affine", in_channels=3, loc_size=(32, 32),
                    output_size=(48, 64), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    if BUNDLED_GRAY:
        shutil.copy(BUNDLED_GRAY[0], d / "bundled.onnx")
    return d


@pytest.fixture(scope="module")
def srv(colour_dir: Path):  # noqa: ANN201
    with live_server(model_dir=colour_dir, max_queue_delay_ms=5, workers=2) as s:
        yield s


GRAY_MODELS = ["gray"] + (["bundled"] if BUNDLED_GRAY else [])
ALL_MODELS = GRAY_MODELS + ["rgb", "rgbid"]


# ---- images ------------------------------------------------------------------------------------

def smooth(h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    """float32 [h, w, c] in [0, 1], independent smooth channels (a swapped or dropped channel shows)."""
    rng = np.random.default_rng(seed)
    a = cv2.GaussianBlur(rng.random((h, w, c)).astype(np.float32), (0, 0), 4).reshape(h, w, c)
    lo, hi = a.min(axis=(0, 1)), a.max(axis=(0, 1))
    return (a - lo) / (hi - lo)


def rgb_blocks(h: int = 48, w: int = 64) -> np.ndarray:
    """uint8 [h, w, 3]: red, green, blue and white quadrants."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (255, 0, 0)
    a[: h // 2, w // 2:] = (0, 255, 0)
    a[h // 2:, : w // 2] = (0, 0, 255)
    a[h // 2:, w // 2:] = (255, 255, 255)
    return a


def pil_bytes(a: np.ndarray, fmt: str = "PNG", mode: str | None = None, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, mode).save(buf, fmt, **kw)
    return buf.getvalue()


def read_image(data: bytes) -> tuple[np.ndarray, int]:
    """Encoded PNG/JPEG -> (float [C, h, w] in [0, 1] in RGB order, bit depth), read by OpenCV (PIL reads 16-bit
    RGB as 8 bits)."""
    a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert a is not None
    bits = 16 if a.dtype == np.uint16 else 8
    f = a.astype(np.float64) / (65535.0 if bits == 16 else 255.0)
    if f.ndim == 2:
        return f[None], bits
    return f[..., ::-1].transpose(2, 0, 1).copy(), bits


def reference(src: np.ndarray, matrix: list[list[float]], out_size: tuple[int, int]) -> np.ndarray:
    """OpenCV on the float [h, w] or [h, w, c] source, border 0 -> [C, h, w] (as tests/service does)."""
    h, w = out_size
    m = np.asarray(matrix, np.float64)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    src = src.astype(np.float32)
    out = (cv2.warpAffine(src, m[:2], (w, h), flags=flags) if np.allclose(m[2], [0, 0, 1])
           else cv2.warpPerspective(src, m, (w, h), flags=flags))
    return out[None] if out.ndim == 2 else out.transpose(2, 0, 1)


def post(srv, model: str, data: bytes, ctype: str = "image/png", **params: str) -> httpx.Response:  # noqa: ANN001
    r = httpx.post(srv.url + "/v1/rectify", params={"model": model, **params}, content=data,
                   headers={"content-type": ctype}, timeout=30)
    assert r.status_code == 200, r.text
    return r


def result_of(r: httpx.Response) -> tuple[dict, np.ndarray, int]:
    [res] = r.json()["results"]
    img, bits = read_image(base64.b64decode(res["image"]))
    return res, img, bits


# ---- HTTP ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ALL_MODELS)
def test_rgb_upload_comes_back_rgb(srv, model: str) -> None:  # noqa: ANN001
    src = smooth(97, 131, 3, seed=1)
    u8 = (src * 255 + 0.5).astype(np.uint8)
    res, got, bits = result_of(post(srv, model, pil_bytes(u8), size="64x48"))
    assert got.shape == (3, 48, 64) and bits == 8
    ref = reference(u8 / 255.0, res["input_px_from_output_px"], (48, 64))
    assert np.abs(got - ref).max() <= 1.5 / 255  # PNG quantization only: every channel is the upload's


@pytest.mark.parametrize("model", ALL_MODELS)
def test_gray_upload_stays_gray(srv, model: str) -> None:  # noqa: ANN001
    u8 = (smooth(80, 100, 1, seed=2)[..., 0] * 255 + 0.5).astype(np.uint8)
    for fmt in ("json", "png", "jpeg"):
        r = post(srv, model, pil_bytes(u8), size="50x40", **({} if fmt == "json" else {"format": fmt}))
        if fmt == "json":
            res, got, _ = result_of(r)
            matrix = res["input_px_from_output_px"]
        else:
            got, _ = read_image(r.content)
            matrix = json.loads(r.headers["x-stn-input-px-from-output-px"])
            with Image.open(io.BytesIO(r.content)) as im:
                assert im.mode == "L" and im.format == fmt.upper()
        assert got.shape == (1, 40, 50), fmt
        ref = reference(u8 / 255.0, matrix, (40, 50))
        assert np.abs(got - ref).max() <= (0.08 if fmt == "jpeg" else 1.5 / 255), fmt


def test_identity_reproduces_red_green_blue(srv) -> None:  # noqa: ANN001
    """An identity RGB model at the upload's size gives the upload back, colours and all (PNG and JPEG)."""
    src = rgb_blocks()
    res, got, _ = result_of(post(srv, "rgbid", pil_bytes(src)))
    assert (res["width"], res["height"]) == (64, 48)
    np.testing.assert_allclose(res["input_px_from_output_px"], np.eye(3), atol=1e-6)
    np.testing.assert_allclose(got, src.transpose(2, 0, 1) / 255.0, atol=0.5 / 255)
    jpeg, _ = read_image(post(srv, "rgbid", pil_bytes(src), format="jpeg").content)
    for (y, x), colour in {(10, 10): (1, 0, 0), (10, 50): (0, 1, 0), (40, 10): (0, 0, 1), (40, 50): (1, 1, 1)}.items():
        np.testing.assert_allclose(jpeg[:, y, x], colour, atol=0.1)


@pytest.mark.parametrize("model", ["gray", "rgb"])
def test_rgba_is_composited_on_white(srv, model: str) -> None:  # noqa: ANN001
    src = smooth(60, 90, 3, seed=3)
    alpha = np.zeros((60, 90), np.float32)
    alpha[:, 45:] = 1.0
    alpha[:30, :45] = 0.5
    rgba = (np.dstack([src, alpha]) * 255 + 0.5).astype(np.uint8)
    res, got, _ = result_of(post(srv, model, pil_bytes(rgba), size="64x48"))
    a = rgba[..., 3:] / 255.0
    on_white = rgba[..., :3] / 255.0 * a + (1 - a)
    assert got.shape == (3, 48, 64)
    ref = reference(on_white, res["input_px_from_output_px"], (48, 64))
    assert np.abs(got - ref).max() <= 1.5 / 255
    _, ident, _ = result_of(post(srv, "rgbid", pil_bytes(rgba), size="90x60"))
    assert np.all(ident[:, 30:, :40] > 1 - 1 / 255)  # fully transparent: white


@pytest.mark.parametrize("model", ["gray", "rgb"])
@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_png_keeps_its_precision(srv, model: str, channels: int) -> None:  # noqa: ANN001
    src = smooth(96, 128, channels, seed=4)
    a16 = (src * 65535 + 0.5).astype(np.uint16)
    data = png16(a16[..., 0] if channels == 1 else a16)
    res, got, bits = result_of(post(srv, model, data, size="64x48"))
    assert bits == 16 and got.shape == (channels, 48, 64)
    assert all(len(np.unique(got[c])) > 256 for c in range(channels))  # more levels than 8 bits have
    ref = reference(a16 / 65535.0, res["input_px_from_output_px"], (48, 64))
    assert np.abs(got - ref).max() < 2e-4  # an 8-bit step is 39e-4
    # exactly the server's float result, rounded to 16 bits
    rt = srv.state.models[model]
    [r] = pipeline.rectify_images(rt, [("x.png", data)], images.Limits(), (48, 64))
    assert r.bits == 16 and np.abs(got - r.image).max() <= 0.5 / 65535 + 1e-7
    png = post(srv, model, data, size="64x48", format="png").content
    assert png[24] == 16 and np.array_equal(read_image(png)[0], got)  # IHDR bit depth
    jpeg = post(srv, model, data, size="64x48", format="jpeg").content
    with Image.open(io.BytesIO(jpeg)) as im:
        assert im.format == "JPEG" and im.mode == ("L" if channels == 1 else "RGB")
    assert np.abs(read_image(jpeg)[0] - ref).mean() < 0.03  # JPEG: 8 bits, subsampled chroma


@pytest.mark.parametrize("model", GRAY_MODELS)
def test_gray_localiser_sees_the_luma_of_a_colour_upload(srv, model: str) -> None:  # noqa: ANN001
    u8 = (smooth(70, 90, 3, seed=5) * 255 + 0.5).astype(np.uint8)
    colour = result_of(post(srv, model, pil_bytes(u8)))[0]
    gray = result_of(post(srv, model, pil_bytes(np.asarray(Image.fromarray(u8).convert("L")))))[0]
    np.testing.assert_allclose(colour["theta"], gray["theta"], atol=2e-3)  # PIL's luma rounds to 8 bits


def test_rgb_localiser_sees_a_gray_upload_replicated(srv) -> None:  # noqa: ANN001
    u8 = (smooth(70, 90, 1, seed=6)[..., 0] * 255 + 0.5).astype(np.uint8)
    gray = result_of(post(srv, "rgb", pil_bytes(u8)))
    rgb = result_of(post(srv, "rgb", pil_bytes(np.dstack([u8, u8, u8]))))
    np.testing.assert_allclose(gray[0]["theta"], rgb[0]["theta"], atol=1e-6)
    assert gray[1].shape[0] == 1 and rgb[1].shape[0] == 3
    np.testing.assert_allclose(np.repeat(gray[1], 3, axis=0), rgb[1], atol=1e-9)


def test_open_inference_protocol_keeps_the_model_channels(srv) -> None:  # noqa: ANN001
    def infer(model: str, c: int) -> httpx.Response:
        body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, c, 8, 8], "data": [0.0] * (c * 64)}]}
        return httpx.post(srv.url + f"/v2/models/{model}/infer", json=body, timeout=30)

    r = infer("gray", 1)
    assert r.status_code == 200
    assert {o["name"]: o["shape"] for o in r.json()["outputs"]}["rectified"] == [1, 1, 42, 42]
    assert infer("gray", 3).status_code == 400 and infer("rgb", 1).status_code == 400


# ---- batch ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def colour_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("colour-in")
    rgb = smooth(60, 80, 3, seed=7)
    (d / "rgb.png").write_bytes(pil_bytes((rgb * 255 + 0.5).astype(np.uint8)))
    (d / "gray.png").write_bytes(pil_bytes((rgb[..., 0] * 255 + 0.5).astype(np.uint8)))
    rgba = np.dstack([rgb, np.tile(np.linspace(0, 1, 80, dtype=np.float32), (60, 1))])
    (d / "rgba.png").write_bytes(pil_bytes((rgba * 255 + 0.5).astype(np.uint8)))
    (d / "gray16.png").write_bytes(png16((rgb[..., 1] * 65535 + 0.5).astype(np.uint16)))
    (d / "rgb16.png").write_bytes(png16((rgb * 65535 + 0.5).astype(np.uint16)))
    return d


EXPECTED = {"rgb.png": (3, 8), "gray.png": (1, 8), "rgba.png": (3, 8), "gray16.png": (1, 16), "rgb16.png": (3, 16)}


def _check_batch_outputs(inputs: Path, out: Path, model_path: Path, size: tuple[int, int]) -> None:
    records = {json.loads(line)["source"]: json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()}
    assert set(records) == set(EXPECTED) and (out / "errors.jsonl").read_text() == ""
    rt = load_model(model_path, SessionConfig(providers=CPU))
    for name, (c, bits) in EXPECTED.items():
        data = (out / records[name]["output"]).read_bytes()
        got, got_bits = read_image(data)
        assert (got.shape[0], got_bits) == (c, bits), name
        assert got.shape[1:] == size
        decoded = images.decode((inputs / name).read_bytes(), images.Limits())
        src = decoded.array.transpose(1, 2, 0)
        ref = reference(src if c == 3 else src[..., 0], records[name]["input_px_from_output_px"], size)
        assert np.abs(got - ref).max() < (2e-4 if bits == 16 else 1.5 / 255), name
        if bits == 16:
            assert all(len(np.unique(got[k])) > 256 for k in range(c)), name
        # the same bytes as the server's code path
        [r] = pipeline.rectify_images(rt, [(name, (inputs / name).read_bytes())], images.Limits(), size)
        assert data == images.encode(r.image, "png", bits=r.bits), name


@pytest.mark.parametrize("model", ["gray", "rgb"])
def test_batch_writes_each_image_in_its_own_colour(colour_dir, colour_inputs, tmp_path, model) -> None:  # noqa: ANN001
    out = tmp_path / "out"
    s = run_job(BatchConfig(input=str(colour_inputs), output=str(out), model=str(colour_dir / f"{model}.onnx"),
                            providers=CPU, progress=False, batch_size=2, workers=2, size=(40, 56)))
    assert (s.ok, s.failed) == (5, 0)
    _check_batch_outputs(colour_inputs, out, colour_dir / f"{model}.onnx", (40, 56))
    jpeg = tmp_path / "jpeg"
    run_job(BatchConfig(input=str(colour_inputs), output=str(jpeg), model=str(colour_dir / f"{model}.onnx"),
                        providers=CPU, progress=False, format="jpeg", workers=1))
    for name, (c, _) in EXPECTED.items():
        with Image.open(jpeg / name.replace(".png", ".jpg")) as im:
            assert im.format == "JPEG" and im.mode == ("L" if c == 1 else "RGB")


@pytest.mark.slow
def test_ray_engine_writes_the_same_colour_outputs(colour_dir, colour_inputs, tmp_path) -> None:  # noqa: ANN001
    ray = pytest.importorskip("ray")
    model = str(colour_dir / "gray.onnx")
    local, remote = tmp_path / "local", tmp_path / "ray"
    run_job(BatchConfig(input=str(colour_inputs), output=str(local), model=model, providers=CPU, progress=False,
                        workers=1))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        s = run_job(BatchConfig(input=str(colour_inputs), output=str(remote), model=model, providers=CPU,
                                progress=False, engine="ray", ray_actors=1))
    finally:
        ray.shutdown()
    assert (s.ok, s.failed) == (5, 0)
    for name in EXPECTED:
        assert (remote / name).read_bytes() == (local / name).read_bytes(), name
    assert read_image((remote / "rgb16.png").read_bytes())[1] == 16


def test_io_binding_path_samples_the_upload_colour(colour_dir) -> None:  # noqa: ANN001
    """The bound path (GPU servers) gives what the plain one does, for a colour upload to a gray model."""
    plain = load_model(colour_dir / "gray.onnx", SessionConfig(providers=CPU))
    bound = load_model(colour_dir / "gray.onnx", SessionConfig(providers=CPU, io_binding=True))
    assert bound.io_binding and not plain.io_binding
    src = smooth(70, 50, 3, seed=8).transpose(2, 0, 1).copy()
    a, b = pipeline.prepare_array(plain, src), pipeline.prepare_array(bound, src)
    assert a.loc.shape == b.loc.shape == (1, *plain.info.loc_size)
    [ta], [tb] = pipeline.localise(plain, [a]), pipeline.localise(bound, [b])
    np.testing.assert_allclose(ta, tb, atol=1e-6)
    ra, rb = pipeline.rectify(plain, a, ta, (33, 44)).image, pipeline.rectify(bound, b, tb, (33, 44)).image
    assert ra.shape == (3, 33, 44)
    np.testing.assert_allclose(ra, rb, atol=1e-6)
