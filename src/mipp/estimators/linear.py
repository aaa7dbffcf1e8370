"""``linear``: the paper's loss-difference MI with a ridge-regression predictor, in closed form.

METHOD.md §3, "Fast closed form". The target columns are standardised (centred, unit
variance; q columns, total variance q) and the predictor of Y from the kept features X_S is
ridge regression with ridge λ = ``ridge`` × (mean variance of the features). The loss is the
minimised ridge-penalised mean squared error as a share of the target's variance,

    L(S) = min_W ( E‖Y − X_S W‖² + λ‖W‖² ) / q = 1 − trace(Σ_yS (Σ_SS + λI)⁻¹ Σ_Sy) / q,

and information is the explained share I(X_S; Y) = 1 − L(S) (MI ≈ loss of the best constant,
which is 1, minus loss of the predictor). With P = (Σ_SS + λI)⁻¹ and B = P Σ_Sy,

    Δ_i = L(S∖i) − L(S) = trace(B_iᵀ P_ii⁻¹ B_i) / q,

B_i being the rows of unit i's b features and P_ii their b×b diagonal block. Removing unit i
is the Schur-complement downdate P ← P_rr − P_ri P_ii⁻¹ P_ir, B ← B_r − P_ri P_ii⁻¹ B_i.
"""

from __future__ import annotations

import scipy.stats
import torch
from torch import Tensor

from mipp.estimators.base import Delta
from mipp.estimators.moments import (
    ClosedFormEstimator,
    ClosedFormState,
    Moments,
    downdate,
    spd_inverse,
)

__all__ = ["LinearEstimator", "LinearState"]


class LinearEstimator(ClosedFormEstimator):
    """Closed-form ridge-regression estimator; values are shares of the target's variance.

    Args:
        ridge: Relative ridge; the ridge added to the feature covariance is
            ``ridge × mean feature variance``, so results do not depend on the activations'
            scale. Must be >= 0 (0 fails on collinear features such as duplicate units).

    The significance test of Δ_i is the partial F-test of H0: B_i = 0, treating the q target
    columns as independent regressions with a pooled residual variance:
    F = (ΔR_i / b_i) / (R(S) / (n − D_S − 1)) with (b_i·q, q·(n − D_S − 1)) degrees of freedom
    (b_i, D_S: non-constant features of unit i and of S). It is exact for one target column
    under Gaussian noise and ordinary least squares, and approximate otherwise (correlated
    columns, the ridge). R is the *unpenalised* residual share of the ridge fits,
    R(S) = L(S) − λ‖B‖²/q, and ΔR_i = R(S∖i) − R(S) = Δ_i − λ(‖B_{S∖i}‖² − ‖B‖²)/q [ours]:
    the penalty alone gives an exact duplicate unit Δ_i ≈ λ‖w‖²/(2q) > 0, which the F-test
    would call significant whenever the residual is small; without the penalty term the
    rise is O(λ²). As λ → 0 this is the plain F-test with Δ_i and L(S).

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(1000, 3, generator=g, dtype=torch.float64)
    >>> x[:, 2] = x[:, 0]  # unit 2 duplicates unit 0
    >>> y = x[:, :2] @ torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    >>> state = LinearEstimator().start(LinearEstimator().prepare(x, y))
    >>> round(state.information(), 2)  # share of Y's variance explained by all units
    1.0
    >>> round(state.delta(1).value, 1), state.delta(0).value < 1e-3  # 0 is redundant with 2
    (0.5, True)
    >>> state.remove(0)
    >>> round(state.delta(2).value, 1)  # now 2 is needed
    0.5
    """

    name = "linear"


