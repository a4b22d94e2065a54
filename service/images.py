"""Image bytes in, float arrays out, and back: limits, decoding, channel conversion, encoding.

Limits are checked before any pixel is decoded: the byte size first, then the pixel count
the header declares (``PIL.Image.open`` reads only the header), quoting STN_MAX_IMAGE_PIXELS.
PIL's own decompression-bomb check (and its warning on stderr) is off: ours is the same check. Arrays are float32 [C, H, W] in [0, 1],
in the orientation the user sees (EXIF orientation applied).

Colour: an upload is decoded in its own colour (gray stays one channel, everything else
becomes RGB, alpha is composited on white, 16-bit keeps its precision): that is what the
sampler reads and the encoder writes back. :func:`to_channels` converts a (small) copy to
the model's channels for the localiser. A decoded image costs 4 bytes per pixel and
channel: at most 12 x STN_MAX_IMAGE_PIXELS bytes (480 MB at the default 40 Mpx).
"""

from __future__ import annotations

import ctypes
import io
import itertools
import logging
import re
import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.settings import DEFAULT_FORMATS

try:  # ISA-L's deflate (python-isal): the same zlib stream as zlib's, several times faster
    from isal import isal_zlib as _deflate
except ImportError:  # the standard library's zlib: slower, the same format
    _deflate = zlib  # type: ignore[assignment]

# output formats: name -> (PIL format, media type, file suffix); the server's `format` and `stn batch --format`
ENCODINGS = {"png": ("PNG", "image/png", ".png"), "jpeg": ("JPEG", "image/jpeg", ".jpg"),
             "webp": ("WEBP", "image/webp", ".webp")}
_SIZE = re.compile(r"([0-9]{1,6})[xX]([0-9]{1,6})")  # fullmatch, ASCII digits

log = logging.getLogger(__name__)
# Pillow's decompression-bomb check (a warning on stderr above its limit, an error quoting twice it above
# that) is replaced by open_checked's own, same check of the header's size against STN_MAX_IMAGE_PIXELS.
Image.MAX_IMAGE_PIXELS = None
_FORMAT_NAMES = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "BMP": "BMP", "TIFF": "TIFF"}


class ImageError(ValueError):
    """An upload that cannot be served; the message says what to change."""


class BadImageError(ImageError):
    """Not an image, an unsupported format, or truncated/corrupt data (HTTP 400)."""


class ImageTooLargeError(ImageError):
    """Over the byte or pixel limit (HTTP 413)."""


class UnsupportedFormatError(BadImageError):
    """A format the decoder knows but the settings leave out (STN_IMAGE_FORMATS; HTTP 415)."""


