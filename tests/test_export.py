"""ONNX export (mipp.export_onnx, `mipp export`) and onnxruntime latency in `mipp compare`."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from torch import nn

import mipp
from mipp.cli import main
from mipp.export import (
    INSTALL_HINT,
    OnnxMismatchError,
    OnnxUnavailableError,
    export_onnx,
    onnx_available,
    to_onnx,
)
from mipp.types import ModelSpec
from mipp.zoo.checkpoint import load_checkpoint, save_checkpoint
from mipp.zoo.data import load_dataset

needs_onnx = pytest.mark.skipif(
    not onnx_available(),
    reason=f"onnx, onnxruntime and onnxscript are not installed ({INSTALL_HINT})",
)

LENET = ModelSpec("lenet5", in_channels=1, input_size=28)


@pytest.fixture(scope="module")
def pruned_lenet(tmp_path_factory):
    """A LeNet-5 with half its units removed by MIPP, saved as a checkpoint (replay record in
    the sidecar); returns the checkpoint path."""
    with mipp.seeded(0):
        net = mipp.create_model("lenet5", in_channels=1, input_size=28)
    x = torch.randn(400, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    result = mipp.prune(net, x, sparsity=0.5)
    path = tmp_path_factory.mktemp("pruned") / "model.safetensors"
    save_checkpoint(path, result.model, spec=LENET, pruning=[result.report.replay_record()])
    return path


def _ort_outputs(path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@needs_onnx
def test_pruned_lenet5_exports_with_equal_outputs_and_a_dynamic_batch(pruned_lenet, tmp_path):
    import onnx
    import onnxruntime as ort

    model = load_checkpoint(pruned_lenet).model
    assert mipp.count_params(model) < 61_706  # really pruned
    out = tmp_path / "lenet5.onnx"
    exported = export_onnx(model, torch.randn(4, 1, 28, 28), out)
    assert out.read_bytes() == exported.data and exported.check.passed
    assert exported.check.batch_sizes == (1, 3, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["lenet5.onnx"]  # no temporary left
    # an independent run of the written file: any batch size, PyTorch's outputs to 1e-4
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 1, 28, 28]
    g = torch.Generator().manual_seed(5)
    for batch in (1, 5, 17):
        x = torch.randn(batch, 1, 28, 28, generator=g)
        with torch.no_grad():
            ref = model(x)
        got = torch.from_numpy(_ort_outputs(out, x))
        assert got.shape == ref.shape
        assert (got - ref).abs().max() <= 1e-5 + 1e-4 * ref.abs().max()
    # the graph holds the pruned weights (a Linear's possibly transposed for MatMul)
    shapes = {tuple(t.dims) for t in onnx.load(str(out)).graph.initializer}
    for name, w in model.named_parameters():
        if w.ndim >= 2:
            assert tuple(w.shape) in shapes or tuple(w.shape)[::-1] in shapes, name


class _Noisy(nn.Module):
    """A model whose ONNX export cannot match PyTorch: fresh random noise per call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + torch.rand_like(self.fc(x))


@needs_onnx
def test_a_mismatch_is_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "noisy.onnx"
    with pytest.raises(OnnxMismatchError, match=r"differ from PyTorch's: max \|onnx - torch\|"):
        export_onnx(_Noisy(), torch.randn(2, 4), out)
    assert list(tmp_path.iterdir()) == []


@needs_onnx
def test_model_and_mode_are_left_as_they_were():
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)).train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    exported = to_onnx(net, torch.randn(8, 4))  # exported and checked in eval mode
    assert exported.check.passed and exported.input_shape == (4,)
    assert all(m.training for m in net.modules())
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    # the OnnxModule runs the same model (eval mode) as a module
    x = torch.randn(6, 4)
    with torch.no_grad():
        ref = net.eval()(x)
    assert torch.allclose(exported.module()(x), ref, rtol=1e-4, atol=1e-5)


def test_missing_onnxruntime_is_one_line_naming_the_extra(monkeypatch, tmp_path, pruned_lenet):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxruntime" else real(name, *a),
    )
    with pytest.raises(OnnxUnavailableError, match=r"onnxruntime.*pip install 'mipp\[onnx\]'"):
        to_onnx(nn.Linear(2, 2), torch.randn(2, 2))
    out = tmp_path / "m.onnx"
    assert main(["export", str(pruned_lenet), "--out", str(out)]) == 2
    assert not out.exists()


