"""GAN losses as pure functions of discriminator LOGITS.

AMP safety: every function casts logits to float32 first and uses the fused
``*_with_logits`` / softplus forms, never ``sigmoid`` followed by ``BCELoss`` (which
saturates to log(0) in half precision and is rejected by autocast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("bce", "hinge", "wgan-gp")


def _check(kind: str) -> None:
    if kind not in LOSSES:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {LOSSES}")


def d_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor, real_label: float = 1.0) -> torch.Tensor:
    """Discriminator / critic loss (scalar float32).

    - ``"bce"``: ``BCE(real, real_label) + BCE(fake, 0)``, each term a batch mean, the two
      terms SUMMED (as the classic tutorials do; at logits 0 this is ``2 log 2``).
      ``real_label < 1`` gives one-sided label smoothing (fake targets stay 0).
    - ``"hinge"``: ``mean(relu(1 - real)) + mean(relu(1 + fake))``.
    - ``"wgan-gp"``: ``mean(fake) - mean(real)``; add ``gradient_penalty`` separately.
    """
    _check(kind)
    real, fake = real_logits.float(), fake_logits.float()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(
            real, torch.full_like(real, real_label)
        ) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    if kind == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    return fake.mean() - real.mean()


def g_loss(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator loss (scalar float32).

    ``"bce"`` is the non-saturating loss ``BCE(fake, 1) = mean(softplus(-fake))``;
    ``"hinge"`` and ``"wgan-gp"`` both use ``-mean(fake)``.
    """
    _check(kind)
    fake = fake_logits.float()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
    return -fake.mean()


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


@torch.no_grad()
def d_scores(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean D(x) and D(G(z)) probabilities as detached 0-dim float32 tensors (no host sync)."""
    return torch.sigmoid(real_logits.float()).mean(), torch.sigmoid(fake_logits.float()).mean()
