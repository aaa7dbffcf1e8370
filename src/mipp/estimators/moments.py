"""Second moments and block-inverse algebra shared by the closed-form estimators.

``linear`` and ``gaussian`` need only the centred second moments of (X, Y): they are
computed once per layer in float64 (:func:`second_moments`), after which the activations
are no longer needed. Every later quantity is a function of the ridged covariance of the
kept features and its inverse; removing a unit is a block Schur-complement downdate of that
inverse, O(D²) instead of a fresh O(D³) inversion (done in place by each estimator).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mipp import distributed
from mipp.errors import MippError
from mipp.estimators.base import Estimator, EstimatorState, check_columns, check_pair

__all__ = [
    "DEFAULT_FOLDS",
    "ClosedFormEstimator",
    "ClosedFormState",
    "FoldMoments",
    "MomentAccumulator",
    "Moments",
    "RowMoments",
    "UnitSlots",
    "check_folds",
    "fold_moments",
    "principal_axes",
    "principal_moments",
    "ridge_scale",
    "sample_rows",
    "second_moments",
    "spd_inverse",
    "variance_scale",
]

_CHUNK_ROWS = 8192  # rows per accumulation step: bounds the float64 working copy
#: folds of the held-out test that MIPP and MIPPSelector use in confidence mode (the paper's
#: 5 repeats) when the estimator's ``folds`` option is left at None
DEFAULT_FOLDS = 5


def check_folds(folds: Any) -> int:
    """``folds`` as an int: 0 for None or 0 (no folds: in-sample test), else an integer >= 2.

    >>> check_folds(None), check_folds(5)
    (0, 5)
    """
    if folds is None:
        return 0
    if isinstance(folds, bool) or not isinstance(folds, int) or folds == 1 or folds < 0:
        raise ValueError(f"folds must be None, 0 or an integer >= 2, got {folds!r}")
    return folds


@dataclass(frozen=True)
class FoldMoments:
    """Centred float64 moments of K disjoint folds of the rows, for the held-out test.

    Row r (0-based, counted in the order the rows are given or streamed, across batches)
    belongs to fold ``r mod K``: the calibration set is already a seeded random subset, so a
    deterministic interleaving is as good as a random split and needs no seed.

    Sums are *unnormalised* and centred on each fold's own mean (what the Chan merge adds):
    ``cxx[k] = Σ_{r in k} (x_r − mean_x[k])(x_r − mean_x[k])ᵀ``. Features and target columns
    constant over *all* rows have exactly zero cross-products, as in :class:`Moments`.

    Attributes:
        n: int64 ``(K,)`` rows per fold.
        mean_x: ``(K, D)``; mean_y: ``(K, Q)``.
        cxx: ``(K, D, D)``; cxy: ``(K, D, Q)``.
        cyy: ``(K, Q)`` the target's centred sums of squares only (the held-out loss needs the
            columns' variances, never their covariance).
        min_x, max_x: ``(K, D)`` per-fold extremes of each feature (a feature constant on a
            training set gets no weight there).
    """

    n: Tensor
    mean_x: Tensor
    mean_y: Tensor
    cxx: Tensor
    cxy: Tensor
    cyy: Tensor
    min_x: Tensor
    max_x: Tensor

    @property
    def count(self) -> int:
        """K, the number of folds."""
        return int(self.n.numel())

    def merged(self, folds: list[int]) -> tuple[int, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(n, mean_x, mean_y, cxx, cxy, cyy)`` of the union of the rows of ``folds``, by the
        Chan–Golub–LeVeque pairwise merge (unnormalised sums, as the fields)."""
        n, mx, my, cxx, cxy, cyy = 0, None, None, None, None, None
        for k in folds:
            nb = int(self.n[k])
            if nb == 0:
                continue
            if mx is None:
                n, mx, my = nb, self.mean_x[k].clone(), self.mean_y[k].clone()
                cxx, cxy, cyy = self.cxx[k].clone(), self.cxy[k].clone(), self.cyy[k].clone()
                continue
            dx, dy = self.mean_x[k] - mx, self.mean_y[k] - my
            total = n + nb
            w = n * nb / total
            cxx += self.cxx[k] + w * torch.outer(dx, dx)
            cxy += self.cxy[k] + w * torch.outer(dx, dy)
            cyy += self.cyy[k] + w * dy**2
            mx += dx * (nb / total)
            my += dy * (nb / total)
            n = total
        if mx is None:
            raise ValueError(f"folds {folds} hold no rows")
        return n, mx, my, cxx, cxy, cyy

    def extremes(self, folds: list[int]) -> tuple[Tensor, Tensor]:
        """``(min_x, max_x)`` ``(D,)`` over the rows of ``folds``."""
        return self.min_x[folds].amin(0), self.max_x[folds].amax(0)


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
        folds: the same moments per fold of the rows (:class:`FoldMoments`) for the held-out
            test of confidence mode, or None (the default: in-sample tests only).
        samples: ``(Xs (n, D), Ys (n, Q))``, the centred rows divided by √n (constant
            features and columns 0), so that ``sxx = XsᵀXs`` and so on; or None (the default).
            Kept only for layers much wider than the sample count, where ``gaussian`` works
            in the sample space (:class:`~mipp.estimators.gaussian.GaussianDualState`).
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
    folds: FoldMoments | None = None
    samples: tuple[Tensor, Tensor] | None = dataclasses.field(
        default=None, repr=False, compare=False
    )

    @property
    def const_units(self) -> Tensor:
        """bool ``(U,)``: True for units whose every feature is constant (dead units)."""
        return self.const_x.view(self.n_units, self.unit_size).all(dim=1)

    @property
    def target_variances(self) -> Tensor:
        """``(Q,)``: the diagonal of ``syy`` (0 for constant columns)."""
        return self.syy.diagonal()

    def kept_columns(self, columns: Tensor | None) -> Tensor:
        """The target columns ``columns`` (None: all) without the zero-variance ones."""
        cols = check_columns(columns, self.mean_y.shape[0])
        return cols[~self.const_y[cols]]

    def standardised(self, columns: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Moments for the target columns ``columns`` scaled to unit variance.

        Zero-variance columns are dropped. Returns ``(kept_columns (q,), sxy (D, q),
        syy (q, q))`` where ``syy`` is the correlation matrix of the kept columns.
        """
        cols = self.kept_columns(columns)
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
    """Zero the constant features' rows and columns, normalise by n, symmetrise (a product
    that is None is left to :class:`RowMoments`)."""
    for mat, rows, cols in (
        (sxx, const_x, const_x),
        (sxy, const_x, const_y),
        (syy, const_y, const_y),
    ):
        if mat is not None:
            mat[rows] = 0.0
            mat[:, cols] = 0.0
    if sxx is not None:
        sxx = sxx / n
        sxx = (sxx + sxx.T) / 2
    if sxy is not None:
        sxy, syy = sxy / n, syy / n
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


class RowMoments(Moments):
    """:class:`Moments` that carry their rows (``samples``) and compute the products
    ``sxx = XsᵀXs``, ``sxy = XsᵀYs`` and ``syy = YsᵀYs`` only when something reads them: the
    sample-space ``gaussian`` reads none of them (only the rows and the target variances), so
    a wide layer's O(n·D²) Gram and O(n·D·Q + n·Q²) cross-products are skipped [ours]. Made by
    :class:`MomentAccumulator` for layers wider than its ``rows_if_wider_than``; the products,
    when read, equal the accumulated ones up to float64 rounding."""

    def _product(self, name: str) -> Tensor:
        value = self.__dict__.get("_" + name)
        if value is None:
            xs, ys = self.samples
            if name == "sxy":
                value = xs.T @ ys
            else:
                m = xs if name == "sxx" else ys
                value = m.T @ m
                value = (value + value.T) / 2
            object.__setattr__(self, "_" + name, value)
        return value

    # read: computed from the rows once; set (by the dataclass __init__): stored as given
    sxx = property(  # type: ignore[assignment]
        lambda self: self._product("sxx"), lambda self, v: object.__setattr__(self, "_sxx", v)
    )
    sxy = property(  # type: ignore[assignment]
        lambda self: self._product("sxy"), lambda self, v: object.__setattr__(self, "_sxy", v)
    )
    syy = property(  # type: ignore[assignment]
        lambda self: self._product("syy"), lambda self, v: object.__setattr__(self, "_syy", v)
    )

    @property
    def target_variances(self) -> Tensor:
        """``(Q,)`` from the rows, O(n·Q), without forming ``syy`` (unless it was read)."""
        syy = self.__dict__.get("_syy")
        if syy is not None:
            return syy.diagonal()
        ys = self.samples[1]
        return (ys * ys).sum(0)


def sample_rows(moments: Moments, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``Moments.samples`` for the rows ``x`` ``(n, D)``, ``y`` ``(n, Q)`` the moments were
    computed from: centred by the moments' means, divided by √n, constant features and
    columns set to 0 (float64, CPU)."""
    scale = 1.0 / math.sqrt(moments.n)
    xs = (x.reshape(x.shape[0], -1).double().cpu() - moments.mean_x) * scale
    ys = (y.reshape(y.shape[0], -1).double().cpu() - moments.mean_y) * scale
    xs[:, moments.const_x] = 0.0
    ys[:, moments.const_y] = 0.0
    return xs, ys


