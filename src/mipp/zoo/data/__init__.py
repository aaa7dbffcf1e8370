"""Datasets: strict readers for local files, synthetic tasks, and in-memory batch loading.

Nothing here downloads. Image datasets are read from standard files on disk (IDX for MNIST /
Fashion-MNIST, python pickle batches for CIFAR), found by :func:`find_root`; every fault in
a file raises :class:`~mipp.errors.CorruptDatasetError` naming the file and the fault. A whole
dataset is held in memory as tensors (:class:`ImageDataset`) and batched by indexing
(:class:`BatchLoader`), with CIFAR-style augmentation vectorised over the batch. ImageNet-style
folders of JPEG / PNG files are streamed instead: :class:`ImageFolderDataset` decodes one image
at a time and :func:`folder_loader` batches it.

Synthetic data: :func:`make_separable` (an easy classification task) and
:func:`gaussian_pair` (Gaussian vectors with a closed-form mutual information, in nats).

>>> ds = load_dataset("synthetic", split="test")
>>> x, y = next(iter(BatchLoader(ds, batch_size=4)))
>>> tuple(x.shape), y.dtype
((4, 32), torch.int64)
"""

from __future__ import annotations

from mipp.zoo.data.datasets import (
    DATASETS,
    BatchLoader,
    DatasetInfo,
    ImageDataset,
    calibration_subset,
    describe_dataset,
    list_datasets,
    load_dataset,
    random_crop_flip,
    train_val_split,
)
from mipp.zoo.data.deform import deform_images, elastic_displacement, warp_images
from mipp.zoo.data.folders import (
    FOLDER_DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    find_folder_root,
    folder_loader,
    load_folder_dataset,
)
from mipp.zoo.data.readers import (
    DEBIAN_DATA_DIRS,
    find_root,
    load_cifar,
    load_digits_arrays,
    load_mnist_like,
    read_cifar_batch,
    read_idx,
)
from mipp.zoo.data.synthetic import (
    GaussianPair,
    gaussian_mi,
    gaussian_pair,
    make_separable,
    sample_gaussian,
)

__all__ = [
    "DATASETS",
    "DEBIAN_DATA_DIRS",
    "FOLDER_DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BatchLoader",
    "DatasetInfo",
    "GaussianPair",
    "ImageDataset",
    "ImageFolderDataset",
    "calibration_subset",
    "deform_images",
    "describe_dataset",
    "elastic_displacement",
    "find_folder_root",
    "find_root",
    "folder_loader",
    "gaussian_mi",
    "gaussian_pair",
    "list_datasets",
    "load_cifar",
    "load_dataset",
    "load_digits_arrays",
    "load_folder_dataset",
    "load_mnist_like",
    "make_separable",
    "random_crop_flip",
    "read_cifar_batch",
    "read_idx",
    "sample_gaussian",
    "train_val_split",
    "warp_images",
]
