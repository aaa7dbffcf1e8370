"""Streaming readers for ImageNet-style image folders, decoded one image at a time with Pillow.

Nothing here downloads and nothing holds the dataset in memory: :class:`ImageFolderDataset`
lists the image files once and decodes image ``i`` when it is asked for. Two layouts:

- ``"imagenet"``: ``root/<split>/<class>/*.JPEG`` (also ``.jpg``, ``.jpeg``, ``.png``, any
  case), the usual layout of ILSVRC-2012 once its validation images are sorted into class
  folders. The classes are the sorted sub-folders of ``root/train``, for both splits.
- ``"tinyimagenet"`` (the TinyImageNet-200 release): ``root/train/<wnid>/images/*.JPEG``;
  ``root/val/images/*.JPEG`` labelled by ``root/val/val_annotations.txt`` (tab-separated
  filename, wnid, then a box). The classes are the sorted lines of ``root/wnids.txt`` if it
  exists, else the sorted sub-folders of ``root/train``.

Train-time augmentation (random resized crop + horizontal flip) draws from a generator seeded
by ``(seed, epoch, index)``, so an item depends on nothing else: not on the order items are
read in, nor on how many DataLoader workers read them. :func:`folder_loader` batches a dataset
with a :class:`~torch.utils.data.DataLoader` that moves to the next epoch at each pass.

>>> import tempfile
>>> from pathlib import Path
>>> from PIL import Image
>>> tmp = tempfile.TemporaryDirectory()
>>> for split in ("train", "val"):
...     for name, colour in (("dog", "blue"), ("cat", "red")):
...         (Path(tmp.name) / split / name).mkdir(parents=True)
...         Image.new("RGB", (40, 30), colour).save(Path(tmp.name) / split / name / "0.png")
>>> ds = ImageFolderDataset(tmp.name, split="val", size=16)
>>> ds.classes, len(ds)
(['cat', 'dog'], 2)
>>> x, y = next(iter(folder_loader(ds, batch_size=2)))
>>> tuple(x.shape), x.dtype, y.tolist()
((2, 3, 16, 16), torch.float32, [0, 1])
>>> tmp.cleanup()
"""

from __future__ import annotations

import copy
import math
import operator
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mipp.errors import CorruptDatasetError, DatasetNotFoundError, InvalidOptionError
from mipp.registry import lookup
from mipp.zoo.data.datasets import _epoch_seed
from mipp.zoo.data.readers import StrPath

__all__ = [
    "FOLDER_DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "FolderDatasetInfo",
    "ImageFolderDataset",
    "find_folder_root",
    "folder_loader",
    "load_folder_dataset",
    "random_resized_crop_box",
]

# Per-channel mean / std of ImageNet's training images, in [0, 1] pixel units (RGB order).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# File name endings read as images, compared in lower case.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpeg", ".jpg", ".png")

FolderSplit = Literal["train", "val"]
Layout = Literal["imagenet", "tinyimagenet"]
Sample = tuple[str, int]

_SPLITS = ("train", "val")
_BILINEAR = getattr(Image, "Resampling", Image).BILINEAR  # Pillow >= 9.1 and older spellings
_CROP_ATTEMPTS = 10

# ---------------------------------------------------------------------------------------------
# Listing the files
# ---------------------------------------------------------------------------------------------


def _subfolders(path: Path) -> list[str]:
    """Sorted names of the sub-folders of ``path``, hidden ones (``.name``) left out."""
    with os.scandir(path) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _image_files(path: Path) -> list[str]:
    """Sorted names of the image files directly in ``path`` (:data:`IMAGE_EXTENSIONS`)."""
    with os.scandir(path) as entries:
        return sorted(
            e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )


def _need_folder(path: Path, layout: str) -> None:
    if not path.is_dir():
        raise DatasetNotFoundError(
            f"{path}: no such folder; layout {layout!r} expects {_EXPECTED[layout]}"
        )


