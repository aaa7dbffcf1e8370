"""The K-fold held-out test of Δ_i for confidence mode, in closed form [ours].

docs/METHOD.md §3, "Held-out test for confidence mode". The paper keeps unit i when the rise
in *held-out* loss without it is significant over 5 repeats. In-sample tests (the F-test of
``linear``, the χ² test of ``gaussian``) call almost every Δ_i significant when the target is
(nearly) a deterministic function of the layer — as the next layer is — because the residual
they divide by is tiny. This module replaces them by the paper's held-out comparison, done on
moments (:class:`~mipp.estimators.moments.FoldMoments`, row r in fold r mod K) instead of
re-fitting anything.

**Fit and loss.** For fold k the predictor is the ridge regression ``LinearEstimator`` would
fit on the other K − 1 folds' rows alone: centred on their means μ_t (features) and ν_t
(target), with ridge λ_k = ``ridge`` × (mean variance of the features that are not constant
on those rows); features constant on those rows get weight 0. The target columns are scaled
by their full-data standard deviations σ (the in-sample state's standardisation, so every
fold's loss is a share of the same variance; the fit itself does not depend on the column
scales). With P = (Σ_t + λ_k I)⁻¹ and B = P Σ_t,xy (D × q) the held-out loss on fold k is

    L_k(S) = E_k ‖ (y − ν_t)/σ − B_Sᵀ (x_S − μ_t) ‖² / q
           = ( h − 2⟨B, G⟩ + ⟨B, M B⟩ ) / q,

from fold k's own moments and the shift δx = μ_k − μ_t, δy = (ν_k − ν_t)/σ of its means:
M = Σ_k + δx δxᵀ, G = Σ_k,xy / σ + δx δyᵀ, h = Σ_j Var_k(y_j)/σ_j² + ‖δy‖².

**Removing unit i** is the Schur-complement downdate P ← P − P_·i P_ii⁻¹ P_i·,
B ← B − P_·i c with c = P_ii⁻¹ B_i (the rows of i then vanish). With V = P (G − M B) and
Z = P M P kept up to date alongside P and B, the held-out loss change is

    Δ_i,k = L_k(S∖i) − L_k(S) = ( 2⟨c, V_i⟩ + ⟨c, Z_ii c⟩ ) / q,

O(b²·q) per fold from the cached rows. Removing a set R of rows updates, with W = P_RR⁻¹,
C = W B_R and a = P_·R W:

    V ← V + Z_·R C − a (V_R + Z_RR C)        Z ← Z − Z_·R aᵀ − a (Z_·R − a Z_RR)ᵀ,

so announced units (:meth:`HeldOutTest.prefetch`) are served from small block caches and their
removals reach the K full D × D matrices as one block update, as in ``linear``.

**The ridge's own effect on duplicates.** Two exact copies of a unit share its weight, so
together they pay half the penalty one copy pays: the ridge shrinks that direction less and
the pair predicts *slightly better* than one copy, held-out as well as in-sample, by
≈ ¾ λ² w²/s (w the weight, s the unit's variance) — a positive O(λ²) effect that is the same
in every fold of noise-free data, so a t-test over the folds would call it significant. It is
not information in X_i: it is the penalty redistributing. We therefore test the held-out gain
against the rise of the penalty that removing i forces on the remaining weights,

    m_i,k = λ_k ( ‖B_{S∖i}‖² − ‖B_S‖² ) / q,

(the ridge's price for the weights taking over unit i's role; for an exact copy
≈ λ w²/2 ≫ ¾ λ² w²/s once s > 1.5 λ, for m copies the ratio is at most 3λ/2s), and keep unit i
iff a one-sided one-sample t-test over d_k = Δ_i,k − m_i,k (K − 1 degrees of freedom) rejects
H0: E[d] ≤ 0 at the given confidence. For a unit that carries information the margin is
λ times a change of squared weights — negligible next to its Δ unless its variance is near
λ; a unit whose variance is ≲ λ cannot be resolved by the ridge in any case (its duplicate
and its own information look alike to it). For units the target ignores, the margin is
≈ −λ‖B_i‖²/q, O(λ/n), and the held-out Δ is negative on average (fitting noise costs
held-out loss), so the test is conservative for them. Mean effects below 1e-12 of the
target's variance are treated as exactly 0 (float64 resolution of the losses).
"""

from __future__ import annotations

import math

import scipy.special
import torch
from torch import Tensor

from mipp.estimators.moments import Moments, UnitSlots, ridge_scale, ridged, spd_inverse

