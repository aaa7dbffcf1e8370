"""``ksg``: nonparametric (conditional) mutual information from k nearest neighbours, in nats.

docs/METHOD.md §3, "Nonparametric". For a candidate unit i of the kept set S there are three
blocks of coordinates: X_i (unit i's b features), Z = X_{S∖i} (every feature of the other kept
units) and Y (the target columns). The distance between samples j and m is the maximum over
the blocks of a Euclidean distance inside each block,

    d(j, m) = max( ‖x_i^j − x_i^m‖ / √d_X,  ‖z^j − z^m‖ / √d_Z,  ‖y^j − y^m‖ / √d_Y ),

with d_B the number of non-constant coordinates of block B (``block_norm="rms"``, the
default; ``"euclidean"`` drops the √d_B). ε_j is the distance from j to its k-th nearest
neighbour (j itself excluded) and n_XZ(j), n_YZ(j), n_Z(j) count the samples m ≠ j strictly
closer than ε_j in the marginal spaces (X_i, Z), (Y, Z) and Z (the maximum of those blocks'
distances). Frenzel & Pompe (2007):

    Δ_i = I(X_i; Y | Z) ≈ ψ(k) − ⟨ψ(n_XZ + 1) + ψ(n_YZ + 1) − ψ(n_Z + 1)⟩_j        (nats).

With no Z (unit i alone, or the last non-constant unit of S) this is Kraskov, Stögbauer &
Grassberger (2004), algorithm 1 (n_Z = n − 1 for every j):

    I(X; Y) ≈ ψ(k) + ψ(n) − ⟨ψ(n_X + 1) + ψ(n_Y + 1)⟩_j,

which also gives the single scores s_i = I(X_i; Y) and I(X_S; Y) (X_S one block).

Block norm [ours]. Inside a maximum over blocks, the Euclidean distance of a block with many
coordinates (∝ √d) dominates every maximum: with Z = 83 units of a LeNet-5 layer and 256
samples all counts equal k − 1 and Δ_i = 0 exactly for every unit (measured). Dividing each
block's distance by √d_B (root mean square over its coordinates) balances the blocks. It is a
fixed rescaling of each of X_i, Z, Y, which leaves MI and CMI unchanged, so the estimator
stays consistent. On Gaussian tests the two agree for 1-D blocks and ``"rms"`` is less biased
for 2-D ones (CMI 0.37 nats, n = 2000: errors −0.07 … −0.04 against −0.14 … −0.12). The
price: a unit that is a function of the other kept units has no joint density with them, and
under ``"rms"`` its Δ can come out small but "significant" in wide layers (an exact duplicate
in the 13-unit planted layer of :mod:`mipp.testing.estimators`: 0.04–0.11 nats, n =
1000–4000; 0 in a 4-unit layer), while ``"euclidean"`` gives a one-feature copy exactly 0.

The cache. Squared Euclidean distances add over features, so the kept set's squared distance
matrix is a sum over units, D²_S = Σ_{u∈S} D²_u (n × n). A state keeps D²_S and D²_Y; for a
candidate i it computes only D²_i, O(n²·b), and D²_Z = max(D²_S − D²_i, 0): each Δ_i costs
O(n²·(b + 1)) instead of a fresh O(n²·D). ``remove(i)`` is the update D²_S ← D²_S − D²_i.
All comparisons are made on (weighted) squared distances, a monotone map. Distances are
brute-force matrix products, |a|² + |b|² − 2a·b clamped at 0, in float64, on the device of
the data, ``chunk_rows`` rows at a time so that temporaries stay a few chunk_rows × n.
What depends only on the data and the target columns is cached in the prepared
:class:`KSGData`, because target-mode pruning starts a fresh state on the same data for every
bisection pass: D²_X of all units (one n × n matrix), and for the last two column sets D²_Y
(n × n), the single scores and I(X; Y). A state copies D²_X before changing it. Memory: about
four n × n float64 matrices per layer (128 MiB each at n = 4096).

Jitter [ours]. KSG assumes continuous data; ReLU activations tie at exactly 0, and tied
samples give ε_j = 0 and ambiguous counts. ``prepare`` adds Gaussian noise of standard
deviation ``jitter`` (default 1e-6, in standardised units) to every non-constant feature and
target column, from a ``torch.Generator`` seeded by ``seed``. The matrix-product distances
carry an absolute rounding error of about 1e-16·(|a|² + |b|²) ≈ 1e-16·d in D² (d unit-variance
coordinates), while two tied samples end up ≈ 2e-12·d apart in D² after jitter: ties are
broken by the noise, never by rounding, and typical neighbour distances (≥ 1e-2) are
untouched. Constant features stay exactly 0, so a dead unit adds nothing to D²_S.

Test [ours]. The p-value is a one-sided one-sample t-test (``scipy.stats.ttest_1samp``) that
the mean of the per-sample terms φ_j = ψ(k) − ψ(n_XZ + 1) − ψ(n_YZ + 1) + ψ(n_Z + 1) is > 0.
It is approximate: the φ_j share neighbours and are not independent, which the t-test
ignores (its standard error is too small); under independence we measured about the nominal
rate of small p-values (4 of 60 below 0.05 at n = 1000, 3 units, 2 target columns).

Features and target columns are standardised (zero mean, unit variance) in ``prepare``, so
inside a block every coordinate counts equally. KSG is consistent, not unbiased; its bias
grows with the dimension (it underestimates): trust rankings, not absolute values, above ~20
dimensions.
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.special
import scipy.stats
import torch
from torch import Tensor

from mipp.estimators.base import Delta, Estimator, EstimatorState, check_columns, check_pair
from mipp.estimators.moments import UnitSlots

__all__ = ["DEFAULT_K", "KSGData", "KSGEstimator", "KSGState"]

#: default number of neighbours; ``required_samples`` uses it (n must exceed k + 1)
DEFAULT_K = 4
BlockNorm = Literal["rms", "euclidean"]
_BLOCK_NORMS = ("rms", "euclidean")
_TARGETS_KEPT = 2  # column sets whose D²_Y, scores and I(X; Y) a KSGData keeps


@dataclass
class _Target:
    """Cached for one target column set: D²_Y, and single scores and I(X_all; Y) per
    estimator setting (k, block norm)."""

    d2y: Tensor
    scores: dict[tuple[int, str], Tensor] = field(default_factory=dict)
    info: dict[tuple[int, str], float] = field(default_factory=dict)


@dataclass(eq=False)
class KSGData:
    """What :meth:`KSGEstimator.prepare` keeps: the standardised, jittered data and caches.

    Attributes:
        x: float64 ``(n, U, b)`` on the input's device; each feature standardised (zero mean,
            unit variance) plus noise of std ``jitter``; constant features exactly 0.
        y: float64 ``(n, Q)``, the target columns treated the same way.
        unit_dims: int64 ``(U,)`` (CPU), non-constant features of each unit (0: dead unit).
        const_y: bool ``(Q,)`` (CPU), constant target columns (dropped by ``start``).
        jitter, seed: the noise's scale and seed.

    The distance caches (D²_X of all units; D²_Y, single scores and I(X; Y) per target column
    set, the last two sets) are filled by the states on first use.
    """

    x: Tensor
    y: Tensor
    unit_dims: Tensor
    const_y: Tensor
    jitter: float
    seed: int
    _d2x: Tensor | None = field(default=None, init=False, repr=False)
    _targets: OrderedDict[tuple[int, ...], _Target] = field(
        default_factory=OrderedDict, init=False, repr=False
    )

    @property
    def const_units(self) -> Tensor:
        """bool ``(U,)``: units whose every feature is constant."""
        return self.unit_dims == 0

    def d2x(self, chunk_rows: int) -> Tensor:
        """``(n, n)`` squared Euclidean distances over all features of all units (cached)."""
        if self._d2x is None:
            n = self.x.shape[0]
            self._d2x = _pairwise_sq(self.x.reshape(n, -1), chunk_rows)
        return self._d2x

    def target(self, columns: Tensor, chunk_rows: int) -> _Target:
        """The cache entry of the target columns ``columns`` (computing D²_Y on a miss)."""
        key = tuple(columns.tolist())
        entry = self._targets.get(key)
        if entry is None:
            entry = _Target(d2y=_pairwise_sq(self.y[:, columns.to(self.y.device)], chunk_rows))
            self._targets[key] = entry
            while len(self._targets) > _TARGETS_KEPT:
                self._targets.popitem(last=False)
        else:
            self._targets.move_to_end(key)
        return entry


class KSGEstimator(Estimator):
    """Conditional KSG (Frenzel–Pompe) estimator of Δ_i in nats, with a t-test on its terms.

    Args:
        k: Neighbours; larger k lowers the variance and raises the bias. Integer >= 1; the
            data need more than k + 1 samples.
        jitter: Standard deviation of the noise added to the standardised data to break ties
            (ReLU zeros), >= 0; see the module docstring for why 1e-6 is enough.
        block_norm: Distance inside each block: ``"rms"`` (Euclidean / √(non-constant
            coordinates), default) or ``"euclidean"``; see the module docstring.
        chunk_rows: Rows of the n × n distance matrices processed at once (work memory about
            5 × chunk_rows × n values); integer >= 1. Results do not depend on it.
        seed: Seeds the jitter (a ``torch.Generator``; the global RNG is never used).

    >>> from mipp.zoo.data import gaussian_pair
    >>> pair = gaussian_pair(1000, dim_x=2, dim_y=1, rho=0.8, seed=0)  # x[:, 1] is noise
    >>> est = KSGEstimator()
    >>> state = est.start(est.prepare(pair.x, pair.y))
    >>> round(pair.mi, 3), abs(state.information() - pair.mi) < 0.05  # closed form, nats
    (0.511, True)
    >>> d0, d1 = state.delta(0), state.delta(1)  # I(X_0; Y | X_1) and I(X_1; Y | X_0)
    >>> abs(d0.value - pair.mi) < 0.05, d0.pvalue < 1e-6, d1.value < 0.02
    (True, True, True)
    """

    name = "ksg"

    def __init__(
        self,
        *,
        k: int = DEFAULT_K,
        jitter: float = 1e-6,
        block_norm: BlockNorm = "rms",
        chunk_rows: int = 256,
        seed: int = 0,
    ) -> None:
        for label, value in (("k", k), ("chunk_rows", chunk_rows)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
        if (
            isinstance(jitter, bool)
            or not isinstance(jitter, numbers.Real)
            or not (math.isfinite(jitter) and jitter >= 0)
        ):
            raise ValueError(f"jitter must be a finite number >= 0, got {jitter!r}")
        if block_norm not in _BLOCK_NORMS:
            raise ValueError(f"block_norm must be one of {_BLOCK_NORMS}, got {block_norm!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.k = int(k)
        self.jitter = float(jitter)
        self.block_norm: BlockNorm = block_norm
        self.chunk_rows = int(chunk_rows)
        self.seed = int(seed)

    def __repr__(self) -> str:
        return (
            f"KSGEstimator(k={self.k}, jitter={self.jitter}, block_norm={self.block_norm!r}, "
            f"chunk_rows={self.chunk_rows}, seed={self.seed})"
        )

    def min_samples(self, features: int, target_columns: int, *, test: bool = True) -> int:
        """``k + 2`` whatever the layer's size: every sample needs k neighbours."""
        return self.k + 2

    def data_device(self, model_device: torch.device) -> torch.device | None:
        """The model's device: distances are computed where the data is."""
        return model_device

    def prepare(self, x: Tensor, y: Tensor) -> KSGData:
        """Standardise and jitter ``x`` ``(n, U, b)`` / ``(n, U)`` and ``y`` ``(n, Q)``."""
        x, y = check_pair(x, y)
        self._check_samples(x.shape[0])
        gen = torch.Generator().manual_seed(self.seed)
        xs, const_x = _standardise(x.reshape(x.shape[0], -1), self.jitter, gen)
        ys, const_y = _standardise(y, self.jitter, gen)
        return KSGData(
            x=xs.view(x.shape),
            y=ys,
            unit_dims=(~const_x).view(x.shape[1], x.shape[2]).sum(dim=1).cpu(),
            const_y=const_y.cpu(),
            jitter=self.jitter,
            seed=self.seed,
        )

    def start(self, prepared: KSGData, columns: Tensor | None = None) -> KSGState:
        """A state with S = all units, for target columns ``columns`` (None = all)."""
        if not isinstance(prepared, KSGData):
            raise TypeError(f"prepared must come from prepare(), got {type(prepared).__name__}")
        self._check_samples(prepared.x.shape[0])
        return KSGState(
            prepared, columns, k=self.k, block_norm=self.block_norm, chunk_rows=self.chunk_rows
        )

    def _check_samples(self, n: int) -> None:
        if n <= self.k + 1:
            raise ValueError(
                f"KSG with k={self.k} needs more than k + 1 = {self.k + 1} samples, got {n}"
            )


