"""What several ``mipp`` commands share: consoles, tables, number formatting, argparse types,
the data and training flag groups, a checkpoint's dataset, and the progress renderer.

rich is used here and in the command modules only: the library never draws. Long library
calls take ``progress=`` (a callable receiving :class:`~mipp.progress.ProgressEvent`
objects); :class:`ProgressRenderer` is the one place that turns those events into output.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.status import Status
from rich.table import Table
from rich.text import Text

from mipp import distributed
from mipp._io import write_json
from mipp.errors import MippError
from mipp.metrics import count_macs, count_params, layer_widths, measure_latency
from mipp.progress import ProgressEvent
from mipp.validation import check_device, check_input_shape, expected_input_shape
from mipp.zoo.checkpoint import Checkpoint
from mipp.zoo.config import OPTIMIZERS, SCHEDULES, TrainConfig
from mipp.zoo.data import ImageDataset, list_datasets, load_dataset

__all__ = [
    "ProgressRenderer",
    "add_data_flags",
    "add_force_flag",
    "add_train_flags",
    "check_data_fits",
    "checkpoint_data",
    "device",
    "fmt_int",
    "fmt_ratio",
    "fraction",
    "holdout_fraction",
    "input_shape",
    "make_console",
    "model_numbers",
    "non_negative_int",
    "pool",
    "positive_int",
    "rendering",
    "seed",
    "size_table",
    "train_config",
    "widths",
    "write_run_json",
]


# ----------------------------------------------------------------------------- output


def make_console(*, stderr: bool = False, soft_wrap: bool = False, quiet: bool = False) -> Console:
    """A console for one command (no syntax highlighting, no source paths in log lines);
    ``quiet`` prints nothing (the ranks other than 0 of a distributed run)."""
    return Console(stderr=stderr, highlight=False, soft_wrap=soft_wrap, log_path=False, quiet=quiet)


def size_table(title: str, rows: list[tuple[str, str]]) -> Table:
    """A two-column table of ``(quantity, value)`` rows, values right-aligned."""
    table = Table(title=title, show_header=False)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    return table


def fmt_int(n: int) -> str:
    """``61706`` → ``"61,706"``."""
    return f"{n:,}"


def fmt_ratio(before: float, after: float) -> str:
    """``after / before`` as ``"0.025x"``; ``"-"`` when ``before`` is 0."""
    return f"{after / before:.3f}x" if before else "-"


def add_force_flag(p: argparse.ArgumentParser) -> None:
    """``--force``: let ``--out`` replace a directory that already holds files."""
    p.add_argument(
        "--force",
        action="store_true",
        help="replace --out if it already holds files (never when it holds this command's "
        "input); the directory is swapped in whole at the end, so it holds the old run or the "
        "new one, never a mixture",
    )


def write_run_json(path: Path, obj: Any) -> None:
    """A run directory's JSON file (``config.json``, ``metrics.json``), written atomically."""
    write_json(path, obj, indent=2)


# ----------------------------------------------------------------------------- progress


