"""What admission reserves for an upload covers what decoding it costs (issue 12, defect 1).

``images.declared_layout`` reads, from the header, what an upload decodes to: its channels (the upload's
own colour, not the model's: an RGB upload to a gray model is decoded and rectified in RGB), a fourth
sample folded in (alpha, CMYK's K) and wide samples. ``admission.image_cost`` of that layout must bound the
memory the decoder really takes: measured here as the peak RSS of ``images.decode`` in a fresh process.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from PIL import Image
from test_header_size import FILES, LIMITS

from service import images
from service.api.admission import image_cost
from tests.service.support import ROOT


@pytest.mark.parametrize("name", sorted(n for n in FILES if not n.startswith("tiff") and n != "jpeg-two-frame-headers"))
def test_the_declared_layout_is_what_the_decoder_makes(name: str) -> None:
    """Exactly, for PNG, JPEG and WebP; a BMP with a gray palette (decoded to one channel) is reserved as colour."""
    data = FILES[name]
    layout = images.declared_layout(data)
    decoded = images.decode(data, LIMITS)
    with Image.open(io.BytesIO(data)) as im:
        folded = im.mode in ("RGBA", "LA", "PA", "CMYK") or (im.mode == "P" and "transparency" in im.info)
    if name.startswith("bmp-"):
        assert layout.channels >= decoded.array.shape[0] and layout.extra >= folded, (layout, decoded.array.shape)
        return
    assert (layout.channels, layout.extra) == (decoded.array.shape[0], folded), (layout, decoded.array.shape)
    assert layout.wide == (decoded.bits == 16), (layout, decoded.bits)


def test_layouts_the_header_cannot_tell_are_reserved_as_the_dearest() -> None:
    assert images.declared_layout(FILES["tiff-17x5"]) == images.Layout(3, True, True)
    assert images.declared_layout(FILES["png-RGB-17x5"][:20]) == images.Layout(3, True, True)  # cut short
    transparent = Image.new("P", (8, 8))
    buf = io.BytesIO()
    transparent.save(buf, "PNG", transparency=0)
    assert images.declared_layout(buf.getvalue()) == images.Layout(3, True, False)  # palette + tRNS: RGBA
    assert images.declared_layout(FILES["png-P-17x5"]) == images.Layout(3, False, False)


PEAK = """
def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
def reset_peak():
    open("/proc/self/clear_refs", "w").write("5")  # the peak RSS starts again from the current RSS
    return status("VmRSS:")
def peak_since(start):
    return status("VmHWM:") - start
"""

MAKE = """
import io, sys
import numpy as np
from PIL import Image
mode, w, h, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = np.random.default_rng(0)
buf = io.BytesIO()
if mode in ("RGB;16", "RGBA;16"):
    import cv2
    a = rng.integers(0, 65536, (h, w, 3 if mode == "RGB;16" else 4), dtype=np.uint16)
    buf.write(cv2.imencode(".png", a, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes())
elif mode == "I;16":
    Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)).save(buf, "PNG", compress_level=1)
elif mode == "P+tRNS":
    Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).convert("P").save(buf, "PNG", transparency=0,
                                                                                    compress_level=1)
elif mode == "CMYK":
    Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "CMYK").save(buf, "JPEG", quality=95)
else:
    bands = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    a = rng.integers(0, 256, (h, w, bands) if bands > 1 else (h, w), dtype=np.uint8)
    Image.fromarray(a, mode).save(buf, "PNG", compress_level=1)
open(path, "wb").write(buf.getvalue())
"""

MEASURE = PEAK + """
import json, sys
from service import images
try:
    import cv2  # noqa: F401 (16-bit colour is decoded by OpenCV: imported before, its libraries are not the decode's)
except ImportError:
    pass
data = open(sys.argv[1], "rb").read()
layout = images.declared_layout(data)
start = reset_peak()
decoded = images.decode(data, images.Limits(max_bytes=1 << 30))
peak = peak_since(start)
print(json.dumps({"peak": peak, "channels": layout.channels, "extra": layout.extra,
                  "wide": layout.wide, "decoded": decoded.array.shape[0]}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["L", "I;16", "LA", "RGB", "RGB;16", "RGBA", "RGBA;16", "P+tRNS", "CMYK"])
def test_the_reserved_cost_bounds_the_decoders_peak(mode: str, tmp_path) -> None:  # noqa: ANN001
    """Before the layout was read, the model's channels were reserved (12 bytes a pixel for a gray model) while
    an RGB upload took 23, an RGBA one 32 and a gray + alpha one 22 (4000x2500, peak RSS of the decode)."""
    w, h = 3000, 2000
    path = tmp_path / "image"
    subprocess.run([sys.executable, "-c", MAKE, mode, str(w), str(h), str(path)], cwd=ROOT, timeout=120, check=True)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, check=True).stdout  # a fresh process: its peak is the decode's
    m = json.loads(out)
    assert m["channels"] == m["decoded"], m
    reserved = image_cost(m["channels"], (h, w), (0, 0), extra=m["extra"], wide=m["wide"])
    assert m["peak"] <= reserved, f"{mode}: decoding took {m['peak'] / (w * h):.1f} B/px, " \
                                  f"reserved {reserved / (w * h):.1f} B/px"


