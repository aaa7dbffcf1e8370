"""Second moments and block-inverse algebra shared by the closed-form estimators.

``linear`` and ``gaussian`` need only the centred second moments of (X, Y): they are
computed once per layer in float64 (:func:`second_moments`), after which the activations
are no longer needed. Every later quantity is a function of the ridged covariance of the
kept features and its inverse; removing a unit is a block Schur-complement downdate of that
inverse, O(D²) instead of a fresh O(D³) inversion (done in place by each estimator).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mipp.estimators.base import Estimator, EstimatorState, check_columns, check_pair

__all__ = [
    "ClosedFormEstimator",
    "ClosedFormState",
    "MomentAccumulator",
    "Moments",
    "UnitSlots",
    "ridge_scale",
    "second_moments",
    "spd_inverse",
]

_CHUNK_ROWS = 8192  # rows per accumulation step: bounds the float64 working copy


@dataclass(frozen=True)
class Moments:
    """Centred float64 second moments of activations X (U units × b features) and targets Y.

    Moments use the 1/n normalisation: ``sxx = Xcᵀ Xc / n`` with ``Xc = X - mean``.
    Features and columns that are constant over the samples (``const_x`` / ``const_y``) have
    their rows and columns set to exactly 0, so a dead unit contributes exactly nothing.

    Attributes:
        sxx: ``(D, D)`` with ``D = U * b``; feature ``u * b + j`` is feature j of unit u.
        sxy: ``(D, Q)``.
        syy: ``(Q, Q)``.
        mean_x: ``(D,)``; mean_y: ``(Q,)``.
        const_x: bool ``(D,)``; const_y: bool ``(Q,)``.
        n: number of samples; n_units: U; unit_size: b.
        full_target: False when only the diagonal of ``syy`` was accumulated (enough for
            ``linear``, which needs the target's variances only); ``gaussian`` needs True.
    """

    sxx: Tensor
    sxy: Tensor
    syy: Tensor
    mean_x: Tensor
    mean_y: Tensor
    const_x: Tensor
    const_y: Tensor
    n: int
    n_units: int
    unit_size: int
    full_target: bool = True

    @property
    def const_units(self) -> Tensor:
        """bool ``(U,)``: True for units whose every feature is constant (dead units)."""
        return self.const_x.view(self.n_units, self.unit_size).all(dim=1)

    def standardised(self, columns: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Moments for the target columns ``columns`` scaled to unit variance.

        Zero-variance columns are dropped. Returns ``(kept_columns (q,), sxy (D, q),
        syy (q, q))`` where ``syy`` is the correlation matrix of the kept columns.
        """
        cols = check_columns(columns, self.syy.shape[0])
        cols = cols[~self.const_y[cols]]
        std = self.syy.diagonal()[cols].sqrt()
        sxy = self.sxy[:, cols] / std
        syy = self.syy[cols][:, cols] / std[:, None] / std[None, :]
        syy.diagonal().fill_(1.0)
        return cols, sxy, syy


def second_moments(x: Tensor, y: Tensor) -> Moments:
    """Centred float64 second moments of ``x`` ``(n, U, b)`` or ``(n, U)`` and ``y`` ``(n, Q)``.

    >>> m = second_moments(torch.tensor([[1.0, 5.0], [3.0, 5.0]]), torch.tensor([0.0, 2.0]))
    >>> m.sxx.tolist(), m.sxy.tolist(), m.const_x.tolist()
    ([[1.0, 0.0], [0.0, 0.0]], [[1.0], [0.0]], [False, True])
    """
    x, y = check_pair(x, y)
    n, n_units, unit_size = x.shape
    x = x.reshape(n, n_units * unit_size)
    sum_x = torch.zeros(x.shape[1], dtype=torch.float64)
    sum_y = torch.zeros(y.shape[1], dtype=torch.float64)
    for start in range(0, n, _CHUNK_ROWS):
        sum_x += x[start : start + _CHUNK_ROWS].double().sum(0)
        sum_y += y[start : start + _CHUNK_ROWS].double().sum(0)
    mean_x, mean_y = sum_x / n, sum_y / n
    sxx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    sxy = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64)
    syy = torch.zeros(y.shape[1], y.shape[1], dtype=torch.float64)
    for start in range(0, n, _CHUNK_ROWS):
        xc = x[start : start + _CHUNK_ROWS].double() - mean_x
        yc = y[start : start + _CHUNK_ROWS].double() - mean_y
        sxx += xc.T @ xc
        sxy += xc.T @ yc
        syy += yc.T @ yc
    const_x = x.amax(0) == x.amin(0)
    const_y = y.amax(0) == y.amin(0)
    return _finish(sxx, sxy, syy, mean_x, mean_y, const_x, const_y, n, n_units, unit_size)