def _scan_imagenet(root: Path, split: str) -> tuple[list[str], list[Sample]]:
    train = root / "train"
    _need_folder(train, "imagenet")
    classes = _subfolders(train)
    if not classes:
        raise DatasetNotFoundError(
            f"{train}: no class folders; layout 'imagenet' expects {_EXPECTED['imagenet']}"
        )
    index = {name: i for i, name in enumerate(classes)}
    folder = root / split
    _need_folder(folder, "imagenet")
    samples: list[Sample] = []
    for name in _subfolders(folder):
        if name not in index:
            raise CorruptDatasetError(
                f"{folder / name}: class {name!r} is not among the {len(classes)} class "
                f"folders of {train}"
            )
        samples += [(str(folder / name / f), index[name]) for f in _image_files(folder / name)]
    return classes, samples


def _tiny_classes(root: Path) -> tuple[list[str], Path]:
    """The sorted wnids and the path they came from (``wnids.txt`` or the train folder)."""
    wnids = root / "wnids.txt"
    if wnids.is_file():
        classes = sorted({line.strip() for line in wnids.read_text().splitlines()} - {""})
        source = wnids
    else:
        source = root / "train"
        _need_folder(source, "tinyimagenet")
        classes = _subfolders(source)
    if not classes:
        raise DatasetNotFoundError(
            f"{source}: no class wnids; layout 'tinyimagenet' expects {_EXPECTED['tinyimagenet']}"
        )
    return classes, source


def _scan_tinyimagenet(root: Path, split: str) -> tuple[list[str], list[Sample]]:
    classes, source = _tiny_classes(root)
    index = {name: i for i, name in enumerate(classes)}
    if split == "train":
        train = root / "train"
        _need_folder(train, "tinyimagenet")
        samples: list[Sample] = []
        for name in _subfolders(train):
            if name not in index:
                raise CorruptDatasetError(
                    f"{train / name}: class {name!r} is not among the {len(classes)} classes "
                    f"of {source}"
                )
            images = train / name / "images"
            _need_folder(images, "tinyimagenet")
            samples += [(str(images / f), index[name]) for f in _image_files(images)]
        return classes, samples
    images = root / "val" / "images"
    _need_folder(images, "tinyimagenet")
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise DatasetNotFoundError(
            f"{annotations}: no such file; layout 'tinyimagenet' expects "
            f"{_EXPECTED['tinyimagenet']}"
        )
    present = set(_image_files(images))
    labels: dict[str, int] = {}
    for number, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        where = f"{annotations}, line {number}"
        if len(fields) < 2:
            raise CorruptDatasetError(
                f"{where}: expected tab-separated filename and wnid, got {line!r}"
            )
        filename, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise CorruptDatasetError(
                f"{where}: unknown class {wnid!r} for {filename!r}; not among the "
                f"{len(classes)} classes of {source}"
            )
        if filename not in present:
            raise DatasetNotFoundError(f"{where}: no image {filename!r} in {images}")
        if labels.setdefault(filename, index[wnid]) != index[wnid]:
            raise CorruptDatasetError(f"{where}: {filename!r} is labelled twice, differently")
    unlabelled = sorted(present - labels.keys())
    if unlabelled:
        raise CorruptDatasetError(
            f"{images / unlabelled[0]}: no label in {annotations} "
            f"({len(unlabelled)} of {len(present)} images have none)"
        )
    return classes, [(str(images / f), labels[f]) for f in sorted(labels)]


_EXPECTED = {
    "imagenet": "root/train/<class>/*.JPEG and root/val/<class>/*.JPEG",
    "tinyimagenet": "root/train/<wnid>/images/*.JPEG, root/val/images/*.JPEG and "
    "root/val/val_annotations.txt",
}
_LAYOUTS: dict[str, Callable[[Path, str], tuple[list[str], list[Sample]]]] = {
    "imagenet": _scan_imagenet,
    "tinyimagenet": _scan_tinyimagenet,
}

# ---------------------------------------------------------------------------------------------
# Transforms (Pillow + torch)
# ---------------------------------------------------------------------------------------------


