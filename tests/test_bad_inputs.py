"""Property-based bad-input suite (issue 14): generated malformed reports, sidecars, sweep
configs, command-line option values and calibration inputs end in a
:class:`~mipp.errors.MippError` with a one-line message (or argparse's usage error, exit 2)
— never another exception type, and a failed command leaves no new files behind.

Example counts: the ``ci`` profile (25 examples per property, derandomised: the same
examples on every run) is the default; ``HYPOTHESIS_PROFILE=slow`` runs 400 random ones.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mipp
from mipp.cli import main
from mipp.errors import MippError
from mipp.experiments.spec import load_spec
from mipp.inputs import Samples
from mipp.report import PruneReport
from mipp.surgery.calibration import calibration_inputs
from mipp.surgery.replay import apply_report
from mipp.types import ModelSpec
from mipp.validation import check_labels, check_model_input
from mipp.zoo.checkpoint import build_model, load_checkpoint, save_checkpoint
from mipp.zoo.training import seeded

_COMMON = {
    "deadline": None,
    "database": None,  # no .hypothesis directory in the work tree
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
settings.register_profile("ci", max_examples=25, derandomize=True, **_COMMON)
settings.register_profile("slow", max_examples=400, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

MLP8 = ModelSpec("mlp", in_channels=1, input_size=8, widths=(12, 6))
DIGITS = {"name": "digits", "root": None, "pad_to_32": False, "channels": None}


def _assert_one_line(error: BaseException) -> None:
    assert isinstance(error, MippError), f"{type(error).__name__}: {error}"
    text = str(error)
    assert text and "\n" not in text and "\r" not in text, repr(text)


def _outcome(call: Callable[[], Any]) -> Any:
    """Run ``call``; a MippError must be one line (returned), anything else but success fails."""
    try:
        return call()
    except MippError as e:
        _assert_one_line(e)
        return e


# ----------------------------------------------------------------------------- JSON mutations

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**40), max_value=2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a nested JSON value (dict keys, list indices)."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(doc: Any, path: tuple, action: str, new: Any) -> Any:
    """A copy of ``doc`` with the value at ``path`` replaced (``set``), deleted (``drop``) or
    wrapped in a list (``wrap``)."""
    doc = json.loads(json.dumps(doc))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if action == "drop":
        del parent[key]
    elif action == "wrap":
        parent[key] = [parent[key], parent[key]]
    else:
        parent[key] = new
    return doc


@st.composite
def mutated(draw, base: Any, *, whole: bool = True) -> Any:
    """``base`` with one or two fields set to arbitrary JSON, dropped or doubled, or (``whole``)
    an arbitrary JSON value instead."""
    if whole and draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    doc = base
    for _ in range(draw(st.integers(1, 2))):
        paths = _paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["set", "set", "set", "drop", "wrap"]))
        doc = _mutate(doc, path, action, draw(json_values))
    return doc


def _report() -> PruneReport:
    with seeded(0):
        net = build_model(MLP8)
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return mipp.prune(net, x, method="l1", sparsity=0.5).report


REPORT = _report().to_dict()


def _fresh_mlp() -> torch.nn.Module:
    with seeded(0):
        return build_model(MLP8)


# ----------------------------------------------------------------------------- reports


@given(doc=mutated(REPORT))
def test_a_malformed_report_is_one_line(doc):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "report.json"
        path.write_text(json.dumps(doc))  # NaN / Infinity as JSON5-style tokens, as Python reads
        loaded = _outcome(lambda: PruneReport.load(path))
    direct = _outcome(lambda: PruneReport.from_dict(doc))
    assert isinstance(loaded, MippError) == isinstance(direct, MippError)
    if isinstance(direct, PruneReport):
        _outcome(direct.replay_record)
        direct.to_json()  # a report that loads can be written again


@given(doc=mutated({"groups": REPORT["groups"]}, whole=False))
def test_apply_report_of_a_malformed_group_is_one_line(doc):
    report = {**REPORT, **doc}
    _outcome(lambda: apply_report(_fresh_mlp(), report))


@given(record=mutated(PruneReport.from_dict(REPORT).replay_record()))
def test_a_malformed_replay_record_is_one_line(record):
    from mipp.report import check_replay_record

    _outcome(lambda: check_replay_record(record))


# ----------------------------------------------------------------------------- sidecars


def _sidecar_base() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        save_checkpoint(path, _fresh_mlp(), spec=MLP8, extra={"dataset": DIGITS})
        return json.loads(path.with_suffix(".json").read_text())


SIDECAR = _sidecar_base()
# a pruned checkpoint's sidecar: one replay record to mutate
SIDECAR_PRUNED = {**SIDECAR, "pruning": [PruneReport.from_dict(REPORT).replay_record()]}

# sidecar numbers stay small: a mutated but valid spec is built before its weights are refused
small_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 40) | st.floats(-2, 40) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def mutated_sidecar(draw) -> dict[str, Any]:
    base = draw(st.sampled_from([SIDECAR, SIDECAR_PRUNED]))
    doc = base
    for _ in range(draw(st.integers(1, 2))):
        path = draw(st.sampled_from(_paths(doc)))
        action = draw(st.sampled_from(["set", "set", "drop", "wrap"]))
        doc = _mutate(doc, path, action, draw(small_values))
    return doc


@given(meta=mutated_sidecar())
def test_a_malformed_sidecar_is_one_line(meta):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        save_checkpoint(path, _fresh_mlp(), spec=MLP8, extra={"dataset": DIGITS})
        if meta.get("pruning"):  # the weights of the pruned model, so a valid record loads
            pruned = _fresh_mlp()
            _outcome(lambda: apply_report(pruned, REPORT))
            save_checkpoint(path, pruned, spec=MLP8)
            meta = {**meta, "sha256": json.loads(path.with_suffix(".json").read_text())["sha256"]}
        path.with_suffix(".json").write_text(json.dumps(meta))
        before = sorted(Path(d).iterdir())
        _outcome(lambda: load_checkpoint(path))
        assert sorted(Path(d).iterdir()) == before


# ----------------------------------------------------------------------------- sweep configs


def _toml(value: Any) -> str:
    """A TOML inline value (strings as JSON basic strings, which TOML reads the same)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return (
            "nan"
            if math.isnan(value)
            else ("inf" if value > 0 else "-inf")
            if math.isinf(value)
            else repr(value)
        )
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items() if v is not None)
        return "{" + ", ".join(items) + "}"
    return '""'  # None has no TOML form


