"""Tests for mipp.zoo.data.deform and the "fashion-mnist-deformed" dataset.

Known answers: whole-pixel translations, shears and 90-degree turns land exactly on pixel
centres; an elastic field of constant displacement is a translation; the smoothing matches
scipy's Gaussian filter; mass scales by s^2 under a scale s.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch

from mipp.errors import DatasetNotFoundError
from mipp.zoo import data
from mipp.zoo.data import deform_images, elastic_displacement, load_dataset, warp_images

IDENTITY = dict(rotation=0.0, scale=(1.0, 1.0), shear=0.0, translate=0.0, elastic_alpha=0.0)


def rand_images(n: int, c: int = 1, h: int = 12, w: int = 12, *, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def warp(x: torch.Tensor, *, angle=0.0, scale=1.0, shear=0.0, shift=(0.0, 0.0), disp=None):
    """warp_images with the same parameters for every image."""
    n = len(x)
    full = lambda v: torch.full((n,), float(v), dtype=torch.float64)  # noqa: E731
    shifts = torch.tensor(shift, dtype=torch.float64).expand(n, 2)
    return warp_images(
        x, angle=full(angle), scale=full(scale), shear=full(shear), shift=shifts, displacement=disp
    )


def blob(size: int = 32, width: float = 3.0) -> torch.Tensor:
    """A centred Gaussian blob (1, 1, size, size), far from the border."""
    r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    return torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * width**2))[None, None]


# --- deform_images ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, dtype", [((6, 1, 12, 12), torch.float32), ((3, 2, 9, 14), torch.float64)]
)
def test_identity_parameters_return_the_input(shape, dtype):
    x = rand_images(*shape).to(dtype)
    y = deform_images(x, seed=5, **IDENTITY)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


def test_seeded_and_deterministic():
    x = rand_images(8)
    a, b, c = (deform_images(x, seed=s) for s in (0, 0, 1))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)
    assert not torch.allclose(a, x, atol=1e-3)


def test_per_image_deformation_independent_of_chunking_and_batch():
    x = rand_images(50)
    full = deform_images(x, seed=3)
    assert torch.equal(deform_images(x, seed=3, chunk=7), full)
    assert torch.equal(deform_images(x[:10], seed=3), full[:10])
    assert torch.equal(deform_images(x[:10], seed=3, chunk=3), full[:10])


def test_channels_move_together():
    x = rand_images(5, c=3)
    y = deform_images(x, seed=2)
    for k in range(3):
        torch.testing.assert_close(y[:, k : k + 1], deform_images(x[:, k : k + 1], seed=2))


def test_small_deformations_roughly_preserve_mass():
    x = blob().expand(20, 1, -1, -1)
    mass = x.sum((1, 2, 3))
    # rotation and shear have determinant 1: only interpolation changes the mass
    affine = dict(rotation=10.0, scale=(1.0, 1.0), shear=0.1, translate=0.05, elastic_alpha=0.0)
    moved = deform_images(x, seed=0, **affine).sum((1, 2, 3))
    torch.testing.assert_close(moved, mass, rtol=0.01, atol=0)
    # a weak elastic field changes the local area a little (its divergence is ~ alpha / 80 here)
    elastic = {**affine, "elastic_alpha": 1.0}
    moved = deform_images(x, seed=0, **elastic).sum((1, 2, 3))
    torch.testing.assert_close(moved, mass, rtol=0.05, atol=0)
    assert (deform_images(x, seed=0) >= 0).all()  # bilinear weights and zero padding


def test_empty_batch():
    x = torch.zeros(0, 1, 5, 5)
    assert deform_images(x, seed=0).shape == (0, 1, 5, 5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rotation=200.0), r"rotation must be a real number in \[0.0, 180.0\], got 200.0"),
        (dict(rotation=float("nan")), r"rotation .* got nan"),
        (dict(scale=(1.2, 0.8)), r"scale\[1\] must be a real number in \[1.2, inf\], got 0.8"),
        (dict(scale=(0.0, 1.0)), r"scale\[0\] must be a real number in \(0.0, inf\], got 0.0"),
        (dict(scale=1.0), r"scale must be a pair \(low, high\).*got 1.0"),
        (dict(shear=-0.1), r"shear must be .* got -0.1"),
        (dict(translate=1.5), r"translate must be a real number in \[0.0, 1.0\], got 1.5"),
        (dict(elastic_alpha=-1.0), r"elastic_alpha must be .* got -1.0"),
        (dict(elastic_sigma=0.0), r"elastic_sigma must be a real number in \(0.0, inf\], got 0"),
        (dict(chunk=0), r"chunk must be an int >= 1, got 0"),
        (dict(seed="a"), r"seed must be an int, got 'a'"),
    ],
)
def test_bad_arguments_named(kwargs, match):
    kwargs = {"seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        deform_images(rand_images(2), **kwargs)


def test_bad_images_named():
    with pytest.raises(ValueError, match=r"floating tensor, got torch.uint8"):
        deform_images(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), seed=0)
    with pytest.raises(ValueError, match=r"\(n, c, h, w\), got \(2, 4, 4\)"):
        deform_images(torch.zeros(2, 4, 4), seed=0)
    with pytest.raises(ValueError, match=r"shift must have shape \(2, 2\), got \(2,\)"):
        one = torch.ones(2)
        warp_images(rand_images(2), angle=one, scale=one, shear=one, shift=one)


# --- warp_images: known answers ---------------------------------------------------------------


def test_whole_pixel_translation_moves_a_pixel():
    x = torch.zeros(1, 1, 10, 13)
    x[0, 0, 4, 6] = 1.0
    y = warp(x, shift=(3.0, -2.0))  # 3 px right, 2 px up
    expected = torch.zeros_like(x)
    expected[0, 0, 2, 9] = 1.0
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)


def test_shift_off_the_image_gives_zeros():
    assert warp(rand_images(2), shift=(12.0, 0.0)).abs().max() < 1e-6


def test_rotation_by_90_degrees_is_rot90_counter_clockwise():
    x = rand_images(3, c=2, h=7, w=7)
    torch.testing.assert_close(warp(x, angle=90.0), torch.rot90(x, 1, (-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        warp(x, angle=-90.0), torch.rot90(x, -1, (-2, -1)), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(warp(x, angle=180.0), x.flip(-1, -2), atol=1e-5, rtol=0)
    x8 = rand_images(2, h=8, w=8)  # even side: the centre lies between pixels
    torch.testing.assert_close(
        warp(x8, angle=90.0), torch.rot90(x8, 1, (-2, -1)), atol=1e-5, rtol=0
    )


def test_shear_moves_x_by_h_times_y():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 6, 4] = 1.0  # (x, y) = (0, 2) from the centre (4, 4)
    expected = torch.zeros_like(x)
    expected[0, 0, 6, 6] = 1.0  # x + 1.0 * y = 2
    torch.testing.assert_close(warp(x, shear=1.0), expected, atol=1e-5, rtol=0)


def test_scale_multiplies_mass_by_its_square():
    x = blob()
    for s in (0.8, 1.25):
        ratio = warp(x, scale=s).sum() / x.sum()
        assert abs(ratio.item() - s**2) < 0.01 * s**2


def test_constant_displacement_is_a_translation():
    x = rand_images(2, h=10, w=10)
    disp = torch.empty(2, 2, 10, 10)
    disp[:, 0], disp[:, 1] = -2.0, 1.0  # read 2 px to the left and 1 px below
    torch.testing.assert_close(warp(x, disp=disp), warp(x, shift=(2.0, -1.0)), atol=1e-5, rtol=0)


def test_elastic_field_matches_scipy_gaussian_filter():
    noise = torch.rand(3, 2, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    field = elastic_displacement(noise.double(), alpha=8.0, sigma=3.0)
    for i in range(3):
        for axis in range(2):
            ref = 8.0 * scipy.ndimage.gaussian_filter(
                noise[i, axis].double().numpy(), 3.0, mode="constant", truncate=4.0
            )
            np.testing.assert_allclose(field[i, axis].numpy(), ref, atol=1e-12)


# --- the "fashion-mnist-deformed" dataset -----------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))


@pytest.fixture
def tiny_fashion(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(
            tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8)
        )
    return tmp_path


def test_registered_and_described():
    assert "fashion-mnist-deformed" in data.list_datasets()
    line = data.describe_dataset("fashion-mnist-deformed")
    assert "affine + elastic" in line and "\n" not in line
    info = data.DATASETS["fashion-mnist-deformed"]
    assert (info.num_classes, info.channels, info.size) == (10, 1, 28)


def test_dataset_is_deformed_fashion_mnist(tiny_fashion):
    for split, seed in (("train", 0), ("test", 1)):
        plain = load_dataset("fashion-mnist", split=split, root=tiny_fashion, normalize=False)
        ds = load_dataset("fashion-mnist-deformed", split=split, root=tiny_fashion, normalize=False)
        assert ds.name == "fashion-mnist-deformed" and ds.x.dtype == torch.float32
        assert torch.equal(ds.y, plain.y)
        assert torch.equal(ds.x, deform_images(plain.x, seed=seed))
        assert ds.x.min() >= 0 and ds.x.max() <= 1


def test_dataset_padding_channels_and_normalisation(tiny_fashion):
    raw = load_dataset("fashion-mnist-deformed", root=tiny_fashion, normalize=False)
    ds = load_dataset("fashion-mnist-deformed", root=tiny_fashion, pad_to_32=True, channels=3)
    assert ds.x.shape == (12, 3, 32, 32) and ds.input_size == 32 and ds.in_channels == 3
    mean, std = 0.2737, 0.3376
    torch.testing.assert_close(ds.x[:, :, 2:30, 2:30], ((raw.x - mean) / std).expand(-1, 3, -1, -1))
    torch.testing.assert_close(ds.x[:, :, 0], torch.full((12, 3, 32), -mean / std))  # pad -> 0


def test_dataset_missing_files_explained_as_for_fashion_mnist(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist-deformed", split="test", root=tmp_path)
    message = str(info.value)
    assert "missing train-images-idx3-ubyte" in message and "t10k-images-idx3-ubyte" in message
    assert "apt-get install dataset-fashion-mnist" in message
    with pytest.raises(DatasetNotFoundError) as plain:
        load_dataset("fashion-mnist", split="test", root=tmp_path)
    assert str(plain.value) == message


@pytest.mark.data
def test_real_fashion_mnist_deformed():
    root = data.DEBIAN_DATA_DIRS["fashion-mnist"]
    train = load_dataset("fashion-mnist-deformed", split="train", root=root, normalize=False)
    test = load_dataset("fashion-mnist-deformed", split="test", root=root, normalize=False)
    assert (len(train), len(test)) == (60_000, 10_000)
    assert train.x.shape[1:] == (1, 28, 28) and test.x.shape[1:] == (1, 28, 28)
    plain_train = load_dataset("fashion-mnist", split="train", root=root, normalize=False)
    plain_test = load_dataset("fashion-mnist", split="test", root=root, normalize=False)
    assert torch.equal(train.y, plain_train.y) and torch.equal(test.y, plain_test.y)
    # nearly every image moved; the declared mean / std are those of the deformed train split
    moved = (train.x - plain_train.x).abs().amax((1, 2, 3)) > 0.1
    assert moved.float().mean() > 0.99
    assert abs(train.x.mean().item() - 0.2737) < 1e-3 and abs(train.x.std().item() - 0.3376) < 1e-3
    # determinism: a second load of test, and the first 500 train images deformed on their own
    again = load_dataset("fashion-mnist-deformed", split="test", root=root, normalize=False)
    assert torch.equal(again.x, test.x)
    assert torch.equal(deform_images(plain_train.x[:500], seed=0), train.x[:500])
