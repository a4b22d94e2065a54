"""The sampler: one PyTorch custom operator, ``stn::grid_sample``.

Semantics are exactly ``torch.nn.functional.grid_sample`` (input [N,C,H,W], grid
[N,h,w,2] of normalized (x, y), see ``models.frames`` for the convention). It is a
``torch.library`` custom op so that the ONNX exporter picks its lowering
(``export.lowerings``) instead of whatever torch would decompose it to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("bilinear", "nearest", "bicubic")
PADDING_MODES = ("zeros", "border", "reflection")
_MODE_ENUM = {"bilinear": 0, "nearest": 1, "bicubic": 2}
_PADDING_ENUM = {"zeros": 0, "border": 1, "reflection": 2}


def check_sampler_options(mode: str, padding_mode: str) -> None:
    """Raise ValueError naming the valid choices when mode or padding_mode is unknown."""
    if mode not in MODES:
        raise ValueError(f"unknown interpolation mode {mode!r}; choose one of {', '.join(MODES)}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"unknown padding mode {padding_mode!r}; choose one of {', '.join(PADDING_MODES)}")


@torch.library.custom_op("stn::grid_sample", mutates_args=())
def _grid_sample_op(
    image: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str, align_corners: bool
) -> torch.Tensor:
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


@_grid_sample_op.register_fake
def _(image: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str, align_corners: bool) -> torch.Tensor:
    return image.new_empty((image.shape[0], image.shape[1], grid.shape[1], grid.shape[2]))


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    image, grid, mode, padding_mode, align_corners = inputs
    ctx.save_for_backward(image, grid)
    ctx.options = (_MODE_ENUM[mode], _PADDING_ENUM[padding_mode], align_corners)


def _backward(ctx, grad_output: torch.Tensor):  # noqa: ANN001, ANN202
    image, grid = ctx.saved_tensors
    mode, padding, align_corners = ctx.options
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    if not any(mask):
        return None, None, None, None, None
    grad_image, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
        grad_output.contiguous(), image, grid, mode, padding, align_corners, mask
    )
    return (grad_image if mask[0] else None), (grad_grid if mask[1] else None), None, None, None


_grid_sample_op.register_autograd(_backward, setup_context=_setup_context)


def grid_sample(
    image: torch.Tensor,
    grid: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> torch.Tensor:
    """Sample ``image`` [N,C,H,W] at ``grid`` [N,h,w,2] (normalized x, y) -> [N,C,h,w]."""
    check_sampler_options(mode, padding_mode)
    if image.dim() != 4:
        raise ValueError(f"image must be [N,C,H,W], got shape {list(image.shape)}")
    if grid.dim() != 4 or grid.shape[-1] != 2:
        raise ValueError(f"grid must be [N,h,w,2], got shape {list(grid.shape)}")
    if grid.shape[0] != image.shape[0]:
        raise ValueError(f"grid batch {grid.shape[0]} != image batch {image.shape[0]}")
    if image.dtype != grid.dtype:
        grid = grid.to(image.dtype)
    return _grid_sample_op(image, grid, mode, padding_mode, align_corners)
