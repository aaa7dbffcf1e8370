"""Sweeps on a local Ray cluster (mipp.experiments.ray_executor): the same results as the
local executor, a killed worker retried, an interrupted driver resumed."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from mipp.errors import MippError
from mipp.experiments import load_spec
from mipp.experiments.ray_executor import CRASH_ONCE, RayExecutor
from mipp.experiments.report import write_report
from mipp.experiments.runner import run_sweep
from test_experiments import stamps, tiny

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray cluster for the module; its workers see ``MIPP_RAY_CRASH_ONCE`` (a
    marker path that exists only when a test creates it)."""
    marker = tmp_path_factory.mktemp("ray") / "crash-once"
    mp = pytest.MonkeyPatch()
    mp.setenv(CRASH_ONCE, str(marker))
    mp.setenv("OMP_NUM_THREADS", "1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield marker
    ray.shutdown()
    mp.undo()


def _rows(report_dir: Path) -> list[dict[str, str]]:
    """runs.csv without its timing columns and the CPU threads each run was given (a Ray
    worker gets its own share of the cores, so only these may differ from a local run)."""
    with open(report_dir / "runs.csv", newline="") as f:
        return [
            {k: v for k, v in r.items() if not k.endswith("_s") and k != "threads"}
            for r in csv.DictReader(f)
        ]


def test_a_ray_sweep_gives_the_local_sweeps_runs_csv(cluster, tmp_path):
    """The tiny grid (PaT, MIPP and L1 at 2 sparsities) on 2 Ray workers and in this
    process: the same runs.csv, timings and threads aside; the base is trained once, by a
    Ray task, and found in the shared cache by the local sweep."""
    spec = load_spec(tiny(tmp_path, regimes='["pat"]'))
    bases = tmp_path / "bases"
    remote = run_sweep(spec, tmp_path / "ray", executor=RayExecutor(), bases=bases)
    local = run_sweep(spec, tmp_path / "local", bases=bases)
    assert not local.failed and not remote.failed
    assert sorted(remote.done) == sorted(local.done) and len(local.done) == 4
    a = _rows(write_report(tmp_path / "local", tmp_path / "report-local"))
    b = _rows(write_report(tmp_path / "ray", tmp_path / "report-ray"))
    assert a == b
    assert len(list(bases.glob("*/base.json"))) == 1


def test_a_killed_worker_is_retried_and_the_sweep_completes(cluster, tmp_path):
    """The first run task to start kills its own worker process: Ray runs it again, the
    sweep finishes every run and records no failure."""
    cluster.write_text("")
    spec = load_spec(tiny(tmp_path, regimes='["pat"]', methods='["mipp"]'))
    result = run_sweep(spec, tmp_path / "out", executor=RayExecutor(retries=2))
    assert not cluster.exists() and cluster.with_name("crash-once.claimed").exists()
    assert not result.failed and len(result.done) == 2
    assert len(list((tmp_path / "out").glob("runs/*/metrics.json"))) == 2


def test_a_worker_that_keeps_dying_is_recorded_as_failed(cluster, tmp_path):
    """With no retries the killed run is recorded as failed (error.txt) and the others
    finish; the next invocation redoes only that run."""
    cluster.with_name("crash-once.claimed").unlink(missing_ok=True)
    cluster.write_text("")
    spec = load_spec(tiny(tmp_path, regimes='["pat"]', methods='["mipp"]'))
    out = tmp_path / "out"
    result = run_sweep(spec, out, executor=RayExecutor(retries=0))
    assert len(result.failed) == 1 and len(result.done) == 1
    (failed,) = result.failed
    assert "Ray task failed" in result.failed[failed]
    assert (out / "runs" / failed / "error.txt").exists()
    again = run_sweep(spec, out, executor=RayExecutor())
    assert again.done == [failed] and not again.failed


def test_an_interrupted_ray_driver_resumes_without_redoing_finished_runs(cluster, tmp_path):
    spec = load_spec(tiny(tmp_path, regimes='["pat"]'))
    out = tmp_path / "out"

    def stop(run_id):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, out, executor=RayExecutor(), on_run_done=stop)
    before = stamps(out)
    assert 1 <= len(before) < 4
    result = run_sweep(spec, out, executor=RayExecutor())
    assert sorted(result.skipped) == sorted(before) and not result.failed
    assert len(result.skipped) + len(result.done) == 4
    assert {k: v for k, v in stamps(out).items() if k in before} == before


def test_bad_executor_options_are_one_line():
    with pytest.raises(MippError, match="num_cpus per task must be > 0, got 0"):
        RayExecutor(num_cpus=0)
    with pytest.raises(MippError, match="retries must be an integer >= 0, got -1"):
        RayExecutor(retries=-1)
