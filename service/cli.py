"""Arguments of ``stn serve`` and ``stn bench serve`` (light: heavy imports happen in run_*)."""

from __future__ import annotations

import argparse

_SERVE_OPTIONS = {  # flag -> (Settings field, type, help)
    "--model-dir": ("model_dir", str, "folder of .onnx models (STN_MODEL_DIR; default: the bundled default model)"),
    "--host": ("host", str, "bind address (STN_HOST; default 127.0.0.1)"),
    "--port": ("port", int, "port (STN_PORT; default 8000)"),
    "--providers": ("providers", str, "comma-separated onnxruntime execution providers (STN_PROVIDERS)"),
    "--max-batch-size": ("max_batch_size", int, "images per localisation batch (STN_MAX_BATCH_SIZE)"),
    "--max-queue-delay-ms": ("max_queue_delay_ms", float, "longest wait for a batch to fill (STN_MAX_QUEUE_DELAY_MS)"),
    "--log-level": ("log_level", str, "debug, info, warning, error (STN_LOG_LEVEL)"),
}


def configure_serve(p: argparse.ArgumentParser) -> None:
    p.description = ("Serve the models of a folder over HTTP. Every setting comes from STN_* environment variables "
                     "(the README's settings table); these flags override the most common ones. Open http://HOST:PORT/ "
                     "in a browser for the demo page.")
    for flag, (_, typ, help_text) in _SERVE_OPTIONS.items():
        p.add_argument(flag, type=typ, default=None, help=help_text)


def serve_settings(args: argparse.Namespace):  # noqa: ANN201 (service.settings.Settings, imported lazily)
    from service.settings import Settings

    overrides = {}
    for flag, (field, _, _) in _SERVE_OPTIONS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            overrides[field] = value
    return Settings(**overrides)


def run_serve(args: argparse.Namespace) -> int:
    import logging

    from service.app import create_app
    from service.middleware import RequestIdFilter
    from service.server import serve

    settings = serve_settings(args)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
    return serve(create_app(settings), settings)


def configure_bench_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", default=None, help="folder with the model to serve (default: the bundled default "
                                                     "model; exported on the fly when absent)")
    p.add_argument("--model", default=None, help="model name in that folder (default: the first)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client concurrencies (default 1,8,32)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds measured per level and round (default 3)")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds of load before measuring (default 0.5)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is kept (default 3)")
    p.add_argument("--image-size", default="384x288", help="WxH of the JPEG uploads (default 384x288)")
    p.add_argument("--format", default="png", choices=["json", "png", "jpeg"], help="response format (default png)")
    p.add_argument("--server-cpus", default="0", help="taskset CPU list for servers and the bare pipeline (default 0)")
    p.add_argument("--client-cpus", default="1", help="taskset CPU list for the load generator (default 1)")
    p.add_argument("--targets", default="bare,service,naive", help="what to measure (default bare,service,naive)")
    p.add_argument("--overload", action="store_true", help="then offer the service 2x its saturation throughput, "
                                                          "open loop: goodput / saturation (goal >= 0.9) and "
                                                          "/healthz latency")


def run_bench_serve(args: argparse.Namespace) -> int:
    from service.bench_serve import run

    return run(args)


def configure_doctor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--model-dir", default=None, help="folder of .onnx models (default: STN_MODEL_DIR or the bundled one)")
    p.add_argument("--gpu", action="store_true",
                   help="run the GPU checks (docs/GPU.md); exit 1 on a failed check, 2 when there is no GPU")
    p.add_argument("--out", default=None, metavar="FILE", help="with --gpu: write the JSON record here")
    p.add_argument("--provider", default="CUDAExecutionProvider",
                   help="with --gpu: the execution provider under test; CPUExecutionProvider rehearses every check "
                        "on the CPU (default %(default)s)")
    p.add_argument("--checks", default=None, help="with --gpu: comma-separated subset of the checks (default: all)")
    p.add_argument("--quick", action="store_true", help="with --gpu: small sizes and short runs")


def run_doctor(args: argparse.Namespace) -> int:
    import json
    import sys

    from service import doctor

    if not args.gpu:
        report = doctor.report(args.model_dir)
        print(json.dumps(report, indent=2, default=str) if args.json else doctor.format_report(report))
        return 0 if doctor.healthy(report) else 1
    from service.doctor_gpu import CHECKS, run_gpu_checks, write_record

    only = [c.strip() for c in args.checks.split(",") if c.strip()] if args.checks else None
    unknown = sorted(set(only or []) - set(CHECKS))
    if unknown:
        print(f"stn doctor: unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    record = run_gpu_checks(args.model_dir, args.provider, only, args.quick,
                            progress=None if args.json else lambda line: print(line, flush=True))
    if args.out:
        write_record(record, args.out)
    if args.json:
        print(json.dumps(record, indent=2, default=str))
    elif record.get("no_gpu"):
        print(f"stn doctor --gpu: {record['no_gpu']}", file=sys.stderr)
    else:
        for goal in record["goals"]:
            print(f"goal {goal['goal']}: {goal['value']} (target {goal['target']}) {'met' if goal['met'] else 'MISSED'}")
        failed = record.get("failed") or []
        print(f"{len(record['checks']) - len(failed)}/{len(record['checks'])} checks passed or skipped"
              + (f"; failed: {', '.join(failed)}" if failed else "")
              + (f"; record: {args.out}" if args.out else ""))
    return int(record["exit_code"])
