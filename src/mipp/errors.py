"""Exceptions raised by mipp.

Every error a user can cause derives from :class:`MippError`, so the command line can
print it as one clear line instead of a traceback.
"""

from __future__ import annotations

__all__ = [
    "CalibrationError",
    "CorruptDatasetError",
    "DatasetNotFoundError",
    "MippError",
    "UnknownNameError",
]


class MippError(Exception):
    """Base class of every error mipp raises on purpose."""


class UnknownNameError(MippError, ValueError):
    """A name (model, dataset, method, ...) is not in its registry."""


class CalibrationError(MippError, ValueError):
    """The calibration data cannot support the request (too few samples for the estimator,
    an empty set); the message says what is needed."""


class DatasetNotFoundError(MippError, FileNotFoundError):
    """A dataset's files are not where mipp looked; the message says where and how to get them."""


class CorruptDatasetError(MippError, ValueError):
    """A dataset file is corrupt or truncated; the message names the file and the fault."""
