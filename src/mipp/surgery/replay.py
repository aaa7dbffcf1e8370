"""Replaying a pruning run onto a fresh model: the pruned architecture from its record.

A pruned checkpoint stores the unpruned model's constructor arguments and the replay record
of every pruning run applied to it (:meth:`~mipp.report.PruneReport.replay_record`); loading
it builds the unpruned model, removes the recorded units through the same structural
backend, and then loads the weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mipp.errors import MippError
from mipp.modules import first_parameter
from mipp.report import PruneReport, check_replay_record
from mipp.surgery.layers import as_linears, restore_transposed
from mipp.surgery.structure import build_structure
from mipp.validation import check_model_input

__all__ = ["apply_report"]


def apply_report(model: nn.Module, report: PruneReport | Mapping[str, Any]) -> nn.Module:
    """Remove, in place, the units ``report`` removed, so ``model`` gets the pruned shapes.

    ``model`` must be the same architecture the report was made on (e.g. freshly built from
    the checkpoint's :class:`~mipp.types.ModelSpec`); its weights are irrelevant — load the
    pruned checkpoint's weights afterwards. ``report`` is a :class:`~mipp.report.PruneReport`,
    its dict, or its :meth:`~mipp.report.PruneReport.replay_record`. Returns ``model``.

    Raises:
        MippError: the model's unit groups do not match the report's.

    >>> import torch, mipp
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> result = mipp.prune(net, torch.randn(64, 4), method="l1", sparsity=0.5)
    >>> fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> apply_report(fresh, result.report)[0].out_features
    4
    """
    if isinstance(report, PruneReport):
        record = report.replay_record()
    elif "format" in report:
        record = PruneReport.from_dict(dict(report)).replay_record()
    else:
        record = check_replay_record(report)
    param = first_parameter(model)
    example = torch.zeros((2, *record["input_shape"]), dtype=param.dtype, device=param.device)
    check_model_input(model, example)  # a report of another input shape: one line
    transposed = as_linears(model)  # GPT-2's Conv1D: pruned as the Linear it is
    try:
        structure = build_structure(model, example)
        sizes = {g.name: g.size for g in structure.groups}
        for name, width in record["widths"].items():
            if sizes.get(name) != width:
                raise MippError(
                    f"cannot apply the prune report: group {name!r} has "
                    f"{sizes.get(name, 'no')} units in this model, the report expects {width}"
                )
        structure.remove(record["removed"])
    finally:
        restore_transposed(model, transposed)
    return model
