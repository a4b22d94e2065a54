"""Export a SpatialTransformer to a self-describing ONNX model (the contract in docs/DESIGN.md).

Recipe (timm ``utils/onnx.py``): eval, fixed tensor names, dynamic batch (and H, W: the
graph resizes internally), the sampler lowered by choice, the internal ``loc_input`` and
``base_grid`` named by the contract, ``stn.*`` metadata, ``onnx.checker`` full check, then
parity against PyTorch in onnxruntime at several batch sizes before declaring success.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from export import lowerings, native_sampler
from export.metadata import BASE_GRID, INPUT_IMAGE, LOC_INPUT, OUTPUT_RECTIFIED, OUTPUT_THETA, ModelInfo, write_props
from models.stn import SpatialTransformer

log = logging.getLogger(__name__)
# The exporter warns once per missing optional package (torchvision ops); not our concern.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

PARITY_ATOL = 1e-4  # float32, whole model (conv stacks add rounding); the sampler alone is held to 1e-5 in tests


class ExportError(RuntimeError):
    """Export produced a model that breaks the contract or does not match PyTorch."""


@dataclass
class ExportReport:
    path: Path
    lowering: str
    opset: int
    max_abs_diff: float  # worst of |d theta| / (1 + |theta|) and |d rectified| (see check_parity)
    batch_sizes: tuple[int, ...]
    sampler: str = ""  # the sampler op in the file (e.g. "GridSample", "ai.stn::Warp")

    def summary(self) -> str:
        text = (f"wrote {self.path}: lowering={self.lowering} opset={self.opset} sampler={self.sampler} "
                f"parity max|diff|={self.max_abs_diff:.2e} at batch sizes {list(self.batch_sizes)}")
        if self.lowering == "native":
            text += ("\nnote: this model uses the ai.stn custom ops: it runs only where the stn native sampler "
                     "library is registered (the stn service and batch jobs do it; see native.status())")
        return text


class _Exportable(torch.nn.Module):
    """Wraps the STN so the exported graph has exactly the contract's inputs and outputs."""

    def __init__(self, stn: SpatialTransformer) -> None:
        super().__init__()
        self.stn = stn

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.stn(image)


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for t in graph.initializer:
        if t.name == old:
            t.name = new
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        if vi.name == old:
            vi.name = new


def _name_contract_tensors(model: onnx.ModelProto, base_grid: np.ndarray) -> None:
    """Give the localisation input and the grid base their contract names."""
    graph = model.graph
    resizes = [n for n in graph.node if n.op_type == "Resize" and INPUT_IMAGE in n.input]
    if len(resizes) != 1:
        raise ExportError(f"expected one Resize of {INPUT_IMAGE!r} in the exported graph, found {len(resizes)}")
    _rename_value(graph, resizes[0].output[0], LOC_INPUT)
    matches = [t for t in graph.initializer
               if tuple(t.dims) == base_grid.shape and np.array_equal(onnx.numpy_helper.to_array(t), base_grid)]
    if len(matches) != 1:
        raise ExportError(f"expected one base-grid initializer of shape {list(base_grid.shape)}, found {len(matches)}")
    _rename_value(graph, matches[0].name, BASE_GRID)


def export_onnx(
    stn: SpatialTransformer,
    path: str | os.PathLike,
    info: ModelInfo,
    lowering: str = "onnx",
    opset: int = 18,
    parity_batch_sizes: tuple[int, ...] = (1, 3),
) -> ExportReport:
    """Export ``stn`` to ``path`` with ``info`` as metadata; raise ExportError if parity fails."""
    cfg = stn.config
    lowerings.check_lowering(lowering, cfg.mode, cfg.padding_mode, opset)
    if lowering == "native":
        import native

        if not native.available():
            raise ExportError(f"--grid-sample native needs the native sampler library to check parity: "
                              f"{native.status()['reason']}; or export with --grid-sample onnx")
    path = Path(path)
    if path.is_dir():  # before the export's work: os.replace would fail only at the end
        raise ExportError(f"{path} is a folder: give the .onnx file to write (e.g. {path / (info.name + '.onnx')})")
    stn = stn.eval().cpu()
    lh, lw = cfg.loc_size
    example = torch.rand(2, cfg.in_channels, lh + 7, lw + 5)
    batch, height, width = (torch.export.Dim(n, min=1, max=16384) for n in ("batch", "height", "width"))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "raw.onnx"
        try:
            torch.onnx.export(
                _Exportable(stn), (example,), raw, dynamo=True, opset_version=opset,
                input_names=[INPUT_IMAGE], output_names=[OUTPUT_RECTIFIED, OUTPUT_THETA],
                dynamic_shapes={"image": {0: batch, 2: height, 3: width}},
                custom_translation_table={torch.ops.stn.grid_sample.default: lowerings.translation(lowering)},
                external_data=False, verbose=False,
            )
        except Exception as e:  # the exporter wraps everything in its own types
            raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
        model = onnx.load(raw)
    _name_contract_tensors(model, stn.base_grid.numpy())
    if lowering == "native":
        native_sampler.fuse_warp(model, info)
    model.producer_name = "stn"
    model.doc_string = f"Spatial transformer ({cfg.transform}); see stn.* metadata_props."
    write_props(model, info)
    onnx.checker.check_model(model, full_check=True)
    tmp_path = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, tmp_path)
        diff = check_parity(stn, tmp_path, parity_batch_sizes)
        os.replace(tmp_path, path)
    except OSError as e:  # a parent that is a file, no permission, a full disk: said, not a traceback
        why = ("a folder on its path is a file" if isinstance(e, (FileExistsError, NotADirectoryError))
               else e.strerror or str(e))
        raise ExportError(f"cannot write {path}: {why}") from e
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)
    return ExportReport(path, lowering, opset, diff, tuple(parity_batch_sizes), sampler_op(model))


