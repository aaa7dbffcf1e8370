"""End-to-end on the real Fashion-MNIST (Debian package): the figure the README quotes."""

from __future__ import annotations

import json

import pytest

from mipp.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.data]


def test_lenet5_three_epochs_reaches_88_percent(tmp_path, capsys):
    """`make demo`'s exact command reaches >= 88 % test accuracy in 3 epochs on CPU."""
    out = tmp_path / "demo"
    code = main(
        [
            "train",
            "--model",
            "lenet5",
            "--dataset",
            "fashion-mnist",
            "--epochs",
            "3",
            "--out",
            str(out),
            "--no-progress",
            "--latency-repeats",
            "5",
        ]
    )
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_samples"] == 10_000
    assert metrics["test_top1"] >= 0.88
    assert metrics["params"] == 61_706
