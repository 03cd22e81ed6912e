"""Differentiable augmentation for the discriminator (DiffAugment, Zhao et al. 2020, "Differentiable
Augmentation for Data-Efficient GAN Training").

D overfits a small dataset (MNIST's 10k test split is one): it memorises the real images and its feedback to
G degrades. DiffAugment shows D only augmented images, real and fake alike, in the D step and in the G step,
with every op differentiable so G's gradient flows back through it. Because both sides get the same
distribution of transformations, G is still pushed towards the un-augmented data (the ops below do not
"leak" into the samples, as the paper measured).

Two of the paper's ops, the ones it recommends for small datasets besides colour (meaningless for MNIST):

- ``translation``: shift each image by its own integer offset in [-1/8, 1/8] of the side (4 px at 28),
  each axis; what comes in from outside is background;
- ``cutout``: blank one square of half the side (14 px) at a random position per image.

One deliberate difference: the paper fills with 0, the mid-grey of images in [-1, 1]; here the fill is -1,
MNIST's black background, so augmented digits still look like digits on their usual background.

The draws are reproducible and independent of the number of processes: every process draws the offsets of
the whole global batch from a generator seeded by (seed, step, stream) and takes its own rows, as
`GanStep.noise` does for the latent vectors. So N processes augment exactly as one would, and a resumed run
draws what the unbroken run drew. This module is written here rather than taken from a library: kornia's
augmentations are differentiable but draw from the global RNG per process (not per global sample index),
and the reference DiffAugment code is a script, not a package.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from gan_ddp.config import AugmentConfig
from gan_ddp.registry import Registry

BACKGROUND = -1.0  # the value of an empty pixel in [-1, 1] images
TRANSLATION_RATIO = 0.125  # as in DiffAugment
CUTOUT_RATIO = 0.5  # as in DiffAugment
# Streams of draws within a step (the seed formula leaves room for 8).
STREAM_REAL, STREAM_FAKE_D, STREAM_FAKE_G = 0, 1, 2


def translate(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad: int) -> torch.Tensor:
    """Shift image i of x (B, C, H, W) by (dy[i], dx[i]) pixels in [-pad, pad], filling with the background.
    An index operation, so differentiable in x."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=BACKGROUND)  # (B, C, H + 2 pad, W + 2 pad)
    rows = (pad - dy)[:, None] + torch.arange(h, device=x.device)  # (B, H): source rows
    cols = (pad - dx)[:, None] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, C, H, W)


def cutout(x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, size: int) -> torch.Tensor:
    """Blank (set to the background) a size x size square whose top-left corner is (cy[i], cx[i]); the square
    may reach past the border (it is clipped), as in DiffAugment. Differentiable in x (a masked select)."""
    _, _, h, w = x.shape
    ys = torch.arange(h, device=x.device)[None, :]  # (1, H)
    xs = torch.arange(w, device=x.device)[None, :]
    inside_y = (ys >= cy[:, None]) & (ys < cy[:, None] + size)  # (B, H)
    inside_x = (xs >= cx[:, None]) & (xs < cx[:, None] + size)  # (B, W)
    hole = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]  # (B, 1, H, W)
    return torch.where(hole, torch.full_like(x, BACKGROUND), x)


class DiffAugment:
    """Callable ``augment(x, step, stream)`` for the rows [rank * b, (rank + 1) * b) of the global batch."""

    def __init__(self, cfg: AugmentConfig, seed: int, global_batch: int, rank: int, local_batch: int) -> None:
        self.ops = cfg.ops()
        self.p = cfg.p
        self.seed = seed
        self.global_batch = global_batch
        self.rows = slice(rank * local_batch, (rank + 1) * local_batch)
        self._gen: torch.Generator | None = None
        self._ops = [AUGMENT_OPS[op] for op in self.ops]

    @property
    def enabled(self) -> bool:
        return bool(self.ops)

    def _generator(self, device: torch.device, step: int, stream: int) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device)
        # Disjoint from GanStep.noise's seeds (which use seed * 1_000_003 + 4 * step + stream).
        return self._gen.manual_seed((self.seed * 7_000_003 + 2**40 + step * 8 + stream) % (2**63))

    def __call__(self, x: torch.Tensor, step: int, stream: int) -> torch.Tensor:
        """x: this process's (b, C, H, W) rows of the global batch at `step`; returns them augmented."""
        if not self.ops:
            return x
        gen = self._generator(x.device, step, stream)
        for op in self._ops:
            # Each op draws for the whole global batch, in a fixed order, then keeps this process's rows.
            x = op(self, x, gen)
        return x

    def _apply(self, gen: torch.Generator, n: int, device: torch.device) -> torch.Tensor:
        """(b,) 1 where this op applies to the image (probability p), else 0; always drawn, so the stream
        of draws does not depend on p."""
        return (torch.rand(n, generator=gen, device=device)[self.rows] < self.p).long()


# An op: (the augmenter, this process's images, the step's generator) -> the images augmented.
AUGMENT_OPS: Registry[Callable[[DiffAugment, torch.Tensor, torch.Generator], torch.Tensor]] = Registry("augment.policy")


@AUGMENT_OPS.register("translation")
def random_translation(aug: DiffAugment, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift by up to TRANSLATION_RATIO of the side (4 px at 28) each way, the background filled in."""
    n, h = aug.global_batch, x.shape[2]
    pad = int(h * TRANSLATION_RATIO + 0.5)
    shift = torch.randint(-pad, pad + 1, (2, n), generator=gen, device=x.device)[:, aug.rows]
    apply = aug._apply(gen, n, x.device)
    return translate(x, shift[0] * apply, shift[1] * apply, pad)


@AUGMENT_OPS.register("cutout")
def random_cutout(aug: DiffAugment, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blank a random square of CUTOUT_RATIO of the side (14 px at 28)."""
    n, (_, _, h, w) = aug.global_batch, x.shape
    size = int(h * CUTOUT_RATIO + 0.5)
    # Corner in [-size/2, side - size/2): the square's centre is uniform over the image.
    corner = torch.randint(0, h, (2, n), generator=gen, device=x.device)[:, aug.rows] - size // 2
    apply = aug._apply(gen, n, x.device)
    corner = torch.where(apply.bool(), corner, torch.full_like(corner, h + w))  # off-image: no hole
    return cutout(x, corner[0], corner[1], size)
