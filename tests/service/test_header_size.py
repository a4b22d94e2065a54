"""images.declared_size / header_size: the size an upload declares, read in bounded time, must be Pillow's.

Admission reserves memory by this size before any pixel is decoded, and the decoder refuses an image whose
Pillow header disagrees, so a wrong size here would be a 400 for a good image. Compared with Pillow on every
format and variant the server accepts, on crafted layouts, and on every prefix of the files (a body still
arriving): a prefix gives the size or None, never another size.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service import images
from service.images import declared_size, header_size, sniff_format
from tests.service.support import progressive_jpeg

LIMITS = images.Limits(formats=("JPEG", "PNG", "WEBP", "BMP", "TIFF"))


def noise(mode: str, w: int, h: int) -> Image.Image:
    rgb = Image.fromarray(np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "RGB":
        return rgb
    if mode == "P":
        return rgb.quantize(16)
    return rgb.convert(mode)


def save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def corpus() -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for w, h in ((1, 1), (17, 5), (640, 480), (3, 1000)):
        for mode in ("1", "L", "P", "RGB", "RGBA", "I;16"):
            files[f"png-{mode}-{w}x{h}"] = save(noise(mode, w, h), "PNG")
        for mode in ("L", "RGB", "CMYK"):
            files[f"jpeg-{mode}-{w}x{h}"] = save(noise(mode, w, h), "JPEG")
        files[f"jpeg-progressive-{w}x{h}"] = save(noise("RGB", w, h), "JPEG", progressive=True, quality=90)
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: the size is the stored one, the decoder rotates
        files[f"jpeg-exif-icc-{w}x{h}"] = save(noise("RGB", w, h), "JPEG", exif=exif,
                                              icc_profile=bytes(range(256)) * 600)  # 150 kB: several APP2s
        for mode, kw in (("RGB", {}), ("RGB", {"lossless": True}), ("RGBA", {}), ("RGBA", {"lossless": True})):
            files[f"webp-{mode}-{'lossless' if kw else 'lossy'}-{w}x{h}"] = save(noise(mode, w, h), "WEBP", **kw)
        frames = [noise("RGB", w, h), noise("RGB", w, h).transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
        files[f"webp-animated-{w}x{h}"] = save(frames[0], "WEBP", save_all=True, append_images=frames[1:])
        for mode in ("1", "L", "P", "RGB", "RGBA"):
            files[f"bmp-{mode}-{w}x{h}"] = save(noise(mode, w, h), "BMP")
        files[f"tiff-{w}x{h}"] = save(noise("RGB", w, h), "TIFF")
    # crafted layouts
    base = files["jpeg-RGB-17x5"]
    sof = base.index(b"\xff\xc0")
    fake = bytearray(base[sof:sof + 2 + int.from_bytes(base[sof + 2:sof + 4], "big")])
    fake[5:9] = struct.pack(">HH", 4000, 3000)  # a first frame header of another size: Pillow keeps the last
    files["jpeg-two-frame-headers"] = base[:sof] + bytes(fake) + base[sof:]
    comment = b"\xff\xfe" + struct.pack(">H", 2 + 9) + b"\xff\xc0\x00\x11\x08\x0f\xa0\x0b\xb8"  # a SOF inside a COM
    files["jpeg-sof-bytes-in-a-comment"] = base[:2] + comment + base[2:]
    files["jpeg-fill-bytes"] = base[:2] + b"\xff\xff\xff" + base[2:]
    bmp = bytearray(files["bmp-RGB-17x5"])
    bmp[22:26] = struct.pack("<i", -5)  # top-down rows
    files["bmp-top-down"] = bytes(bmp)
    row = b"\x00\x00\xff" * 3 + b"\x00\x00\x00"  # OS/2 1.x core header: 3x2, 24 bits
    files["bmp-os2-core"] = (b"BM" + struct.pack("<IHHI", 14 + 12 + 2 * len(row), 0, 0, 26)
                             + struct.pack("<IHHHH", 12, 3, 2, 1, 24) + row * 2)
    return files


FILES = corpus()


@pytest.mark.parametrize("name", sorted(FILES))
def test_the_declared_size_is_pillows(name: str) -> None:
    data = FILES[name]
    with Image.open(io.BytesIO(data)) as im:
        want = im.size
    fmt = sniff_format(data)
    got = declared_size(data, fmt)
    if fmt == "TIFF":  # left to Pillow (its directory can be anywhere in the file)
        assert got is None and header_size(data, LIMITS, name) is None
        return
    assert got == want, (name, got, want)
    assert header_size(data, LIMITS, name) == want


@pytest.mark.parametrize("name", sorted(FILES))
def test_a_prefix_gives_the_size_or_nothing(name: str) -> None:
    data = FILES[name]
    with Image.open(io.BytesIO(data)) as im:
        want = im.size
    cuts = sorted({*range(0, min(len(data), 600), 7), *range(0, len(data), max(1, len(data) // 50)), len(data) - 1})
    for cut in cuts:
        try:
            got = header_size(data[:cut], LIMITS, name)
        except images.BadImageError:  # too short to tell the format
            assert cut < 12 or sniff_format(data[:cut]) is None, cut
            continue
        assert got in (None, want), (cut, got, want)


def test_limits_apply_to_the_declared_size() -> None:
    ihdr = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", 9000, 9000, 8, 0, 0, 0, 0)
    with pytest.raises(images.ImageTooLargeError, match="STN_MAX_IMAGE_PIXELS"):
        header_size(ihdr, LIMITS)
    empty = ihdr[:16] + struct.pack(">II", 0, 7) + ihdr[24:]
    with pytest.raises(images.BadImageError, match="empty size"):
        header_size(empty, LIMITS)
    with pytest.raises(images.UnsupportedFormatError, match="STN_IMAGE_FORMATS"):
        header_size(FILES["tiff-17x5"], images.Limits())
    with pytest.raises(images.ImageTooLargeError, match="STN_MAX_UPLOAD_BYTES"):
        header_size(FILES["png-RGB-640x480"], images.Limits(max_bytes=1000))


def test_a_header_that_disagrees_with_the_decoder_is_refused_before_decoding() -> None:
    data = FILES["png-L-17x5"]
    with pytest.raises(images.BadImageError, match="declares 17x6"):
        images.decode(data, LIMITS, "x.png", declared=(17, 6))
    assert images.decode(data, LIMITS, "x.png", declared=(17, 5)).array.shape == (1, 5, 17)


def two_ihdr_png() -> bytes:
    """A PNG whose first IHDR says 10x10 and a second one 3000x3000: Pillow reads the last."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdrs = b"".join(chunk(b"IHDR", struct.pack(">IIBBBBB", n, n, 8, 0, 0, 0, 0)) for n in (10, 3000))
    return (b"\x89PNG\r\n\x1a\n" + ihdrs + chunk(b"IDAT", zlib.compress(b"\0" * 11 * 10)) + chunk(b"IEND", b""))


