"""Model cost metrics: parameters, multiply-accumulates, CPU latency, layer widths.

Conventions (used throughout mipp's reports):

- **1 MAC** = one multiply plus one add = **2 FLOPs**; ``flops`` is always ``2 * macs``.
- Counted per **single sample** (the example batch size is divided out).
- ``Conv1d/2d/3d``: ``output elements × (in_channels / groups) × prod(kernel_size)``.
- ``Linear``: ``output elements × in_features`` (``out_features × in_features`` for a
  ``(1, in_features)`` input).
- ``BatchNorm1d/2d/3d``: 1 MAC per output element (inference-time scale and shift; it can
  be folded into the preceding layer, but is counted so that pruning a BN channel shows).
- Not counted: biases, activations (ReLU), pooling, residual additions, flatten.

Torch's ``torch.utils.flop_counter.FlopCounterMode`` uses the same convolution and matmul
convention (bias and elementwise ops excluded), so ``2 * (macs - BN MACs)`` equals its total.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mipp.inputs import Samples
from mipp.modules import eval_mode

__all__ = [
    "LatencyResult",
    "MacCount",
    "compare_latency",
    "count_macs",
    "count_params",
    "layer_widths",
    "measure_latency",
    "model_summary",
]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_COUNTED = (*_CONV, nn.Linear, *_BN)


@dataclass(frozen=True)
class MacCount:
    """Multiply-accumulates of one forward pass of one sample.

    Attributes:
        macs: Total MACs (1 MAC = 1 multiply + 1 add).
        per_layer: Qualified module name → MACs, for every Conv/Linear/BatchNorm module in
            model order (0 for one the forward did not reach); sums to ``macs``.
    """

    macs: int
    per_layer: dict[str, int] = field(default_factory=dict, hash=False)

    @property
    def flops(self) -> int:
        """Floating-point operations, ``2 * macs``."""
        return 2 * self.macs


@dataclass(frozen=True)
class LatencyResult:
    """Wall-clock time of one forward pass of a batch, over ``repeats`` timed runs (ms)."""

    batch_size: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    max_ms: float
    repeats: int


def count_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor counted once).

    >>> count_params(nn.Linear(3, 2))
    8
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _layer_macs(module: nn.Module, output: Tensor) -> int:
    """MACs of one call of a counted module on a whole batch (see the module docstring)."""
    if isinstance(module, _CONV):
        per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        return output.numel() * per_output
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return output.numel()  # BatchNorm


def _example(model: nn.Module, shape: Sequence[int], batch_size: int) -> Tensor:
    """Zeros of shape ``(batch_size, *shape)`` on the model's device and floating dtype."""
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.zeros((batch_size, *shape), device=device, dtype=dtype)


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(
            f"input_shape must be a non-empty sequence of positive ints without the batch "
            f"dimension, e.g. (3, 32, 32), got {input_shape!r}"
        )
    return shape


def count_macs(model: nn.Module, example: Tensor | Samples | Sequence[int]) -> MacCount:
    """Count the multiply-accumulates of one forward pass of **one sample**.

    Conventions are in the module docstring: Conv = output elements × (in/groups) × kernel
    area, Linear = output elements × in_features, BatchNorm = output elements; biases,
    activations and pooling are not counted; FLOPs = 2 × MACs.

    Args:
        model: Any module; runs once, in eval mode, without gradients, with forward hooks
            on its Conv/Linear/BatchNorm modules. Hooks are removed and every submodule's
            train/eval flag is restored afterwards, even if the forward raises.
        example: Either an input tensor ``(n, *sample_shape)`` (the counts are divided by
            ``n``), :class:`~mipp.inputs.Samples` (inputs of any form, run by their
            ``forward``; divided by n likewise) or a sample shape without the batch
            dimension, e.g. ``(3, 32, 32)``, for which a zero input ``(1, *shape)`` is built
            on the model's device and dtype.

    >>> count_macs(nn.Conv2d(3, 8, 3, padding=1), (3, 32, 32)).macs == 8 * 32 * 32 * 27
    True
    """
    if isinstance(example, Samples):
        if len(example) < 1:
            raise ValueError("example must hold at least one sample")
        x = example
    elif isinstance(example, Tensor):
        if example.dim() < 1 or example.shape[0] < 1:
            raise ValueError(f"example must have a batch dimension >= 1, got {example.shape}")
        x = example
    else:
        x = _example(model, _check_shape(example), 1)
    batch = len(x)

    names = {m: name for name, m in model.named_modules() if isinstance(m, _COUNTED)}
    totals = dict.fromkeys(names.values(), 0)

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        totals[names[module]] += _layer_macs(module, output)

    handles = []
    try:
        for m in names:
            handles.append(m.register_forward_hook(hook))
        with eval_mode(model), torch.no_grad():
            if isinstance(x, Samples):
                x.run(model)
            else:
                model(x)
    finally:
        for h in handles:
            h.remove()

    per_layer = {}
    for name, total in totals.items():
        if total % batch:
            raise ValueError(
                f"MACs of layer {name!r} ({total}) are not a multiple of the batch size "
                f"{batch}; does the model mix samples across the batch dimension?"
            )
        per_layer[name] = total // batch
    return MacCount(macs=sum(per_layer.values()), per_layer=per_layer)


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1, 64),
    repeats: int = 20,
    warmup: int = 5,
    threads: int | None = None,
) -> dict[int, LatencyResult]:
    """Time forward passes with ``time.perf_counter``, in eval mode under inference mode.

    For each batch size: ``warmup`` untimed passes, then ``repeats`` timed passes on a fixed
    random input ``(batch_size, *input_shape)`` (from a local generator seeded 0; the global
    RNG is untouched). Runs on the model's device (CUDA is synchronised around each pass;
    mipp reports CPU latency). Every submodule's train/eval flag and, when ``threads`` is
    given, torch's intra-op thread count are restored afterwards.

    Args:
        model: The module to time.
        input_shape: One sample's shape without the batch dimension, e.g. ``(3, 32, 32)``.
        batch_sizes: Batch sizes to time, each >= 1.
        repeats: Timed passes per batch size, >= 1.
        warmup: Untimed passes before timing, >= 0.
        threads: ``torch.set_num_threads`` value during timing; ``None`` keeps the current.

    Returns:
        Batch size → :class:`LatencyResult` (median, 10th/90th percentiles, min, max in ms).
    """
    shape = _check_shape(input_shape)
    sizes = tuple(batch_sizes)
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise ValueError(f"batch_sizes must be positive ints, got {batch_sizes!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")

    template = _example(model, shape, 1)
    generator = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if template.device.type == "cuda" else (lambda: None)
    previous_threads = torch.get_num_threads()
    results: dict[int, LatencyResult] = {}
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with eval_mode(model), torch.inference_mode():
            for b in sizes:
                x = torch.randn((b, *shape), generator=generator, dtype=template.dtype)
                x = x.to(template.device)
                for _ in range(warmup):
                    model(x)
                sync()
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    model(x)
                    sync()
                    times.append((time.perf_counter() - start) * 1e3)
                results[b] = _summarise(b, times)
    finally:
        torch.set_num_threads(previous_threads)
    return results


