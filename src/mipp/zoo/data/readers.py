"""Strict readers for dataset files on disk (IDX, CIFAR pickle batches) and dataset roots.

Nothing here downloads. Every fault in a file raises
:class:`~mipp.errors.CorruptDatasetError` naming the file and the fault; a dataset that is not
where we looked raises :class:`~mipp.errors.DatasetNotFoundError` listing where we looked.
"""

from __future__ import annotations

import codecs
import gzip
import math
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from mipp.errors import CorruptDatasetError, DatasetNotFoundError
from mipp.registry import lookup

Split = Literal["train", "test"]
StrPath = str | os.PathLike

# ---------------------------------------------------------------------------------------------
# Low-level readers
# ---------------------------------------------------------------------------------------------

# IDX dtype codes (http://yann.lecun.com/exdb/mnist/): all multi-byte types are big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_maybe_gzip(path: Path) -> bytes:
    """The bytes of ``path``, decompressed when it starts with the gzip magic ``1f 8b``."""
    if not path.is_file():
        raise DatasetNotFoundError(f"{path}: no such file")
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise CorruptDatasetError(f"{path}: truncated or corrupt gzip stream ({err})") from err


def read_idx(path: StrPath) -> torch.Tensor:
    """Read an IDX file (MNIST / Fashion-MNIST format), plain or gzipped.

    The header is ``00 00 <dtype code> <ndim>`` then ``ndim`` big-endian uint32 sizes; the data
    follow in C order. Returns a tensor of that shape in native byte order (``uint8`` for the
    usual code ``0x08``; also int8, int16, int32, float32, float64).
    """
    path = Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4:
        raise CorruptDatasetError(f"{path}: truncated header ({len(data)} bytes, need 4)")
    if data[:2] != b"\x00\x00":
        raise CorruptDatasetError(
            f"{path}: bad magic number {data[:4].hex(' ')}; "
            "expected 00 00 <dtype code> <ndim> (IDX format)"
        )
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        valid = ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        raise CorruptDatasetError(f"{path}: unknown IDX dtype code 0x{code:02x}; valid: {valid}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CorruptDatasetError(
            f"{path}: truncated header ({len(data)} bytes, need {header} for {ndim} dims)"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_DTYPES[code]
    count = math.prod(shape)
    expected, found = count * dtype.itemsize, len(data) - header
    if found != expected:
        raise CorruptDatasetError(
            f"{path}: expected {expected} bytes of data for shape {shape}, found {found}"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("=")))