class KSGState(EstimatorState):
    """Kept set S with its squared distance matrix D²_S (see :class:`KSGEstimator`).

    Attributes:
        n_units: U. columns: the target columns used (zero-variance ones dropped), LongTensor.
        k, block_norm: the estimator's settings.
    """

    def __init__(
        self,
        data: KSGData,
        columns: Tensor | None,
        *,
        k: int,
        block_norm: BlockNorm,
        chunk_rows: int,
    ) -> None:
        n, self.n_units, self._b = data.x.shape
        self._n = n
        self.k = k
        self.block_norm = block_norm
        self._key = (k, block_norm)
        self._chunk = chunk_rows
        self._data = data
        cols = check_columns(columns, data.y.shape[1])
        self.columns = cols[~data.const_y[cols]]
        self._q = int(self.columns.numel())
        self._slots = UnitSlots(self.n_units, self._b)
        self._dims = data.unit_dims.tolist()  # non-constant features per unit
        self._d_live = sum(self._dims)  # non-constant features in S
        self._info: float | None = None
        self._work: tuple[Tensor, ...] | None = None
        if self._q > 0:
            self._target = data.target(self.columns, chunk_rows)
            self._d2y = self._target.d2y
            self._d2s = data.d2x(chunk_rows).clone()  # D²_S, updated by remove()
            self._info = self._target.info.get(self._key)

    @property
    def active(self) -> Tensor:
        """bool ``(U,)``: True for units in S."""
        return self._slots.active

    def information(self) -> float:
        """I(X_S; Y) in nats (KSG algorithm 1, X_S one block), clamped at 0."""
        if self._q == 0 or self._d_live == 0:
            return 0.0
        if self._info is None:
            self._info = max(float(self._terms(None, conditional=False).mean()), 0.0)
            if self._slots.n_active == self.n_units:
                self._target.info[self._key] = self._info
        return self._info

    def single_scores(self) -> Tensor:
        """float64 ``(U,)`` (CPU): I(X_i; Y) in nats of each unit alone (KSG algorithm 1),
        clamped at 0; exactly 0 for constant units. Cached per target columns."""
        if self._q == 0:
            return torch.zeros(self.n_units, dtype=torch.float64)
        scores = self._target.scores.get(self._key)
        if scores is None:
            scores = torch.zeros(self.n_units, dtype=torch.float64)
            for u in range(self.n_units):
                if self._dims[u]:
                    scores[u] = max(float(self._terms(u, conditional=False).mean()), 0.0)
            self._target.scores[self._key] = scores
        return scores.clone()

    def delta(self, i: int) -> Delta:
        """Δ_i = I(X_i; Y | X_{S∖i}) in nats (clamped at 0) and the approximate t-test
        p-value; i must be in S. ``relative`` is Δ_i / I(X_S; Y); when I(X_S; Y) is clamped
        to 0 it is +inf for Δ_i > 0 (the unit adds information) and 0 otherwise."""
        i = self._slots.check(i)
        if self._q == 0 or self._dims[i] == 0:
            return Delta(value=0.0, relative=0.0, pvalue=1.0)
        # Z = X_{S∖i} is empty (or holds only constant features): plain KSG
        conditional = self._d_live > self._dims[i]
        phi = self._terms(i, conditional=conditional).cpu().numpy()
        value = max(float(phi.mean()), 0.0)
        info = self.information()
        # a positive Δ over I(X_S; Y) clamped to 0 is not "nothing": keep it at any threshold
        relative = value / info if info > 0 else (math.inf if value > 0 else 0.0)
        if np.ptp(phi) == 0:
            pvalue = 0.0 if phi[0] > 0 else 1.0
        else:
            pvalue = float(scipy.stats.ttest_1samp(phi, 0.0, alternative="greater").pvalue)
        return Delta(value=value, relative=relative, pvalue=pvalue)

    def remove(self, i: int) -> None:
        """S ← S ∖ {i} by the update D²_S ← D²_S − D²_i, O(n²·b)."""
        i = self._slots.check(i)
        if self._q > 0 and self._dims[i]:
            feats, sq = self._unit(i)
            buf = self._buffers()[0]
            for s in range(0, self._n, self._chunk):
                e = min(s + self._chunk, self._n)
                self._d2s[s:e] -= _sq_rows(feats, sq, s, e, out=buf[: e - s])
        self._d_live -= self._dims[i]
        self._slots.remove(i)
        self._info = None

    # --- k-NN statistics --------------------------------------------------------------------

    def _unit(self, u: int) -> tuple[Tensor, Tensor]:
        """Unit u's features ``(n, b)`` and their squared norms ``(n,)``."""
        feats = self._data.x[:, u, :]
        return feats, (feats * feats).sum(1)

    def _buffers(self) -> tuple[Tensor, ...]:
        """Four float64 ``(chunk_rows, n)`` work buffers and a bool one, made once per state:
        on the CPU, fresh large temporaries cost more (page faults) than the arithmetic."""
        if self._work is None:
            rows = min(self._chunk, self._n)
            device = self._d2s.device
            floats = tuple(
                torch.empty(rows, self._n, dtype=torch.float64, device=device) for _ in range(4)
            )
            mask = torch.empty(rows, self._n, dtype=torch.bool, device=device)
            self._work = (*floats, mask)
        return self._work

    def _terms(self, unit: int | None, *, conditional: bool) -> Tensor:
        """Per-sample terms φ_j ``(n,)`` (float64, on the data's device).

        The first block is unit ``unit``'s features (X_i) or, for ``None``, every kept
        feature (X_S, from D²_S); the second block is Y. ``conditional=False``: KSG
        algorithm 1, φ_j = ψ(k) + ψ(n) − ψ(n_X + 1) − ψ(n_Y + 1). ``conditional=True``
        (``unit`` given): Frenzel–Pompe with Z = X_{S∖i}, D²_Z = max(D²_S − D²_i, 0),
        φ_j = ψ(k) − ψ(n_XZ + 1) − ψ(n_YZ + 1) + ψ(n_Z + 1).

        Squared block distances are compared after weighting: with ``"rms"`` a block's D² is
        divided by its dimension; here everything is multiplied by one constant so that the
        block held in a shared buffer (D²_Y, or D²_S for ``unit=None``) needs no copy.
        """
        n, k, q = self._n, self.k, self._q
        rms = self.block_norm == "rms"
        buf_a, buf_z, buf_yz, buf_joint, buf_mask = self._buffers()
        w_a = w_z = w_y = 1.0  # weights on D²_X, D²_Z, D²_Y
        if unit is None:
            w_y = self._d_live / q if rms else 1.0
        else:
            feats, sq = self._unit(unit)
            if rms:
                w_a = q / self._dims[unit]
                w_z = q / (self._d_live - self._dims[unit]) if conditional else 1.0
        out = torch.empty(n, dtype=torch.float64, device=self._d2s.device)
        for s in range(0, n, self._chunk):
            e = min(s + self._chunk, n)
            m = e - s
            y = self._d2y[s:e]
            if w_y != 1.0:
                y = torch.mul(y, w_y, out=buf_yz[:m])
            # rows of D²_S (for X_S) or of D²_i, computed into a buffer
            a = self._d2s[s:e] if unit is None else _sq_rows(feats, sq, s, e, out=buf_a[:m])
            if conditional:
                z = torch.sub(self._d2s[s:e], a, out=buf_z[:m]).clamp_min_(0.0)
                if w_z != 1.0:
                    z.mul_(w_z)
            if w_a != 1.0:
                a.mul_(w_a)
            if conditional:
                a = torch.maximum(a, z, out=a)  # the (X, Z) marginal
                yz = torch.maximum(y, z, out=buf_yz[:m])
            else:
                yz = y
            joint = torch.maximum(a, y, out=buf_joint[:m])
            joint.diagonal(offset=s).fill_(math.inf)
            # squared ε_j (topk is much faster than kthvalue on the CPU)
            eps = joint.topk(k, dim=1, largest=False).values[:, k - 1 : k]
            mask = buf_mask[:m]

            def psi_count(d2: Tensor, mask: Tensor = mask, eps: Tensor = eps) -> Tensor:
                """ψ(count + 1), count = samples m ≠ j strictly inside ε_j (j is at 0)."""
                count = torch.lt(d2, eps, out=mask).sum(1) - 1
                return torch.special.digamma(count.clamp_min(0).to(torch.float64) + 1)

            phi = _digamma_scalar(k) - psi_count(a) - psi_count(yz)
            out[s:e] = phi + (psi_count(z) if conditional else _digamma_scalar(n))
        return out


