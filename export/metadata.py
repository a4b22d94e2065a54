"""The ``stn.*`` metadata_props of an exported model: names, encoding, validation. Torch-free.

Every value is JSON text (strings are JSON strings too), so types survive the round trip.
A server or batch job configures itself from :class:`ModelInfo` alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from models.frames import PARAMETRISATIONS, TRANSFORMS, theta_shape

PREFIX = "stn."
CONTRACT_VERSION = 1
LOWERINGS = ("onnx", "contrib", "gather", "native")

# Tensor names fixed by the contract (docs/DESIGN.md, "The ONNX model contract").
INPUT_IMAGE = "image"  # [N, C, H, W] float32, normalized with mean/std
OUTPUT_RECTIFIED = "rectified"  # [N, C, h, w]
OUTPUT_THETA = "theta"  # [N, 2, 3] | [N, 3, 3] | [N, K, 2]
LOC_INPUT = "loc_input"  # internal: the image resized to loc_size, what the localisation net sees
BASE_GRID = "base_grid"  # initializer [h, w, D]: the grid generator's base (models.frames.base_grid)


class MetadataError(ValueError):
    """The model's metadata is missing keys or has values that break the contract."""


@dataclass(frozen=True)
class ModelInfo:
    """What a model says about itself (``stn.*`` metadata_props)."""

    name: str
    version: str
    transform: str
    in_channels: int
    loc_size: tuple[int, int]
    output_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    align_corners: bool = False
    padding_mode: str = "zeros"
    interpolation: str = "bilinear"
    grid_sample: str = "onnx"
    tps_grid: tuple[int, int] = (4, 4)
    classes: tuple[str, ...] | None = None
    dataset: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    created_by: str = ""
    contract: int = CONTRACT_VERSION
    parametrisation: str = "matrix"  # what the localiser regresses (models.frames.PARAMETRISATIONS); theta is the same

    REQUIRED = ("name", "version", "transform", "in_channels", "loc_size", "output_size", "mean", "std",
                "align_corners", "padding_mode", "interpolation", "grid_sample", "created_by")

    def to_props(self) -> dict[str, str]:
        """metadata_props as {key: JSON text}, keys prefixed ``stn.``; absent classes are left out."""
        d = asdict(self)
        if d["classes"] is None:
            del d["classes"]
        return {PREFIX + k: json.dumps(list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_file(cls, path: str | Path) -> ModelInfo:
        """The metadata of the ONNX model at ``path`` (its weights are not read); MetadataError when bad."""
        return cls.from_proto(onnx.load(str(path), load_external_data=False))

    @classmethod
    def from_proto(cls, model_proto: onnx.ModelProto) -> ModelInfo:
        """The metadata of a loaded ONNX model; MetadataError when bad."""
        return cls.from_props(read_props(model_proto))

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ModelInfo:
        """Parse and validate; MetadataError says which key is missing or wrong."""
        values: dict[str, Any] = {}
        for key, text in props.items():
            if not key.startswith(PREFIX):
                continue
            try:
                values[key[len(PREFIX):]] = json.loads(text)
            except json.JSONDecodeError as e:
                raise MetadataError(f"metadata {key!r} is not JSON: {text[:80]!r} ({e})") from None
        missing = [PREFIX + k for k in cls.REQUIRED if k not in values]
        if missing:
            raise MetadataError(f"not an stn model: metadata_props lack {', '.join(missing)}")
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in values.items() if k in known}
        try:
            info = cls(
                name=str(values["name"]),
                version=str(values["version"]),
                transform=str(values["transform"]),
                in_channels=int(values["in_channels"]),
                loc_size=_pair(values["loc_size"], "loc_size"),
                output_size=_pair(values["output_size"], "output_size"),
                mean=tuple(float(v) for v in values["mean"]),
                std=tuple(float(v) for v in values["std"]),
                align_corners=bool(values["align_corners"]),
                padding_mode=str(values["padding_mode"]),
                interpolation=str(values["interpolation"]),
                grid_sample=str(values["grid_sample"]),
                tps_grid=_pair(values.get("tps_grid", (4, 4)), "tps_grid"),
                classes=tuple(str(c) for c in values["classes"]) if values.get("classes") is not None else None,
                dataset=str(values.get("dataset", "")),
                metrics=dict(values.get("metrics") or {}),
                created_by=str(values["created_by"]),
                contract=int(values.get("contract", CONTRACT_VERSION)),
                parametrisation=str(values.get("parametrisation", "matrix")),
            )
        except (TypeError, ValueError) as e:
            raise MetadataError(f"stn metadata has a malformed value: {e}") from None
        info.validate()
        return info

    def validate(self) -> None:
        if self.contract != CONTRACT_VERSION:
            raise MetadataError(f"model follows contract {self.contract}, this code reads {CONTRACT_VERSION}")
        if self.transform not in TRANSFORMS:
            raise MetadataError(f"unknown transform {self.transform!r} in stn.transform")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise MetadataError(f"stn.mean/stn.std need {self.in_channels} values each")
        if any(s <= 0 for s in self.std):
            raise MetadataError("stn.std values must be > 0")
        if self.align_corners:
            raise MetadataError("stn.align_corners must be false (the convention); this code does not read true")
        if self.parametrisation not in PARAMETRISATIONS:
            raise MetadataError(f"unknown parametrisation {self.parametrisation!r} in stn.parametrisation")
        if self.parametrisation == "corners" and self.transform != "projective":
            raise MetadataError("stn.parametrisation 'corners' needs stn.transform 'projective'")
        if self.grid_sample not in LOWERINGS:
            raise MetadataError(f"unknown lowering {self.grid_sample!r} in stn.grid_sample")

    @property
    def theta_shape(self) -> tuple[int, int]:
        """Per-image theta shape: (2,3) affine-like, (3,3) projective, (K,2) TPS (``models.frames.theta_shape``)."""
        return theta_shape(self.transform, self.tps_grid)


def _pair(v: Any, name: str) -> tuple[int, int]:
    if not isinstance(v, (list, tuple)) or len(v) != 2 or int(v[0]) < 1 or int(v[1]) < 1:
        raise MetadataError(f"stn.{name} must be [h, w] with positive ints, got {v!r}")
    return int(v[0]), int(v[1])


def read_props(model_proto: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model_proto.metadata_props}


def write_props(model_proto: onnx.ModelProto, info: ModelInfo) -> None:
    """Replace the model's ``stn.*`` metadata_props with ``info``'s (others are kept)."""
    keep = [(p.key, p.value) for p in model_proto.metadata_props if not p.key.startswith(PREFIX)]
    del model_proto.metadata_props[:]
    for k, v in [*keep, *sorted(info.to_props().items())]:
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = k, v
