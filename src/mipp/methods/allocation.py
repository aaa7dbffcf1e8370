"""How many units each group loses, given per-unit scores (higher = keep).

Two allocations, both hitting a requested sparsity of units, parameters or MACs:

- ``"global"``: one ranking across all groups. Scores are first normalised per group
  (``normalize="mean"``: divided by the mean |score| of the group's units still in play, so
  a unit of average importance scores 1 in every layer; ``"l2"``: divided by their ℓ2 norm;
  ``"none"``: raw scores). Ties are
  broken deterministically — walk order of the group (output → input), then unit index —
  so exactly the requested number of units goes (Torch-Pruning's own global ranking drops
  every unit tied at the threshold). Global ranking may remove every unit of a group: that
  is layer collapse, which the driver records.
- ``"uniform"``: every group loses the same share ρ of its units (keeping at least one,
  rounding to the nearest unit); ρ is bisected so the overall sparsity lands on the request.
- ``"widths"``: every group keeps a given number of units (``keep``, e.g. the widths MIPP
  chose), its highest-scoring ones. This separates *allocation* (how many per layer) from
  *selection* (which ones): MIPP's widths with units chosen by L1 or at random.

Parameters and MACs move in steps: one conv filter of LeNet-5 carries 3 % of its parameters.
When the best knob setting misses the request by more than ``tolerance``, the gap is closed
from just below by removing further units, next in ranking order, one at a time whenever
that brings the measure closer (a group always keeps one). The per-layer ratios then differ
from uniform by those few units; unit targets never need this.

Both work on top of units already removed in earlier rounds (they stay removed).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from mipp.errors import MippError

__all__ = ["allocate", "normalise", "remove_while_closer"]

Measure = Callable[[list[Tensor]], dict[str, float]]


def normalise(scores: Tensor, alive: Tensor, how: str) -> Tensor:
    """Scores of one group made comparable across groups (see the module docstring)."""
    s = scores.double()
    if how == "none" or not alive.any():
        return s
    scale = s[alive].norm() if how == "l2" else s[alive].abs().mean()
    if not torch.isfinite(scale) or scale <= 0:
        return torch.zeros_like(s)
    return s / scale


def _check(scores: list[Tensor], names: list[str], method: str) -> None:
    for s, name in zip(scores, names, strict=True):
        if not torch.isfinite(s).all():
            raise MippError(
                f"method {method!r} produced non-finite scores for group {name!r}; "
                f"check the model's weights and the calibration data"
            )


def _closest(
    evaluate: Callable[[float], tuple[list[Tensor], dict[str, float]]],
    lo: float,
    hi: float,
    sparsity: float,
    target: str,
    *,
    integer: bool,
):
    """Bisect a monotone knob in [lo, hi] → (closest candidate, the candidate just below)."""
    best = below = None

    def attempt(v):
        nonlocal best, below
        removed, ach = evaluate(v)
        if best is None or abs(ach[target] - sparsity) < abs(best[1][target] - sparsity) - 1e-12:
            best = (removed, ach)
        if ach[target] <= sparsity and (below is None or ach[target] >= below[1][target]):
            below = (removed, ach)
        return ach[target]

    if attempt(lo) >= sparsity or attempt(hi) <= sparsity:
        return best, below
    for _ in range(64):
        if (integer and hi - lo <= 1) or (not integer and hi - lo < 1e-9):
            break
        mid = (lo + hi) // 2 if integer else 0.5 * (lo + hi)
        if attempt(mid) < sparsity:
            lo = mid
        else:
            hi = mid
    return best, below


def _fill(
    best, below, order: list[tuple[int, int]], measure: Measure, sparsity, target, tolerance: float
):
    """Close a gap the knob's granularity leaves (e.g. params, where one filter can be 3 %).

    Starting from the candidate just below the request, the next units in ``order`` (group,
    unit) whose removal brings the measure closer are removed one by one; a group always
    keeps one unit. Used only when the bisection's best is off by more than ``tolerance``.
    """
    if best is None or below is None or abs(best[1][target] - sparsity) <= tolerance:
        return best
    removed, ach, _ = remove_while_closer(
        below[0], below[1], order, measure, sparsity, target,
        stop=tolerance / 4, min_keep=[1] * len(below[0]),
    )  # fmt: skip
    if abs(ach[target] - sparsity) < abs(best[1][target] - sparsity):
        return removed, ach
    return best


def remove_while_closer(
    removed: list[Tensor],
    achieved: dict[str, float],
    order: list[tuple[int, int]],
    measure: Measure,
    sparsity: float,
    target: str,
    *,
    stop: float,
    min_keep: list[int],
) -> tuple[list[Tensor], dict[str, float], int]:
    """From the removal masks ``removed`` (achieving ``achieved``), remove the units of
    ``order`` ((group, unit) pairs) one at a time, each only if it brings the ``target``
    sparsity closer to ``sparsity`` and leaves group g at least ``min_keep[g]`` units; stop
    once within ``stop``. Returns the new masks, their sparsity and how many units went.
    Shared by the baselines' allocation and MIPP's fill after its bisection."""
    removed = [r.clone() for r in removed]
    ach, count = achieved, 0
    for gi, u in order:
        if abs(ach[target] - sparsity) <= stop:
            break
        if removed[gi][u] or int((~removed[gi]).sum()) <= min_keep[gi]:
            continue
        removed[gi][u] = True
        trial = measure(removed)
        if abs(trial[target] - sparsity) < abs(ach[target] - sparsity):
            ach, count = trial, count + 1
        else:  # no closer (or overshoots): keep it, a cheaper unit later may fit
            removed[gi][u] = False
    return removed, ach, count


def allocate(
    scores: list[Tensor],
    alive: list[Tensor],
    *,
    names: list[str],
    method: str,
    mode: str,
    sparsity: float,
    target: str,
    measure: Measure,
    normalize: str = "mean",
    tolerance: float = 0.01,
    keep: list[int] | None = None,
    cost: list[Tensor] | None = None,
) -> tuple[list[Tensor], dict[str, float]]:
    """Choose which units to remove → (removed bool mask per group, achieved sparsity).

    ``scores[i]`` / ``alive[i]`` belong to group ``names[i]`` (walk order); units not alive
    are already removed and stay so. ``measure(removed)`` gives the sparsity of units,
    params and MACs of a candidate removal. ``keep[i]`` (mode ``"widths"`` only) is the
    number of units group ``names[i]`` keeps; 0 removes the whole group (layer collapse).
    ``cost[i]`` (mode ``"global"`` only) divides group i's normalised scores per unit: the
    ranking becomes score per unit of cost (a unit that costs nothing is ranked by +inf
    when its score is positive, i.e. removed last).
    """
    _check(scores, names, method)
    base = [~a for a in alive]
    if mode == "widths":
        if keep is None or len(keep) != len(scores):
            raise ValueError(
                f"allocation 'widths' needs one width per group ({len(scores)}), got {keep!r}"
            )
        removed = []
        for s, a, k, name in zip(scores, alive, keep, names, strict=True):
            if not 0 <= k <= int(a.sum()):
                raise ValueError(
                    f"group {name!r} has {int(a.sum())} units left; cannot keep {k} of them"
                )
            idx = a.nonzero().flatten()
            # ascending score, ties by unit index; the lowest len(idx) - k go
            ranked = idx[torch.sort(s.double()[idx], stable=True).indices]
            r = ~a.clone()
            r[ranked[: len(idx) - k]] = True
            removed.append(r)
        return removed, measure(removed)
    if mode == "global":
        keys_s, keys_g, keys_u = [], [], []
        for gi, (s, a) in enumerate(zip(scores, alive, strict=True)):
            ns = normalise(s, a, normalize)
            if cost is not None:
                ns = ns / cost[gi].double()
                ns = torch.nan_to_num(ns, nan=0.0)
            idx = a.nonzero().flatten()
            keys_s.append(ns[idx].numpy())
            keys_g.append(np.full(len(idx), gi))
            keys_u.append(idx.numpy())
        s_all, g_all, u_all = (np.concatenate(k) for k in (keys_s, keys_g, keys_u))
        order = np.lexsort((u_all, g_all, s_all))  # ascending score, then group, then unit

        def evaluate(k):
            removed = [b.clone() for b in base]
            for j in order[: int(k)]:
                removed[int(g_all[j])][int(u_all[j])] = True
            return removed, measure(removed)

        best, below = _closest(evaluate, 0, len(order), sparsity, target, integer=True)
        ranked = [(int(g_all[j]), int(u_all[j])) for j in order]
        return _fill(best, below, ranked, measure, sparsity, target, tolerance)
    if mode == "uniform":
        ranked = []
        for s, a in zip(scores, alive, strict=True):
            idx = a.nonzero().flatten()
            # ascending score, ties by unit index (a stable sort of index-ordered units)
            ranked.append(idx[torch.sort(s.double()[idx], stable=True).indices])

        def evaluate(rho):
            removed = [b.clone() for b in base]
            for r, rk in zip(removed, ranked, strict=True):
                width = len(r)
                keep = max(1, round(width * (1 - rho)))
                extra = max(0, (width - keep) - int(r.sum()))
                r[rk[:extra]] = True
            return removed, measure(removed)

        best, below = _closest(evaluate, 0.0, 1.0, sparsity, target, integer=False)
        # the fill takes units in global normalised-score order
        flat = [
            (float(ns), gi, int(u))
            for gi, (s, a) in enumerate(zip(scores, alive, strict=True))
            for u, ns in zip(
                a.nonzero().flatten().tolist(),
                normalise(s, a, normalize)[a].tolist(),
                strict=True,
            )
        ]
        ranked = [(gi, u) for _, gi, u in sorted(flat)]
        return _fill(best, below, ranked, measure, sparsity, target, tolerance)
    raise ValueError(f"allocation must be 'global', 'uniform' or 'widths', got {mode!r}")
