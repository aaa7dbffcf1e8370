"""Tests for mipp.zoo.data: readers on tiny files written here in the standard formats."""

from __future__ import annotations

import gzip
import math
import os
import pickle
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mipp.errors import CorruptDatasetError, DatasetNotFoundError, UnknownNameError
from mipp.zoo import data
from mipp.zoo.data import (
    BatchLoader,
    ImageDataset,
    calibration_subset,
    find_root,
    gaussian_mi,
    gaussian_pair,
    load_cifar,
    load_dataset,
    make_separable,
    random_crop_flip,
    read_cifar_batch,
    read_idx,
    sample_gaussian,
    train_val_split,
)

# --- writers for the standard formats ---------------------------------------------------------

_IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, _IDX_CODES[array.dtype.type], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_mnist_dir(
    directory: Path, *, n_train: int = 20, n_test: int = 10, seed: int = 0, gz: bool = True
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images, gz=gz)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz=gz)
        arrays[split] = (images, labels)
    return arrays


def write_cifar_batch(path: Path, data_: np.ndarray, labels: dict[bytes, list[int]]) -> Path:
    batch = {b"batch_label": b"testing batch", b"data": data_, **labels}
    batch[b"filenames"] = [f"img_{i}.png".encode() for i in range(len(data_))]
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return path


def cifar_data(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


@pytest.fixture
def fashion_dir(tmp_path: Path) -> tuple[Path, dict]:
    directory = tmp_path / "fashion-mnist"
    return directory, write_mnist_dir(directory)


@pytest.fixture
def cifar10_root(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    images, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d, y = cifar_data(4, rng), rng.integers(0, 10, size=4).tolist()
        write_cifar_batch(directory / name, d, {b"labels": y})
        images.append(d)
        labels.append(y)
    return tmp_path, np.concatenate(images[:5]), np.concatenate(labels[:5])


# --- IDX --------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([3, 1, 4, 1, 5], dtype=np.uint8),
        np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4),
        np.array([[-300, 2], [7, 30000]], dtype=np.int16),
    ],
)
def test_read_idx_round_trip(tmp_path, array, gz):
    out = read_idx(write_idx(tmp_path / "f.idx", array, gz=gz))
    assert out.dtype == torch.from_numpy(array).dtype
    assert torch.equal(out, torch.from_numpy(array))


def test_read_idx_detects_gzip_by_magic_not_suffix(tmp_path):
    array = np.arange(10, dtype=np.uint8)
    gz_without_suffix = write_idx(tmp_path / "labels", array, gz=True)
    plain_with_suffix = write_idx(tmp_path / "labels.gz", array, gz=False)
    assert torch.equal(read_idx(gz_without_suffix), torch.arange(10, dtype=torch.uint8))
    assert torch.equal(read_idx(plain_with_suffix), torch.arange(10, dtype=torch.uint8))


_GOOD = idx_bytes(np.zeros((3, 4, 5), dtype=np.uint8))  # 16-byte header + 60 bytes


@pytest.mark.parametrize(
    ("raw", "fault"),
    [
        (b"\x01\x02" + _GOOD[2:], "bad magic number 01 02 08 03"),
        (_GOOD[:2] + b"\x07" + _GOOD[3:], "unknown IDX dtype code 0x07"),
        (_GOOD[:10], "truncated header"),
        (_GOOD[:-5], "expected 60 bytes of data for shape (3, 4, 5), found 55"),
        (_GOOD + b"\x00", "expected 60 bytes of data for shape (3, 4, 5), found 61"),
        (gzip.compress(_GOOD)[:30], "gzip"),
    ],
    ids=["magic", "dtype", "header", "truncated", "extra", "gzip"],
)
def test_read_idx_corrupt(tmp_path, raw, fault):
    path = tmp_path / "broken-idx3-ubyte"
    path.write_bytes(raw)
    with pytest.raises(CorruptDatasetError) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert fault in str(info.value)


# --- MNIST-like loaders and root resolution ---------------------------------------------------


