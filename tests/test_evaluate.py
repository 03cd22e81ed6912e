"""Classifier-feature FID and friends: the evaluator, the metrics, distributed generation, the CLI functions.

One evaluator is trained per test run (few epochs, on the real MNIST test split that the package bundles: the
`evaluator_cache` fixture of tests/conftest.py, shared with other modules); these tests use a copy of its cache.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _runs import EVALUATOR_EPOCHS as TEST_EPOCHS
from _runs import ONE_MACHINE
from torch import nn

from gan_ddp.components.data import BUNDLED_DIR, DataError, data_checksum, load_arrays
from gan_ddp.evaluation import eval_metrics as em
from gan_ddp.evaluation import evaluate as ev
from gan_ddp.evaluation import evaluator as evr

REAL_MNIST = BUNDLED_DIR  # the real MNIST t10k split shipped in the package
LN10 = math.log(10)
# Measured with the session evaluator (3 epochs, seed 0): real vs real 1.2, uniform noise 1050, only 1s 1150.
REAL_VS_REAL_MAX = 5.0


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory, evaluator_cache_copy) -> Path:
    """This module's session cache: the test evaluator, then what these tests add to it."""
    return evaluator_cache_copy(tmp_path_factory.mktemp("eval") / "cache")


@pytest.fixture(scope="session")
def mnist() -> tuple[torch.Tensor, torch.Tensor]:
    return load_arrays("mnist", REAL_MNIST, "test", download=False)


@pytest.fixture(scope="session")
def real() -> evr.RealData:
    """The real images as evaluation takes them: read once, with their checksum."""
    return evr.RealData.load("mnist", REAL_MNIST, "test")


@pytest.fixture(scope="session")
def trained(real, cache_dir: Path) -> tuple[evr.MnistEvaluator, evr.EvaluatorInfo, float]:
    started = time.monotonic()
    model, info = evr.load_or_train_evaluator(real, cache_dir, epochs=TEST_EPOCHS, log=None)
    return model, info, time.monotonic() - started


@pytest.fixture(scope="session")
def evaluator(trained) -> evr.MnistEvaluator:
    return trained[0]


