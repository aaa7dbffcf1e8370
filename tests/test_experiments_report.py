"""mipp.experiments.report and results: a finished sweep directory -> CSVs, figures, REPORT.md."""

from __future__ import annotations

import csv
import json
import math
import struct
from pathlib import Path

import pytest

from mipp.errors import MippError
from mipp.experiments.figures import method_styles
from mipp.experiments.report import write_report
from mipp.experiments.results import (
    best_method_summary,
    grid_methods,
    load_sweep,
    mean_std,
    mipp_labels,
    order_methods,
    primary_mipp,
    summarise,
)

PROTOCOL = ["LeNet-5 trained 3 epochs per seed", "fine-tune 1 epoch after pruning"]
# Mean final accuracy per (regime, method, sparsity); seeds 0, 1, 2 add -0.01, 0, +0.01,
# so every group has std exactly 0.010.
FINAL = {
    ("pat", "mipp", 0.5): 0.89,
    ("pat", "mipp", 0.9): 0.80,
    ("pat", "l1", 0.5): 0.885,
    ("pat", "l1", 0.9): 0.72,
    ("pai", "mipp", 0.5): 0.85,
    ("pai", "mipp", 0.9): 0.70,
    ("pai", "l1", 0.5): 0.86,
    ("pai", "l1", 0.9): 0.75,
}
OFFSET = {0: -0.01, 1: 0.0, 2: 0.01}


def _metrics(regime, method, sparsity, seed, **over):
    after = [6 - round(5 * sparsity), 16 - round(12 * sparsity), 120, 84, 10]
    collapsed = ["fc1"] if (regime, method, sparsity, seed) == ("pat", "mipp", 0.9, 1) else []
    if collapsed:
        after[2] = 0
    row = {
        "run_id": f"lenet5-fashion-mnist-{regime}-{method}-{sparsity:.2f}-seed{seed}",
        "model": "lenet5",
        "dataset": "fashion-mnist",
        "regime": regime,
        "method": method,
        "method_name": method,
        "sparsity": sparsity,
        "seed": seed,
        "reference": "mipp" if method != "mipp" else None,
        "units_removed": sparsity + 0.001 * seed,
        "params_removed": 0.8 * sparsity,
        "macs_removed": 0.6 * sparsity,
        "units_before": 236,
        "units_after": sum(after),
        "params": round(61706 * (1 - 0.8 * sparsity)),
        "params_before": 61706,
        "macs": round(416520 * (1 - 0.6 * sparsity)),
        "macs_before": 416520,
        "accuracy_base": 0.90 + 0.001 * seed,
        "accuracy_one_shot": 0.5 - 0.2 * sparsity + 0.01 * seed,
        "accuracy_final": FINAL.get((regime, method, sparsity), 0.88) + OFFSET[seed],
        "loss_final": 0.3,
        "collapsed": collapsed,
        "layers": [
            {"name": name, "before": before, "after": a}
            for name, before, a in zip(
                ("conv1", "conv2", "fc1", "fc2", "fc3"), (6, 16, 120, 84, 10), after, strict=True
            )
        ],
        "prune_s": 2.0 if method == "mipp" else 0.1,
        "prune_total_s": 2.5,
        "retrain_s": 5.0,
        "final_epochs": 1,
        "extra_training_epochs": 0,
        "notes": [],
    }
    row.update(over)
    return row


def _make_sweep(root, runs, *, meta=None):
    """A sweep directory like the runner's: sweep.json and runs/<run_id>/metrics.json."""
    root.mkdir(parents=True, exist_ok=True)
    meta = {
        "name": "lenet5-fmnist-quick",
        "config_name": "lenet5-fmnist",
        "profile": "quick",
        "config_path": "experiments/lenet5_fmnist.toml",
        "command": "mipp sweep experiments/lenet5_fmnist.toml --profile quick",
        "description": "LeNet-5 on Fashion-MNIST, MIPP against L1.",
        "protocol": PROTOCOL,
        "config": {"grid": {"methods": ["mipp", "l1"]}},
        "total_runs": 30,
        "mipp_version": "0.1.0",
        "started": "2026-11-21 10:00:00",
        **(meta or {}),
    }
    (root / "sweep.json").write_text(json.dumps(meta))
    for row in runs:
        run_dir = root / "runs" / row["run_id"]
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.json").write_text(json.dumps(row))
        (run_dir / "config.json").write_text("{}")
    return root


