"""OUTPUT and the job's state: atomic writes, the journal of finished images, resume, the reports.

::

    OUTPUT/<outputs>                 written atomically (local: a temporary file renamed into place)
    OUTPUT/.stn-batch/job.json       the settings that make two runs the same job
    OUTPUT/.stn-batch/journal.jsonl  one line per finished image, appended by the driver (local OUTPUT)
    OUTPUT/.stn-batch/journal/*.jsonl  shards of the same lines, each written whole by the one that wrote the
                                     outputs it lists (a Ray worker's batch; the local engine on a URI OUTPUT)
    OUTPUT/results.jsonl, errors.jsonl, skipped.jsonl   written at the end, sorted by source

OUTPUT is a local folder or an fsspec URI (:class:`Store`). The driver keeps, per image, where its journal
line is (not the line), and streams the reports from the journal at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from service.batch.inputs import (
    ERRORS,
    RESULTS,
    SKIPPED,
    STATE_DIR,
    BatchError,
    Inputs,
    Item,
    is_uri,
    is_within,
    local_path,
    url_to_fs,
)

log = logging.getLogger(__name__)

JOURNAL = "journal.jsonl"  # appended by the driver, under STATE_DIR
SHARDS = "journal"  # folder of journal shards, under STATE_DIR
LOCK = "lock"  # under STATE_DIR: held (flock) by the run that owns a local OUTPUT, with its process id


@dataclass(frozen=True)
class JobSpec:
    """What makes two runs the same job (stored in OUTPUT/.stn-batch/job.json)."""

    model: str  # stn.name
    model_version: str
    model_sha256: str
    format: str
    quality: int
    size: list[int] | None  # [h, w]; None: the model's output size


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def journal_line(source: str, record: dict[str, Any] | None = None, error: str | None = None) -> str:
    """One journal line: ``{"source", "result"}`` for a rectified image, ``{"source", "error"}`` for a failure."""
    if record is not None:
        return f'{{"source": {json.dumps(source)}, "result": {json.dumps(record)}}}\n'
    return json.dumps({"source": source, "error": error}) + "\n"


class Store:
    """OUTPUT: a local folder (atomic renames, symlinks checked) or an fsspec URI (``s3://``, ``memory://``...:
    one ``pipe_file`` per file, atomic on object stores). Workers on other machines open their own Store on the
    same OUTPUT; a local OUTPUT must then be shared storage."""

    def __init__(self, output: str | os.PathLike) -> None:
        self.uri = os.fspath(output)
        self.local = not is_uri(self.uri)
        if self.local:
            self.root = self.uri = os.path.abspath(local_path(self.uri))  # workers may run in another folder
            self.fs = None
        else:
            self.fs, self.root = url_to_fs(self.uri)
        self._lock = threading.Lock()
        self._seq = 0
        self._checked: set[str] = set()  # output folders (relative) already created and checked
        self._real = ""

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel) if self.local else posixpath.join(self.root, rel)

    def makedirs(self, rel: str = "") -> None:
        if self.local:
            os.makedirs(self.path(rel), exist_ok=True)
        else:
            self.fs.makedirs(self.path(rel), exist_ok=True)

    @property
    def real(self) -> str:
        if not self._real:
            self._real = os.path.realpath(self.root)
        return self._real

    def isfile(self, rel: str) -> bool:
        return os.path.isfile(self.path(rel)) if self.local else self.fs.isfile(self.path(rel))

    def listing(self) -> set[str] | None:
        """Every file under a URI OUTPUT (relative), from one listing instead of a request per image; None for a
        local OUTPUT (asked file by file)."""
        if self.local:
            return None
        root = self.root.rstrip("/")
        return {f[len(root) + 1:] for f in self.fs.find(root)} if self.fs.isdir(root) else set()

    def read_bytes(self, rel: str) -> bytes:
        if self.local:
            with open(self.path(rel), "rb") as f:
                return f.read()
        return self.fs.cat_file(self.path(rel))

    def listdir(self, rel: str) -> list[str]:
        """Names of the files in a folder of OUTPUT, sorted ([] when there is none)."""
        p = self.path(rel)
        if self.local:
            return sorted(os.listdir(p)) if os.path.isdir(p) else []
        if not self.fs.isdir(p):
            return []
        return sorted(posixpath.basename(f) for f in self.fs.find(p, maxdepth=1))

    def lock(self) -> int | None:
        """Hold OUTPUT for this run: an exclusive ``flock`` on STATE_DIR/LOCK, released when the returned descriptor
        is closed or the process ends (``kill -9`` included); BatchError naming the holder when another run holds
        it. Two runs at once would append to one journal at offsets each thinks its own, remove each other's
        temporary files, and both fail at the end. None on a URI OUTPUT (object stores have no locks)."""
        if not self.local:
            return None
        import fcntl

        self.makedirs(STATE_DIR)
        fd = os.open(self.path(posixpath.join(STATE_DIR, LOCK)), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise BatchError(f"another stn batch (process {holder}) is writing to {self.uri}; wait for it to finish, "
                             "or use another OUTPUT") from None
        except OSError as e:  # a filesystem without locks (some network and FUSE mounts): run, and say so
            os.close(fd)
            log.warning("cannot lock %s (%s): another run on the same OUTPUT at once would not be detected",
                        self.uri, e.strerror or e)
            return None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def clear_state(self) -> None:
        """Remove the job's state (STATE_DIR), all but the lock this run holds."""
        state = self.path(STATE_DIR)
        if not self.local:
            self.remove_tree(STATE_DIR)
            return
        for name in self.listdir(STATE_DIR):  # files and folders
            if name == LOCK:
                continue
            p = os.path.join(state, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)

    def remove_tree(self, rel: str) -> None:
        p = self.path(rel)
        if self.local:
            shutil.rmtree(p, ignore_errors=True)
        elif self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    def write(self, rel: str, data: bytes | Iterable[str], check: bool = False) -> None:
        """Write ``data`` (bytes, or text chunks streamed) to OUTPUT/``rel`` atomically. ``check``: an image output
        (its folders are made one level at a time and may not lead outside OUTPUT through a symlink)."""
        dest = self.output_path(rel) if check else self.path(rel)
        if not self.local:
            if isinstance(data, bytes):
                self.fs.pipe_file(dest, data)
            else:
                with self.fs.open(dest, "wb") as f:
                    for chunk in data:
                        f.write(chunk.encode("utf-8"))
            return
        with self._lock:
            self._seq += 1
            tmp = os.path.join(self.root, STATE_DIR, "tmp",
                               f"{os.getpid()}-{threading.get_ident()}-{self._seq}-{uuid.uuid4().hex[:8]}.tmp")
        if isinstance(data, bytes):
            with open(tmp, "wb") as f:
                f.write(data)
        else:
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                f.writelines(data)
        os.replace(tmp, dest)

    def output_path(self, rel: str) -> str:
        """OUTPUT/rel, its folders created; BatchError if a symlink would lead it outside OUTPUT."""
        dest = self.path(rel)
        parent = posixpath.dirname(rel)
        if parent in self._checked:
            return dest
        if not self.local:
            self._checked.add(parent)
            return dest
        folder = Path(self.root)
        for part in Path(parent).parts:  # one level at a time: never create a folder through a symlink
            folder = folder / part
            if folder.is_symlink() and not is_within(os.path.realpath(folder), self.real):
                raise BatchError(f"{folder} is a symlink to {os.path.realpath(folder)}, outside OUTPUT; not written")
            if not folder.is_dir():
                folder.mkdir(exist_ok=True)
        parent_real = os.path.realpath(os.path.dirname(dest))
        if not is_within(parent_real, self.real) or is_within(parent_real, os.path.realpath(self.path(STATE_DIR))):
            raise BatchError(f"{os.path.dirname(dest)} leads (through a symlink) to {parent_real}, outside OUTPUT; "
                             "not written")
        self._checked.add(parent)  # checked once per folder and run
        return dest

    def write_output(self, item: Item, data: bytes) -> str | None:
        """Write one rectified image; None, or why it could not be written (that image's error line)."""
        try:
            self.write(item.output, data, check=True)
        except (OSError, BatchError) as e:
            return f"could not write {item.output}: {e}"
        return None

    def write_shard(self, lines: list[str]) -> str:
        """Journal lines written whole as a new shard (after the outputs they list); its name."""
        name = f"{uuid.uuid4().hex}.jsonl"
        self.write(posixpath.join(STATE_DIR, SHARDS, name), "".join(lines).encode("utf-8"))
        return name


