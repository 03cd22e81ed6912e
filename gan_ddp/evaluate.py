"""Sample quality without Inception: a Fréchet distance in the feature space of a small MNIST classifier.

Inception FID needs downloaded weights and sees 28x28 digits upscaled to 299x299 RGB, which it was never
trained on. The MNIST practice is to train a classifier on the real digits and measure, in the space of
its penultimate features:

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

KID and precision/recall come from `gan_ddp.fidelity` (torch-fidelity's maths on our features).

Numbers are only comparable between runs scored with the same evaluator (same cached file) and the
same reference statistics: both are keyed by the sha256 of the data they come from.

The evaluator is trained once per dataset (``load_or_train_evaluator``) and cached under
``$GAN_DDP_CACHE`` or ``~/.cache/gan-ddp`` as safetensors plus a JSON card; the real statistics are
cached beside it. Generation for scoring is split over processes by global sample index, so every
process count gives the same samples, features and numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gan_ddp.data import DataError, data_checksum, default_root, find_split_files, load_arrays, normalize
from gan_ddp.models import balanced_labels

# Evaluator kinds and their architecture tags (bump a tag when its network or training recipe changes).
# "cnn" is the default; "mlp" shares no layer type with it, for a second, independent opinion.
EVALUATOR_ARCHS = {"cnn": "mnist-cnn-c32-c64-c128-f128-v1", "mlp": "mnist-mlp-h512-f256-v1"}
ARCH = EVALUATOR_ARCHS["cnn"]
N_CLASSES = 10
FEATURE_DIM = 128  # of the cnn evaluator; `MnistEvaluator.feature_dim` in general
COVERAGE_MIN_SHARE = 0.02  # a class counts as covered when it gets at least 2% of the samples
DEFAULT_EPOCHS = 8
HELDOUT_FRACTION = 0.1
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


def _check_kind(kind: str) -> str:
    if kind not in EVALUATOR_ARCHS:
        raise ValueError(f"unknown evaluator {kind!r}; expected one of {', '.join(EVALUATOR_ARCHS)}")
    return kind


# ------------------------------------------------------------------------------ network
class MnistEvaluator(nn.Module):
    """A classifier for (B, 1, 28, 28) images in [-1, 1]; its penultimate activations are the features.

    - ``kind="cnn"`` (default): conv32-pool-conv64-pool-conv128-pool -> 128-d feature -> 10 logits.
      Pooling after every conv keeps a training epoch on 9,000 images within seconds on two CPU cores.
    - ``kind="mlp"``: 784 -> 512 -> 256-d feature -> 10 logits, no convolution: a second evaluator that
      shares neither architecture nor weights with the first, to check that a ranking is not an artefact
      of one feature space.

    No BatchNorm: features of one image never depend on the rest of its batch.
    """

    def __init__(self, kind: str = "cnn") -> None:
        super().__init__()
        self.kind = _check_kind(kind)
        if kind == "cnn":
            self.feature_dim = FEATURE_DIM
            self.body = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),  # (B, 32, 14, 14)
                nn.Conv2d(32, 64, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),  # (B, 64, 7, 7)
                nn.Conv2d(64, 128, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),  # (B, 128, 3, 3)
                nn.Flatten(),
                nn.Linear(128 * 3 * 3, FEATURE_DIM),
                nn.ReLU(),  # the features: penultimate layer, after the ReLU
            )
        else:
            self.feature_dim = 256
            self.body = nn.Sequential(
                nn.Flatten(), nn.Linear(28 * 28, 512), nn.ReLU(), nn.Linear(512, self.feature_dim), nn.ReLU()
            )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(self.feature_dim, N_CLASSES)
        self.info: EvaluatorInfo | None = None  # the card, set when trained or loaded

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)  # (B, feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))  # (B, 10) logits


@dataclass
class EvaluatorInfo:
    """The JSON card stored beside the evaluator's weights."""

    dataset: str
    split: str
    data_sha256: str  # data_checksum of the whole `split` the evaluator is keyed by
    n_train: int
    n_heldout: int
    heldout: str  # where the held-out images come from
    heldout_accuracy: float
    seed: int
    epochs: int
    train_seconds: float
    torch_version: str
    arch: str = ARCH

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


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


