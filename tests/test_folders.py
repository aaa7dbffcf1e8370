"""Tests for mipp.zoo.data.folders: image-folder trees of tiny JPEG / PNG files written here."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mipp.errors import CorruptDatasetError, DatasetNotFoundError
from mipp.zoo.data import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset, folder_loader
from mipp.zoo.data.folders import random_resized_crop_box
from mipp.zoo.training import TrainConfig, evaluate, seeded, train

W, H = 40, 30  # every generated image is 40 wide, 30 high unless said otherwise

# class -> solid colour; created out of order so that sorting is what gives the indices
COLOURS = {
    "zebra": (30, 60, 90),
    "apple": (200, 30, 40),
    "mango": (250, 180, 20),
}
SORTED = ["apple", "mango", "zebra"]


def _save(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _solid(colour: tuple[int, int, int], size: tuple[int, int] = (W, H)) -> Image.Image:
    return Image.new("RGB", size, colour)


def _gradient(width: int = W, height: int = H, *, seed: int | None = None) -> Image.Image:
    """R = 6 * column, G = 8 * row, B = 100 (or, with ``seed``, random noise)."""
    if seed is not None:
        rng = np.random.default_rng(seed)
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    a = np.zeros((height, width, 3), dtype=np.uint8)
    a[..., 0] = 6 * np.arange(width)[None, :]
    a[..., 1] = 8 * np.arange(height)[:, None]
    a[..., 2] = 100
    return Image.fromarray(a)


def _normalised(rgb: tuple[int, ...]) -> torch.Tensor:
    """The normalised (3,) value of a pixel, computed as the dataset does."""
    x = torch.tensor(rgb, dtype=torch.float32) / 255.0
    return (x - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


def _pixels(image: Image.Image) -> torch.Tensor:
    """Image as float32 (3, h, w) in [0, 1]."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255.0


def imagenet_tree(root: Path) -> Path:
    """3 classes x 4 train images (PNG and JPEG, mixed-case extensions; apple's are exact PNGs),
    one grey PNG, one RGBA PNG and one palette PNG in mango, a text file to ignore; val has
    apple and zebra only."""
    for name, colour in COLOURS.items():
        folder = root / "train" / name
        if name == "mango":
            _save(folder / "m0.png", Image.new("L", (W, H), 180))
            _save(folder / "m1.PNG", Image.new("RGBA", (W, H), (*colour, 77)))
            palette = Image.new("P", (W, H), 1)
            palette.putpalette([0, 0, 0, *colour])
            _save(folder / "m2.png", palette)
            _save(folder / "m3.JPEG", _solid(colour))
        else:
            ext = (
                ("png", "PNG", "png", "Png") if name == "apple" else ("jpg", "JPEG", "jpeg", "png")
            )
            for k, e in enumerate(ext):
                _save(folder / f"{name[0]}{k}.{e}", _solid(colour))
        (folder / "notes.txt").write_text("not an image")
    _save(root / "val" / "apple" / "v0.png", _solid(COLOURS["apple"]))
    _save(root / "val" / "zebra" / "v1.png", _solid(COLOURS["zebra"]))
    return root


def gradient_tree(root: Path, *, width: int = W, height: int = H, n: int = 4) -> Path:
    """One class ``a`` of ``n`` noise PNGs in train (so crops differ visibly), the gradient PNG in
    val."""
    for k in range(n):
        _save(root / "train" / "a" / f"{k}.png", _gradient(width, height, seed=k))
    _save(root / "val" / "a" / "g.png", _gradient(width, height))
    return root


TINY_COLOURS = {"n01": (220, 40, 40), "n02": (40, 40, 220)}


def tiny_tree(root: Path, *, wnids: bool = True) -> Path:
    """TinyImageNet-200 layout: 2 wnids x 2 train JPEGs, 3 val JPEGs with annotations."""
    root.mkdir(parents=True, exist_ok=True)
    if wnids:
        (root / "wnids.txt").write_text("n02\nn01\n")
    for wnid, colour in TINY_COLOURS.items():
        for k in range(2):
            _save(root / "train" / wnid / "images" / f"{wnid}_{k}.JPEG", _solid(colour))
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    labels = {"val_0.JPEG": "n02", "val_1.JPEG": "n01", "val_2.JPEG": "n02"}
    for filename, wnid in labels.items():
        _save(root / "val" / "images" / filename, _solid(TINY_COLOURS[wnid]))
    lines = [f"{f}\t{w}\t0\t0\t39\t29" for f, w in reversed(labels.items())]
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


