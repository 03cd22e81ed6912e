"""The evaluator: a small MNIST classifier whose penultimate features the evaluation metrics are computed in.

Each kind of network is registered once in `EVALUATORS` (the config key ``eval.evaluator``, whose names
`gan_ddp/choices.py` declares) with the tag its cards carry. An evaluator is trained once per dataset
(`load_or_train_evaluator`) and cached under ``$GAN_DDP_CACHE`` or ``~/.cache/gan-ddp`` as safetensors plus a
JSON card, keyed by the sha256 of the images and labels it was trained on (`RealData`). The metrics themselves
live in `gan_ddp.evaluation.eval_metrics`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gan_ddp.components.data import DataError, data_checksum, find_split_files, load_arrays, normalize, read_idx
from gan_ddp.components.models import N_CLASSES
from gan_ddp.config import EVALUATOR_EPOCHS
from gan_ddp.errors import one_line
from gan_ddp.registry import Registry
from gan_ddp.runtime.fsutil import atomic_write

DEFAULT_EPOCHS = EVALUATOR_EPOCHS
HELDOUT_FRACTION = 0.1


@dataclass(frozen=True)
class EvaluatorKind:
    """One value of ``eval.evaluator``: how to build the network's feature body, and the tags that name it."""

    arch: str  # written into every card; bump it when the network or its training recipe changes
    feature_dim: int
    body: Callable[[], nn.Module]  # (B, 1, 28, 28) in [-1, 1] -> (B, feature_dim)
    file_tag: str  # in the cache's file names; the cnn's names predate the other kinds, so it has none


EVALUATORS: Registry[EvaluatorKind] = Registry("eval.evaluator")


def _cnn_body() -> nn.Module:
    # Pooling after every conv keeps a training epoch on 9,000 images within seconds on two CPU cores.
    return nn.Sequential(
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
        nn.Linear(128 * 3 * 3, 128),
        nn.ReLU(),  # the features: penultimate layer, after the ReLU
    )


def _mlp_body() -> nn.Module:
    # No convolution: a second opinion sharing neither architecture nor weights with the cnn.
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU())


# The first is the default.
EVALUATORS.add("cnn", EvaluatorKind("mnist-cnn-c32-c64-c128-f128-v1", 128, _cnn_body, file_tag=""))
EVALUATORS.add("mlp", EvaluatorKind("mnist-mlp-h512-f256-v1", 256, _mlp_body, file_tag="mlp-"))
ARCH = EVALUATORS["cnn"].arch
FEATURE_DIM = EVALUATORS["cnn"].feature_dim  # of the default evaluator; `MnistEvaluator.feature_dim` in general


# ------------------------------------------------------------------------------ the real data
@dataclass(frozen=True)
class RealData:
    """The real images an evaluation compares with, read once by the caller and passed down.

    The trainer passes the images it trains on; the commands read them with `RealData.load`. ``sha256`` keys
    the cached evaluator and real statistics, so it must be `data_checksum(images, labels)`.
    """

    dataset: str
    root: str | Path
    split: str
    images: Tensor  # uint8 (N, 28, 28)
    labels: Tensor  # int64 (N,)
    sha256: str

    @classmethod
    def load(cls, dataset: str, root: str | Path, split: str) -> RealData:
        images, labels = load_arrays(dataset, root, split, download=False)
        return cls(dataset, root, split, images, labels, data_checksum(images, labels))


# ------------------------------------------------------------------------------ network
class MnistEvaluator(nn.Module):
    """A classifier for (B, 1, 28, 28) images in [-1, 1]; its penultimate activations are the features.

    - ``kind="cnn"`` (default): conv32-pool-conv64-pool-conv128-pool -> 128-d feature -> 10 logits.
    - ``kind="mlp"``: 784 -> 512 -> 256-d feature -> 10 logits, to check that a ranking is not an artefact
      of one feature space.

    No BatchNorm: features of one image never depend on the rest of its batch.
    """

    def __init__(self, kind: str = "cnn") -> None:
        super().__init__()
        spec = EVALUATORS[kind]  # a ConfigError naming the known kinds for any other
        self.kind = kind
        self.feature_dim = spec.feature_dim
        self.body = spec.body()
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(self.feature_dim, N_CLASSES)
        self.info: EvaluatorInfo | None = None  # the card, set when trained or loaded

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)  # (B, feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))  # (B, 10) logits


def as_model_input(images: Tensor | np.ndarray, device: torch.device | str) -> Tensor:
    """uint8 [0, 255] or float [-1, 1] images, (N, 28, 28), (N, 1, 28, 28) or (N, 28, 28, 1) -> (N, 1, 28, 28)."""
    x = torch.as_tensor(images)
    if x.dim() == 4 and x.shape[-1] == 1 and x.shape[1] != 1:
        x = x.permute(0, 3, 1, 2).contiguous()  # NHWC (the sample .npz format) -> NCHW, same memory layout
    elif x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or tuple(x.shape[1:]) != (1, 28, 28):
        raise DataError(f"expected images (N, 28, 28), (N, 1, 28, 28) or (N, 28, 28, 1), got {tuple(x.shape)}")
    x = x.to(device)
    return normalize(x) if x.dtype == torch.uint8 else x.float()


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


# ------------------------------------------------------------------------------ cache
def default_cache_dir() -> Path:
    return Path(os.environ.get("GAN_DDP_CACHE") or Path.home() / ".cache" / "gan-ddp").expanduser()


def cache_path(cache_dir: str | Path, what: str, dataset: str, checksum: str, kind: str = "cnn") -> Path:
    """``<cache_dir>/<what>-[<kind>-]<dataset>-<checksum[:12]>.safetensors``: the one naming of cached files."""
    return Path(cache_dir) / f"{what}-{EVALUATORS[kind].file_tag}{dataset}-{checksum[:12]}.safetensors"


