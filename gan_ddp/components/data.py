"""MNIST / Fashion-MNIST loading for the GAN trainer.

The data is read straight from the IDX files into one uint8 tensor, so it is
small enough (47 MB for MNIST train) to keep resident on each process, or even
on its GPU, and batches are cut with a single index op instead of a per-sample
Python loop. Everything that can go wrong with the files is reported as a
one-line ``DataError`` naming the file, because the CLI prints it verbatim.

torchvision is only used to download (imported lazily, as it is slow to import);
the files it leaves behind are read by ``read_idx`` like any others, so there is
a single loading path to trust.

The official MNIST test split ships inside the package (``gan_ddp/components/bundled/mnist``,
checksums verified on every read): ``data.root=bundled`` names it, and a training
whose download fails falls back to it (``data.fallback``), so the project trains
and tests on a machine without a network.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import math
import shutil
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from gan_ddp.choices import DATASETS
from gan_ddp.config import SPLITS
from gan_ddp.errors import GanDdpError, one_line

# Accelerate prepares the loaders built here: on torch 2.0 (K80 stack) it needs the shims importing compat installs.
from gan_ddp.runtime import compat  # noqa: F401
from gan_ddp.runtime.barrier import main_first

_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The data.root value that names the copy of the MNIST test split shipped inside the package.
BUNDLED = "bundled"
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled" / "mnist"
# The official md5 sums of the t10k files (the MNIST site publishes md5; torchvision checks the same).
_BUNDLED_MD5 = {
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_MAX_BYTES = 1 << 31  # far above any MNIST-like file (train images: 47 MB)
_KINDS = {1: "a labels file (1-D)", 3: "an images file (3-D)"}


class DataError(GanDdpError, ValueError):
    """A one-line, user-facing problem with the data files or data settings."""


class DownloadError(DataError):
    """The download failed (no network, unreachable mirrors): what the bundled fallback covers."""


@dataclass(frozen=True)
class DataInfo:
    """Which data a run actually read: recorded in config.yaml, W&B's config and every checkpoint."""

    dataset: str
    split: str  # the split really read: "test" when the bundled copy stood in
    root: str  # "bundled" for the copy inside the package
    source: str  # files (found in root) | download (fetched now) | bundled | fallback (download failed)
    images: int
    sha256: str  # of the decoded images and labels (`data_checksum`), whatever the files' compression

    def as_dict(self) -> dict[str, str | int]:
        return asdict(self)

    def describe(self) -> str:
        where = "the bundled copy" if is_bundled(self.root) else self.root
        return f"{self.dataset} {self.split} from {where} ({self.images:,} images, sha256 {self.sha256[:12]})"


def _kind(ndim: int) -> str:
    return _KINDS.get(ndim, f"a {ndim}-D IDX file")


def _read_exact(stream: BinaryIO, size: int) -> bytearray:
    """Read up to ``size`` bytes into one preallocated buffer; shorter only at end of file."""
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    del view  # a live export would forbid resizing
    del buf[got:]
    return buf


def _remaining(stream: BinaryIO) -> int:
    return sum(len(chunk) for chunk in iter(lambda: stream.read(1 << 20), b""))


