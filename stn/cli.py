"""``stn``: one command, thin over library functions.

Each subcommand's arguments are declared by a light module of the package that does the
work (``models.cli``, ``export.cli``, ``service.api.cli``, ``service.cli``, ``service.batch.cli``); heavy imports (torch,
onnxruntime) happen only inside the chosen subcommand, so ``stn serve`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module providing configure_<name>(parser) and run_<name>(args) -> int
SUBCOMMANDS = {
    "train": ("models.cli", "Train an STN (classification or self-supervised rectification)."),
    "experiment": ("models.cli", "Reproducible experiments (the STN paper's Table 1 on Fashion-MNIST)."),
    "export": ("export.cli", "Export a checkpoint to a self-describing ONNX model."),
    "serve": ("service.api.cli", "Serve ONNX models over HTTP (FastAPI + onnxruntime)."),
    "batch": ("service.batch.cli", "Rectify many images offline."),
    "doctor": ("service.cli", "Versions, providers, GPUs, native sampler, models; --gpu proves the GPU path."),
}
BENCHMARKS = {
    "export": ("export.cli", "onnxruntime vs PyTorch eager, per lowering and batch size."),
    "serve": ("service.api.cli", "The HTTP service vs the bare pipeline and a naive server."),
    "batch": ("service.batch.cli", "The batch engine vs a naive loop and the bare model."),
    "sampler": ("native.bench", "The native sampler vs onnxruntime's GridSample, torch and OpenCV."),
    "documents": ("models.cli", "Composing synthetic document photos vs the training step they feed."),
    "geometry": ("service.bench_geometry", "A result's geometry (coverage, points) vs its pixel matrices alone."),
}


def _add_commands(sub: argparse._SubParsersAction, commands: dict[str, tuple[str, str]], prefix: str) -> None:
    """One subparser per command, configured by ``<module>.configure_<prefix><name>``."""
    for name, (module, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        label = f"{prefix.replace('_', ' ')}{name}"
        try:
            mod = importlib.import_module(module)
        except ImportError as e:  # e.g. `stn train` in a serving-only install
            p.set_defaults(handler=lambda args, n=label, why=str(e): _unavailable(n, why))
            continue
        getattr(mod, f"configure_{prefix}{name}")(p)
        p.set_defaults(handler=getattr(mod, f"run_{prefix}{name}"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stn", description="Spatial Transformer Networks: train, export, serve.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_commands(sub, SUBCOMMANDS, "")
    bench = sub.add_parser("bench", help="Benchmarks, side by side with a baseline in one run.")
    _add_commands(bench.add_subparsers(dest="bench", required=True, metavar="WHAT"), BENCHMARKS, "bench_")
    return parser


def _unavailable(name: str, why: str) -> int:
    print(f"stn {name}: not available in this installation ({why})", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
