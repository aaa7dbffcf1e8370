"""``mlp``: the paper's estimator — MI as the drop in held-out loss of a small trained MLP.

docs/METHOD.md §3, "Paper-faithful". The target columns are standardised, so the best constant
predictor has a held-out mean squared error of about 1 and every quantity is a share of the
target's variance, comparable with ``linear``:

    I(X_S; Y) ≈ loss(best constant) − loss(f(X_S)),
    Δ_i = I(X_i; Y | X_{S∖i}) ≈ loss(f(X_{S∖i})) − loss(f(X_S)),

where loss is the mean squared error over the target columns on a held-out split and f is a
Linear(D, hidden) → ReLU → Linear(hidden, q) network trained with Adam and early stopping on
that split (the best epoch is restored). The fit without unit i has unit i's features set to
0 (their mean: features are standardised) and is warm-started from the current reference
fit. Each estimate is repeated ``repeats`` times with different initialisations and splits;
the repeats are trained simultaneously as one batched model (independent, since the loss is a
sum over repeats and Adam is elementwise). Δ_i is the mean over repeats of the paired loss
differences, and its p-value the one-sided one-sample t-test of those differences > 0.

The re-fit without unit i continues training from the reference, so for a useless unit the
extra epochs tend to make Δ_i slightly negative (about −1e-3 in our tests), and for a unit
that another kept unit duplicates Δ_i is whatever the re-fit did not recover.

Slow on purpose: one reference fit, one re-fit per tested unit and one single-unit fit per
unit (batched across units), each ``repeats`` times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.stats
import torch
from torch import Tensor

from mipp.estimators.base import Delta, Estimator, EstimatorState, check_columns, check_pair
from mipp.estimators.moments import UnitSlots

__all__ = ["MLPData", "MLPEstimator", "MLPState"]

_MAX_ELEMENTS = 2**24  # bound on (models × batch rows × width) per step when batching units


@dataclass(frozen=True)
class MLPData:
    """What :meth:`MLPEstimator.prepare` keeps: the data itself.

    Attributes:
        x: float32 ``(n, U, b)``, every feature standardised over the n samples (constant
            features are 0).
        y: float64 ``(n, Q)``, the raw target columns.
        const_units: bool ``(U,)``, units whose every feature is constant.
        const_y: bool ``(Q,)``, constant target columns.
    """

    x: Tensor
    y: Tensor
    const_units: Tensor
    const_y: Tensor


Params = tuple[Tensor, Tensor, Tensor, Tensor]  # w1 (G,R,d,H), b1 (G,R,H), w2 (G,R,H,q), b2


@dataclass(frozen=True)
class _Fit:
    params: Params
    loss: Tensor  # (G, R) best held-out MSE


class MLPEstimator(Estimator):
    """Trained-MLP estimator (the paper's); values are shares of the target's variance.

    Args:
        hidden: Hidden width of the predictor.
        repeats: Independent repeats (initialisation and train/validation split); the
            p-value is a t-test over them. With 1 repeat the p-value is 0 if Δ > 0, else 1.
        val_fraction: Share of the samples held out for early stopping and the loss.
        max_epochs: Epoch limit of every fit.
        patience: Epochs without a held-out improvement before a fit stops.
        lr: Adam learning rate.
        batch_size: Mini-batch size; ``None`` trains on the full batch (then an epoch is a
            single step: raise ``patience`` accordingly).
        seed: Seeds the splits, initialisations and shuffles; the same seed and the same
            sequence of calls give the same results.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(1000, 2, generator=g)
    >>> y = torch.tanh(2 * x[:, :1]) + 0.1 * torch.randn(1000, 1, generator=g)
    >>> est = MLPEstimator(hidden=16, repeats=3, batch_size=None, lr=3e-2, patience=50)
    >>> state = est.start(est.prepare(x, y))
    >>> d0, d1 = state.delta(0), state.delta(1)  # unit 0 drives y, unit 1 is noise
    >>> d0.value > 0.5, d0.pvalue < 0.01, abs(d1.value) < 0.02
    (True, True, True)
    """

    name = "mlp"

    def __init__(
        self,
        *,
        hidden: int = 64,
        repeats: int = 5,
        val_fraction: float = 0.2,
        max_epochs: int = 200,
        patience: int = 10,
        lr: float = 1e-2,
        batch_size: int | None = 256,
        seed: int = 0,
    ) -> None:
        for label, value in (
            ("hidden", hidden),
            ("repeats", repeats),
            ("max_epochs", max_epochs),
            ("patience", patience),
        ):
            if int(value) != value or value < 1:
                raise ValueError(f"{label} must be an integer >= 1, got {value}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr}")
        if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
            raise ValueError(f"batch_size must be an integer >= 1 or None, got {batch_size}")
        self.hidden = int(hidden)
        self.repeats = int(repeats)
        self.val_fraction = float(val_fraction)
        self.max_epochs = int(max_epochs)
        self.patience = int(patience)
        self.lr = float(lr)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.seed = int(seed)

    def __repr__(self) -> str:
        return (
            f"MLPEstimator(hidden={self.hidden}, repeats={self.repeats}, "
            f"val_fraction={self.val_fraction}, max_epochs={self.max_epochs}, "
            f"patience={self.patience}, lr={self.lr}, batch_size={self.batch_size}, "
            f"seed={self.seed})"
        )

    def prepare(self, x: Tensor, y: Tensor) -> MLPData:
        """Keep the data: ``x`` ``(n, U, b)`` / ``(n, U)`` standardised per feature, ``y``."""
        x, y = check_pair(x, y)
        n_val = max(1, round(self.val_fraction * x.shape[0]))
        if x.shape[0] - n_val < 1:
            raise ValueError(
                f"val_fraction={self.val_fraction} leaves no training samples out of {x.shape[0]}"
            )
        x64 = x.double()
        std = x64.std(0, correction=0)
        const_x = x.amax(0) == x.amin(0)
        xs = torch.where(const_x, 0.0, (x64 - x64.mean(0)) / torch.where(const_x, 1.0, std))
        const_y = y.amax(0) == y.amin(0)
        return MLPData(x=xs.float(), y=y.double(), const_units=const_x.all(dim=1), const_y=const_y)

    def start(self, prepared: MLPData, columns: Tensor | None = None) -> MLPState:
        """A state with S = all units, for target columns ``columns`` (None = all)."""
        if not isinstance(prepared, MLPData):
            raise TypeError(f"prepared must come from prepare(), got {type(prepared).__name__}")
        return MLPState(prepared, columns, self)


class MLPState(EstimatorState):
    """Kept set S with the current reference fit (see :class:`MLPEstimator`).

    The reference fit is trained on first use. ``delta(i)`` caches its masked fit, so
    ``remove(i)`` right after it costs nothing: the masked fit becomes the new reference.

    Attributes:
        n_units: U. columns: the target columns used (zero-variance ones dropped), LongTensor.
    """

    def __init__(self, data: MLPData, columns: Tensor | None, options: MLPEstimator) -> None:
        self._opt = options
        n, self.n_units, self._b = data.x.shape
        cols = check_columns(columns, data.y.shape[1])
        self.columns = cols[~data.const_y[cols]]
        self._q = int(self.columns.numel())
        y = data.y[:, self.columns]
        self._y = ((y - y.mean(0)) / y.std(0, correction=0)).float()  # (n, q)
        self._x = data.x.reshape(n, self.n_units * self._b)  # (n, D)
        self._xu = data.x  # (n, U, b)
        self._const_units = data.const_units
        self._slots = UnitSlots(self.n_units, self._b)
        self._mask = torch.ones(self.n_units * self._b)
        n_val = max(1, round(options.val_fraction * n))
        gen = _generator(options.seed, 0)
        perms = torch.stack([torch.randperm(n, generator=gen) for _ in range(options.repeats)])
        self._val_idx, self._train_idx = perms[:, :n_val], perms[:, n_val:]
        # held-out loss of the best constant (the training mean), per repeat
        y_tr, y_va = self._y[self._train_idx], self._y[self._val_idx]
        self._const_loss = ((y_va - y_tr.mean(1, keepdim=True)) ** 2).mean(dim=(1, 2))
        self._ref: _Fit | None = None
        self._cache: tuple[int, _Fit] | None = None
        self._scores: Tensor | None = None
        self._n_removed = 0

    @property
    def active(self) -> Tensor:
        """bool ``(U,)``: True for units in S."""
        return self._slots.active

    def information(self) -> float:
        """I(X_S; Y) ≈ loss(best constant) − loss(f(X_S)), mean over repeats (share of variance)."""
        if self._q == 0:
            return 0.0
        return float((self._const_loss - self._reference().loss[0]).mean())

    def single_scores(self) -> Tensor:
        """float64 ``(U,)``: loss(best constant) − loss(f(X_i)) from a single-unit fit per
        unit, mean over repeats (share of variance); exactly 0 for constant units."""
        if self._scores is None:
            self._scores = self._single_scores()
        return self._scores.clone()

    def delta(self, i: int) -> Delta:
        """Δ_i = loss(S∖i) − loss(S), mean over repeats, and the one-sided t-test p-value."""
        i = self._slots.check(i)
        if self._q == 0 or self._const_units[i]:
            return Delta(value=0.0, relative=0.0, pvalue=1.0)
        diffs = (self._masked_fit(i).loss[0] - self._reference().loss[0]).double().numpy()
        value = float(diffs.mean())
        if diffs.size < 2 or np.ptp(diffs) == 0:
            pvalue = 1.0 if value <= 0 else 0.0
        else:
            pvalue = float(scipy.stats.ttest_1samp(diffs, 0.0, alternative="greater").pvalue)
        return Delta(value=value, relative=value, pvalue=pvalue)

    def remove(self, i: int) -> None:
        """S ← S ∖ {i}; the fit without unit i becomes the reference."""
        i = self._slots.check(i)
        if self._q > 0 and not self._const_units[i]:
            self._ref = self._masked_fit(i)
        self._mask[i * self._b : (i + 1) * self._b] = 0.0
        self._slots.remove(i)
        self._cache = None
        self._n_removed += 1

    # --- fits ------------------------------------------------------------------------------

    def _reference(self) -> _Fit:
        if self._ref is None:
            gen = _generator(self._opt.seed, 1)
            init = _init_params(
                1, self._opt.repeats, self._x.shape[1], self._opt.hidden, self._q, gen
            )
            self._ref = self._train(self._x[None], init, self._mask, gen)
        return self._ref

    def _masked_fit(self, i: int) -> _Fit:
        if self._cache is not None and self._cache[0] == i:
            return self._cache[1]
        ref = self._reference()
        mask = self._mask.clone()
        mask[i * self._b : (i + 1) * self._b] = 0.0
        gen = _generator(self._opt.seed, 2, self._n_removed, i)
        fit = self._train(self._x[None], ref.params, mask, gen)
        self._cache = (i, fit)
        return fit

    def _single_scores(self) -> Tensor:
        scores = torch.zeros(self.n_units, dtype=torch.float64)
        live = torch.nonzero(~self._const_units).flatten()
        if self._q == 0 or live.numel() == 0:
            return scores
        opt = self._opt
        rows = min(opt.batch_size or self._train_idx.shape[1], self._train_idx.shape[1])
        rows = max(rows, self._val_idx.shape[1])
        width = max(opt.hidden, self._q, self._b)
        chunk = max(1, _MAX_ELEMENTS // (opt.repeats * rows * width))
        for start in range(0, live.numel(), chunk):
            units = live[start : start + chunk]
            gen = _generator(opt.seed, 3, start)
            init = _init_params(units.numel(), opt.repeats, self._b, opt.hidden, self._q, gen)
            x = self._xu[:, units, :].permute(1, 0, 2).contiguous()  # (G, n, b)
            fit = self._train(x, init, None, gen)
            scores[units] = (self._const_loss - fit.loss).mean(1).double()
        return scores

    def _train(self, x: Tensor, init: Params, mask: Tensor | None, gen: torch.Generator) -> _Fit:
        """Train G×R independent MLPs on ``x`` ``(G, n, d)`` with early stopping.

        Model (g, r) sees inputs ``x[g] * mask`` and repeat r's split. Returns the parameters
        of each model's best held-out epoch and that loss ``(G, R)`` (epoch 0 = ``init``).
        """
        opt = self._opt
        y = self._y
        train_idx, val_idx = self._train_idx, self._val_idx
        n_train = train_idx.shape[1]
        batch = n_train if opt.batch_size is None else min(opt.batch_size, n_train)
        params = [p.detach().clone().requires_grad_(True) for p in init]

        def forward(idx: Tensor) -> Tensor:  # idx (R, m) → predictions (G, R, m, q)
            w1, b1, w2, b2 = params
            xb = x[:, idx]
            if mask is not None:
                xb = xb * mask
            h = torch.relu(torch.einsum("grmd,grdh->grmh", xb, w1) + b1[:, :, None])
            return torch.einsum("grmh,grhq->grmq", h, w2) + b2[:, :, None]

        def held_out() -> Tensor:
            with torch.no_grad():
                return ((forward(val_idx) - y[val_idx]) ** 2).mean(dim=(2, 3))

        optimiser = torch.optim.Adam(params, lr=opt.lr)
        best = held_out()
        best_params = [p.detach().clone() for p in params]
        waited = torch.zeros_like(best, dtype=torch.long)
        alive = torch.ones_like(best, dtype=torch.bool)
        for _ in range(opt.max_epochs):
            order = train_idx.gather(1, torch.rand(train_idx.shape, generator=gen).argsort(dim=1))
            for start in range(0, n_train, batch):
                idx = order[:, start : start + batch]
                loss = ((forward(idx) - y[idx]) ** 2).mean(dim=(2, 3)).sum()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
            current = held_out()
            improved = alive & (current < best)
            best = torch.where(improved, current, best)
            for kept, p in zip(best_params, params, strict=True):
                kept[improved] = p.detach()[improved]
            waited = torch.where(improved, 0, waited + 1)
            alive &= waited < opt.patience
            if not bool(alive.any()):
                break
        w1, b1, w2, b2 = best_params
        return _Fit(params=(w1, b1, w2, b2), loss=best)


def _init_params(
    groups: int, repeats: int, d_in: int, hidden: int, d_out: int, gen: torch.Generator
) -> Params:
    """PyTorch's default Linear initialisation, U(−1/√fan_in, 1/√fan_in), for G×R models."""

    def uniform(*shape: int, fan_in: int) -> Tensor:
        bound = 1 / math.sqrt(fan_in)
        return (torch.rand(*shape, generator=gen) * 2 - 1) * bound

    return (
        uniform(groups, repeats, d_in, hidden, fan_in=d_in),
        uniform(groups, repeats, hidden, fan_in=d_in),
        uniform(groups, repeats, hidden, d_out, fan_in=hidden),
        uniform(groups, repeats, d_out, fan_in=hidden),
    )


def _generator(seed: int, *tags: int) -> torch.Generator:
    """A generator seeded by ``seed`` and ``tags``, so each fit's randomness is reproducible."""
    value = int(seed)
    for tag in tags:
        value = (value * 1_000_003 + int(tag) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(value)
