"""Contracts shared across mipp: frozen dataclasses with no behaviour beyond validation.

This module imports nothing from the rest of mipp.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["ModelSpec"]


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a zoo model before its weights are loaded.

    ``widths`` is the family's own width list (MLP hidden widths, LeNet-5's four widths,
    a VGG's conv widths); ``None`` means the family default.

    >>> ModelSpec("lenet5", num_classes=10, in_channels=1, input_size=28).to_dict()["name"]
    'lenet5'
    """

    name: str
    num_classes: int = 10
    in_channels: int = 3
    input_size: int = 32
    widths: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.widths is not None:
            object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["widths"] = None if self.widths is None else list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        unknown = set(d) - {"name", "num_classes", "in_channels", "input_size", "widths"}
        if unknown:
            raise ValueError(f"unknown model spec fields {sorted(unknown)}")
        return cls(**dict(d))
