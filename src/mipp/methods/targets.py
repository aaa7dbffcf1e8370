"""Per-unit features and targets for MIPP, from what :mod:`mipp.surgery.capture` recorded.

For a unit group (:mod:`mipp.surgery.structure`), ``X`` is what its consumers read, one
feature block per unit ``(n, units, f)``; the target ``Y`` is what those consumers produce —
the next activations (or the network output), one column per feature of each next unit, as
the next layers read them (after their norms and activations). Layers that read a
concatenation through their own BatchNorm (:attr:`ModelStructure.read_through`, a DenseNet's
layers) are recorded at the concatenation, and a block of features equal to one already
taken from such a reader is not repeated, on either side: a unit read by 24 later layers
of a dense block is one feature, not 24. Where a next layer reads a
concatenation, only the channels the consumer produced are target columns (a DenseNet
layer's input holds every earlier layer's channels: q would grow with depth²),
labelled with the group and unit it belongs to so the walk can restrict it to the units
already kept there. The estimator's reusable statistics are computed here, once per group.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from mipp.errors import MippError
from mipp.estimators import Estimator
from mipp.estimators.moments import MomentAccumulator, principal_axes, principal_moments
from mipp.surgery.capture import OUTPUT, Activations, Pool
from mipp.surgery.structure import ModelStructure, UnitGroup

__all__ = [
    "RESIDUALS",
    "GroupData",
    "Residual",
    "StreamedMoments",
    "branch_ends",
    "branch_layers",
    "compress_streams",
    "group_columns",
    "group_data",
    "principal_unit_features",
    "unit_features",
]


@dataclass
class GroupData:
    """A group's prepared estimator statistics and the labels of its target columns."""

    group: UnitGroup
    prepared: Any
    #: per target column: index of the owning group in the walk (-1: network output, -2: a
    #: group outside the pruning scope) and the unit it belongs to
    owner: Tensor
    unit: Tensor
    features: int


def unit_features(recorded: Tensor, index: tuple[tuple[int, ...], ...], pool: Pool) -> Tensor:
    """Features of each unit from a recorded layer input → ``(n, units, f)``.

    ``index[j]`` are the input indices of unit j. A conv input is already pooled per channel
    ``(n, C, f)``; a Linear input ``(n, F)`` after a flatten holds m values per unit (its
    map), averaged (``pool="mean"``) or adaptively pooled to k×k when the map is square.

    >>> unit_features(torch.arange(8.0).reshape(1, 8), ((0, 1, 2, 3), (4, 5, 6, 7)), "mean")
    tensor([[[1.5000],
             [5.5000]]])
    """
    widths = {len(ix) for ix in index}
    if len(widths) != 1:
        raise MippError("units map to different numbers of input features; not supported")
    idx = torch.tensor(index, dtype=torch.long)  # (U, m)
    if recorded.ndim == 3:  # conv input, pooled per channel: (n, C, f)
        n = recorded.shape[0]
        return recorded[:, idx, :].reshape(n, len(index), -1)
    gathered = recorded[:, idx]  # (n, U, m): a Linear input, m values per unit
    n, u, m = gathered.shape
    if m == 1:
        return gathered
    side = math.isqrt(m)
    if pool == "mean" or side * side != m:
        return gathered.mean(-1, keepdim=True)
    maps = gathered.reshape(n * u, 1, side, side)
    k = min(int(pool), side)
    return torch.nn.functional.adaptive_avg_pool2d(maps, k).reshape(n, u, k * k)


Residual = Literal["sum", "branch"]
#: what a unit whose consumer adds into a residual stream is measured against
RESIDUALS: tuple[str, ...] = ("sum", "branch")


def branch_ends(structure: ModelStructure) -> dict[str, UnitGroup]:
    """Layer → the residual stream it adds into, for every producer of a stream group (a
    residual branch's last layer, a projection shortcut)."""
    return {p: h for h in structure.groups if h.kind == "stream" for p in h.producers}


def branch_layers(structure: ModelStructure, groups: list[UnitGroup]) -> set[str]:
    """The consumers of ``groups`` whose *output* the ``"branch"`` target reads."""
    ends = branch_ends(structure)
    return {c.layer for g in groups for c in g.consumers if c.layer in ends}


