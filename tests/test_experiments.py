"""Sweeps: config checking, the tiny synthetic grid end to end, resuming after a kill.

The grid is run through :func:`mipp.experiments.runner.run_sweep` and reported through
:func:`mipp.experiments.report.write_report`, the two calls ``mipp sweep`` and ``mipp report``
make; two tests run those commands end to end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import mipp
from mipp.cli import main
from mipp.errors import MippError
from mipp.experiments import load_spec, resolve
from mipp.experiments.markdown import _made_with
from mipp.experiments.report import write_report
from mipp.experiments.runner import run_sweep, source_revision
from mipp.methods.baselines.magnitude import L1Norm
from mipp.progress import ProgressEvent

ROOT = Path(__file__).resolve().parents[1]

TINY = """
name = "tiny"
description = "two methods, two sparsities on synthetic vectors"
[grid]
models = ["mlp"]
datasets = ["synthetic"]
regimes = {regimes}
methods = {methods}
sparsities = {sparsities}
seeds = [0]
[data]
train_subset = 6000
test_subset = 500
[models.mlp]
widths = [32, 16]
[prune]
calib_samples = 512
[train]
epochs = 2
[finetune]
fraction = 0.5
{extra}
"""


def tiny(
    tmp_path: Path,
    regimes='["pat", "pai"]',
    methods='["mipp", "l1"]',
    extra="",
    sparsities="[0.3, 0.6]",
) -> Path:
    path = tmp_path / "tiny.toml"
    text = TINY.format(regimes=regimes, methods=methods, extra=extra, sparsities=sparsities)
    path.write_text(text)
    return path


def sweep(path: Path, out: Path, **options) -> tuple[object, list[ProgressEvent]]:
    """Run the sweep at ``path`` into ``out`` as ``mipp sweep`` does: (result, its events)."""
    events: list[ProgressEvent] = []
    command = f"mipp sweep {path} --out {out}"
    result = run_sweep(load_spec(path), out, command=command, progress=events.append, **options)
    return result, events


def messages(events: list[ProgressEvent], stage: str = "sweep") -> str:
    return "\n".join(e.message for e in events if e.stage == stage)


def finished(out: Path) -> dict[str, dict]:
    return {
        p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("runs/*/metrics.json"))
    }


def stamps(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.json")}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The tiny grid (2 regimes × 2 methods × 2 sparsities) run once."""
    tmp = tmp_path_factory.mktemp("sweep")
    out = tmp / "out"
    result, events = sweep(tiny(tmp), out)
    assert not result.failed and len(result.done) == 8
    return tmp, out, events


def test_tiny_sweep_runs_every_cell(swept):
    _, out, _ = swept
    runs = finished(out)
    assert len(runs) == 8
    assert sorted({(m["regime"], m["method"], m["sparsity"]) for m in runs.values()}) == sorted(
        (r, m, s) for r in ("pai", "pat") for m in ("l1", "mipp") for s in (0.3, 0.6)
    )
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["name"] == "tiny" and meta["total_runs"] == 8 and meta["protocol"]
    assert meta["command"].startswith("mipp sweep ")
    # one trained base for the one seed, shared by both regimes
    assert len(list(out.glob("bases/*/base.json"))) == 1
    for m in runs.values():
        assert 0 <= m["accuracy_one_shot"] <= 1 and 0 <= m["accuracy_final"] <= 1
        kept = sum(layer["after"] for layer in m["layers"])
        assert (
            kept
            == m["units_after"]
            == m["units_before"] - round(m["units_removed"] * m["units_before"])
        )
        assert [layer["name"] for layer in m["layers"]] == ["fc1", "fc2"]
        assert (out / "runs" / m["run_id"] / "report.json").is_file()
        assert m["final_epochs"] == (1 if m["regime"] == "pat" else 2)
        assert m["method_name"] == m["method"] and m["extra_training_epochs"] == 0
        # prune_s is the method's own work: a part of the whole prune() call
        assert 0 < m["prune_s"] <= m["prune_total_s"]


