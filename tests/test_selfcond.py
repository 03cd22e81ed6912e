"""Self-conditioned GANs (`model.clusters`): k-means, the generator's own class choice, D's nearest-centroid
labels for real images, no label read from the data, checkpoints that carry the clusters (exact resume),
two processes = one, and a self-conditioned run sampled and exported as an unconditional one."""

from __future__ import annotations

import math

import pytest
import torch
from _runs import (
    assert_same_tensors,
    assert_two_processes_match_one,
    checkpoint_tensors,
    losses_by_step,
    newest_checkpoint,
    single,
    train_cmd,
    train_inproc,
)
from torch.nn import functional as F

from gan_ddp.components.models import build_models, is_conditional, model_signature
from gan_ddp.components.selfcond import (
    UNASSIGNED,
    Clusterer,
    SelfConditionedDiscriminator,
    quantile_labels,
    spherical_kmeans,
)
from gan_ddp.config import ConfigError, ModelConfig, SelfCondConfig
from gan_ddp.runtime import checkpoint as ckpt

# 2000 images per step (5 per epoch on the 10k split); clusters at steps 2, 5, 8, ...
EXACT = ("train.batch_size=2000", "train.epochs=100", "log.every=3", "log.sample_every=4", "checkpoint.every=100")
SELF = ("model.clusters=4", "selfcond.start=2", "selfcond.every=3", "selfcond.images=500", "model.dropout=0.0")


def small(arch: str, clusters: int = 4) -> ModelConfig:
    return ModelConfig(arch=arch, clusters=clusters, g_hidden=[32, 64], d_hidden=[64, 32], g_channels=8, d_channels=8)


# ------------------------------------------------------------------------------ pieces
def test_spherical_kmeans_finds_separated_directions_and_a_warm_start_keeps_their_indices() -> None:
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(5, 16, generator=g), dim=1)
    truth = torch.arange(500) % 5
    x = F.normalize(centres[truth] + 0.05 * torch.randn(500, 16, generator=g), dim=1)
    found, labels = spherical_kmeans(x, 5, 20, torch.Generator().manual_seed(1))
    assert torch.allclose(found.norm(dim=1), torch.ones(5))
    # one found cluster per true one, and every point with its own
    mapping = {int(t): int(labels[truth == t].mode().values) for t in range(5)}
    assert sorted(mapping.values()) == list(range(5))
    assert all(bool((labels[truth == t] == c).all()) for t, c in mapping.items())
    # from the previous centroids on slightly moved data: cluster i stays cluster i
    moved = F.normalize(x + 0.02 * torch.randn(500, 16, generator=g), dim=1)
    again, labels_again = spherical_kmeans(moved, 5, 5, torch.Generator().manual_seed(2), init=found)
    assert torch.equal(labels_again, labels)
    assert (again * found).sum(1).min() > 0.99


