"""Training and evaluating the document rectifier (``stn train --mode rectify --distortion document``).

``models.train.train`` hands a config with ``distortion="document"`` to :func:`train_documents`:
the data is not a dataset but a stream of synthetic photos (``models.documents``), composed
by ``workers`` worker processes while the main process trains.

The model is a projective STN with the corner parametrisation (``models.transforms.
ProjectiveCorners``): the localiser (``DeepLocalisationNet``, colour, ``loc_size`` default
128 x 128) predicts where the output's four corners lie in the photo, and the loss is the
L1 distance between those and the page's true corners (normalized photo coordinates),
self-supervised from the known homography. The sampler reads the full-resolution photo;
training never needs to sample (the loss is on the corners), so it costs only the localiser.

Devices, ranks, resumption: the machinery of ``models.train`` (``setup_devices``, ``load_resume``,
``Loop``, ``fit``): ``device``, ``amp``, ``eval_every``, ``save_every`` (default every
:data:`SAVE_EVERY` steps when ``out`` is set), ``resume`` and ``torchrun`` work as in the classic
trainer. Batch ``s`` of rank ``r`` is a pure function of the seed, ``r`` and ``s``
(:class:`StepPhotos`), so a run resumed from ``OUT/last.pt`` ends with the same weights as an
uninterrupted one (unless ``max_minutes`` is set: a time limit makes the schedule depend on the
clock). Under ``torchrun`` every rank composes its own photos (its generators are seeded by its
rank), ``batch_size`` stays the global batch (rank ``r`` of ``W`` makes
``len(range(r, batch_size, W))`` photos a step), and rank 0 alone builds the held-out set,
evaluates and writes files.

Evaluation (:func:`evaluate_documents`): the corner error (``documents.corner_error``: mean
distance of the four predicted corners to the truth over the page's diagonal in the photo)
on held-out photos (``split="test"``: fonts, text, textures and folder files unseen in
training), median, 90th percentile, and per rotation bin.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, get_worker_info

from models import devices
from models import documents as docs
from models.checkpoint import save_checkpoint
from models.classifier import count_parameters
from models.stn import SpatialTransformer, STNConfig

log = logging.getLogger(__name__)

DEFAULT_LOC_SIZE = (128, 128)
DEFAULT_OUTPUT_SIZE = (424, 300)  # (h, w): A4 portrait (297 / 210 = 1.414)
DEFAULT_TEST_EXAMPLES = 400
LOC_CHANNELS = (16, 32, 64, 96, 128)  # DeepLocalisationNet stages: 128 -> 4 x 4 x 128
LOC_HIDDEN = 128
MEAN = (0.5, 0.5, 0.5)  # fixed normalization: photos are in [0, 1], about mid-grey on average
STD = (0.25, 0.25, 0.25)
ROTATION_BINS = (0.0, 10.0, 20.0, 30.0, 45.0)  # |in-plane rotation| bins, degrees
TRAIN_PHOTO_SIDES = (160, 400)  # long side of training photos, pixels (the localiser sees loc_size)
TRAIN_POOL = 48  # pages and backgrounds in each training generator's pools (models.documents' default)
SAVE_EVERY = 500  # default steps between periodic saves of the resumable OUT/last.pt (when out is set)
DEFAULT_STEPS = 2000
EVAL_KEYS = ("corner_error_median", "corner_error_p90", "corner_error_mean")  # --eval-every's


def stn_config(loc_size: tuple[int, int] | None = None, output_size: tuple[int, int] | None = None) -> STNConfig:
    """The document rectifier's STN config."""
    return STNConfig(transform="projective", parametrisation="corners", loc_net="deep", in_channels=3,
                     loc_size=tuple(loc_size or DEFAULT_LOC_SIZE), output_size=tuple(output_size or DEFAULT_OUTPUT_SIZE),
                     loc_channels=LOC_CHANNELS, loc_hidden=LOC_HIDDEN, mean=MEAN, std=STD)


def loc_input(photo: np.ndarray, loc_size: tuple[int, int]) -> torch.Tensor:
    """[3, lh, lw] float in [0, 1]: the photo resized as the model resizes it (bilinear, half-pixel, no antialias)."""
    x = torch.from_numpy(np.ascontiguousarray(photo)).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
    return F.interpolate(x, size=loc_size, mode="bilinear", align_corners=False)[0]


