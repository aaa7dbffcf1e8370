"""Pruning under ``torch.distributed``: each rank streams its shard, the statistics merge.

When a process group is initialised (``torchrun --nproc_per_node N``, or any
``torch.distributed.init_process_group``) with more than one rank, :func:`mipp.prune` runs on
every rank at once:

- **Calibration data.** In-memory data (an :class:`~mipp.zoo.data.ImageDataset`, a tensor or
  array, a dict of them or an ``(inputs, labels)`` pair) is taken to be the same on every
  rank: the seeded subset of ``calib_samples`` is drawn as on one process and rank r streams
  its rows r, r + N, r + 2N, …. An iterable (a ``DataLoader``, typically with a
  ``DistributedSampler``) is the rank's own shard: rank r reads its first
  :func:`share` ``(calib_samples)`` samples from it, so ``calib_samples`` counts all ranks.
- **Statistics.** MIPP's float64 moments (counts, means, centred cross-products) are merged
  across ranks exactly: each rank shifts its centred sums to the global mean,
  C = Σ_r [C_r + n_r (μ_r − μ)(μ_r − μ)ᵀ], and one ``all_reduce`` adds them. We all-reduce
  the *shifted centred* sums rather than raw Σxxᵀ, because raw sums lose the digits of the
  covariance to cancellation when means are large (the reason the single-process stream
  uses the pairwise update too); the result equals one process's moments on the union up
  to float64 rounding (the tests: 1e-10). The estimators that need the samples themselves
  (``ksg``, ``mlp``) are refused. Compensation's normal equations are summed the same way
  (or their rows gathered while there are fewer rows than features), and BatchNorm
  recalibration averages the ranks' running statistics weighted by their batch counts.
- **Decision.** Selection runs on rank 0 only and its decision is broadcast, so every rank
  removes the same units and holds the same pruned model (baselines decide on every rank
  and rank 0's decision is used).
- **Failures.** Every collective mipp makes starts by exchanging each rank's status: a rank
  whose pruning raises tells the others at their next collective, and they raise
  :class:`PeerFailedError` naming it and its error line instead of waiting forever. (A rank
  that dies outright — killed, out of memory — is torch's own timeout's business.)

The collectives run on the CPU for ``gloo`` and on the current CUDA device for ``nccl``.
With no process group, or one of a single rank, every function here is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from mipp.errors import MippError

__all__ = [
    "PeerFailedError",
    "active",
    "all_reduce_",
    "broadcast_object",
    "check_peers",
    "check_same_model",
    "gather_objects",
    "guard",
    "init_from_env",
    "rank",
    "share",
    "total",
    "world_size",
]


class PeerFailedError(MippError):
    """Another rank's pruning raised; this rank stops too (the message names it)."""


def active() -> bool:
    """Whether a ``torch.distributed`` process group of more than one rank is initialised."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return torch.distributed.get_world_size() if active() else 1


def share(total: int, rank: int, world: int) -> int:
    """Rank ``rank``'s part of ``total`` items split over ``world`` ranks as evenly as
    possible (the first ``total mod world`` ranks take one more); the parts sum to ``total``.

    >>> [share(10, r, 4) for r in range(4)]
    [3, 3, 2, 2]
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}) for world size {world}, got {rank}")
    return total // world + (1 if rank < total % world else 0)


def _device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_peers(error: str | None = None) -> None:
    """Exchange every rank's status (None: fine; else its one-line error) and raise
    :class:`PeerFailedError` if another rank reports an error. Every mipp collective calls
    it first; a failing rank calls it once with its error (see :func:`guard`)."""
    if not active():
        return
    statuses: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(statuses, error)
    me = rank()
    failed = [(r, s) for r, s in enumerate(statuses) if s is not None and r != me]
    if failed and error is None:
        r, s = failed[0]
        more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        raise PeerFailedError(f"rank {r} failed{more}: {s}")


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Around one rank's part of a collective job: an exception raised here is reported to
    the other ranks (at their next collective) before it propagates, so no rank waits for
    one that has given up."""
    try:
        yield
    except PeerFailedError:
        raise  # the others know already
    except BaseException as e:
        if active() and not getattr(e, "_mipp_told_peers", False):
            line = (str(e).splitlines() or [""])[0]
            with contextlib.suppress(Exception):
                e._mipp_told_peers = True  # an outer guard must not tell them twice
            with contextlib.suppress(Exception):
                check_peers(f"{type(e).__name__}: {line}")
        raise


def init_from_env() -> bool:
    """Join the process group a launcher describes in the environment (``torchrun`` sets
    ``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``), with NCCL
    when CUDA is available (on GPU ``LOCAL_RANK``) and gloo otherwise. Returns whether it
    initialised one (the caller then destroys it); False when already initialised or when
    the environment names a single process."""
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        return False
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise MippError(
            f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}"
        ) from None
    if world <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def all_reduce_(tensors: Sequence[Tensor], op: str = "sum") -> None:
    """In place, the sum (``op="sum"``), minimum or maximum over ranks of each tensor, all
    in one collective (the tensors are packed into one float64 buffer, so integer counts up
    to 2⁵³ stay exact)."""
    if not active() or not tensors:
        return
    check_peers()
    ops = {
        "sum": torch.distributed.ReduceOp.SUM,
        "min": torch.distributed.ReduceOp.MIN,
        "max": torch.distributed.ReduceOp.MAX,
    }
    if op not in ops:
        raise ValueError(f"op must be one of {', '.join(ops)}, got {op!r}")
    buffer = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    buffer = buffer.to(_device())
    torch.distributed.all_reduce(buffer, op=ops[op])
    buffer = buffer.cpu()
    start = 0
    for t in tensors:
        n = t.numel()
        t.copy_(buffer[start : start + n].view_as(t))
        start += n


def total(n: int) -> int:
    """The sum of an integer count over every rank (``n`` itself without a process group).

    >>> total(7)
    7
    """
    if not active():
        return n
    count = torch.tensor([float(n)], dtype=torch.float64)
    all_reduce_([count])
    return int(count[0])


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled); ``obj`` itself without a process
    group."""
    if not active():
        return obj
    check_peers()
    box = [obj if rank() == src else None]
    torch.distributed.broadcast_object_list(box, src=src, device=_device())
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (pickled); ``[obj]`` without a process group."""
    if not active():
        return [obj]
    check_peers()
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def check_same_model(model: torch.nn.Module) -> None:
    """Refuse ranks holding different models (every rank must prune the same network): each
    rank's parameter and buffer names, shapes and float64 sums are compared with rank 0's.
    A no-op without a process group."""
    if not active():
        return
    with torch.no_grad():
        mine = [
            (name, tuple(t.shape), float(t.double().sum()) if t.is_floating_point() else 0.0)
            for name, t in [*model.named_parameters(), *model.named_buffers()]
        ]
    every = gather_objects(mine)
    for r, theirs in enumerate(every[1:], 1):
        if theirs != every[0]:
            pairs = zip(every[0], theirs, strict=False)
            diff = next((a[0] for a, b in pairs if a != b), "the list of parameters")
            raise MippError(
                f"rank {r} holds a different model from rank 0 (first difference: {diff}); "
                f"every rank must prune the same network (load the same weights on each)"
            )
