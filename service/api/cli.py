"""Arguments of ``stn serve`` and ``stn bench serve`` (light: heavy imports happen in run_*)."""

from __future__ import annotations

import argparse
import logging
import sys

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
    """The flags over the STN_* environment; ``service.settings.SettingsError`` naming what does not validate."""
    from service.settings import load_settings

    overrides = {}
    for flag, (field, _, _) in _SERVE_OPTIONS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            overrides[field] = value
    return load_settings(**overrides)


def run_serve(args: argparse.Namespace) -> int:
    from service.api.app import create_app
    from service.api.middleware import RequestIdFilter
    from service.api.server import serve
    from service.settings import SettingsError

    try:
        settings = serve_settings(args)
    except SettingsError as e:
        print(f"stn serve: {e}", file=sys.stderr)
        return 2
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
    p.add_argument("--connections", default="new,pool",
                   help="with --overload, comma-separated: new (a connection per request) and/or pool (keep-alive "
                        "connections reused, as client libraries and load balancers do); one open-loop run each "
                        "(default new,pool)")


def run_bench_serve(args: argparse.Namespace) -> int:
    from service.api.bench import run

    return run(args)
