"""MIPP end to end on networks: target sparsity, invariants, report, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from helpers import make_model, zero_consumers
from mipp.errors import MippError
from mipp.methods import MIPP
from mipp.metrics import count_macs, count_params
from mipp.pipeline import prune
from mipp.report import PruneReport
from mipp.surgery.capture import NonFiniteActivationError
from mipp.surgery.replay import apply_report
from mipp.surgery.structure import UnsupportedModuleError, build_structure
from mipp.surgery.verify import renormalised
from mipp.types import ModelSpec
from mipp.zoo import models
from mipp.zoo.checkpoint import load_checkpoint, save_checkpoint
from mipp.zoo.config import TrainConfig
from mipp.zoo.data import ImageDataset, make_separable
from mipp.zoo.training import evaluate, seeded, train


def _check_equivalent(model: nn.Module, result, x: torch.Tensor) -> None:
    masked = copy.deepcopy(model).double()  # float64: the comparison tests exactness,
    pruned = copy.deepcopy(result.model).double()  # not float32 round-off of deep nets
    structure = build_structure(masked, x[:2].double())
    zero_consumers(masked, structure, result.report.removed)
    with torch.no_grad(), renormalised(masked, structure, result.report.removed):
        assert (pruned(x.double()) - masked(x.double())).abs().max().item() < 1e-5
    assert result.report.params_after == count_params(result.model)
    assert result.report.macs_after == count_macs(result.model, x[:1]).macs
    rebuilt = apply_report(copy.deepcopy(model), result.report)  # the record replays
    shapes = {k: v.shape for k, v in result.model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


@pytest.mark.parametrize(
    ("name", "n"),
    [
        ("mlp", 1024),
        ("lenet5", 1024),
        ("vgg11-narrow", 300),
        ("resnet20", 600),
        ("tiny-resnet", 400),
        ("depthwise-net", 400),
        ("grouped-net", 400),
        ("norm-net", 400),
    ],
)
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_target_sparsity_is_met_and_removal_is_exact(name, n, sparsity):
    model, x = make_model(name, n=n, input_size=16)
    result = prune(model, x, sparsity=sparsity, scope="all", compensate=False, recalibrate_bn=False)
    report = result.report
    feasible = 1 - len(report.groups) / report.units_before  # every group keeps one unit
    assert abs(report.achieved["units"] - min(sparsity, feasible)) <= 0.01
    if sparsity > feasible + 0.01:  # tiny-resnet at 0.9: said, not hidden
        assert "could not be met" in report.notes[0]
    assert report.units_after == sum(g.width_after for g in report.groups)
    assert all(g.width_after >= 1 for g in report.groups)
    _check_equivalent(model, result, x[:8])


@pytest.mark.parametrize("sparsity", [0.7, pytest.param(0.9, marks=pytest.mark.slow)])
def test_mobilenetv2_prunes_each_depthwise_conv_with_its_expand_conv(sparsity):
    """A random MobileNetV2 with spread-out BatchNorm statistics has many dead units (Δ = 0,
    removed together at threshold 0: about 57 % of the units), so the targets start at 70 %."""
    model, x = make_model("mobilenetv2-narrow", n=400, input_size=8)
    result = prune(model, x, sparsity=sparsity, compensate=False, recalibrate_bn=False)
    assert abs(result.report.achieved["units"] - sparsity) <= 0.01
    for block in result.model.features:
        width = block.expand.out_channels if hasattr(block, "expand") else None
        if width is not None:
            assert block.dw.in_channels == block.dw.out_channels == block.dw.groups == width
            assert block.dw_bn.num_features == block.project.in_channels == width
    _check_equivalent(model, result, x[:8])


@pytest.mark.parametrize("method", ["mipp", "l1"])
def test_googlenet_branches_and_concatenations_prune_exactly(method):
    """Every conv of the multi-branch net is a group; a module's concatenated output keeps
    each branch's kept channels in place, so the next module's four readers (three 1×1 convs
    and the pool projection) are cut consistently: pruned == masked original."""
    model, x = make_model("googlenet-narrow", n=300, input_size=8)
    result = prune(model, x, method=method, sparsity=0.6, compensate=False, recalibrate_bn=False)
    assert len(result.report.groups) == 1 + 9 * 6
    assert abs(result.report.achieved["units"] - 0.6) <= 0.01
    pruned = result.model
    width = pruned.pre[0].out_channels
    for name in ("a3", "b3", "a4", "b4", "c4", "d4", "e4", "a5", "b5"):
        block = getattr(pruned, name)
        readers = [block.b1[0], block.b2[0][0], block.b3[0][0], block.b4[1][0]]
        assert [r.in_channels for r in readers] == [width] * 4, name
        width = block.b1[0].out_channels + block.b2[1][0].out_channels
        width += block.b3[1][0].out_channels + block.b4[1][0].out_channels
    assert pruned.fc.in_features == width
    assert width < model.fc.in_features
    _check_equivalent(model, result, x[:8])


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "vgg11",
        "vgg13",
        "vgg16",
        "vgg19",
        "resnet32",
        "resnet56",
        "resnet18",
        "resnet34",
        "resnet50",
    ],
)
def test_target_sparsity_on_the_rest_of_the_zoo(name):
    model, x = make_model(name, n=700, input_size=8)
    for sparsity in (0.5, 0.95):
        result = prune(model, x, sparsity=sparsity, compensate=False, recalibrate_bn=False)
        assert abs(result.report.achieved["units"] - sparsity) <= 0.01
        assert all(g.width_after >= 1 for g in result.report.groups)
        _check_equivalent(model, result, x[:4])


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_099_never_empties_a_layer(name):
    model, x = make_model(name, n=700, input_size=16)
    result = prune(model, x, sparsity=0.99, scope="all", tolerance=0.2)
    assert all(g.width_after >= 1 for g in result.report.groups)
    with torch.no_grad():
        assert torch.isfinite(result.model(x[:4])).all()


@pytest.mark.parametrize(("name", "target"), [("lenet5", "params"), ("resnet20", "macs")])
def test_params_and_macs_targets(name, target):
    model, x = make_model(name, n=1024, input_size=16)
    report = prune(model, x, sparsity=0.4, target=target).report
    assert abs(report.achieved[target] - 0.4) <= 0.01
    after = report.params_after if target == "params" else report.macs_after
    before = report.params_before if target == "params" else report.macs_before
    assert 1 - after / before == pytest.approx(report.achieved[target])


def test_unreachable_precision_is_reported_not_hidden():
    """LeNet-5's MACs sit in 22 conv filters: one filter moves MACs by ~5 points."""
    model, x = make_model("lenet5", n=1024)
    report = prune(model, x, sparsity=0.6, target="macs").report
    if abs(report.achieved["macs"] - 0.6) > 0.01:
        said = [n for n in report.notes if "could not be met" in n]
        assert said and f"{report.achieved['macs']:.4f}" in said[0]
    # at least as close as the closest threshold tried (units past it only when closer)
    best = min(abs(b["macs"] - 0.6) for b in report.bisection)
    assert abs(report.achieved["macs"] - 0.6) <= best + 1e-12
    if abs(report.achieved["macs"] - 0.6) < best:
        assert any("removed past the threshold" in n for n in report.notes)


