"""Arguments of ``stn export`` and ``stn bench export`` (light: heavy imports happen in run_*)."""

from __future__ import annotations

import argparse
import shlex
import sys


def configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint written by `stn train` (.pt)")
    p.add_argument("-o", "--output", required=True, help="ONNX file to write")
    p.add_argument("--grid-sample", default="onnx", choices=["onnx", "contrib", "gather", "native"],
                   help="sampler lowering: standard GridSample (opset-16 attributes), com.microsoft::GridSample, "
                        "core ops only, or our ai.stn ops (needs the native library to run; default: onnx)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18; the onnx lowering needs <= 19)")
    p.add_argument("--name", help="model name in metadata (default: from the checkpoint, else the output file stem)")
    p.add_argument("--version", dest="model_version", help="model version in metadata (default: from the checkpoint)")


def run_export(args: argparse.Namespace) -> int:
    try:
        from export.onnx_export import ExportError, export_checkpoint
        from models.checkpoint import CheckpointError
    except ImportError as e:
        print(f"stn export: needs the training install (pip install -e '.[train]'): {e}", file=sys.stderr)
        return 2

    command = "stn export " + shlex.join(sys.argv[2:] if len(sys.argv) > 2 else [args.checkpoint, "-o", args.output])
    try:
        report = export_checkpoint(args.checkpoint, args.output, lowering=args.grid_sample, opset=args.opset,
                                   name=args.name, version=args.model_version, command=command)
    except (CheckpointError, ExportError, ValueError) as e:
        print(f"stn export: error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


def configure_bench_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", help="checkpoint to benchmark (default: the bundled default model "
                                                  "and a 3x224x224 affine model with a 64x64 localisation size)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--lowerings", nargs="+", default=["onnx", "contrib", "gather", "native"],
                   choices=["onnx", "contrib", "gather", "native"],
                   help="native is skipped, with a warning, when the library is not built")
    p.add_argument("--threads", type=int, help="threads for both PyTorch and onnxruntime (default: cores, max 4)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each number is the median")
    p.add_argument("--min-seconds", type=float, default=0.4, help="minimum time per contender per round")


def run_bench_export(args: argparse.Namespace) -> int:
    import logging

    from export.bench import format_table, ratios_json, run_bench

    logging.basicConfig(level=logging.WARNING)
    rows, ratios = run_bench(args.checkpoint, tuple(args.batch_sizes), tuple(args.lowerings), args.threads,
                             args.rounds, args.min_seconds)
    print(format_table(rows))
    print(ratios_json(ratios))
    return 0