def principal_axes(blocks: Tensor, k: int) -> Tensor:
    """Each unit's k principal axes ``(U, b, k)`` from its own feature covariance ``blocks``
    ``(U, b, b)``: the eigenvectors of the k largest eigenvalues, sign fixed so that the
    largest-magnitude entry of each is positive (deterministic)."""
    _, vecs = torch.linalg.eigh(blocks)  # ascending eigenvalues
    axes = vecs[:, :, -k:].flip(-1)
    pivot = axes.abs().argmax(dim=1, keepdim=True)
    sign = torch.gather(axes, 1, pivot).sign()
    return axes * torch.where(sign == 0, 1.0, sign)


def principal_moments(moments: Moments, k: int) -> Moments:
    """The moments of each unit's k leading principal components instead of its b features
    [ours]: Z_u = X_u V_u with V_u the top-k eigenvectors of the unit's own b×b covariance
    (:func:`principal_axes`), so Σ_zz[u, v] = V_uᵀ Σ_xx[u, v] V_v and Σ_zy[u] = V_uᵀ Σ_xy[u],
    O(D²·k) from the moments alone, equal to the moments of the projected samples. A unit
    then costs k features instead of b in every D×D step of the selection. A component with
    (relative) zero variance is constant, like a dead feature. ``k >= b``: unchanged.
    Moments with folds (confidence mode's held-out test) are refused: their per-fold
    extremes cannot be projected. Moments that carry their rows (``samples``, a wide layer)
    are projected row by row instead, without ever forming the D×D Gram:
    O(n·D·k + n·(U·k)² + n·U·k·Q); the result has its products and no rows."""
    b, u = moments.unit_size, moments.n_units
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k >= b:
        return moments
    if moments.folds is not None:
        raise ValueError("principal_moments cannot project moments with folds (confidence mode)")
    if moments.samples is not None:  # the rows: Z = Xs V, its products from them
        xs, ys = moments.samples
        xu = xs.view(-1, u, b)
        blocks = torch.einsum("nua,nub->uab", xu, xu)
        axes = principal_axes(blocks, k)  # (U, b, k)
        zs = torch.einsum("nua,uak->nuk", xu, axes).reshape(-1, u * k)
        szz, szy = zs.T @ zs, zs.T @ ys
        totals = blocks.diagonal(dim1=1, dim2=2).sum(1)
    else:
        sxx = moments.sxx.view(u, b, u, b)
        idx = torch.arange(u)
        axes = principal_axes(sxx[idx, :, idx, :], k)  # (U, b, k)
        szz = torch.einsum("uab,uavd,vdc->ubvc", axes, sxx, axes).reshape(u * k, u * k)
        szy = torch.einsum("uab,uaq->ubq", axes, moments.sxy.view(u, b, -1)).reshape(u * k, -1)
        totals = moments.sxx.diagonal().view(u, b).sum(1)
    mean_z = torch.einsum("uab,ua->ub", axes, moments.mean_x.view(u, b)).reshape(-1)
    var = szz.diagonal()
    scale = totals.repeat_interleave(k)  # the unit's total variance
    const = (var <= 1e-12 * scale) | moments.const_units.repeat_interleave(k)
    szz[const] = 0.0
    szz[:, const] = 0.0
    szy[const] = 0.0
    return Moments(
        sxx=(szz + szz.T) / 2,
        sxy=szy,
        syy=moments.syy,
        mean_x=mean_z,
        mean_y=moments.mean_y,
        const_x=const,
        const_y=moments.const_y,
        n=moments.n,
        n_units=u,
        unit_size=k,
        full_target=moments.full_target,
    )