def sampler_op(model: onnx.ModelProto) -> str:
    """The sampler op a model runs: ``GridSample``, ``com.microsoft::GridSample``, ``ai.stn::Warp``, ... or
    ``gather`` (core ops)."""
    for node in model.graph.node:
        if node.op_type in ("GridSample", "Warp"):
            return f"{node.domain}::{node.op_type}" if node.domain else node.op_type
    return "gather"


def check_parity(stn: SpatialTransformer, onnx_path: str | os.PathLike,
                 batch_sizes: tuple[int, ...] = (1, 3), atol: float = PARITY_ATOL) -> float:
    """Worst onnxruntime-vs-PyTorch difference, at each batch size and two image sizes.

    Checked in two parts, each against its own yardstick: theta within ``atol * (1 + |theta|)``
    (float32 rounding in the localisation net is relative to theta's size), and the rectified
    image within ``atol`` of PyTorch's sampler applied with onnxruntime's theta (so a 1e-7
    relative difference in theta, moving a sample point by a hair, is not charged to the
    sampler). The images are smooth random fields (random 5x5 values, bicubically upsampled,
    in about [-2, 2]). Returns the worst of |d theta| / (1 + |theta|) and |d rectified|.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if native_sampler.uses_native(onnx.load(str(onnx_path))):
        import native

        native.register(so)
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    cfg = stn.config
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    sizes = [cfg.loc_size, (cfg.loc_size[0] * 2 + 3, cfg.loc_size[1] + 11)]
    for n in batch_sizes:
        for h, w in sizes:
            coarse = torch.rand(n, cfg.in_channels, 5, 5, generator=gen) * 4 - 2
            x = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
            o_rect, o_theta = sess.run([OUTPUT_RECTIFIED, OUTPUT_THETA], {INPUT_IMAGE: x.numpy()})
            with torch.no_grad():
                theta = stn.localise(x)
                rect = stn.sample(x, torch.from_numpy(o_theta)) if o_theta.shape == tuple(theta.shape) else None
            if rect is None or o_rect.shape != tuple(rect.shape):
                raise ExportError(f"onnxruntime shapes {o_rect.shape}, {o_theta.shape} differ from PyTorch's "
                                  f"at batch {n}, {h}x{w}")
            t = theta.numpy()
            theta_err = float((np.abs(o_theta - t) / (1.0 + np.abs(t))).max())
            rect_err = float(np.abs(o_rect - rect.numpy()).max())
            if theta_err > atol or rect_err > atol:
                raise ExportError(f"onnxruntime differs from PyTorch (theta relative {theta_err:.3g}, rectified "
                                  f"{rect_err:.3g}; tolerance {atol}) at batch {n}, {h}x{w}: the export is not faithful")
            worst = max(worst, theta_err, rect_err)
    return worst


def info_for(stn: SpatialTransformer, meta: dict, lowering: str, name: str, version: str, created_by: str) -> ModelInfo:
    """Metadata for ``stn`` from its config and the checkpoint's ``meta``."""
    cfg = stn.config
    classes = meta.get("classes")
    return ModelInfo(
        name=name, version=version, transform=cfg.transform, in_channels=cfg.in_channels,
        loc_size=tuple(cfg.loc_size), output_size=tuple(cfg.output_size), mean=tuple(cfg.mean), std=tuple(cfg.std),
        align_corners=False, padding_mode=cfg.padding_mode, interpolation=cfg.mode, grid_sample=lowering,
        tps_grid=tuple(cfg.tps_grid), classes=tuple(classes) if classes else None,
        dataset=str(meta.get("dataset", "")), metrics=dict(meta.get("metrics") or {}), created_by=created_by,
        parametrisation=cfg.parametrisation,
    )


def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, lowering: str = "onnx",
                      opset: int = 18, name: str | None = None, version: str | None = None,
                      command: str = "") -> ExportReport:
    """Load a checkpoint (config + weights), export its STN with metadata, check parity."""
    from models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    stn = ckpt.build_stn()
    meta = ckpt.meta
    created_by = " && ".join(c for c in (meta.get("created_by", ""), command) if c)
    info = info_for(stn, meta, lowering, name or meta.get("name") or Path(output).stem,
                    version or str(meta.get("version", "1")), created_by)
    return export_onnx(stn, output, info, lowering=lowering, opset=opset)