# The globals a CIFAR batch (numpy arrays pickled by Python 2 or 3) may reference.
_NUMPY_CORE_GLOBALS = {
    ("multiarray", "_reconstruct"),
    ("multiarray", "scalar"),
    ("numeric", "_frombuffer"),  # pickle protocol 5
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and refuses every other global."""

    def find_class(self, module: str, name: str) -> object:
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):  # bytes pickled by Python 3, protocol 2
            return codecs.encode
        for package in ("numpy.core.", "numpy._core."):  # numpy < 2 and >= 2 spellings
            submodule = module.removeprefix(package)
            if module.startswith(package) and (submodule, name) in _NUMPY_CORE_GLOBALS:
                core = getattr(np, "_core", None) or np.core
                return getattr(getattr(core, submodule), name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def read_cifar_batch(
    path: StrPath, *, fine_labels: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one CIFAR-10 / CIFAR-100 python batch.

    A batch is a pickled dict with ``data`` (n, 3072) uint8, rows holding 1024 red, then 1024
    green, then 1024 blue pixels in row-major order, and ``labels`` (CIFAR-10) or
    ``fine_labels`` / ``coarse_labels`` (CIFAR-100; ``fine_labels`` picks which; CIFAR-10
    batches always use ``labels``). Only numpy arrays are unpickled; any other global is refused.

    Returns ``images`` uint8 (n, 3, 32, 32) and ``labels`` int64 (n,).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"{path}: no such file")
    try:
        with path.open("rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        OverflowError,
    ) as err:  # what malformed pickles raise
        raise CorruptDatasetError(f"{path}: not a readable CIFAR pickle ({err})") from err
    if not isinstance(batch, dict):
        raise CorruptDatasetError(f"{path}: expected a dict, found {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    wanted = ("fine_labels" if fine_labels else "coarse_labels", "labels")
    label_key = next((k for k in wanted if k in batch), None)
    if "data" not in batch or label_key is None:
        raise CorruptDatasetError(
            f"{path}: missing keys: need 'data' and one of {wanted}; "
            f"found keys {sorted(map(str, batch))}"
        )
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape[1:] != (3072,):
        found = getattr(data, "shape", type(data).__name__)
        raise CorruptDatasetError(f"{path}: data has shape {found}, expected uint8 (n, 3072)")
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise CorruptDatasetError(f"{path}: {label_key} are not integers ({err})") from err
    if labels.shape != (data.shape[0],):
        raise CorruptDatasetError(
            f"{path}: label count mismatch: {data.shape[0]} images, {label_key} has shape "
            f"{labels.shape}"
        )
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


# ---------------------------------------------------------------------------------------------
# Finding datasets on disk
# ---------------------------------------------------------------------------------------------

# System-wide locations (Debian packages); tests may patch this dict.
DEBIAN_DATA_DIRS: dict[str, Path] = {
    "fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),
    "mnist": Path("/usr/share/datasets/mnist"),
}

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class _Source:
    files: tuple[str, ...]  # required file names (``.gz`` variants accepted when gz_ok)
    subdir: str | None  # folder the official archive unpacks to; root may be its parent
    gz_ok: bool
    how_to_get: str


def _manual(name: str, what: str) -> str:
    return (
        f"{what}, and put them in $MIPP_DATA/{name}/ (or pass root=... / --data-root). "
        "mipp never downloads."
    )


_SOURCES: dict[str, _Source] = {
    "fashion-mnist": _Source(
        _MNIST_FILES, None, True,
        "install the Debian package (`apt-get install dataset-fashion-mnist`, files land in "
        "/usr/share/datasets/fashion-mnist), or "
        + _manual("fashion-mnist", f"get the standard files {', '.join(_MNIST_FILES)} (.gz ok)"),
    ),
    "mnist": _Source(
        _MNIST_FILES, None, True,
        _manual("mnist", f"download the standard files {', '.join(_MNIST_FILES)} (.gz ok)"),
    ),
    "cifar10": _Source(
        (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"), "cifar-10-batches-py", False,
        _manual("cifar10", "download cifar-10-python.tar.gz (www.cs.toronto.edu/~kriz/cifar"
                ".html), extract it (cifar-10-batches-py/data_batch_1..5, test_batch)"),
    ),
    "cifar100": _Source(
        ("train", "test"), "cifar-100-python", False,
        _manual("cifar100", "download cifar-100-python.tar.gz (www.cs.toronto.edu/~kriz/cifar"
                ".html), extract it (cifar-100-python/train, test)"),
    ),
}  # fmt: skip


def _missing_files(directory: Path, source: _Source) -> list[str]:
    def present(f: str) -> bool:
        return (directory / f).is_file() or (source.gz_ok and (directory / f"{f}.gz").is_file())

    return [f for f in source.files if not present(f)]


def find_root(name: str, root: StrPath | None = None) -> Path:
    """The directory holding the files of dataset ``name`` (mnist, fashion-mnist, cifar*).

    Looks in order at (1) ``root`` if given, and nowhere else; (2) ``$MIPP_DATA/<name>`` (read
    at call time); (3) the Debian location in :data:`DEBIAN_DATA_DIRS`. For CIFAR each place
    may be the batch directory itself or its parent (holding ``cifar-10-batches-py`` /
    ``cifar-100-python``). A place counts only if every expected file is there; otherwise
    :class:`~mipp.errors.DatasetNotFoundError` lists each place looked at and how to get it.
    """
    source = lookup(_SOURCES, name, kind="dataset")
    looked: list[str] = []

    def search(label: str, base: Path) -> Path | None:
        if not base.is_dir():
            looked.append(f"{label} {base}: no such directory")
            return None
        candidates = [base] + ([base / source.subdir] if source.subdir else [])
        for directory in candidates:
            if not directory.is_dir():
                looked.append(f"{label} {directory}: no such directory")
            elif missing := _missing_files(directory, source):
                looked.append(f"{label} {directory}: missing {', '.join(missing)}")
            else:
                return directory
        return None

    if root is not None:
        places = [("root", Path(root).expanduser())]
    else:
        env = os.environ.get("MIPP_DATA")
        places = [(f"$MIPP_DATA/{name}", Path(env).expanduser() / name)] if env else []
        if not env:
            looked.append("$MIPP_DATA: not set")
        if name in DEBIAN_DATA_DIRS:
            places.append(("Debian location", DEBIAN_DATA_DIRS[name]))
    for label, base in places:
        if (found := search(label, base)) is not None:
            return found
    note = " (root was given, so no other place was searched)" if root is not None else ""
    lines = "\n".join(f"  {i}. {entry}" for i, entry in enumerate(looked, 1))
    raise DatasetNotFoundError(
        f"dataset {name!r} not found{note}. Looked in, in order:\n{lines}\n"
        f"To get it: {source.how_to_get}"
    )


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def load_mnist_like(
    name: Literal["mnist", "fashion-mnist"], *, split: Split, root: StrPath | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 (n, 28, 28) and labels int64 (n,) in 0..9 of MNIST or Fashion-MNIST."""
    if name not in ("mnist", "fashion-mnist"):
        raise ValueError(f"name must be 'mnist' or 'fashion-mnist', got {name!r}")
    _check_split(split)
    directory = find_root(name, root)
    prefix = "train" if split == "train" else "t10k"

    def idx(base: str) -> tuple[Path, torch.Tensor]:
        path = directory / base
        path = path if path.is_file() else directory / f"{base}.gz"
        return path, read_idx(path)

    image_path, images = idx(f"{prefix}-images-idx3-ubyte")
    label_path, labels = idx(f"{prefix}-labels-idx1-ubyte")
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (28, 28):
        raise CorruptDatasetError(
            f"{image_path}: expected uint8 images (n, 28, 28), found {images.dtype} "
            f"{tuple(images.shape)}"
        )
    if labels.dtype != torch.uint8 or labels.ndim != 1:
        raise CorruptDatasetError(
            f"{label_path}: expected uint8 labels (n,), found {labels.dtype} {tuple(labels.shape)}"
        )
    if len(images) != len(labels):
        raise CorruptDatasetError(
            f"{directory}: {len(images)} images in {image_path.name} but {len(labels)} labels "
            f"in {label_path.name}"
        )
    if len(labels) and int(labels.max()) > 9:
        raise CorruptDatasetError(f"{label_path}: label {int(labels.max())} outside 0..9")
    return images, labels.long()


def load_cifar(
    name: Literal["cifar10", "cifar100"], *, split: Split, root: StrPath | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 (n, 3, 32, 32) and labels int64 (n,) of CIFAR-10 or CIFAR-100 (fine)."""
    if name not in ("cifar10", "cifar100"):
        raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")
    _check_split(split)
    directory = find_root(name, root)
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    else:
        files = [split]
    parts = [read_cifar_batch(directory / f, fine_labels=True) for f in files]
    images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    num_classes = 10 if name == "cifar10" else 100
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise CorruptDatasetError(
            f"{directory}: labels span {int(labels.min())}..{int(labels.max())}, "
            f"expected 0..{num_classes - 1}"
        )
    return images, labels


def load_digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits: images float32 (1797, 8, 8) in [0, 1], labels int64."""
    from sklearn.datasets import load_digits  # local: importing sklearn is slow

    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0).float()
    return images, torch.from_numpy(digits.target).long()
