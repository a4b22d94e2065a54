"""Datasets for training: MNIST-format IDX folders and plain image folders. Nothing is downloaded.

Both loaders return an :class:`ImageSplits`: a train and a test :class:`ImageSet` of uint8
images ``[N, C, H, W]`` (numpy; the trainer turns them into float in [0, 1]) with int64
labels, or ``labels=None`` for an unlabelled folder (self-supervised rectification).

- **IDX folder** (MNIST, Fashion-MNIST, Debian's ``dataset-fashion-mnist`` at
  ``/usr/share/datasets/fashion-mnist``): ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
  gzipped or not (``.gz`` is recognised by its magic bytes, not its name); ``test-`` works
  for ``t10k-`` and ``.`` or ``_`` for ``-``. Class names come from a ``classes.txt`` beside
  the files (one per line), else the Fashion-MNIST names when the folder path says
  "fashion", else ``"0"`` ... ``"9"``.
- **Image folder**: ``ROOT/<class>/*.png`` is labelled (class = subfolder name, sorted);
  ``ROOT/*.png`` is unlabelled. ``ROOT/train/...`` plus ``ROOT/test/...`` (or ``val``) are
  used as the split; otherwise a fixed 10 % of the images (seeded independently of the
  training seed) is held out for testing. Every image is resized to ``image_size``
  (default: the first image's size) and converted to grayscale when all images are
  grayscale, RGB otherwise.

Distortions pad with 0, so images should have a dark background (as MNIST does).
"""

from __future__ import annotations

import gzip
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")

# IDX type code -> numpy dtype (big-endian, as the format stores them)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_NAME = re.compile(r"^(train|t10k|test)[-_.](images|labels)[-_.](idx[13])[-_.]ubyte$")


class DataError(ValueError):
    """The data path cannot be used; the message says why and what was expected."""


@dataclass
class ImageSet:
    """Images ``[N, C, H, W]`` uint8 and their labels ``[N]`` int64 (None when unlabelled)."""

    images: np.ndarray
    labels: np.ndarray | None

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(f"images must be [N, C, H, W], got shape {list(self.images.shape)}")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    def head(self, n: int | None) -> ImageSet:
        """The first ``n`` examples (all when n is None)."""
        if n is None:
            return self
        return ImageSet(self.images[:n], None if self.labels is None else self.labels[:n])


@dataclass
class ImageSplits:
    train: ImageSet
    test: ImageSet
    classes: list[str]  # class names, index = label; empty when unlabelled
    name: str  # short dataset name, e.g. "fashion-mnist"
    source: str  # the path it was read from

    @property
    def labelled(self) -> bool:
        return self.train.labels is not None

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train.images.shape[2]), int(self.train.images.shape[3])


# ---------------------------------------------------------------------------------------- IDX


