"""``stn doctor --gpu``: the checks that prove the GPU path, one function each, and their JSON record.

Every check takes a :class:`GpuContext` and returns details (a dict), raises :class:`Skip`
(it cannot run here: the reason says why) or :class:`CheckFailed` (the reason names what is
wrong: the node, the difference, the status code). The execution provider is a parameter of
the context, so the same functions run on the CPU provider in the test suite (a rehearsal:
``stn doctor --gpu --provider CPUExecutionProvider``) and on CUDA on a GPU machine.

Checks (the numbers of issue 15):

1. ``node_placement``: every sub-model (resize, localiser, sampler) of every served model and
   of the 224x224 affine bench model runs on the provider alone: a session with
   ``session.disable_cpu_ep_fallback`` (GPU providers) must be created, and onnxruntime's
   verbose node-placement log must list no node on another provider (the check names them).
   When the native sampler library is usable on the provider, the native sampler sub-model
   (what the service runs) is checked too, with the library registered.
2. ``parity``: each model's outputs on the provider (the sampler the service picks: native
   when usable) equal the CPU provider's with the exported lowering within 1e-4, the
   IO-binding path equals the plain path, and the provider's exported lowering too.
3. ``sampler_parity``: onnxruntime's GridSample (standard and ``com.microsoft``) and the native
   ``ai.stn`` ops (``GridSample``, and ``Warp`` for affine and projective theta) on the
   provider equal torch ``grid_sample`` on the matching device.
4. ``throughput``: images/s side by side in one run: onnxruntime on the provider (exported
   lowering and the native one, each plain and with IO binding) vs torch eager on the device,
   bundled checkpoints and the 224x224 affine model, batch 1, 32, 256.
5. ``serve``: ``stn serve`` on the provider answers, ``/v1/models`` shows the provider, device
   memory before and after a burst of large images; then a short ``stn bench serve``.
6. ``batch``: ``stn batch`` with the provider; ``train``: ``stn train --device`` for a few
   hundred steps, with its speed; ``train_document``: the same for the document rectifier's
   trainer (``--distortion document``: photos composed in worker processes), with the fraction
   of the time it waited for photos.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import native
from service.settings import available_cpus

log = logging.getLogger(__name__)

SCHEMA = "stn-doctor-gpu/1"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PARITY_ATOL = 1e-4
BATCHES = (1, 32, 256)
GOAL_ORT_VS_TORCH_B32 = 1.0  # onnxruntime CUDA >= torch CUDA eager at batch 32 on affine224
GOAL_SERVICE_VS_BARE = 0.85  # the service at saturation >= 0.85 of bare onnxruntime


class Skip(Exception):  # noqa: N818 (a check outcome, not an error)
    """The check cannot run here; the message says why."""


class CheckFailed(Exception):
    """The check ran and found a problem; the message names it."""


@dataclass
class GpuContext:
    """What the checks share: the provider under test, the matching torch device, the models, sizes."""

    model_dir: Path
    workdir: Path
    provider: str = CUDA
    quick: bool = False  # small sizes and short runs (the CPU rehearsal in the tests)
    bench_model: bool = True  # also check the 224x224 affine bench model (exported here; needs torch)
    goals: list[dict[str, Any]] = field(default_factory=list)
    _files: list[tuple[str, Path]] | None = None

    @property
    def ort_device(self) -> str:
        from service.runtime import GPU_DEVICES

        return GPU_DEVICES.get(self.provider, "cpu")

    @property
    def torch_device(self) -> str:
        return "cuda" if self.ort_device == "cuda" else "cpu"

    @property
    def batches(self) -> tuple[int, ...]:
        return (1, 4) if self.quick else BATCHES

    def providers(self) -> list[str]:
        return [self.provider] if self.provider == CPU else [self.provider, CPU]

    def model_files(self) -> list[tuple[str, Path]]:
        """(name, .onnx) for every served model and the 224x224 affine bench model (exported once, needs torch)."""
        if self._files is None:
            from service.runtime import model_files

            files = [(p.stem, p) for p in model_files(self.model_dir)]
            if self.bench_model and has_torch():
                from export.bench import synthetic_affine224
                from export.onnx_export import export_onnx, info_for

                path = self.workdir / "affine224.onnx"
                if not path.exists():
                    stn = synthetic_affine224()
                    export_onnx(stn, path, info_for(stn, {}, "onnx", "affine224", "bench", "stn doctor --gpu"),
                                lowering="onnx")
                files.append(("affine224", path))
            self._files = files
        return self._files

    def goal(self, name: str, value: float, target: float, met: bool, command: str = "") -> None:
        self.goals.append({"goal": name, "value": round(value, 4), "target": target, "met": met, "measured_by": command})


def has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


# ------------------------------------------------------------------------ 1. node placement

_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d ")
_PLACED = re.compile(r"(?:All nodes|Node\(s\)) placed on \[(\w+)\]\. Number of nodes: (\d+)")
_NODE = re.compile(r"^\s+(\S+) \((.*)\)\s*$")


def native_usable(ctx: GpuContext) -> str:
    """'' when the native sampler library can run on ``ctx``'s provider, else why not."""
    st = native.status()
    if not st["available"]:
        return f"the native sampler library is not usable: {st['reason']}"
    if ctx.ort_device != "cpu" and not st["cuda"]:
        return f"the native library has no CUDA kernels here: {st['cuda_reason']}"
    return ""