def test_records_copied_from_a_sweep_report_and_resume_it(swept, tmp_path, capsys):
    """``mipp report --records``: config + metrics of every finished run, the reference runs'
    report.json, sweep.json; enough to report the same tables and to resume with nothing to
    do; a second copy replaces the first whole."""
    import shutil

    from mipp.experiments.report import copy_records

    tmp, out, _ = swept
    rep = tmp_path / "rep"
    assert main(["report", str(out), "--out", str(rep), "--records"]) == 0
    assert f"records of 8 finished run(s) copied to {rep / 'sweep'}" in capsys.readouterr().err
    kept = {p.relative_to(rep / "sweep").as_posix() for p in (rep / "sweep").rglob("*.json")}
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert kept == {"sweep.json"} | {
        f"runs/{r}/{f}"
        for r in runs
        for f in ("config.json", "metrics.json") + (("report.json",) if "-mipp-" in r else ())
    }
    assert (rep / "sweep" / "runs" / runs[0] / "metrics.json").read_bytes() == (
        out / "runs" / runs[0] / "metrics.json"
    ).read_bytes()
    # the records alone give the same tables
    write_report(rep / "sweep", tmp_path / "again")
    assert (tmp_path / "again" / "runs.csv").read_text() == (rep / "runs.csv").read_text()
    # and resume the study: nothing left to do, no base trained
    resumed = tmp_path / "resumed"
    shutil.copytree(rep / "sweep", resumed)
    result, events = sweep(tiny(tmp), resumed, bases=out / "bases")
    assert len(result.skipped) == 8 and not result.done and not messages(events, "base")
    # a second copy replaces the first whole (a run gone from the source is gone), no staging
    source = tmp_path / "source"
    shutil.copytree(out, source, ignore=shutil.ignore_patterns("bases"))
    (source / "runs" / runs[0] / "metrics.json").unlink()  # as if still running
    assert copy_records(source, rep / "sweep") == 7
    assert not (rep / "sweep" / "runs" / runs[0]).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "rep", "resumed", "source"]
    assert sorted(p.name for p in rep.iterdir() if p.name.startswith(".")) == []
    assert copy_records(rep / "sweep", rep / "sweep") == 7  # the same folder: nothing to do
    with pytest.raises(MippError, match=r"is not a sweep directory \(no readable sweep.json\)"):
        copy_records(tmp_path / "again", tmp_path / "x")


def test_the_sweep_reports_its_progress(swept):
    _, _, events = swept
    done = [e for e in events if e.stage == "sweep" and not e.transient and "run_id" in e.fields]
    assert [e.done for e in done] == list(range(1, 9)) and {e.total for e in done} == {8}
    assert all("ETA" in e.message and e.fields["eta_s"] >= 0 for e in done)
    assert done[-1].fields["eta_s"] == 0
    assert "sweep tiny: 8 runs, 0 already finished, 8 to go" in messages(events)
    base = messages(events, "base")
    assert "training the base mlp on synthetic (seed 0, 2 epochs, 6,000 images)" in base
    # the base training's own epochs come through as they are
    assert [e.done for e in events if e.stage == "epoch"] == [1, 2]


def test_baselines_match_the_reference_runs_achieved_sparsity(swept):
    _, out, _ = swept
    runs = finished(out)
    for r in ("pat", "pai"):
        for s in ("0.30", "0.60"):
            ref = runs[f"mlp-synthetic-{r}-mipp-{s}-seed0"]
            l1 = runs[f"mlp-synthetic-{r}-l1-{s}-seed0"]
            assert ref["reference"] is None and l1["reference"] == "mipp"
            assert l1["units_after"] == ref["units_after"]
            assert abs(ref["units_removed"] - float(s)) <= 0.01 + 1 / 48


def test_pat_starts_from_the_trained_base_and_pai_from_the_initialisation(swept):
    _, out, _ = swept
    runs = finished(out)
    base = json.loads(next(out.glob("bases/*/base.json")).read_text())
    assert all(m["accuracy_base"] == base["accuracy"] for m in runs.values())
    # the same seed's MIPP at 30 %: PaT keeps most of the trained accuracy one-shot, the
    # pruned initialisation is at chance level on 10 classes
    assert runs["mlp-synthetic-pat-mipp-0.30-seed0"]["accuracy_one_shot"] > 0.5
    assert runs["mlp-synthetic-pai-mipp-0.30-seed0"]["accuracy_one_shot"] < 0.3


