"""Fixtures for tests/models: tiny datasets written by the tests themselves (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.data import write_idx


def make_shapes(n: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images [n, size, size] of 3 easy classes (horizontal bar, vertical bar, square), jittered."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size), np.uint8)
    labels = rng.integers(0, 3, n).astype(np.uint8)
    c = size // 2
    for i, label in enumerate(labels):
        dy, dx = rng.integers(-2, 3, 2)
        value = rng.integers(180, 256)
        if label == 0:
            images[i, c - 2 + dy : c + 2 + dy, c - 9 + dx : c + 9 + dx] = value
        elif label == 1:
            images[i, c - 9 + dy : c + 9 + dy, c - 2 + dx : c + 2 + dx] = value
        else:
            images[i, c - 6 + dy : c + 6 + dy, c - 6 + dx : c + 6 + dx] = value
            images[i, c - 2 + dy : c + 2 + dy, c - 2 + dx : c + 2 + dx] = 0
    return images, labels


def write_idx_dataset(folder: Path, n_train: int = 96, n_test: int = 24, gz_train: bool = True,
                      gz_test: bool = False) -> Path:
    """An MNIST-format folder: train files gzipped, test files raw (by default)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, gz, seed in (("train", n_train, gz_train, 0), ("t10k", n_test, gz_test, 1)):
        images, labels = make_shapes(n, seed)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels)
    return folder


@pytest.fixture(scope="session")
def tiny_idx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny learnable IDX dataset (3 classes, 96 train / 24 test, 28 x 28)."""
    return write_idx_dataset(tmp_path_factory.mktemp("tiny_idx"))


@pytest.fixture(scope="session")
def tiny_upright_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A flat folder of upright PNGs (unlabelled): what a rectify-mode user has."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("upright")
    images, _ = make_shapes(40, seed=2)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"img{i:03d}.png")
    return folder


@pytest.fixture
def idx_dataset_writer():  # noqa: ANN201
    """``write_idx_dataset(folder, n_train=96, n_test=24, gz_train=True, gz_test=False) -> folder``."""
    return write_idx_dataset
