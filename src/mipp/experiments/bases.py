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
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from mipp._io import read_json, write_json
from mipp.experiments.spec import SweepSpec
from mipp.progress import Reporter
from mipp.types import ModelSpec
from mipp.zoo import data as mdata
from mipp.zoo import models
from mipp.zoo.checkpoint import load_checkpoint, save_checkpoint
from mipp.zoo.config import TrainConfig
from mipp.zoo.training import evaluate, seeded, train

__all__ = ["Bases", "SweepData"]


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


class SweepData:
    """Train/test splits per dataset, loaded on first use and kept (``[data]`` of a sweep:
    padding, channels and seeded subsets)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.cache: dict[str, tuple[mdata.ImageDataset, mdata.ImageDataset]] = {}

    def __call__(self, name: str) -> tuple[mdata.ImageDataset, mdata.ImageDataset]:
        if name not in self.cache:
            d = self.cfg
            opts = {"pad_to_32": d["pad_to_32"], "channels": d["channels"]}
            if mdata.DATASETS[name].size is None:
                opts = {}
            splits = []
            for split, key in (("train", "train_subset"), ("test", "test_subset")):
                ds = mdata.load_dataset(name, split=split, **opts)
                if d[key] and d[key] < len(ds):
                    g = torch.Generator().manual_seed(0)
                    ds = ds.subset(torch.randperm(len(ds), generator=g)[: d[key]].sort().values)
                splits.append(ds)
            self.cache[name] = (splits[0], splits[1])
        return self.cache[name]


def _model_spec(cfg: dict[str, Any], model: str, ds: mdata.ImageDataset) -> ModelSpec:
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
    sent to ``report`` (stage ``"base"``, and the training's own events). Two sweeps asking
    for the same missing base at the same moment both train it (the files are written
    atomically, so the result is whole either way)."""

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
        return {
            "model": model,
            "dataset": dataset,
            "seed": seed,
            "data": cfg["data"],
            "model_options": cfg["models"].get(model, {}),
            # the resolved recipe, so configs spelling the same recipe differently share a base
            "train": {k: v for k, v in recipe.items() if k != "seed"},
        }

    def dir(self, model: str, dataset: str, seed: int) -> Path:
        key = self.key(model, dataset, seed)
        return self.root / f"{model}-{dataset}-seed{seed}-{_hash(key)}"

    def get(self, model: str, dataset: str, seed: int, which: str) -> tuple[torch.nn.Module, float]:
        """(a fresh copy of the ``"init"`` or ``"trained"`` network, the base accuracy)."""
        d = self.dir(model, dataset, seed)
        meta = read_json(d / "base.json")
        if meta is None:
            meta = self._build(model, dataset, seed, d)
        net = load_checkpoint(d / f"{which}.safetensors").model.to(self.device)
        return net, meta["accuracy"]

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
        self.report(
            "base",
            f"training the base {model} on {dataset} (seed {seed}, {tcfg.epochs} epochs, "
            f"{len(train_ds):,} images) ...",
            model=model,
            dataset=dataset,
            seed=seed,
        )
        net = net.to(self.device)
        t = time.perf_counter()
        train(net, train_ds, tcfg, device=self.device, progress=self.report.callback)
        seconds = time.perf_counter() - t
        acc = evaluate(net, test_ds, device=self.device).top1
        d_cfg = self.spec.config["data"]
        dataset_meta = {  # lets `mipp prune` / `mipp eval` find the data of a cached base
            "name": dataset,
            "pad_to_32": d_cfg["pad_to_32"],
            "channels": d_cfg["channels"],
            "train_subset": d_cfg["train_subset"],
        }
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