def test_a_cached_base_records_its_dataset_and_runs_record_their_repair(swept):
    _, out, _ = swept
    sidecar = json.loads(next(out.glob("bases/*/trained.json")).read_text())
    assert sidecar["extra"]["dataset"]["name"] == "synthetic"  # usable by `mipp prune`
    runs = finished(out)
    # MIPP reconstructs by default, the baselines do not (mipp.prune's method defaults)
    assert runs["mlp-synthetic-pat-mipp-0.30-seed0"]["repair"] is True
    assert runs["mlp-synthetic-pat-l1-0.30-seed0"]["repair"] is False


def test_rerunning_a_finished_sweep_redoes_nothing(swept):
    tmp, out, _ = swept
    before = stamps(out)
    result, events = sweep(tmp / "tiny.toml", out)
    assert len(result.skipped) == 8 and not result.done and not result.failed
    assert "8 already finished, 0 to go" in messages(events)
    assert stamps(out) == before


def test_report_of_the_tiny_sweep(swept, tmp_path):
    _, out, _ = swept
    assert write_report(out, tmp_path / "rep") == tmp_path / "rep"
    rows = (tmp_path / "rep" / "runs.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 8
    assert (tmp_path / "rep" / "accuracy_mlp_synthetic.png").stat().st_size > 1000
    assert (
        f"mipp sweep {out.parent / 'tiny.toml'} --out {out}\n"
        in (tmp_path / "rep" / "REPORT.md").read_text()
    )


def test_every_run_records_the_source_revision_torch_and_threads_that_made_it(swept, tmp_path):
    _, out, _ = swept
    runs = finished(out)
    revision = source_revision()
    for m in runs.values():
        assert m["source"] == revision and m["mipp_version"] == mipp.__version__
        assert m["torch_version"] == torch.__version__ and m["threads"] >= 1
    assert json.loads((out / "sweep.json").read_text())["source"] == revision
    write_report(out, tmp_path / "rep")
    text = (tmp_path / "rep" / "REPORT.md").read_text()
    assert f"Source revision of the runs: `{revision or 'not a git checkout'}` (torch " in text
    assert ": 8 runs." in text
    header = (tmp_path / "rep" / "runs.csv").read_text().splitlines()[0].split(",")
    assert {"source", "mipp_version", "torch_version", "threads"} <= set(header)


def test_source_revision_names_the_commit_and_says_when_tracked_files_changed(tmp_path):
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-C", str(tmp_path),
             *args], capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip

    assert source_revision(tmp_path) is None  # not a checkout
    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "--short=12", "HEAD")
    assert len(head) == 12 and source_revision(tmp_path) == head
    (tmp_path / "new.py").write_text("untracked\n")  # untracked files do not count
    assert source_revision(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert source_revision(tmp_path) == f"{head}+dirty"


def test_a_report_counts_runs_recorded_before_provenance_as_not_recorded():
    rows = [{"source": "abc", "torch_version": "2", "threads": 1, "mipp_version": "0.1"}] * 2
    rows += [{"accuracy_final": 0.5}]
    line = _made_with(rows)
    assert line == (
        "Source revision of the runs: `abc` (torch 2, 1 thread(s)): 2 runs; not recorded: 1 run."
    )
    assert _made_with([{"accuracy_final": 0.5}]) == ""


def test_an_interrupted_sweep_resumes_without_redoing_finished_runs(tmp_path):
    cfg = load_spec(tiny(tmp_path, regimes='["pat"]'))
    out = tmp_path / "out"
    seen: list[str] = []

    def stop_after_two(run_id):
        seen.append(run_id)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, out, on_run_done=stop_after_two)
    before = stamps(out)
    assert sorted(before) == sorted(seen)
    result = run_sweep(cfg, out)
    assert sorted(result.skipped) == sorted(seen) and len(result.done) == 2
    assert {k: v for k, v in stamps(out).items() if k in seen} == before


