"""``stn batch`` and ``stn bench batch``: arguments and printing only.

This module is what ``stn`` imports to build its parser, so it stays light: the job's machinery
(onnxruntime, the engines) is imported when the command runs, as ``service.api.cli`` does for the server.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

from service import images

ENGINES = ("local", "ray")  # service.batch.run.ENGINES (checked equal by the tests)


def size_arg(text: str) -> tuple[int, int]:
    """``--size WxH`` -> (h, w), through ``images.parse_size``; argparse's error otherwise."""
    try:
        return images.parse_size(text.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def quality_arg(text: str) -> int:
    """``--quality``: an integer within ``images.QUALITY``; argparse's error otherwise."""
    try:
        return images.parse_quality(text.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def int_arg(least: int):  # noqa: ANN201 (an argparse type)
    """An argparse type: an integer of at least ``least``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"must be an integer of at least {least}; got {text!r}")
        return value
    return parse


def configure_batch(p: argparse.ArgumentParser) -> None:
    p.description = ("Rectify many images offline with the server's runtime and conventions. Writes OUTPUT/<same "
                     "relative path>.<format>, OUTPUT/results.jsonl, errors.jsonl and skipped.jsonl; re-running the "
                     "same command after an interruption resumes. Exit code 0: every image rectified; 1: some "
                     "failed (errors.jsonl); 2: the job could not start; 130: interrupted (docs/BATCH.md).")
    p.add_argument("input", metavar="INPUT", help="a folder (recursive), a glob (quote it; ** recurses), or a manifest "
                                                  "(.txt/.lst: one path per line; .csv/.jsonl: a `path` column); a "
                                                  "local path or a URI (s3://, gs://, file://, ...)")
    p.add_argument("output", metavar="OUTPUT", help="output folder (mirrors the inputs' relative paths); a local path "
                                                    "or a URI")
    p.add_argument("--model", default=None, help="an .onnx file, a folder of models, or a model name in STN_MODEL_DIR "
                                                 "(default: the server's default model)")
    p.add_argument("--format", default="png", choices=list(images.ENCODINGS), help="output format (default png)")
    p.add_argument("--quality", type=quality_arg, default=images.DEFAULT_QUALITY,
                   help=f"JPEG / WebP quality, {images.QUALITY[0]} to {images.QUALITY[1]} "
                        f"(default {images.DEFAULT_QUALITY})")
    p.add_argument("--size", type=size_arg, default=None, metavar="WxH",
                   help="size of the rectified images (default: the model's output size)")
    p.add_argument("--batch-size", type=int_arg(1), default=None,
                   help="images per localisation batch (default: STN_MAX_BATCH_SIZE, 32)")
    p.add_argument("--workers", type=int_arg(0), default=0,
                   help="decode/sample/encode threads (default: CPUs, at most 8)")
    p.add_argument("--engine", default="local", choices=list(ENGINES), help="local (default) or ray (Ray Data)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (e.g. auto, ray://head:10001; default: "
                                                       "start a local Ray)")
    p.add_argument("--ray-num-cpus", type=int_arg(1), default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--ray-actors", type=int_arg(0), default=0,
                   help="onnxruntime actors (default: one per GPU, else the CPUs less one)")
    p.add_argument("--input-root", default=None, help="folder that sources and outputs are relative to (default: the "
                                                      "folder, the manifest's folder, or the glob's fixed prefix)")
    p.add_argument("--providers", default=None, help="comma-separated onnxruntime providers (default: STN_PROVIDERS)")
    p.add_argument("--overwrite", action="store_true", help="start over in an OUTPUT that holds a job")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _say(line: str) -> None:
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def run_batch(args: argparse.Namespace) -> int:
    """``stn batch``: 0 when every image was rectified, 1 when some failed (errors.jsonl), 2 when the job could not
    start, 130 when interrupted."""
    from service.batch.inputs import BatchError
    from service.batch.run import BatchConfig, batch_settings, run_job

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        batch_size = args.batch_size if args.batch_size is not None else batch_settings().max_batch_size
        config = BatchConfig(
            input=args.input, output=args.output, model=args.model, format=args.format, quality=args.quality,
            size=args.size, batch_size=batch_size, workers=args.workers,
            engine=args.engine, input_root=args.input_root, overwrite=args.overwrite,
            providers=tuple(p.strip() for p in args.providers.split(",") if p.strip()) if args.providers else None,
            progress=not args.no_progress, ray_address=args.ray_address, ray_num_cpus=args.ray_num_cpus,
            ray_actors=args.ray_actors)
        summary = run_job(config)
    except BatchError as e:
        sys.stderr.write(f"stn batch: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("stn batch: interrupted; finished images are kept. Re-run the same command to resume.\n")
        return 130
    for line in summary.lines():
        _say(line)
    if summary.failed:
        sys.stderr.write(f"stn batch: {summary.failed} image(s) failed; the reasons are in {summary.output}/errors.jsonl"
                         "\n")
        return 1
    return 0


def configure_bench_batch(p: argparse.ArgumentParser) -> None:
    p.description = ("The local batch engine vs a naive loop (decode -> infer -> encode, one image at a time) and the "
                     "bare model (onnxruntime, batched, on images decoded beforehand), on generated JPEGs.")
    p.add_argument("--model", default=None, help="an .onnx file, a folder or a model name (default: the benches' "
                                                 "stand-in model, service.standin, exported once)")
    p.add_argument("--images", type=int, default=2000, help="number of generated JPEGs (default 2000)")
    p.add_argument("--image-size", type=size_arg, default=(240, 320), metavar="WxH",
                   help="size of the generated JPEGs (default 320x240)")
    p.add_argument("--data-dir", default=None, help="where the JPEGs are generated (kept for re-runs; default: a "
                                                    "folder under the system temp dir)")
    p.add_argument("--format", default="png", choices=list(images.ENCODINGS), help="output format (default png)")
    p.add_argument("--batch-size", type=int, default=32, help="localisation batch (default 32)")
    p.add_argument("--workers", type=int, default=0, help="local engine threads (default: CPUs, at most 8)")
    p.add_argument("--targets", default="local,naive,bare", help="what to measure: local, naive, bare, ray "
                                                                 "(default local,naive,bare)")
    p.add_argument("--repeat", type=int, default=2, help="interleaved rounds; the best of each is kept (default 2)")


def run_bench_batch(args: argparse.Namespace) -> int:
    from service.batch.bench import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    """``python -m service.batch INPUT OUTPUT ...`` (the same as ``stn batch``)."""
    parser = argparse.ArgumentParser(prog="stn batch")
    configure_batch(parser)
    return run_batch(parser.parse_args(argv))