def read_idx(path: str | Path, expect_ndim: int) -> Tensor:
    """Read a uint8 IDX file (optionally ``.gz``) into a tensor shaped as its header says."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as stream:
            # Streamed into a buffer sized from the header: the payload is never copied.
            head = _read_exact(stream, 4)
            if len(head) < 4:
                raise DataError(f"{path}: header too short: file has {len(head)} bytes, an IDX header needs 4+")
            expected = 0x800 | expect_ndim
            magic = int.from_bytes(head, "big")
            if magic != expected:
                raise DataError(
                    f"{path}: bad magic number 0x{magic:08x}, expected 0x{expected:08x} "
                    f"(uint8, {_kind(expect_ndim)}); {_diagnose(bytes(head))}"
                )
            dims_raw = _read_exact(stream, 4 * expect_ndim)
            if len(dims_raw) < 4 * expect_ndim:
                raise DataError(
                    f"{path}: header too short: {expect_ndim} dimension sizes need {4 * expect_ndim} bytes "
                    f"after the magic number, found {len(dims_raw)}"
                )
            shape = struct.unpack(f">{expect_ndim}I", dims_raw)
            size = math.prod(shape)  # Python ints: np.prod would silently overflow on a bogus header
            if size > _MAX_BYTES:  # a corrupt header must not make us allocate terabytes
                raise DataError(f"{path}: header {list(shape)} declares {size} bytes of data, which is implausible")
            what = "pixel" if expect_ndim == 3 else "label"
            data = _read_exact(stream, size)
            if len(data) < size:
                raise DataError(
                    f"{path}: truncated: header {list(shape)} expects {size} bytes of {what} data "
                    f"after the header, found {len(data)}"
                )
            extra = _remaining(stream)  # also makes gzip verify its CRC
            if extra:
                raise DataError(
                    f"{path}: {extra} trailing bytes after the {size} bytes of {what} data "
                    f"the header {list(shape)} declares"
                )
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt gzip stream ({one_line(exc)})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or one_line(exc)}") from exc
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).reshape(shape))


def _diagnose(head: bytes) -> str:
    if head[:2] == b"\x1f\x8b":
        return "the file is gzip-compressed, give it a .gz suffix"
    if head[:3] == b"\x00\x00\x08":
        return f"looks like {_kind(head[3])}"
    if head[:2] == b"\x00\x00":
        return f"data type byte 0x{head[2]:02x} is not 0x08 (uint8)"
    return "not an IDX file"


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise DataError(f"unknown {name} {value!r}: expected one of {', '.join(choices)}")


def _how_to_get(dataset: str, offer_download: bool) -> str:
    spec = DATASETS[dataset]
    names = ", ".join(f"{stem}[.gz]" for split in ("train", "test") for stem in _STEMS[split])
    advice = f"copy the IDX files ({names}; from the {spec.site} site or any mirror) into data.root"
    if offer_download:
        advice = f"run with data.download=true on a machine with internet, or {advice}"
    if spec.install_hint:
        advice += f"; {spec.install_hint}"
    return advice


def is_bundled(root: str | Path) -> bool:
    return str(root) == BUNDLED


def default_root(dataset: str, split: str) -> str:
    """Where commands look when no root is given: the bundled copy is the official MNIST test split itself."""
    return BUNDLED if split == "test" and DATASETS[dataset].bundled else "data"


def bundled_files() -> tuple[Path, Path]:
    """(images, labels) of the bundled MNIST test split, after checking both files' official md5."""
    paths = []
    for name, expected in _BUNDLED_MD5.items():
        path = BUNDLED_DIR / name
        try:
            got = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
        except OSError as exc:
            raise DataError(
                f"{path}: the bundled MNIST test split cannot be read ({exc.strerror or one_line(exc)}); "
                "reinstall gan-ddp"
            ) from exc
        if got != expected:
            raise DataError(f"{path}: md5 {got} is not the official {expected}: the bundled copy is damaged")
        paths.append(path)
    return paths[0], paths[1]


def find_split_files(root: str | Path, dataset: str, split_name: str) -> tuple[Path, Path]:
    """Return (images, labels) paths of one split, both from the first folder that has both."""
    _check_choice("dataset", dataset, DATASETS)
    _check_choice("split", split_name, ("train", "test"))
    if is_bundled(root):
        if not (split_name == "test" and DATASETS[dataset].bundled):
            raise DataError(
                f"data.root={BUNDLED} holds only the MNIST test split (10,000 images), not {dataset} "
                f"{split_name}: use data.split=test, or point data.root at a folder with the {dataset} files"
            )
        return bundled_files()
    root = Path(root).expanduser()
    folders = [root / sub for sub in DATASETS[dataset].folders]
    for folder in folders:
        found = [_existing(folder / stem) for stem in _STEMS[split_name]]
        if found[0] and found[1]:
            return found[0], found[1]
    names = " and ".join(f"{stem}[.gz]" for stem in _STEMS[split_name])
    raise DataError(
        f"{dataset} {split_name} files not found: need {names} in one of "
        f"{', '.join(f'{f}/' for f in folders)}; {_how_to_get(dataset, offer_download=True)}"
    )


