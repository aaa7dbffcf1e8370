"""Provable Filter Pruning (Liebenwein, Baykal, Lang, Feldman & Rus, ICLR 2020, "Provable
Filter Pruning for Efficient Neural Networks"): keep the units that importance sampling on
their empirical sensitivities draws, and reweight them so the next layer stays unbiased.

**Empirical sensitivity.** For a group g (units j = 1..n) and each consumer c of g, the
consumer's outputs are sampled and split into the units' contributions exactly as ThiNet
does (:meth:`~mipp.methods.baselines.thinet.ThiNet.contributions`: ``samples_per_image``
random output entries per image, over at most ``images`` calibration images): row r of
Z ``(rows, n)`` holds z_rj = Σ_{k ∈ index(j)} Σ_taps W[o_r, k, taps] · a_r[k, taps], bias
excluded, so Σ_j z_rj is the sampled pre-activation. The paper's relative importance
w_ij a_j(x) / Σ_k w_ik a_k(x) is stated for positive weights and extended to any sign by
treating the positive and negative parts separately; here the split is on each unit's
contribution:

    z⁺ = max(z, 0),  z⁻ = max(−z, 0),  g^±_rj = z^±_rj / Σ_k z^±_rk  (0 if that sum is 0)
    s_j = max over rows r, consumers c and sign ± of g^±_rj                   ∈ [0, 1]

(for a Linear consumer of ReLU outputs the sign of z_rj is the weight's: the paper's split).
Units that are no longer alive score 0.

**Sampling** (the paper's Algorithm 1, per layer ℓ): S_ℓ = Σ_j s_j, p_j = s_j / S_ℓ, and
for an (ε, δ) guarantee m_ℓ i.i.d. draws from p with

    m_ℓ(ε) = ⌊(6 + 2ε) S_ℓ log(8η/δ) / ε²⌋ = ⌊c(ε) · S_ℓ⌋

(η: the number of units in scope, the union bound; δ: ``delta``). The kept units are the
distinct ones drawn; each kept unit's consumer input weights (every consumer, every output
channel and tap) are multiplied by count_j / (m_ℓ p_j), so for a fixed m_ℓ the reweighted
pre-activation Σ_{j kept} count_j / (m_ℓ p_j) · z_j has expectation Σ_j z_j (``reweight``).

**The ε search.** Every layer's draws are one seeded stream, and a prefix of m draws keeps
the units whose first arrival T_j ≤ m: unit j is kept iff c(ε) ≥ c_j = T_j / S_ℓ. Kept sets
are therefore nested in ε, and searching the global ε for which the whole network meets the
budget is a global ranking of the units by c_j: mipp's global allocation bisects the number
of units removed along descending c_j, measuring each candidate with ``ctx.measure`` on the
budget's target (units, params or MACs) until it is within the tolerance (with mipp's
one-unit fill where one unit is coarser than the tolerance). The ε reported in the trace is
the one of c* = max c_j over the kept units. First arrivals are drawn exactly without
materialising the stream (:func:`first_arrivals`), and the counts at the chosen m_ℓ
consistently with them (:func:`stream_counts`).

**Deterministic variant** (``sample=False``): with m_ℓ draws a layer keeps k_ℓ = round(E[#
distinct]) = round(Σ_j 1 − (1 − p_j)^{m_ℓ}) units, its most sensitive ones
(:func:`expected_entries`); the same search applies, and nothing is reweighted.

**What differs from the paper.** Units are mipp's structured units (a unit may span several
channels; its contribution sums them and the taps, and the sign split is on that sum, not
per weight); the maxima run over sampled output entries, not over every output and patch;
m_ℓ is rounded down where the paper rounds up, so a layer whose bound asks for less than
one draw loses every unit (a layer collapse, which mipp records) and any sparsity can be
met; the paper optimises how the size budget is spread over layers, whereas here one ε is
shared by all layers (m_ℓ ∝ S_ℓ), and the search reads the realised draws, so m_ℓ
depends on them (the reweighting is unbiased for a fixed m_ℓ, as in the paper's bound, not
exactly for the searched one); and there is no retraining. With ``allocation="global"``,
``"uniform"`` or ``"widths"`` the sensitivities are plain scores for that allocation (no
sampling, no reweighting). Needs no labels.

>>> import torch
>>> from torch import nn
>>> import mipp
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
>>> result = mipp.prune(net, torch.randn(16, 1, 8, 8), method="pfp", sparsity=0.5)
>>> result.report.groups[0].width_after
2
>>> result.report.options["reweight"]
True
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from mipp.methods.allocation import allocate
from mipp.methods.base import Budget, Decision, PruneContext
from mipp.methods.baselines.thinet import ThiNet, scale_inputs
from mipp.methods.scored import ALLOCATIONS, Normalize

__all__ = [
    "PFP_ALLOCATIONS",
    "ProvableFilterPruning",
    "epsilon_for",
    "expected_entries",
    "first_arrivals",
    "multiplier",
    "sample_size",
    "sensitivities",
    "stream_counts",
]

PfpAllocation = Literal["pfp", "global", "uniform", "widths"]
#: ``"pfp"``: the ε search of the module docstring; the others as for every scored method
PFP_ALLOCATIONS: tuple[str, ...] = ("pfp", *ALLOCATIONS)

#: E(m) evaluations (rows × units) one block of :func:`expected_entries` may hold
_BLOCK = 2**20


def sensitivities(x: Tensor) -> Tensor:
    """Empirical sensitivities from sampled contributions → ``(units,)`` float64, in [0, 1].

    ``x``: ``(rows, units)``, row r the units' contributions z_rj to one sampled consumer
    output (bias excluded). s_j = max_r max(z⁺_rj / Σ_k z⁺_rk, z⁻_rj / Σ_k z⁻_rk) with
    z⁺ = max(z, 0) and z⁻ = max(−z, 0); a row with no part of one sign adds nothing for it.
    """
    x = x.detach().double().cpu()
    out = torch.zeros(x.shape[1], dtype=torch.float64)
    if x.shape[0] == 0:
        return out
    for part in (x.clamp_min(0), (-x).clamp_min(0)):
        total = part.sum(1, keepdim=True)
        rel = torch.where(total > 0, part / total.clamp_min(torch.finfo(torch.float64).tiny), 0)
        out = torch.maximum(out, rel.amax(0))
    return out


def multiplier(epsilon: float, delta: float, eta: int) -> float:
    """c(ε) = (6 + 2ε) log(8η/δ) / ε²: draws per unit of a layer's sensitivity sum."""
    return (6 + 2 * epsilon) * math.log(8 * eta / delta) / epsilon**2


