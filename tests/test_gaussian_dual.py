"""``gaussian`` in the sample space (GaussianDualState): on layers wider than twice the
calibration set it must give exactly what the D×D form gives — Δ_i, I(X_S; Y), single
scores and every TERC decision — only faster."""

from __future__ import annotations

import math

import pytest
import torch

import mipp
from helpers import make_model
from mipp.estimators import GaussianEstimator
from mipp.estimators import gaussian as gaussian_module
from mipp.estimators.gaussian import GaussianDualState, GaussianState
from mipp.estimators.moments import (
    MomentAccumulator,
    RowMoments,
    sample_rows,
    second_moments,
)
from mipp.methods import MIPP
from mipp.methods.selection import terc


def _wide(n: int = 60, units: int = 50, b: int = 3, q: int = 20, seed: int = 0):
    """More features (150) than samples (60): 8 latents read by every unit through noise,
    a dead unit (3), a constant feature in unit 5, and y reading the latents."""
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(n, 8, generator=g, dtype=torch.float64)
    mix = torch.randn(8, units * b, generator=g, dtype=torch.float64)
    x = lat @ mix + 0.3 * torch.randn(n, units * b, generator=g, dtype=torch.float64)
    x = x.view(n, units, b)
    x[:, 3] = 0.0
    x[:, 5, 1] = 1.0
    y = lat @ torch.randn(8, q, generator=g, dtype=torch.float64)
    y = y + 0.1 * torch.randn(n, q, generator=g, dtype=torch.float64)
    return x, y


def _pair(columns=None):
    x, y = _wide()
    est = GaussianEstimator()
    m = est.prepare(x, y)
    dual = est.start(m, columns)
    return dual, GaussianState(m, columns, ridge=est.ridge), m


def _close(a: float, b: float, rel: float = 1e-8) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


@pytest.mark.parametrize("columns", [None, torch.arange(0, 20, 2), torch.arange(0)])
def test_the_dual_state_gives_the_d_by_d_forms_deltas_information_and_scores(columns):
    dual, primal, m = _pair(columns)
    assert m.samples is not None and isinstance(dual, GaussianDualState)
    assert _close(dual.information(), primal.information())
    assert torch.allclose(dual.single_scores(), primal.single_scores(), rtol=1e-9, atol=1e-12)
    assert dual.single_scores()[3] == 0.0  # the dead unit
    for i in (0, 3, 5, 17, 49):
        d, p = dual.delta(i), primal.delta(i)
        assert _close(d.value, p.value) and _close(d.relative, p.relative)
    assert dual.delta(3).value == 0.0


@pytest.mark.parametrize("threshold", [0.0, 0.001, 0.01, 0.05])
def test_terc_on_the_dual_state_makes_the_same_decisions(threshold):
    dual, primal, _ = _pair()
    rd, rp = terc(dual.fork(), threshold=threshold), terc(primal.fork(), threshold=threshold)
    assert torch.equal(rd.support, rp.support)
    tested = ~torch.isnan(rp.deltas)
    assert torch.equal(tested, ~torch.isnan(rd.deltas))
    assert torch.allclose(rd.deltas[tested], rp.deltas[tested], rtol=1e-7, atol=1e-12)
    assert _close(rd.info_kept, rp.info_kept)
    assert 0 < int(rd.support.sum()) < 50 or threshold == 0.0