# --- listing -----------------------------------------------------------------------------------


def test_imagenet_classes_follow_sorted_names_for_both_splits(tmp_path):
    root = imagenet_tree(tmp_path)
    train = ImageFolderDataset(root, split="train", size=8)
    assert train.classes == SORTED and train.num_classes == 3
    assert len(train) == 12  # notes.txt ignored, extensions in any case
    assert [y for _, y in train.samples] == [0] * 4 + [1] * 4 + [2] * 4
    for path, y in train.samples:
        assert Path(path).parent.name == SORTED[y]
    assert (train.name, train.in_channels, train.input_size) == ("imagenet", 3, 8)
    val = ImageFolderDataset(root, split="val", size=8)
    assert val.classes == SORTED  # mango has no val folder, zebra keeps index 2
    assert [y for _, y in val.samples] == [0, 2]
    assert [int(val[i][1]) for i in range(2)] == [0, 2]


def test_tinyimagenet_val_annotations_give_the_labels(tmp_path):
    root = tiny_tree(tmp_path)
    val = ImageFolderDataset(root, split="val", layout="tinyimagenet", size=8, normalize=False)
    assert val.classes == ["n01", "n02"] and val.name == "tinyimagenet"
    assert [Path(p).name for p, _ in val.samples] == ["val_0.JPEG", "val_1.JPEG", "val_2.JPEG"]
    assert [y for _, y in val.samples] == [1, 0, 1]
    for i in range(3):
        x, y = val[i]
        assert y.dtype == torch.int64 and y.ndim == 0
        colour = torch.tensor(TINY_COLOURS[val.classes[int(y)]], dtype=torch.float32) / 255
        # the pixels are those of the labelled class's colour (JPEG: within a few levels)
        assert (x - colour.view(3, 1, 1)).abs().max() < 6 / 255
    train = ImageFolderDataset(root, split="train", layout="tinyimagenet", size=8)
    assert [y for _, y in train.samples] == [0, 0, 1, 1]
    assert all(Path(p).parent.name == "images" for p, _ in train.samples)


def test_tinyimagenet_classes_without_wnids_file_are_the_train_folders(tmp_path):
    root = tiny_tree(tmp_path, wnids=False)
    val = ImageFolderDataset(root, split="val", layout="tinyimagenet", size=8)
    assert val.classes == ["n01", "n02"]
    assert [y for _, y in val.samples] == [1, 0, 1]


# --- transforms --------------------------------------------------------------------------------


def test_val_transform_of_a_solid_colour_is_the_normalised_colour(tmp_path):
    root = imagenet_tree(tmp_path)
    ds = ImageFolderDataset(root, split="train", size=16, augment=False)
    assert ds.resize == round(16 / 0.875)
    for i in range(4):  # apple: PNGs, exact
        x, _ = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, 16, 16)
        expected = _normalised(COLOURS["apple"]).view(3, 1, 1).expand(3, 16, 16)
        torch.testing.assert_close(x, expected)
    for i in range(8, 12):  # zebra: JPEG and PNG, within JPEG error
        x, _ = ds[i]
        expected = _normalised(COLOURS["zebra"]).view(3, 1, 1)
        assert (x - expected).abs().max() < 4 / 255 / min(IMAGENET_STD)
    raw = ImageFolderDataset(root, split="train", size=16, augment=False, normalize=False)
    torch.testing.assert_close(raw[0][0][:, 0, 0], torch.tensor(COLOURS["apple"]) / 255.0)