# ------------------------------------------------------------------------------ cache
def default_cache_dir() -> Path:
    return Path(os.environ.get("GAN_DDP_CACHE") or Path.home() / ".cache" / "gan-ddp").expanduser()


def _kind_prefix(kind: str) -> str:
    return "" if _check_kind(kind) == "cnn" else f"{kind}-"


def evaluator_path(cache_dir: str | Path, dataset: str, checksum: str, kind: str = "cnn") -> Path:
    """``<cache_dir>/evaluator-[<kind>-]<dataset>-<checksum[:12]>.safetensors`` (card: same name, ``.json``)."""
    return Path(cache_dir) / f"evaluator-{_kind_prefix(kind)}{dataset}-{checksum[:12]}.safetensors"


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the state dict (names, shapes, bytes): ties cached real statistics to one evaluator."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary name and rename, so a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_evaluator(model: MnistEvaluator, info: EvaluatorInfo, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"arch": info.arch}))
    _atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(info.to_json()))


def load_evaluator(path: str | Path, device: str | torch.device = "cpu") -> tuple[MnistEvaluator, EvaluatorInfo]:
    """Load weights (safetensors: no pickle) and card; DataError naming the file if either is unusable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    card = path.with_suffix(".json")
    try:
        info = EvaluatorInfo(**json.loads(card.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"{card}: not a readable evaluator card ({' '.join(str(exc).split())})") from exc
    kinds = {arch: kind for kind, arch in EVALUATOR_ARCHS.items()}
    if info.arch not in kinds:
        known = ", ".join(repr(a) for a in kinds)
        raise DataError(f"{card}: evaluator architecture {info.arch!r}, this version knows {known}")
    model = MnistEvaluator(kinds[info.arch])
    try:
        model.load_state_dict(load_file(str(path)))
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise DataError(f"{path}: cannot load evaluator weights ({' '.join(str(exc).split())[:200]})") from exc
    model.info = info
    return model.to(device).eval(), info


# ------------------------------------------------------------------------------ training
def _random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by its own integer (dx, dy) in [-max_shift, max_shift], filling with -1 (black)."""
    b, _, h, w = x.shape  # (B, 1, 28, 28)
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    return padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)


def _split_for_training(
    dataset: str, root: str | Path, split: str, images: Tensor, labels: Tensor, seed: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, str]:
    """(train images, train labels, held-out images, held-out labels, description).

    split "train" or "all": train on the official train split and hold out the official test split when
    its files exist (for "all" they do: it is train then test). Otherwise (split "test", or "train"
    without test files): hold out a random 10% chosen by ``seed``.
    """
    if split in ("train", "all"):
        try:
            find_split_files(root, dataset, "test")
            has_test = True
        except DataError:
            has_test = False
        if has_test:
            if split == "all":
                n_train = load_arrays(dataset, root, "train", download=False)[1].shape[0]
                return images[:n_train], labels[:n_train], images[n_train:], labels[n_train:], "test split"
            test_images, test_labels = load_arrays(dataset, root, "test", download=False)
            return images, labels, test_images, test_labels, "test split"
    perm = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(seed))
    n_heldout = max(1, round(HELDOUT_FRACTION * labels.shape[0]))
    held, kept = perm[:n_heldout], perm[n_heldout:]
    return images[kept], labels[kept], images[held], labels[held], f"random {HELDOUT_FRACTION:.0%} of {split}"