class LinearState(ClosedFormState):
    """Kept set S and the downdated ridge inverse for one target (see :class:`LinearEstimator`).

    Attributes:
        n_units: U. columns: the target columns used (zero-variance ones dropped), LongTensor.
        ridge: the absolute ridge λ added to the feature covariance.
    """

    def __init__(self, moments: Moments, columns: Tensor | None, *, ridge: float) -> None:
        a, sxy, _, self.ridge = self._setup(moments, columns, ridge=ridge)
        p = spd_inverse(a, what="ridged feature covariance")
        self._m = torch.cat([p, p @ sxy], dim=1)  # [P | B], (D_S, D_S + q)
        self._explained: float | None = None
        self._b_norm = 0.0  # ‖B‖²_F, cached with _explained

    def information(self) -> float:
        """I(X_S; Y) = 1 − L(S): share of the standardised target's variance explained by S."""
        if self._q == 0:
            return 0.0
        if self._explained is None:
            d_s = self._m.shape[0]
            b_mat = self._m[:, d_s:]
            sxy_s = self._sxy[self._slots.feature_mask()]
            self._explained = float((sxy_s * b_mat).sum()) / self._q
            self._b_norm = float((b_mat**2).sum())
        return self._explained

    def single_scores(self) -> Tensor:
        """float64 ``(U,)``: share of the target's variance unit i explains alone,
        trace(Σ_yi (Σ_ii + λI)⁻¹ Σ_iy) / q; exactly 0 for constant units."""
        if self._q == 0:
            return torch.zeros(self.n_units, dtype=torch.float64)
        sxy_u = self._sxy.view(self.n_units, self._b, self._q)
        coef = torch.linalg.solve(self._a_blocks, sxy_u)
        scores = (sxy_u * coef).sum(dim=(1, 2)) / self._q
        return torch.where(self._const_units, 0.0, scores)

    def delta(self, i: int) -> Delta:
        """Δ_i = L(S∖i) − L(S) (share of variance) and the F-test p-value; i must be in S."""
        i = self._slots.check(i)
        if self._q == 0 or self._const_units[i]:
            return Delta(value=0.0, relative=0.0, pvalue=1.0)
        d_live = int(self._live[self._slots.feature_mask()].sum())
        dof_res = self._n - d_live - 1
        if dof_res <= 0:
            raise ValueError(
                f"the linear F-test needs more samples than kept features + 1: n={self._n}, "
                f"{d_live} non-constant features in S; use at least {d_live + 2} samples"
            )
        rows = self._slots.rows(i)
        d_s = self._m.shape[0]
        p_mat, b_mat = self._m[:, :d_s], self._m[:, d_s:]
        coef = torch.linalg.solve(p_mat[rows][:, rows], b_mat[rows])  # P_ii⁻¹ B_i, (b, q)
        value = max(float((b_mat[rows] * coef).sum()) / self._q, 0.0)
        # unpenalised residual shares for the test: R = L − λ‖B‖²/q, B_{S∖i} = B_r − P_ri coef
        explained = self.information()  # also caches ‖B‖²
        resid = 1.0 - explained - self.ridge * self._b_norm / self._q
        rest = torch.ones(d_s, dtype=torch.bool)
        rest[rows] = False
        b_without = b_mat[rest] - p_mat[rest][:, rows] @ coef
        rise = value - self.ridge * (float((b_without**2).sum()) - self._b_norm) / self._q
        b_live = int(self._live[i * self._b : (i + 1) * self._b].sum())
        if rise <= 0.0:
            pvalue = 1.0
        elif resid <= 0.0:
            pvalue = 0.0
        else:
            f_stat = (rise / b_live) / (resid / dof_res)
            pvalue = float(scipy.stats.f.sf(f_stat, b_live * self._q, self._q * dof_res))
        return Delta(value=value, relative=value, pvalue=pvalue)

    def remove(self, i: int) -> None:
        """S ← S ∖ {i} by a Schur-complement downdate of [P | B], O(D²·b)."""
        i = self._slots.check(i)
        self._m = downdate(self._m, self._slots.rows(i), square=False)
        self._slots.remove(i)
        self._explained = None


LinearEstimator.state_class = LinearState
