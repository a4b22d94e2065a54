"""Build the native sampler libraries (C++17, and CUDA where nvcc is found). Used by setup.py.

    python -m native.build            # build in place, into native/ (what an editable install does)
    python -m native.build --out DIR  # build into DIR

Needs onnxruntime's C API headers (``sh native/fetch-ort-headers.sh`` unpacks them into
``native/include``; ``STN_ORT_INCLUDE`` names another folder) and g++. Never fails the install:
when something is missing it says what and builds nothing, and the ``native`` loader then reports
why the library is missing (``native.status()``).

- ``libstn_sampler.so``: the CPU kernels. ``-O3 -ffp-contract=off -fno-trapping-math`` (the
  latter lets GCC vectorise the clamps and conversions), no ``-march``: the hot row
  functions carry GCC ``target_clones`` (x86-64-v4 = AVX-512, x86-64-v3 = AVX2+FMA, baseline),
  picked at load time, so one build runs on any x86-64.
- ``libstn_sampler_cuda.so`` (when ``nvcc`` is on PATH or under /usr/local/cuda*/bin; ``STN_NVCC``
  names one; ``STN_NATIVE_CUDA=0`` skips it): the same CPU kernels plus the CUDA kernels, CUDA
  runtime linked statically (nothing to find at load time; the NVIDIA driver is needed only to
  run). Loaded only for sessions on the CUDA execution provider.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIB = "libstn_sampler.so"
CUDA_LIB = "libstn_sampler_cuda.so"
CPU_SOURCES = ("ops.cc", "sampler_cpu.cc")
CUDA_SOURCES = ("sampler_cuda.cu",)
HEADERS = ("sampler.h", "sampler_cpu.h", "sampler_cuda.h")
CXXFLAGS = ["-std=c++17", "-O3", "-fPIC", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fvisibility=hidden",
            "-Wall", "-Wextra"]
# CUDA 13 targets: Turing and later as SASS, PTX of the newest for what comes after.
CUDA_ARCHS = ["75", "80", "86", "89", "90", "100", "120"]


def include_dir() -> Path:
    return Path(os.environ.get("STN_ORT_INCLUDE") or HERE / "include")


def find_nvcc() -> str | None:
    if os.environ.get("STN_NATIVE_CUDA", "1") == "0":
        return None
    explicit = os.environ.get("STN_NVCC")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    found = shutil.which("nvcc")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))
    return candidates[-1] if candidates else None


def _run(cmd: list[str], log: list[str]) -> bool:
    log.append(" ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        log.append(proc.stdout + proc.stderr)
        return False
    return True


def _newer(target: Path, sources: list[Path]) -> bool:
    return target.is_file() and all(target.stat().st_mtime >= s.stat().st_mtime for s in sources)


def build(out_dir: str | os.PathLike = HERE, cuda: bool = True, force: bool = False) -> dict[str, str]:
    """Build into ``out_dir``; returns {library name: "built" | "up to date" | reason it was not built}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inc = include_dir()
    result: dict[str, str] = {}
    if not (inc / "onnxruntime_c_api.h").is_file():
        reason = (f"onnxruntime's C API headers are not in {inc} (run `sh native/fetch-ort-headers.sh`, "
                  "or set STN_ORT_INCLUDE)")
        return {LIB: reason, CUDA_LIB: reason}
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        return {LIB: "no C++ compiler (g++) found", CUDA_LIB: "no C++ compiler (g++) found"}
    deps = [HERE / s for s in (*CPU_SOURCES, *HEADERS, *CUDA_SOURCES) if (HERE / s).is_file()]
    deps.append(inc / "onnxruntime_c_api.h")
    log: list[str] = []
    target = out / LIB
    if not force and _newer(target, deps):
        result[LIB] = "up to date"
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tmp_lib = Path(tmp) / LIB
            ok = _run([cxx, *CXXFLAGS, f"-I{inc}", *[str(HERE / s) for s in CPU_SOURCES], "-shared", "-o", str(tmp_lib)],
                      log)
            if ok:
                shutil.copy2(tmp_lib, target)
                result[LIB] = "built"
            else:
                result[LIB] = "compiler failed:\n" + "\n".join(log)[-4000:]
    nvcc = find_nvcc() if cuda else None
    cuda_target = out / CUDA_LIB
    if not cuda:
        result[CUDA_LIB] = "skipped (CPU library only)"
    elif nvcc is None:
        result[CUDA_LIB] = "nvcc not found (CUDA library not built; the CPU library serves every provider)"
    elif not force and _newer(cuda_target, deps):
        result[CUDA_LIB] = "up to date"
    else:
        with tempfile.TemporaryDirectory() as tmp:
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
            gencode.append(f"-gencode=arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}")
            objs = []
            ok = True
            for src in CUDA_SOURCES:
                obj = Path(tmp) / (src + ".o")
                ok = ok and _run([nvcc, "-std=c++17", "-O3", "-Xcompiler", "-fPIC,-fvisibility=hidden",
                                  "--fmad=false", f"-I{inc}", f"-I{HERE}", *gencode, "-c", str(HERE / src),
                                  "-o", str(obj)], log)
                objs.append(str(obj))
            tmp_lib = Path(tmp) / CUDA_LIB
            ok = ok and _run([nvcc, "-shared", "-cudart", "static", "-Xcompiler", "-fPIC", *gencode, "-o", str(tmp_lib),
                              *objs, *[str(HERE / s) for s in CPU_SOURCES], f"-I{inc}", "-DSTN_WITH_CUDA",
                              "-Xcompiler", ",".join(c for c in CXXFLAGS if c not in ("-std=c++17", "-fPIC")),
                              "-std=c++17"], log)
            if ok:
                shutil.copy2(tmp_lib, cuda_target)
                result[CUDA_LIB] = "built"
            else:
                result[CUDA_LIB] = "nvcc failed:\n" + "\n".join(log)[-4000:]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m native.build", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE), help="output folder (default: native/, in place)")
    p.add_argument("--no-cuda", action="store_true", help="build the CPU library only")
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = p.parse_args(argv)
    result = build(args.out, cuda=not args.no_cuda, force=args.force)
    for name, what in result.items():
        print(f"{name}: {what}")
    return 0 if result.get(LIB) in ("built", "up to date") else 1


if __name__ == "__main__":
    sys.exit(main())
