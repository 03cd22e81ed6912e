"""The training loop: builds everything around one Accelerator, then alternates D and G steps.

Reading order: `Trainer.__init__` (wiring), `d_step` / `g_step` (the GAN), `train` (loop, logging,
checkpoints, stopping). Rank discipline: every process runs every collective (`reduce`, `gather`,
`save_state`, `wait_for_everyone`); only the main process writes files, prints and logs.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gan_ddp import checkpoint as ckpt
from gan_ddp import compat
from gan_ddp.config import Config, ConfigError, config_from_dict, save_config
from gan_ddp.console import TrainingConsole
from gan_ddp.data import ImageTensorDataset, load_arrays, make_train_loader, normalize
from gan_ddp.distributed import (
    average_buffers,
    check_consistency,
    check_distributed,
    choose_precision,
    cpu_has_native_bf16,
    local_world_size,
    make_accelerator,
    want_cpu,
)
from gan_ddp.doctor import check_gpu_kernels
from gan_ddp.ema import GeneratorEMA
from gan_ddp.losses import d_loss, d_scores, g_loss, gradient_penalty
from gan_ddp.models import build_models, count_parameters, couples_batch, model_signature
from gan_ddp.tracking import Tracker

EXIT_OK = 0
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written, run the same command again (launch/slurm.sbatch requeues)
# torchrun and `accelerate launch` turn a worker's 75 into their own exit code 1: on preemption the main
# process also writes this file into run.dir (removed when the run starts again), for job scripts.
PREEMPTED_MARKER = "PREEMPTED"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_CHECK_EVERY = 10  # steps between cross-process agreements on stopping (a collective, so not every step)


@dataclass
class StopRequest:
    signal: int = 0  # the signal number received, 0 if none

    def handler(self, signum: int, frame: Any) -> None:
        self.signal = signum


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


def load_generator_from_run(run_dir: Path, checkpoint: Path | None = None, use_ema: bool = True):
    """(G in eval mode on CPU, config, checkpoint dir) for `sample`, `interpolate` and evaluation."""
    from safetensors.torch import load_file

    cfg = config_from_dict(_read_yaml(run_dir / "config.yaml"))
    if checkpoint is None:
        checkpoint = ckpt.find_latest(run_dir / "checkpoints")
        if checkpoint is None:
            raise ckpt.CheckpointError(f"{run_dir}: no complete checkpoint under checkpoints/")
    else:
        ckpt.verify(checkpoint)
    generator, _ = build_models(cfg.model)
    ema = ckpt.load_ema(checkpoint) if use_ema else None
    if ema is not None:
        prefix = "ema.shadow."
        generator.load_state_dict({k[len(prefix) :]: v for k, v in ema.items() if k.startswith(prefix)})
    else:
        generator.load_state_dict(load_file(checkpoint / "model.safetensors"))
    return generator.eval(), cfg, checkpoint


def _read_yaml(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is this a gan-ddp run directory?")
    return OmegaConf.to_container(OmegaConf.load(path))  # type: ignore[return-value]


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.created = time.monotonic()  # train.max_seconds counts set-up too, as a job's time limit does
        self.cfg = cfg
        check_gpu_kernels()  # a GPU this torch build has no kernels for: one line now, not a crash mid-run
        self.precision, self.precision_reason = resolve_precision(cfg.train.precision)
        self.accelerator = acc = make_accelerator(self.precision)
        check_distributed(acc.num_processes)
        self.world = acc.num_processes
        self.rank = acc.process_index
        self.device = acc.device
        self.is_main = acc.is_main_process
        self.console = TrainingConsole(enabled=self.is_main)
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_root = self.run_dir / "checkpoints"

        if self.device.type == "cpu":
            # Processes sharing a machine split its cores; oversubscription costs more than it gains.
            threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // local_world_size())
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()

        B = cfg.train.batch_size
        if B % self.world:
            raise ConfigError(
                f"train.batch_size: {B} does not divide by the {self.world} processes; use a multiple of {self.world}"
            )
        self.local_batch = B // self.world

        # Data: every rank holds the uint8 tensor once (47 MB for MNIST train); batches are single index ops.
        images, labels = load_arrays(
            cfg.data.dataset, cfg.data.root, cfg.data.split, cfg.data.download, acc.main_process_first
        )
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
        torch.manual_seed(cfg.seed * 7919 + 1 + self.rank)

        self.evaluator = self.real_stats = None
        if cfg.eval.every:  # all ranks: the main process trains/caches the evaluator first, the others wait
            from gan_ddp.evaluate import prepare_evaluation

            self.evaluator, self.real_stats = prepare_evaluation(
                acc, cfg.data.dataset, cfg.data.root, cfg.data.split, cfg.eval.cache_dir, kind=cfg.eval.evaluator
            )

        self.steps_per_epoch = len(self.loader)
        by_epochs = cfg.train.epochs * self.steps_per_epoch
        self.total_steps = min(cfg.train.steps, by_epochs) if cfg.train.steps else by_epochs

        # Noise is a function of (seed, step, global sample index): each rank takes its slice of the
        # global batch's noise, so N processes draw exactly what one process would.
        self.noise_gen = torch.Generator(device=self.device)
        self.fixed_noise = torch.randn(
            cfg.log.n_samples, cfg.model.z_dim, generator=torch.Generator().manual_seed(cfg.seed + 2**20)
        ).to(self.device)

        # Metric sums over the current log window, on the device:
        # [loss_d, real, fake, loss_g, g_steps, steps], each process adding its terms divided by the world
        # size: the reduced sums are then per-step global means, and a window saved by N processes and
        # resumed by M still averages exactly the steps it holds.
        self.window = torch.zeros(6, device=self.device, dtype=torch.float64)
        self.window_steps = 0
        # fp16: optimizer steps the gradient scaler skipped (D, G), counted on the device (no sync per step)
        self.skipped = torch.zeros(2, dtype=torch.int64, device=self.device)
        self.step = 0
        self.last_metrics: dict[str, Any] = {}
        self.stop = StopRequest()
        self.consistency_checks = 0
        self.tracker = Tracker("disabled", "", None, None, None, [], self.run_dir, {}, enabled=False)  # train() sets it
        self.save_seconds = 1.0  # estimate of a checkpoint's duration, for the max_seconds budget
        self.time_before = 0.0  # seconds of earlier sessions of this run (restored on resume)

    def elapsed(self) -> float:
        """Wall seconds this run has trained, set-up included, summed over resumed sessions (`time_s`)."""
        return self.time_before + time.monotonic() - self.created

    # ------------------------------------------------------------------ the GAN step
    def noise(self, step: int, stream: int) -> torch.Tensor:
        self.noise_gen.manual_seed((self.cfg.seed * 1_000_003 + step * 4 + stream) % (2**63))
        z = torch.randn(self.cfg.train.batch_size, self.cfg.model.z_dim, generator=self.noise_gen, device=self.device)
        return z[self.rank * self.local_batch : (self.rank + 1) * self.local_batch]  # (b, z_dim)

    def d_step(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One D update on real and fake.detach(); returns (loss, D(x), D(G(z))) as 0-dim device tensors."""
        cfg = self.cfg.loss
        with self.accelerator.autocast():
            if self.joint_d_forward:  # one forward over [real; fake]: per-sample D, so the same logits
                logits = self.D(torch.cat([real.to(fake.dtype), fake.detach()]))
                real_logits, fake_logits = logits[: real.size(0)], logits[real.size(0) :]
            else:  # BatchNorm: real and fake keep their own batch statistics
                real_logits = self.D(real)
                fake_logits = self.D(fake.detach())
            loss = d_loss(cfg.kind, real_logits, fake_logits, cfg.real_label)
        if cfg.kind == "wgan-gp":
            loss = loss + cfg.gp_weight * gradient_penalty(self.D, real, fake.detach())
        self.opt_d.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self._step_and_count_skip(self.opt_d, 0)
        score_real, score_fake = d_scores(real_logits, fake_logits)
        return loss.detach(), score_real, score_fake

    def g_step(self, fake: torch.Tensor) -> torch.Tensor:
        """One G update through a frozen D. D is called unwrapped: its weights need no gradient, so there
        is nothing for DDP to all-reduce, and DDP's reducer never sees a forward without a backward."""
        self.D_raw.requires_grad_(False)
        try:
            with self.accelerator.autocast():
                loss = g_loss(self.cfg.loss.kind, self.D_raw(fake))
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
        real = normalize(batch[0])  # uint8 (b, 1, 28, 28) -> float in [-1, 1], on the device
        with self.accelerator.autocast():
            fake = self.G(self.noise(step, 0))  # (b, 1, 28, 28)
        loss_d, score_real, score_fake = self.d_step(real, fake)
        stats = [loss_d, score_real, score_fake]
        if step % self.cfg.optim.d_steps == 0:
            if not self.cfg.train.reuse_fake:
                with self.accelerator.autocast():
                    fake = self.G(self.noise(step, 1))
            stats += [self.g_step(fake), torch.ones((), device=self.device)]
        else:
            stats += [torch.zeros((), device=self.device)] * 2
        stats.append(torch.ones((), device=self.device))
        self.window += torch.stack([s.double() for s in stats]) / self.world  # stays on the device: no sync per step

    # ------------------------------------------------------------------ bookkeeping
    def _flush_metrics(self, epoch: int, window_seconds: float) -> dict[str, Any]:
        """Collective: mean over processes and over the window; one host sync per log step."""
        sums = self.accelerator.reduce(self.window.clone(), reduction="sum").tolist()
        n = max(sums[5], 1.0)
        g_n = max(sums[4], 1.0)
        metrics = {
            "step": self.step,
            "epoch": epoch,
            "time_s": round(self.elapsed(), 3),
            "world_size": self.world,
            "img_per_s": self.window_steps * self.cfg.train.batch_size / max(window_seconds, 1e-9),
            "loss/d": sums[0] / n,
            "score/real": sums[1] / n,
            "score/fake": sums[2] / n,
            "loss/g": sums[3] / g_n,
            "lr/d": self.opt_d.param_groups[0]["lr"],
            "lr/g": self.opt_g.param_groups[0]["lr"],
        }
        if self.precision == "fp16":
            scaler = self.accelerator.scaler
            metrics["amp/scale"] = float(scaler.get_scale()) if scaler is not None else 1.0
            metrics["amp/skipped_d"], metrics["amp/skipped_g"] = self.skipped.tolist()
        self.window.zero_()
        self.window_steps = 0
        return metrics

    def _write_metrics(self, metrics: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")  # closed (flushed) per line: a crash loses nothing logged
            self.tracker.log({k: v for k, v in metrics.items() if k != "step"}, self.step)

    def _rewind_metrics(self, step: int) -> None:
        """After a resume from `step`, drop lines the interrupted run wrote past it (main process)."""
        path = self.run_dir / "metrics.jsonl"
        if not (self.is_main and path.is_file()):
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError):
                continue  # a line cut by a crash
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def sample_images(self, noise: torch.Tensor, use_ema: bool = True) -> torch.Tensor:
        """Generator output for `noise` (main process only: no collective inside)."""
        model = self.ema.shadow if (use_ema and self.ema is not None) else self.G_raw
        was_training = model.training
        model.eval()
        with torch.no_grad():
            images = model(noise).float()
        model.train(was_training)
        return images

    def _save_grid(self) -> None:
        average_buffers(self.accelerator, [self.G_raw, self.D_raw])  # collective: ranks' BN stats agree
        if self.is_main:
            from torchvision.utils import save_image

            path = self.run_dir / "samples" / f"{ckpt.step_dir_name(self.step)}.png"
            nrow = int(math.sqrt(self.cfg.log.n_samples)) or 1
            save_image(self.sample_images(self.fixed_noise), path, nrow=nrow, normalize=True, value_range=(-1, 1))
            self.tracker.log_image("samples/grid", path, self.step, caption=f"step {self.step}")

    def evaluate(self) -> dict[str, Any]:
        """Collective: every rank generates its share of eval.n samples; FID, coverage and confidence
        from the gathered features are logged by the main process."""
        from gan_ddp.evaluate import score_generator

        e = self.cfg.eval
        average_buffers(self.accelerator, [self.G_raw] + ([self.ema.shadow] if self.ema else []))
        G = self.ema.shadow if self.ema is not None else self.G_raw
        results = score_generator(
            self.accelerator, G, self.evaluator, self.real_stats, e.n, self.cfg.model.z_dim, e.seed, e.batch
        )
        line = {"step": self.step, "time_s": round(self.elapsed(), 3), **results}
        self._write_metrics(line)
        self.console.print(
            f"eval step {self.step}: FID {results['eval/fid']:.2f}  coverage {results['eval/coverage']}/10  "
            f"confidence {results['eval/confidence']:.3f}"
        )
        return line

    def _state(self, window_sums: list[float]) -> dict[str, Any]:
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
            "window": {"sums": window_sums, "steps": self.window_steps},
            "skipped": self.skipped.tolist(),
            "time_s": self.elapsed(),
        }

    def check_consistency(self, buffers: bool) -> int:
        return check_consistency(self.accelerator, {"G": self.G_raw, "D": self.D_raw}, self.step, buffers)

    def save_checkpoint(self) -> Path:
        """Collective. Ranks' BN statistics are averaged first so the checkpoint (rank 0's) speaks for all."""
        t0 = time.monotonic()
        average_buffers(self.accelerator, [self.G_raw, self.D_raw])
        self.consistency_checks += bool(self.check_consistency(buffers=True))  # just averaged
        # The open metrics window spans the checkpoint: keep its global sums so a resume logs the same line.
        sums = self.accelerator.reduce(self.window.clone(), reduction="sum").tolist()
        extra = {f"ema.{k}": v for k, v in self.ema.state_dict().items()} if self.ema is not None else None
        path = ckpt.save(self.accelerator, self.ckpt_root, self.step, self._state(sums), extra)
        if self.is_main:
            ckpt.rotate(self.ckpt_root, self.cfg.checkpoint.keep)
        self.save_seconds = time.monotonic() - t0
        return path

    def resume(self) -> None:
        mode = self.cfg.train.resume
        if mode == "never":
            return
        if mode == "auto":
            found = ckpt.find_latest(self.ckpt_root, warn=self.console.print)
            if found is None:
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
            raise ckpt.CheckpointError(
                f"{found}: checkpoint is of another model: model.{k}={state['model'].get(k)!r} there, "
                f"{current.get(k)!r} here"
            )
        if state["global_batch"] != self.cfg.train.batch_size:
            raise ckpt.CheckpointError(
                f"{found}: train.batch_size was {state['global_batch']}, now {self.cfg.train.batch_size}; "
                "the data position depends on it (use a new run.dir to change it)"
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
        self.accelerator.load_state(str(found))
        if self.ema is not None:
            ema_state = ckpt.load_ema(found)
            if ema_state is None:
                raise ckpt.CheckpointError(f"{found}: ema.safetensors is missing")
            self.ema.load_state_dict({k[len("ema.") :]: v.to(self.device) for k, v in ema_state.items()})
        self.step = state["step"]
        self.skipped = torch.tensor(state["skipped"], dtype=torch.int64, device=self.device)
        self.time_before = float(state.get("time_s", 0.0))
        if self.is_main:  # the global window sums live on one rank; the next reduce adds them in
            sums = list(state["window"]["sums"])
            if len(sums) == 5:  # saved before the window held per-step means: plain sums over processes
                sums = [x / state["world_size"] for x in sums] + [state["window"]["steps"]]
            self.window = torch.tensor(sums, device=self.device, dtype=torch.float64)
        self.window_steps = state["window"]["steps"]
        self._rewind_metrics(self.step)
        self.console.print(f"resumed from {found} (step {self.step})")

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
        cfg, acc = self.cfg, self.accelerator
        if self.is_main:
            (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
            ckpt.clean_temporaries(self.ckpt_root)
            (self.run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        acc.wait_for_everyone()
        self.resume()
        if self.is_main:
            save_config(cfg, self.run_dir / "config.yaml", self.run_facts())
        self.console.print(
            f"gan-ddp: {self.world} process(es) on {self.device.type}, precision {self.precision} "
            f"({self.precision_reason}), {self.threads} thread(s)/process, {self.num_images} images, "
            f"{self.steps_per_epoch} steps/epoch, G {self.n_params[0]:,} / D {self.n_params[1]:,} parameters"
        )
        if self.step >= self.total_steps:
            self.console.print(
                f"nothing to do: step {self.step} already reached {self.total_steps} (train.steps/epochs)"
            )
            return EXIT_OK
        previous = {s: signal.signal(s, self.stop.handler) for s in STOP_SIGNALS}
        started = self.created
        exit_code, reason = EXIT_OK, "done"
        log = cfg.log
        self.tracker = Tracker(
            mode=log.wandb,
            project=log.project,
            entity=log.entity,
            name=log.name,
            group=log.group,
            tags=list(log.tags),
            run_dir=self.run_dir,
            config={**cfg.to_dict(), "resolved": self.run_facts()},
            enabled=self.is_main,
            warn=self.console.print,
        )
        self.console.start(self.total_steps, self.step)
        try:
            exit_code, reason = self._loop(started)
            if self.world > 1:
                self.console.print(
                    f"DDP consistency check passed {self.consistency_checks} time(s): "
                    f"G and D identical on {self.world} ranks"
                )
            if self.is_main:
                if exit_code == EXIT_PREEMPTED:  # launchers hide our exit code: leave a marker for job scripts
                    (self.run_dir / PREEMPTED_MARKER).write_text(f"step {self.step} signal {self.stop.signal}\n")
                self._finish_artifacts()
        except BaseException:
            # W&B and the process group are closed on errors too: an unfinished W&B run can hang the exit.
            self.console.stop()
            self.tracker.finish(1)
            self.accelerator.end_training()
            raise
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        self.console.summary(self._summary(reason, time.monotonic() - started))
        self.tracker.finish(exit_code)
        self.accelerator.end_training()  # finishes Accelerate's trackers, destroys the process group
        return exit_code

    def _loop(self, started: float) -> tuple[int, str]:
        cfg, acc = self.cfg, self.accelerator
        window_start = time.monotonic()
        last_saved = self.step if self.step else -1
        step_seconds = 0.0
        while self.step < self.total_steps:
            epoch, position = divmod(self.step, self.steps_per_epoch)
            # Through Accelerate's loader, not the sampler: its __iter__ re-applies its own epoch counter
            # (`iteration`) to the sampler, and skip_first_batches copies that counter.
            self.loader.set_epoch(epoch)
            batches = acc.skip_first_batches(self.loader, position) if position else self.loader
            if position:  # Accelerate < 1.11 (the K80 stack's 1.10) starts the skipping loader at epoch 0
                batches.set_epoch(epoch)
            for batch in batches:
                t0 = time.monotonic()
                self.train_step(batch, self.step + 1)
                self.step += 1
                self.window_steps += 1
                self.console.advance(self.step, self.step // self.steps_per_epoch)

                if self.step % cfg.log.every == 0:
                    metrics = self._flush_metrics(epoch, time.monotonic() - window_start)
                    window_start = time.monotonic()
                    self._write_metrics(metrics)
                    self.console.log(metrics, self.total_steps, self.cfg.train.max_seconds)
                    self.last_metrics = metrics
                    if cfg.train.check_consistency:
                        self.consistency_checks += bool(self.check_consistency(buffers=False))
                paused = time.monotonic()
                if self.step % cfg.log.sample_every == 0:
                    self._save_grid()
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    self.evaluate()
                if self.step % cfg.checkpoint.every == 0:
                    self.save_checkpoint()
                    last_saved = self.step
                window_start += time.monotonic() - paused  # img_per_s measures training, not grids and saves
                step_seconds = time.monotonic() - t0
                if self.world == 1 or self.step % STOP_CHECK_EVERY == 0:
                    why = self._should_stop(started, step_seconds)
                    if why is not None:
                        if last_saved != self.step:
                            self.save_checkpoint()
                        if why == "signal":
                            self.console.print(
                                f"stop requested by signal: checkpoint at step {self.step}, exit {EXIT_PREEMPTED}"
                            )
                            return EXIT_PREEMPTED, "preempted"
                        self.console.print(f"train.max_seconds reached: checkpoint at step {self.step}")
                        return EXIT_OK, "time budget"
                if self.step >= self.total_steps:
                    break
        # The checkpoint first: it keeps the open metrics window, so training extended later (more
        # steps or epochs) logs exactly what one longer run would have.
        if last_saved != self.step:
            self.save_checkpoint()
        if self.window_steps:
            metrics = self._flush_metrics(self.step // self.steps_per_epoch, time.monotonic() - window_start)
            self._write_metrics(metrics)
            self.last_metrics = metrics
        if self.step % cfg.log.sample_every:
            self._save_grid()
        return EXIT_OK, "done"

    def _finish_artifacts(self) -> None:
        """Plots and the progress animation, from the files (so a resumed run's cover the whole run)."""
        try:
            from gan_ddp import viz

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
        }

    def _summary(self, reason: str, seconds: float) -> dict[str, Any]:
        rows: dict[str, Any] = {"ended": reason, "step": f"{self.step}/{self.total_steps}", "seconds": seconds}
        for key in ("img_per_s", "loss/d", "loss/g", "score/real", "score/fake"):
            if key in self.last_metrics:
                rows[key] = float(self.last_metrics[key])
        rows["run dir"] = str(self.run_dir)
        return rows
