"""Training loop, schedules and configuration: known answers and invariants."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mipp.zoo.config import TrainConfig
from mipp.zoo.data import ImageDataset, make_separable
from mipp.zoo.training import _lr_factor, evaluate, seeded, train


def _mlp(dim: int, classes: int, seed: int) -> nn.Module:
    with seeded(seed):
        return nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, classes))


def _toy(n: int, seed: int) -> ImageDataset:
    x, y = make_separable(n, num_classes=10, dim=32, seed=seed)
    return ImageDataset(x, y, num_classes=10, name="synthetic")


def test_synthetic_task_reaches_95_percent():
    train_ds, test_ds = _toy(3000, seed=0), _toy(1000, seed=1)
    model = _mlp(32, 10, seed=0)
    config = TrainConfig(epochs=5, batch_size=64, optimizer="adam", lr=3e-3, weight_decay=0.0)
    events = []
    history = train(model, train_ds, config, progress=events.append)
    result = evaluate(model, test_ds)
    assert result.top1 > 0.95
    assert result.n == 1000
    # progress: one transient step event per batch (47 of 64 per epoch), one per epoch
    steps = [e for e in events if e.stage == "train"]
    epochs = [e for e in events if e.stage == "epoch"]
    assert len(steps) == 5 * 47 and all(e.transient and e.total == 47 for e in steps)
    assert [e.done for e in steps[:3]] == [1, 2, 3] and steps[46].done == 47
    assert [e.fields["epoch"] for e in epochs] == [1, 2, 3, 4, 5]
    assert [e.fields["train_loss"] for e in epochs] == [s.train_loss for s in history.epochs]
    assert [e.epoch for e in history.epochs] == [1, 2, 3, 4, 5]
    # training loss goes down
    assert history.epochs[-1].train_loss < history.epochs[0].train_loss


def test_training_is_bit_deterministic_for_a_seed_and_differs_across_seeds():
    ds = _toy(512, seed=0)
    config = TrainConfig(epochs=2, batch_size=32, lr=0.05)
    a, b = _mlp(32, 10, seed=0), _mlp(32, 10, seed=0)
    train(a, ds, config)
    train(b, ds, config)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    c = _mlp(32, 10, seed=0)
    train(c, ds, TrainConfig(epochs=2, batch_size=32, lr=0.05, seed=1))
    assert not torch.equal(a[0].weight, c[0].weight)


def test_seeded_leaves_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with seeded(7):
        torch.rand(100)
    assert torch.equal(torch.rand(3), expected)


def test_training_accepts_a_plain_dataloader_and_evaluate_matches_by_hand():
    ds = _toy(256, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=False)
    model = _mlp(32, 10, seed=0)
    train(model, loader, TrainConfig(epochs=1, batch_size=32))
    result = evaluate(model, loader)
    with torch.no_grad():
        logits = model(ds.x)
    assert result.loss == pytest.approx(nn.functional.cross_entropy(logits, ds.y).item(), 1e-5)
    assert result.top1 == pytest.approx((logits.argmax(1) == ds.y).float().mean().item())


def test_evaluate_known_answer_and_restores_mode():
    ds = ImageDataset(torch.eye(3), torch.tensor([0, 1, 2]), num_classes=3, name="id")
    model = nn.Sequential(nn.Identity())
    model.train()
    result = evaluate(model, ds)
    assert result.top1 == 1.0
    # cross-entropy of logits e_i for class i: log(e + 2) - 1
    assert result.loss == pytest.approx(math.log(math.e + 2) - 1)
    assert model.training


def test_cosine_and_step_schedules():
    cos = _lr_factor(TrainConfig(schedule="cosine"), 100)
    assert cos(0) == 1.0
    assert cos(50) == pytest.approx(0.5)
    assert cos(100) == pytest.approx(0.0)
    step = _lr_factor(TrainConfig(schedule="step", gamma=0.1), 90)
    assert [step(s) for s in (0, 29, 30, 59, 60, 89)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    const = _lr_factor(TrainConfig(schedule="constant"), 10)
    assert const(0) == const(9) == 1.0


def test_epoch_stats_report_the_scheduled_learning_rate():
    ds = _toy(96, seed=0)
    config = TrainConfig(epochs=3, batch_size=32, lr=0.1, schedule="step")
    history = train(_mlp(32, 10, seed=0), ds, config)
    # 3 steps per epoch, 9 in all: last step of epochs 1, 2, 3 is 2, 5, 8 -> x1, x0.1, x0.01
    assert [e.lr for e in history.epochs] == pytest.approx([0.1, 0.01, 0.001])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("batch_size", -1),
        ("optimizer", "rmsprop"),
        ("lr", 0.0),
        ("schedule", "linear"),
        ("momentum", 1.0),
        ("milestones", (0.5, 1.5)),
    ],
)
def test_bad_config_values_are_named(field, value):
    with pytest.raises(ValueError, match=field) as info:
        TrainConfig(**{field: value})
    assert str(value).split(",")[0].strip("()") in str(info.value)


def test_config_json_round_trip_and_unknown_field():
    config = TrainConfig(epochs=7, schedule="step", milestones=(0.5,), augment=True)
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown training options"):
        TrainConfig.from_dict({"epochz": 3})


def test_diverging_training_stops_with_a_clear_error():
    ds = _toy(64, seed=0)
    with pytest.raises(FloatingPointError, match="lr="):
        train(_mlp(32, 10, seed=0), ds, TrainConfig(epochs=3, lr=1e12, momentum=0.0))
