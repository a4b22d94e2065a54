"""What the benchmarks measure on when they are given nothing: one stand-in model and one image generator.

``stn bench serve`` and ``stn bench batch`` both use them, so their numbers are on the same model and
the same kind of images. No torch here: the stand-in model is exported by a subprocess (``python -c``,
torch there only), once per folder.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
# an affine RGB STN with random localiser weights (near the identity): numbers that do not move with models/default
STANDIN = dict(transform="affine", in_channels=3, loc_size=(64, 64), output_size=(128, 128),
               mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
NAME = "standin"
_EXPORT = """
import sys, torch
from export.onnx_export import export_onnx, info_for
from models.checkpoint import save_checkpoint
from models.stn import SpatialTransformer, STNConfig
torch.manual_seed(0)
m = SpatialTransformer(STNConfig(**{cfg}))
torch.nn.init.normal_(m.localisation.regressor.weight, std=0.02)
export_onnx(m, sys.argv[1], info_for(m, {{}}, "onnx", {name!r}, "1", "service/standin.py"))
save_checkpoint(sys.argv[2], m, {{}})
"""


def description() -> str:
    return (f"stand-in: {STANDIN['transform']}, {STANDIN['in_channels']} channels, loc {STANDIN['loc_size']}, "
            f"output {STANDIN['output_size']}, random localiser weights")


def standin_model(folder: str | Path) -> tuple[Path, Path]:
    """The stand-in model in ``folder`` (``standin.onnx`` and its PyTorch checkpoint ``standin.pt``), exported
    the first time (needs torch, in a subprocess); (onnx path, checkpoint path)."""
    folder = Path(folder)
    onnx_path, ckpt = folder / f"{NAME}.onnx", folder / f"{NAME}.pt"
    if not (onnx_path.exists() and ckpt.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        code = _EXPORT.format(cfg=repr(STANDIN), name=NAME)
        subprocess.run([sys.executable, "-c", code, str(onnx_path), str(ckpt)], cwd=ROOT, check=True)
    return onnx_path, ckpt


def make_jpegs(n: int, width: int, height: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct photograph-like JPEGs (smooth noise plus shapes), quality 90."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = (rng.random((height // 8 + 1, width // 8 + 1, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(base).resize((width, height), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = rng.integers(0, width - 20), rng.integers(0, height - 20)
            draw.rectangle([x0, y0, x0 + rng.integers(10, width // 3), y0 + rng.integers(10, height // 3)],
                           outline=tuple(int(v) for v in rng.integers(0, 255, 3)), width=3)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out