@pytest.mark.slow
def test_a_killed_sweep_loses_at_most_the_run_in_flight(tmp_path):
    """SIGKILL a sweep process as soon as its first run is written, then resume."""
    cfg = tiny(tmp_path, methods='["mipp", "l1", "random"]')
    out = tmp_path / "out"
    script = (
        "import sys; from mipp.experiments import load_spec; "
        "from mipp.experiments.runner import run_sweep; "
        "sys.exit(1 if run_sweep(load_spec(sys.argv[1]), sys.argv[2]).failed else 0)"
    )
    cmd = [sys.executable, "-c", script, str(cfg), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list(out.glob("runs/*/metrics.json")) and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    before = stamps(out)
    assert 1 <= len(before) < 12, "the kill came too late to test anything"
    # whatever was in flight left a directory without metrics.json, or nothing
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    after = stamps(out)
    assert len(after) == 12
    assert {k: after[k] for k in before} == before


def test_a_run_made_with_other_settings_is_refused(swept, tmp_path):
    tmp, out, _ = swept
    changed = tmp_path / "tiny.toml"
    changed.write_text((tmp / "tiny.toml").read_text().replace("epochs = 2", "epochs = 3"))
    with pytest.raises(MippError, match=r"made with different settings \(finetune, train\)"):
        run_sweep(load_spec(changed), out)


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    def broken(self, ctx):
        raise RuntimeError("scores went missing")

    monkeypatch.setattr(L1Norm, "scores", broken)
    path = tiny(tmp_path, regimes='["pat"]')
    out = tmp_path / "out"
    result, events = sweep(path, out)
    assert sorted(result.failed) == [f"mlp-synthetic-pat-l1-{s}-seed0" for s in ("0.30", "0.60")]
    assert set(result.failed.values()) == {"RuntimeError: scores went missing"}
    assert sorted(finished(out)) == sorted(result.done) and len(result.done) == 2  # mipp
    err = (out / "runs/mlp-synthetic-pat-l1-0.30-seed0/error.txt").read_text()
    assert "Traceback" in err and "RuntimeError: scores went missing" in err
    assert "2 run(s) failed (see runs/<id>/error.txt)" in messages(events)


def test_the_command_line_exits_1_when_a_run_failed(tmp_path, monkeypatch):
    def broken(self, ctx):
        raise RuntimeError("scores went missing")

    monkeypatch.setattr(L1Norm, "scores", broken)
    path = tiny(tmp_path, regimes='["pat"]', sparsities="[0.5]")
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 1
    assert list(finished(tmp_path / "out")) == ["mlp-synthetic-pat-mipp-0.50-seed0"]


def test_imp_records_the_epochs_it_trains_inside_its_decision(tmp_path):
    """IMP re-trains 1 epoch after each of its 3 rounds but the last: 2 extra epochs."""
    path = tiny(tmp_path, regimes='["pat"]', methods='["mipp", "imp"]', sparsities="[0.5]")
    out = tmp_path / "out"
    result, _ = sweep(path, out)
    assert not result.failed
    runs = finished(out)
    imp = runs["mlp-synthetic-pat-imp-0.50-seed0"]
    assert imp["method_name"] == "imp" and imp["extra_training_epochs"] == 2
    assert runs["mlp-synthetic-pat-mipp-0.50-seed0"]["extra_training_epochs"] == 0
    report = json.loads((out / "runs" / imp["run_id"] / "report.json").read_text())
    assert report["timings"]["between_rounds"] > 0  # the re-training did happen


def test_mipp_widths_with_l1_selection_keeps_mipps_per_layer_widths(tmp_path):
    path = tiny(
        tmp_path,
        regimes='["pat"]',
        methods='["mipp", "l1-widths"]',
        extra='[methods.l1-widths]\nmethod = "l1"\nallocation = "widths"',
    )
    out = tmp_path / "out"
    assert not sweep(path, out)[0].failed
    runs = finished(out)
    for s in ("0.30", "0.60"):
        ref = runs[f"mlp-synthetic-pat-mipp-{s}-seed0"]["layers"]
        ours = runs[f"mlp-synthetic-pat-l1-widths-{s}-seed0"]["layers"]
        assert ours == ref


BASE = {
    "name": "x",
    "grid": {
        "models": ["mlp"],
        "datasets": ["synthetic"],
        "methods": ["mipp", "l1"],
        "sparsities": [0.5],
    },
}


def _with(**changes):
    raw = json.loads(json.dumps(BASE))
    for dotted, value in changes.items():
        table, _, key = dotted.rpartition("__")
        target = raw
        for part in filter(None, table.split("__")):
            target = target.setdefault(part, {})
        target[key] = value
    return raw


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"grid__sparsities": [1.2]}, r"1.2 is not a share strictly between 0 and 1"),
        ({"grid__sparsities": []}, r"grid.sparsities must be a non-empty list"),
        ({"grid__seeds": [-1]}, r"grid.seeds: -1 is not an integer >= 0"),
        ({"grid__models": ["lenet7"]}, r"unknown model 'lenet7'; valid: \[.*'lenet5'"),
        ({"grid__datasets": ["imagenet21k"]}, r"unknown dataset 'imagenet21k'.*'imagenet'"),
        ({"grid__regimes": ["pbt"]}, r"unknown regime 'pbt'; valid: \['pat', 'pai'\]"),
        ({"grid__methods": ["mipp", "l2"]}, r"'l2' is neither a method .* \[methods.l2\]"),
        ({"grid__methods": ["l1"]}, r"prune.reference 'mipp' is not in grid.methods"),
        ({"grid__method": ["l1"]}, r"unknown key\(s\) \['method'\] in \[grid\]"),
        ({"prune__target": "flops"}, r"prune.target must be units, params, macs or latency"),
        ({"train__epochs": 0}, r"\[train\]: epochs must be an integer >= 1"),
        (
            {"finetune__epochs": 2, "finetune__fraction": 0.5},
            r"give finetune.epochs \(a fixed budget\) or finetune.fraction",
        ),
        ({"data__channels": 2}, r"data.channels must be 1 or 3, got 2"),
        (
            {"methods__v__method": "mipp", "methods__v__allocation": "widths"},
            r"\[methods.v\]: method 'mipp' has no option\(s\) allocation; valid options: "
            r"estimator, pool, order, min_keep, confidence, threshold, cost_aware, "
            r"reconstruct, residual, stream_features, paper",
        ),
        (
            {"methods__v__method": "l1", "methods__v__order": "index"},
            r"\[methods.v\]: method 'l1' has no option\(s\) order",
        ),
        (
            {"methods__v__method": "snip", "methods__v__options": {"bogus": 1}},
            r"\[methods.v\]: method 'snip' has no option\(s\) bogus",
        ),
        (
            {"methods__v__method": "mipp", "methods__v__estimator": "knn"},
            r"\[methods.v\]: unknown estimator 'knn'; valid",
        ),
        ({"methods__v__method": "l2"}, r"\[methods.v\].method must be one of \['mipp', "),
        (
            {"methods__v__method": "l1", "methods__v__tolerance": 0.1},
            r"\[methods.v\]: \['tolerance'\] set\(s\) how every method .* set it in \[prune\]",
        ),
        (
            {"methods__v__method": "l1", "methods__v__compensate": "yes"},
            r"\[methods.v\].compensate must be true or false, got 'yes'",
        ),
        (
            {
                "methods__v__method": "l1",
                "methods__v__rounds": 2,
                "methods__v__options": {"rounds": 3},
            },
            r"\[methods.v\]: \['rounds'\] given both as key\(s\) and in options",
        ),
        ({"colour": "red"}, r"unknown key\(s\) \['colour'\] in the config \(top level\)"),
    ],
)
def test_bad_configs_are_refused_with_the_reason(changes, message):
    with pytest.raises(MippError, match=message):
        resolve(_with(**changes))


