"""Method conformance: a method run through the one pipeline on a tiny model must behave.

:func:`check_method` prunes :func:`tiny_model` (two convolutions with BatchNorm, two Linear
layers; one BatchNorm frozen in eval inside a model in train mode) with ``method`` and returns
what is wrong — an empty list means the method conforms:

- the report is valid: every group's kept and removed units partition it, widths and unit
  counts agree with the model, parameters and MACs are the pruned model's, the achieved
  sparsity is within the tolerance of the request (or a note says why not), and the report
  survives a JSON round trip;
- the report replays onto a freshly built model: same shapes, and the pruned weights load
  into it and give the same outputs;
- no forward hook is left on the input or the pruned model;
- the input model is untouched: bit-identical state and the same train/eval mode per module;
- the pruned model has each module's mode of the input model;
- with ``exact=True`` (methods that only choose units, without changing weights), the pruned
  model computes exactly what the original does with the removed units silenced.

>>> check_method("l1")
[]
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mipp.methods import Method
from mipp.metrics import count_macs, count_params
from mipp.pipeline import PruneResult, prune
from mipp.report import PruneReport
from mipp.surgery.replay import apply_report
from mipp.surgery.structure import build_structure
from mipp.zoo.training import seeded

__all__ = ["check_method", "tiny_data", "tiny_model"]


def tiny_model(seed: int = 0) -> nn.Module:
    """Conv(1→6)-BN-ReLU → Conv(6→8)-BN-ReLU → pool → Linear(32→12)-ReLU → Linear(12→4), for
    ``(n, 1, 8, 8)`` inputs; in train mode, with the second BatchNorm frozen in eval and
    non-trivial running statistics."""
    with seeded(seed):
        net = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32, 12),
            nn.ReLU(),
            nn.Linear(12, 4),
        )
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)
    net.train()
    net[4].eval()
    return net


def tiny_data(n: int = 256, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Inputs ``(n, 1, 8, 8)`` and labels ``(n,)`` in 0..3, seeded."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return x, y


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _report_problems(report: PruneReport, result: PruneResult, x: Tensor) -> list[str]:
    out = []
    for g in report.groups:
        if sorted(g.kept + g.removed) != list(range(g.width_before)):
            out.append(f"group {g.name}: kept + removed do not partition its {g.width_before}")
        expect = 0 if g.collapsed else len(g.kept)
        if g.width_after != expect:
            out.append(f"group {g.name}: width_after {g.width_after}, expected {expect}")
    if report.units_before != sum(g.width_before for g in report.groups):
        out.append("units_before is not the sum of the groups' widths")
    if report.units_after != sum(g.width_after for g in report.groups):
        out.append("units_after is not the sum of the groups' widths after")
    if report.params_after != count_params(result.model):
        out.append(f"params_after {report.params_after} != the pruned model's")
    if report.macs_after != count_macs(result.model, x[:1]).macs:
        out.append(f"macs_after {report.macs_after} != the pruned model's")
    if report.requested is not None:
        gap = abs(report.achieved[report.target] - report.requested)
        if gap > report.options.get("tolerance", 0.01) + 1e-12 and not report.notes:
            out.append(f"achieved misses the request by {gap:.4f} and no note says why")
    text = report.to_json()
    if PruneReport.from_dict(json.loads(text)).to_json() != text:
        out.append("the report does not survive a JSON round trip")
    return out


def check_method(
    method: str | Method | Callable[[], Method],
    *,
    sparsity: float = 0.5,
    exact: bool = True,
    labels: bool = True,
) -> list[str]:
    """Run ``method`` (a name, an object, or a factory giving a fresh one) through
    :func:`mipp.prune` on :func:`tiny_model` and return every violation found (see the
    module docstring); ``labels=False`` gives it unlabelled inputs."""
    if callable(method) and not isinstance(method, Method):
        method = method()
    model = tiny_model()
    x, y = tiny_data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = _modes(model)
    problems: list[str] = []
    try:
        # no repairs: the exactness check compares with the masked original
        result = prune(
            model,
            (x, y) if labels else x,
            method=method,
            sparsity=sparsity,
            compensate=False,
            recalibrate_bn=False,
        )
    except Exception as e:  # a conformance check reports, it does not stop at the first fault
        return [f"prune raised {type(e).__name__}: {e}"]
    report = result.report

    problems += _report_problems(report, result, x)
    if any(not torch.equal(state[k], v) for k, v in model.state_dict().items()):
        problems.append("the input model's weights or buffers changed")
    if _modes(model) != modes:
        problems.append("the input model's train/eval modes changed")
    if _modes(result.model) != modes:
        problems.append("the pruned model does not have the input model's modes per module")
    if _hooks(model) or _hooks(result.model):
        problems.append("forward/backward hooks were left on a model")

    fresh = apply_report(tiny_model(seed=1), PruneReport.from_dict(report.to_dict()))
    shapes = {k: v.shape for k, v in result.model.state_dict().items()}
    if {k: v.shape for k, v in fresh.state_dict().items()} != shapes:
        problems.append("the report does not replay onto a fresh model (shapes differ)")
    else:
        fresh.load_state_dict(result.model.state_dict())
        fresh.eval()
        pruned = copy.deepcopy(result.model).eval()
        with torch.no_grad():
            if not torch.equal(fresh(x[:16]), pruned(x[:16])):
                problems.append("the replayed model with the pruned weights computes otherwise")

    if exact:
        masked = copy.deepcopy(model).eval().double()
        structure = build_structure(masked, x[:2].double())
        silenced = {g.name: g.removed + (g.kept if g.collapsed else []) for g in report.groups}
        structure.mask(silenced)
        pruned = copy.deepcopy(result.model).eval().double()
        with torch.no_grad():
            gap = (pruned(x.double()) - masked(x.double())).abs().max().item()
        if gap > 1e-9:
            problems.append(f"the pruned model differs from the masked original by {gap:.3g}")
    return problems
