"""The training loop, in the order things happen.

`Trainer(cfg)` builds the run (`builder.build`: accelerator, run lock, threads, data, models, EMA, optimisers,
compile, evaluator, grid inputs, augmentation) and wires the components, none of which imports this module:

- `step.GanStep`: `noise`, `fake_labels`, `generate`, `d_step`, `g_step`, `train_step` (the GAN step);
- `state.RunState`: the step counter and the checkpoints (`save`, `resume`, `rollback`);
- `outputs.RunOutputs`: metrics windows into metrics.jsonl and the trackers, grids, evaluation, plots;
- `stop`: signals and the time budget, exit codes, marker files.

`train()` then: prepares run.dir, resumes, writes config.yaml, opens the trackers, and loops: one step, the
metrics window at log steps, the periodic phases (grid, evaluation, checkpoint), the stop check; at the end a
checkpoint, the last window, the markers, plots and the summary. Rank discipline: every process runs every
collective (reductions, gathers, checkpoint saves, `wait_for_everyone`); only the main process writes files,
prints and logs. `gan-ddp bench` times the real step through `time_phases` and `advance`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from gan_ddp.config import Config, save_config
from gan_ddp.runtime import checkpoint as ckpt
from gan_ddp.runtime import faults, guard
from gan_ddp.runtime.distributed import broadcast_from_main, lost_peers
from gan_ddp.training import stop
from gan_ddp.training.builder import build
from gan_ddp.training.outputs import RunOutputs
from gan_ddp.training.state import RunState
from gan_ddp.training.step import GanStep
from gan_ddp.training.stop import EXIT_OK, EXIT_PREEMPTED, STOP_CHECK_EVERY, StopRequest


class Trainer:
    """A run: its `parts` (builder.Parts), `gan` (step.GanStep), `state` (state.RunState) and `outputs`
    (outputs.RunOutputs); `train()` is the loop."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.parts = p = build(cfg)  # every rank; the main process holds run.dir's lock from here on
        self.accelerator, self.console, self.is_main, self.run_dir = p.accelerator, p.console, p.is_main, p.run_dir
        self.gan = GanStep(p)
        self.state = RunState(p, self.gan)
        self.outputs = RunOutputs(p, self.gan, self.state)
        self.stop = StopRequest(announce=p.is_main)

    # ------------------------------------------------------------------ the seams tools use (bench)
    def time_phases(self, timer: Callable[[str], AbstractContextManager[object]] | None) -> None:
        """The seam `gan-ddp bench` measures through: `GanStep.train_step` runs its phases ("data", "d_step",
        "g_step") inside `timer(name)`; None restores the untimed default."""
        self.gan.time_phases(timer)

    def advance(self, batch: tuple[Any, Any]) -> None:
        """Train on one batch as the next global step."""
        self.gan.train_step(batch, self.state.step + 1)
        self.state.step += 1

    def save_checkpoint(self, root: Path | None = None) -> Path:
        """Collective: a checkpoint of the current step into `root` (default: run.dir's checkpoints/)."""
        return self.state.save(root)

    # ------------------------------------------------------------------ the run
    def train(self) -> int:
        try:
            return self._train()
        finally:
            if self.parts.run_lock is not None:
                self.parts.run_lock.release()

    def _train(self) -> int:
        p, state, out = self.parts, self.state, self.outputs
        faults.stopped_after_checkpoint(None)
        if self.is_main:
            (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
            state.ckpt_root.mkdir(parents=True, exist_ok=True)
            ckpt.clean_temporaries(state.ckpt_root)
            for name in (stop.PREEMPTED_MARKER, stop.DONE_MARKER, stop.LOST_MARKER):
                (self.run_dir / name).unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()
        state.resume()
        out.rewind_metrics(state.step)  # lines past the state we continue from describe nothing we have
        if self.is_main:
            save_config(self.cfg, self.run_dir / "config.yaml", out.run_facts())
        self.console.print(
            f"gan-ddp: {p.world} process(es) on {p.device.type}, precision {p.precision} "
            f"({p.precision_reason}), {p.threads} thread(s)/process, {p.data_info.describe()}, "
            f"{p.steps_per_epoch} steps/epoch, G {p.n_params[0]:,} / D {p.n_params[1]:,} parameters"
        )
        if state.step >= p.total_steps:
            self.console.print(f"nothing to do: step {state.step} already reached {p.total_steps} (train.steps/epochs)")
            if self.is_main:
                (self.run_dir / stop.DONE_MARKER).write_text(f"step {state.step}\n")
            return EXIT_OK
        with stop.signals_to(self.stop):
            out.open_trackers()
            self.console.start(p.total_steps, state.step)
            try:
                exit_code, reason = self._loop_with_rollbacks()
                if exit_code == EXIT_PREEMPTED:  # a signal from here on keeps exit 75 (runtime.faults)
                    faults.stopped_after_checkpoint(self.stop.at)
                if p.world > 1:
                    self.console.print(
                        f"DDP consistency check passed {state.consistency_checks} time(s): "
                        f"G and D identical on {p.world} ranks"
                    )
                if self.is_main:
                    if exit_code == EXIT_PREEMPTED:  # launchers hide our exit code: leave a marker for job scripts
                        (self.run_dir / stop.PREEMPTED_MARKER).write_text(
                            f"step {state.step} signal {self.stop.signal}\n"
                        )
                    if reason == "done":  # before the plots: a signal from here on finds the run complete
                        (self.run_dir / stop.DONE_MARKER).write_text(f"step {state.step}\n")
                    out.finish_artifacts()
            except BaseException as exc:
                self._close_after(exc)
                raise
        self.console.summary(out.summary(reason, time.monotonic() - p.created))
        out.tracker.finish(exit_code)
        self.accelerator.end_training()  # finishes Accelerate's trackers, destroys the process group
        return exit_code

    def _loop_with_rollbacks(self) -> tuple[int, str]:
        """The loop; after a divergence, again from the newest checkpoint while train.on_nonfinite allows."""
        while True:
            try:
                return self._loop()
            except guard.DivergenceError as exc:
                if not self.state.rollback(exc):
                    raise
                self.outputs.rewind_metrics(self.state.step)

    def _batches(self) -> Iterator[tuple[int, Any]]:
        """(epoch, batch) from the current step to the last; a resumed run continues mid-epoch exactly."""
        p, state = self.parts, self.state
        while state.step < p.total_steps:
            epoch, position = divmod(state.step, p.steps_per_epoch)
            # Through Accelerate's loader, not the sampler: its __iter__ re-applies its own epoch counter
            # (`iteration`) to the sampler, and skip_first_batches copies that counter.
            p.loader.set_epoch(epoch)
            batches = self.accelerator.skip_first_batches(p.loader, position) if position else p.loader
            if position:  # Accelerate < 1.11 (the K80 stack's 1.10) starts the skipping loader at epoch 0
                batches.set_epoch(epoch)
            for batch in batches:
                yield epoch, batch
                if state.step >= p.total_steps:
                    return

    def _loop(self) -> tuple[int, str]:
        """Train to the last step, or until a signal or the time budget stops the run: (exit code, reason)."""
        cfg, p, state, out = self.cfg, self.parts, self.state, self.outputs
        window_start = time.monotonic()  # of the open metrics window, less the time spent on outputs
        last_saved = state.step if state.step else -1
        for epoch, batch in self._batches():
            t0 = time.monotonic()
            self.advance(batch)
            self.console.advance(state.step, state.step // p.steps_per_epoch)
            if state.step % cfg.log.every == 0:
                out.log_window(epoch, time.monotonic() - window_start)
                if cfg.train.check_consistency:
                    state.check_consistency(buffers=False)
                window_start = time.monotonic()
            paused = time.monotonic()
            last_saved = self._periodic(last_saved)
            window_start += time.monotonic() - paused  # img_per_s measures training, not grids and saves
            if p.world == 1 or state.step % STOP_CHECK_EVERY == 0:
                stopped = self._stop_if_asked(time.monotonic() - t0, last_saved)
                if stopped is not None:
                    return stopped
        # The checkpoint first: it keeps the open metrics window, so training extended later (more
        # steps or epochs) logs exactly what one longer run would have.
        if last_saved != state.step:
            state.save()
        if self.gan.window.local_steps:
            out.log_window(state.step // p.steps_per_epoch, time.monotonic() - window_start, final=True)
        if state.step % cfg.log.sample_every:
            out.save_grid()
        return EXIT_OK, "done"

    def _periodic(self, last_saved: int) -> int:
        """The phases due at this step, in this order: grid, evaluation, checkpoint (last, so that it holds what
        the others changed). Returns the last checkpointed step."""
        cfg, step = self.cfg, self.state.step
        if self.parts.clusterer is not None and cfg.selfcond.due(step):
            self._recluster()
        if step % cfg.log.sample_every == 0:
            self.outputs.save_grid()
        if cfg.eval.every and step % cfg.eval.every == 0:
            self.outputs.evaluate()
        if step % cfg.checkpoint.every == 0:
            self.state.save()
            return step
        return last_saved

    def _recluster(self) -> None:
        """Self-conditioned: cluster D's features of real images again, on every rank; rank 0's result is
        everyone's (the ranks' BatchNorm statistics differ between checkpoints)."""
        p = self.parts
        result = p.clusterer.recluster(p.G_raw, p.D_raw, self.state.step)
        broadcast_from_main(p.accelerator, [p.D_raw.centroids, p.G_raw.prior])
        p.console.print(result.line())

    def _stop_if_asked(self, step_seconds: float, last_saved: int) -> tuple[int, str] | None:
        """After a signal or near the time budget (agreed by all ranks): checkpoint, and (exit code, reason)."""
        budget, state = self.cfg.train.max_seconds, self.state
        out_of_time = budget is not None and (
            time.monotonic() - self.parts.created + state.save_seconds + STOP_CHECK_EVERY * step_seconds >= budget
        )
        why = stop.agree_to_stop(self.accelerator, self.stop, out_of_time)
        if why is None:
            return None
        if last_saved != state.step:
            state.save()
        if why == "signal":
            self.console.print(f"stop requested by signal: checkpoint at step {state.step}, exit {EXIT_PREEMPTED}")
            return EXIT_PREEMPTED, "preempted"
        self.console.print(f"train.max_seconds reached: checkpoint at step {state.step}")
        return EXIT_OK, "time budget"

    def _close_after(self, exc: BaseException) -> None:
        """On any failure: LOST for a lost peer, then the console, trackers and process group closed (an
        unfinished W&B run can hang the exit); a divergence becomes the one line that names the resume point."""
        p = self.parts
        if p.world > 1 and faults.collective_failure(exc) is not None:
            # before the process group goes: ask the store who is still there (the error line names them)
            exc.lost_peers = lost_peers(p.rank, p.world, min(10.0, self.cfg.train.collective_timeout_s))
            with contextlib.suppress(OSError):  # rank 0 may be the lost one: whoever is left writes it
                (self.run_dir / stop.LOST_MARKER).write_text(
                    f"step {self.state.step}: {faults.collective_failure(exc)}\n"
                )
        self.console.stop()
        self.outputs.tracker.finish(1)
        self.accelerator.end_training()
        if isinstance(exc, guard.DivergenceError):
            after = f" (after {self.state.rollbacks} rollback(s))" if self.state.rollbacks else ""
            raise guard.DivergenceError(f"training diverged at {exc}{after}; {self.state.resume_point()}") from None
