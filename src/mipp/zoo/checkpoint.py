"""Checkpoints: weights in safetensors plus a JSON sidecar describing the architecture.

``save_checkpoint("run/model.safetensors", model, spec=...)`` writes two files:

- ``run/model.safetensors``: the state dict (tensors only, no pickle);
- ``run/model.json``: format version, the :class:`~mipp.types.ModelSpec` (model name and
  constructor arguments), per-layer widths, parameter count, the SHA-256 of the weights file
  and free-form ``extra`` metadata (training config, metrics, later the prune report).

Both files are written to a temporary name in the same directory, flushed to disk, and then
renamed into place, so an interrupted save never leaves a half-written checkpoint; the
sidecar's checksum catches a weights file that does not belong to its sidecar. The weights
file's bytes depend only on the tensors (its header is written in one canonical order), so
saving the same state dict twice gives the same file and the same checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from mipp._io import atomic_write_bytes
from mipp.errors import MippError
from mipp.metrics import count_params, layer_widths
from mipp.report import ReportError, check_replay_record
from mipp.surgery.replay import apply_report
from mipp.types import ModelSpec
from mipp.zoo import models

__all__ = [
    "FORMAT",
    "Checkpoint",
    "CheckpointError",
    "build_model",
    "load_checkpoint",
    "save_checkpoint",
    "sidecar_path",
]

FORMAT = "mipp-checkpoint"
VERSION = 1


class CheckpointError(MippError):
    """A checkpoint is missing, corrupt, or does not match its sidecar."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model (weights loaded, eval mode) and its sidecar."""

    model: nn.Module
    spec: ModelSpec
    meta: dict[str, Any]


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """The JSON sidecar that belongs to a weights file: same name, ``.json`` suffix."""
    return Path(path).with_suffix(".json")


def build_model(spec: ModelSpec) -> nn.Module:
    """Construct the (untrained) zoo model that ``spec`` describes."""
    return models.create(
        spec.name,
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        input_size=spec.input_size,
        widths=spec.widths,
    )


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    spec: ModelSpec,
    extra: Mapping[str, Any] | None = None,
    pruning: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Save ``model``'s weights to ``path`` (.safetensors) and its sidecar; return ``path``.

    ``extra`` must be JSON-serialisable; it is stored under ``"extra"`` in the sidecar.
    ``pruning`` lists the replay records (:meth:`~mipp.report.PruneReport.replay_record`) of
    the pruning runs applied to the model built from ``spec``, in order; loading replays them
    before the weights are loaded.

    >>> import tempfile, pathlib
    >>> from mipp.types import ModelSpec
    >>> spec = ModelSpec("lenet5", in_channels=1, input_size=28)
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> p = save_checkpoint(d / "m.safetensors", build_model(spec), spec=spec)
    >>> load_checkpoint(p).spec == spec
    True
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {str(path)!r}")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    blob = _canonical(st_save(tensors, metadata={"format": FORMAT, "model": spec.name}))
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "weights": path.name,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "model": spec.to_dict(),
        "widths": layer_widths(model),
        "params": count_params(model),
        "pruning": [dict(r) for r in pruning],
        "extra": dict(extra) if extra is not None else {},
    }
    text = json.dumps(meta, indent=2, sort_keys=False) + "\n"  # fails early if not JSON-able
    atomic_write_bytes(path, blob)
    atomic_write_bytes(sidecar_path(path), text.encode())
    return path


def _canonical(blob: bytes) -> bytes:
    """``blob`` (a safetensors file) with its header in one canonical form, so that the same
    tensors always give the same bytes (and the sidecar's SHA-256 is reproducible).

    safetensors writes the ``__metadata__`` entries in hash-map order, which changes from
    one save to the next. The header is re-encoded here: ``__metadata__`` first with its keys
    sorted, then the tensor entries in the order safetensors wrote them (their data offsets
    are relative to the end of the header, so they stay valid), compact JSON padded with
    spaces to a multiple of 8 bytes, as safetensors pads it.
    """
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    out: dict[str, Any] = {}
    if "__metadata__" in header:
        out["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
    out.update(header)
    text = json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + n :]


