"""Run a sweep's runs as Ray tasks (``mipp sweep CONFIG --executor ray``; ``pip install
'mipp[ray]'``).

:class:`RayExecutor` plugs into :func:`~mipp.experiments.runner.run_sweep`, which keeps
everything else: the lock on the sweep directory, skipping finished runs, ``sweep.json``,
progress with an ETA, the failure records. The executor

1. trains every missing base network first, one task per (model, dataset, recipe, seed), so
   a base is trained once however many runs need it;
2. submits the runs that need no reference run (MIPP's), and once they are all done the
   runs matched to a reference (the baselines, given its achieved sparsity);
3. books each run as it finishes (``ray.wait``), in whatever order the cluster finishes them.

Each task runs :func:`~mipp.experiments.runner.attempt` — the very function the local
executor runs — writing into ``<out>/runs/<run_id>`` on the worker, so the sweep directory
(and the base cache) must be on a filesystem every node sees (a shared volume; on one
machine, any directory). A task whose worker process dies (killed, out of memory) is
retried up to ``retries`` times by Ray, starting again from a clean run directory; after
that the run is recorded as failed (``error.txt``) and the sweep goes on. A failure inside
a run (an exception) is recorded at once, as the local executor does, not retried.
Interrupting the driver (Ctrl-C, SIGTERM) cancels the tasks in flight; the next
``mipp sweep`` resumes without redoing finished runs.

Resources per task: ``num_cpus`` (default 1; Ray also sets ``OMP_NUM_THREADS`` to it) and
``num_gpus`` (default 0; with 1, Ray gives the task one GPU through
``CUDA_VISIBLE_DEVICES`` and ``--device cuda`` uses it). ``address``: an existing cluster
(``"auto"``, ``"ray://host:10001"``); None starts a local one for the sweep's duration.

Fault injection for tests: when the environment variable ``MIPP_RAY_CRASH_ONCE`` names a
file that exists, the first run task that claims it (renames it) exits its worker process
at once, as a killed worker would.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mipp._io import atomic_write_bytes
from mipp.errors import MippError
from mipp.experiments.bases import Bases, SweepData
from mipp.experiments.runner import attempt
from mipp.experiments.spec import Run, SweepSpec
from mipp.progress import Reporter

__all__ = ["RayExecutor"]

#: the environment variable of the fault injection (module docstring)
CRASH_ONCE = "MIPP_RAY_CRASH_ONCE"


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MippError(
            "the ray executor needs Ray: pip install 'mipp[ray]' (or pip install ray)"
        ) from None
    return ray


def _worker(spec: SweepSpec, bases_dir: str, device: str) -> tuple[Bases, SweepData]:
    """A task's own data and base cache (the threads Ray gave it: ``OMP_NUM_THREADS``)."""
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    data = SweepData(spec.config["data"], spec.config["folders"])
    bases = Bases(Path(bases_dir), spec, data, torch.device(device), Reporter(None, __name__))
    return bases, data


def _base_task(spec: SweepSpec, bases_dir: str, key: tuple[str, str, int], device: str) -> float:
    """Train (or find) one base network in the shared cache; its accuracy."""
    bases, _ = _worker(spec, bases_dir, device)
    _, accuracy = bases.get(*key, "trained")
    return accuracy


def _run_task(
    spec: SweepSpec, run: Run, out: str, bases_dir: str, device: str
) -> tuple[dict[str, Any] | None, str | None]:
    """One run on a worker: :func:`~mipp.experiments.runner.attempt`."""
    marker = os.environ.get(CRASH_ONCE)
    if marker:
        with contextlib.suppress(OSError):
            os.rename(marker, marker + ".claimed")  # only one task gets it
            os._exit(1)  # a worker process that dies mid-run
    bases, data = _worker(spec, bases_dir, device)
    return attempt(spec, run, Path(out), bases, data, torch.device(device))


