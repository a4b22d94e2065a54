"""The CUDA kernels of the native sampler: parity with torch on a GPU (skipped without one).

The session forbids CPU fallback (``session.disable_cpu_ep_fallback``), so a pass proves the
ai.stn ops ran on the CUDA execution provider, on onnxruntime's compute stream.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

import native
from service.runtime import resolve_providers

CUDA = "CUDAExecutionProvider"
STATUS = native.status()
pytestmark = [
    pytest.mark.skipif(not STATUS["cuda"], reason=f"CUDA library not built or not loadable: {STATUS['cuda_reason']}"),
    pytest.mark.skipif(CUDA not in resolve_providers([CUDA]), reason="no usable CUDA execution provider (no GPU)"),
]


def _session(op: str, mode: str, padding: str, align_corners: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    assert native.register(so, [CUDA, "CPUExecutionProvider"]) == STATUS["cuda_path"]
    return ort.InferenceSession(native.op_model(op, mode, padding, align_corners), so,
                                providers=[CUDA, "CPUExecutionProvider"])


@pytest.mark.parametrize("mode,padding,align_corners",
                         list(itertools.product(("bilinear", "nearest", "bicubic"), ("zeros", "border", "reflection"),
                                                (False, True))))
def test_cuda_grid_sample_and_warp_match_torch(mode: str, padding: str, align_corners: bool) -> None:
    g = torch.Generator().manual_seed(0)
    gs = _session("GridSample", mode, padding, align_corners)
    warp = _session("Warp", mode, padding, align_corners)
    for n, c, h_in, w_in, h, w in [(2, 3, 37, 29, 17, 23), (1, 1, 1, 1, 4, 5), (3, 4, 1, 9, 6, 7)]:
        x = torch.randn(n, c, h_in, w_in, generator=g)
        grid = torch.rand(n, h, w, 2, generator=g) * 3 - 1.5
        grid[0, 0, 0, 0] = float("nan")
        ref = F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=align_corners).numpy()
        y = gs.run(None, {"X": x.numpy(), "G": grid.numpy()})[0]
        assert np.array_equal(np.isnan(y), np.isnan(ref))
        assert np.abs(np.nan_to_num(y) - np.nan_to_num(ref)).max() <= 1e-5
        theta = torch.tensor([[0.9, 0.2, 0.1], [-0.15, 1.1, 0.0]]).repeat(n, 1, 1)
        smooth = F.interpolate(torch.rand(n, c, 4, 4, generator=g), size=(h_in, w_in), mode="bilinear")
        base = F.affine_grid(theta, [n, c, h, w], align_corners=align_corners)
        ref = F.grid_sample(smooth, base, mode=mode, padding_mode=padding, align_corners=align_corners).numpy()
        y = warp.run(None, {"X": smooth.numpy(), "T": theta.numpy(), "S": np.zeros((h, w, 3), np.float32)})[0]
        assert np.abs(y - ref).max() <= 1e-5
