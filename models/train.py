"""Training: ST-CNN classification and self-supervised rectification, with evaluation.

``train(TrainConfig(...)) -> TrainResult`` does everything ``stn train`` does: reads the data
(``models.data``), distorts each batch on the fly (``models.distortions``: a fresh random
transform per example, its theta known), trains, evaluates on the distorted test set
(``models.evaluate``) and, when ``out`` is set, writes ``checkpoint.pt``, ``metrics.json``
and ``sheet.png`` (test inputs | rectified | upright, 16 examples).

Modes
-----
- ``classify``: ``model="stn"`` is an ST-CNN (``models.classifier.STCNN``) trained with
  cross-entropy only: the transformer learns to rectify without transform labels.
  ``model="cnn"`` is the plain CNN with about the same parameter count
  (``matched_baseline``).
- ``rectify``: the STN alone (``SpatialTransformer``) learns to undo the known distortion of
  upright examples (all a user with a folder of upright images needs). Loss =
  ``image_weight * L1(rectified, target) + param_weight * grid_loss + boundary penalty``.
  The target is the upright image centred, unscaled, in the output frame
  (``distortions.frame_theta``). ``grid_loss`` compares the predicted theta with the inverse
  of the known one as grids: on an 8 x 8 grid ``u`` of output points it is the mean squared
  distance between ``theta_D(theta_pred(u))`` (where the rectifier's sampling point lies in
  the upright image) and ``frame_theta(u)`` (where it should). This needs no matrix
  inverse, so it works for every family on both sides: homogeneous ``theta_D`` is applied as
  a matrix; a TPS ``theta_D`` (E) by sampling its dense warp field at the points.

Devices and scale
-----------------
``device`` (``auto``: CUDA when available), ``amp`` (bf16 or fp16 autocast; fp16 with a loss
scaler, GPU only), ``workers`` (data-loading processes) and data-parallel ranks under
``torchrun`` are handled by ``models.devices``. Batch ``s`` is a pure function of the seed and
``s`` (:class:`TrainBatches`: the epoch's permutation and the step's distortions have their own
derived seeds), so the number of workers does not change a CPU run, and a run resumed from
``OUT/last.pt`` (``--save-every``; ``resume``) ends with the same weights as an uninterrupted
one. Under ``torchrun`` each rank trains on every ``world``-th example of the global batch
(``batch_size`` stays the global batch), and rank 0 alone evaluates and writes files. The loop
and this machinery (:func:`fit`, :class:`Loop`, :func:`setup_devices`, :func:`load_resume`) are
shared with the document rectifier's trainer (``models.document_train``).

Inputs are scaled by the model's own mean/std (stored in the checkpoint): mean 0 and the
training images' per-channel std, so that the sampler's zero padding is the images' (dark)
background, as in the distortions.

Collapse guard
--------------
An STN can drift until theta samples outside the input and the output is empty (the
gradient through the sampler is then zero and it never comes back). The trainer:

1. starts at the identity transform (the localisation net's last layer is zero with the
   identity as bias) and trains the localisation net at ``loc_lr_mult`` (default 0.1) times
   the learning rate of the classifier head (classify mode; in rectify mode the localisation
   net is all there is and uses ``lr`` itself);
2. adds ``boundary_weight * mean(relu(|p| - boundary))^2`` over the x and y of the sampling
   points ``p`` of an 8 x 8 grid of output points (``boundary`` = 1.5: half an image of slack
   around the input, enough for the legitimate overshoot of rotated, enlarged content): zero
   while the transformer looks at the input, a restoring force as soon as it wanders off
   (runaway translation, exploding scale);
3. clips the global gradient norm at ``clip_grad`` (default 5) so one bad batch cannot throw
   theta far;
4. reports ``collapsed_fraction``: the fraction of test examples for which more than 95 % of
   those sampling points fall outside the input (and logs a warning when it is not 0).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import devices, evaluate, frames
from models import distortions as dist
from models.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from models.classifier import HEADS, STCNN, ClassifierConfig, count_parameters, matched_baseline
from models.data import DEFAULT_DATA, ImageSet, ImageSplits, load_dataset
from models.sampler import grid_sample
from models.stn import SpatialTransformer, STNConfig
from models.transforms import TRANSFORMS, make_transform

DOCUMENT = "document"  # == models.documents.DISTORTION: the synthetic document photos (models.document_train)

log = logging.getLogger(__name__)

MODES = ("classify", "rectify")
MODELS = ("stn", "cnn")
MODEL_VERSION = "1"
DEFAULT_EPOCHS = 5
SHEET_EXAMPLES = 16
_COARSE = (8, 8)  # output points for the grid loss and the boundary penalty


class ConfigError(ValueError):
    """The training configuration cannot work; the message says which option and why."""


@dataclass
class TrainConfig:
    """Everything ``train`` needs; ``stn train`` fills it from its options."""

    data: str = DEFAULT_DATA  # IDX folder or image folder
    mode: str = "classify"  # classify (ST-CNN / CNN, cross-entropy) or rectify (STN alone, self-supervised)
    model: str = "stn"  # stn (ST-CNN in classify mode, STN in rectify mode) or cnn (baseline, classify only)
    distortion: str = "RTS"  # one of models.distortions.DISTORTIONS
    transform: str = "affine"  # STN transform family, one of models.transforms.TRANSFORMS
    head: str = "gap"  # classifier head pooling, one of models.classifier.HEADS (classify mode)
    epochs: int | None = None  # passes over the training set; None = DEFAULT_EPOCHS, or unlimited when steps is set
    steps: int | None = None  # stop after this many steps (quick runs); with epochs also set, whichever comes first
    batch_size: int = 128
    lr: float = 1e-3  # Adam learning rate (cosine-decayed to 5 % of it)
    loc_lr_mult: float = 0.1  # localisation net lr = lr * loc_lr_mult (classify mode)
    loc_size: tuple[int, int] | None = None  # (h, w) the localisation net sees; None = the canvas size
    output_size: tuple[int, int] | None = None  # (h, w) rectified output; None = the canvas size
    image_size: tuple[int, int] | None = None  # resize image folders to (h, w); None = first image's size
    tps_grid: tuple[int, int] = (4, 4)  # TPS control grid (transform "tps")
    limit_train: int | None = None  # keep the first N training examples
    limit_test: int | None = None  # keep the first N test examples
    seed: int = 0  # model init, shuffling and training distortions
    eval_seed: int = 1234  # test-set distortions (fixed, so runs with different seeds compare)
    threads: int | None = None  # torch CPU threads; None = torch's default
    image_weight: float = 1.0  # rectify: weight of L1(rectified, upright target)
    param_weight: float = 1.0  # rectify: weight of the grid loss against the known transform
    boundary_weight: float = 1.0  # collapse guard: weight of the out-of-bounds penalty
    boundary: float = 1.5  # collapse guard: sampling points beyond +-boundary are penalised
    clip_grad: float = 5.0  # global gradient-norm clip; 0 disables
    eval_batch_size: int = 500
    out: str | None = None  # write checkpoint.pt, metrics.json, sheet.png here
    name: str | None = None  # model name in the checkpoint; None = derived from model/dataset/distortion
    created_by: str = ""  # the command line that produced the model (stored in the checkpoint)
    progress: bool = True  # a tqdm bar on a terminal, plain log lines otherwise
    init_stn: str | None = None  # start the STN from this checkpoint's transformer (e.g. rectify first, then classify)
    device: str = "cpu"  # auto (CUDA when available), cpu, cuda or cuda:N (under torchrun: cuda = cuda:LOCAL_RANK)
    amp: str = "off"  # mixed precision: off, bf16 (autocast) or fp16 (autocast + loss scaling, CUDA only)
    workers: int = 0  # data-loading worker processes (0: batches are made in the training process)
    eval_every: int | None = None  # evaluate on the test set every N steps (logged, in metrics["evals"])
    save_every: int | None = None  # write the resumable OUT/last.pt every N steps
    resume: str | None = None  # continue the run saved in this checkpoint (its OUT/last.pt), same options
    pages: str | None = None  # document: folder of the user's upright pages (default: rendered pages only)
    backgrounds: str | None = None  # document: folder of background images (default: procedural textures)
    figures: str | None = None  # document: folder of images placed as figures on rendered pages
    max_minutes: float | None = None  # document: stop after this much training time (the lr schedule follows it)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass
class TrainResult:
    model: nn.Module  # trained, in eval mode
    metrics: dict[str, Any]  # also written to metrics.json and the checkpoint's meta
    history: list[float]  # training loss per step
    meta: dict[str, Any]  # the checkpoint's meta
    files: dict[str, str] = field(default_factory=dict)  # "checkpoint", "metrics", "sheet" -> path (when out is set)
    rank: int = 0  # under torchrun: this process's rank (only rank 0 has metrics and files)


# ------------------------------------------------------------------------------------ helpers


def check_config(config: TrainConfig) -> None:
    """ConfigError naming the option for anything that cannot work (before any data is read)."""
    if config.mode not in MODES:
        raise ConfigError(f"unknown mode {config.mode!r}; choose one of {', '.join(MODES)}")
    if config.model not in MODELS:
        raise ConfigError(f"unknown model {config.model!r}; choose one of {', '.join(MODELS)}")
    if config.mode == "rectify" and config.model != "stn":
        raise ConfigError("--model cnn is a classifier baseline; rectify mode trains the STN alone (--model stn)")
    if config.distortion == DOCUMENT:
        if config.mode != "rectify" or config.transform != "projective":
            raise ConfigError("--distortion document trains the document rectifier: use --mode rectify "
                              "--transform projective")
        if config.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {config.workers}")
    elif config.distortion not in dist.DISTORTIONS:
        raise ConfigError(f"unknown distortion {config.distortion!r}; choose one of "
                          f"{', '.join((*dist.DISTORTIONS, DOCUMENT))}")
    elif config.pages or config.backgrounds or config.figures:
        raise ConfigError("--pages, --backgrounds and --figures are for --distortion document")
    if config.transform not in TRANSFORMS:
        raise ConfigError(f"unknown transform {config.transform!r}; choose one of {', '.join(TRANSFORMS)}")
    if config.head not in HEADS:
        raise ConfigError(f"unknown head {config.head!r}; choose one of {', '.join(HEADS)}")
    for name in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.steps is not None and config.steps < 1:
        raise ConfigError(f"steps must be >= 1, got {config.steps}")
    if config.threads is not None and config.threads < 1:
        raise ConfigError(f"threads must be >= 1, got {config.threads}")
    if not config.lr > 0 or not config.loc_lr_mult > 0:
        raise ConfigError(f"lr and loc_lr_mult must be > 0, got {config.lr} and {config.loc_lr_mult}")
    for name in ("loc_size", "output_size", "image_size"):
        size = getattr(config, name)
        if size is not None and (len(size) != 2 or min(size) < 1):
            raise ConfigError(f"{name} must be (h, w) with both >= 1, got {size}")
    if config.amp not in devices.AMP_CHOICES:
        raise ConfigError(f"unknown amp {config.amp!r}; choose one of {', '.join(devices.AMP_CHOICES)}")
    if config.workers < 0:
        raise ConfigError(f"workers must be >= 0, got {config.workers}")
    for name in ("eval_every", "save_every"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}")
    if (config.save_every or config.resume) and not config.out:
        raise ConfigError("save_every and resume write OUT/last.pt: set out")


def _to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)


def _channel_std(images: np.ndarray) -> tuple[float, ...]:
    sample = images[:10000].astype(np.float32) / 255.0
    return tuple(max(1e-3, round(float(sample[:, c].std()), 4)) for c in range(sample.shape[1]))


def _stn_of(model: nn.Module) -> SpatialTransformer | None:
    if isinstance(model, STCNN):
        return model.stn
    if isinstance(model, SpatialTransformer):
        return model
    return None


def _apply_matrix(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Homogeneous [N, 3, 3] applied to points [N, h, w, 2]."""
    xyz = torch.matmul(F.pad(points, (0, 1), value=1.0), matrix.transpose(1, 2).unsqueeze(1))
    z = xyz[..., 2:3]
    return xyz[..., :2] / torch.where(z.abs() < 1e-6, torch.full_like(z, 1e-6), z)


