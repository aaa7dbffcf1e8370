"""Unit selection for one layer: MI ordering + TERC (docs/METHOD.md §2.3), on tensors.

Given an :class:`~mipp.estimators.EstimatorState` (kept set S = all units of layer l, target
Y = the kept units of layer l+1), :func:`terc` scores every unit alone, s_i = I(X_i; Y), tests
the units from the least to the most informative, and removes unit i from S when its
conditional information Δ_i = I(X_i; Y | X_{S∖i}) is not significantly above 0 (confidence
mode) or not above a threshold (threshold mode). Removals are cumulative: of two redundant
units the first one tested goes and the second one stays. The last ``min_keep`` units are
never removed, so a layer cannot collapse.

:class:`MIPPSelector` wraps this in the scikit-learn selector style. Nothing here knows about
``nn.Module``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from mipp.estimators import Estimator, EstimatorState, LinearEstimator
from mipp.estimators.base import check_pair
from mipp.estimators.moments import fold_moments, second_moments

__all__ = ["DEFAULT_CONFIDENCE", "ORDERS", "MIPPSelector", "Order", "SelectionResult", "terc"]

Order = Literal["mi", "index", "random"]
_PREFETCH = 64  # units announced ahead to the state's ``prefetch`` (or its ``prefetch_units``)
#: the TERC test orders: ascending single-unit MI (the paper's), index, seeded random
ORDERS: tuple[str, ...] = ("mi", "index", "random")
#: the paper's confidence, used when neither a confidence nor a threshold is given
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class SelectionResult:
    """Outcome of TERC on one layer.

    Attributes:
        support: bool ``(U,)``, True for the kept units.
        scores: float64 ``(U,)``, s_i = I(X_i; Y) alone (estimator's unit).
        order: int64 ``(U,)``, the order the units were tested in.
        deltas: float64 ``(U,)``, Δ_i when unit i was tested (NaN if it was not tested).
        relative_deltas: float64 ``(U,)``, ``Delta.relative`` at that moment (NaN if untested).
        pvalues: float64 ``(U,)``, ``Delta.pvalue`` at that moment (NaN if untested; all
            NaN in threshold mode, which decides on Δ_i alone and asks for no test).
        info_full: I(X_S; Y) before any removal.
        info_kept: I(X_S; Y) for the kept units.
    """

    support: Tensor
    scores: Tensor
    order: Tensor
    deltas: Tensor
    relative_deltas: Tensor
    pvalues: Tensor
    info_full: float
    info_kept: float

    @property
    def n_kept(self) -> int:
        return int(self.support.sum())


def terc(
    state: EstimatorState,
    *,
    confidence: float | None = None,
    threshold: float | None = None,
    min_keep: int = 1,
    order: Order = "mi",
    seed: int = 0,
    scale: Tensor | None = None,
) -> SelectionResult:
    """Select units by the transfer-entropy redundancy criterion (TERC), in place on ``state``.

    Exactly one of ``confidence`` and ``threshold`` must be given:

    - confidence mode [paper]: unit i is kept iff ``Delta.pvalue < 1 − confidence``, i.e. we
      are more than ``confidence`` sure that Δ_i > 0; higher confidence prunes more;
    - threshold mode [ours]: unit i is removed iff ``Delta.relative ≤ threshold`` (share of
      variance for ``linear`` / ``mlp``, share of I(X_S; Y) for ``gaussian`` / ``ksg``); 0
      removes only units adding exactly nothing.

    ``scale`` (float ``(U,)``, threshold mode only) makes the threshold per unit:
    unit i is removed iff ``Delta.relative ≤ threshold · scale[i]``. MIPP passes the unit's
    cost relative to the network's mean unit cost, a Lagrangian trade of information against
    params or MACs (docs/METHOD.md §4, cost-aware allocation).

    Units are tested in ascending s_i (``order="mi"``, ties by index), in index order
    (``"index"``) or in a permutation drawn from ``seed`` (``"random"``). Once only
    ``min_keep`` units are left in S, testing stops and the rest are kept (their Δ is NaN).

    >>> import torch
    >>> from mipp.estimators import LinearEstimator
    >>> g = torch.Generator().manual_seed(0)
    >>> z = torch.randn(2000, 3, generator=g, dtype=torch.float64)
    >>> x = torch.cat([z, z[:, :1], torch.ones(2000, 1, dtype=torch.float64)], 1)  # dup, dead
    >>> y = z @ torch.ones(3, 2, dtype=torch.float64) + torch.randn(2000, 2, generator=g)
    >>> est = LinearEstimator()
    >>> result = terc(est.start(est.prepare(x, y)), confidence=0.99)
    >>> result.support.tolist()  # keeps z and exactly one copy of z[:, 0]; drops the dead unit
    [False, True, True, True, False]
    """
    _check_options(confidence, threshold, min_keep, order)
    n_units = state.n_units
    if scale is not None:
        if threshold is None:
            raise ValueError("scale= applies to threshold mode only; confidence mode got it")
        scale = torch.as_tensor(scale, dtype=torch.float64)
        if scale.shape != (n_units,) or not bool(torch.isfinite(scale).all() & (scale >= 0).all()):
            raise ValueError(
                f"scale must be {n_units} finite values >= 0 (one per unit), got shape "
                f"{tuple(scale.shape)}"
            )
    state.pvalues = confidence is not None  # threshold mode tests nothing: Δ_i decides
    scores = state.single_scores().double()
    if order == "mi":
        ranked = torch.sort(scores, stable=True).indices
    elif order == "index":
        ranked = torch.arange(n_units)
    else:
        ranked = torch.randperm(n_units, generator=torch.Generator().manual_seed(int(seed)))
    deltas = torch.full((n_units,), math.nan, dtype=torch.float64)
    relative = deltas.clone()
    pvalues = deltas.clone()
    info_full = state.information()
    active = state.active.clone()
    n_active = int(active.sum())
    order_list = ranked.tolist()
    ahead = int(getattr(state, "prefetch_units", _PREFETCH))
    for pos, unit in enumerate(order_list):
        if n_active <= min_keep:
            break
        if pos % ahead == 0:  # a no-op unless the state batches its work
            state.prefetch([u for u in order_list[pos : pos + ahead] if active[u]])
        if not active[unit]:
            continue
        d = state.delta(unit)
        deltas[unit], relative[unit] = d.value, d.relative
        if confidence is not None:
            pvalues[unit] = d.pvalue
        if confidence is not None and math.isnan(d.pvalue):
            raise ValueError(
                f"confidence mode needs a p-value for every Δ_i, and this estimator gives none "
                f"for unit {unit} (fewer calibration samples than features?): add samples or "
                f"use a threshold or a sparsity budget"
            )
        if confidence is not None:
            redundant = not d.pvalue < 1 - confidence
        else:
            limit = threshold if scale is None else threshold * float(scale[unit])
            redundant = d.relative <= limit
        if redundant:
            state.remove(unit)
            active[unit] = False
            n_active -= 1
    return SelectionResult(
        support=state.active.clone(),
        scores=scores,
        order=ranked.long(),
        deltas=deltas,
        relative_deltas=relative,
        pvalues=pvalues,
        info_full=info_full,
        info_kept=state.information(),
    )


def _check_options(
    confidence: float | None, threshold: float | None, min_keep: int, order: str
) -> None:
    if (confidence is None) == (threshold is None):
        raise ValueError(
            "give exactly one of confidence and threshold, "
            f"got confidence={confidence}, threshold={threshold}"
        )
    if confidence is not None and not (isinstance(confidence, numbers.Real) and 0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1) exclusive, got {confidence}")
    if threshold is not None and not (
        isinstance(threshold, numbers.Real) and math.isfinite(threshold) and threshold >= 0
    ):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 1:
        raise ValueError(f"min_keep must be an integer >= 1, got {min_keep!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")


class MIPPSelector:
    """MIPP unit selection for one layer, in the scikit-learn selector style.

    Args:
        estimator: The MI estimator; ``None`` means :class:`~mipp.estimators.LinearEstimator`.
        confidence: Confidence mode (see :func:`terc`). When neither confidence nor
            threshold is given, the paper's confidence 0.95 (:data:`DEFAULT_CONFIDENCE`)
            applies — the same rule :class:`~mipp.methods.mipp.MIPP` uses without a sparsity
            budget. As in MIPP, :meth:`fit` then gives the closed forms moments in
            ``estimator.confidence_folds()`` folds (5 unless the estimator's ``folds`` says
            otherwise), so their p-values come from the held-out test (docs/METHOD.md §3).
        threshold: Threshold mode on ``Delta.relative`` (see :func:`terc`).
        min_keep: Units never removed (the last ones in S).
        order: Test order, ``"mi"`` (ascending single-unit MI, the paper's), ``"index"`` or
            ``"random"``.
        seed: Seeds the ``"random"`` order.

    After :meth:`fit`: ``support_``, ``scores_``, ``order_``, ``deltas_``,
    ``relative_deltas_``, ``pvalues_`` (as in :class:`SelectionResult`), ``info_full_``,
    ``info_kept_``, ``n_features_in_`` (U) and ``result_``.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> z = torch.randn(1000, 2, generator=g)
    >>> x = torch.stack([z[:, 0], torch.randn(1000, generator=g), z[:, 1]], 1)
    >>> y = z.sum(1) + 0.1 * torch.randn(1000, generator=g)
    >>> selector = MIPPSelector(confidence=0.99).fit(x, y)
    >>> selector.get_support(indices=True).tolist(), tuple(selector.transform(x).shape)
    ([0, 2], (1000, 2))
    """

    def __init__(
        self,
        *,
        estimator: Estimator | None = None,
        confidence: float | None = None,
        threshold: float | None = None,
        min_keep: int = 1,
        order: Order = "mi",
        seed: int = 0,
    ) -> None:
        self.estimator = estimator
        self.confidence = confidence
        self.threshold = threshold
        self.min_keep = min_keep
        self.order = order
        self.seed = seed

    def __repr__(self) -> str:
        return (
            f"MIPPSelector(estimator={self.estimator!r}, confidence={self.confidence}, "
            f"threshold={self.threshold}, min_keep={self.min_keep}, order={self.order!r}, "
            f"seed={self.seed})"
        )

    def _modes(self) -> tuple[float | None, float | None]:
        if self.confidence is None and self.threshold is None:
            return DEFAULT_CONFIDENCE, None
        return self.confidence, self.threshold

    def _estimator(self) -> Estimator:
        return LinearEstimator() if self.estimator is None else self.estimator

    def fit(self, x: Tensor, y: Tensor) -> MIPPSelector:
        """Select units of ``x`` ``(n, U)`` or ``(n, U, b)`` that keep the information on
        ``y`` ``(n, q)`` or ``(n,)``. Returns self."""
        confidence, threshold = self._modes()
        _check_options(confidence, threshold, self.min_keep, self.order)
        x, y = check_pair(x, y)
        estimator = self._estimator()
        if not estimator.streams:
            return self.fit_prepared(estimator.prepare(x, y))
        # a closed form takes moments; in confidence mode with K folds for the held-out test
        prepared = second_moments(x, y)
        folds = estimator.confidence_folds() if confidence is not None else 0
        if folds:
            prepared = dataclasses.replace(prepared, folds=fold_moments(x, y, folds, prepared))
        return self.fit_prepared(prepared)

    def fit_prepared(self, prepared: Any, columns: Tensor | None = None) -> MIPPSelector:
        """Like :meth:`fit`, from the estimator's ``prepare`` output (statistics reused
        across targets) and the target columns ``columns`` (None = all). Returns self.

        The closed forms use the held-out test when ``prepared`` carries folds (``prepare``
        of an estimator built with ``folds=K``, or ``MomentAccumulator(folds=K)``), else
        their in-sample test."""
        confidence, threshold = self._modes()
        _check_options(confidence, threshold, self.min_keep, self.order)
        state = self._estimator().start(prepared, columns)
        result = terc(
            state,
            confidence=confidence,
            threshold=threshold,
            min_keep=self.min_keep,
            order=self.order,
            seed=self.seed,
        )
        self.result_ = result
        self.support_ = result.support
        self.scores_ = result.scores
        self.order_ = result.order
        self.deltas_ = result.deltas
        self.relative_deltas_ = result.relative_deltas
        self.pvalues_ = result.pvalues
        self.info_full_ = result.info_full
        self.info_kept_ = result.info_kept
        self.n_features_in_ = state.n_units
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "support_"):
            raise RuntimeError("this MIPPSelector is not fitted yet; call fit(x, y) first")

    def get_support(self, indices: bool = False) -> Tensor:
        """bool mask ``(U,)`` of the kept units, or their indices (int64) if ``indices``."""
        self._check_fitted()
        return torch.nonzero(self.support_).flatten() if indices else self.support_.clone()

    def transform(self, x: Tensor) -> Tensor:
        """The kept units of ``x`` ``(n, U)`` or ``(n, U, b)``: ``x[:, support_]``."""
        self._check_fitted()
        x = torch.as_tensor(x)
        if x.ndim not in (2, 3) or x.shape[1] != self.n_features_in_:
            raise ValueError(
                f"x must be (n, {self.n_features_in_}) or (n, {self.n_features_in_}, b), "
                f"got shape {tuple(x.shape)}"
            )
        return x[:, self.support_]
