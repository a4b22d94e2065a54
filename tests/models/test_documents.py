"""The document rectifier's pieces: synthetic photos, the corner parametrisation, training, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from models import document_train as dt
from models import documents as docs
from models import frames
from models.sampler import grid_sample
from models.stn import SpatialTransformer, STNConfig
from models.train import ConfigError, TrainConfig, train
from models.transforms import make_transform, square_to_quad

ROOT = Path(__file__).resolve().parents[2]


def _small_generator(split: str = "train", seed: int = 3, **kw) -> docs.DocumentGenerator:
    options = dict(page_width=96, pool_pages=4, pool_backgrounds=2, photo_long_side=(360, 360), touch_border=0.0)
    return docs.DocumentGenerator(split, seed=seed, **{**options, **kw})


def _flatten(photo: np.ndarray, theta: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    fam = make_transform("projective")
    x = torch.from_numpy(photo.copy()).permute(2, 0, 1)[None].float() / 255
    return grid_sample(x, fam.grid(theta, fam.base_grid(size)))[0].permute(1, 2, 0).numpy()


def test_sampling_the_composite_with_the_true_theta_gives_back_the_page() -> None:
    """The generator's homography is the page's: flattening with it reproduces the page.

    Tolerance: the page went through two bilinear resamplings (page -> photo, photo -> page)
    and uint8 rounding, which blur the edges of its 6-pixel text; after the same Gaussian
    (sigma 1.5 px) on both sides, what is left is under 1.2 % of full scale on average and 5 %
    at the 99th percentile. A corner moved by 1 % of the page's width (0.02 normalized) at
    least doubles the error, so the check sees a geometric error of that size.
    """
    gen = _small_generator()

    def blur(a: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(a, (0, 0), 1.5)[3:-3, 3:-3]

    ratios = []
    for _ in range(6):
        d = gen(effects=False)
        page = d.page.astype(np.float32) / 255
        err = np.abs(blur(_flatten(d.photo, torch.from_numpy(d.theta()).float()[None], d.page.shape[:2])) - blur(page))
        assert err.mean() < 0.012 and np.percentile(err, 99) < 0.05, (err.mean(), np.percentile(err, 99))
        moved = torch.from_numpy(docs.corners_norm(d.corners, d.photo_size)).float()[None]
        moved[0, 0, 0] += 0.02
        err_moved = np.abs(blur(_flatten(d.photo, square_to_quad(moved), d.page.shape[:2])) - blur(page))
        ratios.append(err_moved.mean() / err.mean())
    assert min(ratios) > 2.0, ratios


def test_theta_maps_the_output_corners_to_the_page_corners() -> None:
    gen = _small_generator(touch_border=1.0)  # pages touching the border too
    for _ in range(5):
        d = gen()
        corners = docs.corners_norm(d.corners, d.photo_size)
        # (the homography is OpenCV's float32 solve: exact to about 1e-7 of the photo)
        np.testing.assert_allclose(frames.warp_points(d.theta(), np.array(frames.OUTPUT_CORNERS)), corners, atol=1e-6)
        np.testing.assert_allclose(docs.corners_px(corners, d.photo_size), d.corners, atol=1e-9)
        # the same corners through the pixel-matrix convention (outer corners of the output grid)
        m = frames.input_px_from_output_px(d.theta(), d.photo_size, (424, 300))
        grid_corners = np.array([[-0.5, -0.5, 1], [299.5, -0.5, 1], [299.5, 423.5, 1], [-0.5, 423.5, 1]]) @ m.T
        np.testing.assert_allclose(grid_corners[:, :2] / grid_corners[:, 2:], d.corners, atol=1e-3)
        assert abs(d.angle) <= 40.0


def test_generator_varies_what_it_should() -> None:
    gen = _small_generator(photo_long_side=(160, 240), touch_border=0.0, pool_pages=12)
    photos = [gen() for _ in range(40)]
    assert len({p.kind for p in photos}) >= 2 and {p.kind for p in photos} <= set(docs.PAGE_ASPECTS)
    for p in photos:
        assert p.photo.dtype == np.uint8 and p.photo.shape[2] == 3 and 160 <= max(p.photo.shape[:2]) <= 240
        h, w = p.photo_size
        assert (p.corners >= -0.5).all() and (p.corners[:, 0] <= w).all() and (p.corners[:, 1] <= h).all()
    angles = np.array([p.angle for p in photos])
    assert angles.min() < -15 and angles.max() > 15
    touching = _small_generator(photo_long_side=(160, 160), touch_border=1.0)
    outside = [((touching().corners < 0) | (touching().corners > 160)).any() for _ in range(20)]
    assert any(outside)


def test_held_out_content_is_disjoint() -> None:
    fonts = docs.find_fonts()
    assert fonts, "no TrueType fonts found (fc-list); the generator would fall back to Pillow's default"
    train_fonts, test_fonts = set(docs.split_fonts(fonts, "train")), set(docs.split_fonts(fonts, "test"))
    assert train_fonts and test_fonts and not train_fonts & test_fonts
    rng = np.random.default_rng(0)
    train_words, test_words = set(docs.word_source("train", rng)), set(docs.word_source("test", rng))
    assert len(train_words & test_words) < 0.02 * len(test_words)  # other sources; a few short tokens coincide
    a = docs.DocumentGenerator("train", seed=0, pool_pages=1, pool_backgrounds=1)
    b = docs.DocumentGenerator("test", seed=0, pool_pages=1, pool_backgrounds=1)
    assert not np.array_equal(a._backgrounds[0], b._backgrounds[0])


def test_user_folders_split_and_errors(tmp_path: Path) -> None:
    pages = tmp_path / "pages"
    pages.mkdir()
    for i in range(12):
        Image.fromarray(np.full((60, 40, 3), 200 + i, np.uint8)).save(pages / f"p{i:02d}.png")
    train_files, test_files = docs.split_files(pages, "train", "pages"), docs.split_files(pages, "test", "pages")
    assert len(test_files) == 2 and len(train_files) == 10 and not set(train_files) & set(test_files)
    gen = docs.DocumentGenerator("train", seed=0, pages=pages, pool_pages=8, pool_backgrounds=1)
    assert any(k == "folder" for _, k in gen._pages)
    with pytest.raises(docs.DocumentDataError, match="not a folder"):
        docs.split_files(tmp_path / "missing", "train", "pages")
    (tmp_path / "empty").mkdir()
    with pytest.raises(docs.DocumentDataError, match="no images"):
        docs.split_files(tmp_path / "empty", "train", "backgrounds")


def test_square_to_quad_maps_the_output_corners_exactly_and_starts_at_identity() -> None:
    fam = make_transform("projective", parametrisation="corners")
    torch.testing.assert_close(fam.theta_from_params(torch.zeros(3, 8)), torch.eye(3).expand(3, 3, 3))
    g = torch.Generator().manual_seed(0)
    square = torch.tensor(frames.OUTPUT_CORNERS, dtype=torch.float64)
    for _ in range(20):
        offsets = (torch.rand(4, 8, generator=g, dtype=torch.float64) - 0.5) * 0.8
        theta = fam.theta_from_params(offsets)
        xyz = torch.cat([square, torch.ones(4, 1, dtype=torch.float64)], 1) @ theta.transpose(1, 2)
        torch.testing.assert_close(xyz[..., :2] / xyz[..., 2:], fam.corners(offsets), atol=1e-12, rtol=0)
    # the same homography as OpenCV's linear solve
    quad = np.array([[-0.7, -0.9], [0.8, -0.6], [0.9, 0.7], [-0.8, 0.95]])
    ref = cv2.getPerspectiveTransform(square.numpy().astype(np.float32), quad.astype(np.float32))
    ours = square_to_quad(torch.from_numpy(quad)[None])[0].numpy()
    np.testing.assert_allclose(ours / ours[2, 2], ref / ref[2, 2], atol=1e-6)
    with pytest.raises(ValueError, match=r"\[N, 4, 2\]"):
        square_to_quad(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="projective"):
        make_transform("affine", parametrisation="corners")


def test_corner_stn_config_and_gradients() -> None:
    with pytest.raises(ValueError, match="projective"):
        STNConfig(transform="affine", parametrisation="corners")
    with pytest.raises(ValueError, match="loc_net"):
        STNConfig(loc_net="huge")
    cfg = dt.stn_config(loc_size=(64, 64), output_size=(42, 30))
    stn = SpatialTransformer(cfg)
    x = torch.rand(2, 3, 90, 70)
    rect, theta = stn(x)
    assert rect.shape == (2, 3, 42, 30) and theta.shape == (2, 3, 3)
    torch.testing.assert_close(theta, torch.eye(3).expand(2, 3, 3))  # starts at the identity
    torch.nn.init.normal_(stn.localisation.regressor.weight, std=0.01)
    rect, theta = stn(x)
    rect.mean().backward()
    assert all(p.grad is not None for p in stn.localisation.parameters())


@pytest.mark.slow
def test_short_training_reduces_corner_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dt, "TRAIN_PHOTO_SIDES", (96, 128))
    config = TrainConfig(mode="rectify", distortion="document", transform="projective", steps=60, batch_size=16,
                         lr=2e-3, loc_size=(32, 32), output_size=(42, 30), limit_test=48, threads=2, workers=0,
                         progress=False, out=str(tmp_path / "run"), created_by="test")
    result = train(config)
    m = result.metrics
    assert m["steps"] == 60 and m["test_examples"] == 48
    assert m["corner_error_median"] < 0.75 * m["identity_corner_error_median"], m
    assert set(m["corner_error_by_rotation"]) <= {"0-10", "10-20", "20-30", "30-45"}
    assert np.mean(result.history[-10:]) < np.mean(result.history[:10])
    for f in ("checkpoint", "metrics", "sheet"):
        assert Path(result.files[f]).stat().st_size > 0
    from models.checkpoint import load_checkpoint

    stn = load_checkpoint(result.files["checkpoint"]).build_stn()
    assert stn.config.parametrisation == "corners" and stn.config.loc_net == "deep"


def test_document_config_errors() -> None:
    with pytest.raises(ConfigError, match="--mode rectify --transform projective"):
        train(TrainConfig(mode="rectify", distortion="document", transform="affine"))
    with pytest.raises(ConfigError, match="for --distortion document"):
        train(TrainConfig(mode="rectify", distortion="RTS", pages="x"))


def test_cli_reports_a_bad_pages_folder(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "stn", "train", "--mode", "rectify", "--distortion", "document",
                           "--transform", "projective", "--pages", str(tmp_path / "nope"), "--steps", "1",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "--pages" in proc.stderr and "not a folder" in proc.stderr, proc.stderr


def test_document_named_once() -> None:
    from models import cli
    from models import train as train_module

    assert cli.DOCUMENT == docs.DISTORTION == train_module.DOCUMENT