def read_sidecar(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check the JSON sidecar of the checkpoint at ``path``."""
    side = sidecar_path(path)
    if not side.is_file():
        raise CheckpointError(
            f"checkpoint sidecar {side} not found (it is written next to the "
            f".safetensors file by `mipp train` / save_checkpoint)"
        )
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint sidecar {side} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{side} is not a mipp checkpoint sidecar (format field missing)")
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"{side} has checkpoint format version {meta.get('version')!r}; "
            f"this mipp reads version {VERSION}"
        )
    _check_sidecar(meta, side)
    return meta


def _short(value: Any) -> str:
    text = " ".join(json.dumps(value, default=str).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _check_sidecar(meta: dict[str, Any], side: Path) -> None:
    """The fields loading reads have the right types: ``model`` (the spec), ``pruning`` (a
    list of replay records), ``extra`` (an object; its ``dataset`` an object with a string
    ``name``), ``sha256``. Raises :class:`CheckpointError` naming the field."""

    def bad(field: str, want: str, value: Any) -> CheckpointError:
        return CheckpointError(f"{side}: field {field!r} must be {want}, got {_short(value)}")

    if not isinstance(meta.get("sha256"), str):
        raise bad("sha256", "the weights' SHA-256 as a string", meta.get("sha256"))
    model = meta.get("model")
    if not isinstance(model, dict):
        raise bad("model", "an object (the model spec: name, num_classes, ...)", model)
    if not isinstance(model.get("name"), str):
        raise bad("model.name", "a model name", model.get("name"))
    for key in ("num_classes", "in_channels", "input_size"):
        v = model.get(key)
        if key in model and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise bad(f"model.{key}", "an integer >= 1", v)
    w = model.get("widths")
    if w is not None and (
        not isinstance(w, list)
        or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in w)
    ):
        raise bad("model.widths", "null or a list of integers >= 1", w)
    pruning = meta.get("pruning", [])
    if not isinstance(pruning, list):
        raise bad("pruning", "a list of replay records", pruning)
    for j, record in enumerate(pruning):
        try:
            check_replay_record(record, where=f"{side}: pruning[{j}]")
        except ReportError as e:
            raise CheckpointError(str(e)) from None
    extra = meta.get("extra", {})
    if not isinstance(extra, dict):
        raise bad("extra", "an object", extra)
    dataset = extra.get("dataset", {})
    if not isinstance(dataset, dict):
        raise bad("extra.dataset", "an object (name, root, pad_to_32, channels)", dataset)
    for key, ok, want in (
        ("name", lambda v: isinstance(v, str) and v, "a dataset name"),
        ("root", lambda v: isinstance(v, str), "a directory or null"),
        ("pad_to_32", lambda v: isinstance(v, bool), "true or false"),
        ("channels", lambda v: v in (1, 3) and not isinstance(v, bool), "1, 3 or null"),
    ):
        if dataset.get(key) is not None and not ok(dataset[key]):
            raise bad(f"extra.dataset.{key}", want, dataset[key])


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Rebuild the model described by the sidecar and load the weights into it (strict).

    Raises :class:`CheckpointError` if either file is missing, the weights do not match the
    sidecar's checksum, or the rebuilt architecture does not fit the stored weights.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    meta = read_sidecar(path)
    blob = path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != meta.get("sha256"):
        raise CheckpointError(
            f"{path} does not match its sidecar {sidecar_path(path).name} (SHA-256 {digest[:12]}… "
            f"vs {str(meta.get('sha256'))[:12]}…): the weights file was changed or replaced"
        )
    try:
        spec = ModelSpec.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{sidecar_path(path)} has a bad model description: {e}") from None
    try:
        tensors = st_load(blob)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from None
    try:
        model = build_model(spec)
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"{sidecar_path(path)} has a bad model description: {' '.join(str(e).split())}"
        ) from None
    for record in meta.get("pruning", []):
        apply_report(model, record)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(
            f"weights in {path} do not fit a {spec.name} built from its sidecar: "
            f"{' '.join(line.strip() for line in first[:3])}"
        ) from None
    model.eval()
    return Checkpoint(model=model, spec=spec, meta=meta)


def state_dicts_equal(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """True when two state dicts hold the same keys and bit-identical tensors."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )
