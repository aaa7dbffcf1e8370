"""Estimators of I(X_i; Y) and of the conditional MI Δ_i = I(X_i; Y | X_{S∖i}) (docs/METHOD.md §3).

All take tensors — activations ``x`` ``(n, U, b)`` of U units with b features each (or
``(n, U)``) and a target ``y`` ``(n, Q)`` — and follow the :class:`Estimator` /
:class:`EstimatorState` contract in :mod:`mipp.estimators.base`.

============  ====================================================  =======================
name          Δ_i                                                   unit of ``Delta.value``
============  ====================================================  =======================
``linear``    ridge-loss rise, closed form (paper=True)             share of target variance
``gaussian``  Gaussian conditional MI, log-det (MIPP's default)     nats
``mlp``       rise in held-out loss of a trained MLP (the paper's)  share of target variance
``ksg``       k-nearest-neighbour conditional MI (Frenzel–Pompe)    nats
============  ====================================================  =======================

>>> est = make_estimator("linear")
>>> est.name, sorted(ESTIMATORS)
('linear', ['gaussian', 'ksg', 'linear', 'mlp'])
"""

from __future__ import annotations

import inspect

from mipp.estimators.base import Delta, Estimator, EstimatorState
from mipp.estimators.gaussian import GaussianEstimator, GaussianState
from mipp.estimators.ksg import KSGData, KSGEstimator, KSGState
from mipp.estimators.linear import LinearEstimator, LinearState
from mipp.estimators.mlp import MLPData, MLPEstimator, MLPState
from mipp.estimators.moments import Moments, second_moments
from mipp.registry import lookup

__all__ = [
    "ESTIMATORS",
    "ESTIMATOR_NAMES",
    "Delta",
    "Estimator",
    "EstimatorState",
    "GaussianEstimator",
    "GaussianState",
    "KSGData",
    "KSGEstimator",
    "KSGState",
    "LinearEstimator",
    "LinearState",
    "MLPData",
    "MLPEstimator",
    "MLPState",
    "Moments",
    "make_estimator",
    "second_moments",
]

ESTIMATORS: dict[str, type[Estimator]] = {
    "linear": LinearEstimator,
    "gaussian": GaussianEstimator,
    "mlp": MLPEstimator,
    "ksg": KSGEstimator,
}

#: the registered estimator names, in the order shown to users (the paper's closed form first;
#: MIPP's default is ``gaussian``, see :class:`~mipp.methods.mipp.MIPP`)
ESTIMATOR_NAMES: tuple[str, ...] = tuple(ESTIMATORS)


def make_estimator(name: str, *, seed: int = 0) -> Estimator:
    """The estimator registered as ``name``, with default options.

    ``seed`` reaches the estimators that use randomness (``mlp``; ``ksg``'s jitter); the
    closed forms are deterministic and ignore it. An unknown name raises
    :class:`~mipp.errors.UnknownNameError` (a ``ValueError``) listing the valid names.

    >>> make_estimator("gaussian")
    GaussianEstimator(ridge=0.001)
    >>> make_estimator("mlp", seed=1).seed, make_estimator("ksg", seed=2).seed
    (1, 2)
    """
    cls = lookup(ESTIMATORS, name, kind="estimator")
    if "seed" in inspect.signature(cls).parameters:
        return cls(seed=seed)
    return cls()
