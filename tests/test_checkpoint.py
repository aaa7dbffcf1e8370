"""Checkpoints: bit-exact round trips, atomic writes, and loud failures."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mipp.types import ModelSpec
from mipp.zoo import checkpoint as ckpt_mod
from mipp.zoo.checkpoint import (
    CheckpointError,
    build_model,
    load_checkpoint,
    save_checkpoint,
    sidecar_path,
    state_dicts_equal,
)
from mipp.zoo.training import seeded


def _perturbed(spec: ModelSpec, seed: int) -> torch.nn.Module:
    """A model whose weights and BN buffers all differ from a fresh build."""
    with seeded(seed):
        model = build_model(spec)
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.mul_(torch.rand_like(t) + 0.5)  # stays positive
            elif t.is_floating_point():
                t.add_(torch.randn_like(t))
            else:
                t.add_(3)
    return model


@pytest.mark.parametrize(
    "spec",
    [
        ModelSpec("lenet5", in_channels=1, input_size=28),
        ModelSpec("resnet20", num_classes=100),
        ModelSpec("vgg11", widths=(8, 16, 16, 16, 32, 32, 32, 32)),
    ],
    ids=["lenet5", "resnet20", "vgg11-narrow"],
)
def test_round_trip_is_bit_exact(tmp_path, spec):
    model = _perturbed(spec, seed=1)
    path = save_checkpoint(tmp_path / "m.safetensors", model, spec=spec, extra={"note": "x"})
    loaded = load_checkpoint(path)
    assert loaded.spec == spec
    assert state_dicts_equal(model.state_dict(), loaded.model.state_dict())
    assert loaded.meta["extra"] == {"note": "x"}
    assert loaded.meta["params"] == sum(p.numel() for p in model.parameters())
    assert not loaded.model.training
    x = torch.randn(2, spec.in_channels, spec.input_size, spec.input_size)
    model.eval()
    assert torch.equal(model(x), loaded.model(x))


def test_sidecar_records_architecture(tmp_path):
    spec = ModelSpec("lenet5", in_channels=1, input_size=32, widths=(4, 8, 30, 20))
    path = save_checkpoint(tmp_path / "m.safetensors", build_model(spec), spec=spec)
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["model"] == {
        "name": "lenet5",
        "num_classes": 10,
        "in_channels": 1,
        "input_size": 32,
        "widths": [4, 8, 30, 20],
    }
    assert list(meta["widths"].values()) == [4, 8, 30, 20, 10]


def test_interrupted_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    spec = ModelSpec("lenet5", in_channels=1, input_size=28)
    first = _perturbed(spec, seed=1)
    path = save_checkpoint(tmp_path / "m.safetensors", first, spec=spec)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(fd):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_mod.os, "fsync", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, _perturbed(spec, seed=2), spec=spec)
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # no temp files left, old files untouched
    assert state_dicts_equal(load_checkpoint(path).model.state_dict(), first.state_dict())


def test_weights_not_matching_sidecar_are_refused(tmp_path):
    spec = ModelSpec("lenet5", in_channels=1, input_size=28)
    a = save_checkpoint(tmp_path / "a.safetensors", _perturbed(spec, 1), spec=spec)
    b = save_checkpoint(tmp_path / "b.safetensors", _perturbed(spec, 2), spec=spec)
    os.replace(b, a)  # a's sidecar, b's weights
    with pytest.raises(CheckpointError, match="does not match its sidecar"):
        load_checkpoint(a)


def test_truncated_weights_are_refused(tmp_path):
    spec = ModelSpec("lenet5", in_channels=1, input_size=28)
    path = save_checkpoint(tmp_path / "m.safetensors", build_model(spec), spec=spec)
    meta = json.loads(sidecar_path(path).read_text())
    blob = path.read_bytes()[:100]
    path.write_bytes(blob)
    meta["sha256"] = __import__("hashlib").sha256(blob).hexdigest()
    sidecar_path(path).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_checkpoint(path)


def test_architecture_mismatch_is_refused(tmp_path):
    spec = ModelSpec("lenet5", in_channels=1, input_size=28)
    path = save_checkpoint(tmp_path / "m.safetensors", build_model(spec), spec=spec)
    meta = json.loads(sidecar_path(path).read_text())
    meta["model"]["widths"] = [4, 16, 120, 84]
    sidecar_path(path).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit a lenet5"):
        load_checkpoint(path)


def test_missing_files_and_bad_suffix(tmp_path):
    spec = ModelSpec("lenet5", in_channels=1, input_size=28)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    path = save_checkpoint(tmp_path / "m.safetensors", build_model(spec), spec=spec)
    sidecar_path(path).unlink()
    with pytest.raises(CheckpointError, match="sidecar"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match=r"must end in \.safetensors"):
        save_checkpoint(tmp_path / "m.pt", build_model(spec), spec=spec)


def test_non_json_extra_fails_before_anything_is_written(tmp_path):
    spec = ModelSpec("lenet5", in_channels=1, input_size=28)
    with pytest.raises(TypeError):
        save_checkpoint(
            tmp_path / "m.safetensors", build_model(spec), spec=spec, extra={"bad": object()}
        )
    assert list(tmp_path.iterdir()) == []
