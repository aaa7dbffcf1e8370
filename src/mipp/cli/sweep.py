"""``mipp sweep CONFIG``: run an experiment grid from a TOML config, resumably.

Finished runs are kept; running the same command again picks up where it stopped. The
runner's progress (one ``"sweep"`` line per run, base training, pruning) is drawn by the
shared renderer on stderr. ``--report`` writes the report (``mipp report``) at the end.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mipp.cli._common import device, make_console, rendering
from mipp.errors import MippError
from mipp.experiments.report import write_report
from mipp.experiments.runner import run_sweep, train_bases
from mipp.experiments.spec import load_spec

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="run an experiment grid from a TOML config (resumable: finished runs are kept)",
    )
    p.add_argument("config", help="a TOML config, e.g. experiments/lenet5_fmnist.toml")
    p.add_argument("--profile", default=None, help="a [profiles.NAME] of the config, e.g. quick")
    p.add_argument("--out", default=None, help="sweep directory (default runs/sweeps/<name>)")
    p.add_argument(
        "--device", type=device, default="cpu", help="torch device for every run (default cpu)"
    )
    p.add_argument(
        "--bases",
        default=None,
        help="base-network cache shared between sweeps (default: 'bases' beside the sweep "
        "directory, e.g. runs/sweeps/bases): a base is trained once per (model, data, "
        "recipe, seed)",
    )
    p.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: one run after another in this process (default); ray: every run as a "
        "Ray task (pip install 'mipp[ray]')",
    )
    p.add_argument(
        "--address",
        default=None,
        help="with --executor ray: the cluster to join ('auto', 'ray://HOST:10001'); "
        "default: a local cluster for this sweep",
    )
    p.add_argument(
        "--task-cpus", type=float, default=1.0, help="with --executor ray: CPUs per run task"
    )
    p.add_argument(
        "--task-gpus", type=float, default=0.0, help="with --executor ray: GPUs per run task"
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="with --executor ray: how often a task whose worker died is run again",
    )
    p.add_argument(
        "--bases-only",
        action="store_true",
        help="train the base networks the runs need that the cache lacks, then exit; run it "
        "in several processes to train several bases at once (each skips a base another is "
        "training)",
    )
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument("--report", action="store_true", help="write the report (mipp report) when done")
    p.add_argument("--report-out", default=None, help="report folder (default results/<name>)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = load_spec(args.config, profile=args.profile)
    out = Path(args.out) if args.out else Path("runs") / "sweeps" / spec.name
    command = f"mipp sweep {args.config}" + (f" --profile {args.profile}" if args.profile else "")
    if args.out:
        command += f" --out {args.out}"
    console = make_console(stderr=True, soft_wrap=True)
    if args.dry_run:
        runs = spec.runs()
        console.print(f"sweep {spec.name}: {len(runs)} runs → {out}")
        for r in runs:
            console.print(f"  {r.run_id}")
        return 0
    bases = Path(args.bases) if args.bases else out.parent / "bases"
    if bases.resolve() == out.resolve():
        raise MippError(
            f"the sweep directory {out} is also the base cache; give --out or --bases another path"
        )
    if args.bases_only:
        if args.executor != "local":
            raise MippError(f"--bases-only trains in this process; drop --executor {args.executor}")
        with rendering(console) as progress:
            dirs = train_bases(spec, bases, device=args.device, progress=progress)
        console.print(f"the {len(dirs)} base network(s) the sweep needs are in {bases}")
        return 0
    executor = None
    if args.executor == "ray":
        from mipp.experiments.ray_executor import RayExecutor

        executor = RayExecutor(
            address=args.address,
            num_cpus=args.task_cpus,
            num_gpus=args.task_gpus,
            retries=args.retries,
        )
    elif args.address is not None:
        raise MippError("--address applies to --executor ray only")
    with rendering(console) as progress:
        result = run_sweep(
            spec,
            out,
            device=args.device,
            command=command,
            progress=progress,
            bases=bases,
            executor=executor,
        )
    finished = len(result.skipped) + len(result.done)
    console.print(
        f"{finished} of {result.total} runs finished ({len(result.done)} now); "
        f"summarise with: mipp report {out}"
    )
    if args.report and finished:
        console.print(f"report written to {write_report(out, args.report_out)}")
    return 1 if result.failed else 0