def test_fashion_from_explicit_root_is_exact_and_normalised(fashion_dir):
    directory, arrays = fashion_dir
    for split, n in (("train", 20), ("test", 10)):
        ds = load_dataset("fashion-mnist", split=split, root=directory)
        images, labels = arrays[split]
        expected = (torch.from_numpy(images).float()[:, None] / 255 - 0.2860) / 0.3530
        assert ds.x.shape == (n, 1, 28, 28) and ds.x.dtype == torch.float32
        torch.testing.assert_close(ds.x, expected)
        assert torch.equal(ds.y, torch.from_numpy(labels).long())
        assert (ds.num_classes, ds.in_channels, ds.input_size, ds.augment) == (10, 1, 28, False)


def test_root_order_explicit_then_env_then_debian(fashion_dir, tmp_path, monkeypatch):
    directory, arrays = fashion_dir  # tmp_path / "fashion-mnist"
    debian = tmp_path / "debian" / "fashion-mnist"
    write_mnist_dir(debian, seed=5, gz=False)
    monkeypatch.setitem(data.DEBIAN_DATA_DIRS, "fashion-mnist", debian)
    monkeypatch.setenv("MIPP_DATA", str(tmp_path))
    assert find_root("fashion-mnist") == directory
    ds = load_dataset("fashion-mnist", split="test", normalize=False)
    assert torch.equal(ds.x[:, 0], torch.from_numpy(arrays["test"][0]).float() / 255)
    assert find_root("fashion-mnist", root=debian) == debian
    monkeypatch.delenv("MIPP_DATA")
    assert find_root("fashion-mnist") == debian


def test_pad_to_32_and_three_channels(fashion_dir):
    directory, arrays = fashion_dir
    raw = torch.from_numpy(arrays["train"][0]).float() / 255
    plain = load_dataset("fashion-mnist", root=directory, pad_to_32=True, channels=3,
                         normalize=False)  # fmt: skip
    assert plain.x.shape == (20, 3, 32, 32) and plain.input_size == 32
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.all(plain.x[:, :, border] == 0)
    for c in range(3):
        assert torch.equal(plain.x[:, c, 2:30, 2:30], raw)
    normed = load_dataset("fashion-mnist", root=directory, pad_to_32=True, channels=3)
    torch.testing.assert_close(normed.x, (plain.x - 0.2860) / 0.3530)
    assert torch.allclose(normed.x[:, :, border], torch.tensor(-0.2860 / 0.3530))


def test_mnist_like_count_mismatch_and_bad_labels(tmp_path):
    directory = tmp_path / "fm"
    write_mnist_dir(directory)
    write_idx(directory / "train-labels-idx1-ubyte.gz", np.zeros(19, np.uint8), gz=True)
    with pytest.raises(CorruptDatasetError, match=r"20 images .* but 19 labels"):
        load_dataset("fashion-mnist", root=directory)
    write_idx(directory / "t10k-labels-idx1-ubyte.gz", np.full(10, 12, np.uint8), gz=True)
    with pytest.raises(CorruptDatasetError, match=r"label 12 outside 0\.\.9"):
        load_dataset("fashion-mnist", split="test", root=directory)


def test_missing_dataset_lists_every_place(tmp_path, monkeypatch):
    empty = tmp_path / "data"
    empty.mkdir()
    debian = tmp_path / "no-debian" / "mnist"
    monkeypatch.setenv("MIPP_DATA", str(empty))
    monkeypatch.setitem(data.DEBIAN_DATA_DIRS, "mnist", debian)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist")
    message = str(info.value)
    assert str(empty / "mnist") in message and str(debian) in message
    assert message.index(str(empty / "mnist")) < message.index(str(debian))
    assert "train-images-idx3-ubyte" in message and "$MIPP_DATA/mnist/" in message

    bogus = tmp_path / "bogus"
    write_mnist_dir(empty / "mnist")  # data exist in $MIPP_DATA, but root wins: no fallback
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", root=bogus)
    assert str(bogus) in str(info.value) and "root was given" in str(info.value)


def test_missing_file_named_and_debian_hint(tmp_path, monkeypatch):
    directory = tmp_path / "fm"
    write_mnist_dir(directory)
    (directory / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.delenv("MIPP_DATA", raising=False)
    with pytest.raises(DatasetNotFoundError) as info:
        find_root("fashion-mnist", root=directory)
    assert "missing t10k-labels-idx1-ubyte" in str(info.value)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)


