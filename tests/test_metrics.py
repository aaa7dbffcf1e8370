"""Tests for mipp.metrics: exact MAC counts, parameters, latency, widths, summaries."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from mipp.metrics import (
    LatencyResult,
    count_macs,
    count_params,
    layer_widths,
    measure_latency,
    model_summary,
)
from mipp.zoo.models import LeNet5, create

LENET_PER_LAYER = {
    "conv1": 6 * 28 * 28 * (1 * 5 * 5),  # 117,600
    "conv2": 16 * 10 * 10 * (6 * 5 * 5),  # 240,000
    "fc1": 400 * 120,
    "fc2": 120 * 84,
    "fc3": 84 * 10,
}


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --- parameters -------------------------------------------------------------------------------


def test_count_params() -> None:
    model = nn.Sequential(nn.Linear(10, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
    assert count_params(model) == (10 * 5 + 5) + (5 + 5) + (5 * 2 + 2)
    model[0].requires_grad_(False)
    assert count_params(model, trainable_only=True) == 10 + 12
    assert count_params(model) == 77
    shared = nn.Linear(3, 3)
    assert count_params(nn.Sequential(shared, shared)) == 12  # a shared tensor counts once


# --- MACs on hand-computed layers -------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "shape", "expected"),
    [
        (nn.Conv2d(3, 8, 3, padding=1), (3, 32, 32), 8 * 32 * 32 * 3 * 3 * 3),
        # Grouped: each of 16 filters sees 8 / 4 = 2 input channels.
        (nn.Conv2d(8, 16, 3, padding=1, groups=4), (8, 16, 16), 16 * 16 * 16 * 2 * 3 * 3),
        # Depthwise, strided: out side (16 + 2 - 3) // 2 + 1 = 8.
        (nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), (8, 16, 16), 8 * 8 * 8 * 9),
        (nn.Conv1d(4, 6, 5), (4, 20), 6 * 16 * 4 * 5),
        (nn.Linear(20, 7), (20,), 20 * 7),
        (nn.Linear(20, 7), (5, 20), 5 * 20 * 7),  # applied to each of 5 positions
        (nn.BatchNorm2d(8), (8, 5, 5), 8 * 5 * 5),
        (nn.BatchNorm1d(7), (7,), 7),
        (nn.ReLU(), (7,), 0),
    ],
)
def test_macs_of_single_layers(layer: nn.Module, shape: tuple[int, ...], expected: int) -> None:
    count = count_macs(layer, shape)
    assert count.macs == expected
    assert count.flops == 2 * expected


def test_lenet5_macs_hand_computed() -> None:
    for size in (28, 32):  # 28 px uses padding 2, so conv1's output is 28×28 in both cases
        count = count_macs(LeNet5(input_size=size), (1, size, size))
        assert count.per_layer == LENET_PER_LAYER
        assert count.macs == 416_520 == sum(LENET_PER_LAYER.values())
        assert count.flops == 833_040


def test_macs_match_torch_flop_counter_on_resnet20() -> None:
    """Reference: torch's FlopCounterMode counts conv/matmul FLOPs (no BN, no bias)."""
    model = create("resnet20").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    count = count_macs(model, (3, 32, 32))
    bn_names = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    bn = {n: v for n, v in count.per_layer.items() if n in bn_names}
    assert len(bn) == 1 + 9 * 2 + 2  # stem, two per block, two projection shortcuts
    assert 2 * (count.macs - sum(bn.values())) == counter.get_total_flops()
    # Hand check of the BN part: every BN sees 16·32², 32·16² or 64·8² elements (= 16,384,
    # 8,192, 4,096): stage 1 has the stem + 6, stages 2/3 have 6 + 1 projection each.
    assert sum(bn.values()) == 7 * 16_384 + 7 * 8_192 + 7 * 4_096


