"""The GAN step: D on real and `fake.detach()`, then G through a frozen D (every rank, every step).

`train_step(batch, step)` reads top to bottom: the batch, the classes asked of G (`fake_labels`), G's
output (`noise`, `generate`), the D update (`d_step`), and every `optim.d_steps` steps the G update (`g_step`,
then the EMA). Noise and classes are functions of (seed, step, stream, global sample index), so N processes
draw exactly what one would and a resumed run what an unbroken one would. What a step reports stays on the
device: the metric window's sums and the count of fp16 steps the gradient scaler skipped (no host sync).

`time_phases(timer)` is the seam `gan-ddp bench` measures through: the phases "data", "d_step" and "g_step"
run inside `timer(name)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch

from gan_ddp.components.augment import STREAM_FAKE_D, STREAM_FAKE_G, STREAM_REAL
from gan_ddp.components.data import normalize
from gan_ddp.components.losses import LOSSES, d_loss, d_scores, g_loss, gradient_penalty, mode_seeking, r1_penalty
from gan_ddp.components.models import N_CLASSES, couples_batch
from gan_ddp.components.selfcond import UNASSIGNED
from gan_ddp.runtime import compat
from gan_ddp.training.metrics import MetricWindow

if TYPE_CHECKING:
    from gan_ddp.training.builder import Parts

_UNTIMED = contextlib.nullcontext()  # reusable, so an untimed phase costs no allocation


def _untimed(name: str) -> AbstractContextManager[object]:
    return _UNTIMED


class GanStep:
    """G, D, their optimisers, the EMA and the augmentation of a run (from `builder.Parts`), and one step."""

    def __init__(self, parts: Parts) -> None:
        self.cfg = parts.cfg
        self.accelerator, self.device = parts.accelerator, parts.device
        self.rank, self.local_batch = parts.rank, parts.local_batch
        self.G, self.D, self.G_raw, self.D_raw = parts.G, parts.D, parts.G_raw, parts.D_raw
        self.opt_g, self.opt_d = parts.opt_g, parts.opt_d
        self.ema, self.augment = parts.ema, parts.augment
        self.conditional = parts.cfg.model.conditional
        self.self_conditioned = bool(parts.cfg.model.clusters)  # classes: G's own pick; D's nearest cluster
        self.joint_d_forward = not couples_batch(self.D_raw)  # no BatchNorm in D: one forward over [real; fake]
        self.cuda_graphs = parts.cuda_graphs
        self.noise_gen = torch.Generator(device=self.device)
        self.window = MetricWindow(self.device, parts.world)  # losses and scores since the last log line
        # fp16: optimizer steps the gradient scaler skipped (D, G), counted on the device (no sync per step)
        self.skipped = torch.zeros(2, dtype=torch.int64, device=self.device)
        self.phase: Callable[[str], AbstractContextManager[object]] = _untimed

    def time_phases(self, timer: Callable[[str], AbstractContextManager[object]] | None) -> None:
        """`train_step` runs its phases ("data", "d_step", "g_step") inside `timer(name)`; None: untimed."""
        self.phase = timer or _untimed

    def noise(self, step: int, stream: int) -> torch.Tensor:
        self.noise_gen.manual_seed((self.cfg.seed * 1_000_003 + step * 4 + stream) % (2**63))
        z = torch.randn(self.cfg.train.batch_size, self.cfg.model.z_dim, generator=self.noise_gen, device=self.device)
        return z[self.rank * self.local_batch : (self.rank + 1) * self.local_batch]  # (b, z_dim)

    def fake_labels(self, step: int, stream: int, z: torch.Tensor | None = None) -> torch.Tensor | None:
        """Classes asked of a conditional G, uniform over the classes, like `noise` a function of (seed, step,
        global sample index) (its unused streams 2 and 3); a self-conditioned G's own pick for noise z (D
        scores each fake as that class); None for an unconditional model."""
        if self.self_conditioned and z is not None:
            return self.G_raw.labels(z)
        if not self.conditional:
            return None
        self.noise_gen.manual_seed((self.cfg.seed * 1_000_003 + step * 4 + 2 + stream) % (2**63))
        y = torch.randint(0, N_CLASSES, (self.cfg.train.batch_size,), generator=self.noise_gen, device=self.device)
        return y[self.rank * self.local_batch : (self.rank + 1) * self.local_batch]  # (b,)

    def generate(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.G(z) if y is None else self.G(z, y)

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

    def paired_noise(self, step: int, stream: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(z, classes) for G: with `loss.mode_seeking`, samples 2i and 2i + 1 share their class
        (a self-conditioned G's z[:, 0]; a conditional G's label) and keep their own remaining noise."""
        z = self.noise(step, stream)
        if self.cfg.loss.mode_seeking and self.self_conditioned:
            z[1::2, 0] = z[0::2, 0]
        y = self.fake_labels(step, stream, z)
        if self.cfg.loss.mode_seeking and y is not None and not self.self_conditioned:
            y[1::2] = y[0::2]
        return z, y

    def g_step(
        self, fake: torch.Tensor, step: int = 0, fake_y: torch.Tensor | None = None, z: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One G update through a frozen D. D is called unwrapped: its weights need no gradient, so there
        is nothing for DDP to all-reduce, and DDP's reducer never sees a forward without a backward.
        `z`: the noise of `fake`, for the mode-seeking term (`loss.mode_seeking`)."""
        self.D_raw.requires_grad_(False)
        try:
            with self.accelerator.autocast():
                x = self.augment(fake, step, STREAM_FAKE_G)
                loss = g_loss(self.cfg.loss.kind, self.D_raw(x) if fake_y is None else self.D_raw(x, fake_y))
            if self.cfg.loss.mode_seeking and z is not None:
                loss = loss + self.cfg.loss.mode_seeking * mode_seeking(z, fake)
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
        if self.self_conditioned:  # D scores each real image as its nearest cluster; no label is read
            real_y = torch.full((real.size(0),), UNASSIGNED, device=real.device)
        z, fake_y = self.paired_noise(step, 0)
        with self.accelerator.autocast():
            fake = self.generate(z, fake_y)  # (b, 1, 28, 28)
        with self.phase("d_step"):
            loss_d, score_real, score_fake = self.d_step(real, fake, step, real_y, fake_y)
        one = torch.ones((), device=self.device)
        stats = {"loss/d": loss_d, "score/real": score_real, "score/fake": score_fake, "steps": one}
        if step % self.cfg.optim.d_steps == 0:
            if not self.cfg.train.reuse_fake:
                z, fake_y = self.paired_noise(step, 1)
                with self.accelerator.autocast():
                    fake = self.generate(z, fake_y)
            with self.phase("g_step"):
                stats |= {"loss/g": self.g_step(fake, step, fake_y, z), "g_steps": one}
        self.window.add(stats)  # stays on the device: no sync per step