def map_through_distortion(d: dist.Distorted, points: torch.Tensor) -> torch.Tensor:
    """Distorted-normalized points [N, h, w, 2] -> upright-normalized, through the known theta_D."""
    if d.family == "tps":
        fam = make_transform("tps", d.tps_grid)
        canvas = tuple(d.images.shape[-2:])
        field_ = fam.grid(d.theta, fam.base_grid(canvas).to(points.device)).permute(0, 3, 1, 2)  # [N, 2, H, W]
        return grid_sample(field_, points, "bilinear", "border", align_corners=False).permute(0, 2, 3, 1)
    theta = d.theta
    if theta.shape[1:] == (2, 3):
        theta = F.pad(theta, (0, 0, 0, 1))
        theta[:, 2, 2] = 1.0
    return _apply_matrix(theta.to(points.dtype), points)


def boundary_penalty(points: torch.Tensor, bound: float) -> torch.Tensor:
    """Mean over points of the squared distance beyond +-bound, x and y summed (0 inside)."""
    return F.relu(points.abs() - bound).pow(2).sum(-1).mean()


def outside_fraction(points: torch.Tensor) -> torch.Tensor:
    """[N]: fraction of each example's sampling points outside the input ([-1, 1]^2)."""
    return (points.abs() > 1.0).any(-1).flatten(1).float().mean(1)


