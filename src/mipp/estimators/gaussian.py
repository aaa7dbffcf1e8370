"""``gaussian``: conditional mutual information of jointly Gaussian activations, in nats.

docs/METHOD.md §3, "Gaussian conditional MI". The same second moments as ``linear``; the target
columns are standardised and a ridge is added to the whole joint covariance: λ_x = ``ridge`` ×
(mean feature variance) on the X block and λ_y = ``ridge`` on the (unit-variance) Y block.
With P = (Σ_SS + λ_x I)⁻¹ and Q = (Cov([X_S, Y]) + diag(λ_x, λ_y))⁻¹,

    Δ_i = I(X_i; Y | X_{S∖i}) = ½ log det Q_ii − ½ log det P_ii            (nats),
    I(X_S; Y) = ½ log det(Σ_yy + λ_y I) + ½ log det Q_yy = ½ log det Q_XX − ½ log det P,

Q_ii, P_ii being unit i's b×b diagonal blocks. Only Q's X block is ever read, and it is
the inverse of the conditional covariance of X given Y [ours]:

    Q_XX = (A − Σ_Sy C_yy⁻¹ Σ_yS)⁻¹,   A = Σ_SS + λ_x I,  C_yy = Σ_yy + λ_y I,

so the state holds two D×D matrices and never the (D + q)×(D + q) joint one: a start costs
O(D³ + D²·q + D·q² + q³) instead of O(D³ + (D + q)³), and removing unit i downdates both P
and Q_XX by Schur complements (the inverse of a principal submatrix is the Schur complement
of the inverse) in O(D²·b) instead of O((D + q)²·b), in place on full-size matrices whose
removed rows and columns are 0. I(X_S; Y) = ½ log det A − ½ log det Q_XX⁻¹ is read off the
two Cholesky factorisations of the start.

Test: under H0 (Δ_i = 0) the likelihood-ratio statistic 2·n·Δ_i is asymptotically χ² with
b·q degrees of freedom. We evaluate it on the plain residual covariances of the ridge fits,
T = n·[log det R(S∖i) − log det R(S)], R(S) = Cov(Y − X_S B) + λ_y I, B = P Σ_Sy [ours]:
T → 2·n·Δ_i as the ridge → 0, but unlike 2·n·Δ_i it does not count the ridge's own effect
(the ridge acts like independent noise on every feature, so an exact duplicate of a kept unit
would carry Δ_i > 0, significant whenever Y is nearly determined by X). R is kept up to date
with rank-b corrections; each test costs one q×q Cholesky factorisation. Threshold mode asks
for no test (``EstimatorState.pvalues`` False): R is then not maintained, and the removals of
the units TERC announces are applied to P and Q as one block downdate [ours].

When Y is a deterministic linear function of X (logits of the penultimate layer) the MI is
unbounded and only the ridge keeps it finite: compare Δ_i with the layer's current I(X_S; Y)
(``Delta.relative``), never across layers in absolute nats.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import numpy as np
import scipy.special
import torch
from torch import Tensor

from mipp.estimators.base import Delta
from mipp.estimators.heldout import HeldOutTest
from mipp.estimators.moments import (
    ClosedFormEstimator,
    ClosedFormState,
    Moments,
    UnitSlots,
    check_folds,
    cholesky_or_raise,
    logdet_spd,
    sample_rows,
    variance_scale,
)

__all__ = ["GaussianDualState", "GaussianEstimator", "GaussianState"]

#: the sample-space form pays when a layer has more than this many features per sample
DUAL_FACTOR = 2
#: feature columns per prefetched block of the sample-space form (see
#: :attr:`GaussianDualState.prefetch_units`)
BLOCK_COLUMNS = 192


class GaussianEstimator(ClosedFormEstimator):
    """Closed-form Gaussian (log-det) conditional MI in nats, with a χ² likelihood-ratio test.

    Args:
        ridge: Relative ridge: ``ridge × mean feature variance`` on the X block of the joint
            covariance and ``ridge`` on the standardised Y block. Must be >= 0.
        folds: the test behind ``Delta.pvalue``, as for
            :class:`~mipp.estimators.LinearEstimator`: None (default; in-sample χ² alone,
            5 folds held-out in MIPP's / MIPPSelector's confidence mode), 0 (always χ²) or
            K >= 2 (held-out).

    **Held-out test** [ours]: the *same* held-out ridge-loss test as ``linear``
    (:mod:`mipp.estimators.heldout`, same relative ridge λ_x, same margin), not a held-out
    Gaussian log-likelihood. Both test the same null: under the Gaussian model
    I(X_i; Y | X_{S∖i}) = 0 iff the regression coefficients of X_i given X_{S∖i} are 0, i.e.
    iff the linear loss difference is 0; so the test is valid for this estimator's Δ. The
    log-likelihood would weight the target columns by the inverse residual covariance, but
    when Y is (nearly) a deterministic function of X — the case confidence mode must handle —
    that covariance is the ridge λ_y alone, and the held-out log-likelihood difference of
    two copies of a unit becomes a ratio of ridge artefacts rather than a loss difference we
    can bound. ``Delta.value`` / ``relative`` stay the in-sample nats.

    >>> from mipp.zoo.data import gaussian_pair
    >>> pair = gaussian_pair(20000, dim_x=2, dim_y=2, rho=0.8, seed=0)
    >>> est = GaussianEstimator(ridge=1e-6)
    >>> state = est.start(est.prepare(pair.x, pair.y))
    >>> round(pair.mi, 3), abs(state.information() / pair.mi - 1) < 0.02  # closed form, nats
    (1.022, True)
    """

    name = "gaussian"

    def min_samples(self, features: int, target_columns: int, *, test: bool = True) -> int:
        """``features + target_columns + 2``: the joint covariance of (X_S, Y) must be
        determined, not only X_S's. ``test=False`` (threshold and target modes): 2, the
        ridges keep both log-determinants finite."""
        if not test:
            return 2
        return max(features + target_columns + 2, 2 * check_folds(self.folds))

    def rows_if_wider_than(self, n: int) -> int | None:
        """Layers with more than this many features (for n calibration samples) are worth
        their rows (``Moments.samples``): :class:`GaussianDualState` works on n×n matrices
        instead of D×D ones. None (the moments alone) without a ridge, which the sample
        space needs."""
        return DUAL_FACTOR * n if self.ridge > 0 else None

    def prepare(self, x: Tensor, y: Tensor) -> Moments:
        """As :meth:`ClosedFormEstimator.prepare`; the rows are also kept (``Moments.samples``)
        when the layer is wider than :meth:`rows_if_wider_than` and there are no folds."""
        moments = super().prepare(x, y)
        wide = self.rows_if_wider_than(moments.n)
        if wide is not None and moments.folds is None and moments.sxx.shape[0] > wide:
            moments = dataclasses.replace(moments, samples=sample_rows(moments, x, y))
        return moments

    def start(self, prepared: Moments, columns: Tensor | None = None) -> Any:
        """As :meth:`ClosedFormEstimator.start`, in the sample space
        (:class:`GaussianDualState`) when the moments carry their rows and no held-out test
        is asked for."""
        if (
            isinstance(prepared, Moments)
            and prepared.samples is not None
            and prepared.folds is None
            and prepared.full_target
            and self.ridge > 0
        ):
            return GaussianDualState(prepared, columns, ridge=self.ridge)
        return super().start(prepared, columns)


class GaussianState(ClosedFormState):
    """Kept set S with the downdated inverses P and Q (see :class:`GaussianEstimator`).

    Attributes:
        n_units: U. columns: the target columns used (zero-variance ones dropped), LongTensor.
        ridge_x, ridge_y: the absolute ridges added to the X and Y blocks.
    """

    def __init__(
        self, moments: Moments, columns: Tensor | None, *, ridge: float, heldout: bool = False
    ) -> None:
        a, sxy, syy, self.ridge_x = self._setup(moments, columns, ridge=ridge, heldout=heldout)
        self.ridge_y = ridge
        self._cyy = syy + self.ridge_y * torch.eye(self._q, dtype=torch.float64)
        # full-size matrices; a removed unit's rows and columns are set to exactly 0, so no
        # test or removal copies a D×D matrix
        self._p, logdet_p = _inverse_logdet(a, what="ridged feature covariance")  # (D, D)
        self._w = _whitened(sxy, self._cyy)  # Σ_Sy L⁻ᵀ (D, q), C_yy = L Lᵀ
        self._qx, logdet_qx = _inverse_logdet(
            a - self._w @ self._w.T, what="ridged joint covariance of (X, Y)"
        )  # Q_XX (D, D)
        self._info = 0.5 * (logdet_qx - logdet_p) if self._q else 0.0
        # for the test only: the ridge coefficients B = P Σ_Sy (D, q), the penalised residual
        # covariance E = C_yy − Σ_yS B and G = BᵀB (q, q); built on the first p-value
        # (threshold and target modes ask for none) and kept current from then on
        self._bm: Tensor | None = None
        self._e: Tensor | None = None
        self._g: Tensor | None = None
        self._test_current = False
        self._block: _Block | None = None
        self._deferred: _Deferred | None = None
        self._logdet_r: float | None = None

    def information(self) -> float:
        """I(X_S; Y) in nats under the Gaussian model (ridged covariances).

        ½ log det Q_XX − ½ log det P at the start (both log-determinants come with the
        factorisations that built P and Q_XX); each removal then subtracts the unit's Δ_i (the
        chain rule I(X_S; Y) = I(X_{S∖i}; Y) + I(X_i; Y | X_{S∖i}) holds exactly for the
        ridged Gaussian), so no removal needs a factorisation."""
        if self._q == 0:
            return 0.0
        return max(self._info, 0.0)

    def single_scores(self) -> Tensor:
        """float64 ``(U,)``: I(X_i; Y) in nats of each unit alone,
        ½ log det A_ii − ½ log det(A_ii − Σ_iy C_yy⁻¹ Σ_yi); exactly 0 for constant units."""
        if self._q == 0:
            return torch.zeros(self.n_units, dtype=torch.float64)
        if self._w is None:  # after a retarget
            self._w = _whitened(self._sxy, self._cyy)
        k = self._w.view(self.n_units, self._b, self._q)
        cond = self._a_blocks - k @ k.transpose(1, 2)
        scores = 0.5 * (_batched_logdet(self._a_blocks) - _batched_logdet(cond))
        scores = scores.clamp_min(0.0)
        return torch.where(self._const_units, 0.0, scores)

    def _rows(self, i: int) -> slice:
        return slice(i * self._b, (i + 1) * self._b)

    def _retarget(self, keep: Tensor, sxy: Tensor, syy: Tensor, old_sxy: Tensor) -> None:
        """Q_XX for the new columns by two low-rank corrections of its inverse A_c (Woodbury),
        with K = C_yy⁻¹ over the old columns and C over the new ones (kept k, then added n):

        - dropped columns a: A_c ← A_c + V K_aa⁻¹ Vᵀ, V = Σ_Sy K_·a (the inverse of a marginal
          covariance is the Schur complement of the inverse);
        - added columns n: A_c ← A_c − U S⁻¹ Uᵀ, U = Σ_Sn − Σ_Sk C_kk⁻¹ C_kn and
          S = C_nn − C_nk C_kk⁻¹ C_kn (block inversion of C),

        each O(D²·c + D·q·c) for c changed columns, and I(X_S; Y) follows by the matrix
        determinant lemma. P does not depend on the columns."""
        qx, info = self._qx, self._info
        n_keep, q = int(keep.sum()), self._q
        cyy = syy + self.ridge_y * torch.eye(q, dtype=torch.float64)
        if not bool(keep.all()):
            dropped = (~keep).nonzero().flatten()
            chol = torch.linalg.cholesky(self._cyy)
            eye = torch.eye(self._cyy.shape[0], dtype=torch.float64)[:, dropped]
            k_a = torch.cholesky_solve(eye, chol)  # K_·a, (q_old, |a|)
            v = old_sxy @ k_a  # (D, |a|)
            k_aa = k_a[dropped]
            qv = qx @ v
            inner = k_aa + v.T @ qv
            qx = qx - qv @ torch.linalg.solve(inner, qv.T)
            # log det A_c rises by log det(K_aa + VᵀQV) − log det K_aa
            info -= 0.5 * (logdet_spd((inner + inner.T) / 2) - logdet_spd(k_aa))
        if q > n_keep:
            c_kk, c_kn, c_nn = cyy[:n_keep, :n_keep], cyy[:n_keep, n_keep:], cyy[n_keep:, n_keep:]
            if n_keep:
                chol_k = torch.linalg.cholesky(c_kk)
                coef = torch.cholesky_solve(c_kn, chol_k)  # C_kk⁻¹ C_kn
                u = sxy[:, n_keep:] - sxy[:, :n_keep] @ coef
                schur = c_nn - c_kn.T @ coef
            else:
                u, schur = sxy[:, n_keep:], c_nn
            qu = qx @ u
            inner = schur - u.T @ qu
            qx = qx + qu @ torch.linalg.solve(inner, qu.T)
            # log det A_c falls by log det S − log det(S − UᵀQU)
            info += 0.5 * (logdet_spd((schur + schur.T) / 2) - logdet_spd((inner + inner.T) / 2))
        self._qx = (qx + qx.T) / 2
        self._info = info if q else 0.0
        self._cyy = cyy
        self._w = None
        self._bm = self._e = self._g = None
        self._test_current = False
        self._block = None
        self._deferred = None
        self._logdet_r = None

    def _retarget_flops(self, removed: int, added: int) -> float:
        d, q = self.n_units * self._b, self._q
        kept = q - removed
        drop = 2.0 * q * q * removed + 2.0 * d * q * removed + 3.0 * d * d * removed
        add = kept**3 / 3 + kept * kept * added + 2.0 * d * kept * added + 3.0 * d * d * added
        return drop + add

    def _start_flops(self, q: int) -> float:
        d = float(self.n_units * self._b)
        return 2.0 * d**3 + q**3 / 3 + d * q * q + d * d * q

    def prefetch(self, units: list[int]) -> None:
        """Passed on to the held-out test (its block caches). Without p-values
        (``pvalues`` False) the announced units' blocks of P and Q are also cached and their
        removals kept exact there; the full matrices are never downdated: the removed rows R
        are only recorded (:class:`_Deferred`, with Cholesky factors of P_RR and Q_RR), and
        the next block is read as M_KK − (L⁻¹M_RK)ᵀ(L⁻¹M_RK), O(|R|²·|K|) instead of the
        O(D²·|R|) full downdate per block [ours]. With p-values every removal also needs B, E
        and G, so the full matrices are downdated in place as before."""
        if self.heldout is not None:
            self.heldout.prefetch(units)
        if self.pvalues:
            self._flush()
            return
        self._commit()
        units = [int(u) for u in units if self._slots.is_active(int(u))]
        if len(units) < 2:
            return
        rows = torch.cat([torch.arange(u * self._b, (u + 1) * self._b) for u in units])
        self._block = _Block(
            units={u: slice(j * self._b, (j + 1) * self._b) for j, u in enumerate(units)},
            rows=rows,
            mats=self._restricted(rows),
        )

    def _restricted(self, rows: Tensor) -> list[Tensor]:
        """``[P_KK, Q_KK]`` of the kept set for feature rows K (deferred removals applied)."""
        mats = [self._p, self._qx]
        if self._deferred is None:
            return [m[rows[:, None], rows] for m in mats]
        return self._deferred.restrict(mats, rows)

    def _commit(self) -> None:
        """End the current block: its removed rows join the deferred set."""
        blk, self._block = self._block, None
        if blk is None or not blk.removed:
            return
        rows = torch.cat([blk.rows[blk.units[u]] for u in blk.removed])
        self._defer(rows)

    def _defer(self, rows: Tensor) -> None:
        if self._deferred is None:
            self._deferred = _Deferred(2, self._p.shape[0])
        self._deferred.add([self._p, self._qx], rows)

    def _blocks(self, i: int) -> tuple[Tensor, Tensor]:
        """Unit i's diagonal blocks ``(P_ii, Q_ii)`` for a unit outside the prefetched block
        (:meth:`_logdets` reads those from the block)."""
        if not self.pvalues:  # the block ends; its removals join the deferred ones
            self._commit()
            p_ii, q_ii = self._restricted(self._row_index(i))
            return p_ii, q_ii
        self._flush()
        r = self._rows(i)
        return self._p[r, r], self._qx[r, r]

    def _logdets(self, i: int) -> tuple[float, float]:
        """(log det P_ii, log det Q_ii) of unit i (:meth:`_blocks`; from the block when
        prefetched)."""
        blk = self._block
        if blk is not None and i in blk.units:
            return blk.logdets(i)
        p_ii, q_ii = self._blocks(i)
        return logdet_spd(p_ii), logdet_spd(q_ii)

    def _row_index(self, i: int) -> Tensor:
        """Unit i's feature rows in the full matrices, as an index (:meth:`_rows`: a slice)."""
        return torch.arange(i * self._b, (i + 1) * self._b)

    def delta(self, i: int) -> Delta:
        """Δ_i = I(X_i; Y | X_{S∖i}) in nats and its p-value (the held-out test's when the
        state has one, else the χ² likelihood-ratio test's; NaN when ``pvalues`` is False);
        i must be in S."""
        i = self._slots.check(i)
        if self._q == 0 or self._const_units[i]:
            return Delta(value=0.0, relative=0.0, pvalue=1.0)
        value, relative = _logdet_delta(*self._logdets(i), self.information())
        if not self.pvalues:
            return Delta(value=value, relative=relative, pvalue=math.nan)
        if self.heldout is not None:
            return Delta(value=value, relative=relative, pvalue=self.heldout.pvalue(i))
        self._refresh_test()
        r = self._rows(i)
        # likelihood-ratio statistic on the plain (unpenalised) residual covariances
        if self._logdet_r is None:
            self._logdet_r = logdet_spd(self._e - self.ridge_x * self._g)
        d_e, d_g = self._removal_terms(r)
        r_without = self._e + d_e - self.ridge_x * (self._g + d_g)
        stat = self._n * (logdet_spd((r_without + r_without.T) / 2) - self._logdet_r)
        b_live = int(self._live[r].sum())
        pvalue = float(scipy.special.chdtrc(b_live * self._q, max(stat, 0.0)))
        return Delta(value=value, relative=relative, pvalue=pvalue)

    def remove(self, i: int) -> None:
        """S ← S ∖ {i}. With ``pvalues``: Schur-complement downdates of P and Q_XX, O(D²·b)
        in place, and of B, E and G, O(D·b·q + q²·b). Without: the unit's rows join the
        deferred set (:meth:`prefetch`; the full matrices are downdated only if something
        reads them later) and B, E, G are marked stale."""
        i = self._slots.check(i)
        if not self._const_units[i] and self._q:
            logdet_p, logdet_q = self._logdets(i)
            self._info -= 0.5 * (logdet_q - logdet_p)  # the chain rule
        blk = self._block
        if blk is not None and i in blk.units and not self.pvalues:
            blk.remove(i)
            self._test_current = False
        elif not self.pvalues:
            self._commit()
            self._defer(self._row_index(i))
            self._test_current = False
        else:
            self._flush()
            r = self._rows(i)
            if self.pvalues:
                self._refresh_test()
                d_e, d_g = self._removal_terms(r)
                self._e = self._e + d_e
                self._g = self._g + d_g
                p_ri = self._p[:, r]
                self._bm -= p_ri @ torch.linalg.solve(p_ri[r], self._bm[r])
                self._bm[r] = 0.0
            for m in (self._p, self._qx):
                _downdate(m, r)
        self._slots.remove(i)
        self._logdet_r = None
        if self.heldout is not None:
            self.heldout.remove(i)

    def _flush(self) -> None:
        """Apply every deferred removal R (the current block's and earlier ones) to the full P
        and Q at once: M ← M − M_·R M_RR⁻¹ M_R· = M − (L⁻¹M_R·)ᵀ(L⁻¹M_R·), then zero R's
        rows and columns."""
        self._commit()
        deferred, self._deferred = self._deferred, None
        if deferred is None:
            return
        deferred.apply([self._p, self._qx])
        self._test_current = False

    def _refresh_test(self) -> None:
        """Rebuild B = P Σ_Sy, E and G from P after removals that skipped them,
        O(D²·q + D·q²): removed rows of P are 0, so P Σ_Sy is B_S padded with zeros."""
        self._flush()
        if self._test_current:
            return
        self._bm = self._p @ self._sxy
        self._e = self._cyy - self._sxy.T @ self._bm
        self._g = self._bm.T @ self._bm
        self._test_current = True
        self._logdet_r = None

    def _removal_terms(self, r: slice) -> tuple[Tensor, Tensor]:
        """Changes of E and G = BᵀB when unit rows ``r`` leave S, each ``(q, q)``.

        With c = P_ii⁻¹ B_i, B_{S∖i} = B_r − P_ri c, so E rises by B_iᵀ c and
        G changes by −B_iᵀB_i − H c − cᵀHᵀ + cᵀ P_ir P_ri c with H = B_rᵀ P_ri. Removed rows
        are 0, so H = Bᵀ P_·i − B_iᵀ P_ii and P_ir P_ri = P_·iᵀ P_·i − P_ii², O(D·q·b).
        """
        p_col = self._p[:, r]  # (D, b)
        p_ii = p_col[r]
        b_i = self._bm[r]
        coef = torch.linalg.solve(p_ii, b_i)
        h = self._bm.T @ p_col - b_i.T @ p_ii  # (q, b)
        gram = p_col.T @ p_col - p_ii @ p_ii  # (b, b)
        d_e = b_i.T @ coef
        hc = h @ coef
        d_g = coef.T @ gram @ coef - b_i.T @ b_i - hc - hc.T
        return (d_e + d_e.T) / 2, (d_g + d_g.T) / 2


