"""The paper's distortions (section 4.1), generated on the fly with their transforms kept.

Every distortion takes an upright batch ``[N, C, h, w]`` (float, background 0) and a
``torch.Generator`` and returns a :class:`Distorted`: the distorted batch on its canvas
``[N, C, H, W]``, the known transform ``theta`` and the drawn parameters.

Convention (``models.frames``: normalized coordinates, x before y, ``align_corners=False``):

- ``theta`` maps **distorted-image normalized coordinates to upright-image normalized
  coordinates**, in the project's theta convention (output -> input), so
  ``distorted = spatial_transform(upright, theta, family, canvas)``; that is exactly how
  the distorted batch is made (``models.transforms``: grid generator + sampler).
  Affine theta is [N, 2, 3] (R, RTS, TC, none), projective [N, 3, 3] (P), TPS source
  control points [N, K, 2] (E, on a 4 x 4 grid).
- **Canvases larger than the source** (RTS: 1.5 x the source, 42 x 42 for 28 x 28; TC:
  60/28 x the source, 60 x 60 for 28 x 28): each image's normalized coordinates span its
  own extent, so the same pixel is at different normalized coordinates in the two
  frames. With the upright image centred on the canvas at one pixel per pixel, a canvas
  point ``u_canvas`` is the upright point ``u_up = (W / w, H / h) * u_canvas``, exactly, for
  ``align_corners=False`` (when ``W - w`` is even the pixel centres coincide: 28 in 42 is
  canvas pixels 7..34; when it is odd the centred image sits half a pixel off the canvas
  grid and sampling interpolates). Rotation and scale act on centred *pixel* coordinates
  (so rotations stay rotations for non-square images), and the translation ``(tx, ty)``
  is where the upright image's centre lands, in canvas-normalized coordinates.
  In matrices: ``theta = diag(2/w, 2/h) (1/s) R(-angle) diag(W/2, H/2) [I | -t]``.
- ``angle`` is in radians and rotates the content clockwise on screen (x right, y down)
  for positive values; ``theta``'s own rotation (``atan2(a21 - a12, a11 + a22)``) is
  ``-angle``.

=========== ======== ======================================================================
name        canvas   parameters (``Distorted.params``)
=========== ======== ======================================================================
R           h x w    angle ~ U(-90, 90) degrees
RTS         1.5 x    angle ~ U(-45, 45) degrees, scale ~ U(0.7, 1.2), (tx, ty) uniform
                     such that the scaled (unrotated) image stays on the canvas
P           h x w    scale ~ U(0.75, 1), corners: the upright image's corners land at
                     scale * corner + N(0, 0.1) in the distorted image (a homography)
E           h x w    scale ~ U(0.75, 1), offsets: a 4 x 4 TPS whose control points (a
                     regular grid of the distorted image) sample the upright image at
                     ``grid / scale + N(0, 0.1)``
TC          60/28 x  (tx, ty) uniform with the image on the canvas, plus 6 clutter
                     patches of 6/28 of the source size cropped from other images of the
                     batch (positions kept); clutter is not part of theta
none        h x w    identity
=========== ======== ======================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from models import frames
from models.transforms import similarity_theta, spatial_transform

DISTORTIONS = ("R", "RTS", "P", "E", "TC", "none")
# family of each distortion's theta
DISTORTION_FAMILY = {"R": "affine", "RTS": "affine", "P": "projective", "E": "tps", "TC": "affine", "none": "affine"}
ELASTIC_GRID = (4, 4)


@dataclass
class Distorted:
    images: torch.Tensor  # [N, C, H, W] the distorted batch on its canvas
    theta: torch.Tensor  # distorted-normalized -> upright-normalized (see module doc)
    family: str  # transform family of theta: "affine", "projective" or "tps"
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # the drawn parameters, per example
    tps_grid: tuple[int, int] = ELASTIC_GRID  # control grid when family == "tps"


def canvas_size(name: str, source_size: frames.Size) -> tuple[int, int]:
    """(H, W) of a distortion's canvas for upright images of ``source_size`` (h, w)."""
    h, w = int(source_size[0]), int(source_size[1])
    if name == "RTS":
        return round(h * 1.5), round(w * 1.5)
    if name == "TC":
        return round(h * 60 / 28), round(w * 60 / 28)
    if name in DISTORTIONS:
        return h, w
    raise ValueError(f"unknown distortion {name!r}; choose one of {', '.join(DISTORTIONS)}")