def test_missing_onnxruntime_cli_message(monkeypatch, tmp_path, pruned_lenet, capsys):
    monkeypatch.setattr("mipp.cli.export.onnx_available", lambda: False)
    assert main(["export", str(pruned_lenet), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'mipp[onnx]'" in err


@needs_onnx
def test_cli_export_writes_and_refuses_an_existing_out_without_force(
    pruned_lenet, tmp_path, capsys
):
    out = tmp_path / "lenet5.onnx"
    assert main(["export", str(pruned_lenet), "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out.stat().st_size == result["bytes"] > 0
    assert result["input_shape"] == [1, 28, 28] and result["opset"] == 20
    assert result["max_abs_diff"] <= result["atol"] + result["rtol"] * result["max_abs_reference"]
    model = load_checkpoint(pruned_lenet).model  # the CLI rebuilt the pruned model
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert np.allclose(_ort_outputs(out, x), model(x).numpy(), rtol=1e-4, atol=1e-5)

    before = out.read_bytes()
    out.write_bytes(b"not a model")  # whatever is there must survive a refusal
    assert main(["export", str(pruned_lenet), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"mipp: error: {out} exists; pass --force to replace it\n"
    assert out.read_bytes() == b"not a model"
    assert main(["export", str(pruned_lenet), "--out", str(out), "--force"]) == 0
    assert out.read_bytes() == before  # same model, same seed: the same bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet5.onnx"]


def test_cli_export_refuses_bad_out_paths(pruned_lenet, tmp_path, capsys):
    for out, needle in (
        (tmp_path / "m.json", "must be a file name ending in .onnx"),
        (tmp_path, "must be a file name ending in .onnx"),
    ):
        assert main(["export", str(pruned_lenet), "--out", str(out), "--force"]) == 2
        assert needle in capsys.readouterr().err
    folder = tmp_path / "dir.onnx"
    folder.mkdir()
    assert main(["export", str(pruned_lenet), "--out", str(folder), "--force"]) == 2
    assert "is a directory" in capsys.readouterr().err


# --- mipp compare ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_checkpoints(tmp_path_factory):
    """An MLP on scikit-learn's bundled 8x8 digits and a MIPP-pruned copy, as checkpoints."""
    spec = ModelSpec("mlp", in_channels=1, input_size=8, widths=(32, 16))
    with mipp.seeded(0):
        net = mipp.create_model("mlp", in_channels=1, input_size=8, widths=(32, 16))
    train = load_dataset("digits", split="train")
    pruned = mipp.prune(net, train.x[:600], sparsity=0.5)
    root = tmp_path_factory.mktemp("digits")
    extra = {"dataset": {"name": "digits"}}
    base = save_checkpoint(root / "base" / "model.safetensors", net, spec=spec, extra=extra)
    small = save_checkpoint(
        root / "pruned" / "model.safetensors",
        pruned.model,
        spec=spec,
        extra=extra,
        pruning=[pruned.report.replay_record()],
    )
    return str(base), str(small)


@needs_onnx
def test_compare_times_onnxruntime_beside_pytorch(digit_checkpoints, capsys):
    argv = ["compare", *digit_checkpoints, "--latency-repeats", "2", "--json"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = json.loads(out.strip().splitlines()[-1])
    for row in rows:
        assert set(row["latency_ms"]) == set(row["onnxruntime_latency_ms"]) == {"1", "64"}
        assert all(v > 0 for v in row["onnxruntime_latency_ms"].values())
    assert "onnxruntime b1 (median)" in out and "onnxruntime b64 (median)" in out
    assert main([*argv, "--no-onnxruntime"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime" not in out
    assert all("onnxruntime_latency_ms" not in r for r in json.loads(out.splitlines()[-1]))


def test_compare_leaves_onnxruntime_out_silently_when_absent(
    digit_checkpoints, monkeypatch, capsys
):
    monkeypatch.setattr("mipp.cli.compare.onnx_available", lambda: False)
    argv = ["compare", *digit_checkpoints, "--latency-repeats", "1", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out.strip().splitlines()[-1])
    assert all("onnxruntime_latency_ms" not in r and "latency_ms" in r for r in rows)
    assert "onnxruntime" not in captured.out and captured.err == ""
    assert main([*argv, "--onnxruntime"]) == 2  # asked for explicitly: refused, one line
    assert "pip install 'mipp[onnx]'" in capsys.readouterr().err