def test_planted_duplicate_hidden_units_are_dropped_once():
    """A hidden layer whose units 4..7 copy units 0..3: MIPP keeps one of each pair."""
    with seeded(0):
        net = models.create("mlp", in_channels=1, input_size=4, widths=(8, 6), num_classes=3)
    with torch.no_grad():
        net.fc1.weight[4:] = net.fc1.weight[:4]
        net.fc1.bias[4:] = net.fc1.bias[:4]
    x = torch.randn(2000, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    result = prune(net, x, method=MIPP(confidence=0.99))
    group = {g.name: g for g in result.report.groups}["fc1"]
    kept = set(group.kept)
    assert all(len(kept & {j, j + 4}) == 1 for j in range(4))
    assert group.width_after == 4


def test_same_seed_same_units_and_input_model_untouched():
    model, x = make_model("lenet5", n=3000)
    before = copy.deepcopy(model.state_dict())
    a = prune(model, x, sparsity=0.7, calib_samples=1500, seed=3)
    b = prune(model, x, sparsity=0.7, calib_samples=1500, seed=3)
    assert [g.kept for g in a.report.groups] == [g.kept for g in b.report.groups]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_report_json_round_trip_and_apply_report(tmp_path):
    model, x = make_model("resnet20", n=600, input_size=16)
    result = prune(model, x, sparsity=0.6, scope="all")
    text = result.report.to_json()
    again = PruneReport.from_dict(json.loads(text))
    assert again.to_json() == text
    fresh, _ = make_model("resnet20", input_size=16)
    apply_report(fresh, again)
    pruned_shapes = {k: v.shape for k, v in result.model.state_dict().items()}
    assert {k: v.shape for k, v in fresh.state_dict().items()} == pruned_shapes
    # a pruned checkpoint rebuilds itself from its sidecar
    spec = ModelSpec("resnet20", input_size=16)
    path = save_checkpoint(
        tmp_path / "p.safetensors", result.model, spec=spec, pruning=[result.report.replay_record()]
    )
    loaded = load_checkpoint(path).model
    with torch.no_grad():
        assert torch.equal(loaded(x[:4]), result.model(x[:4]))


def test_report_records_traces_and_information():
    model, x = make_model("lenet5", n=1024)
    report = prune(model, x, sparsity=0.7).report
    for g in report.groups:
        assert len(g.scores) == len(g.deltas) == g.width_before
        assert sorted(g.kept + g.removed) == list(range(g.width_before))
        assert 0 <= g.retained <= 1 + 1e-9
        assert g.info_kept <= g.info_full + 1e-9
    assert set(report.timings) >= {"capture", "statistics", "selection", "removal", "total"}
    assert report.bisection and report.threshold is not None


def test_pruning_after_training_keeps_a_trained_mlp_accurate():
    """PaT: a separable task survives removing half the hidden units one-shot."""
    xs, ys = make_separable(3000, num_classes=10, dim=32, seed=0)
    data = ImageDataset(xs.reshape(-1, 1, 4, 8), ys, num_classes=10, name="toy")
    with seeded(0):
        net = nn.Sequential(nn.Flatten(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    train(net, data, TrainConfig(epochs=3, optimizer="adam", lr=3e-3, weight_decay=0))
    result = prune(net, data, sparsity=0.5, calib_samples=1000)
    assert result.report.groups[0].width_after == 32
    assert evaluate(result.model, data).top1 > 0.95


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"sparsity": 1.0}, "sparsity must be in [0, 1), got 1.0"),
        ({"sparsity": -0.1}, "sparsity must be in [0, 1), got -0.1"),
        ({"sparsity": 0.5, "method": MIPP(confidence=0.9)}, "give one of them, not both"),
        ({"sparsity": 0.5, "method": MIPP(threshold=0.1)}, "give one of them, not both"),
        ({"method": "l1"}, "method 'l1' needs sparsity= (or match=)"),
        ({"method": "nope", "sparsity": 0.5}, "unknown method 'nope'; valid methods:"),
        ({"method": 3, "sparsity": 0.5}, "method must be a name"),
        ({"sparsity": 0.5, "target": "flops"}, "target must be one of"),
        ({"sparsity": 0.5, "scope": "stream"}, "scope must be one of"),
        ({"sparsity": 0.5, "batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"sparsity": 0.5, "tolerance": 0}, "tolerance must be in (0, 1), got 0"),
    ],
)
def test_bad_options_are_named(options, needle):
    model, x = make_model("lenet5", n=300)
    with pytest.raises((ValueError, TypeError)) as info:
        prune(model, x, **options)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"confidence": 0.0}, "confidence must be in (0, 1), got 0.0"),
        ({"confidence": 1.0}, "confidence must be in (0, 1), got 1.0"),
        ({"confidence": 0.9, "threshold": 0.1}, "confidence= or threshold=, not both"),
        ({"threshold": -1.0}, "threshold must be a finite number >= 0, got -1.0"),
        ({"estimator": "ksg2"}, "unknown estimator 'ksg2'"),
        ({"pool": 0}, "pool must be 'mean' or a positive integer"),
        ({"order": "up"}, "order must be one of mi, index, random; got 'up'"),
        ({"min_keep": 0}, "min_keep must be an integer >= 1, got 0"),
    ],
)
def test_bad_mipp_options_fail_when_the_method_is_built(options, needle):
    with pytest.raises(ValueError) as info:
        MIPP(**options)
    assert needle in str(info.value)


