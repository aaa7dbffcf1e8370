"""Progress of long library work: every step is logged and handed to an optional callback.

The library never draws anything. Long calls (:func:`mipp.prune`, :func:`mipp.train`, a
sweep) take ``progress=`` — a callable receiving :class:`ProgressEvent` objects — and also
log every event through :mod:`logging` (logger ``mipp.<module>``; INFO for results, DEBUG for
transient status such as training steps). The command line renders the events with rich;
a script can print them, collect them, or configure logging instead:

>>> events = []
>>> report = Reporter(events.append, "mipp.example")
>>> report("selection", "conv1: kept 4 of 6 units", kept=4)
>>> events[0].stage, events[0].message, events[0].fields["kept"]
('selection', 'conv1: kept 4 of 6 units', 4)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ProgressCallback", "ProgressEvent", "Reporter"]


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a long call.

    Attributes:
        stage: what is running, e.g. ``"calibration"``, ``"statistics"``, ``"selection"``,
            ``"bisection"``, ``"scoring"``, ``"compensation"``, ``"train"``, ``"epoch"``,
            ``"sweep"``.
        message: one human-readable line.
        done / total: position in a counted loop (e.g. step 10 of 469), else None.
        transient: True for a status that the next event replaces ("capturing
            activations ..."), False for a result worth keeping on screen.
        fields: the numbers behind the message (e.g. ``{"threshold": 0.01, "units": 0.7}``).
    """

    stage: str
    message: str
    done: int | None = None
    total: int | None = None
    transient: bool = False
    fields: Mapping[str, Any] = field(default_factory=dict)


#: what ``progress=`` accepts
ProgressCallback = Callable[[ProgressEvent], None]


class Reporter:
    """Sends events to ``callback`` (if any) and to the logger ``logger_name``."""

    def __init__(self, callback: ProgressCallback | None, logger_name: str) -> None:
        if callback is not None and not callable(callback):
            raise TypeError(
                f"progress must be a callable taking a mipp.ProgressEvent (or None), "
                f"got {type(callback).__name__}"
            )
        self.callback = callback
        self.logger = logging.getLogger(logger_name)

    def __call__(
        self,
        stage: str,
        message: str,
        *,
        done: int | None = None,
        total: int | None = None,
        transient: bool = False,
        **fields: Any,
    ) -> None:
        self.logger.log(logging.DEBUG if transient else logging.INFO, message)
        if self.callback is not None:
            self.callback(ProgressEvent(stage, message, done, total, transient, dict(fields)))
