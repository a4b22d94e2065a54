"""The paper's distorted-MNIST experiment (Jaderberg et al. 2015, Table 1), on Fashion-MNIST.

``stn experiment paper-table`` = :func:`run_paper_table`: for each distortion it trains the
plain CNN and an ST-CNN per transform family, all in classification mode (cross-entropy
only: the transformer learns without transform labels), with

- matched parameter counts (``models.classifier.matched_baseline`` widens the CNN until it
  has about as many parameters as the ST-CNN; the report prints the gap),
- the same budget and optimizer for every model (Adam, the same steps, batch size, learning
  rate and cosine schedule; the localisation net runs at ``loc_lr_mult`` times that rate),
- ``seeds`` seeds for the models named in ``repeat`` (by default the CNN and the affine
  ST-CNN) on the distortions in ``repeat_on`` (RTS and P), one seed for the others,
- the same distorted test set for every model of a distortion (``eval_seed``).

Each run is a ``models.train.train`` call in its own process (``jobs`` at a time, one torch
thread each) writing ``OUT/<distortion>/<model>-s<seed>/{checkpoint.pt,metrics.json,sheet.png}``.
A run whose ``metrics.json`` exists is not trained again, so an interrupted experiment
resumes where it stopped. At the end :func:`summarise` reads every ``metrics.json`` into
``OUT/results.json``, :func:`report_markdown` writes the tables to ``OUT/results.md`` and
:func:`write_figure` draws ``OUT/figure.png`` (per distortion: distorted test inputs above
the affine ST-CNN's rectified outputs).
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CNN = "cnn"
PAPER_DISTORTIONS = ("R", "RTS", "P", "E")
PAPER_TRANSFORMS = ("affine", "projective", "tps")


@dataclass
class Budget:
    """What every run of the experiment gets (the same for the CNN and the ST-CNNs)."""

    steps: int = 2000  # optimizer steps per run
    batch_size: int = 128
    lr: float = 1e-3  # Adam, cosine-decayed to 5 %
    loc_lr_mult: float = 1.0  # localisation net learning rate = lr * loc_lr_mult (ST-CNN only)
    head: str = "grid"  # classifier head (models.classifier.HEADS), the same for CNN and ST-CNN
    limit_train: int | None = None  # first N training images (None: all 60,000)
    limit_test: int | None = None  # first N test images (None: all 10,000)
    eval_seed: int = 1234  # the distorted test set, the same for every run


@dataclass(frozen=True)
class Run:
    distortion: str
    model: str  # "cnn" or a transform family (ST-CNN with that transformer)
    seed: int

    @property
    def key(self) -> str:
        return f"{self.distortion}/{self.model}-s{self.seed}"


@dataclass
class Plan:
    distortions: tuple[str, ...] = PAPER_DISTORTIONS
    transforms: tuple[str, ...] = PAPER_TRANSFORMS
    seeds: int = 3  # seeds for the models in ``repeat`` on the distortions in ``repeat_on``
    repeat: tuple[str, ...] = (CNN, "affine")  # models trained with ``seeds`` seeds; the others once
    repeat_on: tuple[str, ...] = ("RTS", "P")  # distortions on which ``repeat`` models get ``seeds`` seeds
    budget: Budget = field(default_factory=Budget)

    def seeds_for(self, distortion: str, model: str) -> int:
        return self.seeds if model in self.repeat and distortion in self.repeat_on else 1

    def runs(self) -> list[Run]:
        """Every run, the most expensive (largest canvas) first so that parallel jobs finish together."""
        from models.distortions import canvas_size

        runs = [Run(d, m, s) for d in self.distortions for m in (CNN, *self.transforms)
                for s in range(self.seeds_for(d, m))]
        return sorted(runs, key=lambda r: (-math.prod(canvas_size(r.distortion, (28, 28))), r.seed))


def plan_dict(plan: Plan) -> dict[str, Any]:
    """The plan as JSON values (plan.json and results.json)."""
    return {"distortions": list(plan.distortions), "transforms": list(plan.transforms), "seeds": plan.seeds,
            "repeat": list(plan.repeat), "repeat_on": list(plan.repeat_on), "budget": asdict(plan.budget)}


def train_config_for(run: Run, budget: Budget, data: str, out: Path, threads: int = 1):  # -> TrainConfig
    from models.train import TrainConfig

    return TrainConfig(
        data=data, mode="classify", model=CNN if run.model == CNN else "stn",
        transform="affine" if run.model == CNN else run.model, head=budget.head, distortion=run.distortion,
        steps=budget.steps, batch_size=budget.batch_size, lr=budget.lr, loc_lr_mult=budget.loc_lr_mult,
        limit_train=budget.limit_train, limit_test=budget.limit_test, seed=run.seed, eval_seed=budget.eval_seed,
        threads=threads, progress=False, out=str(out / run.key),
        name=f"paper-table-{run.distortion}-{run.model}-s{run.seed}".lower(),
        created_by=f"stn experiment paper-table (run {run.key})",
    )


def _train_one(run: Run, budget: Budget, data: str, out: str, threads: int) -> dict[str, Any]:
    """One run in a worker process: train, write its folder, return its metrics. On failure the
    traceback goes to the run's ``error.txt`` (when it can be written) and the error is re-raised."""
    from models.train import train

    config = train_config_for(run, budget, data, Path(out), threads)
    try:
        return train(config).metrics
    except BaseException:
        try:
            Path(config.out).mkdir(parents=True, exist_ok=True)
            (Path(config.out) / "error.txt").write_text(traceback.format_exc())
        except OSError:
            pass
        raise


