"""`gan-ddp bench`: throughput of the real training step, and of a textbook PyTorch loop to compare with.

The lean side builds the real `Trainer` and steps it with `Trainer.advance` (the GAN step `train` runs,
`GanStep.train_step`, not a copy); the split of an iteration is measured through the seam the trainer offers,
`Trainer.time_phases(timer)`: the step's "data", "d_step" and "g_step" phases run inside `timer(name)`, our
timers (on CUDA they synchronise, in bench mode only). What is left of an iteration (the G forward, the
noise, the metric sums) is reported as `ms_other`.

`--baseline` adds, in the same process and run, the loop of the tutorials this project reproduces
(`gan_ddp.tools.textbook`: per-image PIL transforms, `BCELoss` after a sigmoid, a fresh G forward for the G step, D
not frozen; same architecture, batch and optimiser settings). Under several processes it runs on the main
process alone (the others wait at a barrier) with the machine's cores, and is compared with the lean run's
global throughput.

JSON keys (`--json PATH`, one flat object; figures are global over processes unless noted):
  img_per_s           lean images per second, all processes (global batch x iterations / slowest process)
  ms_per_iter         wall milliseconds per iteration (slowest process)
  ms_data             of which: fetching the batch and normalising it (mean over processes)
  ms_d_step           of which: `GanStep.d_step` (mean over processes)
  ms_g_step           of which: `GanStep.g_step`, averaged over all iterations (mean over processes)
  ms_other            the rest: G forward(s), noise, metric sums (mean over processes)
  peak_rss_mb         peak resident memory of the largest process, MB (before the baseline runs)
  ckpt_save_s         `Trainer.save_checkpoint()` seconds, median of 3
  precision           precision the trainer chose; precision_reason: why
  threads             torch intra-op threads per process
  world_size          processes; device: the trainer's device
  baseline_img_per_s  textbook loop images per second (null without --baseline)
  speedup             img_per_s / baseline_img_per_s (null without --baseline)
  img_per_s_best, baseline_img_per_s_best, speedup_best: the fastest of the --repeat windows (a shared
  machine's load only ever slows a window down)
  plus context: config, batch_size, warmup, iters, repeat, compile, compile_mode, reuse_fake, baseline_threads,
  baseline_ms_per_iter, torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from gan_ddp.errors import UsageError
from gan_ddp.runtime.distributed import launched_world_size
from gan_ddp.tools.textbook import TextbookLoop, torch_threads

KEYS = (
    "img_per_s",
    "ms_per_iter",
    "ms_data",
    "ms_d_step",
    "ms_g_step",
    "peak_rss_mb",
    "ckpt_save_s",
    "precision",
    "precision_reason",
    "threads",
    "world_size",
    "device",
    "baseline_img_per_s",
    "speedup",
)
CKPT_REPEATS = 3


# --------------------------------------------------------------------------- small helpers
def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MB."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
    except ImportError:  # Windows
        import psutil

        info = psutil.Process().memory_info()
        return getattr(info, "peak_wset", info.rss) / 2**20


def _syncer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


class Timers:
    """Seconds accumulated per name while `enabled`; `wrap` times a callable (synchronising on CUDA)."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.enabled = False
        self.totals: dict[str, float] = {}

    def reset(self) -> None:
        self.totals = {}

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block under `name` while enabled (synchronising on CUDA): `Trainer.time_phases`'s timer."""
        if not self.enabled:
            yield
            return
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.add(name, time.perf_counter() - t0)


@contextmanager
def instrumented(trainer: Any, timers: Timers) -> Iterator[None]:
    """Time the trainer's real phases through the seam it offers (`Trainer.time_phases`)."""
    trainer.time_phases(timers.phase)
    try:
        yield
    finally:
        trainer.time_phases(None)


