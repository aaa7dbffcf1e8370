"""MippImportance: MIPP's conditional information as a Torch-Pruning importance."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from mipp.estimators import GaussianEstimator, LinearEstimator
from mipp.interop import MippImportance, elimination_scores
from mipp.testing.estimators import planted_layer
from mipp.zoo import models
from mipp.zoo.training import seeded

DUPLICATES = ((0, 4), (1, 5))  # unit 4 copies unit 0, unit 5 copies unit 1
DEAD = (6, 7)  # zero weights, negative bias: ReLU output 0 on every input
INFORMATIVE = (0, 1, 2, 3, 8, 9)


def _planted_mlp() -> tuple[nn.Module, torch.Tensor]:
    """An MLP 16 → 10 → 6 → 3 whose hidden layer fc1 has two exact duplicate units and two
    dead ones, and 2000 calibration inputs."""
    with seeded(0):
        net = models.create("mlp", in_channels=1, input_size=4, widths=(10, 6), num_classes=3)
    with torch.no_grad():
        for a, b in DUPLICATES:
            net.fc1.weight[b] = net.fc1.weight[a]
            net.fc1.bias[b] = net.fc1.bias[a]
        for u in DEAD:
            net.fc1.weight[u] = 0.0
            net.fc1.bias[u] = -1.0
    x = torch.randn(2000, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    return net.eval(), x


def _kept_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Which rows of ``before`` the pruned weight ``after`` kept (rows are distinct except
    for exact duplicates, where the first match is reported)."""
    kept = []
    for row in after:
        match = [i for i in range(len(before)) if torch.equal(before[i], row) and i not in kept]
        assert match, "a kept row matches no original row"
        kept.append(match[0])
    return kept


def _full_group(model: nn.Module, layer: nn.Module, x: torch.Tensor):
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x[:2])
    fn = graph.get_pruner_of_module(layer).prune_out_channels
    width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return graph.get_pruning_group(layer, fn, idxs=list(range(width)))


# --- tensor level: the elimination ranking -------------------------------------------------


@pytest.mark.parametrize("estimator", [GaussianEstimator(), LinearEstimator()])
def test_elimination_ranks_planted_layer(estimator):
    """Constant units first, then one copy of each duplicate pair, ignored noise before
    every informative unit; the scores are the chain rule's cumulative shares (last = 1)."""
    layer = planted_layer(n=3000)
    scores = elimination_scores(estimator.start(estimator.prepare(layer.x, layer.y)))
    assert scores.shape == (13,) and scores.dtype == torch.float64
    order = torch.argsort(scores, stable=True).tolist()
    assert set(order[:2]) == set(layer.constant)
    assert scores[layer.constant].eq(0).all()
    assert float(scores.max()) == pytest.approx(1.0, abs=1e-9)
    # one copy of each pair and the ignored noise go before any other informative unit
    early = set(order[2:7])
    assert all(len(early & set(pair)) == 1 for pair in layer.duplicate_pairs)
    assert set(layer.ignored) <= early


# --- module level: a planted hidden layer through Torch-Pruning ----------------------------


def test_dead_units_score_lowest_and_one_copy_of_each_duplicate_next():
    net, x = _planted_mlp()
    importance = MippImportance(net, x)
    scores = importance(_full_group(net, net.fc1, x))
    assert scores.shape == (10,)  # exactly one score per channel of the root
    order = torch.argsort(scores, stable=True).tolist()
    assert set(order[:2]) == set(DEAD) and scores[list(DEAD)].eq(0).all()
    assert all(len(set(order[2:4]) & set(pair)) == 1 for pair in DUPLICATES)
    assert float(scores.max()) == pytest.approx(1.0, abs=1e-9)


def test_meta_pruner_removes_the_dead_units_exactly():
    """At 20 % of fc1 the pruner removes the two dead units: the outputs do not change."""
    net, x = _planted_mlp()
    original = copy.deepcopy(net)
    before = net.fc1.weight.detach().clone()
    pruner = tp.pruner.MetaPruner(
        net,
        x[:2],
        importance=MippImportance(net, x),
        pruning_ratio=0.2,
        ignored_layers=[net.fc2, net.fc3],  # fc1's group only
    )
    pruner.step()
    assert net.fc1.out_features == 8
    kept = _kept_rows(before, net.fc1.weight.detach())
    assert not set(kept) & set(DEAD)
    with torch.no_grad():
        assert torch.allclose(net(x[:64]), original(x[:64]), atol=1e-6)


