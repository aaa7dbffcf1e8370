"""The `mipp` command, run in-process."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest

from mipp.baselines import METHOD_NAMES
from mipp.cli import main


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fmnist(tmp_path):
    """A tiny Fashion-MNIST in the real IDX format: class k is a bright k-th row band."""
    root = tmp_path / "fashion-mnist"
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 200), ("t10k", 50)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, size=(n, 28, 28))
        for i, k in enumerate(labels):
            images[i, 2 * k + 4 : 2 * k + 6, :] = 250
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def test_list_names_models_and_datasets(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("lenet5", "resnet56", "vgg16", "resnet50", "fashion-mnist", "cifar100"):
        assert name in out
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    for name in METHOD_NAMES:
        assert name in out
    assert "lenet5" not in out


def test_info_known_answers_for_lenet5(capsys):
    code = main(["info", "--model", "lenet5", "--in-channels", "1", "--input-size", "32", "--json"])
    assert code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["params"] == 61_706  # the classic LeNet-5 figure
    assert last["macs"] == 416_520  # 117,600 + 240,000 + 58,920 (see test_metrics)
    assert list(last["widths"].values()) == [6, 16, 120, 84, 10]


def test_train_then_eval_and_info_on_the_checkpoint(tmp_path, fake_fmnist, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--model",
            "lenet5",
            "--dataset",
            "fashion-mnist",
            "--data-root",
            str(fake_fmnist),
            "--epochs",
            "3",
            "--batch-size",
            "20",
            "--lr",
            "0.02",
            "--out",
            str(out),
            "--latency-repeats",
            "2",
            "--no-progress",
        ]
    )
    assert code == 0
    for name in ("model.safetensors", "model.json", "config.json", "metrics.json"):
        assert (out / name).is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["epochs"] == 3 and config["model"]["name"] == "lenet5"
    assert metrics["params"] == 61_706  # 28 px with conv1 padding 2 keeps the 400 features
    assert metrics["test_samples"] == 50
    assert metrics["test_top1"] > 0.5  # the bands are trivially learnable
    assert set(metrics["latency_ms"]) == {"1", "64"}
    capsys.readouterr()

    # evaluating the saved checkpoint reproduces the run's own test accuracy exactly
    assert main(["eval", str(out / "model.safetensors"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["top1"] == metrics["test_top1"]
    assert result["n"] == 50

    assert main(["info", str(out / "model.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["params"] == metrics["params"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (
            ["train", "--model", "resnet9000", "--dataset", "fashion-mnist"],
            "unknown model 'resnet9000'; valid models: lenet5, mlp",
        ),
        (["train", "--model", "lenet5", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["eval", "/nonexistent/m.safetensors"], "/nonexistent/m.safetensors"),
        (["info"], "give either a CHECKPOINT or --model"),
    ],
)
def test_user_errors_are_one_line(argv, needle, capsys, fake_fmnist):
    if "--dataset" in argv:
        argv = [*argv, "--data-root", str(fake_fmnist)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mipp: error: ")
    assert err.count("\n") == 1
    assert needle in err


def test_missing_dataset_error_says_where_it_looked(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(
        ["train", "--model", "lenet5", "--dataset", "fashion-mnist", "--data-root", str(empty)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert str(empty) in err and err.count("\n") == 1


def test_bad_option_value_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--model", "lenet5", "--dataset", "fashion-mnist", "--epochs", "0"])
    assert info.value.code == 2
    assert "expected a number >= 1, got 0" in capsys.readouterr().err


def test_prune_finetune_compare_round(tmp_path, fake_fmnist, capsys):
    base = tmp_path / "base"
    common = ["--data-root", str(fake_fmnist), "--no-progress"]
    assert (
        main(
            [
                "train",
                "--model",
                "lenet5",
                "--dataset",
                "fashion-mnist",
                "--epochs",
                "2",
                "--batch-size",
                "20",
                "--lr",
                "0.02",
                "--out",
                str(base),
                "--latency-repeats",
                "0",
                *common,
            ]
        )
        == 0
    )
    pruned = tmp_path / "pruned"
    assert (
        main(
            [
                "prune",
                str(base / "model.safetensors"),
                "--sparsity",
                "0.5",
                "--calib-samples",
                "200",
                "--out",
                str(pruned),
                *common,
            ]
        )
        == 0
    )
    report = json.loads((pruned / "report.json").read_text())
    assert abs(report["achieved"]["units"] - 0.5) <= 0.01
    sidecar = json.loads((pruned / "model.json").read_text())
    assert sidecar["pruning"][0]["removed"] == {
        g["name"]: g["removed"] for g in report["groups"] if g["removed"]
    }
    assert sidecar["params"] == report["params_after"]
    tuned = tmp_path / "tuned"
    assert (
        main(
            [
                "finetune",
                str(pruned / "model.safetensors"),
                "--epochs",
                "1",
                "--batch-size",
                "20",
                "--out",
                str(tuned),
                *common,
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "compare",
                str(base / "model.safetensors"),
                str(pruned / "model.safetensors"),
                str(tuned / "model.safetensors"),
                "--latency-repeats",
                "2",
                "--data-root",
                str(fake_fmnist),
                "--json",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["params"] for r in rows] == [61_706, report["params_after"], report["params_after"]]
    assert rows[1]["widths"] == rows[2]["widths"]
    assert all(set(r["latency_ms"]) == {"1", "64"} for r in rows)


def test_prune_bad_values_are_one_line(tmp_path, fake_fmnist, capsys):
    base = tmp_path / "base"
    assert (
        main(
            [
                "train",
                "--model",
                "lenet5",
                "--dataset",
                "fashion-mnist",
                "--epochs",
                "1",
                "--data-root",
                str(fake_fmnist),
                "--out",
                str(base),
                "--latency-repeats",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    ckpt = str(base / "model.safetensors")
    assert main(["prune", ckpt, "--sparsity", "1.5", "--data-root", str(fake_fmnist)]) == 2
    err = capsys.readouterr().err
    assert err == "mipp: error: sparsity must be in [0, 1), got 1.5\n"
    assert (
        main(
            [
                "prune",
                ckpt,
                "--sparsity",
                "0.5",
                "--calib-samples",
                "50",
                "--data-root",
                str(fake_fmnist),
            ]
        )
        == 2
    )
    assert "needs at least 122 samples" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune", ckpt, "--sparsity", "0.5", "--confidence", "0.9"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_prune_with_baselines_at_mipps_sparsity(tmp_path, fake_fmnist, capsys):
    base = tmp_path / "base"
    common = ["--data-root", str(fake_fmnist), "--no-progress", "--calib-samples", "200"]
    train_argv = ["train", "--model", "lenet5", "--dataset", "fashion-mnist", "--epochs", "1"]
    train_argv += ["--out", str(base), "--latency-repeats", "0", "--data-root", str(fake_fmnist)]
    assert main([*train_argv, "--no-progress"]) == 0
    ckpt = str(base / "model.safetensors")
    assert main(["prune", ckpt, "--sparsity", "0.6", "--out", str(tmp_path / "m"), *common]) == 0
    ref = json.loads((tmp_path / "m" / "report.json").read_text())
    match = str(tmp_path / "m" / "report.json")
    for method, extra in (("l1", ["--allocation", "global"]), ("random", ["--option", "rounds=2"])):
        out = tmp_path / method
        argv = ["prune", ckpt, "--method", method, "--match", match, "--out", str(out), *common]
        assert main([*argv, *extra]) == 0
        report = json.loads((out / "report.json").read_text())
        metrics = json.loads((out / "metrics.json").read_text())
        assert report["method"] == metrics["method"] == method
        assert abs(report["achieved"]["units"] - ref["achieved"]["units"]) <= 0.01
        sidecar = json.loads((out / "model.json").read_text())
        assert sidecar["params"] == report["params_after"]
    # one-shot repairs from the command line
    out = tmp_path / "repaired"
    argv = ["prune", ckpt, "--sparsity", "0.6", "--compensate", "--recalibrate-bn"]
    assert main([*argv, "--out", str(out), *common]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["compensate"] is True and report["options"]["recalibrate_bn"] is True
    assert {f["layer"] for f in report["compensation"]} >= {"fc3"}
    # the same units as the plain run at 0.6: only the weights were re-fitted
    assert [g["kept"] for g in report["groups"]] == [g["kept"] for g in ref["groups"]]
    assert json.loads((tmp_path / "random" / "report.json").read_text())["options"]["rounds"] == 2
    assert "scoring" in capsys.readouterr().out
    for argv, needle in (
        (["--method", "l1", "--sparsity", "0.5", "--option", "banana=1"], "no option(s) banana"),
        (["--method", "l1", "--sparsity", "0.5", "--option", "rounds"], "KEY=VALUE"),
        (["--method", "l1", "--confidence", "0.9"], "apply to method 'mipp' only"),
        (["--method", "obd", "--sparsity", "0.5"], "unknown method 'obd'"),
        (["--sparsity", "0.5", "--option", "rounds=2"], "MIPP's are its own flags"),
    ):
        assert main(["prune", ckpt, *argv, *common]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