def warp(upright: torch.Tensor, theta: torch.Tensor, family: str, canvas: frames.Size,
         tps_grid: frames.Size = ELASTIC_GRID) -> torch.Tensor:
    """``spatial_transform(upright, theta)`` into ``canvas`` (bilinear, zeros): the project's grid generator and sampler."""
    return spatial_transform(upright, theta.to(upright.dtype), family, canvas, "bilinear", "zeros", tps_grid)


def _check(upright: torch.Tensor) -> tuple[int, int, int]:
    if upright.dim() != 4 or not upright.is_floating_point():
        raise ValueError(f"upright images must be a float [N, C, h, w] batch, got {upright.dtype} "
                         f"shape {list(upright.shape)}")
    n, _, h, w = upright.shape
    return n, h, w


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def placement_theta(source_size: frames.Size, canvas: frames.Size, angle: torch.Tensor, scale: torch.Tensor,
                    tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """Affine theta [N, 2, 3] (canvas-normalized -> upright-normalized) of an upright image of
    ``source_size`` rotated by ``angle``, scaled by ``scale`` about its centre and centred at
    (tx, ty) (canvas-normalized) on a ``canvas``-sized image. See the module doc."""
    h, w = float(source_size[0]), float(source_size[1])
    big_h, big_w = float(canvas[0]), float(canvas[1])
    angle, scale, tx, ty = (torch.as_tensor(v, dtype=torch.float64) for v in (angle, scale, tx, ty))
    zero = torch.zeros_like(angle)
    # (1/s) R(-angle) acting on centred pixel coordinates
    inv_rot = similarity_theta(-angle, 1.0 / scale, zero, zero)[:, :, :2]
    lin = torch.diag(torch.tensor([2.0 / w, 2.0 / h], dtype=torch.float64)) @ inv_rot @ torch.diag(
        torch.tensor([big_w / 2.0, big_h / 2.0], dtype=torch.float64))
    trans = -(lin @ torch.stack([tx, ty], dim=1).unsqueeze(-1))
    return torch.cat([lin, trans], dim=2)


def frame_theta(source_size: frames.Size, frame: frames.Size, batch: int) -> torch.Tensor:
    """Affine theta [N, 2, 3] placing an upright image, centred and unscaled, in a ``frame``-sized
    image: frame-normalized -> upright-normalized, ``diag(W/w, H/h)``. The rectifier's target
    is ``grid_sample(upright, grid(frame_theta))``."""
    zero = torch.zeros(batch, dtype=torch.float64)
    return placement_theta(source_size, frame, zero, torch.ones(batch, dtype=torch.float64), zero, zero)


def _finish(upright: torch.Tensor, theta: torch.Tensor, family: str, canvas: frames.Size,
            params: dict[str, torch.Tensor], tps_grid: frames.Size = ELASTIC_GRID) -> Distorted:
    theta = theta.to(device=upright.device, dtype=upright.dtype)
    images = warp(upright, theta, family, canvas, tps_grid)
    params = {k: v.to(device=upright.device, dtype=upright.dtype if v.is_floating_point() else v.dtype)
              for k, v in params.items()}
    return Distorted(images, theta, family, params, tuple(tps_grid))


def identity(upright: torch.Tensor, generator: torch.Generator | None = None) -> Distorted:
    """No distortion: the images themselves and the identity theta."""
    n, h, w = _check(upright)
    zero = torch.zeros(n, dtype=torch.float64)
    theta = placement_theta((h, w), (h, w), zero, zero + 1, zero, zero)
    return Distorted(upright.clone(), theta.to(device=upright.device, dtype=upright.dtype), "affine", {})


def rotate(upright: torch.Tensor, generator: torch.Generator, max_angle_deg: float = 90.0) -> Distorted:
    """R: rotation by U(-max, max) degrees about the centre, same canvas."""
    n, h, w = _check(upright)
    angle = _uniform(n, -math.radians(max_angle_deg), math.radians(max_angle_deg), generator)
    zero = torch.zeros(n, dtype=torch.float64)
    theta = placement_theta((h, w), (h, w), angle, zero + 1, zero, zero)
    return _finish(upright, theta, "affine", (h, w), {"angle": angle})


def rotate_translate_scale(upright: torch.Tensor, generator: torch.Generator, max_angle_deg: float = 45.0,
                           scale_range: tuple[float, float] = (0.7, 1.2),
                           canvas: frames.Size | None = None) -> Distorted:
    """RTS: rotation U(-45, 45) degrees, scale U(0.7, 1.2), random position on a 1.5x canvas."""
    n, h, w = _check(upright)
    canvas = tuple(canvas or canvas_size("RTS", (h, w)))
    angle = _uniform(n, -math.radians(max_angle_deg), math.radians(max_angle_deg), generator)
    scale = _uniform(n, scale_range[0], scale_range[1], generator)
    tx_max = (1.0 - scale * w / canvas[1]).clamp(min=0.0)
    ty_max = (1.0 - scale * h / canvas[0]).clamp(min=0.0)
    tx = (2.0 * torch.rand(n, generator=generator, dtype=torch.float64) - 1.0) * tx_max
    ty = (2.0 * torch.rand(n, generator=generator, dtype=torch.float64) - 1.0) * ty_max
    theta = placement_theta((h, w), canvas, angle, scale, tx, ty)
    return _finish(upright, theta, "affine", canvas, {"angle": angle, "scale": scale, "tx": tx, "ty": ty})


def homography_from_points(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """[N, 3, 3] homographies (H[2,2] = 1) mapping 4 points ``src`` [N, 4, 2] onto ``dst`` [N, 4, 2]."""
    if src.shape != dst.shape or src.dim() != 3 or src.shape[1:] != (4, 2):
        raise ValueError(f"src and dst must both be [N, 4, 2], got {list(src.shape)} and {list(dst.shape)}")
    src, dst = src.to(torch.float64), dst.to(torch.float64)
    x, y = src[..., 0], src[..., 1]
    u, v = dst[..., 0], dst[..., 1]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -x * u, -y * u], dim=-1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -x * v, -y * v], dim=-1)
    a = torch.cat([rows_u, rows_v], dim=1)  # [N, 8, 8]
    b = torch.cat([u, v], dim=1).unsqueeze(-1)
    h8 = torch.linalg.solve(a, b).squeeze(-1)
    return torch.cat([h8, torch.ones_like(h8[:, :1])], dim=1).reshape(-1, 3, 3)


