"""Estimator validation suite: data with known answers, shared by the tests and a benchmark.

Every :class:`Case` is a layer ``x`` ``(n, U, b)`` and a target ``y`` ``(n, Q)`` with one
queried unit whose Δ = I(X_unit; Y | X_others) is known in closed form (or known to be 0, or
known to be > 0), on both scales the estimators use:

- ``nats``: the mutual information itself (``gaussian``, ``ksg``);
- ``share``: the share of the standardised target's variance that only the unit explains
  under the best *linear* predictor (``linear``; ``mlp`` estimates the share under its own
  predictor, equal to this one when the dependence is linear).

A unit alone in the layer (U = 1) has Δ = I(X; Y). The cases:

======================  =========================================================  ===========
family                  what it checks                                             truth
======================  =========================================================  ===========
``gaussian-mi``         y = ρx + noise, several (n, d): MI of Gaussians             nats, share
``gaussian-cmi``        Δ of X given a correlated Z, both informative               nats, share
``independent``         x and y independent                                        0, 0
``monotone``            ``gaussian-mi`` with exp / cube applied to every x          nats only
``square``              y = x² + noise with x symmetric: only through x²           > 0, share 0
``planted``             a layer with informative, duplicate, dead, ignored units   kept set
======================  =========================================================  ===========

The ``square`` case is the one the closed forms cannot see (Cov(x, x²) = 0 for symmetric x);
the nonparametric ``ksg`` estimator must. MI is invariant under monotone per-coordinate
transforms, so ``monotone`` has the untransformed case's nats as its truth.

>>> from mipp.estimators import LinearEstimator
>>> case = gaussian_mi_case(n=4000, dim=1, rho=0.6, seed=0)
>>> round(case.nats, 4), round(case.share, 2)
(0.2231, 0.36)
>>> out = evaluate(LinearEstimator(), case)
>>> abs(out.value - case.share) < 0.05
True
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from mipp.estimators.base import Estimator
from mipp.methods.selection import terc
from mipp.zoo.data.synthetic import gaussian_mi, sample_gaussian

__all__ = [
    "Case",
    "Outcome",
    "Planted",
    "check_estimator",
    "evaluate",
    "gaussian_cmi_case",
    "gaussian_mi_case",
    "independent_case",
    "monotone_case",
    "planted_layer",
    "square_case",
    "suite",
]

F64 = torch.float64
Family = Literal["gaussian-mi", "gaussian-cmi", "independent", "monotone", "square"]


@dataclass(frozen=True)
class Case:
    """A layer with a known answer for unit ``unit``'s Δ (see the module docstring).

    Attributes:
        name: unique label, e.g. ``"gaussian-mi n=2000 d=2 rho=0.6"``.
        family: the case family.
        x: float64 ``(n, U, b)``; y: float64 ``(n, Q)``.
        unit: the queried unit (Δ is conditional on every other unit of ``x``).
        nats: the true Δ in nats (None: not known in closed form).
        share: the true Δ as a share of the standardised target's variance explained by the
            best linear predictor (None: not known).
        dependent: whether the true Δ is > 0.
    """

    name: str
    family: Family
    x: Tensor
    y: Tensor
    unit: int
    nats: float | None
    share: float | None
    dependent: bool
    params: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """An estimator's answer on a case: ``value`` (its own unit), ``relative``, ``pvalue``."""

    case: str
    estimator: str
    value: float
    relative: float
    pvalue: float
    seconds: float


def evaluate(estimator: Estimator, case: Case) -> Outcome:
    """Δ of ``case.unit`` given the case's other units, by ``estimator`` (timed)."""
    t = time.perf_counter()
    state = estimator.start(estimator.prepare(case.x, case.y))
    d = state.delta(case.unit)
    seconds = time.perf_counter() - t
    return Outcome(case.name, estimator.name, d.value, d.relative, d.pvalue, seconds)


def _linear_share(cov: Tensor, x_idx: list[int], z_idx: list[int], y_idx: list[int]) -> float:
    """Mean over target columns of R²(X ∪ Z → y_j) − R²(Z → y_j), from the covariance."""

    def r2(idx: list[int]) -> Tensor:
        if not idx:
            return torch.zeros(len(y_idx), dtype=F64)
        s_xx = cov[idx][:, idx]
        s_xy = cov[idx][:, y_idx]
        explained = (s_xy * torch.linalg.solve(s_xx, s_xy)).sum(0)
        return explained / cov.diagonal()[y_idx]

    return float((r2(x_idx + z_idx) - r2(z_idx)).mean())


def gaussian_mi_case(*, n: int, dim: int, rho: float, seed: int = 0) -> Case:
    """X ``(n, 1, dim)`` one unit of ``dim`` features, Y ``(n, dim)`` with y_j = ρ x_j + noise.

    I(X; Y) = −dim/2 · log(1 − ρ²) nats; the linear share is ρ².
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=F64)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, dim, generator=g, dtype=F64)
    return Case(
        name=f"gaussian-mi n={n} d={dim} rho={rho}",
        family="gaussian-mi",
        x=x.unsqueeze(1),
        y=y,
        unit=0,
        nats=-dim / 2 * math.log1p(-(rho**2)),
        share=rho**2,
        dependent=rho != 0,
        params={"n": n, "dim": dim, "rho": rho},
    )


def gaussian_cmi_case(*, n: int, rho_xz: float = 0.6, seed: int = 0) -> Case:
    """Units X (0) and Z (1), one feature each, correlated ρ_xz; Y = (X + Z)/2 + noise (2-D).

    Δ_0 = I(X; Y | Z) = I(X; [Y, Z]) − I(X; Z) from the joint covariance, in closed form.
    """
    # joint covariance of (x, z, y1, y2): y1 = 0.5 x + 0.5 z + e1, y2 = 0.8 x + e2
    a = torch.tensor([[0.5, 0.5], [0.8, 0.0]], dtype=F64)  # y = a @ (x, z) + e
    cxz = torch.tensor([[1.0, rho_xz], [rho_xz, 1.0]], dtype=F64)
    noise = torch.diag(torch.tensor([0.5, 0.6], dtype=F64))
    cov = torch.zeros(4, 4, dtype=F64)
    cov[:2, :2] = cxz
    cov[:2, 2:] = cxz @ a.T
    cov[2:, :2] = a @ cxz
    cov[2:, 2:] = a @ cxz @ a.T + noise
    s = sample_gaussian(cov, n, seed=seed)
    perm = [0, 2, 3, 1]  # (x, y1, y2, z): X first, then the rest, for gaussian_mi
    nats = gaussian_mi(cov[perm][:, perm], 1) - gaussian_mi(cov[[0, 1]][:, [0, 1]], 1)
    return Case(
        name=f"gaussian-cmi n={n} rho_xz={rho_xz}",
        family="gaussian-cmi",
        x=s[:, :2].unsqueeze(-1),
        y=s[:, 2:],
        unit=0,
        nats=nats,
        share=_linear_share(cov, [0], [1], [2, 3]),
        dependent=True,
        params={"n": n, "rho_xz": rho_xz},
    )


def independent_case(*, n: int, dim: int = 2, seed: int = 0) -> Case:
    """Three units of ``dim`` features and a ``dim``-column target, all independent."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, dim, generator=g, dtype=F64)
    y = torch.randn(n, dim, generator=g, dtype=F64)
    return Case(
        name=f"independent n={n} d={dim}",
        family="independent",
        x=x,
        y=y,
        unit=0,
        nats=0.0,
        share=0.0,
        dependent=False,
        params={"n": n, "dim": dim},
    )


_TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {"exp": torch.exp, "cube": lambda t: t**3}