def _logdet_delta(logdet_p: float, logdet_q: float, info: float) -> tuple[float, float]:
    """(Δ_i, Δ_i / I(X_S; Y)) from the log-determinants of unit i's diagonal blocks of P and
    Q_XX (or of any common multiple of them): ½ log det Q_ii − ½ log det P_ii, clamped at 0."""
    value = max(0.5 * (logdet_q - logdet_p), 0.0)
    return value, value / info if info > 0 else 0.0


def _log_positive(value: float) -> float:
    """log of a 1×1 block (as :func:`~mipp.estimators.moments.logdet_spd`)."""
    if value > 0:
        return math.log(value)
    raise ValueError("matrix is not positive definite; use a ridge > 0")


def _inverse_logdet(a: Tensor, *, what: str) -> tuple[Tensor, float]:
    """``(a⁻¹, log det a⁻¹)`` of an SPD matrix from one Cholesky factorisation."""
    if a.numel() == 0:
        return a.clone(), 0.0
    chol = cholesky_or_raise(a, what=what)
    inv = torch.cholesky_inverse(chol)
    return (inv + inv.T) / 2, -2.0 * float(chol.diagonal().log().sum())


def _whitened(sxy: Tensor, cyy: Tensor) -> Tensor:
    """Σ_Sy L⁻ᵀ with C_yy = L Lᵀ, ``(D, q)``: Σ_Sy C_yy⁻¹ Σ_yS = W Wᵀ."""
    if cyy.numel() == 0:
        return sxy
    chol = torch.linalg.cholesky(cyy)
    return torch.linalg.solve_triangular(chol, sxy.T, upper=False).T


