"""The training loop: builds everything around one Accelerator, then alternates D and G steps.

Reading order: `Trainer.__init__` (wiring), `d_step` / `g_step` (the GAN), `train` (loop, logging,
checkpoints, stopping). Rank discipline: every process runs every collective (`reduce`, `gather`,
checkpoint saves, `wait_for_everyone`); only the main process writes files, prints and logs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gan_ddp.components.augment import STREAM_FAKE_D, STREAM_FAKE_G, STREAM_REAL, DiffAugment
from gan_ddp.components.data import BUNDLED, DataError, ImageTensorDataset, load_data, make_train_loader, normalize
from gan_ddp.components.losses import LOSSES, d_loss, d_scores, g_loss, gradient_penalty, r1_penalty
from gan_ddp.components.models import (
    N_CLASSES,
    build_models,
    class_grid_inputs,
    count_parameters,
    couples_batch,
    model_signature,
)
from gan_ddp.components.selfcond import UNASSIGNED, Clusterer
from gan_ddp.config import Config, ConfigError, save_config
from gan_ddp.errors import one_line
from gan_ddp.runtime import checkpoint as ckpt
from gan_ddp.runtime import compat, faults, guard, runlock
from gan_ddp.runtime.console import TrainingConsole
from gan_ddp.runtime.distributed import (
    announce_host,
    average_buffers,
    broadcast_from_main,
    check_consistency,
    check_distributed,
    choose_precision,
    cpu_has_native_bf16,
    local_world_size,
    lost_peers,
    make_accelerator,
    want_cpu,
)
from gan_ddp.runtime.doctor import check_gpu_kernels
from gan_ddp.runtime.fsutil import atomic_write
from gan_ddp.runtime.tracking import Trackers, open_trackers
from gan_ddp.training.ema import GeneratorEMA
from gan_ddp.training.metrics import MetricWindow

EXIT_OK = 0
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written, run the same command again (launch/slurm.sbatch requeues)
# torchrun and `accelerate launch` turn a worker's 75 into their own exit code 1: on preemption the main
# process also writes this file into run.dir (removed when the run starts again), for job scripts.
PREEMPTED_MARKER = "PREEMPTED"
# Written by the main process when the run has reached its last step (removed when a run starts), so a job
# script that got a signal while training was already over does not requeue it (launch/slurm.sbatch).
DONE_MARKER = "DONE"
# Written by every process whose collective failed because another process or its host was lost (the error
# line inside): torchrun reports any failure as 1, so job scripts read this to requeue (launch/slurm.sbatch).
LOST_MARKER = "LOST"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # SIGINT: Ctrl-C stops like a preemption
STOP_CHECK_EVERY = 10  # steps between cross-process agreements on stopping (a collective, so not every step)
# A Ctrl-C on a terminal reaches torchrun and its workers at once, and torchrun relays it to them again
# a few ms later: a second SIGINT aborts only if it comes later than this after the first.
SECOND_INTERRUPT_AFTER_S = 1.0


@dataclass
class StopRequest:
    signal: int = 0  # the signal number received, 0 if none
    at: float = 0.0  # when (time.monotonic)
    announce: bool = False  # the main process says what a Ctrl-C does

    def handler(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.signal and signum == signal.SIGINT:
            if now - self.at > SECOND_INTERRUPT_AFTER_S:
                raise KeyboardInterrupt  # a second Ctrl-C: abort at once, no checkpoint
            return
        if not self.signal:
            self.signal, self.at = signum, now
            if self.announce and signum == signal.SIGINT:  # os.write: no Python-level lock inside a handler
                os.write(2, b"\nCtrl-C: stopping after this step with a checkpoint; Ctrl-C again aborts at once\n")


def resolve_precision(requested: str) -> tuple[str, str]:
    if want_cpu():
        return choose_precision(requested, "cpu", cpu_has_bf16=cpu_has_native_bf16())
    return choose_precision(requested, "cuda", capability=torch.cuda.get_device_capability())


def compile_models(G: torch.nn.Module, D: torch.nn.Module, mode: str, device_type: str):
    """torch.compile G and D; `reduce-overhead` also replays them as CUDA graphs (no launch overhead)."""
    why_not = compat.compile_unsupported()
    if why_not:
        raise ConfigError(f"train.compile: {why_not}; set train.compile=false")
    if mode == "reduce-overhead" and device_type != "cuda":
        raise ConfigError(
            "train.compile_mode: reduce-overhead captures CUDA graphs and needs a GPU; on CPU use "
            "train.compile_mode=default (or train.compile=false)"
        )
    return torch.compile(G, mode=mode), torch.compile(D, mode=mode)


_UNTIMED = contextlib.nullcontext()  # reusable, so an untimed phase costs no allocation


def _untimed(name: str) -> AbstractContextManager[object]:
    return _UNTIMED


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.created = time.monotonic()  # train.max_seconds counts set-up too, as a job's time limit does
        self.cfg = cfg
        check_gpu_kernels()  # a GPU this torch build has no kernels for: one line now, not a crash mid-run
        self.precision, self.precision_reason = resolve_precision(cfg.train.precision)
        self.accelerator = acc = make_accelerator(self.precision, timeout_s=cfg.train.collective_timeout_s)
        check_distributed(acc.num_processes)
        self.world = acc.num_processes
        self.rank = acc.process_index
        if self.world > 1:  # for the error line that names a lost process (distributed.lost_peers)
            announce_host(self.rank)
        self.device = acc.device
        self.is_main = acc.is_main_process
        self.console = TrainingConsole(enabled=self.is_main)
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.run_lock = self._lock_run_dir()  # before anything reads or writes the run directory
        try:
            self._build(cfg)
        except BaseException:  # in-process callers (tests, notebooks) get the lock back too
            if self.run_lock is not None:
                self.run_lock.release()
            raise

    def _build(self, cfg: Config) -> None:
        """Everything after the lock: threads, data, models, optimizers, evaluation, the run's counters."""
        acc = self.accelerator
        if self.device.type == "cpu":
            # Processes sharing a machine split its cores; oversubscription costs more than it gains.
            threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // local_world_size())
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()

        B = cfg.train.batch_size
        if B % self.world:
            error = ConfigError(
                f"train.batch_size: {B} does not divide by the {self.world} processes; use a multiple of {self.world}"
            )
            error.all_ranks = True  # every rank finds it: printed once, by rank 0 (faults.is_echo)
            raise error
        self.local_batch = B // self.world

        # Data: every rank holds the uint8 tensor once (47 MB for MNIST train); batches are single index ops.
        images, labels, self.data_info = load_data(
            cfg.data.dataset,
            cfg.data.root,
            cfg.data.split,
            cfg.data.download,
            fallback=cfg.data.fallback == "bundled",
            main_process_first=acc.main_process_first,
            note=self.console.print,
        )
        if self.data_info.root == BUNDLED:
            # config.yaml, W&B and evaluation then name the data the run really trains on.
            cfg.data.root, cfg.data.split = BUNDLED, "test"
        self._check_same_data()
        if len(images) < B:
            raise ConfigError(f"train.batch_size: {B} is larger than the dataset ({len(images)} images)")
        dataset = ImageTensorDataset(images, labels)
        if self.device.type == "cuda":
            dataset = dataset.to(self.device)  # resident on the GPU: no host-to-device copy per step
        loader = make_train_loader(dataset, B, self.local_batch, cfg.seed, cfg.data.num_workers)
        self.num_images = len(dataset)

        # Models: identical initialisation on every rank (DDP would broadcast rank 0's anyway), then
        # a per-rank seed for dropout.
        torch.manual_seed(cfg.seed)
        G, D = build_models(cfg.model)
        self.n_params = (count_parameters(G), count_parameters(D))
        self.ema = GeneratorEMA(G, cfg.ema.decay, cfg.ema.rampup) if cfg.ema.enabled else None
        if self.ema is not None:
            self.ema.shadow.to(self.device)
        fused = compat.fused_adam(self.device.type)
        opt_g = torch.optim.Adam(
            G.parameters(), lr=cfg.optim.lr_g, betas=(cfg.optim.beta1, cfg.optim.beta2), fused=fused
        )
        opt_d = torch.optim.Adam(
            D.parameters(), lr=cfg.optim.lr_d, betas=(cfg.optim.beta1, cfg.optim.beta2), fused=fused
        )
        self.cuda_graphs = False
        if cfg.train.compile:
            G, D = compile_models(G, D, cfg.train.compile_mode, self.device.type)
            self.cuda_graphs = cfg.train.compile_mode == "reduce-overhead"
        self.G, self.D, self.opt_g, self.opt_d, self.loader = acc.prepare(G, D, opt_g, opt_d, loader)
        self.G_raw = acc.unwrap_model(self.G)
        self.D_raw = acc.unwrap_model(self.D)
        self.joint_d_forward = not couples_batch(self.D_raw)
        self.clusterer = None  # model.clusters: the re-clusterings of D's features (selfcond.*)
        if cfg.model.clusters:
            plan = cfg.selfcond
            self.clusterer = Clusterer(dataset.images, cfg.model.clusters, plan.images, plan.iters, cfg.seed)
        torch.manual_seed(cfg.seed * 7919 + 1 + self.rank)

        self.evaluator = self.real_stats = None
        if cfg.eval.every:  # all ranks: the main process trains/caches the evaluator first, the others wait
            from gan_ddp.evaluation.evaluate import prepare_evaluation
            from gan_ddp.evaluation.evaluator import RealData

            real = RealData(cfg.data.dataset, cfg.data.root, cfg.data.split, images, labels, self.data_info.sha256)
            self.evaluator, self.real_stats = prepare_evaluation(acc, real, cfg.eval.cache_dir, kind=cfg.eval.evaluator)

        self.steps_per_epoch = len(self.loader)
        by_epochs = cfg.train.epochs * self.steps_per_epoch
        self.total_steps = min(cfg.train.steps, by_epochs) if cfg.train.steps else by_epochs

        # Noise is a function of (seed, step, global sample index): each rank takes its slice of the
        # global batch's noise, so N processes draw exactly what one process would.
        self.noise_gen = torch.Generator(device=self.device)
        self.conditional = cfg.model.conditional
        self.fixed_labels: torch.Tensor | None = None
        if self.conditional:  # grids: one row per class, the same noise down each column
            z, y = class_grid_inputs(max(1, round(cfg.log.n_samples / N_CLASSES)), cfg.model.z_dim, cfg.seed + 2**20)
            self.fixed_noise, self.fixed_labels = z.to(self.device), y.to(self.device)
        else:
            self.fixed_noise = torch.randn(
                cfg.log.n_samples, cfg.model.z_dim, generator=torch.Generator().manual_seed(cfg.seed + 2**20)
            ).to(self.device)
        self.augment = DiffAugment(cfg.augment, cfg.seed, B, self.rank, self.local_batch)

        self.window = MetricWindow(self.device, self.world)  # losses and scores since the last log line
        self.phase: Callable[[str], AbstractContextManager[object]] = _untimed  # see `time_phases`
        # fp16: optimizer steps the gradient scaler skipped (D, G), counted on the device (no sync per step)
        self.skipped = torch.zeros(2, dtype=torch.int64, device=self.device)
        self.step = 0
        self.last_metrics: dict[str, Any] = {}
        self.stop = StopRequest(announce=self.is_main)
        self.consistency_checks = 0
        self.tracker = Trackers([])  # train() opens log.trackers
        self.save_seconds = 1.0  # estimate of a checkpoint's duration, for the max_seconds budget
        self.time_before = 0.0  # seconds of earlier sessions of this run (restored on resume)
        self.lr_scale = 1.0  # train.on_nonfinite=rollback: product of the rollbacks' lr factors (checkpointed)
        self.rollbacks = 0

    def _lock_run_dir(self) -> runlock.RunLock | None:
        """The main process takes the run directory's lock; the other processes learn the outcome, so that
        all of them stop at once when another training holds it."""
        failure: Exception | None = None
        lock = None
        if self.is_main:
            try:
                lock = runlock.acquire(self.run_dir, warn=self.console.print)
            except (runlock.RunLockError, OSError) as exc:
                failure = exc
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            if broadcast_object_list([str(failure) if failure else ""])[0] and failure is None:
                raise runlock.RunLockError("the main process could not lock run.dir (see its error line)")
        if failure is not None:
            raise failure
        return lock

    def _check_same_data(self) -> None:
        """Collective: every rank read the same bytes (a download or fallback may go differently per node)."""
        if self.world == 1:
            return
        # 52 bits of the checksum: exact in a float64, and collectives of float64 work on every backend.
        digest = torch.tensor([float(int(self.data_info.sha256[:13], 16))], dtype=torch.float64, device=self.device)
        if len(set(self.accelerator.gather(digest).tolist())) > 1:  # every rank sees every digest
            raise DataError(
                f"processes read different data ({self.data_info.describe()} on rank {self.rank}); "
                "give every node the same data.root contents"
            )

    def elapsed(self) -> float:
        """Wall seconds this run has trained, set-up included, summed over resumed sessions (`time_s`)."""
        return self.time_before + time.monotonic() - self.created

    def time_phases(self, timer: Callable[[str], AbstractContextManager[object]] | None) -> None:
        """The seam `gan-ddp bench` measures through: `train_step` runs its phases ("data", "d_step",
        "g_step") inside `timer(name)`; None restores the untimed default."""
        self.phase = timer or _untimed

    # ------------------------------------------------------------------ the GAN step
    def noise(self, step: int, stream: int) -> torch.Tensor:
        self.noise_gen.manual_seed((self.cfg.seed * 1_000_003 + step * 4 + stream) % (2**63))
        z = torch.randn(self.cfg.train.batch_size, self.cfg.model.z_dim, generator=self.noise_gen, device=self.device)
        return z[self.rank * self.local_batch : (self.rank + 1) * self.local_batch]  # (b, z_dim)

    def fake_labels(self, step: int, stream: int, z: torch.Tensor | None = None) -> torch.Tensor | None:
        """Classes asked of a conditional G, uniform over the classes, like `noise` a function of (seed, step,
        global sample index) (its unused streams 2 and 3); a self-conditioned G's own pick for noise z (D
        scores each fake as that class); None for an unconditional model."""
        if self.clusterer is not None and z is not None:
            return self.G_raw.labels(z)
        if not self.conditional:
            return None
        self.noise_gen.manual_seed((self.cfg.seed * 1_000_003 + step * 4 + 2 + stream) % (2**63))
        y = torch.randint(0, N_CLASSES, (self.cfg.train.batch_size,), generator=self.noise_gen, device=self.device)
        return y[self.rank * self.local_batch : (self.rank + 1) * self.local_batch]  # (b,)

    def d_step(
        self,
        real: torch.Tensor,
        fake: torch.Tensor,
        step: int = 0,
        real_y: torch.Tensor | None = None,
        fake_y: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One D update on real and fake.detach(); returns (loss, D(x), D(G(z))) as 0-dim device tensors.
        `real_y` / `fake_y`: the classes, for a conditional D. With augmentation on, D sees both augmented."""
        cfg = self.cfg.loss
        real_in = self.augment(real, step, STREAM_REAL)
        with self.accelerator.autocast():
            fake_in = self.augment(fake.detach(), step, STREAM_FAKE_D)
            if self.joint_d_forward:  # one forward over [real; fake]: per-sample D, so the same logits
                x = torch.cat([real_in.to(fake_in.dtype), fake_in])
                logits = self.D(x) if real_y is None else self.D(x, torch.cat([real_y, fake_y]))
                real_logits, fake_logits = logits[: real.size(0)], logits[real.size(0) :]
            elif real_y is None:  # BatchNorm: real and fake keep their own batch statistics
                real_logits = self.D(real_in)
                fake_logits = self.D(fake_in)
            else:
                real_logits = self.D(real_in, real_y)
                fake_logits = self.D(fake_in, fake_y)
            loss = d_loss(cfg.kind, real_logits, fake_logits, cfg.real_label)
        if LOSSES[cfg.kind].per_sample_penalty:  # conditional: interpolates are scored as the real images' classes
            critic = self.D if real_y is None else (lambda x: self.D(x, real_y))
            loss = loss + cfg.gp_weight * gradient_penalty(critic, real_in, fake_in.detach())
        if cfg.r1_gamma and step % cfg.r1_every == 0:  # lazy R1: every r1_every steps, weighted r1_every times
            critic = self.D if real_y is None else (lambda x: self.D(x, real_y))
            loss = loss + (cfg.r1_gamma / 2 * cfg.r1_every) * r1_penalty(critic, real_in)
        self.opt_d.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self._step_and_count_skip(self.opt_d, 0)
        score_real, score_fake = d_scores(real_logits, fake_logits)
        return loss.detach(), score_real, score_fake

    def g_step(self, fake: torch.Tensor, step: int = 0, fake_y: torch.Tensor | None = None) -> torch.Tensor:
        """One G update through a frozen D. D is called unwrapped: its weights need no gradient, so there
        is nothing for DDP to all-reduce, and DDP's reducer never sees a forward without a backward."""
        self.D_raw.requires_grad_(False)
        try:
            with self.accelerator.autocast():
                x = self.augment(fake, step, STREAM_FAKE_G)
                loss = g_loss(self.cfg.loss.kind, self.D_raw(x) if fake_y is None else self.D_raw(x, fake_y))
            self.opt_g.zero_grad(set_to_none=True)
            self.accelerator.backward(loss)
            self._step_and_count_skip(self.opt_g, 1)
        finally:
            self.D_raw.requires_grad_(True)
        if self.ema is not None:
            self.ema.update(self.G_raw)
        return loss.detach()

    def _step_and_count_skip(self, optimizer, which: int) -> None:
        """optimizer.step(), counting a step the fp16 gradient scaler skipped into self.skipped[which].

        Accelerate's `step_was_skipped` sees only skips where the scaler did not call `optimizer.step`. A
        fused Adam is always called: it reads found-inf on the device and skips inside its kernel. So a
        step also counts as skipped when the scaler's update lowered the scale, which GradScaler does
        exactly when it found inf/NaN gradients (it grows the scale, or keeps it, otherwise). Both tests
        stay on the device: no host sync per step."""
        scaler = self.accelerator.scaler
        before = scaler._scale.clone() if scaler is not None and scaler._scale is not None else None
        optimizer.step()
        if optimizer.step_was_skipped:
            self.skipped[which] += 1
        elif before is not None:
            self.skipped[which] += (scaler._scale < before).sum()

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor], step: int) -> None:
        if self.cuda_graphs:  # last step's graph outputs (fake, logits) are dead: their memory may be reused
            compat.cudagraph_mark_step_begin()
        with self.phase("data"):
            real = normalize(batch[0])  # uint8 (b, 1, 28, 28) -> float in [-1, 1], on the device
        real_y = batch[1] if self.conditional else None
        if self.clusterer is not None:  # self-conditioned: D scores each real image as its nearest cluster
            real_y = torch.full((real.size(0),), UNASSIGNED, device=real.device)
        z = self.noise(step, 0)
        fake_y = self.fake_labels(step, 0, z)
        with self.accelerator.autocast():
            fake = self.generate(z, fake_y)  # (b, 1, 28, 28)
        with self.phase("d_step"):
            loss_d, score_real, score_fake = self.d_step(real, fake, step, real_y, fake_y)
        one = torch.ones((), device=self.device)
        stats = {"loss/d": loss_d, "score/real": score_real, "score/fake": score_fake, "steps": one}
        if step % self.cfg.optim.d_steps == 0:
            if not self.cfg.train.reuse_fake:
                z = self.noise(step, 1)
                fake_y = self.fake_labels(step, 1, z)
                with self.accelerator.autocast():
                    fake = self.generate(z, fake_y)
            with self.phase("g_step"):
                stats |= {"loss/g": self.g_step(fake, step, fake_y), "g_steps": one}
        self.window.add(stats)  # stays on the device: no sync per step

    def advance(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Train on one batch as the next global step."""
        self.train_step(batch, self.step + 1)
        self.step += 1

    def generate(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.G(z) if y is None else self.G(z, y)

    # ------------------------------------------------------------------ bookkeeping
    def _flush_metrics(self, epoch: int, window_seconds: float) -> dict[str, Any]:
        """Collective: mean over processes and over the window; one host sync per log step."""
        means = MetricWindow.means(self.window.reduce(self.accelerator))
        metrics = {
            "step": self.step,
            "epoch": epoch,
            "time_s": round(self.elapsed(), 3),
            "world_size": self.world,
            "img_per_s": self.window.local_steps * self.cfg.train.batch_size / max(window_seconds, 1e-9),
            **means,
            "lr/d": self.opt_d.param_groups[0]["lr"],
            "lr/g": self.opt_g.param_groups[0]["lr"],
        }
        if self.precision == "fp16":
            scaler = self.accelerator.scaler
            metrics["amp/scale"] = float(scaler.get_scale()) if scaler is not None else 1.0
            metrics["amp/skipped_d"], metrics["amp/skipped_g"] = self.skipped.tolist()
        self.window.reset()
        return metrics

    def _write_metrics(self, metrics: dict[str, Any]) -> None:
        if self.is_main:
            line = json.dumps(guard.strict_json(metrics), allow_nan=False)  # NaN/inf as null: strict JSON
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(line + "\n")  # closed (flushed) per line: a crash loses nothing logged
            self.tracker.log({k: v for k, v in metrics.items() if k != "step"}, self.step)

    def _rewind_metrics(self, step: int) -> None:
        """metrics.jsonl agrees with the state training continues from (main process): lines past `step`
        (written by a run that was killed, rolled back, or whose checkpoints are gone) are dropped, so the file
        never holds a step twice or out of order. A fresh start (step 0) keeps the dropped lines aside."""
        path = self.run_dir / "metrics.jsonl"
        if not (self.is_main and path.is_file()):
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

    def sample_images(
        self, noise: torch.Tensor, use_ema: bool = True, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Generator output for `noise` (and `labels`, conditional) (main process only: no collective inside)."""
        model = self.ema.shadow if (use_ema and self.ema is not None) else self.G_raw
        was_training = model.training
        model.eval()
        with torch.no_grad():
            images = (model(noise) if labels is None else model(noise, labels)).float()
        model.train(was_training)
        return images

    def _save_grid(self) -> None:
        average_buffers(self.accelerator, [self.G_raw, self.D_raw])  # collective: ranks' BN stats agree
        if self.is_main:
            from torchvision.utils import save_image

            path = self.run_dir / "samples" / f"{ckpt.step_dir_name(self.step)}.png"
            nrow = int(math.sqrt(self.cfg.log.n_samples)) or 1
            caption = f"step {self.step}"
            if self.fixed_labels is not None:  # one row per class, one fixed noise vector per column
                nrow, caption = self.fixed_noise.size(0) // N_CLASSES, f"step {self.step}, rows: classes 0-9"
            images = self.sample_images(self.fixed_noise, labels=self.fixed_labels)
            save_image(images, path, nrow=nrow, normalize=True, value_range=(-1, 1))
            self.tracker.log_image("samples/grid", path, self.step, caption=caption)

    def evaluate(self) -> dict[str, Any]:
        """Collective: every rank generates its share of eval.n samples; FID, coverage and confidence
        from the gathered features are logged by the main process."""
        from gan_ddp.evaluation.eval_metrics import summary_line
        from gan_ddp.evaluation.evaluate import score_generator

        e = self.cfg.eval
        average_buffers(self.accelerator, [self.G_raw] + ([self.ema.shadow] if self.ema else []))
        G = self.ema.shadow if self.ema is not None else self.G_raw
        results = score_generator(
            self.accelerator,
            G,
            self.evaluator,
            self.real_stats,
            e.n,
            self.cfg.model.z_dim,
            e.seed,
            e.batch,
            conditional=self.conditional,
        )
        line = {"step": self.step, "time_s": round(self.elapsed(), 3), **results}
        self._write_metrics(line)
        self.console.print(f"eval step {self.step}: {summary_line(results)}")
        return line

    def _state(self, window_sums: dict[str, float]) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "batch_in_epoch": self.step % self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "global_batch": self.cfg.train.batch_size,
            "world_size": self.world,
            "model": model_signature(self.cfg.model),
            "precision": self.precision,
            "ema": self.ema is not None,
            "window": self.window.state(window_sums),
            "skipped": self.skipped.tolist(),
            "time_s": self.elapsed(),
            "data": self.data_info.as_dict(),
            "lr_scale": self.lr_scale,
            "rollbacks": self.rollbacks,
            "settings": self._settings(),
        }

    def check_consistency(self, buffers: bool) -> int:
        return check_consistency(self.accelerator, {"G": self.G_raw, "D": self.D_raw}, self.step, buffers)

    def save_checkpoint(self, root: Path | None = None) -> Path:
        """Collective. Ranks' BN statistics are averaged first so the checkpoint (rank 0's) speaks for all.
        `root` (default: the run's checkpoints/) is where it goes and what rotation prunes."""
        root = self.ckpt_root if root is None else root
        t0 = time.monotonic()
        average_buffers(self.accelerator, [self.G_raw, self.D_raw])
        models = {"G": self.G_raw, "D": self.D_raw, **({"EMA": self.ema.shadow} if self.ema is not None else {})}
        guard.check_weights(self.accelerator, models, self.step)  # never checkpoint (nor rotate for) NaN weights
        self.consistency_checks += bool(self.check_consistency(buffers=True))  # just averaged
        # The open metrics window spans the checkpoint: keep its global sums so a resume logs the same line.
        sums = self.window.reduce(self.accelerator)
        extra = {f"ema.{k}": v for k, v in self.ema.state_dict().items()} if self.ema is not None else None
        path = ckpt.save(
            self.accelerator,
            root,
            self.step,
            self._state(sums),
            extra,
            models=(self.G_raw, self.D_raw),
            optimizers=(self.opt_g.optimizer, self.opt_d.optimizer),
            scaler=self.accelerator.scaler,
        )
        if self.is_main:
            ckpt.rotate(root, self.cfg.checkpoint.keep)
        self.save_seconds = time.monotonic() - t0
        return path

    def resume(self, rollback_to: Path | None = None) -> None:
        mode = self.cfg.train.resume if rollback_to is None else str(rollback_to)
        if mode == "never":
            self._rewind_metrics(0)  # a fresh start: lines of an earlier training here describe no state we have
            return
        if mode == "auto":
            found = ckpt.find_latest(self.ckpt_root, warn=self.console.print)
            if found is None:  # killed before its first checkpoint, or every checkpoint corrupt: from step 0
                self._rewind_metrics(0)
                return
        else:
            found = Path(mode)
            if not found.is_dir():
                raise ckpt.CheckpointError(f"train.resume: {found} is not a checkpoint directory")
            ckpt.verify(found)  # an explicit checkpoint that is corrupt is an error, not a fallback
        state = ckpt.read_state(found)
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
        trained_on = state.get("data")  # absent in checkpoints written before data was recorded
        if trained_on is not None and trained_on["sha256"] != self.data_info.sha256:
            # Never switch data in the middle of a run, e.g. from the bundled fallback to a full set downloaded since.
            fix = "data.root=bundled data.split=test" if trained_on["root"] == BUNDLED else "the data it started with"
            raise ckpt.CheckpointError(
                f"{found}: this run trained on {trained_on['dataset']} {trained_on['split']} from "
                f"{trained_on['root']} ({trained_on['images']:,} images), but the data now is "
                f"{self.data_info.describe()}; resume with {fix}, or start a new run.dir"
            )
        if state["ema"] != (self.ema is not None):
            raise ckpt.CheckpointError(f"{found}: ema.enabled was {state['ema']} in this checkpoint")
        if state["world_size"] != self.world:
            # Accelerate restores random_states_<rank>.pkl where it exists and skips the rest silently.
            self.console.print(
                f"note: {found} was saved by {state['world_size']} process(es), resuming with {self.world}: "
                "weights, optimizers and the data order continue exactly (they depend on the global batch); "
                "per-process random streams (dropout) do not match an unbroken run"
            )
        # Every file is read and checked before anything changes: a bad one is one line naming it.
        loaded = ckpt.load_training_state(found, self.rank, state["world_size"], ema=self.ema is not None)
        self._apply(found, loaded)
        self._note_changed_settings(found, state)
        self.step = state["step"]
        self.skipped = torch.tensor(state["skipped"], dtype=torch.int64, device=self.device)
        self.time_before = float(state.get("time_s", 0.0))
        self.lr_scale, self.rollbacks = float(state.get("lr_scale", 1.0)), int(state.get("rollbacks", 0))
        self._apply_config_lr(quiet=rollback_to is not None)
        # The global window sums go to one rank; the next reduce adds them in.
        self.window.load(state["window"], state["world_size"], holds_sums=self.is_main)
        self._rewind_metrics(self.step)
        self.console.print(f"resumed from {found} (step {self.step})")

    def _apply(self, found: Path, loaded: ckpt.TrainingState) -> None:
        """Load a checkpoint's states into the models, optimizers, scaler, EMA and this process's generators."""
        for model, name, tensors in zip((self.G_raw, self.D_raw), ckpt.MODELS, loaded.models, strict=True):
            try:
                model.load_state_dict(tensors)
            except RuntimeError as exc:
                raise ckpt.CheckpointError(f"{found / name}: does not fit the model ({one_line(exc)[:200]})") from None
        for opt, name, state in zip((self.opt_g, self.opt_d), ckpt.OPTIMIZERS, loaded.optimizers, strict=True):
            # torch checks the groups' sizes, not the state's shapes: a wrong one would fail at the first step.
            params = [p for group in opt.optimizer.param_groups for p in group["params"]]
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
        scaler = self.accelerator.scaler
        if scaler is not None and loaded.scaler is not None:  # fp16 then and now (a change of precision: a note)
            scaler.load_state_dict(loaded.scaler)
        if self.ema is not None and loaded.ema is not None:
            self.ema.load_state_dict({k[len("ema.") :]: v.to(self.device) for k, v in loaded.ema.items()})
        if loaded.rng is not None:
            ckpt.set_rng_state(loaded.rng)

    def _note_changed_settings(self, found: Path, state: dict[str, Any]) -> None:
        """One note naming the settings that change the training (not the shapes: refused before) and differ
        from the checkpoint's; the run goes on with the config's. Learning rates have their own note."""
        now = self._settings()
        then = dict(state.get("settings", {}))
        then.setdefault("train.precision", state.get("precision"))
        changed = [f"{k} {then[k]!r} -> {now[k]!r}" for k in sorted(now) if k in then and then[k] != now[k]]
        if changed:
            self.console.print(f"note: {found} was trained with other settings, continuing with: {', '.join(changed)}")

    def _settings(self) -> dict[str, Any]:
        """The settings `_note_changed_settings` compares (recorded in every checkpoint)."""
        c = self.cfg
        return {
            "seed": c.seed,
            "train.precision": self.precision,
            "train.reuse_fake": c.train.reuse_fake,
            "loss.kind": c.loss.kind,
            "loss.real_label": c.loss.real_label,
            "loss.gp_weight": c.loss.gp_weight,
            "loss.r1_gamma": c.loss.r1_gamma,
            "loss.r1_every": c.loss.r1_every,
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

    def _apply_config_lr(self, quiet: bool = False) -> None:
        """The optimizers' state_dicts carry their learning rates; the config wins (times the rollbacks'
        factor), so that a run that diverged can resume from its last finite checkpoint with a lower
        optim.lr_d / optim.lr_g."""
        for name, opt, lr in (("lr_d", self.opt_d, self.cfg.optim.lr_d), ("lr_g", self.opt_g, self.cfg.optim.lr_g)):
            saved, lr = opt.param_groups[0]["lr"], lr * self.lr_scale
            if saved != lr:
                if not quiet:
                    scaled = f" x {self.lr_scale:g} after rollbacks" if self.lr_scale != 1.0 else ""
                    self.console.print(
                        f"note: optim.{name} is {lr:g} from the config{scaled} (the checkpoint had {saved:g})"
                    )
                for group in opt.param_groups:
                    group["lr"] = lr

    def _rollback(self, exc: guard.DivergenceError) -> bool:
        """train.on_nonfinite=rollback: back to the newest checkpoint (finite by construction) with lower
        learning rates. Every rank saw the same divergence, so every rank rolls back alike."""
        t = self.cfg.train
        complete = [p for p in ckpt.list_checkpoints(self.ckpt_root) if (p / ckpt.MANIFEST).is_file()]
        if t.on_nonfinite != "rollback" or self.rollbacks >= t.max_rollbacks or not complete:
            return False
        elapsed, rollbacks, scale = self.elapsed(), self.rollbacks + 1, self.lr_scale  # the checkpoint's are older
        self.window.reset()  # holds the non-finite sums; the checkpoint's window replaces it on the main process
        self.resume(rollback_to=complete[-1])
        self.rollbacks, self.lr_scale = rollbacks, scale * t.rollback_lr_factor  # each rollback lowers them further
        self._apply_config_lr(quiet=True)
        self.time_before = elapsed - (time.monotonic() - self.created)  # time_s keeps counting
        self.console.print(
            f"warning: training diverged at {exc}; rolled back to step {self.step} with learning rates x "
            f"{self.lr_scale:g} (rollback {rollbacks} of {t.max_rollbacks}, train.on_nonfinite=rollback)"
        )
        return True

    # ------------------------------------------------------------------ the loop
    def _should_stop(self, started: float, step_seconds: float) -> str | None:
        """Agree across processes whether to stop now: a signal on any rank, or the time budget."""
        budget = self.cfg.train.max_seconds
        out_of_time = budget is not None and (
            time.monotonic() - started + self.save_seconds + STOP_CHECK_EVERY * step_seconds >= budget
        )
        sig, timeout = float(self.stop.signal), float(out_of_time)
        if self.world > 1:  # a signal may have reached only some ranks; rank 0's clock decides for all
            flags = torch.tensor([sig, timeout if self.is_main else 0.0], device=self.device)
            sig, timeout = self.accelerator.reduce(flags, reduction="sum").tolist()
        if sig:
            return "signal"
        return "time" if timeout else None

    def train(self) -> int:
        try:
            return self._train()
        finally:
            if self.run_lock is not None:
                self.run_lock.release()

    def _train(self) -> int:
        cfg, acc = self.cfg, self.accelerator
        if self.is_main:
            (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
            ckpt.clean_temporaries(self.ckpt_root)
            (self.run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
            (self.run_dir / DONE_MARKER).unlink(missing_ok=True)
            (self.run_dir / LOST_MARKER).unlink(missing_ok=True)
        acc.wait_for_everyone()
        self.resume()
        if self.is_main:
            save_config(cfg, self.run_dir / "config.yaml", self.run_facts())
        self.console.print(
            f"gan-ddp: {self.world} process(es) on {self.device.type}, precision {self.precision} "
            f"({self.precision_reason}), {self.threads} thread(s)/process, {self.data_info.describe()}, "
            f"{self.steps_per_epoch} steps/epoch, G {self.n_params[0]:,} / D {self.n_params[1]:,} parameters"
        )
        if self.step >= self.total_steps:
            self.console.print(
                f"nothing to do: step {self.step} already reached {self.total_steps} (train.steps/epochs)"
            )
            if self.is_main:
                (self.run_dir / DONE_MARKER).write_text(f"step {self.step}\n")
            return EXIT_OK
        previous = {s: signal.signal(s, self.stop.handler) for s in STOP_SIGNALS}
        started = self.created
        exit_code, reason = EXIT_OK, "done"
        log = cfg.log
        self.tracker = open_trackers(
            log,
            self.run_dir,
            config={**cfg.to_dict(), "resolved": self.run_facts()},
            enabled=self.is_main,
            warn=self.console.print,
            start_step=self.step,
        )
        self.console.start(self.total_steps, self.step)
        try:
            while True:
                try:
                    exit_code, reason = self._loop(started)
                    break
                except guard.DivergenceError as exc:
                    if not self._rollback(exc):
                        raise
            if self.world > 1:
                self.console.print(
                    f"DDP consistency check passed {self.consistency_checks} time(s): "
                    f"G and D identical on {self.world} ranks"
                )
            if self.is_main:
                if exit_code == EXIT_PREEMPTED:  # launchers hide our exit code: leave a marker for job scripts
                    (self.run_dir / PREEMPTED_MARKER).write_text(f"step {self.step} signal {self.stop.signal}\n")
                if reason == "done":  # before the plots: a signal from here on finds the run complete
                    (self.run_dir / DONE_MARKER).write_text(f"step {self.step}\n")
                self._finish_artifacts()
        except BaseException as exc:
            if self.world > 1 and faults.collective_failure(exc) is not None:
                # before the process group goes: ask the store who is still there (the error line names them)
                exc.lost_peers = lost_peers(self.rank, self.world, min(10.0, cfg.train.collective_timeout_s))
                with contextlib.suppress(OSError):  # rank 0 may be the lost one: whoever is left writes it
                    (self.run_dir / LOST_MARKER).write_text(f"step {self.step}: {faults.collective_failure(exc)}\n")
            # W&B and the process group are closed on errors too: an unfinished W&B run can hang the exit.
            self.console.stop()
            self.tracker.finish(1)
            self.accelerator.end_training()
            if isinstance(exc, guard.DivergenceError):
                after = f" (after {self.rollbacks} rollback(s))" if self.rollbacks else ""
                raise guard.DivergenceError(f"training diverged at {exc}{after}; {self._resume_point()}") from None
            raise
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        self.console.summary(self._summary(reason, time.monotonic() - started))
        self.tracker.finish(exit_code)
        self.accelerator.end_training()  # finishes Accelerate's trackers, destroys the process group
        return exit_code

    def _batches(self) -> Iterator[tuple[int, Any]]:
        """(epoch, batch) from the current step to the last; a resumed run continues mid-epoch exactly."""
        acc = self.accelerator
        while self.step < self.total_steps:
            epoch, position = divmod(self.step, self.steps_per_epoch)
            # Through Accelerate's loader, not the sampler: its __iter__ re-applies its own epoch counter
            # (`iteration`) to the sampler, and skip_first_batches copies that counter.
            self.loader.set_epoch(epoch)
            batches = acc.skip_first_batches(self.loader, position) if position else self.loader
            if position:  # Accelerate < 1.11 (the K80 stack's 1.10) starts the skipping loader at epoch 0
                batches.set_epoch(epoch)
            for batch in batches:
                yield epoch, batch
                if self.step >= self.total_steps:
                    return

    def _loop(self, started: float) -> tuple[int, str]:
        """Train to the last step, or until a signal or the time budget stops the run: (exit code, reason)."""
        cfg = self.cfg
        window_start = time.monotonic()  # of the open metrics window, less the time spent on outputs
        last_saved = self.step if self.step else -1
        for epoch, batch in self._batches():
            t0 = time.monotonic()
            self.advance(batch)
            self.console.advance(self.step, self.step // self.steps_per_epoch)
            if self.step % cfg.log.every == 0:
                self._log_window(epoch, time.monotonic() - window_start)
                window_start = time.monotonic()
            paused = time.monotonic()
            last_saved = self._periodic_outputs(last_saved)
            window_start += time.monotonic() - paused  # img_per_s measures training, not grids and saves
            if self.world == 1 or self.step % STOP_CHECK_EVERY == 0:
                stop = self._stop_if_asked(started, time.monotonic() - t0, last_saved)
                if stop is not None:
                    return stop
        # The checkpoint first: it keeps the open metrics window, so training extended later (more
        # steps or epochs) logs exactly what one longer run would have.
        if last_saved != self.step:
            self.save_checkpoint()
        if self.window.local_steps:
            self._log_window(self.step // self.steps_per_epoch, time.monotonic() - window_start, final=True)
        if self.step % cfg.log.sample_every:
            self._save_grid()
        return EXIT_OK, "done"

    def _log_window(self, epoch: int, seconds: float, final: bool = False) -> None:
        """Close the metrics window: metrics.jsonl, W&B, the console; then the divergence and DDP checks.
        The `final` window, closed by the end of training, is written only (the run's summary follows)."""
        metrics = self._flush_metrics(epoch, seconds)
        self._write_metrics(metrics)
        if not final:
            self.console.log(metrics, self.total_steps, self.cfg.train.max_seconds)
        self.last_metrics = metrics
        guard.check_metrics(metrics)  # after the line is written: metrics.jsonl shows the null
        if not final and self.cfg.train.check_consistency:
            self.consistency_checks += bool(self.check_consistency(buffers=False))

    def recluster(self) -> None:
        """Self-conditioned: cluster D's features of real images again (every rank, then rank 0's result for
        all: ranks' BatchNorm statistics differ between checkpoints)."""
        result = self.clusterer.recluster(self.G_raw, self.D_raw, self.step)
        broadcast_from_main(self.accelerator, [self.D_raw.centroids, self.G_raw.prior])
        self.console.print(result.line())

    def _periodic_outputs(self, last_saved: int) -> int:
        """The sample grid, evaluation and checkpoint due at this step; returns the last checkpointed step."""
        cfg = self.cfg
        if self.clusterer is not None and cfg.selfcond.due(self.step):
            self.recluster()
        if self.step % cfg.log.sample_every == 0:
            self._save_grid()
        if cfg.eval.every and self.step % cfg.eval.every == 0:
            self.evaluate()
        if self.step % cfg.checkpoint.every == 0:
            self.save_checkpoint()
            return self.step
        return last_saved

    def _stop_if_asked(self, started: float, step_seconds: float, last_saved: int) -> tuple[int, str] | None:
        """After a signal or near the time budget (agreed by all ranks): checkpoint, and (exit code, reason)."""
        why = self._should_stop(started, step_seconds)
        if why is None:
            return None
        if last_saved != self.step:
            self.save_checkpoint()
        if why == "signal":
            self.console.print(f"stop requested by signal: checkpoint at step {self.step}, exit {EXIT_PREEMPTED}")
            return EXIT_PREEMPTED, "preempted"
        self.console.print(f"train.max_seconds reached: checkpoint at step {self.step}")
        return EXIT_OK, "time budget"

    def _resume_point(self) -> str:
        complete = [p for p in ckpt.list_checkpoints(self.ckpt_root) if (p / ckpt.MANIFEST).is_file()]
        if not complete:
            return "no checkpoint was written; lower optim.lr_d / optim.lr_g (or change the config) and rerun"
        return (
            f"nothing non-finite was checkpointed; the newest checkpoint, {complete[-1]}, is the resume point: "
            "lower optim.lr_d / optim.lr_g (or change the config) and rerun"
        )

    def _finish_artifacts(self) -> None:
        """Plots and the progress animation, from the files (so a resumed run's cover the whole run)."""
        try:
            from gan_ddp.components import viz

            plots = viz.plot_metrics(self.run_dir)
            gif = viz.make_animation(self.run_dir)
            for path in plots:
                self.tracker.log_image(f"plots/{path.stem}", path, self.step)
            self.tracker.log_video("samples/progress", gif, self.step)
        except Exception as exc:  # a plotting problem must not turn a finished training into a failure
            self.console.print(f"warning: plots/animation not written: {type(exc).__name__}: {exc}")

    def run_facts(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "precision_reason": self.precision_reason,
            "world_size": self.world,
            "device": self.device.type,
            "threads_per_process": self.threads,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "torch": str(torch.__version__),
            "data": self.data_info.as_dict(),
        }

    def _summary(self, reason: str, seconds: float) -> dict[str, Any]:
        rows: dict[str, Any] = {"ended": reason, "step": f"{self.step}/{self.total_steps}", "seconds": seconds}
        for key in ("img_per_s", "loss/d", "loss/g", "score/real", "score/fake"):
            if key in self.last_metrics:
                rows[key] = float(self.last_metrics[key])
        rows["run dir"] = str(self.run_dir)
        return rows
