from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from gan_ddp.components.models import MaskDropout, build_models, count_parameters, couples_batch, model_signature


@dataclass
class Cfg:
    arch: str = "mlp"
    z_dim: int = 100
    g_hidden: list[int] = field(default_factory=lambda: [256, 512, 1024])
    d_hidden: list[int] = field(default_factory=lambda: [1024, 512, 256])
    leaky_slope: float = 0.2
    dropout: float = 0.3
    g_channels: int = 128
    d_channels: int = 64
    d_batchnorm: bool = True


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
def test_shapes_and_ranges(arch: str) -> None:
    g, d = build_models(Cfg(arch=arch))
    assert g.z_dim == 100
    x = g(torch.randn(3, 100))
    assert x.shape == (3, 1, 28, 28)
    assert x.min() >= -1 and x.max() <= 1
    assert d(x).shape == (3,)


def test_dcgan_batch_one_eval() -> None:
    g, d = build_models(Cfg(arch="dcgan"))
    g.eval()
    d.eval()
    with torch.no_grad():
        assert g(torch.randn(1, 100)).shape == (1, 1, 28, 28)
        assert d(torch.randn(1, 1, 28, 28)).shape == (1,)


def test_mlp_parameter_counts() -> None:
    g, d = build_models(Cfg())
    assert count_parameters(g) == 1_486_352
    assert count_parameters(d) == 1_460_225


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
def test_discriminator_returns_logits(arch: str) -> None:
    _, d = build_models(Cfg(arch=arch, dropout=0.0))
    assert not any(isinstance(m, nn.Sigmoid) for m in d.modules())
    with torch.no_grad():
        # Scale a layer up so outputs leave [0, 1] if no sigmoid squashes them.
        last = [m for m in d.modules() if isinstance(m, nn.Linear)][-1]
        last.weight.mul_(1000.0)
        out = d(torch.randn(16, 1, 28, 28))
    assert (out < 0).any() and (out > 1).any()


def test_dcgan_batchnorm_defaults() -> None:
    g, d = build_models(Cfg(arch="dcgan"))
    bns = [m for m in [*g.modules(), *d.modules()] if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 3
    for bn in bns:
        assert bn.eps == 1e-5 and bn.momentum == 0.1


def test_dcgan_d_batchnorm_false() -> None:
    _, d = build_models(Cfg(arch="dcgan", d_batchnorm=False))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in d.modules())
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is not None for c in convs)
    assert d(torch.randn(2, 1, 28, 28)).shape == (2,)


def test_dcgan_init_statistics() -> None:
    g, d = build_models(Cfg(arch="dcgan"))
    for m in [*g.modules(), *d.modules()]:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            if m.weight.numel() >= 1000:  # enough samples for a stable std estimate
                assert m.weight.std().item() == pytest.approx(0.02, rel=0.1)
                assert abs(m.weight.mean().item()) < 0.005
            if m.bias is not None:
                assert torch.all(m.bias == 0)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.weight.mean().item() == pytest.approx(1.0, abs=0.01)
            assert m.weight.std().item() == pytest.approx(0.02, rel=0.3)
            assert torch.all(m.bias == 0)


def test_dropout_zero_is_deterministic_in_train_mode() -> None:
    x = torch.randn(4, 1, 28, 28)
    _, d = build_models(Cfg(dropout=0.0))
    d.train()
    assert not any(isinstance(m, nn.Dropout) for m in d.modules())
    torch.testing.assert_close(d(x), d(x), rtol=0, atol=0)
    _, d_drop = build_models(Cfg(dropout=0.3))
    d_drop.train()
    assert not torch.equal(d_drop(x), d_drop(x))


def test_unknown_arch() -> None:
    with pytest.raises(ValueError, match="mlp"):
        build_models(Cfg(arch="resnet"))


def test_model_signature() -> None:
    base = Cfg()
    assert model_signature(base) == model_signature(Cfg())
    assert model_signature(base) != model_signature(dataclasses.replace(base, g_hidden=[256, 512, 512]))
    assert model_signature(base) != model_signature(dataclasses.replace(base, z_dim=64))
    assert model_signature(base) != model_signature(dataclasses.replace(base, arch="dcgan"))
    # Non-shape hyper-parameters do not block a resume.
    assert model_signature(base) == model_signature(dataclasses.replace(base, dropout=0.0))
    dc = Cfg(arch="dcgan")
    assert model_signature(dc) != model_signature(dataclasses.replace(dc, d_channels=32))
    assert model_signature(dc) != model_signature(dataclasses.replace(dc, d_batchnorm=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_dropout_matches_dropout_in_distribution(dtype: torch.dtype) -> None:
    """The CPU mask (rand >= p) keeps each unit with probability 1 - p and rescales by 1 / (1 - p), as
    nn.Dropout does; dtype is kept, eval mode is the identity."""
    drop = MaskDropout(0.3).train()
    x = torch.ones(200, 1000, dtype=dtype)
    y = drop(x)
    assert y.dtype == dtype
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.7, abs=0.005)  # 200k Bernoulli draws: sd 0.001
    torch.testing.assert_close(y[kept].float(), torch.full((int(kept.sum()),), 1 / 0.7), rtol=1e-2, atol=0)
    assert y.float().mean().item() == pytest.approx(1.0, abs=0.01)  # expectation preserved
    assert not torch.equal(drop(x), drop(x))  # fresh mask per call
    torch.testing.assert_close(drop.eval()(x), x, rtol=0, atol=0)


def test_mask_dropout_follows_the_global_rng() -> None:
    """Resume exactness relies on dropout drawing from the global RNG that checkpoints save."""
    drop = MaskDropout(0.5).train()
    x = torch.randn(8, 64)
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    torch.testing.assert_close(drop(x), a, rtol=0, atol=0)


def test_couples_batch() -> None:
    """Only discriminators with BatchNorm need separate real and fake forwards."""
    assert not couples_batch(build_models(Cfg())[1])
    assert couples_batch(build_models(Cfg(arch="dcgan"))[1])
    assert not couples_batch(build_models(Cfg(arch="dcgan", d_batchnorm=False))[1])


def test_textbook_models_use_torch_dropout() -> None:
    """The bench baseline is the tutorials' model: torch's own nn.Dropout, not the project's mask."""
    from gan_ddp.tools.textbook import textbook_models

    _, d = textbook_models(Cfg())
    drops = [m for m in d.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 3 and all(type(m) is nn.Dropout and m.p == 0.3 for m in drops)
    assert isinstance(d[-1], nn.Sigmoid)