def _downdate(m: Tensor, rows: Tensor | slice) -> None:
    """In place, M ← M − M_·R M_RR⁻¹ M_R· for a symmetric M, then R's rows and columns = 0."""
    m_r = m[:, rows].clone()
    if m_r.shape[1] == 1:  # one row (a unit of one feature): a rank-1 update, no solve
        m.addr_(m_r[:, 0], m_r[:, 0], alpha=-1.0 / float(m_r[rows].reshape(())))
    else:
        m -= m_r @ torch.linalg.solve(m_r[rows], m_r.T)
    m[rows] = 0.0
    m[:, rows] = 0.0


class _Deferred:
    """Removed feature rows R not yet applied to some symmetric matrices M (never modified
    meanwhile), with the lower Cholesky factor L of each M_RR, grown by appending rows:
    for new rows N, C = L⁻¹M_RN and L_NN = chol(M_NN − CᵀC). The kept set's restriction
    to rows K is then M_KK − WᵀW with W = L⁻¹M_RK (the Schur complement of M_RR in M) [ours].
    The factors live in buffers grown by doubling up to D×D, so appending costs O(|R|²·|N|)
    plus an amortised copy."""

    def __init__(self, count: int, size: int) -> None:
        self.size = size  # D: the buffers never grow past it
        self.rows = torch.empty(0, dtype=torch.long)
        self.factors: list[Tensor] = [torch.empty(0, 0, dtype=torch.float64)] * count

    def add(self, mats: list[Tensor], new: Tensor) -> None:
        r, n = len(self.rows), len(new)
        if r + n > self.factors[0].shape[0]:
            cap = min(max(2 * self.factors[0].shape[0], r + n, 64), self.size)
            grown = []
            for f in self.factors:
                g = torch.zeros(cap, cap, dtype=torch.float64)
                g[:r, :r] = f[:r, :r]
                grown.append(g)
            self.factors = grown
        for m, f in zip(mats, self.factors, strict=True):
            m_nn = m[new[:, None], new]
            if r:
                c = torch.linalg.solve_triangular(
                    f[:r, :r], m[self.rows[:, None], new], upper=False
                )
                f[r : r + n, :r] = c.T
                m_nn = m_nn - c.T @ c
            f[r : r + n, r : r + n] = cholesky_or_raise(
                (m_nn + m_nn.T) / 2, what="kept-set Schur complement"
            )
        self.rows = torch.cat([self.rows, new])

    def restrict(self, mats: list[Tensor], rows: Tensor) -> list[Tensor]:
        r = len(self.rows)
        out = []
        for m, f in zip(mats, self.factors, strict=True):
            w = torch.linalg.solve_triangular(f[:r, :r], m[self.rows[:, None], rows], upper=False)
            out.append(m[rows[:, None], rows] - w.T @ w)
        return out

    def apply(self, mats: list[Tensor]) -> None:
        r = len(self.rows)
        for m, f in zip(mats, self.factors, strict=True):
            w = torch.linalg.solve_triangular(f[:r, :r], m[self.rows], upper=False)  # (|R|, D)
            m.sub_(w.T @ w)
            m[self.rows] = 0.0
            m[:, self.rows] = 0.0