def _toml_doc(doc: dict[str, Any]) -> str:
    lines = [f"{json.dumps(k)} = {_toml(v)}" for k, v in doc.items() if v is not None]
    return "\n".join(lines) + "\n"


SWEEP = {
    "name": "t",
    "grid": {
        "models": ["mlp"],
        "datasets": ["digits"],
        "methods": ["l1"],
        "sparsities": [0.5],
        "seeds": [0],
    },
    "prune": {"calib_samples": 256, "reference": ""},
    "train": {"epochs": 1},
    "methods": {"l1-global": {"method": "l1", "allocation": "global"}},
}

toml_values = st.recursive(
    st.booleans() | st.integers(-5, 10**6) | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def sweep_texts(draw) -> str:
    doc = SWEEP
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        action = draw(st.sampled_from(["set", "set", "drop", "wrap"]))
        doc = _mutate(doc, path, action, draw(toml_values))
    text = _toml_doc(doc)
    if draw(st.integers(0, 5)) == 0:  # raw text damage: not even TOML
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=6)) + text[at:]
    return text


def test_the_base_sweep_config_is_valid():
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "sweep.toml"
        path.write_text(_toml_doc(SWEEP))
        assert len(load_spec(path).runs()) == 1


@given(text=sweep_texts())
def test_a_malformed_sweep_config_is_one_line(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "sweep.toml"
        path.write_text(text)
        spec = _outcome(lambda: load_spec(path))
        if not isinstance(spec, MippError):
            spec.runs()
        before = sorted(Path(d).rglob("*"))
        code = _cli(["sweep", str(path), "--dry-run", "--out", str(Path(d) / "out")])
        assert code in (0, 2)
        assert sorted(Path(d).rglob("*")) == before  # a dry run writes nothing


# ----------------------------------------------------------------------------- command line


def _cli(argv: list[str]) -> int:
    """``main(argv)`` in-process with MIPP_DEBUG=1, so that an error escapes as itself: a
    MippError must be one line, argparse's usage error exits 2, nothing else may escape."""
    old = os.environ.get("MIPP_DEBUG")
    os.environ["MIPP_DEBUG"] = "1"
    try:
        return main(argv)
    except SystemExit as e:
        assert e.code == 2, f"exit {e.code}"
        return 2
    except MippError as e:
        _assert_one_line(e)
        return 2
    finally:
        if old is None:
            os.environ.pop("MIPP_DEBUG", None)
        else:
            os.environ["MIPP_DEBUG"] = old


option_text = (
    st.integers(-10, 10).map(str)
    | st.floats(-2, 2).map(repr)
    | st.sampled_from(["nan", "inf", "-inf"])
    | st.sampled_from(["", "x", "1e9", "-0", "0x10", "cuda", "cuda:7", "foo", "mean", "7,x"])
    | st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=6)
)

