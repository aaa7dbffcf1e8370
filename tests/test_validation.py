"""The estimator validation suite (mipp.testing.estimators): its closed forms are right,
and the closed-form estimators meet them where they should and miss what they cannot see."""

import math

import pytest
import torch

from mipp.estimators import GaussianEstimator, LinearEstimator, make_estimator
from mipp.estimators.base import Delta
from mipp.estimators.linear import LinearState
from mipp.methods.selection import terc
from mipp.testing.estimators import (
    check_estimator,
    evaluate,
    gaussian_cmi_case,
    gaussian_mi_case,
    monotone_case,
    planted_layer,
    square_case,
    suite,
)


def test_case_truths_match_independent_formulas():
    case = gaussian_mi_case(n=10, dim=3, rho=0.6)
    assert case.nats == pytest.approx(-1.5 * math.log(1 - 0.36), rel=1e-12)
    assert case.share == pytest.approx(0.36)
    # rho_xz = 0: I(X; Y | Z) = I(X; Y) and X enters y1 with 0.5 and y2 with 0.8
    c0 = gaussian_cmi_case(n=10, rho_xz=0.0)
    var_y = torch.tensor([0.25 + 0.25 + 0.5, 0.64 + 0.6])
    assert c0.share == pytest.approx(float((torch.tensor([0.25, 0.64]) / var_y).mean()))
    # and the nats from the conditional covariance of Y given Z
    cov_y_z = torch.tensor([[0.25 + 0.5, 0.4], [0.4, 0.64 + 0.6]], dtype=torch.float64)
    noise = torch.diag(torch.tensor([0.5, 0.6], dtype=torch.float64))
    expect = 0.5 * math.log(torch.linalg.det(cov_y_z) / torch.linalg.det(noise))
    assert c0.nats == pytest.approx(expect, rel=1e-12)


def test_square_case_has_no_linear_signal_but_real_dependence():
    case = square_case(n=20000)
    u, y1 = case.x[:, 0, 0], case.y[:, 0]
    # population correlation 0; its sample standard error is sqrt(E[u^6] / n) / sd(y1) ≈ 0.019
    assert abs(float(torch.corrcoef(torch.stack([u, y1]))[0, 1])) < 0.06
    assert float(torch.corrcoef(torch.stack([u**2, y1]))[0, 1]) > 0.9


@pytest.mark.parametrize("case", suite(n=4000), ids=lambda c: c.name)
def test_closed_forms_on_the_suite(case):
    lin = evaluate(LinearEstimator(ridge=1e-6), case)
    gau = evaluate(GaussianEstimator(ridge=1e-6), case)
    tol = 4 / math.sqrt(4000)  # a few standard errors at n = 4000
    if case.family in ("gaussian-mi", "gaussian-cmi", "independent"):
        assert lin.value == pytest.approx(case.share, abs=tol)
        assert gau.value == pytest.approx(case.nats, abs=tol)
    if case.family == "monotone":  # MI is invariant, the Gaussian estimate is not
        assert gau.value < 0.75 * case.nats
    if case.family == "square":  # only through x²: nearly invisible to the closed forms
        # u² explains ~45 % of the two-column target's variance; a linear fit of u < 1 %.
        # (Their p-values are not asserted: the F / χ² tests assume Gaussian residuals and
        # are over-confident under this heteroscedastic noise.)
        assert lin.value < 0.01
        assert gau.value < 0.01
    if case.dependent and case.family != "square":
        assert lin.pvalue < 1e-6 and gau.pvalue < 1e-6
    if not case.dependent:
        assert lin.pvalue > 0.05 and gau.pvalue > 0.05


def test_monotone_case_keeps_the_truth_of_its_base():
    assert (
        monotone_case(n=100, transform="cube").nats == gaussian_mi_case(n=100, dim=1, rho=0.6).nats
    )
    with pytest.raises(ValueError, match="transform must be one of"):
        monotone_case(n=100, transform="log")


def test_planted_layer_recovered_helper_rejects_wrong_answers():
    layer = planted_layer(n=300)
    est = LinearEstimator()
    support = terc(est.start(est.prepare(layer.x, layer.y)), confidence=0.95).support
    assert layer.recovered(support)
    both = support.clone()
    a, b = layer.duplicate_pairs[0]
    both[a] = both[b] = True
    assert not layer.recovered(both)
    assert not layer.recovered(torch.ones(13, dtype=torch.bool))


@pytest.mark.parametrize("case", suite(n=2000, seed=1), ids=lambda c: c.name)
def test_ksg_on_the_suite(case):
    """The nonparametric estimator meets the truth in nats where the closed forms do, and
    also where they cannot: monotone transforms and the x²-only unit."""
    out = evaluate(make_estimator("ksg", seed=0), case)
    if (
        case.family in ("gaussian-mi", "gaussian-cmi", "monotone")
        and case.params.get("dim", 1) == 1
    ):
        assert out.value == pytest.approx(case.nats, abs=0.08)  # KSG bias at n = 2000, 1-D
    if case.family == "gaussian-mi" and case.params.get("dim") == 3:
        assert 0.75 * case.nats < out.value < 1.1 * case.nats  # KSG underestimates in 3-D
    if case.family == "independent":
        assert out.value < 0.04 and out.pvalue > 0.01
    if case.family == "square":
        assert out.value > 0.3 and out.pvalue < 1e-6  # the closed forms give < 0.01 here


# ----------------------------------------------------------------------------- conformance


@pytest.mark.parametrize(
    ("est", "scale"), [(LinearEstimator(), "share"), (GaussianEstimator(), "nats")]
)
def test_the_closed_forms_conform(est, scale):
    assert check_estimator(est, scale=scale) == []


class _Doubled(LinearEstimator):
    """A broken estimator: every Δ twice the truth."""

    name = "doubled"

    def start(self, prepared, columns=None):
        return _DoubledState(prepared, columns, ridge=self.ridge)


class _DoubledState(LinearState):
    def delta(self, i: int) -> Delta:
        d = super().delta(i)
        return Delta(value=2 * d.value, relative=2 * d.relative, pvalue=d.pvalue)


def test_check_estimator_names_what_a_broken_estimator_gets_wrong():
    failures = check_estimator(_Doubled(), scale="share")
    assert failures and all(f.startswith("doubled: ") for f in failures)
    assert any("gaussian-mi n=4000 d=1 rho=0.6: Δ = 0.72" in f for f in failures)
    assert check_estimator(LinearEstimator(), scale="nats")  # the wrong scale fails too
    assert check_estimator(object(), scale="nats") == [
        "object: not a mipp.estimators.Estimator (subclass it)"
    ]
