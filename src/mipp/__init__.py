"""mipp: Mutual Information Preserving Pruning for PyTorch.

Structured pruning that removes whole neurons and filters while keeping the mutual
information between adjacent layers (Westphal, Hailes, Musolesi, arXiv 2411.00147), plus
what it stands on: datasets read from local files, a model zoo, one training loop,
checkpoints in safetensors and model-size metrics.

>>> import mipp, torch
>>> model = mipp.create_model("lenet5", in_channels=1, input_size=28)
>>> mipp.count_params(model)
61706
>>> result = mipp.prune(model, torch.randn(600, 1, 28, 28), sparsity=0.5)
>>> result.report.units_after < result.report.units_before
True
"""

from mipp.checkpoint import load_checkpoint, save_checkpoint
from mipp.config import TrainConfig
from mipp.data import calibration_subset, load_dataset
from mipp.errors import MippError
from mipp.estimators import make_estimator
from mipp.metrics import count_macs, count_params, measure_latency
from mipp.models import create as create_model
from mipp.models import list_models
from mipp.prune import PruneResult, prune
from mipp.report import PruneReport, apply_report
from mipp.selection import MIPPSelector
from mipp.train import evaluate, train
from mipp.types import ModelSpec

__version__ = "0.1.0"

__all__ = [
    "MIPPSelector",
    "MippError",
    "ModelSpec",
    "PruneReport",
    "PruneResult",
    "TrainConfig",
    "__version__",
    "apply_report",
    "calibration_subset",
    "count_macs",
    "count_params",
    "create_model",
    "evaluate",
    "list_models",
    "load_checkpoint",
    "load_dataset",
    "make_estimator",
    "measure_latency",
    "prune",
    "save_checkpoint",
    "train",
]