PRUNE_FLAGS = (
    "--sparsity",
    "--seed",
    "--calib-samples",
    "--latency-batch",
    "--tolerance",
    "--pool",
    "--target",
    "--scope",
    "--min-keep",
    "--option",
)


@given(
    flags=st.lists(st.tuples(st.sampled_from(PRUNE_FLAGS), option_text), min_size=1, max_size=3),
    method=st.sampled_from(["l1", "mipp", "snip", "random"]),
)
def test_prune_option_values_end_in_one_line_or_usage(flags, method):
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d) / "c" / "model.safetensors"
        save_checkpoint(ckpt, _fresh_mlp(), spec=MLP8, extra={"dataset": DIGITS})
        argv = ["prune", str(ckpt), "--method", method, "--no-eval", "--no-progress"]
        argv += ["--out", str(Path(d) / "out")]
        if not any(f == "--sparsity" for f, _ in flags):
            argv += ["--sparsity", "0.5"]
        for flag, value in flags:
            argv += [f"{flag}={value}"]
        before = sorted(Path(d).rglob("*"))
        if _cli(argv) != 0:
            assert sorted(Path(d).rglob("*")) == before


TRAIN_FLAGS = (
    "--seed",
    "--val-fraction",
    "--latency-repeats",
    "--device",
    "--epochs",
    "--batch-size",
    "--widths",
    "--channels",
    "--lr",
    "--momentum",
    "--weight-decay",
)


@given(flags=st.lists(st.tuples(st.sampled_from(TRAIN_FLAGS), option_text), min_size=1, max_size=3))
def test_train_option_values_end_in_one_line_or_usage(flags):
    with tempfile.TemporaryDirectory() as d:
        argv = ["train", "--model", "mlp", "--dataset", "digits", "--out", str(Path(d) / "out")]
        argv += ["--epochs", "1", "--widths", "8", "--latency-repeats", "0", "--no-progress"]
        for flag, value in flags:
            if flag in ("--epochs", "--widths") and re.fullmatch(r"-?[0-9]+", value):
                value = str(min(int(value), 2))  # keep a run that is valid short
            argv += [f"{flag}={value}"]
        before = sorted(Path(d).rglob("*"))
        if _cli(argv) != 0:
            assert sorted(Path(d).rglob("*")) == before


@given(
    command=st.sampled_from(["eval", "compare", "info"]),
    flags=st.lists(
        st.tuples(
            st.sampled_from(["--device", "--latency-repeats", "--split", "--dataset"]),
            option_text,
        ),
        max_size=2,
    ),
)
def test_other_commands_option_values_end_in_one_line_or_usage(command, flags):
    valid = {
        "eval": ("--device", "--split", "--dataset"),
        "compare": ("--latency-repeats",),
        "info": (),
    }[command]
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d) / "c" / "model.safetensors"
        save_checkpoint(ckpt, _fresh_mlp(), spec=MLP8, extra={"dataset": DIGITS})
        argv = [command, str(ckpt)]
        for flag, value in flags:
            if flag in valid:
                if flag == "--latency-repeats" and re.fullmatch(r"-?[0-9]+", value):
                    value = str(min(int(value), 1))
                argv += [f"{flag}={value}"]
        before = sorted(Path(d).rglob("*"))
        _cli(argv)
        assert sorted(Path(d).rglob("*")) == before  # these commands never write