def test_a_variant_option_the_method_does_not_take_is_refused_naming_the_valid_ones():
    raw = _with(grid__methods=["mipp", "x"], methods__x__method="l1")
    raw["methods"]["x"]["estimator"] = "gaussian"
    with pytest.raises(MippError) as info:
        resolve(raw)
    assert str(info.value) == (
        "[methods.x]: method 'l1' has no option(s) estimator; valid options: allocation, "
        "rounds, normalize, cost_aware"
    )


def test_a_variant_that_cannot_prune_the_grids_budget_is_refused_at_load_time():
    raw = _with(grid__methods=["mipp", "v"], methods__v__method="mipp")
    raw["methods"]["v"]["confidence"] = 0.9  # its own stopping rule: no sparsity
    with pytest.raises(MippError, match=r"\[methods.v\] cannot prune units sparsity 0.5 .*"
                       r"MIPP\(confidence=...\) is its own stopping rule"):  # fmt: skip
        resolve(raw)
    raw = _with(
        grid__methods=["mipp", "w"],
        prune__reference="",
        methods__w__method="l1",
        methods__w__allocation="widths",
    )
    with pytest.raises(MippError, match=r"\[methods.w\] .*widths.*prune.reference is unset"):
        resolve(raw)


def test_a_variant_resolves_to_its_method_and_pipeline_options():
    raw = _with(
        grid__methods=["mipp", "v", "m", "l1"],
        prune__calib_samples=1024,
        methods__v__method="l1",
        methods__v__allocation="global",
        methods__v__calib_samples=128,
        methods__v__options={"rounds": 2},
        methods__m__method="mipp",
        methods__m__estimator="gaussian",
        methods__m__compensate=True,
    )
    spec = resolve(raw)
    method, pipeline = spec.method("v")
    assert (method.name, method.allocation, method.rounds) == ("l1", "global", 2)
    assert pipeline == {
        "target": "units",
        "calib_samples": 128,
        "tolerance": 0.01,
        "batch_size": 256,
        "scope": "internal",
        "compensate": None,  # the method's own choice (mipp.prune)
        "recalibrate_bn": None,
    }
    method, pipeline = spec.method("m")
    assert (method.name, method.estimator) == ("mipp", "gaussian")
    assert pipeline["calib_samples"] == 1024 and pipeline["compensate"] is True
    assert spec.method("v")[0] is not spec.method("v")[0]  # a fresh object per call
    # the variant table as written is what a run's config.json records
    assert spec.variant("v") == raw["methods"]["v"] and spec.variant("l1") == {"method": "l1"}
    assert [spec.reference_for(label) for label in ("mipp", "v", "m", "l1")] == [
        None,
        "mipp",
        None,  # a MIPP variant prunes to the request itself
        "mipp",
    ]