def test_wide_units_are_read_in_narrower_blocks_with_the_same_decisions(monkeypatch):
    # 6 features per unit: blocks of BLOCK_COLUMNS // 6 = 32 units (two blocks over 60),
    # the same decisions and Δs as the D×D form, which reads 64 units at a time
    x, y = _wide(units=60, b=6, seed=1)
    est = GaussianEstimator()
    m = est.prepare(x, y)
    dual = est.start(m)
    assert isinstance(dual, GaussianDualState) and dual.prefetch_units == 32
    sizes: list[int] = []
    real = GaussianDualState.prefetch

    def spy(self, units):
        sizes.append(len(units))
        return real(self, units)

    monkeypatch.setattr(GaussianDualState, "prefetch", spy)
    primal = GaussianState(m, None, ridge=est.ridge)
    for threshold in (0.002, 0.02):
        rd, rp = terc(dual.fork(), threshold=threshold), terc(primal.fork(), threshold=threshold)
        assert torch.equal(rd.support, rp.support)
        assert 0 < int(rd.support.sum()) < 60
        tested = ~torch.isnan(rp.deltas)
        assert torch.allclose(rd.deltas[tested], rp.deltas[tested], rtol=1e-7, atol=1e-12)
    assert sizes and max(sizes) <= 32 and len(sizes) >= 4


def test_removals_outside_a_block_and_forks_match_the_d_by_d_form():
    dual, primal, _ = _pair()
    for state in (dual, primal):
        state.pvalues = False
        state.prefetch([0, 1, 2, 4])
        state.remove(1)  # inside the block
        state.remove(30)  # outside it: the block ends first
    fd, fp = dual.fork(), primal.fork()
    for state in (fd, fp):
        state.remove(0)
        state.remove(7)
    for i in (2, 4, 10, 49):
        assert _close(dual.delta(i).value, primal.delta(i).value)  # the fork left them alone
        assert _close(fd.delta(i).value, fp.delta(i).value)
    assert _close(fd.information(), fp.information())
    assert _close(dual.information(), primal.information())
    assert not bool(dual.active[1]) and bool(dual.active[0]) and not bool(fd.active[0])


def test_a_retargeted_dual_state_equals_a_fresh_start_on_the_new_columns():
    dual, _, m = _pair(torch.arange(0, 20, 2))
    new = torch.arange(5, 20)
    assert dual.retarget_saves(m, new)
    derived, fresh = dual.retargeted(m, new), GaussianState(m, new, ridge=1e-3)
    assert torch.equal(derived.columns.sort().values, fresh.columns.sort().values)
    assert _close(derived.information(), fresh.information())
    r1, r2 = terc(derived, threshold=0.01), terc(fresh, threshold=0.01)
    assert torch.equal(r1.support, r2.support)
    assert _close(
        dual.information(), GaussianState(m, torch.arange(0, 20, 2), ridge=1e-3).information()
    )
    dual.remove(0)
    assert not dual.retarget_saves(m, new)  # only a starting state
    with pytest.raises(ValueError, match="starting state"):
        dual.retargeted(m, new)


def test_confidence_mode_is_refused_by_name_on_the_dual_state():
    dual, _, _ = _pair()
    with pytest.raises(ValueError, match="fewer calibration samples than features"):
        terc(dual, confidence=0.95)


def test_rows_are_kept_only_for_wide_layers_without_folds():
    x, y = _wide()
    est = GaussianEstimator()
    assert est.rows_if_wider_than(60) == gaussian_module.DUAL_FACTOR * 60
    assert est.prepare(x[:, :30], y).samples is None  # 90 features, not > 120: D×D form
    assert isinstance(est.start(est.prepare(x[:, :30], y)), GaussianState)
    assert GaussianEstimator(folds=2).prepare(x, y).samples is None
    assert GaussianEstimator(ridge=0.0).rows_if_wider_than(60) is None
    # streamed: the same rows as from all the samples at once
    acc = MomentAccumulator(rows_if_wider_than=120)
    for i in range(0, 60, 16):
        acc.update(x[i : i + 16], y[i : i + 16])
    streamed, direct = acc.moments(), second_moments(x, y)
    assert isinstance(streamed, RowMoments)
    # no products accumulated: each is made from the rows only when something reads it, and
    # the sample-space state and its selection read none of them
    products = ("_sxx", "_sxy", "_syy")
    assert all(name in vars(streamed) and vars(streamed)[name] is None for name in products)
    assert torch.allclose(streamed.target_variances, direct.syy.diagonal(), atol=1e-12)
    state = GaussianEstimator().start(streamed)
    assert isinstance(state, GaussianDualState)
    terc(state, threshold=0.01)
    assert all(vars(streamed)[name] is None for name in products)
    for name in ("sxy", "syy", "mean_x", "mean_y"):
        assert torch.allclose(getattr(streamed, name), getattr(direct, name), atol=1e-12)
    assert torch.allclose(streamed.sxx, direct.sxx, atol=1e-12)
    assert torch.equal(streamed.const_x, direct.const_x)
    xs, ys = sample_rows(direct, x, y)
    assert torch.allclose(streamed.samples[0], xs, atol=1e-12)
    assert torch.allclose(streamed.samples[1], ys, atol=1e-12)
    assert torch.allclose(xs.T @ xs, direct.sxx, atol=1e-10)  # the rows' Gram is the moments
    narrow = MomentAccumulator(rows_if_wider_than=150)  # 150 features: not wider
    narrow.update(x, y)
    assert narrow.moments().samples is None


def test_mipp_prunes_a_residual_net_with_scope_all_the_same_in_either_form(monkeypatch):
    """scope "all", 2×2 pooling, 16 calibration samples: the stream groups (64 and 48
    features) are wider than 32, so they take the sample-space form; forcing the D×D form
    changes no decision."""
    net, x = make_model("tiny-resnet", n=16)
    built: list[int] = []
    real = GaussianDualState.__init__

    def spy(self, *args, **kwargs):
        built.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(GaussianDualState, "__init__", spy)
    method = MIPP(reconstruct=False, pool=2)
    dual = mipp.prune(net, x, method=method, sparsity=0.4, scope="all", calib_samples=16)
    assert len(built) >= 2, "the stream groups did not take the sample-space form"
    monkeypatch.setattr(gaussian_module, "DUAL_FACTOR", 10**9)
    built.clear()
    primal = mipp.prune(net, x, method=method, sparsity=0.4, scope="all", calib_samples=16)
    assert not built
    assert dual.report.widths == primal.report.widths
    assert dual.report.achieved == pytest.approx(primal.report.achieved)


def test_one_feature_blocks_on_numpy_views_match_the_schur_complements():
    """A prefetched block of one-feature units does its scalar work on numpy views of the
    same memory: its log-determinants equal those of the Schur complement after each removal
    (known answer) and the torch downdates of a block that cannot take views."""
    from mipp.estimators.gaussian import _Block

    g = torch.Generator().manual_seed(0)
    mats = []
    for _ in range(2):
        a = torch.randn(30, 12, generator=g, dtype=torch.float64)
        mats.append(a.T @ a + torch.eye(12, dtype=torch.float64))
    units = {u: slice(u, u + 1) for u in range(12)}
    fast = _Block(units, torch.arange(12), [m.clone() for m in mats])
    slow = _Block(units, torch.arange(12), [m.clone().T for m in mats])  # not contiguous
    assert fast._arrays is not None and slow._arrays is None
    removed: list[int] = []
    for i in (3, 7, 0, 11, 5):
        keep = [u for u in range(12) if u not in removed]
        want = []
        for m in mats:  # M_ii − M_iR M_RR⁻¹ M_Ri over the units removed so far
            r = torch.tensor(removed, dtype=torch.long)
            s = m[i, i] - m[i, r] @ torch.linalg.solve(m[r][:, r], m[r, i]) if removed else m[i, i]
            want.append(math.log(float(s)))
        assert i in keep
        assert fast.logdets(i) == pytest.approx(tuple(want), rel=1e-12)
        assert slow.logdets(i) == pytest.approx(tuple(want), rel=1e-12)
        fast.remove(i)
        slow.remove(i)
        removed.append(i)
    for f, s in zip(fast.mats, slow.mats, strict=True):
        torch.testing.assert_close(f, s, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="not positive definite"):
        fast.logdets(3)  # a removed unit's row is exactly 0
