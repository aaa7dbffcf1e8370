"""Parameters and MACs of a model as a function of how many units each group keeps.

Target-mode pruning bisects a threshold and needs the achieved parameter / MAC sparsity of
each candidate without touching the model. For Conv (groups = 1), Linear and BatchNorm
layers both counts are bilinear in the kept input and output widths, so they follow exactly
from the unpruned per-layer counts (:func:`mipp.metrics.count_macs` conventions). Tests check
the prediction against physically pruned models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from mipp.metrics import count_macs, count_params
from mipp.surgery.structure import ModelStructure

__all__ = ["CostModel"]

_Kind = str  # "params" or "macs"


class CostModel:
    """Predicts ``(params, macs)`` after removing units, from one MAC-counting pass.

    ``removed[group name]`` is a bool mask (or count) of removed units per group.
    """

    def __init__(self, structure: ModelStructure, example_input: torch.Tensor) -> None:
        model = structure.model
        self.params_before = count_params(model)
        macs = count_macs(model, example_input[:1])
        self.macs_before = macs.macs
        per_layer = macs.per_layer
        self._layers: list[tuple[nn.Module, int, list, str | None]] = []
        producer_of = {p: g.name for g in structure.groups for p in g.producers}
        norm_of = {n: g.name for g in structure.groups for n in g.norms}
        self._fixed_params = self.params_before
        self._group_size = {g.name: g.size for g in structure.groups}
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear):
                ins = [(g, [len(ix) for ix in c.index]) for g, c in structure.readers.get(name, [])]
                self._layers.append((m, per_layer.get(name, 0), ins, producer_of.get(name)))
            elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                self._layers.append((m, per_layer.get(name, 0), [], norm_of.get(name)))
            else:
                continue
            self._fixed_params -= sum(p.numel() for p in m.parameters(recurse=False))

    def __call__(self, removed: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        def gone_out(group: str | None) -> int:
            if group is None or group not in removed:
                return 0
            return int(removed[group].sum())

        params = self._fixed_params
        macs = 0
        for m, layer_macs, ins, out_group in self._layers:
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                out = m.num_features
                out_a = out - gone_out(out_group)
                params += (2 * out_a) if m.affine else 0
                macs += layer_macs * out_a // out if out else 0
                continue
            if isinstance(m, nn.Linear):
                in_, out = m.in_features, m.out_features
                area = 1
            else:
                in_, out = m.in_channels, m.out_channels
                area = math.prod(m.kernel_size)
            in_gone = 0
            for group, sizes in ins:
                mask = removed.get(group)
                if mask is not None:
                    in_gone += sum(s for s, r in zip(sizes, mask.tolist(), strict=True) if r)
            in_a, out_a = in_ - in_gone, out - gone_out(out_group)
            params += out_a * in_a * area + (out_a if m.bias is not None else 0)
            macs += layer_macs * in_a * out_a // (in_ * out)
        return params, macs

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
        if kind not in ("params", "macs"):
            raise ValueError(f"kind must be 'params' or 'macs', got {kind!r}")
        out: dict[str, torch.Tensor] = {}

        def gone(group: str | None) -> int:
            if group is None or group not in removed:
                return 0
            return int(removed[group].sum())

        def add(group: str, values) -> None:
            if group not in self._group_size:
                return
            t = torch.as_tensor(values, dtype=torch.float64)
            out[group] = out[group] + t if group in out else t.clone()

        for m, layer_macs, ins, out_group in self._layers:
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                if out_group is None or not m.num_features:
                    continue
                per = (
                    (2.0 if m.affine else 0.0) if kind == "params" else layer_macs / m.num_features
                )
                size = self._group_size[out_group]
                add(out_group, [per] * size if m.num_features == size else [0.0] * size)
                continue
            if isinstance(m, nn.Linear):
                in_, out_, area = m.in_features, m.out_features, 1
            else:
                in_, out_, area = m.in_channels, m.out_channels, math.prod(m.kernel_size)
            in_gone = 0
            for group, sizes in ins:
                mask = removed.get(group)
                if mask is not None:
                    in_gone += sum(s for s, r in zip(sizes, mask.tolist(), strict=True) if r)
            in_a, out_a = in_ - in_gone, out_ - gone(out_group)
            unit_mac = layer_macs / (in_ * out_) if in_ * out_ else 0.0  # MACs per (in, out) pair
            if out_group is not None:  # a producer: one output row per unit
                if kind == "params":
                    per = in_a * area + (1 if m.bias is not None else 0)
                else:
                    per = unit_mac * in_a
                # every unit of the group has one row here (a concatenation's producer holds
                # only its own units: the others save nothing in it)
                size = self._group_size[out_group]
                add(out_group, [float(per)] * size if out_ == size else [0.0] * size)
            for group, sizes in ins:  # a consumer: the unit's input slice
                if kind == "params":
                    add(group, [float(out_a * area * s) for s in sizes])
                else:
                    add(group, [unit_mac * out_a * s for s in sizes])
        return out