# ----------------------------------------------------------------------------- calibration data

dtypes = st.sampled_from(
    [torch.float32, torch.float64, torch.uint8, torch.int64, torch.bool, torch.complex64]
)
shapes = st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple)


@st.composite
def arrays(draw) -> Any:
    shape = draw(shapes)
    dtype = draw(dtypes)
    special = draw(st.sampled_from(["random", "zeros", "nan", "big"]))
    if dtype.is_complex:
        x = torch.randn(shape, dtype=dtype)
    elif dtype.is_floating_point:
        x = torch.randn(shape, dtype=dtype)
        if special == "nan" and x.numel():
            x.view(-1)[0] = math.nan
        if special == "big":
            x = x * 1e30
    elif dtype == torch.bool:
        x = torch.rand(shape) > 0.5
    else:
        x = torch.randint(0, 256, shape).to(dtype)
    if special == "zeros":
        x = torch.zeros_like(x)
    return x.numpy() if draw(st.booleans()) and not dtype.is_complex else x


labels = st.one_of(
    st.integers(-3, 12),
    st.floats(-1, 12),
    st.none(),
    st.text(max_size=2),
    arrays(),
)


calib_data = st.recursive(
    arrays() | st.none() | st.integers() | st.text(max_size=4),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, labels),
        st.lists(st.tuples(arrays(), labels), max_size=5),
        st.dictionaries(st.text(max_size=3), inner, max_size=2),
    ),
    max_leaves=6,
)


@given(data=calib_data, n=st.integers(1, 40))
def test_any_calibration_input_is_accepted_or_one_line(data, n):
    """calibration_inputs, then what the pipeline checks before any work (the input shape
    probe on the model and the labels a loss needs): a result or one MippError line."""
    out = _outcome(lambda: calibration_inputs(data, n, seed=0))
    if isinstance(out, MippError):
        return
    x, y = out
    samples = Samples(x)  # a tensor, or a dict / tuple of tensors sharing the batch dimension
    if isinstance(x, torch.Tensor):
        assert x.is_floating_point() and x.ndim >= 2
    else:
        assert any(t.ndim >= 2 for t in samples.tensors)
    assert 1 <= len(samples) <= n
    assert y is None or len(y) == len(samples)
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)
    )
    classes = _outcome(lambda: check_model_input(net, x))
    if isinstance(classes, int):
        _outcome(lambda: check_labels(y, classes, n=len(x), method="snip"))


@given(data=calib_data, method=st.sampled_from(["l1", "snip", "mipp"]))
def test_prune_on_any_calibration_input_is_a_result_or_one_line(data, method):
    """The whole pipeline (``mipp.prune``) on the same generated inputs: a pruned model whose
    layers are all still there, or one MippError line — never another exception."""
    with seeded(0):
        net = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
        )
    out = _outcome(lambda: mipp.prune(net, data, method=method, sparsity=0.5, calib_samples=40))
    if not isinstance(out, MippError):
        assert all(g.width_after >= 1 for g in out.report.groups)


@pytest.mark.parametrize("form", ["tensor", "numpy", "pairs", "batches"])
def test_the_generated_forms_include_valid_calibration_sets(form):
    """The property above is not vacuous: each documented form does give a calibration set."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 6, generator=gen), torch.arange(20) % 3
    data = {
        "tensor": x,
        "numpy": (x.numpy(), y.numpy()),
        "pairs": list(zip(x, y, strict=True)),
        "batches": [(x[:10], y[:10]), (x[10:], y[10:])],
    }[form]
    xs, _ = calibration_inputs(data, 20, seed=0)
    assert torch.equal(xs.sort(0).values, x.sort(0).values)
    assert np.isfinite(xs.numpy()).all()
