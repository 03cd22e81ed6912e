"""Generator EMA: the update rule, the ramp-up, state round trip, and that grids sample from it."""

from __future__ import annotations

import pytest
import torch
from _runs import MNIST, SMOKE
from torch import nn

from gan_ddp.training.ema import GeneratorEMA


def test_update_rule_and_rampup():
    g = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        g.weight.fill_(0.0)
    ema = GeneratorEMA(g, decay=0.99, rampup=True)
    assert ema.beta() == pytest.approx(1 / 10)  # (1 + 0) / (10 + 0): the random init is forgotten fast
    with torch.no_grad():
        g.weight.fill_(1.0)
    ema.update(g)  # ema = 0.1 * 0 + 0.9 * 1
    torch.testing.assert_close(ema.shadow.weight, torch.full((2, 2), 0.9))
    ema.updates = 10_000
    assert ema.beta() == 0.99  # capped at decay once the ramp passes it
    plain = GeneratorEMA(g, decay=0.5, rampup=False)
    with torch.no_grad():
        g.weight.fill_(3.0)
    plain.update(g)  # 0.5 * 1 + 0.5 * 3
    torch.testing.assert_close(plain.shadow.weight, torch.full((2, 2), 2.0))
    assert not any(p.requires_grad for p in plain.shadow.parameters())


def test_buffers_are_copied_and_state_round_trips():
    g = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = GeneratorEMA(g, decay=0.9)
    g.train()(torch.randn(8, 3))  # moves the BatchNorm running stats
    ema.update(g)
    torch.testing.assert_close(ema.shadow[1].running_mean, g[1].running_mean)
    other = GeneratorEMA(g, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1
    for a, b in zip(other.shadow.state_dict().values(), ema.shadow.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_grids_sample_from_the_ema(tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    from gan_ddp.config import load_config
    from gan_ddp.training.trainer import Trainer

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    trainer = Trainer(load_config(SMOKE, [f"data.root={MNIST}", f"run.dir={tmp_path}", "ema.decay=0.5"]))
    for step, batch in zip(range(1, 4), trainer.parts.loader, strict=False):
        trainer.gan.train_step(batch, step)
    with torch.no_grad():
        expected = trainer.gan.ema.shadow(trainer.parts.fixed_noise)
        raw = trainer.gan.G_raw(trainer.parts.fixed_noise)
    grid = trainer.outputs.sample_images(trainer.parts.fixed_noise)
    torch.testing.assert_close(grid, expected)
    assert not torch.allclose(grid, raw)
    torch.testing.assert_close(trainer.outputs.sample_images(trainer.parts.fixed_noise, use_ema=False), raw)
