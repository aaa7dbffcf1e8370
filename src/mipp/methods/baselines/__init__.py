"""The baselines MIPP is compared with: scored methods on the same pipeline.

Data-free (:mod:`~mipp.methods.baselines.magnitude`: random, L1, IMP), gradient-based
(:mod:`~mipp.methods.baselines.gradient`: SNIP, GraSP, SynFlow, their iterative forms,
SOSP-H, ProsPr), activation-based (:mod:`~mipp.methods.baselines.activation`: HRank, CHIP, mean
activation, APoZ), reconstruction-based (:mod:`~mipp.methods.baselines.thinet`: ThiNet,
Channel Pruning), first-order / scale-based (:mod:`~mipp.methods.baselines.taylor`: Taylor
on activations and on weights, Network Slimming, CCP) and second-order
(:mod:`~mipp.methods.baselines.curvature`: OBD, K-FAC saliency, OBS); methods
that regularise during training (:mod:`~mipp.methods.baselines.regularised`: SSL, GReg, TPP, OTO).
"""

from __future__ import annotations

from mipp.methods.baselines.activation import CHIP, APoZ, HRank, MeanActivation
from mipp.methods.baselines.curvature import KFACOBD, OBD, OBS
from mipp.methods.baselines.gradient import (
    SNIP,
    SOSPH,
    GraSP,
    IterativeGraSP,
    IterativeSNIP,
    ProsPr,
    SynFlow,
)
from mipp.methods.baselines.magnitude import IMP, L1Norm, RandomScores
from mipp.methods.baselines.regularised import (
    GrowingRegularization,
    OnlyTrainOnce,
    StructuredSparsity,
    TrainabilityPreserving,
)
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
    "GraSP",
    "GrowingRegularization",
    "HRank",
    "IterativeGraSP",
    "IterativeSNIP",
    "L1Norm",
    "MeanActivation",
    "NetworkSlimming",
    "OnlyTrainOnce",
    "ProsPr",
    "RandomScores",
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
    CollaborativeChannelPruning,
    StructuredSparsity,
    GrowingRegularization,
    ProsPr,
    KFACOBD,
    TrainabilityPreserving,
    OnlyTrainOnce,
    OBS,
)
