"""``stn train``: argument parsing and printing over ``models.train.train``.

Light at import (``stn --help`` and ``stn serve`` never import torch): torch and the
training code are imported inside :func:`run_train`. The choices below are checked against
``models.distortions.DISTORTIONS`` / ``models.transforms.TRANSFORMS`` by the tests.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from models.frames import TRANSFORMS  # numpy-only

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"  # == models.data.DEFAULT_DATA (not imported: keep this light)
DISTORTION_CHOICES = ("R", "RTS", "P", "E", "TC", "none")
DOCUMENT = "document"  # == models.documents.DISTORTION (training only: not a paper-table distortion)
TRANSFORM_CHOICES = TRANSFORMS
HEAD_CHOICES = ("gap", "grid")  # == models.classifier.HEADS (not imported: it imports torch)
AMP_CHOICES = ("off", "bf16", "fp16")  # == models.devices.AMP_CHOICES (not imported: it imports torch)

EPILOG = """\
examples:
  stn train --distortion RTS --epochs 5 --out runs/rts          # ST-CNN on Fashion-MNIST RTS
  stn train --model cnn --distortion RTS --out runs/rts-cnn      # the matched plain-CNN baseline
  stn train --mode rectify --data my_upright_images/ --distortion RTS --out runs/rectifier
  stn train --device cuda --amp bf16 --workers 4 --save-every 500 --eval-every 1000 --out runs/gpu
  stn train ... --out runs/gpu --resume runs/gpu/last.pt         # continue an interrupted run
  torchrun --standalone --nproc_per_node 4 -m stn train --device cuda ... --out runs/ddp
  stn train --mode rectify --distortion document --transform projective --out runs/doc   # document rectifier
  stn train --mode rectify --distortion document --transform projective --pages my_pages/ \
      --backgrounds my_desks/ --out runs/my-doc                                  # on your own upright pages