def projective(upright: torch.Tensor, generator: torch.Generator, scale_range: tuple[float, float] = (0.75, 1.0),
               corner_std: float = 0.1) -> Distorted:
    """P: scale U(0.75, 1), then each corner jittered by N(0, 0.1) (normalized units), same canvas."""
    n, h, w = _check(upright)
    scale = _uniform(n, scale_range[0], scale_range[1], generator)
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    offsets = corner_std * torch.randn(n, 4, 2, generator=generator, dtype=torch.float64)
    landed = scale[:, None, None] * corners + offsets  # where the upright corners are in the distorted image
    theta = homography_from_points(landed, corners.expand(n, 4, 2))  # distorted -> upright
    return _finish(upright, theta, "projective", (h, w), {"scale": scale, "corner_offsets": offsets})


def elastic(upright: torch.Tensor, generator: torch.Generator, scale_range: tuple[float, float] = (0.75, 1.0),
            point_std: float = 0.1, grid: frames.Size = ELASTIC_GRID) -> Distorted:
    """E: a TPS on a 4x4 control grid: scale U(0.75, 1) and each point jittered by N(0, 0.1)."""
    n, h, w = _check(upright)
    ctrl = torch.from_numpy(frames.tps_control_points(grid))  # [K, 2], float64
    scale = _uniform(n, scale_range[0], scale_range[1], generator)
    offsets = point_std * torch.randn(n, len(ctrl), 2, generator=generator, dtype=torch.float64)
    theta = ctrl / scale[:, None, None] + offsets
    return _finish(upright, theta, "tps", (h, w), {"scale": scale, "point_offsets": offsets}, grid)


