"""KID and improved precision/recall on synthetic features (tests/test_evaluate.py repeats the key cases in
the real evaluator's feature space)."""

from __future__ import annotations

import pytest
import torch

from gan_ddp import config
from gan_ddp.evaluation import fidelity


def gaussian(n: int, seed: int, shift: float = 0.0, dim: int = 16) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) + shift


def test_kid_is_about_zero_for_one_distribution_and_large_for_another() -> None:
    same_mean, same_std = fidelity.kid(gaussian(2000, 0), gaussian(2000, 1), subsets=20, subset_size=500)
    far_mean, far_std = fidelity.kid(gaussian(2000, 0), gaussian(2000, 1, shift=1.0), subsets=20, subset_size=500)
    assert abs(same_mean) < 3 * same_std + 1e-3  # unbiased: centred on 0, may be slightly negative
    assert far_mean > 50 * abs(same_mean) and far_mean > 10 * far_std


def test_kid_is_reproducible_and_cuts_the_subset_size_to_the_data() -> None:
    a, b = gaussian(300, 0), gaussian(200, 1, shift=0.5)
    assert fidelity.kid(a, b, subsets=5, seed=3) == fidelity.kid(a, b, subsets=5, seed=3)
    assert fidelity.kid(a, b, subsets=5)[0] > 0  # subset size 1000 > 200 samples: cut to 200, no error


def test_precision_recall_of_one_distribution_is_about_one() -> None:
    # Low dimension: with k = 3, a few thousand points fill a 4-d manifold well (in 16-d, precision is ~0.8:
    # the estimator is conservative when the sample is sparse for its dimension).
    precision, recall = fidelity.precision_recall(gaussian(2000, 0, dim=4), gaussian(2000, 1, dim=4))
    assert precision > 0.9 and recall > 0.9


def test_one_repeated_real_sample_is_precise_but_covers_nothing() -> None:
    real = gaussian(2000, 0)
    precision, recall = fidelity.precision_recall(real, real[5:6].repeat(2000, 1))
    assert precision == pytest.approx(1.0)  # it lies in the real manifold
    assert recall < 0.01  # its own manifold is one point: almost no real sample falls inside


def test_far_samples_have_neither() -> None:
    precision, recall = fidelity.precision_recall(gaussian(1000, 0), gaussian(1000, 1, shift=10.0))
    assert precision == 0.0 and recall == 0.0


def test_bad_shapes_are_one_clear_error() -> None:
    with pytest.raises(ValueError, match="need features"):
        fidelity.kid(torch.zeros(10, 3), torch.zeros(10, 4))
    with pytest.raises(ValueError, match="at least 4 samples"):
        fidelity.precision_recall(torch.zeros(3, 2), torch.zeros(10, 2))


def test_the_config_refuses_what_precision_and_recall_cannot_score() -> None:
    """config.py sits below the evaluation layer, so it declares the bound itself: the two must agree."""
    assert config.MIN_EVAL_SAMPLES == fidelity.MIN_SAMPLES == fidelity.PR_NEIGHBOURS + 1


@pytest.mark.parametrize(("n_real", "n_fake", "size", "seed"), [(1200, 1000, 500, 0), (300, 200, 1000, 7)])
def test_kid_equals_torch_fidelitys(n_real: int, n_fake: int, size: int, seed: int) -> None:
    """`fidelity.kid` writes out torch-fidelity's KID (for speed): same subsets, kernel and estimate, same numbers."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    real, fake = gaussian(n_real, 0).abs(), gaussian(n_fake, 1, shift=0.3).abs()  # ReLU-like, as the evaluators'
    ours = fidelity.kid(real, fake, subsets=8, subset_size=size, seed=seed)
    reference = kid_features_to_metric(
        real.double(),
        fake.double(),
        kid_subsets=8,
        kid_subset_size=min(size, n_real, n_fake),
        kid_kernel="poly",
        rng_seed=seed,
        verbose=False,
    )
    assert ours == pytest.approx((reference[KEY_METRIC_KID_MEAN], reference[KEY_METRIC_KID_STD]), rel=1e-10, abs=0)


@pytest.mark.parametrize(("n", "dim", "shift"), [(2500, 8, 0.3), (300, 4, 0.0), (1000, 16, 0.6)])
def test_precision_recall_equal_torch_fidelitys(n: int, dim: int, shift: float) -> None:
    """`fidelity.precision_recall` writes out torch-fidelity's (import cost): the same numbers, blocks included."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    real, fake = gaussian(n, 0, dim=dim), gaussian(n, 1, shift=shift, dim=dim)
    ours = fidelity.precision_recall(real, fake)
    reference = prc_features_to_metric(  # generated first, real second: torch-fidelity's convention since 0.4
        fake, real, prc_neighborhood=fidelity.PR_NEIGHBOURS, prc_batch_size=fidelity.PR_BATCH, save_cpu_ram=True
    )
    assert ours == (reference[KEY_METRIC_PRECISION], reference[KEY_METRIC_RECALL])
    assert 0 < ours[0] < 1 and 0 < ours[1] < 1  # a case that can tell precision from recall


def test_scoring_does_not_import_torch_fidelity() -> None:
    """What `gan-ddp eval` computes needs neither torch-fidelity nor what it imports (torchvision's models,
    TorchDynamo): ~2 CPU-s of every evaluation process."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from gan_ddp.evaluation import eval_metrics as em\n"
        "f = torch.rand(300, 8); p = torch.softmax(torch.rand(300, 10), 1)\n"
        "mu, sigma = em.feature_stats(f[:150])\n"
        "m = em.compute_metrics(f[150:], p[150:], mu, sigma, f[:150])\n"
        "assert 'eval/kid' in m and 'eval/precision' in m\n"
        "print(sorted(x for x in ('torch_fidelity', 'torchvision.models') if x in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout
