"""``linear``: the paper's loss-difference MI with a ridge-regression predictor, in closed form.

docs/METHOD.md §3, "Fast closed form". The target columns are standardised (centred, unit
variance; q columns, total variance q) and the predictor of Y from the kept features X_S is
ridge regression with ridge λ = ``ridge`` × (mean variance of the features). The loss is the
minimised ridge-penalised mean squared error as a share of the target's variance,

    L(S) = min_W ( E‖Y − X_S W‖² + λ‖W‖² ) / q = 1 − trace(Σ_yS (Σ_SS + λI)⁻¹ Σ_Sy) / q,

and information is the explained share I(X_S; Y) = 1 − L(S) (MI ≈ loss of the best constant,
which is 1, minus loss of the predictor). With P = (Σ_SS + λI)⁻¹ and B = P Σ_Sy,

    Δ_i = L(S∖i) − L(S) = trace(B_iᵀ P_ii⁻¹ B_i) / q,

B_i being the rows of unit i's b features and P_ii their b×b diagonal block. Removing unit i
is the Schur-complement downdate P ← P_rr − P_ri P_ii⁻¹ P_ir, B ← B_r − P_ri P_ii⁻¹ B_i,
done in place on full-size matrices whose removed rows and columns are set to 0.
"""

from __future__ import annotations

import math

import scipy.special
import torch
from torch import Tensor

from mipp.estimators.base import Delta
from mipp.estimators.heldout import HeldOutTest
from mipp.estimators.moments import (
    ClosedFormEstimator,
    ClosedFormState,
    Moments,
    spd_inverse,
)

__all__ = ["LinearEstimator", "LinearState"]


