"""The run's state and its checkpoints: where training stands, `save`, `resume` and `rollback`.

`RunState` holds what the loop counts (`step`, the training seconds of earlier sessions, the rollbacks and
their learning-rate factor) and writes, with the GAN step's models, optimisers, metric window and skip
counts, one complete checkpoint (`runtime.checkpoint`: safetensors and JSON, no pickles). `resume` reads one
back, refusing one of another model, batch or data with one line, and leaves metrics.jsonl to the caller.

Beyond G, D and the optimisers a checkpoint holds named *extras* (`RunState.extras`): anything with
`state_dict()` / `load_state_dict()` of tensors, each saved in `<name>.safetensors` (the EMA is "ema"). One
more piece of state that must survive a resume is one more entry there.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from gan_ddp.components.data import BUNDLED
from gan_ddp.components.models import model_signature
from gan_ddp.errors import one_line
from gan_ddp.runtime import checkpoint as ckpt
from gan_ddp.runtime import guard
from gan_ddp.runtime.checkpoint_legacy import load_format_1
from gan_ddp.runtime.distributed import average_buffers, check_consistency

if TYPE_CHECKING:
    from gan_ddp.training.builder import Parts
    from gan_ddp.training.step import GanStep


class Stateful(Protocol):
    """A checkpoint extra: its tensors by name, and back."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


