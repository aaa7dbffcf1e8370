"""In-memory datasets, the dataset registry, seeded splits and the vectorised batch loader."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mipp.errors import InvalidOptionError
from mipp.registry import lookup
from mipp.zoo.data.deform import deform_images
from mipp.zoo.data.readers import (
    Split,
    StrPath,
    _check_split,
    load_cifar,
    load_digits_arrays,
    load_mnist_like,
)
from mipp.zoo.data.synthetic import make_separable

# ---------------------------------------------------------------------------------------------
# In-memory datasets
# ---------------------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """A whole dataset in memory: ``x`` float32 (n, c, h, w) (or (n, d) vectors), ``y`` int64.

    ``augment`` says whether CIFAR-style augmentation suits the data (applied by
    :class:`BatchLoader`, never by ``__getitem__``). ``indices`` (int64, or None for a loaded
    dataset) are the positions of the samples in the dataset originally loaded.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        num_classes: int,
        name: str,
        augment: bool = False,
        indices: torch.Tensor | None = None,
    ) -> None:
        if x.ndim not in (2, 4) or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"need x (n, d) or (n, c, h, w) and y (n,), got {tuple(x.shape)}, {tuple(y.shape)}"
            )
        self.x, self.y = x, y.long()
        self.num_classes, self.name = num_classes, name
        self.augment, self.indices = augment, indices

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, n={len(self)}, x={tuple(self.x.shape[1:])}, "
            f"num_classes={self.num_classes}, augment={self.augment})"
        )

    @property
    def in_channels(self) -> int:
        """Channels c of image data; the feature count d for vector data."""
        return self.x.shape[1]

    @property
    def input_size(self) -> int | None:
        """Image height h (images are square here); None for vector data."""
        return self.x.shape[2] if self.x.ndim == 4 else None

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageDataset:
        """The samples at ``indices`` (positions in this dataset), as a new dataset."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        root_idx = idx if self.indices is None else self.indices[idx]
        return ImageDataset(
            self.x[idx],
            self.y[idx],
            num_classes=self.num_classes,
            name=self.name,
            augment=self.augment,
            indices=root_idx,
        )


@dataclass(frozen=True)
class DatasetInfo:
    """Registry entry: ``load(split, root)`` returns raw images and int64 labels.

    Raw images are uint8 in 0..255 (n, h, w) or (n, c, h, w), or float in [0, 1]; vector
    datasets (``size`` None) return float32 (n, d) features used as they are.
    """

    num_classes: int
    channels: int
    size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    load: Callable[[Split, StrPath | None], tuple[torch.Tensor, torch.Tensor]]


_DIGITS_SPLIT_SEED = 0


def _load_digits(split: Split, root: StrPath | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits has no official split: a seeded permutation puts 359 (1/5) samples in test."""
    images, labels = load_digits_arrays()
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_DIGITS_SPLIT_SEED))
    n_test = len(labels) // 5
    idx = (perm[n_test:] if split == "train" else perm[:n_test]).sort().values
    return images[idx], labels[idx]


_SYNTHETIC_SIZES = {"train": 10_000, "test": 2_000}


def _load_synthetic(split: Split, root: StrPath | None) -> tuple[torch.Tensor, torch.Tensor]:
    return make_separable(_SYNTHETIC_SIZES[split], seed=0 if split == "train" else 1)


def _mnist_loader(name: Literal["mnist", "fashion-mnist"]) -> Callable:
    return lambda split, root: load_mnist_like(name, split=split, root=root)


_DEFORMED_SEEDS = {"train": 0, "test": 1}