def epsilon_for(c: float, delta: float, eta: int) -> float:
    """The ε with c(ε) = ``c`` (the positive root of c ε² − 2Lε − 6L = 0, L = log(8η/δ));
    inf for c ≤ 0."""
    if c <= 0:
        return math.inf
    big = math.log(8 * eta / delta)
    return (big + math.sqrt(big * big + 6 * big * c)) / c


def sample_size(total: float, epsilon: float, delta: float, eta: int) -> int:
    """m = ⌊(6 + 2ε) S log(8η/δ) / ε²⌋ draws for a layer whose sensitivities sum to
    ``total`` = S (the paper rounds up; see the module docstring)."""
    return math.floor(total * multiplier(epsilon, delta, eta))


def first_arrivals(p: Tensor, generator: torch.Generator) -> Tensor:
    """The draw (1-based) at which each unit first appears in an i.i.d. stream from ``p``
    → ``(n,)`` float64; inf where p_j = 0.

    Exact without materialising the stream: the order of first appearances is successive
    sampling ∝ p without replacement (Gumbel-top-k), and once k distinct units of total
    mass P_k are seen, the wait for the next new one is geometric, Geom(1 − P_k) on
    {1, 2, …}. Marginally T_j ~ Geom(p_j).
    """
    p = p.detach().double().cpu()
    out = torch.full(p.shape, math.inf, dtype=torch.float64)
    live = (p > 0).nonzero().flatten()
    if len(live) == 0:
        return out
    u = torch.rand(len(live), generator=generator, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))
    order = live[torch.argsort(p[live].log() + gumbel, descending=True, stable=True)]
    unseen = p[order].flip(0).cumsum(0).flip(0).clamp(0, 1)  # mass not seen before arrival k
    v = 1 - torch.rand(len(live), generator=generator, dtype=torch.float64)  # (0, 1]
    gaps = 1 + torch.floor(torch.log(v) / torch.log1p(-unseen))
    gaps[0] = 1  # the first draw is always new
    out[order] = gaps.cumsum(0)
    return out