class _Objective:
    """Per-batch forward pass and loss for one (mode, model) pair; shared by training and evaluation."""

    def __init__(self, model: nn.Module, config: TrainConfig, source_size: tuple[int, int],
                 mean: torch.Tensor, std: torch.Tensor, forward: nn.Module | None = None) -> None:
        self.model, self.config, self.source_size = model, config, source_size
        self.forward = forward or model  # what the batch goes through (the DDP wrapper under torchrun)
        self.mean, self.std = mean, std
        self.stn = _stn_of(model)
        if self.stn is not None:
            self.coarse = self.stn.transform.base_grid(_COARSE)
            self.output_size = self.stn.config.output_size
            self.target_points = _apply_matrix(
                torch.from_numpy(frames.theta_to_matrix(dist.frame_theta(source_size, self.output_size, 1))).float(),
                torch.from_numpy(frames.affine_base_grid(_COARSE)[..., :2]).unsqueeze(0),
            )  # [1, 8, 8, 2]: where each coarse output point belongs in the upright image

    def target_images(self, upright: torch.Tensor) -> torch.Tensor:
        """The upright batch centred, unscaled, in the output frame."""
        theta = dist.frame_theta(self.source_size, self.output_size, len(upright)).to(upright.dtype)
        return dist.warp(upright, theta, "affine", self.output_size)

    def __call__(self, upright: torch.Tensor, labels: torch.Tensor | None,
                 d: dist.Distorted) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = (d.images - self.mean) / self.std
        cfg = self.config
        parts: dict[str, torch.Tensor] = {}
        if self.stn is None:
            logits = self.forward(x)
            parts["ce"] = F.cross_entropy(logits, labels)
            parts["logits"] = logits.detach()
            return parts["ce"], parts
        if isinstance(self.model, STCNN):
            logits, rectified, theta = self.forward(x)
            parts["ce"] = F.cross_entropy(logits, labels)
            parts["logits"] = logits.detach()
            loss = parts["ce"]
        else:
            rectified, theta = self.forward(x)
            loss = torch.zeros((), device=x.device)
        points = self.stn.transform.grid(theta, self.coarse.to(x.device))  # [N, 8, 8, 2] in the distorted input
        parts["boundary"] = boundary_penalty(points, cfg.boundary)
        loss = loss + cfg.boundary_weight * parts["boundary"]
        if cfg.mode == "rectify":
            target = (self.target_images(upright) - self.mean) / self.std
            parts["image"] = F.l1_loss(rectified, target)
            upright_points = map_through_distortion(d, points)
            parts["grid"] = (upright_points - self.target_points.to(x.device)).pow(2).sum(-1).mean()
            loss = loss + cfg.image_weight * parts["image"] + cfg.param_weight * parts["grid"]
        parts["theta"] = theta.detach()
        parts["rectified"] = rectified.detach()
        parts["outside"] = outside_fraction(points.detach())
        return loss, parts


