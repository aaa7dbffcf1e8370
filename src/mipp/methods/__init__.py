"""Every pruning method, MIPP and the baselines it is compared with, behind one contract.

Each method is a :class:`~mipp.methods.base.Method`: options in ``__init__``, the work in
``decide(context, budget)``. :func:`mipp.prune` runs every one of them through the same
pipeline — the same calibration data, structure backend, removal, repairs and report — so a
comparison differs only in the decision. :class:`~mipp.methods.mipp.MIPP` selects units by
conditional mutual information; the baselines are
:class:`~mipp.methods.scored.ScoredMethod` subclasses: they score units (higher = keep) and
an allocation (``"global"`` ranking, ``"uniform"`` per-layer ratio, or a matched report's
``"widths"``) decides how many go where, over one or more rounds.

===================  ==========================================================  ==========
name                 what decides (higher score = keep)                          allocation
===================  ==========================================================  ==========
``mipp``             TERC on the conditional MI with the next layer (the paper)  its own
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
``taylor``           |mean(a ⊙ ∂C/∂a)| per example (Molchanov et al. 2017)       global
``taylor-weight``    (Σ g·w over the unit's weights)² (Molchanov et al. 2019)    global
``slimming``         |γ| of the unit's BatchNorm after λΣ|γ| training            global
                     (Liu et al. 2017)
``obd``              ½ Σ G_ww w², G the Gauss–Newton diagonal (LeCun et al.     global
                     1989)
``channel-pruning``  LASSO entry on the next layer's reconstruction, then LS     uniform
                     re-fit (He et al. 2017)
``ccp``              greedy 0-1 quadratic program, gradient-outer-product        uniform
                     curvature (Peng et al. 2019)
``ssl``              ‖W_j‖₂ after group-lasso training (Wen et al. 2016)         global
``greg``             L1 choice pushed to zero by a growing L2 penalty, then      uniform
                     removed (Wang et al. 2021)
``prospr``           |∂L(θ_M)/∂c|, meta-gradient through M SGD steps             global
                     (Alizadeh et al. 2022)
``kfac-obd``         ½ S_jj E[z_j²], EigenDamage's K-FAC saliency (Wang et al.    global
                     2019), no eigenbasis
``tpp``              L1 choice, growing Gram + BN penalty decorrelating it from  uniform
                     the kept filters (Wang & Fu 2023)
``oto``              ‖x_g‖ of zero-invariant groups after half-space projected   global
                     gradient training (Chen et al. 2021)
``obs``              block OBS with WoodFisher's empirical Fisher, OBS update of  global
                     the kept weights (Hassibi & Stork 1992; Singh & Alistarh 2020)
``increg``           per-unit L2 factors moved each step by the unit's L1 rank,  uniform
                     largest factors removed (Wang et al. 2019)
``dcp``              greedy on reconstruction + auxiliary-classifier gradient,   uniform
                     LS re-fit (Zhuang et al. 2018)
``sp-pai``           orthogonal re-init, data-free SNIP on Gaussian inputs, kept global
                     layers made isometric (Lee et al. 2020)
``pfp``              sensitivity sampling, m_ℓ ∝ S_ℓ under one ε, reweighted     pfp
                     (Liebenwein et al. 2020)
===================  ==========================================================  ==========

``variational`` and ``aofp`` are named but not implemented: asking for one raises the
reason (:data:`NOT_IMPLEMENTED`).

Names are resolved here and only here (:func:`make_method`), by the command line, the sweep
configs and tests; library code takes :class:`Method` objects.

>>> make_method("l1").allocation
'uniform'
>>> make_method("synflow", rounds=10).rounds
10
>>> make_method("mipp", estimator="gaussian").estimator
'gaussian'
"""

from __future__ import annotations

import inspect
from typing import Any

from mipp.errors import InvalidOptionError, UnknownNameError, build_checked
from mipp.methods.base import TARGETS, Budget, Decision, Method, PruneContext, Target
from mipp.methods.baselines import BASELINES
from mipp.methods.baselines.sampling import PFP_ALLOCATIONS
from mipp.methods.mipp import MIPP
from mipp.methods.scored import ALLOCATIONS, ScoredMethod
from mipp.registry import lookup

