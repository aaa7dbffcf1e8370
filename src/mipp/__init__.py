"""mipp: Mutual Information Preserving Pruning for PyTorch.

The foundation the pruning work stands on: datasets read from local files, a model zoo, one
training loop, checkpoints in safetensors and model-size metrics.

>>> import mipp
>>> model = mipp.create_model("lenet5", in_channels=1, input_size=28)
>>> mipp.count_params(model)
61706
"""

from mipp.checkpoint import load_checkpoint, save_checkpoint
from mipp.config import TrainConfig
from mipp.data import calibration_subset, load_dataset
from mipp.errors import MippError
from mipp.metrics import count_macs, count_params, measure_latency
from mipp.models import create as create_model
from mipp.models import list_models
from mipp.train import evaluate, train
from mipp.types import ModelSpec

__version__ = "0.1.0"

__all__ = [
    "MippError",
    "ModelSpec",
    "TrainConfig",
    "__version__",
    "calibration_subset",
    "count_macs",
    "count_params",
    "create_model",
    "evaluate",
    "list_models",
    "load_checkpoint",
    "load_dataset",
    "measure_latency",
    "save_checkpoint",
    "train",
]