@pytest.fixture(scope="session")
def halves(mnist) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint random halves of the 10,000 test images (indices)."""
    perm = torch.randperm(mnist[1].shape[0], generator=torch.Generator().manual_seed(0))
    return perm[:5000], perm[5000:]


@pytest.fixture(scope="session")
def real_features(evaluator, mnist) -> tuple[torch.Tensor, torch.Tensor]:
    return em.extract_features(evaluator, mnist[0])


@pytest.fixture(scope="session")
def stats_a(real_features, halves, mnist) -> em.RealStats:
    mu, sigma = em.feature_stats(real_features[0][halves[0]])
    return em.RealStats(
        mu=mu, sigma=sigma, n=len(halves[0]), features=real_features[0][halves[0]], labels=mnist[1][halves[0]].long()
    )


# ------------------------------------------------------------------------------ evaluator
def test_evaluator_accuracy_and_card(trained, mnist, cache_dir: Path) -> None:
    _, info, _ = trained
    assert info.heldout_accuracy >= 0.97, info
    assert (info.n_train, info.n_heldout) == (9000, 1000)
    card = json.loads(evr.evaluator_path(cache_dir, "mnist", info.data_sha256).with_suffix(".json").read_text())
    assert card["data_sha256"] == data_checksum(*mnist)
    assert evr.evaluator_path(cache_dir, "mnist", card["data_sha256"]).name.startswith(
        f"evaluator-mnist-{card['data_sha256'][:12]}"
    )
    for key in ("dataset", "split", "n_train", "n_heldout", "heldout_accuracy", "seed", "torch_version", "arch"):
        assert key in card
    assert card["split"] == "test" and card["arch"] == evr.ARCH and card["torch_version"] == torch.__version__


def test_cached_evaluator_loads_without_training(trained, real, cache_dir: Path, monkeypatch) -> None:
    model, info, _ = trained

    def no_training(*args, **kwargs):
        raise AssertionError("the cached evaluator should have been loaded, not retrained")

    monkeypatch.setattr(evr, "train_evaluator", no_training)
    started = time.monotonic()
    rng = torch.random.get_rng_state()
    again, again_info = evr.load_or_train_evaluator(real, cache_dir, log=None)
    assert time.monotonic() - started < 10
    # A training run draws the same random numbers whether its evaluator came from the cache or was trained.
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert again_info.heldout_accuracy == info.heldout_accuracy
    assert evr.weights_sha256(again) == evr.weights_sha256(model)
    assert not again.training


def test_evaluator_training_is_deterministic(real) -> None:
    rng = torch.random.get_rng_state()
    a, info_a = evr.train_evaluator(real, seed=3, epochs=1, max_train=512)
    assert torch.equal(torch.random.get_rng_state(), rng)
    b, info_b = evr.train_evaluator(real, seed=3, epochs=1, max_train=512)
    assert evr.weights_sha256(a) == evr.weights_sha256(b)
    assert info_a.heldout_accuracy == info_b.heldout_accuracy
    assert info_a.n_train == 512 and info_a.n_heldout == 1000


def test_mlp_evaluator_is_a_second_independent_opinion(real, mnist, halves, cache_dir: Path, tmp_path: Path) -> None:
    """`--evaluator mlp`: another architecture (no convolution) with its own cache files and card; its
    feature space also puts real close to real and noise far away."""
    model, info = evr.load_or_train_evaluator(real, cache_dir, log=None, kind="mlp")
    assert model.kind == "mlp" and model.feature_dim == 256
    assert not any(isinstance(m, nn.Conv2d) for m in model.modules())
    assert info.arch == evr.EVALUATORS["mlp"].arch != evr.ARCH
    assert info.heldout_accuracy >= 0.95, info
    path = evr.evaluator_path(cache_dir, "mnist", info.data_sha256, "mlp")
    assert path.name.startswith("evaluator-mlp-mnist-") and path.is_file()
    assert path != evr.evaluator_path(cache_dir, "mnist", info.data_sha256)
    again, _ = evr.load_evaluator(path)  # the card says which network to build
    assert again.kind == "mlp" and evr.weights_sha256(again) == evr.weights_sha256(model)

    stats = em.load_or_compute_real_stats(model, real, cache_dir)
    assert stats.mu.shape == (256,)
    assert em.real_stats_path(cache_dir, "mnist", info.data_sha256, "mlp").is_file()
    feats, probs = em.extract_features(model, mnist[0])
    mu, sigma = em.feature_stats(feats[halves[0]])
    real = em.compute_metrics(feats[halves[1]], probs[halves[1]], mu, sigma)
    noise = torch.randint(0, 256, (2000, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    far = ev.evaluate_samples(model, noise, em.RealStats(mu=mu, sigma=sigma, n=5000))
    print(f"mlp evaluator: real vs real {real}, noise {far}")
    assert real["eval/coverage"] == 10 and far["eval/fid"] > 50 * real["eval/fid"]


def test_unknown_evaluator_kind_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"eval\.evaluator: .vit. is not allowed; choose one of cnn, mlp"):
        evr.MnistEvaluator("vit")
    card = tmp_path / "e.json"
    info = evr.EvaluatorInfo("mnist", "test", "0" * 64, 1, 1, "x", 0.5, 0, 1, 1.0, "t", arch="mnist-vit-v9")
    card.write_text(info.to_json())
    with pytest.raises(DataError, match="mnist-vit-v9"):
        evr.load_evaluator(card.with_suffix(".safetensors"))


def test_a_new_evaluator_is_a_declaration_and_a_registration(tmp_path: Path, monkeypatch) -> None:
    """What adding an evaluator kind takes: its name in choices.py and one `EVALUATORS` entry; the config, the
    network, the cache's file names and the card's architecture tag all follow from them."""
    from gan_ddp import choices
    from gan_ddp.config import load_config

    tiny = evr.EvaluatorKind("mnist-tiny-f16-v1", 16, lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 16)), "tiny-")
    monkeypatch.setitem(choices.EVALUATORS._specs, "tiny", None)
    monkeypatch.setitem(evr.EVALUATORS._entries, "tiny", tiny)
    assert load_config(None, ["eval.evaluator=tiny"]).eval.evaluator == "tiny"
    model = evr.MnistEvaluator("tiny")
    assert model.feature_dim == 16 and model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert (
        evr.evaluator_path(tmp_path, "mnist", "ab" * 32, "tiny").name == f"evaluator-tiny-mnist-{'ab' * 6}.safetensors"
    )
    info = evr.EvaluatorInfo("mnist", "test", "ab" * 32, 1, 1, "x", 0.5, 0, 1, 1.0, "t", arch=tiny.arch)
    path = tmp_path / "evaluator-tiny.safetensors"
    evr.save_evaluator(model, info, path)
    again, _ = evr.load_evaluator(path)  # the card's tag picks the kind
    assert again.kind == "tiny" and evr.weights_sha256(again) == evr.weights_sha256(model)


# ------------------------------------------------------------------------------ metrics on real data
def test_real_vs_real_is_small_and_covers_all_classes(real_features, halves, stats_a) -> None:
    feats, probs = real_features
    metrics = em.compute_metrics(feats[halves[1]], probs[halves[1]], stats_a.mu, stats_a.sigma, feats[halves[0]])
    print(f"real vs real (two halves of t10k): {metrics}")
    assert set(metrics) == set(ev.METRIC_KEYS)
    assert 0 < metrics["eval/fid"] < REAL_VS_REAL_MAX
    assert abs(metrics["eval/kid"]) < 3 * metrics["eval/kid_std"] + 1e-4  # unbiased: about 0
    assert metrics["eval/precision"] > 0.6 and metrics["eval/recall"] > 0.6  # k = 3 on 5,000 points
    assert metrics["eval/coverage"] == 10
    assert metrics["eval/class_entropy"] > 0.99 * LN10
    assert metrics["eval/confidence"] > 0.9
    assert metrics["eval/n"] == 5000
    without = em.compute_metrics(feats[halves[1]], probs[halves[1]], stats_a.mu, stats_a.sigma)
    assert set(without) == set(ev.METRIC_KEYS) - {"eval/kid", "eval/kid_std", "eval/precision", "eval/recall"}


def test_uniform_noise_is_far(evaluator, real_features, halves, stats_a) -> None:
    noise = torch.randint(0, 256, (2000, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    metrics = ev.evaluate_samples(evaluator, noise, stats_a)
    real = em.compute_metrics(real_features[0][halves[1]], real_features[1][halves[1]], stats_a.mu, stats_a.sigma)
    print(f"uniform noise: {metrics}")
    assert metrics["eval/fid"] > 50 * real["eval/fid"]
    assert metrics["eval/fid"] > 10 * REAL_VS_REAL_MAX
    # Real vs real: KID -0.07 +- 1.8 (features are ReLU activations of a few units each, so the cubic kernel
    # makes KID large in absolute terms); noise: ~260 +- 10.
    assert metrics["eval/kid"] > 10 * metrics["eval/kid_std"] and metrics["eval/kid"] > 50
    # Noise covers none of the data. Its precision is NOT low (measured 0.99): the evaluator maps noise into
    # one confidently classified region that lies inside real images' k-NN balls. Precision is about where
    # samples lie in the feature space, so read it with recall, coverage and FID.
    assert metrics["eval/recall"] < 0.01


def test_one_repeated_real_image_is_precise_but_recalls_nothing(evaluator, mnist, stats_a, halves) -> None:
    """Precision asks whether samples look real, recall whether they cover the data: one real image, repeated,
    lies inside the real manifold (precision ~1) and covers almost none of it (recall ~0)."""
    one = mnist[0][halves[0][:1]].repeat(5000, 1, 1)  # an image of the half the statistics come from
    metrics = ev.evaluate_samples(evaluator, one, stats_a)
    print(f"one repeated real image: {metrics}")
    assert metrics["eval/precision"] > 0.99
    assert metrics["eval/recall"] < 0.01
    assert metrics["eval/coverage"] == 1


def test_one_repeated_class_collapses_coverage(evaluator, mnist, stats_a) -> None:
    images, labels = mnist
    ones = images[labels == 1]  # ~1135 images of the digit 1
    metrics = ev.evaluate_samples(evaluator, ones, stats_a)
    print(f"only 1s: {metrics}")
    assert metrics["eval/coverage"] == 1
    assert metrics["eval/class_entropy"] < 0.2
    assert metrics["eval/fid"] > 10 * REAL_VS_REAL_MAX


def test_real_stats_are_cached_per_data_and_evaluator(
    evaluator, real, real_features, mnist, cache_dir, tmp_path: Path, monkeypatch
) -> None:
    stats = em.load_or_compute_real_stats(evaluator, real, cache_dir)
    mu, sigma = em.feature_stats(real_features[0])
    np.testing.assert_allclose(stats.mu, mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats.sigma, sigma, rtol=1e-6, atol=1e-9)
    assert stats.n == 10000 and stats.data_sha256 == data_checksum(*mnist)
    torch.testing.assert_close(stats.features, real_features[0])  # for KID, precision/recall, per-class FID
    assert torch.equal(stats.labels, mnist[1].long())
    assert em.real_stats_path(cache_dir, "mnist", stats.data_sha256).is_file()

    with monkeypatch.context() as m:
        m.setattr(em, "extract_features", lambda *a, **k: pytest.fail("should load the cached statistics"))
        again = em.load_or_compute_real_stats(evaluator, real, cache_dir)
    np.testing.assert_array_equal(again.sigma, stats.sigma)
    assert torch.equal(again.features, stats.features) and torch.equal(again.labels, stats.labels)

    # A retrained evaluator must not reuse the statistics of the old one (a copy, to keep the shared cache).
    path = em.real_stats_path(cache_dir, "mnist", stats.data_sha256)
    (tmp_path / path.name).write_bytes(path.read_bytes())
    other = copy.deepcopy(evaluator)
    with torch.no_grad():
        other.body[-2].bias.add_(0.1)
    assert not np.allclose(em.load_or_compute_real_stats(other, real, tmp_path).mu, stats.mu)


def test_input_layouts_agree(evaluator, mnist) -> None:
    images = mnist[0][:64]  # (64, 28, 28) uint8
    ref = em.extract_features(evaluator, images)[0]
    nchw_float = images.unsqueeze(1).float() / 127.5 - 1
    for variant in (images.unsqueeze(1), images.unsqueeze(-1).numpy(), nchw_float):
        torch.testing.assert_close(em.extract_features(evaluator, variant)[0], ref)


# ------------------------------------------------------------------------------ Fréchet distance
def _random_stats(seed: int, dim: int = 32, n: int = 400, rank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(rank or dim, dim))
    x = rng.normal(size=(n, rank or dim)) @ mix + rng.normal(size=dim)
    return x.mean(0), np.cov(x, rowvar=False)


def test_fid_is_symmetric_nonnegative_and_zero_on_itself() -> None:
    a, b = _random_stats(0), _random_stats(1)
    ab, ba = em.frechet_distance(*a, *b), em.frechet_distance(*b, *a)
    assert ab > 0
    assert ab == pytest.approx(ba, rel=1e-9)
    assert em.frechet_distance(*a, *a) == pytest.approx(0.0, abs=1e-8 * np.trace(a[1]))
    assert em.frechet_distance(*a, *a) >= 0.0


def test_fid_of_rank_deficient_covariances_stays_finite_and_symmetric() -> None:
    # Dead ReLU units make real covariances singular; sqrtm of such products is where imaginary parts appear.
    a, b = _random_stats(2, rank=5), _random_stats(3, rank=7)
    ab, ba = em.frechet_distance(*a, *b), em.frechet_distance(*b, *a)
    assert math.isfinite(ab) and ab > 0
    assert ab == pytest.approx(ba, rel=1e-6)
    assert em.frechet_distance(*a, *a) == pytest.approx(0.0, abs=1e-6 * np.trace(a[1]))


def test_fid_falls_back_when_sqrtm_fails(monkeypatch) -> None:
    import scipy.linalg

    a, b = _random_stats(6), _random_stats(7)
    expected = em.frechet_distance(*a, *b)
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m: np.full_like(m, np.nan))
    assert em.frechet_distance(*a, *b) == pytest.approx(expected, rel=1e-9)


def test_fid_matches_closed_form_and_torchmetrics() -> None:
    # Diagonal covariances: Tr((S1 S2)^1/2) = sum sqrt(s1 s2).
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = 1 + 0 + 4 + (s1 + s2).sum() - 2 * np.sqrt(s1 * s2).sum()
    assert em.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)
    try:
        from torchmetrics.image.fid import _compute_fid
    except ImportError:  # private helper: only a cross-check
        return
    a, b = _random_stats(4), _random_stats(5)
    theirs = float(_compute_fid(*(torch.from_numpy(t) for t in (*a, *b))))
    assert em.frechet_distance(*a, *b) == pytest.approx(theirs, rel=1e-6)


def test_compute_metrics_counts() -> None:
    rng = np.random.default_rng(0)
    feats = torch.from_numpy(rng.normal(size=(1000, 4)))
    probs = torch.zeros(1000, 10)
    probs[:990, 3] = 0.9  # class 3 for 99%, class 7 for 1% (< 2%: not covered)
    probs[990:, 7] = 0.6
    mu, sigma = em.feature_stats(feats)
    m = em.compute_metrics(feats, probs, mu, sigma)
    assert m["eval/coverage"] == 1
    assert m["eval/class_entropy"] == pytest.approx(-(0.99 * math.log(0.99) + 0.01 * math.log(0.01)))
    assert m["eval/confidence"] == pytest.approx(0.99 * 0.9 + 0.01 * 0.6)
    assert m["eval/n"] == 1000
    assert m["eval/fid"] == pytest.approx(0.0, abs=1e-9)


# ------------------------------------------------------------------------------ .npz samples
def test_score_npz_matches_in_memory_scoring(evaluator, mnist, halves, stats_a, tmp_path: Path) -> None:
    images = mnist[0][halves[1][:1000]]
    path = tmp_path / "samples.npz"
    np.savez(path, images.unsqueeze(-1).numpy())  # what `gan-ddp sample --out x.npz` writes
    assert ev.score_npz(path, evaluator, stats_a) == pytest.approx(ev.evaluate_samples(evaluator, images, stats_a))


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((10, 28, 28), np.uint8),  # no channel axis
        np.zeros((10, 28, 28, 1), np.float32),  # wrong dtype
        np.zeros((10, 1, 28, 28), np.uint8),  # NCHW
        np.zeros((1, 28, 28, 1), np.uint8),  # too few for a covariance
    ],
)
def test_score_npz_rejects_wrong_arrays_in_one_line(array: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, array)
    with pytest.raises(DataError) as err:
        ev.score_npz(path, evr.MnistEvaluator(), em.RealStats(np.zeros(128), np.eye(128), 2))
    message = str(err.value)
    assert str(path) in message and "\n" not in message and "(N, 28, 28, 1)" in message


def test_score_npz_rejects_other_files(tmp_path: Path) -> None:
    stats = em.RealStats(np.zeros(128), np.eye(128), 2)
    named = tmp_path / "named.npz"
    np.savez(named, images=np.zeros((4, 28, 28, 1), np.uint8))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    for path, phrase in (
        (named, "no arr_0"),
        (garbage, "not a readable .npz"),
        (tmp_path / "missing.npz", "not a readable"),
    ):
        with pytest.raises(DataError, match=phrase) as err:
            ev.score_npz(path, evr.MnistEvaluator(), stats)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------ generation across processes
class TinyGenerator(nn.Module):
    """A deterministic stand-in for G: z (B, 8) -> (B, 1, 28, 28) in [-1, 1]."""

    def __init__(self, z_dim: int = 8) -> None:
        super().__init__()
        self.net = nn.Linear(z_dim, 784)
        with torch.no_grad():
            rng = torch.Generator().manual_seed(0)
            self.net.weight.copy_(torch.randn(784, z_dim, generator=rng) * 0.5)
            self.net.bias.copy_(torch.randn(784, generator=rng) * 0.5 - 0.5)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(z)).view(-1, 1, 28, 28)


class ThreadAccelerator:
    """The slice of Accelerate that evaluation uses, for W ranks simulated by W threads in this process."""

    def __init__(self, rank: int, world: int, shared: dict) -> None:
        self.process_index, self.num_processes = rank, world
        self.is_main_process = rank == 0
        self.device = torch.device("cpu")
        self.shared = shared

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.num_processes == 1:
            return tensor
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[self.process_index] = tensor
        barrier.wait()
        out = torch.cat(list(slots))
        barrier.wait()  # everyone has read before the next gather overwrites
        return out

    @contextlib.contextmanager
    def main_process_first(self):
        yield


def _run_ranks(world: int, fn) -> list:
    shared = {"slots": [None] * world, "barrier": threading.Barrier(world, timeout=120)}
    results: list = [None] * world
    errors: list = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(ThreadAccelerator(rank, world, shared))
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            shared["barrier"].abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_generate_features_does_not_depend_on_process_count() -> None:
    torch.manual_seed(0)
    evaluator = evr.MnistEvaluator().eval()  # untrained is fine: this is about which samples get scored
    G = TinyGenerator()
    n, batch = 1001, 100  # 11 chunks, the last one short: uneven over 2 and 3 ranks

    def score(acc):
        return ev.generate_features(acc, copy.deepcopy(G), evaluator, n, 8, seed=5, batch=batch)

    (one,) = _run_ranks(1, score)
    assert one[0].shape == (n, evr.FEATURE_DIM) and one[1].shape == (n, 10)
    # Sample i is exactly the one built from its chunk's noise, in global order.
    chunk, offset = divmod(637, batch)
    with torch.no_grad():
        expected = evaluator.features(G(ev.chunk_noise(5, chunk, batch, 8)))[offset]
    torch.testing.assert_close(one[0][637], expected)
    for world in (2, 3):
        for rank_result in _run_ranks(world, score):
            torch.testing.assert_close(rank_result[0], one[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(rank_result[1], one[1], rtol=0, atol=1e-6)


def test_generate_features_refuses_generators_that_differ_between_ranks() -> None:
    evaluator = evr.MnistEvaluator().eval()

    def score(acc):
        G = TinyGenerator()
        if acc.process_index == 1:
            with torch.no_grad():
                G.net.bias.add_(1e-3)
        return ev.generate_features(acc, G, evaluator, 10, 8, seed=0)

    with pytest.raises(RuntimeError, match=r"net\.bias differs between rank 0 and rank 1"):
        _run_ranks(2, score)


def test_generate_features_restores_train_mode_and_leaves_global_rng_alone() -> None:
    G = TinyGenerator().train()
    evaluator = evr.MnistEvaluator()
    rng = torch.random.get_rng_state()
    _run_ranks(1, lambda acc: ev.generate_features(acc, G, evaluator, 3, 8, seed=0))
    assert G.training
    assert torch.equal(torch.random.get_rng_state(), rng)  # a periodic eval must not change training noise


SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from accelerate import Accelerator
    from torch import nn

    from gan_ddp.evaluation import eval_metrics as em
    from gan_ddp.evaluation import evaluate as ev
    from gan_ddp.evaluation import evaluator as evr

    class TinyGenerator(nn.Module):
        def __init__(self, z_dim=8):
            super().__init__()
            self.net = nn.Linear(z_dim, 784)
            with torch.no_grad():
                rng = torch.Generator().manual_seed(0)
                self.net.weight.copy_(torch.randn(784, z_dim, generator=rng) * 0.5)
                self.net.bias.copy_(torch.randn(784, generator=rng) * 0.5 - 0.5)

        def forward(self, z):
            return torch.tanh(self.net(z)).view(-1, 1, 28, 28)

    evaluator_file, stats_file, out = sys.argv[1:4]
    acc = Accelerator(cpu=True)
    evaluator, _ = evr.load_evaluator(evaluator_file)
    saved = np.load(stats_file)
    stats = em.RealStats(mu=saved["mu"], sigma=saved["sigma"], n=int(saved["n"]))
    G = TinyGenerator()
    feats, probs = ev.generate_features(acc, G, evaluator, 1001, 8, seed=7, batch=100)
    metrics = ev.score_generator(acc, G, evaluator, stats, 1001, 8, seed=7, batch=100)
    if acc.is_main_process:
        np.save(out + ".npy", feats.numpy())
        json.dump({"world": acc.num_processes, "metrics": metrics, "rows": feats.shape[0]}, open(out, "w"))
    acc.wait_for_everyone()
    """
)


