"""Capture: what consumers read, pooled per channel; hooks always removed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mipp.surgery.capture import NonFiniteActivationError, capture_activations, pool_channels


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_pooling_known_answers():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert pool_channels(x, "mean").flatten().tolist() == [7.5]
    # 2x2 adaptive average of a 4x4 ramp: block means
    assert pool_channels(x, 2).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert pool_channels(torch.ones(3, 5), "mean").shape == (3, 5, 1)
    assert pool_channels(torch.arange(6.0).reshape(1, 1, 6), 3).flatten().tolist() == [
        0.5,
        2.5,
        4.5,
    ]


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 2),
    ).eval()


def test_records_what_consumers_read_after_bn_relu_and_pool():
    net = _net()
    x = torch.randn(5, 1, 8, 8)
    layers = {"4": net[4], "7": net[7]}
    acts = capture_activations(net, [x[:3], x[3:]], layers)
    with torch.no_grad():
        seen_by_conv = net[3](net[2](net[1](net[0](x))))
        seen_by_fc = net[6](net[5](net[4](seen_by_conv)))
        out = net(x)
    torch.testing.assert_close(acts.inputs["4"], seen_by_conv.mean((2, 3)).unsqueeze(-1))
    torch.testing.assert_close(acts.inputs["7"], seen_by_fc)
    torch.testing.assert_close(acts.output, out)
    assert acts.order == ["4", "7"] and acts.n == 5
    assert _hooks(net) == 0


def test_layers_reading_the_same_tensor_are_recorded_once():
    class Fork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x) + self.b(x)

    net = Fork()
    acts = capture_activations(net, [torch.randn(4, 3)], {"a": net.a, "b": net.b})
    assert acts.alias == {"b": "a"}
    assert list(acts.inputs) == ["a"]
    assert acts.of("b") is acts.inputs["a"]


def test_hooks_are_removed_when_the_forward_raises():
    net = _net()
    net.train()

    def boom(*_):
        raise RuntimeError("forward failed")

    net[5].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="forward failed"):
        capture_activations(net, [torch.randn(2, 1, 8, 8)], {"4": net[4], "7": net[7]})
    assert _hooks(net) == 1  # only the test's own hook is left
    assert net.training  # mode restored


def test_non_finite_input_names_the_layer():
    net = _net()
    with torch.no_grad():
        net[4].bias[0] = float("inf")
    with pytest.raises(NonFiniteActivationError, match="input of layer '7'"):
        capture_activations(net, [torch.randn(2, 1, 8, 8)], {"4": net[4], "7": net[7]})
    assert _hooks(net) == 0


def _conv_net() -> nn.Module:
    torch.manual_seed(0)  # (n, 1, 8, 8) → conv 4 ch: its output, 4·8·8 float32 = 1 KiB a sample
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 2),
    ).eval()


def test_a_cpu_capture_runs_in_pieces_sized_to_the_activations(monkeypatch):
    """On a CPU each batch goes through the model in pieces whose largest activation is about
    CPU_PIECE_BYTES: a probe of PROBE_SAMPLES, then pieces of CPU_PIECE_BYTES / (bytes per
    sample); the records are those of one forward per batch."""
    from mipp.surgery import capture

    net = _conv_net()
    x = torch.randn(30, 1, 8, 8)
    layers = {"3": net[3], "7": net[7]}
    calls = []
    net.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    monkeypatch.setattr(capture, "CPU_PIECE_BYTES", None)
    whole = capture_activations(net, x.split(16), layers)
    assert calls == [16, 14]
    calls.clear()
    monkeypatch.setattr(capture, "CPU_PIECE_BYTES", 4 * 1024)  # 4 samples of 1 KiB
    pieces = capture_activations(net, x.split(16), layers)
    assert calls == [capture.PROBE_SAMPLES, 4, 4, 4, 4, 4, 2]
    assert pieces.order == whole.order and pieces.alias == whole.alias
    for name in layers:
        torch.testing.assert_close(pieces.inputs[name], whole.inputs[name], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pieces.output, whole.output, rtol=1e-6, atol=1e-7)
    calls.clear()
    monkeypatch.setattr(capture, "CPU_PIECE_BYTES", 1)  # smaller than a sample: one at a time
    capture_activations(net, x[:11].split(16), layers)
    assert calls == [capture.PROBE_SAMPLES, 1, 1, 1]


def test_capture_inputs_in_pieces_keeps_every_sample_in_order(monkeypatch):
    from mipp.surgery import capture

    net = _conv_net()
    x = torch.randn(21, 1, 8, 8)
    layers = {"3": net[3]}

    def reduce(name, raw):  # one statistic per (sample, channel)
        return raw.flatten(2).max(-1).values

    whole = capture.capture_inputs(net, x.split(16), layers, reduce)
    monkeypatch.setattr(capture, "CPU_PIECE_BYTES", 3 * 1024)  # 3 samples of 1 KiB
    calls = []
    net.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    pieces = capture.capture_inputs(net, x.split(16), layers, reduce, pieces=True)
    assert calls == [capture.PROBE_SAMPLES, 3, 3, 2, 3, 2]
    torch.testing.assert_close(pieces["3"], whole["3"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("piece_bytes", [None, 1, 3 * 1024])
def test_input_spreads_equal_those_of_the_recorded_inputs(monkeypatch, piece_bytes):
    """Per feature, the largest deviation from the first sample and the largest magnitude of
    each layer's input, read piece by piece (whole, one sample, a few samples), equal those of
    the whole recorded input (a Linear's features on its last dimension; up to float32
    rounding, since a piece's kernels may round differently; a constant feature's spread is
    exactly 0 either way); a NaN in a feature makes its spread NaN; the hooks are gone
    afterwards."""
    from mipp.surgery import capture

    net = _net()
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # one channel of the second conv's input constant: 0 after ReLU
        net[0].weight[1].zero_()
        net[0].bias[1] = -1.0
    layers = {"4": net[4], "7": net[7]}
    monkeypatch.setattr(capture, "CPU_PIECE_BYTES", piece_bytes)
    seen, error = capture.input_spreads(net, x, layers)
    assert error is None and _hooks(net) == 0
    whole, _ = capture.record_first_inputs(net, x, layers)
    for name in layers:
        inp = whole[name].double()
        spread = (inp - inp[:1]).abs().transpose(0, 1).flatten(1).amax(1)
        size = inp.abs().transpose(0, 1).flatten(1).amax(1)
        got_spread, got_size, eps = seen[name]
        assert torch.allclose(got_spread, spread, rtol=1e-5, atol=1e-6)
        assert torch.allclose(got_size, size, rtol=1e-5, atol=1e-6)
        assert eps == torch.finfo(torch.float32).eps
    assert seen["4"][0][1] == 0.0 and seen["4"][0][0] > 0.0  # the constant channel
    x[5, 0, 2, 2] = float("nan")
    seen, error = capture.input_spreads(net, x, layers)
    assert error is None and bool(seen["4"][0].isnan().any())


class _Fork(nn.Module):
    """Two layers read the same tensor (an Inception module's branches, a block's first
    convolution and its shortcut)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 3, 1)
        self.b = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        return torch.cat([self.a(h), self.b(h)], 1)


@pytest.mark.parametrize("piece_bytes", [None, 1])
def test_layers_reading_one_tensor_share_one_reading_of_it(monkeypatch, piece_bytes):
    from mipp.surgery import capture

    net = _Fork().eval()
    x = torch.randn(20, 1, 6, 6, generator=torch.Generator().manual_seed(4))
    layers = {"a": net.a, "b": net.b}
    monkeypatch.setattr(capture, "CPU_PIECE_BYTES", piece_bytes)
    seen, error = capture.input_spreads(net, x, layers)
    assert error is None and _hooks(net) == 0
    whole, _ = capture.record_first_inputs(net, x, layers)
    inp = whole["a"].double()
    spread = (inp - inp[:1]).abs().amax(dim=(0, 2, 3))
    for name in layers:
        assert torch.allclose(seen[name][0], spread, rtol=1e-5, atol=1e-6)
    if piece_bytes is None:  # one piece: the second layer got the first one's reading
        assert seen["a"][0] is seen["b"][0] and seen["a"][1] is seen["b"][1]