class _Block:
    """Restrictions of P and Q to K prefetched units, kept exact under their removals:
    for a symmetric M and a removed unit m, M'_KK = M_KK − M_Km M_mm⁻¹ M_mK.

    With one feature per unit (mean-pooled channels, neurons) on the CPU the work per unit is
    a few scalars and one K×K rank-1 update, where torch's per-call overhead would dominate:
    it is done on numpy views of the same memory instead [ours]."""

    def __init__(self, units: dict[int, slice], rows: Tensor, mats: list[Tensor]) -> None:
        self.units, self.rows, self.mats = units, rows, mats
        self.removed: list[int] = []
        scalar = len(rows) == len(units) and all(
            m.device.type == "cpu" and m.dtype == torch.float64 and m.is_contiguous() for m in mats
        )
        self._arrays = [m.numpy() for m in mats] if scalar else None

    def logdets(self, i: int) -> tuple[float, float]:
        """(log det P_ii, log det Q_ii) of unit i, current under the block's removals."""
        r = self.units[i]
        if self._arrays is not None:
            a_p, a_q = self._arrays
            return _log_positive(float(a_p[r.start, r.start])), _log_positive(
                float(a_q[r.start, r.start])
            )
        return logdet_spd(self.mats[0][r, r]), logdet_spd(self.mats[1][r, r])

    def remove(self, i: int) -> None:
        r = self.units[i]
        if self._arrays is None:
            for m in self.mats:
                _downdate(m, r)
        else:
            j = r.start
            for a in self._arrays:  # as _downdate for one row: M − M_·j M_j· / M_jj
                col = a[:, j].copy()
                a -= np.multiply.outer(col, col * (1.0 / col[j]))
                a[j, :] = 0.0
                a[:, j] = 0.0
        self.removed.append(i)


