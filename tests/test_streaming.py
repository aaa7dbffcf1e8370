"""Streaming float64 statistics: batch-by-batch moments equal the in-memory ones, and so does
every selection made from them."""

import importlib

import pytest
import torch
from torch import nn

import mipp
from helpers import make_model
from mipp.estimators import GaussianEstimator, LinearEstimator, second_moments
from mipp.estimators.moments import MomentAccumulator
from mipp.methods import MIPP
from mipp.methods.targets import StreamedMoments, group_data
from mipp.surgery.capture import capture_activations, stream_activations
from mipp.surgery.structure import build_structure
from mipp.zoo.training import seeded


def _stream(x, y, sizes):
    acc = MomentAccumulator()
    start = 0
    for size in sizes:
        acc.update(x[start : start + size], y[start : start + size])
        start += size
    assert start == len(x)
    return acc.moments()


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_streamed_moments_equal_batch_moments(offset):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 6, 2, generator=g, dtype=torch.float64) + offset
    x[:, 4] = 7.0  # a dead unit: both features constant
    y = x[:, :3, 0] @ torch.randn(3, 5, generator=g, dtype=torch.float64)
    y = torch.cat([y, torch.full((1000, 1), -2.0, dtype=torch.float64)], 1)  # constant column
    ref = second_moments(x, y)
    got = _stream(x, y, [1, 255, 256, 7, 481])  # uneven batches, including one row
    for name in ("sxx", "sxy", "syy", "mean_x", "mean_y"):
        diff = (getattr(got, name) - getattr(ref, name)).abs().max()
        assert diff <= 1e-10 * max(1.0, offset), name
    assert torch.equal(got.const_x, ref.const_x)
    assert torch.equal(got.const_y, ref.const_y)
    assert bool(got.const_units[4]) and int(got.const_units.sum()) == 1
    assert (got.n, got.n_units, got.unit_size) == (1000, 6, 2)


def test_streamed_moments_float32_batches_match_float64_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 4, generator=g)
    y = torch.randn(600, 3, generator=g)
    ref = second_moments(x.double(), y.double())
    got = _stream(x, y, [200, 200, 200])
    assert (got.sxx - ref.sxx).abs().max() <= 1e-10


def test_variances_only_accumulation_serves_linear_and_is_refused_by_gaussian():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64)
    y = x[:, :2] @ torch.randn(2, 3, generator=g, dtype=torch.float64) + torch.randn(300, 3)
    acc = MomentAccumulator(full_target=False)
    acc.update(x[:100], y[:100])
    acc.update(x[100:], y[100:])
    diag = acc.moments()
    ref = second_moments(x, y)
    assert not diag.full_target and ref.full_target
    assert torch.allclose(diag.syy, torch.diag(ref.syy.diagonal()), rtol=0, atol=1e-12)
    lin = LinearEstimator()
    a, b = lin.start(diag), lin.start(ref)
    assert abs(a.information() - b.information()) < 1e-12
    assert abs(a.delta(0).value - b.delta(0).value) < 1e-12
    with pytest.raises(ValueError, match="full covariance"):
        GaussianEstimator().start(diag)


def test_accumulator_rejects_changing_shapes_and_empty():
    acc = MomentAccumulator()
    with pytest.raises(ValueError, match="at least 2 samples"):
        acc.moments()
    acc.update(torch.zeros(3, 4), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"expected \(units, features, target columns\)"):
        acc.update(torch.zeros(3, 5), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="non-finite"):
        acc.update(torch.full((3, 4), float("nan")), torch.zeros(3, 2))


def test_stream_activations_batches_concatenate_to_capture():
    net, x = make_model("tiny-resnet", n=50)
    layers = {n: m for n, m in net.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    whole = capture_activations(net, x.split(16), layers, pool=2)
    parts = []
    meta = stream_activations(net, x.split(16), layers, pool=2, on_batch=parts.append)
    assert [p.n for p in parts] == [16, 16, 16, 2]
    assert meta.alias == whole.alias and meta.order == whole.order
    for name, t in whole.inputs.items():
        assert torch.equal(torch.cat([p.inputs[name] for p in parts]), t), name
    assert torch.equal(torch.cat([p.output for p in parts]), whole.output)


@pytest.mark.parametrize(
    ("model", "est", "pool"),
    [
        ("lenet5", LinearEstimator(), "mean"),
        ("lenet5", GaussianEstimator(), "mean"),
        ("tiny-resnet", LinearEstimator(), 2),
    ],
)
def test_selection_from_streamed_statistics_is_identical(model, est, pool):
    net, x = make_model(model, n=700)
    structure = build_structure(net, x[:2])
    groups = structure.in_scope("all")
    layers = {n: m for n, m in net.named_modules() if n in structure.readers}
    memory = group_data(
        structure, groups, capture_activations(net, x.split(128), layers, pool=pool), est, pool
    )
    # as prune does: linear accumulates only the target's variances
    stream = StreamedMoments(structure, groups, pool, full_target=est.needs_target_covariance)
    stream_activations(net, x.split(100), layers, pool=pool, on_batch=stream.update)
    streamed = stream.group_data()
    for a, b in zip(memory, streamed, strict=True):
        assert torch.equal(a.owner, b.owner) and torch.equal(a.unit, b.unit)
        assert (a.prepared.sxx - b.prepared.sxx).abs().max() <= 1e-10
        assert (a.prepared.sxy - b.prepared.sxy).abs().max() <= 1e-10
        diag_a, diag_b = a.prepared.syy.diagonal(), b.prepared.syy.diagonal()
        assert (diag_a - diag_b).abs().max() <= 1e-10
    tau = 1e-3 if isinstance(est, LinearEstimator) else 1e-2
    mipp_method = MIPP(min_keep=1, order="mi")
    kept_a, res_a = mipp_method._select(memory, est, None, tau, 0, None)
    kept_b, res_b = mipp_method._select(streamed, est, None, tau, 0, None)
    assert sum(int((~k).sum()) for k in kept_a) > 0  # the threshold does prune something
    for ka, kb, ra, rb in zip(kept_a, kept_b, res_a, res_b, strict=True):
        assert torch.equal(ka, kb)
        assert torch.allclose(ra.deltas, rb.deltas, rtol=1e-7, atol=1e-12, equal_nan=True)


def test_prune_with_a_closed_form_never_holds_activations(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("capture_activations must not run for a streaming estimator")

    method_module = importlib.import_module("mipp.methods.mipp")  # where MIPP captures
    monkeypatch.setattr(method_module, "capture_activations", refuse)
    with seeded(0):
        net = mipp.create_model("lenet5", in_channels=1, input_size=28)
    x = torch.randn(600, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    result = mipp.prune(net, x, sparsity=0.5, batch_size=64)
    assert abs(result.report.achieved["units"] - 0.5) <= 0.01
    assert {"capture", "statistics"} <= set(result.report.timings)