@pytest.mark.multiprocess
def test_two_processes_score_like_one(trained, cache_dir: Path, stats_a, tmp_path: Path) -> None:
    _, info, _ = trained
    script = tmp_path / "score.py"
    script.write_text(SCRIPT)
    stats_file = tmp_path / "stats.npz"
    np.savez(stats_file, mu=stats_a.mu, sigma=stats_a.sigma, n=stats_a.n)
    evaluator_file = evr.evaluator_path(cache_dir, "mnist", info.data_sha256)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", *ONE_MACHINE, "--nproc_per_node", str(world)]
        cmd += [str(script), str(evaluator_file), str(stats_file), str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[world] = json.loads(out.read_text()), np.load(str(out) + ".npy")
    (one, feats_one), (two, feats_two) = results[1], results[2]
    assert (one["world"], two["world"]) == (1, 2)
    assert one["rows"] == two["rows"] == 1001
    assert one["metrics"]["eval/n"] == two["metrics"]["eval/n"] == 1001
    np.testing.assert_allclose(feats_two, feats_one, rtol=0, atol=1e-5)
    assert two["metrics"]["eval/fid"] == pytest.approx(one["metrics"]["eval/fid"], rel=1e-6)
    for key in ("eval/coverage", "eval/class_entropy", "eval/confidence"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-6)


# ------------------------------------------------------------------------------ CLI functions
def _parse(argv: list[str]) -> argparse.Namespace:
    from gan_ddp.commands.cli import build_parser

    return build_parser().parse_args(argv)


def test_eval_parser_wants_exactly_one_source(tmp_path: Path) -> None:
    args = _parse(["eval", "--run", str(tmp_path), "--n", "100", "--no-ema"])
    assert (args.run, args.samples, args.n, args.no_ema, args.seed) == (tmp_path, None, 100, True, 0)
    assert (args.dataset, args.root, args.split) == (None, None, None)
    # Long aliases, for torchrun's argparse which rejects --run and --n as ambiguous abbreviations.
    aliased = _parse(["eval", "--run-dir", str(tmp_path), "--num-samples", "100"])
    assert (aliased.run, aliased.n) == (tmp_path, 100)
    with pytest.raises(SystemExit):
        _parse(["eval"])
    with pytest.raises(SystemExit):
        _parse(["eval", "--run", "r", "--samples", "s.npz"])


def test_cli_functions(trained, cache_dir: Path, mnist, tmp_path: Path, capsys, monkeypatch) -> None:
    common = ["--dataset", "mnist", "--root", str(REAL_MNIST), "--split", "test", "--cache-dir", str(cache_dir)]
    monkeypatch.setattr(evr, "train_evaluator", lambda *a, **k: pytest.fail("should load the cached evaluator"))
    assert ev.run_train_evaluator(_parse(["train-evaluator", *common])) == 0
    assert "held-out accuracy" in capsys.readouterr().out

    samples = tmp_path / "s.npz"
    np.savez(samples, mnist[0][:500].unsqueeze(-1).numpy())
    out = tmp_path / "m.json"
    assert ev.run_eval(_parse(["eval", "--samples", str(samples), *common, "--json", str(out)])) == 0
    printed = capsys.readouterr().out
    assert "fid" in printed and "coverage" in printed
    written = json.loads(out.read_text())
    assert written["eval/n"] == 500 and written["eval/coverage"] == 10
    assert written["evaluator"] == evr.ARCH


def test_run_eval_from_a_run(trained, cache_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import gan_ddp.components.rundir
    import gan_ddp.runtime.distributed

    cfg = argparse.Namespace(
        data=argparse.Namespace(dataset="mnist", root=str(REAL_MNIST), split="test"),
        model=argparse.Namespace(z_dim=8, conditional=False),
    )
    monkeypatch.setattr(
        gan_ddp.components.rundir, "load_generator_from_run", lambda run, ckpt, use_ema: (TinyGenerator(), cfg, run)
    )
    monkeypatch.setattr(gan_ddp.runtime.distributed, "make_accelerator", lambda precision: ThreadAccelerator(0, 1, {}))
    out = tmp_path / "m.json"
    args = _parse(["eval", "--run", str(tmp_path), "--n", "300", "--cache-dir", str(cache_dir), "--json", str(out)])
    assert ev.run_eval(args) == 0
    assert "eval" in capsys.readouterr().out
    assert json.loads(out.read_text())["eval/n"] == 300


def test_training_logs_periodic_evaluations(trained, cache_dir: Path, tmp_path: Path) -> None:
    from _runs import metric_lines, train_inproc

    overrides = ("train.steps=6", "log.every=3", "eval.every=3", "eval.n=600", f"eval.cache_dir={cache_dir}")
    assert train_inproc(tmp_path / "run", *overrides) == 0
    evals = [m for m in metric_lines(tmp_path / "run") if "eval/fid" in m]
    assert [m["step"] for m in evals] == [3, 6]
    for m in evals:
        assert m["eval/n"] == 600 and np.isfinite(m["eval/fid"]) and m["eval/fid"] >= 0
        assert 0 <= m["eval/coverage"] <= 10 and 0 < m["eval/confidence"] <= 1


def test_eval_all_checkpoints_gives_the_curve_of_a_run(trained, cache_dir: Path, tmp_path: Path, capsys) -> None:
    """`eval --run DIR --all-checkpoints`: one row per kept checkpoint, oldest first, with the run's training
    time at that checkpoint; the newest row equals a plain `eval --run` of the newest checkpoint."""
    from _runs import train_inproc

    run = tmp_path / "run"
    assert train_inproc(run, "train.steps=12", "checkpoint.every=4", "checkpoint.keep=10") == 0
    common = ["--run", str(run), "--n", "400", "--cache-dir", str(cache_dir)]
    curve, last = tmp_path / "curve.json", tmp_path / "last.json"
    assert ev.run_eval(_parse(["eval", *common, "--all-checkpoints", "--json", str(curve)])) == 0
    assert "time_s" in capsys.readouterr().out
    rows = json.loads(curve.read_text())["rows"]
    assert [r["step"] for r in rows] == [4, 8, 12]
    times = [r["time_s"] for r in rows]
    assert times == sorted(times) and times[0] > 0
    assert ev.run_eval(_parse(["eval", *common, "--json", str(last)])) == 0
    assert rows[-1]["eval/fid"] == json.loads(last.read_text())["eval/fid"]
    with pytest.raises(ValueError, match="--all-checkpoints"):
        ev.run_eval(_parse(["eval", *common, "--all-checkpoints", "--checkpoint", str(run)]))


# ------------------------------------------------------------------------------ conditional metrics
def test_conditional_metrics_of_real_images_asked_for_their_own_labels(real_features, mnist, halves, stats_a) -> None:
    """An oracle "generator" that returns real images of the requested class: agreement is the evaluator's
    accuracy and per-class FIDs are small; asking for the wrong classes makes agreement ~0."""
    feats, probs = real_features
    labels = mnist[1][halves[1]]
    real_feats, real_labels = feats[halves[0]], mnist[1][halves[0]]
    metrics = em.compute_metrics(
        feats[halves[1]], probs[halves[1]], stats_a.mu, stats_a.sigma, real_feats, real_labels, requested=labels
    )
    print(f"real images, asked for their labels: {em.summary_line(metrics)}")
    assert metrics["eval/agreement"] > 0.95 and metrics["eval/agreement_min"] > 0.85
    assert {f"eval/fid_class/{c}" for c in range(10)} <= set(metrics)
    assert {f"eval/agreement_class/{c}" for c in range(10)} <= set(metrics)
    assert 0 < metrics["eval/fid_class_mean"] < 4 * REAL_VS_REAL_MAX  # ~500 images a class: noisier than FID
    wrong = em.compute_metrics(
        feats[halves[1]], probs[halves[1]], stats_a.mu, stats_a.sigma, real_feats, real_labels, (labels + 1) % 10
    )
    assert wrong["eval/agreement"] < 0.05
    assert wrong["eval/fid_class_mean"] > 5 * metrics["eval/fid_class_mean"]


def test_score_generator_asks_a_conditional_generator_for_every_class() -> None:
    class Echo(nn.Module):
        """Writes its label into the image: the 'evaluator' below reads it back."""

        conditional = True

        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return (y.float() / 10).view(-1, 1, 1, 1).expand(-1, 1, 28, 28) + 0 * self.w

    seen = []

    class Reader(evr.MnistEvaluator):
        def features(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((x[:, 0, 0, 0] * 10).round().long())
            return super().features(x)

    accelerator = ThreadAccelerator(0, 1, {})
    ev.generate_features(accelerator, Echo(), Reader(), 25, 8, seed=0, batch=10, conditional=True)
    assert torch.cat(seen).tolist() == ev.balanced_labels(25).tolist()