def test_grey_rgba_and_palette_images_become_rgb(tmp_path):
    root = imagenet_tree(tmp_path)
    ds = ImageFolderDataset(root, split="train", size=8, augment=False, normalize=False)
    by_name = {Path(p).name: i for i, (p, _) in enumerate(ds.samples)}
    grey, _ = ds[by_name["m0.png"]]
    torch.testing.assert_close(grey, torch.full((3, 8, 8), 180 / 255))
    for name in ("m1.PNG", "m2.png"):  # alpha dropped; palette expanded
        x, _ = ds[by_name[name]]
        expected = (torch.tensor(COLOURS["mango"]) / 255.0).view(3, 1, 1).expand(3, 8, 8)
        torch.testing.assert_close(x, expected)


@pytest.mark.parametrize("size", [20, 19])
def test_val_centre_crop_geometry_on_a_gradient(tmp_path, size):
    """resize = 30 = the short side, so no resampling: the crop starts at ((40 - s) // 2,
    (30 - s) // 2) and the pixel values say which columns / rows were kept."""
    root = gradient_tree(tmp_path)
    ds = ImageFolderDataset(root, split="val", size=size, resize=30, normalize=False)
    x, _ = ds[0]
    left, top = (W - size) // 2, (H - size) // 2
    cols = torch.arange(left, left + size, dtype=torch.float32)
    rows = torch.arange(top, top + size, dtype=torch.float32)
    torch.testing.assert_close(x[0], (6 * cols / 255).expand(size, size))
    torch.testing.assert_close(x[1], (8 * rows / 255)[:, None].expand(size, size))
    torch.testing.assert_close(x[2], torch.full((size, size), 100 / 255))


def test_val_resize_scales_the_shorter_side(tmp_path):
    """A 40 x 30 gradient resized to short side 15 (20 x 15) and centre-cropped to 15: the crop
    drops 2 columns left, and matches Pillow's own resize of the whole image then that crop."""
    root = gradient_tree(tmp_path)
    ds = ImageFolderDataset(root, split="val", size=15, resize=15, normalize=False)
    x, _ = ds[0]
    reference = _pixels(_gradient().resize((20, 15), Image.Resampling.BILINEAR))[:, :, 2:17]
    torch.testing.assert_close(x, reference)


def test_train_items_are_reproducible_per_seed_epoch_and_index(tmp_path):
    root = gradient_tree(tmp_path, n=6)
    a = ImageFolderDataset(root, size=12, seed=3)
    b = ImageFolderDataset(root, size=12, seed=3)
    first = [a[i][0] for i in range(6)]
    for i in reversed(range(6)):  # the order of reading does not matter
        torch.testing.assert_close(b[i][0], first[i], rtol=0, atol=0)
    torch.testing.assert_close(a[-1][0], first[5], rtol=0, atol=0)
    a.set_epoch(1)
    assert a.epoch == 1
    assert not all(torch.equal(a[i][0], first[i]) for i in range(6))
    a.set_epoch(0)
    assert all(torch.equal(a[i][0], first[i]) for i in range(6))
    other_seed = ImageFolderDataset(root, size=12, seed=4)
    assert not all(torch.equal(other_seed[i][0], first[i]) for i in range(6))
    assert a.augment and not ImageFolderDataset(root, split="val", size=12).augment


def test_flip_is_an_exact_mirror_and_happens_about_half_the_time(tmp_path):
    """With scale (1, 1) and ratio 1 on square 16 x 16 images the crop is the whole image, so a
    train item is the image itself or its exact mirror."""
    root = gradient_tree(tmp_path, width=16, height=16, n=4)
    ds = ImageFolderDataset(root, size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), normalize=False)
    flips = 0
    for epoch in range(10):
        ds.set_epoch(epoch)
        for i, (path, _) in enumerate(ds.samples):
            with Image.open(path) as file:
                image = _pixels(file)
            x, _ = ds[i]
            if torch.equal(x, image.flip(-1)):
                flips += 1
            else:
                torch.testing.assert_close(x, image, rtol=0, atol=0)
    assert 8 <= flips <= 32  # of 40 fair coins: both kinds occur (the seed fixes the count)


