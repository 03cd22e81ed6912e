"""The ``eval/*`` metrics of generated samples, in the feature space of the evaluator (`gan_ddp.evaluation.evaluator`).

- ``eval/fid``: Fréchet distance between Gaussians fitted to real and generated features (lower is
  better; real vs real of the same data gives a small positive number because of sampling noise),
- ``eval/coverage``: how many of the 10 classes receive at least 2% of the samples (mode collapse),
- ``eval/class_entropy``: entropy (nats) of the predicted-class histogram; ln 10 = 2.303 is uniform,
- ``eval/confidence``: mean max softmax probability (blurry, ambiguous digits score low),
- ``eval/kid``, ``eval/kid_std``: kernel distance (unbiased MMD^2, cubic kernel), mean and std over subsets,
- ``eval/precision``, ``eval/recall``: improved precision and recall (k = 3 nearest-neighbour manifolds),
- ``eval/n``: number of samples scored;
- class-conditional generators only, where sample i is asked for class i mod 10: ``eval/agreement`` (share of
  samples the evaluator classifies as the requested class), ``eval/agreement_min`` (the worst class's),
  ``eval/fid_class_mean`` (mean over classes of the FID between the samples asked for class c and the real
  images of class c) and ``eval/fid_class/<c>``, ``eval/agreement_class/<c>`` per class.

KID and precision/recall come from `gan_ddp.evaluation.fidelity` (torch-fidelity's maths on our features). The real
side (`RealStats`) is computed once per evaluator and data and cached beside the evaluator. A new metric of
samples is one more entry in `compute_metrics` (and `METRIC_KEYS` for the tables).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gan_ddp.components.models import N_CLASSES
from gan_ddp.evaluation.evaluator import (
    MnistEvaluator,
    RealData,
    as_model_input,
    cache_path,
    default_cache_dir,
    weights_sha256,
)
from gan_ddp.runtime.fsutil import atomic_write

COVERAGE_MIN_SHARE = 0.02  # a class counts as covered when it gets at least 2% of the samples
METRIC_KEYS = (
    "eval/fid",
    "eval/kid",
    "eval/kid_std",
    "eval/precision",
    "eval/recall",
    "eval/coverage",
    "eval/class_entropy",
    "eval/confidence",
    "eval/n",
)
CONDITIONAL_KEYS = ("eval/agreement", "eval/agreement_min", "eval/fid_class_mean")
REAL_STATS_LAYOUT = "2"  # 2: the cache file also holds every real feature vector and label (KID, P/R, per class)


@dataclass
class RealStats:
    """Mean and covariance (float64) of evaluator features over a real data split, and (for KID, precision and
    recall, and per-class FID) the features themselves with the images' labels."""

    mu: np.ndarray  # (F,)
    sigma: np.ndarray  # (F, F)
    n: int
    dataset: str = ""
    split: str = ""
    data_sha256: str = ""
    features: Tensor | None = None  # (n, F) float32
    labels: Tensor | None = None  # (n,) int64


# ------------------------------------------------------------------------------ features and statistics
@torch.no_grad()
def extract_features(evaluator: MnistEvaluator, images: Tensor | np.ndarray, batch: int = 500) -> tuple[Tensor, Tensor]:
    """(features (N, F) float32, class probabilities (N, 10)) on CPU, for uint8 or [-1, 1] float images."""
    evaluator.eval()
    device = next(evaluator.parameters()).device
    feats, probs = [], []
    for start in range(0, len(images), batch):
        f = evaluator.features(as_model_input(images[start : start + batch], device))
        feats.append(f.float().cpu())
        probs.append(evaluator.head(f).float().softmax(1).cpu())
    if not feats:
        return torch.zeros(0, evaluator.feature_dim), torch.zeros(0, N_CLASSES)
    return torch.cat(feats), torch.cat(probs)