def test_without_a_budget_mipp_applies_the_papers_test_at_095():
    """No sparsity, no match: MIPP's own rule — the selector's default confidence 0.95."""
    model, x = make_model("lenet5", n=600)
    plain = prune(model, x).report
    explicit = prune(model, x, method=MIPP(confidence=0.95)).report
    assert plain.options["confidence"] == explicit.options["confidence"] == 0.95
    assert [g.kept for g in plain.groups] == [g.kept for g in explicit.groups]
    assert plain.requested is None and not plain.bisection


def test_statistics_bytes_known_answer():
    """One group of 10 units × 2 features and a 5-column target: D = 20. Streamed per fold
    D² + D·q + q² = 400 + 100 + 25 (q = 5 without the covariance); the state
    6D² + 2D·q + 3q² = 2,675 (gaussian) or 3D² + 2D·q = 1,400 (linear); with 5 folds, six
    copies (the folds and their whole)."""
    from mipp.methods.mipp import statistics_bytes

    assert statistics_bytes([(10, 2, 5)], full_target=True) == (8 * 525, 8 * 2675)
    assert statistics_bytes([(10, 2, 5)], full_target=False) == (8 * 505, 8 * 1400)
    assert statistics_bytes([(10, 2, 5)] * 2, full_target=True, folds=5) == (8 * 525 * 12, 8 * 2675)
    # a group wider than rows[1] keeps its 4 rows and their means and extremes:
    # 4·20 + 4·5 + 3·(20 + 5) streamed, 4·20 + 5·16 + 4·5 held; a narrower one is counted as
    # before
    assert statistics_bytes([(10, 2, 5)], full_target=True, rows=(4, 8)) == (8 * 175, 8 * 180)
    assert statistics_bytes([(10, 2, 5)], full_target=True, rows=(4, 20)) == (8 * 525, 8 * 2675)


