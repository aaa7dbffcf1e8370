"""Parameters, MACs and latency of a model as a function of how many units each group keeps.

Target-mode pruning bisects a threshold and needs the achieved parameter / MAC sparsity of
each candidate without touching the model. For Conv (groups = 1), Linear and BatchNorm
layers both counts are bilinear in the kept input and output widths, so they follow exactly
from the unpruned per-layer counts (:func:`mipp.metrics.count_macs` conventions). Tests check
the prediction against physically pruned models.

Latency is predicted the same way from a measured per-layer table
(:func:`measure_layer_latency`): each Conv / Linear layer's time scales with its kept
input × output widths, each BatchNorm's with its kept width, and the rest of the forward
(activations, pooling, Python) is a fixed cost. It is a model of the time, not a measurement
of the pruned network: latency does not shrink exactly bilinearly (kernel choice, memory),
so measure the pruned model too (``mipp compare``).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from mipp.inputs import Samples, as_samples
from mipp.metrics import count_macs, count_params
from mipp.surgery.layers import conv_groups, is_depthwise, is_norm, norm_width
from mipp.surgery.structure import ModelStructure

__all__ = ["CostModel", "LatencyTable", "measure_layer_latency"]

_Kind = str  # "params", "macs" or "latency"
_TIMED = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.GroupNorm,
    nn.LayerNorm,
)


@dataclass(frozen=True)
class LatencyTable:
    """Measured forward times of one model: ``per_layer[name]`` seconds for each Conv /
    Linear / BatchNorm layer and ``total`` seconds for the whole forward, medians over the
    repeats, at ``batch_size`` inputs on ``device``."""

    per_layer: dict[str, float]
    total: float
    batch_size: int
    device: str


def measure_layer_latency(
    model: nn.Module,
    example: torch.Tensor | Samples,
    *,
    batch_size: int = 64,
    repeats: int = 10,
    warmup: int = 2,
) -> LatencyTable:
    """Time every Conv / Linear / BatchNorm layer of ``model`` (eval mode, no grad) on a batch
    of ``batch_size`` inputs built from ``example`` ``(n, *input_shape)`` or
    :class:`~mipp.inputs.Samples` (its first rows, repeated if it has fewer), on the model's
    device.

    A layer's time is the wall clock between its forward pre-hook and its forward hook (the
    device is synchronised at both on CUDA), the median over ``repeats`` forwards after
    ``warmup`` ones; ``total`` is the median time of the whole forward. The model's modes are
    restored and the hooks removed, even on error.
    """
    for label, v, low in (
        ("batch_size", batch_size, 1),
        ("repeats", repeats, 1),
        ("warmup", warmup, 0),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{label} must be an integer >= {low}, got {v!r}")
    example = as_samples(example)
    param = next(model.parameters(), None)
    device = param.device if param is not None else example.device
    x = example[torch.arange(batch_size) % len(example)].to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, _TIMED)}
    times: dict[str, list[float]] = {n: [] for n in layers}
    start: dict[str, float] = {}
    recording = [False]
    handles = []

    def pre(name):
        def hook(mod, args):
            if recording[0]:
                sync()
                start[name] = time.perf_counter()

        return hook

    def post(name):
        def hook(mod, args, out):
            if recording[0]:
                sync()
                times[name].append(time.perf_counter() - start[name])

        return hook

    modes = [(m, m.training) for m in model.modules()]
    totals: list[float] = []
    try:
        model.eval()
        for n, m in layers.items():
            handles.append(m.register_forward_pre_hook(pre(n)))
            handles.append(m.register_forward_hook(post(n)))
        with torch.no_grad():
            for i in range(warmup + repeats):
                recording[0] = i >= warmup
                sync()
                t = time.perf_counter()
                x.run(model)
                sync()
                if recording[0]:
                    totals.append(time.perf_counter() - t)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    per_layer = {n: statistics.median(v) if v else 0.0 for n, v in times.items()}
    return LatencyTable(per_layer, statistics.median(totals), batch_size, str(device))


class CostModel:
    """Predicts ``(params, macs)`` after removing units, from one MAC-counting pass, and
    the latency (:meth:`latency`) when given a measured :class:`LatencyTable`.

    ``removed[group name]`` is a bool mask (or count) of removed units per group.
    """

    def __init__(
        self,
        structure: ModelStructure,
        example_input: torch.Tensor | Samples,
        *,
        latency: LatencyTable | None = None,
    ) -> None:
        model = structure.model
        self.table = latency
        self.latency_before = latency.total if latency is not None else None
        self.params_before = count_params(model)
        macs = count_macs(model, example_input[:1])
        self.macs_before = macs.macs
        per_layer = macs.per_layer
        self._layers: list[tuple[nn.Module, int, list, str | None]] = []
        producer_of = {p: g.name for g in structure.groups for p in g.producers}
        # per-channel layers: BatchNorms and depthwise convs (their filter is the channel's)
        norm_of = {n: g.name for g in structure.groups for n in [*g.norms, *g.channelwise]}
        self._ties = {g.name: g.ties for g in structure.groups}
        self._fixed_params = self.params_before
        self._times: list[float] = []  # measured seconds per entry of _layers (latency)
        self._group_size = {g.name: g.size for g in structure.groups}
        for name, m in model.named_modules():
            if _per_channel(m):
                self._layers.append((m, per_layer.get(name, 0), [], norm_of.get(name)))
            elif isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear):
                ins = [(g, [len(ix) for ix in c.index]) for g, c in structure.readers.get(name, [])]
                self._layers.append((m, per_layer.get(name, 0), ins, producer_of.get(name)))
            else:
                continue
            self._times.append(latency.per_layer.get(name, 0.0) if latency is not None else 0.0)
            self._fixed_params -= sum(p.numel() for p in m.parameters(recurse=False))

    def __call__(self, removed: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        params = self._fixed_params
        macs = 0
        for m, layer_macs, ins, out_group in self._layers:
            if _per_channel(m):
                out = _widths(m)[1]
                out_a = out - self._gone(removed, out_group)
                params += out_a * _channel_params(m)
                macs += layer_macs * out_a // out if out else 0
                continue
            in_, out, area = _widths(m)
            in_a, out_a = in_ - _in_gone(removed, ins), out - self._gone(removed, out_group)
            params += out_a * in_a * area // conv_groups(m) + (out_a if m.bias is not None else 0)
            macs += layer_macs * in_a * out_a // (in_ * out)
        return params, macs

    def _gone(self, removed: Mapping[str, torch.Tensor], group: str | None) -> int:
        """Channels removed from ``group`` (units × channels per unit)."""
        if group is None or group not in removed:
            return 0
        return int(removed[group].sum()) * self._ties.get(group, 1)

    def latency(self, removed: Mapping[str, torch.Tensor]) -> float:
        """Predicted forward seconds after removing ``removed`` (see the module docstring):
        the table's total, with each timed layer scaled by its kept share of input × output
        widths (BatchNorm: of its width). Needs a :class:`LatencyTable`."""
        if self.table is None:
            raise ValueError("this CostModel has no latency table (CostModel(..., latency=))")
        seconds = self.table.total - sum(self._times)
        for (m, _, ins, out_group), t in zip(self._layers, self._times, strict=True):
            in_, out_, _ = _widths(m)
            out_a = out_ - self._gone(removed, out_group)
            if _per_channel(m):
                seconds += t * out_a / out_ if out_ else 0.0
                continue
            in_a = in_ - _in_gone(removed, ins)
            seconds += t * in_a * out_a / (in_ * out_) if in_ * out_ else 0.0
        return seconds

    def unit_costs(
        self, removed: Mapping[str, torch.Tensor], kind: _Kind
    ) -> dict[str, torch.Tensor]:
        """What removing each single unit saves, given the removals ``removed`` already made.

        Returns ``{group: float64 (size,)}`` with, for unit j of group g, the ``kind``
        (``"params"`` or ``"macs"``) that goes with it: its rows in every producer (weights
        over the producer's kept inputs, bias, BatchNorm scale and shift) and its input
        slices in every consumer (over the consumer's kept outputs). Counts are bilinear in
        the widths, so this is the exact first difference of :meth:`__call__` for one unit
        (a unit shared by a producer and a consumer of the same layer counts both slices).

        >>> from torch import nn
        >>> from mipp.surgery.structure import build_structure
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> st = build_structure(net, torch.zeros(2, 4))
        >>> CostModel(st, torch.zeros(2, 4)).unit_costs({}, "params")["0"][:2].tolist()
        [8.0, 8.0]
        """
        if kind not in ("params", "macs", "latency"):
            raise ValueError(f"kind must be 'params', 'macs' or 'latency', got {kind!r}")
        if kind == "latency" and self.table is None:
            raise ValueError("latency costs need a LatencyTable (CostModel(..., latency=))")
        out: dict[str, torch.Tensor] = {}

        def add(group: str, values) -> None:
            if group not in self._group_size:
                return
            t = torch.as_tensor(values, dtype=torch.float64)
            out[group] = out[group] + t if group in out else t.clone()

        for (m, layer_macs, ins, out_group), seconds in zip(self._layers, self._times, strict=True):
            if kind == "latency":  # time scales like MACs: the same formulas, other weights
                layer_macs = seconds
            width = _widths(m)[1]
            if _per_channel(m):
                if out_group is None or not width:
                    continue
                per = _channel_params(m) if kind == "params" else layer_macs / width
                size, ties = self._group_size[out_group], self._ties[out_group]
                add(out_group, [per * ties] * size if width == size * ties else [0.0] * size)
                continue
            in_, out_, area = _widths(m)
            in_a, out_a = in_ - _in_gone(removed, ins), out_ - self._gone(removed, out_group)
            unit_mac = layer_macs / (in_ * out_) if in_ * out_ else 0.0  # MACs per (in, out) pair
            per_group = conv_groups(m)  # a grouped conv's row reads in/groups inputs
            if out_group is not None:  # a producer: one output row per channel of the unit
                if kind == "params":
                    per = in_a * area / per_group + (1 if m.bias is not None else 0)
                else:
                    per = unit_mac * in_a
                # every unit of the group has its rows here (a concatenation's producer holds
                # only its own units: the others save nothing in it)
                size, ties = self._group_size[out_group], self._ties[out_group]
                add(out_group, [float(per) * ties] * size if out_ == size * ties else [0.0] * size)
            for group, sizes in ins:  # a consumer: the unit's input slice
                if kind == "params":
                    add(group, [float(out_a * area * s / per_group) for s in sizes])
                else:
                    add(group, [unit_mac * out_a * s for s in sizes])
        return out


def _per_channel(m: nn.Module) -> bool:
    """A layer holding parameters per channel only: a normalisation or a depthwise conv."""
    return is_norm(m) or is_depthwise(m)


def _channel_params(m: nn.Module) -> int:
    """Parameters a per-channel layer holds for one channel."""
    if is_norm(m):
        return sum(p is not None for p in (m.weight, m.bias))
    return math.prod(m.kernel_size) + (1 if m.bias is not None else 0)


def _widths(m: nn.Module) -> tuple[int, int, int]:
    """(input width, output width, kernel area) of a Conv / Linear; a norm: (w, w, 1)."""
    if is_norm(m):
        return norm_width(m), norm_width(m), 1
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features, 1
    return m.in_channels, m.out_channels, math.prod(m.kernel_size)


def _in_gone(removed: Mapping[str, torch.Tensor], ins: list) -> int:
    gone = 0
    for group, sizes in ins:
        mask = removed.get(group)
        if mask is not None:
            gone += sum(s for s, r in zip(sizes, mask.tolist(), strict=True) if r)
    return gone
