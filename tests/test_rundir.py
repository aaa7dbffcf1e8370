"""Run directories: --out / --force, the atomic swap, crashes at every write, permissions,
reproducible checkpoint bytes, the sweep lock, and training on vector data."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mipp._io as mio
from mipp._io import (
    DirectoryLockedError,
    RunDirectoryError,
    lock_directory,
    read_json,
    run_directory,
    write_json,
)
from mipp.cli import main
from mipp.types import ModelSpec
from mipp.zoo.checkpoint import build_model, load_checkpoint, save_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
RUN_FILES = ["config.json", "metrics.json", "model.json", "model.safetensors", "report.json"]


def _prune_argv(ckpt: Path, out: Path, sparsity: float, *extra: str) -> list[str]:
    return [
        "prune",
        str(ckpt),
        "--sparsity",
        str(sparsity),
        "--calib-samples",
        "256",
        "--no-eval",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run directory of a tiny MLP trained for one epoch on the bundled digits."""
    out = tmp_path_factory.mktemp("trained") / "run"
    argv = ["train", "--model", "mlp", "--widths", "16,8", "--dataset", "digits"]
    argv += ["--epochs", "1", "--latency-repeats", "0", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    return out


@pytest.fixture
def base(trained, tmp_path) -> Path:
    """A fresh copy of the trained run directory (tests may try to clobber it)."""
    return Path(shutil.copytree(trained, tmp_path / "base"))


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _hidden_siblings(d: Path) -> list[str]:
    return sorted(p.name for p in d.parent.iterdir() if p.name.startswith(f".{d.name}."))


# ----------------------------------------------------------------------------- --out / --force


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_out_onto_the_input_checkpoints_directory_is_refused_even_with_force(base, force, capsys):
    before = _snapshot(base)
    for out in (base, base.parent):  # the directory of the input, and one above it
        assert main(_prune_argv(base / "model.safetensors", out, 0.5, *force)) == 2
        err = _one_line_error(capsys)
        assert f"output directory {out} contains {base / 'model.safetensors'}" in err
        assert "--force does not apply to inputs" in err
    argv = ["finetune", str(base / "model.safetensors"), "--out", str(base), *force]
    assert main(argv) == 2
    assert "an input of this command" in _one_line_error(capsys)
    assert _snapshot(base) == before  # byte-identical, nothing added
    assert _hidden_siblings(base) == []


def test_a_non_empty_out_needs_force_and_force_replaces_it_whole(base, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("stale")
    write_json(out / "report.json", {"old": True})
    before = _snapshot(out)
    assert main(_prune_argv(base / "model.safetensors", out, 0.5)) == 2
    err = _one_line_error(capsys)
    assert f"output directory {out} already holds files" in err and "--force" in err
    assert _snapshot(out) == before
    argv = ["train", "--model", "mlp", "--dataset", "digits", "--out", str(out)]
    assert main(argv) == 2  # refused before any work
    assert "already holds files" in _one_line_error(capsys)
    assert main(["finetune", str(base / "model.safetensors"), "--out", str(out)]) == 2
    assert "already holds files" in _one_line_error(capsys)
    assert _snapshot(out) == before

    assert main(_prune_argv(base / "model.safetensors", out, 0.5, "--force")) == 0
    assert sorted(p.name for p in out.iterdir()) == RUN_FILES  # old.txt is gone
    report = json.loads((out / "report.json").read_text())
    assert report["requested"] == 0.5
    assert load_checkpoint(out / "model.safetensors").meta["params"] == report["params_after"]
    assert _hidden_siblings(out) == []


def test_an_empty_or_missing_out_needs_no_force(base, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_prune_argv(base / "model.safetensors", empty, 0.5)) == 0
    assert sorted(p.name for p in empty.iterdir()) == RUN_FILES
    missing = tmp_path / "a" / "b"
    assert main(_prune_argv(base / "model.safetensors", missing, 0.5)) == 0
    assert sorted(p.name for p in missing.iterdir()) == RUN_FILES


def test_the_default_out_is_refused_like_any_other_when_it_holds_a_run(
    base, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    argv = _prune_argv(base / "model.safetensors", Path("x"), 0.5)
    argv = argv[: argv.index("--out")]  # the default runs/pruned
    assert main(argv) == 0
    first = _snapshot(tmp_path / "runs" / "pruned")
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert "output directory runs/pruned already holds files" in err and "--force" in err
    assert _snapshot(tmp_path / "runs" / "pruned") == first


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirectoryError, match=r"output directory .*f is a file"):
        run_directory(tmp_path / "f", force=True)


def test_an_error_or_ctrl_c_in_the_block_leaves_the_old_directory_and_no_temporary(tmp_path):
    d = tmp_path / "run"
    with run_directory(d) as tmp:
        write_json(tmp / "a.json", "old")
    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc), run_directory(d, force=True) as tmp:
            write_json(tmp / "a.json", "new")
            write_json(tmp / "b.json", "new")
            raise exc()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
        assert read_json(d / "a.json") == "old" and not (d / "b.json").exists()


def test_a_run_that_appears_while_building_is_not_replaced_without_force(tmp_path):
    d = tmp_path / "run"
    with pytest.raises(RunDirectoryError, match="already holds files"), run_directory(d) as tmp:
        write_json(tmp / "a.json", "mine")
        d.mkdir()
        write_json(d / "a.json", "theirs")  # another process finished first
    assert read_json(d / "a.json") == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_without_rename_exchange_two_renames_replace_the_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(mio, "_exchange", lambda a, b: False)
    d = tmp_path / "run"
    for value in ("old", "new"):
        with run_directory(d, force=True) as tmp:
            write_json(tmp / "a.json", value)
    assert read_json(d / "a.json") == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ----------------------------------------------------------------------------- crashes


def _kill_at(n: int, argv: list[str]) -> int:
    """Run ``mipp argv`` in a forked copy of this process (no second torch import) with
    MIPP_TEST_KILL_AFTER=n; its exit code, or -SIGKILL when the hook fired."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            torch.set_num_threads(1)  # as DataLoader workers do: no thread pool after fork
            os.environ[mio.KILL_AFTER_ENV] = str(n)
            code = main(argv)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    assert rc in (0, -signal.SIGKILL), rc
    return rc


def _check_complete_run(d: Path) -> float:
    """``d`` holds one complete prune run; its requested sparsity."""
    assert sorted(p.name for p in d.iterdir()) == RUN_FILES  # no stale or temporary file
    ckpt = load_checkpoint(d / "model.safetensors")  # SHA-256 matches the sidecar
    report = json.loads((d / "report.json").read_text())
    metrics = json.loads((d / "metrics.json").read_text())
    config = json.loads((d / "config.json").read_text())
    assert ckpt.meta["params"] == report["params_after"]
    assert ckpt.meta["extra"]["pruned"]["requested"] == report["requested"]
    assert metrics["requested"] == report["requested"] == config["prune"]["sparsity"]
    assert ckpt.meta["pruning"][-1]["removed"] == {
        g["name"]: g["removed"] for g in report["groups"] if g["removed"]
    }
    return report["requested"]


def test_sigkill_at_every_write_point_of_prune_leaves_the_old_run_or_the_new(base, tmp_path):
    out = tmp_path / "out"
    assert main(_prune_argv(base / "model.safetensors", out, 0.3)) == 0
    seen = []
    for n in range(1, 20):  # 5 files, then the swap; the run that is not killed ends it
        rc = _kill_at(n, _prune_argv(base / "model.safetensors", out, 0.5, "--force"))
        seen.append(_check_complete_run(out))
        if rc == 0:
            break
        # a killed build may leave its hidden temporary sibling; the next run deletes it
        assert all(name.startswith(".out.tmp-") for name in _hidden_siblings(out))
    assert seen == [0.3] * 5 + [0.5, 0.5]  # old until the swap, then new
    assert _hidden_siblings(out) == []  # the last run cleaned up after the killed ones


#: imports mipp._io without mipp/__init__ (and torch): a fresh process in a blink
LIGHT_IMPORT = f"""
import sys, types
pkg = types.ModuleType("mipp")
pkg.__path__ = [{str(Path(mio.__file__).parent)!r}]
sys.modules["mipp"] = pkg
"""

SCRIPT = (
    LIGHT_IMPORT
    + """
import mipp._io as mio
if {fallback}:
    mio._exchange = lambda a, b: False
with mio.run_directory({out!r}, force=True) as tmp:
    mio.write_json(tmp / "a.json", "new")
    mio.write_json(tmp / "b.json", "new")
"""
)


@pytest.mark.parametrize("fallback", [False, True])
def test_sigkill_at_every_point_of_the_swap(tmp_path, fallback):
    """Two files, then the swap: one exchange, or (fallback) two renames; only between the
    two renames is the directory missing, and the next run_directory puts the old one back."""
    d = tmp_path / "run"
    points = 4 if fallback else 3
    for n in range(1, points + 2):
        shutil.rmtree(d, ignore_errors=True)
        with run_directory(d) as tmp:
            write_json(tmp / "a.json", "old")
        code = SCRIPT.format(fallback=fallback, out=str(d))
        env = {**ENV, mio.KILL_AFTER_ENV: str(n)}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
        assert proc.returncode == (0 if n > points else -signal.SIGKILL), proc.stderr.decode()
        if fallback and n == 3:  # killed between the renames: the documented window
            assert not d.exists()
            run_directory(d, force=True)  # the next command puts the old run back
        files = {p.name: read_json(p) for p in d.iterdir()}
        assert files in ({"a.json": "old"}, {"a.json": "new", "b.json": "new"})
        assert files["a.json"] == ("old" if n < points else "new")
        run_directory(d, force=True)  # the next command cleans up what the kill left
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ----------------------------------------------------------------------------- permissions


def test_files_and_run_directories_respect_the_umask(base, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(_prune_argv(base / "model.safetensors", tmp_path / "out", 0.5)) == 0
        os.umask(0o027)
        mio.atomic_write_bytes(tmp_path / "g.txt", b"x")
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    assert stat.S_IMODE((tmp_path / "g.txt").stat().st_mode) == 0o640


# ----------------------------------------------------------------------------- checkpoint bytes


def test_saving_the_same_state_twice_gives_identical_bytes(tmp_path):
    spec = ModelSpec("mlp", in_channels=1, input_size=4, widths=(5, 3))
    torch.manual_seed(0)
    model = build_model(spec)
    blobs = set()
    for i in range(8):  # safetensors' metadata order used to vary from save to save
        p = save_checkpoint(tmp_path / f"{i}" / "m.safetensors", model, spec=spec)
        blobs.add(p.read_bytes())
        assert load_checkpoint(p).spec == spec
    assert len(blobs) == 1
    blob = blobs.pop()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    assert n % 8 == 0 and list(header["__metadata__"]) == ["format", "model"]


# ----------------------------------------------------------------------------- sweep lock

SWEEP = """
name = "lock-tiny"
[grid]
models = ["mlp"]
datasets = ["synthetic"]
regimes = ["pat"]
methods = ["mipp"]
sparsities = [0.5]
seeds = [0]
"""


def test_a_second_sweep_on_a_locked_directory_fails_at_once(tmp_path, capsys):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(SWEEP)
    out = tmp_path / "sweep"
    with lock_directory(out, what="sweep directory"):
        assert main(["sweep", str(cfg), "--out", str(out)]) == 2
        err = _one_line_error(capsys)
        assert f"sweep directory {out} is in use by another mipp process" in err
        with pytest.raises(DirectoryLockedError), lock_directory(out):
            pass
    assert sorted(p.name for p in out.iterdir()) == [mio.LOCK_NAME]  # nothing else written


def test_the_lock_goes_with_a_killed_process(tmp_path):
    out = tmp_path / "sweep"
    code = LIGHT_IMPORT + textwrap.dedent(f"""
        import time
        from mipp._io import lock_directory
        with lock_directory({str(out)!r}):
            print("locked", flush=True)
            time.sleep(300)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"locked"
        locked = pytest.raises(DirectoryLockedError, match="in use by another mipp process")
        with locked, lock_directory(out):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    with lock_directory(out):  # free again
        pass


# ----------------------------------------------------------------------------- vector data


def test_train_mlp_on_the_synthetic_vectors(tmp_path, capsys):
    out = tmp_path / "syn"
    argv = ["train", "--model", "mlp", "--widths", "16,8", "--dataset", "synthetic"]
    argv += ["--epochs", "1", "--latency-repeats", "0", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    ckpt = load_checkpoint(out / "model.safetensors")
    assert (ckpt.spec.in_channels, ckpt.spec.input_size) == (32, 1)  # 32 features
    assert ckpt.meta["extra"]["test_top1"] > 0.5  # separable clusters: far above chance
    capsys.readouterr()
    argv = ["train", "--model", "lenet5", "--dataset", "synthetic", "--out", str(tmp_path / "l")]
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert "dataset 'synthetic' holds vectors; it takes --model mlp, not 'lenet5'" in err


def test_prune_exclude_and_no_verify_flags_reach_the_report(base, tmp_path):
    """``--exclude LAYER`` keeps that layer's group whole (absent from the report, recorded in
    its options); ``--no-verify`` is recorded and noted as unverified; by default neither."""
    ckpt = base / "model.safetensors"
    assert main(_prune_argv(ckpt, tmp_path / "plain", 0.5)) == 0
    plain = json.loads((tmp_path / "plain" / "report.json").read_text())
    names = [g["name"] for g in plain["groups"]]
    assert len(names) == 2 and "exclude" not in plain["options"]
    assert "verify" not in plain["options"]
    assert not any(n.startswith("unverified") for n in plain["notes"])
    kept = names[0]
    argv = _prune_argv(ckpt, tmp_path / "ex", 0.3, "--exclude", kept, "--no-verify")
    assert main(argv) == 0
    rep = json.loads((tmp_path / "ex" / "report.json").read_text())
    assert [g["name"] for g in rep["groups"]] == [n for n in names if n != kept]
    assert rep["options"]["exclude"] == [kept] and rep["options"]["verify"] is False
    assert any(n.startswith("unverified") for n in rep["notes"])
    pruned = dict(load_checkpoint(tmp_path / "ex" / "model.safetensors").model.named_modules())
    original = dict(load_checkpoint(ckpt).model.named_modules())
    assert pruned[kept].weight.shape[0] == original[kept].weight.shape[0]  # its units all kept
    other = next(n for n in names if n != kept)
    assert pruned[other].weight.shape[0] < original[other].weight.shape[0]


def test_the_working_directory_or_a_parent_is_never_a_run_directory(tmp_path, monkeypatch):
    """``--out .`` (or a parent of the working directory) would delete the user's files on
    replacement: refused even with --force, nothing touched."""
    work = tmp_path / "project" / "sub"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in (".", "..", str(tmp_path)):
        with pytest.raises(RunDirectoryError, match="working directory"):
            run_directory(out, force=True)
    assert (work / "notes.txt").read_text() == "mine"