def _load_fashion_deformed(split: Split, root: StrPath | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST's files, each image in [0, 1] deformed by :func:`deform_images` with the
    default parameters and seed 0 (train) / 1 (test): float32 (n, 1, 28, 28), nothing cached.
    """
    images, labels = load_mnist_like("fashion-mnist", split=split, root=root)
    x = images.unsqueeze(1).float() / 255.0
    return deform_images(x, seed=_DEFORMED_SEEDS[split]), labels


def _cifar_loader(name: Literal["cifar10", "cifar100"]) -> Callable:
    return lambda split, root: load_cifar(name, split=split, root=root)


# Mean / std per channel of each training split, in [0, 1] pixel units. "fashion-mnist-deformed":
# measured once, in float64 over every pixel of the deformed 60k x 28 x 28 train split before
# padding (0.27372 / 0.33765; the undeformed split gives 0.28604 / 0.35302).
DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(10, 1, 28, (0.2860,), (0.3530,), False,
                                 _mnist_loader("fashion-mnist")),
    "fashion-mnist-deformed": DatasetInfo(10, 1, 28, (0.2737,), (0.3376,), False,
                                          _load_fashion_deformed),
    "mnist": DatasetInfo(10, 1, 28, (0.1307,), (0.3081,), False, _mnist_loader("mnist")),
    "cifar10": DatasetInfo(10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                           True, _cifar_loader("cifar10")),
    "cifar100": DatasetInfo(100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                            True, _cifar_loader("cifar100")),
    "digits": DatasetInfo(10, 1, 8, (0.3056,), (0.3761,), False, _load_digits),
    "synthetic": DatasetInfo(10, 32, None, (), (), False, _load_synthetic),
}  # fmt: skip


_DESCRIPTIONS = {
    "fashion-mnist": "Fashion-MNIST, 60k/10k grey 28x28, 10 classes (IDX files; Debian "
    "package dataset-fashion-mnist)",
    "fashion-mnist-deformed": "Fashion-MNIST with a fixed random affine + elastic deformation "
    "per image (seeded)",
    "mnist": "MNIST digits, 60k/10k grey 28x28, 10 classes (IDX files)",
    "cifar10": "CIFAR-10, 50k/10k colour 32x32, 10 classes (python pickle batches)",
    "cifar100": "CIFAR-100, 50k/10k colour 32x32, 100 fine classes (python pickle batches)",
    "digits": "scikit-learn's bundled 8x8 digits, 1,797 images, seeded 80/20 split",
    "synthetic": "separable Gaussian clusters, 32-dim vectors, 10 classes, 10k/2k",
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(DATASETS)


def describe_dataset(name: str) -> str:
    """One line describing dataset ``name`` (for ``mipp list``)."""
    lookup(DATASETS, name, kind="dataset")
    return _DESCRIPTIONS[name]


def load_dataset(
    name: str,
    *,
    split: Split = "train",
    root: StrPath | None = None,
    pad_to_32: bool = False,
    channels: Literal[1, 3] | None = None,
    normalize: bool = True,
) -> ImageDataset:
    """Load a dataset from :data:`DATASETS` into memory, ready for training.

    Images become float32 (n, c, h, w), scaled to [0, 1] and, if ``normalize``, standardised
    per channel with the training split's mean / std. ``pad_to_32`` zero-pads 28x28 images by
    2 pixels each side (before normalising; a no-op for 32x32 images). ``channels=3`` repeats
    a grey channel three times. "fashion-mnist-deformed" reads Fashion-MNIST's files and
    deforms each raw image in [0, 1] (before padding and normalising) with
    :func:`~mipp.zoo.data.deform.deform_images`, default parameters, seed 0 for train and 1 for
    test, recomputed at every load (a few seconds for train; nothing is cached on disk); its
    mean / std are constants measured once on the deformed train split, as for the others.
    "digits" uses its own seeded 80/20 split (1438 / 359);
    "synthetic" is :func:`make_separable` vectors (n, 32), train and test drawn with different
    seeds. ``root`` is ignored by those two, which need no files.
    """
    info = lookup(DATASETS, name, kind="dataset")
    _check_split(split)
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
    images, labels = info.load(split, root)
    if info.size is None:
        if pad_to_32 or channels is not None:
            raise ValueError(f"{name!r} is vector data: pad_to_32 and channels do not apply")
        return ImageDataset(images.float(), labels, num_classes=info.num_classes, name=name)
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if pad_to_32 and x.shape[-1] != 32:
        if x.shape[-1] != 28:
            raise ValueError(f"pad_to_32 applies to 28x28 images; {name!r} is {x.shape[-1]}px")
        x = F.pad(x, (2, 2, 2, 2))
    if normalize:
        mean = torch.tensor(info.mean).view(1, -1, 1, 1)
        x = (x - mean) / torch.tensor(info.std).view(1, -1, 1, 1)
    if channels is not None and channels != x.shape[1]:
        if channels == 1:
            raise ValueError(f"{name!r} has 3 channels; converting to 1 is not supported")
        x = x.expand(-1, 3, -1, -1)
    return ImageDataset(
        x.contiguous(), labels, num_classes=info.num_classes, name=name, augment=info.augment
    )


# ---------------------------------------------------------------------------------------------
# Batching, augmentation and subsets
# ---------------------------------------------------------------------------------------------


def random_crop_flip(
    x: torch.Tensor, *, generator: torch.Generator, padding: int = 4
) -> torch.Tensor:
    """Standard CIFAR augmentation of a batch x (b, c, h, w): zero-pad by ``padding``, take a
    random h x w crop per sample and flip it horizontally with probability 1/2.

    Zero padding is applied to the (normalised) batch, i.e. the border is the mean colour.
    """
    b, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = oy[:, None] + torch.arange(h)  # (b, h)
    cols = torch.arange(w).expand(b, w)
    cols = ox[:, None] + torch.where(flip[:, None], (w - 1) - cols, cols)  # (b, w)
    batch = torch.arange(b)[:, None, None, None]
    chans = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence((seed, epoch)).generate_state(1, dtype=np.uint64)[0] >> 1)


class BatchLoader:
    """Iterate over (x, y) batches of an in-memory :class:`ImageDataset` by tensor indexing.

    Epoch k (counted by ``epoch``, advanced at each ``iter()``) shuffles with a generator seeded
    from ``(seed, k)``: successive epochs differ, loaders with equal seeds agree. ``augment``
    applies :func:`random_crop_flip` to each image batch with the same generator.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        *,
        batch_size: int,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if augment and dataset.x.ndim != 4:
            raise ValueError(f"augment needs images (n, c, h, w), got {tuple(dataset.x.shape)}")
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.augment, self.seed, self.drop_last = augment, seed, drop_last
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        self.epoch += 1
        n = len(self.dataset)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.dataset.x[idx]
            if self.augment:
                x = random_crop_flip(x, generator=gen)
            yield x, self.dataset.y[idx]


def train_val_split(
    dataset: ImageDataset, *, val_fraction: float = 0.1, seed: int = 0
) -> tuple[ImageDataset, ImageDataset]:
    """Seeded disjoint split covering ``dataset``; val has round(n * val_fraction) samples.

    Both parts keep their samples in the original order.
    """
    if not 0 < val_fraction < 1:
        raise InvalidOptionError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(dataset)
    n_val = round(n * val_fraction)
    if not 0 < n_val < n:
        raise InvalidOptionError(
            f"val_fraction={val_fraction} of {n} samples leaves a part empty; give a fraction "
            f"that rounds to between 1 and {n - 1} validation samples (e.g. 0.1)"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return dataset.subset(perm[n_val:].sort().values), dataset.subset(perm[:n_val].sort().values)


def calibration_subset(
    dataset: ImageDataset, n: int, *, seed: int = 0, stratified: bool = False
) -> ImageDataset:
    """A fixed seeded subset of ``n`` samples (sorted; see ``.indices``), with augment off.

    ``stratified`` keeps class proportions (largest-remainder rounding of n * p_c).
    """
    if not 1 <= n <= len(dataset):
        raise ValueError(f"n must be in 1..{len(dataset)} (dataset size), got n={n}")
    gen = torch.Generator().manual_seed(seed)
    if stratified:
        counts = torch.bincount(dataset.y, minlength=dataset.num_classes)
        quota = counts.double() * n / len(dataset)
        take = quota.floor().long()
        remainder = quota - take
        take[remainder.argsort(descending=True, stable=True)[: n - int(take.sum())]] += 1
        parts = []
        for c in torch.nonzero(take).flatten().tolist():
            members = torch.nonzero(dataset.y == c).flatten()
            parts.append(members[torch.randperm(len(members), generator=gen)[: take[c]]])
        idx = torch.cat(parts)
    else:
        idx = torch.randperm(len(dataset), generator=gen)[:n]
    subset = dataset.subset(idx.sort().values)
    subset.augment = False
    return subset