#: every allocation some method takes (the command line's ``--allocation`` choices): the
#: scored methods' ones and PFP's own ``"pfp"`` (each method refuses the others by name)
ALL_ALLOCATIONS: tuple[str, ...] = (
    *ALLOCATIONS,
    *(a for a in PFP_ALLOCATIONS if a not in ALLOCATIONS),
)

__all__ = [
    "ALLOCATIONS",
    "ALL_ALLOCATIONS",
    "BASELINE_NAMES",
    "METHODS",
    "METHOD_NAMES",
    "MIPP",
    "NOT_IMPLEMENTED",
    "TARGETS",
    "Budget",
    "Decision",
    "Method",
    "PruneContext",
    "ScoredMethod",
    "Target",
    "describe_method",
    "make_method",
    "method_options",
]

#: name → class of every method ``mipp.prune(method=NAME)`` accepts (MIPP first)
METHODS: dict[str, type[Method]] = {"mipp": MIPP, **{cls.name: cls for cls in BASELINES}}
#: every registered name, MIPP first
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
#: the baselines' names
BASELINE_NAMES: tuple[str, ...] = tuple(name for name in METHODS if name != "mipp")


#: methods of the literature mipp names but does not implement → why, and what is closest.
#: Asking for one raises :class:`~mipp.errors.UnknownNameError` with that reason.
NOT_IMPLEMENTED: dict[str, str] = {
    "variational": (
        "Variational CNN pruning (Zhao et al. 2019) is not implemented: it replaces every "
        "BatchNorm scale by a learned posterior over channel saliency, trained by variational "
        "inference with its own prior and reparameterised sampling — a model rewrite and a "
        "training loop of its own, not a penalty on mipp's loop; the closest here is "
        "'slimming' (|γ| after L1 training on the scales)"
    ),
    "aofp": (
        "Approximated Oracle Filter Pruning (Ding et al. 2019) is not implemented: it prunes "
        "while training, layer by layer, by binary searches that mask halves of a layer's "
        "filters over many training iterations with multi-path fine-tuning — a schedule that "
        "cannot be given the same fine-tuning budget as the other methods; the oracle it "
        "approximates (each filter's effect on the next layer's output) is what 'thinet' and "
        "'channel-pruning' measure"
    ),
}


def _registered(name: str) -> type[Method]:
    if isinstance(name, str) and name in NOT_IMPLEMENTED:
        raise UnknownNameError(f"method {name!r}: {NOT_IMPLEMENTED[name]}")
    return lookup(METHODS, name, kind="method")


def method_options(name: str) -> tuple[str, ...]:
    """The option names method ``name`` takes (its keyword arguments).

    >>> method_options("grasp")
    ('allocation', 'rounds', 'temperature', 'normalize', 'cost_aware')
    """
    cls = _registered(name)
    return tuple(p for p in inspect.signature(cls).parameters if p != "self")


def make_method(name: str, **options: Any) -> Method:
    """The method registered as ``name``, built with ``options`` (each checked by name, then
    by the method's own ``__init__``).

    Raises:
        UnknownNameError: ``name`` is not registered (the message lists the names).
        InvalidOptionError: (a ValueError) an option the method does not take (the message
            lists the valid ones), or a bad value (the method's message).
    """
    cls = _registered(name)
    valid = method_options(name)
    bad = sorted(set(options) - set(valid))
    if bad:
        raise InvalidOptionError(
            f"method {name!r} has no option(s) {', '.join(bad)}; valid options: "
            f"{', '.join(valid) or 'none'}"
        )
    return build_checked(cls, **options)  # the method's own value checks: one line


def describe_method(name: str) -> str:
    """One line about method ``name``: its ``summary`` or its docstring's first line."""
    cls = _registered(name)
    return cls.summary or (cls.__doc__ or "").strip().splitlines()[0]