RECTIFY = PEAK + """
import json, sys
from service import images, pipeline
from service.api.routes.v1 import size_cost
from service.runtime import SessionConfig, load_model
model = load_model(sys.argv[1], SessionConfig(providers=("CPUExecutionProvider",)))
model.warmup()
data = open(sys.argv[2], "rb").read()
out = (int(sys.argv[3]), int(sys.argv[4]))
start = reset_peak()
item = pipeline.prepare(model, data, images.Limits())
result = pipeline.finish(model, item, pipeline.localise(model, [item])[0], out, "png")
peak = peak_since(start)
del item, result
print(json.dumps({"peak": peak, "reserved": size_cost(model, images.declared_size(data, "PNG"), out, data),
                  "kept": status("VmRSS:") - start}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("family", ["affine", "projective", "tps"])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_the_reserved_cost_bounds_a_whole_rectification(family: str, mode: str, model_dir, tmp_path) -> None:  # noqa: ANN001
    """Decode, localise, sample at 2000x2000 and encode, as a worker does for one image: the peak stays within
    what /v1 reserves for it. The TPS base grid was computed in float64 for every pixel at once (11 GB for a
    4000x4000 output, reserved 1.5 GB), and the affine one from float64 planes (five times its size)."""
    path = tmp_path / "image.png"
    subprocess.run([sys.executable, "-c", MAKE, mode, "1500", "1000", str(path)], cwd=ROOT, timeout=120, check=True)
    out = subprocess.run([sys.executable, "-c", RECTIFY, str(model_dir / f"{family}.onnx"), str(path), "2000", "2000"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, check=True).stdout
    m = json.loads(out)
    assert m["peak"] <= m["reserved"], f"{family} {mode}: peak {m['peak'] / 1e6:.0f} MB, reserved {m['reserved'] / 1e6:.0f} MB"


@pytest.mark.slow
def test_a_large_rectification_leaves_nothing_in_onnxruntimes_arena(model_dir, tmp_path) -> None:  # noqa: ANN001
    """onnxruntime's CPU arena kept the largest run's tensors for the process's life: after one 4000x4000
    rectification, about 200 MB held outside the memory budget. The resize and sampler sessions run without it:
    what stays is at most glibc's own free lists (the base grid of that size is too big to cache)."""
    path = tmp_path / "image.png"
    subprocess.run([sys.executable, "-c", MAKE, "RGB", "1500", "1000", str(path)], cwd=ROOT, timeout=120, check=True)
    out = subprocess.run([sys.executable, "-c", RECTIFY, str(model_dir / "affine.onnx"), str(path), "4000", "4000"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, check=True).stdout
    m = json.loads(out)
    assert m["kept"] < 100e6, f"{m['kept'] / 1e6:.0f} MB kept after the rectification (peak {m['peak'] / 1e6:.0f} MB)"


PARSE = PEAK + """
import json, sys
from service.api.routes.v2 import _input_tensor, _parse_request, _parsed_cost
from service.api.errors import Problem
unit, n = sys.argv[1].encode(), int(sys.argv[2])
shape = [1, 3, 1000, n // 3000] if unit[:1] != b"[" and unit[:1] != b"{" else [n]
body = (b'{"inputs":[{"name":"image","shape":' + json.dumps(shape).encode() + b',"datatype":"FP32","data":['
        + unit * (n - 1) + unit[:-1] + b"]}]}")
start = reset_peak()
try:
    request, binary = _parse_request(body, None)
    _input_tensor(request, binary, 3)
except Problem:
    pass  # (a shape the model refuses: parsed all the same)
print(json.dumps({"peak": peak_since(start) + len(body), "reserved": _parsed_cost(body, None)}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("unit", ["0.123456789,", "0.5,", "9999,", "[0],", "{},", '{"a":0},'])
def test_a_v2_json_body_is_reserved_at_what_its_parse_holds(unit: str) -> None:
    """/v2 reserves ``_parsed_cost`` of a JSON body before parsing it: the parse and validation's peak (and the
    body) stay within it, for a flat float tensor and for texts that make the most objects per byte."""
    out = subprocess.run([sys.executable, "-c", PARSE, unit, "3000000"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, check=True).stdout
    m = json.loads(out)
    assert m["peak"] <= m["reserved"], f"{unit!r}: peak {m['peak'] / 1e6:.0f} MB, reserved {m['reserved'] / 1e6:.0f} MB"


RESPOND = PEAK + """
import json, sys
import numpy as np
from service.api.routes.v2 import JSON_OUTPUT_BYTES, _response
class Info:
    version = "1"
class Runtime:
    name, info = "m", Info()
n, c, h, w = (int(v) for v in sys.argv[1:5])
rectified = np.random.default_rng(0).random((n, c, h, w), dtype=np.float32)
theta = np.zeros((n, 2, 3), np.float32)
start = reset_peak()
body, _, _ = _response({}, Runtime(), {"rectified": rectified, "theta": theta})
print(json.dumps({"peak": peak_since(start), "reserved": JSON_OUTPUT_BYTES * rectified.size}))
"""


@pytest.mark.slow
def test_a_v2_json_response_is_reserved_at_what_building_it_holds() -> None:
    """A /v2 output sent as JSON ``data`` is a Python float per value, then text: 16 images of the document
    rectifier's 300x424 RGB output held 495 MB while the response was built, where the output's reservation
    (``image_cost``) was 77 MB. /v2 reserves JSON_OUTPUT_BYTES a value for it."""
    out = subprocess.run([sys.executable, "-c", RESPOND, "4", "3", "424", "300"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, check=True).stdout
    m = json.loads(out)
    assert m["peak"] <= m["reserved"], f"peak {m['peak'] / 1e6:.0f} MB, reserved {m['reserved'] / 1e6:.0f} MB"
