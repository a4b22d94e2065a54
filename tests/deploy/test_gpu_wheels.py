""".ci/gpu/wheels.py: the bundle that carries onnxruntime-gpu to the GPU machine, cut, joined, verified, installed.

The real download (255 MB) is exercised by hand (docs/GPU.md); here small hand-made wheels go
through the same bundle -> pieces -> join -> sha256 -> pip install --target path, offline.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_wheels", ROOT / ".ci" / "gpu" / "wheels.py")
wheels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wheels)


def _wheel(folder: Path, dist: str, module: str, version: str = "0.0.1") -> Path:
    """A minimal pure-Python wheel: one module whose VERSION is ``version``."""
    name = dist.replace("-", "_")
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {f"{module}/__init__.py": f"VERSION = {version!r}\n" + "# padding\n" * 200,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{k},,\n" for k in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
    return path


@pytest.fixture
def made(tmp_path: Path) -> tuple[Path, dict]:
    src = tmp_path / "src"
    src.mkdir()
    ws = [_wheel(src, "onnxruntime-gpu", "stn_fake_ort"), _wheel(src, "stn-fake-dep", "stn_fake_dep"),
          _wheel(src, "pytest", "stn_fake_pytest")]  # pytest runs this test: installed, so not installed again
    manifest = wheels.bundle(ws, tmp_path / "pieces", piece_size=1500, python="3.11")
    return tmp_path / "pieces", manifest


def test_pieces_join_verify_and_install(made: tuple[Path, dict], tmp_path: Path) -> None:
    pieces, manifest = made
    assert len(manifest["pieces"]) >= 3 and all(p.stat().st_size <= 1500 for p in pieces.glob("bundle.tar.*"))
    # carried one call at a time: the pieces may sit in several folders
    elsewhere = tmp_path / "second"
    elsewhere.mkdir()
    (pieces / manifest["pieces"][-1]).rename(elsewhere / manifest["pieces"][-1])
    installed = wheels.install([pieces, elsewhere], tmp_path / "target", tmp_path / "work")
    assert sorted(installed) == ["onnxruntime_gpu-0.0.1-py3-none-any.whl", "stn_fake_dep-0.0.1-py3-none-any.whl"]
    code = "import stn_fake_ort, stn_fake_dep; print(stn_fake_ort.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(tmp_path / "target")}).stdout
    assert out.startswith(str(tmp_path / "target"))
    assert "export PYTHONPATH=" + str(tmp_path / "target") in wheels.env(tmp_path / "target")


def test_a_damaged_or_missing_piece_is_named(made: tuple[Path, dict], tmp_path: Path) -> None:
    pieces, manifest = made
    first = pieces / manifest["pieces"][0]
    data = bytearray(first.read_bytes())
    data[600] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="a piece is damaged"):
        wheels.install([pieces], tmp_path / "t")
    first.unlink()
    with pytest.raises(SystemExit, match=f"missing pieces {manifest['pieces'][0]}"):
        wheels.install([pieces], tmp_path / "t")
