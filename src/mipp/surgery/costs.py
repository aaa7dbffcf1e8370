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
