"""service.images: limits checked before decoding, formats, modes, EXIF, encoding."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from service import images
from service.settings import FORMATS

LIMITS = images.Limits(max_bytes=1 << 20, max_pixels=1_000_000, formats=FORMATS)  # TIFF opted in


def encode_pil(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(h: int = 20, w: int = 30) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (h + w - 2)], -1).astype(np.uint8)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png16_raw(a16: np.ndarray, interlace: bool = False) -> bytes:
    """The image data of a 16-bit PNG of ``a16`` [H, W, C] before compression (filter type 0), Adam7 or not."""
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    subs = [a16[y0::dy, x0::dx] for x0, y0, dx, dy in passes] if interlace else [a16]
    return b"".join(b"\0" + row.astype(">u2").tobytes() for sub in subs if sub.size for row in sub)


def _png16_file(a16: np.ndarray, interlace: bool = False, before: bytes = b"", stream: bytes | None = None,
                pieces: int = 1, between: bytes = b"") -> bytes:
    """A 16-bit PNG (gray, gray+alpha, RGB or RGBA by the channel count): optional chunks ``before`` the image
    data, its zlib ``stream`` (default: the image's) in ``pieces`` IDATs with ``between`` after the first."""
    h, w, c = a16.shape
    stream = zlib.compress(_png16_raw(a16, interlace)) if stream is None else stream
    cut = [len(stream) * i // pieces for i in range(pieces + 1)]
    idats = [_chunk(b"IDAT", stream[cut[i]:cut[i + 1]]) for i in range(pieces)]
    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, int(interlace))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + before + idats[0] + between + b"".join(idats[1:])
            + _chunk(b"IEND", b""))


