"""Image bytes in, float arrays out, and back: limits, decoding, channel conversion, encoding.

Limits are checked before any pixel is decoded: the byte size first, then the pixel count
the header declares (``PIL.Image.open`` reads only the header), quoting STN_MAX_IMAGE_PIXELS.
PIL's own decompression-bomb check (and its warning on stderr) is off: ours is the same check. Arrays are float32 [C, H, W] in [0, 1],
in the orientation the user sees (EXIF orientation applied).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")  # what PIL may decode; anything else is refused
ENCODINGS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg")}

# Pillow's decompression-bomb check (a warning on stderr above its limit, an error quoting twice it above
# that) is replaced by open_checked's own, same check of the header's size against STN_MAX_IMAGE_PIXELS.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """An upload that cannot be served; the message says what to change."""


class BadImageError(ImageError):
    """Not an image, an unsupported format, or truncated/corrupt data (HTTP 400)."""


class ImageTooLargeError(ImageError):
    """Over the byte or pixel limit (HTTP 413)."""


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 20 * 1024 * 1024  # encoded size of one image
    max_pixels: int = 40_000_000  # width x height declared in the header


def check_bytes(n: int, limits: Limits, what: str = "image") -> None:
    if n > limits.max_bytes:
        raise ImageTooLargeError(f"{what} is {n} bytes; the limit is {limits.max_bytes} bytes (STN_MAX_UPLOAD_BYTES)")


def open_checked(data: bytes, limits: Limits, filename: str = "image") -> Image.Image:
    """Open (header only) and check format and declared pixel count; nothing is decoded yet."""
    check_bytes(len(data), limits, filename)
    if not data:
        raise BadImageError(f"{filename} is empty")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError(f"{filename} declares more than {limits.max_pixels} pixels, the limit "
                                 "(STN_MAX_IMAGE_PIXELS)") from None
    except UnidentifiedImageError:
        raise BadImageError(f"{filename} is not a supported image; send JPEG, PNG, WebP, BMP or TIFF") from None
    except Exception as e:  # truncated headers raise all sorts
        raise BadImageError(f"{filename} could not be read: {type(e).__name__}: {e}") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise BadImageError(f"{filename} declares an empty size {w}x{h}")
    if w * h > limits.max_pixels:
        raise ImageTooLargeError(
            f"{filename} is {w}x{h} = {w * h} pixels; the limit is {limits.max_pixels} pixels (STN_MAX_IMAGE_PIXELS)")
    return img


def to_array(img: Image.Image, channels: int) -> np.ndarray:
    """Decode and convert to float32 [channels, H, W] in [0, 1] (EXIF orientation applied).

    Grayscale, RGB, RGBA, palette, CMYK, 1-bit and 16-bit modes are accepted. Alpha is
    dropped (colour kept as stored) unless the model takes 4 channels; 16-bit samples
    are scaled by 1/65535, 8-bit by 1/255.
    """
    if channels not in (1, 3, 4):
        raise ValueError(f"models with {channels} channels are not supported (1, 3 or 4)")
    img.load()  # the decode; errors here are corrupt or truncated data
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float32)
        a = np.clip(a, 0.0, 1.0) if mode == "F" else np.clip(a / 65535.0, 0.0, 1.0)
        if channels == 1:
            return a[None].astype(np.float32, copy=False)
        planes = [a, a, a] + ([np.ones_like(a)] if channels == 4 else [])
        return np.stack(planes).astype(np.float32, copy=False)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    target = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    if img.mode != target:
        if channels == 1 and img.mode not in ("1", "L", "LA", "RGB", "RGBA", "RGBX"):
            img = img.convert("RGB")
        img = img.convert(target)
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[None]
    else:
        a = a.transpose(2, 0, 1)
    out = np.empty(a.shape, np.float32)
    np.multiply(a, np.float32(1.0 / 255.0), out=out)
    return out


def decode(data: bytes, channels: int, limits: Limits, filename: str = "image") -> np.ndarray:
    """Bytes -> float32 [channels, H, W] in [0, 1]; raises BadImageError / ImageTooLargeError."""
    img = open_checked(data, limits, filename)
    try:
        return to_array(img, channels)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError(f"{filename} has more than {limits.max_pixels} pixels, the limit "
                                 "(STN_MAX_IMAGE_PIXELS)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise BadImageError(f"{filename} could not be decoded (corrupt or truncated?): {e}") from None


def to_uint8(array: np.ndarray) -> np.ndarray:
    """float [C, h, w] in [0, 1] -> uint8 [h, w] or [h, w, C], rounded."""
    a = np.clip(array, 0.0, 1.0) * 255.0 + 0.5
    a = a.astype(np.uint8)
    return a[0] if a.shape[0] == 1 else np.ascontiguousarray(a.transpose(1, 2, 0))


def encode(array: np.ndarray, fmt: str = "png", quality: int = 90) -> bytes:
    """float [C, h, w] in [0, 1] -> PNG or JPEG bytes (JPEG drops a 4th channel)."""
    if fmt not in ENCODINGS:
        raise ValueError(f"format must be one of {', '.join(ENCODINGS)}, got {fmt!r}")
    a = to_uint8(array)
    img = Image.fromarray(a)
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG", compress_level=1)
    else:
        if img.mode == "RGBA":
            img = img.convert("RGB")
        img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def media_type(fmt: str) -> str:
    return ENCODINGS[fmt][1]
