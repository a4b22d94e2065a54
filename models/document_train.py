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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

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
SAVE_EVERY = 500  # steps between periodic checkpoints (checkpoint.pt in the output folder)


def stn_config(loc_size: tuple[int, int] | None = None, output_size: tuple[int, int] | None = None) -> STNConfig:
    """The document rectifier's STN config."""
    return STNConfig(transform="projective", parametrisation="corners", loc_net="deep", in_channels=3,
                     loc_size=tuple(loc_size or DEFAULT_LOC_SIZE), output_size=tuple(output_size or DEFAULT_OUTPUT_SIZE),
                     loc_channels=LOC_CHANNELS, loc_hidden=LOC_HIDDEN, mean=MEAN, std=STD)


def loc_input(photo: np.ndarray, loc_size: tuple[int, int]) -> torch.Tensor:
    """[3, lh, lw] float in [0, 1]: the photo resized as the model resizes it (bilinear, half-pixel, no antialias)."""
    x = torch.from_numpy(np.ascontiguousarray(photo)).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
    return F.interpolate(x, size=loc_size, mode="bilinear", align_corners=False)[0]


class PhotoStream(IterableDataset):
    """Endless (loc_input, true corners normalized [4, 2]) pairs; each worker has its own generator."""

    def __init__(self, loc_size: tuple[int, int], seed: int, **generator_options: Any) -> None:
        self.loc_size, self.seed, self.options = loc_size, seed, generator_options

    def __iter__(self):  # noqa: ANN204
        info = get_worker_info()
        worker = info.id if info is not None else 0
        torch.set_num_threads(1)
        if info is not None:  # OpenCV's own thread pool would compete with the training process
            import cv2

            cv2.setNumThreads(1)
        gen = docs.DocumentGenerator("train", seed=self.seed * 1000 + worker, **self.options)
        while True:
            d = gen()
            corners = docs.corners_norm(d.corners, d.photo_size).astype(np.float32)
            yield loc_input(d.photo, self.loc_size), torch.from_numpy(corners)


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
    mean = torch.tensor(stn.config.mean).view(1, -1, 1, 1)
    std = torch.tensor(stn.config.std).view(1, -1, 1, 1)
    out = []
    for start in range(0, len(photos), batch):
        chunk = photos[start : start + batch]
        x = torch.stack([loc_input(p, stn.config.loc_size) for p in chunk])
        corners = stn.transform.corners(stn.localisation((x - mean) / std)).numpy()
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
    cells = []
    for photo in photos:
        x = torch.from_numpy(photo).permute(2, 0, 1).unsqueeze(0).float() / 255.0
        with torch.no_grad():
            theta = stn.localise((x - torch.tensor(stn.config.mean).view(1, -1, 1, 1))
                                 / torch.tensor(stn.config.std).view(1, -1, 1, 1))
            flat = stn.sample(x, theta)[0]
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


