#!/usr/bin/env python3
"""Bring onnxruntime-gpu (and what `stn doctor --gpu` needs) to a GPU machine that has no network.

The device machine (docs/GPU.md) has Python 3.12, torch with CUDA 13 (and its nvidia-* wheels),
onnx and a CPU-only onnxruntime, no network, and takes at most 64 MiB of git-ignored files per
call. So, here:

    python .ci/gpu/wheels.py fetch --out gpu-wheels          # download, bundle, cut into 60 MiB pieces

writes ``gpu-wheels/pieces/bundle.tar.NN`` (git-ignored: add ``gpu-wheels/`` to
``.git/info/exclude``) and ``gpu-wheels/pieces/manifest.json``. Then, one piece per device call,
each call copying its piece to a folder outside the checkout (``/tmp/stn-gpu-wheels``); the
last call:

    python .ci/gpu/wheels.py install --pieces /tmp/stn-gpu-wheels --target /tmp/stn-ort
    eval "$(python .ci/gpu/wheels.py env --target /tmp/stn-ort)"   # PYTHONPATH, LD_LIBRARY_PATH
    python .ci/gpu/wheels.py check                                  # imports onnxruntime-gpu, lists providers

``install`` joins the pieces (``cat``), checks the bundle's sha256, and installs onnxruntime-gpu
with ``pip install --no-deps --target``, plus those of the bundled dependency wheels whose
distribution the machine lacks (never a second numpy or torch). ``env`` prints the exports that
put the target first on ``PYTHONPATH`` and the nvidia-* wheels' CUDA 13 / cuDNN 9 libraries on
``LD_LIBRARY_PATH`` (``onnxruntime.preload_dlls()`` is the in-process alternative; ``check``
tries it and says what it found).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ORT_GPU = "onnxruntime-gpu==1.31.1"
# what `stn doctor --gpu` imports besides torch, onnx and numpy (serve, bench serve, batch, export)
DEPENDENCIES = ["fastapi>=0.115", "uvicorn>=0.30", "pydantic-settings>=2.4", "python-multipart>=0.0.9",
                "prometheus-client>=0.20", "onnxscript>=0.5", "pillow>=10.0", "tqdm>=4.66", "httpx>=0.27",
                "fsspec>=2023.6"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
PIECE = 60 * 2**20
# already on the machine, or ours to leave alone: never installed from the bundle
KEEP = {"numpy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "typing-extensions", "setuptools", "pip"}


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(requirements: list[str], dest: Path, python: str, no_deps: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", python,
           "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    if no_deps:
        cmd.append("--no-deps")
    subprocess.run(cmd + requirements, check=True)


def fetch(out: Path, python: str, piece_size: int, with_deps: bool) -> Path:
    """Download the wheels, tar them into one bundle, split it; returns the pieces folder."""
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    _download([ORT_GPU], wheels, python, no_deps=True)
    if with_deps:
        _download(DEPENDENCIES, wheels, python, no_deps=False)
    pieces = out / "pieces"
    manifest = bundle(sorted(wheels.glob("*.whl")), pieces, piece_size, python=python, onnxruntime_gpu=ORT_GPU)
    say(f"{len(manifest['pieces'])} pieces of at most {piece_size / 2**20:g} MiB in {pieces} (+ manifest.json): "
        f"{', '.join(manifest['wheels'])}")
    return pieces


def bundle(wheels: list[Path], pieces: Path, piece_size: int = PIECE, **extra: str) -> dict:
    """Tar the wheels and cut the tar into ``bundle.tar.NN`` pieces (``split -b``) plus manifest.json."""
    shutil.rmtree(pieces, ignore_errors=True)
    pieces.mkdir(parents=True)
    tar_path = pieces / "bundle.tar"
    with tarfile.open(tar_path, "w") as tar:  # wheels are zip files already: no compression
        for w in wheels:
            tar.add(w, arcname=w.name)
    names = []
    with open(tar_path, "rb") as f:
        for i, block in enumerate(iter(lambda: f.read(piece_size), b"")):
            name = f"bundle.tar.{i:02d}"
            (pieces / name).write_bytes(block)
            names.append(name)
    manifest = {"bundle": "bundle.tar", "sha256": sha256(tar_path), "size": tar_path.stat().st_size,
                "pieces": names, "wheels": [w.name for w in wheels], **extra}
    tar_path.unlink()
    (pieces / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _dist_name(wheel: str) -> str:
    return re.sub(r"[-_.]+", "-", wheel.split("-")[0]).lower()


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def install(pieces_dirs: list[Path], target: Path, work: Path | None = None) -> list[str]:
    """Join the pieces, verify, install into ``target``; returns the wheels installed."""
    found: dict[str, Path] = {}
    manifest = None
    for d in pieces_dirs:
        for p in d.iterdir():
            if p.name == "manifest.json":
                manifest = json.loads(p.read_text())
            elif p.name.startswith("bundle.tar."):
                found[p.name] = p
    if manifest is None:
        raise SystemExit(f"no manifest.json in {', '.join(map(str, pieces_dirs))}")
    missing = [n for n in manifest["pieces"] if n not in found]
    if missing:
        raise SystemExit(f"missing pieces {', '.join(missing)} (have {', '.join(sorted(found)) or 'none'})")
    work = Path(work or tempfile.mkdtemp(prefix="stn-wheels-"))
    work.mkdir(parents=True, exist_ok=True)
    joined = work / manifest["bundle"]
    with open(joined, "wb") as out:  # cat bundle.tar.00 bundle.tar.01 ... > bundle.tar
        for name in manifest["pieces"]:
            with open(found[name], "rb") as f:
                shutil.copyfileobj(f, out)
    digest = sha256(joined)
    if digest != manifest["sha256"]:
        raise SystemExit(f"{joined}: sha256 {digest} != manifest {manifest['sha256']} (a piece is damaged)")
    wheels = work / "wheels"
    with tarfile.open(joined) as tar:
        tar.extractall(wheels, filter="data")
    joined.unlink()
    chosen = []
    for w in sorted(wheels.glob("*.whl")):
        dist = _dist_name(w.name)
        if dist == "onnxruntime-gpu" or (dist not in KEEP and not _installed(dist)):
            chosen.append(w)
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--upgrade", "--target",
                    str(target), *map(str, chosen)], check=True)
    say(f"installed into {target}: {', '.join(w.name for w in chosen)}")
    return [w.name for w in chosen]


def cuda_library_dirs() -> list[str]:
    """The lib folders of the nvidia-* wheels (cuBLAS, cuDNN, cuFFT, curand, the CUDA runtime) of this Python."""
    dirs: set[str] = set()
    for entry in sys.path:
        base = Path(entry) / "nvidia"
        if base.is_dir():
            for lib in base.glob("**/lib"):
                if any(lib.glob("*.so*")):
                    dirs.add(str(lib))
    return sorted(dirs)


def env(target: Path) -> str:
    """Shell exports: the target first on PYTHONPATH, the nvidia-* libraries on LD_LIBRARY_PATH."""
    py = [str(target)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    ld = cuda_library_dirs() + ([os.environ["LD_LIBRARY_PATH"]] if os.environ.get("LD_LIBRARY_PATH") else [])
    return f"export PYTHONPATH={':'.join(py)}\nexport LD_LIBRARY_PATH={':'.join(ld)}"


def check(expect_cuda: bool) -> int:
    """Import onnxruntime (from the target when PYTHONPATH has it), list providers, say whether CUDA works."""
    import onnxruntime as ort

    say(f"onnxruntime {ort.__version__} from {Path(ort.__file__).parent}")
    say(f"available providers: {', '.join(ort.get_available_providers())}")
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
            say("onnxruntime.preload_dlls(): done")
        except Exception as e:  # noqa: BLE001
            say(f"onnxruntime.preload_dlls(): {type(e).__name__}: {e}")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from service.runtime import provider_status

    usable, reason = provider_status("CUDAExecutionProvider")
    say(f"CUDAExecutionProvider: {'usable' if usable else 'NOT usable: ' + reason}")
    return 0 if usable or not expect_cuda else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download the wheels and cut them into pieces (here, with network)")
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--python", default="3.12", help="the device's Python (default %(default)s)")
    f.add_argument("--piece-mib", type=int, default=PIECE // 2**20)
    f.add_argument("--no-deps", action="store_true", help="onnxruntime-gpu alone")
    i = sub.add_parser("install", help="join the pieces and install (on the device)")
    i.add_argument("--pieces", type=Path, nargs="+", required=True, help="folder(s) holding the pieces and manifest")
    i.add_argument("--target", type=Path, required=True)
    i.add_argument("--work", type=Path, default=None, help="where the bundle is joined (default: a temporary folder)")
    e = sub.add_parser("env", help="print the shell exports for the installed target")
    e.add_argument("--target", type=Path, required=True)
    c = sub.add_parser("check", help="import onnxruntime and list its providers")
    c.add_argument("--expect-cuda", action="store_true", help="exit 1 unless the CUDA provider is usable")
    args = p.parse_args(argv)
    if args.cmd == "fetch":
        fetch(args.out, args.python, args.piece_mib * 2**20, not args.no_deps)
    elif args.cmd == "install":
        install(args.pieces, args.target, args.work)
    elif args.cmd == "env":
        say(env(args.target))
    else:
        return check(args.expect_cuda)
    return 0


if __name__ == "__main__":
    sys.exit(main())
