"""Generator / discriminator architectures for 28x28 MNIST.

Both discriminators return raw LOGITS of shape (B,): the sigmoid lives inside the loss
(``BCEWithLogits``), which is numerically stable under AMP, and hinge / WGAN losses need
unbounded scores anyway.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from gan_ddp.config import ModelConfig

IMG_SHAPE = (1, 28, 28)
IMG_NUMEL = 28 * 28
ARCHS = ("mlp", "dcgan")


# --------------------------------------------------------------------------- MLP
class MLPGenerator(nn.Module):
    """The classic tutorial MLP generator: z -> hidden (LeakyReLU) -> 784 -> Tanh."""

    def __init__(self, z_dim: int, hidden: list[int], leaky_slope: float = 0.2) -> None:
        super().__init__()
        self.z_dim = z_dim
        layers: list[nn.Module] = []
        width = z_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LeakyReLU(leaky_slope)]
            width = h
        layers += [nn.Linear(width, IMG_NUMEL), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(z.size(0), *IMG_SHAPE)  # (B, 1, 28, 28) in [-1, 1]


class MaskDropout(nn.Dropout):
    """``nn.Dropout`` with the mask drawn by ``rand >= p`` on CPU tensors: the same distribution (keep with
    probability 1 - p, scale kept units by 1 / (1 - p)), but torch's CPU ``bernoulli_`` costs ~2.5x a
    ``rand`` of the same size, which made dropout about 15% of the whole MLP GAN step on CPU. On other
    devices, or with p = 0 or in eval mode, it is plain ``nn.Dropout``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.p > 0 and x.device.type == "cpu"):
            return super().forward(x)
        keep = torch.rand(x.shape, device=x.device).ge_(self.p)  # float32 0/1: U[0,1) >= p w.p. 1 - p
        return x * keep.mul_(1.0 / (1.0 - self.p)).to(x.dtype)


class MLPDiscriminator(nn.Module):
    """The classic tutorial MLP discriminator, minus the final Sigmoid (returns logits)."""

    def __init__(self, hidden: list[int], leaky_slope: float = 0.2, dropout: float = 0.3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = IMG_NUMEL
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LeakyReLU(leaky_slope)]
            if dropout > 0:  # 0 disables: no no-op Dropout modules cluttering the repr
                layers.append(MaskDropout(dropout))
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1)).squeeze(1)  # (B, 784) -> (B,) logits


# ------------------------------------------------------------------------- DCGAN
class DCGANGenerator(nn.Module):
    """Project-and-reshape to 7x7, then two stride-2 transposed convs: 7 -> 14 -> 28."""

    def __init__(self, z_dim: int, channels: int = 128) -> None:
        super().__init__()
        self.z_dim = z_dim
        g = channels
        self._base = (2 * g, 7, 7)
        # Biases are dropped wherever BatchNorm follows: BN's shift makes them redundant.
        self.project = nn.Sequential(
            nn.Linear(z_dim, 2 * g * 7 * 7, bias=False),
            nn.BatchNorm1d(2 * g * 7 * 7),
            nn.ReLU(inplace=True),
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(2 * g, g, kernel_size=4, stride=2, padding=1, bias=False),  # (B, g, 14, 14)
            nn.BatchNorm2d(g),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(g, 1, kernel_size=4, stride=2, padding=1),  # (B, 1, 28, 28)
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project(z).view(z.size(0), *self._base)  # (B, 2g, 7, 7)
        return self.deconv(h)  # (B, 1, 28, 28) in [-1, 1]


class DCGANDiscriminator(nn.Module):
    """Two stride-2 convs (28 -> 14 -> 7) and a linear head producing logits.

    ``batchnorm=False`` swaps the BN for Identity (and restores the conv bias): WGAN-GP's
    per-sample gradient penalty is invalid when BN couples samples within a batch.
    """

    def __init__(self, channels: int = 64, leaky_slope: float = 0.2, batchnorm: bool = True) -> None:
        super().__init__()
        d = channels
        # Not in-place: the WGAN-GP double backward must see the untouched activations.
        self.net = nn.Sequential(
            # No BN on the first layer, as in the DCGAN paper.
            nn.Conv2d(1, d, kernel_size=4, stride=2, padding=1),  # (B, d, 14, 14)
            nn.LeakyReLU(leaky_slope),
            nn.Conv2d(d, 2 * d, kernel_size=4, stride=2, padding=1, bias=not batchnorm),  # (B, 2d, 7, 7)
            nn.BatchNorm2d(2 * d) if batchnorm else nn.Identity(),
            nn.LeakyReLU(leaky_slope),
            nn.Flatten(),  # (B, 2d*7*7)
            nn.Linear(2 * d * 7 * 7, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)  # (B,) logits


@torch.no_grad()
def generate(G: nn.Module, n: int, z_dim: int, seed: int, batch: int = 500) -> torch.Tensor:
    """(n, 1, 28, 28) outputs of G for noise drawn on the CPU from ``seed``, ``batch`` at a time: the same
    ``seed`` gives the same latent vectors whatever ``batch`` is. G's train/eval mode is the caller's."""
    gen = torch.Generator().manual_seed(seed)
    device = next(G.parameters()).device
    chunks = [G(torch.randn(min(batch, n - i), z_dim, generator=gen).to(device)) for i in range(0, n, batch)]
    return torch.cat(chunks)


def couples_batch(module: nn.Module) -> bool:
    """True if the module has a layer whose output for one sample depends on the others (BatchNorm)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def dcgan_init_(module: nn.Module) -> None:
    """DCGAN paper init: conv/linear weights ~ N(0, 0.02), BN gamma ~ N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------ public
def build_models(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """Return ``(generator, discriminator)`` for ``cfg.arch`` ("mlp" or "dcgan")."""
    if cfg.arch == "mlp":
        # PyTorch default init, as in the tutorials this reproduces.
        gen: nn.Module = MLPGenerator(cfg.z_dim, list(cfg.g_hidden), cfg.leaky_slope)
        disc: nn.Module = MLPDiscriminator(list(cfg.d_hidden), cfg.leaky_slope, cfg.dropout)
    elif cfg.arch == "dcgan":
        gen = DCGANGenerator(cfg.z_dim, cfg.g_channels)
        disc = DCGANDiscriminator(cfg.d_channels, cfg.leaky_slope, cfg.d_batchnorm)
        dcgan_init_(gen)
        dcgan_init_(disc)
    else:
        raise ValueError(f"unknown model arch {cfg.arch!r}; expected one of {ARCHS}")
    return gen, disc


def count_parameters(module: nn.Module) -> int:
    """Total number of parameter elements (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


def model_signature(cfg: ModelConfig) -> dict[str, Any]:
    """Fields that determine parameter shapes; a checkpoint is only resumable if these match.

    Only the fields the chosen arch actually uses are included, so e.g. editing
    ``g_channels`` does not block resuming an MLP run. Dropout / leaky slope change no
    shapes and are deliberately left out.
    """
    sig: dict[str, Any] = {"arch": cfg.arch, "z_dim": int(cfg.z_dim)}
    if cfg.arch == "mlp":
        sig |= {"g_hidden": [int(h) for h in cfg.g_hidden], "d_hidden": [int(h) for h in cfg.d_hidden]}
    else:
        sig |= {
            "g_channels": int(cfg.g_channels),
            "d_channels": int(cfg.d_channels),
            "d_batchnorm": bool(cfg.d_batchnorm),
        }
    return sig
