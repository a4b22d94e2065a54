"""STN_IMAGE_FORMATS: JPEG, PNG, WebP and BMP by default; TIFF only when listed, refused (415 on HTTP, an error
line in a batch job) with the setting named otherwise, without running Pillow's TIFF decoder."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin

from service import images
from service.settings import Settings


def encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(12 * 16 * 3, dtype=np.uint8).reshape(12, 16, 3)).save(buf, fmt)
    return buf.getvalue()


def test_default_refuses_tiff_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encoded("TIFF")
    called = []
    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "_open", lambda self: called.append(1))
    with pytest.raises(images.UnsupportedFormatError, match="STN_IMAGE_FORMATS") as e:
        images.decode(data, images.Limits(), "scan.tif")
    assert "scan.tif is TIFF" in str(e.value) and "JPEG, PNG, WebP, BMP" in str(e.value)
    assert called == []  # the TIFF parser never saw the bytes
    assert isinstance(e.value, images.BadImageError)  # callers that only know 400 still refuse it


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP"])
def test_default_formats_decode(fmt: str) -> None:
    assert images.sniff_format(encoded(fmt)) == fmt
    assert images.decode(encoded(fmt), images.Limits()).array.shape[1:] == (12, 16)


def test_opt_in_decodes_tiff_and_opt_out_refuses_others() -> None:
    s = Settings(image_formats="png, tif")
    assert s.image_formats == ["PNG", "TIFF"]
    limits = images.Limits(formats=tuple(s.image_formats))
    assert images.decode(encoded("TIFF"), limits).array.shape == (3, 12, 16)
    with pytest.raises(images.UnsupportedFormatError, match="is JPEG.*send PNG, TIFF"):
        images.decode(encoded("JPEG"), limits)
    with pytest.raises(images.BadImageError, match="not a supported image; send PNG, TIFF") as e:
        images.decode(b"GIF89a" + bytes(40), limits)
    assert not isinstance(e.value, images.UnsupportedFormatError)  # GIF is not a format the setting can list


def test_setting_is_validated() -> None:
    assert Settings().image_formats == ["JPEG", "PNG", "WEBP", "BMP"]
    assert Settings(image_formats="jpg,JPEG,webp").image_formats == ["JPEG", "WEBP"]
    for bad in ("gif", "", "png,svg"):
        with pytest.raises(ValueError, match="image_formats must list some of"):
            Settings(image_formats=bad)
