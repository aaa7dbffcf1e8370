"""Contracts of the MI / conditional-MI estimators, and the input checks they share.

An :class:`Estimator` turns a layer's activations ``x`` and its target ``y`` into an
:class:`EstimatorState` for one target (a subset of ``y``'s columns). The state holds the kept
set S (all units at the start) and answers the three questions TERC asks (docs/METHOD.md §2.3):

- ``single_scores()``: s_i = I(X_i; Y), each unit alone (the MI ordering);
- ``delta(i)``: Δ_i = I(X_i; Y | X_{S∖i}), with a one-sided p-value for H0: Δ_i = 0;
- ``remove(i)``: S ← S ∖ {i}, so later Δs condition on the smaller set.

Units are blocks of ``b`` features: ``x`` is ``(n, U, b)`` (``b = 1`` for a neuron or a
globally pooled channel, ``b = k*k`` for k×k pooling); a 2-D ``(n, U)`` ``x`` means ``b = 1``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["Delta", "Estimator", "EstimatorState", "check_columns", "check_pair"]


@dataclass(frozen=True)
class Delta:
    """The conditional information unit i adds to the others, Δ_i = I(X_i; Y | X_{S∖i}).

    Attributes:
        value: Δ_i in the estimator's own unit: share of the standardised target's variance
            (``linear``, ``mlp``) or nats (``gaussian``, ``ksg``).
        relative: Δ_i on a scale comparable across layers: ``value`` itself for ``linear`` /
            ``mlp`` (already a share of variance); ``value / I(X_S; Y)`` for ``gaussian`` and
            ``ksg``.
        pvalue: one-sided p-value of H0: Δ_i = 0 (unit i adds nothing given the other kept
            units). Small means unit i is needed.
    """

    value: float
    relative: float
    pvalue: float


class EstimatorState(ABC):
    """The kept set S of one layer for one target, and the statistics TERC queries.

    Subclasses set ``n_units`` (U) and implement the five abstract members; ``prefetch`` is
    optional (a no-op here).
    """

    n_units: int
    #: whether :meth:`delta` must answer ``Delta.pvalue``. :func:`~mipp.methods.selection.terc`
    #: sets it False in threshold mode, where only Δ_i decides: a state may then answer NaN
    #: and skip its test's work (``gaussian``'s χ² test costs a q×q factorisation per Δ_i).
    #: Setting it back to True must give the p-values again.
    pvalues: bool = True

    @property
    @abstractmethod
    def active(self) -> Tensor:
        """bool ``(U,)``: True for the units still in S."""

    @abstractmethod
    def single_scores(self) -> Tensor:
        """float64 ``(U,)``: s_i = I(X_i; Y) of each unit alone (unit of ``Delta.value``);
        exactly 0 for a constant unit."""

    @abstractmethod
    def delta(self, i: int) -> Delta:
        """Δ_i = I(X_i; Y | X_{S∖i}) for a unit i in S."""

    @abstractmethod
    def remove(self, i: int) -> None:
        """S ← S ∖ {i}."""

    @abstractmethod
    def information(self) -> float:
        """I(X_S; Y) under the estimator, for the current S."""

    def prefetch(self, units: list[int]) -> None:  # noqa: B027 - optional, a no-op by default
        """Announce the next units TERC will test, in order (some may be kept, some removed).

        States that can batch their work (``linear`` serves the announced units from small
        block caches) override this; the answers of :meth:`delta` must not depend on it.
        """


class Estimator(ABC):
    """Builds :class:`EstimatorState` objects; ``prepare`` once per layer, ``start`` per target.

    ``prepare(x, y)`` takes ``x`` ``(n, U, b)`` or ``(n, U)`` and every candidate target
    column ``y`` ``(n, Q)``, and returns what can be reused for any subset of the columns;
    ``start(prepared, columns)`` starts a state with S = all units for the target columns
    ``columns`` (LongTensor; ``None`` = all). Target columns with zero variance carry no
    information and are dropped.

    What a pipeline needs to know before it runs any data is declared here:

    - ``streams``: ``prepare`` needs only the centred second moments of (X, Y), so they may
      be accumulated batch by batch (:class:`~mipp.estimators.moments.MomentAccumulator`)
      and ``start`` given :class:`~mipp.estimators.moments.Moments` instead;
    - ``needs_target_covariance``: with ``streams``, whether ``start`` needs the target's
      full covariance (else its variances suffice, O(Q) instead of O(Q²) memory);
    - :meth:`min_samples`: the calibration samples a layer of a given size needs;
    - :meth:`data_device`: where ``prepare``'s inputs should live;
    - :meth:`confidence_folds`: how many folds of moments to accumulate for confidence mode
      (0, the default: none; the p-values are the estimator's own). An estimator that returns
      K >= 2 streams, accepts :class:`~mipp.estimators.moments.Moments` carrying K folds
      (``Moments.folds``, from ``MomentAccumulator(folds=K)`` or its own ``prepare``) and
      then answers ``Delta.pvalue`` with a held-out test across them
      (:mod:`mipp.estimators.heldout`) while ``Delta.value`` / ``relative`` stay the
      full-data values. Threshold and target modes never ask for folds.

    Subclass it (the defaults suit an estimator that holds its samples on the CPU) and check
    the result against the known answers of :mod:`mipp.testing.estimators`.
    """

    name: ClassVar[str] = "estimator"
    streams: ClassVar[bool] = False
    needs_target_covariance: ClassVar[bool] = True

    @abstractmethod
    def prepare(self, x: Tensor, y: Tensor) -> Any:
        """Reusable statistics of ``x`` ``(n, U, b)`` / ``(n, U)`` and ``y`` ``(n, Q)``."""

    @abstractmethod
    def start(self, prepared: Any, columns: Tensor | None = None) -> EstimatorState:
        """A state with S = all units, for target columns ``columns`` (None = all)."""

    def min_samples(self, features: int, target_columns: int, *, test: bool = True) -> int:
        """Samples needed for a layer with ``features`` = U·b features in all and a target of
        ``target_columns`` columns: by default ``features + 2`` (a regression on every
        feature plus an intercept must be determined). ``test=False``: only Δ_i is needed
        (threshold and target modes), not its significance test; estimators whose Δ stays
        defined with fewer samples (a ridge) ask for less."""
        return features + 2

    def confidence_folds(self) -> int:
        """Folds of moments a caller should accumulate for this estimator in confidence mode
        (the held-out test); 0 (the default) for none. MIPP and MIPPSelector ask this only in
        confidence mode."""
        return 0

    def data_device(self, model_device: torch.device) -> torch.device | None:
        """Where ``prepare`` wants its inputs: None (default) leaves them on the CPU, where
        activations are recorded; an estimator that computes on an accelerator returns
        ``model_device``."""
        return None


def check_pair(x: Tensor, y: Tensor, *, min_samples: int = 2) -> tuple[Tensor, Tensor]:
    """Validate activations and target; return ``x`` as ``(n, U, b)`` and ``y`` as ``(n, Q)``.

    ``x`` may be ``(n, U)`` (b = 1) or ``(n, U, b)``; ``y`` may be ``(n,)`` (Q = 1) or
    ``(n, Q)``. Both must be real, finite, with the same ``n >= min_samples``.

    >>> x3, y2 = check_pair(torch.zeros(5, 3), torch.zeros(5))
    >>> tuple(x3.shape), tuple(y2.shape)
    ((5, 3, 1), (5, 1))
    """
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    if x.ndim not in (2, 3):
        raise ValueError(f"x must be (n, U) or (n, U, b), got shape {tuple(x.shape)}")
    if y.ndim not in (1, 2):
        raise ValueError(f"y must be (n,) or (n, Q), got shape {tuple(y.shape)}")
    if x.ndim == 2:
        x = x.unsqueeze(-1)
    if y.ndim == 1:
        y = y.unsqueeze(-1)
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must have the same number of samples, got {x.shape[0]} and {y.shape[0]}"
        )
    if x.shape[0] < min_samples:
        raise ValueError(f"need at least {min_samples} samples, got {x.shape[0]}")
    if x.shape[1] < 1 or x.shape[2] < 1 or y.shape[1] < 1:
        raise ValueError(
            f"x needs at least one unit and feature and y one column, "
            f"got x {tuple(x.shape)}, y {tuple(y.shape)}"
        )
    for label, t in (("x", x), ("y", y)):
        if t.is_complex() or not (t.is_floating_point() or t.dtype in _INT_DTYPES):
            raise ValueError(f"{label} must be a real tensor, got dtype {t.dtype}")
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ValueError(f"{label} has {bad} non-finite values (NaN or inf)")
    if not x.is_floating_point():
        x = x.double()
    if not y.is_floating_point():
        y = y.double()
    return x, y


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)


def check_columns(columns: Tensor | None, n_columns: int) -> Tensor:
    """Return the target column indices as a LongTensor ``(q,)``; ``None`` means all of them.

    >>> check_columns(None, 3)
    tensor([0, 1, 2])
    """
    if columns is None:
        return torch.arange(n_columns)
    cols = torch.as_tensor(columns)
    if cols.dtype == torch.bool:
        raise ValueError("columns must be integer indices, got a bool mask")
    cols = cols.reshape(-1).long()
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= n_columns):
        raise ValueError(
            f"columns must lie in 0..{n_columns - 1}, got min {int(cols.min())}, "
            f"max {int(cols.max())}"
        )
    if cols.unique().numel() != cols.numel():
        raise ValueError("columns must not repeat")
    return cols