def test_statistics_larger_than_memory_are_refused_before_the_pass(monkeypatch):
    """On a machine too small for the target covariances, gaussian is refused with one line
    naming the size, the widest group and what linear would need — before any statistics
    are streamed (only tracing and the two-sample probe ran)."""
    from mipp.methods import mipp as mipp_module

    model, x = make_model("lenet5", n=300)
    monkeypatch.setattr(mipp_module, "machine_memory", lambda: 1_000_000)  # 1 MB
    forwards = []
    model.register_forward_hook(lambda m, i, o: forwards.append(len(i[0])))
    with pytest.raises(MippError) as info:
        prune(model, x, sparsity=0.5)
    message = str(info.value)
    assert "\n" not in message and "'gaussian' statistics would need about" in message
    assert "group 'fc1', 120 units × 1 features, a 84-column target" in message
    assert "estimator='linear' keeps no target covariance" in message
    assert sum(forwards) < len(x)  # the calibration set was never streamed
    monkeypatch.setattr(mipp_module, "machine_memory", lambda: 10**12)
    assert prune(model, x, sparsity=0.5).report.achieved["units"] > 0.45


def test_too_small_calibration_set_says_how_many_are_needed():
    """The significance test (confidence mode) needs more samples than features; Δ alone
    (threshold / target modes) does not: the ridge keeps it defined."""
    model, x = make_model("lenet5", n=100)
    # gaussian (the default) needs the 84-column target's covariance too: 120 + 84 + 2
    with pytest.raises(ValueError, match=r"group 'fc1' has 120 units .* at least 206 samples"):
        prune(model, x, method=MIPP(confidence=0.9))
    with pytest.raises(ValueError, match=r"group 'fc1' has 120 units .* at least 122 samples"):
        prune(model, x, method=MIPP(estimator="linear", confidence=0.9))
    with pytest.raises(ValueError, match="calibration set is empty"):
        prune(model, x[:0], sparsity=0.5)


@pytest.mark.parametrize("estimator", ["linear", "gaussian"])
def test_wide_layers_with_fewer_samples_than_features_work_in_target_mode(estimator):
    """64 samples for fc1's 120 features: Δ comes from the ridge, the target is met, and the
    pruned network is the original with the reported units removed."""
    model, x = make_model("lenet5", n=64)
    method = MIPP(estimator=estimator, reconstruct=False)
    result = prune(model, x, method=method, sparsity=0.7)
    assert abs(result.report.achieved["units"] - 0.7) <= 0.01
    _check_equivalent(model, result, x[:8])
    res = MIPP(estimator=estimator, reconstruct=False, threshold=0.01)
    assert prune(model, x, method=res).report.units_after < result.report.units_before