def compare_latency(
    models: Sequence[nn.Module],
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1, 64),
    repeats: int = 20,
    warmup: int = 5,
) -> list[dict[int, LatencyResult]]:
    """Time several models side by side: each repeat runs every model once, in turn.

    Interleaving puts every model under the same machine conditions, so the *ratios* of the
    medians are meaningful even on a busy machine (absolute times are not). Same input
    and conventions as :func:`measure_latency`; returns one result dict per model.
    """
    shape = _check_shape(input_shape)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if not models:
        return []
    template = _example(models[0], shape, 1)
    generator = torch.Generator().manual_seed(0)
    results: list[dict[int, LatencyResult]] = [{} for _ in models]
    with contextlib.ExitStack() as stack, torch.inference_mode():
        for m in models:
            stack.enter_context(eval_mode(m))
        for b in batch_sizes:
            x = torch.randn((b, *shape), generator=generator, dtype=template.dtype)
            x = x.to(template.device)
            for m in models:
                for _ in range(warmup):
                    m(x)
            times: list[list[float]] = [[] for _ in models]
            for _ in range(repeats):
                for i, m in enumerate(models):
                    start = time.perf_counter()
                    m(x)
                    times[i].append((time.perf_counter() - start) * 1e3)
            for i in range(len(models)):
                results[i][b] = _summarise(b, times[i])
    return results


def _summarise(batch_size: int, times_ms: list[float]) -> LatencyResult:
    if len(times_ms) >= 2:
        deciles = statistics.quantiles(times_ms, n=10, method="inclusive")
        p10, p90 = deciles[0], deciles[-1]
    else:
        p10 = p90 = times_ms[0]
    return LatencyResult(
        batch_size=batch_size,
        median_ms=statistics.median(times_ms),
        p10_ms=p10,
        p90_ms=p90,
        min_ms=min(times_ms),
        max_ms=max(times_ms),
        repeats=len(times_ms),
    )


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output units of every Conv/Linear module, by qualified name, in model order.

    ``out_channels`` for convolutions, ``out_features`` for linear layers.

    >>> layer_widths(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    {'0': 3, '2': 2}
    """
    widths = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            widths[name] = int(m.out_channels)
        elif isinstance(m, nn.Linear):
            widths[name] = int(m.out_features)
    return widths


def model_summary(model: nn.Module, input_shape: Sequence[int]) -> dict[str, object]:
    """JSON-serialisable summary: parameters, MACs, FLOPs and layer widths.

    Args:
        model: The model.
        input_shape: One sample's shape without the batch dimension, e.g. ``(3, 32, 32)``.

    Returns:
        ``{"input_shape": [...], "params": int, "trainable_params": int, "macs": int,
        "flops": int, "macs_per_layer": {name: int}, "layer_widths": {name: int}}``.
    """
    shape = _check_shape(input_shape)
    macs = count_macs(model, shape)
    return {
        "input_shape": list(shape),
        "params": count_params(model),
        "trainable_params": count_params(model, trainable_only=True),
        "macs": macs.macs,
        "flops": macs.flops,
        "macs_per_layer": dict(macs.per_layer),
        "layer_widths": layer_widths(model),
    }