__all__ = ["HeldOutTest", "one_sided_t_pvalue"]

#: mean held-out effects at or below this share of the target's variance count as exactly 0
RESOLUTION = 1e-12


def one_sided_t_pvalue(d: Tensor) -> float:
    """p-value of the one-sample t-test of H0: E[d] ≤ 0 against E[d] > 0, K − 1 degrees of
    freedom, from the K values ``d`` ``(K,)``.

    t = mean(d) / (sd(d) / √K), p = P(T_{K−1} ≥ t). A mean within :data:`RESOLUTION` of 0
    gives 1; identical values (sd = 0) give 0 when their mean is positive, else 1.

    >>> round(one_sided_t_pvalue(torch.tensor([1.0, 2.0, 3.0, 2.0, 2.0])), 4)  # t = 6.32, 4 dof
    0.0016
    """
    k = int(d.numel())
    mean = float(d.double().mean())
    if not mean > RESOLUTION:
        return 1.0
    sd = float(d.double().std(correction=1))
    if not sd > 0.0:
        return 0.0
    t = mean / (sd / math.sqrt(k))
    return float(scipy.special.stdtr(k - 1, -t))


def _spd_inv(a: Tensor) -> Tensor:
    """Inverses of a batch of small SPD matrices ``(K, r, r)`` (a division when r = 1)."""
    if a.shape[-1] == 1:
        return 1.0 / a
    return torch.linalg.inv(a)


def _solve(a: Tensor, b: Tensor) -> Tensor:
    """a⁻¹ b for a batch of small SPD ``a`` ``(K, r, r)`` and ``b`` ``(K, r, q)``."""
    if a.shape[-1] == 1:
        return b / a
    return torch.linalg.solve(a, b)