def _full_sweep(root):
    runs = [_metrics(*key, seed) for key in FINAL for seed in (0, 1, 2)]
    sweep = _make_sweep(root, runs)
    (sweep / "runs" / "lenet5-fashion-mnist-pat-mipp-0.70-seed0").mkdir()  # unfinished
    (sweep / "bases" / "seed0").mkdir(parents=True)
    return sweep


def _png_size(path):
    """(width, height) from a PNG's IHDR chunk; asserts the file is a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


# --------------------------------------------------------------------------- statistics


def test_mean_std_known_values():
    mean, std, n = mean_std([1, 2, 3, 4])
    assert (mean, n) == (2.5, 4)
    assert std == pytest.approx(1.2909944487358056, rel=1e-15)
    mean, std, n = mean_std(x for x in [0.7])
    assert (mean, n) == (0.7, 1) and math.isnan(std)
    with pytest.raises(ValueError, match="at least one"):
        mean_std([])


def test_order_methods_follows_the_grid_then_alphabet():
    assert order_methods(["l1", "zeta", "mipp", "l1", "abc"], ["mipp", "l1", "gone"]) == [
        "mipp",
        "l1",
        "abc",
        "zeta",
    ]
    assert order_methods(["b", "a"]) == ["a", "b"]
    meta = {"config": {"grid": {"methods": ["mipp", {"label": "l1-at-mipp-widths"}, "l1"]}}}
    assert grid_methods(meta) == ["mipp", "l1-at-mipp-widths", "l1"]
    assert grid_methods({"config": {}}) == []


def test_summarise_groups_means_and_collapse_frequency():
    rows = [_metrics(*key, seed) for key in FINAL for seed in (0, 1, 2)]
    summary = summarise(rows, methods=["mipp", "l1"])
    assert len(summary) == 8
    assert all(s["n"] == 3 for s in summary)
    # Sorted by keys with methods in grid order: regime "pai" < "pat", mipp before l1.
    assert [(s["regime"], s["method"], s["sparsity"]) for s in summary[:4]] == [
        ("pai", "mipp", 0.5),
        ("pai", "mipp", 0.9),
        ("pai", "l1", 0.5),
        ("pai", "l1", 0.9),
    ]
    by_key = {(s["regime"], s["method"], s["sparsity"]): s for s in summary}
    hit = by_key["pat", "mipp", 0.9]
    assert hit["collapse_mean"] == pytest.approx(1 / 3)
    assert hit["collapse_std"] == pytest.approx(math.sqrt(1 / 3))  # [1, 0, 0], ddof=1
    assert by_key["pat", "l1", 0.9]["collapse_mean"] == 0.0
    assert hit["accuracy_final_mean"] == pytest.approx(0.80)
    assert hit["accuracy_final_std"] == pytest.approx(0.01)
    assert hit["units_removed_mean"] == pytest.approx(0.901)
    assert hit["prune_s_mean"] == 2.0 and hit["prune_s_std"] == 0.0
    # A missing value is left out of its mean; a group of one has std nan.
    one = summarise([_metrics("pat", "l1", 0.5, 0, accuracy_one_shot=None)])
    assert one[0]["n"] == 1 and math.isnan(one[0]["accuracy_one_shot_mean"])
    assert one[0]["accuracy_final_mean"] == pytest.approx(0.875)
    assert math.isnan(one[0]["accuracy_final_std"])


def test_best_method_summary_margins():
    rows = [_metrics(*key, seed) for key in FINAL for seed in (0, 1, 2)]
    best = best_method_summary(rows, methods=["mipp", "l1"])
    assert [(b["regime"], b["sparsity"]) for b in best] == [
        ("pai", 0.5),
        ("pai", 0.9),
        ("pat", 0.5),
        ("pat", 0.9),
    ]
    pat90 = best[3]
    assert (pat90["best"], pat90["mipp"], pat90["baseline"]) == ("mipp", "mipp", "l1")
    assert pat90["margin"] == pytest.approx(0.08)
    assert not pat90["within_noise"]
    pat50 = best[2]
    assert pat50["margin"] == pytest.approx(0.005) and pat50["within_noise"]  # std 0.01
    pai90 = best[1]
    assert pai90["best"] == "l1" and pai90["margin"] == pytest.approx(-0.05)


# --------------------------------------------------------------------------- loading


def test_load_sweep_sorts_and_ignores_unfinished_runs(tmp_path):
    sweep = _full_sweep(tmp_path / "sweep")
    meta, rows = load_sweep(sweep)
    assert meta["name"] == "lenet5-fmnist-quick"
    assert len(rows) == 24  # the unfinished run directory is not among them
    keys = [(r["regime"], r["method"], r["sparsity"], r["seed"]) for r in rows]
    assert keys == sorted(keys)
    assert keys[0] == ("pai", "l1", 0.5, 0)


def test_load_sweep_errors_name_the_path(tmp_path):
    with pytest.raises(MippError, match=r"not a sweep directory \(no sweep.json\).*mipp sweep"):
        load_sweep(tmp_path)
    sweep = _make_sweep(tmp_path / "empty", [])
    (sweep / "runs" / "run-a").mkdir(parents=True)
    with pytest.raises(MippError, match="no finished run") as err:
        load_sweep(sweep)
    assert str(sweep) in str(err.value)
    sweep = _make_sweep(tmp_path / "corrupt", [_metrics("pat", "l1", 0.5, 0)])
    bad = sweep / "runs" / "zz-broken" / "metrics.json"
    bad.parent.mkdir()
    bad.write_text('{"model": "lenet5", ')
    with pytest.raises(MippError, match="corrupt") as err:
        load_sweep(sweep)
    assert str(bad) in str(err.value)
    bad.write_text('{"model": "lenet5"}')
    with pytest.raises(MippError, match="missing dataset, regime, method, sparsity, seed"):
        load_sweep(sweep)
    (tmp_path / "bad-meta").mkdir()
    (tmp_path / "bad-meta" / "sweep.json").write_text("[1, 2")
    with pytest.raises(MippError, match=r"sweep\.json"):
        load_sweep(tmp_path / "bad-meta")


# --------------------------------------------------------------------------- the report


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    sweep = _full_sweep(root / "sweep")
    out = write_report(sweep, root / "out")
    assert out == root / "out"
    return out


def test_runs_csv_has_one_row_per_finished_run(report_dir):
    with (report_dir / "runs.csv").open(newline="") as f:
        records = list(csv.DictReader(f))
    assert len(records) == 24
    expected = {_metrics(*key, seed)["run_id"] for key in FINAL for seed in (0, 1, 2)}
    assert {r["run_id"] for r in records} == expected
    columns = set(records[0])
    assert {"run_id", "accuracy_final", "macs_before", "collapsed", "widths", "notes"} <= columns
    assert "layers" not in columns
    hit = next(r for r in records if r["run_id"].endswith("pat-mipp-0.90-seed1"))
    assert hit["collapsed"] == "fc1"
    assert hit["widths"] == "2-5-0-84-10"  # after-widths, input -> output
    assert float(hit["accuracy_final"]) == pytest.approx(0.80)
    assert hit["reference"] == ""  # JSON null


def test_summary_csv_has_one_row_per_group_in_grid_order(report_dir):
    with (report_dir / "summary.csv").open(newline="") as f:
        records = list(csv.DictReader(f))
    assert len(records) == 8  # 2 regimes x 2 methods x 2 sparsities
    assert [r["method"] for r in records[:4]] == ["mipp", "mipp", "l1", "l1"]
    hit = next(
        r for r in records if (r["regime"], r["method"], r["sparsity"]) == ("pat", "mipp", "0.9")
    )
    assert float(hit["collapse_mean"]) == pytest.approx(1 / 3)
    assert hit["n"] == "3"


def test_every_figure_is_a_png(report_dir):
    names = [
        "accuracy_lenet5_fashion-mnist.png",
        "efficiency_lenet5_fashion-mnist.png",
        "collapse.png",
        "layer_profiles_lenet5_fashion-mnist_pat.png",
        "layer_profiles_lenet5_fashion-mnist_pai.png",
        "cost.png",
    ]
    assert sorted(p.name for p in report_dir.glob("*.png")) == sorted(names)
    for name in names:
        assert (report_dir / name).stat().st_size > 5000, name
        width, height = _png_size(report_dir / name)
        assert width > 300 and height > 200, name
    width, height = _png_size(report_dir / "accuracy_lenet5_fashion-mnist.png")
    assert width > 4 * height  # four stages side by side: PaT x 2, PaI x 2


def test_report_md_tables_and_protocol(report_dir):
    text = (report_dir / "REPORT.md").read_text()
    assert text.startswith("# lenet5-fmnist-quick\n")
    assert "LeNet-5 on Fashion-MNIST, MIPP against L1." in text
    assert "mipp sweep experiments/lenet5_fmnist.toml --profile quick\nmipp report " in text
    for bullet in PROTOCOL:
        assert f"- {bullet}\n" in text
    assert "24 of 30 runs finished" in text
    # PaT final-accuracy table: requested 90 %, achieved by mipp 90.1 % (all methods alike), cells.
    assert "| requested | units removed: mipp (min–max over methods) | mipp | l1 |" in text
    assert "| 90.0 % | 90.1 % | 0.800 ± 0.010 | 0.720 ± 0.010 |" in text
    assert "| 50.0 % | 50.1 % | 0.890 ± 0.010 | 0.885 ± 0.010 |" in text
    # One-shot table: 0.5 - 0.2 * 0.9 + 0.01 * seed -> 0.330 ± 0.010 for every method.
    assert "| 90.0 % | 90.1 % | 0.330 ± 0.010 | 0.330 ± 0.010 |" in text
    assert "- PaT 90.0 %: mipp 0.800 vs best baseline l1 0.720 (+8.0 pt)\n" in text
    assert "- PaT 50.0 %: mipp 0.890 vs best baseline l1 0.885 (+0.5 pt), within one std" in text
    assert "- PaI 90.0 %: mipp 0.700 vs best baseline l1 0.750 (-5.0 pt)\n" in text
    assert "mipp beats the best baseline at 2 of 2 sparsities (1 by more than one std)." in text
    assert "| mipp | 90.0 % | 1 / 3 | fc1 (1) |" in text
    assert "**Layer collapse**: no layer collapse in any run." in text  # the PaI section
    assert "| mipp | 2.00 ± 0.00 | 12 | 1 |" in text
    assert "| l1 | 0.100 ± 0.000 | 12 | 0.05 |" in text
    assert "Unpruned accuracy: 0.901 ± 0.001 (3 seeds)." in text
    assert "Each point is the mean over n = 3 seeds." in text
    assert (
        "![Accuracy vs units removed, lenet5 on fashion-mnist](accuracy_lenet5_fashion-mnist.png)"
        in text
    )
    for png in report_dir.glob("*.png"):
        assert f"({png.name})" in text


def test_single_seed_cells_and_default_out_dir(tmp_path, monkeypatch):
    runs = [_metrics("pat", m, 0.5, 0) for m in ("mipp", "l1", "random")]
    sweep = _make_sweep(tmp_path / "sweep", runs, meta={"name": "odd name/with:chars"})
    monkeypatch.chdir(tmp_path)
    out = write_report(sweep)
    assert out == Path("results", "odd-name-with-chars")
    text = (tmp_path / out / "REPORT.md").read_text()
    # One seed: no ±; "random" is not in the grid, so it comes after it.
    assert "| mipp | l1 | random |" in text
    assert "| 50.0 % | 50.0 % | 0.880 | 0.875 | 0.870 |" in text
    assert "Each point is the mean over n = 1 seed." in text
    assert sorted(p.name for p in (tmp_path / out).glob("accuracy_*.png")) == [
        "accuracy_lenet5_fashion-mnist.png"
    ]
    width, height = _png_size(tmp_path / out / "accuracy_lenet5_fashion-mnist.png")
    assert 1.5 * height < width < 3 * height  # PaT only: two stages


def test_reference_label_from_the_config_leads_the_comparison(tmp_path):
    runs = [
        _metrics("pat", m, 0.5, seed, accuracy_final=acc + OFFSET[seed], method_name=name)
        for m, name, acc in (
            ("mipp", "mipp", 0.95),
            ("mipp-linear", "mipp", 0.90),
            ("l1", "l1", 0.85),
        )
        for seed in (0, 1, 2)
    ]
    best = best_method_summary(runs, mipp="mipp-linear")
    assert (best[0]["best"], best[0]["mipp"], best[0]["baseline"]) == ("mipp", "mipp-linear", "l1")
    assert best[0]["margin"] == pytest.approx(0.05)
    meta = {
        "config": {
            "grid": {"methods": ["mipp", "mipp-linear", "l1"]},
            "prune": {"reference": "mipp-linear"},
        }
    }
    sweep = _make_sweep(tmp_path / "sweep", runs, meta=meta)
    text = (write_report(sweep, tmp_path / "out") / "REPORT.md").read_text()
    assert "| requested | units removed: mipp-linear (min–max over methods) |" in text
    assert (
        "- PaT 50.0 %: mipp-linear 0.900 vs best baseline l1 0.850 (+5.0 pt); "
        "best overall mipp 0.950\n"
    ) in text
    assert "| method | prune_s (s) | runs | × mipp-linear |" in text


# --------------------------------------------------------------------------- the MIPP family


def test_the_mipp_family_is_decided_by_the_runs_method_not_the_label(tmp_path):
    runs = [
        _metrics("pat", m, 0.5, seed, accuracy_final=acc + OFFSET[seed], method_name=name)
        for m, name, acc in (("ours", "mipp", 0.80), ("mipp-like", "l1", 0.85), ("l1", "l1", 0.70))
        for seed in (0, 1, 2)
    ]
    assert mipp_labels(runs) == {"ours"}
    assert primary_mipp(["mipp-like", "ours", "l1"], mipp_labels(runs)) == "ours"
    # rows of an older sweep without method_name: only the label "mipp" is MIPP
    assert mipp_labels([{"method": "mipp"}, {"method": "mipp-gaussian"}]) == {"mipp"}
    best = best_method_summary(runs, methods=["mipp-like", "ours", "l1"])
    assert (best[0]["mipp"], best[0]["baseline"], best[0]["best"]) == (
        "ours",
        "mipp-like",
        "mipp-like",
    )
    assert best[0]["margin"] == pytest.approx(-0.05)
    meta = {"config": {"grid": {"methods": ["mipp-like", "ours", "l1"]}, "prune": {}}}
    sweep = _make_sweep(tmp_path / "sweep", runs, meta=meta)
    text = (write_report(sweep, tmp_path / "out") / "REPORT.md").read_text()
    assert (
        "| requested | units removed: ours (min–max over methods) | mipp-like | ours | l1 |" in text
    )
    assert "- PaT 50.0 %: ours 0.800 vs best baseline mipp-like 0.850 (-5.0 pt)\n" in text
    assert "| method | prune_s (s) | runs | × ours |" in text
    # figures: "ours" is the thick black line, "mipp-like" a baseline's solid colour line
    styles = method_styles(
        ["mipp-like", "ours", "mipp-gaussian", "l1"], {"ours", "mipp-gaussian"}, None
    )
    assert (styles["ours"]["color"], styles["ours"]["linewidth"]) == ("black", 2.6)
    assert (styles["mipp-gaussian"]["color"], styles["mipp-gaussian"]["linestyle"]) == (
        "#404040",
        "--",
    )
    assert (styles["mipp-like"]["color"], styles["mipp-like"]["linestyle"]) == ("#1f77b4", "-")
    assert styles["l1"]["color"] == "#ff7f0e"