def stn_config_for(config: TrainConfig, splits: ImageSplits) -> STNConfig:
    """The STN config for ``config`` and the data (channels, canvas size, normalization)."""
    canvas = dist.canvas_size(config.distortion, splits.image_size)
    try:
        return STNConfig(
            transform=config.transform, in_channels=splits.channels,
            loc_size=tuple(config.loc_size or canvas), output_size=tuple(config.output_size or canvas),
            tps_grid=tuple(config.tps_grid), mean=(0.0,) * splits.channels, std=_channel_std(splits.train.images),
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _init_stn_from(stn: SpatialTransformer | None, path: str) -> str:
    """Copy a trained transformer's weights (same STN config) into ``stn``; ConfigError otherwise.

    Returns the command line that produced them (the source checkpoint's ``created_by``).
    """
    from models.checkpoint import CheckpointError, load_checkpoint

    if stn is None:
        raise ConfigError("--init-stn needs a model with a spatial transformer (--model stn)")
    try:
        ckpt = load_checkpoint(path)
        source = ckpt.build_stn()
    except CheckpointError as e:
        raise ConfigError(f"--init-stn: {e}") from None
    if source.config != stn.config:
        raise ConfigError(f"--init-stn: {path} has STN config {source.config.to_dict()}, this run needs "
                          f"{stn.config.to_dict()} (same transform, sizes, channels and normalization)")
    stn.load_state_dict(source.state_dict())
    return str(ckpt.meta.get("created_by", ""))


def build_model(config: TrainConfig, splits: ImageSplits, stn_config: STNConfig | None = None) -> nn.Module:
    """The untrained model for ``config`` and the data: STN (rectify), ST-CNN or CNN (classify)."""
    stn_config = stn_config or stn_config_for(config, splits)
    if config.mode == "rectify":
        return SpatialTransformer(stn_config)
    head = ClassifierConfig(num_classes=len(splits.classes), head=config.head)
    return STCNN(stn_config, head) if config.model == "stn" else matched_baseline(stn_config, head)


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    stn = _stn_of(model)
    if isinstance(model, STCNN):
        loc = list(stn.localisation.parameters())
        loc_ids = {id(p) for p in loc}
        rest = [p for p in model.parameters() if id(p) not in loc_ids]
        groups = [{"params": rest, "lr": config.lr}, {"params": loc, "lr": config.lr * config.loc_lr_mult}]
    else:
        groups = [{"params": list(model.parameters()), "lr": config.lr}]
    return torch.optim.Adam(groups)


# --------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_model(model: nn.Module, objective: _Objective, test: ImageSet, config: TrainConfig,
                   ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Metrics on the distorted test set, and the first examples for the sheet."""
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(config.eval_seed)
    images = torch.from_numpy(test.images)
    labels = None if test.labels is None else torch.from_numpy(test.labels)
    thetas_d, thetas_p, preds, outside = [], [], [], []
    sums: dict[str, float] = {}
    sheet: dict[str, torch.Tensor] = {}
    family_d, grid_d = None, None
    for start in range(0, len(images), config.eval_batch_size):
        up = _to_float(images[start : start + config.eval_batch_size]).to(device)
        lab = None if labels is None else labels[start : start + config.eval_batch_size].to(device)
        d = dist.distort(config.distortion, up, g)
        _, parts = objective(up, lab if config.mode == "classify" else None, d)
        family_d, grid_d = d.family, d.tps_grid
        thetas_d.append(d.theta.cpu())
        for key in ("ce", "image", "grid", "boundary"):
            if key in parts:
                sums[key] = sums.get(key, 0.0) + float(parts[key]) * len(up)
        if "logits" in parts:
            preds.append(parts["logits"].argmax(1).cpu())
        if "theta" in parts:
            thetas_p.append(parts["theta"].cpu())
            outside.append(parts["outside"].cpu())
        if not sheet:
            k = min(SHEET_EXAMPLES, len(up))
            sheet["input"] = d.images[:k].cpu()
            if "rectified" in parts:
                sheet["rectified"] = (parts["rectified"][:k] * objective.std + objective.mean).cpu()
            if objective.stn is not None:
                sheet["upright"] = objective.target_images(up[:k]).cpu()
            else:
                sheet["upright"] = up[:k].cpu()
    n = len(images)
    metrics: dict[str, Any] = {"test_examples": n}
    if preds:
        metrics["test_error"] = evaluate.classification_error(torch.cat(preds), labels)
    for key, name in (("ce", "test_cross_entropy"), ("image", "test_image_l1"), ("grid", "test_grid_mse"),
                      ("boundary", "test_boundary_penalty")):
        if key in sums:
            metrics[name] = sums[key] / n
    theta_d = torch.cat(thetas_d)
    theta_p = torch.cat(thetas_p) if thetas_p else None
    pred_grid = objective.stn.config.tps_grid if objective.stn is not None else None
    metrics["pose_consistency"] = evaluate.pose_consistency(
        theta_d, theta_p, grid_d if family_d == "tps" else None, pred_grid)
    if outside:
        metrics["collapsed_fraction"] = float((torch.cat(outside) > 0.95).double().mean())
    return metrics, sheet


def write_sheet(path: str | Path, sheet: dict[str, torch.Tensor], scale: int | None = None) -> None:
    """PNG: one row of (input | rectified | upright) triples per 4 examples, images in [0, 1]."""
    from PIL import Image

    columns = [sheet[k] for k in ("input", "rectified", "upright") if k in sheet]
    n = len(columns[0])
    height = max(c.shape[-2] for c in columns)
    scale = scale or max(1, 128 // max(height, 1))
    gap, per_row = 2, 4
    widths = [c.shape[-1] for c in columns]
    cell_w = (sum(widths) + gap * (len(columns) - 1)) * scale
    rows = math.ceil(n / per_row)
    channels = columns[0].shape[1]
    mode = "L" if channels == 1 else "RGB"
    canvas = Image.new(mode, (per_row * cell_w + (per_row + 1) * 4 * gap, rows * (height * scale + 4 * gap) + 4 * gap),
                       color=96 if mode == "L" else (96, 96, 96))
    for i in range(n):
        r, c = divmod(i, per_row)
        x = 4 * gap + c * (cell_w + 4 * gap)
        y = 4 * gap + r * (height * scale + 4 * gap)
        for col, w in zip(columns, widths, strict=True):
            arr = (col[i].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            img = Image.fromarray(arr[0] if channels == 1 else arr.transpose(1, 2, 0)[..., :3], mode)
            img = img.resize((w * scale, col.shape[-2] * scale), Image.NEAREST)
            canvas.paste(img, (x, y))
            x += (w + gap) * scale
    canvas.save(path, format="PNG")


# ----------------------------------------------------------------------------------- training


class TrainBatches(torch.utils.data.Dataset):
    """Training batch ``step`` for one rank: ``(upright, labels, distorted)``, whichever process makes it.

    The global batch of step ``s`` is slice ``s % steps_per_epoch`` of the permutation of epoch
    ``s // steps_per_epoch`` (seeded by ``(seed, 0, epoch)``); rank ``r`` of ``world`` takes every
    ``world``-th example of it, and its distortions are drawn from ``(seed, 1, s, r)``.
    """

    def __init__(self, train_set: ImageSet, config: TrainConfig, batch: int, steps_per_epoch: int,
                 rank: int = 0, world: int = 1) -> None:
        self.images = torch.from_numpy(train_set.images)
        self.labels = None if train_set.labels is None or config.mode == "rectify" else torch.from_numpy(train_set.labels)
        self.config, self.batch, self.steps_per_epoch = config, batch, steps_per_epoch
        self.rank, self.world = rank, world
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None, dist.Distorted]:
        epoch, b = divmod(int(step), self.steps_per_epoch)
        if epoch != self._epoch:
            self._order = torch.randperm(len(self.images), generator=devices.generator(self.config.seed, 0, epoch))
            self._epoch = epoch
        idx = self._order[b * self.batch : (b + 1) * self.batch][self.rank :: self.world]
        up = _to_float(self.images[idx])
        lab = None if self.labels is None else self.labels[idx]
        d = dist.distort(self.config.distortion, up, devices.generator(self.config.seed, 1, step, self.rank))
        return up, lab, d


def _distorted_to(d: dist.Distorted, device: torch.device) -> dist.Distorted:
    if device.type == "cpu":
        return d
    return replace(d, images=d.images.to(device, non_blocking=True), theta=d.theta.to(device, non_blocking=True),
                   params={k: v.to(device, non_blocking=True) for k, v in d.params.items()})


# config fields that may differ between a run and its resumption (they do not change the weights on one device)
_RESUMABLE_CHANGES = ("out", "name", "created_by", "progress", "threads", "workers", "device", "eval_every",
                      "save_every", "resume", "eval_batch_size")


def _check_resume(saved: dict[str, Any], config: TrainConfig, path: str) -> None:
    now = config.to_dict()
    diff = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {now[k]!r}" for k in now
            if k not in _RESUMABLE_CHANGES and saved.get(k) != now[k]]
    if diff:
        raise ConfigError(f"--resume {path}: the run was started with other options ({'; '.join(diff)}); "
                          "resume with the options it was started with")


# ------------------------------------------------- the loop and its machinery (also models.document_train)


def setup_devices(config: TrainConfig) -> tuple[devices.Ranks, torch.device, devices.Precision]:
    """This process's ranks, device and precision for ``config`` (ConfigError for one that cannot work here)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    ranks = devices.Ranks()
    try:
        device = devices.resolve_device(config.device, ranks.local_rank)
        precision = devices.Precision(config.amp, device)
    except devices.DeviceError as e:
        raise ConfigError(str(e)) from None
    return ranks, device, precision


def load_resume(config: TrainConfig) -> Checkpoint | None:
    """The checkpoint ``config.resume`` names (None without one), checked: resumable, started with these options."""
    if not config.resume:
        return None
    try:
        resume = load_checkpoint(config.resume)
    except CheckpointError as e:
        raise ConfigError(f"--resume: {e}") from None
    if resume.train_state is None:
        raise ConfigError(f"--resume {config.resume}: a finished checkpoint has no training state; resume from "
                          "the OUT/last.pt that --save-every writes")
    _check_resume(resume.train_state["train_config"], config, config.resume)
    return resume


class Loop:
    """One training run's state around :func:`fit`: optimizer, schedule, loss scaler, step, history, evaluations.

    ``save`` writes it to the resumable ``OUT/last.pt`` (rank 0; with torch's RNG state), ``restore``
    reads it back from a ``--resume`` checkpoint; ``meta()`` is the checkpoint meta for ``last.pt``.
    """

    def __init__(self, config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 schedule: torch.optim.lr_scheduler.LRScheduler, precision: devices.Precision, ranks: devices.Ranks,
                 device: torch.device, total: int, meta: Callable[[], dict[str, Any]]) -> None:
        self.config, self.model, self.optimizer, self.schedule = config, model, optimizer, schedule
        self.precision, self.ranks, self.device, self.total, self.meta = precision, ranks, device, total, meta
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.eval_every, self.save_every = config.eval_every, config.save_every
        self.last = Path(config.out) / "last.pt" if config.out else None
        self.step = self.start_step = 0
        self.history: list[float] = []
        self.evals: list[dict[str, Any]] = []
        self.seconds_before = 0.0  # training time of the invocations before a --resume
        self.data_wait = 0.0  # this invocation's seconds spent waiting for batches
        self.t0 = time.perf_counter()

    def restore(self, resume: Checkpoint) -> None:
        """Continue the run saved in ``resume`` (its weights are already loaded into the model)."""
        state = resume.train_state
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.precision.load_state_dict(state["scaler"])
        devices.set_rng_state(state["rng"], self.device)
        self.step = self.start_step = int(state["step"])
        self.history, self.evals = list(state["history"]), list(state["evals"])
        self.seconds_before = float(state["train_seconds"])

    def seconds(self) -> float:
        """Training time so far, the invocations before a resume included."""
        return self.seconds_before + time.perf_counter() - self.t0

    def save(self) -> None:
        """Write the resumable ``OUT/last.pt`` (rank 0 only; nothing without ``out``)."""
        if self.last is None or not self.ranks.main:
            return
        self.last.parent.mkdir(parents=True, exist_ok=True)
        state = {"step": self.step, "total": self.total, "optimizer": self.optimizer.state_dict(),
                 "schedule": self.schedule.state_dict(), "scaler": self.precision.state_dict(),
                 "rng": devices.rng_state(self.device), "history": list(self.history), "evals": list(self.evals),
                 "train_seconds": self.seconds(), "world_size": self.ranks.world, "train_config": self.config.to_dict()}
        save_checkpoint(self.last, self.model, self.meta(), state)

    def optimize(self, loss: torch.Tensor) -> None:
        """One optimizer step on ``loss``: loss scaling, gradient clipping, the schedule, the history."""
        loss = loss.float()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {float(loss)} at step {self.step}; lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss)
        if self.config.clip_grad > 0:
            self.precision.unscale(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.config.clip_grad)
        self.precision.step(self.optimizer)
        self.schedule.step()
        self.history.append(self.ranks.mean(loss).item())
        self.step += 1

    def metrics(self) -> dict[str, Any]:
        """How the run ran: time, speed (this invocation's), device, precision, ranks, workers, data wait."""
        seconds = self.seconds()
        this_run = max(seconds - self.seconds_before, 1e-9)
        return {"train_seconds": seconds, "steps_per_second": (self.step - self.start_step) / this_run,
                "data_wait_fraction": self.data_wait / this_run, "device": str(self.device), "amp": self.config.amp,
                "world_size": self.ranks.world, "workers": self.config.workers}

    def other_rank_result(self) -> TrainResult:
        """Ranks other than 0 end here: wait for rank 0 to evaluate and write, leave the group."""
        self.ranks.barrier()
        self.ranks.stop()
        self.model.eval()
        return TrainResult(self.model, {}, self.history, {}, {}, rank=self.ranks.rank)

    def done(self) -> None:
        """Rank 0, after writing the results: ``last.pt`` goes (checkpoint.pt is the run's result); leave the group."""
        if self.last is not None and self.last.exists():
            self.last.unlink()
        self.ranks.barrier()
        self.ranks.stop()