def _existing(stem: Path) -> Path | None:
    # Uncompressed first: it is what a previous run (or torchvision) extracted.
    for candidate in (stem, stem.with_name(stem.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _download(dataset: str, root: Path, splits: Sequence[str]) -> None:
    from torchvision import datasets  # lazy: only needed here, and slow to import

    cls = getattr(datasets, DATASETS[dataset].torchvision)
    target = root / cls.__name__  # torchvision's <root>/MNIST/raw
    existed = target.exists()
    try:
        for split_name in splits:
            cls(str(root), train=split_name == "train", download=True)
    except (OSError, RuntimeError) as exc:  # torchvision wraps URLError etc. in a multi-line RuntimeError
        if not existed:  # leave no empty folders behind in the user's data.root
            shutil.rmtree(target, ignore_errors=True)
        raise DownloadError(
            f"could not download {dataset} into {root}: {one_line(exc)}; {_how_to_get(dataset, False)}"
        ) from exc


def _locate(
    dataset: str, root: str | Path, splits: Sequence[str], download: bool, fallback: bool
) -> tuple[list[tuple[Path, Path]], str]:
    """The files of each split, and where they came from: "files", "download" or "fallback"."""
    try:
        return [find_split_files(root, dataset, s) for s in splits], "files"
    except DataError:
        if not download or is_bundled(root):
            raise
    try:
        _download(dataset, Path(root).expanduser(), splits)
    except DownloadError:
        if not (fallback and DATASETS[dataset].bundled):
            raise
        return [bundled_files()], "fallback"
    return [find_split_files(root, dataset, s) for s in splits], "download"


def _read_split(images_path: Path, labels_path: Path) -> tuple[Tensor, Tensor]:
    images = read_idx(images_path, expect_ndim=3)
    labels = read_idx(labels_path, expect_ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels")
    if tuple(images.shape[1:]) != (28, 28):
        raise DataError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28")
    if labels.numel() and int(labels.max()) > 9:
        raise DataError(f"{labels_path}: label {int(labels.max())} is outside 0..9")
    return images, labels.long()


def load_arrays(
    dataset: str,
    root: str | Path,
    split: str,
    download: bool,
    main_process_first: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
) -> tuple[Tensor, Tensor]:
    """Load images uint8 (N, 28, 28) and labels int64 (N,); split "all" is train then test."""
    images, labels, _ = _load(dataset, root, split, download, False, main_process_first)
    return images, labels


def _load(
    dataset: str,
    root: str | Path,
    split: str,
    download: bool,
    fallback: bool,
    main_process_first: Callable[[], AbstractContextManager[object]],
) -> tuple[Tensor, Tensor, str]:
    """Images, labels and where they came from ("files", "download" or "fallback")."""
    _check_choice("dataset", dataset, DATASETS)
    _check_choice("split", split, SPLITS)
    splits = ("train", "test") if split == "all" else (split,)
    with main_first(main_process_first):  # an error is raised once every process has left the block
        paths, source = _locate(dataset, root, splits, download, fallback)
    # Read outside the block so processes read in parallel rather than one after another.
    parts = [_read_split(*p) for p in paths]
    if len(parts) == 1:
        images, labels = parts[0]
    else:
        images, labels = torch.cat([i for i, _ in parts]), torch.cat([lab for _, lab in parts])
    return images, labels, source


def load_data(
    dataset: str,
    root: str | Path,
    split: str,
    download: bool,
    fallback: bool = False,
    main_process_first: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    note: Callable[[str], object] | None = None,
) -> tuple[Tensor, Tensor, DataInfo]:
    """Images uint8 (N, 28, 28), labels int64 (N,) and what was read; split "all" is train then test.

    With ``fallback``, a failed MNIST download trains on the bundled test split instead, and ``note``
    (e.g. the main process's console) is told so in one line. ``main_process_first`` is e.g.
    ``accelerator.main_process_first``; it holds barriers, so it is entered exactly once on every
    process, download or not.
    """
    images, labels, source = _load(dataset, root, split, download, fallback, main_process_first)
    bundled = source == "fallback" or is_bundled(root)
    info = DataInfo(
        dataset=dataset,
        split="test" if bundled else split,
        root=BUNDLED if bundled else str(root),
        source="bundled" if is_bundled(root) else source,
        images=int(labels.shape[0]),
        sha256=data_checksum(images, labels),
    )
    if source == "fallback" and note is not None:
        note(
            f"note: could not download {dataset} into {root}, so this run trains on the bundled MNIST test "
            f"split ({info.images:,} images, official checksums); for the full 60,000-image training set, run "
            "once with a network or copy the IDX files into data.root, then start a new run.dir"
        )
    return images, labels, info


class ImageTensorDataset(Dataset[tuple[Tensor, Tensor]]):
    """In-memory images (N, 1, 28, 28) uint8 and labels (N,) int64 that batch with one index op."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dim() != 3 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"expected images (N, H, W) and labels (N,), got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        self.images = images.unsqueeze(1)  # a view: the 47 MB is not copied
        self.labels = labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        # DataLoader calls this with the whole batch's indices instead of __getitem__ per sample.
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.images.device)
        return self.images[idx], self.labels[idx]

    def to(self, device: torch.device | str) -> ImageTensorDataset:
        """Move the data (e.g. onto the GPU, to keep it resident there); returns self."""
        self.images = self.images.to(device)
        self.labels = self.labels.to(device)
        return self


def collate_batch(batch: tuple[Tensor, Tensor] | Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Pass through a batch already built by ``__getitems__``; stack a list of single samples."""
    if isinstance(batch, tuple) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch):
        return batch
    return torch.stack([image for image, _ in batch]), torch.stack([label for _, label in batch])


def normalize(x: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [-1, 1], on x's device (done per batch so the stored data stays uint8)."""
    return x.float() / 127.5 - 1


def to_uint8(x: Tensor) -> Tensor:
    """Inverse of ``normalize`` for generator outputs in [-1, 1]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_sample_array(images: Tensor) -> np.ndarray:
    """Generator outputs (N, 1, 28, 28) in [-1, 1] -> the `sample --out x.npz` array: uint8 (N, 28, 28, 1)."""
    return to_uint8(images.detach().cpu()).permute(0, 2, 3, 1).contiguous().numpy()


def data_checksum(images: Tensor, labels: Tensor) -> str:
    """sha256 hex of the raw image bytes (uint8) then label bytes (int64)."""
    digest = hashlib.sha256()
    for tensor in (images.to(torch.uint8), labels.to(torch.int64)):
        digest.update(tensor.detach().cpu().contiguous().numpy())
    return digest.hexdigest()


class EpochSampler(Sampler[int]):
    """A permutation of the dataset drawn from (seed, epoch), identical on every rank, truncated to a
    whole number of global batches. Accelerate shards it into per-process batches: rank r of N gets
    batches r, r+N, ... so global step k always covers permutation[k*B:(k+1)*B], whatever N is."""

    def __init__(self, length: int, global_batch: int, seed: int) -> None:
        self.length, self.global_batch, self.seed, self.epoch = length, global_batch, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length // self.global_batch * self.global_batch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=g)[: len(self)].tolist())


def make_train_loader(dataset, global_batch: int, local_batch: int, seed: int, num_workers: int = 0) -> DataLoader:
    """The per-process loader before `accelerator.prepare` shards it (batches of global_batch / world)."""
    return DataLoader(
        dataset,
        batch_size=local_batch,
        sampler=EpochSampler(len(dataset), global_batch, seed),
        drop_last=True,
        collate_fn=collate_batch,
        num_workers=num_workers,
        # Each new iterator draws a base seed; from its own generator it leaves the global RNG (dropout)
        # alone, so a resume that starts mid-epoch draws the same dropout masks as an unbroken run.
        generator=torch.Generator().manual_seed(seed),
    )