# --- CIFAR ------------------------------------------------------------------------------------


def test_cifar10_round_trip_and_layout(cifar10_root):
    root, images, labels = cifar10_root
    x, y = load_cifar("cifar10", split="train", root=root)  # parent of cifar-10-batches-py
    x2, _ = load_cifar("cifar10", split="train", root=root / "cifar-10-batches-py")
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(x, x2)
    assert torch.equal(y, torch.from_numpy(labels))
    # official layout: 1024 red, then 1024 green, then 1024 blue values, each row-major
    for i, c, r, col in [(0, 0, 0, 1), (3, 1, 5, 7), (19, 2, 31, 30)]:
        assert x[i, c, r, col] == images[i, c * 1024 + r * 32 + col]
    ds = load_dataset("cifar10", split="test", root=root)
    assert ds.x.shape == (4, 3, 32, 32) and ds.augment and ds.num_classes == 10
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    x_test, _ = load_cifar("cifar10", split="test", root=root)
    torch.testing.assert_close(ds.x * std + mean, x_test.float() / 255)


def test_cifar100_fine_and_coarse_labels(tmp_path):
    rng = np.random.default_rng(2)
    directory = tmp_path / "cifar100" / "cifar-100-python"
    directory.mkdir(parents=True)
    d = {split: cifar_data(n, rng) for split, n in (("train", 6), ("test", 3))}
    fine = {"train": [0, 99, 5, 50, 7, 8], "test": [1, 2, 98]}
    coarse = {"train": [0, 19, 1, 10, 2, 3], "test": [4, 5, 6]}
    for split in ("train", "test"):
        labels = {b"fine_labels": fine[split], b"coarse_labels": coarse[split]}
        write_cifar_batch(directory / split, d[split], labels)
    x, y = load_cifar("cifar100", split="train", root=tmp_path / "cifar100")
    assert torch.equal(x, torch.from_numpy(d["train"]).view(6, 3, 32, 32))
    assert y.tolist() == fine["train"]
    _, y_coarse = read_cifar_batch(directory / "test", fine_labels=False)
    assert y_coarse.tolist() == coarse["test"]
    ds = load_dataset("cifar100", split="test", root=directory)
    assert ds.num_classes == 100 and ds.y.tolist() == fine["test"] and ds.augment


def test_cifar_batch_pickled_by_numpy_1_and_with_str_keys(tmp_path):
    rng = np.random.default_rng(3)
    d = cifar_data(2, rng)
    blob = pickle.dumps({b"data": d, b"labels": [3, 4]}, protocol=2)
    old = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # numpy<2 name
    assert old != blob
    (tmp_path / "old").write_bytes(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DeprecationWarning from importing numpy.core
        x, y = read_cifar_batch(tmp_path / "old")
    assert torch.equal(x.flatten(1), torch.from_numpy(d)) and y.tolist() == [3, 4]
    (tmp_path / "str").write_bytes(pickle.dumps({"data": d, "labels": [5, 6]}, protocol=4))
    assert read_cifar_batch(tmp_path / "str")[1].tolist() == [5, 6]


class _Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_cifar_corrupt_batches(tmp_path):
    rng = np.random.default_rng(4)
    good = write_cifar_batch(tmp_path / "good", cifar_data(3, rng), {b"labels": [1, 2, 3]})
    cases = {
        "truncated": (good.read_bytes()[:200], "not a readable CIFAR pickle"),
        "text": (b"hello, not a pickle", "not a readable CIFAR pickle"),
        "nolabels": (
            pickle.dumps({b"data": cifar_data(2, rng), b"batch_label": b"x"}, protocol=2),
            "need 'data' and one of ('fine_labels', 'labels'); found keys ['batch_label', 'data']",
        ),
        "shape": (
            pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
            "data has shape (2, 100)",
        ),
        "count": (
            pickle.dumps({b"data": cifar_data(2, rng), b"labels": [0, 1, 2]}),
            "label count mismatch: 2 images",
        ),
    }
    for name, (raw, fault) in cases.items():
        path = tmp_path / name
        path.write_bytes(raw)
        with pytest.raises(CorruptDatasetError) as info:
            read_cifar_batch(path)
        assert str(path) in str(info.value) and fault in str(info.value), name


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": []}, protocol=2))
    with pytest.raises(CorruptDatasetError, match=r"refusing to load global (posix|nt)\.system"):
        read_cifar_batch(path)
    assert not marker.exists()


# --- digits and synthetic -----------------------------------------------------------------------


def test_digits_split():
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    assert train.x.shape == (1438, 1, 8, 8) and test.x.shape == (359, 1, 8, 8)
    assert train.num_classes == 10 and set(test.y.tolist()) == set(range(10))
    assert abs(train.x.mean().item()) < 0.01 and abs(train.x.std().item() - 1) < 0.01
    assert torch.equal(load_dataset("digits").x, train.x)  # deterministic
    images, labels = data.load_digits_arrays()
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0

    # train and test partition the full set (as a multiset of (image, label) rows)
    def rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.flatten(1), y[:, None].float()], 1)

    raw = [load_dataset("digits", split=s, normalize=False) for s in ("train", "test")]
    both = torch.cat([rows(d.x, d.y) for d in raw])
    full = rows(images, labels)
    u1, c1 = torch.unique(both, dim=0, return_counts=True)
    u2, c2 = torch.unique(full, dim=0, return_counts=True)
    assert torch.equal(u1, u2) and torch.equal(c1, c2)


