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


# ----------------------------------------------------------------------------- input validation
# (issue 14, sections 4 and 5): every bad input ends in one MippError line naming the value.

import json  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

import mipp  # noqa: E402
from mipp.cli import main  # noqa: E402
from mipp.errors import CalibrationError  # noqa: E402
from mipp.report import PruneReport, ReportError  # noqa: E402
from mipp.surgery.calibration import UnscaledInputWarning, calibration_inputs  # noqa: E402
from mipp.surgery.replay import apply_report  # noqa: E402
from mipp.types import ModelSpec  # noqa: E402
from mipp.validation import (  # noqa: E402
    InputShapeError,
    LabelError,
    MatchError,
    check_labels,
    check_match_model,
    check_model_input,
)
from mipp.zoo.checkpoint import CheckpointError, build_model, load_checkpoint, save_checkpoint  # noqa: E402
from mipp.zoo.training import seeded  # noqa: E402

DIGITS = {"name": "digits", "root": None, "pad_to_32": False, "channels": None}


def _ckpt(tmp_path, spec: ModelSpec, *, sub: str, dataset=DIGITS) -> str:
    with seeded(0):
        model = build_model(spec)
    path = tmp_path / sub / "model.safetensors"
    save_checkpoint(path, model, spec=spec, extra={"dataset": dataset})
    return str(path)


LENET28 = ModelSpec("lenet5", in_channels=1, input_size=28)
MLP8 = ModelSpec("mlp", in_channels=1, input_size=8, widths=(24, 12))


def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mipp: error: ") and err.count("\n") == 1
    return err


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def _lenet_report(input_size: int = 28) -> PruneReport:
    with seeded(0):
        net = mipp.create_model("lenet5", in_channels=1, input_size=input_size)
    x = torch.randn(64, 1, input_size, input_size, generator=torch.Generator().manual_seed(0))
    return mipp.prune(net, x, method="l1", sparsity=0.5).report


def test_eval_refuses_images_of_another_shape_naming_both(tmp_path, capsys):
    ckpt = _ckpt(tmp_path, LENET28, sub="lenet", dataset={"name": "fashion-mnist"})
    err = _one_line_error(["eval", ckpt, "--dataset", "digits"], capsys)
    assert "dataset 'digits' has inputs of shape (1, 8, 8)" in err
    assert "takes (1, 28, 28)" in err


def test_a_bare_module_names_the_data_shape_when_its_first_forward_fails():
    with seeded(0):
        net32 = mipp.create_model("lenet5", in_channels=1, input_size=32)
    x = torch.randn(8, 1, 28, 28)
    with pytest.raises(InputShapeError, match=r"LeNet5 cannot take .* shape \(1, 28, 28\)") as e:
        check_model_input(net32, x)
    assert "\n" not in str(e.value) and "mat1 and mat2" in str(e.value)
    with pytest.raises(InputShapeError, match=r"\(1, 28, 28\) but LeNet5 takes \(1, 32, 32\)"):
        check_model_input(net32, x, expected=(1, 32, 32))
    assert check_model_input(net32, torch.randn(8, 1, 32, 32)) == 10  # the class count
    assert net32.training  # the probe restores the module's mode


def test_device_flags_are_usage_errors_before_anything_is_created(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", "mlp", "--dataset", "digits", "--out", str(out)]
    err = _usage_error([*argv, "--device", "foo"], capsys)
    assert "unknown device 'foo'; available: cpu" in err
    if not torch.cuda.is_available():
        err = _usage_error([*argv, "--device", "cuda"], capsys)
        assert "device 'cuda' is not available" in err and "available: cpu" in err
    assert not out.exists()
    ckpt = _ckpt(tmp_path, MLP8, sub="mlp")
    assert "unknown device 'foo'" in _usage_error(["eval", ckpt, "--device", "foo"], capsys)


def test_compare_refuses_checkpoints_that_take_other_inputs(tmp_path, capsys):
    a = _ckpt(tmp_path, LENET28, sub="a", dataset={"name": "fashion-mnist"})
    b = _ckpt(tmp_path, ModelSpec("lenet5", in_channels=1, input_size=32), sub="b")
    err = _one_line_error(["compare", a, b], capsys)
    assert "takes (1, 28, 28)" in err and "takes (1, 32, 32)" in err


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: [1, 2], "a prune report is a JSON object, got list [1, 2]"),
        (lambda d: None, "a prune report is a JSON object, got null"),
        (lambda d: {k: v for k, v in d.items() if k != "groups"}, "has no 'groups' field"),
        (lambda d: {k: v for k, v in d.items() if k != "input_shape"}, "no 'input_shape'"),
        (lambda d: {**d, "achieved": {"units": "half"}}, "'achieved.units' must be a number"),
        (lambda d: {**d, "achieved": {"units": 1.5}}, "'achieved.units' must be a number in"),
        (lambda d: {**d, "input_shape": [1, -28, 28]}, "'input_shape' must be a non-empty"),
        (lambda d: {**d, "version": 7}, "prune report version 7"),
        (lambda d: {**d, "units_before": True}, "'units_before' must be an integer >= 0"),
    ],
)
def test_a_json_value_that_is_not_a_report_is_refused_naming_the_field(
    mutate, needle, tmp_path, capsys
):
    good = _lenet_report().to_dict()
    bad = mutate(json.loads(json.dumps(good)))
    with pytest.raises(ReportError) as e:
        PruneReport.from_dict(bad)
    assert needle in str(e.value) and "\n" not in str(e.value)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ReportError, match=r"bad\.json: "):
        PruneReport.load(path)
    ckpt = _ckpt(tmp_path, MLP8, sub="mlp")
    err = _one_line_error(
        ["prune", ckpt, "--match", str(path), "--out", str(tmp_path / "o")], capsys
    )
    assert needle in err
    assert not (tmp_path / "o").exists()


