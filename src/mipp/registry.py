"""Name lookup at the edge of the library.

Library code takes objects; the CLI, configs and tests turn strings into objects here,
through plain dicts. An unknown name raises :class:`~mipp.errors.UnknownNameError` listing
the valid names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from mipp.errors import UnknownNameError

__all__ = ["lookup"]

T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, *, kind: str) -> T:
    """Return ``registry[name]`` or raise an error naming ``name`` and every valid choice.

    >>> lookup({"a": 1, "b": 2}, "b", kind="letter")
    2
    """
    try:
        return registry[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(registry))
        raise UnknownNameError(f"unknown {kind} {name!r}; valid {kind}s: {valid}") from None