def stream_counts(p: Tensor, arrivals: Tensor, m: int, generator: torch.Generator) -> Tensor:
    """Occurrences of each unit among the first ``m`` draws of the stream whose first
    arrivals are ``arrivals`` (:func:`first_arrivals`) → ``(n,)`` float64.

    Given the arrivals, the draws after each arrival and before the next one (or up to m)
    are i.i.d. over the units seen so far, ∝ p; they are spread by conditional binomials.
    Units arriving by draw m count ≥ 1, the others 0, and the counts sum to m. For a fixed
    m, count_j ~ Binomial(m, p_j), so E[count_j / (m p_j)] = 1.
    """
    p = p.detach().double().cpu()
    arrivals = arrivals.detach().double().cpu()
    counts = torch.zeros_like(p)
    seen = (arrivals <= m).nonzero().flatten()
    if len(seen) == 0:
        return counts
    seen = seen[torch.argsort(arrivals[seen], stable=True)]
    t = arrivals[seen]
    ends = torch.cat([t[1:], torch.tensor([m + 1.0], dtype=torch.float64)])
    rest = ends - t - 1  # repeat draws after arrival i, spread over seen[: i + 1]
    got = torch.ones(len(seen), dtype=torch.float64)
    ps = p[seen]
    for i in range(len(seen)):
        # interval i' >= i still has rest[i'] draws over seen[i : i' + 1]
        share = (ps[i] / ps[i:].cumsum(0)).clamp(0, 1)
        share[0] = 1.0
        draw = torch.binomial(rest[i:], share, generator=generator)
        got[i] += draw.sum()
        rest[i:] -= draw
    counts[seen] = got
    return counts