def monotone_case(*, n: int, rho: float = 0.6, transform: str = "exp", seed: int = 0) -> Case:
    """:func:`gaussian_mi_case` (d = 1) with a monotone map on x; the MI is unchanged."""
    if transform not in _TRANSFORMS:
        raise ValueError(f"transform must be one of {sorted(_TRANSFORMS)}, got {transform!r}")
    base = gaussian_mi_case(n=n, dim=1, rho=rho, seed=seed)
    return Case(
        name=f"monotone-{transform} n={n} rho={rho}",
        family="monotone",
        x=_TRANSFORMS[transform](base.x),
        y=base.y,
        unit=0,
        nats=base.nats,
        share=None,
        dependent=True,
        params={"n": n, "rho": rho},
    )


def square_case(*, n: int, noise: float = 0.3, seed: int = 0) -> Case:
    """Units: u (0), v (1), w (2) standard normal; y1 = u² + noise, y2 = v + noise.

    Unit 0 informs Y only through u²: Cov(u, y) = 0, so its linear share is exactly 0 while
    I(u; Y | v, w) > 0 (no closed form in nats).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=F64)
    e = noise * torch.randn(n, 2, generator=g, dtype=F64)
    y = torch.stack([x[:, 0] ** 2, x[:, 1]], 1) + e
    return Case(
        name=f"square n={n} noise={noise}",
        family="square",
        x=x.unsqueeze(-1),
        y=y,
        unit=0,
        nats=None,
        share=0.0,
        dependent=True,
        params={"n": n, "noise": noise},
    )


def suite(*, n: int = 2000, seed: int = 0) -> list[Case]:
    """The standard cases at ``n`` samples (the benchmark adds more n and seeds)."""
    return [
        gaussian_mi_case(n=n, dim=1, rho=0.3, seed=seed),
        gaussian_mi_case(n=n, dim=1, rho=0.6, seed=seed),
        gaussian_mi_case(n=n, dim=1, rho=0.9, seed=seed),
        gaussian_mi_case(n=n, dim=3, rho=0.6, seed=seed),
        gaussian_cmi_case(n=n, rho_xz=0.0, seed=seed),
        gaussian_cmi_case(n=n, rho_xz=0.6, seed=seed),
        independent_case(n=n, seed=seed),
        monotone_case(n=n, transform="exp", seed=seed),
        monotone_case(n=n, transform="cube", seed=seed),
        square_case(n=n, seed=seed),
    ]


# ---------------------------------------------------------------------------- planted layer


@dataclass(frozen=True)
class Planted:
    """A synthetic layer with known structure; unit indices refer to the (shuffled) columns.

    TERC on it must keep one copy of each duplicate pair and every other informative unit,
    and drop the constant and ignored units.
    """

    x: Tensor  # (n, 13)
    y: Tensor  # (n, q)
    informative: list[int]  # z1..z6
    duplicate_pairs: list[tuple[int, int]]  # (unit of z1, its exact copy), same for z2
    constant: list[int]
    ignored: list[int]  # independent noise the target does not depend on

    def recovered(self, support: Tensor) -> bool:
        """Whether the kept units ``support`` (bool ``(13,)``) are exactly a correct answer."""
        kept = set(torch.nonzero(support).flatten().tolist())
        singles = [u for u in self.informative if all(u not in p for p in self.duplicate_pairs)]
        return (
            all(len(kept & {a, b}) == 1 for a, b in self.duplicate_pairs)
            and set(singles) <= kept
            and not kept & set(self.constant + self.ignored)
            and len(kept) == 6
        )


def planted_layer(
    *, n: int = 3000, q: int = 5, nonlinear: bool = False, seed: int = 0, noise: float = 0.5
) -> Planted:
    """6 informative independent units z1..z6, exact copies of z1 and z2, 2 constant units and
    3 ignored noise units; y = z W (or tanh(z W)) + noise, q columns; columns shuffled."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 6, generator=g, dtype=F64)
    ignored = torch.randn(n, 3, generator=g, dtype=F64)
    constant = torch.tensor([0.1, 1 / 3], dtype=F64).expand(n, 2)
    x = torch.cat([z, z[:, :2], constant, ignored], 1)  # original roles: 0-5, 6-7, 8-9, 10-12
    signal = z @ (torch.randn(6, q, generator=g, dtype=F64) / math.sqrt(6))
    if nonlinear:
        signal = torch.tanh(signal)
    y = signal + noise * signal.std() * torch.randn(n, q, generator=g, dtype=F64)
    perm = torch.randperm(13, generator=g)
    where = torch.argsort(perm).tolist()  # where[role] = shuffled column
    return Planted(
        x=x[:, perm],
        y=y,
        informative=[where[r] for r in range(6)],
        duplicate_pairs=[(where[0], where[6]), (where[1], where[7])],
        constant=[where[8], where[9]],
        ignored=[where[r] for r in (10, 11, 12)],
    )