def test_make_separable_is_a_fixed_easy_task():
    x, y = make_separable(2000, seed=0)
    assert x.shape == (2000, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [200] * 10
    assert torch.equal(make_separable(2000, seed=0)[0], x)
    x_test, y_test = make_separable(1000, seed=1)
    assert not torch.equal(x_test, x[:1000])
    centroids = torch.stack([x[y == c].mean(0) for c in range(10)])
    predicted = torch.cdist(x_test, centroids).argmin(1)  # same task: train means classify test
    assert (predicted == y_test).float().mean() > 0.97
    with pytest.raises(ValueError, match="num_classes must be >= 2, got 1"):
        make_separable(10, num_classes=1)


def test_synthetic_dataset_is_vector_data():
    train, test = load_dataset("synthetic"), load_dataset("synthetic", split="test")
    assert train.x.shape == (10_000, 32) and test.x.shape == (2_000, 32)
    assert (train.in_channels, train.input_size, train.num_classes) == (32, None, 10)
    assert not torch.equal(train.x[:2000], test.x)
    with pytest.raises(ValueError, match="vector data"):
        load_dataset("synthetic", pad_to_32=True)


# --- Gaussian pairs with known MI ---------------------------------------------------------------


@pytest.mark.parametrize(("dim_x", "dim_y", "rho"), [(3, 5, 0.6), (4, 2, -0.9), (1, 1, 0.3)])
def test_gaussian_pair_closed_form(dim_x, dim_y, rho):
    pair = gaussian_pair(20_000, dim_x=dim_x, dim_y=dim_y, rho=rho, seed=1)
    k = min(dim_x, dim_y)
    assert pair.mi == pytest.approx(-k / 2 * math.log(1 - rho**2), rel=1e-12)
    assert pair.mi == pytest.approx(gaussian_mi(pair.cov, dim_x), rel=1e-12)
    assert pair.x.shape == (20_000, dim_x) and pair.y.shape == (20_000, dim_y)
    joint = torch.cat([pair.x, pair.y], 1)
    torch.testing.assert_close(torch.cov(joint.T), pair.cov, atol=0.03, rtol=0)


def test_gaussian_pair_independent_and_validation():
    assert gaussian_pair(10, dim_x=2, dim_y=3, rho=0.0).mi == 0.0
    for kwargs, fault in [
        ({"rho": 1.0, "dim_x": 2, "dim_y": 2}, "|rho| < 1, got 1.0"),
        ({"rho": 0.5, "dim_x": 0, "dim_y": 2}, "dim_x=0"),
    ]:
        with pytest.raises(ValueError, match=re.escape(fault)):
            gaussian_pair(10, **kwargs)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        gaussian_pair(0, dim_x=1, dim_y=1, rho=0.1)


def test_gaussian_mi_and_sampler_against_reference():
    a = torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cov = a @ a.T + 0.5 * torch.eye(5, dtype=torch.float64)
    c = cov.numpy()
    expected = 0.5 * math.log(
        np.linalg.det(c[:2, :2]) * np.linalg.det(c[2:, 2:]) / np.linalg.det(c)
    )
    assert gaussian_mi(cov, 2) == pytest.approx(expected, rel=1e-10)
    assert gaussian_mi(np.eye(3), 1) == 0.0
    samples = sample_gaussian(cov, 100_000, seed=0)
    torch.testing.assert_close(torch.cov(samples.T), cov, rtol=0.05, atol=0.05)
    assert torch.equal(sample_gaussian(cov, 10, seed=3), sample_gaussian(cov, 10, seed=3))
    with pytest.raises(ValueError, match="not positive definite"):
        gaussian_mi(-torch.eye(2), 1)


# --- ImageDataset, BatchLoader, splits ----------------------------------------------------------


def vector_dataset(n: int, *, augment: bool = False) -> ImageDataset:
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)
    return ImageDataset(x, torch.arange(n) % 3, num_classes=3, name="toy", augment=augment)