def png16(a: np.ndarray, exif: bytes = b"") -> bytes:
    """A 16-bit PNG written by hand (gray, gray+alpha, RGB or RGBA by the channel count), optional eXIf chunk."""
    return _png16_file(a[..., None] if a.ndim == 2 else a,
                       before=_chunk(b"eXIf", exif.removeprefix(b"Exif\0\0")) if exif else b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF"])
@pytest.mark.parametrize("channels", [1, 3])
def test_formats_decode_in_their_own_colour(fmt: str, channels: int) -> None:
    rgb = gradient()
    pixels = rgb if channels == 3 else np.asarray(Image.fromarray(rgb).convert("L"))
    data = encode_pil(Image.fromarray(pixels), fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    d = images.decode(data, LIMITS)
    out_c = 3 if fmt == "WEBP" else channels  # WebP has no gray: PIL reads it back as RGB
    assert d.array.dtype == np.float32 and d.array.shape == (out_c, 20, 30) and d.bits == 8
    assert 0.0 <= d.array.min() and d.array.max() <= 1.0
    ref = pixels.transpose(2, 0, 1) / 255.0 if channels == 3 else pixels[None] / 255.0
    tol = 0.08 if fmt in ("JPEG", "WEBP") else 1e-6
    assert np.abs(d.array - ref).mean() < tol


def test_modes_become_gray_or_rgb() -> None:
    rgb = gradient()
    expect = {"L": 1, "1": 1, "LA": 1, "I;16": 1, "RGB": 3, "RGBA": 3, "P": 3, "CMYK": 3, "YCbCr": 3, "PA": 3}
    for mode, c in expect.items():
        img = Image.fromarray(rgb).convert(mode)
        fmt = "TIFF" if mode in ("CMYK", "YCbCr", "PA") else "PNG"
        d = images.decode(encode_pil(img, fmt), LIMITS)
        assert d.array.shape == (c, 20, 30), mode
        assert d.bits == (16 if mode == "I;16" else 8), mode
    pal = Image.fromarray(rgb).convert("P")
    d = images.decode(encode_pil(pal, "PNG"), LIMITS)
    np.testing.assert_allclose(d.array, np.asarray(pal.convert("RGB")).transpose(2, 0, 1) / 255.0, atol=1e-6)


def test_alpha_is_composited_on_white() -> None:
    rgb = gradient()
    alpha = np.tile(np.linspace(0, 255, 30).astype(np.uint8), (20, 1))
    d = images.decode(encode_pil(Image.fromarray(np.dstack([rgb, alpha])), "PNG"), LIMITS)
    a = alpha / 255.0
    ref = (rgb / 255.0 * a[..., None] + (1 - a[..., None])).transpose(2, 0, 1)
    assert d.array.shape == (3, 20, 30)
    np.testing.assert_allclose(d.array, ref, atol=1e-6)
    assert np.allclose(d.array[:, :, 0], 1.0)  # transparent: white, whatever the stored colour
    gray_alpha = Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA")
    d = images.decode(encode_pil(gray_alpha, "PNG"), LIMITS)
    np.testing.assert_allclose(d.array[0], rgb[..., 0] / 255.0 * a + 1 - a, atol=1e-6)


def test_16_bit_gray_keeps_its_precision() -> None:
    a16 = (np.linspace(0, 65535, 20 * 30).reshape(20, 30)).astype(np.uint16)
    img = Image.fromarray(a16)  # mode I;16
    assert img.mode.startswith("I")
    d = images.decode(encode_pil(img, "PNG"), LIMITS)
    assert d.bits == 16 and d.array.shape == (1, 20, 30)
    np.testing.assert_allclose(d.array[0], a16 / 65535.0, atol=1e-7)
    assert len(np.unique(d.array)) > 256


@pytest.mark.parametrize("c", [3, 4, 2])
def test_16_bit_colour_keeps_its_precision(c: int) -> None:
    """PIL reads 16-bit RGB(A)/LA PNGs as 8 bits; the decoder keeps all 16 (alpha composited on white)."""
    rng = np.random.default_rng(c)
    a16 = rng.integers(0, 65536, (20, 30, c)).astype(np.uint16)
    d = images.decode(png16(a16), LIMITS)
    f = a16 / 65535.0
    if c in (2, 4):
        f = f[..., :-1] * f[..., -1:] + (1 - f[..., -1:])
    assert d.bits == 16 and d.array.shape == (c - (c % 2 == 0), 20, 30)
    np.testing.assert_allclose(d.array, f.transpose(2, 0, 1), atol=1e-6)
    assert len(np.unique(d.array)) > 256


@pytest.mark.parametrize("orientation", range(1, 9))
def test_16_bit_colour_exif_orientation_as_pil(orientation: int) -> None:
    """The 16-bit colour path orients like PIL's exif_transpose (checked on the 8-bit image PIL makes of it)."""
    a16 = (np.random.default_rng(0).integers(0, 256, (20, 30, 3)) * 257).astype(np.uint16)  # exact in 8 bits
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = png16(a16, exif.tobytes())
    d = images.decode(data, LIMITS)
    with Image.open(io.BytesIO(data)) as im:
        ref = np.asarray(ImageOps.exif_transpose(im).convert("RGB")).transpose(2, 0, 1) / 255.0
    assert d.bits == 16 and d.array.shape == ref.shape
    np.testing.assert_allclose(d.array, ref, atol=1e-6)


def _composited(a16: np.ndarray) -> np.ndarray:
    f = a16 / 65535.0
    if a16.shape[-1] in (2, 4):
        f = f[..., :-1] * f[..., -1:] + (1 - f[..., -1:])
    return f.transpose(2, 0, 1)


@pytest.mark.parametrize("shape", [(20, 30, 3), (5, 3, 4), (1, 1, 2), (9, 17, 3), (300, 700, 3)])
@pytest.mark.parametrize("interlace", [False, True])
def test_16_bit_colour_png_layouts_keep_their_precision(shape: tuple[int, int, int], interlace: bool) -> None:
    """Every layout libpng reads goes the 16-bit way (images._png_for_libpng passes it on): Adam7 with empty
    passes, image data in several IDATs and over several of the check's 1 MB pieces, metadata chunks (dropped
    on the way: OpenCV reads none), OpenCV's own filtered PNGs, a colour key (tRNS)."""
    a16 = np.random.default_rng(shape[0]).integers(0, 65536, shape).astype(np.uint16)
    limits = images.Limits(max_bytes=8 << 20, max_pixels=1_000_000)  # noise does not compress
    meta = _chunk(b"gAMA", struct.pack(">I", 45455)) + _chunk(b"tEXt", b"Software\0stn tests")
    for data in (_png16_file(a16, interlace), _png16_file(a16, interlace, before=meta, pieces=3),
                 _png16_file(a16, interlace, stream=zlib.compress(_png16_raw(a16, interlace), 9), pieces=7)):
        d = images.decode(data, limits)
        assert d.bits == 16 and d.array.shape == (shape[2] - (shape[2] % 2 == 0), *shape[:2])
        np.testing.assert_allclose(d.array, _composited(a16), atol=1e-6)
    cv2 = pytest.importorskip("cv2")
    if shape[2] != 2 and not interlace:  # filters other than 0 (OpenCV writes RGB(A) only, not interlaced)
        for level in (1, 9):
            data = cv2.imencode(".png", a16[..., [2, 1, 0, 3][:shape[2]]], [cv2.IMWRITE_PNG_COMPRESSION, level])[1]
            assert images._png_for_libpng(data.tobytes()) == data.tobytes()  # nothing to drop
            d = images.decode(data.tobytes(), limits)
            assert d.bits == 16
            np.testing.assert_allclose(d.array, _composited(a16), atol=1e-6)
    if shape[2] == 3:  # a colour key: those pixels transparent, composited on white
        key = a16[0, 0]
        d = images.decode(_png16_file(a16, interlace, before=_chunk(b"tRNS", key.astype(">u2").tobytes())), limits)
        want = _composited(a16)
        want[:, (a16 == key).all(-1)] = 1.0
        assert d.bits == 16
        np.testing.assert_allclose(d.array, want, atol=1e-6)


def test_16_bit_colour_png_that_libpng_would_warn_about_writes_nothing_to_stderr(capfd: pytest.CaptureFixture) -> None:
    """libpng prints its warnings and errors to stderr (OpenCV leaves its handlers as they are): each such
    upload wrote a line to the server's log. Damaged metadata is dropped (the image keeps its 16 bits); damaged
    image data goes to Pillow, which decodes it at 8 bits or says why it cannot; nothing reaches stderr."""
    a16 = np.random.default_rng(7).integers(0, 65536, (24, 32, 3)).astype(np.uint16)
    raw = _png16_raw(a16)
    bad_crc = _chunk(b"tEXt", b"k\0v")[:-4] + b"\0\0\0\0"
    whole = {
        "iCCP too short": _png16_file(a16, before=_chunk(b"iCCP", b"x\0\0" + zlib.compress(b"not a profile"))),
        "tRNS invalid": _png16_file(a16, before=_chunk(b"tRNS", bytes(8))),  # 6 bytes in RGB
        "sRGB after the image data": _png16_file(a16, between=_chunk(b"sRGB", b"\0")),
    }
    damaged = {
        "tEXt CRC error": _png16_file(a16, before=bad_crc),  # Pillow refuses it before any decoder
        "IDATs not in one run": _png16_file(a16, pieces=2, between=_chunk(b"sRGB", b"\0")),
        "extra compressed data": _png16_file(a16, stream=zlib.compress(raw + b"\0" * 99)),
        "not enough image data": _png16_file(a16, stream=zlib.compress(raw[:-99])),
        "data after the stream": _png16_file(a16, stream=zlib.compress(raw) + b"junk"),
        "bad adaptive filter value": _png16_file(a16, stream=zlib.compress(b"\7" + raw[1:])),
        "IDAT CRC error": _png16_file(a16)[:-16] + b"\0\0\0\0" + _chunk(b"IEND", b""),
        "stream cut short": _png16_file(a16, stream=zlib.compress(raw)[:-30]),
        "IEND invalid": _png16_file(a16)[:-12] + _chunk(b"IEND", b"xx"),
    }
    capfd.readouterr()
    for name, data in whole.items():
        d = images.decode(data, LIMITS)
        assert d.bits == 16, name
        np.testing.assert_allclose(d.array, _composited(a16), atol=1e-6, err_msg=name)
    for name, data in damaged.items():
        try:
            assert images.decode(data, LIMITS).bits == 8, name
        except images.BadImageError:
            pass
    out, err = capfd.readouterr()
    assert "libpng" not in out + err, err
    assert err == "", err


def test_a_tiff_that_cannot_be_decoded_writes_nothing_to_stderr(capfd: pytest.CaptureFixture) -> None:
    """OpenCV logged libtiff's errors and its own on stderr, three lines an upload ("[ERROR:0@...] TIFF_Error
    ..."), and Pillow's libtiff printed one ("tempfile.tif: Using code not yet in table."); TIFF is opt-in
    (STN_IMAGE_FORMATS), but then any client could write to the server's log."""
    cv2 = pytest.importorskip("cv2")
    a16 = np.random.default_rng(8).integers(0, 65536, (40, 50, 3)).astype(np.uint16)
    wide = bytearray(cv2.imencode(".tiff", a16)[1].tobytes())  # 16-bit RGB, LZW: OpenCV's
    assert images.decode(bytes(wide), LIMITS).bits == 16
    narrow = bytearray(encode_pil(Image.fromarray((a16 >> 8).astype(np.uint8)), "TIFF", compression="tiff_lzw"))
    assert images.decode(bytes(narrow), LIMITS).bits == 8  # 8-bit RGB, LZW: Pillow's (its libtiff)
    wide[2000:2040] = narrow[1000:1040] = b"\xff" * 40  # the strips' codes
    capfd.readouterr()
    for data in (wide, narrow):
        with pytest.raises(images.BadImageError):
            images.decode(bytes(data), LIMITS)
    out, err = capfd.readouterr()
    assert err == "", err


def test_corrupt_metadata_writes_nothing_to_stderr() -> None:
    """Pillow warned of each EXIF tag it skipped with the tag in the text ("Tag data larger than file. Skipping tag
    270"), so Python printed every new one: an upload per tag number put a line in the server's log, 65,536 of
    them. Run in a fresh interpreter as the server is (pytest records warnings itself)."""
    import subprocess
    import sys

    code = """
import io, struct
from PIL import Image
from service import images
for tag in range(256, 296):  # each an EXIF entry whose data lies beyond the file
    ifd = struct.pack("<2sHI", b"II", 42, 8) + struct.pack("<HHHII", 1, tag, 2, 100, 10000) + struct.pack("<I", 0)
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(buf, "JPEG", exif=b"Exif\\0\\0" + ifd)
    assert images.decode(buf.getvalue(), images.Limits()).array.shape == (3, 16, 16)
print("decoded")
"""
    from tests.service.support import ROOT

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "decoded", done.stdout + done.stderr
    assert done.stderr == "", done.stderr


def _photo(h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    """Smooth shapes plus noise: every 8x8 block has detail, so the decoders' rounding would show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(x / 7.0 + k) * np.cos(y / 5.0 - k) for k in range(c)], -1) * 90 + 128
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8).squeeze()


JPEG_VARIANTS = {
    "4:2:0": {"subsampling": 2}, "4:2:2": {"subsampling": 1}, "4:4:4": {"subsampling": 0},
    "progressive": {"progressive": True}, "optimized": {"optimize": True, "quality": 50},
    "restart-markers": {"restart_marker_blocks": 3}, "quality-100": {"quality": 100, "subsampling": 0},
}


@pytest.mark.parametrize("variant", list(JPEG_VARIANTS))
@pytest.mark.parametrize("c", [1, 3])
def test_jpeg_through_simplejpeg_is_pillows_decode(variant: str, c: int) -> None:
    """8-bit JPEGs are decoded by simplejpeg (images._decode_jpeg, faster): the same float pixels as Pillow's path,
    bit for bit, whatever the encoder's choices; odd sizes too (partial blocks and chroma pairs)."""
    data = encode_pil(Image.fromarray(_photo(37, 53, c)), "JPEG", **JPEG_VARIANTS[variant])
    with Image.open(io.BytesIO(data)) as im:
        fast = images._decode_jpeg(im, data)
    with Image.open(io.BytesIO(data)) as im:
        pillow = images.to_array(im)  # no data: Pillow's own path
    assert fast is not None and fast.bits == pillow.bits == 8
    assert fast.array.dtype == np.float32 and fast.array.shape == pillow.array.shape == (c, 37, 53)
    assert np.array_equal(fast.array, pillow.array)
    assert np.array_equal(images.decode(data, LIMITS).array, pillow.array)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_through_simplejpeg_orients_as_pillow(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode_pil(Image.fromarray(_photo(20, 30, 3, seed=orientation)), "JPEG", exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as im:
        assert images._decode_jpeg(im, data) is not None
        fast = images.decode(data, LIMITS).array
    with Image.open(io.BytesIO(data)) as im:
        assert np.array_equal(fast, images.to_array(im).array)


def test_jpegs_simplejpeg_does_not_take_go_to_pillow(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    rgb = encode_pil(Image.fromarray(_photo(30, 40, 3)), "JPEG")
    cmyk = encode_pil(Image.fromarray(_photo(30, 40, 3)).convert("CMYK"), "JPEG")
    sos = rgb.index(b"\xff\xda")
    corrupt = rgb[:sos] + b"\0" * 50 + rgb[sos:]  # libjpeg: "Corrupt JPEG data: 50 extraneous bytes before marker"
    for data in (cmyk, corrupt):
        with Image.open(io.BytesIO(data)) as im:
            assert images._decode_jpeg(im, data) is None
        with Image.open(io.BytesIO(data)) as im:
            assert np.array_equal(images.decode(data, LIMITS).array, images.to_array(im).array)
    trailer = rgb + b"camera maker's trailer"  # after the end marker: both decoders stop there
    with Image.open(io.BytesIO(trailer)) as im:
        assert np.array_equal(images.decode(trailer, LIMITS).array, images.to_array(im).array)
    with pytest.raises(images.BadImageError):  # a truncated JPEG stays an error
        images.decode(rgb[: len(rgb) * 2 // 3], LIMITS)
    # nothing reaches the process's stderr (OpenCV's decoder printed libjpeg's warning there, once per image)
    out, err = capfd.readouterr()
    assert "Corrupt JPEG" not in out + err, err
    monkeypatch.setitem(__import__("sys").modules, "simplejpeg", None)  # without simplejpeg: Pillow, the same pixels
    with Image.open(io.BytesIO(rgb)) as im:
        assert images._decode_jpeg(im, rgb) is None
        assert np.array_equal(images.decode(rgb, LIMITS).array, images.to_array(im).array)


def test_to_channels_for_the_localiser() -> None:
    rgb = gradient()
    x = (rgb.transpose(2, 0, 1) / 255.0).astype(np.float32)
    gray = images.to_channels(x, 1)
    assert gray.shape == (1, 20, 30) and gray.dtype == np.float32
    pil_gray = np.asarray(Image.fromarray(rgb).convert("L")) / 255.0
    assert np.abs(gray[0] - pil_gray).max() <= 0.5 / 255 + 1e-6  # PIL's luma, up to its rounding
    batch = np.stack([x, x[::-1]])
    np.testing.assert_allclose(images.to_channels(batch, 1)[0], gray, atol=1e-7)
    assert images.to_channels(x, 3) is x
    rep = images.to_channels(gray, 3)
    assert rep.shape == (3, 20, 30) and all(np.array_equal(rep[i], gray[0]) for i in range(3))
    four = images.to_channels(x, 4)
    assert four.shape == (4, 20, 30) and np.all(four[3] == 1.0) and np.array_equal(four[:3], x)


def test_exif_orientation_applied() -> None:
    img = Image.fromarray(gradient(20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    data = encode_pil(img, "JPEG", exif=exif.tobytes(), quality=95)
    assert images.decode(data, LIMITS).array.shape == (3, 30, 20)


def test_byte_limit_before_anything() -> None:
    with pytest.raises(images.ImageTooLargeError, match="bytes"):
        images.decode(b"\0" * (LIMITS.max_bytes + 1), LIMITS)


def test_decompression_bomb_is_refused_from_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = encode_pil(Image.new("L", (4000, 4000)), "PNG")  # 16 Mpx of zeros, a few kB
    assert len(bomb) < 50_000
    called = []
    monkeypatch.setattr(Image.Image, "load", lambda self: called.append(1))
    with pytest.raises(images.ImageTooLargeError, match="pixels"):
        images.decode(bomb, LIMITS)
    assert not called, "the image was decoded before the pixel limit was checked"


@pytest.mark.parametrize("data", [b"not an image", b"", b"GIF89a" + b"\0" * 50])
def test_undecodable(data: bytes) -> None:
    with pytest.raises(images.BadImageError):
        images.decode(data, LIMITS)


def test_truncated() -> None:
    data = encode_pil(Image.fromarray(gradient(200, 200)), "JPEG")
    with pytest.raises(images.BadImageError):
        images.decode(data[: len(data) // 3], LIMITS)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
@pytest.mark.parametrize("c", [1, 3])
def test_encode_round_trip(fmt: str, c: int) -> None:
    a = (gradient()[..., :c].transpose(2, 0, 1) / 255.0).astype(np.float32)
    back = images.decode(images.encode(a, fmt), LIMITS)
    assert back.array.shape == a.shape and back.bits == 8
    assert np.abs(back.array - a).max() < (0.1 if fmt == "jpeg" else 1 / 255 + 1e-6)


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("opencv", [True, False])
@pytest.mark.parametrize("c", [1, 3, 4])
def test_to_uint_rounds_clips_and_interleaves(c: int, opencv: bool, bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    if not opencv:
        monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` raises ImportError: numpy's path
    a = (np.random.default_rng(c).random((c, 37, 53), dtype=np.float32) * 1.2 - 0.1)
    a[0, 0, :6] = [np.nan, np.inf, -np.inf, 0.5 / 255, 254.5 / 255, 1.0]  # halves round up at 8 bits
    before = a.copy()
    convert, top, dtype = (images.to_uint8, 255.0, np.uint8) if bits == 8 else (images.to_uint16, 65535.0, np.uint16)
    out = convert(a)
    with np.errstate(invalid="ignore"):
        expected = (np.clip(a, 0.0, 1.0) * top + 0.5).astype(dtype).transpose(1, 2, 0)
    assert np.array_equal(out, expected[..., 0] if c == 1 else expected) and out.flags.c_contiguous
    assert np.array_equal(a, before, equal_nan=True)  # the caller's array is untouched


@pytest.mark.parametrize("deflater", ["installed", "zlib"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 1), (37, 53), (37, 53, 2), (37, 53, 3), (2, 3, 4), (1, 1, 3)])
def test_png_writer_is_exact_and_valid(shape: tuple[int, ...], deflater: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import zlib

    import cv2

    if deflater == "zlib":
        monkeypatch.setattr(images, "_deflate", zlib)
    a = np.random.default_rng(len(shape) * 100 + shape[0]).integers(0, 256, shape, np.uint8)
    data = images.png8(a)
    with Image.open(io.BytesIO(data)) as im:  # Pillow checks the chunks' CRCs
        assert im.format == "PNG" and im.size == (shape[1], shape[0])
        assert np.array_equal(np.asarray(im), a)
    back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # libpng: CRCs and the zlib checksum
    assert back is not None and back.shape[:2] == shape[:2]
    if len(shape) == 2 or shape[2] == 1:
        assert np.array_equal(back.reshape(a.shape), a)
    elif shape[2] == 3:
        assert np.array_equal(back[..., ::-1], a)


def test_png_writer_size_on_a_real_photo() -> None:
    """On the bundled sample photo, the PNG writer's file is within 15 % of Pillow's ``compress_level=1``."""
    from service.settings import default_model_dir

    data = (default_model_dir() / "sample.jpg").read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        rgb = np.asarray(im.convert("RGB"))
    ours = images.png8(rgb)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(ours))), rgb)
    assert len(ours) <= 1.15 * len(encode_pil(Image.fromarray(rgb), "PNG", compress_level=1))


@pytest.mark.parametrize("c", [1, 3])
def test_encode_16_bit_png_and_8_bit_jpeg(c: int) -> None:
    a = np.random.default_rng(c).random((c, 20, 30)).astype(np.float32)
    png = images.encode(a, "png", bits=16)
    back = images.decode(png, LIMITS)
    assert back.bits == 16 and back.array.shape == a.shape
    assert np.abs(back.array - a).max() <= 0.5 / 65535 + 1e-6
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == ("I;16" if c == 1 else "RGB")  # PIL shows 16-bit RGB as RGB; the file has 16 bits
    assert png[24] == 16  # IHDR bit depth
    jpeg = images.encode(a, "jpeg", bits=16)
    with Image.open(io.BytesIO(jpeg)) as im:
        assert im.format == "JPEG" and im.mode == ("L" if c == 1 else "RGB")


def test_parse_size_one_parser() -> None:
    """``WxH`` -> (h, w), as the server's ``size`` and ``stn batch --size`` read it."""
    assert images.parse_size("256x128") == (128, 256) and images.parse_size("3X5") == (5, 3)
    for bad in ("", "64", "0x5", "5x0", "-1x2", "1x2x3", "1234567x1", " 64x32", "６４x32", "64 x 32"):
        with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
            images.parse_size(bad)


@pytest.mark.parametrize("channels", [1, 3])
def test_webp_is_an_output_format(channels: int) -> None:
    """images owns png, jpeg and webp; WebP has no gray, so gray is written as RGB; quality applies."""
    rng = np.random.default_rng(0)
    a = rng.random((channels, 40, 60)).astype(np.float32)
    assert (images.media_type("webp"), images.suffix("webp"), images.suffix("jpeg")) == ("image/webp", ".webp", ".jpg")
    data = images.encode(a, "webp", quality=80)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "WEBP" and im.mode == "RGB" and im.size == (60, 40)
    assert len(images.encode(a, "webp", quality=10)) < len(data)
    with pytest.raises(ValueError, match="format must be one of png, jpeg, webp"):
        images.encode(a, "gif")