def test_duplicate_removed_indices_are_refused_naming_the_group():
    report = _lenet_report()
    d = report.to_dict()
    g = next(g for g in d["groups"] if len(g["removed"]) >= 2)
    g["removed"] = [g["removed"][0], *g["removed"][:-1]]  # same length, one index twice
    with pytest.raises(ReportError, match=rf"group '{g['name']}' lists removed unit"):
        PruneReport.from_dict(d)
    with seeded(0):
        fresh = mipp.create_model("lenet5", in_channels=1, input_size=28)
    with pytest.raises(ReportError, match=rf"group '{g['name']}'"):
        apply_report(fresh, d)
    obj = PruneReport.from_dict(report.to_dict())  # an in-memory report edited by hand
    obj.groups[0].removed = [*obj.groups[0].removed, obj.groups[0].removed[0]]
    with pytest.raises(ReportError, match=f"group '{obj.groups[0].name}'"):
        apply_report(fresh, obj)
    # the width_after has to agree with the removed indices too
    d = report.to_dict()
    d["groups"][0]["width_after"] += 1
    with pytest.raises(ReportError, match="width_after is"):
        PruneReport.from_dict(d)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("pruning", {"a": 1}, "field 'pruning' must be a list of replay records"),
        ("pruning", [[1, 2]], "pruning[0] must be an object"),
        (
            "pruning",
            [{"input_shape": [1, 8, 8], "widths": {"g": 4}, "removed": {"g": [1, 1]}}],
            "group 'g' lists removed unit(s) [1] more than once",
        ),
        (
            "pruning",
            [{"input_shape": [1, 8, 8], "widths": {"g": 4}, "removed": {"g": [9]}}],
            "'removed.g' must be a list of unit indices in [0, 4)",
        ),
        ("extra", [1], "field 'extra' must be an object"),
        ("extra", {"dataset": "digits"}, "field 'extra.dataset' must be an object"),
        ("extra", {"dataset": {"name": 3}}, "field 'extra.dataset.name' must be a dataset name"),
        ("model", {"name": "mlp", "num_classes": "ten"}, "'model.num_classes' must be an integer"),
    ],
)
def test_a_malformed_sidecar_field_is_one_line_naming_it(tmp_path, field, value, needle):
    path = _ckpt(tmp_path, MLP8, sub="mlp")
    side = tmp_path / "mlp" / "model.json"
    meta = json.loads(side.read_text())
    meta[field] = value
    side.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_calibration_data_forms():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 1, 4, 4, generator=gen), torch.arange(12) % 3
    # per-sample (input, label) pairs are stacked, not concatenated along the channels
    xs, ys = calibration_inputs(list(zip(x, y, strict=True)), 100, seed=0)
    assert torch.equal(xs, x) and torch.equal(ys, y)
    # numpy: an array, a pair, batches, per-sample pairs with numpy scalar labels
    xn, yn = x.numpy(), y.numpy()
    assert torch.equal(calibration_inputs(xn, 100, seed=0)[0], x)
    xs, ys = calibration_inputs((xn, yn), 100, seed=0)
    assert torch.equal(xs, x) and torch.equal(ys, y)
    xs, ys = calibration_inputs([(xn[:5], yn[:5]), (xn[5:], yn[5:])], 100, seed=0)
    assert torch.equal(xs, x) and torch.equal(ys, y)
    xs, ys = calibration_inputs(list(zip(xn, yn, strict=True)), 7, seed=0)
    assert torch.equal(xs, x[:7]) and torch.equal(ys, y[:7])
    # a list of per-sample tensors is read as batches (documented); the model probe then names
    # the shape it got
    xs, _ = calibration_inputs(list(x), 100, seed=0)
    assert xs.shape == (12, 4, 4)
    with seeded(0):
        net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 2)
        )
    with pytest.raises(InputShapeError, match=r"shape \(4, 4\).*torch.stack it"):
        check_model_input(net, xs)
    # every other form is refused by its type
    for data, needle in [
        ({"x": "images"}, "the calibration inputs['x'] must be a tensor or numpy array, got str"),
        ({1: x}, "keyword inputs need str keys"),
        ({"x": x, "m": x[:5]}, "hold different numbers of samples (12, 5)"),
        ([{"x": x[:4]}, {"y": x[4:]}], "batch 1 holds keyword inputs y (1, 4, 4) float32"),
        ("images", "got str"),
        (3.5, "got float"),
        ([{"x"}], "calibration item 0 is set"),
        ([x[:4], (x[0], 1)], "per-sample (input, label) pair but earlier items are batches"),
        ([x[:4], torch.randn(3, 1, 5, 5)], "batch 1 holds inputs of shape (1, 5, 5)"),
        ((x, y[:5]), "give one label per input"),
        (np.array(["a", "b"]), "numpy array of <U1"),
        ([], "the calibration set is empty"),
        (torch.randn(5), "need a batch dimension and a sample shape"),
        (torch.full((4, 3), float("nan")), "NaN or infinite"),
    ]:
        with pytest.raises(CalibrationError) as e:
            calibration_inputs(data, 100, seed=0)
        assert needle in str(e.value) and "\n" not in str(e.value), (data, str(e.value))