def test_the_reference_must_be_a_mipp_run_by_its_method_not_its_name():
    raw = _with(grid__methods=["mipp-like", "l1"], prune__reference="mipp-like")
    raw["methods"] = {"mipp-like": {"method": "l1"}}
    with pytest.raises(MippError, match=r"prune.reference 'mipp-like' must be a mipp run"):
        resolve(raw)
    raw = _with(grid__methods=["ours", "l1"], prune__reference="ours")
    raw["methods"] = {"ours": {"method": "mipp", "order": "index"}}
    assert resolve(raw).reference_for("l1") == "ours"


def test_profiles_are_deep_merged_and_a_missing_profile_is_named(tmp_path):
    raw = _with(train__epochs=5, profiles__quick__train={"lr": 0.1}, profiles__quick__grid={})
    raw["profiles"]["quick"]["grid"]["seeds"] = [3]
    spec = resolve(raw, profile="quick")
    assert spec.name == "x-quick" and spec.grid["seeds"] == [3]
    assert spec.config["train"] == {"epochs": 5, "lr": 0.1}
    assert spec.grid["methods"] == ["mipp", "l1"]  # untouched by the profile
    with pytest.raises(MippError, match=r"profile 'full' is not in the config; .*\['quick'\]"):
        resolve(raw, profile="full")


def test_a_latency_target_is_accepted_by_a_sweep_config():
    assert resolve(_with(prune__target="latency")).config["prune"]["target"] == "latency"


def test_a_fixed_fine_tuning_budget_replaces_the_fraction_in_a_profile():
    from mipp.experiments.spec import finetune_epochs

    raw = _with(train__epochs=9, finetune__fraction=0.5)
    assert finetune_epochs(resolve(raw).config) == 5  # 0.5 × 9 = 4.5, rounded half up
    raw["profiles"] = {"fixed": {"finetune": {"epochs": 2}}, "share": {"finetune": {}}}
    fixed = resolve(raw, profile="fixed").config
    assert finetune_epochs(fixed) == 2 and "fraction" not in fixed["finetune"]
    assert finetune_epochs(resolve(_with(train__epochs=6)).config) == 4  # default 0.67 × 6