def test_a_second_png_header_is_refused() -> None:
    data = two_ihdr_png()
    with pytest.raises(images.BadImageError, match="second IHDR"):
        header_size(data, LIMITS, "x.png")
    with pytest.raises(images.BadImageError, match="second IHDR"):  # Pillow would read the last: 3000x3000
        images.decode(data, LIMITS, "x.png", declared=(10, 10))


def spam_png(megabytes: float) -> bytes:
    """A valid 100x100 PNG whose IHDR is followed by ``megabytes`` of empty ancillary chunks: Pillow's header
    reader walks each one in Python (about 0.2 s a MB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", 100, 100, 8, 0, 0, 0, 0))
    return (b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"abCd", b"") * int(megabytes * 1e6 / 12)
            + chunk(b"IDAT", zlib.compress(b"\0" * 101 * 100)) + chunk(b"IEND", b""))


def jpeg_with_comments(n: int) -> bytes:
    """A valid JPEG with ``n`` empty comment segments before its frame header."""
    base = FILES["jpeg-RGB-17x5"]
    return base[:2] + b"\xff\xfe\x00\x02" * n + base[2:]


def test_metadata_before_the_pixels_is_bounded() -> None:
    """Pillow walks every chunk or segment before the pixels in Python (about 0.2 s a MB); past libpng's
    default of 1000 chunks, or 1024 JPEG segments, the image is refused before Pillow sees it."""
    with pytest.raises(images.BadImageError, match="more than 1000 chunks before its image data"):
        header_size(spam_png(4), LIMITS)
    assert header_size(spam_png(4)[:24], LIMITS) == (100, 100)  # a body still arriving: sized by its IHDR
    assert header_size(spam_png(0.0119), LIMITS) == (100, 100)  # 991 empty chunks: within the bound
    with pytest.raises(images.BadImageError, match="more than 1024 segments before its image data"):
        header_size(jpeg_with_comments(2000), LIMITS)
    assert header_size(jpeg_with_comments(900), LIMITS) == (17, 5)
    assert header_size(jpeg_with_comments(2000)[:3000], LIMITS) is None  # cut short within the bound: not yet known
    for data in (spam_png(4), jpeg_with_comments(2000)):  # stn batch and the decoder: the same bound
        with pytest.raises(images.BadImageError, match="before its image data"):
            images.open_checked(data, LIMITS)
    filled = FILES["jpeg-RGB-17x5"][:2] + b"\xff" * 100_000 + FILES["jpeg-RGB-17x5"][2:]
    assert header_size(filled, LIMITS) == (17, 5)  # fill bytes are skipped at C speed, not counted


def test_jpeg_scans_are_bounded_and_counted_exactly() -> None:
    """A progressive JPEG's scans each cost the decoder a pass over the image: past MAX_JPEG_SCANS the image is
    refused before decoding. The count is exact: SOS bytes inside metadata (here an APP segment holding 300)
    and inside a scan's entropy-coded data (stuffed 0xFF00, RSTn) are not scans, and fill bytes are skipped."""
    limit = images.MAX_JPEG_SCANS
    with pytest.raises(images.BadImageError, match=f"more than {limit} scans"):
        images.open_checked(progressive_jpeg(300, 200, limit + 1), LIMITS)
    with pytest.raises(images.BadImageError, match=f"more than {limit} scans"):
        images.decode(progressive_jpeg(300, 200, 5000), LIMITS)
    at_limit = progressive_jpeg(300, 200, limit)
    assert images.decode(at_limit, LIMITS).array.shape == (3, 200, 300)
    app = b"\xff\xe5" + (2 + 600).to_bytes(2, "big") + b"\xff\xda" * 300  # metadata that looks like 300 SOS markers
    assert images.decode(at_limit[:2] + app + at_limit[2:], LIMITS).array.shape == (3, 200, 300)
    noisy = save(noise("RGB", 640, 480), "JPEG", quality=100, progressive=True)  # entropy data with many 0xFF00
    assert noisy.count(b"\xff\x00") > 100
    images.check_jpeg_scans(noisy)
    filled = at_limit.replace(b"\xff\xda", b"\xff\xff\xff\xda")  # fill bytes before each scan
    assert images.decode(filled, LIMITS).array.shape == (3, 200, 300)
    with pytest.raises(images.BadImageError, match=f"more than {limit} scans"):
        images.check_jpeg_scans(progressive_jpeg(300, 200, limit + 1).replace(b"\xff\xda", b"\xff\xff\xda"))
    second = at_limit.index(b"\xff\xda", at_limit.index(b"\xff\xda") + 2)
    comments = at_limit[:second] + b"\xff\xfe\x00\x02" * 1100 + at_limit[second:]  # between the scans
    with pytest.raises(images.BadImageError, match="more than 1024 segments after its first scan"):
        images.open_checked(comments, LIMITS)
    assert images.decode(at_limit[:second] + b"\xff\xfe\x00\x02" * 900 + at_limit[second:], LIMITS)


