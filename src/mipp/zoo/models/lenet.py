"""LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling, as commonly used for pruning."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mipp.zoo.models._common import check_common, check_widths, init_weights

__all__ = ["LENET_MIN_INPUT_SIZE", "LeNet5", "lenet5"]

#: Smallest supported ``input_size``: the second pooling must leave at least 1×1.
LENET_MIN_INPUT_SIZE = 12


def _lenet_geometry(input_size: int) -> tuple[int, int]:
    """Return ``(conv1 padding, spatial side after pool2)`` for a square input."""
    padding = 2 if input_size < 32 else 0
    side = input_size + 2 * padding - 4  # conv1, 5×5
    side //= 2  # pool1
    side -= 4  # conv2, 5×5
    side //= 2  # pool2
    return padding, side


class LeNet5(nn.Module):
    """LeNet-5: two 5×5 conv layers and three fully connected layers.

    ``conv1(5×5) → relu1 → pool1(2) → conv2(5×5) → relu2 → pool2(2) → flatten →
    fc1 → relu3 → fc2 → relu4 → fc3``.

    Inputs smaller than 32 px get ``padding=2`` on ``conv1`` (the classic MNIST variant), so
    28 px and 32 px inputs both reach ``fc1`` with ``16·5·5 = 400`` features and the
    parameter count is the classic 61,706 (1 channel, 10 classes, default widths). For other
    sizes the flatten size is computed: ``16·s·s`` with ``s`` the side after ``pool2``.

    Args:
        in_channels: Input channels.
        num_classes: Output units.
        input_size: Side of the square input, >= 12.
        widths: ``(conv1, conv2, fc1, fc2)`` output widths.

    Shapes: ``(n, in_channels, input_size, input_size)`` → ``(n, num_classes)``.

    >>> import torch
    >>> LeNet5(input_size=28)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 32,
        widths: Sequence[int] = (6, 16, 120, 84),
    ) -> None:
        super().__init__()
        check_common(
            num_classes=num_classes,
            in_channels=in_channels,
            input_size=input_size,
            min_input_size=LENET_MIN_INPUT_SIZE,
            model="LeNet5",
        )
        widths = tuple(widths)
        check_widths(widths, expected_len=4, model="LeNet5")
        c1, c2, f1, f2 = widths
        padding, side = _lenet_geometry(input_size)

        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=5, padding=padding)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c2 * side * side, f1)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(f1, f2)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(f2, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """``(n, c, h, w)`` → logits ``(n, num_classes)``."""
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.flatten(x)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


def lenet5(
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int = 32,
    widths: Sequence[int] | None = None,
) -> LeNet5:
    """:class:`LeNet5` (widths default 6, 16, 120, 84)."""
    return LeNet5(
        in_channels=in_channels,
        num_classes=num_classes,
        input_size=input_size,
        widths=(6, 16, 120, 84) if widths is None else widths,
    )
