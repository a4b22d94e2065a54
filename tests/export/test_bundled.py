"""The bundled models (models/default/): each .pt checkpoint rebuilds with today's code and gives the
same outputs as the .onnx that was exported from it (the exporter's parity check, in onnxruntime)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from export.metadata import BASE_GRID, ModelInfo, read_props
from export.onnx_export import PARITY_ATOL, check_parity
from models import frames
from models.checkpoint import load_checkpoint

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "default"
CHECKPOINTS = sorted(p for p in BUNDLED.glob("*.pt") if p.with_suffix(".onnx").exists())


def test_models_are_bundled() -> None:
    assert {p.stem for p in CHECKPOINTS} >= {"document-rectifier", "fmnist-rts-affine"}


@pytest.mark.parametrize("checkpoint", CHECKPOINTS, ids=lambda p: p.stem)
def test_bundled_checkpoint_rebuilds_and_matches_its_onnx(checkpoint: Path) -> None:
    stn = load_checkpoint(checkpoint).build_stn().eval()
    model = onnx.load(str(checkpoint.with_suffix(".onnx")))
    info = ModelInfo.from_props(read_props(model))
    cfg = stn.config
    assert (info.transform, info.output_size, info.parametrisation) == (cfg.transform, cfg.output_size,
                                                                         cfg.parametrisation)
    # The file's grid base is what models.frames computes today, and what the module holds.
    (base,) = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == BASE_GRID]
    np.testing.assert_array_equal(base, frames.base_grid(cfg.transform, cfg.output_size, cfg.tps_grid))
    np.testing.assert_array_equal(base, stn.base_grid.numpy())
    # onnxruntime on the bundled file vs PyTorch on the rebuilt checkpoint, batch 1 and 3, two image sizes.
    assert check_parity(stn, checkpoint.with_suffix(".onnx")) <= PARITY_ATOL
