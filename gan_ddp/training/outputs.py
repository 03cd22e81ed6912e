"""What a run tells the world besides its checkpoints: metrics.jsonl, the trackers, grids, evaluation, plots.

`RunOutputs` closes a metrics window into one line (a collective: the window's sums are reduced over the
processes) and writes it to `<run.dir>/metrics.jsonl` and the trackers; keeps metrics.jsonl in agreement with
the step training continues from (`rewind_metrics`); saves the fixed-noise grid; scores the generator
(`evaluate`, collective); and at the end draws the plots and the progress GIF from the files. Only the main
process writes, prints and logs; the collectives inside run on every rank.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import torch

from gan_ddp.components.models import N_CLASSES
from gan_ddp.runtime import checkpoint as ckpt
from gan_ddp.runtime import guard
from gan_ddp.runtime.distributed import average_buffers
from gan_ddp.runtime.fsutil import atomic_write
from gan_ddp.runtime.tracking import Trackers, open_trackers
from gan_ddp.training.metrics import MetricWindow

if TYPE_CHECKING:
    from gan_ddp.training.builder import Parts
    from gan_ddp.training.state import RunState
    from gan_ddp.training.step import GanStep


class RunOutputs:
    def __init__(self, parts: Parts, gan: GanStep, state: RunState) -> None:
        self.parts, self.gan, self.state, self.cfg = parts, gan, state, parts.cfg
        self.console, self.run_dir = parts.console, parts.run_dir
        self.metrics_path = parts.run_dir / "metrics.jsonl"
        self.tracker = Trackers([])  # `open_trackers` starts log.trackers when training starts
        self.last_metrics: dict[str, Any] = {}  # the last line logged: the summary's figures

    def open_trackers(self) -> None:
        """Start log.trackers (main process), continuing their runs from the state's step."""
        p = self.parts
        self.tracker = open_trackers(
            self.cfg.log,
            self.run_dir,
            config={**self.cfg.to_dict(), "resolved": self.run_facts()},
            enabled=p.is_main,
            warn=self.console.print,
            start_step=self.state.step,
        )

    def run_facts(self) -> dict[str, Any]:
        """What the run decided (config.yaml's `resolved`, the trackers' config)."""
        p = self.parts
        return {
            "precision": p.precision,
            "precision_reason": p.precision_reason,
            "world_size": p.world,
            "device": p.device.type,
            "threads_per_process": p.threads,
            "steps_per_epoch": p.steps_per_epoch,
            "total_steps": p.total_steps,
            "torch": str(torch.__version__),
            "data": p.data_info.as_dict(),
        }

    # ------------------------------------------------------------------ metrics
    def metrics_line(self, epoch: int, window_seconds: float) -> dict[str, Any]:
        """Collective: the open window as one line, means over processes and steps (one host sync); resets it."""
        p, window = self.parts, self.gan.window
        means = MetricWindow.means(window.reduce(p.accelerator))
        metrics = {
            "step": self.state.step,
            "epoch": epoch,
            "time_s": round(self.state.elapsed(), 3),
            "world_size": p.world,
            "img_per_s": window.local_steps * self.cfg.train.batch_size / max(window_seconds, 1e-9),
            **means,
            "lr/d": p.opt_d.param_groups[0]["lr"],
            "lr/g": p.opt_g.param_groups[0]["lr"],
        }
        if p.precision == "fp16":
            scaler = p.accelerator.scaler
            metrics["amp/scale"] = float(scaler.get_scale()) if scaler is not None else 1.0
            metrics["amp/skipped_d"], metrics["amp/skipped_g"] = self.gan.skipped.tolist()
        window.reset()
        return metrics

    def log_window(self, epoch: int, seconds: float, final: bool = False) -> dict[str, Any]:
        """Close the metrics window: metrics.jsonl, the trackers, the console (not for the `final` window, closed
        by the end of training: the run's summary follows); then the divergence check, after the line is
        written, so that metrics.jsonl shows the null."""
        metrics = self.metrics_line(epoch, seconds)
        self.write(metrics)
        if not final:
            self.console.log(metrics, self.parts.total_steps, self.cfg.train.max_seconds)
        self.last_metrics = metrics
        guard.check_metrics(metrics)
        return metrics

    def write(self, metrics: dict[str, Any]) -> None:
        """One line of metrics.jsonl (main process), and the same to the trackers."""
        if self.parts.is_main:
            line = json.dumps(guard.strict_json(metrics), allow_nan=False)  # NaN/inf as null: strict JSON
            with open(self.metrics_path, "a") as f:
                f.write(line + "\n")  # closed (flushed) per line: a crash loses nothing logged
            self.tracker.log({k: v for k, v in metrics.items() if k != "step"}, metrics["step"])

    def rewind_metrics(self, step: int) -> None:
        """metrics.jsonl agrees with the state training continues from (main process): lines past `step`
        (written by a run that was killed, rolled back, or whose checkpoints are gone) are dropped, so the file
        never holds a step twice or out of order. A fresh start (step 0) keeps the dropped lines aside."""
        path = self.metrics_path
        if not (self.parts.is_main and path.is_file()):
            return
        kept, dropped = [], []
        for line in path.read_text().splitlines():
            try:
                (kept if json.loads(line)["step"] <= step else dropped).append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a crash
        if not dropped:
            return
        if step == 0:
            aside = path.with_name("metrics.jsonl.discarded")
            with open(aside, "a") as f:
                f.write("".join(line + "\n" for line in dropped))
            self.console.print(
                f"note: {path}: {len(dropped)} line(s) of an earlier start that left no checkpoint moved to "
                f"{aside.name}; this run starts at step 0"
            )
        atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))

    # ------------------------------------------------------------------ grids and evaluation
    def sample_images(
        self, noise: torch.Tensor, use_ema: bool = True, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Generator output for `noise` (and `labels`, conditional) (main process only: no collective inside)."""
        p = self.parts
        model = p.ema.shadow if (use_ema and p.ema is not None) else p.G_raw
        was_training = model.training
        model.eval()
        with torch.no_grad():
            images = (model(noise) if labels is None else model(noise, labels)).float()
        model.train(was_training)
        return images

    def save_grid(self) -> None:
        """Collective (BN statistics averaged over ranks first); the main process writes samples/step_*.png."""
        p, step = self.parts, self.state.step
        average_buffers(p.accelerator, [p.G_raw, p.D_raw])
        if p.is_main:
            from torchvision.utils import save_image

            path = self.run_dir / "samples" / f"{ckpt.step_dir_name(step)}.png"
            nrow = int(math.sqrt(self.cfg.log.n_samples)) or 1
            caption = f"step {step}"
            if p.fixed_labels is not None:  # one row per class, one fixed noise vector per column
                nrow, caption = p.fixed_noise.size(0) // N_CLASSES, f"step {step}, rows: classes 0-9"
            images = self.sample_images(p.fixed_noise, labels=p.fixed_labels)
            save_image(images, path, nrow=nrow, normalize=True, value_range=(-1, 1))
            self.tracker.log_image("samples/grid", path, step, caption=caption)

    def evaluate(self) -> dict[str, Any]:
        """Collective: every rank generates its share of eval.n samples; FID, coverage and confidence
        from the gathered features are logged by the main process."""
        from gan_ddp.evaluation.eval_metrics import summary_line
        from gan_ddp.evaluation.evaluate import score_generator

        p, e = self.parts, self.cfg.eval
        average_buffers(p.accelerator, [p.G_raw] + ([p.ema.shadow] if p.ema else []))
        G = p.ema.shadow if p.ema is not None else p.G_raw
        results = score_generator(
            p.accelerator,
            G,
            p.evaluator,
            p.real_stats,
            e.n,
            self.cfg.model.z_dim,
            e.seed,
            e.batch,
            conditional=self.cfg.model.conditional,
        )
        line = {"step": self.state.step, "time_s": round(self.state.elapsed(), 3), **results}
        self.write(line)
        self.console.print(f"eval step {self.state.step}: {summary_line(results)}")
        return line

    # ------------------------------------------------------------------ the end
    def finish_artifacts(self) -> None:
        """Plots and the progress animation, from the files (so a resumed run's cover the whole run)."""
        if not self.cfg.log.plots:
            return
        try:
            from gan_ddp.components import viz

            plots = viz.plot_metrics(self.run_dir)
            gif = viz.make_animation(self.run_dir)
            for path in plots:
                self.tracker.log_image(f"plots/{path.stem}", path, self.state.step)
            self.tracker.log_video("samples/progress", gif, self.state.step)
        except Exception as exc:  # a plotting problem must not turn a finished training into a failure
            self.console.print(f"warning: plots/animation not written: {type(exc).__name__}: {exc}")

    def summary(self, reason: str, seconds: float) -> dict[str, Any]:
        """The rows of the table that closes a run."""
        rows: dict[str, Any] = {
            "ended": reason,
            "step": f"{self.state.step}/{self.parts.total_steps}",
            "seconds": seconds,
        }
        for key in ("img_per_s", "loss/d", "loss/g", "score/real", "score/fake"):
            if key in self.last_metrics:
                rows[key] = float(self.last_metrics[key])
        rows["run dir"] = str(self.run_dir)
        return rows