def test_per_layer_sums_to_total_and_lists_every_layer_in_order() -> None:
    model = create("resnet20")
    count = count_macs(model, (3, 32, 32))
    assert sum(count.per_layer.values()) == count.macs
    counted = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
    expected = [n for n, m in model.named_modules() if isinstance(m, counted)]
    assert list(count.per_layer) == expected
    assert all(v > 0 for v in count.per_layer.values())


def test_macs_are_per_sample() -> None:
    model = create("lenet5", in_channels=3)
    single = count_macs(model, (3, 32, 32))
    batch = count_macs(model, torch.randn(4, 3, 32, 32))
    assert batch == single
    assert count_macs(model, torch.randn(1, 3, 32, 32)) == single


def test_unreached_layer_counts_zero() -> None:
    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 3)
            self.unused = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.used(x)

    count = count_macs(Skips(), (4,))
    assert count.per_layer == {"used": 12, "unused": 0}
    assert count.macs == 12


def test_count_macs_leaves_model_untouched() -> None:
    model = create("resnet20")
    model.train()
    model.layer2.eval()  # a mixed state must come back exactly
    before = {n: m.training for n, m in model.named_modules()}
    running_mean = model.bn1.running_mean.clone()
    count_macs(model, torch.randn(2, 3, 32, 32))
    assert {n: m.training for n, m in model.named_modules()} == before
    assert torch.equal(model.bn1.running_mean, running_mean)  # ran in eval mode
    assert no_hooks(model)


def test_hooks_removed_and_mode_restored_when_forward_raises() -> None:
    class Boom(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Boom())
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        count_macs(model, (3, 8, 8))
    assert no_hooks(model)
    assert all(m.training for m in model.modules())


def test_count_macs_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match=r"\(0, 3\)"):
        count_macs(nn.Linear(3, 2), (0, 3))


# --- latency ----------------------------------------------------------------------------------


def test_measure_latency() -> None:
    model = create("lenet5", in_channels=1)
    model.train()
    threads = torch.get_num_threads()
    results = measure_latency(model, (1, 32, 32), batch_sizes=(1, 64), repeats=5, warmup=1)
    assert set(results) == {1, 64}
    for b, r in results.items():
        assert isinstance(r, LatencyResult)
        assert r.batch_size == b and r.repeats == 5
        assert 0 < r.min_ms <= r.p10_ms <= r.median_ms <= r.p90_ms <= r.max_ms
    assert all(m.training for m in model.modules())
    assert torch.get_num_threads() == threads


def test_measure_latency_threads_restored_and_validation() -> None:
    threads = torch.get_num_threads()
    model = nn.Linear(8, 4)
    results = measure_latency(model, (8,), batch_sizes=(2,), repeats=1, warmup=0, threads=1)
    assert results[2].repeats == 1 and results[2].median_ms == results[2].min_ms > 0
    assert torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(model, (8,), repeats=0)
    with pytest.raises(ValueError, match="batch_sizes"):
        measure_latency(model, (8,), batch_sizes=(0,))


# --- widths and summary -----------------------------------------------------------------------


def test_layer_widths_lenet5() -> None:
    widths = layer_widths(LeNet5())
    assert widths == {"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84, "fc3": 10}
    assert list(widths) == ["conv1", "conv2", "fc1", "fc2", "fc3"]


def test_layer_widths_resnet_includes_shortcuts_in_order() -> None:
    widths = layer_widths(create("resnet20"))
    assert len(widths) == 1 + 9 * 2 + 2 + 1
    assert widths["layer2.0.shortcut.conv"] == 32
    assert list(widths)[:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
    assert widths["fc"] == 10


def test_model_summary_is_json_serialisable() -> None:
    summary = model_summary(LeNet5(), (1, 32, 32))
    assert json.loads(json.dumps(summary)) == summary
    assert summary["params"] == summary["trainable_params"] == 61_706
    assert summary["macs"] == 416_520
    assert summary["flops"] == 2 * summary["macs"]
    assert summary["macs_per_layer"] == LENET_PER_LAYER
    assert summary["layer_widths"] == {"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84, "fc3": 10}
    assert summary["input_shape"] == [1, 32, 32]