@dataclass(frozen=True)
class Entry:
    """Where an image's last journal line is: the file (``JOURNAL`` or a shard's name), offset and length."""

    output: str | None  # the image's output; None for a failure
    file: str
    offset: int
    length: int


class Job:
    """OUTPUT and its state: the journal of finished images, atomic writes, the final reports.

    Thread-safe: outputs may be written from several threads; journal lines are appended under a lock.
    """

    def __init__(self, output: str | os.PathLike, inputs: Inputs, spec: JobSpec, overwrite: bool = False) -> None:
        self.store = Store(output)
        self.output = self.store.uri
        self.inputs = inputs
        self.spec = spec
        self._lock = threading.Lock()
        self._held = None
        try:
            self.store.makedirs()
            self._held = self.store.lock()  # before anything of the state is read or removed
            self._open(overwrite)
        except BaseException as e:
            self.release()
            if isinstance(e, OSError):  # OUTPUT is a file, or cannot be created or written
                why = ("it, or a folder on its way, is a file" if isinstance(e, (FileExistsError, NotADirectoryError))
                       else f"{e.strerror or e}" + (f" ({e.filename})" if getattr(e, "filename", None) else ""))
                raise BatchError(f"cannot use {self.output} as OUTPUT: {why}") from None
            raise

    def _open(self, overwrite: bool) -> None:
        spec, store = self.spec, self.store
        job_file = posixpath.join(STATE_DIR, "job.json")
        if store.isfile(job_file) and not overwrite:
            try:
                old = json.loads(store.read_bytes(job_file))
            except (OSError, json.JSONDecodeError):
                old = None
            if old != asdict(spec):
                raise BatchError(f"{self.output} holds a job with other settings ({old}); this one is {asdict(spec)}. "
                                 "Use another OUTPUT, or --overwrite to start this job over in it")
        if overwrite:
            store.clear_state()
        store.remove_tree(posixpath.join(STATE_DIR, "tmp"))  # leftovers of an interrupted run (the lock says no
        # other run is writing there)
        for d in ("tmp", SHARDS):
            store.makedirs(posixpath.join(STATE_DIR, d))
        if not store.isfile(job_file):
            store.write(job_file, json.dumps(asdict(spec), indent=1).encode())
        # source -> where its last journal line is (not the line: the reports are streamed from the journal)
        self.entries: dict[str, Entry] = {}
        self._files = store.listing()  # a URI OUTPUT's files, listed once
        self._read_journal(JOURNAL)
        for name in store.listdir(posixpath.join(STATE_DIR, SHARDS)):
            self._read_journal(posixpath.join(SHARDS, name))
        self.done = {it.source for it in self.inputs.items if self._completed(it)}
        self.todo = [it for it in self.inputs.items if it.source not in self.done]
        self._journal = None
        self._offset = 0
        self._pending: list[str] = []  # journal lines not yet in a shard (URI OUTPUT: no appending there)
        if store.local:
            self._journal = open(store.path(posixpath.join(STATE_DIR, JOURNAL)), "ab")  # noqa: SIM115 (close())
            self._offset = self._journal.tell()

    def _read_journal(self, name: str) -> None:
        rel = posixpath.join(STATE_DIR, name)
        if not self.store.isfile(rel):
            return
        data = self.store.read_bytes(rel)
        file = name if name == JOURNAL else posixpath.basename(name)
        offset = 0
        for line in data.splitlines(keepends=True):
            self._index(line, file, offset)
            offset += len(line)

    def _index(self, line: bytes, file: str, offset: int) -> None:
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return  # a line cut by kill -9: that image is redone
        if not isinstance(rec, dict) or not isinstance(rec.get("source"), str):
            return
        output = rec["result"].get("output") if isinstance(rec.get("result"), dict) else None
        self.entries[rec["source"]] = Entry(output, file, offset, len(line))

    def _completed(self, item: Item) -> bool:
        entry = self.entries.get(item.source)
        if entry is None or entry.output is None or entry.output != item.output:
            return False
        return item.output in self._files if self._files is not None else self.store.isfile(item.output)

    def _append(self, source: str, output: str | None, line: str) -> None:
        data = line.encode("utf-8")
        with self._lock:
            if self._journal is None:
                self._pending.append(line)
                self.entries[source] = Entry(output, "", len(self._pending) - 1, len(data))  # placed by _flush
                if len(self._pending) >= 256:
                    self._flush()
                return
            self.entries[source] = Entry(output, JOURNAL, self._offset, len(data))
            self._journal.write(data)
            self._journal.flush()  # in the OS once written: survives kill -9
            self._offset += len(data)

    def _flush(self) -> None:
        """The pending journal lines as one shard (URI OUTPUT); their entries point into it. Under the lock."""
        if not self._pending:
            return
        name = self.store.write_shard(self._pending)
        offsets = [0]
        for line in self._pending:
            offsets.append(offsets[-1] + len(line.encode("utf-8")))
        for source, entry in list(self.entries.items()):
            if entry.file == "":
                self.entries[source] = Entry(entry.output, name, offsets[entry.offset], entry.length)
        self._pending = []

    def write_result(self, item: Item, data: bytes, record: dict[str, Any]) -> None:
        """Write the rectified image atomically, then journal its record."""
        error = self.store.write_output(item, data)
        if error is not None:
            self.write_error(item, error)
            return
        self._append(item.source, item.output, journal_line(item.source, record))

    def write_error(self, item: Item, reason: str) -> None:
        self._append(item.source, None, journal_line(item.source, error=reason))

    def add_entries(self, rows: Iterable[tuple[str, str | None, str, int, int]]) -> None:
        """Lines of the shards a worker wrote: (source, output or None, shard, offset, length) per image."""
        with self._lock:
            for source, output, shard, offset, length in rows:
                self.entries[source] = Entry(output, shard, offset, length)

    def release(self) -> None:
        """Let other runs have OUTPUT (:meth:`Store.lock`); after :meth:`finish`, or when the run ends otherwise."""
        held, self._held = self._held, None
        if held is not None:
            os.close(held)

    def close(self) -> None:
        with self._lock:
            self._flush()
            if self._journal is not None and not self._journal.closed:
                self._journal.flush()
                with contextlib.suppress(OSError):
                    os.fsync(self._journal.fileno())
                self._journal.close()

    def _lines(self) -> Iterator[tuple[Item, dict[str, Any] | None]]:
        """Each item (sorted by source) with its last journal line, parsed; read file by file, never all at once."""
        cache: dict[str, bytes] = {}  # one shard at a time (items in a shard are neighbours in source order)
        journal = None
        try:
            for it in self.inputs.items:
                entry = self.entries.get(it.source)
                if entry is None:
                    yield it, None
                    continue
                if entry.file == JOURNAL:
                    if journal is None:
                        journal = open(self.store.path(posixpath.join(STATE_DIR, JOURNAL)), "rb")  # noqa: SIM115
                    journal.seek(entry.offset)
                    line = journal.read(entry.length)
                else:
                    if entry.file not in cache:
                        cache.clear()
                        cache[entry.file] = self.store.read_bytes(posixpath.join(STATE_DIR, SHARDS, entry.file))
                    line = cache[entry.file][entry.offset:entry.offset + entry.length]
                yield it, json.loads(line)
        finally:
            if journal is not None:
                journal.close()

    def finish(self) -> tuple[int, int]:
        """Write results.jsonl, errors.jsonl (sorted by source) from the journal, streamed, and skipped.jsonl;
        (ok, failed)."""
        self.close()
        self._files = self.store.listing()  # with this run's outputs
        counts = {"ok": 0, "failed": 0}
        errors: list[dict[str, str]] = []  # failures are few: kept to merge with the refused entries in order

        def results() -> Iterator[str]:
            for it, rec in self._lines():
                if rec is not None and isinstance(rec.get("result"), dict) and self._completed(it):
                    counts["ok"] += 1
                    yield json.dumps(rec["result"]) + "\n"
                else:
                    reason = str(rec.get("error", "")) if rec is not None and "result" not in rec else "not processed"
                    errors.append({"source": it.source, "error": reason})

        self.store.write(RESULTS, results())
        errors.extend(self.inputs.rejected)
        errors.sort(key=lambda r: r["source"])
        counts["failed"] = len(errors)
        self.store.write(ERRORS, (json.dumps(r) + "\n" for r in errors))
        self.store.write(SKIPPED, (json.dumps({"source": s, "reason": "not an image (by its suffix)"}) + "\n"
                                   for s in self.inputs.not_images))
        self.store.remove_tree(posixpath.join(STATE_DIR, "tmp"))
        return counts["ok"], counts["failed"]