class ProgressRenderer:
    """Draws :class:`~mipp.progress.ProgressEvent` objects on a rich console.

    - ``"train"`` step events (transient, with ``done`` / ``total``): a progress bar per
      epoch, its text replaced by the event's message at every step;
    - other transient events ("capturing activations ..."): a spinner showing the latest one;
    - non-transient events (epoch results, bisection steps, per-layer results, sweep lines):
      one ``console.log`` line each, after the bar or spinner has been taken down.

    Event text is shown as it is (never read as rich markup).

    Only one live display runs at a time; :meth:`close` takes down whatever is running (use
    :func:`rendering`, which closes it even on error). On a console that is not a terminal
    (a log file, CI) there are no bars or spinners: only the log lines are written.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self._live = console.is_terminal
        self._bar: Progress | None = None
        self._task: Any = None
        self._key: Any = None
        self._done = 0
        self._status: Status | None = None

    def __call__(self, event: ProgressEvent) -> None:
        if not event.transient:
            self.close()
            self.console.log(event.message, markup=False, emoji=False)
        elif not self._live:
            return
        elif event.stage == "train" and event.done is not None:
            self._step(event)
        else:
            self._stop_bar()
            if self._status is None:
                self._status = self.console.status(Text(event.message))
                self._status.start()
            else:
                self._status.update(Text(event.message))

    def _step(self, event: ProgressEvent) -> None:
        self._stop_status()
        key = event.fields.get("epoch")
        done = event.done or 0
        if self._bar is None or key != self._key or done < self._done:
            self._stop_bar()
            self._bar = Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(event.message, total=event.total)
            self._key = key
        self._done = done
        self._bar.update(self._task, completed=done, total=event.total, description=event.message)

    def _stop_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def _stop_status(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def close(self) -> None:
        """Take down the running bar or spinner, if any."""
        self._stop_bar()
        self._stop_status()


@contextlib.contextmanager
def rendering(console: Console, *, enabled: bool = True) -> Iterator[ProgressRenderer | None]:
    """A :class:`ProgressRenderer` on ``console`` for the block (None when not ``enabled``:
    ``--no-progress``), closed when the block ends, even on error."""
    if not enabled:
        yield None
        return
    renderer = ProgressRenderer(console)
    try:
        yield renderer
    finally:
        renderer.close()


# ----------------------------------------------------------------------------- argparse types


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """A whole number >= 0."""
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


#: seeds are 0 .. 2**32 - 1 (what every RNG mipp seeds accepts)
MAX_SEED = 2**32 - 1


def seed(text: str) -> int:
    """A seed: a whole number in [0, 2**32 - 1]."""
    value = _whole(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"a seed is in [0, {MAX_SEED}], got {value}")
    return value


def holdout_fraction(text: str) -> float:
    """A share of a set held out: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text}")
    return value


def device(text: str) -> str:
    """A torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``): checked by
    :func:`mipp.validation.check_device` before anything is created."""
    try:
        check_device(text)
    except MippError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def fraction(text: str) -> float:
    """A finite number; its range is checked by the library (one-line error naming it)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


#: a finite number (learning rate, momentum, weight decay: TrainConfig checks the ranges)
finite_float = fraction


def pool(text: str) -> str | int:
    """``mean`` or a positive integer k (k x k pooling)."""
    if text == "mean":
        return "mean"
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"pool is 'mean' or a positive integer k, got {text!r}")
    return k


def widths(text: str) -> tuple[int, ...]:
    """``6,16,120,84`` → ``(6, 16, 120, 84)``."""
    try:
        out = tuple(int(w) for w in text.split(","))
    except ValueError:
        out = ()
    if not out or any(w < 1 for w in out):
        raise argparse.ArgumentTypeError(
            f"widths are comma-separated whole numbers >= 1 (e.g. 6,16,120,84), got {text!r}"
        )
    return out


# ----------------------------------------------------------------------------- flag groups


def add_data_flags(p: argparse.ArgumentParser, *, required: bool) -> None:
    """``--dataset``, ``--data-root``, ``--pad-to-32``, ``--channels``."""
    p.add_argument(
        "--dataset",
        required=required,
        default=None,
        help=f"dataset name, one of: {', '.join(list_datasets())}",
    )
    p.add_argument(
        "--data-root",
        default=None,
        help="directory holding the dataset files (default: $MIPP_DATA/<name>, "
        "then the Debian location)",
    )
    p.add_argument(
        "--pad-to-32",
        action="store_true",
        help="zero-pad 28x28 images to 32x32 (for CIFAR-style models)",
    )
    p.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),  # what load_dataset(channels=) takes; the library has no constant
        default=None,
        help="repeat grey images to 3 channels (3) or keep them (1)",
    )


def add_train_flags(p: argparse.ArgumentParser, *, epochs: int, lr: float) -> None:
    """The :class:`~mipp.zoo.config.TrainConfig` flags (read back by :func:`train_config`),
    plus ``--val-fraction`` and ``--seed``."""
    p.add_argument(
        "--epochs", type=positive_int, default=epochs, help=f"training epochs (default {epochs})"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=128, help="mini-batch size (default 128)"
    )
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="sgd",
        help="optimizer (default sgd, with momentum and Nesterov)",
    )
    p.add_argument("--lr", type=finite_float, default=lr, help=f"peak learning rate (default {lr})")
    p.add_argument("--momentum", type=finite_float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument(
        "--weight-decay", type=finite_float, default=5e-4, help="L2 weight decay (default 5e-4)"
    )
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="cosine",
        help="learning-rate schedule: cosine (per step), step (x0.1 at 1/3 and 2/3 "
        "of the run) or constant (default cosine)",
    )
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random crop + flip augmentation (default: on for CIFAR, off otherwise)",
    )
    p.add_argument(
        "--val-fraction",
        type=holdout_fraction,
        default=0.0,
        help="hold out this fraction of the training set for per-epoch validation "
        "(default 0: none)",
    )
    p.add_argument(
        "--seed",
        type=seed,
        default=0,
        help="seed of model initialisation, shuffling and augmentation (default 0)",
    )


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The :class:`~mipp.zoo.config.TrainConfig` of :func:`add_train_flags`' flags; a value it
    refuses (``--lr 0``, ``--momentum 1``) is one :class:`~mipp.errors.MippError` line."""
    try:
        return _train_config(args)
    except (TypeError, ValueError) as e:
        raise MippError(" ".join(str(e).split())) from None


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        augment=args.augment,
        seed=args.seed,
    )


