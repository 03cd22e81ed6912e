import contextlib
import gzip
import hashlib
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets

from gan_ddp.components import data as data_module
from gan_ddp.components.data import (
    BUNDLED,
    BUNDLED_DIR,
    DataError,
    ImageTensorDataset,
    collate_batch,
    data_checksum,
    find_split_files,
    load_arrays,
    load_data,
    make_train_loader,
    normalize,
    read_idx,
    to_uint8,
)

REAL_MNIST = BUNDLED_DIR  # the real MNIST t10k split shipped in the package
STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write(path: Path, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def make_split(folder: Path, split: str, n: int, seed: int = 0, gz: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    write(folder / (STEMS[split][0] + suffix), idx_bytes(images))
    write(folder / (STEMS[split][1] + suffix), idx_bytes(labels))
    return images, labels


def error_text(excinfo: pytest.ExceptionInfo[DataError], *needles: object) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert str(needle) in message, message
    return message


# --- read_idx ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    images, labels = make_split(tmp_path, "train", 7, gz=gz)
    suffix = ".gz" if gz else ""
    got_images = read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", expect_ndim=3)
    got_labels = read_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", expect_ndim=1)
    assert got_images.dtype == torch.uint8 and got_images.shape == (7, 28, 28)
    assert np.array_equal(got_images.numpy(), images)
    assert np.array_equal(got_labels.numpy(), labels)


def test_read_idx_wrong_magic(tmp_path: Path) -> None:
    path = write(tmp_path / "images", b"\x12\x34\x56\x78" + bytes(100))
    with pytest.raises(DataError) as excinfo:
        read_idx(path, expect_ndim=3)
    error_text(excinfo, path, "0x12345678", "0x00000803", "not an IDX file")


def test_read_idx_wrong_dtype_byte(tmp_path: Path) -> None:
    path = write(tmp_path / "images", b"\x00\x00\x0d\x03" + bytes(12))
    with pytest.raises(DataError) as excinfo:
        read_idx(path, expect_ndim=3)
    error_text(excinfo, path, "0x0d", "uint8")


def test_read_idx_gzip_without_suffix(tmp_path: Path) -> None:
    path = write(tmp_path / "images", gzip.compress(idx_bytes(np.zeros((1, 28, 28), np.uint8))))
    with pytest.raises(DataError) as excinfo:
        read_idx(path, expect_ndim=3)
    error_text(excinfo, path, ".gz suffix")


def test_read_idx_labels_file_where_images_expected(tmp_path: Path) -> None:
    make_split(tmp_path, "test", 3)
    labels_path = tmp_path / "t10k-labels-idx1-ubyte"
    with pytest.raises(DataError) as excinfo:
        read_idx(labels_path, expect_ndim=3)
    error_text(excinfo, labels_path, "0x00000801", "0x00000803", "looks like a labels file")
    with pytest.raises(DataError) as excinfo:
        read_idx(tmp_path / "t10k-images-idx3-ubyte", expect_ndim=1)
    error_text(excinfo, "looks like an images file")


def test_load_arrays_images_and_labels_swapped(tmp_path: Path) -> None:
    make_split(tmp_path / "other", "test", 3)
    (tmp_path / "other/t10k-labels-idx1-ubyte").rename(tmp_path / "t10k-images-idx3-ubyte")
    (tmp_path / "other/t10k-images-idx3-ubyte").rename(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(DataError) as excinfo:
        load_arrays("mnist", tmp_path, "test", download=False)
    error_text(excinfo, tmp_path / "t10k-images-idx3-ubyte", "looks like a labels file")


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated(tmp_path: Path, gz: bool) -> None:
    payload = idx_bytes(np.zeros((4, 28, 28), np.uint8))
    path = write(tmp_path / ("images.gz" if gz else "images"), payload[:-100])
    with pytest.raises(DataError) as excinfo:
        read_idx(path, expect_ndim=3)
    error_text(excinfo, path, f"expects {4 * 784} bytes of pixel data after the header, found {4 * 784 - 100}")


def test_read_idx_trailing_bytes(tmp_path: Path) -> None:
    path = write(tmp_path / "labels.gz", idx_bytes(np.arange(5, dtype=np.uint8)) + b"junk")
    with pytest.raises(DataError) as excinfo:
        read_idx(path, expect_ndim=1)
    error_text(excinfo, path, "4 trailing bytes", "5 bytes of label data")


def corrupt_gzip_payloads() -> list[object]:
    good = gzip.compress(idx_bytes(np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8)))
    bad_crc = good[:-8] + bytes([good[-8] ^ 0xFF]) + good[-7:]  # trailer: CRC32, then size
    return [
        pytest.param(b"this is not gzip at all", id="not-gzip"),
        pytest.param(good[: len(good) // 2], id="cut-short"),
        pytest.param(bad_crc, id="bad-crc"),
    ]


@pytest.mark.parametrize("payload", corrupt_gzip_payloads())
def test_read_idx_corrupt_gzip(tmp_path: Path, payload: bytes) -> None:
    path = write(tmp_path / "t10k-images-idx3-ubyte", payload).rename(tmp_path / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(DataError) as excinfo:
        read_idx(path, expect_ndim=3)
    error_text(excinfo, path, "corrupt gzip stream")


@pytest.mark.parametrize("payload", [b"\x00\x00", b"\x00\x00\x08\x03" + bytes(6)], ids=["no-magic", "no-dims"])
def test_read_idx_header_too_short(tmp_path: Path, payload: bytes) -> None:
    path = write(tmp_path / "images", payload)
    with pytest.raises(DataError) as excinfo:
        read_idx(path, expect_ndim=3)
    error_text(excinfo, path, "header too short")


def test_read_idx_absurd_header(tmp_path: Path) -> None:
    path = write(tmp_path / "images", b"\x00\x00\x08\x03" + struct.pack(">3I", 2**31, 2**31, 28) + bytes(10))
    with pytest.raises(DataError) as excinfo:
        read_idx(path, expect_ndim=3)
    error_text(excinfo, path, "implausible")


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as excinfo:
        read_idx(tmp_path / "nope.gz", expect_ndim=1)
    error_text(excinfo, tmp_path / "nope.gz", "cannot read")


# --- discovery and load_arrays ----------------------------------------------------------------------------


def test_load_arrays_flat_layout(tmp_path: Path) -> None:
    images, labels = make_split(tmp_path, "train", 6)
    got_images, got_labels = load_arrays("mnist", tmp_path, "train", download=False)
    assert got_images.dtype == torch.uint8 and got_images.shape == (6, 28, 28)
    assert got_labels.dtype == torch.int64 and got_labels.shape == (6,)
    assert np.array_equal(got_images.numpy(), images)
    assert np.array_equal(got_labels.numpy(), labels)


def test_load_arrays_torchvision_layout(tmp_path: Path) -> None:
    images, labels = make_split(tmp_path / "MNIST/raw", "test", 4, gz=True)
    assert find_split_files(tmp_path, "mnist", "test") == (
        tmp_path / "MNIST/raw/t10k-images-idx3-ubyte.gz",
        tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte.gz",
    )
    got_images, got_labels = load_arrays("mnist", str(tmp_path), "test", download=False)
    assert np.array_equal(got_images.numpy(), images)
    assert np.array_equal(got_labels.numpy(), labels)


def test_find_prefers_uncompressed_and_keeps_datasets_apart(tmp_path: Path) -> None:
    make_split(tmp_path / "fashion-mnist", "train", 2, gz=True)
    make_split(tmp_path / "fashion-mnist", "train", 2)
    images, _ = find_split_files(tmp_path, "fashion_mnist", "train")
    assert images == tmp_path / "fashion-mnist/train-images-idx3-ubyte"
    with pytest.raises(DataError):  # a Fashion-MNIST folder must never be read as MNIST
        find_split_files(tmp_path, "mnist", "train")


def test_load_arrays_all_is_train_then_test(tmp_path: Path) -> None:
    train_images, train_labels = make_split(tmp_path, "train", 5, seed=1)
    test_images, test_labels = make_split(tmp_path / "MNIST/raw", "test", 3, seed=2, gz=True)
    images, labels = load_arrays("mnist", tmp_path, "all", download=False)
    assert images.shape == (8, 28, 28) and labels.shape == (8,)
    assert np.array_equal(images.numpy(), np.concatenate([train_images, test_images]))
    assert np.array_equal(labels.numpy(), np.concatenate([train_labels, test_labels]))


def test_load_arrays_count_mismatch(tmp_path: Path) -> None:
    make_split(tmp_path, "test", 5)
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DataError) as excinfo:
        load_arrays("mnist", tmp_path, "test", download=False)
    error_text(excinfo, tmp_path / "t10k-images-idx3-ubyte", tmp_path / "t10k-labels-idx1-ubyte", "5 images", "4")


def test_load_arrays_rejects_wrong_image_size_and_labels(tmp_path: Path) -> None:
    make_split(tmp_path, "test", 2)
    write(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(np.zeros((2, 32, 32), np.uint8)))
    with pytest.raises(DataError) as excinfo:
        load_arrays("mnist", tmp_path, "test", download=False)
    error_text(excinfo, tmp_path / "t10k-images-idx3-ubyte", "32x32", "28x28")

    make_split(tmp_path, "test", 2)
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(np.array([3, 12], np.uint8)))
    with pytest.raises(DataError) as excinfo:
        load_arrays("mnist", tmp_path, "test", download=False)
    error_text(excinfo, tmp_path / "t10k-labels-idx1-ubyte", "12", "0..9")


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_missing_files_message(tmp_path: Path, dataset: str) -> None:
    make_split(tmp_path / "MNIST/raw", "train", 2)  # only MNIST train, and where Fashion-MNIST never looks
    with pytest.raises(DataError) as excinfo:
        load_arrays(dataset, tmp_path, "test" if dataset == "mnist" else "train", download=False)
    message = error_text(excinfo, tmp_path, "data.download=true", "copy the IDX files")
    if dataset == "mnist":
        assert "t10k-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
        assert str(tmp_path / "MNIST/raw") in message
    else:
        assert "train-images-idx3-ubyte" in message and str(tmp_path / "FashionMNIST/raw") in message
        assert "apt-get install dataset-fashion-mnist" in message


def test_unknown_dataset_or_split(tmp_path: Path) -> None:
    with pytest.raises(DataError) as excinfo:
        load_arrays("cifar10", tmp_path, "train", download=False)
    error_text(excinfo, "cifar10", "mnist, fashion_mnist")
    with pytest.raises(DataError) as excinfo:
        load_arrays("mnist", tmp_path, "valid", download=False)
    error_text(excinfo, "valid", "train, test, all")


def test_download_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(root: str, train: bool, download: bool) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://x/, got:\n<urlopen error>")

    monkeypatch.setattr(torchvision.datasets, "MNIST", no_network)
    with pytest.raises(DataError) as excinfo:
        load_arrays("mnist", tmp_path, "train", download=True)
    message = error_text(excinfo, f"could not download mnist into {tmp_path}: Error downloading", "copy the IDX files")
    assert "data.download=true" not in message

    def os_error(root: str, train: bool, download: bool) -> None:
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "MNIST", os_error)
    with pytest.raises(DataError) as excinfo:
        load_arrays("mnist", tmp_path, "train", download=True)
    error_text(excinfo, tmp_path, "name resolution")


class CountingContext:
    def __init__(self) -> None:
        self.entered = 0
        self.exited = 0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        self.entered += 1
        yield  # like Accelerate's: nothing after the yield runs if the body raises
        self.exited += 1


def test_main_process_first_entered_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    downloads: list[tuple[str, bool]] = []

    def fake_mnist(root: str, train: bool, download: bool) -> None:
        downloads.append((root, train))
        make_split(Path(root) / "MNIST/raw", "train" if train else "test", 3, gz=True)

    monkeypatch.setattr(torchvision.datasets, "MNIST", fake_mnist)

    ctx = CountingContext()
    images, _ = load_arrays("mnist", tmp_path, "all", download=True, main_process_first=ctx)
    assert (ctx.entered, ctx.exited) == (1, 1)
    assert images.shape == (6, 28, 28) and len(downloads) == 2

    ctx = CountingContext()  # files are there now: no download, same single entry
    load_arrays("mnist", tmp_path, "test", download=True, main_process_first=ctx)
    assert (ctx.entered, ctx.exited) == (1, 1) and len(downloads) == 2

    # A failure must still leave the block normally (its closing barrier), then raise.
    ctx = CountingContext()
    with pytest.raises(DataError):
        load_arrays("mnist", tmp_path / "empty", "test", download=False, main_process_first=ctx)
    assert (ctx.entered, ctx.exited) == (1, 1)


# --- dataset, loader, transforms ----------------------------------------------------------------------------


def small_dataset(n: int = 10) -> tuple[ImageTensorDataset, torch.Tensor, torch.Tensor]:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1).expand(n, 28, 28).contiguous()
    labels = torch.arange(n, dtype=torch.int64)
    return ImageTensorDataset(images, labels), images, labels


def test_dataset_items_and_batched_items() -> None:
    ds, images, _ = small_dataset()
    assert len(ds) == 10
    assert ds.images.data_ptr() == images.data_ptr()  # a view, not a copy
    image, label = ds[3]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8 and int(image[0, 0, 0]) == 3
    assert label.shape == () and label.dtype == torch.int64 and int(label) == 3

    batch = ds.__getitems__([4, 1, 7])
    assert isinstance(batch, tuple) and len(batch) == 2
    assert batch[0].shape == (3, 1, 28, 28) and batch[1].tolist() == [4, 1, 7]
    assert collate_batch(batch) is batch

    stacked = collate_batch([ds[4], ds[1], ds[7]])
    assert torch.equal(stacked[0], batch[0]) and torch.equal(stacked[1], batch[1])


def test_dataset_to_moves_storage() -> None:
    ds, _, _ = small_dataset()
    assert ds.to("meta") is ds
    assert ds.images.device.type == "meta" and ds.labels.device.type == "meta"


def test_train_loader_batches_and_epoch_seeded_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole batches through __getitems__, uint8 images; the order is a function of (seed, epoch) only and
    the incomplete last batch is dropped."""
    ds, _, _ = small_dataset(10)

    def no_single_items(self: ImageTensorDataset, index: int) -> None:
        raise AssertionError("the loader should fetch whole batches through __getitems__")

    monkeypatch.setattr(ImageTensorDataset, "__getitem__", no_single_items)

    def order(seed: int, epoch: int = 0) -> list[int]:
        loader = make_train_loader(ds, global_batch=4, local_batch=4, seed=seed)
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 2 == len(loader)  # 10 images: two whole batches of 4
        for images, labels in batches:
            assert images.shape == (4, 1, 28, 28) and images.dtype == torch.uint8
            assert labels.dtype == torch.int64
            assert torch.equal(images[:, 0, 0, 0].long(), labels)
        return torch.cat([labels for _, labels in batches]).tolist()

    assert order(1) == order(1) and len(set(order(1))) == 8
    assert order(1, epoch=1) != order(1, epoch=0)
    assert len({tuple(order(seed)) for seed in range(5)}) > 1


def test_normalize_and_to_uint8() -> None:
    x = torch.arange(256, dtype=torch.uint8)
    y = normalize(x)
    assert y.dtype == torch.float32
    assert y[0] == -1 and y[255] == 1 and y.min() >= -1 and y.max() <= 1
    assert torch.equal(to_uint8(y), x)
    assert to_uint8(torch.tensor([-3.0, 0.0, 3.0])).tolist() == [0, 128, 255]


def test_data_checksum() -> None:
    _, images, labels = small_dataset()
    digest = data_checksum(images, labels)
    expected = hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()
    assert digest == expected
    changed = images.clone()
    changed[0, 0, 0] += 1
    assert data_checksum(changed, labels) != digest


# --- real data --------------------------------------------------------------------------------------------


def test_real_mnist_test_split() -> None:
    images, labels = load_arrays("mnist", REAL_MNIST, "test", download=False)
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10_000,) and labels.dtype == torch.int64
    assert torch.equal(labels.unique(), torch.arange(10))
    assert int(images.max()) == 255 and int(images.min()) == 0
    ds = ImageTensorDataset(images, labels)
    batch_images, _ = next(iter(make_train_loader(ds, 64, 64, seed=0)))
    assert normalize(batch_images).shape == (64, 1, 28, 28)


# --- the bundled copy and the offline fallback ------------------------------------------------------------

BUNDLED_MD5 = {
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


def test_bundled_split_is_the_official_one() -> None:
    for name, md5 in BUNDLED_MD5.items():
        assert hashlib.md5((BUNDLED_DIR / name).read_bytes()).hexdigest() == md5
    notice = (BUNDLED_DIR / "README.md").read_text()
    assert "CC BY-SA 3.0" in notice and "LeCun" in notice
    images, labels, info = load_data("mnist", BUNDLED, "test", download=False)
    assert images.shape == (10_000, 28, 28) and labels.shape == (10_000,)
    assert (info.root, info.split, info.source, info.images) == (BUNDLED, "test", "bundled", 10_000)
    assert info.sha256 == data_checksum(images, labels)
    same_images, same_labels = load_arrays("mnist", REAL_MNIST, "test", download=False)  # the folder, by path
    assert torch.equal(same_images, images) and torch.equal(same_labels, labels)


def test_damaged_bundled_copy_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in BUNDLED_MD5:
        (tmp_path / name).write_bytes((BUNDLED_DIR / name).read_bytes())
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(labels.read_bytes())
    raw[-9] ^= 1  # inside the gzip payload's CRC: still a file, no longer the official one
    labels.write_bytes(bytes(raw))
    monkeypatch.setattr(data_module, "BUNDLED_DIR", tmp_path)
    with pytest.raises(DataError) as excinfo:
        load_data("mnist", BUNDLED, "test", download=False)
    error_text(excinfo, labels, "is not the official ec29112dd5afa0611ce80d1b7f02629c", "damaged")
    labels.unlink()
    with pytest.raises(DataError) as excinfo:
        load_data("mnist", BUNDLED, "test", download=False)
    error_text(excinfo, labels, "cannot be read", "reinstall gan-ddp")


def test_bundled_holds_only_the_mnist_test_split() -> None:
    for dataset, split in (("mnist", "train"), ("mnist", "all"), ("fashion_mnist", "test")):
        with pytest.raises(DataError) as excinfo:
            load_data(dataset, BUNDLED, split, download=True)  # never a download into a folder named "bundled"
        error_text(excinfo, "data.root=bundled holds only the MNIST test split", f"not {dataset}")
    assert not Path(BUNDLED).exists()


def _no_network(calls: list[bool]):
    def fake(root: str, train: bool, download: bool) -> None:
        calls.append(train)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://x/, got:\n<urlopen error>")

    return fake


def test_failed_download_falls_back_to_the_bundled_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    notes: list[str] = []
    monkeypatch.setattr(torchvision.datasets, "MNIST", _no_network(calls))
    images, _, info = load_data("mnist", tmp_path, "train", download=True, fallback=True, note=notes.append)
    assert calls == [True]  # the full training split was tried first
    assert images.shape == (10_000, 28, 28)
    assert (info.root, info.split, info.source, info.images) == (BUNDLED, "test", "fallback", 10_000)
    assert info.sha256 == load_data("mnist", BUNDLED, "test", download=False)[2].sha256
    assert len(notes) == 1 and "\n" not in notes[0]
    for part in (f"could not download mnist into {tmp_path}", "bundled MNIST test split", "10,000 images", "60,000"):
        assert part in notes[0]
    assert not any(tmp_path.iterdir())  # no half-made folders left in data.root


def test_no_fallback_when_not_asked_or_not_possible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(torchvision.datasets, "MNIST", _no_network(calls))
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", _no_network(calls))
    with pytest.raises(DataError, match="could not download mnist"):  # data.fallback=none
        load_data("mnist", tmp_path, "train", download=True, fallback=False)
    with pytest.raises(DataError, match="mnist train files not found"):  # data.download=false stays an error
        load_data("mnist", tmp_path, "train", download=False, fallback=True)
    with pytest.raises(DataError, match="could not download fashion_mnist"):  # nothing bundled for it
        load_data("fashion_mnist", tmp_path, "train", download=True, fallback=True)
    assert calls == [True, True]


def test_wheel_carries_the_bundled_split(tmp_path: Path) -> None:
    import os
    import shutil
    import subprocess
    import sys
    import zipfile

    repo = Path(__file__).resolve().parents[1]
    source = tmp_path / "src"  # pip builds inside the source tree: a copy keeps build/ out of the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, source / name)
    shutil.copytree(repo / "gan_ddp", source / "gan_ddp", ignore=shutil.ignore_patterns("__pycache__"))
    wheel_cmd = ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)]
    build = subprocess.run(
        [sys.executable, "-m", "pip", *wheel_cmd],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PIP_NO_INDEX": "1"},
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("gan_ddp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in [*BUNDLED_MD5, "README.md"]:
        assert f"gan_ddp/components/bundled/mnist/{name}" in names
    # Every layer's package ships, and the console script points into the command layer.
    source_files = {p.relative_to(source).as_posix() for p in (source / "gan_ddp").rglob("*.py")}
    assert source_files <= names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "gan-ddp = gan_ddp.commands.cli:entry" in zipfile.ZipFile(wheel).read(entry_points).decode()
