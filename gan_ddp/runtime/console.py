"""What the main process shows: a rich live view on a terminal, plain lines elsewhere (SLURM logs, CI)."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

SHOWN = ("loss/d", "loss/g", "score/real", "score/fake")


def format_metrics(metrics: dict[str, Any]) -> str:
    parts = [f"{k.split('/')[-1] if k.startswith('loss/') else k} {metrics[k]:.3f}" for k in SHOWN if k in metrics]
    if "loss/d" in metrics:
        parts[0] = f"D {metrics['loss/d']:.3f}"
    if "loss/g" in metrics:
        parts[1] = f"G {metrics['loss/g']:.3f}"
    return "  ".join(parts)


class TrainingConsole:
    """Silent on non-main processes; live progress bar on a terminal; one plain line per log step otherwise."""

    def __init__(self, enabled: bool, live: bool | None = None) -> None:
        self.enabled = enabled
        self.live = sys.stdout.isatty() if live is None else live
        # soft_wrap: plain lines in log files stay one line each, whatever the (absent) terminal width
        self.console = Console(highlight=False, soft_wrap=True)
        self.progress: Progress | None = None
        self.task = None
        self.start_time = time.monotonic()

    def print(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, markup=False)

    def start(self, total: int, completed: int) -> None:
        self.start_time = time.monotonic()
        if not (self.enabled and self.live):
            return
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[speed]}  {task.fields[metrics]}"),
            console=self.console,
            refresh_per_second=4,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=completed, epoch=0, speed="", metrics="")

    def advance(self, step: int, epoch: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, epoch=epoch)

    def log(self, metrics: dict[str, Any], total: int, budget: float | None = None) -> None:
        """`budget`: train.max_seconds, shown beside the training time (it, not `total`, ends such runs)."""
        if not self.enabled:
            return
        speed = f"{metrics.get('img_per_s', 0):,.0f} img/s"
        if self.progress is not None:
            self.progress.update(self.task, speed=speed, metrics=format_metrics(metrics))
        else:
            clock = f"  {metrics['time_s']:.0f}{f'/{budget:.0f}' if budget else ''} s" if "time_s" in metrics else ""
            self.console.print(
                f"step {metrics['step']}/{total}  epoch {metrics['epoch']}{clock}  {speed}  {format_metrics(metrics)}",
                markup=False,
            )

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def summary(self, rows: dict[str, Any]) -> None:
        self.stop()
        if not self.enabled:
            return
        table = Table(title="gan-ddp run", show_header=False)
        for key, value in rows.items():
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
        self.console.print(table)
