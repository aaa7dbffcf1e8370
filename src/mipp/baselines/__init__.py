"""Every pruning method MIPP is compared against, on MIPP's own pipeline.

All methods share the structure backend (:mod:`mipp.structure`), the calibration data, the
report format and the command line: ``mipp.prune(model, data, method=NAME, sparsity=...)``
and ``mipp prune --method NAME``. Each is a :class:`~mipp.baselines.base.Method` that scores
units (higher = keep); :mod:`~mipp.baselines.allocation` turns scores into removals
(``"global"`` ranking or ``"uniform"`` per-layer ratio) and :mod:`~mipp.baselines.driver`
runs the rounds, records layer collapse and removes the units.

===================  ==========================================================  ==========
name                 score of a unit (higher = keep)                             allocation
===================  ==========================================================  ==========
``random``           uniform random, seeded                                      global
``l1``               Σ|w| over the unit's filter (Li et al. 2017)                uniform
``snip``             Σ|g ⊙ w| over the unit's weights (L1 aggregation)           global
``grasp``            Σ|w ⊙ Hg| over the unit's weights, logits / 200             global
``synflow``          Σ|∂R/∂w ⊙ w|, R = 1ᵀ(Π|W|)1, 100 rounds                     global
``iterative-snip``   SNIP re-scored over 10 rounds                               global
``iterative-grasp``  GraSP re-scored over 10 rounds                              global
``thinet``           greedy reconstruction error of the next layer + LS re-fit   uniform
``sosp-h``           second-order (Gauss-Newton) saliency via Hessian-vector     global
                     products (Nonnenmacher et al. 2022)
``imp``              L1, re-train, repeat (structured IMP)                       global
``hrank``            mean matrix rank of the unit's feature maps                 uniform
``chip``             nuclear-norm drop when the unit's map is removed            uniform
``mean-activation``  mean |activation|                                           global
``apoz``             1 − average percentage of zeros                             global
===================  ==========================================================  ==========

``mipp`` itself is registered in :data:`METHOD_NAMES` too; :func:`mipp.prune` runs it.

>>> make_method("l1").default_allocation
'uniform'
>>> make_method("synflow", rounds=10).rounds
10
"""

from __future__ import annotations

import inspect
from typing import Any

from mipp.baselines.activation import CHIP, APoZ, HRank, MeanActivation
from mipp.baselines.base import Method, ScoringContext
from mipp.baselines.gradient import SNIP, SOSPH, GraSP, IterativeGraSP, IterativeSNIP, SynFlow
from mipp.baselines.magnitude import IMP, L1Norm, RandomScores
from mipp.baselines.thinet import ThiNet
from mipp.registry import lookup

__all__ = [
    "CHIP",
    "IMP",
    "METHODS",
    "METHOD_NAMES",
    "SNIP",
    "SOSPH",
    "APoZ",
    "GraSP",
    "HRank",
    "IterativeGraSP",
    "IterativeSNIP",
    "L1Norm",
    "MeanActivation",
    "Method",
    "RandomScores",
    "ScoringContext",
    "SynFlow",
    "ThiNet",
    "make_method",
]

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        RandomScores,
        L1Norm,
        SNIP,
        GraSP,
        SynFlow,
        IterativeSNIP,
        IterativeGraSP,
        ThiNet,
        SOSPH,
        IMP,
        HRank,
        CHIP,
        MeanActivation,
        APoZ,
    )
}

#: every name ``mipp.prune(method=...)`` accepts
METHOD_NAMES: tuple[str, ...] = ("mipp", *METHODS)


def make_method(name: str, **options: Any) -> Method:
    """The baseline registered as ``name`` with ``options`` (each checked by name).

    Raises:
        UnknownNameError: ``name`` is not a baseline (the message lists them).
        ValueError: an option the method does not take (the message lists the valid ones).
    """
    cls = lookup(METHODS, name, kind="method")
    valid = [p for p in inspect.signature(cls).parameters if p != "self"]
    bad = sorted(set(options) - set(valid))
    if bad:
        raise ValueError(
            f"method {name!r} has no option(s) {', '.join(bad)}; valid options: "
            f"{', '.join(valid) or 'none'}"
        )
    return cls(**options)
