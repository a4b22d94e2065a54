"""service.standin: the one stand-in model and image generator of ``stn bench serve`` and ``stn bench batch``."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from service import standin
from service.runtime import SessionConfig, load_model


def test_make_jpegs_are_distinct_photos_of_the_size() -> None:
    jpegs = standin.make_jpegs(4, 64, 48, seed=3)
    assert len(set(jpegs)) == 4 and jpegs == standin.make_jpegs(4, 64, 48, seed=3)
    for data in jpegs:
        with Image.open(io.BytesIO(data)) as im:
            assert (im.format, im.size, im.mode) == ("JPEG", (64, 48), "RGB")


@pytest.mark.slow  # a torch export in a subprocess
def test_standin_model_is_exported_once_and_says_what_it_is(tmp_path: Path) -> None:
    onnx_path, ckpt = standin.standin_model(tmp_path)
    assert onnx_path.is_file() and ckpt.is_file()
    stamp = onnx_path.stat().st_mtime_ns
    assert standin.standin_model(tmp_path) == (onnx_path, ckpt) and onnx_path.stat().st_mtime_ns == stamp
    info = load_model(onnx_path, SessionConfig(providers=("CPUExecutionProvider",))).info
    assert (info.name, info.transform, info.in_channels) == ("standin", "affine", 3)
    assert (tuple(info.loc_size), tuple(info.output_size)) == (standin.STANDIN["loc_size"], standin.STANDIN["output_size"])
