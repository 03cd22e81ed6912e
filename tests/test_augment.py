"""DiffAugment: identity when off, differentiable when on, exact ops, and draws that depend on the global sample
index only (so N processes augment as one does, and a resume draws what the unbroken run drew)."""

from __future__ import annotations

import pytest
import torch

from gan_ddp.components.augment import BACKGROUND, DiffAugment, cutout, translate
from gan_ddp.config import AugmentConfig, ConfigError, load_config


def images(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def make(policy: str, p: float = 1.0, batch: int = 8, rank: int = 0, world: int = 1, seed: int = 0) -> DiffAugment:
    return DiffAugment(AugmentConfig(policy=policy, p=p), seed, batch, rank, batch // world)


def test_off_is_the_identity() -> None:
    x = images()
    aug = make("")
    assert not aug.enabled
    assert aug(x, 5, 0) is x


def test_on_changes_images_and_is_differentiable() -> None:
    x = images().requires_grad_(True)
    aug = make("translation,cutout")
    y = aug(x, 3, 0)
    assert y.shape == x.shape and not torch.equal(y, x)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # The gradient is the weights moved back through the shift, zero where cutout blanked or padding came in.
    assert torch.isin(x.grad, torch.cat([weights.flatten(), torch.zeros(1)])).all()


def test_draws_depend_on_step_and_stream_only() -> None:
    x = images()
    aug = make("translation,cutout")
    assert torch.equal(aug(x, 7, 1), aug(x, 7, 1))
    assert not torch.equal(aug(x, 7, 1), aug(x, 8, 1))
    assert not torch.equal(aug(x, 7, 1), aug(x, 7, 2))
    assert torch.equal(aug(x, 7, 1), make("translation,cutout")(x, 7, 1))  # a new instance (a resume) agrees


@pytest.mark.parametrize("policy", ["translation", "cutout", "translation,cutout"])
def test_two_processes_augment_their_rows_as_one_process_does(policy: str) -> None:
    x = images(8)
    whole = make(policy, p=0.5, batch=8)(x, 11, 0)
    halves = [make(policy, p=0.5, batch=8, rank=r, world=2)(x[r * 4 : (r + 1) * 4], 11, 0) for r in range(2)]
    assert torch.equal(torch.cat(halves), whole)


def test_translate_shifts_and_fills_with_background() -> None:
    x = images(2)
    out = translate(x, torch.tensor([2, 0]), torch.tensor([0, -3]), pad=4)
    assert torch.equal(out[0, :, 2:, :], x[0, :, :-2, :])  # down by 2
    assert (out[0, :, :2, :] == BACKGROUND).all()
    assert torch.equal(out[1, :, :, :-3], x[1, :, :, 3:])  # left by 3
    assert (out[1, :, :, -3:] == BACKGROUND).all()


def test_cutout_blanks_one_clipped_square() -> None:
    x = images(2)
    out = cutout(x, torch.tensor([-7, 10]), torch.tensor([20, 3]), size=14)
    hole0 = torch.zeros(28, 28, dtype=torch.bool)
    hole0[0:7, 20:28] = True  # clipped at the top and right borders
    hole1 = torch.zeros(28, 28, dtype=torch.bool)
    hole1[10:24, 3:17] = True
    for i, hole in enumerate((hole0, hole1)):
        assert (out[i, 0][hole] == BACKGROUND).all()
        assert torch.equal(out[i, 0][~hole], x[i, 0][~hole])


def test_probability_p_applies_to_about_that_share() -> None:
    x = images(2000)
    out = make("cutout", p=0.3, batch=2000)(x, 1, 0)
    changed = (out != x).flatten(1).any(1).float().mean().item()
    assert 0.25 < changed < 0.35


def test_config_validation() -> None:
    assert load_config(None, ["augment.policy=translation, cutout"]).augment.ops() == ["translation", "cutout"]
    with pytest.raises(ConfigError, match=r"augment\.policy: 'color'"):
        load_config(None, ["augment.policy=color"])
    with pytest.raises(ConfigError, match=r"augment\.p: 0\.0"):
        load_config(None, ["augment.p=0"])