class LinearEstimator(ClosedFormEstimator):
    """Closed-form ridge-regression estimator; values are shares of the target's variance.

    Args:
        ridge: Relative ridge; the ridge added to the feature covariance is
            ``ridge × mean feature variance``, so results do not depend on the activations'
            scale. Must be >= 0 (0 fails on collinear features such as duplicate units).
        folds: the test behind ``Delta.pvalue`` (confidence mode). None (default): chosen by
            the caller — the in-sample F-test below when used alone; MIPP and MIPPSelector
            use the held-out test with 5 folds in confidence mode. 0: always the F-test.
            K >= 2: ``prepare`` also keeps K folds of moments (row r in fold r mod K) and the
            held-out test answers (see below). ``Delta.value`` is the same either way.

    **Held-out test** (docs/METHOD.md §3, :mod:`mipp.estimators.heldout`) [ours]: the paper's
    rule, in closed form. For each fold k the ridge predictor is fitted on the other K − 1
    folds (their means, their relative ridge) and its loss on fold k (share of the target's
    full-data variance, including the shift between the training and held-out means) is
    compared with and without unit i: Δ_i,k, from moments and Schur downdates, no re-fits.
    Unit i is kept iff a one-sided t-test (K − 1 dof) finds mean(Δ_i,k − m_i,k) > 0, where
    m_i,k = λ_k(‖B_{S∖i}‖² − ‖B_S‖²)/q is the rise of the ridge penalty that removing i
    forces on the other weights: without it two exact duplicates, which share the penalty,
    would predict better than one copy by an O(λ²) amount that is the same in every fold and
    test significant on noise-free targets. The margin is ≈ λw²/2 for such a copy, above its
    ≈ ¾λ²w²/s gain whenever the unit's variance s exceeds 1.5λ, and is λ times a change of
    squared weights — negligible — for units that carry information. The test itself needs
    no more samples than features, only 2 rows per fold (the ridge determines every fit);
    :meth:`min_samples` keeps the in-sample rule, features + 2 (and at least 2K).

    The in-sample significance test of Δ_i is the partial F-test of H0: B_i = 0, treating the
    q target columns as independent regressions with a pooled residual variance:
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
    needs_target_covariance = False


class LinearState(ClosedFormState):
    """Kept set S and the downdated ridge inverse for one target (see :class:`LinearEstimator`).

    Attributes:
        n_units: U. columns: the target columns used (zero-variance ones dropped), LongTensor.
        ridge: the absolute ridge λ added to the feature covariance.
    """

    def __init__(
        self, moments: Moments, columns: Tensor | None, *, ridge: float, heldout: bool = False
    ) -> None:
        a, sxy, _, self.ridge = self._setup(moments, columns, ridge=ridge, heldout=heldout)
        # full-size P and B; a removed unit's rows (and P's columns) are exactly 0
        self._p = spd_inverse(a, what="ridged feature covariance")  # (D, D)
        self._bm = self._p @ sxy  # (D, q)
        self._explained = float((self._sxy * self._bm).sum()) / self._q if self._q else 0.0
        # ‖B‖²_F, for the F-test only: None once a removal in threshold mode (which asks for
        # no p-values) skipped its update; recomputed from B when a test needs it
        self._b_norm: float | None = float((self._bm**2).sum())
        self._block: _Block | None = None
        self._d_live = int(self._live.sum())  # non-constant features in S

    def _retarget(self, keep: Tensor, sxy: Tensor, syy: Tensor, old_sxy: Tensor) -> None:
        """B for the new columns: the kept columns of B, then P Σ_Sa for the added ones."""
        n_keep = int(keep.sum())
        bm = self._bm[:, keep]
        if self._q > n_keep:
            bm = torch.cat([bm, self._p @ sxy[:, n_keep:]], 1)
        self._bm = bm
        self._explained = float((sxy * bm).sum()) / self._q if self._q else 0.0
        self._b_norm = float((bm**2).sum())
        self._block = None

    def _retarget_flops(self, removed: int, added: int) -> float:
        d = self.n_units * self._b
        return 2.0 * d * d * added + 2.0 * d * (self._q + added)

    def _start_flops(self, q: int) -> float:
        d = self.n_units * self._b
        return float(d) ** 3 + 2.0 * d * d * q

    def information(self) -> float:
        """I(X_S; Y) = 1 − L(S): share of the standardised target's variance explained by S."""
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

    def prefetch(self, units: list[int]) -> None:
        """Announce the next units TERC will test: their Δ and removals are then served from
        small caches (O(K²·b² + K·b·q) per removal) and the removals reach the full D×D
        matrices as one block Schur complement (a GEMM) instead of one O(D²) pass each."""
        if self.heldout is not None:
            self.heldout.prefetch(units)
        self._flush()
        units = [int(u) for u in units if self._slots.is_active(int(u))]
        if len(units) < 2:
            return
        rows = torch.cat([torch.arange(u * self._b, (u + 1) * self._b) for u in units])
        p_k = self._p[rows]  # (Kb, D)
        tested = self._tested()
        self._block = _Block(
            units={u: slice(j * self._b, (j + 1) * self._b) for j, u in enumerate(units)},
            rows=rows,
            p=p_k[:, rows].clone(),
            bm=self._bm[rows].clone(),
            pb=p_k @ self._bm if tested else None,
            pp=p_k @ p_k.T if tested else None,
        )

    def _tested(self) -> bool:
        """Whether :meth:`delta` runs the in-sample F-test, which alone needs ‖B‖² and the
        block caches P B and P P (threshold mode and the held-out test do not)."""
        return self.pvalues and self.heldout is None

    def _rows(self, i: int, *, tested: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Unit i's ``(P_ii, B_i, P_i· B, P_i· P_·i)``, from the block caches when prefetched;
        the last two None unless ``tested``."""
        blk = self._block
        if tested and blk is not None and blk.pb is None:
            self._flush()  # a block prefetched without the test's caches
            blk = None
        if blk is not None and i in blk.units:
            r = blk.units[i]
            if not tested:
                return blk.p[r, r], blk.bm[r], None, None
            return blk.p[r, r], blk.bm[r], blk.pb[r], blk.pp[r, r]
        r = slice(i * self._b, (i + 1) * self._b)
        p_i = self._p[r]
        if not tested:
            return p_i[:, r], self._bm[r], None, None
        return p_i[:, r], self._bm[r], p_i @ self._bm, p_i @ p_i.T

    def _norm(self) -> float:
        """‖B‖²_F, recomputed from B (every removal applied first) if it went stale."""
        if self._b_norm is None:
            self._flush()
            self._b_norm = float((self._bm**2).sum())
        return self._b_norm

    def delta(self, i: int) -> Delta:
        """Δ_i = L(S∖i) − L(S) (share of variance) and its p-value; i must be in S.

        The p-value is the held-out test's (:attr:`heldout`) when the state has one, else the
        in-sample partial F-test's.

        O(D·q·b) (O(q·b²) when prefetched): with c = P_ii⁻¹ B_i and r the other kept rows,
        ‖B_{S∖i}‖² = ‖B_r − P_ri c‖² = ‖B‖² − ‖B_i‖² − 2⟨c, P_ir B_r⟩ + ⟨c, P_ir P_ri c⟩, where
        P_ir B_r = P_i· B − P_ii B_i and P_ir P_ri = P_i· P_·i − P_ii² (removed rows are 0).
        """
        i = self._slots.check(i)
        if self._q == 0 or self._const_units[i]:
            return Delta(value=0.0, relative=0.0, pvalue=1.0)
        d_live = self._d_live
        dof_res = self._n - d_live - 1
        if self._block is not None and i not in self._block.units:
            self._flush()
        tested = self._tested()
        b_norm = self._norm() if tested else math.nan
        p_ii, b_i, pb_i, pp_ii = self._rows(i, tested=tested)
        coef = _solve(p_ii, b_i)  # P_ii⁻¹ B_i, (b, q)
        value = max(float((b_i * coef).sum()) / self._q, 0.0)
        if self.heldout is not None:
            return Delta(value=value, relative=value, pvalue=self.heldout.pvalue(i))
        if not self.pvalues:  # threshold mode: Δ_i alone decides, the F-test is not asked for
            return Delta(value=value, relative=value, pvalue=math.nan)
        # unpenalised residual shares for the test: R = L − λ‖B‖²/q
        resid = 1.0 - self._explained - self.ridge * b_norm / self._q
        cross = pb_i - p_ii @ b_i  # P_ir B_r, (b, q)
        gram = pp_ii - p_ii @ p_ii  # P_ir P_ri, (b, b)
        b_without = (
            b_norm
            - float((b_i**2).sum())
            - 2 * float((coef * cross).sum())
            + float((coef * (gram @ coef)).sum())
        )
        rise = value - self.ridge * (b_without - b_norm) / self._q
        b_live = int(self._live[i * self._b : (i + 1) * self._b].sum())
        if dof_res <= 0:  # fewer samples than features: Δ (ridge) is fine, no F-test
            pvalue = math.nan
        elif rise <= 0.0:
            pvalue = 1.0
        elif resid <= 0.0:
            pvalue = 0.0
        else:
            f_stat = (rise / b_live) / (resid / dof_res)
            # F survival function (scipy.special's ufunc: far cheaper than scipy.stats.f.sf)
            pvalue = float(scipy.special.fdtrc(b_live * self._q, self._q * dof_res, f_stat))
        return Delta(value=value, relative=value, pvalue=pvalue)

    def remove(self, i: int) -> None:
        """S ← S ∖ {i}: a Schur-complement downdate of P and B (deferred within a prefetched
        block, in place on the full matrices otherwise, O(D·(D + q)·b))."""
        i = self._slots.check(i)
        blk = self._block
        if blk is not None and i not in blk.units:
            self._flush()
            blk = None
        tested = self._tested() and self._b_norm is not None
        p_ii, b_i, pb_i, pp_ii = self._rows(i, tested=tested)
        blk = self._block  # (None if reading the test's caches ended it)
        coef = _solve(p_ii, b_i)  # C = P_ii⁻¹ B_i
        # information and ‖B‖² after B ← B − P_·i C
        self._explained -= float((b_i * coef).sum()) / self._q if self._q else 0.0
        if tested:
            self._b_norm += float((coef * (pp_ii @ coef)).sum()) - 2 * float((coef * pb_i).sum())
        else:
            self._b_norm = None  # recomputed from B if a test asks for it
        if blk is not None:
            blk.remove(i)
        else:
            r = slice(i * self._b, (i + 1) * self._b)
            p_ri = self._p[:, r].clone()  # (D, b)
            self._bm -= p_ri @ coef
            self._p -= p_ri @ _solve(p_ii, p_ri.T)
            self._p[r] = 0.0
            self._p[:, r] = 0.0
            self._bm[r] = 0.0
        self._slots.remove(i)
        self._d_live -= int(self._live[i * self._b : (i + 1) * self._b].sum())
        if self.heldout is not None:
            self.heldout.remove(i)

    def _flush(self) -> None:
        """Apply a block's deferred removals R to P and B at once:
        P ← P − P_·R P_RR⁻¹ P_R·, B ← B − P_·R P_RR⁻¹ B_R (P, B still as at the block start)."""
        blk, self._block = self._block, None
        if blk is None or not blk.removed:
            return
        rows = torch.cat([blk.rows[blk.units[u]] for u in blk.removed])
        p_r = self._p[:, rows].clone()  # (D, |R|b)
        p_rr = p_r[rows]
        self._bm -= p_r @ _solve(p_rr, self._bm[rows])
        self._p -= p_r @ _solve(p_rr, p_r.T)
        self._p[rows] = 0.0
        self._p[:, rows] = 0.0
        self._bm[rows] = 0.0


def _solve(a: Tensor, b: Tensor) -> Tensor:
    """a⁻¹ b for a small SPD ``a`` (a division when 1×1: far cheaper than a LAPACK call)."""
    if a.shape == (1, 1):
        return b / a[0, 0]
    return torch.linalg.solve(a, b)


class _Block:
    """Caches of P and B restricted to K prefetched units, kept exact under their removals.

    With P' = P − P_·m W P_m· and B' = B − P_·m W B_m for a removed unit m (W = P_mm⁻¹), the
    restrictions to the block rows K follow from block quantities alone:
    P'_KK = P_KK − P_Km W P_mK, B'_K = B_K − P_Km W B_m,
    (P'B')_K = (PB)_K − P_Km W (PB)_m − (PP)_Km W B_m + P_Km W (PP)_mm W B_m,
    (P'P')_KK = (PP)_KK − P_Km W (PP)_mK − (PP)_Km W P_mK + P_Km W (PP)_mm W P_mK.
    """

    def __init__(
        self,
        units: dict[int, slice],
        rows: Tensor,
        p: Tensor,
        bm: Tensor,
        pb: Tensor | None,
        pp: Tensor | None,
    ) -> None:
        self.units, self.rows = units, rows
        self.p, self.bm, self.pb, self.pp = p, bm, pb, pp
        self.removed: list[int] = []

    def remove(self, i: int) -> None:
        r = self.units[i]
        p_km = self.p[:, r].clone()  # (Kb, b)
        w = _solve(p_km[r], torch.eye(p_km.shape[1], dtype=p_km.dtype))  # P_mm⁻¹
        a = p_km @ w  # P_Km W
        b_m = self.bm[r].clone()
        if self.pb is not None:  # the F-test's caches (absent in threshold mode)
            pp_km = self.pp[:, r].clone()
            pp_mm, pb_m = pp_km[r], self.pb[r].clone()
            t = a @ (pp_mm @ w)  # P_Km W (PP)_mm W
            self.pb -= a @ pb_m + pp_km @ (w @ b_m) - t @ b_m
            self.pp -= a @ pp_km.T + pp_km @ a.T - t @ p_km.T
            self.pp[r] = 0.0
            self.pp[:, r] = 0.0
            self.pb[r] = 0.0
        self.p -= a @ p_km.T
        self.bm -= a @ b_m
        self.p[r] = 0.0
        self.p[:, r] = 0.0
        self.bm[r] = 0.0
        self.removed.append(i)


LinearEstimator.state_class = LinearState
LinearState.heldout_class = HeldOutTest