def feature_stats(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (F,) and unbiased covariance (F, F) in float64."""
    f = np.asarray(torch.as_tensor(features).double().cpu().numpy())
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features (N >= 2, F) for a covariance, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def real_stats_path(cache_dir: str | Path, dataset: str, checksum: str, kind: str = "cnn") -> Path:
    return cache_path(cache_dir, "realstats", dataset, checksum, kind)


def load_or_compute_real_stats(
    evaluator: MnistEvaluator, real: RealData, cache_dir: str | Path | None = None
) -> RealStats:
    """Feature mean/covariance of the real images, cached beside the evaluator.

    Keyed by the data checksum in the file name and by the evaluator's weight digest in its metadata, so
    a retrained evaluator or different data never reuses stale statistics.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    checksum = real.sha256
    path = real_stats_path(cache_dir or default_cache_dir(), real.dataset, checksum, evaluator.kind)
    evaluator_digest = weights_sha256(evaluator)
    if path.is_file():
        with contextlib.suppress(Exception), safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if (
                meta.get("evaluator_sha256") == evaluator_digest
                and meta.get("data_sha256") == checksum
                and meta.get("layout") == REAL_STATS_LAYOUT
            ):
                return RealStats(
                    mu=f.get_tensor("mu").numpy(),
                    sigma=f.get_tensor("sigma").numpy(),
                    n=int(meta["n"]),
                    dataset=real.dataset,
                    split=real.split,
                    data_sha256=checksum,
                    features=f.get_tensor("features"),
                    labels=f.get_tensor("labels"),
                )
    features, _ = extract_features(evaluator, real.images)
    mu, sigma = feature_stats(features)
    meta = {
        "evaluator_sha256": evaluator_digest,
        "data_sha256": checksum,
        "n": str(len(real.labels)),
        "split": real.split,
        "layout": REAL_STATS_LAYOUT,
    }
    labels = real.labels.long().contiguous()
    tensors = {"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma), "features": features, "labels": labels}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return RealStats(
        mu=mu,
        sigma=sigma,
        n=len(labels),
        dataset=real.dataset,
        split=real.split,
        data_sha256=checksum,
        features=features,
        labels=labels,
    )


# ------------------------------------------------------------------------------ metrics
def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) in float64, clamped at 0.

    Computed here rather than with torchmetrics: its ``FrechetInceptionDistance(feature=module)`` does
    accept a custom 28x28 extractor in 1.9 (``num_features``/``input_img_size`` avoid the 299x299
    probe), but it only builds the real statistics from images fed through ``update`` on every use, its
    distance function is private (``_compute_fid``), and it syncs through raw ``torch.distributed``
    rather than Accelerate. We need cached real (mu, sigma) and features gathered by Accelerate.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    trace_sqrt = _trace_sqrt_product(sigma1, sigma2)
    fid = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    return max(fid, 0.0)  # tiny negatives are rounding (fid(a, a) = 0 up to ~1e-10)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^1/2) for covariance matrices, via scipy.linalg.sqrtm (the usual FID recipe).

    The product of two PSD matrices has real non-negative eigenvalues, so any imaginary part of sqrtm's
    result is rounding; it is dropped when small. With near-singular covariances (dead ReLU units, e.g.
    for noise images) sqrtm can go unstable; then the equivalent symmetric form
    Tr((S1^1/2 S2 S1^1/2)^1/2), from eigenvalues of a symmetric PSD matrix, is used instead.
    """
    import scipy.linalg

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # Singular covariances are the norm here (dead ReLU units); the result is checked below.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    covmean = np.asarray(covmean)
    trace = np.trace(covmean)
    scale = max(1.0, float(np.trace(sigma1) + np.trace(sigma2)))
    if np.isfinite(covmean).all() and abs(np.imag(trace)) <= 1e-6 * scale:
        return float(np.real(trace))
    w1, v1 = np.linalg.eigh(sigma1)
    root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T  # S1^1/2
    inner = root1 @ sigma2 @ root1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum())


def compute_metrics(
    gen_features: Tensor | np.ndarray,
    gen_probs: Tensor | np.ndarray,
    real_mu: np.ndarray,
    real_sigma: np.ndarray,
    real_features: Tensor | None = None,
    real_labels: Tensor | None = None,
    requested: Tensor | None = None,
) -> dict[str, float | int]:
    """The ``eval/*`` metrics of generated samples from their features (N, F) and class probabilities (N, 10).

    With ``real_features`` (n, F) also KID and precision/recall; with ``requested`` (N,), the classes a
    conditional generator was asked for, and ``real_labels`` (n,), also agreement and per-class FID."""
    from gan_ddp.evaluation import fidelity

    probs = torch.as_tensor(gen_probs).double().cpu()
    mu, sigma = feature_stats(gen_features)
    n = int(probs.shape[0])
    predicted = probs.argmax(1)
    counts = torch.bincount(predicted, minlength=N_CLASSES).double()
    share = counts / n
    nonzero = share[share > 0]
    metrics: dict[str, float | int] = {"eval/fid": frechet_distance(mu, sigma, real_mu, real_sigma)}
    if real_features is not None:
        gen = torch.as_tensor(gen_features).float().cpu()
        metrics["eval/kid"], metrics["eval/kid_std"] = fidelity.kid(real_features, gen)
        metrics["eval/precision"], metrics["eval/recall"] = fidelity.precision_recall(real_features, gen)
    metrics |= {
        "eval/coverage": int((share >= COVERAGE_MIN_SHARE).sum()),
        "eval/class_entropy": float(-(nonzero * nonzero.log()).sum()) + 0.0,  # + 0.0: no -0.0 for one class
        "eval/confidence": float(probs.max(1).values.mean()),
        "eval/n": n,
    }
    if requested is not None:
        metrics |= conditional_metrics(gen_features, predicted, requested, real_features, real_labels)
    return metrics


def conditional_metrics(
    gen_features: Tensor | np.ndarray,
    predicted: Tensor,
    requested: Tensor,
    real_features: Tensor | None,
    real_labels: Tensor | None,
) -> dict[str, float]:
    """Agreement (predicted class == requested class), overall, worst class and per class; with the real
    features and labels also the FID of each class's samples against the real images of that class."""
    requested = torch.as_tensor(requested).long().cpu()
    if requested.shape != predicted.shape:
        raise ValueError(f"{requested.numel()} requested labels for {predicted.numel()} samples")
    hit = (predicted.cpu() == requested).double()
    out: dict[str, float] = {"eval/agreement": float(hit.mean())}
    per_class = {c: float(hit[requested == c].mean()) for c in range(N_CLASSES) if bool((requested == c).any())}
    out["eval/agreement_min"] = min(per_class.values())
    out |= {f"eval/agreement_class/{c}": v for c, v in per_class.items()}
    if real_features is not None and real_labels is not None:
        gen = torch.as_tensor(gen_features).double().cpu()
        real, labels = torch.as_tensor(real_features).double().cpu(), torch.as_tensor(real_labels).cpu()
        fids = {}
        for c in per_class:
            mine, theirs = gen[requested == c], real[labels == c]
            if mine.shape[0] >= 2 and theirs.shape[0] >= 2:
                fids[c] = frechet_distance(*feature_stats(mine), *feature_stats(theirs))
        if fids:
            out["eval/fid_class_mean"] = float(np.mean(list(fids.values())))
            out |= {f"eval/fid_class/{c}": v for c, v in fids.items()}
    return out


def metrics_against(
    features: Tensor, probs: Tensor, real_stats: RealStats, requested: Tensor | None = None
) -> dict[str, float | int]:
    """`compute_metrics` against everything `real_stats` holds."""
    return compute_metrics(
        features, probs, real_stats.mu, real_stats.sigma, real_stats.features, real_stats.labels, requested
    )


def summary_line(metrics: dict[str, Any]) -> str:
    """The headline numbers of one evaluation, on one line."""
    parts = [f"FID {metrics['eval/fid']:.2f}"]
    if "eval/kid" in metrics:
        parts.append(f"KID {metrics['eval/kid']:.4f}±{metrics['eval/kid_std']:.4f}")
        parts.append(f"precision {metrics['eval/precision']:.3f}  recall {metrics['eval/recall']:.3f}")
    parts.append(f"coverage {metrics['eval/coverage']}/10  confidence {metrics['eval/confidence']:.3f}")
    if "eval/agreement" in metrics:
        parts.append(f"agreement {metrics['eval/agreement']:.3f} (worst class {metrics['eval/agreement_min']:.3f})")
    if "eval/fid_class_mean" in metrics:
        parts.append(f"per-class FID {metrics['eval/fid_class_mean']:.2f}")
    return "  ".join(parts)
