from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gan_ddp.components.losses import LOSSES, d_loss, d_scores, g_loss, gradient_penalty

LOG2 = math.log(2.0)


def t(*vals: float) -> torch.Tensor:
    return torch.tensor(vals)


def test_bce_at_zero_logits_sums_two_log2_terms() -> None:
    z = torch.zeros(5)
    assert d_loss("bce", z, z).item() == pytest.approx(2 * LOG2)
    assert g_loss("bce", z).item() == pytest.approx(LOG2)


def test_bce_label_smoothing() -> None:
    # BCE(x, y) = softplus(x) - y * x; real logit 2 with target 0.9, fake logit 0 with target 0.
    expected = (math.log1p(math.exp(2.0)) - 0.9 * 2.0) + LOG2
    assert d_loss("bce", t(2.0), t(0.0), real_label=0.9).item() == pytest.approx(expected, rel=1e-6)


def test_g_bce_is_nonsaturating_softplus() -> None:
    fake = t(-3.0, 0.5, 4.0)
    torch.testing.assert_close(g_loss("bce", fake), torch.nn.functional.softplus(-fake).mean())


def test_hinge_values() -> None:
    # relu(1 - [2, 0.5]) = [0, 0.5] -> 0.25; relu(1 + [-2, 1]) = [0, 2] -> 1.0
    assert d_loss("hinge", t(2.0, 0.5), t(-2.0, 1.0)).item() == pytest.approx(1.25)
    assert g_loss("hinge", t(-2.0, 1.0)).item() == pytest.approx(0.5)


def test_wgan_values() -> None:
    assert d_loss("wgan-gp", t(1.0, 3.0), t(-1.0, 0.0)).item() == pytest.approx(-0.5 - 2.0)
    assert g_loss("wgan-gp", t(-1.0, 0.0)).item() == pytest.approx(0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", LOSSES.names())
def test_losses_are_float32_for_half_logits(kind: str, dtype: torch.dtype) -> None:
    real, fake = torch.randn(8).to(dtype), torch.randn(8).to(dtype)
    assert d_loss(kind, real, fake, real_label=0.9).dtype == torch.float32
    assert g_loss(kind, fake).dtype == torch.float32
    assert all(s.dtype == torch.float32 for s in d_scores(real, fake))


def test_unknown_kind_names_allowed() -> None:
    for fn in (lambda: d_loss("lsgan", t(0.0), t(0.0)), lambda: g_loss("lsgan", t(0.0))):
        with pytest.raises(ValueError, match="lsgan") as exc:
            fn()
        assert all(k in str(exc.value) for k in LOSSES)


class LinearCritic(nn.Module):
    """D(x) = <w, x>: its input gradient is w for every sample, so ||grad|| = ||w||."""

    def __init__(self, norm: float) -> None:
        super().__init__()
        w = torch.randn(28 * 28)
        self.w = nn.Parameter(w / w.norm() * norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w


def test_gradient_penalty_unit_norm_is_zero() -> None:
    real, fake = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)
    assert gradient_penalty(LinearCritic(1.0), real, fake).item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_penalty_positive_and_differentiable() -> None:
    critic = LinearCritic(2.0)
    real, fake = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28, requires_grad=True)
    gp = gradient_penalty(critic, real, fake)
    assert gp.dtype == torch.float32
    assert gp.item() == pytest.approx(1.0, rel=1e-5)  # (2 - 1)^2
    gp.backward()  # create_graph=True -> the penalty reaches D's parameters
    assert critic.w.grad is not None and critic.w.grad.abs().sum() > 0
    assert fake.grad is None  # inputs are detached: nothing flows into G


def test_gradient_penalty_half_inputs_under_autocast() -> None:
    real = torch.randn(3, 1, 28, 28).to(torch.bfloat16)
    fake = torch.randn(3, 1, 28, 28).to(torch.bfloat16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        gp = gradient_penalty(LinearCritic(1.0), real, fake)
    assert gp.dtype == torch.float32
    assert gp.item() == pytest.approx(0.0, abs=1e-5)


def test_d_scores() -> None:
    real = torch.tensor([0.0, 0.0], requires_grad=True)
    d_real, d_fake = d_scores(real, t(math.log(3.0), math.log(3.0)))
    assert d_real.item() == pytest.approx(0.5)
    assert d_fake.item() == pytest.approx(0.75)
    assert d_real.dim() == 0 and d_fake.dim() == 0
    assert not d_real.requires_grad and not d_fake.requires_grad


def test_r1_penalty_is_the_mean_squared_input_gradient_and_trains_d() -> None:
    from gan_ddp.components.losses import r1_penalty

    torch.manual_seed(0)
    D = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    real = torch.randn(6, 1, 3, 4)
    penalty = r1_penalty(lambda x: D(x).squeeze(1), real)
    x = real.clone().requires_grad_(True)
    by_hand = torch.stack([torch.autograd.grad(D(x[i : i + 1]).sum(), x)[0][i].pow(2).sum() for i in range(6)]).mean()
    torch.testing.assert_close(penalty, by_hand)
    penalty.backward()  # the graph was kept: the penalty reaches D's weights
    assert D[1].weight.grad is not None and D[1].weight.grad.abs().sum() > 0
    assert r1_penalty(lambda x: (x * 0).flatten(1).sum(1), real) == 0  # a flat D has no slope


def test_lazy_r1_applies_only_on_its_steps(tmp_path) -> None:
    """loss.r1_gamma changes training on the steps r1_every divides, and only there."""
    from _runs import checkpoint_tensors, newest_checkpoint, train_inproc

    def weights(name: str, *overrides: str) -> dict[str, torch.Tensor]:
        assert train_inproc(tmp_path / name, "train.steps=4", "checkpoint.every=100", *overrides) == 0
        return {k: v for k, v in checkpoint_tensors(newest_checkpoint(tmp_path / name)).items() if k.startswith("D.")}

    plain = weights("plain")
    never = weights("never", "loss.r1_gamma=10", "loss.r1_every=5")  # steps 1-4: not one multiple of 5
    every2 = weights("every2", "loss.r1_gamma=10", "loss.r1_every=2")
    assert all(torch.equal(plain[k], never[k]) for k in plain)
    assert any(not torch.equal(plain[k], every2[k]) for k in plain)


def test_mode_seeking_is_the_mean_noise_to_image_distance_ratio_of_adjacent_pairs() -> None:
    from gan_ddp.components.losses import mode_seeking

    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 1.0], [1.0, -1.0]])  # pairs: mean |dz| = 1 and 1
    fake = torch.zeros(4, 1, 2, 2)
    fake[1] += 0.5  # pair 0: mean |dx| = 0.5; pair 1: identical images
    fake.requires_grad_(True)
    value = mode_seeking(z, fake, eps=1e-5)
    torch.testing.assert_close(value, torch.tensor((1 / (0.5 + 1e-5) + 1 / 1e-5) / 2))
    value.backward()
    # Descending the term pushes each pair's images apart: the gradient points from one towards the other.
    assert (fake.grad[1] < 0).all() and (fake.grad[0] > 0).all()
    with pytest.raises(ValueError, match="even batch"):
        mode_seeking(z[:3], fake[:3])