def test_non_finite_activations_name_the_layer_and_leave_the_model_alone():
    model, x = make_model("lenet5", n=300)
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NonFiniteActivationError, match="input of layer 'fc2'"):
        prune(model, x, sparsity=0.5)
    after = model.state_dict()
    assert all(
        torch.equal(
            before[k],
            after[k],
        )
        or k == "fc1.weight"
        for k in before
    )
    assert torch.isnan(after["fc1.weight"][0, 0])
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_unsupported_module_is_refused_by_prune():
    class Mix(nn.Module):  # a weight matrix outside any layer mipp knows
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.eye(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight

    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), Mix(), nn.Linear(8, 2))
    with pytest.raises(UnsupportedModuleError, match=r"'2' \(Mix\)"):
        prune(net, torch.randn(64, 16), sparsity=0.5)


def test_a_model_without_parameters_is_refused_by_name():
    with pytest.raises(MippError, match="Sequential has no parameters"):
        prune(nn.Sequential(nn.Flatten(), nn.ReLU()), torch.randn(8, 4), sparsity=0.5)


@pytest.mark.parametrize("name", ["transformer", "transformer-mha"])
def test_transformer_ffn_hidden_neurons_are_pruned_attention_left_whole(name):
    """A Linear applied to every token reads (n, tokens, features): its features are
    recorded like channels. The FFN hidden layers are internal groups; q/k/v (tied by the
    attention products) and the residual stream are not, so scope "internal" prunes the FFN
    neurons only and the attention keeps its width and heads."""
    model, x = make_model(name, n=512)
    result = prune(model, x, sparsity=0.5, compensate=False)
    assert sorted(g.name for g in result.report.groups) == ["blocks.0.fc1", "blocks.1.fc1"]
    assert abs(result.report.achieved["units"] - 0.5) <= 0.01
    for block in result.model.blocks:
        assert block.fc1.out_features == block.fc2.in_features < 64
        assert block.fc2.out_features == 16
        if name == "transformer":
            assert {block.attn.q.out_features, block.attn.o.in_features} == {16}
        else:
            assert block.attn.embed_dim == 16 and block.attn.num_heads == 4
    _check_equivalent(model, result, x[:8])


class _Branches(nn.Module):
    """Two branches concatenated: a → b (3 channels) beside c (5 channels), then d."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 4, 1), nn.Conv2d(4, 3, 3, padding=1)
        self.c = nn.Conv2d(2, 5, 1)
        self.d = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.relu(self.b(torch.relu(self.a(x)))), torch.relu(self.c(x))], 1)
        return self.fc(torch.relu(self.d(h)).mean((2, 3)))


def test_target_of_a_branch_is_its_consumers_own_channels_of_the_concatenation():
    """Group 'a' is read by 'b', whose output is 3 of the 8 channels 'd' reads: its target is
    those 3 columns, not the whole concatenation (the 5 channels of 'c' are not b's output).
    Group 'b' (read by 'd') has the 6 channels of d's output, read by fc, as target."""
    from mipp.methods.targets import group_columns
    from mipp.surgery.capture import stream_activations

    torch.manual_seed(0)
    model, x = _Branches().eval(), torch.randn(16, 2, 6, 6)
    structure = build_structure(model, x[:1])
    groups = structure.in_scope("internal")
    wanted = set(structure.readers) | {
        nxt for g in groups for c in g.consumers for nxt in structure.next_layers[c.layer]
    }
    layers = {n: m for n, m in model.named_modules() if n in wanted}
    widths = {}

    def probe(acts) -> None:
        columns = group_columns(structure, groups, acts, "mean")
        for g, (_, y, owner, _) in zip(groups, columns, strict=True):
            widths[g.name] = (y.shape[1], owner.tolist())

    stream_activations(model, [x], layers, on_batch=probe)
    walk = [g.name for g in groups]
    assert widths["a"] == (3, [walk.index("b")] * 3)
    assert widths["b"][0] == widths["c"][0] == 6
    result = prune(model, x, sparsity=0.4, compensate=False, recalibrate_bn=False)
    assert result.model.d.in_channels == result.model.b.out_channels + result.model.c.out_channels
