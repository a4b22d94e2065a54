"""``stn bench export``: onnxruntime vs PyTorch eager on the same STN, side by side in one run.

For each model and batch size it times PyTorch eager (``torch.inference_mode``) and
onnxruntime (CPU provider unless ``--provider`` says otherwise) with each sampler
lowering, at the same thread count. Contenders run interleaved, round after round, and
each number is the median over rounds, so a noisy neighbour hurts all contenders alike.
The last line printed is one JSON object with ``<model>_b<batch>_vs_torch`` ratios
(throughput of onnxruntime with the default lowering / PyTorch's) and, when the native
library is there, ``<model>_b<batch>_native_vs_torch`` (the ``native`` lowering).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from export.onnx_export import export_onnx, info_for
from models import frames
from models.stn import SpatialTransformer, STNConfig

log = logging.getLogger(__name__)

DEFAULT_LOWERING = "onnx"


@dataclass
class Contender:
    name: str
    run: Callable[[], float]  # one round: warm up, time, return images/s
    per_round: list[float] = field(default_factory=list)  # images/s, one per round


class NaiveExport(torch.nn.Module):
    """The export a user gets without our sampler op: ``F.affine_grid`` + ``F.grid_sample``, as torch
    lowers them (the grid generator becomes Mul+ReduceSum). Affine-like families only; a baseline."""

    def __init__(self, stn: SpatialTransformer) -> None:
        super().__init__()
        self.stn = stn

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta = self.stn.localise(image)
        n, c = image.shape[:2]
        grid = F.affine_grid(theta, [n, c, *self.stn.config.output_size], align_corners=False)
        cfg = self.stn.config
        return F.grid_sample(image, grid, mode=cfg.mode, padding_mode=cfg.padding_mode, align_corners=False), theta


def _export_naive(stn: SpatialTransformer, path: Path) -> None:
    example = torch.rand(2, stn.config.in_channels, *stn.config.loc_size)
    dims = {0: torch.export.Dim("batch", min=1, max=4096), 2: torch.export.Dim("height", min=1, max=16384),
            3: torch.export.Dim("width", min=1, max=16384)}
    torch.onnx.export(NaiveExport(stn).eval(), (example,), path, dynamo=True, opset_version=18,
                      input_names=["image"], output_names=["rectified", "theta"],
                      dynamic_shapes={"image": dims}, external_data=False)


def synthetic_affine224(seed: int = 0) -> SpatialTransformer:
    """A 3x224x224 affine STN with a 64x64 localisation size, with non-trivial (random) weights."""
    torch.manual_seed(seed)
    cfg = STNConfig(transform="affine", in_channels=3, loc_size=(64, 64), output_size=(224, 224),
                    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    stn = SpatialTransformer(cfg)
    torch.nn.init.normal_(stn.localisation.regressor.weight, std=0.01)
    return stn.eval()


def default_checkpoint() -> Path | None:
    folder = Path(__file__).resolve().parent.parent / "models" / "default"
    found = sorted(folder.glob("*.pt"))
    return found[0] if found else None


def time_round(fn: Callable[[], object], min_seconds: float, min_iters: int) -> float:
    """Seconds per call over one round (at least ``min_iters`` calls and ``min_seconds``)."""
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if n >= min_iters and elapsed >= min_seconds:
            return elapsed / n


def bench_model(name: str, stn: SpatialTransformer, batch_sizes: tuple[int, ...], lowerings: tuple[str, ...],
                threads: int, rounds: int, min_seconds: float, image_size: tuple[int, int] | None,
                providers: list[str], workdir: Path) -> list[dict]:
    """Rows of {model, batch, contender, images_per_s, ms_per_batch, vs_torch} for one model.

    Each onnxruntime contender gets a fresh session for each of its rounds, with onnxruntime's
    default options (its thread pool spins between runs, which is what a user gets), and the
    session is dropped after the round: an idle session's spinning threads would otherwise
    steal the cores from whichever contender runs next.
    """
    import onnxruntime as ort

    cfg = stn.config
    h, w = image_size or cfg.output_size
    models: dict[str, Path] = {}
    for lowering in lowerings:
        path = workdir / f"{name}-{lowering}.onnx"
        try:
            export_onnx(stn, path, info_for(stn, {}, lowering, name, "bench", "stn bench export"), lowering=lowering)
        except ValueError as e:
            log.warning("skipping lowering %s for %s: %s", lowering, name, e)
            continue
        models[lowering] = path
    if cfg.transform in frames.AFFINE_FAMILIES:
        models["naive"] = workdir / f"{name}-naive.onnx"
        _export_naive(stn, models["naive"])
    rows = []
    for batch in batch_sizes:
        x = torch.rand(batch, cfg.in_channels, h, w, generator=torch.Generator().manual_seed(batch))
        x_np = x.numpy()

        def torch_round(x: torch.Tensor = x, batch: int = batch) -> float:
            def run() -> object:
                with torch.inference_mode():
                    return stn(x)

            for _ in range(2):
                run()
            return batch / time_round(run, min_seconds, 3)

        def ort_round(path: Path, a: np.ndarray = x_np, batch: int = batch) -> float:
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            if path.stem.endswith("-native"):
                import native

                native.register(so, providers)
            sess = ort.InferenceSession(str(path), so, providers=providers)
            for _ in range(2):
                sess.run(None, {"image": a})
            return batch / time_round(lambda: sess.run(None, {"image": a}), min_seconds, 3)  # then dropped

        contenders = [Contender("torch-eager", torch_round)]
        contenders += [Contender(f"ort-{k}", lambda p=p: ort_round(p)) for k, p in models.items()]
        for _ in range(rounds):
            for c in contenders:
                c.per_round.append(c.run())
        torch_ips = statistics.median(contenders[0].per_round)
        for c in contenders:
            ips = statistics.median(c.per_round)
            rows.append({"model": name, "batch": batch, "contender": c.name, "images_per_s": ips,
                         "ms_per_batch": 1e3 * batch / ips, "vs_torch": ips / torch_ips})
    return rows


def run_bench(checkpoint: str | None, batch_sizes: tuple[int, ...] = (1, 32),
              lowerings: tuple[str, ...] = ("onnx", "contrib", "gather", "native"), threads: int | None = None,
              rounds: int = 5, min_seconds: float = 0.4, providers: list[str] | None = None) -> tuple[list[dict], dict]:
    """Benchmark; returns (rows, ratios). Without ``checkpoint``: the bundled default model and affine224."""
    import native
    from models.checkpoint import load_checkpoint

    if "native" in lowerings and not native.available():
        log.warning("native lowering skipped: %s", native.status()["reason"])
        lowerings = tuple(k for k in lowerings if k != "native")
    threads = threads or min(os.cpu_count() or 1, 4)
    torch.set_num_threads(threads)
    providers = providers or ["CPUExecutionProvider"]
    models: list[tuple[str, SpatialTransformer, tuple[int, int] | None]] = []
    if checkpoint:
        stn = load_checkpoint(checkpoint).build_stn()
        models.append((Path(checkpoint).stem, stn, None))
    else:
        default = default_checkpoint()
        if default is not None:
            models.append(("default", load_checkpoint(default).build_stn(), None))
        else:
            log.warning("no bundled default checkpoint under models/default; benchmarking affine224 only")
        models.append(("affine224", synthetic_affine224(), (224, 224)))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, stn, size in models:
            rows += bench_model(name, stn, batch_sizes, lowerings, threads, rounds, min_seconds, size, providers,
                                Path(tmp))
    ratios = {f"{r['model']}_b{r['batch']}_vs_torch": round(r["vs_torch"], 3)
              for r in rows if r["contender"] == f"ort-{DEFAULT_LOWERING}"}
    ratios.update({f"{r['model']}_b{r['batch']}_native_vs_torch": round(r["vs_torch"], 3)
                   for r in rows if r["contender"] == "ort-native"})
    return rows, ratios


def format_table(rows: list[dict]) -> str:
    lines = [f"{'model':<12} {'batch':>5} {'contender':<12} {'images/s':>10} {'ms/batch':>9} {'vs torch':>8}"]
    for r in rows:
        lines.append(f"{r['model']:<12} {r['batch']:>5} {r['contender']:<12} {r['images_per_s']:>10.1f} "
                     f"{r['ms_per_batch']:>9.2f} {r['vs_torch']:>7.2f}x")
    return "\n".join(lines)


def ratios_json(ratios: dict) -> str:
    return json.dumps(ratios, sort_keys=True)


__all__ = ["run_bench", "format_table", "ratios_json", "synthetic_affine224"]
