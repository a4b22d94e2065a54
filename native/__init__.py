"""The native sampler kernels: an onnxruntime custom-op library (domain ``ai.stn``). Torch-free.

Ops (``native/ops.cc`` has the full contract):

- ``ai.stn::GridSample(X, Grid)``: ``torch.nn.functional.grid_sample`` exactly (bilinear, nearest,
  bicubic x zeros, border, reflection x align_corners), NCHW float32, any shapes.
- ``ai.stn::Warp(X, theta, size_like)``: the same sampling at affine ``[N, 2, 3]`` or projective
  ``[N, 3, 3]`` theta applied to the output's base coordinates, computed on the fly (no grid
  tensor); the output size is the first two dims of ``size_like`` (the stn sampler's base_grid).

Two builds (``native/build.py``, run by ``pip install``): ``libstn_sampler.so`` (CPU) and, where
nvcc was found, ``libstn_sampler_cuda.so`` (the CPU kernels plus CUDA kernels under the same
names). A session registers one of them (:func:`register`): the CUDA one only when the CUDA
execution provider is in use. Everything here is optional: :func:`status` says exactly why the
library is not there, and callers fall back to the exported lowering.

``STN_NATIVE_LIBRARY`` names another CPU library file (tests use it for a broken library).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DOMAIN = "ai.stn"
OPSET = 1
GRID_SAMPLE = "GridSample"
WARP = "Warp"
HERE = Path(__file__).resolve().parent
LIB = "libstn_sampler.so"
CUDA_LIB = "libstn_sampler_cuda.so"
CUDA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


class NativeUnavailable(RuntimeError):
    """The native sampler library cannot be used here; the message says why and what to do."""


def library_path(cuda: bool = False) -> Path:
    """Where the library is expected (``STN_NATIVE_LIBRARY`` overrides the CPU one)."""
    if not cuda and os.environ.get("STN_NATIVE_LIBRARY"):
        return Path(os.environ["STN_NATIVE_LIBRARY"])
    return HERE / (CUDA_LIB if cuda else LIB)


def op_model(op: str = GRID_SAMPLE, mode: str = "bilinear", padding: str = "zeros", align_corners: bool = False,
             domain: str = DOMAIN, opset: int = 18) -> bytes:
    """A one-node model, any shapes: ``GridSample(X, G) -> Y`` or ``Warp(X, T, S) -> Y``.

    ``domain`` ``""`` or ``"com.microsoft"`` gives onnxruntime's own GridSample, for comparisons
    (tests, ``stn bench sampler``, ``stn doctor --gpu``).
    """
    from onnx import TensorProto, helper

    inputs = ["X", "T", "S"] if op == WARP else ["X", "G"]
    node = helper.make_node(op, inputs, ["Y"], domain=domain, mode=mode, padding_mode=padding,
                            align_corners=int(align_corners))
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets, ir_version=8).SerializeToString()


def _probe_model() -> bytes:
    """A 1-image model using both ops, to prove a library really computes."""
    import onnx
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    nodes = [helper.make_node(GRID_SAMPLE, ["x", "grid"], ["y"], domain=DOMAIN, mode="bilinear"),
             helper.make_node(WARP, ["x", "theta", "grid"], ["z"], domain=DOMAIN, mode="bilinear")]
    graph = helper.make_graph(
        nodes, "stn_native_probe",
        [helper.make_tensor_value_info("x", f, [1, 1, 2, 2]), helper.make_tensor_value_info("grid", f, [1, 1, 1, 2]),
         helper.make_tensor_value_info("theta", f, [1, 2, 3])],
        [helper.make_tensor_value_info("y", f, [1, 1, 1, 1]), helper.make_tensor_value_info("z", f, [1, 1, 1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, OPSET)],
                              ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _check_library(path: Path) -> str:
    """'' when ``path`` loads in onnxruntime and computes the probe right, else the reason."""
    import numpy as np
    import onnxruntime as ort

    if not path.is_file():
        return f"{path} does not exist"
    try:
        so = ort.SessionOptions()
        so.register_custom_ops_library(str(path))
    except Exception as e:  # noqa: BLE001 (onnxruntime raises its own types for dlopen/registration failures)
        return f"onnxruntime cannot load {path}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
    try:
        sess = ort.InferenceSession(_probe_model(), so, providers=["CPUExecutionProvider"])
        x = np.array([[[[0.0, 1.0], [2.0, 3.0]]]], np.float32)
        y, z = sess.run(None, {"x": x, "grid": np.zeros((1, 1, 1, 2), np.float32),
                               "theta": np.array([[[1, 0, 0], [0, 1, 0]]], np.float32)})
    except Exception as e:  # noqa: BLE001
        return f"{path} loads but its ops fail: {e}"
    if not (np.allclose(y, 1.5) and np.allclose(z, 1.5)):
        return f"{path} loads but computes wrong values (probe gave {y.ravel()}, {z.ravel()}; expected 1.5)"
    return ""


def _info(path: Path) -> str:
    try:
        lib = ctypes.CDLL(str(path))
        lib.stn_native_info.restype = ctypes.c_char_p
        return lib.stn_native_info().decode()
    except (OSError, AttributeError):
        return ""


@functools.lru_cache(maxsize=8)
def _status(cpu_path: str, cuda_path: str) -> dict[str, Any]:
    cpu, cuda = Path(cpu_path), Path(cuda_path)
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        reason = f"onnxruntime is not installed ({e})"
        return {"available": False, "path": None, "reason": reason, "cuda": False, "cuda_path": None,
                "cuda_reason": reason, "info": "", "domain": DOMAIN}
    reason = _check_library(cpu)
    if reason and not cpu.exists() and "STN_NATIVE_LIBRARY" not in os.environ:
        reason += (" (not built: install with onnxruntime's headers present, `sh native/fetch-ort-headers.sh` "
                   "then `pip install -e .`, or run `python -m native.build`)")
    cuda_reason = _check_library(cuda) if cuda.exists() else f"{cuda} was not built (no nvcc at install time)"
    return {"available": not reason, "path": str(cpu) if not reason else None, "reason": reason,
            "cuda": not cuda_reason, "cuda_path": str(cuda) if not cuda_reason else None, "cuda_reason": cuda_reason,
            "info": _info(cpu) if not reason else "", "domain": DOMAIN}


def status() -> dict[str, Any]:
    """What ``stn doctor`` and the service report.

    Keys: ``available`` (bool: the CPU library loads in onnxruntime and computes), ``path``
    (str | None), ``reason`` (why not available; "" when available), ``cuda`` (bool: the CUDA
    library was built and loads), ``cuda_path``, ``cuda_reason``, ``info`` (the build's own
    description), ``domain``. Checked once per process (per library path).
    """
    return dict(_status(str(library_path()), str(library_path(cuda=True))))


def available() -> bool:
    return bool(status()["available"])


def register(options: Any, providers: Sequence[str] = ("CPUExecutionProvider",)) -> str:
    """Register the library on an ``onnxruntime.SessionOptions``; returns the registered path.

    The CUDA library when a CUDA provider is among ``providers`` and it loads, else the CPU one.
    Raises :class:`NativeUnavailable` (with the reason) when the library cannot be used.
    """
    st = status()
    if not st["available"]:
        raise NativeUnavailable(f"native sampler library unavailable: {st['reason']}")
    path = st["cuda_path"] if st["cuda"] and any(p in CUDA_PROVIDERS for p in providers) else st["path"]
    options.register_custom_ops_library(path)
    return path


_warned = False


def warn_unavailable_once(what: str) -> None:
    """One clear warning per process that ``what`` falls back to the exported lowering."""
    global _warned
    if not _warned:
        _warned = True
        log.warning("native sampler not in use (%s): %s; %s", DOMAIN, status()["reason"], what)