def fit(loop: Loop, batches: Iterable[Any], batch_loss: Callable[[Any], torch.Tensor],
        evaluate: Callable[[], dict[str, float]], progress: devices.Progress,
        on_step: Callable[[int, float], None] | None = None, stop: Callable[[], bool] | None = None) -> None:
    """The training loop of ``stn train``: one optimizer step per batch until ``loop.total`` (or ``stop()``).

    ``batch_loss(batch)`` runs under the precision's autocast. Every ``eval_every`` steps rank 0
    evaluates (``evaluate()`` -> metrics, logged and kept in ``loop.evals``) while the others wait;
    every ``save_every`` steps ``OUT/last.pt`` is written. An interruption (Ctrl-C) between steps
    writes ``last.pt`` too; any exception leaves the process group before it propagates.
    """
    ranks = loop.ranks
    loop.t0 = time.perf_counter()
    waited = time.perf_counter()
    between_steps = True  # the state is consistent (an interruption now can be saved and resumed)
    try:
        for batch in batches:
            loop.data_wait += time.perf_counter() - waited
            between_steps = False
            with loop.precision.autocast():
                loss = batch_loss(batch)
            loop.optimize(loss)
            between_steps = True
            step = loop.step
            if step % 10 == 0 or step == loop.total:
                wait = loop.data_wait / max(loop.seconds() - loop.seconds_before, 1e-9)
                progress.update(float(np.mean(loop.history[-10:])), f"data-wait={100 * wait:.0f}%")
            else:
                progress.update()
            if loop.eval_every and step % loop.eval_every == 0 and step < loop.total:
                if ranks.main:
                    loop.evals.append({"step": step, **evaluate()})
                    progress.line("eval " + " ".join(f"{k} {v:.4g}" for k, v in loop.evals[-1].items() if k != "step"))
                    loop.model.train()
                ranks.barrier()
            if loop.save_every and step % loop.save_every == 0 and step < loop.total:
                loop.save()
            if on_step is not None:
                on_step(step, loop.history[-1])
            if step >= loop.total or (stop is not None and stop()):
                break
            waited = time.perf_counter()
    except KeyboardInterrupt:
        if between_steps and loop.step < loop.total:
            loop.save()
            if loop.last is not None and ranks.main:
                log.warning("interrupted at step %d: resume with --resume %s", loop.step, loop.last)
        ranks.stop()
        raise
    except BaseException:
        ranks.stop()
        raise
    finally:
        progress.close()


