"""Exceptions raised by mipp.

Every error a user can cause derives from :class:`MippError`, so the command line can
print it as one clear line instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = [
    "CalibrationError",
    "CorruptDatasetError",
    "DatasetNotFoundError",
    "InvalidOptionError",
    "MippError",
    "PruningVerificationError",
    "TrainingDivergedError",
    "UnknownNameError",
    "build_checked",
]


class MippError(Exception):
    """Base class of every error mipp raises on purpose."""


class TrainingDivergedError(MippError, FloatingPointError):
    """The training loss became NaN or infinite; the message names the step and the rate."""


class UnknownNameError(MippError, ValueError):
    """A name (model, dataset, method, ...) is not in its registry."""


class CalibrationError(MippError, ValueError):
    """The calibration data cannot support the request (too few samples for the estimator,
    an empty set); the message says what is needed."""


class DatasetNotFoundError(MippError, FileNotFoundError):
    """A dataset's files are not where mipp looked; the message says where and how to get them."""


class CorruptDatasetError(MippError, ValueError):
    """A dataset file is corrupt or truncated; the message names the file and the fault."""


class PruningVerificationError(MippError):
    """The pruned model is not the original with exactly the removed units switched off (a
    channel mapping the structural backend got wrong); the message names the group and how
    to exclude it. No model is returned."""


class InvalidOptionError(MippError, ValueError):
    """An option has a value it does not accept; the message names the value and what is
    valid."""


def build_checked(factory: Callable[..., T], /, **options: Any) -> T:
    """``factory(**options)``, its own ``ValueError`` for a bad value re-raised as one
    :class:`InvalidOptionError` line (a MippError passes through unchanged)."""
    try:
        return factory(**options)
    except ValueError as e:
        if isinstance(e, MippError):
            raise
        raise InvalidOptionError(str(e)) from None
