"""Pruning under torch.distributed (gloo, 2 ranks on the CPU): merged statistics, one
decision, failures that reach every rank (mipp.distributed)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mipp
from mipp import distributed
from mipp.estimators.moments import MomentAccumulator, second_moments
from mipp.methods import MIPP

F64 = torch.float64


def test_share_splits_exactly():
    """The parts sum to the total and differ by at most one, whatever the split."""
    for total in (0, 1, 7, 2048):
        for world in (1, 2, 3, 8):
            parts = [distributed.share(total, r, world) for r in range(world)]
            assert sum(parts) == total and max(parts) - min(parts) <= 1
    with pytest.raises(ValueError, match="rank must be in"):
        distributed.share(10, 2, 2)


def test_without_a_process_group_everything_is_local():
    """No process group: rank 0 of 1, collectives are no-ops, objects come back as given."""
    assert not distributed.active()
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    t = torch.ones(3)
    distributed.all_reduce_([t])
    assert torch.equal(t, torch.ones(3))
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.gather_objects(5) == [5]


# ------------------------------------------------------------------------------ 2 ranks


def _run(fn, tmp: Path, *args) -> list:
    """Run ``fn(rank, tmp, *args)`` on 2 gloo ranks; each rank's pickled return value."""
    ctx = mp.spawn(_entry, args=(fn, tmp, args), nprocs=2, join=False)
    try:
        while not ctx.join(timeout=240):
            pass
    except mp.ProcessExitedException:
        # a signal in gloo's teardown, after every rank wrote what it did, is not mipp's
        # behaviour under test; a rank that died before writing still fails below
        if not all((tmp / f"out{r}.pkl").exists() for r in range(2)):
            raise
    return [pickle.loads((tmp / f"out{r}.pkl").read_bytes()) for r in range(2)]


def _entry(rank: int, fn, tmp: Path, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp / 'rendezvous'}", rank=rank, world_size=2
    )
    try:
        try:
            out = fn(rank, tmp, *args)
        except Exception as e:  # the test inspects every rank's error
            out = {"error": type(e).__name__, "message": str(e)}
        (tmp / f"out{rank}.pkl").write_bytes(pickle.dumps(out))
        dist.barrier()  # tear down together: gloo aborts on a peer that left mid-teardown
    finally:
        dist.destroy_process_group()


