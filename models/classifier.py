"""Classifier heads for the experiments: ST-CNN (an STN in front of a small CNN) and a plain CNN.

Both classify [N, C, H, W] images; the plain CNN has about the same parameter count as the
ST-CNN (its width is chosen to match), so a comparison measures the transformer, not size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from models.stn import SpatialTransformer, STNConfig

# Pooling before the fully connected layers. "gap" (global average pooling) makes the CNN
# nearly translation-invariant; "grid" keeps a 4x4 layout (like the paper's fully connected
# heads, but independent of the input size).
HEADS = {"gap": 1, "grid": 4}


@dataclass
class ClassifierConfig:
    """The CNN head. Stored in checkpoints beside the STN config."""

    num_classes: int = 10  # output classes
    channels: tuple[int, int] = (32, 64)  # widths of the two conv blocks
    hidden: int = 128  # fully connected layer width
    head: str = "gap"  # pooling before the FC layers: "gap" (global average) or "grid" (4x4 average, keeps layout)

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        if self.head not in HEADS:
            raise ValueError(f"unknown classifier head {self.head!r}; choose one of {', '.join(HEADS)}")

    def to_dict(self) -> dict:
        return {"num_classes": self.num_classes, "channels": list(self.channels), "hidden": self.hidden,
                "head": self.head}


class SmallCNN(nn.Module):
    """conv3-bn-relu-pool x2 -> conv3-bn-relu -> average pool (global, or 4x4 with ``head="grid"``) -> FC -> classes.

    Works at any input size."""

    def __init__(self, in_channels: int, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        c1, c2 = config.channels
        pooled = HEADS[config.head]
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(True), nn.MaxPool2d(2),
            nn.Conv2d(c2, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(True),
            nn.AdaptiveAvgPool2d(pooled), nn.Flatten(),
            nn.Linear(c2 * pooled * pooled, config.hidden), nn.ReLU(True), nn.Dropout(0.2), nn.Linear(config.hidden, config.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class STCNN(nn.Module):
    """ST-CNN: rectify with the STN, classify the rectified image. ``forward`` -> (logits, rectified, theta)."""

    def __init__(self, stn_config: STNConfig, head_config: ClassifierConfig) -> None:
        super().__init__()
        self.head_config = head_config
        self.stn = SpatialTransformer(stn_config)
        self.head = SmallCNN(stn_config.in_channels, head_config)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rectified, theta = self.stn(image)
        return self.head(rectified), rectified, theta


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def matched_baseline(stn_config: STNConfig, head_config: ClassifierConfig) -> SmallCNN:
    """A plain CNN with about as many parameters as ``STCNN(stn_config, head_config)``."""
    target = count_parameters(STCNN(stn_config, head_config))
    best, best_gap = None, None
    c1, c2 = head_config.channels
    for scale in [1.0 + 0.02 * i for i in range(0, 80)]:
        cfg = replace(head_config, channels=(round(c1 * scale), round(c2 * scale)))
        model = SmallCNN(stn_config.in_channels, cfg)
        gap = abs(count_parameters(model) - target)
        if best_gap is None or gap < best_gap:
            best, best_gap = model, gap
    return best
