"""Where and how ``models.train`` computes: device, mixed precision, data-parallel ranks, seeds, progress.

The training loop stays one loop; this module holds the machinery around it:

- :func:`resolve_device` (``auto``, ``cpu``, ``cuda``, ``cuda:N``; under ``torchrun`` each rank
  takes ``cuda:LOCAL_RANK``), :class:`Precision` (``--amp bf16|fp16|off``: the autocast
  context and, for fp16, a ``GradScaler``).
- :class:`Ranks`: data-parallel training launched with ``torchrun`` (``WORLD_SIZE``, ``RANK``,
  ``LOCAL_RANK`` in the environment): one process per rank, NCCL on GPUs, gloo on CPUs, the
  model wrapped in ``DistributedDataParallel``; rank 0 writes the checkpoint and the log.
  Without ``torchrun`` it is the single-process identity (no process group).
- :func:`derived_seed`: the seed of one piece of randomness (an epoch's shuffle, a step's
  distortions on one rank) from the run's seed, so a batch does not depend on which
  process made it (data-loading workers, resumed runs).
- :class:`Progress`: a tqdm bar on a terminal, plain log lines otherwise.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

AMP_CHOICES = ("off", "bf16", "fp16")


class DeviceError(ValueError):
    """A device or precision option that cannot work here; the message says which and why."""


def derived_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for the stream named by ``keys`` (e.g. (0, epoch), (1, step, rank)) of run ``seed``."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, *(int(k) for k in keys)]).generate_state(2)
    return int((int(state[0]) << 31 ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF)


def generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded with ``derived_seed(seed, *keys)``."""
    return torch.Generator().manual_seed(derived_seed(seed, *keys))


def resolve_device(spec: str, local_rank: int | None = None) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N`` -> a usable torch device."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec != "cuda" and not (spec.startswith("cuda:") and spec[5:].isdigit()):
        raise DeviceError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none (a CPU-only build)'}"
        raise DeviceError(f"--device {spec}: no CUDA device is usable here ({build}); use --device cpu or auto")
    count = torch.cuda.device_count()
    if local_rank is not None:
        if spec != "cuda":
            raise DeviceError(f"--device {spec}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda")
        index = local_rank
    else:
        index = int(spec[5:]) if ":" in spec else 0
    if index >= count:
        raise DeviceError(f"--device {spec}: cuda:{index} does not exist ({count} CUDA device(s) visible)")
    return torch.device("cuda", index)


@dataclass
class Precision:
    """``--amp``: autocast dtype on the device and, for fp16, a loss scaler."""

    mode: str  # off, bf16, fp16
    device: torch.device

    def __post_init__(self) -> None:
        if self.mode not in AMP_CHOICES:
            raise DeviceError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {self.mode!r}")
        if self.mode == "fp16" and self.device.type != "cuda":
            raise DeviceError("--amp fp16 needs a CUDA device (float16 autocast and its GradScaler are GPU features); "
                              "on the CPU use --amp bf16 or --amp off")
        if self.mode == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DeviceError(f"--amp bf16: {torch.cuda.get_device_name(self.device)} has no bfloat16 support; "
                              "use --amp fp16")
        enabled = self.mode == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=enabled) if enabled else None

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mode)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Before gradient clipping: bring the gradients back to their true scale."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)


class Ranks:
    """The data-parallel group of this process (world 1 without ``torchrun``)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank: int | None = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ and self.world > 1 else None
        self.backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device) -> None:
        """Join the process group (NCCL on CUDA, gloo on the CPU); no-op for a single process."""
        if not self.distributed or torch.distributed.is_initialized():
            return
        if not torch.distributed.is_available():
            raise DeviceError("this torch build has no torch.distributed; run without torchrun")
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(self.backend, timeout=datetime.timedelta(minutes=10),
                                             **({"device_id": device} if device.type == "cuda" else {}))

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module the training forward goes through (DDP across ranks, the model itself otherwise)."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def maximum(self, value: float) -> float:
        """The largest of a number over the ranks (itself for one process): one clock for all of them."""
        if not self.distributed:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device="cuda" if self.backend == "nccl" else "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t.item())

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over the ranks (itself for one process)."""
        if not self.distributed:
            return value
        value = value.detach().clone()
        torch.distributed.all_reduce(value)
        return value / self.world

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def stop(self) -> None:
        """Leave the group. What still holds it (a DDP wrapper the caller dropped, in a reference cycle) is
        collected first: a gloo group destroyed later, while the interpreter exits, could abort the process
        ("terminate called without an active exception") after a run that had done everything."""
        if self.distributed and torch.distributed.is_initialized():
            gc.collect()
            torch.distributed.destroy_process_group()


def is_terminal() -> bool:
    """Progress bars only when both stdout and stderr are terminals; plain lines in logs and pipes."""
    return all(getattr(s, "isatty", lambda: False)() for s in (sys.stdout, sys.stderr))


class Progress:
    """A tqdm bar on a terminal; otherwise one plain line every ``every`` steps (and the last) on stderr."""

    def __init__(self, total: int, desc: str, enabled: bool = True, start: int = 0, every: int | None = None) -> None:
        self.total, self.desc, self.step = total, desc, start
        self.enabled = enabled
        self.every = every or max(1, min(100, total // 20))
        self.bar = None
        self.t0 = time.perf_counter()
        self.start = start
        self.postfix = ""
        if enabled and is_terminal():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, loss: float | None = None, extra: str = "") -> None:
        self.step += 1
        if loss is not None:
            self.postfix = f"loss={loss:.4f}" + (f" {extra}" if extra else "")
        if self.bar is not None:
            if self.postfix:
                self.bar.set_postfix_str(self.postfix, refresh=False)
            self.bar.update(1)
        elif self.enabled and (self.step % self.every == 0 or self.step == self.total):
            self.line(self.postfix)

    def line(self, text: str) -> None:
        """One log line (through tqdm.write while a bar is shown)."""
        if not self.enabled:
            return
        rate = (self.step - self.start) / max(time.perf_counter() - self.t0, 1e-9)
        msg = f"{self.desc}: step {self.step}/{self.total} {text} ({rate:.1f} steps/s)".replace("  ", " ")
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def worker_init(_worker_id: int) -> None:
    """Data-loading workers: one torch thread each (the workers are the parallelism)."""
    torch.set_num_threads(1)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """torch's global RNG state (CPU, and the device's on CUDA): dropout draws from it."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