def random_resized_crop_box(
    width: int,
    height: int,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """A random crop ``(left, top, w, h)`` of a ``width`` x ``height`` image (Inception-style).

    Up to 10 attempts draw an area fraction ``s ~ U(scale)`` and an aspect ratio ``r`` (w / h)
    log-uniform in ``ratio``, set ``w = round(sqrt(s * A * r))``, ``h = round(sqrt(s * A / r))``
    (A = width * height) and, the first time the box fits, place it uniformly at random. If
    none fits, the fallback is the centred crop of the largest box whose aspect ratio is the
    image's own clamped into ``ratio``.

    >>> rng = np.random.default_rng(0)
    >>> random_resized_crop_box(40, 30, scale=(1.0, 1.0), ratio=(2.0, 2.0), rng=rng)
    (0, 5, 40, 20)
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_CROP_ATTEMPTS):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    own = width / height
    if own < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif own > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _resize_centre_crop(image: Image.Image, *, resize: int, size: int) -> Image.Image:
    """Scale the shorter side to ``resize`` (aspect kept, the long side rounded), then cut the
    centred ``size`` x ``size`` square (an odd margin leaves the extra pixel right / below)."""
    width, height = image.size
    if width <= height:
        new = (resize, max(resize, round(height * resize / width)))
    else:
        new = (max(resize, round(width * resize / height)), resize)
    if new != image.size:
        image = image.resize(new, _BILINEAR)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def _open_rgb(path: str) -> Image.Image:
    """Decode ``path`` as 8-bit RGB (grey, palette and RGBA converted; alpha dropped)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise CorruptDatasetError(f"{path}: cannot decode image ({reason})") from err


def _check_pair(name: str, pair: Sequence[float], *, upper: float | None) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in pair)
    except (TypeError, ValueError):
        lo = hi = math.nan
    if not (0 < lo <= hi < math.inf and (upper is None or hi <= upper)):
        bound = f" <= {upper:g}" if upper is not None else ""
        raise InvalidOptionError(f"{name} must be (lo, hi) with 0 < lo <= hi{bound}, got {pair!r}")
    return lo, hi