# ---------------------------------------------------------------------------- conformance


def check_estimator(
    estimator: Estimator,
    *,
    scale: Literal["nats", "share"],
    n: int = 4000,
    seed: int = 0,
    tolerance: float | None = None,
) -> list[str]:
    """Check ``estimator`` against the contract and the known answers; return the failures.

    An empty list means the estimator conforms. Checked:

    - it is an :class:`~mipp.estimators.Estimator` whose ``min_samples`` is a positive int;
    - a started state has every unit active, ``single_scores`` of shape ``(U,)`` with 0 for a
      constant unit, ``remove`` takes a unit out of ``active`` (``prefetch`` may be called);
    - on the Gaussian MI and CMI cases and the independent case of :func:`suite`, Δ of the
      queried unit is within ``tolerance`` (default 4/√n, a few standard errors) of the truth
      on ``scale`` (``"nats"`` for MI estimators, ``"share"`` for variance-share ones);
    - TERC at confidence 0.999 recovers the :func:`planted_layer` (every informative unit,
      one copy of each duplicate, no constant or ignored unit); a well-calibrated test keeps
      one of the 3 ignored units by chance about 0.3 % of the time.

    >>> from mipp.estimators import LinearEstimator
    >>> check_estimator(LinearEstimator(), scale="share")
    []
    """
    failures: list[str] = []
    name = getattr(estimator, "name", type(estimator).__name__)
    if not isinstance(estimator, Estimator):
        return [f"{name}: not a mipp.estimators.Estimator (subclass it)"]
    need = estimator.min_samples(6, 2)
    if isinstance(need, bool) or not isinstance(need, int) or need < 1:
        failures.append(f"{name}: min_samples(6, 2) returned {need!r}, not a positive int")
    tol = 4 / math.sqrt(n) if tolerance is None else tolerance

    layer = planted_layer(n=n, seed=seed)
    state = estimator.start(estimator.prepare(layer.x, layer.y))
    if state.n_units != 13 or not bool(state.active.all()):
        failures.append(f"{name}: a new state must have all 13 units active")
    scores = state.single_scores()
    if tuple(scores.shape) != (13,):
        failures.append(f"{name}: single_scores() has shape {tuple(scores.shape)}, not (13,)")
    elif any(float(scores[u]) != 0.0 for u in layer.constant):
        failures.append(f"{name}: a constant unit must score exactly 0")
    state.prefetch(list(range(13)))
    state.remove(layer.constant[0])
    if bool(state.active[layer.constant[0]]):
        failures.append(f"{name}: remove(i) must take unit i out of active")

    for case in suite(n=n, seed=seed):
        if case.family not in ("gaussian-mi", "gaussian-cmi", "independent"):
            continue
        truth = case.nats if scale == "nats" else case.share
        out = evaluate(estimator, case)
        if truth is not None and abs(out.value - truth) > tol:
            failures.append(
                f"{name}: {case.name}: Δ = {out.value:.4f}, truth {truth:.4f} {scale} "
                f"(tolerance {tol:.4f})"
            )

    result = terc(estimator.start(estimator.prepare(layer.x, layer.y)), confidence=0.999)
    if not layer.recovered(result.support):
        kept = result.support.nonzero().flatten().tolist()
        failures.append(f"{name}: TERC on the planted layer kept {kept}, not a correct answer")
    return failures
