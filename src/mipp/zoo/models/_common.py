"""Validation and initialisation shared by the model families (private)."""

from __future__ import annotations

from torch import nn

__all__ = ["check_common", "check_width_mult", "check_widths", "init_weights"]


def check_common(
    *, num_classes: int, in_channels: int, input_size: int, min_input_size: int, model: str
) -> None:
    """Raise ``ValueError`` naming the bad value when a constructor option is out of range."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{model}: num_classes must be an integer >= 1, got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"{model}: in_channels must be an integer >= 1, got {in_channels!r}")
    if (
        isinstance(input_size, bool)
        or not isinstance(input_size, int)
        or input_size < min_input_size
    ):
        raise ValueError(
            f"{model}: input_size must be an integer >= {min_input_size}, got {input_size!r}"
        )


def check_width_mult(width_mult: float, *, model: str) -> None:
    """Raise ``ValueError`` naming the bad value unless ``width_mult`` is a number in (0, 4]."""
    if isinstance(width_mult, bool) or not isinstance(width_mult, int | float):
        raise ValueError(f"{model}: width_mult must be a number > 0, got {width_mult!r}")
    if not 0 < width_mult <= 4:
        raise ValueError(f"{model}: width_mult must be in (0, 4], got {width_mult!r}")


def check_widths(widths: tuple[int, ...], *, expected_len: int | None, model: str) -> None:
    """Raise ``ValueError`` unless ``widths`` holds ``expected_len`` integers >= 1."""
    if expected_len is not None and len(widths) != expected_len:
        raise ValueError(
            f"{model}: widths must have {expected_len} entries, got {len(widths)}: {widths!r}"
        )
    if expected_len is None and len(widths) == 0:
        raise ValueError(f"{model}: widths must not be empty")
    for w in widths:
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"{model}: every width must be an integer >= 1, got {widths!r}")


def init_weights(model: nn.Module) -> None:
    """Standard initialisation, in place.

    Conv weights: Kaiming normal, ``mode="fan_out"``, ReLU gain (He et al. 2015); conv
    biases 0. BatchNorm: weight 1, bias 0. Linear: PyTorch's default (left untouched).
    Uses the global RNG: seeding is the caller's business.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