def test_meta_pruner_keeps_one_copy_of_each_duplicate():
    """At 40 % with only the output layer ignored: fc1 loses the dead units and one copy of
    each duplicate pair, and keeps every informative unit (fc2 is pruned too)."""
    net, x = _planted_mlp()
    before = net.fc1.weight.detach().clone()
    importance = MippImportance(net, x)
    pruner = tp.pruner.MetaPruner(
        net, x[:2], importance=importance, pruning_ratio=0.4, ignored_layers=[net.fc3]
    )
    pruner.step()
    assert net.fc1.out_features == 6 and net.fc2.out_features == 3  # int(6 · 0.6) kept
    kept = _kept_rows(before, net.fc1.weight.detach())
    assert sorted(kept) == list(INFORMATIVE)  # a kept duplicate matches its original first
    assert importance.refreshes_ == 1  # every group of the step scored on one capture


# --- staleness and the score vector's length ----------------------------------------------


def _lenet(n: int = 600) -> tuple[nn.Module, torch.Tensor]:
    with seeded(0):
        net = models.create("lenet5", in_channels=1, input_size=28)
    x = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    return net.eval(), x


def _root_width(group) -> int:
    m = group[0].dep.target.module
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def test_lenet5_scores_have_the_roots_channel_count_across_pruning_steps():
    net, x = _lenet()
    importance = MippImportance(net, x)
    pruner = tp.pruner.MetaPruner(
        net,
        x[:2],
        importance=importance,
        pruning_ratio=0.5,
        iterative_steps=2,
        ignored_layers=[net.fc3],
    )
    widths = []
    for step in range(2):
        groups = list(pruner.DG.get_all_groups(ignored_layers=[net.fc3]))
        assert len(groups) == 4
        for group in groups:
            scores = importance(group)
            assert scores is not None and len(scores) == _root_width(group)
            assert bool(torch.isfinite(scores).all()) and float(scores.min()) >= 0
        assert importance.refreshes_ == step + 1  # scored once per model state
        pruner.step()
        widths.append([net.conv1.out_channels, net.conv2.out_channels, net.fc1.out_features])
    assert widths == [[4, 12, 90], [3, 8, 60]]  # int(width · kept share) per step
    group = pruner.DG.get_pruning_group(net.fc1, tp.prune_linear_out_channels, idxs=list(range(60)))
    assert len(importance(group)) == 60 and importance.refreshes_ == 3  # not stale


def test_a_weight_update_invalidates_the_scores_and_nothing_else_does():
    net, x = _lenet(300)
    importance = MippImportance(net, x)
    group = _full_group(net, net.conv2, x)
    first = importance(group)
    assert torch.equal(importance(group), first) and importance.refreshes_ == 1
    with torch.no_grad():
        net.conv2.weight[0].mul_(0.0)  # channel 0 now carries nothing
    second = importance(group)
    assert importance.refreshes_ == 2
    assert float(second[0]) == 0.0 and float(first[0]) > 0.0


def test_groups_mipp_does_not_score_are_left_whole():
    """The output layer and, with scope="internal", residual streams: importance None, so
    Torch-Pruning's pruner skips them."""
    with seeded(0):
        net = models.create("resnet20", in_channels=3, input_size=8)
    x = torch.randn(300, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    net.eval()
    importance = MippImportance(net, x, scope="internal")
    graph = tp.DependencyGraph().build_dependency(net, example_inputs=x[:2])
    scored = skipped = 0
    for group in graph.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]):
        scores = importance(group)
        if scores is None:
            skipped += 1
        else:
            scored += 1
            assert len(scores) == _root_width(group)
    assert scored == 9  # the first conv of each of the 9 blocks
    assert skipped >= 4  # the output layer and the 3 stream groups
    stem, inner = net.conv1.out_channels, net.layer1[0].conv1.out_channels
    tp.pruner.MetaPruner(net, x[:2], importance=importance, pruning_ratio=0.5).step()
    assert net.conv1.out_channels == stem  # a stream's producer: untouched
    assert net.layer1[0].conv1.out_channels == inner // 2  # a block-internal group: pruned


def test_bad_arguments_are_refused():
    net, x = _lenet(10)
    with pytest.raises(ValueError, match="valid estimators: linear, gaussian"):
        MippImportance(net, x, estimator="nope")
    with pytest.raises(ValueError, match="at least 2 calibration samples"):
        MippImportance(net, x[:1])
    with pytest.raises(ValueError, match="scope must be one of internal, all"):
        MippImportance(net, x, scope="streams")
    other, _ = _lenet(2)
    with pytest.raises(ValueError, match="not a layer of the model"):
        MippImportance(other, x)(_full_group(net, net.fc1, x))