def translate_clutter(upright: torch.Tensor, generator: torch.Generator, canvas: frames.Size | None = None,
                      n_clutter: int = 6, clutter_size: int | None = None) -> Distorted:
    """TC: random position on a 60/28x canvas plus ``n_clutter`` patches cropped from other images."""
    n, h, w = _check(upright)
    canvas = tuple(canvas or canvas_size("TC", (h, w)))
    tx = (2.0 * torch.rand(n, generator=generator, dtype=torch.float64) - 1.0) * max(0.0, 1.0 - w / canvas[1])
    ty = (2.0 * torch.rand(n, generator=generator, dtype=torch.float64) - 1.0) * max(0.0, 1.0 - h / canvas[0])
    zero = torch.zeros(n, dtype=torch.float64)
    theta = placement_theta((h, w), canvas, zero, zero + 1, tx, ty)
    out = _finish(upright, theta, "affine", canvas, {"tx": tx, "ty": ty})
    p = max(1, min(h, w, clutter_size or round(6 * min(h, w) / 28)))
    k = n_clutter
    if k > 0:
        other = torch.randint(1, max(n, 2), (n, k), generator=generator) if n > 1 else torch.zeros(n, k, dtype=torch.long)
        source = (torch.arange(n)[:, None] + other) % n  # another image of the batch when there is one
        sy = torch.randint(0, h - p + 1, (n, k), generator=generator)
        sx = torch.randint(0, w - p + 1, (n, k), generator=generator)
        cy = torch.randint(0, canvas[0] - p + 1, (n, k), generator=generator)
        cx = torch.randint(0, canvas[1] - p + 1, (n, k), generator=generator)
        dev = upright.device
        ar = torch.arange(p)
        rows = (sy[..., None] + ar).to(dev)  # [N, k, p]
        cols = (sx[..., None] + ar).to(dev)
        patches = upright[source.to(dev)[:, :, None, None], :, rows[:, :, :, None], cols[:, :, None, :]]  # [N,k,p,p,C]
        c = upright.shape[1]
        values = patches.reshape(n, k * p * p, c).transpose(1, 2)
        flat = ((cy[..., None, None] + ar[:, None]) * canvas[1] + (cx[..., None, None] + ar[None, :])).reshape(n, -1)
        index = flat.to(dev)[:, None, :].expand(n, c, -1)
        images = out.images.reshape(n, c, -1).scatter_reduce(2, index, values, reduce="amax", include_self=True)
        out.images = images.reshape(n, c, *canvas)
        out.params.update({
            "clutter_source": source.to(dev),
            "clutter_source_xy": torch.stack([sx, sy], dim=-1).to(dev),
            "clutter_canvas_xy": torch.stack([cx, cy], dim=-1).to(dev),
        })
    return out


def distort(name: str, upright: torch.Tensor, generator: torch.Generator) -> Distorted:
    """The distortion called ``name`` (one of :data:`DISTORTIONS`) with its default parameters."""
    if name == "R":
        return rotate(upright, generator)
    if name == "RTS":
        return rotate_translate_scale(upright, generator)
    if name == "P":
        return projective(upright, generator)
    if name == "E":
        return elastic(upright, generator)
    if name == "TC":
        return translate_clutter(upright, generator)
    if name == "none":
        return identity(upright, generator)
    raise ValueError(f"unknown distortion {name!r}; choose one of {', '.join(DISTORTIONS)}")


__all__ = [
    "DISTORTIONS", "DISTORTION_FAMILY", "Distorted", "canvas_size", "warp", "placement_theta", "frame_theta",
    "homography_from_points", "identity", "rotate", "rotate_translate_scale", "projective", "elastic",
    "translate_clutter", "distort",
]