def parse_placements(text: str) -> dict[str, list[str]]:
    """onnxruntime's verbose "Node placements" log -> {provider: ["OpType (node name)", ...]}.

    ``All nodes placed on [EP]. Number of nodes: N`` gives N unnamed nodes (``"*"`` entries);
    ``Node(s) placed on [EP]. Number of nodes: N`` is followed by one ``  OpType (name)`` line each.
    """
    out: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        m = _PLACED.search(line)
        if m:
            current = m.group(1)
            out.setdefault(current, [])
            if "All nodes" in line:
                out[current] += ["*"] * int(m.group(2))
                current = None
            continue
        if current and not _LOG_LINE.match(line):
            n = _NODE.match(line)
            if n:
                out[current].append(f"{n.group(1)} ({n.group(2)})")
                continue
        current = None
    return out


@contextlib.contextmanager
def _capture_stderr_fd() -> Iterator[io.StringIO]:
    """Collect what native code writes to file descriptor 2 (onnxruntime's log) during the block."""
    buffer = io.StringIO()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield buffer
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            buffer.write(tmp.read().decode(errors="replace"))


def node_placement(model: bytes, provider: str, with_native: bool = False) -> dict[str, Any]:
    """Create a session on ``provider`` alone (CPU fallback disabled for GPU providers) and read where nodes went.

    ``with_native`` registers the native sampler library (its CUDA build on a GPU provider).
    Returns {"session": "ok" | error text, "placements": {provider: [nodes]}, "elsewhere": [nodes not on it]}.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if with_native:
        native.register(so, [provider])
    so.log_severity_level = 0
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = [provider]
    if provider != CPU:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    session_error = ""
    with _capture_stderr_fd() as captured:
        try:
            ort.InferenceSession(model, so, providers=providers)
        except Exception as e:  # noqa: BLE001 (onnxruntime's error types)
            session_error = str(e).strip()
    placements = parse_placements(captured.getvalue())
    if not session_error and not placements:
        session_error = "onnxruntime logged no node placements (its log format changed?)"
    elsewhere = [f"{node} on {ep}" for ep, nodes in placements.items() if ep != provider for node in nodes]
    return {"session": session_error or "ok", "placements": {k: len(v) for k, v in placements.items()},
            "elsewhere": elsewhere}


def check_node_placement(ctx: GpuContext) -> dict[str, Any]:
    import onnx

    from export import native_sampler
    from export.contract import split
    from export.metadata import ModelInfo

    details: dict[str, Any] = {}
    problems = []
    no_native = native_usable(ctx)
    if no_native:
        details["native"] = f"skipped: {no_native}"
    for name, path in ctx.model_files():
        proto = onnx.load(str(path))
        info = ModelInfo.from_proto(proto)
        subs = split(proto, info)
        parts = [(part, getattr(subs, part), False) for part in ("resize", "localiser", "sampler")]
        if not no_native:
            parts.append(("sampler-native", native_sampler.sampler_model(info, like=proto), True))
        for part, sub, with_native in parts:
            found = node_placement(sub.SerializeToString(), ctx.provider, with_native)
            details[f"{name}/{part}"] = found
            if found["session"] != "ok":
                problems.append(f"{name}/{part}: {found['session'][:300]}")
            if found["elsewhere"]:
                problems.append(f"{name}/{part}: not on {ctx.provider}: {', '.join(found['elsewhere'])}")
    if problems:
        raise CheckFailed("; ".join(problems))
    return details


# ------------------------------------------------------------------------------- 2. parity


def _test_image(channels: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A smooth random image [1, C, H, W]: 9x9 random values, interpolated linearly.

    Smooth, because samplers that compute the same coordinate in another order (a matmul, the native
    Warp's per-row pass, a GPU's fused multiply-add) differ by an ulp of it, and on pixel noise an
    ulp of a coordinate is a visible difference of value.
    """
    def ramp(n: int) -> np.ndarray:  # [n, 9]: linear interpolation weights from 9 knots to n points
        return np.maximum(0.0, 1.0 - np.abs(np.linspace(0, 8, n)[:, None] - np.arange(9)[None, :]))

    coarse = np.random.default_rng(seed).random((channels, 9, 9))
    return (ramp(size[0]) @ coarse @ ramp(size[1]).T)[None].astype(np.float32)