def test_labels_for_the_loss_are_integers_in_range():
    check_labels(torch.tensor([0, 9, 3]), 10, n=3, method="snip")
    check_labels(None, 10, n=3)
    with pytest.raises(LabelError, match=r"got float32 labels \(e.g. 0.5\)"):
        check_labels(torch.tensor([0.5, 1.0, 2.0]), 10, n=3, method="snip")
    with pytest.raises(LabelError, match=r"\[0, 10\).*2 label\(s\) outside it \(min -1, max 12\)"):
        check_labels(torch.tensor([-1, 3, 12]), 10, n=3, method="grasp")
    with pytest.raises(LabelError, match=r"one per input\), got labels of shape \(3, 10\)"):
        check_labels(torch.zeros(3, 10, dtype=torch.long), 10, n=3)


def test_a_report_from_another_model_is_refused(tmp_path, capsys):
    with seeded(0):
        lenet = mipp.create_model("lenet5", in_channels=1, input_size=28)
        mlp = build_model(MLP8)
    digits_x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    mlp_report = mipp.prune(mlp, digits_x, method="l1", sparsity=0.5).report
    with pytest.raises(MatchError, match=r"inputs of shape \(1, 8, 8\), this model takes \(1, 28"):
        check_match_model(mlp_report, lenet, torch.zeros(2, 1, 28, 28))
    # same input shape, other groups (an MLP on 28 px against the LeNet-5)
    with seeded(0):
        mlp28 = mipp.create_model("mlp", in_channels=1, input_size=28)
    report28 = mipp.prune(mlp28, torch.randn(64, 1, 28, 28), method="l1", sparsity=0.5).report
    with pytest.raises(MatchError, match="other unit groups than this model"):
        check_match_model(report28, lenet, torch.zeros(2, 1, 28, 28))
    check_match_model(_lenet_report(), lenet, torch.zeros(2, 1, 28, 28))  # its own: fine
    # from the command line, before any output
    path = _lenet_report().save(tmp_path / "lenet-report.json")
    ckpt = _ckpt(tmp_path, MLP8, sub="mlp")
    err = _one_line_error(
        ["prune", ckpt, "--match", str(path), "--out", str(tmp_path / "o")], capsys
    )
    assert f"--match {path}: the report to match was made on inputs of shape (1, 28, 28)" in err
    assert not (tmp_path / "o").exists()