def fold_moments(x: Tensor, y: Tensor, folds: int, moments: Moments) -> FoldMoments:
    """Per-fold centred moments of ``x`` ``(n, U, b)`` / ``(n, U)`` and ``y`` ``(n, Q)``: row r
    goes to fold ``r mod folds``; two passes per fold (mean, then centred products), as exact
    as :func:`second_moments`. ``moments`` are the full-data moments of the same rows: their
    constant features and columns get exactly zero cross-products here too.

    >>> x, y = torch.arange(8.0).reshape(4, 2), torch.arange(4.0)
    >>> fm = fold_moments(x, y, 2, second_moments(x, y))
    >>> fm.n.tolist(), fm.mean_y.tolist(), fm.cyy.tolist()
    ([2, 2], [[1.0], [2.0]], [[2.0], [2.0]])
    """
    x, y = check_pair(x, y)
    k_folds = check_folds(folds)
    n, n_units, unit_size = x.shape
    if k_folds == 0:
        raise ValueError(f"folds must be an integer >= 2 here, got {folds!r}")
    if n < 2 * k_folds:
        raise ValueError(f"{k_folds} folds need at least {2 * k_folds} samples, got {n}")
    x = x.reshape(n, n_units * unit_size)
    parts = []
    for k in range(k_folds):
        xk, yk = x[k::k_folds], y[k::k_folds]
        m = xk.shape[0]
        mean_x = sum(xk[s : s + _CHUNK_ROWS].double().sum(0) for s in range(0, m, _CHUNK_ROWS))
        mean_y = sum(yk[s : s + _CHUNK_ROWS].double().sum(0) for s in range(0, m, _CHUNK_ROWS))
        mean_x, mean_y = mean_x / m, mean_y / m
        cxx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        cxy = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64)
        cyy = torch.zeros(y.shape[1], dtype=torch.float64)
        for s in range(0, m, _CHUNK_ROWS):
            xc = xk[s : s + _CHUNK_ROWS].double() - mean_x
            yc = yk[s : s + _CHUNK_ROWS].double() - mean_y
            cxx += xc.T @ xc
            cxy += xc.T @ yc
            cyy += (yc**2).sum(0)
        lo, hi = xk.double().amin(0), xk.double().amax(0)
        parts.append((m, mean_x, mean_y, cxx, cxy, cyy, lo, hi))
    return _stack_folds(parts, moments.const_x, moments.const_y)


