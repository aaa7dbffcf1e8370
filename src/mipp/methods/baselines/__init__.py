"""The baselines MIPP is compared with: scored methods on the same pipeline.

Data-free (:mod:`~mipp.methods.baselines.magnitude`: random, L1, IMP), gradient-based
(:mod:`~mipp.methods.baselines.gradient`: SNIP, GraSP, SynFlow, their iterative forms,
SOSP-H, ProsPr; :mod:`~mipp.methods.baselines.isometry`: signal-propagation pruning at
initialisation), activation-based (:mod:`~mipp.methods.baselines.activation`: HRank, CHIP,
mean activation, APoZ), reconstruction-based (:mod:`~mipp.methods.baselines.thinet`:
ThiNet, Channel Pruning; :mod:`~mipp.methods.baselines.discrimination`: DCP),
sampling-based (:mod:`~mipp.methods.baselines.sampling`: PFP), first-order / scale-based
(:mod:`~mipp.methods.baselines.taylor`: Taylor on activations and on weights, Network
Slimming, CCP) and second-order (:mod:`~mipp.methods.baselines.curvature`: OBD, K-FAC
saliency, OBS); methods that regularise during training
(:mod:`~mipp.methods.baselines.regularised`: SSL, GReg, IncReg, TPP, OTO).
"""

from __future__ import annotations

from mipp.methods.baselines.activation import CHIP, APoZ, HRank, MeanActivation
from mipp.methods.baselines.curvature import KFACOBD, OBD, OBS
from mipp.methods.baselines.discrimination import DiscriminationAware
from mipp.methods.baselines.gradient import (
    SNIP,
    SOSPH,
    GraSP,
    IterativeGraSP,
    IterativeSNIP,
    ProsPr,
    SynFlow,
)
from mipp.methods.baselines.isometry import SignalPropagation
from mipp.methods.baselines.magnitude import IMP, L1Norm, RandomScores
from mipp.methods.baselines.regularised import (
    GrowingRegularization,
    IncrementalRegularization,
    OnlyTrainOnce,
    StructuredSparsity,
    TrainabilityPreserving,
)
from mipp.methods.baselines.sampling import ProvableFilterPruning
from mipp.methods.baselines.taylor import (
    CollaborativeChannelPruning,
    NetworkSlimming,
    TaylorActivation,
    TaylorWeight,
)
from mipp.methods.baselines.thinet import ChannelPruning, ThiNet
from mipp.methods.scored import ScoredMethod

__all__ = [
    "BASELINES",
    "CHIP",
    "IMP",
    "KFACOBD",
    "OBD",
    "OBS",
    "SNIP",
    "SOSPH",
    "APoZ",
    "ChannelPruning",
    "CollaborativeChannelPruning",
    "DiscriminationAware",
    "GraSP",
    "GrowingRegularization",
    "HRank",
    "IncrementalRegularization",
    "IterativeGraSP",
    "IterativeSNIP",
    "L1Norm",
    "MeanActivation",
    "NetworkSlimming",
    "OnlyTrainOnce",
    "ProsPr",
    "ProvableFilterPruning",
    "RandomScores",
    "SignalPropagation",
    "StructuredSparsity",
    "SynFlow",
    "TaylorActivation",
    "TaylorWeight",
    "ThiNet",
    "TrainabilityPreserving",
]

#: every baseline, in the order ``mipp list methods`` shows them
BASELINES: tuple[type[ScoredMethod], ...] = (
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
    TaylorActivation,
    TaylorWeight,
    NetworkSlimming,
    OBD,
    ChannelPruning,
    DiscriminationAware,
    CollaborativeChannelPruning,
    StructuredSparsity,
    GrowingRegularization,
    IncrementalRegularization,
    ProsPr,
    KFACOBD,
    TrainabilityPreserving,
    OnlyTrainOnce,
    OBS,
    SignalPropagation,
    ProvableFilterPruning,
)
