"""The tutorials' GAN loop, as the notebooks write it: the reference gan-ddp is measured against.

A torchvision-style dataset (uint8 array -> PIL image -> `ToTensor()` -> `Normalize((0.5,), (0.5,))` per
image) in a `DataLoader`, D ending in `nn.Sigmoid()` with `nn.BCELoss`, a fresh G forward for the G step, D
not frozen, default `zero_grad()`, default Adam, fp32, default threads. `gan-ddp bench --baseline` times it
beside the real trainer; `gan-ddp textbook` trains it for a time budget and writes samples, so its quality
can be scored like a gan-ddp run's.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from gan_ddp.errors import UsageError


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
    from gan_ddp.components.models import MaskDropout, build_models

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
        from gan_ddp.components.data import to_sample_array
        from gan_ddp.components.models import generate

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
def run_textbook(args: argparse.Namespace) -> int:
    """Train `TextbookLoop` until `--seconds` of training time; every `--every` seconds (and at the end) write
    `--n` samples to `<out>/t<seconds>.npz` and a line to `<out>/log.jsonl`. Writing samples is not timed."""
    import numpy as np

    from gan_ddp.components.data import load_arrays
    from gan_ddp.config import load_config

    for name in ("seconds", "every", "n"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be > 0, got {getattr(args, name)}")
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