def test_registry_and_arguments():
    assert data.list_datasets() == [
        "cifar10", "cifar100", "digits", "fashion-mnist",
        "fashion-mnist-deformed", "mnist", "synthetic",
    ]  # fmt: skip
    with pytest.raises(UnknownNameError, match="valid datasets: cifar10, cifar100, digits"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="channels must be None, 1 or 3, got 2"):
        load_dataset("digits", channels=2)
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
        load_dataset("digits", split="val")
    ds = vector_dataset(4)
    assert len(ds) == 4 and ds[2][0].tolist() == [2.0] * 3 and int(ds[2][1]) == 2
    with pytest.raises(ValueError, match=r"\(3, 2\), \(4,\)"):
        ImageDataset(torch.zeros(3, 2), torch.zeros(4), num_classes=2, name="bad")


def test_loader_covers_each_sample_once_and_is_seeded():
    ds = vector_dataset(23)
    loader = BatchLoader(ds, batch_size=5, shuffle=True, seed=7)
    assert len(loader) == 5
    epoch1 = [x[:, 0].long() for x, _ in loader]
    epoch2 = [x[:, 0].long() for x, _ in loader]
    for epoch in (epoch1, epoch2):
        assert [len(b) for b in epoch] == [5, 5, 5, 5, 3]
        assert torch.equal(torch.cat(epoch).sort().values, torch.arange(23))
    assert not torch.equal(torch.cat(epoch1), torch.cat(epoch2))
    again = BatchLoader(ds, batch_size=5, shuffle=True, seed=7)
    assert all(torch.equal(a, b[:, 0].long()) for a, (b, _) in zip(epoch1, again, strict=True))
    other = torch.cat([x[:, 0] for x, _ in BatchLoader(ds, batch_size=5, shuffle=True, seed=8)])
    assert not torch.equal(other.long(), torch.cat(epoch1))
    xs, ys = zip(*BatchLoader(ds, batch_size=5, drop_last=True), strict=True)
    assert len(xs) == 4 and torch.equal(torch.cat(ys), torch.arange(20) % 3)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        BatchLoader(ds, batch_size=0)
    with pytest.raises(ValueError, match="augment needs images"):
        BatchLoader(ds, batch_size=2, augment=True)


