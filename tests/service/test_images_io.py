"""service.images: limits checked before decoding, formats, modes, EXIF, encoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service import images

LIMITS = images.Limits(max_bytes=1 << 20, max_pixels=1_000_000)


def encode_pil(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(h: int = 20, w: int = 30) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (h + w - 2)], -1).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF"])
@pytest.mark.parametrize("channels", [1, 3])
def test_formats_decode_to_model_channels(fmt: str, channels: int) -> None:
    rgb = gradient()
    data = encode_pil(Image.fromarray(rgb), fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    a = images.decode(data, channels, LIMITS)
    assert a.dtype == np.float32 and a.shape == (channels, 20, 30)
    assert 0.0 <= a.min() and a.max() <= 1.0
    ref = rgb.transpose(2, 0, 1) / 255.0 if channels == 3 else np.asarray(Image.fromarray(rgb).convert("L"))[None] / 255.0
    tol = 0.08 if fmt in ("JPEG", "WEBP") else 1e-6
    assert np.abs(a - ref).mean() < tol


def test_modes() -> None:
    rgb = gradient()
    for mode in ("L", "RGB", "RGBA", "P", "1", "CMYK", "LA"):
        img = Image.fromarray(rgb).convert(mode)
        fmt = "TIFF" if mode == "CMYK" else "PNG"
        for c in (1, 3):
            a = images.decode(encode_pil(img, fmt), c, LIMITS)
            assert a.shape == (c, 20, 30), mode


def test_16_bit_is_scaled_not_clipped() -> None:
    a16 = (np.linspace(0, 65535, 20 * 30).reshape(20, 30)).astype(np.uint16)
    img = Image.fromarray(a16)  # mode I;16
    assert img.mode.startswith("I")
    data = encode_pil(img, "PNG")
    gray = images.decode(data, 1, LIMITS)
    np.testing.assert_allclose(gray[0], a16 / 65535.0, atol=1e-6)
    rgb = images.decode(data, 3, LIMITS)
    assert rgb.shape == (3, 20, 30) and np.allclose(rgb[0], rgb[2])


def test_exif_orientation_applied() -> None:
    img = Image.fromarray(gradient(20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    data = encode_pil(img, "JPEG", exif=exif.tobytes(), quality=95)
    a = images.decode(data, 3, LIMITS)
    assert a.shape == (3, 30, 20)


def test_byte_limit_before_anything() -> None:
    with pytest.raises(images.ImageTooLargeError, match="bytes"):
        images.decode(b"\0" * (LIMITS.max_bytes + 1), 1, LIMITS)


def test_decompression_bomb_is_refused_from_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = encode_pil(Image.new("L", (4000, 4000)), "PNG")  # 16 Mpx of zeros, a few kB
    assert len(bomb) < 50_000
    called = []
    monkeypatch.setattr(Image.Image, "load", lambda self: called.append(1))
    with pytest.raises(images.ImageTooLargeError, match="pixels"):
        images.decode(bomb, 1, LIMITS)
    assert not called, "the image was decoded before the pixel limit was checked"


@pytest.mark.parametrize("data", [b"not an image", b"", b"GIF89a" + b"\0" * 50])
def test_undecodable(data: bytes) -> None:
    with pytest.raises(images.BadImageError):
        images.decode(data, 1, LIMITS)


def test_truncated() -> None:
    data = encode_pil(Image.fromarray(gradient(200, 200)), "JPEG")
    with pytest.raises(images.BadImageError):
        images.decode(data[: len(data) // 3], 3, LIMITS)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
@pytest.mark.parametrize("c", [1, 3])
def test_encode_round_trip(fmt: str, c: int) -> None:
    a = (gradient()[..., :c].transpose(2, 0, 1) / 255.0).astype(np.float32)
    back = images.decode(images.encode(a, fmt), c, LIMITS)
    assert back.shape == a.shape
    assert np.abs(back - a).max() < (0.1 if fmt == "jpeg" else 1 / 255 + 1e-6)