def test_kmeans_refills_an_empty_cluster() -> None:
    x = F.normalize(torch.randn(200, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    dead = torch.zeros(3, 8)
    dead[:, 0] = 1.0  # three identical starting centroids: two start empty
    _, labels = spherical_kmeans(x, 3, 10, torch.Generator().manual_seed(0), init=dead)
    assert torch.bincount(labels, minlength=3).min() > 0


def test_quantile_labels_follow_the_prior_and_never_draw_an_empty_class() -> None:
    z = torch.randn(200_000, 3, generator=torch.Generator().manual_seed(0))
    prior = torch.tensor([0.5, 0.0, 0.3, 0.2])
    freq = torch.bincount(quantile_labels(z, prior), minlength=4).float() / len(z)
    assert torch.allclose(freq, prior, atol=0.005)
    assert freq[1] == 0
    assert torch.equal(quantile_labels(z[:7], torch.tensor([1.0, 0.0, 0.0])), torch.zeros(7, dtype=torch.long))


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
def test_self_conditioned_generator_is_unconditional_from_outside(arch: str) -> None:
    torch.manual_seed(0)
    G, D = build_models(small(arch))
    assert not is_conditional(G) and G.clusters == 4 and torch.equal(G.prior, torch.tensor([1.0, 0, 0, 0]))
    assert "prior" in G.state_dict() and "centroids" in D.state_dict()
    G.eval()
    G.prior.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    z = torch.randn(6, 100)
    y = G.labels(z)
    assert torch.equal(G(z), G(z, y))  # G(z) draws the class it says it draws
    assert not torch.equal(G(z, (y + 1) % 4), G(z))  # and the class matters
    assert model_signature(small(arch))["clusters"] == 4
    assert "clusters" not in model_signature(small(arch, clusters=0))  # older checkpoints still match


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
def test_self_conditioned_D_scores_an_unlabelled_real_image_as_its_nearest_centroid(arch: str) -> None:
    torch.manual_seed(0)
    _, D = build_models(small(arch))
    assert isinstance(D, SelfConditionedDiscriminator)
    D.eval()
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    assert torch.equal(D.assign(D.features(x)), torch.zeros(8, dtype=torch.long))  # before any clustering
    D.centroids.copy_(F.normalize(torch.randn(4, D.centroids.size(1)), dim=1))
    nearest = (F.normalize(D.features(x), dim=1) @ D.centroids.t()).argmax(1)
    unlabelled = torch.full((8,), UNASSIGNED)
    assert torch.allclose(D(x, unlabelled), D.inner.head(D.features(x), nearest))
    assert torch.allclose(D(x), D(x, unlabelled))
    asked = torch.tensor([3, 2, 1, 0, 3, 2, 1, 0])
    assert torch.allclose(D(x, asked), D.inner.head(D.features(x), asked))  # fakes: the class G was asked for


def test_clusterer_writes_g_prior_and_d_centroids_from_d_features() -> None:
    torch.manual_seed(0)
    G, D = build_models(small("mlp"))
    images = torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8)
    clusterer = Clusterer(images, 4, count=200, iters=100, seed=3)  # Lloyd converged: a rerun moves nothing
    first = clusterer.recluster(G, D, step=10)
    assert sum(first.sizes) == 200 and first.moved is None and "clusters at step 10" in first.line()
    assert math.isclose(float(G.prior.sum()), 1.0, rel_tol=1e-6)
    assert torch.allclose(G.prior, torch.tensor(first.sizes, dtype=torch.float32) / 200)
    assert torch.allclose(D.centroids.norm(dim=1), torch.ones(4))
    second = clusterer.recluster(G, D, step=20)  # same D: the warm start finds the same clusters
    assert second.moved == 0.0 and second.sizes == first.sizes


def test_selfcond_schedule_and_config_errors() -> None:
    plan = SelfCondConfig(start=5, every=3)
    assert [s for s in range(1, 15) if plan.due(s)] == [5, 8, 11, 14]
    with pytest.raises(ConfigError, match=r"model\.clusters: 1 is not allowed"):
        ModelConfig(clusters=1)
    with pytest.raises(ConfigError, match=r"model\.clusters: needs model\.conditional=false"):
        ModelConfig(clusters=10, conditional=True)
    with pytest.raises(ConfigError, match=r"selfcond\.every"):
        SelfCondConfig(every=0)


# ------------------------------------------------------------------------------ training
def test_self_conditioned_training_reads_no_label_and_resumes_exactly(tmp_path, monkeypatch) -> None:
    """The data's labels are replaced by nonsense: nothing may change. A run split across a resume (between
    two clusterings) ends with the same weights, centroids, prior and losses as one straight run."""
    import gan_ddp.training.builder as builder

    real_load = builder.load_data

    def scrambled(*args, **kwargs):
        images, labels, info = real_load(*args, **kwargs)
        return images, torch.full_like(labels, 7), info

    straight, split, blind = tmp_path / "straight", tmp_path / "split", tmp_path / "blind"
    assert train_inproc(straight, *EXACT, *SELF, "train.steps=10") == 0
    assert train_inproc(split, *EXACT, *SELF, "train.steps=6") == 0
    assert train_inproc(split, *EXACT, *SELF, "train.steps=10") == 0
    monkeypatch.setattr(builder, "load_data", scrambled)
    assert train_inproc(blind, *EXACT, *SELF, "train.steps=10") == 0
    tensors = checkpoint_tensors(newest_checkpoint(straight))
    assert_same_tensors(tensors, checkpoint_tensors(newest_checkpoint(split)))
    assert_same_tensors(tensors, checkpoint_tensors(newest_checkpoint(blind)))
    assert losses_by_step(straight, after=6) == losses_by_step(split, after=6)
    prior = tensors["G.prior"]
    assert prior.count_nonzero() > 1 and torch.isclose(prior.sum(), torch.tensor(1.0))  # clustered, not one class
    assert tensors["D.centroids"].abs().sum() > 0


def test_a_checkpoint_of_another_cluster_count_is_refused(tmp_path) -> None:
    run = tmp_path / "run"
    assert train_inproc(run, *EXACT, *SELF, "train.steps=3") == 0
    with pytest.raises(ckpt.CheckpointError, match=r"model\.clusters"):
        train_inproc(run, *EXACT, *SELF, "train.steps=6", "model.clusters=5")
    refused = single(train_cmd(run, *EXACT, *SELF, "train.steps=6", "model.clusters=0"))
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and "model.clusters" in refused.stderr


@pytest.mark.multiprocess
def test_two_processes_match_one_process_self_conditioned(tmp_path) -> None:
    """Clusterings happen on every rank and rank 0's is broadcast: 2 x 1000 == 1 x 2000 (no BatchNorm, no dropout)."""
    assert_two_processes_match_one(tmp_path, *EXACT, *SELF, "train.steps=9")


def test_a_self_conditioned_run_samples_and_exports_as_an_unconditional_one(tmp_path, cli) -> None:
    from gan_ddp.tools.export import load_exported

    run = tmp_path / "run"
    assert train_inproc(run, *EXACT, *SELF, "train.steps=6") == 0
    assert cli("sample", "--run", str(run), "--n", "8", "--out", str(tmp_path / "s.png")).returncode == 0
    refused = cli(
        "sample", "--run", str(run), "--n", "8", "--digit", "3", "--out", str(tmp_path / "d.png"), check=False
    )
    assert refused.returncode != 0 and "class-conditional" in refused.stderr
    assert cli("export", "--run", str(run), "--out", str(tmp_path / "hub")).returncode == 0
    G, config = load_exported(tmp_path / "hub")
    assert config["clusters"] == 4 and config["conditional"] is False
    saved = checkpoint_tensors(newest_checkpoint(run))
    (ema_prior,) = [v for k, v in saved.items() if k.startswith("EMA.") and k.endswith("shadow.prior")]
    assert torch.equal(G.prior, ema_prior)  # the EMA generator, with its copy of the prior
    assert G(torch.randn(3, G.z_dim)).shape == (3, 1, 28, 28)


def test_mode_seeking_pairs_share_their_class_across_processes_and_change_training(tmp_path) -> None:
    """loss.mode_seeking: samples 2i and 2i + 1 get the same cluster and different noise, the pairs of two
    processes are those of one (pairs never straddle a process), and the term reaches G's weights."""
    import types

    from gan_ddp.training.step import GanStep

    def fake_step(rank: int, world: int, batch: int = 12) -> types.SimpleNamespace:
        cfg = types.SimpleNamespace(
            seed=3,
            train=types.SimpleNamespace(batch_size=batch),
            model=types.SimpleNamespace(z_dim=6),
            loss=types.SimpleNamespace(mode_seeking=1.0),
        )
        G_raw = types.SimpleNamespace(labels=lambda z: quantile_labels(z, torch.tensor([0.2, 0.3, 0.5])))
        step = types.SimpleNamespace(
            cfg=cfg, conditional=False, self_conditioned=True, noise_gen=torch.Generator(),
            device=torch.device("cpu"), rank=rank, local_batch=batch // world, G_raw=G_raw,
        )  # fmt: skip
        step.noise = lambda s, stream: GanStep.noise(step, s, stream)
        step.fake_labels = lambda s, stream, z=None: GanStep.fake_labels(step, s, stream, z)
        return step

    z, y = GanStep.paired_noise(fake_step(0, 1), 7, 0)
    assert torch.equal(y[0::2], y[1::2]) and y.unique().numel() > 1
    assert (z[0::2, 1:] != z[1::2, 1:]).all()
    halves = [GanStep.paired_noise(fake_step(r, 2), 7, 0) for r in range(2)]
    assert torch.equal(torch.cat([h[0] for h in halves]), z) and torch.equal(torch.cat([h[1] for h in halves]), y)

    # Same pairs, another weight: only the term itself can tell the two runs apart.
    once, twice = tmp_path / "once", tmp_path / "twice"
    assert train_inproc(once, *EXACT, *SELF, "train.steps=4", "loss.mode_seeking=1") == 0
    assert train_inproc(twice, *EXACT, *SELF, "train.steps=4", "loss.mode_seeking=2") == 0
    a, b = checkpoint_tensors(newest_checkpoint(once)), checkpoint_tensors(newest_checkpoint(twice))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("G."))