def _epochs(loader: Any) -> Iterator[Any]:
    """The trainer's prepared loader, epoch after epoch, as `train` iterates it."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        epoch += 1
        yield from loader


def _shared_tmp_dir() -> Path:
    """A temporary directory with the same name on every process of a launch (a checkpoint is a collective
    write into one directory), from the launcher's rendezvous variables; a fresh one for a single process."""
    if launched_world_size() <= 1:
        return Path(tempfile.mkdtemp(prefix="gan-ddp-bench-"))
    key = "|".join(os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"))
    path = Path(tempfile.gettempdir()) / f"gan-ddp-bench-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- the bench
def _bench_config(args: argparse.Namespace):
    from gan_ddp.config import load_config

    overrides = list(args.overrides)
    user_run_dir = any(o.split("=", 1)[0].strip() == "run.dir" for o in overrides)
    tmp = None
    if not user_run_dir:
        tmp = _shared_tmp_dir()
        overrides.append(f"run.dir={tmp}")
    overrides.append("log.wandb=disabled")
    return load_config(args.config, overrides), tmp


def _check_args(args: argparse.Namespace) -> None:
    for name in ("iters", "repeat"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")


def _median_index(values: list[float]) -> int:
    order = sorted(range(len(values)), key=values.__getitem__)
    return order[(len(order) - 1) // 2]


def _default_threads(world: int, before_trainer: int) -> int:
    """Threads of the textbook script run as `python script.py`: torch's default. Under a launcher
    (which sets OMP_NUM_THREADS=1 for its workers) that is the machine's usable cores."""
    if world == 1:
        return before_trainer
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_bench(args: argparse.Namespace) -> int:
    _check_args(args)
    from gan_ddp.training.trainer import Trainer

    threads_before = torch.get_num_threads()
    cfg, tmp = _bench_config(args)
    trainer = Trainer(cfg)
    acc = trainer.accelerator
    try:
        figures = _measure(trainer, args, threads_before)
    finally:
        acc.wait_for_everyone()
        if tmp is not None and trainer.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
    if trainer.is_main:
        print_table(figures)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


def _measure(trainer: Any, args: argparse.Namespace, threads_before: int) -> dict[str, Any]:
    cfg, acc, parts = trainer.cfg, trainer.accelerator, trainer.parts
    sync = _syncer(parts.device)
    timers = Timers(sync)
    batches = _epochs(parts.loader)

    def lean_window(n: int) -> list[float]:
        """Runs n real steps; returns this process's [wall, data, d_step, g_step] seconds."""
        timers.reset()
        acc.wait_for_everyone()
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            f0 = time.perf_counter()
            batch = next(batches)
            if timers.enabled:
                sync()
                timers.add("data", time.perf_counter() - f0)
            trainer.advance(batch)
        sync()
        wall = time.perf_counter() - t0
        return [wall, *(timers.totals.get(k, 0.0) for k in ("data", "d_step", "g_step"))]

    baseline: TextbookLoop | None = None
    baseline_threads = _default_threads(parts.world, threads_before)

    def baseline_window(n: int) -> float:
        """Main process only: seconds of n textbook iterations (0 elsewhere); everyone waits for it."""
        nonlocal baseline
        seconds = 0.0
        if trainer.is_main:
            with torch_threads(baseline_threads):
                if baseline is None:
                    dataset = parts.loader.dataset
                    images, labels = dataset.images.squeeze(1).cpu(), dataset.labels.cpu()
                    baseline = TextbookLoop(cfg, images, labels)
                    baseline.run(args.warmup)
                seconds = baseline.run(n)
        acc.wait_for_everyone()
        return seconds

    lean_runs: list[list[float]] = []  # per window: the gathered (world, 4) rows flattened by figure
    baseline_runs: list[float] = []
    rss = ckpt_s = 0.0
    with instrumented(trainer, timers):
        lean_window(args.warmup)
        timers.enabled = True
        for r in range(args.repeat):
            local = lean_window(args.iters)
            lean_runs.append(_reduce_window(acc, parts.device, local))
            if r == 0:
                timers.enabled = False
                ckpt_s = _checkpoint_seconds(trainer)
                rss = float(acc.gather(torch.tensor([peak_rss_mb()], device=parts.device)).max())
                timers.enabled = True
            if args.baseline:
                baseline_runs.append(baseline_window(args.iters))

    B, n = cfg.train.batch_size, args.iters
    pick = lean_runs[_median_index([w[0] for w in lean_runs])]
    wall, data, d, g = pick
    figures: dict[str, Any] = {
        "img_per_s": B * n / wall,
        "ms_per_iter": 1000 * wall / n,
        "ms_data": 1000 * data / n,
        "ms_d_step": 1000 * d / n,
        "ms_g_step": 1000 * g / n,
        "ms_other": 1000 * (wall - data - d - g) / n,
        "peak_rss_mb": rss,
        "ckpt_save_s": ckpt_s,
        "precision": parts.precision,
        "precision_reason": parts.precision_reason,
        "threads": parts.threads,
        "world_size": parts.world,
        "device": str(parts.device),
        "baseline_img_per_s": None,
        "speedup": None,
        "img_per_s_best": B * n / min(w[0] for w in lean_runs),
    }
    if baseline_runs:
        seconds = statistics.median(baseline_runs) if trainer.is_main else math.nan
        best = min(baseline_runs) if trainer.is_main else math.nan
        figures["baseline_img_per_s"] = B * n / seconds
        figures["speedup"] = figures["img_per_s"] / figures["baseline_img_per_s"]
        figures["baseline_ms_per_iter"] = 1000 * seconds / n
        figures["baseline_img_per_s_best"] = B * n / best
        figures["speedup_best"] = figures["img_per_s_best"] / figures["baseline_img_per_s_best"]
        figures["baseline_threads"] = baseline_threads
    figures |= {
        "config": str(args.config),
        "batch_size": B,
        "warmup": args.warmup,
        "iters": n,
        "repeat": args.repeat,
        "compile": cfg.train.compile,
        "compile_mode": cfg.train.compile_mode,
        "reuse_fake": cfg.train.reuse_fake,
        "torch": str(torch.__version__),
    }
    return figures


def _reduce_window(acc: Any, device: torch.device, local: list[float]) -> list[float]:
    """[wall, data, d, g] over processes: the slowest process's wall time, the mean of the split."""
    rows = acc.gather(torch.tensor([local], dtype=torch.float64, device=device)).reshape(-1, len(local))
    return [float(rows[:, 0].max()), *(float(v) for v in rows[:, 1:].mean(dim=0))]


def _checkpoint_seconds(trainer: Any) -> float:
    """Median of CKPT_REPEATS timed `save_checkpoint()` calls (collective), into a scratch folder of the run
    directory so an existing run's checkpoints are never rotated away."""
    scratch = trainer.run_dir / f"bench-checkpoints-{os.getpid() if trainer.parts.world == 1 else 'shared'}"
    times = []
    try:
        for _ in range(CKPT_REPEATS):
            trainer.accelerator.wait_for_everyone()
            t0 = time.perf_counter()
            trainer.save_checkpoint(root=scratch)
            times.append(time.perf_counter() - t0)
    finally:
        trainer.accelerator.wait_for_everyone()
        if trainer.is_main:
            shutil.rmtree(scratch, ignore_errors=True)
    return statistics.median(times)


# --------------------------------------------------------------------------- output
_LABELS = {
    "img_per_s": ("images/s", "global, all processes"),
    "ms_per_iter": ("ms / iteration", "one D update + one G update"),
    "ms_data": ("  data", "fetch + normalise"),
    "ms_d_step": ("  D step", "GanStep.d_step"),
    "ms_g_step": ("  G step", "GanStep.g_step"),
    "ms_other": ("  other", "G forward, noise, metric sums"),
    "peak_rss_mb": ("peak RSS / process", "MB, largest process"),
    "ckpt_save_s": ("checkpoint save", f"s, median of {CKPT_REPEATS}"),
    "precision": ("precision", ""),
    "precision_reason": ("  why", ""),
    "threads": ("threads / process", ""),
    "world_size": ("processes", ""),
    "device": ("device", ""),
    "baseline_img_per_s": ("baseline images/s", "textbook loop, 1 process"),
    "baseline_ms_per_iter": ("baseline ms / iteration", ""),
    "speedup": ("speedup", "lean / baseline"),
    "img_per_s_best": ("best window images/s", "fastest of --repeat windows"),
    "baseline_img_per_s_best": ("best baseline images/s", ""),
    "speedup_best": ("best-window speedup", ""),
}


def _format(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "precision_reason":
        return ""
    if key.startswith("speedup"):
        return f"{value:.2f}x"
    if key.startswith("ms_") or key == "baseline_ms_per_iter":
        return f"{value:.2f}"
    if key == "ckpt_save_s":
        return f"{value:.3f}"
    if isinstance(value, float):
        return f"{value:,.0f}"
    return str(value)


def print_table(figures: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"gan-ddp bench: {figures['config']}, batch {figures['batch_size']}", show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("key / note")
    for key, (label, note) in _LABELS.items():
        if key not in figures or (key.endswith("_best") and figures["repeat"] == 1):
            continue
        value = figures[key]
        if key == "baseline_img_per_s" and value is not None:
            note = f"textbook loop, 1 process, {figures['baseline_threads']} thread(s)"
        if key == "precision_reason":
            note = str(value)
        table.add_row(label, _format(key, value), f"{key}{': ' + note if note else ''}")
    extra = ", ".join(
        f"{k}={figures[k]}" for k in ("warmup", "iters", "repeat", "compile", "compile_mode", "reuse_fake", "torch")
    )
    Console(highlight=False, soft_wrap=True).print(table)
    print(extra, flush=True)