def _digamma_scalar(m: int) -> float:
    return float(scipy.special.digamma(m))


def _standardise(t: Tensor, jitter: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Columns of ``t`` ``(n, d)`` to zero mean and unit variance in float64, plus noise of
    std ``jitter`` (drawn on the CPU from ``gen``); constant columns exactly 0. Returns the
    result and the bool ``(d,)`` mask of constant columns."""
    t64 = t.double()
    const = t.amax(0) == t.amin(0)
    std = torch.where(const, 1.0, t64.std(0, correction=0))
    out = (t64 - t64.mean(0)) / std
    if jitter > 0:
        noise = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        out = out + jitter * noise.to(out.device)
    return torch.where(const, 0.0, out), const


def _sq_rows(feats: Tensor, sq: Tensor, s: int, e: int, *, out: Tensor) -> Tensor:
    """Rows s:e ``(e − s, n)`` of the squared Euclidean distances between the rows of
    ``feats`` ``(n, d)`` (``sq`` their squared norms), written into ``out``:
    |a|² + |b|² − 2a·b, clamped at 0, each sample's distance to itself exactly 0."""
    d2 = torch.add(sq[s:e, None], sq[None, :], out=out)
    d2.addmm_(feats[s:e], feats.T, alpha=-2.0)
    d2.clamp_min_(0.0)
    d2.diagonal(offset=s).zero_()
    return d2


def _pairwise_sq(feats: Tensor, chunk_rows: int) -> Tensor:
    """``(n, n)`` squared Euclidean distances between the rows of ``feats`` ``(n, d)``,
    computed ``chunk_rows`` rows at a time (see :func:`_sq_rows`)."""
    n = feats.shape[0]
    out = torch.empty(n, n, dtype=feats.dtype, device=feats.device)
    sq = (feats * feats).sum(1)
    for s in range(0, n, chunk_rows):
        e = min(s + chunk_rows, n)
        _sq_rows(feats, sq, s, e, out=out[s:e])
    return out
