"""MIPP's calibration statistics on 1 rank vs N ranks (``torch.distributed``), side by side.

    python benchmarks/distributed_calibration.py                 # 1 vs 2 ranks, gloo, CPU
    python benchmarks/distributed_calibration.py --ranks 1 2 4 --samples 2048

The zoo ResNet-50 (32 px, one channel, bottleneck blocks; random initialisation, seed 0) is
pruned to 50 % of its units by ``mipp.prune`` with MIPP's defaults but no reconstruction
and no verification, on ``--samples`` seeded N(0, 1) images, by 1 process and then by N
processes of one gloo process group (each streaming its rows r, r + N, … of the same set;
:mod:`mipp.distributed`). The machine's ``--threads`` (default: all cores) are split evenly
between the ranks, so the comparison is at equal hardware: on one machine it shows what the
sharding and the merge cost, not a speed-up; on N machines each rank would have its own.

Per rank count, rank 0's report gives the seconds of the statistics pass (``capture`` +
``statistics``: the forward passes, the float64 moment accumulation and, with several
ranks, the cross-rank merge) and of the whole ``prune()``; throughput is samples per second
of the statistics pass, and ``speedup`` is relative to 1 rank. Every rank count must remove
the same units as 1 rank (checked; a mismatch is an error). Writes
``<out>/distributed_calibration.{csv,json}``.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _results import write_results

import mipp
from mipp.zoo import models

OUT = Path(__file__).parent / "results"


def _prune(samples: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    with mipp.seeded(0):
        net = models.create("resnet50", in_channels=1, input_size=32).eval()
    x = torch.randn(samples, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    t = time.perf_counter()
    result = mipp.prune(
        net, x, sparsity=0.5, compensate=False, recalibrate_bn=False, verify=False, seed=0
    )
    total = time.perf_counter() - t
    timings = result.report.timings
    return {
        "statistics_s": timings.get("capture", 0.0) + timings.get("statistics", 0.0),
        "prune_s": total,
        "removed": {g.name: g.removed for g in result.report.groups},
    }


def _rank(rank: int, world: int, samples: int, threads: int, tmp: str) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world
    )
    try:
        out = _prune(samples, threads)
        if rank == 0:
            Path(tmp, "out.pkl").write_bytes(pickle.dumps(out))
    finally:
        dist.destroy_process_group()


def measure(world: int, samples: int, threads: int) -> dict:
    per_rank = max(1, threads // world)
    if world == 1:
        return {**_prune(samples, per_rank), "threads_per_rank": per_rank}
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(world, samples, per_rank, tmp), nprocs=world, join=True)
        out = pickle.loads(Path(tmp, "out.pkl").read_bytes())
    return {**out, "threads_per_rank": per_rank}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if 1 not in args.ranks:
        raise SystemExit("--ranks must include 1 (the reference)")
    rows, reference = [], None
    for world in sorted(set(args.ranks)):
        print(f"{world} rank(s) ...", file=sys.stderr, flush=True)
        got = measure(world, args.samples, args.threads)
        if reference is None:
            reference = got
        elif got["removed"] != reference["removed"]:
            raise SystemExit(f"{world} ranks removed other units than 1 rank")
        rows.append(
            {
                "model": "resnet50",
                "ranks": world,
                "threads_per_rank": got["threads_per_rank"],
                "samples": args.samples,
                "statistics_s": round(got["statistics_s"], 2),
                "samples_per_s": round(args.samples / got["statistics_s"], 1),
                "speedup": round(reference["statistics_s"] / got["statistics_s"], 3),
                "prune_s": round(got["prune_s"], 2),
                "same_units_as_1_rank": True,
            }
        )
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    command = "python benchmarks/distributed_calibration.py " + " ".join(sys.argv[1:])
    write_results(
        args.out / "distributed_calibration",
        rows,
        {"command": command.strip(), "backend": "gloo", "device": "cpu"},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