def chunked_png(extra: int, where: str) -> bytes:
    """A valid 100x100 gray PNG with ``extra`` more chunks: empty IDATs among its image data, or empty ancillary
    chunks after it (Pillow reads both, one by one in Python)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", 100, 100, 8, 0, 0, 0, 0))
    z = zlib.compress(b"\0" * 101 * 100)
    if where == "idat":
        body = chunk(b"IDAT", z[:10]) + chunk(b"IDAT", b"") * extra + chunk(b"IDAT", z[10:])
    else:
        body = chunk(b"IDAT", z) + chunk(b"abCd", b"") * extra
    return b"\x89PNG\r\n\x1a\n" + ihdr + body + chunk(b"IEND", b"")


@pytest.mark.parametrize("where", ["idat", "after"])
def test_png_chunks_are_bounded_in_all(where: str) -> None:
    """20 MB of empty chunks cost Pillow 1.4 s (IDATs) to 3.7 s (after the image data) of Python: past
    MAX_PNG_CHUNKS_TOTAL chunks in all, the PNG is refused before decoding; below it, it decodes."""
    limit = images.MAX_PNG_CHUNKS_TOTAL
    with pytest.raises(images.BadImageError, match=f"more than {limit} chunks"):
        images.decode(chunked_png(limit, where), LIMITS)
    assert images.decode(chunked_png(limit - 10, where), LIMITS).array.shape == (1, 100, 100)


def rle8_bmp(w: int, h: int) -> bytes:
    """A valid RLE8 BMP (gray palette) whose every run is one pixel long: Pillow's Python decoder's worst case."""
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    body = (b"\x01\x07" * w + b"\x00\x00") * h + b"\x00\x01"
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 8, 1, len(body), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + info + palette + body


def test_rle_bmp_is_bounded_in_bytes() -> None:
    """Pillow decodes RLE BMPs in Python (10 MB of one-pixel runs: 1.5 s): past MAX_BMP_RLE_BYTES one is refused
    before decoding; a small one decodes, as does an uncompressed BMP of any size."""
    big = rle8_bmp(1000, 600)
    assert len(big) > images.MAX_BMP_RLE_BYTES
    with pytest.raises(images.BadImageError, match="RLE-compressed BMP"):
        images.decode(big, LIMITS)
    small = images.decode(rle8_bmp(100, 60), LIMITS).array
    assert small.shape == (1, 60, 100) and np.allclose(small, 7 / 255)
    assert images.decode(save(noise("RGB", 1000, 600), "BMP"), LIMITS).array.shape == (3, 600, 1000)