def train_documents(config) -> Any:  # noqa: ANN001 (models.train.TrainConfig; imported there)
    """Train the document rectifier on synthetic photos; evaluate on held-out ones; write the usual files."""
    from models.train import MODEL_VERSION, TrainResult

    if config.threads:
        torch.set_num_threads(config.threads)
    cfg = stn_config(config.loc_size, config.output_size)
    n_test = config.limit_test or DEFAULT_TEST_EXAMPLES
    t_data = time.perf_counter()
    held_out = held_out_set(n_test, config.eval_seed, config.pages, config.backgrounds, config.figures)
    log.info("held-out set: %d photos in %.1f s", n_test, time.perf_counter() - t_data)
    torch.manual_seed(config.seed)
    model = SpatialTransformer(cfg)
    total = config.steps or 2000
    batch = config.batch_size
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    warmup = min(200, total // 10)
    limit_s = 60.0 * config.max_minutes if config.max_minutes else math.inf
    t0 = time.perf_counter()

    def progress(step: int) -> float:  # fraction of the run done: by steps or by time, whichever is further
        return min(1.0, max(step / total, (time.perf_counter() - t0) / limit_s))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup)) * (
        0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress(s)))))
    options = {"pages": config.pages, "backgrounds": config.backgrounds, "figures": config.figures,
               "photo_long_side": TRAIN_PHOTO_SIDES}
    stream = PhotoStream(cfg.loc_size, config.seed, **options)
    # spawn, not fork: a fork after torch's OpenMP threads have run can deadlock in the child
    loader = DataLoader(stream, batch_size=batch, num_workers=config.workers,
                        persistent_workers=config.workers > 0, prefetch_factor=4 if config.workers else None,
                        multiprocessing_context="spawn" if config.workers else None)
    mean = torch.tensor(cfg.mean).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std).view(1, -1, 1, 1)
    out = Path(config.out) if config.out else None
    name = config.name or "document-rectifier"
    meta_base = {"name": name, "version": MODEL_VERSION, "dataset": "synthetic documents (models.documents)",
                 "classes": [], "created_by": config.created_by, "in_channels": 3, "mean": list(cfg.mean),
                 "std": list(cfg.std), "train_config": config.to_dict()}
    history: list[float] = []
    model.train()
    wait = 0.0
    bar = tqdm(total=total, desc="train rectify document", unit="step", disable=not config.progress,
               dynamic_ncols=True)
    step = 0
    t_wait = time.perf_counter()
    for x, target in loader:
        wait += time.perf_counter() - t_wait
        pred = model.transform.corners(model.localisation((x - mean) / std))
        loss = F.l1_loss(pred, target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {float(loss)} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
        optimizer.step()
        schedule.step()
        history.append(loss.item())
        step += 1
        if step % 10 == 0 or step == total:
            bar.set_postfix(loss=f"{np.mean(history[-10:]):.4f}")
        if step % 100 == 0:
            log.info("step %d/%d loss %.4f lr %.2e (%.2f s/step, %.0f%% waiting for data)", step, total,
                     np.mean(history[-100:]), schedule.get_last_lr()[0], (time.perf_counter() - t0) / step,
                     100 * wait / (time.perf_counter() - t0))
        if out and step % SAVE_EVERY == 0 and step < total:
            out.mkdir(parents=True, exist_ok=True)
            save_checkpoint(out / "checkpoint.pt", model, {**meta_base, "metrics": {"steps": step, "partial": True}})
            model.train()
        bar.update(1)
        if step >= total or time.perf_counter() - t0 >= limit_s:
            break
        t_wait = time.perf_counter()
    bar.close()
    train_seconds = time.perf_counter() - t0
    del loader
    model.eval()
    t1 = time.perf_counter()
    test = evaluate_documents(model, held_out)
    metrics: dict[str, Any] = {
        "dataset": meta_base["dataset"], "mode": "rectify", "model": "stn", "transform": "projective",
        "parametrisation": "corners", "distortion": docs.DISTORTION, "parameters": count_parameters(model),
        "train_examples": step * batch, "batch_size": batch, "steps": step, "train_seconds": train_seconds,
        "data_wait_fraction": wait / max(train_seconds, 1e-9),
        "final_train_loss": float(np.mean(history[-min(50, len(history)):])),
        "held_out": "split=test: Liberation fonts, licence-text words, unseen texture seeds, 1 in 10 folder files",
        **test, "eval_seconds": time.perf_counter() - t1,
    }
    meta = {**meta_base, "metrics": metrics}
    files: dict[str, str] = {}
    if out:
        out.mkdir(parents=True, exist_ok=True)
        files = {"checkpoint": str(out / "checkpoint.pt"), "metrics": str(out / "metrics.json"),
                 "sheet": str(out / "sheet.png")}
        save_checkpoint(files["checkpoint"], model, meta)
        Path(files["metrics"]).write_text(json.dumps(metrics, indent=2) + "\n")
        write_document_sheet(files["sheet"], model, held_out.photos[:8])
    return TrainResult(model, metrics, history, meta, files)


__all__ = ["DEFAULT_LOC_SIZE", "DEFAULT_OUTPUT_SIZE", "stn_config", "loc_input", "PhotoStream", "HeldOut",
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
        loader = DataLoader(PhotoStream(cfg.loc_size, 0, photo_long_side=photo_long_side, pool_pages=8,
                                        pool_backgrounds=8), batch_size=batch_size, num_workers=workers,
                            prefetch_factor=4 if workers else None, multiprocessing_context="spawn" if workers else None)
        it = iter(loader)
        next(it)  # start-up (worker launch, pools) is not counted

        def loaded_step(it=it) -> None:  # noqa: ANN001
            step(*next(it))

        out[f"step_workers{workers}_s"] = median_of(loaded_step, steps)
        del it, loader
    out["composing_fraction_in_process"] = out["photo_s"] * batch_size / out["step_workers0_s"]
    return out
