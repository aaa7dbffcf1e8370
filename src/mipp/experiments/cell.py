"""One cell of a pruning study: prune → one-shot accuracy → re-train → final accuracy.

Every comparison in :mod:`mipp.experiments` and the LeNet-5 benchmarks runs this same
sequence, so a method differs from another only in its decision:

1. :func:`mipp.prune` a copy of the network with the method (the input is not modified);
2. evaluate the pruned copy as it is (*one-shot* top-1 accuracy);
3. re-train it with the given recipe — fine-tuning after training (PaT), or training the
   pruned initialisation from scratch (PaI) — and evaluate it again.

>>> import torch
>>> from mipp.methods import make_method
>>> from mipp.zoo.config import TrainConfig
>>> from mipp.zoo.data import ImageDataset, make_separable
>>> from mipp.zoo.training import seeded
>>> x, y = make_separable(600, num_classes=3, dim=8, seed=0)
>>> ds = ImageDataset(x, y, num_classes=3, name="toy")
>>> with seeded(0):
...     net = torch.nn.Sequential(
...         torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
...     )
>>> cell = run_cell(net, ds, ds, method=make_method("l1"), sparsity=0.5,
...                 retrain=TrainConfig(epochs=1, batch_size=64), calib_samples=256)
>>> cell.report.units_after, cell.final.n, cell.extra_training_epochs
(8, 600, 0)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from mipp.methods import Method, Target
from mipp.pipeline import PruneResult, prune
from mipp.progress import ProgressCallback
from mipp.report import PruneReport
from mipp.surgery.structure import Scope
from mipp.zoo.config import TrainConfig
from mipp.zoo.data import ImageDataset
from mipp.zoo.training import EvalResult, evaluate, train

__all__ = ["Cell", "run_cell"]


@dataclass
class Cell:
    """What one cell produced.

    Attributes:
        result: the pruned (and then re-trained, in place) network and its prune report.
        one_shot: top-1 test accuracy right after pruning, in [0, 1].
        final: loss and top-1 test accuracy after re-training.
        retrain_s: wall seconds of the re-training.
        extra_training_epochs: training epochs the method spent inside its decision that
            other methods do not get (IMP's re-training between rounds; else 0).
    """

    result: PruneResult
    one_shot: float
    final: EvalResult
    retrain_s: float
    extra_training_epochs: int

    @property
    def report(self) -> PruneReport:
        return self.result.report

    @property
    def model(self) -> nn.Module:
        return self.result.model


def run_cell(
    net: nn.Module,
    train_ds: ImageDataset | Dataset,
    test_ds: ImageDataset | Dataset,
    *,
    method: Method,
    retrain: TrainConfig,
    device: str | torch.device = "cpu",
    sparsity: float | None = None,
    match: PruneReport | None = None,
    target: Target = "units",
    calib_samples: int = 2048,
    scope: Scope = "internal",
    tolerance: float = 0.01,
    compensate: bool | None = None,
    recalibrate_bn: bool | None = None,
    batch_size: int = 256,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    calib_data: Any = None,
    num_workers: int = 0,
) -> Cell:
    """Prune ``net`` with ``method``, evaluate, re-train with ``retrain``, evaluate again.

    ``train_ds`` is the re-training data and, unless ``calib_data`` is given, the
    calibration source of :func:`mipp.prune`; accuracies are measured on ``test_ds``. A
    map-style dataset (e.g. an image folder) is read by ``num_workers`` processes.
    ``sparsity`` / ``match`` and the pipeline options are those of :func:`mipp.prune`;
    ``progress`` receives its events and the re-training's. ``net`` itself is not modified.
    """
    result = prune(
        net,
        train_ds if calib_data is None else calib_data,
        method=method,
        sparsity=sparsity,
        match=match,
        target=target,
        calib_samples=calib_samples,
        scope=scope,
        tolerance=tolerance,
        compensate=compensate,
        recalibrate_bn=recalibrate_bn,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    one_shot = evaluate(result.model, test_ds, device=device, num_workers=num_workers).top1
    t = time.perf_counter()
    train(
        result.model,
        train_ds,
        retrain,
        device=device,
        progress=progress,
        num_workers=num_workers,
    )
    retrain_s = time.perf_counter() - t
    final = evaluate(result.model, test_ds, device=device, num_workers=num_workers)
    return Cell(
        result=result,
        one_shot=one_shot,
        final=final,
        retrain_s=retrain_s,
        extra_training_epochs=method.extra_training_epochs(),
    )
