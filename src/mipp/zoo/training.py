"""One readable training / evaluation loop.

:func:`train` runs SGD (momentum, weight decay) or Adam with a cosine, step or constant
learning-rate schedule, seeded: on CPU two runs with the same seed, model initialisation and
data give bit-identical weights. :func:`evaluate` returns the mean cross-entropy loss and
top-1 accuracy. Both take a :class:`~mipp.zoo.data.ImageDataset`, a map-style dataset of
``(x, y)`` items (e.g. :class:`~mipp.zoo.data.ImageFolderDataset`, streamed in batches by a
``DataLoader`` with ``num_workers`` decoding processes) or any iterable of ``(x, y)``
batches (e.g. a ``torch.utils.data.DataLoader``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from mipp import distributed
from mipp.errors import TrainingDivergedError
from mipp.modules import eval_mode
from mipp.progress import ProgressCallback, ProgressEvent, Reporter
from mipp.zoo.config import TrainConfig
from mipp.zoo.data import BatchLoader, ImageDataset, folder_loader

__all__ = ["EpochStats", "EvalResult", "TrainHistory", "evaluate", "seeded", "train"]

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class EvalResult:
    """Mean cross-entropy ``loss`` (nats per sample), top-1 accuracy in [0, 1], sample count."""

    loss: float
    top1: float
    n: int


@dataclass(frozen=True)
class EpochStats:
    """Statistics of one epoch; ``val_*`` are ``None`` when no validation data was given."""

    epoch: int
    train_loss: float
    train_top1: float
    lr: float
    seconds: float
    val_loss: float | None = None
    val_top1: float | None = None


@dataclass
class TrainHistory:
    """What :func:`train` did: one :class:`EpochStats` per epoch and the wall time."""

    epochs: list[EpochStats] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "epochs": [asdict(e) for e in self.epochs]}


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU RNG seeded, restoring the caller's RNG state after.

    Use it to build a model deterministically without touching the global RNG:

    >>> with seeded(0):
    ...     a = torch.nn.Linear(3, 2).weight.clone()
    >>> with seeded(0):
    ...     b = torch.nn.Linear(3, 2).weight.clone()
    >>> bool(torch.equal(a, b))
    True
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _is_map_dataset(data: object) -> bool:
    """A map-style dataset of (x, y) items other than an in-memory ImageDataset."""
    return (
        isinstance(data, Dataset)
        and not isinstance(data, ImageDataset | IterableDataset)
        and hasattr(data, "__len__")
    )


class _ShardLoader:
    """Rank ``rank``'s batches of a map-style dataset under torch.distributed: a
    ``DistributedSampler`` (shuffled from ``seed``, reshuffled at every pass, the tail
    dropped so every rank yields the same number of batches); pass k also calls
    ``dataset.set_epoch(k)`` when the dataset has it."""

    def __init__(self, data: Dataset, *, batch_size: int, seed: int, num_workers: int) -> None:
        self.sampler = DistributedSampler(
            data,
            num_replicas=distributed.world_size(),
            rank=distributed.rank(),
            shuffle=True,
            seed=seed,
            drop_last=True,
        )
        self.loader = DataLoader(
            data, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers
        )
        self.data, self.epoch = data, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        self.sampler.set_epoch(epoch)
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(epoch)
        return iter(self.loader)


def _batches(
    data: ImageDataset | Dataset | Batches,
    *,
    batch_size: int,
    shuffle: bool,
    augment: bool,
    seed: int,
    num_workers: int = 0,
    shard: bool = False,
) -> Batches:
    if isinstance(data, ImageDataset):
        return BatchLoader(data, batch_size=batch_size, shuffle=shuffle, augment=augment, seed=seed)
    if _is_map_dataset(data):
        if shard:
            return _ShardLoader(data, batch_size=batch_size, seed=seed, num_workers=num_workers)
        return folder_loader(
            data, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, seed=seed
        )
    return data


def _lr_factor(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    if config.schedule == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    if config.schedule == "step":
        bounds = [m * total_steps for m in config.milestones]
        return lambda step: config.gamma ** sum(step >= b for b in bounds)
    return lambda step: 1.0


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=config.momentum > 0,
        )
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def train(
    model: nn.Module,
    data: ImageDataset | Batches,
    config: TrainConfig,
    *,
    val_data: ImageDataset | Batches | None = None,
    device: str | torch.device = "cpu",
    progress: ProgressCallback | None = None,
    on_epoch_end: Callable[[EpochStats], None] | None = None,
    num_workers: int = 0,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
) -> TrainHistory:
    """Train ``model`` in place with cross-entropy and return its :class:`TrainHistory`.

    ``data`` yields ``x`` of shape (batch, *input_shape) and integer labels ``y`` of shape
    (batch,). With an :class:`~mipp.zoo.data.ImageDataset` the batches are shuffled from
    ``config.seed`` (epoch k in its own seeded order) and augmented when ``config.augment``
    (or, if that is ``None``, the dataset) says so. A map-style dataset of ``(x, y)`` items
    (e.g. :class:`~mipp.zoo.data.ImageFolderDataset`, which augments by itself) is batched
    by :func:`~mipp.zoo.data.folder_loader`, shuffled from ``config.seed`` and decoded by
    ``num_workers`` worker processes. ``penalty(model)``, when given, is added to every
    step's loss before the backward pass (a regulariser, e.g. Network Slimming's λΣ|γ|); the
    reported losses are the cross-entropy alone. ``after_step(model)``, when given, runs after
    every optimizer step (a projection, e.g. OTO's half-space step). The optimizer is built
    here, from the model's current parameters, so call this again after pruning rather than
    reusing an optimizer.

    Under ``torch.distributed`` (:mod:`mipp.distributed`, more than one rank) the model is
    wrapped in ``DistributedDataParallel`` (which starts every rank from rank 0's weights) and
    ``config.batch_size`` is per rank. An :class:`~mipp.zoo.data.ImageDataset` is batched as
    one process would batch it with ``world × batch_size`` (the same seeded order and
    augmentation on every rank) and each rank trains on its contiguous slice of every batch,
    trimmed to a multiple of the number of ranks — so the run is one process's with the
    larger batch, up to floating point, for models without BatchNorm (BatchNorm normalises
    each rank's slice on its own; SyncBatchNorm needs GPUs). A map-style dataset is sharded
    by a ``DistributedSampler`` (shuffled from ``config.seed``, ``config.batch_size`` items
    per rank, the last ``len % world`` items of each pass dropped). Another iterable is taken to be
    the rank's own shard (e.g. a ``DataLoader`` with a ``DistributedSampler``), and every rank
    must yield the same number of batches. The epoch's loss and accuracy count every rank's
    rows; each rank's torch RNG (dropout) is seeded from ``(config.seed, rank)`` during
    training; a non-finite loss on any rank stops every rank.

    ``progress`` receives a transient ``"train"`` :class:`~mipp.progress.ProgressEvent` per
    step (``done`` / ``total`` steps of the epoch) and an ``"epoch"`` event with the
    :class:`EpochStats` fields after each epoch; epochs are also logged (logger
    ``mipp.zoo.training``).

    >>> from mipp.zoo.data import make_separable, ImageDataset
    >>> x, y = make_separable(256, num_classes=2, dim=4, seed=0)
    >>> ds = ImageDataset(x, y, num_classes=2, name="toy")
    >>> with seeded(0):
    ...     net = torch.nn.Sequential(torch.nn.Linear(4, 2))
    >>> hist = train(net, ds, TrainConfig(epochs=2, batch_size=32, lr=0.1))
    >>> len(hist.epochs)
    2
    """
    world = distributed.world_size()
    if world > 1:  # under torch.distributed: DistributedDataParallel, every rank's batches
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_rank_seed(config.seed, distributed.rank()))  # dropout etc.
            return _train(
                model,
                data,
                config,
                val_data,
                device,
                progress,
                on_epoch_end,
                world,
                num_workers,
                penalty,
                after_step,
            )
    return _train(
        model,
        data,
        config,
        val_data,
        device,
        progress,
        on_epoch_end,
        1,
        num_workers,
        penalty,
        after_step,
    )


def _rank_seed(seed: int, rank: int) -> int:
    """Rank ``rank``'s own torch seed, derived from the run's ``seed``."""
    return int(np.random.SeedSequence((seed, rank)).generate_state(1, dtype=np.uint64)[0] >> 1)


def _my_rows(x: torch.Tensor, y: torch.Tensor, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous 1/world of a global batch, trimmed to a multiple of ``world``
    rows so that every rank's part is the same size (the mean of the ranks' mean losses is
    then the global batch's mean loss)."""
    per = len(y) // world
    r = distributed.rank()
    return x[r * per : (r + 1) * per], y[r * per : (r + 1) * per]


def _train(
    model: nn.Module,
    data: ImageDataset | Batches,
    config: TrainConfig,
    val_data: ImageDataset | Batches | None,
    device: str | torch.device,
    progress: ProgressCallback | None,
    on_epoch_end: Callable[[EpochStats], None] | None,
    world: int,
    num_workers: int = 0,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
) -> TrainHistory:
    device = torch.device(device)
    augment = config.augment
    if augment is None:
        augment = bool(getattr(data, "augment", False))
    # with several ranks an in-memory dataset is batched as one process would batch it with
    # world × batch_size, and each rank takes its slice of every batch (the same order and
    # augmentation on every rank: one process with the larger batch, exactly)
    shared = world > 1 and isinstance(data, ImageDataset)
    loader = _batches(
        data,
        batch_size=config.batch_size * (world if shared else 1),
        shuffle=True,
        augment=augment,
        seed=config.seed,
        num_workers=num_workers,
        shard=world > 1,
    )
    try:
        steps_per_epoch = len(loader)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = None
    if steps_per_epoch == 0:
        raise ValueError("the training data yields no batches (is the dataset empty?)")
    total_steps = max(1, (steps_per_epoch or 1) * config.epochs)

    model.to(device)
    net: nn.Module = model
    if world > 1:
        ids = [device] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)  # rank 0's weights
    optimizer = _make_optimizer(model, config)
    factor = _lr_factor(config, total_steps)
    loss_fn = nn.CrossEntropyLoss()
    history = TrainHistory()
    step = 0
    t_start = time.perf_counter()
    report = Reporter(progress, __name__)
    for epoch in range(1, config.epochs + 1):
        label = f"epoch {epoch}/{config.epochs}"
        model.train()
        t_epoch = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64)
        correct = 0
        seen = 0
        for epoch_steps, (x, y) in enumerate(loader, 1):
            if shared:
                x, y = _my_rows(x, y, world)
                if len(y) == 0:  # a last global batch smaller than the number of ranks
                    continue
            x, y = x.to(device), y.to(device)
            lr = config.lr * factor(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = net(x)
            loss = loss_fn(logits, y)
            if not _finite_everywhere(loss, world):
                mine = bool(torch.isfinite(loss))
                value = "non-finite on another rank" if mine else str(loss.item())
                raise TrainingDivergedError(
                    f"training loss became {value} at epoch {epoch}, step {step}; "
                    f"lower the learning rate (lr={config.lr})"
                )
            optimizer.zero_grad(set_to_none=True)
            (loss if penalty is None else loss + penalty(model)).backward()
            optimizer.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step(model)
            step += 1
            n = y.shape[0]
            loss_sum += loss.detach().double().cpu() * n
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += n
            if progress is not None:  # per step: only for a callback (a bar), not logged
                progress(
                    ProgressEvent(
                        "train",
                        f"{label}: loss {loss_sum.item() / seen:.4f}  acc {correct / seen:.4f}",
                        done=epoch_steps,
                        total=steps_per_epoch,
                        transient=True,
                        fields={"epoch": epoch, "epochs": config.epochs},
                    )
                )
        if world > 1:  # the epoch's numbers over every rank's rows
            totals = torch.tensor([float(loss_sum), float(correct), float(seen)])
            distributed.all_reduce_([totals])
            loss_sum, correct, seen = totals[0].double(), int(totals[1]), int(totals[2])
        if seen == 0:
            raise ValueError("the training data yields no batches (is the dataset empty?)")
        val = None
        if val_data is not None:
            val = evaluate(model, val_data, device=device, num_workers=num_workers)
        stats = EpochStats(
            epoch=epoch,
            train_loss=loss_sum.item() / seen,
            train_top1=correct / seen,
            lr=config.lr * factor(step - 1),
            seconds=time.perf_counter() - t_epoch,
            val_loss=None if val is None else val.loss,
            val_top1=None if val is None else val.top1,
        )
        report(
            "epoch",
            f"{label}: loss {stats.train_loss:.4f}  acc {stats.train_top1:.4f}"
            + (f"  val acc {val.top1:.4f}" if val is not None else "")
            + f"  ({stats.seconds:.1f} s)",
            done=epoch,
            total=config.epochs,
            **asdict(stats),
        )
        history.epochs.append(stats)
        if on_epoch_end is not None:
            on_epoch_end(stats)
    history.seconds = time.perf_counter() - t_start
    return history


def _finite_everywhere(loss: torch.Tensor, world: int) -> bool:
    """Whether the loss is finite on every rank (one scalar all-reduce per step with several
    ranks, so that all stop together rather than some waiting in the gradient all-reduce)."""
    bad = torch.tensor([0.0 if bool(torch.isfinite(loss)) else 1.0], device=loss.device)
    if world > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return float(bad) == 0.0


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: ImageDataset | Batches,
    *,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> EvalResult:
    """Mean cross-entropy and top-1 accuracy of ``model`` on ``data`` (eval mode, no grad).

    The model's train/eval mode is restored afterwards. A map-style dataset is read in order
    by ``num_workers`` worker processes (0: this one).

    >>> from mipp.zoo.data import ImageDataset
    >>> ds = ImageDataset(torch.eye(3), torch.tensor([0, 1, 2]), num_classes=3, name="id")
    >>> evaluate(torch.nn.Identity(), ds).top1
    1.0
    """
    device = torch.device(device)
    loader = _batches(
        data, batch_size=batch_size, shuffle=False, augment=False, seed=0, num_workers=num_workers
    )
    with eval_mode(model):
        loss_sum = 0.0
        correct = 0
        n = 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += y.shape[0]
    if n == 0:
        raise ValueError("cannot evaluate on empty data")
    return EvalResult(loss=loss_sum / n, top1=correct / n, n=n)
