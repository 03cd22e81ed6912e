"""GAN losses as pure functions of discriminator LOGITS.

AMP safety: every function casts logits to float32 first and uses the fused
``*_with_logits`` / softplus forms, never ``sigmoid`` followed by ``BCELoss`` (which
saturates to log(0) in half precision and is rejected by autocast).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gan_ddp.registry import Registry


@dataclass(frozen=True)
class Loss:
    """One adversarial objective, on D's logits (cast to float32 first)."""

    d: Callable[[Tensor, Tensor, float], Tensor]  # (real logits, fake logits, real label) -> D loss
    g: Callable[[Tensor], Tensor]  # fake logits -> G loss
    # D's loss also takes `gradient_penalty`, computed per sample: D must not mix samples (no BatchNorm).
    per_sample_penalty: bool = False


LOSSES: Registry[Loss] = Registry("loss.kind")


def _non_saturating_g(fake: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))  # = mean(softplus(-fake))


def _bce_d(real: Tensor, fake: Tensor, real_label: float) -> Tensor:
    # The two terms are batch means, SUMMED as the classic tutorials do (2 log 2 at logits 0);
    # real_label < 1 is one-sided label smoothing (fake targets stay 0).
    return F.binary_cross_entropy_with_logits(real, torch.full_like(real, real_label)) + (
        F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    )


def _hinge_d(real: Tensor, fake: Tensor, real_label: float) -> Tensor:
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def _wasserstein_d(real: Tensor, fake: Tensor, real_label: float) -> Tensor:
    return fake.mean() - real.mean()


def _wasserstein_g(fake: Tensor) -> Tensor:
    return -fake.mean()


LOSSES.add("bce", Loss(d=_bce_d, g=_non_saturating_g))  # the tutorials' non-saturating GAN
LOSSES.add("hinge", Loss(d=_hinge_d, g=_wasserstein_g))
LOSSES.add("wgan-gp", Loss(d=_wasserstein_d, g=_wasserstein_g, per_sample_penalty=True))


def d_loss(kind: str, real_logits: Tensor, fake_logits: Tensor, real_label: float = 1.0) -> Tensor:
    """Discriminator / critic loss (scalar float32).

    - ``"bce"``: ``BCE(real, real_label) + BCE(fake, 0)``.
    - ``"hinge"``: ``mean(relu(1 - real)) + mean(relu(1 + fake))``.
    - ``"wgan-gp"``: ``mean(fake) - mean(real)``; add ``gradient_penalty`` separately.
    """
    return LOSSES[kind].d(real_logits.float(), fake_logits.float(), real_label)


def g_loss(kind: str, fake_logits: Tensor) -> Tensor:
    """Generator loss (scalar float32): ``"bce"`` the non-saturating ``BCE(fake, 1)``, the others ``-mean(fake)``."""
    return LOSSES[kind].g(fake_logits.float())


def gradient_penalty(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP penalty ``mean((||grad_x D(x_hat)||_2 - 1)^2)`` (unweighted, float32).

    ``x_hat = eps * real + (1 - eps) * fake`` with one ``eps ~ U(0, 1)`` per sample. The
    graph is kept (``create_graph=True``) so the penalty back-propagates into D's
    parameters; real/fake are detached so nothing flows into G. Autocast is disabled
    because a half-precision double backward loses the small input gradients.
    """
    with torch.autocast(device_type=real.device.type, enabled=False):
        real_f, fake_f = real.detach().float(), fake.detach().float()
        # Shape (B, 1, 1, 1) for images: one mixing weight per sample, broadcast over pixels.
        eps = torch.rand(real_f.size(0), *([1] * (real_f.dim() - 1)), device=real_f.device)
        x_hat = (eps * real_f + (1.0 - eps) * fake_f).requires_grad_(True)
        out = discriminator(x_hat).float()
        (grad,) = torch.autograd.grad(outputs=out, inputs=x_hat, grad_outputs=torch.ones_like(out), create_graph=True)
        # Tiny epsilon keeps the sqrt differentiable if a gradient is exactly zero.
        norm = torch.sqrt(grad.flatten(1).pow(2).sum(dim=1) + 1e-12)
        return (norm - 1.0).pow(2).mean()


def r1_penalty(discriminator: Callable[[Tensor], Tensor], real: Tensor) -> Tensor:
    """R1 (Mescheder et al. 2018): ``mean ||grad_x D(x)||^2`` over the real images (unweighted, float32).

    It penalises D's slope on the data only, where WGAN-GP's penalty also pulls it towards 1 between real
    and fake; with the weight gamma / 2, as in that paper and StyleGAN2. Same autocast and graph handling
    as `gradient_penalty`. With a BatchNorm D the batch's images share statistics, as in its forward."""
    with torch.autocast(device_type=real.device.type, enabled=False):
        x = real.detach().float().requires_grad_(True)
        (grad,) = torch.autograd.grad(outputs=discriminator(x).float().sum(), inputs=x, create_graph=True)
        return grad.flatten(1).pow(2).sum(dim=1).mean()


def mode_seeking(z: Tensor, fake: Tensor, eps: float = 1e-5) -> Tensor:
    """Mode-seeking term (Mao et al., "Mode Seeking GANs", CVPR 2019), to add to G's loss: for pairs of samples
    (0, 1), (2, 3), ... that share their class but not their noise, the mean of
    ``mean|z_a - z_b| / mean|G(z_a) - G(z_b)|``. G lowers it by making different noise give different images,
    which is what a conditional G tends to lose within a class (low recall). Pairs are adjacent in the batch,
    so with an even per-process batch every pair lives in one process (N processes pair what one would)."""
    if z.size(0) % 2:
        raise ValueError(f"mode_seeking pairs samples: need an even batch, got {z.size(0)}")
    dz = (z[0::2].float() - z[1::2].float()).abs().flatten(1).mean(1)
    dx = (fake[0::2].float() - fake[1::2].float()).abs().flatten(1).mean(1)
    return (dz / (dx + eps)).mean()


@torch.no_grad()
def d_scores(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean D(x) and D(G(z)) probabilities as detached 0-dim float32 tensors (no host sync)."""
    return torch.sigmoid(real_logits.float()).mean(), torch.sigmoid(fake_logits.float()).mean()