def check_plan(plan: Plan, data: str, out: str | Path) -> None:
    """Before anything is trained: ConfigError / DataError (ValueError) naming what to fix, so a
    bad option or data path fails once, not once per run."""
    from models.data import load_dataset
    from models.train import ConfigError, check_config

    runs = plan.runs()
    if not runs:
        raise ConfigError("the plan has no runs: name at least one distortion")
    if plan.seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {plan.seeds}")
    for run in runs:
        check_config(train_config_for(run, plan.budget, data, Path(out)))
    load_dataset(data, None, 1, 1)  # the data can be read (two images; the runs read it all)


def run_paper_table(plan: Plan, out: str | Path, data: str, jobs: int = 2, threads: int = 1,
                    progress: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Train every run of ``plan`` not already in ``out``, then summarise, report and draw."""
    check_plan(plan, data, out)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps({**plan_dict(plan), "data": data}, indent=2) + "\n")
    runs = plan.runs()
    todo = [r for r in runs if not (out / r.key / "metrics.json").exists()]
    total = len(runs)
    progress(f"{total} runs, {total - len(todo)} already done, {len(todo)} to train ({jobs} at a time, "
             f"{threads} thread(s) each)")
    failures: list[str] = []
    t0 = time.perf_counter()
    if todo:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter per run: no shared torch state
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context, max_tasks_per_child=1) as pool:
            futures = {pool.submit(_train_one, r, plan.budget, data, str(out), threads): r for r in todo}
            for done, future in enumerate(as_completed(futures), 1):
                run = futures[future]
                try:
                    m = future.result()
                    progress(f"[{done}/{len(todo)}] {run.key}: error {100 * m['test_error']:.2f}% "
                             f"({m['train_seconds']:.0f} s; {time.perf_counter() - t0:.0f} s elapsed)")
                except Exception as e:  # noqa: BLE001 - reported; the other runs go on
                    failures.append(f"{run.key}: {type(e).__name__}: {e}")
                    progress(f"[{done}/{len(todo)}] {failures[-1]}")
    summary = summarise(out, plan)
    summary["failures"] = failures
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(report_markdown(summary))
    write_figure(out, plan, data, out / "figure.png")
    return summary


# ------------------------------------------------------------------------------------ summary


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": list(values)}


def summarise(out: str | Path, plan: Plan) -> dict[str, Any]:
    """Mean/std of the test error per (distortion, model), error reduction vs the CNN, pose
    consistency per ST-CNN, parameter counts and training time, from the runs' metrics.json."""
    out = Path(out)
    cells: dict[str, dict[str, Any]] = {}
    for d in plan.distortions:
        row: dict[str, Any] = {}
        for model in (CNN, *plan.transforms):
            metrics = []
            for s in range(plan.seeds_for(d, model)):
                path = out / Run(d, model, s).key / "metrics.json"
                if path.exists():
                    metrics.append(json.loads(path.read_text()))
            if not metrics:
                continue
            cell: dict[str, Any] = {
                "error": _mean_std([m["test_error"] for m in metrics]),
                "parameters": metrics[0]["parameters"],
                "train_seconds": statistics.fmean(m["train_seconds"] for m in metrics),
                "steps": metrics[0]["steps"], "epochs": metrics[0]["epochs"], "batch_size": metrics[0]["batch_size"],
                "train_examples": metrics[0]["train_examples"], "test_examples": metrics[0]["test_examples"],
            }
            residuals = [m["pose_consistency"]["residual"] for m in metrics if m["pose_consistency"]["residual"]]
            if residuals:
                cell["residual_spread"] = {k: statistics.fmean(r[k] for r in residuals) for k in residuals[0]}
                cell["collapsed_fraction"] = max(m.get("collapsed_fraction", 0.0) for m in metrics)
            row["distortion_spread"] = metrics[0]["pose_consistency"]["distortion"]
            row[model] = cell
        cnn = row.get(CNN)
        for model in plan.transforms:
            if cnn and model in row:
                base = cnn["error"]["mean"]
                row[model]["reduction_vs_cnn"] = (base - row[model]["error"]["mean"]) / base if base else None
                row[model]["parameter_gap_vs_cnn"] = cnn["parameters"] / row[model]["parameters"] - 1.0
        cells[d] = row
    return {"plan": plan_dict(plan), "results": cells}


def _label(model: str) -> str:
    return "CNN" if model == CNN else f"ST-CNN {model}"


def _err(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "–"
    e = cell["error"]
    return f"{100 * e['mean']:.2f} ± {100 * e['std']:.2f} (n={e['n']})" if e["n"] > 1 else f"{100 * e['mean']:.2f}"


def report_markdown(summary: dict[str, Any]) -> str:
    """The tables of docs/RESULTS.md: error, reduction vs CNN, pose consistency, parameters, budget."""
    plan, results = summary["plan"], summary["results"]
    ds, models = plan["distortions"], [CNN, *plan["transforms"]]
    lines = ["### Test error (%, mean ± std over seeds)", "",
             "| model | " + " | ".join(ds) + " |", "|---|" + "---:|" * len(ds)]
    for m in models:
        lines.append(f"| {_label(m)} | " + " | ".join(_err(results.get(d, {}).get(m)) for d in ds) + " |")
    lines += ["", "### Relative error reduction of the ST-CNN over the CNN", "",
              "| model | " + " | ".join(ds) + " |", "|---|" + "---:|" * len(ds)]
    for m in plan["transforms"]:
        vals = []
        for d in ds:
            r = results.get(d, {}).get(m, {}).get("reduction_vs_cnn")
            vals.append("–" if r is None else f"{100 * r:+.1f}%")
        lines.append(f"| {_label(m)} | " + " | ".join(vals) + " |")
    lines += ["", "### Pose consistency: spread of the distortion → spread of the residual after the STN", "",
              "Residual = the predicted transform composed with the known distortion (rectified → distorted → "
              "upright); 0 is a perfect rectifier. Rotation: circular std in degrees; log-scale, tx, ty: std "
              "(normalized units). Means over seeds.", "",
              "| distortion | model | rotation (°) | log-scale | tx | ty | collapsed |", "|---|---|---:|---:|---:|---:|---:|"]
    for d in ds:
        row = results.get(d, {})
        spread = row.get("distortion_spread")
        for m in plan["transforms"]:
            cell = row.get(m)
            if not cell or "residual_spread" not in cell:
                continue
            r = cell["residual_spread"]
            vals = []
            for k, fmt in (("angle_deg", "{:.2f}"), ("log_scale", "{:.3f}"), ("tx", "{:.3f}"), ("ty", "{:.3f}")):
                ratio = f" ({r[k] / spread[k]:.2f}x)" if spread[k] > 1e-6 else ""
                vals.append(f"{fmt.format(spread[k])} → {fmt.format(r[k])}{ratio}")
            lines.append(f"| {d} | {_label(m)} | " + " | ".join(vals) + f" | {100 * cell['collapsed_fraction']:.1f}% |")
    lines += ["", "### Parameters (and the CNN's gap to each ST-CNN)", "",
              "| model | " + " | ".join(ds) + " |", "|---|" + "---:|" * len(ds)]
    for m in models:
        vals = []
        for d in ds:
            cell = results.get(d, {}).get(m)
            if not cell:
                vals.append("–")
                continue
            gap = cell.get("parameter_gap_vs_cnn")
            vals.append(f"{cell['parameters']:,}" + ("" if gap is None else f" ({100 * gap:+.1f}%)"))
        lines.append(f"| {_label(m)} | " + " | ".join(vals) + " |")
    b = plan["budget"]
    lines += ["", "### Budget (the same for every run)", "",
              "| distortion | steps × batch | epochs | train images | test images | mean train time per run (s) |",
              "|---|---:|---:|---:|---:|---:|"]
    for d in ds:
        row = results.get(d, {})
        cells = [row[m] for m in models if m in row]
        if not cells:
            continue
        c = cells[0]
        secs = " / ".join(f"{_label(m)} {row[m]['train_seconds']:.0f}" for m in models if m in row)
        lines.append(f"| {d} | {c['steps']} × {c['batch_size']} | {c['epochs']:.2f} | {c['train_examples']:,} | "
                     f"{c['test_examples']:,} | {secs} |")
    lines += ["", f"Adam, lr {b['lr']} cosine-decayed to 5 %, localisation net at {b['loc_lr_mult']}× that rate, "
              f"classifier head `{b['head']}`, test distortions drawn with seed {b['eval_seed']}."]
    if summary.get("failures"):
        lines += ["", "Failed runs:", ""] + [f"- {f}" for f in summary["failures"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- figure


def write_figure(out: str | Path, plan: Plan, data: str, path: str | Path, examples: int = 8, cell: int = 64,
                 model: str = "affine") -> Path | None:
    """PNG: per distortion, a row of distorted test inputs (the first ``examples`` test images of
    ``data``, distorted with the plan's eval seed) above the ST-CNN's rectified outputs (seed 0 of
    ``model``), each image scaled to ``cell`` pixels. None when no run is there."""
    import torch
    from PIL import Image, ImageDraw

    from models import distortions as dist
    from models.checkpoint import load_checkpoint
    from models.data import load_dataset

    out = Path(out)
    ckpts = [(d, out / Run(d, model, 0).key / "checkpoint.pt") for d in plan.distortions]
    ckpts = [(d, p) for d, p in ckpts if p.exists()]
    if not ckpts:
        return None
    test = load_dataset(data).test.head(max(examples, 1))
    up = torch.from_numpy(test.images).float() / 255.0
    label_w, gap = 64, 4
    canvas = Image.new("L", (label_w + examples * (cell + gap) + gap, len(ckpts) * (2 * cell + 3 * gap) + gap), 96)
    draw = ImageDraw.Draw(canvas)
    for row, (d, ckpt_path) in enumerate(ckpts):
        st = load_checkpoint(ckpt_path).build_stn()
        mean = torch.tensor(st.config.mean).view(1, -1, 1, 1)
        std = torch.tensor(st.config.std).view(1, -1, 1, 1)
        g = torch.Generator().manual_seed(plan.budget.eval_seed)
        distorted = dist.distort(d, up, g).images
        with torch.no_grad():
            rectified, _ = st((distorted - mean) / std)
        rectified = rectified * std + mean
        y = gap + row * (2 * cell + 3 * gap)
        draw.text((4, y + cell // 2 - 6), f"{d} in", fill=255)
        draw.text((4, y + cell + gap + cell // 2 - 6), f"{d} out", fill=255)
        for i in range(examples):
            x = label_w + i * (cell + gap)
            for k, images in enumerate((distorted, rectified)):
                arr = (images[i, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
                canvas.paste(Image.fromarray(arr, "L").resize((cell, cell), Image.BILINEAR), (x, y + k * (cell + gap)))
    path = Path(path)
    canvas.save(path, format="PNG", optimize=True)
    return path


__all__ = ["Budget", "Run", "Plan", "PAPER_DISTORTIONS", "PAPER_TRANSFORMS", "plan_dict", "train_config_for",
           "check_plan", "run_paper_table", "summarise", "report_markdown", "write_figure"]