def _finish(sxx, sxy, syy, mean_x, mean_y, const_x, const_y, n, n_units, unit_size) -> Moments:
    """Zero the constant features' rows and columns, normalise by n, symmetrise."""
    for mat, rows, cols in (
        (sxx, const_x, const_x),
        (sxy, const_x, const_y),
        (syy, const_y, const_y),
    ):
        mat[rows] = 0.0
        mat[:, cols] = 0.0
    sxx, sxy, syy = sxx / n, sxy / n, syy / n
    sxx = (sxx + sxx.T) / 2
    syy = (syy + syy.T) / 2
    return Moments(
        sxx=sxx,
        sxy=sxy,
        syy=syy,
        mean_x=mean_x,
        mean_y=mean_y,
        const_x=const_x.cpu(),
        const_y=const_y.cpu(),
        n=n,
        n_units=n_units,
        unit_size=unit_size,
    )


class MomentAccumulator:
    """Streaming float64 second moments of (X, Y), one batch at a time: O(D² + D·Q + Q²) memory.

    The activations never need to be held: each batch's own centred cross-products are merged
    into the running ones with the pairwise update of Chan, Golub & LeVeque (1979),

        C = C_a + C_b + (μ_b − μ_a)(μ_b − μ_a)ᵀ · n_a n_b / (n_a + n_b),

    which is as exact as the two-pass :func:`second_moments` (equal to ~1e-12 in float64),
    unlike the one-pass Σxxᵀ − n μμᵀ. Constant features are tracked with running minima and
    maxima. :meth:`moments` returns the same :class:`Moments` as :func:`second_moments` on
    all the rows at once.

    >>> x, y = torch.randn(100, 3, 2, dtype=torch.float64), torch.randn(100, 4, dtype=torch.float64)
    >>> acc = MomentAccumulator()
    >>> for i in range(0, 100, 32):
    ...     acc.update(x[i : i + 32], y[i : i + 32])
    >>> ref = second_moments(x, y)
    >>> bool((acc.moments().sxx - ref.sxx).abs().max() < 1e-12), acc.moments().unit_size
    (True, 2)
    """

    def __init__(self, *, full_target: bool = True) -> None:
        self.n = 0
        self.full_target = full_target
        self._shape: tuple[int, int, int] | None = None

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add a batch: ``x`` ``(m, U, b)`` or ``(m, U)`` and ``y`` ``(m, Q)`` or ``(m,)``."""
        x, y = check_pair(x, y, min_samples=1)
        m, n_units, unit_size = x.shape
        shape = (n_units, unit_size, y.shape[1])
        if self._shape is None:
            self._shape = shape
            d, q = n_units * unit_size, y.shape[1]
            self._mean_x = torch.zeros(d, dtype=torch.float64)
            self._mean_y = torch.zeros(q, dtype=torch.float64)
            self._sxx = torch.zeros(d, d, dtype=torch.float64)
            self._sxy = torch.zeros(d, q, dtype=torch.float64)
            self._syy = torch.zeros(q, q, dtype=torch.float64)
            self._min_x = torch.full((d,), math.inf, dtype=torch.float64)
            self._max_x = -self._min_x
            self._min_y = torch.full((q,), math.inf, dtype=torch.float64)
            self._max_y = -self._min_y
        elif shape != self._shape:
            raise ValueError(
                f"batch shapes changed: expected (units, features, target columns) = "
                f"{self._shape}, got {shape}"
            )
        xb = x.reshape(m, -1).double().cpu()
        yb = y.double().cpu()
        mean_xb, mean_yb = xb.mean(0), yb.mean(0)
        xc, yc = xb - mean_xb, yb - mean_yb
        n_a, n = self.n, self.n + m
        dx, dy = mean_xb - self._mean_x, mean_yb - self._mean_y
        w = n_a * m / n
        self._sxx += xc.T @ xc + w * torch.outer(dx, dx)
        self._sxy += xc.T @ yc + w * torch.outer(dx, dy)
        if self.full_target:
            self._syy += yc.T @ yc + w * torch.outer(dy, dy)
        else:  # the variances only: O(Q) instead of O(Q²) per row
            self._syy.diagonal().add_((yc**2).sum(0) + w * dy**2)
        self._mean_x += dx * (m / n)
        self._mean_y += dy * (m / n)
        self._min_x = torch.minimum(self._min_x, xb.amin(0))
        self._max_x = torch.maximum(self._max_x, xb.amax(0))
        self._min_y = torch.minimum(self._min_y, yb.amin(0))
        self._max_y = torch.maximum(self._max_y, yb.amax(0))
        self.n = n

    def moments(self) -> Moments:
        """The accumulated :class:`Moments` (1/n normalisation, constant features zeroed)."""
        if self._shape is None or self.n < 2:
            raise ValueError(f"need at least 2 samples, got {self.n}")
        n_units, unit_size, _ = self._shape
        const_x = self._max_x == self._min_x
        const_y = self._max_y == self._min_y
        moments = _finish(
            self._sxx.clone(),
            self._sxy.clone(),
            self._syy.clone(),
            self._mean_x.clone(),
            self._mean_y.clone(),
            const_x,
            const_y,
            self.n,
            n_units,
            unit_size,
        )
        return dataclasses.replace(moments, full_target=self.full_target)


def ridge_scale(sxx: Tensor, const_x: Tensor) -> float:
    """Mean variance of the non-constant features (1.0 if every feature is constant).

    The ridge of the closed forms is ``ridge * ridge_scale``: relative, hence scale-free.
    Dead features are left out of the mean so that dead units do not change the ridge.
    """
    live = sxx.diagonal()[~const_x]
    scale = float(live.mean()) if live.numel() else 0.0
    return scale if scale > 0 else 1.0


def ridged(sxx: Tensor, const_x: Tensor, lam: float) -> Tensor:
    """``sxx + λI``, with a unit diagonal for constant features.

    A constant feature is exactly 0 after centring and uncoupled from everything, so its
    diagonal entry changes no estimate; 1 keeps the matrix invertible even at ``λ = 0``.
    """
    diag = torch.where(const_x, 1.0, sxx.diagonal() + lam)
    out = sxx.clone()
    out.diagonal().copy_(diag)
    return out


def spd_inverse(a: Tensor, *, what: str) -> Tensor:
    """Inverse of a symmetric positive-definite matrix via Cholesky; a clear error if singular."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        raise ValueError(
            f"the {what} is singular (collinear features, e.g. exact duplicate units); "
            "use a ridge > 0"
        )
    inv = torch.cholesky_inverse(chol)
    return (inv + inv.T) / 2


