"""``stn doctor``: what a user needs to know before filing a bug, as one dict (``--json``) or text.

:func:`report` gathers, without torch unless it is installed (a serving-only install has none):

- versions: stn, Python, platform, onnxruntime, onnx, numpy, torch (``None`` when absent);
- execution providers: each one onnxruntime has, and whether it is usable, or why not
  (``service.runtime.provider_status``: the missing CUDA library is named);
- GPUs (name, memory, driver) from ``nvidia-smi``, else ``torch.cuda``;
- the native sampler library: ``native.status()`` when the ``native`` package imports, else
  "not in this build";
- the model folder and each model's status (``service.runtime.load_model_dir``: loads, on
  which providers, or why not).

The GPU checks (``stn doctor --gpu``) are in ``service.doctor_gpu``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    import onnxruntime as ort

    torch_version = None
    if importlib.util.find_spec("torch") is not None:
        torch_version = _version("torch")
    return {
        "stn": _version("stn"), "python": platform.python_version(), "platform": platform.platform(),
        "onnxruntime": ort.__version__,
        "onnxruntime_package": next((p for p in ("onnxruntime-gpu", "onnxruntime") if _version(p)), None),
        "onnx": _version("onnx"), "numpy": _version("numpy"), "torch": torch_version,
    }


def providers() -> list[dict[str, Any]]:
    """Every provider of this onnxruntime build: usable, or the reason it is not."""
    import onnxruntime as ort

    from service.runtime import provider_status

    out = []
    for name in ort.get_available_providers():
        usable, reason = provider_status(name)
        out.append({"name": name, "usable": usable, "reason": reason})
    return out


def gpus() -> dict[str, Any]:
    """{"source": ..., "devices": [{index, name, memory_total_mib, driver}], "reason": ...}."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            proc = subprocess.run(
                [smi, "--query-gpu=index,name,memory.total,memory.used,driver_version", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=20)
            if proc.returncode == 0:
                devices = []
                for line in proc.stdout.strip().splitlines():
                    index, name, total, used, driver = (f.strip() for f in line.split(","))
                    devices.append({"index": int(index), "name": name, "memory_total_mib": int(float(total)),
                                    "memory_used_mib": int(float(used)), "driver": driver})
                return {"source": "nvidia-smi", "devices": devices, "reason": "" if devices else "nvidia-smi lists none"}
            smi_reason = f"nvidia-smi failed: {(proc.stderr or proc.stdout).strip()[:200]}"
        except (OSError, subprocess.TimeoutExpired, ValueError) as e:
            smi_reason = f"nvidia-smi failed: {e}"
    else:
        smi_reason = "no nvidia-smi on PATH"
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            devices = []
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                devices.append({"index": i, "name": p.name, "memory_total_mib": p.total_memory // 2**20,
                                "driver": None, "capability": f"{p.major}.{p.minor}"})
            return {"source": "torch.cuda", "devices": devices, "reason": smi_reason}
        smi_reason += f"; torch {torch.__version__} sees no CUDA device (CUDA {torch.version.cuda or 'not built'})"
    return {"source": None, "devices": [], "reason": smi_reason}


def native_sampler() -> dict[str, Any]:
    """``native.status()`` (available, path, reason, cuda), or "not in this build"."""
    try:
        native = importlib.import_module("native")
    except ImportError as e:
        return {"available": False, "path": None, "reason": f"not in this build ({e})", "cuda": False, "built": False}
    try:
        status = dict(native.status())
    except Exception as e:  # noqa: BLE001 (a broken build must not break the doctor)
        return {"available": False, "path": None, "reason": f"native.status() failed: {type(e).__name__}: {e}",
                "cuda": False, "built": True}
    return {"built": True, **status}


def models(model_dir: str | Path | None = None, provider_list: list[str] | None = None) -> dict[str, Any]:
    """The model folder and each model: loads (on which providers), or why not."""
    from service.runtime import load_model_dir
    from service.settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as e:  # an STN_* variable with a bad value
        return {"model_dir": str(model_dir or ""), "models": [
            {"name": "(settings)", "ok": False, "reason": str(e)}]}
    folder = Path(model_dir) if model_dir else settings.model_dir
    config = settings.session_config(provider_list)
    loaded = load_model_dir(folder, config, warmup_batch=1)
    out: dict[str, Any] = {"model_dir": str(folder), "models": []}
    for name, rt in loaded.models.items():
        out["models"].append({"name": name, "file": rt.path.name, "ok": True, "transform": rt.info.transform,
                              "grid_sample": rt.info.grid_sample, "providers": rt.providers,
                              "load_seconds": round(rt.load_seconds, 3)})
    for name, reason in loaded.failures.items():
        out["models"].append({"name": name, "ok": False, "reason": reason})
    return out


def report(model_dir: str | Path | None = None, provider_list: list[str] | None = None) -> dict[str, Any]:
    """Everything ``stn doctor`` shows."""
    return {"versions": versions(), "providers": providers(), "gpus": gpus(), "native_sampler": native_sampler(),
            "models": models(model_dir, provider_list)}


def format_report(r: dict[str, Any]) -> str:
    """The human-readable form of :func:`report`."""
    v = r["versions"]
    lines = [f"stn {v['stn']}  Python {v['python']}  ({v['platform']})",
             f"onnxruntime {v['onnxruntime']} ({v['onnxruntime_package']})  onnx {v['onnx']}  numpy {v['numpy']}  "
             f"torch {v['torch'] or 'not installed'}", "", "execution providers:"]
    for p in r["providers"]:
        lines.append(f"  {p['name']:<28} {'usable' if p['usable'] else 'NOT usable: ' + p['reason']}")
    g = r["gpus"]
    lines += ["", f"GPUs ({g['source'] or 'none found'}):"]
    for d in g["devices"]:
        lines.append(f"  [{d['index']}] {d['name']}, {d['memory_total_mib']} MiB, driver {d.get('driver') or '?'}")
    if not g["devices"]:
        lines.append(f"  none ({g['reason']})")
    n = r["native_sampler"]
    lines += ["", "native sampler library: " + (
        f"loads from {n['path']} (CUDA kernels: {'yes' if n.get('cuda') else 'no'})" if n.get("available")
        else n.get("reason") or "not available")]
    m = r["models"]
    lines += ["", f"models in {m['model_dir']}:"]
    for model in m["models"]:
        if model["ok"]:
            lines.append(f"  {model['name']:<24} ok ({model['transform']}, sampler {model['grid_sample']}) on "
                         f"{', '.join(model['providers'])}")
        else:
            lines.append(f"  {model['name']:<24} FAILS: {model['reason']}")
    return "\n".join(lines)


def healthy(r: dict[str, Any]) -> bool:
    """Every model loads (what ``stn doctor``'s exit status says)."""
    return bool(r["models"]["models"]) and all(m["ok"] for m in r["models"]["models"])


__all__ = ["report", "format_report", "healthy", "versions", "providers", "gpus", "native_sampler", "models"]
