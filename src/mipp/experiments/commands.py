"""``mipp sweep`` and ``mipp report``: the command-line side of :mod:`mipp.experiments`."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from mipp.experiments.spec import load_spec

__all__ = ["cmd_report", "cmd_sweep"]


def cmd_sweep(args: argparse.Namespace) -> int:
    from mipp.experiments.runner import run_sweep

    spec = load_spec(args.config, profile=args.profile)
    out = Path(args.out) if args.out else Path("runs") / "sweeps" / spec.name
    command = f"mipp sweep {args.config}" + (f" --profile {args.profile}" if args.profile else "")
    if args.out:
        command += f" --out {args.out}"
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    if args.dry_run:
        runs = spec.runs()
        console.print(f"sweep {spec.name}: {len(runs)} runs → {out}")
        for run in runs:
            console.print(f"  {run.run_id}")
        return 0
    result = run_sweep(spec, out, device=args.device, command=command, console=console)
    finished = len(result.skipped) + len(result.done)
    console.print(
        f"{finished} of {result.total} runs finished ({len(result.done)} now); "
        f"summarise with: mipp report {out}"
    )
    if args.report and finished:
        from mipp.experiments.report import write_report

        console.print(f"report written to {write_report(out, args.report_out)}")
    return 1 if result.failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from mipp.experiments.report import write_report

    out = write_report(args.sweep_dir, args.out)
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"report written to {out}/REPORT.md"
    )
    return 0
