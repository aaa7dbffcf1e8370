"""The `mipp` command, run in-process."""

from __future__ import annotations

import gzip
import io
import json
import struct

import numpy as np
import pytest
from rich.console import Console

from mipp.cli import build_parser, main
from mipp.cli._common import ProgressRenderer
from mipp.estimators import ESTIMATOR_NAMES
from mipp.methods import ALL_ALLOCATIONS, ALLOCATIONS, METHOD_NAMES, NOT_IMPLEMENTED, TARGETS
from mipp.methods.selection import ORDERS
from mipp.progress import ProgressEvent
from mipp.surgery.structure import SCOPES
from mipp.zoo.config import OPTIMIZERS, SCHEDULES


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fmnist(tmp_path):
    """A tiny Fashion-MNIST in the real IDX format: class k is a bright k-th row band."""
    return write_fake_fmnist(tmp_path)


def write_fake_fmnist(tmp_path):
    """The files of :func:`fake_fmnist` under ``tmp_path / "fashion-mnist"``; the folder."""
    root = tmp_path / "fashion-mnist"
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 300), ("t10k", 50)):
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
    names = ("lenet5", "resnet56", "vgg16", "resnet50", "fashion-mnist", "cifar100", "imagenet")
    for name in names:
        assert name in out
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 3}
    assert set(METHOD_NAMES) <= set(rows)  # every registered method has a row
    assert "E[z_j²]" in rows["kfac-obd"]  # summaries are text, not rich markup
    # allocation column: the method's default, or "its own" for MIPP (no allocation)
    assert "its own" in rows["mipp"] and "uniform" in rows["l1"] and "global" in rows["snip"]
    # labels column: the loss-based methods need labels, data-free ones do not
    assert "yes" in rows["snip"].split("│")[3] and "no" in rows["synflow"].split("│")[3]
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
            "unknown model 'resnet9000'; valid models: convnext, googlenet, lenet5, mlp",
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
                "256",
                "--out",
                str(pruned),
                *common,
            ]
        )
        == 0
    )
    report = json.loads((pruned / "report.json").read_text())
    assert abs(report["achieved"]["units"] - 0.5) <= 0.01
    # config.json: the resolved method with the options the report records, the pipeline
    # options as given, the checkpoint and the versions
    config = json.loads((pruned / "config.json").read_text())
    assert config["command"] == "prune"
    assert config["checkpoint"] == str(base / "model.safetensors")
    assert config["method"]["name"] == report["method"] == "mipp"
    options = config["method"]["options"]
    assert options == {k: report["options"][k] for k in options}
    assert options["estimator"] == "gaussian" and options["pool"] == "mean"
    assert options["reconstruct"] is True and report["options"]["compensate"] is True
    assert config["prune"]["sparsity"] == 0.5 and config["prune"]["calib_samples"] == 256
    assert config["prune"]["scope"] == "internal" and config["prune"]["match"] is None
    assert {"mipp_version", "torch_version"} <= set(config)
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
                "--confidence",
                "0.9",
                "--calib-samples",
                "50",
                "--data-root",
                str(fake_fmnist),
            ]
        )
        == 2
    )
    assert "needs at least 206 samples" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune", ckpt, "--sparsity", "0.5", "--confidence", "0.9"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_prune_with_baselines_at_mipps_sparsity(tmp_path, fake_fmnist, capsys):
    base = tmp_path / "base"
    common = ["--data-root", str(fake_fmnist), "--no-progress", "--calib-samples", "256"]
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
        config = json.loads((out / "config.json").read_text())
        assert config["method"]["name"] == method and config["prune"]["match"] == match
        assert config["method"]["options"] == {
            k: report["options"][k] for k in config["method"]["options"]
        }
    assert json.loads((tmp_path / "l1" / "config.json").read_text())["method"]["options"] == {
        "rounds": 1,
        "normalize": "mean",
        "allocation": "global",  # --allocation reached the method
        "cost_aware": False,
    }
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
    assert "method time" in capsys.readouterr().out
    for argv, needle in (
        (["--method", "l1", "--sparsity", "0.5", "--option", "banana=1"], "no option(s) banana"),
        (["--method", "l1", "--sparsity", "0.5", "--option", "rounds"], "KEY=VALUE"),
        (["--method", "l1", "--confidence", "0.9"], "'l1' has no option(s) confidence"),
        (
            ["--sparsity", "0.5", "--option", "rounds=2"],
            "'mipp' has no option(s) rounds; valid options: estimator, pool, order, min_keep",
        ),
        (["--sparsity", "0.5", "--min-keep", "2", "--option", "min_keep=3"], "give it once"),
    ):
        assert main(["prune", ckpt, *argv, *common]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err


def test_a_method_option_the_method_lacks_is_one_line_from_the_registry(capsys):
    """make_method polices the options: the error comes before anything is loaded."""
    argv = ["prune", "/nonexistent/m.safetensors", "--sparsity", "0.5"]
    assert main([*argv, "--method", "l1", "--estimator", "gaussian"]) == 2
    assert capsys.readouterr().err == (
        "mipp: error: method 'l1' has no option(s) estimator; "
        "valid options: allocation, rounds, normalize, cost_aware\n"
    )
    assert main([*argv, "--allocation", "uniform"]) == 2  # MIPP allocates on its own
    err = capsys.readouterr().err
    assert err.startswith("mipp: error: method 'mipp' has no option(s) allocation;")
    assert main([*argv, "--method", "l1", "--allocation", "pfp"]) == 2  # PFP's own
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "allocation must be one of" in err and "'pfp'" in err, err
    # a value of the wrong kind is one line too (not a traceback)
    assert main([*argv, "--option", "estimator=3"]) == 2
    assert capsys.readouterr().err.startswith("mipp: error: estimator must be a name")


def _choices(command: str) -> dict[str, tuple]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {a.dest: tuple(a.choices) for a in sub._actions if a.choices is not None}


def test_flag_choices_are_the_library_constants():
    assert _choices("prune") == {
        "target": TARGETS,
        "method": METHOD_NAMES + tuple(NOT_IMPLEMENTED),  # the latter refused with the reason
        "allocation": ALL_ALLOCATIONS,
        "estimator": ESTIMATOR_NAMES,
        "scope": SCOPES,
        "order": ORDERS,
    }
    assert "widths" in ALLOCATIONS  # keeps a matched report's widths (needs --match)
    assert (*ALLOCATIONS, "pfp") == ALL_ALLOCATIONS  # PFP's own epsilon search
    for command in ("train", "finetune"):
        choices = _choices(command)
        assert choices["optimizer"] == OPTIMIZERS and choices["schedule"] == SCHEDULES
    assert _choices("eval")["split"] == ("train", "test")


@pytest.mark.parametrize(
    ("flag", "value", "names"),
    [("--estimator", "nope", ESTIMATOR_NAMES), ("--method", "variational-bayes", METHOD_NAMES)],
)
def test_an_unknown_choice_fails_listing_the_library_names(flag, value, names, capsys):
    with pytest.raises(SystemExit) as info:
        main(["prune", "m.safetensors", "--sparsity", "0.5", flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"invalid choice: '{value}'" in err
    assert all(f"'{name}'" in err for name in names)


def test_a_method_named_but_not_implemented_fails_with_its_reason(capsys):
    code = main(["prune", "m.safetensors", "--sparsity", "0.5", "--method", "aofp"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.strip() == f"mipp: error: method 'aofp': {NOT_IMPLEMENTED['aofp']}"


def test_renderer_logs_results_and_keeps_status_and_bars_off_a_log_file():
    """On a non-terminal console (a log file, CI) only the non-transient events are written,
    one line each, in order; spinners and training bars leave nothing behind."""
    buf = io.StringIO()
    renderer = ProgressRenderer(Console(file=buf, width=200, log_path=False, log_time=False))
    events = [
        ProgressEvent("statistics", "computing statistics", transient=True),
        ProgressEvent("bisection", "threshold 1.000e-02 -> units sparsity 0.4000"),
        ProgressEvent(
            "train",
            "epoch 1/2: loss 2.3",
            done=1,
            total=3,
            transient=True,
            fields={"epoch": 1, "epochs": 2},
        ),
        ProgressEvent(
            "train",
            "epoch 1/2: loss 2.1",
            done=2,
            total=3,
            transient=True,
            fields={"epoch": 1, "epochs": 2},
        ),
        ProgressEvent("epoch", "epoch 1/2: loss 2.0  acc 0.3000", done=1, total=2),
        ProgressEvent(
            "train",
            "epoch 2/2: loss 1.9",
            done=1,
            total=3,
            transient=True,
            fields={"epoch": 2, "epochs": 2},
        ),
        ProgressEvent("scoring", "scoring round 1", transient=True),
        ProgressEvent("done", "mipp: 226 -> 113 units"),
        ProgressEvent("sweep", "[2/8] run FAILED: no unit [fc1] [bold]x[/bold] [/i]"),
    ]
    for event in events:
        renderer(event)
    renderer.close()
    assert [line.rstrip() for line in buf.getvalue().splitlines()] == [
        "threshold 1.000e-02 -> units sparsity 0.4000",
        "epoch 1/2: loss 2.0  acc 0.3000",
        "mipp: 226 -> 113 units",
        "[2/8] run FAILED: no unit [fc1] [bold]x[/bold] [/i]",  # text, not markup
    ]
    assert renderer._bar is None and renderer._status is None  # nothing left running


def test_train_with_progress_renders_the_epoch_lines(tmp_path, fake_fmnist, capsys):
    argv = ["train", "--model", "lenet5", "--dataset", "fashion-mnist", "--epochs", "2"]
    argv += ["--data-root", str(fake_fmnist), "--out", str(tmp_path / "r")]
    assert main([*argv, "--batch-size", "50", "--latency-repeats", "0"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/2: loss" in out and "epoch 2/2: loss" in out


SWEEP = """
name = "cli-tiny"
description = "MIPP and L1 at one sparsity on synthetic vectors"
[grid]
models = ["mlp"]
datasets = ["synthetic"]
regimes = ["pat"]
methods = ["mipp", "l1"]
sparsities = [0.5]
seeds = [0]
[data]
train_subset = 2000
test_subset = 200
[models.mlp]
widths = [16, 8]
[prune]
calib_samples = 256
[train]
epochs = 1
[finetune]
fraction = 1.0
"""


def test_sweep_and_report_commands(tmp_path, capsys):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(SWEEP)
    out, rep = tmp_path / "sweep", tmp_path / "rep"
    ids = ["mlp-synthetic-pat-mipp-0.50-seed0", "mlp-synthetic-pat-l1-0.50-seed0"]

    assert main(["sweep", str(cfg), "--out", str(out), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert f"sweep cli-tiny: 2 runs → {out}" in err
    assert sorted(line.strip() for line in err.splitlines()[1:]) == sorted(ids)
    assert not out.exists()  # a dry run writes nothing

    argv = ["sweep", str(cfg), "--out", str(out)]
    assert main([*argv, "--report", "--report-out", str(rep)]) == 0
    err = capsys.readouterr().err
    assert "sweep cli-tiny: 2 runs, 0 already finished, 2 to go" in err  # a rendered event
    assert f"2 of 2 runs finished (2 now); summarise with: mipp report {out}" in err
    assert f"report written to {rep}" in err
    assert sorted(p.parent.name for p in out.glob("runs/*/metrics.json")) == sorted(ids)
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["command"] == f"mipp sweep {cfg} --out {out}"
    assert len((rep / "runs.csv").read_text().strip().splitlines()) == 1 + 2
    assert f"mipp sweep {cfg} --out {out}\nmipp report {out}\n" in (rep / "REPORT.md").read_text()

    assert main(argv) == 0  # resumable: nothing left to do
    assert "2 of 2 runs finished (0 now)" in capsys.readouterr().err
    assert main(["report", str(out), "--out", str(tmp_path / "rep2")]) == 0
    assert f"report written to {tmp_path / 'rep2'}/REPORT.md" in capsys.readouterr().err
    assert (tmp_path / "rep2" / "runs.csv").read_text() == (rep / "runs.csv").read_text()
