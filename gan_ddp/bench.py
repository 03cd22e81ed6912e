"""`gan-ddp bench`: throughput of the real training step, and of a textbook PyTorch loop to compare with.

The lean side builds the real `Trainer` and calls its own `train_step` (the code `train` runs, not a copy);
the split of an iteration is measured by wrapping, on that instance only, the bound `d_step` / `g_step` and
the trainer module's `normalize` with timers (on CUDA the timers synchronise, in bench mode only). What is
left of an iteration (the G forward, the noise, the metric sums) is reported as `ms_other`.

`--baseline` adds, in the same process and run, the loop of the tutorials this project reproduces: a
torchvision-style dataset (PIL image + `ToTensor()` + `Normalize((0.5,), (0.5,))` per image) in a
`DataLoader`, D ending in `nn.Sigmoid()` with `nn.BCELoss`, a fresh G forward for the G step, D not frozen,
default `zero_grad()`, default Adam, fp32, default threads; same architecture, batch and optimiser settings.
Under several processes it runs on the main process alone (the others wait at a barrier) with the machine's
cores, and is compared with the lean run's global throughput.

JSON keys (`--json PATH`, one flat object; figures are global over processes unless noted):
  img_per_s           lean images per second, all processes (global batch x iterations / slowest process)
  ms_per_iter         wall milliseconds per iteration (slowest process)
  ms_data             of which: fetching the batch and normalising it (mean over processes)
  ms_d_step           of which: `Trainer.d_step` (mean over processes)
  ms_g_step           of which: `Trainer.g_step`, averaged over all iterations (mean over processes)
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
import functools
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
from torch import nn

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


def add_bench_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    b = sub.add_parser(
        "bench",
        help="measure the training step (images/s, time split, memory, checkpoint save); --baseline compares "
        "with a textbook PyTorch loop",
    )
    b.add_argument("--config", required=True, help="YAML file, e.g. configs/mnist_mlp.yaml")
    b.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.root=bundled data.split=test")
    b.add_argument("--baseline", action="store_true", help="also time the textbook loop on the same model and batch")
    b.add_argument("--json", type=Path, help="write every figure to this file (one flat JSON object)")
    b.add_argument("--warmup", type=int, default=20, help="iterations before timing (default 20)")
    b.add_argument("--iters", type=int, default=100, help="timed iterations per window (default 100)")
    b.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="timed windows, lean and baseline alternating; the median window is reported (default 1)",
    )
    return b


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

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.enabled:
                return fn(*args, **kwargs)
            self.sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.add(name, time.perf_counter() - t0)

        return timed


@contextmanager
def instrumented(trainer: Any, timers: Timers) -> Iterator[None]:
    """Time the trainer's real `d_step`, `g_step` (bound methods, this instance only) and the `normalize`
    its `train_step` calls; everything is restored on exit."""
    import gan_ddp.trainer as trainer_module

    original_normalize = trainer_module.normalize
    trainer.d_step = timers.wrap("d_step", trainer.d_step)
    trainer.g_step = timers.wrap("g_step", trainer.g_step)
    trainer_module.normalize = timers.wrap("data", original_normalize)
    try:
        yield
    finally:
        trainer_module.normalize = original_normalize
        del trainer.d_step, trainer.g_step  # the instance attributes; the class methods show through again


def _epochs(trainer: Any) -> Iterator[Any]:
    """The trainer's prepared loader, epoch after epoch, as `train` iterates it."""
    epoch = 0
    while True:
        trainer.loader.set_epoch(epoch)
        epoch += 1
        yield from trainer.loader


def _shared_tmp_dir() -> Path:
    """A temporary directory with the same name on every process of a launch (a checkpoint is a collective
    write into one directory), from the launcher's rendezvous variables; a fresh one for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return Path(tempfile.mkdtemp(prefix="gan-ddp-bench-"))
    key = "|".join(os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"))
    path = Path(tempfile.gettempdir()) / f"gan-ddp-bench-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- the textbook loop
class TextbookMNIST(torch.utils.data.Dataset):
    """What `torchvision.datasets.MNIST` does per item: uint8 array -> PIL image -> transform. Built from the
    arrays the trainer loaded, because torchvision's class insists on all four files being present."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable[[Any], torch.Tensor]) -> None:
        self.images = images.numpy()  # (N, 28, 28) uint8
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def textbook_transform() -> Callable[[Any], torch.Tensor]:
    from torchvision import transforms

    return transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])