writes OUT/checkpoint.pt, OUT/metrics.json and OUT/sheet.png (test inputs | rectified | upright).
"""


def _size(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def configure_train(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    a = parser.add_argument
    a("--data", default=DEFAULT_DATA, metavar="PATH",
      help="MNIST-format IDX folder (gz or raw) or image folder (class subfolders, or flat for --mode rectify); "
           "default %(default)s")
    a("--mode", choices=("classify", "rectify"), default="classify",
      help="classify: ST-CNN with cross-entropy (no transform labels); rectify: STN alone, self-supervised from "
           "upright images with known random distortions (default %(default)s)")
    a("--model", choices=("stn", "cnn"), default="stn",
      help="stn: with the spatial transformer; cnn: plain CNN baseline of matched size (classify only)")
    a("--distortion", choices=(*DISTORTION_CHOICES, DOCUMENT), default="RTS",
      help="R rotation, RTS rotation+translation+scale on a 1.5x canvas, P projective, E elastic (TPS), "
           "TC translation+clutter on a 60/28x canvas, none; document: synthetic photos of pages "
           "(--mode rectify --transform projective; --data is not read) (default %(default)s)")
    a("--transform", choices=TRANSFORM_CHOICES, default="affine", help="STN transform family (default %(default)s)")
    a("--head", choices=HEAD_CHOICES, default="gap",
      help="classifier head: gap (global average pooling) or grid (4x4 average pooling, keeps the layout) "
           "(default %(default)s)")
    a("--epochs", type=_size, default=None,
      help="passes over the training set (default 5, or as many as --steps needs when --steps is given)")
    a("--steps", type=_size, default=None,
      help="stop after this many steps (quick runs); with --epochs too, whichever comes first")
    a("--batch-size", type=_size, default=128, help="default %(default)s")
    a("--lr", type=float, default=1e-3, help="Adam learning rate, cosine-decayed (default %(default)s)")
    a("--loc-lr-mult", type=float, default=0.1,
      help="localisation-net learning-rate multiplier in classify mode (default %(default)s)")
    a("--loc-size", type=_size, nargs=2, metavar=("H", "W"), default=None,
      help="input size of the localisation net (default: the distortion canvas)")
    a("--output-size", type=_size, nargs=2, metavar=("H", "W"), default=None,
      help="rectified output size (default: the distortion canvas)")
    a("--image-size", type=_size, nargs=2, metavar=("H", "W"), default=None,
      help="resize image-folder images to this size (default: the first image's size)")
    a("--limit-train", type=_size, default=None, metavar="N", help="use the first N training examples")
    a("--limit-test", type=_size, default=None, metavar="N", help="use the first N test examples")
    a("--seed", type=int, default=0, help="seed for init, shuffling and distortions (default %(default)s)")
    a("--threads", type=_size, default=None, help="torch CPU threads (default: torch's choice)")
    a("--clip-grad", type=float, default=5.0, help="global gradient-norm clip, 0 = off (default %(default)s)")
    a("--boundary-weight", type=float, default=1.0,
      help="weight of the collapse guard (penalty on sampling points beyond +-1.5) (default %(default)s)")
    a("--init-stn", default=None, metavar="CHECKPOINT",
      help="start the spatial transformer from this checkpoint's (same config), e.g. a --mode rectify run "
           "before a --mode classify run")
    a("--pages", default=None, metavar="DIR",
      help="document: your own upright pages (any images), placed in the photos instead of most rendered pages")
    a("--backgrounds", default=None, metavar="DIR",
      help="document: background images, used beside the procedural textures")
    a("--figures", default=None, metavar="DIR", help="document: images placed as figures on rendered pages")
    a("--max-minutes", type=float, default=None, metavar="MIN",
      help="document: stop training after MIN minutes or --steps, whichever comes first; the learning-rate "
           "schedule follows whichever is nearer its end")
    a("--name", default=None, help="model name stored in the checkpoint (default: derived)")
    a("--device", default="cpu", metavar="DEVICE",
      help="auto (CUDA when available), cpu, cuda or cuda:N; under torchrun, cuda means cuda:LOCAL_RANK "
           "(default %(default)s)")
    a("--amp", choices=AMP_CHOICES, default="off",
      help="mixed precision: bf16 autocast, fp16 autocast with loss scaling (CUDA only), or off (default %(default)s)")
    a("--workers", type=int, default=0, metavar="N",
      help="data-loading worker processes (batches are the same whatever N; with --distortion document: "
           "processes composing photos, one lane of photos each, the lanes fixed when the run starts) "
           "(default %(default)s)")
    a("--eval-every", type=_size, default=None, metavar="STEPS", help="evaluate on the test set every STEPS steps")
    a("--save-every", type=_size, default=None, metavar="STEPS",
      help="write the resumable OUT/last.pt every STEPS steps (also written when interrupted with Ctrl-C)")
    a("--resume", default=None, metavar="CHECKPOINT",
      help="continue the run saved in CHECKPOINT (an OUT/last.pt), with the options it was started with")
    a("--no-progress", action="store_true", help="no progress bar or progress lines")
    a("--out", required=True, metavar="DIR", help="output folder for checkpoint.pt, metrics.json, sheet.png")


def _fmt_spread(spread: dict | None) -> str:
    if spread is None:
        return "n/a (no transformer)"
    return (f"angle {spread['angle_deg']:6.2f} deg  log-scale {spread['log_scale']:.4f}  "
            f"tx {spread['tx']:.4f}  ty {spread['ty']:.4f}")


def run_train(args: argparse.Namespace) -> int:
    import logging

    try:
        from models.data import DataError
        from models.documents import DocumentDataError
        from models.train import ConfigError, TrainConfig, train
    except ImportError as e:
        print(f"stn train: needs the training install (pip install -e '.[train]'): {e}", file=sys.stderr)
        return 2

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = TrainConfig(
        data=args.data, mode=args.mode, model=args.model, distortion=args.distortion, transform=args.transform, head=args.head,
        epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, lr=args.lr, loc_lr_mult=args.loc_lr_mult,
        loc_size=tuple(args.loc_size) if args.loc_size else None,
        output_size=tuple(args.output_size) if args.output_size else None,
        image_size=tuple(args.image_size) if args.image_size else None,
        limit_train=args.limit_train, limit_test=args.limit_test, seed=args.seed, threads=args.threads,
        clip_grad=args.clip_grad, boundary_weight=args.boundary_weight, out=args.out, name=args.name,
        created_by="stn " + shlex.join(sys.argv[1:]), progress=not args.no_progress, init_stn=args.init_stn,
        device=args.device, amp=args.amp, workers=args.workers, eval_every=args.eval_every,
        save_every=args.save_every, resume=args.resume,
        pages=args.pages, backgrounds=args.backgrounds, figures=args.figures, max_minutes=args.max_minutes,
    )
    try:
        result = train(config)
    except (ConfigError, DataError, DocumentDataError) as e:
        print(f"stn train: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"stn train: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        import os

        last = os.path.join(args.out, "last.pt")
        print("stn train: interrupted" + (f"; continue with --resume {last}" if os.path.exists(last) else ""),
              file=sys.stderr)
        return 130
    if result.rank != 0:  # torchrun: rank 0 reports
        return 0
    m = result.metrics
    if "corner_error_median" in m:
        print(f"{m['dataset']}: {m['steps']} steps of {m['batch_size']} in {m['train_seconds']:.1f} s "
              f"({100 * m['data_wait_fraction']:.0f}% waiting for photos), final train loss {m['final_train_loss']:.4f}")
        print(f"device {m['device']}, amp {m['amp']}, {m['world_size']} rank(s), {m['workers']} data worker(s): "
              f"{m['steps_per_second']:.2f} steps/s")
        print(f"corner error on {m['test_examples']} held-out photos: median {100 * m['corner_error_median']:.2f}%  "
              f"p90 {100 * m['corner_error_p90']:.2f}%  (identity: median {100 * m['identity_corner_error_median']:.2f}%)")
        for k, v in m["corner_error_by_rotation"].items():
            print(f"  |rotation| {k:>6} deg: n={v['n']:4d}  median {100 * v['median']:.2f}%  p90 {100 * v['p90']:.2f}%")
        print("wrote " + ", ".join(result.files.values()))
        return 0
    print(f"{m['dataset']}: {m['mode']} {m['model']}, {m['steps']} steps ({m['epochs']:.2f} epochs) in "
          f"{m['train_seconds']:.1f} s ({m['seconds_per_epoch']:.1f} s/epoch), final train loss "
          f"{m['final_train_loss']:.4f}")
    print(f"device {m['device']}, amp {m['amp']}, {m['world_size']} rank(s), {m['workers']} data worker(s): "
          f"{m['steps_per_second']:.2f} steps/s")
    if "test_error" in m:
        print(f"test error: {100 * m['test_error']:.2f}% on {m['test_examples']} distorted test images")
    if "test_image_l1" in m:
        print(f"test image L1: {m['test_image_l1']:.4f}  grid MSE: {m['test_grid_mse']:.5f}")
    pc = m["pose_consistency"]
    print("pose spread  distortion:", _fmt_spread(pc["distortion"]))
    print("             residual:  ", _fmt_spread(pc["residual"]))
    if m.get("collapsed_fraction"):
        print(f"warning: {100 * m['collapsed_fraction']:.1f}% of test images sampled mostly outside the input",
              file=sys.stderr)
    print("wrote " + ", ".join(result.files.values()))
    return 0


EXPERIMENT_EPILOG = """\
examples:
  stn experiment paper-table --out runs/paper-table            # the full table (about 80 min on 2 cores)
  stn experiment paper-table --out runs/quick --steps 200 --seeds 1 --limit-train 5000 --limit-test 1000