def test_integer_images_warn_once_and_are_used_as_floats():
    x = torch.randint(
        0, 256, (40, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        xs, _ = calibration_inputs([x[:20], x[20:]], 100, seed=0)
    assert [type(w.message) for w in caught] == [UnscaledInputWarning]
    assert "uint8 with values up to 255" in str(caught[0].message)
    assert xs.dtype == torch.float32 and torch.equal(xs, x.float())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibration_inputs(torch.randint(0, 2, (40, 8)), 100, seed=0)  # 0/1 inputs: no warning


def test_degenerate_calibration_data_is_refused_unless_allowed():
    with seeded(0):
        net = mipp.create_model("lenet5", in_channels=1, input_size=28)
    one = torch.randn(1, 1, 28, 28).expand(256, -1, -1, -1)
    for x, needle in [
        (torch.zeros(256, 1, 28, 28), "only 1 distinct input among 256 samples"),
        (one, "only 1 distinct input among 256 samples"),
        (torch.randn(100, 1, 28, 28).repeat(3, 1, 1, 1), "only 100 distinct inputs among 256"),
    ]:
        with pytest.raises(CalibrationError) as e:
            mipp.prune(net, x, method="l1", sparsity=0.5, calib_samples=256)
        assert needle in str(e.value) and "allow_degenerate=True" in str(e.value)
    xs, _ = calibration_inputs(torch.zeros(256, 1, 28, 28), 256, seed=0, allow_degenerate=True)
    assert xs.shape == (256, 1, 28, 28)


def test_calib_samples_beyond_the_set_are_clamped_and_the_banner_says_so(tmp_path, capsys):
    ckpt = _ckpt(tmp_path, MLP8, sub="mlp")
    out = tmp_path / "pruned"
    argv = ["prune", ckpt, "--method", "l1", "--sparsity", "0.5", "--calib-samples", "100000"]
    assert main([*argv, "--no-eval", "--no-progress", "--out", str(out)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "1,438 calibration samples" in text and "100000 calibration" not in text
    assert (
        "--calib-samples 100,000 is more than the 1,438 training samples; using all 1,438" in text
    )
    assert json.loads((out / "report.json").read_text())["options"]["calib_samples"] == 1438


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (
            ["prune", "C", "--sparsity", "0.5", "--seed", "-1"],
            "a seed is in [0, 4294967295], got -1",
        ),
        (
            ["prune", "C", "--sparsity", "0.5", "--latency-batch", "0"],
            "expected a number >= 1, got 0",
        ),
        (
            ["train", "--model", "mlp", "--dataset", "digits", "--val-fraction", "-0.2"],
            "expected a fraction in [0, 1), got -0.2",
        ),
        (
            ["train", "--model", "mlp", "--dataset", "digits", "--val-fraction", "1"],
            "expected a fraction in [0, 1), got 1",
        ),
        (["compare", "C", "--latency-repeats", "-3"], "expected a number >= 0, got -3"),
        (
            ["train", "--model", "mlp", "--dataset", "digits", "--latency-repeats", "-3"],
            "expected a number >= 0, got -3",
        ),
        (["finetune", "C", "--seed", "x"], "expected a whole number, got 'x'"),
    ],
)
def test_range_flags_are_usage_errors_naming_the_value(argv, needle, capsys):
    err = _usage_error(argv, capsys)
    assert needle in err


def test_degenerate_rule_counts_distinct_inputs_exactly():
    """The projection behind the rule counts distinct rows as a row sort does: 3 distinct
    images among 8 is degenerate, 5 among 8 is not, and near-duplicates count as distinct."""
    from mipp.surgery.calibration import degenerate_reason

    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 1, 6, 6, generator=g)
    three = base[torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])]
    five = base[torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])]
    assert degenerate_reason(three) == "only 3 distinct inputs among 8 samples"
    assert degenerate_reason(five) is None
    near = base[:1].repeat(4, 1, 1, 1)
    near[1:, 0, 0, 0] += torch.tensor([1e-6, 2e-6, 3e-6])
    assert degenerate_reason(near) is None


def test_a_group_constant_on_the_data_is_degenerate_unless_allowed():
    """Distinct inputs, but a hidden layer that does not read them (zero weights): every unit
    of its group is constant, so the data cannot tell them apart — refused naming the group,
    pruned with allow_degenerate=True; the same net with live weights prunes."""
    from mipp.errors import CalibrationError

    with seeded(0):
        net = torch.nn.Sequential(
            torch.nn.Linear(4, 8),
            torch.nn.ReLU(),
            torch.nn.Linear(8, 6),
            torch.nn.ReLU(),
            torch.nn.Linear(6, 3),
        )
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(1))
    assert mipp.prune(net, x, method="l1", sparsity=0.5).model is not None
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.uniform_(0.5, 1.0)
    with pytest.raises(CalibrationError, match=r"every unit of 2, 0 is constant") as err:
        mipp.prune(net, x, sparsity=0.5)
    assert "\n" not in str(err.value) and "allow_degenerate=True" in str(err.value)
    result = mipp.prune(net, x, method="l1", sparsity=0.5, allow_degenerate=True)
    assert all(g.width_after >= 1 for g in result.report.groups)