def textbook_models(model_cfg: Any) -> tuple[nn.Module, nn.Module]:
    """The project's architectures with the tutorials' sigmoid at the end of D and torch's own dropout."""
    from gan_ddp.models import MaskDropout, build_models

    generator, discriminator = build_models(model_cfg)
    for parent in list(discriminator.modules()):
        for name, child in parent.named_children():
            if isinstance(child, MaskDropout):
                setattr(parent, name, nn.Dropout(child.p))
    return generator, nn.Sequential(discriminator, nn.Sigmoid())


def textbook_optimizers(generator: nn.Module, discriminator: nn.Module, optim_cfg: Any):
    betas = (optim_cfg.beta1, optim_cfg.beta2)
    return (
        torch.optim.Adam(generator.parameters(), lr=optim_cfg.lr_g, betas=betas),
        torch.optim.Adam(discriminator.parameters(), lr=optim_cfg.lr_d, betas=betas),
    )


def textbook_step(
    generator: nn.Module,
    discriminator: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    criterion: nn.Module,
    real: torch.Tensor,
    z_d: torch.Tensor,
    z_g: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One iteration of the tutorials' loop; returns (D loss, G loss), detached."""
    b = real.size(0)
    ones, zeros = torch.ones(b), torch.zeros(b)
    # D: real and fake losses summed, one backward.
    opt_d.zero_grad()
    fake = generator(z_d)
    loss_d = criterion(discriminator(real), ones) + criterion(discriminator(fake.detach()), zeros)
    loss_d.backward()
    opt_d.step()
    # G: a fresh generator forward, through a D that is not frozen.
    opt_g.zero_grad()
    fake = generator(z_g)
    loss_g = criterion(discriminator(fake), ones)
    loss_g.backward()
    opt_g.step()
    return loss_d.detach(), loss_g.detach()


class TextbookLoop:
    """The baseline: fresh models (same seed and architecture as the trainer's), its own data pipeline."""

    def __init__(self, cfg: Any, images: torch.Tensor, labels: torch.Tensor) -> None:
        torch.manual_seed(cfg.seed)
        self.z_dim = cfg.model.z_dim
        self.G, self.D = textbook_models(cfg.model)
        self.opt_g, self.opt_d = textbook_optimizers(self.G, self.D, cfg.optim)
        self.criterion = nn.BCELoss()
        dataset = TextbookMNIST(images, labels, textbook_transform())
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True
        )
        self.batches = self._epochs()

    def _epochs(self) -> Iterator[Any]:
        while True:
            yield from self.loader

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One iteration, data loading included; (D loss, G loss)."""
        real, _ = next(self.batches)
        b = real.size(0)
        z_d, z_g = torch.randn(b, self.z_dim), torch.randn(b, self.z_dim)
        return textbook_step(self.G, self.D, self.opt_g, self.opt_d, self.criterion, real, z_d, z_g)

    def run(self, iterations: int) -> float:
        """Seconds for `iterations` iterations, data loading included."""
        t0 = time.perf_counter()
        for _ in range(iterations):
            self.step()
        return time.perf_counter() - t0

    def samples(self, n: int, seed: int = 0, batch: int = 500) -> Any:
        """(n, 28, 28, 1) uint8 from G in eval mode, noise from `seed`: the `gan-ddp sample` format."""
        from gan_ddp.data import to_sample_array
        from gan_ddp.models import generate

        self.G.eval()
        images = generate(self.G, n, self.z_dim, seed, batch)
        self.G.train()
        return to_sample_array(images)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- the textbook loop, trained
def add_textbook_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    t = sub.add_parser(
        "textbook",
        help="train the tutorials' loop (bench's --baseline) for a time budget, writing sample files for "
        "`gan-ddp eval --samples`: the reference for sample quality per unit of time",
    )
    t.add_argument("--config", required=True, help="YAML file: model, optimiser, batch and data are taken from it")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    t.add_argument("--seconds", type=float, required=True, help="training budget, wall seconds (data loading counts)")
    t.add_argument("--every", type=float, default=60.0, help="write samples every this many training seconds")
    t.add_argument("--n", "--num-samples", dest="n", type=int, default=10000, help="samples per file")
    t.add_argument("--out", type=Path, required=True, help="folder for tNNNNN.npz files and log.jsonl")
    return t


def run_textbook(args: argparse.Namespace) -> int:
    """Train `TextbookLoop` until `--seconds` of training time; every `--every` seconds (and at the end) write
    `--n` samples to `<out>/t<seconds>.npz` and a line to `<out>/log.jsonl`. Writing samples is not timed."""
    import numpy as np

    from gan_ddp.config import load_config
    from gan_ddp.data import load_arrays

    for name in ("seconds", "every", "n"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(args, name)}")
    cfg = load_config(args.config, args.overrides)
    images, labels = load_arrays(cfg.data.dataset, cfg.data.root, cfg.data.split, cfg.data.download)
    loop = TextbookLoop(cfg, images, labels)
    args.out.mkdir(parents=True, exist_ok=True)
    trained, mark, step = 0.0, args.every, 0
    with (args.out / "log.jsonl").open("w") as log:
        while trained < args.seconds:
            t0 = time.perf_counter()
            loss_d, loss_g = loop.step()
            trained += time.perf_counter() - t0
            step += 1
            if trained >= mark or trained >= args.seconds:
                path = args.out / f"t{round(trained):05d}.npz"
                np.savez(path, loop.samples(args.n))
                line = {"time_s": round(trained, 3), "step": step, "loss/d": loss_d.item(), "loss/g": loss_g.item()}
                log.write(json.dumps({**line, "samples": path.name}) + "\n")
                log.flush()
                print(f"{trained:7.1f} s  step {step}  D {line['loss/d']:.3f}  G {line['loss/g']:.3f}  -> {path}")
                mark += args.every
    return 0


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
            raise ValueError(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")


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
    from gan_ddp.trainer import Trainer

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
    cfg, acc = trainer.cfg, trainer.accelerator
    sync = _syncer(trainer.device)
    timers = Timers(sync)
    batches = _epochs(trainer)
    step = 0

    def lean_window(n: int) -> list[float]:
        """Runs n real steps; returns this process's [wall, data, d_step, g_step] seconds."""
        nonlocal step
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
            step += 1
            trainer.train_step(batch, step)
            trainer.step = step
        sync()
        wall = time.perf_counter() - t0
        return [wall, *(timers.totals.get(k, 0.0) for k in ("data", "d_step", "g_step"))]

    baseline: TextbookLoop | None = None
    baseline_threads = _default_threads(trainer.world, threads_before)

    def baseline_window(n: int) -> float:
        """Main process only: seconds of n textbook iterations (0 elsewhere); everyone waits for it."""
        nonlocal baseline
        seconds = 0.0
        if trainer.is_main:
            with torch_threads(baseline_threads):
                if baseline is None:
                    dataset = trainer.loader.dataset
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
            lean_runs.append(_reduce_window(acc, trainer.device, local))
            if r == 0:
                timers.enabled = False
                ckpt_s = _checkpoint_seconds(trainer)
                rss = float(acc.gather(torch.tensor([peak_rss_mb()], device=trainer.device)).max())
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
        "precision": trainer.precision,
        "precision_reason": trainer.precision_reason,
        "threads": trainer.threads,
        "world_size": trainer.world,
        "device": str(trainer.device),
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
    real_root = trainer.ckpt_root
    trainer.ckpt_root = trainer.run_dir / f"bench-checkpoints-{os.getpid() if trainer.world == 1 else 'shared'}"
    times = []
    try:
        for _ in range(CKPT_REPEATS):
            trainer.accelerator.wait_for_everyone()
            t0 = time.perf_counter()
            trainer.save_checkpoint()
            times.append(time.perf_counter() - t0)
    finally:
        trainer.accelerator.wait_for_everyone()
        if trainer.is_main:
            shutil.rmtree(trainer.ckpt_root, ignore_errors=True)
        trainer.ckpt_root = real_root
    return statistics.median(times)


# --------------------------------------------------------------------------- output
_LABELS = {
    "img_per_s": ("images/s", "global, all processes"),
    "ms_per_iter": ("ms / iteration", "one D update + one G update"),
    "ms_data": ("  data", "fetch + normalise"),
    "ms_d_step": ("  D step", "Trainer.d_step"),
    "ms_g_step": ("  G step", "Trainer.g_step"),
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