def test_random_resized_crop_box_stays_in_range():
    rng = np.random.default_rng(0)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    areas = []
    for _ in range(500):
        left, top, w, h = random_resized_crop_box(W, H, scale=scale, ratio=ratio, rng=rng)
        assert left >= 0 and top >= 0 and w > 0 and h > 0 and left + w <= W and top + h <= H
        # w, h are rounded: the area and aspect ratio are within rounding of their ranges
        assert (w - 0.5) * (h - 0.5) / (W * H) <= scale[1]
        assert (w + 0.5) * (h + 0.5) / (W * H) >= scale[0]
        if (w, h) != (W, H):  # not the fallback (which is the whole image for 40 x 30)
            assert ratio[0] <= (w + 0.5) / (h - 0.5) and (w - 0.5) / (h + 0.5) <= ratio[1]
        areas.append(w * h / (W * H))
    assert min(areas) < 0.3 and max(areas) > 0.8


@pytest.mark.parametrize(
    ("scale", "ratio", "box"),
    [
        ((1.0, 1.0), (4 / 3, 4 / 3), (0, 0, 40, 30)),  # fits at once: the whole image
        ((1.0, 1.0), (2.0, 2.0), (0, 5, 40, 20)),  # never fits: centred, ratio clamped to 2
        ((1.0, 1.0), (0.5, 0.5), (12, 0, 15, 30)),  # never fits: centred, ratio clamped to 1/2
    ],
)
def test_random_resized_crop_box_known_answers(scale, ratio, box):
    rng = np.random.default_rng(0)
    assert random_resized_crop_box(W, H, scale=scale, ratio=ratio, rng=rng) == box


# --- errors ------------------------------------------------------------------------------------


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_root_and_split_folders_name_the_path_and_layout(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        ImageFolderDataset(missing)
    assert str(missing) in _one_line(err) and "'imagenet'" in str(err.value)
    assert isinstance(err.value, DatasetNotFoundError)
    root = tmp_path / "only_train"
    _save(root / "train" / "a" / "0.png", _solid((1, 2, 3)))
    with pytest.raises(FileNotFoundError) as err:
        ImageFolderDataset(root, split="val")
    assert str(root / "val") in _one_line(err) and "root/val/<class>" in str(err.value)
    with pytest.raises(FileNotFoundError) as err:
        ImageFolderDataset(root, layout="tinyimagenet")
    assert str(root / "train" / "a" / "images") in _one_line(err)
    assert "'tinyimagenet'" in str(err.value)
    tiny = tiny_tree(tmp_path / "tiny")
    (tiny / "val" / "val_annotations.txt").unlink()
    with pytest.raises(FileNotFoundError) as err:
        ImageFolderDataset(tiny, split="val", layout="tinyimagenet")
    assert str(tiny / "val" / "val_annotations.txt") in _one_line(err)


def test_no_images_found_names_the_folder(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError) as err:
        ImageFolderDataset(tmp_path)
    message = _one_line(err)
    assert str(tmp_path / "train") in message and "no images" in message and ".jpeg" in message


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"layout": "coco"}, r"unknown layout 'coco'; valid layouts: imagenet, tinyimagenet"),
        ({"split": "test"}, r"split must be 'train' or 'val', got 'test'"),
        ({"size": 0}, r"size must be an integer >= 1, got 0"),
        ({"size": 32, "resize": 16}, r"resize must be an integer >= size \(32\), got 16"),
        ({"scale": (0.5, 0.1)}, r"scale must be .*got \(0\.5, 0\.1\)"),
        ({"ratio": (0, 1)}, r"ratio must be .*got \(0, 1\)"),
        ({"mean": (0.5, 0.5)}, r"mean must be 3 numbers .*got \(0\.5, 0\.5\)"),
        ({"std": (1, 0, 1)}, r"std must be 3 positive numbers .*got \(1, 0, 1\)"),
        ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
    ],
)
def test_bad_options_raise_one_line_naming_the_value(tmp_path, options, pattern):
    root = gradient_tree(tmp_path)
    with pytest.raises(ValueError, match=pattern) as err:
        ImageFolderDataset(root, **options)
    _one_line(err)


