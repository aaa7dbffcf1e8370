"""Second-order saliencies: Optimal Brain Damage, structured (LeCun, Denker & Solla 1989), the
Kronecker-factored structured saliency of EigenDamage (Wang et al. 2019), and Optimal Brain
Surgeon with WoodFisher's empirical Fisher (Hassibi & Stork 1992; Singh & Alistarh 2020).

OBD removes the parameters whose deletion raises the loss least under a quadratic model with a
diagonal Hessian, ``δL ≈ ½ Σ_w h_ww w²`` (the gradient term vanishes at a trained minimum). The
paper approximates h_ww by the Gauss–Newton (Levenberg–Marquardt) diagonal, dropping the
second derivatives of the network's output; for the cross-entropy that is the diagonal of the
generalised Gauss–Newton matrix

    G = (1/n) Σ_i J_iᵀ H_i J_i,    H_i = diag(p_i) − p_i p_iᵀ,    J_i = ∂f(x_i)/∂θ,

computed here exactly (:func:`ggn_diagonal`), not by the paper's layer-local recursion, which
adds a further approximation. Structured: removing a unit deletes its weight rows and bias
entries, and under the diagonal model their saliencies add, so a unit's score is
``s_j = ½ Σ_{w ∈ unit j} G_ww w²`` (no absolute value is needed: G_ww ≥ 0).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mipp import distributed
from mipp.errors import MippError
from mipp.inputs import as_samples
from mipp.methods.base import PruneContext
from mipp.methods.baselines.gradient import Batches, _count, _scoring, layer_parameters
from mipp.methods.mipp import machine_memory
from mipp.methods.scored import Allocation, Normalize, ScoredMethod, unit_sum

__all__ = [
    "KFACOBD",
    "OBD",
    "OBS",
    "ggn_diagonal",
    "kfac_saliency",
    "per_sample_gradients",
]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


def _per_sample_squares(module: nn.Module, a: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """Σ_i (∂/∂W of sample i)² and Σ_i (∂/∂b of sample i)² for one layer, from its input
    ``a`` and the backpropagated signal ``delta`` at its output (samples independent)."""
    if isinstance(module, nn.Linear):
        if a.ndim > 2:  # tokens: (b, ..., in) → per-sample sums over the positions
            a2 = a.flatten(1, -2)
            d2 = delta.flatten(1, -2)
            per = torch.einsum("bpo,bpi->boi", d2, a2)
            return per.pow(2).sum(0), d2.sum(1).pow(2).sum(0)
        return delta.pow(2).T @ a.pow(2), delta.pow(2).sum(0)
    if isinstance(module, nn.Conv1d):
        a, delta = a.unsqueeze(2), delta.unsqueeze(2)
        kernel, stride = (1, *module.kernel_size), (1, *module.stride)
        padding, dilation = (0, *module.padding), (1, *module.dilation)
    else:
        kernel, stride = module.kernel_size, module.stride
        padding, dilation = module.padding, module.dilation
    if isinstance(padding, str):
        raise MippError(f"OBD: padding={padding!r} convolutions are not supported")
    cols = F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)  # (b, Ck, P)
    b, groups = a.shape[0], module.groups
    d = delta.reshape(b, groups, delta.shape[1] // groups, -1)  # (b, G, O/G, P)
    c = cols.reshape(b, groups, cols.shape[1] // groups, -1)  # (b, G, I/G·k, P)
    per = torch.einsum("bgop,bgip->bgoi", d, c).reshape(b, delta.shape[1], -1)
    return per.pow(2).sum(0).reshape(module.weight.shape), d.sum(-1).pow(2).sum(0).flatten()


def ggn_diagonal(
    model: nn.Module, batches: Batches, *, max_classes: int = 64, draws: int = 16, seed: int = 0
) -> dict[int, Tensor]:
    """The diagonal of the Gauss–Newton matrix G of the mean cross-entropy, for the weight and
    bias of every Conv1d / Conv2d / Linear layer: ``{id(param): tensor like param}``.

    Exact for at most ``max_classes`` outputs: with H_i = Σ_k λ_ik u_ik u_ikᵀ (its
    eigendecomposition), G = (1/n) Σ_i Σ_k (J_iᵀ s_ik)(J_iᵀ s_ik)ᵀ, s_ik = √λ_ik u_ik, so one
    backward pass per k with output gradients s_k gives every sample's J_iᵀ s_ik at once
    (the samples of a batch do not interact in eval mode), and each layer's per-sample
    weight gradients — from its input and the signal at its output, unfolded for a conv — are
    squared and summed. With more classes, ``draws`` labels y ~ p_i per sample give the
    Monte-Carlo Fisher, an unbiased estimate of the same diagonal (seeded by ``seed``).
    Labels are not used. The model runs as it is (set eval mode yourself).
    """
    layers = [m for m in model.modules() if isinstance(m, _LAYERS)]
    total: dict[int, Tensor] = {}
    for m in layers:
        for p in (m.weight, m.bias):
            if p is not None:
                total.setdefault(id(p), torch.zeros_like(p, dtype=torch.float64))
    n = _count(batches)
    passes = _signal_gradients(
        model, batches, layers, max_classes=max_classes, draws=draws, seed=seed, who="OBD"
    )
    for inputs, _, live, grads in passes:
        for deltas in grads:
            for m, delta in zip(live, deltas, strict=True):
                if delta is None:
                    continue
                w2, b2 = _per_sample_squares(m, inputs[m], delta.detach())
                total[id(m.weight)] += w2.double()
                if m.bias is not None:
                    total[id(m.bias)] += b2.double()
    values = list(total.values())
    distributed.all_reduce_(values)
    return {k: v / n for k, v in total.items()}


class OBD(ScoredMethod):
    """LeCun, Denker & Solla 1989, "Optimal Brain Damage", structured.

    ``s_j = ½ Σ_{w ∈ unit j} G_ww w²`` over the unit's weight rows and bias entries (every
    producer's), G the exact Gauss–Newton diagonal of the calibration set's cross-entropy
    (:func:`ggn_diagonal`: the paper's Levenberg–Marquardt approximation of the Hessian
    diagonal; Monte-Carlo Fisher above ``max_classes`` outputs). Labels are not needed. One
    round by default (the paper retrains between deletions; ``rounds`` re-scores); allocation
    global.
    """

    name = "obd"
    summary = "½ Σ G_ww w² over the unit's weights, G the Gauss–Newton diagonal (LeCun 1989)"
    default_allocation: Allocation = "global"
    needs_labels = False

    def __init__(
        self,
        *,
        allocation: Allocation | None = None,
        rounds: int = 1,
        normalize: Normalize = "mean",
        cost_aware: bool = False,
        max_classes: int = 64,
        draws: int = 16,
    ) -> None:
        super().__init__(
            allocation=allocation, rounds=rounds, normalize=normalize, cost_aware=cost_aware
        )
        for key, value in (("max_classes", max_classes), ("draws", draws)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        self.max_classes, self.draws = max_classes, draws

    def options(self) -> dict[str, Any]:
        return {**super().options(), "max_classes": self.max_classes, "draws": self.draws}

    def scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        params = layer_parameters(ctx.model)
        with _scoring(ctx.model, params):
            diag = ggn_diagonal(
                ctx.model,
                list(ctx.batches()),
                max_classes=self.max_classes,
                draws=self.draws,
                seed=ctx.seed,
            )
        per = {id(p): 0.5 * diag[id(p)] * p.detach().double() ** 2 for p in params}
        modules = ctx.modules
        return {g.name: unit_sum(g, modules, lambda t: per.get(id(t))) for g in ctx.groups}


def _output_signals(p: Tensor, max_classes: int, draws: int, gen: torch.Generator) -> list[Tensor]:
    """Output gradients s whose outer products sum to the softmax Hessian diag(p) − ppᵀ per
    sample (its scaled eigenvectors), or Monte-Carlo Fisher draws above ``max_classes``."""
    classes = p.shape[1]
    if classes <= max_classes:
        lam, u = torch.linalg.eigh(torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1))
        return [u[:, :, k] * lam[:, k].clamp_min(0).sqrt().unsqueeze(1) for k in range(classes)]
    out = []
    for _ in range(draws):
        y = torch.multinomial(p.cpu(), 1, generator=gen).squeeze(1).to(p.device)
        out.append((p - F.one_hot(y, classes).double()) / draws**0.5)
    return out


def _signal_gradients(
    model: nn.Module,
    batches: Batches,
    layers: list[nn.Module],
    *,
    max_classes: int,
    draws: int,
    seed: int,
    who: str,
) -> Iterator[tuple[dict[nn.Module, Tensor], dict[nn.Module, Tensor], list[nn.Module], Any]]:
    """Per batch: ``(inputs, outputs, live, grads)``: each layer's input and output at its
    first call, the layers whose output needs a gradient, and an iterator over the output
    signals of :func:`_output_signals` (one Generator seeded by ``seed`` for all batches),
    each giving the gradients at the live layers' outputs (None where a layer is unused).
    Shared by :func:`ggn_diagonal` and :func:`kfac_saliency`; ``who`` names the method in
    the error for non-classifier outputs."""
    gen = torch.Generator().manual_seed(seed)
    for x, _ in batches:
        inputs: dict[nn.Module, Tensor] = {}
        outputs: dict[nn.Module, Tensor] = {}

        def hook(
            module: nn.Module,
            args: tuple,
            out: Tensor,
            inputs: dict[nn.Module, Tensor] = inputs,
            outputs: dict[nn.Module, Tensor] = outputs,
        ) -> None:
            if module not in inputs:  # a reused layer: its first call
                inputs[module], outputs[module] = args[0].detach(), out

        handles = [m.register_forward_hook(hook) for m in layers]
        try:
            logits = as_samples(x).run(model)
        finally:
            for h in handles:
                h.remove()
        if logits.ndim != 2:
            raise MippError(f"{who} needs (batch, classes) logits, got {tuple(logits.shape)}")
        p = torch.softmax(logits.detach().double(), dim=-1)
        live = [m for m in layers if m in outputs and outputs[m].requires_grad]

        def grads(
            logits: Tensor = logits, live: list = live, p: Tensor = p, outputs: dict = outputs
        ) -> Iterator:
            for s in _output_signals(p, max_classes, draws, gen):
                yield torch.autograd.grad(
                    logits,
                    [outputs[m] for m in live],
                    grad_outputs=s.to(logits.dtype),
                    retain_graph=True,
                    allow_unused=True,
                )

        yield inputs, outputs, live, grads()


def kfac_saliency(
    model: nn.Module,
    batches: Batches,
    layers: list[nn.Module],
    *,
    max_classes: int = 64,
    draws: int = 16,
    seed: int = 0,
) -> dict[nn.Module, Tensor]:
    """Per output channel of each layer in ``layers``: ½ S_jj · E[z_j²] → ``{layer: (out,)}``.

    Under the Kronecker-factored Fisher F ≈ A ⊗ S of a Conv/Linear layer (A the second
    moment of its inputs, augmented with 1 for the bias; S that of the back-propagated
    output gradients, summed over positions), zeroing output unit j (weights w_j and bias
    b_j) raises the loss by ½ (w_j, b_j)ᵀ A (w_j, b_j) · S_jj. The quadratic form is the mean
    square of the unit's output z_j over samples and positions, so no A is formed; S_jj is
    the expected squared output gradient under the model's own predictive distribution (exact
    via the softmax Hessian's eigenvectors, as in :func:`ggn_diagonal`).
    """
    n = _count(batches)
    z2 = {m: torch.zeros(m.weight.shape[0], dtype=torch.float64) for m in layers}
    s2 = {m: torch.zeros(m.weight.shape[0], dtype=torch.float64) for m in layers}
    passes = _signal_gradients(
        model, batches, layers, max_classes=max_classes, draws=draws, seed=seed, who="K-FAC"
    )
    for _, outputs, live, grads in passes:
        for m in live:
            z = outputs[m].detach().double()
            channels = z.movedim(-1, 1) if isinstance(m, nn.Linear) else z
            z2[m] += (
                channels.flatten(2).pow(2).mean(-1).sum(0).cpu()
                if z.ndim > 2
                else (z.pow(2).sum(0).cpu())
            )
        for deltas in grads:
            for m, d in zip(live, deltas, strict=True):
                if d is None:
                    continue
                d = d.detach().double()
                if isinstance(m, nn.Linear) and d.ndim > 2:
                    d = d.movedim(-1, 1)
                s2[m] += (
                    d.pow(2).flatten(2).sum(-1).sum(0).cpu()
                    if d.ndim > 2
                    else (d.pow(2).sum(0).cpu())
                )
    tensors = [*z2.values(), *s2.values()]
    distributed.all_reduce_(tensors)
    return {m: 0.5 * (s2[m] / n) * (z2[m] / n) for m in layers}


class KFACOBD(OBD):
    """The Kronecker-factored structured saliency of EigenDamage (Wang et al. 2019, "EigenDamage:
    Structured Pruning in the Kronecker-Factored Eigenbasis"), in the network's own basis.

    EigenDamage approximates each layer's Fisher by A ⊗ S (K-FAC) and prunes in its
    eigenbasis; the same approximation in the original basis gives the structured OBD score
    it compares against: removing unit j costs ½ S_jj · E[z_j²] (:func:`kfac_saliency`), summed
    over the group's producers. **How far this goes**: the score, not the eigenbasis
    re-parameterisation (which replaces each layer by three — Q_S, the pruned core, Q_Aᵀ — and
    so changes the architecture rather than removing channels). Options as :class:`OBD`'s
    (``max_classes``, ``draws``); labels are not needed; allocation global.
    """

    name = "kfac-obd"
    summary = "½ S_jj E[z_j²]: K-FAC structured saliency of EigenDamage (Wang et al. 2019)"
    default_allocation: Allocation = "global"
    needs_labels = False

    def scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        modules = ctx.modules
        producers = list(dict.fromkeys(p for g in ctx.groups for p in g.producers))
        layers = [modules[p] for p in producers]
        params = layer_parameters(ctx.model)
        with _scoring(ctx.model, params):
            sal = kfac_saliency(
                ctx.model,
                list(ctx.batches()),
                layers,
                max_classes=self.max_classes,
                draws=self.draws,
                seed=ctx.seed,
            )
        out = {}
        for g in ctx.groups:
            total = torch.zeros(g.size, dtype=torch.float64)
            for p in g.producers:
                per = sal[modules[p]]
                for j, ix in enumerate(g.producer_index[p]):
                    total[j] += per[list(ix)].sum()
            out[g.name] = total
        return out


# ----------------------------------------------------------------------------- OBS


class _WoodburyFisher:
    """F = λI + (1/m) G Gᵀ for one block of d parameters, G (d × m) the per-sample gradients,
    with the Woodbury identity: F⁻¹ = (1/λ)(I − G M⁻¹ Gᵀ), M = mλI + GᵀG (m × m)."""

    def __init__(self, grads: Tensor, damp: float) -> None:
        self.g = grads.double()
        self.m = grads.shape[1]
        self.damp = damp
        gram = self.g.T @ self.g
        self.m_mat = self.m * damp * torch.eye(self.m, dtype=torch.float64) + gram

    def inverse_times(self, q: Tensor, v: Tensor) -> Tensor:
        """F⁻¹[:, Q] v → (d,), in O(d m) memory: (1/λ)(e_Q v − G M⁻¹ G_Qᵀ v)."""
        out = -self.g @ torch.linalg.solve(self.m_mat, self.g[q].T @ v)
        out[q] += v
        return out / self.damp

    def solve_qq(self, q: Tensor, w: Tensor) -> Tensor:
        """[(F⁻¹)_QQ]⁻¹ w for a block Q of parameters, in O(|Q| m + m³):
        (F⁻¹)_QQ = (1/λ)(I − G_Q M⁻¹ G_Qᵀ), inverted by Woodbury again."""
        gq = self.g[q]  # (|Q|, m)
        minv_gt_w = torch.linalg.solve(self.m_mat, gq.T @ w)  # M⁻¹ G_Qᵀ w
        inner = torch.eye(self.m, dtype=torch.float64) - torch.linalg.solve(self.m_mat, gq.T @ gq)
        return self.damp * (w + gq @ torch.linalg.solve(inner, minv_gt_w))


def per_sample_gradients(
    model: nn.Module, batches: Batches, params: list[nn.Parameter], samples: int
) -> list[Tensor]:
    """Per-sample gradients of the cross-entropy for the first ``samples`` calibration samples:
    one ``(numel(p), m)`` matrix per parameter p."""
    cols: list[list[Tensor]] = [[] for _ in params]
    seen = 0
    for x, y in batches:
        for i in range(len(y) if y is not None else 0):
            if seen >= samples:
                break
            logits = as_samples(x)[i : i + 1].run(model)
            loss = F.cross_entropy(logits, y[i : i + 1])
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for c, g, p in zip(cols, grads, params, strict=True):
                c.append((torch.zeros_like(p) if g is None else g).detach().reshape(-1).double())
            seen += 1
    if seen == 0:
        raise MippError("OBS needs labelled calibration samples for its empirical Fisher")
    return [torch.stack(c, dim=1).cpu() for c in cols]


def _block_rows(module: nn.Module, channels: list[int]) -> Tensor:
    """Flat indices, in [weight; bias], of the output rows ``channels`` of a layer."""
    per = module.weight[0].numel()
    rows = [torch.arange(c * per, (c + 1) * per) for c in channels]
    if module.bias is not None:
        offset = module.weight.numel()
        rows.append(torch.tensor([offset + c for c in channels]))
    return torch.cat(rows)


class OBS(ScoredMethod):
    """Optimal Brain Surgeon, structured (Hassibi & Stork 1992), with WoodFisher's empirical
    Fisher (Singh & Alistarh 2020) per layer block.

    For each producer layer, the block θ is its weight and bias and the Hessian is the
    dampened empirical Fisher F = λI + (1/m) Σ_i g_i g_iᵀ of m per-sample gradients (``samples``,
    default 64; ``damp`` λ = 1e-4 × mean squared gradient by default), inverted implicitly
    by the Woodbury identity (never forming F). Removing the set Q of a unit's parameters
    (its rows and bias entries) costs, with the optimal compensating change of the rest of
    the block,

        δL_Q = ½ w_Qᵀ [(F⁻¹)_QQ]⁻¹ w_Q,     δθ = −F⁻¹[:, Q] [(F⁻¹)_QQ]⁻¹ w_Q,

    a unit's score (summed over its group's producers). After the decision the OBS update δθ
    of all units removed from a layer, jointly, is applied to the kept ones (``update``,
    default on) — the weight change of OBS; removed rows are deleted anyway. Needs labels;
    allocation global.
    """

    name = "obs"
    summary = "block OBS, WoodFisher empirical Fisher, OBS update of the kept (Hassibi 1992)"
    default_allocation: Allocation = "global"
    needs_labels = True

    def __init__(
        self,
        *,
        allocation: Allocation | None = None,
        rounds: int = 1,
        normalize: Normalize = "mean",
        cost_aware: bool = False,
        samples: int = 64,
        damp: float | None = None,
        update: bool = True,
    ) -> None:
        super().__init__(
            allocation=allocation, rounds=rounds, normalize=normalize, cost_aware=cost_aware
        )
        if not (isinstance(samples, int) and not isinstance(samples, bool) and samples >= 1):
            raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
        if damp is not None and not (isinstance(damp, int | float) and damp > 0):
            raise ValueError(f"damp must be a number > 0 or None, got {damp!r}")
        if not isinstance(update, bool):
            raise ValueError(f"update must be True or False, got {update!r}")
        self.samples, self.damp, self.update = samples, damp, update

    def options(self) -> dict[str, Any]:
        return {
            **super().options(),
            "samples": self.samples,
            "damp": self.damp,
            "update": self.update,
        }

    def _fishers(self, ctx: PruneContext) -> dict[str, _WoodburyFisher]:
        modules = ctx.modules
        producers = list(dict.fromkeys(p for g in ctx.groups for p in g.producers))
        params = [
            t for p in producers for t in (modules[p].weight, modules[p].bias) if t is not None
        ]
        m = min(self.samples, len(ctx.inputs))
        need = 8 * m * sum(t.numel() for t in params) * 2  # the gradients, then the blocks
        memory = machine_memory()
        if memory is not None and need > 0.5 * memory:
            raise MippError(
                f"OBS's per-sample gradients would need about {need / 1e9:.1f} GB ({m} samples "
                f"× {sum(t.numel() for t in params):,} parameters), more than half of this "
                f"machine's {memory / 1e9:.1f} GB; lower samples= or exclude the widest layers"
            )
        with _scoring(ctx.model, layer_parameters(ctx.model)):
            grads = per_sample_gradients(ctx.model, list(ctx.batches()), params, self.samples)
        by_id = {id(t): g for t, g in zip(params, grads, strict=True)}
        out = {}
        for p in producers:
            m = modules[p]
            g = torch.cat([by_id[id(t)] for t in (m.weight, m.bias) if t is not None])
            damp = self.damp
            if damp is None:
                damp = 1e-4 * max(float(g.pow(2).sum(0).mean()) / g.shape[0], 1e-12)
            out[p] = _WoodburyFisher(g, damp)
        return out

    @staticmethod
    def _flat(module: nn.Module) -> Tensor:
        parts = [module.weight.detach().reshape(-1)]
        if module.bias is not None:
            parts.append(module.bias.detach().reshape(-1))
        return torch.cat(parts).double().cpu()

    def scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        ctx.require_labels(self.name)
        modules = ctx.modules
        fishers = self._fishers(ctx)
        ctx.cache["obs_fishers"] = fishers
        # the weights as scored: masking zeroes the removed rows before the update needs them
        ctx.cache["obs_weights"] = {p: self._flat(modules[p]) for p in fishers}
        out = {}
        for g in ctx.groups:
            total = torch.zeros(g.size, dtype=torch.float64)
            for p in g.producers:
                flat, fisher = self._flat(modules[p]), fishers[p]
                for j, ix in enumerate(g.producer_index[p]):
                    q = _block_rows(modules[p], list(ix))
                    w = flat[q]
                    total[j] += 0.5 * float(w @ fisher.solve_qq(q, w))
            out[g.name] = total
        return out

    def before_removal(self, ctx: PruneContext, removed: Mapping[str, Tensor]) -> None:
        """The joint OBS update δθ of each layer's removed units, applied to the block."""
        if not self.update:
            return
        fishers = ctx.cache.get("obs_fishers")
        weights = ctx.cache.get("obs_weights")
        if fishers is None or weights is None:
            raise MippError("OBS.before_removal needs a scoring pass first (call scores)")
        modules = ctx.modules
        for g in ctx.groups:
            gone = removed.get(g.name)
            if gone is None or not bool(gone.any()) or bool(gone.all()):
                continue
            for p in g.producers:
                module = modules[p]
                chans = [
                    c for j in gone.nonzero().flatten().tolist() for c in g.producer_index[p][j]
                ]
                q = _block_rows(module, chans)
                flat = weights[p]
                fisher = fishers[p]
                delta = -fisher.inverse_times(q, fisher.solve_qq(q, flat[q]))
                new = flat + delta
                new[q] = 0.0  # the removed rows: exactly zero (they go anyway)
                with torch.no_grad():
                    n = module.weight.numel()
                    module.weight.copy_(new[:n].reshape(module.weight.shape).to(module.weight))
                    if module.bias is not None:
                        module.bias.copy_(new[n:].to(module.bias))