def _stack_folds(parts: list[tuple], const_x: Tensor, const_y: Tensor) -> FoldMoments:
    """:class:`FoldMoments` from per-fold ``(n, mean_x, mean_y, cxx, cxy, cyy, min_x, max_x)``
    with the rows and columns of the (overall) constant features and columns zeroed."""
    n, mean_x, mean_y, cxx, cxy, cyy, lo, hi = (list(t) for t in zip(*parts, strict=True))
    cxx, cxy, cyy = torch.stack(cxx), torch.stack(cxy), torch.stack(cyy)
    const_x, const_y = const_x.to(cxx.device), const_y.to(cxx.device)
    cxx[:, const_x] = 0.0
    cxx[:, :, const_x] = 0.0
    cxy[:, const_x] = 0.0
    cxy[:, :, const_y] = 0.0
    cyy[:, const_y] = 0.0
    cxx = (cxx + cxx.transpose(1, 2)) / 2
    return FoldMoments(
        n=torch.tensor(n, dtype=torch.long),
        mean_x=torch.stack(mean_x),
        mean_y=torch.stack(mean_y),
        cxx=cxx,
        cxy=cxy,
        cyy=cyy,
        min_x=torch.stack(lo),
        max_x=torch.stack(hi),
    )


class _Running:
    """Running float64 moments of one set of rows (Chan–Golub–LeVeque), on the CPU."""

    def __init__(self, d: int, q: int, *, full_target: bool, gram: bool = True) -> None:
        self.n = 0
        self.full_target = full_target
        self.mean_x = torch.zeros(d, dtype=torch.float64)
        self.mean_y = torch.zeros(q, dtype=torch.float64)
        # gram False: no second moments at all, only means and extremes (the rows are kept
        # instead and RowMoments computes the products from them when something reads them)
        self.sxx = torch.zeros(d, d, dtype=torch.float64) if gram else None
        self.sxy = torch.zeros(d, q, dtype=torch.float64) if gram else None
        self.syy = torch.zeros(q, q, dtype=torch.float64) if gram else None
        self.min_x = torch.full((d,), math.inf, dtype=torch.float64)
        self.max_x = -self.min_x
        self.min_y = torch.full((q,), math.inf, dtype=torch.float64)
        self.max_y = -self.min_y

    def add(self, xb: Tensor, yb: Tensor) -> None:
        """Merge a batch ``xb`` ``(m, D)``, ``yb`` ``(m, Q)`` (float64, CPU) into the moments."""
        m = xb.shape[0]
        mean_xb, mean_yb = xb.mean(0), yb.mean(0)
        xc, yc = xb - mean_xb, yb - mean_yb
        n_a, n = self.n, self.n + m
        dx, dy = mean_xb - self.mean_x, mean_yb - self.mean_y
        w = n_a * m / n
        if self.sxx is not None:
            self.sxx += xc.T @ xc + w * torch.outer(dx, dx)
            self.sxy += xc.T @ yc + w * torch.outer(dx, dy)
            if self.full_target:
                self.syy += yc.T @ yc + w * torch.outer(dy, dy)
            else:  # the variances only: O(Q) instead of O(Q²) per row
                self.syy.diagonal().add_((yc**2).sum(0) + w * dy**2)
        self.mean_x += dx * (m / n)
        self.mean_y += dy * (m / n)
        self.min_x = torch.minimum(self.min_x, xb.amin(0))
        self.max_x = torch.maximum(self.max_x, xb.amax(0))
        self.min_y = torch.minimum(self.min_y, yb.amin(0))
        self.max_y = torch.maximum(self.max_y, yb.amax(0))
        self.n = n

    def merge(self, other: _Running) -> None:
        """Merge another set of rows' moments into these (the same pairwise update)."""
        if other.n == 0:
            return
        n_a, n = self.n, self.n + other.n
        dx, dy = other.mean_x - self.mean_x, other.mean_y - self.mean_y
        w = n_a * other.n / n
        self.sxx += other.sxx + w * torch.outer(dx, dx)
        self.sxy += other.sxy + w * torch.outer(dx, dy)
        if self.full_target:
            self.syy += other.syy + w * torch.outer(dy, dy)
        else:
            self.syy.diagonal().add_(other.syy.diagonal() + w * dy**2)
        self.mean_x += dx * (other.n / n)
        self.mean_y += dy * (other.n / n)
        self.min_x = torch.minimum(self.min_x, other.min_x)
        self.max_x = torch.maximum(self.max_x, other.max_x)
        self.min_y = torch.minimum(self.min_y, other.min_y)
        self.max_y = torch.maximum(self.max_y, other.max_y)
        self.n = n

    def all_reduce(self) -> None:
        """Replace these moments by those of the union of every rank's rows
        (:mod:`mipp.distributed`): each rank's centred sums are shifted to the global mean,
        C_r + n_r (μ_r − μ)(μ_r − μ)ᵀ, and summed over ranks; minima and maxima likewise."""
        d = self.sxy.shape[0]
        totals = torch.cat(
            [torch.tensor([float(self.n)], dtype=torch.float64), self.n * self.mean_x,
             self.n * self.mean_y]
        )  # fmt: skip
        distributed.all_reduce_([totals])
        n = int(totals[0])
        if n == 0:
            return
        mean_x, mean_y = totals[1 : 1 + d] / n, totals[1 + d :] / n
        dx, dy = self.mean_x - mean_x, self.mean_y - mean_y
        self.sxx += self.n * torch.outer(dx, dx)
        self.sxy += self.n * torch.outer(dx, dy)
        if self.full_target:
            self.syy += self.n * torch.outer(dy, dy)
            distributed.all_reduce_([self.sxx, self.sxy, self.syy])
        else:  # the variances only
            var_y = self.syy.diagonal() + self.n * dy**2
            distributed.all_reduce_([self.sxx, self.sxy, var_y])
            self.syy.diagonal().copy_(var_y)
        distributed.all_reduce_([self.min_x, self.min_y], op="min")
        distributed.all_reduce_([self.max_x, self.max_y], op="max")
        self.mean_x, self.mean_y, self.n = mean_x, mean_y, n


