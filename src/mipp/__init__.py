"""mipp: Mutual Information Preserving Pruning for PyTorch.

Structured pruning that removes whole neurons and filters while keeping the mutual
information between adjacent layers (Westphal, Hailes, Musolesi, arXiv 2411.00147), and the
methods it is compared with, all on one pipeline (:func:`prune`). Around it: a model zoo,
datasets read from local files, one training loop, checkpoints in safetensors and
model-size metrics (:mod:`mipp.zoo`, :mod:`mipp.metrics`).

Layout: :mod:`mipp.estimators` (MI on tensors) → :mod:`mipp.methods` (what to remove: MIPP
and the baselines, one :class:`~mipp.methods.base.Method` contract) → :mod:`mipp.surgery`
(what touches a module: structure, capture, costs, removal, repairs, replay) →
:mod:`mipp.pipeline` (:func:`prune`) → :mod:`mipp.report` (the record). The command line
(:mod:`mipp.cli`) and the experiment sweeps (:mod:`mipp.experiments`) are built on these.
Interop: ONNX export checked against PyTorch (:func:`export_onnx`, extra ``mipp[onnx]``) and
MIPP as a Torch-Pruning importance (:class:`mipp.interop.MippImportance`).

>>> import mipp, torch
>>> model = mipp.create_model("lenet5", in_channels=1, input_size=28)
>>> mipp.count_params(model)
61706
>>> result = mipp.prune(model, torch.randn(600, 1, 28, 28), sparsity=0.5)
>>> result.report.units_after < result.report.units_before
True
"""

from mipp.errors import MippError
from mipp.estimators import make_estimator
from mipp.export import export_onnx
from mipp.methods import MIPP, make_method
from mipp.methods.selection import MIPPSelector
from mipp.metrics import count_macs, count_params, measure_latency
from mipp.pipeline import PruneResult, prune
from mipp.progress import ProgressEvent
from mipp.report import PruneReport
from mipp.surgery.replay import apply_report
from mipp.surgery.structure import build_structure
from mipp.types import ModelSpec
from mipp.zoo.checkpoint import load_checkpoint, save_checkpoint
from mipp.zoo.config import TrainConfig
from mipp.zoo.data import calibration_subset, load_dataset
from mipp.zoo.models import create as create_model
from mipp.zoo.models import list_models
from mipp.zoo.training import evaluate, seeded, train

__version__ = "0.1.0"

__all__ = [
    "MIPP",
    "MIPPSelector",
    "MippError",
    "ModelSpec",
    "ProgressEvent",
    "PruneReport",
    "PruneResult",
    "TrainConfig",
    "__version__",
    "apply_report",
    "build_structure",
    "calibration_subset",
    "count_macs",
    "count_params",
    "create_model",
    "evaluate",
    "export_onnx",
    "list_models",
    "load_checkpoint",
    "load_dataset",
    "make_estimator",
    "make_method",
    "measure_latency",
    "prune",
    "save_checkpoint",
    "seeded",
    "train",
]