def _expected_distinct(m: Tensor, log_miss: Tensor) -> Tensor:
    """E[#distinct units in m draws] = Σ_j 1 − (1 − p_j)^m for each m → ``(len(m),)``."""
    step = max(1, _BLOCK // max(1, len(log_miss)))
    parts = [
        -torch.expm1(m[i : i + step, None] * log_miss[None, :]).sum(1)
        for i in range(0, len(m), step)
    ]
    return torch.cat(parts)


def expected_entries(p: Tensor, s: Tensor) -> Tensor:
    """Deterministic variant: the fewest draws m with which each unit is kept → ``(n,)``
    float64; inf where p_j = 0.

    With m draws a layer keeps k(m) = round(Σ_j 1 − (1 − p_j)^m) units, the highest in ``s``
    (ties: lower index first); the unit of rank r is kept from the smallest m whose expected
    number of distinct units reaches r − ½ on.
    """
    p = p.detach().double().cpu()
    out = torch.full(p.shape, math.inf, dtype=torch.float64)
    live = p > 0
    n = int(live.sum())
    if n == 0:
        return out
    ranked = torch.argsort(-torch.where(live, s.double().cpu(), -math.inf), stable=True)[:n]
    log_miss = torch.log1p(-p[live].clamp(max=1))
    need = torch.arange(1, n + 1, dtype=torch.float64) - 0.5
    hi = 1.0
    while (
        float(_expected_distinct(torch.tensor([hi], dtype=torch.float64), log_miss)[0]) < (n - 0.5)
        and hi < 2.0**1000
    ):
        hi *= 2
    lo = torch.zeros(n, dtype=torch.float64)
    high = torch.full((n,), hi, dtype=torch.float64)
    for _ in range(1100):  # E(lo) < need <= E(high); bisect to adjacent integers
        open_ = high - lo > 1
        if not bool(open_.any()):
            break
        mid = torch.floor((lo + high) / 2)
        ok = _expected_distinct(mid, log_miss) >= need
        high = torch.where(open_ & ok, mid, high)
        lo = torch.where(open_ & ~ok, mid, lo)
    out[ranked] = high
    return out


def _keys(entries: list[Tensor]) -> list[Tensor]:
    """Ranking keys for the global allocation (higher = keep): −log c_j, units that never
    enter (c_j = inf) below every other."""
    keys = [-torch.log(c) for c in entries]
    finite = torch.cat([k[torch.isfinite(k)] for k in keys])
    floor = float(finite.min()) - 1.0 if len(finite) else 0.0
    return [torch.where(torch.isfinite(k), k, floor) for k in keys]


def _draws(steps: Tensor, removed: Tensor, c: float, total: float) -> int:
    """m_ℓ = ⌊c S_ℓ⌋, kept within the draws that give exactly the decided kept set."""
    kept = steps[~removed]
    kept = kept[torch.isfinite(kept)]
    if len(kept) == 0:
        return 0
    lo = float(kept.max())
    later = steps[removed & torch.isfinite(steps) & (steps > lo)]
    hi = float(later.min()) - 1 if len(later) else math.inf
    return int(min(max(math.floor(c * total), lo), hi))


class ProvableFilterPruning(ThiNet):
    """Liebenwein et al. 2020, "Provable Filter Pruning for Efficient Neural Networks" (PFP):
    sensitivity sampling of units with one ε for the whole network, then reweighting.

    See the module docstring for the maths. Options: ``sample`` (True) draws the kept units
    (False: the most sensitive ones, as many as sampling keeps in expectation);
    ``reweight`` (None: True exactly when sampling with allocation ``"pfp"``) multiplies the
    kept units' consumer input weights by count_j / (m_ℓ p_j); ``delta`` (1e-6) the failure
    probability in m_ℓ(ε); ``samples_per_image`` (10) and ``images`` (256) as for ThiNet.
    Default allocation ``"pfp"`` (one-shot, ``rounds=1``); ``"global"``, ``"uniform"`` and
    ``"widths"`` rank the sensitivities instead (``normalize``, ``cost_aware`` and
    ``rounds`` act there as for every scored method). Seeded from the run's seed (the output
    positions first, then the draws, from one ``torch.Generator``); needs no labels.
    """

    name = "pfp"
    summary = "sensitivity sampling with one ε for all layers (Liebenwein et al. 2020, PFP)"
    default_allocation = "pfp"  # type: ignore[assignment]

    def __init__(
        self,
        *,
        allocation: PfpAllocation | None = None,
        sample: bool = True,
        reweight: bool | None = None,
        delta: float = 1e-6,
        samples_per_image: int = 10,
        images: int = 256,
        rounds: int = 1,
        normalize: Normalize = "mean",
        cost_aware: bool = False,
    ) -> None:
        if allocation is not None and allocation not in PFP_ALLOCATIONS:
            raise ValueError(f"allocation must be one of {PFP_ALLOCATIONS}, got {allocation!r}")
        own = allocation in (None, "pfp")
        super().__init__(
            allocation=None if own else allocation,  # type: ignore[arg-type]
            samples_per_image=samples_per_image,
            images=images,
            refit=False,
            rounds=rounds,
            normalize=normalize,
            cost_aware=cost_aware,
        )
        if own and rounds != 1:
            raise ValueError(f"allocation 'pfp' is one-shot; 'pfp' was given rounds={rounds}")
        if not isinstance(sample, bool):
            raise ValueError(f"sample must be True or False, got {sample!r}")
        if reweight is not None and not isinstance(reweight, bool):
            raise ValueError(f"reweight must be True, False or None (auto), got {reweight!r}")
        sampled = sample and self.allocation == "pfp"
        if reweight and not sampled:
            raise ValueError(
                f"reweight=True needs sampled units (sample=True, allocation 'pfp'); got "
                f"sample={sample!r}, allocation {self.allocation!r}"
            )
        if not (isinstance(delta, int | float) and not isinstance(delta, bool) and 0 < delta < 1):
            raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
        self.sample = sample
        self.reweight = sampled if reweight is None else reweight
        self.delta = float(delta)

    def options(self) -> dict[str, Any]:
        out = super().options()
        out.pop("refit")
        return {**out, "sample": self.sample, "reweight": self.reweight, "delta": self.delta}

    def scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        """Empirical sensitivities ``{group: (size,)}`` float64 (:func:`sensitivities`, the
        maximum over the group's consumers); units not alive score 0."""
        rows = self.contributions(ctx, ctx.groups)
        out = {}
        for g in ctx.groups:
            s = torch.zeros(g.size, dtype=torch.float64)
            for _, x in rows[g.name]:
                s = torch.maximum(s, sensitivities(x))
            s[~ctx.alive[g.name].cpu()] = 0
            out[g.name] = s
        return out

    def after_round(self, ctx: PruneContext, round: int) -> None:
        """Nothing between rounds (ThiNet re-fits here)."""

    def before_removal(self, ctx: PruneContext, removed: Mapping[str, Tensor]) -> None:
        """Multiply every consumer's input weights of each kept, sampled unit j by
        count_j / (m_ℓ p_j), in place on ``ctx.model`` (only with ``reweight``)."""
        plan = ctx.cache.get(self.name, {}).get("reweight") if self.reweight else None
        if not plan:
            return
        modules = ctx.modules
        for g in ctx.groups:
            if g.name not in plan:
                continue
            units, w = plan[g.name]
            gone = removed.get(g.name)
            if gone is not None:
                stay = ~gone.cpu()[units]
                units, w = units[stay], w[stay]
            if len(units) == 0:
                continue
            for c in g.consumers:
                scale_inputs(modules[c.layer], c, units, w)

    def decide(self, ctx: PruneContext, budget: Budget) -> Decision:
        """The ε search of the module docstring (allocation ``"pfp"``), or the scored loop."""
        if self.allocation != "pfp":
            return super().decide(ctx, budget)
        assert budget.sparsity is not None  # check() ran
        groups, names = ctx.groups, [g.name for g in ctx.groups]
        timings = ctx.timings
        t = time.perf_counter()
        ctx.report("scoring", f"{self.name}: empirical sensitivities", transient=True)
        sens = self.scores(ctx)
        timings["scoring"] = timings.get("scoring", 0.0) + time.perf_counter() - t

        t = time.perf_counter()
        gen = ctx.cache[self.name]["generator"]  # seeded from ctx.seed by the sampling
        eta = max(1, ctx.units_total)
        probs, steps, entries = {}, {}, []
        for g in groups:
            s = sens[g.name]
            total = float(s.sum())
            p = s / total if total > 0 else torch.zeros_like(s)
            step = first_arrivals(p, gen) if self.sample else expected_entries(p, s)
            probs[g.name], steps[g.name] = p, step
            entries.append(step / total if total > 0 else torch.full_like(s, math.inf))
        removed, achieved = allocate(
            _keys(entries),
            [ctx.alive[n] for n in names],
            names=names,
            method=self.name,
            mode="global",
            sparsity=budget.sparsity,
            target=budget.target,
            measure=lambda masks: ctx.measure(dict(zip(names, masks, strict=True))),
            normalize="none",
            tolerance=budget.tolerance,
        )
        kept = torch.cat([e[~r] for e, r in zip(entries, removed, strict=True)])
        kept = kept[torch.isfinite(kept)]
        c = float(kept.max()) if len(kept) else 0.0
        totals = {n: float(sens[n].sum()) for n in names}
        samples = {
            n: _draws(steps[n], r, c, totals[n]) for n, r in zip(names, removed, strict=True)
        }
        plan: dict[str, tuple[Tensor, Tensor]] = {}
        if self.reweight:
            for n, r in zip(names, removed, strict=True):
                if samples[n] == 0:
                    continue
                counts = stream_counts(probs[n], steps[n], samples[n], gen)
                units = (~r & (probs[n] > 0)).nonzero().flatten()
                plan[n] = (units, counts[units] / (samples[n] * probs[n][units]))
        ctx.cache[self.name].update(
            sensitivity=sens, entry=dict(zip(names, entries, strict=True)), multiplier=c,
            samples=samples, reweight=plan,
        )  # fmt: skip
        timings["allocation"] = timings.get("allocation", 0.0) + time.perf_counter() - t

        epsilon = epsilon_for(c, self.delta, eta)
        ctx.report(
            "scoring",
            f"{self.name}: ε = {epsilon:.4g}, {budget.target} sparsity "
            f"{achieved[budget.target]:.4f}",
            done=1,
            total=1,
            **achieved,
        )
        ctx.structure.mask(
            {n: m.nonzero().flatten().tolist() for n, m in zip(names, removed, strict=True)}
        )
        for n, m in zip(names, removed, strict=True):
            ctx.alive[n] = ~m
        decided = dict(zip(names, removed, strict=True))
        self.before_removal(ctx, decided)
        decision = Decision(
            removed=decided,
            achieved=achieved,
            groups={n: {"scores": sens[n].tolist()} for n in names},
            options=self.options(),
            trace=[
                {
                    "round": 1,
                    "goal": budget.sparsity,
                    "epsilon": epsilon,
                    "multiplier": c,
                    "samples": float(sum(samples.values())),
                    **achieved,
                }
            ],
        )
        note = budget.shortfall(achieved, "the closest ε allows")
        if note:
            decision.notes.append(note)
        return decision