class MomentAccumulator:
    """Streaming float64 second moments of (X, Y), one batch at a time: O(D² + D·Q + Q²) memory.

    The activations never need to be held: each batch's own centred cross-products are merged
    into the running ones with the pairwise update of Chan, Golub & LeVeque (1979),

        C = C_a + C_b + (μ_b − μ_a)(μ_b − μ_a)ᵀ · n_a n_b / (n_a + n_b),

    which is as exact as the two-pass :func:`second_moments` (equal to ~1e-12 in float64),
    unlike the one-pass Σxxᵀ − n μμᵀ. Constant features are tracked with running minima and
    maxima. :meth:`moments` returns the same :class:`Moments` as :func:`second_moments` on
    all the rows at once.

    ``folds=K`` (K >= 2; default 0: none) keeps the moments of K folds instead, row r of the
    stream (counted across batches) in fold ``r mod K`` — K times the memory, about the same
    arithmetic. :meth:`moments` then merges the folds into the full-data moments (equal to the
    unfolded ones to ~1e-12) and attaches the folds (:attr:`Moments.folds`, target variances
    only) for the held-out test.

    >>> x, y = torch.randn(100, 3, 2, dtype=torch.float64), torch.randn(100, 4, dtype=torch.float64)
    >>> acc = MomentAccumulator()
    >>> for i in range(0, 100, 32):
    ...     acc.update(x[i : i + 32], y[i : i + 32])
    >>> ref = second_moments(x, y)
    >>> bool((acc.moments().sxx - ref.sxx).abs().max() < 1e-12), acc.moments().unit_size
    (True, 2)
    """

    def __init__(
        self,
        *,
        full_target: bool = True,
        folds: int | None = 0,
        rows_if_wider_than: int | None = None,
    ) -> None:
        self.n = 0
        self.full_target = full_target
        self.folds = check_folds(folds)
        self._shape: tuple[int, int, int] | None = None
        self._parts: list[_Running] = []
        #: keep the rows too (``Moments.samples``) when the layer has more features than this
        #: (never with folds); None: never
        self.rows_if_wider_than = rows_if_wider_than
        self._rows: list[tuple[Tensor, Tensor]] | None = None

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add a batch: ``x`` ``(m, U, b)`` or ``(m, U)`` and ``y`` ``(m, Q)`` or ``(m,)``."""
        x, y = check_pair(x, y, min_samples=1)
        m, n_units, unit_size = x.shape
        shape = (n_units, unit_size, y.shape[1])
        if self._shape is None:
            self._shape = shape
            d, q = n_units * unit_size, y.shape[1]
            wide = self.rows_if_wider_than is not None and d > self.rows_if_wider_than
            self._rows = [] if wide and not self.folds else None
            self._parts = [
                _Running(d, q, full_target=self.full_target, gram=self._rows is None)
                for _ in range(max(self.folds, 1))
            ]
        elif shape != self._shape:
            raise ValueError(
                f"batch shapes changed: expected (units, features, target columns) = "
                f"{self._shape}, got {shape}"
            )
        xb = x.reshape(m, -1).double().cpu()
        yb = y.double().cpu()
        if self._rows is not None:
            self._rows.append((xb, yb))
        if not self.folds:
            self._parts[0].add(xb, yb)
        else:  # row r of the stream goes to fold r mod K
            for k, part in enumerate(self._parts):
                first = (k - self.n) % self.folds
                if first < m:
                    part.add(xb[first :: self.folds], yb[first :: self.folds])
        self.n += m

    def all_reduce(self) -> None:
        """Merge every rank's moments into each rank's (``torch.distributed``; a no-op
        without a process group): afterwards :meth:`moments` gives, on every rank, the
        moments of all the ranks' rows, equal to one process's on their union up to float64
        rounding (:mod:`mipp.distributed`). With ``folds`` each fold merges with the same
        fold of the other ranks (row r of a rank's stream in fold r mod K). Every rank must
        call it, after its last :meth:`update` and having seen at least one batch."""
        if not distributed.active():
            return
        if self._shape is None:
            raise MippError(
                f"rank {distributed.rank()} saw no calibration batch: every rank needs at "
                f"least one (give each rank a non-empty shard)"
            )
        shapes = distributed.gather_objects(self._shape)
        if any(s != self._shape for s in shapes):
            raise MippError(
                f"the ranks' statistics differ in shape (units, features, target columns): "
                f"{shapes}; every rank must prune the same model"
            )
        if self._rows is not None:
            raise MippError(
                "moments that keep their rows (rows_if_wider_than) cannot be merged across "
                "ranks; accumulate them without rows under torch.distributed"
            )
        for part in self._parts:
            part.all_reduce()
        self.n = distributed.total(self.n)

    def moments(self) -> Moments:
        """The accumulated :class:`Moments` (1/n normalisation, constant features zeroed;
        with ``folds``, merged from the folds and carrying them in ``Moments.folds``)."""
        if self._shape is None or self.n < 2:
            raise ValueError(f"need at least 2 samples, got {self.n}")
        if self.folds and self.n < 2 * self.folds:
            raise ValueError(
                f"{self.folds} folds need at least {2 * self.folds} samples, got {self.n}"
            )
        n_units, unit_size, _ = self._shape
        if self.folds:
            whole = _Running(*self._parts[0].sxy.shape, full_target=self.full_target)
            for part in self._parts:
                whole.merge(part)
        else:
            whole = self._parts[0]
        const_x = whole.max_x == whole.min_x
        const_y = whole.max_y == whole.min_y
        rows = whole.sxx is None
        moments = _finish(
            None if rows else whole.sxx.clone(),
            None if rows else whole.sxy.clone(),
            None if rows else whole.syy.clone(),
            whole.mean_x.clone(),
            whole.mean_y.clone(),
            const_x,
            const_y,
            self.n,
            n_units,
            unit_size,
        )
        folds = None
        if self.folds:
            parts = [
                (
                    p.n,
                    p.mean_x.clone(),
                    p.mean_y.clone(),
                    p.sxx.clone(),
                    p.sxy.clone(),
                    p.syy.diagonal().clone(),
                    p.min_x.clone(),
                    p.max_x.clone(),
                )
                for p in self._parts
            ]
            folds = _stack_folds(parts, const_x, const_y)
        moments = dataclasses.replace(moments, full_target=self.full_target, folds=folds)
        if self._rows is not None:  # the products are computed only if something reads them
            xs = torch.cat([r[0] for r in self._rows])
            ys = torch.cat([r[1] for r in self._rows])
            fields = {f.name: getattr(moments, f.name) for f in dataclasses.fields(moments)}
            fields["samples"] = sample_rows(moments, xs, ys)
            moments = RowMoments(**fields)
        return moments


def ridge_scale(sxx: Tensor, const_x: Tensor) -> float:
    """Mean variance of the non-constant features (1.0 if every feature is constant).

    The ridge of the closed forms is ``ridge * ridge_scale``: relative, hence scale-free.
    Dead features are left out of the mean so that dead units do not change the ridge.
    """
    return variance_scale(sxx.diagonal(), const_x)


def variance_scale(variances: Tensor, const_x: Tensor) -> float:
    """:func:`ridge_scale` from the features' variances ``(D,)`` (the diagonal of Σ_xx)."""
    live = variances[~const_x]
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


def cholesky_or_raise(a: Tensor, *, what: str) -> Tensor:
    """Lower Cholesky factor of a symmetric positive-definite matrix; a clear error if
    singular."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        raise ValueError(
            f"the {what} is singular (collinear features, e.g. exact duplicate units); "
            "use a ridge > 0"
        )
    return chol


def spd_inverse(a: Tensor, *, what: str) -> Tensor:
    """Inverse of a symmetric positive-definite matrix via Cholesky; a clear error if singular."""
    inv = torch.cholesky_inverse(cholesky_or_raise(a, what=what))
    return (inv + inv.T) / 2


def logdet_spd(a: Tensor) -> float:
    """log det of a symmetric positive-definite matrix (0 for an empty one)."""
    if a.numel() == 0:
        return 0.0
    if a.numel() == 1:  # one feature per unit (mean pooling): no factorisation to call
        value = float(a.reshape(()))
        if value > 0:
            return math.log(value)
        raise ValueError("matrix is not positive definite; use a ridge > 0")
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
    """What the closed-form states share: the kept set and the ridged feature covariance.

    Attributes:
        heldout: the K-fold held-out test that answers ``Delta.pvalue``
            (:class:`~mipp.estimators.heldout.HeldOutTest`), or None for the in-sample test.
    """

    heldout: Any = None
    #: whether :meth:`fork` can copy this state (the closed forms: tensors and plain values)
    forkable = True
    #: builds the held-out test (:class:`~mipp.estimators.heldout.HeldOutTest`, set by the
    #: estimator modules: that module imports this one)
    heldout_class: Any = None

    def _setup(
        self, moments: Moments, columns: Tensor | None, *, ridge: float, heldout: bool = False
    ) -> tuple[Tensor, Tensor, Tensor, float]:
        """Set the common attributes; return ``(A, Σ_xy, Σ_yy, λ)`` for the chosen columns.

        A = Σ_xx + λI on live features (λ = ``ridge`` × mean live feature variance), with
        Σ_xy, Σ_yy over the standardised target columns. ``heldout``: build the held-out test
        from ``moments.folds`` (which must then be set).
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
        self.heldout = None
        if heldout and self._q:
            if self.heldout_class is None:
                raise TypeError(f"{type(self).__name__} has no held-out test (heldout_class)")
            self.heldout = self.heldout_class(moments, self.columns, ridge=ridge)
        return a, sxy, syy, lam

    def fork(self) -> ClosedFormState:
        """An independent copy of this state: removals from either leave the other as it was.

        Costs one copy of its matrices (O(D² + D·q + q²)), far less than the factorisations that
        built them, so a caller that restarts the selection from the same S and the same
        target columns (MIPP's bisection over thresholds) forks one state instead of
        rebuilding it each time."""
        other = copy.copy(self)
        for key, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(other, key, value.clone())
        other._slots = copy.deepcopy(self._slots)
        for key in ("_block", "_deferred", "heldout"):
            if getattr(self, key, None) is not None:
                setattr(other, key, copy.deepcopy(getattr(self, key)))
        return other

    def retargeted(self, moments: Moments, columns: Tensor | None) -> ClosedFormState:
        """A starting state for other target columns of the same ``moments``, derived from
        this one instead of rebuilt [ours].

        The ridged joint covariance of (X, Y_C) restricted to a subset of the columns is
        exactly the one a fresh :meth:`ClosedFormEstimator.start` would build (the columns
        are standardised one by one and the ridge on them is per column), so dropped and
        added columns change the inverses by low-rank corrections: O((D² + D·q + q²)·c) for c
        changed columns instead of the O(D³ + D²·q + D·q² + q³) factorisations.
        MIPP's bisection uses it when a layer's targets (the next layer's kept units) change
        by a few columns between passes. Equal to a fresh start up to rounding; the column
        order is this state's kept columns, then the added ones (no estimate depends on it).

        Only for a starting state (no unit removed) without a held-out test."""
        self._check_start("retarget")
        final, keep = self._new_columns(moments, columns)
        _, sxy, syy = moments.standardised(final)
        other = self.fork()
        old_sxy = other._sxy
        other.columns, other._q, other._sxy = final, int(final.numel()), sxy
        other._retarget(keep, sxy, syy, old_sxy)
        return other

    def retarget_saves(self, moments: Moments, columns: Tensor | None) -> bool:
        """Whether :meth:`retargeted` costs fewer flops than a fresh start for ``columns``
        (a flop count of both, no timing); False where it does not apply."""
        if self.heldout is not None or not self._untouched():
            return False
        final, keep = self._new_columns(moments, columns)
        n_keep = int(keep.sum())
        removed, added = int(keep.numel()) - n_keep, int(final.numel()) - n_keep
        return self._retarget_flops(removed, added) < self._start_flops(int(final.numel()))

    def _new_columns(self, moments: Moments, columns: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(final, keep)``: the new columns (this state's kept ones first, then the added
        ones; zero-variance ones dropped) and which of this state's columns stay."""
        cols = check_columns(columns, moments.mean_y.shape[0])
        cols = cols[~moments.const_y[cols]]
        keep = torch.isin(self.columns, cols)
        added = cols[~torch.isin(cols, self.columns)]
        return torch.cat([self.columns[keep], added]), keep

    def _check_start(self, what: str) -> None:
        if self.heldout is not None:
            raise ValueError(f"cannot {what} a state with a held-out test")
        if not self._untouched():
            raise ValueError(f"can only {what} a starting state (every unit still in S)")

    def _untouched(self) -> bool:
        return self._slots.n_active == self.n_units

    def _retarget(self, keep: Tensor, sxy: Tensor, syy: Tensor, old_sxy: Tensor) -> None:
        """Update the column-dependent matrices (set by each subclass): ``keep`` marks the old
        columns that stay, ``sxy`` / ``syy`` are the standardised moments of the new ones,
        ``old_sxy`` Σ_Sy over the old columns."""
        raise NotImplementedError

    def _retarget_flops(self, removed: int, added: int) -> float:
        raise NotImplementedError

    def _start_flops(self, q: int) -> float:
        raise NotImplementedError

    @property
    def active(self) -> Tensor:
        """bool ``(U,)``: True for units in S."""
        return self._slots.active


class ClosedFormEstimator(Estimator):
    """What ``linear`` and ``gaussian`` share: the ridge and folds options, moments, ``start``.

    ``prepare`` needs only second moments, so they can be streamed batch by batch
    (:class:`MomentAccumulator`) instead of holding the activations (``streams``).

    ``folds`` chooses the test behind ``Delta.pvalue`` (confidence mode):

    - ``None`` (default): decided by the caller. Alone, ``prepare`` keeps no folds and the
      test is in-sample; :class:`~mipp.methods.mipp.MIPP` and
      :class:`~mipp.methods.selection.MIPPSelector` accumulate :data:`DEFAULT_FOLDS` folds in
      confidence mode (:meth:`confidence_folds`) and none in threshold / target mode;
    - ``0``: always the in-sample test (F for ``linear``, χ² for ``gaussian``);
    - ``K >= 2``: ``prepare`` also keeps K folds of moments and the held-out K-fold test of
      :mod:`mipp.estimators.heldout` answers ``Delta.pvalue``.

    ``start`` uses the held-out test whenever the moments it is given carry folds
    (``Moments.folds``) and ``folds`` is not 0; moments without folds (e.g. MIPP's threshold
    mode, which never accumulates them) get the in-sample test. ``Delta.value`` and
    ``Delta.relative`` are the full-data values either way.
    """

    name = "closed-form"
    streams = True
    needs_target_covariance = True
    #: the state class :meth:`start` builds (set by each subclass)
    state_class: type[Any] = ClosedFormState

    def __init__(self, *, ridge: float = 1e-3, folds: int | None = None) -> None:
        if not (math.isfinite(ridge) and ridge >= 0):
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
        check_folds(folds)
        self.ridge = float(ridge)
        self.folds = folds

    def __repr__(self) -> str:
        folds = "" if self.folds is None else f", folds={self.folds}"
        return f"{type(self).__name__}(ridge={self.ridge}{folds})"

    def with_folds(self, folds: int | None) -> ClosedFormEstimator:
        """A copy of this estimator with the ``folds`` option set to ``folds``."""
        check_folds(folds)
        other = copy.copy(self)
        other.folds = folds
        return other

    def rows_if_wider_than(self, n: int) -> int | None:
        """Layers with more features than this (for n calibration samples) should also keep
        their rows (``Moments.samples``, see :class:`MomentAccumulator`); None (the default):
        the moments alone."""
        return None

    def confidence_folds(self) -> int:
        """K of the held-out test in confidence mode: ``folds``, :data:`DEFAULT_FOLDS` when it
        is None, 0 (in-sample test) when it is 0."""
        return DEFAULT_FOLDS if self.folds is None else check_folds(self.folds)

    def min_samples(self, features: int, target_columns: int, *, test: bool = True) -> int:
        """``features + 2``, and at least 2 rows per fold (2K) with ``folds=K``. Without the
        test (``test=False``: threshold and target modes) 2: the ridge keeps every Δ_i
        defined however wide the layer; fewer samples only make it noisier."""
        if not test:
            return 2
        return max(features + 2, 2 * check_folds(self.folds))

    def prepare(self, x: Tensor, y: Tensor) -> Moments:
        """Centred float64 second moments of ``x`` ``(n, U, b)`` / ``(n, U)``, ``y`` ``(n, Q)``;
        with ``folds=K`` (>= 2) they also carry K folds (:func:`fold_moments`, row r in fold
        r mod K)."""
        moments = second_moments(x, y)
        k = check_folds(self.folds)
        if k:
            moments = dataclasses.replace(moments, folds=fold_moments(x, y, k, moments))
        return moments

    def start(self, prepared: Moments, columns: Tensor | None = None) -> Any:
        """A state with S = all units, for target columns ``columns`` (None = all); its
        p-values are held-out when ``prepared`` carries folds (unless ``folds=0``)."""
        if not isinstance(prepared, Moments):
            raise TypeError(f"prepared must come from prepare(), got {type(prepared).__name__}")
        if self.needs_target_covariance and not prepared.full_target:
            raise ValueError(
                f"the {self.name!r} estimator needs the target's full covariance; these "
                "moments hold its variances only (MomentAccumulator(full_target=False))"
            )
        k = check_folds(self.folds)
        if prepared.folds is not None and k and prepared.folds.count != k:
            raise ValueError(
                f"these moments carry {prepared.folds.count} folds but the estimator was "
                f"built with folds={k}; prepare them with folds={k}"
            )
        heldout = prepared.folds is not None and self.folds != 0
        return self.state_class(prepared, columns, ridge=self.ridge, heldout=heldout)
