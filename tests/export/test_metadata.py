"""ModelInfo reads itself from a file or a loaded model (issue 11: one constructor for every reader)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from export.metadata import MetadataError, ModelInfo, write_props

INFO = ModelInfo(name="m", version="3", transform="projective", in_channels=3, loc_size=(32, 32),
                 output_size=(30, 36), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), metrics={"corner_error": 0.1})


def identity_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    return helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))


def test_from_file_and_from_proto_read_what_was_written(tmp_path: Path) -> None:
    proto = identity_model()
    write_props(proto, INFO)
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    assert ModelInfo.from_file(path) == INFO
    assert ModelInfo.from_file(str(path)) == INFO
    assert ModelInfo.from_proto(onnx.load(str(path))) == INFO


def test_from_file_says_what_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "bare.onnx"
    onnx.save(identity_model(), str(path))
    with pytest.raises(MetadataError, match="name"):
        ModelInfo.from_file(path)
