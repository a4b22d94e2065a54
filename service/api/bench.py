"""``stn bench serve``: the HTTP service vs (a) the bare pipeline and (b) a naive FastAPI + PyTorch server.

All three run pinned to the server CPUs (``taskset``); the load generator runs pinned to the
client CPUs, so it does not steal the server's time. Each target gets the same JPEG uploads
(a raw ``image/jpeg`` body per request; the response is the rectified image, ``--format``)
at each concurrency, for ``--duration`` seconds after a short warm-up; we report
throughput (images/s) and p50/p99 latency. The last line printed is one JSON object with the
ratios at saturation (each target's best throughput over the concurrency levels; also
at the highest concurrency, and per CPU-second of the server).

Other work on the machine steals time from the pinned CPU, so targets are measured in
interleaved rounds and each keeps its best round; each row also shows the server's CPU
time per image (``img/cpu-s``, from /proc), which such interference barely moves.

- (a) ``bare``: decode, resize, localise, sample and encode the same images with
  ``service.pipeline`` in one process, no HTTP, one thread per concurrency slot.
- (b) ``naive``: the server a user would otherwise write: FastAPI, PyTorch eager, one
  image per request (``NAIVE_SERVER`` below).
- ``service``: ``stn serve`` with default settings except the model folder.

The bench may import torch (for the naive baseline and to export a stand-in model when the
bundled default model is absent); the service it measures does not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.metadata import ModelInfo
from service import images, pipeline
from service.api.workers import tune_malloc
from service.runtime import load_model, model_files
from service.settings import Settings, default_model_dir
from service.standin import description, make_jpegs, standin_model

ROOT = Path(__file__).resolve().parents[2]  # the repository (service/api/bench.py)
GOALS = {"service_vs_bare": 0.85, "service_vs_naive": 2.0}

NAIVE_SERVER = r'''
# The naive baseline: FastAPI + PyTorch eager, one image per request, no batching.
import io, sys
import numpy as np, torch
from fastapi import FastAPI, Request, Response
from PIL import Image
from models.checkpoint import load_checkpoint

stn = load_checkpoint(sys.argv[1]).build_stn().eval()
cfg = stn.config
mean = torch.tensor(cfg.mean).view(1, -1, 1, 1)
std = torch.tensor(cfg.std).view(1, -1, 1, 1)
app = FastAPI()

@app.post("/v1/rectify")
async def rectify(request: Request) -> Response:
    img = Image.open(io.BytesIO(await request.body())).convert("L" if cfg.in_channels == 1 else "RGB")
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    x = x[None, None] if x.dim() == 2 else x.permute(2, 0, 1)[None]
    with torch.no_grad():
        rectified, theta = stn((x - mean) / std)
    out = ((rectified * std + mean).clamp(0, 1)[0] * 255 + 0.5).byte().permute(1, 2, 0).squeeze(-1).numpy()
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, "PNG", compress_level=1)
    return Response(buf.getvalue(), media_type="image/png", headers={"X-STN-Theta": str(theta[0].tolist())})
'''


@dataclass
class Level:
    concurrency: int
    images: int
    seconds: float
    errors: int
    latencies: list[float]
    cpu_seconds: float  # CPU time the measured process used meanwhile (all its threads)
    loop_cpu_seconds: float = 0.0  # of which its main thread (the event loop; 0 for the bare pipeline: not measured)
    client_cpu_seconds: float = 0.0  # CPU time of the load generator (this process) meanwhile

    def summary(self) -> dict:
        lat = np.asarray(self.latencies) * 1e3 if self.latencies else np.asarray([np.nan])
        return {"concurrency": self.concurrency, "throughput": round(self.images / self.seconds, 1),
                "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2),
                "errors": self.errors, "requests": self.images,
                "img_per_cpu_s": round(self.images / max(self.cpu_seconds, 1e-9), 1),
                "cpu_share": round(self.cpu_seconds / self.seconds, 2),
                "loop_cpu_share": round(self.loop_cpu_seconds / self.seconds, 2),
                "client_cpu_share": round(self.client_cpu_seconds / self.seconds, 2)}


# ---- inputs -------------------------------------------------------------------------------------

def resolve_model(model_dir: str | None, workdir: Path) -> tuple[Path, str, Path, str]:
    """(model folder, model name, torch checkpoint for the naive server, description)."""
    import torch  # noqa: F401 (heavy, optional: the bench needs it for the naive baseline and the stand-in)

    from models.checkpoint import save_checkpoint
    from models.stn import SpatialTransformer, STNConfig

    folder = Path(model_dir) if model_dir else default_model_dir()
    files = model_files(folder)
    if files:
        onnx_path = files[0]
        pts = sorted(onnx_path.parent.glob("*.pt"))
        if pts:
            return folder, onnx_path.stem, pts[0], f"{onnx_path} (naive server: {pts[0].name})"
        info = ModelInfo.from_file(onnx_path)
        cfg = STNConfig(transform=info.transform, in_channels=info.in_channels, loc_size=info.loc_size,
                        output_size=info.output_size, mean=info.mean, std=info.std, tps_grid=info.tps_grid)
        ckpt = workdir / "naive.pt"
        save_checkpoint(ckpt, SpatialTransformer(cfg), {})
        return folder, onnx_path.stem, ckpt, f"{onnx_path} (naive server: same architecture, random weights)"
    onnx_path, ckpt = standin_model(workdir / "models")  # no model in the folder: the benches' stand-in
    return onnx_path.parent, onnx_path.stem, ckpt, f"{description()} (no model in {default_model_dir()})"


# ---- the bare pipeline (a), a pinned subprocess taking commands on stdin ------------------------------

def bare_main(model_dir: str, model: str, image_dir: str, fmt: str) -> None:
    """For each stdin line ``concurrency duration warmup``, print one JSON result line (no HTTP)."""
    s = Settings()
    tune_malloc(s.malloc_keep_mb * 1024 * 1024)  # as the service does: the comparison is about HTTP, not malloc
    rt = load_model(Path(model_dir) / f"{model}.onnx", s.session_config())
    rt.warmup(1)
    jpegs = [p.read_bytes() for p in sorted(Path(image_dir).glob("*.jpg"))]
    limits = images.Limits()

    def one(data: bytes) -> bytes:
        p = pipeline.prepare(rt, data, limits)
        [theta] = pipeline.localise(rt, [p])
        return pipeline.finish(rt, p, theta, fmt="png" if fmt == "json" else fmt).encoded

    print("ready", flush=True)
    for line in sys.stdin:
        c, duration, warmup = line.split()
        print(json.dumps(_bare_level(one, jpegs, int(c), float(duration), float(warmup)).summary()), flush=True)


def _bare_level(one, jpegs: list[bytes], c: int, duration: float, warmup: float) -> Level:  # noqa: ANN001
    """``c`` threads each running ``one`` on the images for ``duration`` seconds after ``warmup``."""
    lat: list[float] = []

    def worker(k: int, stop_at: float, record: bool) -> None:
        i = k
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            one(jpegs[i % len(jpegs)])
            if record:
                lat.append(time.perf_counter() - t0)
            i += c

    with ThreadPoolExecutor(c) as pool:
        warm_until = time.perf_counter() + warmup
        list(pool.map(lambda k: worker(k, warm_until, False), range(c)))
        t0, cpu0 = time.perf_counter(), time.process_time()
        list(pool.map(lambda k: worker(k, t0 + duration, True), range(c)))
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return Level(c, len(lat), seconds, 0, lat, cpu)


# ---- load generator ---------------------------------------------------------------------------------

async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one HTTP/1.1 response with a Content-Length body: (status, whether the server keeps the connection)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length, keep = 0, True
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            keep = False
    await reader.readexactly(length)
    return int(head[9:12]), keep


async def closed_loop(host: str, port: int, path: str, bodies: list[bytes], concurrency: int, duration: float,
                warmup: float, server_pid: int) -> Level:
    """Keep-alive HTTP/1.1 clients on raw sockets (a Python HTTP client library would be the bottleneck)."""
    requests = [(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/jpeg\r\n"
                 f"Content-Length: {len(b)}\r\n\r\n").encode() + b for b in bodies]
    lat: list[float] = []
    counts = {"ok": 0, "err": 0}
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration
    cpu_marks: list[tuple[float, float, float]] = []

    async def client(k: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        i = k
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                writer.write(requests[i % len(requests)])
                i += concurrency
                status, _ = await read_response(reader)
                t1 = time.perf_counter()
                if t0 >= measure_from and t1 <= stop_at:
                    lat.append(t1 - t0)
                    counts["ok" if status == 200 else "err"] += 1
        finally:
            writer.close()

    await asyncio.gather(mark_cpu(server_pid, measure_from, stop_at, cpu_marks), *(client(k) for k in range(concurrency)))
    (cpu0, loop0, me0), (cpu1, loop1, me1) = cpu_marks
    return Level(concurrency, counts["ok"], duration, counts["err"], lat, cpu1 - cpu0, loop1 - loop0, me1 - me0)


async def open_loop(host: str, port: int, path: str, bodies: list[bytes], rate: float, duration: float,
                    warmup: float, server_pid: int | None = None, connections: str = "new") -> dict:
    """Open-loop load: a new request every 1/``rate`` s, whatever the answers.

    ``connections``: ``"new"`` sends each request on a connection of its own (``Connection: close``:
    a client that connects per request); ``"pool"`` sends it on an idle keep-alive connection when
    there is one and opens one otherwise (what HTTP client libraries and load balancers do), closing
    a connection the server marks ``Connection: close``.

    Returns goodput (200s completed in the measured window, per second), the 503s, other failures, and
    the latency of ``/healthz`` probed every 50 ms meanwhile; with ``server_pid``, also the server's CPU
    share in the window (all threads, and its event-loop thread alone), the load generator's, and the
    server's goodput per CPU-second (what other load on the machine barely moves).
    Bounded: at most ``rate * (warmup + duration)`` requests, each with a 60 s limit.
    """
    if connections not in ("new", "pool"):
        raise ValueError(f"connections must be 'new' or 'pool', not {connections!r}")
    close = b"Connection: close\r\n" if connections == "new" else b""
    requests = [(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/jpeg\r\n"
                 f"Content-Length: {len(b)}\r\n").encode() + close + b"\r\n" + b for b in bodies]
    counts = {"ok": 0, "shed": 0, "other": 0}
    health: list[float] = []
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []  # pool mode: most recently used last
    opened = [0]
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration

    async def one(i: int) -> None:
        status, keep, conn = 0, False, None
        try:
            async with asyncio.timeout(60):
                conn = idle.pop() if idle else None
                if conn is None:
                    conn = await asyncio.open_connection(host, port)
                    opened[0] += 1
                conn[1].write(requests[i % len(requests)])
                status, keep = await read_response(conn[0])
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            status, keep = 0, False
        if conn is not None:
            if keep and connections == "pool" and time.perf_counter() < stop_at:
                idle.append(conn)
            else:
                conn[1].close()
        t1 = time.perf_counter()
        if measure_from <= t1 <= stop_at:  # answers completed in the window (the queue is full by then)
            counts["ok" if status == 200 else "shed" if status == 503 else "other"] += 1

    cpu_marks: list[tuple[float, float, float]] = []

    tasks, i = [], 0
    prober = asyncio.get_running_loop().run_in_executor(None, probe_health, host, port, measure_from, stop_at, health)
    marker = asyncio.create_task(mark_cpu(server_pid, measure_from, stop_at, cpu_marks)) if server_pid is not None else None
    while (now := time.perf_counter()) < stop_at:
        tasks.append(asyncio.create_task(one(i)))
        i += 1
        await asyncio.sleep(max(0.0, start + i / rate - now))
    await asyncio.gather(*tasks, prober, *([marker] if marker else []))
    for _, writer in idle:
        writer.close()
    health.sort()
    out = {"rate": round(rate, 1), "connections": connections, "opened": opened[0],
           "goodput": round(counts["ok"] / duration, 1), "shed_503": counts["shed"], "failed": counts["other"],
           "health_p99_ms": round(1e3 * health[int(0.99 * (len(health) - 1))], 1),
           "health_max_ms": round(1e3 * health[-1], 1), "health_probes": len(health)}
    if len(cpu_marks) == 2:
        (cpu0, loop0, me0), (cpu1, loop1, me1) = cpu_marks
        cpu = cpu1 - cpu0
        out.update(cpu_share=round(cpu / duration, 2), loop_cpu_share=round((loop1 - loop0) / duration, 2),
                   client_cpu_share=round((me1 - me0) / duration, 2),
                   goodput_per_cpu_s=round(counts["ok"] / max(cpu, 1e-9), 1))
    return out


def probe_health(host: str, port: int, measure_from: float, stop_at: float, out: list[float]) -> None:
    """``GET /healthz`` every 50 ms until ``stop_at``, each on a new connection; appends the latencies of the
    probes started after ``measure_from`` to ``out`` (5 s for one that fails, is not a 200 or takes longer).

    Blocking sockets on a thread of its own: a probe on the load generator's event loop would also
    time that loop's backlog of a thousand connections a second, not only the server's answer.
    """
    request = f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
    while (t0 := time.perf_counter()) < stop_at:
        try:
            with socket.create_connection((host, port), timeout=5) as sock:
                sock.sendall(request)
                answer = b""
                while chunk := sock.recv(4096):
                    answer += chunk
            latency = min(5.0, time.perf_counter() - t0) if answer.startswith(b"HTTP/1.1 200") else 5.0
        except OSError:
            latency = 5.0
        if t0 >= measure_from:
            out.append(latency)
        time.sleep(max(0.0, 0.05 - (time.perf_counter() - t0)))


def process_cpu_seconds(pid: int, main_thread_only: bool = False) -> float:
    """User + system CPU seconds of every thread of ``pid`` (or of its main thread alone) so far (Linux /proc)."""
    total = 0
    for tid in [str(pid)] if main_thread_only else os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def mark_cpu(pid: int, measure_from: float, stop_at: float, marks: list[tuple[float, float, float]]) -> None:
    """Append (the process's CPU seconds, its main thread's, this process's) at ``measure_from`` and at
    ``stop_at`` (perf_counter times) to ``marks``."""
    for at in (measure_from, stop_at):
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        marks.append((process_cpu_seconds(pid), process_cpu_seconds(pid, main_thread_only=True),
                      time.process_time()))


# ---- servers ----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(port: int, path: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import httpx  # optional (a test and dev dependency)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server on port {port} not ready in {timeout}s")


def start_server(cmd: list[str], env: dict[str, str], port: int, ready_path: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_ready(port, ready_path, proc)
    except BaseException:
        stop_server(proc)
        raise
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


class _Bare:
    """The bare pipeline as a pinned subprocess (see :func:`bare_main`)."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, start_new_session=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            stop_server(self.proc)
            raise RuntimeError(f"the bare pipeline did not start: {line!r}")

    def measure(self, c: int, duration: float, warmup: float) -> dict:
        self.proc.stdin.write(f"{c} {duration} {warmup}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        self.proc.stdin.close()
        stop_server(self.proc)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level="WARNING")
    conc = [int(c) for c in str(args.concurrency).split(",")]
    h, w = images.parse_size(args.image_size)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets) - {"bare", "service", "naive"}
    if unknown:
        raise SystemExit(f"unknown targets {sorted(unknown)}; choose from bare, service, naive")
    modes = [m.strip() for m in str(getattr(args, "connections", "new")).split(",") if m.strip()]
    if not modes or set(modes) - {"new", "pool"}:
        raise SystemExit(f"--connections takes new and/or pool, not {args.connections!r}")
    taskset = ["taskset", "-c", args.server_cpus]
    py = sys.executable
    best: dict[tuple[str, int], dict] = {}
    overloads: dict[str, dict] = {}  # connection mode -> open_loop's figures
    with tempfile.TemporaryDirectory(prefix="stn-bench-") as tmp:
        work = Path(tmp)
        model_dir, model, ckpt, desc = resolve_model(args.model_dir, work)
        model = args.model or model
        jpegs = make_jpegs(32, w, h)
        (work / "images").mkdir()
        for i, b in enumerate(jpegs):
            (work / "images" / f"{i:03d}.jpg").write_bytes(b)
        print(f"model: {desc}")
        print(f"uploads: 32 JPEGs {w}x{h} (~{sum(map(len, jpegs)) // len(jpegs) // 1024} kB) as raw image/jpeg bodies, "
              f"response {args.format}; servers and bare pipeline on CPU {args.server_cpus} (taskset), load "
              f"generator on CPU {args.client_cpus}; {args.rounds} interleaved rounds of {args.duration:g}s per "
              "level, best round kept")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p), "STN_MODEL_DIR": str(model_dir), "STN_LOG_LEVEL": "warning",
               "STN_PROVIDERS": os.environ.get("STN_PROVIDERS", "CPUExecutionProvider")}
        os.sched_setaffinity(0, set(_cpu_list(args.client_cpus)))  # the load generator: this process
        query = f"/v1/rectify?model={model}&format={args.format}"
        servers: dict[str, tuple[subprocess.Popen, int]] = {}
        bare = None
        try:
            if "service" in targets:
                port = _free_port()
                servers["service"] = (start_server([*taskset, py, "-m", "stn", "serve", "--port", str(port)], env, port,
                                             "/readyz"), port)
            if "naive" in targets:
                port = _free_port()
                script = work / "naive_server.py"
                script.write_text(NAIVE_SERVER)
                code = (f"import sys, runpy, uvicorn; sys.argv = ['naive', {str(ckpt)!r}]; "
                        f"ns = runpy.run_path({str(script)!r}); "
                        f"uvicorn.run(ns['app'], host='127.0.0.1', port={port}, log_level='warning', access_log=False)")
                servers["naive"] = (start_server([*taskset, py, "-c", code], env, port, "/docs"), port)
            if "bare" in targets:
                code = (f"from service.api.bench import bare_main; bare_main({str(model_dir)!r}, {model!r}, "
                        f"{str(work / 'images')!r}, {args.format!r})")
                bare = _Bare([*taskset, py, "-c", code], env)
            for _ in range(args.rounds):
                for c in conc:
                    for target in targets:
                        if target == "bare":
                            row = bare.measure(c, args.duration, args.warmup)
                        else:
                            proc, port = servers[target]
                            row = asyncio.run(closed_loop("127.0.0.1", port, query, jpegs, c, args.duration, args.warmup,
                                                    proc.pid)).summary()
                        if (target, c) not in best or row["throughput"] > best[(target, c)]["throughput"]:
                            best[(target, c)] = row
            if args.overload and "service" in servers:  # 2x the best throughput measured above, open loop
                proc, port = servers["service"]
                rate = 2 * max(best[("service", c)]["throughput"] for c in conc)
                for mode in modes:
                    overloads[mode] = asyncio.run(open_loop("127.0.0.1", port, query, jpegs, rate, args.duration,
                                                            args.warmup, proc.pid, connections=mode))
        finally:
            for proc, _ in servers.values():
                stop_server(proc)
            if bare is not None:
                bare.stop()
    print(f"{'target':8s} {'conc':>4s} {'img/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'img/cpu-s':>10s} {'cpu':>5s} "
          f"{'loop':>5s} errors")
    for target in targets:
        for c in conc:
            r = best[(target, c)]
            print(f"{target:8s} {c:4d} {r['throughput']:8.1f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
                  f"{r['img_per_cpu_s']:10.1f} {r['cpu_share']:5.2f} "
                  f"{r['loop_cpu_share'] if target != 'bare' else '-':>5} {r['errors']}")
    sat = {t: max(best[(t, c)]["throughput"] for c in conc) for t in targets}
    eff = {t: max(best[(t, c)]["img_per_cpu_s"] for c in conc) for t in targets}
    summary: dict[str, object] = {}
    for mode, overload in overloads.items():
        how = "a new connection per request" if mode == "new" else "keep-alive connections reused"
        print(f"overload ({how}): open-loop {overload['rate']} req/s (2x the service's saturation throughput) for "
              f"{args.duration:g}s: goodput {overload['goodput']} img/s, {overload['shed_503']} shed (503), "
              f"{overload['failed']} failed, {overload['opened']} connections opened; /healthz p99 "
              f"{overload['health_p99_ms']} ms, max {overload['health_max_ms']} ms ({overload['health_probes']} probes)"
              + (f"; server cpu share {overload['cpu_share']} (event-loop thread {overload['loop_cpu_share']}), "
                 f"load generator {overload['client_cpu_share']}, goodput {overload['goodput_per_cpu_s']} img/cpu-s"
                 if "cpu_share" in overload else ""))
        suffix = "" if mode == "new" else "_pool"  # the unsuffixed keys keep their meaning from earlier runs
        summary[f"overload_goodput_vs_saturation{suffix}"] = round(overload["goodput"] / sat["service"], 3)
        if "goodput_per_cpu_s" in overload:  # the same ratio per CPU-second of the server: robust to other load
            summary[f"overload_goodput_per_cpu_s_vs_saturation{suffix}"] = round(
                overload["goodput_per_cpu_s"] / eff["service"], 3)
        summary[f"overload{suffix}"] = overload
    top = max(conc)
    for other in ("bare", "naive"):
        if "service" in sat and other in sat:
            summary[f"throughput_service_vs_{other}"] = round(sat["service"] / sat[other], 3)
            summary[f"per_cpu_second_service_vs_{other}"] = round(eff["service"] / eff[other], 3)
            summary[f"throughput_service_vs_{other}_at_c{top}"] = round(
                best[("service", top)]["throughput"] / best[(other, top)]["throughput"], 3)
    summary.update({f"{t}_img_per_s": v for t, v in sat.items()})
    summary["goals"] = {"overload_goodput_vs_saturation": 0.9, "overload_goodput_vs_saturation_pool": 0.9,
                        "throughput_service_vs_bare": GOALS["service_vs_bare"],
                        "throughput_service_vs_naive": GOALS["service_vs_naive"]}
    print(json.dumps(summary))
    return 0


def _cpu_list(spec: str) -> list[int]:
    cpus: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            cpus.extend(range(int(a), int(b) + 1))
        elif part:
            cpus.append(int(part))
    return cpus