def evaluator_path(cache_dir: str | Path, dataset: str, checksum: str, kind: str = "cnn") -> Path:
    """``<cache_dir>/evaluator-[<kind>-]<dataset>-<checksum[:12]>.safetensors`` (card: same name, ``.json``)."""
    return cache_path(cache_dir, "evaluator", dataset, checksum, kind)


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the state dict (names, shapes, bytes): ties cached real statistics to one evaluator."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_evaluator(model: MnistEvaluator, info: EvaluatorInfo, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"arch": info.arch}))
    atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(info.to_json()))


def load_evaluator(path: str | Path, device: str | torch.device = "cpu") -> tuple[MnistEvaluator, EvaluatorInfo]:
    """Load weights (safetensors: no pickle) and card; DataError naming the file if either is unusable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    card = path.with_suffix(".json")
    try:
        info = EvaluatorInfo(**json.loads(card.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"{card}: not a readable evaluator card ({one_line(exc)})") from exc
    kinds = {spec.arch: kind for kind, spec in EVALUATORS.items()}
    if info.arch not in kinds:
        known = ", ".join(repr(a) for a in kinds)
        raise DataError(f"{card}: evaluator architecture {info.arch!r}, this version knows {known}")
    # The weights are overwritten below; building the network must not draw from the global RNG, or a training
    # run would take other random numbers (dropout, ...) with a cached evaluator than with a fresh one.
    with torch.random.fork_rng(devices=[]):
        model = MnistEvaluator(kinds[info.arch])
    try:
        model.load_state_dict(load_file(str(path)))
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise DataError(f"{path}: cannot load evaluator weights ({one_line(exc)[:200]})") from exc
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


def _split_for_training(real: RealData, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor, str]:
    """(train images, train labels, held-out images, held-out labels, description).

    split "train" or "all": train on the official train split and hold out the official test split when
    its files exist (for "all" they do: it is train then test). Otherwise (split "test", or "train"
    without test files): hold out a random 10% chosen by ``seed``.
    """
    images, labels = real.images, real.labels
    if real.split in ("train", "all"):
        try:
            test_files = find_split_files(real.root, real.dataset, "test")
        except DataError:
            test_files = None
        if test_files is not None:
            if real.split == "all":  # the test images are the last ones: only their count is needed
                n_train = labels.shape[0] - read_idx(test_files[1], expect_ndim=1).shape[0]
                return images[:n_train], labels[:n_train], images[n_train:], labels[n_train:], "test split"
            test_images, test_labels = load_arrays(real.dataset, real.root, "test", download=False)
            return images, labels, test_images, test_labels, "test split"
    perm = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(seed))
    n_heldout = max(1, round(HELDOUT_FRACTION * labels.shape[0]))
    held, kept = perm[:n_heldout], perm[n_heldout:]
    return images[kept], labels[kept], images[held], labels[held], f"random {HELDOUT_FRACTION:.0%} of {real.split}"


@torch.no_grad()
def _accuracy(model: MnistEvaluator, images: Tensor, labels: Tensor, device: torch.device, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for start in range(0, labels.shape[0], batch):
        x = as_model_input(images[start : start + batch], device)
        correct += int((model(x).argmax(1).cpu() == labels[start : start + batch]).sum())
    return correct / max(1, labels.shape[0])


def train_evaluator(
    real: RealData,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    device: str | torch.device = "cpu",
    max_train: int | None = None,
    kind: str = "cnn",
) -> tuple[MnistEvaluator, EvaluatorInfo]:
    """Train the evaluator on the real images and labels; deterministic given ``seed``.

    AdamW with a one-cycle learning rate, batch 128, random shifts of up to 2 pixels. ``max_train``
    caps the training images (tests). Returns the model in eval mode and its card (not yet cached).
    """
    started = time.monotonic()
    device = torch.device(device)
    x_train, y_train, x_held, y_held, heldout = _split_for_training(real, seed)
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
        dataset=real.dataset,
        split=real.split,
        data_sha256=real.sha256,
        n_train=int(y_train.shape[0]),
        n_heldout=int(y_held.shape[0]),
        heldout=heldout,
        heldout_accuracy=round(accuracy, 6),
        seed=seed,
        epochs=epochs,
        train_seconds=round(time.monotonic() - started, 1),
        torch_version=torch.__version__,
        arch=EVALUATORS[kind].arch,
    )
    model.info = info
    return model.eval(), info


def load_or_train_evaluator(
    real: RealData,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    device: str | torch.device = "cpu",
    force: bool = False,
    log: Callable[[str], None] | None = print,
    kind: str = "cnn",
) -> tuple[MnistEvaluator, EvaluatorInfo]:
    """The cached evaluator for this data (keyed by its sha256), trained and cached on first use.

    In a distributed job call it on the main process first (``evaluate.prepare_evaluation`` does), so one
    process trains and the others load its file.
    """
    path = evaluator_path(cache_dir or default_cache_dir(), real.dataset, real.sha256, kind)
    if path.is_file() and path.with_suffix(".json").is_file() and not force:
        return load_evaluator(path, device)
    if log:
        log(
            f"training the {real.dataset} {kind} evaluator on its {real.split} split, once per dataset "
            f"(~1-2 min on 2 CPU cores, seconds on a GPU); it will be cached at {path}"
        )
    model, info = train_evaluator(real, seed=seed, epochs=epochs, device=device, kind=kind)
    save_evaluator(model, info, path)
    if log:
        log(
            f"evaluator trained in {info.train_seconds:.0f} s: held-out accuracy {info.heldout_accuracy:.2%} "
            f"on {info.n_heldout} images ({info.heldout})"
        )
    return model, info