def check_parity(ctx: GpuContext) -> dict[str, Any]:
    from service.runtime import SessionConfig, load_model

    details: dict[str, Any] = {}
    problems = []
    for name, path in ctx.model_files():
        # the reference: the CPU provider with the sampler the file was exported with
        ref = load_model(path, SessionConfig(providers=(CPU,), io_binding=False, native_sampler="off"))
        runs = {}
        for key, binding, sampler in (("plain", False, "auto"), ("io_binding", True, "auto"),
                                      ("exported", False, "off")):
            rt = load_model(path, SessionConfig(providers=tuple(ctx.providers()), io_binding=binding,
                                                native_sampler=sampler))
            if rt.providers[0] != ctx.provider:
                raise CheckFailed(f"{name}: sessions run on {rt.providers}, not on {ctx.provider}")
            runs[key] = rt
        lh, lw = ref.info.loc_size
        image = _test_image(ref.info.in_channels, (lh * 3 // 2 + 1, lw * 2 + 3))
        out = {}
        for key, rt in (("cpu", ref), *runs.items()):
            dev = rt.upload(image)
            theta = rt.localise(rt.normalize(rt.resize(dev)))
            out[key] = (theta, rt.sample(dev, theta))
        diffs = {
            "theta_vs_cpu": float(np.abs(out["plain"][0] - out["cpu"][0]).max()),
            "rectified_vs_cpu": float(np.abs(out["plain"][1] - out["cpu"][1]).max()),
            "theta_io_vs_plain": float(np.abs(out["io_binding"][0] - out["plain"][0]).max()),
            "rectified_io_vs_plain": float(np.abs(out["io_binding"][1] - out["plain"][1]).max()),
            "rectified_exported_vs_cpu": float(np.abs(out["exported"][1] - out["cpu"][1]).max()),
        }
        details[name] = {**diffs, "sampler": runs["plain"].sampler["implementation"]}
        bad = [f"{k} {v:.2e}" for k, v in diffs.items() if not v <= PARITY_ATOL]
        if bad:
            problems.append(f"{name}: max abs difference above {PARITY_ATOL}: {', '.join(bad)}")
    if problems:
        raise CheckFailed("; ".join(problems))
    return details


# ---------------------------------------------------------------------- 3. sampler parity


def _session(ctx: GpuContext, model: bytes | str, with_native: bool = False) -> Any:
    """An onnxruntime session on ``ctx``'s providers, quiet; ``with_native`` registers the native library."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if with_native:
        native.register(so, ctx.providers())
    return ort.InferenceSession(model, so, providers=ctx.providers())


def _compare(label: str, mode: str, got: np.ndarray, want: np.ndarray, providers: list[str],
             details: dict[str, Any], problems: list[str]) -> None:
    """Record ``got`` vs ``want``; nearest: a point exactly between two pixels may round either way, so count those."""
    diff = float(np.abs(got - want).max())
    if mode == "nearest":
        frac = float((np.abs(got - want) > PARITY_ATOL).mean())
        details[label] = {"max_abs": diff, "mismatch_fraction": frac}
        ok = frac < 1e-3
    else:
        details[label] = {"max_abs": diff}
        ok = diff <= PARITY_ATOL
    details[label]["providers"] = providers[:1]
    if not ok:
        problems.append(f"{label} vs torch: max abs {diff:.2e}")


def check_sampler_parity(ctx: GpuContext) -> dict[str, Any]:
    if not has_torch():
        raise Skip("torch is not installed (the reference is torch grid_sample)")
    import torch
    import torch.nn.functional as F

    from models.transforms import make_transform

    if ctx.torch_device == "cuda" and not torch.cuda.is_available():
        raise Skip(f"torch {torch.__version__} has no CUDA device (the reference is torch CUDA grid_sample)")
    g = torch.Generator().manual_seed(0)
    # a smooth image: the native Warp computes coordinates per row, which rounds differently from a matmul by an ulp
    x = F.interpolate(torch.rand(2, 3, 9, 11, generator=g), size=(97, 131), mode="bilinear")
    grid = torch.rand(2, 61, 83, 2, generator=g) * 2.4 - 1.2  # some points outside the input
    thetas = {"affine": torch.tensor([[[0.9, -0.3, 0.1], [0.35, 1.1, -0.2]], [[1.2, 0.1, 0.3], [-0.1, 0.8, 0.0]]]),
              "projective": torch.tensor([[[0.9, -0.2, 0.1], [0.3, 1.0, -0.1], [0.15, -0.1, 1.0]],
                                          [[1.1, 0.1, 0.0], [0.0, 0.9, 0.2], [-0.1, 0.2, 1.0]]])}
    dev = ctx.torch_device
    no_native = native_usable(ctx)
    details: dict[str, Any] = {"native": f"skipped: {no_native}" if no_native else native.status()["info"]}
    problems: list[str] = []

    for mode in ("bilinear", "nearest"):
        for padding in ("zeros", "border"):
            want = F.grid_sample(x.to(dev), grid.to(dev), mode=mode, padding_mode=padding,
                                 align_corners=False).cpu().numpy()
            contenders = [("onnx", "", False), ("contrib", "com.microsoft", False)]
            contenders += [] if no_native else [("native", native.DOMAIN, True)]
            for label, domain, with_native in contenders:
                sess = _session(ctx, native.op_model(native.GRID_SAMPLE, mode, padding, domain=domain), with_native)
                got = sess.run(None, {"X": x.numpy(), "G": grid.numpy()})[0]
                _compare(f"{label}/{mode}/{padding}", mode, got, want, sess.get_providers(), details, problems)
            if no_native:
                continue
            # the fused op: theta in, the sampling coordinates computed inside the kernel
            sess = _session(ctx, native.op_model(native.WARP, mode, padding), True)
            for family, theta in thetas.items():
                transform = make_transform(family)
                ref_grid = transform.grid(theta, transform.base_grid((61, 83)))
                want = F.grid_sample(x.to(dev), ref_grid.to(dev), mode=mode, padding_mode=padding,
                                     align_corners=False).cpu().numpy()
                got = sess.run(None, {"X": x.numpy(), "T": theta.numpy(), "S": np.zeros((61, 83, 3), np.float32)})[0]
                _compare(f"native-warp-{family}/{mode}/{padding}", mode, got, want, sess.get_providers(), details,
                         problems)
    if problems:
        raise CheckFailed("; ".join(problems))
    return details


# --------------------------------------------------------------------------- 4. throughput


def check_throughput(ctx: GpuContext) -> dict[str, Any]:
    if not has_torch():
        raise Skip("torch is not installed (torch eager is the baseline)")
    import onnxruntime as ort
    import torch

    from export.bench import default_checkpoint, synthetic_affine224, time_round
    from export.onnx_export import export_onnx, info_for
    from models.checkpoint import load_checkpoint

    if ctx.torch_device == "cuda" and not torch.cuda.is_available():
        raise Skip(f"torch {torch.__version__} has no CUDA device")
    device = torch.device(ctx.torch_device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    min_seconds, rounds = (0.05, 1) if ctx.quick else (0.5, 3)
    models = []
    ckpt = default_checkpoint()
    if ckpt is not None:
        models.append(("default", load_checkpoint(ckpt).build_stn(), None))
    models.append(("affine224", synthetic_affine224(), (224, 224)))
    no_native = native_usable(ctx)
    lowerings = {"ort": "onnx"} if no_native else {"ort": "onnx", "ort-native": "native"}
    rows = []
    for name, stn, size in models:
        stn = stn.eval()
        sessions = {}
        for label, lowering in lowerings.items():
            path = ctx.workdir / f"tp-{name}-{lowering}.onnx"
            export_onnx(stn.cpu(), path, info_for(stn, {}, lowering, name, "bench", "stn doctor --gpu"),
                        lowering=lowering)
            sessions[label] = _session(ctx, str(path), lowering == "native")
        stn = stn.to(device)
        h, w = size or stn.config.output_size
        for batch in ctx.batches:
            x = torch.rand(batch, stn.config.in_channels, h, w, generator=torch.Generator().manual_seed(batch))
            x_np, x_dev = x.numpy(), x.to(device)
            value = ort.OrtValue.ortvalue_from_numpy(x_np, ctx.ort_device, 0)

            def torch_run(x_dev: torch.Tensor = x_dev, stn: torch.nn.Module = stn) -> None:
                with torch.inference_mode():
                    stn(x_dev)
                sync()

            def ort_plain(sess: ort.InferenceSession, x_np: np.ndarray = x_np) -> None:
                sess.run(None, {"image": x_np})

            def ort_bound(sess: ort.InferenceSession, value: ort.OrtValue = value) -> None:
                binding = sess.io_binding()
                binding.bind_ortvalue_input("image", value)
                binding.bind_output("rectified", ctx.ort_device)
                binding.bind_output("theta", ctx.ort_device)
                sess.run_with_iobinding(binding)

            contenders: dict[str, Callable[[], None]] = {"torch-eager": torch_run}
            for label, sess in sessions.items():
                contenders[f"{label}-plain"] = functools.partial(ort_plain, sess)
                contenders[f"{label}-iobinding"] = functools.partial(ort_bound, sess)
            per: dict[str, list[float]] = {k: [] for k in contenders}
            for _ in range(rounds):
                for k, fn in contenders.items():
                    fn()
                    fn()
                    per[k].append(batch / time_round(fn, min_seconds, 3))
            base = statistics.median(per["torch-eager"])
            for k, v in per.items():
                ips = statistics.median(v)
                rows.append({"model": name, "batch": batch, "contender": k, "images_per_s": round(ips, 1),
                             "vs_torch": round(ips / base, 3)})
    native_note = f"skipped: {no_native}" if no_native else "ort-native: exported with --grid-sample native"
    b32 = [r for r in rows if r["model"] == "affine224" and r["batch"] == 32 and r["contender"].startswith("ort")]
    if b32:
        best = max(r["vs_torch"] for r in b32)
        ctx.goal("onnxruntime vs torch eager, affine224 batch 32", best, GOAL_ORT_VS_TORCH_B32,
                 best >= GOAL_ORT_VS_TORCH_B32, "stn doctor --gpu (throughput)")
    return {"rows": rows, "native": native_note, "device": str(device), "provider": ctx.provider}


# -------------------------------------------------------------------------------- 5. serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stn(*args: str) -> list[str]:
    return [sys.executable, "-m", "stn", *args]


def _env(ctx: GpuContext, **extra: str) -> dict[str, str]:
    root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else ""),
            "STN_PROVIDERS": ",".join(ctx.providers()), **extra}


def _http(method: str, url: str, body: bytes | None = None, content_type: str | None = None,
          timeout: float = 30.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (127.0.0.1 only)
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _png(width: int, height: int, seed: int = 0) -> bytes:
    from PIL import Image

    arr = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def device_memory_mib(pid: int, ort_device: str) -> float | None:
    """Device memory held by process ``pid`` (nvidia-smi) on CUDA; its resident memory on the CPU."""
    if ort_device == "cuda":
        smi = shutil.which("nvidia-smi")
        if not smi:
            return None
        proc = subprocess.run([smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20)
        for line in proc.stdout.splitlines():
            fields = [f.strip() for f in line.split(",")]
            if len(fields) == 2 and fields[0] == str(pid):
                return float(fields[1])
        return 0.0
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(m.group(1)) / 1024 if m else None


def check_serve(ctx: GpuContext) -> dict[str, Any]:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = ctx.workdir / "serve.log"
    with open(log_path, "wb") as logf:
        server = subprocess.Popen(_stn("serve", "--model-dir", str(ctx.model_dir), "--port", str(port),
                                       "--log-level", "warning"), stdout=logf, stderr=subprocess.STDOUT,
                                  env=_env(ctx))
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise CheckFailed(f"stn serve exited with {server.returncode}: {log_path.read_text()[-800:]}")
            try:
                if _http("GET", base + "/readyz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise CheckFailed("stn serve was not ready within 120 s")
            time.sleep(0.3)
        status, body = _http("GET", base + "/v1/models")
        listed = json.loads(body)
        models = listed.get("models", listed.get("data", listed)) if isinstance(listed, dict) else listed
        sessions = {m["name"]: m.get("sessions") for m in models} if isinstance(models, list) else {}
        off = {n: s for n, s in sessions.items() if not s or any(v[0] != ctx.provider for v in s.values())}
        if status != 200 or not sessions or off:
            raise CheckFailed(f"/v1/models ({status}) does not show every session on {ctx.provider}: {off or body[:300]}")
        small = _png(320, 240)
        status, body = _http("POST", base + "/v1/rectify", small, "image/png")
        if status != 200:
            raise CheckFailed(f"POST /v1/rectify answered {status}: {body[:300]!r}")
        before = device_memory_mib(server.pid, ctx.ort_device)
        size = (800, 600) if ctx.quick else (4000, 3000)
        big = _png(*size, seed=1)
        burst = 2 if ctx.quick else 8
        codes = [_http("POST", base + "/v1/rectify", big, "image/png", timeout=120)[0] for _ in range(burst)]
        after_burst = device_memory_mib(server.pid, ctx.ort_device)
        for _ in range(5):
            _http("POST", base + "/v1/rectify", small, "image/png")
        time.sleep(1.0)
        after_small = device_memory_mib(server.pid, ctx.ort_device)
        if any(c != 200 for c in codes):
            raise CheckFailed(f"a burst of {size[0]}x{size[1]} images answered {codes}")
        memory = {"unit": "MiB", "what": "nvidia-smi used_memory" if ctx.ort_device == "cuda" else "VmRSS",
                  "before": before, "after_burst": after_burst, "after_small_requests": after_small,
                  "burst": f"{burst} x {size[0]}x{size[1]} PNG"}
        if before is not None and after_small is not None:
            memory["returned"] = after_small <= before * 1.1 + 64
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    details: dict[str, Any] = {"sessions": sessions, "memory": memory}
    bench = subprocess.run(
        _stn("bench", "serve", "--model-dir", str(ctx.model_dir), "--concurrency", "1,8" if ctx.quick else "1,8,32",
             "--duration", "1" if ctx.quick else "3", "--warmup", "0.3", "--rounds", "1" if ctx.quick else "2",
             "--targets", "bare,service", "--server-cpus", _cpus(0), "--client-cpus", _cpus(1)),
        capture_output=True, text=True, timeout=300, env=_env(ctx))
    lines = [ln for ln in bench.stdout.strip().splitlines() if ln.startswith("{")]
    if bench.returncode != 0 or not lines:
        raise CheckFailed(f"stn bench serve failed ({bench.returncode}): {(bench.stderr or bench.stdout)[-600:]}")
    summary = json.loads(lines[-1])
    details["bench_serve"] = summary
    ratio = _service_vs_bare(summary)
    if ratio is not None:
        ctx.goal("service at saturation vs bare onnxruntime", ratio, GOAL_SERVICE_VS_BARE,
                 ratio >= GOAL_SERVICE_VS_BARE, "stn bench serve (in stn doctor --gpu)")
    return details


def _cpus(which: int) -> str:
    n = available_cpus()
    if n < 2:
        return "0"
    half = n // 2
    return f"0-{half - 1}" if which == 0 else f"{half}-{n - 1}"


def _service_vs_bare(summary: dict[str, Any]) -> float | None:
    """The best service/bare throughput ratio that ``stn bench serve`` reports, when it reports one."""
    ratio = summary.get("throughput_service_vs_bare")
    return float(ratio) if isinstance(ratio, int | float) else None


# ------------------------------------------------------------------------- 6. batch, train


def check_batch(ctx: GpuContext) -> dict[str, Any]:
    from PIL import Image

    src, dst = ctx.workdir / "batch-in", ctx.workdir / "batch-out"
    src.mkdir(exist_ok=True)
    n = 4 if ctx.quick else 32
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((240, 320, 3)) * 255).astype(np.uint8)).save(src / f"img{i:03d}.png")
    t0 = time.perf_counter()
    proc = subprocess.run(_stn("batch", str(src), str(dst), "--model", str(ctx.model_dir), "--providers",
                               ",".join(ctx.providers()), "--no-progress", "--overwrite"),
                          capture_output=True, text=True, timeout=300, env=_env(ctx))
    seconds = time.perf_counter() - t0
    outputs = sorted(p.name for p in dst.rglob("*.png"))
    if proc.returncode != 0 or len(outputs) != n:
        raise CheckFailed(f"stn batch exited {proc.returncode} with {len(outputs)}/{n} outputs: "
                          f"{(proc.stderr or proc.stdout)[-600:]}")
    text = proc.stdout + proc.stderr
    if ctx.provider != CPU and ctx.provider not in text:
        log.info("stn batch did not print its provider; its output: %s", text[-300:])
    return {"images": n, "seconds": round(seconds, 2), "providers": ctx.providers(), "output": text.strip()[-400:]}


def check_train(ctx: GpuContext) -> dict[str, Any]:
    if not has_torch():
        raise Skip("torch is not installed (a serving-only install cannot train)")
    from models.data import write_idx

    data = ctx.workdir / "train-data"
    data.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 2048 if not ctx.quick else 96), ("t10k", 256 if not ctx.quick else 32)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = np.zeros((n, 28, 28), np.uint8)
        for i, label in enumerate(labels):  # a bar whose position is the class
            images[i, 4 + 2 * label : 7 + 2 * label, 4:24] = 200
        write_idx(data / f"{split}-images-idx3-ubyte", images)
        write_idx(data / f"{split}-labels-idx1-ubyte", labels)
    details, m = _train(ctx, ["--data", str(data), "--steps", "8" if ctx.quick else "300", "--batch-size",
                              "32" if ctx.quick else "128", "--workers", "0" if ctx.quick else "2"], "train-out")
    return {**details, "test_error": m.get("test_error")}


def check_train_document(ctx: GpuContext) -> dict[str, Any]:
    """``stn train --distortion document --device`` (the bundled model's trainer) for a few hundred steps."""
    if not has_torch():
        raise Skip("torch is not installed (a serving-only install cannot train)")
    workers = 0 if ctx.quick else max(1, min(8, (os.cpu_count() or 2) - 2))
    args = ["--mode", "rectify", "--distortion", "document", "--transform", "projective",
            "--steps", "8" if ctx.quick else "300", "--batch-size", "8" if ctx.quick else "32",
            "--limit-test", "8" if ctx.quick else "64", "--workers", str(workers)]
    if ctx.quick:
        args += ["--loc-size", "32", "32", "--output-size", "42", "30"]
    details, m = _train(ctx, args, "train-document-out")
    return {**details, "corner_error_median": m["corner_error_median"]}


def _train(ctx: GpuContext, options: list[str], out: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``stn train OPTIONS`` on the context's device (bf16 autocast on CUDA): the check's details, the run's metrics."""
    args = ["train", *options, "--device", ctx.torch_device, *(["--amp", "bf16"] if ctx.torch_device == "cuda" else []),
            "--no-progress", "--out", str(ctx.workdir / out)]
    proc = subprocess.run(_stn(*args), capture_output=True, text=True, timeout=600, env=_env(ctx))
    if proc.returncode != 0:
        raise CheckFailed(f"stn {' '.join(args)} exited {proc.returncode}: {proc.stderr[-600:]}")
    m = json.loads((ctx.workdir / out / "metrics.json").read_text())
    return {"command": "stn " + " ".join(args), "device": m["device"], "amp": m["amp"], "steps": m["steps"],
            "workers": m["workers"], "steps_per_second": round(m["steps_per_second"], 2),
            "train_seconds": round(m["train_seconds"], 2),
            "data_wait_fraction": round(m["data_wait_fraction"], 3)}, m


# ------------------------------------------------------------------------------- the run

CHECKS: dict[str, Callable[[GpuContext], dict[str, Any]]] = {
    "node_placement": check_node_placement,
    "parity": check_parity,
    "sampler_parity": check_sampler_parity,
    "throughput": check_throughput,
    "serve": check_serve,
    "batch": check_batch,
    "train": check_train,
    "train_document": check_train_document,
}


def run_check(name: str, fn: Callable[[GpuContext], dict[str, Any]], ctx: GpuContext) -> dict[str, Any]:
    t0 = time.perf_counter()
    entry: dict[str, Any] = {"name": name, "status": "pass", "reason": "", "details": {}}
    try:
        entry["details"] = fn(ctx)
    except Skip as e:
        entry.update(status="skip", reason=str(e))
    except CheckFailed as e:
        entry.update(status="fail", reason=str(e))
    except Exception as e:  # noqa: BLE001 (one broken check must not hide the others)
        entry.update(status="fail", reason=f"{type(e).__name__}: {e}")
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    return entry


def no_gpu_reason(report: dict[str, Any], provider: str) -> str:
    """Why there is no GPU to check ("" when there is one, or when rehearsing on the CPU provider)."""
    if provider == CPU:
        return ""
    if report["gpus"]["devices"]:
        return ""
    status = next((p for p in report["providers"] if p["name"] == provider), None)
    why = "not in this onnxruntime build" if status is None else (status["reason"] or "usable")
    return f"no GPU found ({report['gpus']['reason']}); {provider}: {why}"


def run_gpu_checks(model_dir: str | Path | None = None, provider: str = CUDA, only: list[str] | None = None,
                   quick: bool = False, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the checks; the record (``SCHEMA``): report, checks, goals, ok, exit_code (0, 1 on a failure, 2 no GPU)."""
    from service import doctor
    from service.settings import Settings

    folder = Path(model_dir) if model_dir else Settings().model_dir
    started = datetime.datetime.now(datetime.UTC)
    report = doctor.report(folder, [provider, CPU] if provider != CPU else [CPU])
    record: dict[str, Any] = {"schema": SCHEMA, "started": started.isoformat(timespec="seconds"),
                              "command": "stn " + " ".join(sys.argv[1:]) if sys.argv else "", "provider": provider,
                              "model_dir": str(folder), "report": report, "checks": [], "goals": []}
    reason = no_gpu_reason(report, provider)
    if reason:
        record.update(ok=False, exit_code=2, no_gpu=reason)
    else:
        unknown = sorted(set(only or []) - set(CHECKS))
        if unknown:
            raise ValueError(f"unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
        with tempfile.TemporaryDirectory(prefix="stn-doctor-") as tmp:
            ctx = GpuContext(folder, Path(tmp), provider, quick)
            for name, fn in CHECKS.items():
                if only and name not in only:
                    continue
                entry = run_check(name, fn, ctx)
                record["checks"].append(entry)
                if progress:
                    progress(f"{name}: {entry['status']} ({entry['seconds']} s){' - ' + entry['reason'] if entry['reason'] else ''}")
            record["goals"] = ctx.goals
        failed = [c["name"] for c in record["checks"] if c["status"] == "fail"]
        record.update(ok=not failed, exit_code=1 if failed else 0, failed=failed)
    record["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return record


def write_record(record: dict[str, Any], path: str | Path) -> None:
    """The record as JSON, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)


__all__ = ["SCHEMA", "CHECKS", "GpuContext", "Skip", "CheckFailed", "parse_placements", "node_placement",
           "run_check", "run_gpu_checks", "no_gpu_reason", "write_record", "device_memory_mib"]
