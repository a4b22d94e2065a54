"""Checkpoints: weights plus the full config, so export rebuilds the model from the file alone.

Loaded with ``torch.load(weights_only=True)``: only tensors and plain containers inside.
A checkpoint written during training (``stn train --save-every``, ``OUT/last.pt``) also holds
``train_state`` (step, optimizer, schedule, loss scaler, RNG state, loss history) for
``stn train --resume``; export and serving ignore it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.classifier import STCNN, ClassifierConfig, SmallCNN
from models.stn import SpatialTransformer, STNConfig

FORMAT = "stn-checkpoint"
FORMAT_VERSION = 1
KINDS = ("stn", "st-cnn", "cnn")


class CheckpointError(ValueError):
    """The file is not a readable stn checkpoint; the message says why."""


@dataclass
class Checkpoint:
    kind: str  # "stn" (rectifier alone), "st-cnn" (STN + classifier head), "cnn" (baseline)
    stn_config: STNConfig | None
    head_config: ClassifierConfig | None
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)  # name, version, dataset, classes, metrics, created_by
    train_state: dict[str, Any] | None = None  # what --resume needs (models.train); None in finished checkpoints

    def build(self) -> torch.nn.Module:
        """The trained module, weights loaded, in eval mode."""
        if self.kind == "stn":
            model = SpatialTransformer(self.stn_config)
        elif self.kind == "st-cnn":
            model = STCNN(self.stn_config, self.head_config)
        else:
            model = SmallCNN(self.meta.get("in_channels", 1), self.head_config)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint weights do not fit its config: {str(e).splitlines()[0]}") from None
        return model.eval()

    def build_stn(self) -> SpatialTransformer:
        """The spatial transformer (the part that exports)."""
        model = self.build()
        if isinstance(model, STCNN):
            return model.stn
        if isinstance(model, SpatialTransformer):
            return model
        raise CheckpointError("this checkpoint is a plain CNN baseline: it has no spatial transformer to export")


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, meta: dict[str, Any],
                    train_state: dict[str, Any] | None = None) -> None:
    """Write atomically (temporary file, then rename); ``train_state`` makes it resumable."""
    if isinstance(model, STCNN):
        kind, stn_cfg, head_cfg = "st-cnn", model.stn.config, model.head_config
    elif isinstance(model, SpatialTransformer):
        kind, stn_cfg, head_cfg = "stn", model.config, None
    elif isinstance(model, SmallCNN):
        kind, stn_cfg, head_cfg = "cnn", None, model.config
    else:
        raise TypeError(f"cannot checkpoint a {type(model).__name__}")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "stn_config": stn_cfg.to_dict() if stn_cfg else None,
        "head_config": head_cfg.to_dict() if head_cfg else None,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta,
    }
    if train_state is not None:
        payload["train_state"] = train_state
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint; CheckpointError with a reason for anything that is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a torch file but not an stn checkpoint (no 'format': '{FORMAT}')")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {payload.get('format_version')}, expected {FORMAT_VERSION}")
    kind = payload.get("kind")
    if kind not in KINDS:
        raise CheckpointError(f"{path} has unknown kind {kind!r}")
    try:
        stn_cfg = STNConfig.from_dict(payload["stn_config"]) if payload.get("stn_config") else None
        head_cfg = ClassifierConfig(**payload["head_config"]) if payload.get("head_config") else None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has an invalid config: {e}") from None
    return Checkpoint(kind, stn_cfg, head_cfg, payload["state_dict"], dict(payload.get("meta") or {}),
                      payload.get("train_state"))