def test_augmentation_is_a_crop_or_flip_of_the_padded_batch():
    image = torch.arange(3 * 32 * 32, dtype=torch.float32).view(3, 32, 32) + 1  # asymmetric
    ds = ImageDataset(image.expand(16, -1, -1, -1), torch.zeros(16, dtype=torch.long),
                      num_classes=1, name="same", augment=True)  # fmt: skip
    out, y = next(iter(BatchLoader(ds, batch_size=16, augment=True)))
    out2, _ = next(iter(BatchLoader(ds, batch_size=16, augment=True)))
    assert out.shape == (16, 3, 32, 32) and torch.equal(y, ds.y) and torch.equal(out, out2)
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
    crops = [
        padded[:, i : i + 32, j : j + 32].flip(-1) if f else padded[:, i : i + 32, j : j + 32]
        for i in range(9) for j in range(9) for f in (False, True)
    ]  # fmt: skip
    candidates = torch.stack(crops).flatten(1)  # (162, 3072)
    matches = (out.flatten(1)[:, None] == candidates[None]).all(-1)
    assert matches.any(1).all()  # every output is a crop or flipped crop
    assert not torch.equal(out, image.expand_as(out))  # and augmentation really happened
    assert matches.nonzero()[:, 1].remainder(2).unique().tolist() == [0, 1]  # both flips seen
    # no padding: each output is the image or its mirror image, exactly
    flipped = random_crop_flip(image.expand(16, -1, -1, -1), padding=0,
                               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert all(torch.equal(o, image) or torch.equal(o, image.flip(-1)) for o in flipped)


def test_train_val_split():
    ds = vector_dataset(50)
    train, val = train_val_split(ds, val_fraction=0.2, seed=1)
    assert (len(train), len(val)) == (40, 10)
    both = torch.cat([train.indices, val.indices]).sort().values
    assert torch.equal(both, torch.arange(50))
    assert torch.equal(train.x, ds.x[train.indices]) and torch.equal(val.y, ds.y[val.indices])
    assert torch.equal(train_val_split(ds, val_fraction=0.2, seed=1)[1].indices, val.indices)
    assert not torch.equal(train_val_split(ds, val_fraction=0.2, seed=2)[1].indices, val.indices)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=f"val_fraction must be in \\(0, 1\\), got {bad}"):
            train_val_split(ds, val_fraction=bad)


def test_calibration_subset():
    ds = vector_dataset(50, augment=True)
    train, _ = train_val_split(ds, val_fraction=0.2, seed=0)
    calib = calibration_subset(train, 10, seed=3)
    assert len(calib) == 10 and not calib.augment and train.augment
    assert torch.equal(calib.indices, calib.indices.unique())  # sorted, distinct
    assert torch.equal(calib.x, ds.x[calib.indices])  # indices refer to the loaded dataset
    assert set(calib.indices.tolist()) <= set(train.indices.tolist())
    assert torch.equal(calibration_subset(train, 10, seed=3).indices, calib.indices)
    assert not torch.equal(calibration_subset(train, 10, seed=4).indices, calib.indices)
    with pytest.raises(ValueError, match=r"1\.\.40 \(dataset size\), got n=41"):
        calibration_subset(train, 41)
    with pytest.raises(ValueError, match="got n=0"):
        calibration_subset(train, 0)


def test_calibration_subset_stratified_keeps_proportions():
    y = torch.tensor([0] * 30 + [1] * 15 + [2] * 5)
    ds = ImageDataset(torch.zeros(50, 2), y, num_classes=3, name="imbalanced")
    calib = calibration_subset(ds, 10, seed=0, stratified=True)
    assert torch.bincount(calib.y, minlength=3).tolist() == [6, 3, 1]
    calib = calibration_subset(ds, 7, seed=0, stratified=True)  # quotas 4.2, 2.1, 0.7
    assert torch.bincount(calib.y, minlength=3).tolist() == [4, 2, 1]


# --- the real Fashion-MNIST (Debian package dataset-fashion-mnist) ------------------------------


@pytest.mark.data
def test_real_fashion_mnist():
    root = data.DEBIAN_DATA_DIRS["fashion-mnist"]
    train = load_dataset("fashion-mnist", split="train", root=root)
    test = load_dataset("fashion-mnist", split="test", root=root)
    assert (len(train), len(test)) == (60_000, 10_000)
    assert train.x.shape[1:] == (1, 28, 28) and train.num_classes == 10
    assert torch.bincount(train.y).tolist() == [6000] * 10
    assert abs(train.x.mean().item()) < 0.01 and abs(train.x.std().item() - 1) < 0.01
