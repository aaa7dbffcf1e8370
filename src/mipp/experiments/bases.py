"""What every run of a sweep starts from: the data splits and the cached base networks.

A sweep trains one base network per (model, dataset, seed) and shares it between every
method, regime and sparsity. Bases live in a cache directory (``<sweep>/bases`` by default;
``mipp sweep`` shares ``runs/bases`` between all sweeps), so every sweep and ablation of the
same (model, data, recipe, seed) reuses one trained network and a new variant costs only its
own pruning and fine-tuning::

    <cache>/<model>-<data>-seed<s>-<hash>/
        init.safetensors          the seeded initialisation (PaI starts here)
        trained.safetensors       the trained network (PaT starts here), trained once
        base.json                 its settings, test accuracy and training time

``<hash>`` covers every setting the base depends on (data, model options, training
recipe), so a changed recipe trains a new base instead of reusing a stale one.

A model given ``weights = "<file>"`` in ``[models.<name>]`` is not trained: its PaT base is
that file (a mipp checkpoint with its sidecar, or torchvision's ResNet-18/34/50 state dict,
e.g. the released ImageNet weights), identified in the hash by the file's SHA-256; PaI still
starts from the seeded initialisation.

Folder datasets (:data:`mipp.zoo.data.FOLDER_DATASETS`: ImageNet, TinyImageNet) are streamed
from disk, never held in memory; ``train_subset`` / ``test_subset`` pick seeded subsets of
their files, and the calibration set of a run is a seeded subset of the training files read
without augmentation (:meth:`SweepData.calibration`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mipp._io import DirectoryLockedError, lock_directory, read_json, write_json
from mipp.errors import MippError
from mipp.experiments.spec import SweepSpec
from mipp.progress import Reporter
from mipp.types import ModelSpec
from mipp.zoo import data as mdata
from mipp.zoo import models
from mipp.zoo.checkpoint import load_checkpoint, save_checkpoint, sidecar_path
from mipp.zoo.config import TrainConfig
from mipp.zoo.training import evaluate, seeded, train

__all__ = ["Bases", "SweepData"]


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


class SweepData:
    """Train/test splits per dataset, loaded on first use and kept (``[data]`` of a sweep:
    padding, channels and seeded subsets; ``[folders.<name>]`` for folder datasets)."""

    def __init__(self, cfg: dict[str, Any], folders: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.folders = folders or {}
        self.cache: dict[str, tuple[Any, Any]] = {}

    def folder(self, name: str) -> dict[str, Any] | None:
        """The settings a folder dataset's images depend on (``size``, ``resize``), or None
        for an in-memory dataset: part of the base key and of every run's config."""
        if name not in mdata.FOLDER_DATASETS:
            return None
        table = self.folders.get(name, {})
        size = table.get("size", mdata.FOLDER_DATASETS[name].size)
        return {"size": size, "resize": table.get("resize", round(size / 0.875))}

    def workers(self, name: str) -> int:
        """Decoding processes for dataset ``name`` (0 for in-memory data)."""
        return int(self.folders.get(name, {}).get("workers", 0))

    def __call__(self, name: str) -> tuple[Dataset, Dataset]:
        if name not in self.cache:
            d = self.cfg
            folder = self.folder(name)
            opts = {"pad_to_32": d["pad_to_32"], "channels": d["channels"]}
            if folder is not None:
                root = self.folders.get(name, {}).get("root")
                opts = {
                    **folder,
                    "root": None if root is None else os.path.expandvars(root),
                }
            elif mdata.DATASETS[name].size is None:
                opts = {}
            splits = []
            for split, key in (("train", "train_subset"), ("test", "test_subset")):
                if folder is not None:
                    ds = mdata.load_folder_dataset(
                        name, split="train" if split == "train" else "val", **opts
                    )
                else:
                    ds = mdata.load_dataset(name, split=split, **opts)
                if d[key] and d[key] < len(ds):
                    g = torch.Generator().manual_seed(0)
                    ds = ds.subset(torch.randperm(len(ds), generator=g)[: d[key]].sort().values)
                splits.append(ds)
            self.cache[name] = (splits[0], splits[1])
        return self.cache[name]

    def calibration(self, name: str, n: int, *, seed: int, batch_size: int) -> Any:
        """The calibration source of a run on dataset ``name``: None for an in-memory dataset
        (:func:`mipp.prune` draws its seeded subset itself); for a folder dataset a loader
        over ``n`` training files drawn from ``seed`` (sorted), read without augmentation."""
        if name not in mdata.FOLDER_DATASETS:
            return None
        train = self(name)[0]
        if not 1 <= n <= len(train):
            raise MippError(
                f"calib_samples={n} but the {name} training split has {len(train):,} images"
            )
        g = torch.Generator().manual_seed(seed)
        calib = train.subset(torch.randperm(len(train), generator=g)[:n].sort().values)
        calib.augment = False
        return mdata.folder_loader(calib, batch_size=batch_size, num_workers=self.workers(name))