writes OUT/<distortion>/<model>-s<seed>/ per run (checkpoint.pt, metrics.json, sheet.png), then
OUT/results.json, OUT/results.md (the tables of docs/RESULTS.md) and OUT/figure.png.
Runs already in OUT are not trained again: run the same command to resume.
"""


def configure_experiment(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXPERIMENT_EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    a = parser.add_argument
    a("name", choices=("paper-table",),
      help="paper-table: the STN paper's Table 1 (CNN vs ST-CNN per transform family and distortion)")
    a("--out", required=True, metavar="DIR", help="output folder (resumable)")
    a("--data", default=DEFAULT_DATA, metavar="PATH", help="MNIST-format IDX folder (default %(default)s)")
    a("--distortions", nargs="+", choices=DISTORTION_CHOICES, default=["R", "RTS", "P", "E"],
      help="default: %(default)s")
    a("--transforms", nargs="+", choices=TRANSFORM_CHOICES, default=["affine", "projective", "tps"],
      help="ST-CNN transform families (default: %(default)s)")
    a("--seeds", type=_size, default=3, help="seeds for the CNN and the affine ST-CNN on the --seeded distortions "
      "(default %(default)s); every other run gets one")
    a("--seeded", nargs="+", choices=DISTORTION_CHOICES, default=["RTS", "P"], metavar="DISTORTION",
      help="distortions on which the CNN and the affine ST-CNN get --seeds seeds (default: %(default)s)")
    a("--steps", type=_size, default=2000, help="optimizer steps per run (default %(default)s)")
    a("--batch-size", type=_size, default=128, help="default %(default)s")
    a("--lr", type=float, default=1e-3, help="Adam learning rate for every model (default %(default)s)")
    a("--loc-lr-mult", type=float, default=1.0, help="localisation-net lr multiplier (default %(default)s)")
    a("--head", choices=HEAD_CHOICES, default="grid", help="classifier head for every model (default %(default)s)")
    a("--limit-train", type=_size, default=None, metavar="N", help="first N training images (default: all)")
    a("--limit-test", type=_size, default=None, metavar="N", help="first N test images (default: all)")
    a("--jobs", type=_size, default=2, help="runs trained at once, one process each (default %(default)s)")
    a("--threads", type=_size, default=1, help="torch threads per run (default %(default)s)")


def run_experiment(args: argparse.Namespace) -> int:
    import logging

    try:
        from models.data import DataError
        from models.experiment import Budget, Plan, report_markdown, run_paper_table
        from models.train import ConfigError
    except ImportError as e:
        print(f"stn experiment: needs the training install (pip install -e '.[train]'): {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    budget = Budget(steps=args.steps, batch_size=args.batch_size, lr=args.lr, loc_lr_mult=args.loc_lr_mult,
                    head=args.head, limit_train=args.limit_train, limit_test=args.limit_test)
    plan = Plan(distortions=tuple(args.distortions), transforms=tuple(args.transforms), seeds=args.seeds,
                repeat_on=tuple(args.seeded), budget=budget)
    try:
        summary = run_paper_table(plan, args.out, args.data, jobs=args.jobs, threads=args.threads,
                                  progress=lambda line: print(line, flush=True))
    except (ConfigError, DataError) as e:
        print(f"stn experiment: error: {e}", file=sys.stderr)
        return 2
    print(report_markdown(summary))
    print(f"wrote {args.out}/results.json, results.md, figure.png")
    return 1 if summary["failures"] else 0


def configure_bench_documents(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--batch-size", type=_size, default=32, help="default %(default)s")
    a("--steps", type=_size, default=10, help="timed training steps per repeat (default %(default)s)")
    a("--repeats", type=_size, default=3, help="repeats; medians are reported (default %(default)s)")
    a("--threads", type=_size, default=2, help="torch threads (default %(default)s)")


def run_bench_documents(args: argparse.Namespace) -> int:
    try:
        from models.document_train import bench
    except ImportError as e:
        print(f"stn bench documents: needs the training install (pip install -e '.[train]'): {e}", file=sys.stderr)
        return 2
    r = bench(args.batch_size, args.steps, args.repeats, args.threads)
    b = r["batch_size"]
    print(f"document photos for the rectifier (batch {b}, {r['threads']} torch threads, photos "
          f"{r['photo_long_side'][0]}-{r['photo_long_side'][1]} px long side; medians of {args.repeats})")
    print(f"  render one page (pool refresh)      {1000 * r['page_render_s']:8.1f} ms")
    print(f"  render one background (pool refresh){1000 * r['background_render_s']:8.1f} ms")
    print(f"  compose one photo                   {1000 * r['photo_s']:8.1f} ms   ({b} photos: "
          f"{1000 * b * r['photo_s']:.0f} ms)")
    print(f"  training step on a ready batch      {1000 * r['train_step_s']:8.1f} ms")
    print(f"  step, photos composed in-process    {1000 * r['step_workers0_s']:8.1f} ms   (composing "
          f"{100 * r['composing_fraction_in_process']:.0f}% of it)")
    print(f"  step, photos from 1 worker process  {1000 * r['step_workers1_s']:8.1f} ms")
    return 0