def _meta(config: TrainConfig, splits: ImageSplits, stn_config: STNConfig, stn: nn.Module | None, dataset: str,
          created_by: str, metrics: dict[str, Any] | None) -> dict[str, Any]:
    kind = "cnn" if stn is None else "stn"
    return {
        "name": config.name or f"{kind}-{splits.name}-{config.distortion}-{config.mode}",
        "version": MODEL_VERSION,
        "dataset": dataset,
        "classes": list(splits.classes),
        "metrics": metrics,
        "created_by": created_by,
        "in_channels": splits.channels,
        "mean": list(stn_config.mean),  # the model's input normalization (also in the STN config)
        "std": list(stn_config.std),
        "image_size": list(splits.image_size),
        "canvas_size": list(dist.canvas_size(config.distortion, splits.image_size)),
        "train_config": config.to_dict(),
    }


_EVAL_KEYS = ("test_error", "test_cross_entropy", "test_image_l1", "test_grid_mse", "collapsed_fraction")


def train(config: TrainConfig, splits: ImageSplits | None = None,
          on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train, evaluate, and (when ``config.out`` is set) write checkpoint.pt, metrics.json, sheet.png.

    ``splits`` overrides reading ``config.data`` (for tests and notebooks). ``on_step(step, loss)``
    is called after every optimizer step. Raises ConfigError or ``models.data.DataError`` (both
    ValueError) with a message naming what to fix. Under ``torchrun`` every rank calls it; only
    rank 0 evaluates and writes, the others return an empty ``metrics`` and ``rank`` > 0.
    """
    check_config(config)
    if config.distortion == DOCUMENT:  # synthetic photos, not a dataset: its own data stream and metrics
        from models.document_train import train_documents

        return train_documents(config, on_step)
    ranks, device, precision = setup_devices(config)
    if splits is None:
        splits = load_dataset(config.data, config.image_size, config.limit_train, config.limit_test)
    else:
        splits = replace(splits, train=splits.train.head(config.limit_train), test=splits.test.head(config.limit_test))
    if config.mode == "classify":
        if not splits.labelled:
            raise ConfigError(f"{splits.source} has no labels (no class subfolders); classify mode needs them. "
                              "Use --mode rectify to learn rectification from unlabelled upright images.")
        top = int(max(splits.train.labels.max(initial=0), splits.test.labels.max(initial=0)))
        if top >= len(splits.classes):
            raise ConfigError(f"labels go up to {top} but only {len(splits.classes)} class names are known")
    if len(splits.train) < 2:
        raise ConfigError(f"need at least 2 training examples, got {len(splits.train)}")
    if len(splits.train) < ranks.world or config.batch_size < ranks.world:
        raise ConfigError(f"{ranks.world} ranks need a batch size and a training set of at least {ranks.world}")
    resume = load_resume(config)

    stn_config = stn_config_for(config, splits)
    torch.manual_seed(config.seed)
    model = build_model(config, splits, stn_config)
    stn = _stn_of(model)
    created_by = config.created_by
    if config.init_stn:  # the model's history: the run that trained the transformer first
        created_by = " && ".join(c for c in (_init_stn_from(stn, config.init_stn), created_by) if c)
    if resume is not None:  # the same run, continued: its weights and the command that started it
        model.load_state_dict(resume.state_dict)
        created_by = str(resume.meta.get("created_by", created_by))
    ranks.start(device)
    model.to(device)
    mean = torch.tensor(stn_config.mean).view(1, -1, 1, 1).to(device)
    std = torch.tensor(stn_config.std).view(1, -1, 1, 1).to(device)
    objective = _Objective(model, config, splits.image_size, mean, std)
    forward = ranks.wrap(model, device)
    train_objective = objective if forward is model else _Objective(model, config, splits.image_size, mean, std,
                                                                    forward)
    optimizer = _optimizer(model, config)

    n_train = len(splits.train)
    batch = min(config.batch_size, n_train)
    steps_per_epoch = max(1, n_train // batch)
    if config.steps is None:
        total = (config.epochs or DEFAULT_EPOCHS) * steps_per_epoch
    else:
        total = config.steps if config.epochs is None else min(config.steps, config.epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total)))

    dataset = f"{splits.name} {config.distortion}"
    loop = Loop(config, model, optimizer, schedule, precision, ranks, device, total,
                lambda: _meta(config, splits, stn_config, stn, dataset, created_by, None))
    if resume is not None:
        loop.restore(resume)
    log.info("training %s (%d parameters) on %s: %d examples, %d steps of %d, from step %d on %s (amp %s, %d rank(s))",
             type(model).__name__, count_parameters(model), dataset, n_train, total, batch, loop.step, device,
             config.amp, ranks.world)
    loader = torch.utils.data.DataLoader(
        TrainBatches(splits.train, config, batch, steps_per_epoch, ranks.rank, ranks.world), batch_size=None,
        sampler=range(loop.step, total), num_workers=config.workers, worker_init_fn=devices.worker_init,
        prefetch_factor=4 if config.workers else None, generator=torch.Generator().manual_seed(config.seed),
        pin_memory=device.type == "cuda")
    warned = False

    def batch_loss(batch: tuple[torch.Tensor, torch.Tensor | None, dist.Distorted]) -> torch.Tensor:
        nonlocal warned
        up, lab, d = batch
        up, d = up.to(device, non_blocking=True), _distorted_to(d, device)
        lab = None if lab is None else lab.to(device, non_blocking=True)
        loss, parts = train_objective(up, lab, d)
        if "outside" in parts and not warned and float(parts["outside"].mean()) > 0.95:
            log.warning("step %d: the transformer samples mostly outside the input (collapse); the boundary "
                        "penalty pulls it back, lower --loc-lr-mult or --lr if this persists", loop.step + 1)
            warned = True
        return loss

    def evaluate_now() -> dict[str, float]:
        found, _ = evaluate_model(model, objective, splits.test, config)
        return {k: found[k] for k in _EVAL_KEYS if k in found}

    model.train()
    progress = devices.Progress(total, f"train {config.mode} {dataset}", config.progress and ranks.main,
                                start=loop.step)
    fit(loop, loader, batch_loss, evaluate_now, progress, on_step)
    forward = train_objective = None  # the DDP wrapper goes before the process group it holds (Ranks.stop)
    history = loop.history

    if not ranks.main:
        return loop.other_rank_result()
    t1 = time.perf_counter()
    test_metrics, sheet = evaluate_model(model, objective, splits.test, config)
    model.eval()
    metrics: dict[str, Any] = {
        "dataset": dataset, "mode": config.mode, "model": config.model if config.mode == "classify" else "stn",
        "transform": config.transform if stn is not None else None, "distortion": config.distortion,
        "parameters": count_parameters(model), "train_examples": n_train, "batch_size": batch, "steps": total,
        "epochs": total / steps_per_epoch, **loop.metrics(),
        "final_train_loss": float(np.mean(history[-min(50, len(history)):])),
        **test_metrics, "eval_seconds": time.perf_counter() - t1,
    }
    metrics["seconds_per_epoch"] = metrics["train_seconds"] / total * steps_per_epoch
    if loop.evals:
        metrics["evals"] = loop.evals
    if metrics.get("collapsed_fraction"):
        log.warning("%.1f%% of test examples are sampled mostly outside the input", 100 * metrics["collapsed_fraction"])
    meta = _meta(config, splits, stn_config, stn, dataset, created_by, metrics)
    files: dict[str, str] = {}
    if config.out:
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        files = {"checkpoint": str(out / "checkpoint.pt"), "metrics": str(out / "metrics.json"),
                 "sheet": str(out / "sheet.png")}
        save_checkpoint(files["checkpoint"], model, meta)
        Path(files["metrics"]).write_text(json.dumps(metrics, indent=2) + "\n")
        write_sheet(files["sheet"], sheet)
    loop.done()
    return TrainResult(model, metrics, history, meta, files)


__all__ = [
    "MODES", "MODELS", "DEFAULT_EPOCHS", "ConfigError", "TrainConfig", "TrainResult", "check_config", "stn_config_for", "build_model",
    "boundary_penalty", "outside_fraction", "map_through_distortion", "evaluate_model", "write_sheet", "train",
    "TrainBatches", "setup_devices", "load_resume", "Loop", "fit",
]