def sniff_format(data: bytes) -> str | None:
    """The format of ``service.settings.FORMATS`` that the leading bytes announce (magic numbers only: no decoder runs)."""
    if data[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        return "TIFF"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM":
        return "BMP"
    return None


_JPEG_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_JPEG_STANDALONE = frozenset((0x01, *range(0xD0, 0xD9)))  # TEM, RSTn, SOI: no length
MAX_JPEG_SEGMENTS = 1024  # segments before the scan; a JPEG with more is refused (real ones have a few dozen)
MAX_PNG_CHUNKS = 1000  # chunks before the first IDAT; a PNG with more is refused (libpng's default cache limit)
# chunks in a PNG, image data included; one with more is refused. Pillow reads each in Python (about 1 to 2 us of
# held GIL): 20 MB of empty chunks cost it 1.4 s (as IDATs) to 3.7 s (after the image data) against about 0.01 s
# for the image alone. Encoders write image data in chunks of 8 KB (libpng) or more: 2,500 for a 20 MB PNG.
MAX_PNG_CHUNKS_TOTAL = 100_000
# bytes of an RLE-compressed BMP; a larger one is refused. Pillow decodes RLE in Python, about 0.15 s a MB of
# runs one pixel long (10 MB: 1.5 s of held GIL), where an uncompressed BMP costs it milliseconds.
MAX_BMP_RLE_BYTES = 1 << 20
# scans in a JPEG; one with more is refused. Each scan is a pass of the decoder over the image, however few bytes it
# takes: 35,000 repeats of one 59-byte scan of a 6000x6000 image (2.2 MB) cost a decoder 100 s of CPU. Encoders write
# a handful (a baseline JPEG: 1 or 3; libjpeg's progressive script: 10); libjpeg-turbo's fuzzers stop at 500.
MAX_JPEG_SCANS = 100
_FILL = re.compile(rb"\xff*")
# what ends a scan's entropy-coded data: an 0xFF not followed by 0x00 (a stuffed 0xFF) or RSTn (inside the scan)
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")
_WINDOW = 1 << 20
_BMP_INFO_SIZES = frozenset((40, 52, 56, 64, 108, 124))


def declared_size(data: bytes, fmt: str, filename: str = "image") -> tuple[int, int] | None:
    """(width, height) as the header of a ``fmt`` image (:func:`sniff_format`) declares it, read in bounded
    time, or None when this reader cannot tell (a layout it does not know, or ``data`` cut short):
    then Pillow's header reader decides. The same size Pillow reports (tests compare them).

    Pillow reads every PNG chunk and every JPEG segment before the image data in Python: 19 MB of
    empty PNG chunks held the server's event loop for 4.3 s, and still cost a worker as long
    (docs/BENCHMARKS.md, "Sizing images without stalling the event loop"). This reads a fixed place
    (WebP's VP8/VP8L/VP8X, BMP's info header) or walks at most :data:`MAX_PNG_CHUNKS` PNG chunks to the
    first IDAT (the size is the IHDR's; a second IHDR is refused) and at most :data:`MAX_JPEG_SEGMENTS`
    JPEG segments to the scan (the last frame header's size, as Pillow's). An image with more is refused
    (BadImageError), so Pillow's walk is bounded too.
    """
    n = len(data)
    if fmt == "PNG":
        if n < 24 or data[12:16] != b"IHDR":
            return None
        for count, (pos, kind) in enumerate(_png_chunks_before_idat(data)):
            if count == MAX_PNG_CHUNKS:
                raise BadImageError(f"{filename} has more than {MAX_PNG_CHUNKS} chunks before its image data; "
                                    "send a PNG without so much metadata")
            if kind == b"IHDR" and pos != 8:
                raise BadImageError(f"{filename} has a second IHDR chunk: a malformed PNG")
        return struct.unpack(">II", data[16:24])
    if fmt == "WEBP":
        kind = data[12:16]
        if kind == b"VP8 " and n >= 30 and data[23:26] == b"\x9d\x01\x2a":
            w, h = struct.unpack("<HH", data[26:30])
            return w & 0x3FFF, h & 0x3FFF
        if kind == b"VP8L" and n >= 25 and data[20] == 0x2F:
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if kind == b"VP8X" and n >= 30:
            return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
        return None
    if fmt == "BMP":
        if n < 26:
            return None
        info = int.from_bytes(data[14:18], "little")
        if info == 12:
            return struct.unpack("<HH", data[18:22])
        if info in _BMP_INFO_SIZES:
            w, h = struct.unpack("<ii", data[18:26])
            return (w, abs(h)) if w > 0 and h not in (0, -(2**31)) else None
        return None
    if fmt == "JPEG":
        size = None
        for count, (pos, marker) in enumerate(_jpeg_markers(data)):
            if count == MAX_JPEG_SEGMENTS:
                raise BadImageError(f"{filename} has more than {MAX_JPEG_SEGMENTS} segments before its image data; "
                                    "send a JPEG without so much metadata")
            if marker == 0xDA:  # start of scan: the last frame header before it is the size
                return size
            if marker in _JPEG_SOF:
                if pos + 9 > n:
                    return None
                h, w = struct.unpack(">HH", data[pos + 5:pos + 9])
                size = (w, h) if h else None  # height 0: defined later (DNL); Pillow decides
        return None
    return None


def _png_chunks(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(position, type) of a PNG's chunks in order, until IEND (not included) or the end of ``data``."""
    n, pos = len(data), 8
    while pos + 8 <= n and (kind := data[pos + 4:pos + 8]) != b"IEND":
        yield pos, kind
        pos += 12 + int.from_bytes(data[pos:pos + 4], "big")


def _png_chunks_before_idat(data: bytes) -> Iterator[tuple[int, bytes]]:
    """:func:`_png_chunks` up to the first IDAT (the metadata Pillow walks before the pixels)."""
    return itertools.takewhile(lambda chunk: chunk[1] != b"IDAT", _png_chunks(data))


@dataclass(frozen=True)
class Layout:
    """What an upload decodes to per pixel, as its header declares it (:func:`declared_layout`): what decoding
    it costs (``service.api.admission.image_cost``). The default is the dearest."""

    channels: int = 3  # 1 (gray, gray + alpha) or 3: the channels it is decoded and rectified in (not the model's)
    extra: bool = True  # a fourth sample folded in while decoding: alpha (composited on white), or CMYK's K
    wide: bool = True  # samples of more than 8 bits


def declared_layout(data: bytes) -> Layout:
    """The :class:`Layout` an upload's header declares, from fixed fields (a PNG's chunks before its image data
    and a JPEG's segments before its frame header are walked, within the bounds of :func:`declared_size`);
    the dearest :class:`Layout` when the header does not tell (TIFF, a header cut short)."""
    fmt, n = sniff_format(data), len(data)
    if fmt == "PNG" and n >= 26 and data[12:16] == b"IHDR":
        depth, colour = data[24], data[25]
        if colour == 3:  # palette: decoded to RGB, or RGBA when a tRNS chunk gives transparency
            chunks = itertools.islice(_png_chunks_before_idat(data), MAX_PNG_CHUNKS)
            return Layout(3, any(kind == b"tRNS" for _, kind in chunks), False)
        return Layout(1 if colour in (0, 4) else 3, colour in (4, 6), depth > 8)
    if fmt == "JPEG":
        for pos, marker in itertools.islice(_jpeg_markers(data), MAX_JPEG_SEGMENTS):
            if marker in _JPEG_SOF and pos + 10 <= n:
                components = data[pos + 9]
                return Layout(1 if components == 1 else 3, components == 4, data[pos + 4] > 8)
        return Layout()
    if fmt == "WEBP":
        kind = data[12:16]
        if kind == b"VP8 ":
            return Layout(3, False, False)
        if kind == b"VP8L" and n >= 25:
            return Layout(3, bool(data[24] & 0x10), False)  # the alpha hint: bit 28 of the size field
        if kind == b"VP8X" and n >= 21:
            return Layout(3, bool(data[20] & 0x10), False)  # the alpha flag
        return Layout(3, True, False)
    if fmt == "BMP" and n >= 30:
        bits = int.from_bytes(data[24:26] if int.from_bytes(data[14:18], "little") == 12 else data[28:30], "little")
        return Layout(3, bits == 32, False)
    return Layout()


def _jpeg_markers(data: bytes, scans: bool = False) -> Iterator[tuple[int, int]]:
    """(position, marker) of a JPEG's markers in order, from its first, until EOI (not included), a malformed
    marker or the end of ``data``. Fill bytes before a marker are skipped at C speed. With ``scans``, a scan's
    entropy-coded data is skipped to the marker that ends it (0xFF00 is a stuffed 0xFF, RSTn is inside the
    scan); without, the walk ends at the first scan (SOS is the last marker given)."""
    n, pos = len(data), 2
    while pos + 4 <= n and data[pos] == 0xFF:
        pos = _FILL.match(data, pos + 1).end() - 1  # any number of fill bytes
        if pos + 4 > n:
            return
        marker = data[pos + 1]
        if marker == 0xD9:
            return
        yield pos, marker
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2:
            return
        pos += 2 + length
        if marker == 0xDA:
            if not scans:
                return
            while (found := _SCAN_END.search(data, pos, min(n, pos + _WINDOW))) is None:  # linear, at C speed,
                if pos + _WINDOW >= n:  # in windows (the GIL is not held for a whole 20 MB at once)
                    return
                pos += _WINDOW - 1  # (an 0xFF at the window's end pairs with the next byte)
            pos = found.start()


def check_jpeg_scans(data: bytes, filename: str = "image") -> None:
    """BadImageError when a JPEG has more than :data:`MAX_JPEG_SCANS` scans (each costs the decoder a pass
    over the image) or more than :data:`MAX_JPEG_SEGMENTS` segments after its first scan. The walk skips the
    entropy-coded data at C speed: about 0.4 ms a MB (at most 4 ms a MB, for data made of stuffed bytes)."""
    scans = after = 0
    for _pos, marker in _jpeg_markers(data, scans=True):
        if scans:
            after += 1
            if after > MAX_JPEG_SEGMENTS:
                raise BadImageError(f"{filename} has more than {MAX_JPEG_SEGMENTS} segments after its first scan; "
                                    "send a JPEG without so much metadata")
        if marker == 0xDA:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise BadImageError(f"{filename} has more than {MAX_JPEG_SCANS} scans, each a pass of the decoder over "
                                    "the whole image; send a baseline JPEG or one with a standard progression")


def check_png_chunks(data: bytes, filename: str = "image") -> None:
    """BadImageError when a PNG has more than :data:`MAX_PNG_CHUNKS_TOTAL` chunks before its IEND (Pillow reads
    each one in Python). The walk reads each chunk's length and stops at the limit."""
    for count, _ in enumerate(_png_chunks(data)):
        if count == MAX_PNG_CHUNKS_TOTAL:
            raise BadImageError(f"{filename} has more than {MAX_PNG_CHUNKS_TOTAL} chunks; send a PNG written in "
                                "fewer, larger chunks")


def check_decoding_cost(data: bytes, fmt: str | None, filename: str = "image") -> None:
    """BadImageError for a layout whose decoding costs far more than its pixels: a JPEG with more than
    :data:`MAX_JPEG_SCANS` scans, a PNG with more than :data:`MAX_PNG_CHUNKS_TOTAL` chunks, an RLE-compressed
    BMP over :data:`MAX_BMP_RLE_BYTES`. Checked before Pillow decodes (:func:`open_checked`), in milliseconds."""
    if fmt == "JPEG":
        check_jpeg_scans(data, filename)
    elif fmt == "PNG":
        check_png_chunks(data, filename)
    elif fmt == "BMP" and len(data) > MAX_BMP_RLE_BYTES and len(data) >= 34:
        if int.from_bytes(data[14:18], "little") >= 40 and int.from_bytes(data[30:34], "little") in (1, 2):
            raise BadImageError(f"{filename} is an RLE-compressed BMP of {len(data)} bytes, which is decoded slowly; "
                                f"the limit for those is {MAX_BMP_RLE_BYTES} bytes: send it uncompressed or as a PNG")


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 20 * 1024 * 1024  # encoded size of one image
    max_pixels: int = 40_000_000  # width x height declared in the header
    formats: tuple[str, ...] = DEFAULT_FORMATS  # of settings.FORMATS, the ones decoded (STN_IMAGE_FORMATS)


def check_bytes(n: int, limits: Limits, what: str = "image") -> None:
    if n > limits.max_bytes:
        raise ImageTooLargeError(f"{what} is {n} bytes; the limit is {limits.max_bytes} bytes (STN_MAX_UPLOAD_BYTES)")


def _format_error(data: bytes, limits: Limits, filename: str) -> ImageError:
    """UnsupportedFormatError (415) for a known format the settings leave out, else BadImageError."""
    accepted = ", ".join(_FORMAT_NAMES.get(f, f) for f in limits.formats)
    known = sniff_format(data)
    if known and known not in limits.formats:
        return UnsupportedFormatError(f"{filename} is {_FORMAT_NAMES[known]}, which this server does not accept; "
                                      f"send {accepted} (STN_IMAGE_FORMATS)")
    return BadImageError(f"{filename} is not a supported image; send {accepted}")


def _accepted_format(data: bytes, limits: Limits, filename: str) -> str:
    """The upload's format (:func:`sniff_format`) when this server accepts it, else :func:`_format_error`."""
    known = sniff_format(data)
    if known is None or known not in limits.formats:
        raise _format_error(data, limits, filename)
    return known


def _check_size(w: int, h: int, limits: Limits, filename: str) -> None:
    if w < 1 or h < 1:
        raise BadImageError(f"{filename} declares an empty size {w}x{h}")
    if w * h > limits.max_pixels:
        raise ImageTooLargeError(
            f"{filename} is {w}x{h} = {w * h} pixels; the limit is {limits.max_pixels} pixels (STN_MAX_IMAGE_PIXELS)")


def header_size(data: bytes, limits: Limits, filename: str = "image") -> tuple[int, int] | None:
    """The declared (width, height) of an upload, in bounded time (:func:`declared_size`), with the checks
    :func:`open_checked` makes of it (bytes, format, pixel count); None when only Pillow can tell
    (then :func:`open_checked`, off the event loop). Nothing is decoded."""
    check_bytes(len(data), limits, filename)
    if not data:
        raise BadImageError(f"{filename} is empty")
    size = declared_size(data, _accepted_format(data, limits, filename), filename)
    if size is not None:
        _check_size(*size, limits, filename)
    return size


def open_checked(data: bytes, limits: Limits, filename: str = "image") -> Image.Image:
    """Open (header only) and check format and declared pixel count; nothing is decoded yet. The metadata
    Pillow walks first is bounded (:func:`declared_size`), for ``stn batch`` as for the server."""
    check_bytes(len(data), limits, filename)
    if not data:
        raise BadImageError(f"{filename} is empty")
    known = sniff_format(data)
    if known in ("PNG", "JPEG"):
        declared_size(data, known, filename)  # raises past MAX_PNG_CHUNKS / MAX_JPEG_SEGMENTS
    check_decoding_cost(data, known, filename)
    if not _decoders_quiet:
        _quiet_decoders()
    try:
        img = Image.open(io.BytesIO(data), formats=limits.formats)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError(f"{filename} declares more than {limits.max_pixels} pixels, the limit "
                                 "(STN_MAX_IMAGE_PIXELS)") from None
    except UnidentifiedImageError:
        raise _format_error(data, limits, filename) from None
    except Exception as e:  # truncated headers raise all sorts
        raise BadImageError(f"{filename} could not be read: {type(e).__name__}: {e}") from None
    _check_size(*img.size, limits, filename)
    return img


_decoders_quiet: list[bool] = []


def _quiet_decoders() -> None:
    """What Pillow prints about an upload, silenced once before the first is opened: nothing an upload holds may
    write to the process's stderr (a client could add lines to the server's log at will).

    - Pillow warns (``UserWarning``) of the corrupt metadata it skips, with the tag in the text ("Tag data larger
      than file. Skipping tag 270"), so Python prints each new one: up to 65,536 lines from an EXIF block per
      tag number. Those warnings from Pillow's modules are ignored (the metadata is skipped all the same, and a
      decode that fails raises).
    - Pillow decodes compressed TIFFs with libtiff, whose default handlers print every error and warning
      ("tempfile.tif: Using code not yet in table."). Pillow raises its own error all the same, so they are set to
      none in the libtiff the process has loaded (found among its mappings: Linux; elsewhere they stay).
    """
    _decoders_quiet.append(True)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = {line.split()[-1] for line in f if "/libtiff" in line and ".so" in line}
        for path in sorted(paths):
            lib = ctypes.CDLL(path)
            lib.TIFFSetErrorHandler.restype = lib.TIFFSetWarningHandler.restype = ctypes.c_void_p
            lib.TIFFSetErrorHandler(None)
            lib.TIFFSetWarningHandler(None)
    except (OSError, AttributeError) as e:  # no /proc, or not that libtiff
        log.debug("libtiff's messages stay on stderr: %s", e)


@dataclass(frozen=True)
class Decoded:
    """A decoded upload in its own colour: what the sampler reads and the encoder writes back."""

    array: np.ndarray  # float32 [C, H, W] in [0, 1]; C = 1 (gray) or 3 (RGB); EXIF orientation applied
    bits: int = 8  # 8 or 16: the samples' precision (PNG output of a 16-bit upload is 16-bit)


_GRAY_16 = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2, as PIL's convert("L")
# EXIF orientation -> numpy ops on an [H, W, ...] array, as PIL's ImageOps.exif_transpose
_ORIENT = {
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}
_warned_no_cv2: list[bool] = []


def _rawmode(img: Image.Image) -> str:
    """The decoder's raw mode (``RGB;16B`` for a 16-bit RGB PNG, which PIL would reduce to 8 bits)."""
    tile = getattr(img, "tile", None) or []
    if not tile:
        return ""
    args = tile[0].args if hasattr(tile[0], "args") else tile[0][3]
    if isinstance(args, tuple):
        args = args[0] if args and isinstance(args[0], str) else ""
    return args if isinstance(args, str) else ""


def _to_float(bands: list[np.ndarray], scale: float, alpha: bool) -> np.ndarray:
    """uint8/uint16 [H, W] planes -> float32 [C, H, W] times ``scale``; with ``alpha`` (the last plane), the
    colour planes composited on white. One plane at a time: PIL's ``split`` and strided views are cheaper to
    read plane by plane than an interleaved [H, W, C] array transposed in one go."""
    color = bands[:-1] if alpha else bands
    out = np.empty((len(color), *color[0].shape), np.float32)
    for i, band in enumerate(color):
        np.multiply(band, np.float32(scale), out=out[i])
    if alpha:
        a = bands[-1] * np.float32(scale)
        out *= a
        out += 1.0 - a
    return out


def _oriented(img: Image.Image, a: np.ndarray) -> np.ndarray:
    """``a`` ([H, W, ...], decoded from ``img``'s data outside Pillow) with ``img``'s EXIF orientation applied: a view."""
    orientation = img.getexif().get(0x0112, 1)
    return _ORIENT[orientation](a) if orientation in _ORIENT else a


def _opencv():  # noqa: ANN202 (the cv2 module)
    """OpenCV, with its own log (libtiff's errors, for one) silenced: a client's file must not write to the
    server's stderr; None when it is not installed."""
    try:
        import cv2
    except ImportError:
        return None
    if not _opencv_quiet:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
        _opencv_quiet.append(True)
    return cv2


_opencv_quiet: list[bool] = []
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_INFLATE_PIECE = 1 << 20  # bytes of image data inflated at a time by the check (its memory)
_PNG_CRITICAL = (b"IHDR", b"PLTE", b"IDAT", b"IEND")


def _png_rows(width: int, height: int, pixel_bytes: int, interlaced: bool) -> list[tuple[int, int]]:
    """(bytes a row, filter byte included; rows) of each pass of a PNG's image data, in order."""
    if not interlaced:
        return [(1 + width * pixel_bytes, height)]
    passes = [(-(-(width - x0) // dx), -(-(height - y0) // dy)) for x0, y0, dx, dy in _ADAM7]
    return [(1 + w * pixel_bytes, h) for w, h in passes if w > 0 and h > 0]


def _png_for_libpng(data: bytes) -> bytes | None:
    """A 16-bit colour PNG as libpng decodes it without a word, or None.

    libpng prints its warnings and errors to stderr (OpenCV leaves its default handlers), so a
    client could write a line to the server's log per upload (a bad ancillary chunk, extra data
    after the image). What goes to OpenCV is the image's critical chunks only (IHDR, a valid
    ``tRNS``, the IDATs, IEND: OpenCV reads nothing else), each chunk's CRC checked, and its
    image data inflated once here, in 1 MB pieces, to check it is whole, exactly as long as the
    header says, with valid filter bytes. None (Pillow decodes it at 8 bits, or says why it
    cannot) for anything else."""
    n = len(data)
    if n < 33 or data[12:16] != b"IHDR" or int.from_bytes(data[8:12], "big") != 13:
        return None
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", data[16:29])
    channels = {2: 3, 4: 2, 6: 4}.get(colour)
    if depth != 16 or channels is None or compression or filtering or interlace > 1 or not width or not height:
        return None
    keep: list[bytes] = []  # IHDR, tRNS
    idat: list[bytes] = []
    ended, end = False, 8  # the run of IDATs; where the last chunk ends
    for pos, kind in _png_chunks(data):
        end = pos + 12 + int.from_bytes(data[pos:pos + 4], "big")
        if end > n:
            return None
        critical = not kind[0] & 0x20  # an upper-case first letter
        if critical and (kind not in _PNG_CRITICAL or (kind == b"IHDR") != (pos == 8)):
            return None  # a second IHDR, an unknown critical chunk
        wanted = kind != b"PLTE" and (critical or (kind == b"tRNS" and colour == 2 and end - pos == 18 and not idat))
        if wanted and zlib.crc32(memoryview(data)[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            return None
        if kind == b"IDAT":
            if ended:
                return None  # IDATs not in one run
            idat.append(data[pos:end])
        else:
            ended = bool(idat)
            if wanted:
                keep.append(data[pos:end])
    if data[end:end + 12] != _PNG_IEND:  # the walk ended at the data's end, or at a malformed IEND
        return None
    if not idat or not _png_data_whole(idat, _png_rows(width, height, channels * 2, bool(interlace))):
        return None
    if 8 + sum(map(len, keep)) + sum(map(len, idat)) + 12 == n:
        return data  # nothing dropped (OpenCV's own files, for one): no copy
    return b"".join([_PNG_SIGNATURE, *keep, *idat, _PNG_IEND])


def _png_data_whole(idat: list[bytes], rows: list[tuple[int, int]]) -> bool:
    """Whether the IDAT chunks' zlib stream inflates to exactly ``rows`` (bytes a row, rows per pass), each row
    starting with a filter type of 0 to 4, with nothing after the stream's end."""
    starts: list[tuple[int, int, int]] = []  # (first byte, end, row bytes) of each pass
    at = 0
    for row, count in rows:
        starts.append((at, at + row * count, row))
        at += row * count
    done, last = 0, len(idat) - 1
    inflate = _deflate.decompressobj()  # ISA-L's when installed: a third less time than zlib's
    try:
        for i, chunk in enumerate(idat):
            pending = memoryview(chunk)[8:-4]
            while True:
                piece = inflate.decompress(pending, _INFLATE_PIECE)
                pending = inflate.unconsumed_tail
                if done + len(piece) > at:
                    return False  # more image data than the header says
                for first, end, row in starts:  # the filter bytes in this piece
                    lo, hi = max(first, done), min(end, done + len(piece))
                    k = first + -(-(lo - first) // row) * row
                    if k < hi and np.frombuffer(piece, np.uint8)[k - done:hi - done:row].max() > 4:
                        return False
                done += len(piece)
                if inflate.eof and (pending or inflate.unused_data or i != last):
                    return False  # data after the stream's end
                if inflate.eof or (not pending and len(piece) < _INFLATE_PIECE):
                    break  # (a whole piece may leave more output for the same input)
        return inflate.eof and done == at
    except _deflate.error:  # not a zlib stream, or its checksum is wrong
        return False


def _decode_16bit_colour(img: Image.Image, data: bytes, rawmode: str) -> Decoded | None:
    """A 16-bit RGB(A)/LA PNG or TIFF through OpenCV (PIL reads it as 8 bits); None without OpenCV, or for a PNG
    libpng would warn about (:func:`_png_for_libpng`)."""
    cv2 = _opencv()
    if cv2 is None:
        if not _warned_no_cv2:
            _warned_no_cv2.append(True)
            log.warning("16-bit colour images are decoded at 8 bits: opencv-python-headless is not installed")
        return None
    if data.startswith(_PNG_SIGNATURE):
        data = _png_for_libpng(data)
        if data is None:
            return None
    a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if a is None or a.dtype != np.uint16 or a.shape[:2] != (img.height, img.width):
        return None  # not what the header said: let PIL decode it (or say why it cannot)
    a = _oriented(img, a)
    if a.ndim == 2:
        order = [None]
    elif rawmode.startswith("LA") and a.shape[2] == 4:  # gray + alpha (PIL calls it RGBA, OpenCV makes it BGRA)
        order = [0, 3]
    else:
        order = {3: [2, 1, 0], 4: [2, 1, 0, 3]}.get(a.shape[2], [])  # BGR(A) -> RGB(A)
        if not order:
            return None
    bands = [a if i is None else a[..., i] for i in order]  # views: no copy before the float planes
    return Decoded(_to_float(bands, 1.0 / 65535.0, alpha=len(bands) in (2, 4)), 16)


def _decode_jpeg(img: Image.Image, data: bytes) -> Decoded | None:
    """An 8-bit gray or colour JPEG through simplejpeg (libjpeg-turbo's TurboJPEG API, straight into numpy): the same
    pixels as Pillow's (tested, for the subsamplings, progressive, restart markers, every EXIF orientation),
    without Pillow's copies on the way to numpy (its ``__array_interface__`` goes through ``tobytes``, its RGB is 4
    bytes a pixel, then ``split``): 0.97 against 1.22 ms of CPU at 384x288, 59 against 82 ms at 4000x3000
    (docs/BENCHMARKS.md). None (Pillow decodes it, as before) without simplejpeg, for CMYK and other modes, and
    for any JPEG libjpeg warns about (corrupt or truncated data: ``strict``), so those keep Pillow's behaviour and
    nothing is printed: OpenCV's decoder, tried first, wrote libjpeg's warnings to the process's stderr."""
    if img.format != "JPEG" or img.mode not in ("L", "RGB"):
        return None
    try:
        import simplejpeg
    except ImportError:
        return None
    try:
        a = simplejpeg.decode_jpeg(data, colorspace="GRAY" if img.mode == "L" else "RGB", fastdct=False,
                                   fastupsample=False, strict=True)
    except ValueError:  # a warning or an error of libjpeg: Pillow decodes it, or says why it cannot
        return None
    if a.dtype != np.uint8 or a.shape[:2] != (img.height, img.width):
        return None
    a = _oriented(img, a)
    bands = [a[..., 0]] if img.mode == "L" else [a[..., 0], a[..., 1], a[..., 2]]  # strided views
    return Decoded(_to_float(bands, 1.0 / 255.0, alpha=False), 8)


def to_array(img: Image.Image, data: bytes | None = None) -> Decoded:
    """Decode to float32 [C, H, W] in [0, 1] in the image's own colour (EXIF orientation applied).

    Gray (L, 1-bit, 16-bit I;16, 32-bit I/F) stays one channel; RGB, palette, CMYK, YCbCr and
    the rest become RGB. Alpha (RGBA, LA, PA, palette transparency) is composited on white.
    16-bit samples are scaled by 1/65535 and keep their precision (``bits=16``; 16-bit RGB(A)
    PNG/TIFF go through OpenCV, given the encoded ``data``), 8-bit by 1/255.
    """
    if data is not None:
        decoded = _decode_jpeg(img, data)
        if decoded is not None:
            return decoded
    rawmode = _rawmode(img) if data is not None and img.mode in ("RGB", "RGBA", "LA") else ""
    if ";16" in rawmode:
        decoded = _decode_16bit_colour(img, data, rawmode)
        if decoded is not None:
            return decoded
    img.load()  # the decode; errors here are corrupt or truncated data
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode in _GRAY_16 or mode == "F":
        a = np.asarray(img, dtype=np.float32)
        a = np.clip(a, 0.0, 1.0) if mode == "F" else np.clip(a * np.float32(1.0 / 65535.0), 0.0, 1.0)
        return Decoded(a[None], 8 if mode == "F" else 16)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("PA", "RGBa"):
        img = img.convert("RGBA")
    elif mode == "La":
        img = img.convert("LA")
    elif mode == "1":
        img = img.convert("L")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX
    bands = [np.asarray(b) for b in (img.split() if img.mode != "L" else (img,))]
    return Decoded(_to_float(bands, 1.0 / 255.0, alpha=img.mode in ("RGBA", "LA")), 8)


def to_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """[..., C, h, w] float32 (C = 1 or 3) -> the model's ``channels`` (1, 3 or 4), for the localiser.

    Gray is replicated to RGB; RGB becomes gray with ITU-R 601-2 luma weights (PIL's
    ``convert("L")``); a 4-channel model gets RGB and an opaque alpha. Resizing and these
    conversions are linear, so they commute: a server converts the small resized copy.
    """
    c = array.shape[-3]
    if c == channels:
        return array
    if c == 1 and channels in (3, 4):
        rgb = np.repeat(array, 3, axis=-3)
    elif c == 3 and channels == 1:
        gray = np.tensordot(array, _LUMA, axes=([array.ndim - 3], [0]))  # [..., h, w]
        return np.ascontiguousarray(np.expand_dims(gray, -3), np.float32)
    elif c == 3 and channels == 4:
        rgb = array
    else:
        raise ValueError(f"cannot convert {c} channel(s) to the model's {channels}")
    if channels == 3:
        return np.ascontiguousarray(rgb, np.float32)
    alpha = np.ones_like(rgb[..., :1, :, :])
    return np.ascontiguousarray(np.concatenate([rgb, alpha], axis=-3), np.float32)


def decode(data: bytes, limits: Limits, filename: str = "image", declared: tuple[int, int] | None = None) -> Decoded:
    """Bytes -> :class:`Decoded` in the upload's own colour; raises BadImageError / ImageTooLargeError.

    ``declared``: the (width, height) the caller sized the image by (:func:`header_size`); Pillow's
    header must agree before any pixel is decoded (what was reserved is what is decoded).
    """
    img = open_checked(data, limits, filename)
    if declared is not None and img.size != tuple(declared):
        raise BadImageError(f"{filename}'s header declares {declared[0]}x{declared[1]} pixels where the decoder "
                            f"reads {img.size[0]}x{img.size[1]}: a malformed image")
    try:
        return to_array(img, data)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError(f"{filename} has more than {limits.max_pixels} pixels, the limit "
                                 "(STN_MAX_IMAGE_PIXELS)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise BadImageError(f"{filename} could not be decoded (corrupt or truncated?): {e}") from None


def _quantise(array: np.ndarray, top: float, dtype: type) -> np.ndarray:
    """float [C, h, w] in [0, 1] -> ``dtype`` [h, w] or [h, w, C], rounded (``top`` is 1.0's value).

    In place after one copy, and the planes interleaved by OpenCV's ``merge`` (SIMD), where numpy's strided
    copy of the transpose took three quarters of the time: 0.14 against 0.58 ms for a 300x424 RGB result
    (docs/BENCHMARKS.md, "PNG encoding"). The same bits either way.
    """
    a = np.clip(array, 0.0, 1.0)  # a new array: the caller's is not touched
    a *= np.float32(top)
    a += np.float32(0.5)
    a = a.astype(dtype)
    if a.shape[0] == 1:
        return a[0]
    try:
        import cv2
    except ImportError:  # the runtime extra has OpenCV; without it, numpy's copy
        return np.ascontiguousarray(a.transpose(1, 2, 0))
    return cv2.merge(list(a))


def to_uint8(array: np.ndarray) -> np.ndarray:
    """float [C, h, w] in [0, 1] -> uint8 [h, w] or [h, w, C], rounded."""
    return _quantise(array, 255.0, np.uint8)


def to_uint16(array: np.ndarray) -> np.ndarray:
    """float [C, h, w] in [0, 1] -> uint16 [h, w] or [h, w, C], rounded."""
    return _quantise(array, 65535.0, np.uint16)


def _png16(array: np.ndarray) -> bytes | None:
    """float [C, h, w] -> 16-bit PNG (gray through PIL, RGB through OpenCV); None without OpenCV for RGB."""
    a = to_uint16(array)
    if a.ndim == 2:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG", compress_level=1)  # mode I;16: a 16-bit gray PNG
        return buf.getvalue()
    cv2 = _opencv()
    if cv2 is None:
        return None
    ok, out = cv2.imencode(".png", np.ascontiguousarray(a[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return out.tobytes() if ok else None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (gray, gray+alpha, RGB, RGBA)


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(payload, zlib.crc32(tag)))


_PNG_IEND = _png_chunk(b"IEND", b"")


def png8(pixels: np.ndarray) -> bytes:
    """uint8 [h, w] or [h, w, C] (C = 1 to 4) -> an 8-bit PNG.

    Every row uses PNG's Up filter (the row minus the one above, modulo 256, computed by numpy), and all
    rows are deflated as one stream at level 1 (ISA-L when installed, else zlib). Pillow's
    ``compress_level=1`` tries every filter on every row and then runs zlib. This writer takes 6 to 8x less
    CPU for files within about 7 % of Pillow's size, and numpy and the deflate run without the GIL
    (docs/BENCHMARKS.md, "PNG encoding").
    """
    h, w = pixels.shape[:2]
    c = 1 if pixels.ndim == 2 else pixels.shape[2]
    rows = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(h, w * c)
    filtered = np.empty((h, w * c + 1), np.uint8)
    filtered[:, 0] = 2  # filter type Up; the first row's "above" is zeros, so it is stored as is
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    header = struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOUR_TYPES[c], 0, 0, 0)
    return b"".join((_PNG_SIGNATURE, _png_chunk(b"IHDR", header),
                     _png_chunk(b"IDAT", _deflate.compress(filtered, 1)), _png_chunk(b"IEND", b"")))


QUALITY = (1, 100)  # the JPEG / WebP quality accepted: Pillow's scale, 1 the smallest file, 100 the best image
DEFAULT_QUALITY = 90  # of the server's and the batch jobs' JPEG / WebP outputs
_QUALITY_TEXT = re.compile(r"[0-9]{1,3}")  # fullmatch: ASCII digits (int() would take "١٢", " 5" and "1_0")


def check_quality(quality: int) -> int:
    """``quality`` when it is an int within :data:`QUALITY`; ValueError saying what is expected otherwise."""
    if isinstance(quality, bool) or not isinstance(quality, int) or not QUALITY[0] <= quality <= QUALITY[1]:
        raise ValueError(f"quality must be an integer from {QUALITY[0]} to {QUALITY[1]} (JPEG and WebP); "
                         f"got {quality!r}")
    return quality


def parse_quality(text: str) -> int:
    """A quality given as text (a query parameter, a flag) -> int within :data:`QUALITY`; ValueError otherwise."""
    return check_quality(int(text) if _QUALITY_TEXT.fullmatch(text or "") else text)  # type: ignore[arg-type]


def encode(array: np.ndarray, fmt: str = "png", quality: int = DEFAULT_QUALITY, bits: int = 8) -> bytes:
    """float [C, h, w] in [0, 1] (C = 1 or 3) -> PNG, JPEG or WebP bytes.

    ``bits=16`` (a 16-bit upload) writes a 16-bit PNG; JPEG and WebP are always 8-bit, and WebP has no
    gray (gray is written as RGB). ``quality`` is JPEG's and WebP's.
    """
    if fmt not in ENCODINGS:
        raise ValueError(f"format must be one of {', '.join(ENCODINGS)}, got {fmt!r}")
    check_quality(quality)
    if fmt == "png" and bits == 16:
        data = _png16(array)
        if data is not None:
            return data
    if fmt == "png":
        return png8(to_uint8(array))
    img = Image.fromarray(to_uint8(array))
    buf = io.BytesIO()
    if fmt == "webp":
        if img.mode not in ("RGB", "RGBA"):
            img = img.convert("RGB")
        img.save(buf, "WEBP", quality=quality, method=4)
    else:
        if img.mode == "RGBA":
            img = img.convert("RGB")
        img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def media_type(fmt: str) -> str:
    return ENCODINGS[fmt][1]


def suffix(fmt: str) -> str:
    """The file suffix of an output format (``jpeg`` -> ``.jpg``)."""
    return ENCODINGS[fmt][2]


def parse_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` (``256x128``, ASCII digits, up to 6 each, ``x`` or ``X``) -> ``(h, w)``; ValueError saying
    what is expected otherwise."""
    m = _SIZE.fullmatch(text or "")
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"size must be WIDTHxHEIGHT with positive integers, like 256x128; got {text!r}")
    return int(m.group(2)), int(m.group(1))