def _data(n: int = 300, d: int = 12, q: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=F64) * 3 + 50  # large means: cancellation-prone
    x[:, 3] = 7.0  # a constant feature
    y = x[:, :q] @ torch.randn(q, q, generator=g, dtype=F64) + torch.randn(n, q, generator=g)
    return x.view(n, d // 2, 2), y


def _moments_on_rank(rank: int, tmp: Path, full_target: bool, folds: int) -> dict:
    x, y = _data()
    acc = MomentAccumulator(full_target=full_target, folds=folds)
    mine_x, mine_y = x[rank::2], y[rank::2]  # the halves, streamed in uneven batches
    for i in range(0, len(mine_x), 37):
        acc.update(mine_x[i : i + 37], mine_y[i : i + 37])
    acc.all_reduce()
    m = acc.moments()
    return {k: getattr(m, k) for k in ("n", "sxx", "sxy", "syy", "mean_x", "mean_y", "const_x")}


@pytest.mark.slow
@pytest.mark.parametrize("full_target, folds", [(True, 0), (False, 0), (False, 3)])
def test_two_ranks_merge_moments_into_the_single_process_ones(tmp_path, full_target, folds):
    """2 ranks streaming the two halves of a set (means near 50, a constant feature) give,
    on both ranks, the moments of one process on the whole set: counts exact, everything
    else within 1e-10 (relative to the entries' scale)."""
    outs = _run(_moments_on_rank, tmp_path, full_target, folds)
    x, y = _data()
    ref = second_moments(x, y)
    for out in outs:
        assert "error" not in out, out
        assert out["n"] == 300
        assert torch.equal(out["const_x"], ref.const_x) and bool(out["const_x"][3])
        for k in ("sxx", "sxy", "mean_x", "mean_y"):
            assert torch.allclose(out[k], getattr(ref, k), rtol=1e-10, atol=1e-10), k
        syy = out["syy"] if full_target else out["syy"].diagonal()
        want = ref.syy if full_target else ref.syy.diagonal()
        assert torch.allclose(syy, want, rtol=1e-10, atol=1e-10)


def _net(name: str) -> torch.nn.Module:
    with mipp.seeded(0):
        if name == "lenet5":
            return mipp.create_model("lenet5", in_channels=1, input_size=28)
        return mipp.create_model("resnet20", in_channels=3, input_size=32)


def _inputs(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    shape = (1, 28, 28) if name == "lenet5" else (3, 32, 32)
    return torch.randn(256, *shape, generator=g)


def _prune_on_rank(rank: int, tmp: Path, name: str, estimator: str) -> dict:
    result = mipp.prune(
        _net(name), _inputs(name), method=MIPP(estimator=estimator), sparsity=0.5, batch_size=64
    )
    return {
        "removed": {g.name: g.removed for g in result.report.groups},
        "state": {k: v.clone() for k, v in result.model.state_dict().items()},
        "calib_samples": result.report.options["calib_samples"],
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
@pytest.mark.parametrize("estimator", ["linear", "gaussian"])
def test_two_ranks_prune_the_units_one_process_prunes(tmp_path, name, estimator):
    """Each rank streams half of the calibration set: both remove exactly the units a single
    process removes on the whole set, and hold the same pruned model (the compensation's
    equations are merged too); the report counts every rank's samples."""
    outs = _run(_prune_on_rank, tmp_path, name, estimator)
    for out in outs:
        assert "error" not in out, out
    single = mipp.prune(
        _net(name), _inputs(name), method=MIPP(estimator=estimator), sparsity=0.5, batch_size=64
    )
    want = {g.name: g.removed for g in single.report.groups}
    assert outs[0]["removed"] == want
    assert outs[1]["removed"] == want
    assert outs[0]["calib_samples"] == outs[1]["calib_samples"] == 256  # both ranks' halves
    for k, v in outs[0]["state"].items():
        assert torch.allclose(v.double(), outs[1]["state"][k].double(), rtol=0, atol=1e-6), k


def _fail_on_rank_1(rank: int, tmp: Path) -> dict:
    x = _inputs("lenet5")
    if rank == 1:
        x = torch.zeros_like(x)  # degenerate: refused on this rank only
    mipp.prune(_net("lenet5"), x, sparsity=0.5)
    return {"error": None}


def _ksg_on_rank(rank: int, tmp: Path) -> dict:
    mipp.prune(_net("lenet5"), _inputs("lenet5"), method=MIPP(estimator="ksg"), sparsity=0.5)
    return {"error": None}


@pytest.mark.slow
def test_a_rank_that_fails_stops_every_rank(tmp_path):
    """Rank 1's calibration data is degenerate: rank 1 raises its CalibrationError, rank 0
    stops at its next collective with a PeerFailedError naming rank 1 and the error line,
    and neither waits forever (the spawn's join would time out). An estimator that needs
    the samples themselves is refused on every rank."""
    outs = _run(_fail_on_rank_1, tmp_path)
    assert outs[1]["error"] == "CalibrationError"
    assert outs[0]["error"] == "PeerFailedError"
    assert (
        "rank 1 failed: CalibrationError: the calibration set is degenerate" in outs[0]["message"]
    )
    for f in tmp_path.glob("out*.pkl"):
        f.unlink()
    (tmp_path / "rendezvous").unlink(missing_ok=True)
    outs = _run(_ksg_on_rank, tmp_path)
    for out in outs:
        assert out["error"] == "InvalidOptionError"
        assert "needs the calibration samples themselves" in out["message"]


@pytest.mark.slow
def test_mipp_prune_under_torchrun_writes_once_what_one_process_writes(tmp_path):
    """``torchrun --nproc_per_node 2 -m mipp.cli train`` (DDP) then ``… prune``: exit 0, one
    run directory each (rank 0 writes it), and the report removes exactly the units a
    single-process ``mipp prune`` removes; a second run into the same directory is refused
    on rank 0 and rank 1 stops too (exit 2 from both, no hang)."""
    import json
    import subprocess
    import sys

    from mipp.cli import main
    from test_cli import write_fake_fmnist  # the tiny IDX Fashion-MNIST of test_cli

    root = write_fake_fmnist(tmp_path)
    common = ["--data-root", str(root), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launch += ["--nproc_per_node", "2", "-m", "mipp.cli"]
    base = tmp_path / "base"
    train = ["train", "--model", "lenet5", "--dataset", "fashion-mnist", "--epochs", "1"]
    train += ["--batch-size", "10", "--out", str(base), "--latency-repeats", "0", *common]
    trained = subprocess.run([*launch, *train], env=env, capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr[-2000:]  # DDP, rank 0 writes
    assert (base / "model.safetensors").exists() and (base / "metrics.json").exists()
    ckpt = str(base / "model.safetensors")
    prune = ["prune", ckpt, "--sparsity", "0.5", "--calib-samples", "256", *common]
    assert main([*prune, "--out", str(tmp_path / "single")]) == 0
    done = subprocess.run(
        [*launch, *prune, "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "single").iterdir()
    )
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("single", "two")]
    removed = [{g["name"]: g["removed"] for g in r["groups"]} for r in reports]
    assert removed[0] == removed[1]
    assert reports[1]["options"]["calib_samples"] == 256  # both ranks' halves
    assert reports[1]["options"]["ranks"] == 2 and "ranks" not in reports[0]["options"]
    again = subprocess.run(
        [*launch, *prune, "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert again.returncode != 0
    assert "rank 0 failed: RunDirectoryError" in again.stderr


def _fmnist_like(n: int = 96) -> mipp.zoo.data.ImageDataset:
    g = torch.Generator().manual_seed(3)
    y = torch.arange(n) % 10
    x = torch.randn(n, 1, 28, 28, generator=g) * 0.3
    for i, k in enumerate(y.tolist()):
        x[i, 0, 2 * k + 4 : 2 * k + 6, :] += 2.0
    return mipp.zoo.data.ImageDataset(x, y, num_classes=10, name="toy")


def _train_on_rank(rank: int, tmp: Path) -> dict:
    torch.manual_seed(100 + rank)  # different initial weights: DDP starts from rank 0's
    net = mipp.create_model("lenet5", in_channels=1, input_size=28)
    config = mipp.TrainConfig(epochs=2, batch_size=8, lr=0.05, seed=0)
    history = mipp.train(net, _fmnist_like(), config)
    return {
        "losses": [e.train_loss for e in history.epochs],
        "top1": [e.train_top1 for e in history.epochs],
        "state": {k: v.clone() for k, v in net.state_dict().items()},
    }


@pytest.mark.slow
def test_two_rank_ddp_training_is_one_process_with_twice_the_batch(tmp_path):
    """2 ranks with batch 8 each train LeNet-5 (no BatchNorm) as one process with batch 16
    does: the same epoch losses and accuracies (the ranks' rows counted together) and the
    same weights, within 1e-5 (float32 gradients summed in another order); both ranks end
    with identical weights though they were initialised differently."""
    outs = _run(_train_on_rank, tmp_path)
    for out in outs:
        assert "error" not in out, out
    torch.manual_seed(100)  # rank 0's initialisation
    net = mipp.create_model("lenet5", in_channels=1, input_size=28)
    history = mipp.train(
        net, _fmnist_like(), mipp.TrainConfig(epochs=2, batch_size=16, lr=0.05, seed=0)
    )
    want = [e.train_loss for e in history.epochs]
    for out in outs:
        assert out["losses"] == pytest.approx(want, rel=1e-5)
        assert out["top1"] == [e.train_top1 for e in history.epochs]
    for k, v in net.state_dict().items():
        assert torch.equal(outs[0]["state"][k], outs[1]["state"][k]), k
        assert torch.allclose(outs[0]["state"][k], v, rtol=1e-4, atol=1e-5), k


class _Recording(torch.utils.data.Dataset):
    """A map-style dataset that records which items this process read."""

    def __init__(self, ds: mipp.zoo.data.ImageDataset) -> None:
        self.ds, self.read = ds, []

    def __len__(self) -> int:
        return len(self.ds) + 1  # 97 items: one is left over on 2 ranks

    def __getitem__(self, i: int):
        self.read.append(i)
        return self.ds[i % len(self.ds)]


def _train_map_style_on_rank(rank: int, tmp: Path) -> dict:
    torch.manual_seed(100 + rank)
    net = mipp.create_model("lenet5", in_channels=1, input_size=28)
    data = _Recording(_fmnist_like())
    config = mipp.TrainConfig(epochs=2, batch_size=8, lr=0.05, seed=0)
    history = mipp.train(net, data, config)
    return {
        "read": data.read,
        "top1": [e.train_top1 for e in history.epochs],
        "state": {k: v.clone() for k, v in net.state_dict().items()},
    }


@pytest.mark.slow
def test_two_ranks_shard_a_map_style_dataset(tmp_path):
    """A map-style dataset (e.g. an image folder) under 2 ranks: a DistributedSampler gives
    each rank 48 of the 97 items per epoch, the ranks' shards disjoint, a new order each
    epoch; the epoch's accuracy counts both ranks' rows; the weights end identical."""
    outs = _run(_train_map_style_on_rank, tmp_path)
    for out in outs:
        assert "error" not in out, out
    epochs = [[out["read"][e * 48 : (e + 1) * 48] for e in range(2)] for out in outs]
    assert all(len(out["read"]) == 96 for out in outs)
    for e in range(2):
        assert not set(epochs[0][e]) & set(epochs[1][e])
        assert len(set(epochs[0][e]) | set(epochs[1][e])) == 96
    assert epochs[0][0] != epochs[0][1]
    assert outs[0]["top1"] == outs[1]["top1"]  # both ranks' rows counted on each
    for k in outs[0]["state"]:
        assert torch.equal(outs[0]["state"][k], outs[1]["state"][k]), k


def _labels_for(name: str) -> torch.Tensor:
    return torch.arange(256) % 10


def _baseline_on_rank(rank: int, tmp: Path, method: str) -> dict:
    data = (_inputs("lenet5"), _labels_for("lenet5"))
    result = mipp.prune(_net("lenet5"), data, method=method, sparsity=0.5, batch_size=64)
    return {"removed": {g.name: g.removed for g in result.report.groups}}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["snip", "grasp"])
def test_two_ranks_score_gradient_baselines_on_the_whole_set(tmp_path, method):
    """SNIP's gradient and GraSP's Hessian-gradient product are summed over the ranks'
    halves: both ranks remove the units one process removes on the whole set."""
    outs = _run(_baseline_on_rank, tmp_path, method)
    data = (_inputs("lenet5"), _labels_for("lenet5"))
    single = mipp.prune(_net("lenet5"), data, method=method, sparsity=0.5, batch_size=64)
    want = {g.name: g.removed for g in single.report.groups}
    for out in outs:
        assert "error" not in out, out
        assert out["removed"] == want


def _diverge_on_rank_1(rank: int, tmp: Path) -> dict:
    ds = _fmnist_like()
    if rank == 1:  # only this rank's batches hold a NaN
        ds.x[:] = float("nan")
    net = mipp.create_model("lenet5", in_channels=1, input_size=28)
    mipp.train(net, ds, mipp.TrainConfig(epochs=1, batch_size=8, lr=0.05, seed=0))
    return {"error": None}


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_stops_every_rank_in_training(tmp_path):
    """Rank 1's loss is NaN from the first step: both ranks raise TrainingDivergedError at
    that step (rank 0's own loss is finite), and neither waits in the gradient all-reduce."""
    outs = _run(_diverge_on_rank_1, tmp_path)
    for out in outs:
        assert out["error"] == "TrainingDivergedError", out
        assert "at epoch 1, step 0" in out["message"]
    assert "became non-finite on another rank" in outs[0]["message"]
    assert "became nan" in outs[1]["message"]