class RayExecutor:
    """Submit a sweep's runs to a Ray cluster (see the module docstring).

    Args:
        address: the cluster to join (``ray.init(address=...)``); None starts a local one
            (with ``local_cpus`` CPUs, default all) and shuts it down at the end.
        num_cpus, num_gpus: resources of each task.
        retries: how many times a task whose worker died is run again (>= 0).
    """

    def __init__(
        self,
        *,
        address: str | None = None,
        num_cpus: float = 1,
        num_gpus: float = 0,
        retries: int = 2,
        local_cpus: int | None = None,
    ) -> None:
        if not (isinstance(num_cpus, int | float) and num_cpus > 0):
            raise MippError(f"num_cpus per task must be > 0, got {num_cpus!r}")
        if not (isinstance(num_gpus, int | float) and num_gpus >= 0):
            raise MippError(f"num_gpus per task must be >= 0, got {num_gpus!r}")
        if isinstance(retries, bool) or not (isinstance(retries, int) and retries >= 0):
            raise MippError(f"retries must be an integer >= 0, got {retries!r}")
        self.address, self.num_cpus, self.num_gpus = address, num_cpus, num_gpus
        self.retries, self.local_cpus = retries, local_cpus

    def __repr__(self) -> str:
        return (
            f"RayExecutor(address={self.address!r}, num_cpus={self.num_cpus}, "
            f"num_gpus={self.num_gpus}, retries={self.retries})"
        )

    def execute(
        self,
        spec: SweepSpec,
        out: Path,
        pending: list[Run],
        bases_dir: Path,
        device: torch.device,
        report: Reporter,
        record: Callable[[Run, dict[str, Any] | None, str | None], None],
    ) -> None:
        """Run ``pending`` (the runner's unfinished runs) and ``record`` each as it ends."""
        ray = _import_ray()
        started = False
        if not ray.is_initialized():
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.address is None:
                options["num_cpus"] = self.local_cpus or os.cpu_count() or 1
            ray.init(address=self.address, **options)
            started = True
        try:
            self._execute(ray, spec, out, pending, bases_dir, device, report, record)
        finally:
            if started:
                ray.shutdown()

    def _execute(self, ray, spec, out, pending, bases_dir, device, report, record) -> None:
        resources = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        base_fn = ray.remote(_base_task).options(max_retries=self.retries, **resources)
        run_fn = ray.remote(_run_task).options(max_retries=self.retries, **resources)
        dev = str(device)
        # 1. every missing base network, once
        sweep_data = SweepData(spec.config["data"], spec.config["folders"])
        cache = Bases(bases_dir, spec, sweep_data, device, report)
        keys = list(dict.fromkeys((r.model, r.dataset, r.seed) for r in pending))
        missing = [k for k in keys if not (cache.dir(*k) / "base.json").exists()]
        failed_bases: dict[tuple[str, str, int], str] = {}
        if missing:
            report("base", f"training {len(missing)} base network(s) on Ray ...")
            refs = {base_fn.remote(spec, str(bases_dir), k, dev): k for k in missing}
            for ref, key in refs.items():
                try:
                    acc = ray.get(ref)
                    report("base", f"base {'-'.join(map(str, key))}: accuracy {acc:.4f}")
                except Exception as e:  # the runs that need it fail below
                    failed_bases[key] = f"its base network failed: {_one_line(e)}"
        # 2. the runs: references first, then the runs matched to them
        first = [r for r in pending if spec.reference_for(r.method) is None]
        second = [r for r in pending if spec.reference_for(r.method) is not None]
        for wave in (first, second):
            todo: dict[Any, Run] = {}
            for run in wave:
                key = (run.model, run.dataset, run.seed)
                if key in failed_bases:
                    self._fail(out, run, failed_bases[key], record)
                    continue
                todo[run_fn.remote(spec, run, str(out), str(bases_dir), dev)] = run
            try:
                while todo:
                    done, _ = ray.wait(list(todo), num_returns=1)
                    run = todo.pop(done[0])
                    try:
                        metrics, error = ray.get(done[0])
                    except Exception as e:  # the worker died more than `retries` times
                        self._fail(out, run, f"Ray task failed: {_one_line(e)}", record)
                        continue
                    record(run, metrics, error)
            except BaseException:
                for ref in todo:
                    with contextlib.suppress(Exception):
                        ray.cancel(ref, force=True)
                raise

    @staticmethod
    def _fail(out: Path, run: Run, error: str, record: Callable) -> None:
        rdir = out / "runs" / run.run_id
        rdir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(rdir / "error.txt", (error + "\n").encode())
        record(run, None, error)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[-1] if text else ""
    return f"{type(e).__name__}: {line}" if line else type(e).__name__