def _check_channels(name: str, values: Sequence[float], *, positive: bool) -> torch.Tensor:
    try:
        t = torch.as_tensor(values, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        t = torch.empty(0)
    if t.shape != (3,) or not torch.isfinite(t).all() or (positive and not (t > 0).all()):
        kind = "3 positive numbers" if positive else "3 numbers"
        raise InvalidOptionError(f"{name} must be {kind} (one per RGB channel), got {values!r}")
    return t.view(3, 1, 1)


# ---------------------------------------------------------------------------------------------
# The dataset and its loader
# ---------------------------------------------------------------------------------------------


class ImageFolderDataset(Dataset):
    """Images in an ImageNet-style folder tree, decoded on demand (see the module docstring).

    Item ``i`` is ``(x, y)``: ``x`` float32 (3, size, size), RGB scaled to [0, 1] and, if
    ``normalize``, standardised per channel, ``(x - mean) / std``; ``y`` an int64 scalar, the
    index of the image's class in :attr:`classes` (sorted names).

    ``augment`` (default: ``split == "train"``) picks the transform. With it: a random crop
    from :func:`random_resized_crop_box` (area fraction in ``scale``, aspect ratio w / h in
    ``ratio``) resized to size x size (bilinear), then a horizontal flip with probability 1/2,
    all drawn from a generator seeded by ``(seed, epoch, i)`` (:meth:`set_epoch`). Without it:
    the shorter side resized to ``resize`` (default ``round(size / 0.875)``, 256 for 224), then
    the centred size x size crop. ``augment=False`` on the train split gives deterministic
    images, e.g. for calibration data.

    Attributes: ``classes`` (list[str]), ``num_classes``, ``samples`` (list of (path, label),
    sorted by class then file name; TinyImageNet val by file name), ``name`` (the layout),
    ``in_channels`` (3), ``input_size`` (``size``), ``epoch``.

    Errors, each one line: :class:`~mipp.errors.DatasetNotFoundError` (a FileNotFoundError) for
    a missing root, split folder or annotation file, or no images;
    :class:`~mipp.errors.CorruptDatasetError` (a ValueError) for a class folder or annotation
    naming a class not in the class list, and, when the item is read, for an image that does
    not decode; :class:`~mipp.errors.UnknownNameError` /
    :class:`~mipp.errors.InvalidOptionError` (ValueErrors) for bad options.
    """

    in_channels = 3

    def __init__(
        self,
        root: StrPath,
        *,
        split: FolderSplit = "train",
        layout: Layout = "imagenet",
        size: int = 224,
        resize: int | None = None,
        augment: bool | None = None,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        normalize: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        seed: int = 0,
    ) -> None:
        scan = lookup(_LAYOUTS, layout, kind="layout")
        if split not in _SPLITS:
            raise InvalidOptionError(f"split must be 'train' or 'val', got {split!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InvalidOptionError(f"size must be an integer >= 1, got {size!r}")
        resize = round(size / 0.875) if resize is None else resize
        if isinstance(resize, bool) or not isinstance(resize, int) or resize < size:
            raise InvalidOptionError(f"resize must be an integer >= size ({size}), got {resize!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InvalidOptionError(f"seed must be an integer >= 0, got {seed!r}")
        self.scale = _check_pair("scale", scale, upper=1.0)
        self.ratio = _check_pair("ratio", ratio, upper=None)
        self._mean = _check_channels("mean", mean, positive=False)
        self._std = _check_channels("std", std, positive=True)
        self.mean, self.std = tuple(mean), tuple(std)

        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetNotFoundError(
                f"{self.root}: no such folder; layout {layout!r} expects {_EXPECTED[layout]}"
            )
        self.classes, self.samples = scan(self.root, split)
        if not self.samples:
            raise DatasetNotFoundError(
                f"{self.root / split}: no images ({', '.join(IMAGE_EXTENSIONS)}, any case) "
                f"found; layout {layout!r} expects {_EXPECTED[layout]}"
            )
        self.name, self.split, self.size, self.resize = layout, split, size, resize
        self.augment = split == "train" if augment is None else bool(augment)
        self.normalize, self.seed, self.epoch = normalize, seed, 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_size(self) -> int:
        """Height = width of every image returned."""
        return self.size

    def set_epoch(self, epoch: int) -> None:
        """Draw the train-time augmentation of epoch ``epoch`` (>= 0) from now on."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise InvalidOptionError(f"epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = operator.index(i)
        n = len(self.samples)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} samples")
        i %= n
        path, label = self.samples[i]
        image = _open_rgb(path)
        flip = False
        if self.augment:
            rng = np.random.default_rng(np.random.SeedSequence((self.seed, self.epoch, i)))
            left, top, w, h = random_resized_crop_box(
                *image.size, scale=self.scale, ratio=self.ratio, rng=rng
            )
            box = (left, top, left + w, top + h)
            image = image.resize((self.size, self.size), _BILINEAR, box=box)
            flip = bool(rng.random() < 0.5)
        else:
            image = _resize_centre_crop(image, resize=self.resize, size=self.size)
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
        if flip:
            x = x.flip(-1)
        if self.normalize:
            x = (x - self._mean) / self._std
        return x.contiguous(), torch.tensor(label, dtype=torch.int64)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageFolderDataset:
        """The same reader over ``samples[i]`` for ``i`` in ``indices`` (in that order); the
        item index that seeds the augmentation is the position in the subset."""
        idx = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
        out = copy.copy(self)
        out.samples = [self.samples[i] for i in idx]
        return out

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset(root={str(self.root)!r}, layout={self.name!r}, "
            f"split={self.split!r}, n={len(self)}, num_classes={self.num_classes}, "
            f"size={self.size}, augment={self.augment})"
        )


class _EpochLoader(DataLoader):
    """A DataLoader whose k-th pass (k = 0, 1, ...) first calls ``dataset.set_epoch(k)`` (if
    the dataset has it) and reseeds its shuffling generator from ``(seed, k)``."""

    def __init__(self, dataset: Dataset, *, seed: int, **options: Any) -> None:
        super().__init__(dataset, generator=torch.Generator(), **options)
        self.seed, self.epoch = seed, 0

    def __iter__(self) -> Iterator[Any]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self.generator.manual_seed(_epoch_seed(self.seed, epoch))
        return super().__iter__()


def folder_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """Batches ``(x (b, 3, s, s) float32, y (b,) int64)`` of ``dataset`` (an
    :class:`ImageFolderDataset`), decoded by ``num_workers`` worker processes (0: in this one).

    Pass k over the loader (counted in ``loader.epoch``) sets ``dataset.set_epoch(k)`` and, if
    ``shuffle``, visits the items in an order drawn from ``(seed, k)``: passes differ, loaders
    with equal seeds agree, whatever ``num_workers``. The result is an iterable of (x, y)
    batches, as :func:`mipp.zoo.training.train` and :func:`mipp.prune` accept.

    Note that the loader sets the epoch of the dataset object it was given.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidOptionError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise InvalidOptionError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidOptionError(f"seed must be an integer >= 0, got {seed!r}")
    return _EpochLoader(
        dataset,
        seed=seed,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
    )


# ---------------------------------------------------------------------------------------------
# Named folder datasets: where their files are
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderDatasetInfo:
    """A named folder dataset: its ``layout``, default image ``size``, the sub-folders of
    ``$MIPP_DATA/<name>`` that may hold the tree (besides that folder itself) and a
    one-line ``description``."""

    layout: Layout
    size: int
    subdirs: tuple[str, ...]
    description: str


#: Folder datasets by name (``mipp list``, sweeps' ``grid.datasets``); the files are never
#: downloaded: put the tree under ``$MIPP_DATA/<name>`` or give its root.
FOLDER_DATASETS: dict[str, FolderDatasetInfo] = {
    "imagenet": FolderDatasetInfo(
        "imagenet",
        224,
        (),
        "ImageNet (ILSVRC-2012), 1,000 classes: train/ and val/ class folders of JPEGs, "
        "streamed (Pillow), 224 px",
    ),
    "tinyimagenet": FolderDatasetInfo(
        "tinyimagenet",
        64,
        ("tiny-imagenet-200",),
        "TinyImageNet-200, 100k/10k colour 64x64, 200 classes (its release layout), streamed",
    ),
}


def find_folder_root(name: str, root: StrPath | None = None) -> Path:
    """The root of folder dataset ``name``: ``root`` if given (and nowhere else), else the
    first of ``$MIPP_DATA/<name>`` and its :attr:`FolderDatasetInfo.subdirs` that has a
    ``train`` folder. :class:`~mipp.errors.DatasetNotFoundError` lists every place looked at."""
    info = lookup(FOLDER_DATASETS, name, kind="folder dataset")
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("MIPP_DATA")
    if not env:
        raise DatasetNotFoundError(
            f"{name}: $MIPP_DATA is not set and no root was given; put the "
            f"{_EXPECTED[info.layout]} tree in $MIPP_DATA/{name}/ or pass its root"
        )
    base = Path(env).expanduser() / name
    places = [base] + [base / sub for sub in info.subdirs]
    for place in places:
        if (place / "train").is_dir():
            return place
    raise DatasetNotFoundError(
        f"{name}: no train/ folder in {', '.join(str(p) for p in places)}; layout "
        f"{info.layout!r} expects {_EXPECTED[info.layout]} (nothing is downloaded)"
    )


def load_folder_dataset(
    name: str,
    *,
    split: FolderSplit = "train",
    root: StrPath | None = None,
    size: int | None = None,
    resize: int | None = None,
    augment: bool | None = None,
    seed: int = 0,
) -> ImageFolderDataset:
    """:class:`ImageFolderDataset` of the named folder dataset (:data:`FOLDER_DATASETS`),
    found by :func:`find_folder_root`; ``size`` defaults to the dataset's own (224 / 64)."""
    info = lookup(FOLDER_DATASETS, name, kind="folder dataset")
    return ImageFolderDataset(
        find_folder_root(name, root),
        split=split,
        layout=info.layout,
        size=info.size if size is None else size,
        resize=resize,
        augment=augment,
        seed=seed,
    )
