"""The Spatial Transformer: localisation net -> grid generator -> sampler.

The localisation net sees a copy of the input resized to ``loc_size``; the sampler reads the
full-resolution input and writes ``output_size`` (paper section 3). Input is NCHW float32,
already normalized with the model's mean/std (``STNConfig.mean``/``std``). The module holds
parameters (the localisation net, the base grid buffer) and calls the math, which is plain
functions: ``models.transforms.spatial_transform`` (grid generator and sampler) and the
family's ``theta_from_params``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from models.frames import PARAMETRISATIONS
from models.sampler import check_sampler_options
from models.transforms import TRANSFORMS, TransformFamily, make_transform, spatial_transform

LOC_NETS = ("small", "deep")  # the localisation CNNs: LocalisationNet, DeepLocalisationNet


@dataclass
class STNConfig:
    """Everything needed to rebuild an STN; stored in checkpoints beside the state_dict."""

    transform: str = "affine"  # one of models.transforms.TRANSFORMS
    in_channels: int = 1  # image channels (1 grayscale, 3 RGB)
    loc_size: tuple[int, int] = (28, 28)  # (h, w) the localisation net sees
    output_size: tuple[int, int] = (28, 28)  # (h, w) of the rectified output
    mode: str = "bilinear"  # sampler interpolation: bilinear, nearest, bicubic
    padding_mode: str = "zeros"  # sampler padding: zeros, border, reflection
    tps_grid: tuple[int, int] = (4, 4)  # TPS control points (rows, cols); tps only
    loc_channels: tuple[int, ...] = (8, 10)  # small: its two convs' channels; deep: each stride-2 stage's
    loc_hidden: int = 32  # width of its hidden fully connected layer
    mean: tuple[float, ...] = (0.5,)  # per-channel normalization applied before the model
    std: tuple[float, ...] = (0.5,)
    parametrisation: str = "matrix"  # one of models.frames.PARAMETRISATIONS ("corners": projective only)
    loc_net: str = "small"  # one of LOC_NETS: small (2 convs, the paper's size) or deep (strided conv stages, BN)

    def __post_init__(self) -> None:
        for name in ("loc_size", "output_size", "tps_grid", "loc_channels", "mean", "std"):
            setattr(self, name, tuple(getattr(self, name)))
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r}; choose one of {', '.join(TRANSFORMS)}")
        check_sampler_options(self.mode, self.padding_mode)
        if self.parametrisation not in PARAMETRISATIONS:
            raise ValueError(f"unknown parametrisation {self.parametrisation!r}; choose one of {', '.join(PARAMETRISATIONS)}")
        if self.parametrisation == "corners" and self.transform != "projective":
            raise ValueError(f"the corners parametrisation needs transform 'projective', got {self.transform!r}")
        if self.loc_net not in LOC_NETS:
            raise ValueError(f"unknown loc_net {self.loc_net!r}; choose one of {', '.join(LOC_NETS)}")
        if self.loc_net == "small" and len(self.loc_channels) != 2:
            raise ValueError(f"the small localisation net has two convs: loc_channels needs 2 values, got {self.loc_channels}")
        if self.loc_net == "deep" and (not self.loc_channels or min(self.loc_size) < 2 ** len(self.loc_channels)):
            raise ValueError(f"the deep localisation net halves loc_size {self.loc_size} once per loc_channels "
                             f"stage {self.loc_channels}: give fewer stages or a larger loc_size")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        for name in ("loc_size", "output_size"):
            size = getattr(self, name)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"{name} must be (h, w) with both >= 1, got {size}")
        if min(self.loc_size) < 16:
            raise ValueError(f"loc_size must be at least 16x16 for the default localisation net, got {self.loc_size}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(f"mean/std need {self.in_channels} values each, got {self.mean} / {self.std}")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> STNConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown STN config keys {sorted(unknown)}")
        return cls(**d)


class LocalisationNet(nn.Module):
    """Default localisation net: a small CNN (two conv-pool-relu blocks, one hidden FC layer).

    The last layer regresses the transform's raw parameters; it starts at the identity
    transform (zero weights, identity bias).
    """

    def __init__(self, in_channels: int, loc_size: tuple[int, int], n_params: int, identity: torch.Tensor,
                 channels: tuple[int, int] = (8, 10), hidden: int = 32) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=7),
            nn.MaxPool2d(2, stride=2),
            nn.ReLU(True),
            nn.Conv2d(c1, c2, kernel_size=5),
            nn.MaxPool2d(2, stride=2),
            nn.ReLU(True),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, *loc_size)).numel()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(True), nn.Linear(hidden, n_params))
        regress = self.head[-1]
        nn.init.zeros_(regress.weight)
        with torch.no_grad():
            regress.bias.copy_(identity)

    @property
    def regressor(self) -> nn.Linear:
        return self.head[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _conv_bn(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]


class DeepLocalisationNet(nn.Module):
    """A deeper localisation CNN for precise regression (the document rectifier's corners).

    One stage per ``channels`` entry: a stride-2 3x3 conv, then (from the second stage on) a
    stride-1 3x3 conv, each with batch norm and ReLU; then the flattened map (it keeps where
    things are), one hidden layer and the regression layer, which starts at the identity
    (zero weights, identity bias) like :class:`LocalisationNet`'s.
    """

    def __init__(self, in_channels: int, loc_size: tuple[int, int], n_params: int, identity: torch.Tensor,
                 channels: tuple[int, ...] = (16, 32, 64, 96, 128), hidden: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for i, c in enumerate(channels):
            layers += _conv_bn(prev, c, 2)
            if i:
                layers += _conv_bn(c, c, 1)
            prev = c
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            flat = self.features.eval()(torch.zeros(1, in_channels, *loc_size)).numel()
        self.features.train()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(True), nn.Linear(hidden, n_params))
        nn.init.zeros_(self.head[-1].weight)
        with torch.no_grad():
            self.head[-1].bias.copy_(identity)

    @property
    def regressor(self) -> nn.Linear:
        return self.head[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SpatialTransformer(nn.Module):
    """STN: ``forward(image) -> (rectified, theta)``.

    ``localisation`` may be any module mapping [N, C, loc_h, loc_w] to the family's raw
    parameters [N, P]; by default a :class:`LocalisationNet`.
    """

    def __init__(self, config: STNConfig, localisation: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.transform: TransformFamily = make_transform(config.transform, config.tps_grid, config.parametrisation)
        net = DeepLocalisationNet if config.loc_net == "deep" else LocalisationNet
        self.localisation = localisation or net(
            config.in_channels, config.loc_size, self.transform.n_params, self.transform.identity_params(),
            config.loc_channels, config.loc_hidden,
        )
        # Derived from the config, so not stored in checkpoints.
        self.register_buffer("base_grid", self.transform.base_grid(config.output_size), persistent=False)

    def _check_image(self, image: torch.Tensor) -> None:
        if image.dim() != 4 or image.shape[1] != self.config.in_channels:
            raise ValueError(
                f"image must be [N, {self.config.in_channels}, H, W] float32, got shape {list(image.shape)}"
            )

    def localise(self, image: torch.Tensor) -> torch.Tensor:
        """theta from the image (resized to ``loc_size`` first)."""
        self._check_image(image)
        small = F.interpolate(image, size=self.config.loc_size, mode="bilinear", align_corners=False)
        return self.transform.theta_from_params(self.localisation(small))

    def sample(self, image: torch.Tensor, theta: torch.Tensor,
               output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Rectify ``image`` at full resolution with ``theta`` into ``output_size`` (default: the config's).

        ``transforms.spatial_transform`` with this model's family, sampler options and, at its own
        output size, its ``base_grid`` buffer (which the exporter names ``base_grid``).
        """
        cfg = self.config
        size = cfg.output_size if output_size is None else output_size
        base = self.base_grid if output_size is None else None
        return spatial_transform(image, theta, cfg.transform, size, cfg.mode, cfg.padding_mode, cfg.tps_grid, base)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta = self.localise(image)
        return self.sample(image, theta), theta


def identity_theta(transform: str, batch: int, tps_grid: tuple[int, int] = (4, 4)) -> torch.Tensor:
    """The identity theta of a family, repeated ``batch`` times."""
    family = make_transform(transform, tps_grid)
    return family.theta_from_params(family.identity_params().unsqueeze(0).repeat(batch, 1))


__all__ = ["LOC_NETS", "STNConfig", "LocalisationNet", "DeepLocalisationNet", "SpatialTransformer", "identity_theta"]
