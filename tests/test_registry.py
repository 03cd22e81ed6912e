"""The registries: each config key's values declared once, torch-free, in gan_ddp/choices.py (the config's allowed
values and its checks come from there); the code behind each value registers under its name beside it."""

from __future__ import annotations

import pytest
import torch

from gan_ddp import choices, registry
from gan_ddp.components.augment import AUGMENT_OPS
from gan_ddp.components.data import DATASETS
from gan_ddp.components.losses import LOSSES, Loss, d_loss, g_loss
from gan_ddp.components.models import ARCHS, build_models
from gan_ddp.config import ConfigError, load_config
from gan_ddp.evaluation.evaluator import EVALUATORS


@pytest.mark.parametrize(
    ("key", "reg"),
    [
        ("loss.kind", LOSSES),
        ("model.arch", ARCHS),
        ("data.dataset", DATASETS),
        ("augment.policy", AUGMENT_OPS),
        ("eval.evaluator", EVALUATORS),
    ],
)
def test_every_declared_value_has_its_code(key, reg):
    declared = registry.lookup(key)
    assert getattr(reg, "choices", reg) is declared  # a dataset is all declaration: data.DATASETS is it
    assert reg.names() == declared.names() and all(name in reg for name in declared.names())


def test_a_new_loss_is_a_declaration_and_a_registration(monkeypatch):
    """What adding a loss takes: its name (and facts) in choices.py, its code registered beside the others; the
    config accepts it and lists it in errors."""
    lsgan = Loss(d=lambda r, f, label: ((r - label) ** 2).mean() + (f**2).mean(), g=lambda f: ((f - 1) ** 2).mean())
    monkeypatch.setitem(choices.LOSSES._specs, "lsgan", choices.LossSpec())
    monkeypatch.setitem(LOSSES._entries, "lsgan", lsgan)
    assert load_config(None, ["loss.kind=lsgan"]).loss.kind == "lsgan"
    assert d_loss("lsgan", torch.ones(4), torch.zeros(4)).item() == 0.0
    assert g_loss("lsgan", torch.ones(4)).item() == 0.0
    with pytest.raises(ConfigError, match="choose one of bce, hinge, wgan-gp, lsgan"):
        load_config(None, ["loss.kind=lsgan2"])


def test_every_arch_builds_and_reads_only_its_options():
    cfg = load_config(None, []).model
    for name, arch in ARCHS.items():
        cfg.arch = name
        G, D = build_models(cfg)
        assert D(G(torch.randn(2, cfg.z_dim))).shape == (2,)
        assert all(hasattr(cfg, key) for key in arch.options)


def test_per_sample_penalty_needs_a_d_without_batchnorm():
    with pytest.raises(ConfigError, match=r"model\.d_batchnorm"):
        load_config(None, ["loss.kind=wgan-gp", "model.arch=dcgan"])
    assert load_config(None, ["loss.kind=wgan-gp", "model.arch=dcgan", "model.d_batchnorm=false"])


def test_registering_a_name_twice_is_refused():
    with pytest.raises(RuntimeError, match="twice"):
        LOSSES.add("bce", LOSSES["bce"])
    with pytest.raises(RuntimeError, match="exists already"):
        registry.Registry("loss.kind")


def test_an_undeclared_name_or_a_disagreeing_fact_is_refused(monkeypatch):
    with pytest.raises(RuntimeError, match=r"'lsgan' is not declared; add it to gan_ddp/choices\.py"):
        LOSSES.add("lsgan", LOSSES["bce"])
    hinge = LOSSES["hinge"]
    monkeypatch.delitem(LOSSES._entries, "hinge")
    with pytest.raises(RuntimeError, match=r"per_sample_penalty=True, gan_ddp/choices\.py declares False"):
        LOSSES.add("hinge", Loss(d=hinge.d, g=hinge.g, per_sample_penalty=True))


def test_the_declarations_need_no_torch():
    """choices.py is what a config is checked against: importing it (and the config) must not import torch."""
    import subprocess
    import sys

    code = "import sys, gan_ddp.config; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr
