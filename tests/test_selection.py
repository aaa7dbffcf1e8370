"""Tests for mipp.methods.selection: TERC recovers a planted layer structure with every estimator;
min_keep, ordering, threshold monotonicity, validation and the scikit-learn-style selector."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from mipp.estimators import GaussianEstimator, LinearEstimator, MLPEstimator, make_estimator
from mipp.methods.selection import MIPPSelector, SelectionResult, terc
from mipp.testing.estimators import Planted, planted_layer

F64 = torch.float64


def assert_recovers(layer: Planted, result: SelectionResult, *, exact_zero: bool = True) -> None:
    """Keeps one copy of each duplicate pair and every other informative unit, nothing else.

    The useless units are tested first; with the closed forms (``exact_zero``) the constant
    units first of all, since only they score exactly 0 (the MLP's noisy estimates of a noise
    unit's information can be negative).
    """
    kept = set(torch.nonzero(result.support).flatten().tolist())
    for a, b in layer.duplicate_pairs:
        assert len(kept & {a, b}) == 1, f"exactly one of duplicates {a}, {b} must stay: {kept}"
    singles = [u for u in layer.informative if all(u not in p for p in layer.duplicate_pairs)]
    assert set(singles) <= kept
    assert not kept & set(layer.constant + layer.ignored)
    assert len(kept) == 6
    assert layer.recovered(result.support)
    assert set(result.order[:5].tolist()) == set(layer.constant + layer.ignored)
    if exact_zero:
        assert set(result.order[:2].tolist()) == set(layer.constant)
    assert (result.scores[layer.constant] == 0).all()
    assert result.info_kept == pytest.approx(result.info_full, rel=0.02)


MODES = [{"confidence": 0.95}, {"confidence": 0.99}, {"threshold": 0.01}]


@pytest.mark.parametrize("nonlinear", [False, True])
@pytest.mark.parametrize("name", ["linear", "gaussian"])
def test_planted_structure_closed_forms(name: str, nonlinear: bool) -> None:
    layer = planted_layer(nonlinear=nonlinear)
    est = make_estimator(name)
    prepared = est.prepare(layer.x, layer.y)
    for mode in MODES:
        assert_recovers(layer, terc(est.start(prepared), **mode))


@pytest.mark.slow
def test_planted_structure_mlp() -> None:
    layer = planted_layer(n=2000)
    est = make_estimator("mlp", seed=0)
    result = terc(est.start(est.prepare(layer.x, layer.y)), confidence=0.95)
    assert_recovers(layer, result, exact_zero=False)


@pytest.mark.slow
@pytest.mark.parametrize("nonlinear", [False, True])
def test_planted_structure_mlp_all_modes(nonlinear: bool) -> None:
    layer = planted_layer(nonlinear=nonlinear)
    est = make_estimator("mlp", seed=1)
    prepared = est.prepare(layer.x, layer.y)
    for mode in [{"confidence": 0.95}, {"confidence": 0.99}, {"threshold": 0.02}]:
        assert_recovers(layer, terc(est.start(prepared), **mode), exact_zero=False)


def test_duplicates_keep_the_later_tested_copy_and_removals_are_cumulative() -> None:
    layer = planted_layer()
    result = terc(
        LinearEstimator().start(LinearEstimator().prepare(layer.x, layer.y)),
        confidence=0.95,
        order="index",
    )
    for a, b in layer.duplicate_pairs:
        first, second = sorted((a, b))
        assert not result.support[first] and result.support[second]
        assert result.deltas[first] < 1e-3 < result.deltas[second]


# --- min_keep, ordering, threshold ------------------------------------------------------------


def useless_layer(n: int = 400, units: int = 6, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, units, generator=g, dtype=F64), torch.randn(n, 2, generator=g)


@pytest.mark.parametrize("min_keep", [1, 2, 4])
def test_min_keep_is_kept_when_every_unit_is_useless(min_keep: int) -> None:
    x, y = useless_layer()
    est = LinearEstimator()
    result = terc(est.start(est.prepare(x, y)), threshold=1.0, min_keep=min_keep)
    assert result.support.sum() == min_keep
    assert torch.isnan(result.deltas).sum() == min_keep  # the survivors were never tested
    assert torch.equal(result.support, torch.isnan(result.deltas))


def test_min_keep_equal_to_units_removes_nothing() -> None:
    x, y = useless_layer()
    est = GaussianEstimator()
    state = est.start(est.prepare(x, y))
    result = terc(state, threshold=1.0, min_keep=6)
    assert result.support.all() and torch.isnan(result.pvalues).all()
    assert result.info_kept == result.info_full


def test_order_modes() -> None:
    layer = planted_layer(n=500)
    est = LinearEstimator()
    prepared = est.prepare(layer.x, layer.y)

    def run(order: str, seed: int = 0) -> SelectionResult:
        return terc(est.start(prepared), confidence=0.95, order=order, seed=seed)

    assert run("index").order.tolist() == list(range(13))
    mi = run("mi")
    assert (mi.scores[mi.order].diff() >= 0).all()  # ascending single-unit information
    a, b, c = run("random", 0), run("random", 0), run("random", 1)
    assert torch.equal(a.order, b.order) and torch.equal(a.support, b.support)
    assert not torch.equal(a.order, c.order)
    assert sorted(c.order.tolist()) == list(range(13))


def test_ties_are_broken_by_index() -> None:
    x = torch.ones(100, 4, dtype=F64)  # four dead units: all scores 0
    x[:, 3] = torch.arange(100, dtype=F64)
    y = x[:, 3:] + torch.randn(100, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    result = terc(LinearEstimator().start(LinearEstimator().prepare(x, y)), confidence=0.95)
    assert result.order.tolist() == [0, 1, 2, 3]
    assert result.support.tolist() == [False, False, False, True]


def test_larger_threshold_never_keeps_more_units() -> None:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1000, 8, generator=g, dtype=F64)
    x = z @ (torch.eye(8, dtype=F64) + 0.5 * torch.randn(8, 8, generator=g, dtype=F64))
    x = torch.cat([x, x[:, :4] + 0.3 * torch.randn(1000, 4, generator=g, dtype=F64)], 1)
    y = z[:, :5] @ torch.randn(5, 3, generator=g, dtype=F64)
    y = y + torch.randn(1000, 3, generator=g, dtype=F64)
    for est in (LinearEstimator(), GaussianEstimator()):
        prepared = est.prepare(x, y)
        counts = [
            int(terc(est.start(prepared), threshold=t).support.sum())
            for t in (0.0, 1e-4, 1e-3, 1e-2, 0.05, 0.2, 1.0)
        ]
        assert counts == sorted(counts, reverse=True)
        assert counts[0] == 12 and counts[-1] == 1


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"confidence": 0}, "confidence must be in \\(0, 1\\) exclusive, got 0"),
        ({"confidence": 1}, "got 1"),
        ({"confidence": 1.5}, "got 1.5"),
        ({"threshold": -0.1}, "threshold must be a finite number >= 0, got -0.1"),
        ({"threshold": math.nan}, "got nan"),
        ({"confidence": 0.9, "min_keep": 0}, "min_keep must be an integer >= 1, got 0"),
        ({"confidence": 0.9, "min_keep": 1.5}, "got 1.5"),
        ({"confidence": 0.9, "threshold": 0.1}, "exactly one of confidence and threshold"),
        ({}, "exactly one of confidence and threshold"),
        ({"confidence": 0.9, "order": "size"}, "order must be one of mi, index, random"),
    ],
)
def test_terc_rejects_bad_options(options: dict, message: str) -> None:
    x, y = useless_layer()
    state = LinearEstimator().start(LinearEstimator().prepare(x, y))
    with pytest.raises(ValueError, match=message):
        terc(state, **options)
    assert state.active.all()  # nothing happened


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"confidence": 0}, "got 0"),
        ({"confidence": 1}, "got 1"),
        ({"confidence": 1.5}, "got 1.5"),
        ({"threshold": -0.1}, "got -0.1"),
        ({"threshold": math.nan}, "got nan"),
        ({"min_keep": 0}, "min_keep must be an integer >= 1, got 0"),
    ],
)
def test_selector_rejects_bad_options(options: dict, message: str) -> None:
    x, y = useless_layer()
    with pytest.raises(ValueError, match=message):
        MIPPSelector(**options).fit(x, y)


def test_selector_rejects_bad_data() -> None:
    x, y = useless_layer()
    with pytest.raises(ValueError, match="same number of samples, got 400 and 399"):
        MIPPSelector().fit(x, y[:-1])
    bad = x.clone()
    bad[3, 2] = math.nan
    with pytest.raises(ValueError, match="x has 1 non-finite"):
        MIPPSelector().fit(bad, y)
    with pytest.raises(ValueError, match=r"x must be \(n, U\) or \(n, U, b\), got shape \(400,\)"):
        MIPPSelector().fit(x[:, 0], y)
    with pytest.raises(RuntimeError, match="not fitted"):
        MIPPSelector().transform(x)


# --- the selector -----------------------------------------------------------------------------


def test_selector_fit_sets_sklearn_attributes() -> None:
    layer = planted_layer(n=1000)
    selector = MIPPSelector()
    assert selector.fit(layer.x, layer.y) is selector
    assert selector.confidence is None  # options are stored as given; 0.95 is applied in fit
    assert selector.n_features_in_ == 13
    for name in ("support_", "scores_", "deltas_", "relative_deltas_", "pvalues_"):
        value = getattr(selector, name)
        assert isinstance(value, Tensor) and value.shape == (13,)
    assert selector.support_.dtype == torch.bool and selector.order_.dtype == torch.long
    assert selector.info_kept_ == pytest.approx(selector.info_full_, rel=0.02)
    assert_recovers(layer, selector.result_)
    kept = selector.get_support(indices=True)
    assert torch.equal(kept, torch.nonzero(selector.get_support()).flatten())
    assert torch.equal(selector.transform(layer.x), layer.x[:, kept])
    # the same result as terc at the default confidence 0.95 with the held-out test (5 folds)
    est = LinearEstimator(folds=5)
    direct = terc(est.start(est.prepare(layer.x, layer.y)), confidence=0.95)
    assert torch.equal(direct.support, selector.support_)
    assert torch.allclose(direct.pvalues, selector.pvalues_, rtol=0, atol=0, equal_nan=True)


def test_selector_on_blocks_and_prepared_statistics() -> None:
    layer = planted_layer(n=1000)
    x3 = torch.stack([layer.x, 2 * layer.x], dim=2)  # (n, 13, 2): units of two features
    selector = MIPPSelector(estimator=GaussianEstimator(), confidence=0.99).fit(x3, layer.y)
    assert_recovers(layer, selector.result_)
    assert selector.transform(x3).shape == (1000, 6, 2)
    # fit_prepared reuses statistics across targets: columns [1, 3] == fitting y[:, [1, 3]]
    est = GaussianEstimator()
    prepared = est.prepare(layer.x, layer.y)
    a = MIPPSelector(estimator=est, threshold=0.01).fit_prepared(prepared, torch.tensor([1, 3]))
    b = MIPPSelector(estimator=est, threshold=0.01).fit(layer.x, layer.y[:, [1, 3]])
    assert torch.equal(a.support_, b.support_)
    torch.testing.assert_close(a.deltas_, b.deltas_, equal_nan=True)


def test_selector_with_mlp_estimator_in_threshold_mode() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(600, 2, generator=g)
    x = torch.cat([z, torch.randn(600, 1, generator=g), z[:, :1]], 1)  # noise unit 2, dup 3
    y = torch.tanh(z) + 0.1 * torch.randn(600, 2, generator=g)
    est = MLPEstimator(hidden=16, repeats=3, batch_size=None, lr=3e-2, patience=30)
    selector = MIPPSelector(estimator=est, threshold=0.02).fit(x, y)
    assert selector.support_[1] and not selector.support_[2]
    assert bool(selector.support_[0]) != bool(selector.support_[3])