# ----------------------------------------------------------------------------- data, numbers


def checkpoint_data(ckpt: Checkpoint, path: str, *, split: str, root: str | None) -> ImageDataset:
    """The ``split`` of the dataset a checkpoint was trained on (recorded in its sidecar);
    ``root`` overrides the recorded data directory."""
    ds_meta = ckpt.meta.get("extra", {}).get("dataset", {})
    if not ds_meta.get("name"):
        raise MippError(f"{path} does not record the dataset it was trained on")
    return load_dataset(
        ds_meta["name"],
        split=split,
        root=root or ds_meta.get("root"),
        pad_to_32=ds_meta.get("pad_to_32", False),
        channels=ds_meta.get("channels"),
    )


def input_shape(ds: ImageDataset) -> tuple[int, ...]:
    """Shape of one input of ``ds`` (no batch dimension)."""
    return tuple(ds.x.shape[1:])


def check_data_fits(ckpt: Checkpoint, path: str, ds: ImageDataset) -> None:
    """Refuse (one line, both shapes) a dataset whose inputs the checkpoint's model cannot
    take, before any forward pass."""
    check_input_shape(
        input_shape(ds),
        expected_input_shape(ckpt.spec),
        what=f"dataset {ds.name!r}",
        model=f"{ckpt.spec.name} of {path}",
        flatten=ckpt.spec.name == "mlp",
    )


def model_numbers(
    model: torch.nn.Module, shape: tuple[int, ...], *, latency_repeats: int
) -> dict[str, Any]:
    """Parameters, MACs, FLOPs, per-layer widths and (``latency_repeats`` > 0) the median CPU
    latency in ms at batch 1 and 64 of ``model`` on inputs of ``shape``."""
    macs = count_macs(model, shape)
    out: dict[str, Any] = {
        "params": count_params(model),
        "macs": macs.macs,
        "flops": macs.flops,
        "widths": layer_widths(model),
    }
    if latency_repeats > 0:
        lat = measure_latency(model, shape, batch_sizes=(1, 64), repeats=latency_repeats)
        out["latency_ms"] = {str(b): r.median_ms for b, r in lat.items()}
    return out


def distributed_command(body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command's ``body`` so that it also works under ``torchrun``: join the process
    group the environment describes (:func:`mipp.distributed.init_from_env`), tell the other
    ranks when this one fails (:func:`mipp.distributed.guard`, then a last status exchange
    for a failure after the last collective), and destroy the group if it was created here.
    Without a launcher it is just ``body(args)``."""
    launched = distributed.init_from_env()
    try:
        with distributed.guard():
            code = body(args)
            distributed.check_peers()
        return code
    finally:
        if launched:
            torch.distributed.destroy_process_group()