@torch.no_grad()
def _accuracy(model: MnistEvaluator, images: Tensor, labels: Tensor, device: torch.device, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for start in range(0, labels.shape[0], batch):
        x = _as_model_input(images[start : start + batch], device)
        correct += int((model(x).argmax(1).cpu() == labels[start : start + batch]).sum())
    return correct / max(1, labels.shape[0])


def train_evaluator(
    dataset: str,
    root: str | Path,
    split: str,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    device: str | torch.device = "cpu",
    max_train: int | None = None,
    kind: str = "cnn",
) -> tuple[MnistEvaluator, EvaluatorInfo]:
    """Train the evaluator on the real images and labels of ``split``; deterministic given ``seed``.

    AdamW with a one-cycle learning rate, batch 128, random shifts of up to 2 pixels. ``max_train``
    caps the training images (tests). Returns the model in eval mode and its card (not yet cached).
    """
    started = time.monotonic()
    device = torch.device(device)
    images, labels = load_arrays(dataset, root, split, download=False)
    checksum = data_checksum(images, labels)
    x_train, y_train, x_held, y_held, heldout = _split_for_training(dataset, root, split, images, labels, seed)
    if max_train is not None:
        x_train, y_train = x_train[:max_train], y_train[:max_train]
    batch = 128
    steps_per_epoch = math.ceil(y_train.shape[0] / batch)
    # All randomness (init, dropout, order, shifts) comes from `seed`; the caller's RNG state is untouched.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = MnistEvaluator(kind).to(device)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
        for _ in range(epochs):
            model.train()
            order = torch.randperm(y_train.shape[0], generator=gen)
            for start in range(0, y_train.shape[0], batch):
                idx = order[start : start + batch]
                x = _random_shift(normalize(x_train[idx]).unsqueeze(1), 2, gen).to(device)
                loss = F.cross_entropy(model(x), y_train[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    accuracy = _accuracy(model, x_held, y_held, device)
    info = EvaluatorInfo(
        dataset=dataset,
        split=split,
        data_sha256=checksum,
        n_train=int(y_train.shape[0]),
        n_heldout=int(y_held.shape[0]),
        heldout=heldout,
        heldout_accuracy=round(accuracy, 6),
        seed=seed,
        epochs=epochs,
        train_seconds=round(time.monotonic() - started, 1),
        torch_version=torch.__version__,
        arch=EVALUATOR_ARCHS[kind],
    )
    model.info = info
    return model.eval(), info


def load_or_train_evaluator(
    dataset: str,
    root: str | Path,
    split: str,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    device: str | torch.device = "cpu",
    force: bool = False,
    log: Callable[[str], None] | None = print,
    kind: str = "cnn",
) -> tuple[MnistEvaluator, EvaluatorInfo]:
    """The cached evaluator for this data (keyed by its sha256), trained and cached on first use.

    In a distributed job call it inside ``accelerator.main_process_first()`` (``prepare_evaluation``
    does), so one process trains and the others load its file.
    """
    images, labels = load_arrays(dataset, root, split, download=False)
    checksum = data_checksum(images, labels)
    path = evaluator_path(cache_dir or default_cache_dir(), dataset, checksum, kind)
    if path.is_file() and path.with_suffix(".json").is_file() and not force:
        return load_evaluator(path, device)
    if log:
        log(
            f"training the {dataset} {kind} evaluator on its {split} split, once per dataset "
            f"(~1-2 min on 2 CPU cores, seconds on a GPU); it will be cached at {path}"
        )
    model, info = train_evaluator(dataset, root, split, seed=seed, epochs=epochs, device=device, kind=kind)
    save_evaluator(model, info, path)
    if log:
        log(
            f"evaluator trained in {info.train_seconds:.0f} s: held-out accuracy {info.heldout_accuracy:.2%} "
            f"on {info.n_heldout} images ({info.heldout})"
        )
    return model, info


# ------------------------------------------------------------------------------ features and statistics
def _as_model_input(images: Tensor | np.ndarray, device: torch.device | str) -> Tensor:
    """uint8 [0, 255] or float [-1, 1] images, (N, 28, 28), (N, 1, 28, 28) or (N, 28, 28, 1) -> (N, 1, 28, 28)."""
    x = torch.as_tensor(images)
    if x.dim() == 4 and x.shape[-1] == 1 and x.shape[1] != 1:
        x = x.permute(0, 3, 1, 2).contiguous()  # NHWC (the sample .npz format) -> NCHW, same memory layout
    elif x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or tuple(x.shape[1:]) != (1, 28, 28):
        raise ValueError(f"expected images (N, 28, 28), (N, 1, 28, 28) or (N, 28, 28, 1), got {tuple(x.shape)}")
    x = x.to(device)
    return normalize(x) if x.dtype == torch.uint8 else x.float()


@torch.no_grad()
def extract_features(evaluator: MnistEvaluator, images: Tensor | np.ndarray, batch: int = 500) -> tuple[Tensor, Tensor]:
    """(features (N, F) float32, class probabilities (N, 10)) on CPU, for uint8 or [-1, 1] float images."""
    evaluator.eval()
    device = next(evaluator.parameters()).device
    feats, probs = [], []
    for start in range(0, len(images), batch):
        f = evaluator.features(_as_model_input(images[start : start + batch], device))
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
    return Path(cache_dir) / f"realstats-{_kind_prefix(kind)}{dataset}-{checksum[:12]}.safetensors"


def load_or_compute_real_stats(
    evaluator: MnistEvaluator,
    dataset: str,
    root: str | Path,
    split: str,
    cache_dir: str | Path | None = None,
) -> RealStats:
    """Feature mean/covariance of the real ``split``, cached beside the evaluator.

    Keyed by the data checksum in the file name and by the evaluator's weight digest in its metadata, so
    a retrained evaluator or different data never reuses stale statistics.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    images, labels = load_arrays(dataset, root, split, download=False)
    checksum = data_checksum(images, labels)
    path = real_stats_path(cache_dir or default_cache_dir(), dataset, checksum, evaluator.kind)
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
                    dataset=dataset,
                    split=split,
                    data_sha256=checksum,
                    features=f.get_tensor("features"),
                    labels=f.get_tensor("labels"),
                )
    features, _ = extract_features(evaluator, images)
    mu, sigma = feature_stats(features)
    meta = {
        "evaluator_sha256": evaluator_digest,
        "data_sha256": checksum,
        "n": str(len(labels)),
        "split": split,
        "layout": REAL_STATS_LAYOUT,
    }
    labels = labels.long().contiguous()
    tensors = {"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma), "features": features, "labels": labels}
    _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return RealStats(
        mu=mu,
        sigma=sigma,
        n=len(labels),
        dataset=dataset,
        split=split,
        data_sha256=checksum,
        features=features,
        labels=labels,
    )


def prepare_evaluation(
    accelerator: Any,
    dataset: str,
    root: str | Path,
    split: str,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] | None = print,
    kind: str = "cnn",
) -> tuple[MnistEvaluator, RealStats]:
    """All processes: the evaluator (on ``accelerator.device``) and the real statistics.

    The main process trains / computes and caches first; the others then load its files. Errors are held
    until every process has left ``main_process_first`` (raising inside would skip its barrier and hang).
    """
    failure: Exception | None = None
    result: tuple[MnistEvaluator, RealStats] | None = None
    with accelerator.main_process_first():
        try:
            evaluator, _ = load_or_train_evaluator(
                dataset, root, split, cache_dir, log=log if accelerator.is_main_process else None, kind=kind
            )
            result = evaluator, load_or_compute_real_stats(evaluator, dataset, root, split, cache_dir)
        except Exception as exc:
            failure = exc
    if failure is not None:
        raise failure
    assert result is not None
    return result[0].to(accelerator.device), result[1]


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
    from gan_ddp import fidelity

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


def evaluate_samples(
    evaluator: MnistEvaluator, images: Tensor | np.ndarray, real_stats: RealStats, batch: int = 500
) -> dict[str, float | int]:
    """Metrics of a batch of images: uint8 [0, 255] or float [-1, 1]; (N, 28, 28), (N, 1, 28, 28) or NHWC."""
    features, probs = extract_features(evaluator, images, batch)
    return metrics_against(features, probs, real_stats)


def score_npz(path: str | Path, evaluator: MnistEvaluator, real_stats: RealStats) -> dict[str, float | int]:
    """Metrics of a ``gan-ddp sample --out FILE.npz`` file: ``arr_0`` uint8 (N, 28, 28, 1), N >= 2."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "arr_0" not in npz.files:
                raise DataError(
                    f"{path}: no arr_0 array (found {', '.join(npz.files) or 'none'}); expected uint8 (N, 28, 28, 1)"
                )
            array = npz["arr_0"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: not a readable .npz file ({' '.join(str(exc).split())})") from exc
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != (28, 28, 1) or array.shape[0] < 2:
        raise DataError(
            f"{path}: arr_0 is {array.dtype} {tuple(array.shape)}; expected uint8 (N, 28, 28, 1) with N >= 2 "
            "(the format `gan-ddp sample --out FILE.npz` writes)"
        )
    return evaluate_samples(evaluator, array, real_stats)


# ------------------------------------------------------------------------------ generation, distributed
def chunk_noise(seed: int, chunk: int, size: int, z_dim: int) -> Tensor:
    """The noise of one chunk of the global sample range, (size, z_dim) on CPU: a function of (seed, chunk)."""
    state = np.random.SeedSequence([seed, chunk]).generate_state(2, np.uint32)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randn(size, z_dim, generator=gen)


def _check_same_generator(accelerator: Any, G: nn.Module) -> None:
    """All ranks: every process generates its own share, so their generators must agree bit for bit."""
    if accelerator.num_processes == 1:
        return
    from gan_ddp.distributed import weights_digest

    names, digest = weights_digest(list(G.named_parameters()) + list(G.named_buffers()))
    everyone = accelerator.gather(digest.to(accelerator.device).unsqueeze(0))  # (world, tensors, 2)
    differs = (everyone != everyone[0:1]).any(dim=2)
    if bool(differs.any()):
        rank, index = (int(i) for i in differs.nonzero()[0])
        raise RuntimeError(
            f"evaluation: generator tensor {names[index]} differs between rank 0 and rank {rank} "
            "(average BatchNorm buffers over processes before scoring)"
        )


@torch.no_grad()
def generate_features(
    accelerator: Any,
    G: nn.Module,
    evaluator: MnistEvaluator,
    n: int,
    z_dim: int,
    seed: int,
    batch: int = 500,
    conditional: bool = False,
) -> tuple[Tensor, Tensor]:
    """All processes: features (n, F) and class probabilities (n, 10) of n generated samples, on every rank.
    A ``conditional`` G is asked for class i mod 10 for global sample i (`models.balanced_labels`).

    Samples are cut into chunks of ``batch`` global indices; chunk c's noise is ``chunk_noise(seed, c)``
    and process r generates chunks r, r + W, r + 2W, ... So the samples (and the numbers) depend on
    (seed, n, batch) but not on the number of processes. Each rank fills a fixed-size buffer (short or
    missing chunks are padded and tagged with index -1); after one gather, rows are put in global order
    and checked to be exactly 0..n-1. Pass the unwrapped generator (the EMA one, usually); it is used in
    eval mode and must be identical on all ranks (checked).
    """
    if n < 1 or batch < 1:
        raise ValueError(f"need n >= 1 and batch >= 1, got n={n}, batch={batch}")
    G = accelerator.unwrap_model(G)
    _check_same_generator(accelerator, G)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    evaluator = evaluator.to(device).eval()
    g_device = next(G.parameters()).device
    n_chunks = math.ceil(n / batch)
    rounds = math.ceil(n_chunks / world)
    feats = torch.zeros(rounds * batch, evaluator.feature_dim, device=device)
    probs = torch.zeros(rounds * batch, N_CLASSES, device=device)
    index = torch.full((rounds * batch,), -1, dtype=torch.long, device=device)
    was_training = G.training
    G.eval()
    try:
        for k in range(rounds):
            chunk = k * world + rank
            if chunk >= n_chunks:
                continue  # this rank has one chunk fewer: its slot stays padding
            start = chunk * batch
            size = min(batch, n - start)
            z = chunk_noise(seed, chunk, size, z_dim).to(g_device)
            y = balanced_labels(n)[start : start + size].to(g_device) if conditional else None
            images = (G(z) if y is None else G(z, y)).float().to(device)  # (size, 1, 28, 28)
            f = evaluator.features(images.clamp(-1, 1))
            rows = slice(k * batch, k * batch + size)
            feats[rows] = f.float()
            probs[rows] = evaluator.head(f).float().softmax(1)
            index[rows] = torch.arange(start, start + size, device=device)
    finally:
        G.train(was_training)
    all_index = accelerator.gather(index)  # (world * rounds * batch,)
    all_feats = accelerator.gather(feats)
    all_probs = accelerator.gather(probs)
    keep = all_index >= 0
    order = all_index[keep].argsort()
    got = all_index[keep][order]
    if got.numel() != n or not bool((got == torch.arange(n, device=got.device)).all()):
        raise RuntimeError(f"evaluation gathered {got.numel()} samples for n={n}: duplicates or missing indices")
    return all_feats[keep][order].cpu(), all_probs[keep][order].cpu()


def score_generator(
    accelerator: Any,
    G: nn.Module,
    evaluator: MnistEvaluator,
    real_stats: RealStats,
    n: int,
    z_dim: int,
    seed: int,
    batch: int = 500,
    conditional: bool = False,
) -> dict[str, float | int]:
    """All processes: the ``eval/*`` metrics of n samples of G; the same dict on every rank. A ``conditional``
    G is asked for every class in turn, and scored on agreement and per-class FID too."""
    features, probs = generate_features(accelerator, G, evaluator, n, z_dim, seed, batch, conditional)
    requested = balanced_labels(n) if conditional else None
    return metrics_against(features, probs, real_stats, requested)


# ------------------------------------------------------------------------------ CLI
def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in rows:
        table.add_row(key, value)
    Console(highlight=False).print(table)


def _format(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.3e}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"  # KID is often below 1e-3


def run_eval(args: Any) -> int:
    """``gan-ddp eval``: works under ``torchrun``/``accelerate launch`` too (generation is split over ranks)."""
    if args.n < 2 or args.batch < 1:
        raise ValueError(f"--n must be >= 2 and --batch >= 1, got {args.n} and {args.batch}")
    if args.all_checkpoints and (args.run is None or args.checkpoint is not None):
        raise ValueError("--all-checkpoints goes with --run and without --checkpoint")
    if args.all_checkpoints:
        return _eval_all_checkpoints(args)
    if args.samples is not None:
        dataset, split = args.dataset or "mnist", args.split or "test"
        root = args.root or default_root(dataset, split)
        evaluator, info = load_or_train_evaluator(dataset, root, split, args.cache_dir, kind=args.evaluator)
        stats = load_or_compute_real_stats(evaluator, dataset, root, split, args.cache_dir)
        metrics = score_npz(args.samples, evaluator, stats)
        source, is_main = str(args.samples), True
    else:
        from gan_ddp.distributed import check_distributed, make_accelerator
        from gan_ddp.rundir import load_generator_from_run

        G, cfg, checkpoint = load_generator_from_run(args.run, args.checkpoint, use_ema=not args.no_ema)
        dataset, root, split = _real_data(args, cfg)
        accelerator = make_accelerator("no")
        check_distributed(accelerator.num_processes)
        evaluator, stats = prepare_evaluation(accelerator, dataset, root, split, args.cache_dir, kind=args.evaluator)
        info = evaluator.info
        metrics = _score_run_generator(accelerator, G, cfg, evaluator, stats, args)
        source = f"{checkpoint} ({'raw G' if args.no_ema else 'EMA G if saved'}, seed {args.seed})"
        is_main = accelerator.is_main_process
    if is_main:
        rows = [(k.split("/", 1)[1], _format(metrics[k])) for k in (*METRIC_KEYS, *CONDITIONAL_KEYS) if k in metrics]
        rows += [
            (f"{name} {c}", _format(metrics[f"eval/{name}/{c}"]))
            for name in ("fid_class", "agreement_class")
            for c in range(N_CLASSES)
            if f"eval/{name}/{c}" in metrics
        ]
        rows += [
            ("samples", source),
            ("real data", f"{dataset}/{split} ({stats.n} images)"),
            ("evaluator", f"{info.arch}, held-out accuracy {info.heldout_accuracy:.2%}"),
        ]
        _print_table("eval", rows)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({**metrics, "source": source, "evaluator": info.arch}, indent=2) + "\n")
    return 0


def _real_data(args: Any, cfg: Any) -> tuple[str, str, str]:
    """(dataset, root, split) of the real images: the command line's, else the run's own data."""
    return args.dataset or cfg.data.dataset, args.root or cfg.data.root, args.split or cfg.data.split


def _score_run_generator(accelerator: Any, G: Any, cfg: Any, evaluator: Any, stats: Any, args: Any) -> dict:
    """`eval --run`: the run's generator scored on --n samples of noise seed --seed (all ranks)."""
    return score_generator(
        accelerator,
        G.to(accelerator.device),
        evaluator,
        stats,
        args.n,
        cfg.model.z_dim,
        args.seed,
        args.batch,
        conditional=cfg.model.conditional,
    )


def _eval_all_checkpoints(args: Any) -> int:
    """``eval --run DIR --all-checkpoints``: the curve of a run, from its kept checkpoints (set
    ``checkpoint.keep`` high enough when training). ``time_s`` is the run's training time at the checkpoint."""
    from gan_ddp import checkpoint as ckpt
    from gan_ddp.distributed import check_distributed, make_accelerator
    from gan_ddp.rundir import load_generator_from_run

    accelerator = make_accelerator("no")
    check_distributed(accelerator.num_processes)
    rows: list[dict[str, Any]] = []
    evaluator = stats = None
    for directory in ckpt.list_checkpoints(args.run / "checkpoints"):
        try:
            G, cfg, _ = load_generator_from_run(args.run, directory, use_ema=not args.no_ema)
        except ckpt.CheckpointError as exc:
            if accelerator.is_main_process:
                print(f"skipping checkpoint: {exc}")
            continue
        if evaluator is None:
            dataset, root, split = _real_data(args, cfg)
            evaluator, stats = prepare_evaluation(
                accelerator, dataset, root, split, args.cache_dir, kind=args.evaluator
            )
        metrics = _score_run_generator(accelerator, G, cfg, evaluator, stats, args)
        state = ckpt.read_state(directory)
        rows.append({"step": state["step"], "time_s": state.get("time_s"), "checkpoint": directory.name, **metrics})
    if not rows:
        raise ckpt.CheckpointError(f"{args.run}: no complete checkpoint under checkpoints/")
    if accelerator.is_main_process:
        from rich.console import Console
        from rich.table import Table

        assert evaluator is not None and evaluator.info is not None
        table = Table(title=f"{args.run} ({evaluator.info.arch}, {args.n} samples)", title_justify="left")
        keys = [k for k in (*METRIC_KEYS[:-1], *CONDITIONAL_KEYS) if any(k in row for row in rows)]
        for column in ("step", "time_s", *(k.split("/")[1] for k in keys)):
            table.add_column(column, justify="right")
        for row in rows:
            time_s = "-" if row["time_s"] is None else f"{row['time_s']:.0f}"
            table.add_row(str(row["step"]), time_s, *(_format(row[k]) if k in row else "-" for k in keys))
        console = Console(highlight=False)
        if not console.is_terminal:  # logs and pipes: room for every column instead of 80 characters
            console.width = 240
        console.print(table)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"evaluator": evaluator.info.arch, "rows": rows}, indent=2) + "\n")
    return 0


def run_train_evaluator(args: Any) -> int:
    """``gan-ddp train-evaluator``: train (or load) and show the evaluator's card."""
    dataset, split = args.dataset or "mnist", args.split or "test"
    root = args.root or default_root(dataset, split)
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    _, info = load_or_train_evaluator(
        dataset, root, split, args.cache_dir, seed=args.seed, epochs=args.epochs, force=args.force, kind=args.evaluator
    )
    path = evaluator_path(args.cache_dir or default_cache_dir(), dataset, info.data_sha256, args.evaluator)
    rows = [
        ("file", str(path)),
        ("architecture", info.arch),
        ("data", f"{dataset}/{split} sha256 {info.data_sha256[:12]}"),
        ("train / held out", f"{info.n_train} / {info.n_heldout} ({info.heldout})"),
        ("held-out accuracy", f"{info.heldout_accuracy:.2%}"),
        ("epochs, seed", f"{info.epochs}, {info.seed}"),
        ("training time", f"{info.train_seconds:.0f} s"),
    ]
    _print_table("evaluator", rows)
    return 0