def group_columns(
    structure: ModelStructure,
    groups: list[UnitGroup],
    acts: Activations,
    pool: Pool,
    *,
    residual: Residual = "sum",
) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """For each group of the walk: ``(x (n, U, f), y (n, Q), owner (Q,), unit (Q,))``.

    ``acts`` may hold the whole calibration set or a single batch of it (streaming).
    ``residual="branch"``: for a consumer that adds into a residual stream (the last layer of
    a residual branch), the target is that consumer's own output (recorded as
    ``layer + OUTPUT``), one column block per stream unit, instead of the activations after
    the addition that the next layers read (``"sum"``): those also hold the shortcut, which
    the group's units do not produce but can partly predict (they are computed from the
    same block input).
    """
    walk_index = {g.name: i for i, g in enumerate(groups)}
    producers = {h.name: set(h.producers) for h in structure.groups}
    through = structure.read_through
    ends = branch_ends(structure) if residual == "branch" else {}
    for g in groups:
        blocks, seen, shared = [], set(), []
        for c in g.consumers:
            key = acts.alias.get(c.layer, c.layer)
            if key not in seen:
                seen.add(key)
                block = unit_features(acts.of(c.layer), c.index, pool)
                if c.layer in through:  # the concatenation's values: once for all readers
                    if any(torch.equal(block, b) for b in shared):
                        continue
                    shared.append(block)
                blocks.append(block)
        x = torch.cat(blocks, dim=2)
        cols, owner, unit, seen, shared_y = [], [], [], set(), []
        for c in g.consumers:
            if c.layer in ends:  # residual="branch": the consumer's own output
                h = ends[c.layer]
                if (c.layer, OUTPUT) not in seen:
                    seen.add((c.layer, OUTPUT))
                    out = acts.of(c.layer + OUTPUT)
                    if out.ndim == 2:
                        out = out.unsqueeze(-1)
                    idx = torch.tensor(h.producer_index[c.layer], dtype=torch.long)
                    feats = out[:, idx, :].reshape(len(out), len(idx), -1)  # (n, U_h, f)
                    f = feats.shape[2]
                    cols.append(feats.reshape(len(feats), -1))
                    owner += [walk_index.get(h.name, -2)] * (feats.shape[1] * f)
                    unit += [j for j in range(feats.shape[1]) for _ in range(f)]
                continue
            if c.layer == structure.output_layer:
                if "output" not in seen:
                    seen.add("output")
                    cols.append(acts.output)
                    owner += [-1] * acts.output.shape[1]
                    unit += list(range(acts.output.shape[1]))
                continue
            for nxt in structure.next_layers[c.layer]:
                if not structure.readers.get(nxt) and (acts.alias.get(nxt, nxt), "") not in seen:
                    # a layer reading no unit group: its whole input, outside the walk
                    seen.add((acts.alias.get(nxt, nxt), ""))
                    whole = acts.of(nxt)
                    cols.append(whole.reshape(len(whole), -1))
                    owner += [-2] * cols[-1].shape[1]
                    unit += list(range(cols[-1].shape[1]))
                read = structure.readers.get(nxt, [])
                # of what the next layer reads, the units the consumer itself produces (a
                # concatenation also holds other branches' and earlier layers' channels,
                # which are not the consumer's output); all of it when none is
                own = [(h, hc) for h, hc in read if c.layer in producers.get(h, ())]
                for h_name, h_cons in own or read:
                    key = (acts.alias.get(nxt, nxt), h_name)
                    if key in seen:
                        continue
                    seen.add(key)
                    feats = unit_features(acts.of(nxt), h_cons.index, pool)  # (n, U_h, f)
                    if nxt in through:  # read through a norm of a concatenation: once
                        if any(h == h_name and torch.equal(feats, b) for h, b in shared_y):
                            continue
                        shared_y.append((h_name, feats))
                    cols.append(feats.reshape(len(feats), -1))
                    f = feats.shape[2]
                    owner += [walk_index.get(h_name, -2)] * (feats.shape[1] * f)
                    unit += [j for j in range(feats.shape[1]) for _ in range(f)]
        if not cols:
            raise MippError(f"group {g.name!r} has no measurable target")
        yield x, torch.cat(cols, dim=1), torch.tensor(owner), torch.tensor(unit)


def principal_unit_features(x: Tensor, k: int) -> Tensor:
    """``(n, U, f)`` → ``(n, U, min(k, f))``: each unit's samples projected on its k leading
    principal axes (:func:`mipp.estimators.moments.principal_axes` of its own f×f
    covariance), the sample counterpart of :func:`~mipp.estimators.moments.principal_moments`.
    """
    if k >= x.shape[2]:
        return x
    xd = x.double()
    xc = xd - xd.mean(0)
    blocks = torch.einsum("nua,nub->uab", xc, xc) / len(x)
    axes = principal_axes(blocks, k)
    return torch.einsum("nua,uak->nuk", xd, axes).to(x.dtype)