def logdet_spd(a: Tensor) -> float:
    """log det of a symmetric positive-definite matrix (0 for an empty one)."""
    if a.numel() == 0:
        return 0.0
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return float(2 * chol.diagonal().log().sum())
    sign, value = torch.linalg.slogdet(a)
    if sign <= 0:
        raise ValueError("matrix is not positive definite; use a ridge > 0")
    return float(value)


class UnitSlots:
    """Which units are in S, and where each kept unit's b features sit in the compact matrices.

    Compact matrices hold the features of the kept units in unit order, b rows per unit.
    """

    def __init__(self, n_units: int, unit_size: int) -> None:
        self.n_units = n_units
        self.unit_size = unit_size
        self._active = torch.ones(n_units, dtype=torch.bool)

    @property
    def active(self) -> Tensor:
        return self._active.clone()

    @property
    def n_active(self) -> int:
        return int(self._active.sum())

    def is_active(self, i: int) -> bool:
        return 0 <= i < self.n_units and bool(self._active[i])

    def check(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.n_units:
            raise ValueError(f"unit index must be in 0..{self.n_units - 1}, got {i}")
        if not self._active[i]:
            raise ValueError(f"unit {i} is not in the kept set S (already removed)")
        return i

    def rows(self, i: int) -> Tensor:
        """Compact row indices ``(b,)`` of kept unit i."""
        pos = int(self._active[:i].sum())
        return torch.arange(pos * self.unit_size, (pos + 1) * self.unit_size)

    def feature_mask(self) -> Tensor:
        """bool ``(D,)``: the original features of the kept units."""
        return self._active.repeat_interleave(self.unit_size)

    def remove(self, i: int) -> None:
        self._active[i] = False


class ClosedFormState(EstimatorState):
    """What the closed-form states share: the kept set and the ridged feature covariance."""

    def _setup(
        self, moments: Moments, columns: Tensor | None, *, ridge: float
    ) -> tuple[Tensor, Tensor, Tensor, float]:
        """Set the common attributes; return ``(A, Σ_xy, Σ_yy, λ)`` for the chosen columns.

        A = Σ_xx + λI on live features (λ = ``ridge`` × mean live feature variance), with
        Σ_xy, Σ_yy over the standardised target columns.
        """
        self.n_units = moments.n_units
        self._b = moments.unit_size
        self._n = moments.n
        self.columns, sxy, syy = moments.standardised(columns)
        self._q = int(self.columns.numel())
        self._slots = UnitSlots(moments.n_units, moments.unit_size)
        self._const_units = moments.const_units
        self._live = ~moments.const_x
        lam = ridge * ridge_scale(moments.sxx, moments.const_x)
        a = ridged(moments.sxx, moments.const_x, lam)
        idx = torch.arange(self.n_units * self._b).view(self.n_units, self._b)
        self._a_blocks = a[idx[:, :, None], idx[:, None, :]]  # (U, b, b)
        self._sxy = sxy  # (D, q), standardised columns
        return a, sxy, syy, lam

    @property
    def active(self) -> Tensor:
        """bool ``(U,)``: True for units in S."""
        return self._slots.active


class ClosedFormEstimator(Estimator):
    """What ``linear`` and ``gaussian`` share: the ridge option, moments, and ``start``.

    ``prepare`` needs only second moments, so they can be streamed batch by batch
    (:class:`MomentAccumulator`) instead of holding the activations (``streams``).
    """

    name = "closed-form"
    streams = True
    needs_target_covariance = True
    #: the state class :meth:`start` builds (set by each subclass)
    state_class: type[Any] = ClosedFormState

    def __init__(self, *, ridge: float = 1e-3) -> None:
        if not (math.isfinite(ridge) and ridge >= 0):
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
        self.ridge = float(ridge)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ridge={self.ridge})"

    def prepare(self, x: Tensor, y: Tensor) -> Moments:
        """Centred float64 second moments of ``x`` ``(n, U, b)`` / ``(n, U)``, ``y`` ``(n, Q)``."""
        return second_moments(x, y)

    def start(self, prepared: Moments, columns: Tensor | None = None) -> Any:
        """A state with S = all units, for target columns ``columns`` (None = all)."""
        if not isinstance(prepared, Moments):
            raise TypeError(f"prepared must come from prepare(), got {type(prepared).__name__}")
        if self.needs_target_covariance and not prepared.full_target:
            raise ValueError(
                f"the {self.name!r} estimator needs the target's full covariance; these "
                "moments hold its variances only (MomentAccumulator(full_target=False))"
            )
        return self.state_class(prepared, columns, ridge=self.ridge)
