"""MIPP for users of Torch-Pruning's own pruners: :class:`MippImportance`.

Torch-Pruning (``torch_pruning``, mipp's structural backend) ranks channels with an
*importance*: ``importance(group)`` returns one score per channel of the group's root layer,
and its pruners (``tp.pruner.MetaPruner`` / ``BasePruner``) remove the lowest-scoring ones.
:class:`MippImportance` is such an importance, computed by MIPP's own machinery:

1. :func:`~mipp.surgery.structure.build_structure` finds mipp's unit groups on the model *as
   it is now* (possibly already partly pruned) and :mod:`mipp.surgery.capture` records, on
   the calibration inputs, what every consumer reads; :mod:`mipp.methods.targets` turns that
   into each group's per-unit features X and target Y (the next layer's activations, or the
   logits), as the MIPP method does (docs/METHOD.md §2);
2. the estimator's state on (X, Y) ranks the units by :func:`elimination_scores`: backward
   elimination by conditional information, each unit scored by the share of I(X; Y) lost
   once it and every unit ranked below it are gone.

A Torch-Pruning group is matched to mipp's unit group by the name of its root layer (any
producer of the group), and the scores are laid out in that layer's channel order.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from mipp.errors import CalibrationError
from mipp.estimators import Estimator, EstimatorState, make_estimator
from mipp.methods.mipp import check_estimator, check_pool
from mipp.methods.targets import StreamedMoments, group_data
from mipp.modules import first_parameter
from mipp.surgery.capture import Pool, capture_activations, stream_activations
from mipp.surgery.structure import SCOPES, ModelStructure, Scope, UnitGroup, build_structure

__all__ = ["MippImportance", "elimination_scores"]


def elimination_scores(state: EstimatorState) -> Tensor:
    """Rank the units of ``state`` by backward elimination on conditional information.

    Starting from every unit, each step computes Δ_i = I(X_i; Y | X_{S∖i}) for every unit i
    still in S and removes the one with the smallest Δ (ties: the lowest index), until S is
    empty. Unit i's score is the information lost once it is removed, by the chain rule

        score_i = (Δ_{u_1} + … + Δ_{u_k}) / I(X_all; Y),     u_k = i,

    the share of I(X; Y) that removing i and every unit removed before it costs: 0 for
    units that carry nothing (a constant unit, or one whose removal costs nothing given the
    others), 1 for the last unit (up to round-off). Scores increase along the removal order,
    so removing the k lowest-scoring units removes the first k of the elimination, a
    nested sequence; of two exact copies one is removed early and the other scores what the
    pair carries. All scores are 0 when the target carries no information. Costs U(U+1)/2
    Δ evaluations (cheap for the closed forms ``gaussian`` and ``linear``).

    ``state`` (fresh from ``Estimator.start``) is consumed: S ends with one unit. Returns
    float64 ``(U,)``.

    >>> from mipp.estimators import GaussianEstimator
    >>> g = torch.Generator().manual_seed(0)
    >>> z = torch.randn(3000, 2, generator=g, dtype=torch.float64)
    >>> x = torch.stack([z[:, 0], torch.ones(3000, dtype=torch.float64), z[:, 0], z[:, 1]], 1)
    >>> y = z @ torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    >>> y += 0.5 * torch.randn(3000, 1, generator=g, dtype=torch.float64)
    >>> est = GaussianEstimator()
    >>> s = elimination_scores(est.start(est.prepare(x, y)))
    >>> torch.argsort(s).tolist()[:2], round(float(s.max()), 6)  # constant, then a copy
    ([1, 0], 1.0)
    """
    state.pvalues = False  # only Δ's value is used: no significance test
    scores = torch.zeros(state.n_units, dtype=torch.float64)
    active = [int(u) for u in state.active.nonzero().flatten().tolist()]
    info = state.information()
    lost = 0.0
    while active:
        values = [state.delta(u).value for u in active]
        k = min(range(len(active)), key=values.__getitem__)
        unit = active.pop(k)
        lost += max(values[k], 0.0)
        scores[unit] = lost
        if active:
            state.remove(unit)
    return scores / info if info > 0 else torch.zeros_like(scores)


def _fingerprint(model: nn.Module) -> tuple:
    """What the scores depend on: every parameter's and buffer's name, shape, storage and
    in-place version counter. Torch-Pruning's removals replace parameters (new storage and
    shape); an optimizer step or a BatchNorm update changes them in place (new version)."""
    return tuple(
        (name, tuple(t.shape), t.data_ptr(), t._version)
        for name, t in chain(model.named_parameters(), model.named_buffers())
    )


def _unit_channels(group: UnitGroup, layer: str) -> Iterator[tuple[int, list[int]]]:
    """``(unit, its output channels in producer layer)`` for every unit of ``group``."""
    for unit, channels in enumerate(group.producer_index[layer]):
        yield unit, (list(channels) if isinstance(channels, tuple | list) else [int(channels)])


def _out_channels(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    return None


class MippImportance(tp.importance.Importance):
    """A Torch-Pruning importance that ranks a group's channels by MIPP's conditional
    information (see the module docstring and :func:`elimination_scores`).

    ``importance(group)`` returns float64 scores, exactly one per index of the group's root
    (``len(group[0].idxs)``: every channel of the root for the full groups Torch-Pruning's
    pruners score), higher = keep. Unit i of a mipp group scores the share of the group's
    information about its target — I(X; Y) with X the units' activations as their
    consumers read them and Y the next layer's activations (the logits for the last hidden
    layer) — that is lost once i and every unit ranked below it are removed. Scores are in
    [0, 1] in every layer, so Torch-Pruning's global ranking (``global_pruning=True``)
    removes, in every layer, the units whose cumulative loss is below one shared share.

    Returns ``None`` for a group mipp does not score — rooted at the output layer, outside
    ``scope``, or not one of mipp's unit groups: Torch-Pruning's pruners then leave the
    group whole (``BasePruner`` skips a group whose importance is None, under local and
    global ranking alike; a large finite score would protect it under global ranking only).

    Scores never go stale: they are computed for every group at once, from activations
    captured on the model as it is at the call, and reused only while every parameter and
    buffer of the model is unchanged — same shapes, same storage, same in-place version
    counter. A pruning step (Torch-Pruning replaces the pruned parameters) or any weight
    update in between (fine-tuning) makes the next call recompute. Within one pruning step
    Torch-Pruning scores every group before it removes anything, so a step costs one
    capture.

    Args:
        model: the network Torch-Pruning prunes (the same object the pruner holds).
        inputs: calibration inputs ``(n, *input_shape)`` (no labels are used), moved to the
            model's device when scores are computed.
        estimator: the conditional-MI estimator, a name (``"gaussian"``, the default;
            ``"linear"``; ``"mlp"`` and ``"ksg"`` work but cost U(U+1)/2 trainings or
            neighbour searches per group) or an :class:`~mipp.estimators.Estimator`.
        pool: per-channel pooling of conv maps: ``"mean"`` (default) or k (k×k blocks).
        scope: ``"all"`` (default: residual streams too, as Torch-Pruning prunes them) or
            ``"internal"`` (single-producer groups only, :func:`mipp.prune`'s default).
        batch_size: calibration samples per forward pass.
        seed: seeds a named estimator that uses randomness (``mlp``, ``ksg``).

    After a call: ``scores_`` (layer name → float64 scores of each of its output channels,
    for every producer of every scored group) and ``refreshes_`` (how many times the scores
    were computed).

    >>> import mipp, torch, torch_pruning as tp
    >>> from mipp.interop import MippImportance
    >>> net = mipp.create_model("lenet5", in_channels=1, input_size=28)
    >>> x = torch.randn(512, 1, 28, 28)
    >>> pruner = tp.pruner.MetaPruner(net, x[:2], importance=MippImportance(net, x),
    ...                               pruning_ratio=0.5, ignored_layers=[net.fc3])
    >>> pruner.step()
    >>> [net.conv1.out_channels, net.conv2.out_channels, net.fc1.out_features]
    [3, 8, 60]
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Tensor,
        *,
        estimator: str | Estimator = "gaussian",
        pool: Pool = "mean",
        scope: Scope = "all",
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(inputs, Tensor) or inputs.ndim < 2 or len(inputs) < 2:
            raise ValueError(
                "inputs must be a tensor of at least 2 calibration samples (n, *input_shape), "
                + (
                    f"got shape {tuple(inputs.shape)}"
                    if isinstance(inputs, Tensor)
                    else f"got {type(inputs).__name__}"
                )
            )
        if not inputs.is_floating_point() or not bool(torch.isfinite(inputs).all()):
            raise ValueError("inputs must be finite floating-point values")
        check_estimator(estimator)
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}; got {scope!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.model = model
        self.inputs = inputs.detach()
        self.estimator = estimator
        self.pool = check_pool(pool)
        self.scope: Scope = scope
        self.batch_size = batch_size
        self.seed = seed
        self.scores_: dict[str, Tensor] = {}
        self.refreshes_ = 0
        self._fingerprint: tuple | None = None
        self._structure: ModelStructure | None = None

    def __repr__(self) -> str:
        est = self.estimator if isinstance(self.estimator, str) else self.estimator.name
        return (
            f"MippImportance(estimator={est!r}, pool={self.pool!r}, scope={self.scope!r}, "
            f"samples={len(self.inputs)})"
        )

    @torch.no_grad()
    def __call__(self, group: Any) -> Tensor | None:
        """One score per index of ``group``'s root (float64), or None to leave it whole."""
        dep, idxs = group[0]
        root = dep.target.module
        names = {m: n for n, m in self.model.named_modules()}
        if root not in names:
            raise ValueError(
                f"the group's root ({type(root).__name__}) is not a layer of the model this "
                f"MippImportance was built for; build it with the model the pruner prunes"
            )
        width = _out_channels(root)
        self._refresh()
        assert self._structure is not None
        if width is None or not self._structure.graph.is_out_channel_pruning_fn(dep.handler):
            return None  # mipp scores output channels of Conv/Linear roots only
        scores = self.scores_.get(names[root])
        if scores is None:
            return None
        if len(scores) != width:  # an invariant: the scores belong to the current model
            raise RuntimeError(
                f"MippImportance has {len(scores)} scores for {names[root]!r}, which has "
                f"{width} output channels"
            )
        out = scores[torch.as_tensor([int(i) for i in idxs], dtype=torch.long)]
        if len(out) != len(idxs):
            raise RuntimeError(f"{len(out)} scores for a group of {len(idxs)} channels")
        return out

    # ------------------------------------------------------------------------- scores

    def _estimator(self) -> Estimator:
        if isinstance(self.estimator, str):
            return make_estimator(self.estimator, seed=self.seed)
        return self.estimator

    def _refresh(self) -> None:
        """Recompute every group's scores unless the model is unchanged since the last time."""
        key = _fingerprint(self.model)
        if key == self._fingerprint and self._structure is not None:
            return
        device = first_parameter(self.model).device
        x = self.inputs.to(device)
        with torch.enable_grad():  # Torch-Pruning traces the model with autograd
            structure = build_structure(self.model, x[:2])
        groups = structure.in_scope(self.scope)
        est = self._estimator()
        scores: dict[str, Tensor] = {}
        if groups:
            for d in self._statistics(structure, groups, est, x):
                units = elimination_scores(est.start(d.prepared))
                for layer in d.group.producers:
                    width = sum(len(c) for _, c in _unit_channels(d.group, layer))
                    out = torch.zeros(width, dtype=torch.float64)
                    for unit, channels in _unit_channels(d.group, layer):
                        out[channels] = units[unit]
                    scores[layer] = out
        self.scores_ = scores
        self._structure = structure
        self._fingerprint = _fingerprint(self.model)  # as after the capture (eval, no grad)
        self.refreshes_ += 1

    def _statistics(
        self, structure: ModelStructure, groups: list[UnitGroup], est: Estimator, x: Tensor
    ) -> list:
        """Each group's prepared statistics on all of the current model's target columns,
        as :class:`~mipp.methods.mipp.MIPP` computes them (streamed moments for the closed
        forms, recorded activations otherwise)."""
        model = self.model
        layers = structure.recorded_modules(structure.readers)
        batches = (x[i : i + self.batch_size] for i in range(0, len(x), self.batch_size))
        if est.streams:
            stream = StreamedMoments(
                structure, groups, self.pool, full_target=est.needs_target_covariance
            )
            stream_activations(model, batches, layers, pool=self.pool, on_batch=stream.update)
            data = stream.group_data()
        else:
            acts = capture_activations(model, batches, layers, pool=self.pool)
            device = est.data_device(first_parameter(model).device)
            data = group_data(structure, groups, acts, est, self.pool, device=device)
        for d in data:
            need = est.min_samples(d.group.size * d.features, len(d.owner), test=False)
            if len(x) < need:
                raise CalibrationError(
                    f"MippImportance has {len(x)} calibration samples, but group "
                    f"{d.group.name!r} ({d.group.size} units × {d.features} features, a "
                    f"{len(d.owner)}-column target) needs at least {need} with the "
                    f"{est.name!r} estimator"
                )
        return data