class StepPhotos(Dataset):
    """Training batch ``step`` of one rank: (localiser inputs [B, 3, lh, lw] in [0, 1], true corners [B, 4, 2]).

    Whichever process makes it (a data-loading worker, a resumed run), batch ``s`` is the same: the
    photos come from ``lanes`` keyed generators (``DocumentGenerator(keyed=True)``), lane ``l`` of
    rank ``r`` seeded by ``(seed, 2, r, l)``; step ``s`` is batch ``s // lanes`` of lane ``s % lanes``.
    A generator keeps its pools between the steps it makes; the trainer uses one lane per worker
    (``lanes = max(1, workers)``; the DataLoader hands step ``s`` to worker ``(s - first) % workers``),
    so each worker renders only its own lane's pool refreshes.
    """

    def __init__(self, loc_size: tuple[int, int], seed: int, batch: int, rank: int = 0, lanes: int = 1,
                 **generator_options: Any) -> None:
        self.loc_size, self.seed, self.batch, self.rank, self.lanes = loc_size, seed, batch, rank, lanes
        self.options = generator_options
        self._generators: dict[int, docs.DocumentGenerator] = {}

    def generator(self, lane: int) -> docs.DocumentGenerator:
        if lane not in self._generators:
            if get_worker_info() is not None:  # OpenCV's own thread pool would compete with the training process
                import cv2

                cv2.setNumThreads(1)
            self._generators[lane] = docs.DocumentGenerator(
                "train", seed=devices.derived_seed(self.seed, 2, self.rank, lane), keyed=True, **self.options)
        return self._generators[lane]

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        position, lane = divmod(int(step), self.lanes)
        gen = self.generator(lane)
        gen.seek(position * self.batch)
        photos = [gen() for _ in range(self.batch)]
        corners = np.stack([docs.corners_norm(d.corners, d.photo_size) for d in photos]).astype(np.float32)
        return torch.stack([loc_input(d.photo, self.loc_size) for d in photos]), torch.from_numpy(corners)


class CornerRegressor(nn.Module):
    """What training runs (and ``torchrun`` wraps in DDP): the localiser and the corners it predicts, no sampling."""

    def __init__(self, stn: SpatialTransformer) -> None:
        super().__init__()
        self.localisation, self.transform = stn.localisation, stn.transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform.corners(self.localisation(x))


@dataclass
class HeldOut:
    """A fixed held-out set: photos, their true corners (pixels) and rotations."""

    photos: list[np.ndarray]
    corners: np.ndarray  # [N, 4, 2] photo pixels
    angles: np.ndarray  # [N] degrees
    kinds: list[str]