def test_classes_missing_from_the_class_list_are_named(tmp_path):
    root = imagenet_tree(tmp_path)
    _save(root / "val" / "kiwi" / "k.png", _solid((1, 2, 3)))
    with pytest.raises(CorruptDatasetError, match=r"class 'kiwi' is not among the 3") as err:
        ImageFolderDataset(root, split="val")
    assert str(root / "val" / "kiwi") in _one_line(err)
    tiny = tiny_tree(tmp_path / "tiny")
    annotations = tiny / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "val_1.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match=r"line 4: unknown class 'n99' for 'val_1.JPEG'") as err:
        ImageFolderDataset(tiny, split="val", layout="tinyimagenet")
    assert str(annotations) in _one_line(err)


def test_an_image_that_fails_to_decode_is_named_when_read(tmp_path):
    root = gradient_tree(tmp_path)
    bad = root / "train" / "a" / "9.png"
    bad.write_bytes(b"not a png at all")
    ds = ImageFolderDataset(root, size=8)  # listing decodes nothing
    assert len(ds) == 5
    i = [Path(p) for p, _ in ds.samples].index(bad)
    with pytest.raises(CorruptDatasetError) as err:
        ds[i]
    assert re.match(rf"{re.escape(str(bad))}: cannot decode image", _one_line(err))
    with pytest.raises(IndexError, match="index 5 out of range for 5"):
        ds[5]
    with pytest.raises(ValueError, match="epoch must be an integer >= 0, got -1"):
        ds.set_epoch(-1)


# --- loader ------------------------------------------------------------------------------------


def test_folder_loader_batches_shapes_and_order(tmp_path):
    root = gradient_tree(tmp_path, n=10)
    ds = ImageFolderDataset(root, size=8, seed=1)
    plain = folder_loader(ds, batch_size=4)
    batches = list(plain)
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 8, 8), (4, 3, 8, 8), (2, 3, 8, 8)]
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in batches)
    assert [tuple(y.shape) for _, y in batches] == [(4,), (4,), (2,)]
    ds.set_epoch(0)  # unshuffled pass 0 is the items of epoch 0 in index order
    torch.testing.assert_close(batches[0][0], torch.stack([ds[i][0] for i in range(4)]))

    def order(seed: int) -> list[torch.Tensor]:
        loader = folder_loader(ds, batch_size=3, shuffle=True, seed=seed, drop_last=True)
        assert len(loader) == 3
        return [torch.cat([x for x, _ in loader]) for _ in range(2)]  # two passes

    first, second = order(0)
    again = order(0)
    assert first.shape == (9, 3, 8, 8)
    assert torch.equal(first, again[0]) and torch.equal(second, again[1])
    assert not torch.equal(first, second)  # pass 1: another order and other crops
    assert not torch.equal(first, order(5)[0])


def test_folder_loader_does_not_depend_on_worker_count(tmp_path):
    root = gradient_tree(tmp_path, n=6)
    ds = ImageFolderDataset(root, size=8, seed=2)
    passes = {}
    for workers in (0, 2):
        loader = folder_loader(ds, batch_size=4, shuffle=True, seed=7, num_workers=workers)
        passes[workers] = [torch.cat([x for x, _ in loader]) for _ in range(2)]
    for a, b in zip(passes[0], passes[2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_folder_loader_feeds_the_training_loop(tmp_path):
    root = imagenet_tree(tmp_path)
    ds = ImageFolderDataset(root, size=8)
    loader = folder_loader(ds, batch_size=5, shuffle=True)
    with seeded(0):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    history = train(model, loader, TrainConfig(epochs=2, batch_size=5, lr=0.01))
    assert len(history.epochs) == 2 and math.isfinite(history.epochs[-1].train_loss)
    assert loader.epoch == 2 and ds.epoch == 1  # one pass per epoch, each with its own crops
    assert evaluate(model, folder_loader(ds, batch_size=5)).n == len(ds) == 12


def test_folder_loader_rejects_bad_options(tmp_path):
    ds = ImageFolderDataset(gradient_tree(tmp_path), size=8)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        folder_loader(ds, batch_size=0)
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0, got -1"):
        folder_loader(ds, batch_size=2, num_workers=-1)