class HeldOutTest:
    """Held-out K-fold test of Δ_i for a kept set S (see the module docstring).

    Args:
        moments: full-data moments carrying K folds (``moments.folds``), each of >= 2 rows.
        columns: LongTensor ``(q,)`` of the target columns to predict, none of them constant
            (a state's ``columns``).
        ridge: the relative ridge of the estimator (λ_k = ``ridge`` × mean live feature
            variance of fold k's training rows).

    Memory: four ``(K, D, D)``-sized float64 arrays' worth (P and Z per fold, plus setup
    temporaries). Setup is O(K·D³); each test O(K·(D·b·q + b²·q)) (O(K·b²·q) when the unit was
    announced by :meth:`prefetch`); each removal O(K·D²·b), batched over announced units.

    Attributes:
        folds: K. n_units: U.
        ridges: float64 ``(K,)``, the absolute ridge λ_k of each fold's fit.
    """

    def __init__(self, moments: Moments, columns: Tensor, *, ridge: float) -> None:
        folds = moments.folds
        if folds is None:
            raise ValueError(
                "the held-out test needs moments with folds (Moments.folds); prepare them "
                "with folds=K or MomentAccumulator(folds=K)"
            )
        if int(folds.n.min()) < 2:
            raise ValueError(
                f"every fold needs at least 2 rows, got {folds.n.tolist()} "
                f"(use at least {2 * folds.count} samples)"
            )
        self.folds = folds.count
        self.n_units, self._b = moments.n_units, moments.unit_size
        cols = torch.as_tensor(columns).long()
        self._q = q = int(cols.numel())
        if q == 0:
            raise ValueError("the held-out test needs at least one target column, got 0")
        std = moments.syy.diagonal()[cols].sqrt()
        if not bool((std > 0).all()):
            raise ValueError("target columns must not be constant (drop them first)")
        const_all = moments.const_x
        ps, bms, vs, zs, lams, losses = [], [], [], [], [], []
        for k in range(self.folds):
            others = [j for j in range(self.folds) if j != k]
            n_t, mean_xt, mean_yt, cxx_t, cxy_t, _ = folds.merged(others)
            lo, hi = folds.extremes(others)
            const_t = const_all | (lo == hi)
            sxx = cxx_t / n_t
            sxx[const_t] = 0.0
            sxx[:, const_t] = 0.0
            sxx = (sxx + sxx.T) / 2
            sxy = cxy_t[:, cols] / n_t / std
            sxy[const_t] = 0.0
            lam = ridge * ridge_scale(sxx, const_t)
            p = spd_inverse(
                ridged(sxx, const_t, lam),
                what=f"ridged feature covariance of the training folds (fold {k} held out)",
            )
            bm = p @ sxy  # (D, q)
            n_h = int(folds.n[k])
            dx = folds.mean_x[k] - mean_xt
            dx[const_all] = 0.0
            dy = (folds.mean_y[k] - mean_yt)[cols] / std
            m = folds.cxx[k] / n_h + torch.outer(dx, dx)  # E_k (x − μ_t)(x − μ_t)ᵀ
            g = folds.cxy[k][:, cols] / n_h / std + torch.outer(dx, dy)
            h = float((folds.cyy[k][cols] / n_h / std**2).sum() + (dy**2).sum())
            mb = m @ bm
            losses.append((h - 2 * float((bm * g).sum()) + float((bm * mb).sum())) / q)
            vs.append(p @ (g - mb))
            z = p @ m @ p
            zs.append((z + z.T) / 2)
            ps.append(p)
            bms.append(bm)
            lams.append(lam)
        self._p = torch.stack(ps)  # (K, D, D)
        self._bm = torch.stack(bms)  # (K, D, q)
        self._v = torch.stack(vs)  # (K, D, q): P (G − M B)
        self._z = torch.stack(zs)  # (K, D, D): P M P
        self.ridges = torch.tensor(lams, dtype=torch.float64)
        self._b_norm = (self._bm**2).sum((1, 2))  # ‖B‖² per fold
        self._loss = torch.tensor(losses, dtype=torch.float64)
        self._slots = UnitSlots(self.n_units, 1)  # which units are still in S
        self._block: _FoldBlock | None = None

    # ------------------------------------------------------------------------------ queries

    def losses(self) -> Tensor:
        """float64 ``(K,)``: held-out loss L_k(S) of the current S on each fold (share of the
        target's variance; 1 ≈ the training mean's loss)."""
        return self._loss.clone()

    def fold_terms(self, i: int) -> tuple[Tensor, Tensor]:
        """``(Δ_i,k, m_i,k)``, float64 ``(K,)`` each: the held-out loss change when unit i
        leaves S and the ridge-penalty margin it is tested against (module docstring)."""
        i = self._check(i)
        p_ii, b_i, v_i, z_ii, pb_i, pp_ii = self._rows(i)
        c = _solve(p_ii, b_i)  # (K, b, q)
        delta = (2 * (c * v_i).sum((1, 2)) + (c * (z_ii @ c)).sum((1, 2))) / self._q
        cross = pb_i - p_ii @ b_i  # P_ir B_r
        gram = pp_ii - p_ii @ p_ii  # P_ir P_ri
        rise = (
            -(b_i**2).sum((1, 2)) - 2 * (c * cross).sum((1, 2)) + (c * (gram @ c)).sum((1, 2))
        )  # ‖B_{S∖i}‖² − ‖B_S‖²
        return delta, self.ridges * rise / self._q

    def pvalue(self, i: int) -> float:
        """One-sided p-value of H0: unit i adds nothing held-out beyond the ridge's margin,
        the t-test over d_k = Δ_i,k − m_i,k (:func:`one_sided_t_pvalue`)."""
        delta, margin = self.fold_terms(i)
        return one_sided_t_pvalue(delta - margin)

    # ------------------------------------------------------------------------------ updates

    def remove(self, i: int) -> None:
        """S ← S ∖ {i} in every fold (deferred within a prefetched block)."""
        i = self._check(i)
        blk = self._block
        if blk is not None and i not in blk.units:
            self._flush()
            blk = None
        p_ii, b_i, v_i, z_ii, pb_i, pp_ii = self._rows(i)
        c = _solve(p_ii, b_i)
        self._loss += (2 * (c * v_i).sum((1, 2)) + (c * (z_ii @ c)).sum((1, 2))) / self._q
        self._b_norm += (c * (pp_ii @ c)).sum((1, 2)) - 2 * (c * pb_i).sum((1, 2))
        if blk is not None:
            blk.remove(i)
        else:
            self._apply(torch.arange(i * self._b, (i + 1) * self._b))
        self._slots.remove(i)

    def prefetch(self, units: list[int]) -> None:
        """Announce the next units to test: their rows of P, B, V, Z (and P B, P P) are cached
        per fold and kept exact under removals among them; the removals reach the full
        matrices together when a unit outside the block is queried."""
        self._flush()
        units = [int(u) for u in units if self._slots.is_active(int(u))]
        if len(units) < 2:
            return
        b = self._b
        rows = torch.cat([torch.arange(u * b, (u + 1) * b) for u in units])
        p_k = self._p[:, rows]  # (K, nb, D)
        self._block = _FoldBlock(
            units={u: slice(j * b, (j + 1) * b) for j, u in enumerate(units)},
            rows=rows,
            p=p_k[:, :, rows].clone(),
            bm=self._bm[:, rows].clone(),
            v=self._v[:, rows].clone(),
            z=self._z[:, rows][:, :, rows].clone(),
            pb=p_k @ self._bm,
            pp=p_k @ p_k.mT,
        )

    # ------------------------------------------------------------------------------ internals

    def _check(self, i: int) -> int:
        return self._slots.check(i)

    def _rows(self, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Unit i's ``(P_ii, B_i, V_i, Z_ii, P_i· B, P_i· P_·i)`` per fold, batched over K."""
        blk = self._block
        if blk is not None and i in blk.units:
            r = blk.units[i]
            return (
                blk.p[:, r, r],
                blk.bm[:, r],
                blk.v[:, r],
                blk.z[:, r, r],
                blk.pb[:, r],
                (blk.pp[:, r, r]),
            )
        if blk is not None:
            self._flush()
        r = slice(i * self._b, (i + 1) * self._b)
        p_i = self._p[:, r]  # (K, b, D)
        return (
            p_i[:, :, r],
            self._bm[:, r],
            self._v[:, r],
            self._z[:, r, r],
            p_i @ self._bm,
            (p_i @ p_i.mT),
        )

    def _apply(self, rows: Tensor) -> None:
        """Remove the feature rows ``rows`` from every fold's P, B, V, Z at once (module
        docstring), in place; their rows and columns become exactly 0."""
        u = self._p[:, :, rows].clone()  # P_·R, (K, D, r)
        w = _spd_inv(u[:, rows])  # P_RR⁻¹
        c = w @ self._bm[:, rows]  # (K, r, q)
        a = u @ w
        z_r = self._z[:, :, rows].clone()
        z_rr = z_r[:, rows]
        self._v += z_r @ c - a @ (self._v[:, rows] + z_rr @ c)
        self._z -= z_r @ a.mT + a @ (z_r - a @ z_rr).mT
        self._bm -= u @ c
        self._p -= a @ u.mT
        for mat in (self._p, self._z):
            mat[:, rows] = 0.0
            mat[:, :, rows] = 0.0
        self._bm[:, rows] = 0.0
        self._v[:, rows] = 0.0

    def _flush(self) -> None:
        blk, self._block = self._block, None
        if blk is None or not blk.removed:
            return
        self._apply(torch.cat([blk.rows[blk.units[u]] for u in blk.removed]))


class _FoldBlock:
    """Per-fold caches of P, B, V, Z, P B and P P restricted to the prefetched rows K, kept
    exact under removals of units m among them (W = P_mm⁻¹, c = W B_m, a = P_Km W):

    P_KK −= a P_mK, B_K −= P_Km c, V_K += Z_Km c − a (V_m + Z_mm c),
    Z_KK −= Z_Km aᵀ + a (Z_Km − a Z_mm)ᵀ (P P likewise),
    (P B)_K −= (P P)_Km c + a ((P B)_m − (P P)_mm c).
    """

    def __init__(
        self,
        units: dict[int, slice],
        rows: Tensor,
        p: Tensor,
        bm: Tensor,
        v: Tensor,
        z: Tensor,
        pb: Tensor,
        pp: Tensor,
    ) -> None:
        self.units, self.rows = units, rows
        self.p, self.bm, self.v, self.z, self.pb, self.pp = p, bm, v, z, pb, pp
        self.removed: list[int] = []

    def remove(self, i: int) -> None:
        r = self.units[i]
        p_km = self.p[:, :, r].clone()  # (K, nb, b)
        w = _spd_inv(p_km[:, r])
        a = p_km @ w
        c = w @ self.bm[:, r]
        z_km, pp_km = self.z[:, :, r].clone(), self.pp[:, :, r].clone()
        z_mm, pp_mm = z_km[:, r], pp_km[:, r]
        self.v += z_km @ c - a @ (self.v[:, r] + z_mm @ c)
        self.pb -= pp_km @ c + a @ (self.pb[:, r] - pp_mm @ c)
        self.z -= z_km @ a.mT + a @ (z_km - a @ z_mm).mT
        self.pp -= pp_km @ a.mT + a @ (pp_km - a @ pp_mm).mT
        self.bm -= p_km @ c
        self.p -= a @ p_km.mT
        for mat in (self.p, self.z, self.pp):
            mat[:, r] = 0.0
            mat[:, :, r] = 0.0
        for mat in (self.bm, self.v, self.pb):
            mat[:, r] = 0.0
        self.removed.append(i)