def held_out_set(n: int, seed: int, pages: str | None = None, backgrounds: str | None = None,
                 figures: str | None = None, photo_long_side: tuple[int, int] = TRAIN_PHOTO_SIDES) -> HeldOut:
    """``n`` test photos (``split="test"``: fonts, text, textures and folder files unseen in training)."""
    gen = docs.DocumentGenerator("test", seed=seed, pages=pages, backgrounds=backgrounds, figures=figures,
                                 photo_long_side=photo_long_side, pool_pages=min(48, max(4, n // 4)),
                                 pool_backgrounds=min(48, max(4, n // 4)), refresh=4)
    photos, corners, angles, kinds = [], [], [], []
    for _ in range(n):
        d = gen()
        photos.append(d.photo)
        corners.append(d.corners)
        angles.append(d.angle)
        kinds.append(d.kind)
    return HeldOut(photos, np.array(corners), np.array(angles), kinds)


@torch.no_grad()
def predict_corners(stn: SpatialTransformer, photos: list[np.ndarray], batch: int = 64) -> np.ndarray:
    """Predicted page corners [N, 4, 2] in photo pixels (PyTorch model)."""
    stn.eval()
    device = next(stn.parameters()).device
    mean = torch.tensor(stn.config.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(stn.config.std, device=device).view(1, -1, 1, 1)
    out = []
    for start in range(0, len(photos), batch):
        chunk = photos[start : start + batch]
        x = torch.stack([loc_input(p, stn.config.loc_size) for p in chunk]).to(device)
        corners = stn.transform.corners(stn.localisation((x - mean) / std)).float().cpu().numpy()
        out += [docs.corners_px(c, p.shape[:2]) for c, p in zip(corners, chunk, strict=True)]
    return np.array(out)


def corner_metrics(pred_px: np.ndarray, true_px: np.ndarray, angles: np.ndarray) -> dict[str, Any]:
    """Median, 90th percentile and mean corner error, overall and per |rotation| bin."""
    err = docs.corner_error(pred_px, true_px)
    by_rotation = {}
    for lo, hi in zip(ROTATION_BINS[:-1], ROTATION_BINS[1:], strict=True):
        sel = (np.abs(angles) >= lo) & (np.abs(angles) < hi)
        if sel.any():
            by_rotation[f"{lo:g}-{hi:g}"] = {"n": int(sel.sum()), "median": float(np.median(err[sel])),
                                             "p90": float(np.percentile(err[sel], 90))}
    return {"corner_error_median": float(np.median(err)), "corner_error_p90": float(np.percentile(err, 90)),
            "corner_error_mean": float(err.mean()), "corner_error_by_rotation": by_rotation,
            "test_examples": len(err)}


def evaluate_documents(stn: SpatialTransformer, held_out: HeldOut) -> dict[str, Any]:
    """Corner metrics of ``stn`` on ``held_out``, and of the identity (no rectification) for scale."""
    metrics = corner_metrics(predict_corners(stn, held_out.photos), held_out.corners, held_out.angles)
    identity = np.array([docs.corners_px(np.array(docs.frames.OUTPUT_CORNERS), p.shape[:2]) for p in held_out.photos])
    metrics["identity_corner_error_median"] = float(np.median(docs.corner_error(identity, held_out.corners)))
    return metrics


def write_document_sheet(path: str | Path, stn: SpatialTransformer, photos: list[np.ndarray], height: int = 200) -> None:
    """PNG: each photo beside the page the model flattens from it (sampled at full resolution), 2 pairs a row."""
    from PIL import Image

    stn.eval()
    device = next(stn.parameters()).device
    cells = []
    for photo in photos:
        x = torch.from_numpy(photo).permute(2, 0, 1).unsqueeze(0).float().to(device) / 255.0
        with torch.no_grad():
            theta = stn.localise((x - torch.tensor(stn.config.mean, device=device).view(1, -1, 1, 1))
                                 / torch.tensor(stn.config.std, device=device).view(1, -1, 1, 1))
            flat = stn.sample(x, theta)[0].cpu()
        a = Image.fromarray(photo)
        b = Image.fromarray((flat.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
        a = a.resize((max(1, round(a.width * height / a.height)), height), Image.BILINEAR)
        b = b.resize((max(1, round(b.width * height / b.height)), height), Image.BILINEAR)
        cells.append((a, b))
    per_row, gap = 2, 8
    cell_w = max(a.width + b.width for a, b in cells) + 3 * gap
    rows = math.ceil(len(cells) / per_row)
    sheet = Image.new("RGB", (per_row * cell_w + gap, rows * (height + gap) + gap), (64, 64, 64))
    for i, (a, b) in enumerate(cells):
        r, c = divmod(i, per_row)
        x0, y0 = gap + c * cell_w, gap + r * (height + gap)
        sheet.paste(a, (x0, y0))
        sheet.paste(b, (x0 + a.width + gap, y0))
    sheet.save(path, format="PNG", optimize=True)


def train_documents(config, on_step: Callable[[int, float], None] | None = None) -> Any:  # noqa: ANN001
    """Train the document rectifier on synthetic photos; evaluate on held-out ones; write the usual files.

    ``config`` is a ``models.train.TrainConfig`` (checked there); ``on_step(step, loss)`` as in
    ``models.train.train``. Under ``torchrun`` every rank calls it; rank 0 evaluates and writes.
    """
    from models.train import MODEL_VERSION, ConfigError, Loop, TrainResult, fit, load_resume, setup_devices

    ranks, device, precision = setup_devices(config)
    if config.batch_size < ranks.world:
        raise ConfigError(f"{ranks.world} ranks need a batch size of at least {ranks.world}, got {config.batch_size}")
    resume = load_resume(config)
    cfg = stn_config(config.loc_size, config.output_size)
    n_test = config.limit_test or DEFAULT_TEST_EXAMPLES
    held_out = None
    if ranks.main:  # rank 0 alone evaluates
        t_data = time.perf_counter()
        held_out = held_out_set(n_test, config.eval_seed, config.pages, config.backgrounds, config.figures)
        log.info("held-out set: %d photos in %.1f s", n_test, time.perf_counter() - t_data)
    torch.manual_seed(config.seed)
    model = SpatialTransformer(cfg)
    created_by = config.created_by
    if resume is not None:  # the same run, continued: its weights and the command that started it
        model.load_state_dict(resume.state_dict)
        created_by = str(resume.meta.get("created_by", created_by))
    ranks.start(device)
    model.to(device)
    forward = ranks.wrap(CornerRegressor(model), device)
    total = config.steps or DEFAULT_STEPS
    batch = config.batch_size
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    warmup = min(200, total // 10)
    limit_s = 60.0 * config.max_minutes if config.max_minutes else math.inf
    clock = {"seconds": 0.0}  # training time so far, the same on every rank (their maximum)

    def done(step: int) -> float:  # fraction of the run done: by steps or by time, whichever is further
        return min(1.0, max(step / total, clock["seconds"] / limit_s))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup)) * (
        0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * done(s)))))
    name = config.name or "document-rectifier"
    meta_base = {"name": name, "version": MODEL_VERSION, "dataset": "synthetic documents (models.documents)",
                 "classes": [], "created_by": created_by, "in_channels": 3, "mean": list(cfg.mean),
                 "std": list(cfg.std), "train_config": config.to_dict()}
    loop = Loop(config, model, optimizer, schedule, precision, ranks, device, total,
                lambda: {**meta_base, "metrics": None})
    if loop.save_every is None and config.out:
        loop.save_every = SAVE_EVERY
    # the photo stream's lanes are the run's own: a resumed run keeps them, whatever its --workers
    lanes = max(1, int(resume.train_state["train_config"]["workers"] if resume is not None else config.workers))
    if resume is not None:
        loop.restore(resume)
        clock["seconds"] = loop.seconds_before
    options = {"pages": config.pages, "backgrounds": config.backgrounds, "figures": config.figures,
               "photo_long_side": TRAIN_PHOTO_SIDES, "pool_pages": TRAIN_POOL, "pool_backgrounds": TRAIN_POOL}
    photos = StepPhotos(cfg.loc_size, config.seed, len(range(ranks.rank, batch, ranks.world)), ranks.rank, lanes,
                        **options)
    # spawn, not fork: a fork after torch's OpenMP threads have run can deadlock in the child
    loader = DataLoader(photos, batch_size=None, sampler=range(loop.step, total), num_workers=config.workers,
                        worker_init_fn=devices.worker_init, prefetch_factor=4 if config.workers else None,
                        multiprocessing_context="spawn" if config.workers else None, pin_memory=device.type == "cuda")
    mean = torch.tensor(cfg.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std, device=device).view(1, -1, 1, 1)
    log.info("training the document rectifier (%d parameters): %d steps of %d photos from step %d on %s "
             "(amp %s, %d rank(s), %d lane(s))", count_parameters(model), total, batch, loop.step, device,
             config.amp, ranks.world, lanes)

    def batch_loss(pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, target = (t.to(device, non_blocking=True) for t in pair)
        return F.l1_loss(forward((x - mean) / std).float(), target)

    def evaluate_now() -> dict[str, float]:
        found = evaluate_documents(model, held_out)
        return {k: found[k] for k in EVAL_KEYS}

    def stop() -> bool:
        if limit_s == math.inf:
            return False
        clock["seconds"] = ranks.maximum(loop.seconds())  # every rank stops at the same step
        return clock["seconds"] >= limit_s

    model.train()
    progress = devices.Progress(total, "train rectify document", config.progress and ranks.main, start=loop.step)
    fit(loop, loader, batch_loss, evaluate_now, progress, on_step, stop)
    del loader
    forward = None  # the DDP wrapper goes before the process group it holds (Ranks.stop)
    if not ranks.main:
        return loop.other_rank_result()
    model.eval()
    run = loop.metrics()
    t1 = time.perf_counter()
    test = evaluate_documents(model, held_out)
    history = loop.history
    metrics: dict[str, Any] = {
        "dataset": meta_base["dataset"], "mode": "rectify", "model": "stn", "transform": "projective",
        "parametrisation": "corners", "distortion": docs.DISTORTION, "parameters": count_parameters(model),
        "train_examples": loop.step * batch, "batch_size": batch, "steps": loop.step, **run,
        "final_train_loss": float(np.mean(history[-min(50, len(history)):])),
        "held_out": "split=test: Liberation fonts, licence-text words, unseen texture seeds, 1 in 10 folder files",
        **test, "eval_seconds": time.perf_counter() - t1,
    }
    if loop.evals:
        metrics["evals"] = loop.evals
    meta = {**meta_base, "metrics": metrics}
    files: dict[str, str] = {}
    if config.out:
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        files = {"checkpoint": str(out / "checkpoint.pt"), "metrics": str(out / "metrics.json"),
                 "sheet": str(out / "sheet.png")}
        save_checkpoint(files["checkpoint"], model, meta)
        Path(files["metrics"]).write_text(json.dumps(metrics, indent=2) + "\n")
        write_document_sheet(files["sheet"], model, held_out.photos[:8])
    loop.done()
    return TrainResult(model, metrics, history, meta, files)


__all__ = ["DEFAULT_LOC_SIZE", "DEFAULT_OUTPUT_SIZE", "stn_config", "loc_input", "StepPhotos", "CornerRegressor", "HeldOut",
           "held_out_set", "predict_corners", "corner_metrics", "evaluate_documents", "write_document_sheet",
           "train_documents"]


def bench(batch_size: int = 32, steps: int = 10, repeats: int = 3, threads: int = 2,
          photo_long_side: tuple[int, int] = TRAIN_PHOTO_SIDES) -> dict[str, Any]:
    """Photo composition vs the training step it feeds, side by side (``stn bench documents``).

    Measures, each as a median over ``repeats``: rendering one page and one background (the
    pools' refresh cost), composing one training photo (warp and photometric steps, including
    the resize to the localiser's size), one training step of the default document rectifier
    on a ready batch, and whole steps with the photos composed in the training process
    (``workers=0``) and in one worker process (``workers=1``).
    """
    torch.set_num_threads(threads)
    cfg = stn_config()
    gen = docs.DocumentGenerator("train", seed=0, photo_long_side=photo_long_side, pool_pages=8, pool_backgrounds=8)

    def median_of(fn, n: int) -> float:  # noqa: ANN001
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(n):
                fn()
            times.append((time.perf_counter() - t) / n)
        return float(np.median(times))

    out: dict[str, Any] = {"batch_size": batch_size, "threads": threads, "photo_long_side": list(photo_long_side)}
    out["page_render_s"] = median_of(gen._new_page, 4)
    out["background_render_s"] = median_of(gen._new_background, 4)
    out["photo_s"] = median_of(lambda: loc_input(gen().photo, cfg.loc_size), batch_size)
    model = SpatialTransformer(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.rand(batch_size, 3, *cfg.loc_size), torch.rand(batch_size, 4, 2) * 2 - 1

    def step(x: torch.Tensor = x, y: torch.Tensor = y) -> None:
        loss = F.l1_loss(model.transform.corners(model.localisation(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    out["train_step_s"] = median_of(step, steps)
    for workers in (0, 1):
        loader = DataLoader(StepPhotos(cfg.loc_size, 0, batch_size, photo_long_side=photo_long_side, pool_pages=8,
                                       pool_backgrounds=8), batch_size=None, sampler=range(10**6), num_workers=workers,
                            worker_init_fn=devices.worker_init, prefetch_factor=4 if workers else None,
                            multiprocessing_context="spawn" if workers else None)
        it = iter(loader)
        next(it)  # start-up (worker launch, pools) is not counted

        def loaded_step(it=it) -> None:  # noqa: ANN001
            step(*next(it))

        out[f"step_workers{workers}_s"] = median_of(loaded_step, steps)
        del it, loader
    out["composing_fraction_in_process"] = out["photo_s"] * batch_size / out["step_workers0_s"]
    return out