def _model_spec(cfg: dict[str, Any], model: str, ds: Any) -> ModelSpec:
    widths = cfg["models"].get(model, {}).get("widths")
    return ModelSpec(
        model,
        num_classes=ds.num_classes,
        in_channels=ds.in_channels,  # the feature count of vector data (with input_size 1)
        input_size=ds.input_size or 1,
        widths=widths,
    )


class Bases:
    """The seeded initialisation and trained base network per (model, dataset, seed), in the
    cache directory ``root``; a missing base is trained when first asked for, its progress
    sent to ``report`` (stage ``"base"``, and the training's own events). One process trains
    a base at a time: it holds a lock on the base's directory while training, and another
    process asking for that base waits for it (:meth:`get`) or, in :meth:`train_missing`,
    trains the next missing base first. The files are written atomically."""

    def __init__(
        self,
        root: Path,
        spec: SweepSpec,
        data: SweepData,
        device: torch.device,
        report: Reporter,
    ) -> None:
        self.root, self.spec, self.data, self.device, self.report = (
            root,
            spec,
            data,
            device,
            report,
        )

    def key(self, model: str, dataset: str, seed: int) -> dict[str, Any]:
        cfg = self.spec.config
        recipe = TrainConfig.from_dict(cfg["train"]).to_dict()
        options = dict(cfg["models"].get(model, {}))
        key = {
            "model": model,
            "dataset": dataset,
            "seed": seed,
            "data": cfg["data"],
            "model_options": options,
            # the resolved recipe, so configs spelling the same recipe differently share a base
            "train": {k: v for k, v in recipe.items() if k != "seed"},
        }
        folder = self.data.folder(dataset)
        if folder is not None:  # (absent for in-memory data: their existing keys unchanged)
            key["folder"] = folder
        if "weights" in options:  # the file's content, wherever it lies
            options.pop("weights")
            key["weights_sha256"] = _file_sha256(self.weights_path(model))
        return key

    def weights_path(self, model: str) -> Path:
        """The ``weights`` file of ``[models.<model>]``, ``$VARS`` and ``~`` expanded."""
        given = self.spec.config["models"][model]["weights"]
        path = Path(os.path.expandvars(given)).expanduser()
        if not path.is_file():
            raise MippError(f"models.{model}.weights: {given!r} ({path}) is not a file")
        return path

    def dir(self, model: str, dataset: str, seed: int) -> Path:
        key = self.key(model, dataset, seed)
        return self.root / f"{model}-{dataset}-seed{seed}-{_hash(key)}"

    def get(self, model: str, dataset: str, seed: int, which: str) -> tuple[torch.nn.Module, float]:
        """(a fresh copy of the ``"init"`` or ``"trained"`` network, the base accuracy)."""
        d = self.dir(model, dataset, seed)
        meta = read_json(d / "base.json")
        if meta is None:
            # one trainer per base: a second sweep sharing the cache waits for the first
            # one's base instead of training the same network beside it
            def waiting() -> None:
                self.report(
                    "base",
                    f"waiting for another mipp process that is training the base in {d} ...",
                    model=model,
                    dataset=dataset,
                    seed=seed,
                )

            with lock_directory(d, what="base directory", wait=True, on_wait=waiting):
                meta = read_json(d / "base.json")  # written meanwhile by the one we waited for
                if meta is None:
                    meta = self._build(model, dataset, seed, d)
        net = load_checkpoint(d / f"{which}.safetensors").model.to(self.device)
        return net, meta["accuracy"]

    def train_missing(self, keys: list[tuple[str, str, int]]) -> list[Path]:
        """Train every base of ``keys`` (model, dataset, seed) that is not in the cache yet;
        the directories of all of them, in order.

        A base another process is training (its directory locked) is passed over and
        waited for at the end, so several processes running this on the same cache train
        different bases side by side instead of queueing behind one.
        """
        keys = list(dict.fromkeys(keys))
        later = []
        for i, (model, dataset, seed) in enumerate(keys):
            d = self.dir(model, dataset, seed)
            if read_json(d / "base.json") is not None:
                continue
            self.report(
                "base",
                f"base {i + 1}/{len(keys)}: {d.name}",
                done=i,
                total=len(keys),
                transient=True,
            )
            try:
                with lock_directory(d, what="base directory"):
                    if read_json(d / "base.json") is None:
                        self._build(model, dataset, seed, d)
            except DirectoryLockedError:
                self.report(
                    "base",
                    f"{d} is being trained by another mipp process; training the next "
                    f"missing base first",
                    model=model,
                    dataset=dataset,
                    seed=seed,
                )
                later.append((model, dataset, seed))
        for model, dataset, seed in later:
            self.get(model, dataset, seed, "trained")  # waits for the other process
        return [self.dir(*k) for k in keys]

    def _build(self, model: str, dataset: str, seed: int, d: Path) -> dict[str, Any]:
        train_ds, test_ds = self.data(dataset)
        mspec = _model_spec(self.spec.config, model, train_ds)
        with seeded(seed):
            net = models.create(
                model,
                num_classes=mspec.num_classes,
                in_channels=mspec.in_channels,
                input_size=mspec.input_size,
                widths=mspec.widths,
            )
        save_checkpoint(d / "init.safetensors", net, spec=mspec)
        tcfg = TrainConfig.from_dict({**self.spec.config["train"], "seed": seed})
        workers = self.data.workers(dataset)
        t = time.perf_counter()
        if "weights" in self.spec.config["models"].get(model, {}):
            net = self._pretrained(model, mspec)
            self.report("base", f"the base {model} is {self.weights_path(model)} (not trained)")
        else:
            self.report(
                "base",
                f"training the base {model} on {dataset} (seed {seed}, {tcfg.epochs} epochs, "
                f"{len(train_ds):,} images) ...",
                model=model,
                dataset=dataset,
                seed=seed,
            )
            net = net.to(self.device)
            train(
                net,
                train_ds,
                tcfg,
                device=self.device,
                progress=self.report.callback,
                num_workers=workers,
            )
        seconds = time.perf_counter() - t
        net = net.to(self.device)
        acc = evaluate(net, test_ds, device=self.device, num_workers=workers).top1
        d_cfg = self.spec.config["data"]
        dataset_meta = {  # lets `mipp prune` / `mipp eval` find the data of a cached base
            "name": dataset,
            "pad_to_32": d_cfg["pad_to_32"],
            "channels": d_cfg["channels"],
            "train_subset": d_cfg["train_subset"],
        }
        if self.data.folder(dataset) is not None:
            dataset_meta["folder"] = self.data.folder(dataset)
        save_checkpoint(d / "trained.safetensors", net, spec=mspec, extra={"dataset": dataset_meta})
        meta = {**self.key(model, dataset, seed), "accuracy": acc, "train_s": seconds}
        write_json(d / "base.json", meta)
        self.report(
            "base",
            f"base accuracy {acc:.4f} after {seconds:.1f} s",
            model=model,
            dataset=dataset,
            seed=seed,
            accuracy=acc,
            train_s=seconds,
        )
        return meta

    def _pretrained(self, model: str, mspec: ModelSpec) -> torch.nn.Module:
        """The ``weights`` of ``[models.<model>]`` in the architecture ``mspec`` describes."""
        path = self.weights_path(model)
        if sidecar_path(path).is_file():  # a mipp checkpoint
            ckpt = load_checkpoint(path)
            net, spec = ckpt.model, ckpt.spec
        elif model in ("resnet18", "resnet34", "resnet50"):
            net = models.load_torchvision_resnet(path, input_size=mspec.input_size)
            spec = ModelSpec(
                f"resnet{net.depth}",
                num_classes=net.fc.out_features,
                in_channels=net.conv1.in_channels,
                input_size=mspec.input_size,
            )
        else:
            raise MippError(
                f"models.{model}.weights: {path} has no mipp sidecar "
                f"({sidecar_path(path).name}) and only resnet18/34/50 read torchvision's weights"
            )
        if spec.to_dict() != mspec.to_dict():
            raise MippError(
                f"models.{model}.weights: {path} holds {spec.to_dict()}, but this sweep builds "
                f"{mspec.to_dict()}"
            )
        return net


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
