"""ImageNet-scale studies: the ResNets' ImageNet stem, torchvision weights, folder datasets in
sweeps (`experiments/imagenet_resnet50.toml` run end to end on a tiny generated JPEG tree)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mipp.errors import DatasetNotFoundError, InvalidOptionError, MippError
from mipp.experiments.bases import Bases, SweepData
from mipp.experiments.runner import run_sweep
from mipp.experiments.spec import load_spec, resolve
from mipp.zoo import models
from mipp.zoo.config import TrainConfig
from mipp.zoo.data import find_folder_root, load_folder_dataset
from mipp.zoo.models import load_torchvision_resnet
from mipp.zoo.models.resnet import ResNet
from mipp.zoo.training import evaluate, seeded, train

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "imagenet_resnet50.toml"
CLASSES = ("n01", "n02", "n03")


def _tree(base: Path, *, train: int = 6, val: int = 2) -> Path:
    """``base/imagenet/{train,val}/<wnid>/*.JPEG``: random-noise JPEGs of varied sizes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in CLASSES:
            folder = base / "imagenet" / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = (rng.random((140 + 10 * i, 160, 3)) * 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{c}_{i}.JPEG")
    return base


def _torchvision_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        k.replace(".shortcut.conv.", ".downsample.0.").replace(".shortcut.bn.", ".downsample.1."): v
        for k, v in state.items()
    }


# --- the ImageNet stem ----------------------------------------------------------------------


def test_resnet_stem_follows_input_size():
    small, large = ResNet(depth=18, input_size=127), ResNet(depth=18, input_size=128)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, torch.nn.Identity)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)
    assert isinstance(large.maxpool, torch.nn.MaxPool2d)
    assert large(torch.zeros(1, 3, 128, 128)).shape == (1, 10)
    # torchvision's published parameter count of ResNet-50 (1,000 classes, ImageNet stem)
    net = models.create("resnet50", num_classes=1000, input_size=224)
    assert sum(p.numel() for p in net.parameters()) == 25_557_032
    # the 32-px variant is unchanged: 23,520,842 at 10 classes
    assert sum(p.numel() for p in models.create("resnet50").parameters()) == 23_520_842


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_state_dict_loads_exactly(tmp_path, depth, suffix):
    with seeded(0):
        ours = ResNet(depth=depth, num_classes=5, input_size=128).eval()
        for m in ours.modules():  # non-trivial BatchNorm statistics
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = _torchvision_names(ours.state_dict())
    assert any(".downsample.0." in k for k in state)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = load_torchvision_resnet(path, input_size=160).eval()
    assert loaded.depth == depth and loaded.fc.out_features == 5
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(loaded(x), ours(x))


def test_torchvision_loader_refuses_what_does_not_fit(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        load_torchvision_resnet(tmp_path / "missing.pth")
    vgg = models.create("vgg11").state_dict()
    with pytest.raises(InvalidOptionError, match="not a torchvision ResNet"):
        load_torchvision_resnet(vgg)
    state = _torchvision_names(ResNet(depth=18, input_size=128).state_dict())
    with pytest.raises(InvalidOptionError, match="input_size must be >= 128"):
        load_torchvision_resnet(state, input_size=64)
    state["layer1.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(InvalidOptionError, match=r"unexpected .*layer1\.0\.extra\.weight"):
        load_torchvision_resnet(state)


def test_torchvision_resnet50_matches_torchvision():
    """Optional (torchvision installed, e.g. ``pip install 'mipp[bench]'``): torchvision's own
    ResNet-50 and ours with its weights give the same logits."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed")
    try:
        lib = torch.library.Library("torchvision", "DEF")  # a CUDA build beside CPU torch
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        test_torchvision_resnet50_matches_torchvision.lib = lib
    except RuntimeError:  # its ops load, or the schemas already exist
        pass
    import torchvision

    with seeded(0):
        ref = torchvision.models.resnet50(weights=None, num_classes=7).eval()
    ours = load_torchvision_resnet(ref.state_dict()).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


# --- folder datasets by name ----------------------------------------------------------------


def test_folder_dataset_root_is_found_under_mipp_data(tmp_path, monkeypatch):
    _tree(tmp_path)
    monkeypatch.setenv("MIPP_DATA", str(tmp_path))
    assert find_folder_root("imagenet") == tmp_path / "imagenet"
    ds = load_folder_dataset("imagenet", split="val", size=32)
    assert (len(ds), ds.classes, ds.input_size) == (6, list(CLASSES), 32)
    monkeypatch.setenv("MIPP_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError, match=r"no train/ folder in .*nowhere/imagenet"):
        find_folder_root("imagenet")
    monkeypatch.delenv("MIPP_DATA")
    with pytest.raises(DatasetNotFoundError, match=r"\$MIPP_DATA is not set"):
        find_folder_root("tinyimagenet")


def test_train_and_evaluate_stream_a_map_style_dataset(tmp_path):
    """A map-style dataset is batched (not iterated item by item), shuffled from the seed:
    two runs with equal seeds give equal weights, and evaluation counts every item."""
    _tree(tmp_path)
    ds = load_folder_dataset("imagenet", root=tmp_path / "imagenet", size=16)
    cfg = TrainConfig(epochs=2, batch_size=4, lr=0.01, seed=3)
    nets = []
    for _ in range(2):
        with seeded(0):
            net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))
        hist = train(net, ds, cfg)
        assert [e.epoch for e in hist.epochs] == [1, 2]
        nets.append(net)
    assert all(torch.equal(a, b) for a, b in zip(*(n.parameters() for n in nets), strict=True))
    assert evaluate(nets[0], ds, batch_size=5).n == len(ds) == 18


# --- sweeps ---------------------------------------------------------------------------------


def test_imagenet_config_resolves_and_checks_folder_tables():
    spec = load_spec(CONFIG)
    assert spec.grid["datasets"] == ["imagenet"] and len(spec.runs()) == 108
    assert spec.config["folders"]["imagenet"] == {"size": 224, "workers": 8}
    assert "weights" not in load_spec(CONFIG, profile="smoke").config["models"]["resnet50"]
    raw = {
        "name": "x",
        "grid": {
            "models": ["resnet18"],
            "datasets": ["imagenet"],
            "methods": ["l1"],
            "sparsities": [0.5],
        },
    }
    for folders, message in (
        ({"cifar10": {}}, r"\[folders.cifar10\]: not a folder dataset"),
        ({"imagenet": {"colour": 1}}, r"unknown key\(s\) \['colour'\] in \[folders.imagenet\]"),
        ({"imagenet": {"size": 4}}, "folders.imagenet.size must be an integer >= 8, got 4"),
        ({"imagenet": {"resize": 200}}, "folders.imagenet.resize must be an integer >= 224"),
        ({"imagenet": {"workers": -1}}, "folders.imagenet.workers must be an integer >= 0"),
    ):
        with pytest.raises(MippError, match=message):
            resolve({**raw, "folders": folders})
    with pytest.raises(MippError, match=r"models\.resnet18\.weights must be a path"):
        resolve({**raw, "models": {"resnet18": {"weights": 3}}})


@pytest.mark.slow
def test_imagenet_config_smoke_profile_runs_end_to_end(tmp_path, monkeypatch):
    """The committed ImageNet config, profile smoke, on a tiny JPEG tree: the base is trained
    (no weights), every run finishes, calibration reads the training files unaugmented, and a
    second invocation redoes nothing."""
    _tree(tmp_path / "data")
    monkeypatch.setenv("MIPP_DATA", str(tmp_path / "data"))
    spec = load_spec(CONFIG, profile="smoke")
    out = tmp_path / "sweep"
    result = run_sweep(spec, out)
    assert len(result.done) == 3 and not result.failed
    run_cfg = json.loads((out / "runs" / spec.runs()[0].run_id / "config.json").read_text())
    assert run_cfg["folder"] == {"size": 128, "resize": 146}
    calib = SweepData(spec.config["data"], spec.config["folders"]).calibration(
        "imagenet", 12, seed=0, batch_size=6
    )
    x, _ = next(iter(calib))
    assert x.shape == (6, 3, 128, 128) and not calib.dataset.augment
    again = run_sweep(spec, out)
    assert len(again.skipped) == 3 and not again.done


@pytest.mark.slow
def test_sweep_base_from_weights_file_is_not_trained(tmp_path, monkeypatch):
    """``[models.resnet18] weights`` (torchvision names): the PaT base is that network, its
    accuracy measured, no epoch run; the base key holds the file's digest, not its path."""
    _tree(tmp_path / "data")
    monkeypatch.setenv("MIPP_DATA", str(tmp_path / "data"))
    with seeded(5):
        net = ResNet(depth=18, num_classes=3, input_size=128).eval()
    weights = tmp_path / "w.pth"
    torch.save(_torchvision_names(net.state_dict()), weights)
    raw = {
        "name": "w",
        "grid": {
            "models": ["resnet18"],
            "datasets": ["imagenet"],
            "methods": ["l1"],
            "sparsities": [0.5],
        },
        "folders": {"imagenet": {"size": 128}},
        "models": {"resnet18": {"weights": "$MIPP_DATA/../w.pth"}},
        "prune": {"calib_samples": 6, "batch_size": 6, "reference": ""},
        "train": {"epochs": 1, "batch_size": 6},
        "finetune": {"epochs": 1, "batch_size": 6},
    }
    spec = resolve(raw)
    events = []
    result = run_sweep(spec, tmp_path / "sweep", progress=events.append)
    assert len(result.done) == 1 and not result.failed
    said = [e.message for e in events if e.stage == "base"]
    assert any("(not trained)" in m for m in said)
    assert not any("training the base" in m for m in said)
    (base,) = (tmp_path / "sweep" / "bases").iterdir()
    meta = json.loads((base / "base.json").read_text())
    assert "weights" not in meta["model_options"] and len(meta["weights_sha256"]) == 64
    val = load_folder_dataset("imagenet", split="val", size=128)
    assert meta["accuracy"] == evaluate(net, val).top1
    # other weights in the same file: another base (the key holds the digest, not the path)
    cache = Bases(tmp_path / "sweep" / "bases", spec, SweepData({}, {}), torch.device("cpu"), None)
    before = cache.dir("resnet18", "imagenet", 0)
    with seeded(6):
        other = ResNet(depth=18, num_classes=5, input_size=128)
    torch.save(_torchvision_names(other.state_dict()), weights)
    assert cache.dir("resnet18", "imagenet", 0) != before
    # ... whose 5 classes do not fit the 3 of the data: the run fails, naming both
    failed = run_sweep(spec, tmp_path / "sweep2").failed
    (message,) = failed.values()
    assert "holds" in message and "num_classes': 5" in message and "num_classes': 3" in message