class RunState:
    def __init__(self, parts: Parts, gan: GanStep) -> None:
        self.parts, self.gan, self.cfg, self.console = parts, gan, parts.cfg, parts.console
        self.ckpt_root = parts.run_dir / "checkpoints"
        self.step = 0
        self.time_before = 0.0  # seconds of earlier sessions of this run (restored on resume)
        self.lr_scale = 1.0  # train.on_nonfinite=rollback: product of the rollbacks' lr factors (checkpointed)
        self.rollbacks = 0
        self.save_seconds = 1.0  # estimate of a checkpoint's duration, for the max_seconds budget
        self.consistency_checks = 0  # DDP weight checks passed (printed at the end)
        self.extras: dict[str, Stateful] = {"ema": parts.ema} if parts.ema is not None else {}

    def elapsed(self) -> float:
        """Wall seconds this run has trained, set-up included, summed over resumed sessions (`time_s`)."""
        return self.time_before + time.monotonic() - self.parts.created

    def check_consistency(self, buffers: bool) -> None:
        """Collective: G and D identical on every rank (a mismatch raises, naming the first tensor)."""
        models = {"G": self.parts.G_raw, "D": self.parts.D_raw}
        self.consistency_checks += bool(check_consistency(self.parts.accelerator, models, self.step, buffers))

    # ------------------------------------------------------------------ save
    def save(self, root: Path | None = None) -> Path:
        """Collective. Ranks' BN statistics are averaged first so the checkpoint (rank 0's) speaks for all.
        `root` (default: the run's checkpoints/) is where it goes and what rotation prunes."""
        p, root = self.parts, self.ckpt_root if root is None else root
        t0 = time.monotonic()
        average_buffers(p.accelerator, [p.G_raw, p.D_raw])
        models = {"G": p.G_raw, "D": p.D_raw, **({"EMA": p.ema.shadow} if p.ema is not None else {})}
        guard.check_weights(p.accelerator, models, self.step)  # never checkpoint (nor rotate for) NaN weights
        self.check_consistency(buffers=True)  # just averaged
        # The open metrics window spans the checkpoint: keep its global sums so a resume logs the same line.
        sums = self.gan.window.reduce(p.accelerator)
        extras = {name: {f"{name}.{k}": v for k, v in x.state_dict().items()} for name, x in self.extras.items()}
        path = ckpt.save(
            p.accelerator,
            root,
            self.step,
            self._trainer_state(sums),
            extras,
            models=(p.G_raw, p.D_raw),
            optimizers=(p.opt_g.optimizer, p.opt_d.optimizer),
            scaler=p.accelerator.scaler,
        )
        if p.is_main:
            ckpt.rotate(root, self.cfg.checkpoint.keep)
        self.save_seconds = time.monotonic() - t0
        return path

    def _trainer_state(self, window_sums: dict[str, float]) -> dict[str, Any]:
        p = self.parts
        return {
            "step": self.step,
            "epoch": self.step // p.steps_per_epoch,
            "batch_in_epoch": self.step % p.steps_per_epoch,
            "steps_per_epoch": p.steps_per_epoch,
            "global_batch": self.cfg.train.batch_size,
            "world_size": p.world,
            "model": model_signature(self.cfg.model),
            "precision": p.precision,
            "ema": p.ema is not None,
            "window": self.gan.window.state(window_sums),
            "skipped": self.gan.skipped.tolist(),
            "time_s": self.elapsed(),
            "data": p.data_info.as_dict(),
            "lr_scale": self.lr_scale,
            "rollbacks": self.rollbacks,
            "settings": self.settings(),
        }

    def settings(self) -> dict[str, Any]:
        """The settings a resume compares with the checkpoint's (recorded in every checkpoint)."""
        c = self.cfg
        return {
            "seed": c.seed,
            "train.precision": self.parts.precision,
            "train.reuse_fake": c.train.reuse_fake,
            "loss.kind": c.loss.kind,
            "loss.real_label": c.loss.real_label,
            "loss.gp_weight": c.loss.gp_weight,
            "loss.r1_gamma": c.loss.r1_gamma,
            "loss.r1_every": c.loss.r1_every,
            "loss.mode_seeking": c.loss.mode_seeking,
            "selfcond.start": c.selfcond.start,
            "selfcond.every": c.selfcond.every,
            "selfcond.images": c.selfcond.images,
            "selfcond.iters": c.selfcond.iters,
            "model.dropout": c.model.dropout,
            "model.leaky_slope": c.model.leaky_slope,
            "optim.beta1": c.optim.beta1,
            "optim.beta2": c.optim.beta2,
            "optim.d_steps": c.optim.d_steps,
            "ema.decay": c.ema.decay,
            "ema.rampup": c.ema.rampup,
            "augment.policy": c.augment.policy,
            "augment.p": c.augment.p,
        }

    # ------------------------------------------------------------------ resume
    def resume(self, rollback_to: Path | None = None) -> None:
        """From train.resume (auto: the newest checkpoint that verifies; never; a directory), or from
        `rollback_to`. At step 0 when there is none. The caller makes metrics.jsonl agree with `step`."""
        p, mode = self.parts, self.cfg.train.resume if rollback_to is None else str(rollback_to)
        if mode == "never":
            return
        if mode == "auto":
            found = ckpt.find_latest(self.ckpt_root, warn=self.console.print)
            if found is None:  # killed before its first checkpoint, or every checkpoint corrupt: from step 0
                return
        else:
            found = Path(mode)
            if not found.is_dir():
                raise ckpt.CheckpointError(f"train.resume: {found} is not a checkpoint directory")
            ckpt.verify(found)  # an explicit checkpoint that is corrupt is an error, not a fallback
        state = ckpt.read_state(found)
        self._refuse_another_run(found, state)
        if state["world_size"] != p.world:
            # Accelerate restores random_states_<rank>.pkl where it exists and skips the rest silently.
            self.console.print(
                f"note: {found} was saved by {state['world_size']} process(es), resuming with {p.world}: "
                "weights, optimizers and the data order continue exactly (they depend on the global batch); "
                "per-process random streams (dropout) do not match an unbroken run"
            )
        # Every file is read and checked before anything changes: a bad one is one line naming it.
        loaded = ckpt.load_training_state(
            found, p.rank, state["world_size"], extras=tuple(self.extras), format_1=load_format_1
        )
        self._apply(found, loaded)
        self._note_changed_settings(found, state)
        self.step = state["step"]
        self.gan.skipped = torch.tensor(state["skipped"], dtype=torch.int64, device=p.device)
        self.time_before = float(state.get("time_s", 0.0))
        self.lr_scale, self.rollbacks = float(state.get("lr_scale", 1.0)), int(state.get("rollbacks", 0))
        self._apply_config_lr(quiet=rollback_to is not None)
        # The global window sums go to one rank; the next reduce adds them in.
        self.gan.window.load(state["window"], state["world_size"], holds_sums=p.is_main)
        self.console.print(f"resumed from {found} (step {self.step})")

    def _refuse_another_run(self, found: Path, state: dict[str, Any]) -> None:
        """A checkpoint of another model, global batch, data or EMA setting: one line saying which."""
        current = model_signature(self.cfg.model)
        if state["model"] != current:
            diff = [k for k in sorted(set(state["model"]) | set(current)) if state["model"].get(k) != current.get(k)]
            k = diff[0]
            absent = False if k == "conditional" else None  # the signature leaves conditional out when false
            raise ckpt.CheckpointError(
                f"{found}: checkpoint is of another model: model.{k}={state['model'].get(k, absent)!r} there, "
                f"{current.get(k, absent)!r} here"
            )
        if state["global_batch"] != self.cfg.train.batch_size:
            raise ckpt.CheckpointError(
                f"{found}: train.batch_size was {state['global_batch']}, now {self.cfg.train.batch_size}; "
                "the data position depends on it (use a new run.dir to change it)"
            )
        trained_on, data_info = state.get("data"), self.parts.data_info  # no "data" before it was recorded
        if trained_on is not None and trained_on["sha256"] != data_info.sha256:
            # Never switch data in the middle of a run, e.g. from the bundled fallback to a full set downloaded since.
            fix = "data.root=bundled data.split=test" if trained_on["root"] == BUNDLED else "the data it started with"
            raise ckpt.CheckpointError(
                f"{found}: this run trained on {trained_on['dataset']} {trained_on['split']} from "
                f"{trained_on['root']} ({trained_on['images']:,} images), but the data now is "
                f"{data_info.describe()}; resume with {fix}, or start a new run.dir"
            )
        if state["ema"] != (self.parts.ema is not None):
            raise ckpt.CheckpointError(f"{found}: ema.enabled was {state['ema']} in this checkpoint")

    def _apply(self, found: Path, loaded: ckpt.TrainingState) -> None:
        """Load a checkpoint's states into the models, optimizers, scaler, extras and this process's generators."""
        p = self.parts
        for model, name, tensors in zip((p.G_raw, p.D_raw), ckpt.MODELS, loaded.models, strict=True):
            try:
                model.load_state_dict(tensors)
            except RuntimeError as exc:
                raise ckpt.CheckpointError(f"{found / name}: does not fit the model ({one_line(exc)[:200]})") from None
        for opt, name, state in zip((p.opt_g, p.opt_d), ckpt.OPTIMIZERS, loaded.optimizers, strict=True):
            # torch checks the groups' sizes, not the state's shapes: a wrong one would fail at the first step.
            params = [q for group in opt.optimizer.param_groups for q in group["params"]]
            for pid, slots in state["state"].items():
                for slot, value in slots.items():
                    if not 0 <= pid < len(params) or (
                        torch.is_tensor(value) and value.dim() > 0 and value.shape != params[pid].shape
                    ):
                        raise ckpt.CheckpointError(
                            f"{found / name}.safetensors: state.{pid}.{slot} does not fit the optimizer's parameters"
                        )
            try:
                opt.optimizer.load_state_dict(state)
            except (ValueError, KeyError, TypeError, RuntimeError) as exc:
                raise ckpt.CheckpointError(
                    f"{found / name}: does not fit the optimizer ({one_line(exc)[:200]})"
                ) from None
        scaler = p.accelerator.scaler
        if scaler is not None and loaded.scaler is not None:  # fp16 then and now (a change of precision: a note)
            scaler.load_state_dict(loaded.scaler)
        for name, extra in self.extras.items():
            prefix = f"{name}."
            extra.load_state_dict({k[len(prefix) :]: v.to(p.device) for k, v in loaded.extras[name].items()})
        if loaded.rng is not None:
            ckpt.set_rng_state(loaded.rng)

    def _note_changed_settings(self, found: Path, state: dict[str, Any]) -> None:
        """One note naming the settings that change the training (not the shapes: refused before) and differ
        from the checkpoint's; the run goes on with the config's. Learning rates have their own note."""
        now = self.settings()
        then = dict(state.get("settings", {}))
        then.setdefault("train.precision", state.get("precision"))
        changed = [f"{k} {then[k]!r} -> {now[k]!r}" for k in sorted(now) if k in then and then[k] != now[k]]
        if changed:
            self.console.print(f"note: {found} was trained with other settings, continuing with: {', '.join(changed)}")

    def _apply_config_lr(self, quiet: bool = False) -> None:
        """The optimizers' state_dicts carry their learning rates; the config wins (times the rollbacks'
        factor), so that a run that diverged can resume from its last finite checkpoint with a lower
        optim.lr_d / optim.lr_g."""
        p, optim = self.parts, self.cfg.optim
        for name, opt, lr in (("lr_d", p.opt_d, optim.lr_d), ("lr_g", p.opt_g, optim.lr_g)):
            saved, lr = opt.param_groups[0]["lr"], lr * self.lr_scale
            if saved != lr:
                if not quiet:
                    scaled = f" x {self.lr_scale:g} after rollbacks" if self.lr_scale != 1.0 else ""
                    self.console.print(
                        f"note: optim.{name} is {lr:g} from the config{scaled} (the checkpoint had {saved:g})"
                    )
                for group in opt.param_groups:
                    group["lr"] = lr

    # ------------------------------------------------------------------ rollback
    def complete_checkpoints(self) -> list[Path]:
        return [p for p in ckpt.list_checkpoints(self.ckpt_root) if (p / ckpt.MANIFEST).is_file()]

    def rollback(self, exc: guard.DivergenceError) -> bool:
        """train.on_nonfinite=rollback: back to the newest checkpoint (finite by construction) with lower
        learning rates; False where the policy, its budget or the checkpoints do not allow one. Every rank saw
        the same divergence, so every rank rolls back alike. The caller rewinds metrics.jsonl to `step`."""
        t = self.cfg.train
        complete = self.complete_checkpoints()
        if t.on_nonfinite != "rollback" or self.rollbacks >= t.max_rollbacks or not complete:
            return False
        elapsed, rollbacks, scale = self.elapsed(), self.rollbacks + 1, self.lr_scale  # the checkpoint's are older
        self.gan.window.reset()  # holds the non-finite sums; the checkpoint's window replaces it on the main process
        self.resume(rollback_to=complete[-1])
        self.rollbacks, self.lr_scale = rollbacks, scale * t.rollback_lr_factor  # each rollback lowers them further
        self._apply_config_lr(quiet=True)
        self.time_before = elapsed - (time.monotonic() - self.parts.created)  # time_s keeps counting
        self.console.print(
            f"warning: training diverged at {exc}; rolled back to step {self.step} with learning rates x "
            f"{self.lr_scale:g} (rollback {rollbacks} of {t.max_rollbacks}, train.on_nonfinite=rollback)"
        )
        return True

    def resume_point(self) -> str:
        """What the error line of a diverged run says about where to resume from."""
        complete = self.complete_checkpoints()
        if not complete:
            return "no checkpoint was written; lower optim.lr_d / optim.lr_g (or change the config) and rerun"
        return (
            f"nothing non-finite was checkpointed; the newest checkpoint, {complete[-1]}, is the resume point: "
            "lower optim.lr_d / optim.lr_g (or change the config) and rerun"
        )
