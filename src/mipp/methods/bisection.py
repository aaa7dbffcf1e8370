"""Target mode: search MIPP's global relative threshold τ for a requested sparsity.

Each evaluation of τ is one selection pass over every group (statistics are never
recomputed); :func:`bisect_threshold` keeps the number of passes small (typically 4–7).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["bisect_threshold"]


def bisect_threshold(
    run,
    sparsity: float,
    target: str,
    tolerance: float,
    trace: list[dict[str, float]],
    on_step: Callable[[float, dict[str, float]], None] | None = None,
    below: list | None = None,
):
    """Search the relative threshold τ until |achieved − sparsity| ≤ tolerance.

    τ = 0 first (only units adding nothing go). Its Δs give the first guess: the τ that
    would remove the missing share of units if the Δs did not change as units leave (they
    rise, so the guess is low). Then a bracket is grown around the guess in half-decade steps
    and narrowed by false position on log τ (Illinois variant, with a bisection step every
    third iteration so a step-shaped achieved(τ) cannot stall it). Each evaluation is one
    selection pass; the statistics are never recomputed.

    ``run(tau)`` returns ``(kept masks, selection results, achieved sparsity)``; every
    evaluation is appended to ``trace`` and passed to ``on_step(tau, achieved)``. Returns the
    best ``(kept, results, achieved, tau)``. When ``below`` is a list, the evaluation with the
    highest achieved sparsity not above the request is left in it as its one element (the
    start of MIPP's fill (:func:`~mipp.methods.allocation.remove_while_closer`) when
    achieved(τ) jumps over the request).
    """
    best = None
    low = None

    def attempt(log_tau: float | None) -> float:
        nonlocal best
        tau = 0.0 if log_tau is None else 10.0**log_tau
        kept, res, ach = run(tau)
        trace.append({"threshold": tau, **ach})
        if on_step is not None:
            on_step(tau, ach)
        if best is None or abs(ach[target] - sparsity) < abs(best[2][target] - sparsity):
            best = (kept, res, ach, tau)
        nonlocal low
        if ach[target] <= sparsity and (low is None or ach[target] > low[2][target]):
            low = (kept, res, ach, tau)
            if below is not None:
                below[:] = [low]
        return ach[target] - sparsity

    def done() -> bool:
        return abs(best[2][target] - sparsity) <= tolerance

    f0 = attempt(None)
    if f0 >= -tolerance:
        return best
    deltas = torch.cat([r.relative_deltas[r.support] for r in best[1]])
    deltas = deltas[torch.isfinite(deltas) & (deltas > 0)].sort().values
    units_left = sum(int(r.support.sum()) for r in best[1])
    missing = round(-f0 * units_left / max(1 - best[2][target], 1e-12))
    guess = float(deltas[min(max(missing, 1), len(deltas)) - 1]) if len(deltas) else 1e-3
    x1 = math.log10(max(guess, 1e-12))
    f1 = attempt(x1)
    if done():
        return best
    # grow a bracket [lo (f < 0), hi (f > 0)] in half-decade steps, wider each time
    step = 0.5
    lo = hi = None
    if f1 < 0:
        lo, f_lo = x1, f1
        x = x1
        while lo is not None and hi is None and x < 6:
            x = min(x + step, 6.0)
            f = attempt(x)
            if done():
                return best
            if f < 0:
                lo, f_lo = x, f
            else:
                hi, f_hi = x, f
            step *= 2
    else:
        hi, f_hi = x1, f1
        x = x1
        while lo is None and x > -12:
            x = max(x - step, -12.0)
            f = attempt(x)
            if done():
                return best
            if f > 0:
                hi, f_hi = x, f
            else:
                lo, f_lo = x, f
            step *= 2
    if lo is None or hi is None:
        return best
    side = 0
    for it in range(40):
        if it % 3 == 2 or f_hi == f_lo:
            x = 0.5 * (lo + hi)
        else:
            x = hi - f_hi * (hi - lo) / (f_hi - f_lo)
            x = min(max(x, lo + 1e-3 * (hi - lo)), hi - 1e-3 * (hi - lo))
        f = attempt(x)
        if done() or hi - lo < 1e-4:  # decades: τ resolved to 0.02 %, the rest is granularity
            break
        if f < 0:
            lo, f_lo = x, f
            if side == -1:
                f_hi /= 2  # Illinois: the same end kept twice, halve the other's weight
            side = -1
        else:
            hi, f_hi = x, f
            if side == 1:
                f_lo /= 2
            side = 1
    return best