def _open_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path} looks gzipped but does not decompress: {e}") from None
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped or raw) into a numpy array of its stored shape and type."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file {path} does not exist")
    data = _open_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    count = int(np.prod(shape)) if shape else 1
    if len(data) - header != count * dtype.itemsize:
        raise DataError(
            f"{path}: IDX header says shape {list(shape)} ({count * dtype.itemsize} bytes) "
            f"but the file holds {len(data) - header} bytes of data"
        )
    return np.frombuffer(data, dtype, count=count, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzipped when the name ends in ``.gz``)."""
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"IDX cannot store dtype {array.dtype}; use one of uint8, int8, int16, int32, float32, float64")
    header = bytes([0, 0, codes[native], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = header + array.astype(np.dtype(_IDX_DTYPES[codes[native]])).tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(payload) if path.name.endswith(".gz") else payload)


def find_idx_files(folder: str | Path) -> dict[tuple[str, str], Path]:
    """IDX files of a folder by (split, kind): split "train"/"test", kind "images"/"labels"."""
    found: dict[tuple[str, str], Path] = {}
    folder = Path(folder)
    if not folder.is_dir():
        return found
    for p in sorted(folder.iterdir()):
        name = p.name.lower()
        name = name[:-3] if name.endswith(".gz") else name
        m = _IDX_NAME.match(name)
        if m and p.is_file():
            split = "train" if m.group(1) == "train" else "test"
            found.setdefault((split, m.group(2)), p)
    return found


def _idx_classes(folder: Path, n_classes: int) -> tuple[list[str], str]:
    listing = folder / "classes.txt"
    lower = str(folder.resolve()).lower()
    name = "fashion-mnist" if "fashion" in lower else "mnist" if "mnist" in lower else folder.resolve().name
    if listing.is_file():
        classes = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if len(classes) < n_classes:
            raise DataError(f"{listing} names {len(classes)} classes but the labels go up to {n_classes - 1}")
        return classes, name
    if "fashion" in lower and n_classes <= len(FASHION_MNIST_CLASSES):
        return list(FASHION_MNIST_CLASSES), name
    return [str(i) for i in range(n_classes)], name


def _as_nchw(images: np.ndarray, path: Path) -> np.ndarray:
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4:
        raise DataError(f"{path}: expected images [N, H, W] (or [N, H, W, C]), got shape {list(images.shape)}")
    if images.dtype != np.uint8:
        raise DataError(f"{path}: expected uint8 pixels, got {images.dtype}")
    return np.ascontiguousarray(images)


def load_idx_folder(folder: str | Path) -> ImageSplits:
    """Read an MNIST-format folder (train + test images and labels)."""
    folder = Path(folder)
    files = find_idx_files(folder)
    missing = [f"{s}-{k}" for s in ("train", "test") for k in ("images", "labels") if (s, k) not in files]
    if missing:
        raise DataError(
            f"{folder} is missing IDX files for {', '.join(missing)} (expected e.g. train-images-idx3-ubyte[.gz], "
            "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz])"
        )
    sets = {}
    for split in ("train", "test"):
        images = _as_nchw(read_idx(files[(split, "images")]), files[(split, "images")])
        labels = read_idx(files[(split, "labels")])
        if labels.ndim != 1:
            raise DataError(f"{files[(split, 'labels')]}: expected labels [N], got shape {list(labels.shape)}")
        sets[split] = ImageSet(images, labels.astype(np.int64))
    if sets["train"].images.shape[1:] != sets["test"].images.shape[1:]:
        raise DataError(f"{folder}: train images {sets['train'].images.shape[1:]} and test images "
                        f"{sets['test'].images.shape[1:]} differ in shape")
    n_classes = int(max(sets["train"].labels.max(initial=0), sets["test"].labels.max(initial=0))) + 1
    classes, name = _idx_classes(folder, n_classes)
    return ImageSplits(sets["train"], sets["test"], classes, name, str(folder))


# --------------------------------------------------------------------------------- image folder


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".") and _images_in(d))


def _scan(folder: Path) -> tuple[list[Path], list[int] | None, list[str]]:
    """Image paths, labels (None when unlabelled) and class names of one folder."""
    dirs = _class_dirs(folder)
    if dirs:
        paths, labels = [], []
        for i, d in enumerate(dirs):
            for p in _images_in(d):
                paths.append(p)
                labels.append(i)
        return paths, labels, [d.name for d in dirs]
    return _images_in(folder), None, []


def _read_images(paths: list[Path], size: tuple[int, int], channels: int) -> np.ndarray:
    from PIL import Image

    out = np.zeros((len(paths), channels, size[0], size[1]), np.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                if im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                arr = np.asarray(im)
        except OSError as e:
            raise DataError(f"cannot read image {p}: {e}") from None
        out[i] = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return out


def _probe(paths: list[Path]) -> tuple[tuple[int, int], int]:
    """(h, w) of the first image, and 1 channel if every image is grayscale else 3."""
    from PIL import Image

    size, channels = None, 1
    for p in paths:
        try:
            with Image.open(p) as im:
                if size is None:
                    size = (im.height, im.width)
                gray = im.mode in ("1", "L", "LA", "I", "I;16", "F") or (
                    im.mode == "P" and all(r == g == b for r, g, b in _palette_rgb(im))
                )
        except OSError as e:
            raise DataError(f"cannot read image {p}: {e}") from None
        if not gray:
            channels = 3
    return size, channels


def _palette_rgb(im) -> list[tuple[int, int, int]]:  # noqa: ANN001
    pal = im.getpalette() or []
    return [tuple(pal[i : i + 3]) for i in range(0, len(pal) - 2, 3)]


def load_image_folder(folder: str | Path, image_size: tuple[int, int] | None = None,
                      test_fraction: float = 0.1, split_seed: int = 0) -> ImageSplits:
    """Read a folder of images (class subfolders, or flat for unlabelled data); see the module doc."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist")
    sub = {d.name.lower(): d for d in folder.iterdir() if d.is_dir()}
    test_dir = sub.get("test") or sub.get("val")
    if "train" in sub and test_dir is not None:
        tr_paths, tr_labels, classes = _scan(sub["train"])
        te_paths, te_labels, te_classes = _scan(test_dir)
        if te_classes and te_classes != classes:
            unknown = sorted(set(te_classes) - set(classes))
            if unknown:
                raise DataError(f"{test_dir} has classes {unknown} that {sub['train']} does not have")
            remap = [classes.index(c) for c in te_classes]
            te_labels = [remap[i] for i in te_labels]
        if (tr_labels is None) != (te_labels is None):
            raise DataError(f"{sub['train']} and {test_dir} must both have class subfolders, or neither")
    else:
        paths, labels, classes = _scan(folder)
        if len(paths) < 2:
            raise DataError(
                f"{folder} holds no usable data: expected IDX files (train-images-idx3-ubyte[.gz], ...), "
                f"class subfolders of images, or at least 2 images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        order = np.random.default_rng(split_seed).permutation(len(paths))
        n_test = min(max(1, round(test_fraction * len(paths))), len(paths) - 1)
        te, tr = sorted(order[:n_test]), sorted(order[n_test:])
        tr_paths, te_paths = [paths[i] for i in tr], [paths[i] for i in te]
        tr_labels = None if labels is None else [labels[i] for i in tr]
        te_labels = None if labels is None else [labels[i] for i in te]
    if not tr_paths or not te_paths:
        raise DataError(f"{folder}: need at least one training and one test image")
    probed_size, channels = _probe(tr_paths + te_paths)
    size = tuple(int(s) for s in (image_size or probed_size))
    train = ImageSet(_read_images(tr_paths, size, channels), None if tr_labels is None else np.asarray(tr_labels, np.int64))
    test = ImageSet(_read_images(te_paths, size, channels), None if te_labels is None else np.asarray(te_labels, np.int64))
    log.info("read %d train / %d test images of %dx%dx%d from %s", len(train), len(test), channels, *size, folder)
    return ImageSplits(train, test, classes, folder.resolve().name, str(folder))


# ------------------------------------------------------------------------------------ dispatch


def load_dataset(path: str | Path = DEFAULT_DATA, image_size: tuple[int, int] | None = None,
                 limit_train: int | None = None, limit_test: int | None = None) -> ImageSplits:
    """An IDX folder or an image folder, whichever ``path`` is; DataError saying why otherwise.

    ``image_size`` resizes image folders (IDX data keeps its stored size; asking for another
    size is an error). ``limit_*`` keep the first N examples of each split.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist (expected an IDX folder such as {DEFAULT_DATA}, "
                        "or a folder of images)")
    if not path.is_dir():
        raise DataError(f"data path {path} is a file; give the folder that holds the IDX files or images")
    for name, n in (("limit_train", limit_train), ("limit_test", limit_test)):
        if n is not None and n < 1:
            raise DataError(f"{name} must be >= 1, got {n}")
    if find_idx_files(path):
        splits = load_idx_folder(path)
        if image_size is not None and tuple(image_size) != splits.image_size:
            raise DataError(f"{path} holds {splits.image_size[0]}x{splits.image_size[1]} IDX images; "
                            f"image_size {tuple(image_size)} applies to image folders only")
    else:
        splits = load_image_folder(path, image_size)
    splits.train, splits.test = splits.train.head(limit_train), splits.test.head(limit_test)
    return splits


__all__ = [
    "DEFAULT_DATA", "FASHION_MNIST_CLASSES", "DataError", "ImageSet", "ImageSplits", "read_idx", "write_idx",
    "find_idx_files", "load_idx_folder", "load_image_folder", "load_dataset",
]
