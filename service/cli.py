"""Arguments of ``stn doctor`` (light: heavy imports happen in run_doctor)."""

from __future__ import annotations

import argparse
import json
import sys


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