def test_bases_are_shared_between_sweeps_through_a_cache_directory(tmp_path):
    """Two sweeps with the same (model, data, recipe, seed) train the base once."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = tiny(tmp_path / "a", regimes='["pat"]', methods='["mipp"]', sparsities="[0.5]")
    b = tiny(
        tmp_path / "b",
        regimes='["pat"]',
        methods='["l1"]',
        sparsities="[0.5]",
        extra='[methods.l1]\nmethod = "l1"\n',
    )
    b.write_text(
        b.read_text().replace("calib_samples = 512", 'calib_samples = 512\nreference = ""')
    )
    cache = tmp_path / "bases"
    run_sweep(load_spec(a), tmp_path / "s1", bases=cache)
    events: list[ProgressEvent] = []
    run_sweep(load_spec(b), tmp_path / "s2", bases=cache, progress=events.append)
    assert not [e for e in events if e.stage == "base"]  # nothing trained the second time
    assert len(list(cache.iterdir())) == 1 and not (tmp_path / "s2" / "bases").exists()


@contextlib.contextmanager
def another_process_training(base: Path) -> Iterator[tuple[list[ProgressEvent], Callable]]:
    """Within the block the cached ``base`` looks like one another process is training: its
    base.json is set aside and a thread holds the directory's lock until a progress event says
    someone waits for it, then puts the file back. Yields (events, the progress callback to
    pass to the code under test)."""
    import threading

    from mipp._io import lock_directory

    (base / "base.json").rename(base / "base.json.aside")
    held, waited = threading.Event(), threading.Event()

    def trainer() -> None:
        with lock_directory(base):
            held.set()
            assert waited.wait(timeout=120)
            (base / "base.json.aside").rename(base / "base.json")

    thread = threading.Thread(target=trainer)
    thread.start()
    assert held.wait(timeout=120)
    events: list[ProgressEvent] = []

    def progress(e: ProgressEvent) -> None:
        events.append(e)
        if e.stage == "base" and "waiting for another mipp process" in e.message:
            waited.set()

    try:
        yield events, progress
    finally:
        waited.set()  # (a failing test body must not leave the thread waiting)
        thread.join()


def test_a_sweep_waits_for_a_base_another_process_is_training(tmp_path):
    """A base whose directory is locked (another sweep training it) is waited for, then read:
    never trained a second time beside the first."""
    cfg = tiny(tmp_path, regimes='["pat"]', methods='["mipp"]', sparsities="[0.5]")
    cache = tmp_path / "bases"
    run_sweep(load_spec(cfg), tmp_path / "s1", bases=cache)
    (base,) = cache.iterdir()
    with another_process_training(base) as (events, progress):
        run_sweep(load_spec(cfg), tmp_path / "s2", bases=cache, progress=progress)
    base_events = [e.message for e in events if e.stage == "base"]
    assert len(base_events) == 1 and str(base) in base_events[0]  # waited, trained nothing
    (run,) = (tmp_path / "s2" / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["accuracy_base"] == json.loads((base / "base.json").read_text())["accuracy"]


def test_bases_only_trains_every_missing_base_and_no_run(tmp_path, capsys):
    """``mipp sweep --bases-only`` trains one base per seed and nothing else; the sweep
    after it trains no base."""
    cfg = tiny(tmp_path, regimes='["pat"]', methods='["mipp"]', sparsities="[0.5]")
    cfg.write_text(cfg.read_text().replace("seeds = [0]", "seeds = [0, 1]"))
    out, cache = tmp_path / "out", tmp_path / "bases"
    argv = ["sweep", str(cfg), "--out", str(out), "--bases", str(cache), "--bases-only"]
    assert main(argv) == 0
    assert f"the 2 base network(s) the sweep needs are in {cache}" in capsys.readouterr().err
    assert sorted(p.parent.name.split("-")[2] for p in cache.glob("*/base.json")) == [
        "seed0",
        "seed1",
    ]
    assert not (out / "runs").exists()  # no run, no sweep directory content
    _, events = sweep(cfg, out, bases=cache)
    assert not [e for e in events if e.stage == "base"]  # both were there
    assert len(finished(out)) == 2
    capsys.readouterr()
    assert main([*argv, "--executor", "ray"]) != 0
    err = capsys.readouterr().err
    assert err.strip() == "mipp: error: --bases-only trains in this process; drop --executor ray"


def test_bases_only_trains_the_next_base_while_another_process_trains_one(tmp_path):
    """A locked base directory (another process training it) is passed over: the next
    missing base is trained first, then the locked one is waited for, never trained twice."""
    from mipp.experiments.runner import train_bases

    cfg = tiny(tmp_path, regimes='["pat"]', methods='["mipp"]', sparsities="[0.5]")
    cfg.write_text(cfg.read_text().replace("seeds = [0]", "seeds = [0, 1]"))
    cache = tmp_path / "bases"
    seed0, seed1 = train_bases(load_spec(cfg), cache)
    (seed1 / "base.json").unlink()  # missing: to be trained
    with another_process_training(seed0) as (events, progress):
        assert train_bases(load_spec(cfg), cache, progress=progress) == [seed0, seed1]
    said = [e.message for e in events if e.stage == "base" and not e.transient]
    assert said[0] == (
        f"{seed0} is being trained by another mipp process; training the next missing base first"
    )
    assert "training the base mlp on synthetic (seed 1" in said[1]
    assert said[-1] == f"waiting for another mipp process that is training the base in {seed0} ..."
    assert not [m for m in said if "(seed 0" in m]  # seed 0 was not trained here
    assert (seed1 / "base.json").is_file()


def test_every_committed_base_is_where_its_config_looks_for_it():
    """results/bases holds cache entries of shipped configs: each folder's name is the one
    some profile's Bases.dir gives for its (model, dataset, seed), and its base.json records
    that key (a changed recipe would leave a stale base nobody finds)."""
    import torch

    from mipp.experiments.bases import Bases, SweepData
    from mipp.experiments.spec import tomllib

    folders = sorted((ROOT / "results" / "bases").glob("*/base.json"))
    assert folders, "results/bases holds no base"
    specs = []
    for path in sorted((ROOT / "experiments").glob("*.toml")):
        for profile in tomllib.loads(path.read_text()).get("profiles", {}):
            specs.append(load_spec(path, profile=profile))
    for meta_path in folders:
        meta = json.loads(meta_path.read_text())
        found = []
        for spec in specs:
            if meta["model"] not in spec.grid["models"]:
                continue
            cache = Bases(meta_path.parent.parent, spec, SweepData(spec.config["data"],
                          spec.config["folders"]), torch.device("cpu"), None)  # fmt: skip
            if cache.dir(meta["model"], meta["dataset"], meta["seed"]) == meta_path.parent:
                found.append(spec.profile)
                key = cache.key(meta["model"], meta["dataset"], meta["seed"])
                assert {k: meta[k] for k in key} == json.loads(json.dumps(key))
        assert found, f"no shipped config looks for the base in {meta_path.parent.name}"
        for name in ("init.safetensors", "trained.safetensors"):
            assert (meta_path.parent / name).is_file()


def test_the_reference_runs_before_the_methods_that_match_it():
    spec = resolve(_with(grid__methods=["l1", "random", "mipp"], grid__sparsities=[0.5, 0.7]))
    labels = [r.method for r in spec.runs()]
    assert labels == ["mipp", "l1", "random"] * 2


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.toml")), ids=str)
def test_every_shipped_config_resolves_in_every_profile(path):
    from mipp.experiments.spec import tomllib

    profiles = tomllib.loads(path.read_text()).get("profiles", {})
    assert {"quick", "full"} <= set(profiles), f"{path.name} needs quick and full profiles"
    quick, full = load_spec(path, profile="quick"), load_spec(path, profile="full")
    assert len(full.grid["seeds"]) >= 3 and 1 <= len(quick.grid["seeds"]) <= 2
    assert quick.runs() and len(quick.runs()) <= len(full.runs())


def test_a_missing_dataset_stops_the_sweep_before_any_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MIPP_DATA", str(tmp_path / "nowhere"))
    cfg = tmp_path / "c.toml"
    text = (ROOT / "experiments" / "cifar10.toml").read_text()
    cfg.write_text(text.replace('name = "cifar10"', 'name = "c"'))
    with pytest.raises(MippError, match=r"cifar10.*not found") as info:
        run_sweep(load_spec(cfg, profile="quick"), tmp_path / "out")
    assert "nowhere" in str(info.value)
    assert not list((tmp_path / "out").glob("runs/*"))


def test_a_macs_matched_sweep_matches_and_reports_macs(tmp_path):
    path = tiny(tmp_path, regimes='["pat"]')
    path.write_text(
        path.read_text().replace("calib_samples = 512", 'calib_samples = 512\ntarget = "macs"')
    )
    out = tmp_path / "out"
    assert not sweep(path, out)[0].failed
    write_report(out, tmp_path / "r")
    runs = finished(out)
    for s in ("0.30", "0.60"):
        ref, l1 = (runs[f"mlp-synthetic-pat-{m}-{s}-seed0"] for m in ("mipp", "l1"))
        assert ref["target"] == l1["target"] == "macs"
        assert abs(l1["macs_removed"] - ref["macs_removed"]) <= 0.01
    assert "| requested | MACs removed: mipp" in (tmp_path / "r" / "REPORT.md").read_text()
