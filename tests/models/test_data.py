"""models.data: IDX reader/writer, IDX folders, image folders, dispatch and errors."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.data import (
    DEFAULT_DATA,
    FASHION_MNIST_CLASSES,
    DataError,
    find_idx_files,
    load_dataset,
    load_idx_folder,
    load_image_folder,
    read_idx,
    write_idx,
)


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_roundtrip(tmp_path: Path, suffix: str, dtype: type) -> None:
    array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    path = tmp_path / f"x-idx3-ubyte{suffix}"
    write_idx(path, array)
    raw = path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == (suffix == ".gz")
    back = read_idx(path)
    assert back.shape == (2, 3, 5) and back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, array)


def test_idx_header_bytes(tmp_path: Path) -> None:
    # The MNIST layout, byte for byte: magic 0x00000803, then big-endian dims.
    path = tmp_path / "t-images-idx3-ubyte"
    write_idx(path, np.zeros((1, 2, 3), np.uint8))
    assert path.read_bytes()[:16] == bytes([0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3])


def test_gzip_detected_by_content_not_name(tmp_path: Path) -> None:
    array = np.arange(10, dtype=np.uint8)
    gz = tmp_path / "labels.gz"
    write_idx(gz, array)
    renamed = tmp_path / "labels-idx1-ubyte"
    shutil.copy(gz, renamed)
    np.testing.assert_array_equal(read_idx(renamed), array)
    raw = tmp_path / "raw-but-named.gz"
    raw.write_bytes(gzip.decompress(gz.read_bytes()))
    np.testing.assert_array_equal(read_idx(raw), array)


def test_idx_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x89PNG....")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(DataError, match="5 bytes"):
        read_idx(short)
    broken = tmp_path / "broken.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match="gzipped"):
        read_idx(broken)
    with pytest.raises(ValueError, match="dtype"):
        write_idx(tmp_path / "u16", np.zeros(3, np.uint16))


def test_find_idx_files_names(tmp_path: Path) -> None:
    for name in ("train-images-idx3-ubyte.gz", "train-labels.idx1-ubyte", "test_images_idx3_ubyte",
                 "t10k-labels-idx1-ubyte.gz", "README", "train-images-idx3-ubyte.gz.bak"):
        (tmp_path / name).write_bytes(b"")
    found = find_idx_files(tmp_path)
    assert {k: v.name for k, v in found.items()} == {
        ("train", "images"): "train-images-idx3-ubyte.gz",
        ("train", "labels"): "train-labels.idx1-ubyte",
        ("test", "images"): "test_images_idx3_ubyte",
        ("test", "labels"): "t10k-labels-idx1-ubyte.gz",
    }


def test_load_idx_folder(tiny_idx: Path) -> None:
    splits = load_idx_folder(tiny_idx)
    assert splits.train.images.shape == (96, 1, 28, 28) and splits.train.images.dtype == np.uint8
    assert splits.test.images.shape == (24, 1, 28, 28)
    assert splits.train.labels.dtype == np.int64 and set(splits.train.labels) <= {0, 1, 2}
    assert splits.classes == ["0", "1", "2"]
    assert splits.labelled and splits.channels == 1 and splits.image_size == (28, 28)


def test_idx_class_names(tmp_path: Path, idx_dataset_writer) -> None:  # noqa: ANN001
    write_idx_dataset = idx_dataset_writer
    fashion = write_idx_dataset(tmp_path / "fashion-mnist", n_train=8, n_test=4)
    assert load_idx_folder(fashion).classes == FASHION_MNIST_CLASSES
    assert load_idx_folder(fashion).name == "fashion-mnist"
    named = write_idx_dataset(tmp_path / "mine", n_train=8, n_test=4)
    (named / "classes.txt").write_text("bar\ncolumn\nsquare\n")
    assert load_idx_folder(named).classes == ["bar", "column", "square"]
    (named / "classes.txt").write_text("bar\n")
    with pytest.raises(DataError, match="names 1 classes"):
        load_idx_folder(named)


def test_idx_folder_missing_files(tmp_path: Path, idx_dataset_writer) -> None:  # noqa: ANN001
    folder = idx_dataset_writer(tmp_path / "d", n_train=8, n_test=4)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing IDX files for test-labels"):
        load_dataset(folder)


def test_load_dataset_limits(tiny_idx: Path) -> None:
    splits = load_dataset(tiny_idx, limit_train=10, limit_test=5)
    assert len(splits.train) == 10 and len(splits.test) == 5
    full = load_idx_folder(tiny_idx)
    np.testing.assert_array_equal(splits.train.images, full.train.images[:10])
    with pytest.raises(DataError, match="limit_train"):
        load_dataset(tiny_idx, limit_train=0)
    with pytest.raises(DataError, match="image folders only"):
        load_dataset(tiny_idx, image_size=(32, 32))


def test_load_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        load_dataset(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no usable data"):
        load_dataset(tmp_path / "empty")


def _png(path: Path, size: tuple[int, int], mode: str = "L", value: int = 200) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size[1], size[0]), value if mode == "L" else (value, 10, 20)).save(path)


def test_image_folder_labelled(tmp_path: Path) -> None:
    for cls, n in (("cat", 6), ("ant", 4)):
        for i in range(n):
            _png(tmp_path / cls / f"{i}.png", (20, 30))
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "empty_dir").mkdir()
    splits = load_dataset(tmp_path)
    assert splits.classes == ["ant", "cat"]  # sorted subfolder names
    assert len(splits.train) + len(splits.test) == 10 and len(splits.test) == 1
    assert splits.train.images.shape[1:] == (1, 20, 30)
    all_labels = np.concatenate([splits.train.labels, splits.test.labels])
    assert sorted(all_labels.tolist()) == [0] * 4 + [1] * 6
    # The held-out split does not depend on anything but the folder.
    assert np.array_equal(load_dataset(tmp_path).test.labels, splits.test.labels)


def test_image_folder_resize_and_rgb(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "0.png", (20, 20))
    _png(tmp_path / "a" / "1.png", (40, 10), mode="RGB")
    _png(tmp_path / "b" / "0.png", (20, 20))
    splits = load_image_folder(tmp_path, image_size=(16, 24))
    assert splits.channels == 3 and splits.image_size == (16, 24)
    assert load_image_folder(tmp_path).image_size == (20, 20)  # the first image's size


def test_image_folder_unlabelled(tiny_upright_folder: Path) -> None:
    splits = load_dataset(tiny_upright_folder)
    assert splits.train.labels is None and splits.test.labels is None and not splits.labelled
    assert splits.classes == [] and len(splits.train) == 36 and len(splits.test) == 4
    assert splits.train.images.shape[1:] == (1, 28, 28) and splits.train.images.max() > 150


def test_image_folder_train_test_split(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("x", "y"):
            for i in range(n):
                _png(tmp_path / split / cls / f"{i}.png", (8, 8), value=50 + i)
    splits = load_dataset(tmp_path)
    assert len(splits.train) == 6 and len(splits.test) == 4 and splits.classes == ["x", "y"]
    (tmp_path / "test" / "z").mkdir()
    _png(tmp_path / "test" / "z" / "0.png", (8, 8))
    with pytest.raises(DataError, match=r"classes \['z'\]"):
        load_dataset(tmp_path)


def test_image_folder_unreadable_image(tmp_path: Path) -> None:
    _png(tmp_path / "0.png", (8, 8))
    (tmp_path / "1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image"):
        load_dataset(tmp_path)


@pytest.mark.skipif(not Path(DEFAULT_DATA).is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_installed() -> None:
    splits = load_dataset(DEFAULT_DATA, limit_train=100, limit_test=100)
    assert splits.name == "fashion-mnist" and splits.classes == FASHION_MNIST_CLASSES
    assert splits.train.images.shape == (100, 1, 28, 28)
