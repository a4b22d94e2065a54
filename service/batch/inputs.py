"""INPUT -> the job's items: a folder, a glob, a manifest or one image; local paths or fsspec URIs.

Local paths (and ``file://`` URIs) are walked with ``os``, so symlinks can be checked: nothing outside the
input root is read and no output leaves OUTPUT. Any other URI (``s3://``, ``gs://``, ``memory://``, ...) is
listed and read through fsspec (``fsspec.core.url_to_fs``); object stores have no symlinks and no ``..``.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import posixpath
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import fsspec

from service import images

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")  # what a folder or glob picks up
MANIFEST_SUFFIXES = (".txt", ".lst", ".csv", ".jsonl")  # one path per line; CSV / JSONL with a `path` column
STATE_DIR = ".stn-batch"  # inside OUTPUT: job.json, journal.jsonl, journal/, tmp/ (never an output path)
RESULTS, ERRORS, SKIPPED = "results.jsonl", "errors.jsonl", "skipped.jsonl"
REPORTS = (RESULTS, ERRORS, SKIPPED)


class BatchError(RuntimeError):
    """A job that cannot start (no model, no input, OUTPUT holds another job); the message says what to do."""


def is_uri(spec: str | os.PathLike) -> bool:
    """A URI that fsspec reads (``s3://...``, ``memory://...``); ``file://`` and plain paths are local."""
    text = os.fspath(spec)
    return "://" in text and not text.startswith("file://")


def local_path(spec: str | os.PathLike) -> str:
    """A local path (``file://`` stripped)."""
    text = os.fspath(spec)
    return text[len("file://"):] if text.startswith("file://") else text


def url_to_fs(uri: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of a URI; BatchError naming the protocol when fsspec has none for it."""
    try:
        return fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        raise BatchError(f"{uri}: fsspec cannot open it ({e}); install the filesystem's package (s3fs, gcsfs, ...)") \
            from None


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def open_binary(path: str) -> tuple[IO[bytes], int]:
    """An open file and its size, local path or URI.

    A local path must be a regular file (OSError naming what it is otherwise): opening a named pipe waits for a
    writer for ever, and a device such as /dev/zero never ends. The open does not block (``O_NONBLOCK``), and the
    kind is read from the open file, so a file swapped for a pipe after it was listed is caught too."""
    if is_uri(path):
        fs, p = url_to_fs(path)
        return fs.open(p, "rb"), int(fs.size(p))
    fd = os.open(local_path(path), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((what for test, what in _KINDS if test(st.st_mode)), "not a regular file")
            raise OSError(f"{kind}, not a regular file; not read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def read_image(path: str, limits: images.Limits, name: str) -> images.Decoded:
    """Read and decode one file (local path or URI) in its own colour, size checked before reading and while
    reading (a file still being written); ``images.ImageError`` or ``OSError`` on failure."""
    f, size = open_binary(path)
    with f:
        images.check_bytes(size, limits, name)
        data = f.read(limits.max_bytes + 1)
    images.check_bytes(len(data), limits, name)
    return images.decode(data, limits, name)


@dataclass(frozen=True)
class Item:
    """One image of the job."""

    source: str  # path relative to the input root, POSIX separators: the key of the job and `source` in the reports
    path: str  # what is read: an absolute local path, or a URI
    output: str  # path of the rectified image relative to OUTPUT, POSIX separators


@dataclass
class Inputs:
    """What INPUT names: the images, entries refused before reading (errors.jsonl), files that are not images
    (skipped.jsonl)."""

    root: str  # sources are relative to it; no file outside it is read (a local path or a URI)
    items: list[Item]
    rejected: list[dict[str, str]] = field(default_factory=list)  # {"source": ..., "error": ...}
    not_images: list[str] = field(default_factory=list)  # sources of files a folder or glob holds that are not images


def is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def manifest_entries(f: IO[str], name: str) -> Iterator[str]:
    """Paths listed by a manifest, read line by line (never whole): one per line (.txt, .lst; ``#`` comments), or
    the ``path`` column (.csv, .jsonl)."""
    suffix = posixpath.splitext(name)[1].lower()
    if suffix == ".csv":
        reader = csv.DictReader(f)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise BatchError(f"{name}: a CSV manifest needs a `path` column (has: {reader.fieldnames})")
        for row in reader:
            if (row.get("path") or "").strip():
                yield row["path"].strip()
        return
    for n, line in enumerate(f, 1):
        if suffix == ".jsonl":
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BatchError(f"{name}:{n}: not JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("path"), str):
                raise BatchError(f"{name}:{n}: each line must be an object with a string `path`")
            yield row["path"].strip()
        elif (s := line.strip()) and not s.startswith("#"):
            yield s


def _glob_root(pattern: str) -> str:
    """The folder before the first wildcard of a glob."""
    fixed = []
    for p in pattern.split("/"):
        if glob.has_magic(p):
            break
        fixed.append(p)
    return "/".join(fixed) or "."


def assign_outputs(sources: dict[str, str], fmt: str) -> list[Item]:
    """Items sorted by source; outputs mirror sources with the format's suffix (``a/b.jpg`` -> ``a/b.png``), and
    where two sources would share one (``b.jpg``, ``b.png``) or one would be a report, both keep their full name
    (``b.jpg.png``)."""
    suffix = images.suffix(fmt)
    plain = {s: posixpath.splitext(s)[0] + suffix for s in sources}
    counts: dict[str, int] = {}
    for o in plain.values():
        counts[o] = counts.get(o, 0) + 1
    items = []
    for s in sorted(sources):
        o = plain[s]
        if counts[o] > 1 or o in REPORTS:
            o = s + suffix
        items.append(Item(s, sources[s], o))
    return items


def resolve_inputs(spec: str | os.PathLike, output: str | os.PathLike, fmt: str = "png",
                   input_root: str | os.PathLike | None = None) -> Inputs:
    """INPUT -> the job's items, sorted by source.

    INPUT is a folder (walked recursively; files with an image suffix), a manifest (``.txt``/``.lst``:
    one path per line, ``#`` comments; ``.csv``/``.jsonl``: a ``path`` column; relative paths are
    relative to the manifest's folder), a single image, or a glob (``**`` recurses); a local path or a URI.

    The input root (``input_root``, default: the folder, the manifest's folder, or the glob's fixed
    prefix) is what sources and outputs are relative to. An entry outside it, lexically (``..``) or
    through a symlink, is refused (errors.jsonl), so no output path can leave OUTPUT and no file
    outside the root is read. Files inside OUTPUT are ignored; symlinked folders are not followed.
    Files of a folder or glob without an image suffix are listed in ``Inputs.not_images``.
    """
    if is_uri(spec):
        return _resolve_uri(os.fspath(spec), fmt, input_root)
    spec_s = local_path(spec)
    p = Path(spec_s)
    out_real = None if is_uri(output) else os.path.realpath(local_path(output))

    def in_output(path: str) -> bool:
        return out_real is not None and is_within(path, out_real)

    entries: list[str] = []  # paths to read (relative to the current folder, or absolute)
    shown: list[str] | None = None  # how each entry is named in errors.jsonl when refused (manifest: as written)
    rejected: list[dict[str, str]] = []
    others: list[str] = []  # files that are not images (absolute)
    if p.is_dir():
        root = Path(local_path(input_root) if input_root else p)
        for dirpath, dirnames, filenames in os.walk(p, followlinks=False):
            keep = []
            for d in sorted(dirnames):
                full = os.path.join(dirpath, d)
                if os.path.realpath(full) == out_real or (dirpath == os.fspath(p) and d == STATE_DIR):
                    continue
                if os.path.islink(full):
                    rejected.append({"source": Path(os.path.relpath(full, root)).as_posix(),
                                     "error": "a symlinked folder; not followed"})
                    continue
                keep.append(d)
            dirnames[:] = keep
            for f in sorted(filenames):
                (entries if _is_image(f) else others).append(os.path.join(dirpath, f))
    elif p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES:
        root = Path(local_path(input_root) if input_root else p.parent)
        with open(p, encoding="utf-8-sig", newline="") as f:
            shown = list(manifest_entries(f, str(p)))
        entries = [e if os.path.isabs(e) else os.path.join(p.parent, e) for e in shown]
    elif p.is_file():
        root = Path(local_path(input_root) if input_root else p.parent)
        entries = [spec_s]
    else:
        root = Path(local_path(input_root) if input_root else _glob_root(spec_s))
        for f in sorted(glob.glob(spec_s, recursive=True)):
            if os.path.isfile(f):
                (entries if _is_image(f) else others).append(f)
        if not entries:
            raise BatchError(f"{spec_s}: no such folder, manifest or image, and no image matches it as a glob")
    root_abs = os.path.abspath(root)
    root_real = os.path.realpath(root)
    if in_output(root_real):
        raise BatchError(f"the input root {root_abs} is OUTPUT or inside it; write the outputs elsewhere")
    sources: dict[str, str] = {}  # source -> absolute path
    for n, e in enumerate(entries):
        name = shown[n] if shown is not None else e
        full = os.path.normpath(os.path.abspath(e))
        rel = os.path.relpath(full, root_abs)
        source = Path(rel).as_posix()
        if rel == os.curdir or rel.split(os.sep)[0] == os.pardir:
            rejected.append({"source": name, "error": f"outside the input root {root_abs}; no output may leave OUTPUT "
                                                   "(pass --input-root to widen it)"})
            continue
        real = os.path.realpath(full)
        if in_output(real) or in_output(full):
            continue  # our own outputs (OUTPUT inside INPUT)
        if not is_within(real, root_real):
            rejected.append({"source": source, "error": f"resolves through a symlink to {real}, outside the input "
                                                        f"root {root_abs}; not read"})
            continue
        if source.split("/")[0] == STATE_DIR:
            rejected.append({"source": source, "error": f"{STATE_DIR}/ is reserved for the job's state"})
            continue
        sources.setdefault(source, full)  # a source listed twice is processed once
    not_images = sorted(Path(os.path.relpath(f, root_abs)).as_posix() for f in others
                        if not (in_output(os.path.realpath(f)) or in_output(os.path.abspath(f))))
    rejected.sort(key=lambda r: r["source"])
    return Inputs(root_abs, assign_outputs(sources, fmt), rejected, not_images)


def _resolve_uri(spec: str, fmt: str, input_root: str | os.PathLike | None) -> Inputs:
    """:func:`resolve_inputs` for a URI (fsspec): the same rules, lexically (object stores have no symlinks)."""
    fs, path = url_to_fs(spec)
    protocol = spec.split("://", 1)[0]
    entries: list[str] = []
    shown: list[str] | None = None
    others: list[str] = []
    if fs.isdir(path):
        root = path
        for f in sorted(fs.find(path)):
            rel = posixpath.relpath(f, path)
            if rel.split("/")[0] == STATE_DIR:
                continue
            (entries if _is_image(f) else others).append(f)
    elif fs.isfile(path) and posixpath.splitext(path)[1].lower() in MANIFEST_SUFFIXES:
        root = posixpath.dirname(path)
        with fs.open(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as f:
            shown = list(manifest_entries(f, spec))
        entries = [e if posixpath.isabs(e) else posixpath.join(root, e) for e in shown]
        entries = [url_to_fs(e)[1] if "://" in e else e for e in entries]
    elif fs.isfile(path):
        root, entries = posixpath.dirname(path), [path]
    else:
        root = _glob_root(path)
        for f in sorted(fs.glob(path)):
            if fs.isfile(f):
                (entries if _is_image(f) else others).append(f)
        if not entries:
            raise BatchError(f"{spec}: no such folder, manifest or image, and no image matches it as a glob")
    if input_root:
        root = url_to_fs(os.fspath(input_root))[1]
    rejected: list[dict[str, str]] = []
    sources: dict[str, str] = {}
    for n, e in enumerate(entries):
        name = shown[n] if shown is not None else fs.unstrip_protocol(e)
        full = posixpath.normpath(e)
        rel = posixpath.relpath(full, root)
        if rel == "." or rel.split("/")[0] == "..":
            rejected.append({"source": name, "error": f"outside the input root {protocol}://{root.lstrip('/')}; no "
                                                   "output may leave OUTPUT (pass --input-root to widen it)"})
            continue
        if rel.split("/")[0] == STATE_DIR:
            rejected.append({"source": rel, "error": f"{STATE_DIR}/ is reserved for the job's state"})
            continue
        sources.setdefault(rel, fs.unstrip_protocol(full))
    rejected.sort(key=lambda r: r["source"])
    return Inputs(fs.unstrip_protocol(root), assign_outputs(sources, fmt), rejected,
                  sorted(posixpath.relpath(f, root) for f in others))