def group_data(
    structure: ModelStructure,
    groups: list[UnitGroup],
    acts: Activations,
    estimator: Estimator,
    pool: Pool,
    *,
    device: torch.device | None = None,
    residual: Residual = "sum",
    stream_features: int | None = None,
) -> list[GroupData]:
    """X, Y and prepared statistics of each group in ``groups`` (the walk, output → input).

    ``device``: where X and Y go before ``estimator.prepare`` (recorded activations are on
    the CPU); e.g. the model's GPU for the ``ksg`` estimator, which computes where its data is.
    ``stream_features``: a residual-stream group's units keep only their leading principal
    components (:func:`principal_unit_features`).
    """
    out = []
    for g, (x, y, owner, unit) in zip(
        groups, group_columns(structure, groups, acts, pool, residual=residual), strict=True
    ):
        if stream_features is not None and g.kind == "stream":
            x = principal_unit_features(x, stream_features)
        prepared = estimator.prepare(x.to(device), y.to(device))
        out.append(GroupData(g, prepared, owner, unit, x.shape[2]))
    return out


def compress_streams(data: list[GroupData], stream_features: int | None) -> list[GroupData]:
    """Replace the prepared moments of every residual-stream group by those of its units'
    ``stream_features`` leading principal components (closed forms; in place)."""
    if stream_features is None:
        return data
    for d in data:
        if d.group.kind == "stream" and d.features > stream_features:
            d.prepared = principal_moments(d.prepared, stream_features)
            d.features = stream_features
    return data


class StreamedMoments:
    """Per-group second moments accumulated batch by batch (for the closed-form estimators).

    Feed every batch's :class:`~mipp.surgery.capture.Activations` to :meth:`update` (the
    ``on_batch`` of :func:`mipp.surgery.capture.stream_activations`); :meth:`group_data` then gives
    the same :class:`GroupData` as :func:`group_data` with a closed-form estimator, with
    ``prepared`` the float64 :class:`~mipp.estimators.Moments` — memory O(D²) per group,
    whatever the calibration size. ``full_target=False`` keeps only the target's variances
    (enough for ``linear``). ``folds=K`` (>= 2; default 0: none) also keeps the moments of K
    folds of the calibration rows (row r in fold r mod K, across batches), which the
    closed forms' held-out test of confidence mode needs (``Moments.folds``).
    ``rows_if_wider_than``: groups with more features than this also keep their rows
    (``Moments.samples``; the estimator's :meth:`rows_if_wider_than`).
    """

    def __init__(
        self,
        structure: ModelStructure,
        groups: list[UnitGroup],
        pool: Pool,
        *,
        full_target: bool = True,
        folds: int = 0,
        residual: Residual = "sum",
        rows_if_wider_than: int | None = None,
    ) -> None:
        self._structure, self._groups, self._pool = structure, groups, pool
        self._residual = residual
        self._acc = [
            MomentAccumulator(
                full_target=full_target, folds=folds, rows_if_wider_than=rows_if_wider_than
            )
            for _ in groups
        ]
        self._labels: list[tuple[Tensor, Tensor, int]] | None = None
        #: wall time spent in :meth:`update` and :meth:`group_data` (seconds)
        self.seconds = 0.0

    def update(self, acts: Activations) -> None:
        t = time.perf_counter()
        labels = []
        for acc, (x, y, owner, unit) in zip(
            self._acc,
            group_columns(self._structure, self._groups, acts, self._pool, residual=self._residual),
            strict=True,
        ):
            acc.update(x, y)
            labels.append((owner, unit, x.shape[2]))
        if self._labels is None:
            self._labels = labels
        self.seconds += time.perf_counter() - t

    def group_data(self) -> list[GroupData]:
        if self._labels is None:
            raise MippError("no calibration batch was seen")
        t = time.perf_counter()
        for acc in self._acc:  # under torch.distributed: every rank's rows (a no-op otherwise)
            acc.all_reduce()
        data = [
            GroupData(g, acc.moments(), owner, unit, f)
            for g, acc, (owner, unit, f) in zip(self._groups, self._acc, self._labels, strict=True)
        ]
        self.seconds += time.perf_counter() - t
        return data