def _batched_logdet(a: Tensor) -> Tensor:
    """log det of a batch of SPD matrices ``(B, b, b)`` → ``(B,)``."""
    chol, info = torch.linalg.cholesky_ex(a)
    if bool((info == 0).all()):
        return 2 * chol.diagonal(dim1=1, dim2=2).log().sum(1)
    sign, value = torch.linalg.slogdet(a)
    return torch.where(sign > 0, value, torch.full_like(value, -math.inf))


class GaussianDualState(ClosedFormState):
    """:class:`GaussianState` in the sample space, for layers with more features D than
    calibration samples n (exactly the same Δ_i, I(X_S; Y) and selection, up to rounding)
    [ours].

    With Xs, Ys the centred rows over √n (``Moments.samples``; standardised target columns
    Yt), A = XsᵀXs + λ_x I and Q_XX⁻¹ = A − Σ_Sy C_yy⁻¹ Σ_yS = λ_x I + XsᵀG Xs, where
    G = I − Yt C_yy⁻¹ Ytᵀ = λ_y (Yt Ytᵀ + λ_y I)⁻¹ (push-through identity) is n×n whatever
    the number of target columns. With Z = √λ_y L⁻¹ Xs (L L ᵀ = Yt Ytᵀ + λ_y I), XsᵀG Xs = ZᵀZ,
    so both D×D inverses are "ridge + rank n", and by the Woodbury identity

        λ_x P_ii = I − X_iᵀ K_P⁻¹ X_i,   K_P = λ_x I_n + X_S X_Sᵀ,
        λ_x Q_ii = I − Z_iᵀ K_Q⁻¹ Z_i,   K_Q = λ_x I_n + Z_S Z_Sᵀ,

    (the λ_x factors cancel in Δ_i), and I(X_S; Y) = ½ log det K_P − ½ log det K_Q
    (Sylvester). Removing units R is K ← K − X_R X_Rᵀ, i.e. K⁻¹ ← K⁻¹ + V M_RR⁻¹ Vᵀ with
    V = K⁻¹X_R and M_RR = I − X_RᵀV. Z is never formed: Z_iᵀ K_Q⁻¹ Z_i = X_iᵀ N X_i with
    N = λ_y L⁻ᵀ K_Q⁻¹ L⁻¹ = λ_y (λ_x L Lᵀ + λ_y Xs Xsᵀ)⁻¹ for the starting S (as
    K_Q = λ_x I + λ_y L⁻¹ (Xs Xsᵀ) L⁻ᵀ), and a
    removal updates N exactly as it updates K_P⁻¹, with X_R for Z_R (V = N X_R). So both
    halves read the same columns of Xs, and new target columns cost O(n²·q + n³) whatever
    D (the MI ordering, :meth:`single_scores`, still forms Z once). A start costs
    O(n²·(D + q) + n³), a selection pass O(n²·D) (every unit's block read once, its removal
    applied once), against O(D³) for the D×D form: :meth:`GaussianEstimator.start` picks
    this state when the moments carry their rows (layers wider than :data:`DUAL_FACTOR` × n).
    Threshold and target modes only: with fewer samples than features there is no test
    (``pvalues`` gives NaN, which confidence mode refuses by name).
    """

    def __init__(self, moments: Moments, columns: Tensor | None, *, ridge: float) -> None:
        if moments.samples is None:
            raise ValueError("GaussianDualState needs moments with their rows (samples)")
        if not ridge > 0:
            raise ValueError(f"GaussianDualState needs a ridge > 0, got {ridge}")
        xs, ys = moments.samples
        n = xs.shape[0]
        self.n_units, self._b, self._n = moments.n_units, moments.unit_size, moments.n
        self.columns = moments.kept_columns(columns)
        self._q = int(self.columns.numel())
        self._slots = UnitSlots(moments.n_units, moments.unit_size)
        self._const_units = moments.const_units
        self._live = ~moments.const_x
        self.heldout = None
        self.ridge_y = ridge
        # the diagonal of Σ_xx = XsᵀXs without forming it
        self.ridge_x = ridge * variance_scale((xs * xs).sum(0), moments.const_x)
        self._x = xs  # (n, D), read only: forks share it
        self._gram = xs @ xs.T  # Xs Xsᵀ of the starting S, read only: forks share it
        eye = torch.eye(n, dtype=torch.float64)
        kp_inv, logdet_inv = _inverse_logdet(
            self._gram + self.ridge_x * eye, what="ridged sample Gram of the features"
        )
        self._kinv: list[Tensor] = [kp_inv]
        self._logdet_kp = -logdet_inv  # log det K_P of the starting S: the target-free half
        self._set_target(moments, ys)
        self._block: _Block | None = None
        self._v: list[Tensor] | None = None  # K_P⁻¹ X_B, N X_B of the current block
        self._inner: list[Tensor] | None = None  # its I − X_BᵀV before any removal

    def _set_target(self, moments: Moments, ys: Tensor) -> None:
        """N = λ_y L⁻ᵀ K_Q⁻¹ L⁻¹ and I(X_S; Y) for the target columns ``self.columns`` (all
        units in S), from the n×n Gram alone: O(n²·q + n³)."""
        n = self._x.shape[0]
        eye = torch.eye(n, dtype=torch.float64)
        if not self._q:  # no target: Z = Xs, N = K_P⁻¹ (and every Δ_i is 0)
            self._chol_y = None
            self._kinv = [self._kinv[0], self._kinv[0].clone()]
            self._info = 0.0
            return
        yt = ys[:, self.columns] / moments.target_variances[self.columns].sqrt()
        c_yy = yt @ yt.T + self.ridge_y * eye  # L Lᵀ
        chol = cholesky_or_raise(c_yy, what="ridged target Gram")
        self._chol_y = chol  # for single_scores' Z
        # L K_Q Lᵀ = λ_x L Lᵀ + λ_y Xs Xsᵀ =: M, so N = λ_y M⁻¹ and
        # log det K_Q = log det M − log det L Lᵀ: one n×n inverse, no triangular solves
        m = self.ridge_x * c_yy + self.ridge_y * self._gram
        m_inv, logdet_m_inv = _inverse_logdet(
            (m + m.T) / 2, what="ridged sample Gram of the features"
        )
        self._kinv = [self._kinv[0], self.ridge_y * m_inv]
        logdet_c = 2.0 * float(chol.diagonal().log().sum())
        self._info = 0.5 * (self._logdet_kp + logdet_m_inv + logdet_c)

    @property
    def prefetch_units(self) -> int:
        """Units per prefetched block (read by :func:`~mipp.methods.selection.terc`): about
        :data:`BLOCK_COLUMNS` feature columns, at most 64 units. A block's own products,
        X_KᵀV and each removal's downdate, grow with its width, the n×n reads do not."""
        return min(64, max(8, BLOCK_COLUMNS // self._b))

    def information(self) -> float:
        """I(X_S; Y) in nats (see :meth:`GaussianState.information`)."""
        if self._q == 0:
            return 0.0
        return max(self._info, 0.0)

    def single_scores(self) -> Tensor:
        """float64 ``(U,)``: I(X_i; Y) of each unit alone,
        ½ log det(λI + X_iᵀX_i) − ½ log det(λI + Z_iᵀZ_i); 0 for constant units. The one
        place Z = √λ_y L⁻¹ Xs is formed (one triangular solve, O(n²·D))."""
        if self._q == 0:
            return torch.zeros(self.n_units, dtype=torch.float64)
        n, u, b = self._x.shape[0], self.n_units, self._b
        ridge = self.ridge_x * torch.eye(b, dtype=torch.float64)
        z = math.sqrt(self.ridge_y) * torch.linalg.solve_triangular(
            self._chol_y, self._x, upper=False
        )
        grams = [
            torch.einsum("nub,nuc->ubc", m.view(n, u, b), m.view(n, u, b)) + ridge
            for m in (self._x, z)
        ]
        scores = 0.5 * (_batched_logdet(grams[0]) - _batched_logdet(grams[1]))
        return torch.where(self._const_units, 0.0, scores.clamp_min(0.0))

    def _cols(self, units: list[int]) -> Tensor:
        return torch.cat([torch.arange(u * self._b, (u + 1) * self._b) for u in units])

    def _restricted(self, cols: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """``([λP_KK, λQ_KK], [K_P⁻¹X_K, N X_K])`` for feature columns K of kept units."""
        eye = torch.eye(len(cols), dtype=torch.float64)
        x_k = self._x[:, cols]
        mats, vs = [], []
        for k_inv in self._kinv:
            v = k_inv @ x_k
            inner = eye - x_k.T @ v
            mats.append((inner + inner.T) / 2)
            vs.append(v)
        return mats, vs

    def prefetch(self, units: list[int]) -> None:
        """Read the announced units' blocks at once (one n×n by n×|K| product per matrix);
        their removals stay exact in the block and reach K⁻¹ as one update when it ends."""
        self._commit()
        units = [int(u) for u in units if self._slots.is_active(int(u))]
        if len(units) < 2:
            return
        cols = self._cols(units)
        mats, self._v = self._restricted(cols)
        self._inner = [m.clone() for m in mats]  # the block's removals change ``mats``
        self._block = _Block(
            units={u: slice(j * self._b, (j + 1) * self._b) for j, u in enumerate(units)},
            rows=cols,
            mats=mats,
        )

    def _commit(self) -> None:
        """End the current block: apply its removed units R to K_P⁻¹ and N (Woodbury,
        with the block's V = K⁻¹X_R and I − X_RᵀV from before its removals)."""
        blk, vs = self._block, self._v
        self._block, self._v = None, None
        if blk is None or not blk.removed:
            return
        local = torch.cat(
            [torch.arange(blk.units[u].start, blk.units[u].stop) for u in blk.removed]
        )
        inners = [m[local[:, None], local] for m in self._inner]
        self._woodbury(blk.rows[local], [v[:, local] for v in vs], inners)

    def _woodbury(self, cols: Tensor, vs: list[Tensor], inners: list[Tensor] | None = None) -> None:
        """K_P⁻¹ ← K_P⁻¹ + V (I − X_RᵀV)⁻¹ Vᵀ for removed feature columns R, V = K_P⁻¹X_R,
        and N likewise (V = N X_R); ``inners``: the I − X_RᵀV already read (a block's)."""
        eye = torch.eye(len(cols), dtype=torch.float64)
        x_r = self._x[:, cols] if inners is None else None
        for j, v in enumerate(vs):
            inner = eye - x_r.T @ v if inners is None else inners[j]
            chol = cholesky_or_raise((inner + inner.T) / 2, what="kept-set Schur complement")
            w = torch.linalg.solve_triangular(chol, v.T, upper=False)  # (|R|, n)
            self._kinv[j] = torch.addmm(self._kinv[j], w.T, w)

    def _logdets(self, i: int) -> tuple[float, float]:
        """(log det λP_ii, log det λQ_ii) of unit i: from the block when prefetched, else
        read alone (which ends the block)."""
        blk = self._block
        if blk is not None and i in blk.units:
            return blk.logdets(i)
        self._commit()
        mats, _ = self._restricted(self._cols([i]))
        return logdet_spd(mats[0]), logdet_spd(mats[1])

    def delta(self, i: int) -> Delta:
        """Δ_i in nats (as :meth:`GaussianState.delta`); the p-value is NaN (no test here)."""
        i = self._slots.check(i)
        if self._q == 0 or self._const_units[i]:
            return Delta(value=0.0, relative=0.0, pvalue=1.0)
        value, relative = _logdet_delta(*self._logdets(i), self.information())
        return Delta(value=value, relative=relative, pvalue=math.nan)

    def remove(self, i: int) -> None:
        """S ← S ∖ {i}: exact in the current block, applied to K⁻¹ when the block ends (or at
        once for a unit outside it)."""
        i = self._slots.check(i)
        blk = self._block
        inside = blk is not None and i in blk.units
        if not inside:
            self._commit()
            cols = self._cols([i])
            (p_ii, q_ii), vs = self._restricted(cols)
        if not self._const_units[i] and self._q:
            logdet_p, logdet_q = blk.logdets(i) if inside else (logdet_spd(p_ii), logdet_spd(q_ii))
            self._info -= 0.5 * (logdet_q - logdet_p)  # the chain rule
        if inside:
            blk.remove(i)
        else:
            self._woodbury(cols, vs, [p_ii, q_ii])
        self._slots.remove(i)

    def fork(self) -> GaussianDualState:
        """An independent copy: K_P⁻¹ and N copied (O(n²)), the rows shared (read only)."""
        self._commit()
        other = copy.copy(self)
        other._kinv = [k.clone() for k in self._kinv]
        other._slots = copy.deepcopy(self._slots)
        return other

    def retarget_saves(self, moments: Moments, columns: Tensor | None) -> bool:
        """True for a starting state: :meth:`retargeted` rebuilds only the target half."""
        return self._untouched()

    def retargeted(self, moments: Moments, columns: Tensor | None) -> GaussianDualState:
        """A starting state for other target columns: K_P⁻¹ (which does not depend on the
        target) is shared, N is rebuilt from the n×n Gram, O(n²·q + n³)."""
        self._check_start("retarget")
        other = copy.copy(self)
        other._block, other._v = None, None
        other._slots = copy.deepcopy(self._slots)
        other._kinv = [self._kinv[0].clone()]
        other.columns = moments.kept_columns(columns)
        other._q = int(other.columns.numel())
        other._set_target(moments, moments.samples[1])
        return other


GaussianEstimator.state_class = GaussianState
GaussianState.heldout_class = HeldOutTest
