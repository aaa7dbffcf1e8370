"""Sweep configurations: a TOML file under ``experiments/`` → a checked, resolved grid.

A config names a grid (model × dataset × regime × method × sparsity × seed) and the protocol
every run of the grid shares::

    name = "lenet5-fmnist"
    description = "LeNet-5 on Fashion-MNIST, after training (PaT) and at initialisation (PaI)"

    [grid]
    models = ["lenet5"]
    datasets = ["fashion-mnist"]
    regimes = ["pat", "pai"]          # pruning after training / at initialisation
    methods = ["mipp", "l1", "snip"]  # labels: a method name or a [methods.<label>] variant
    sparsities = [0.5, 0.7, 0.9]      # requested share of units removed
    seeds = [0, 1, 2]

    [data]                            # pad_to_32, channels, train_subset, test_subset
    [prune]                           # target, calib_samples, reference, tolerance, batch_size
    [train]                           # the base training recipe (a TrainConfig); PaI re-uses it
    [finetune]                        # PaT re-training: a TrainConfig with epochs, or fraction
                                      # (of train.epochs) instead of epochs
    [folders.imagenet]                # a folder dataset (imagenet, tinyimagenet): root, size,
                                      # resize, workers (see FOLDER_KEYS)
    [models.vgg11]                    # constructor options per model, e.g. widths = [...], or
                                      # weights = "<file>": the PaT base (no base training)
    [methods.mipp-gaussian]           # a variant: method = "mipp", estimator = "gaussian"

    [profiles.quick]                  # deep-merged over the above by --profile quick
    grid.seeds = [0]
    data.train_subset = 10000

A ``[methods.<label>]`` variant names a registered ``method`` and sets two kinds of keys:
pipeline keys (:data:`PIPELINE_KEYS`: ``calib_samples``, ``compensate``, ``recalibrate_bn``,
arguments of :func:`mipp.prune`) and the method's own options (MIPP's ``estimator``,
``pool``, ``order``, ``min_keep``; a baseline's ``allocation``, ``rounds`` ..., also
accepted inside an ``options`` table). The method options are checked by the method
registry (:func:`mipp.methods.make_method`), which builds the method when the config is
resolved, and every method is asked whether it can prune the grid's sparsities
(:meth:`~mipp.methods.base.Method.check`), so a variant that cannot run fails here, before
anything is trained.

Every table is checked: unknown keys, names and out-of-range values raise
:class:`~mipp.errors.MippError` naming the value, where it is, and what would be valid.
"""

from __future__ import annotations

import copy
import itertools
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mipp.errors import MippError
from mipp.methods import (
    METHOD_NAMES,
    MIPP,
    NOT_IMPLEMENTED,
    TARGETS,
    Budget,
    Method,
    make_method,
)
from mipp.zoo import data as mdata
from mipp.zoo import models
from mipp.zoo.config import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "FOLDER_KEYS",
    "PIPELINE_KEYS",
    "REGIMES",
    "Run",
    "SweepSpec",
    "Variant",
    "load_spec",
    "resolve",
]

REGIMES = ("pat", "pai")
#: keys of a [methods.<label>] variant that are :func:`mipp.prune` arguments, not method options
PIPELINE_KEYS = ("calib_samples", "compensate", "recalibrate_bn")
DEFAULTS: dict[str, Any] = {
    "name": None,
    "description": "",
    "grid": {"regimes": ["pat"], "seeds": [0]},
    "data": {"pad_to_32": False, "channels": None, "train_subset": 0, "test_subset": 0},
    "prune": {
        "target": "units",
        "calib_samples": 2048,
        "reference": "mipp",
        "tolerance": 0.01,
        "batch_size": 256,
        "scope": "internal",
    },
    "train": {},
    "finetune": {"lr": 0.01, "schedule": "step"},
    "folders": {},
    "models": {},
    "methods": {},
}
#: keys of a ``[folders.<name>]`` table: where the tree is (``root``; default
#: ``$MIPP_DATA/<name>``; ``$VARS`` and ``~`` expanded), the image ``size`` and ``resize`` of
#: the evaluation transform (defaults: the dataset's own, round(size / 0.875)), and how many
#: ``workers`` processes decode images (0: the run's own process)
FOLDER_KEYS = ("root", "size", "resize", "workers")
GRID_KEYS = ("models", "datasets", "regimes", "methods", "sparsities", "seeds")


@dataclass(frozen=True)
class Run:
    """One cell of the grid."""

    model: str
    dataset: str
    regime: str
    method: str  # the label in grid.methods
    sparsity: float
    seed: int

    @property
    def run_id(self) -> str:
        """Directory name of the run, e.g. ``lenet5-fashion-mnist-pat-l1-0.70-seed0``."""
        return (
            f"{self.model}-{self.dataset}-{self.regime}-{self.method}-"
            f"{self.sparsity:.2f}-seed{self.seed}"
        )


@dataclass(frozen=True)
class Variant:
    """A grid label resolved: the registered method ``name``, its ``options`` (the keys
    :func:`~mipp.methods.make_method` takes) and the ``pipeline`` keys it sets itself
    (a subset of :data:`PIPELINE_KEYS`)."""

    label: str
    name: str
    options: Mapping[str, Any]
    pipeline: Mapping[str, Any]

    def build(self) -> Method:
        """A fresh method object with the variant's options."""
        return make_method(self.name, **self.options)


@dataclass(frozen=True)
class SweepSpec:
    """A resolved config (profile applied, defaults filled in, every value checked)."""

    name: str  # config name + profile, e.g. "lenet5-fmnist-quick"
    config_name: str
    profile: str | None
    path: str | None
    config: dict[str, Any]  # the resolved tables (no profiles)
    variants: Mapping[str, Variant]  # every label of grid.methods, resolved

    @property
    def grid(self) -> dict[str, list]:
        return self.config["grid"]

    def variant(self, label: str) -> dict[str, Any]:
        """The ``[methods.<label>]`` table as written (``{"method": label}`` for a plain
        method name): what a run's ``config.json`` records as ``method_options``."""
        return dict(self.config["methods"].get(label, {"method": label}))

    def method(self, label: str) -> tuple[Method, dict[str, Any]]:
        """``(method, pipeline)`` of a grid label: a fresh method object with the variant's
        options, and the :func:`mipp.prune` keywords its runs use (``target``,
        ``calib_samples``, ``tolerance``, ``batch_size``, ``scope``, ``compensate``,
        ``recalibrate_bn``: the ``[prune]`` table, overridden by the variant's own keys)."""
        v = self.variants[label]
        p = self.config["prune"]
        pipeline = {
            "target": p["target"],
            "calib_samples": p["calib_samples"],
            "tolerance": p["tolerance"],
            "batch_size": p["batch_size"],
            "scope": p["scope"],
            # None: the method's own default repairs (mipp.prune; MIPP reconstructs)
            "compensate": None,
            "recalibrate_bn": None,
            **v.pipeline,
        }
        return v.build(), pipeline

    def is_mipp(self, label: str) -> bool:
        """Whether the label's method is MIPP (any variant of it)."""
        return self.variants[label].name == MIPP.name

    @property
    def reference(self) -> str | None:
        """The label whose achieved sparsity the other (non-MIPP) methods match."""
        return self.config["prune"]["reference"]

    def reference_for(self, label: str) -> str | None:
        """The label whose report the runs of ``label`` match (``match=``), or None when they
        prune to the requested sparsity themselves: MIPP runs, and every run of a sweep
        without a reference."""
        if self.reference is None or self.is_mipp(label):
            return None
        return self.reference

    def runs(self) -> list[Run]:
        """Every run in execution order: per (model, dataset, seed, regime, sparsity), the
        reference first (the others need its achieved sparsity), then the grid's order."""
        g = self.grid
        labels = list(g["methods"])
        if self.reference in labels:
            labels.remove(self.reference)
            labels.insert(0, self.reference)
        out = []
        for model, dataset, seed, regime, s in itertools.product(
            g["models"], g["datasets"], g["seeds"], g["regimes"], g["sparsities"]
        ):
            out += [Run(model, dataset, regime, m, float(s), int(seed)) for m in labels]
        return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _unknown(table: Mapping[str, Any], valid, where: str) -> None:
    bad = sorted(set(table) - set(valid))
    if bad:
        raise MippError(f"unknown key(s) {bad} in {where}; valid keys: {sorted(valid)}")


def _list(cfg: Mapping[str, Any], key: str) -> list:
    value = cfg["grid"].get(key)
    if not isinstance(value, list) or not value:
        raise MippError(f"grid.{key} must be a non-empty list, got {value!r}")
    nested = [v for v in value if isinstance(v, list | dict)]
    if nested:
        raise MippError(f"grid.{key} must list names or numbers, not {nested[0]!r}")
    if len(set(map(str, value))) != len(value):
        raise MippError(f"grid.{key} lists a value twice: {value!r}")
    return value


def _check_train(table: Mapping[str, Any], where: str, *, drop: tuple[str, ...] = ()) -> None:
    rest = {k: v for k, v in table.items() if k not in drop}
    try:
        TrainConfig.from_dict(rest)
    except (TypeError, ValueError) as e:
        raise MippError(f"[{where}]: {e}") from None


def resolve(
    raw: Mapping[str, Any], *, profile: str | None = None, path: str | None = None
) -> SweepSpec:
    """Check a parsed config, apply ``profile`` and fill in defaults → :class:`SweepSpec`."""
    where = path or "the config"
    _unknown(raw, [*DEFAULTS, "profiles"], f"{where} (top level)")
    profiles = raw.get("profiles", {})
    if not isinstance(profiles, Mapping):
        raise MippError(f"[profiles] in {where} must be a table of tables")
    body = {k: v for k, v in raw.items() if k != "profiles"}
    if profile is not None:
        if profile not in profiles:
            raise MippError(
                f"profile {profile!r} is not in {where}; its profiles: {sorted(profiles) or 'none'}"
            )
        _unknown(profiles[profile], DEFAULTS, f"[profiles.{profile}] of {where}")
        over = profiles[profile]
        ft_over = over.get("finetune", {}) if isinstance(over.get("finetune"), Mapping) else {}
        if isinstance(body.get("finetune"), Mapping):
            # a profile's fine-tuning budget replaces the body's, whichever way it is given
            for given, other in (("epochs", "fraction"), ("fraction", "epochs")):
                if given in ft_over:
                    body = {
                        **body,
                        "finetune": {k: v for k, v in body["finetune"].items() if k != other},
                    }
        body = _merge(body, over)
    cfg = _merge(DEFAULTS, body)
    for key, default in DEFAULTS.items():
        if isinstance(default, dict) and not isinstance(cfg[key], Mapping):
            raise MippError(f"[{key}] in {where} must be a table, got {cfg[key]!r}")
    if "epochs" not in cfg["finetune"]:
        cfg["finetune"].setdefault("fraction", 0.67)
    name = cfg["name"]
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise MippError(f"name in {where} must be letters, digits, '-' or '_', got {name!r}")

    _unknown(cfg["grid"], GRID_KEYS, f"[grid] of {where}")
    for key in GRID_KEYS:
        _list(cfg, key)
    g = cfg["grid"]
    for m in g["models"]:
        if m not in models.list_models():
            raise MippError(f"grid.models: unknown model {m!r}; valid: {models.list_models()}")
    known = [*mdata.list_datasets(), *mdata.FOLDER_DATASETS]
    for d in g["datasets"]:
        if d not in known:
            raise MippError(f"grid.datasets: unknown dataset {d!r}; valid: {known}")
    for r in g["regimes"]:
        if r not in REGIMES:
            raise MippError(f"grid.regimes: unknown regime {r!r}; valid: {list(REGIMES)}")
    for s in g["sparsities"]:
        if isinstance(s, bool) or not isinstance(s, int | float) or not 0 < s < 1:
            raise MippError(f"grid.sparsities: {s!r} is not a share strictly between 0 and 1")
    for s in g["seeds"]:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise MippError(f"grid.seeds: {s!r} is not an integer >= 0")

    _unknown(cfg["data"], DEFAULTS["data"], f"[data] of {where}")
    if cfg["data"]["channels"] not in (None, 1, 3):
        raise MippError(f"data.channels must be 1 or 3, got {cfg['data']['channels']!r}")
    for key in ("train_subset", "test_subset"):
        v = cfg["data"][key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise MippError(f"data.{key} must be an integer >= 0 (0 = all), got {v!r}")

    _unknown(cfg["prune"], DEFAULTS["prune"], f"[prune] of {where}")
    p = cfg["prune"]
    if p["reference"] == "":
        p["reference"] = None
    if p["target"] not in TARGETS:
        raise MippError(f"prune.target must be units, params, macs or latency, got {p['target']!r}")
    for key in ("calib_samples", "batch_size"):
        if isinstance(p[key], bool) or not isinstance(p[key], int) or p[key] < 1:
            raise MippError(f"prune.{key} must be an integer >= 1, got {p[key]!r}")

    _check_train(cfg["train"], "train")
    ft = cfg["finetune"]
    if "epochs" in ft and "fraction" in ft:
        raise MippError(
            "give finetune.epochs (a fixed budget) or finetune.fraction (of train.epochs), not both"
        )
    if "fraction" in ft:
        fraction = ft["fraction"]
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not fraction > 0:
            raise MippError(f"finetune.fraction must be > 0 (of train.epochs), got {fraction!r}")
    _check_train(ft, "finetune", drop=("fraction",))

    _check_folders(cfg["folders"])
    for m, opts in cfg["models"].items():
        if m not in models.list_models():
            raise MippError(f"[models.{m}]: unknown model; valid: {models.list_models()}")
        _unknown(opts, ("widths", "weights"), f"[models.{m}]")
        if "weights" in opts and not isinstance(opts["weights"], str):
            raise MippError(
                f'models.{m}.weights must be a path to a weights file (or "" for none), '
                f"got {opts['weights']!r}"
            )
        if opts.get("weights") == "":  # a profile's way of saying: train the base instead
            del opts["weights"]

    variants = {
        label: _variant(label, table, cfg["prune"]) for label, table in cfg["methods"].items()
    }
    for label in g["methods"]:
        if label not in cfg["methods"] and label in NOT_IMPLEMENTED:
            raise MippError(f"grid.methods: {label!r}: {NOT_IMPLEMENTED[label]}")
        if label not in cfg["methods"] and label not in METHOD_NAMES:
            raise MippError(
                f"grid.methods: {label!r} is neither a method ({', '.join(METHOD_NAMES)}) nor "
                f"a variant defined as [methods.{label}]"
            )
        if "/" in label or label.startswith("."):
            raise MippError(f"grid.methods: {label!r} cannot name a directory")
        variants.setdefault(label, Variant(label, label, {}, {}))

    spec = SweepSpec(
        name=f"{name}-{profile}" if profile else name,
        config_name=name,
        profile=profile,
        path=path,
        config=cfg,
        variants={label: variants[label] for label in g["methods"]},
    )
    ref = p["reference"]
    if ref is not None:
        if ref not in g["methods"]:
            raise MippError(
                f"prune.reference {ref!r} is not in grid.methods {g['methods']}; list it or set "
                f'reference = "" to let every method prune to the requested sparsity itself'
            )
        if not spec.is_mipp(ref):
            raise MippError(f"prune.reference {ref!r} must be a mipp run (it sets the sparsity)")
    for label in g["methods"]:
        _check_budgets(spec, label)
    return spec


def _check_folders(folders: Mapping[str, Any]) -> None:
    for name, table in folders.items():
        where = f"[folders.{name}]"
        if name not in mdata.FOLDER_DATASETS:
            raise MippError(f"{where}: not a folder dataset; valid: {list(mdata.FOLDER_DATASETS)}")
        if not isinstance(table, Mapping):
            raise MippError(f"{where} must be a table with keys among {list(FOLDER_KEYS)}")
        _unknown(table, FOLDER_KEYS, where)
        if "root" in table and (not isinstance(table["root"], str) or not table["root"]):
            raise MippError(f"folders.{name}.root must be a folder path, got {table['root']!r}")
        size = table.get("size", mdata.FOLDER_DATASETS[name].size)
        for key, low in (("size", 8), ("resize", size), ("workers", 0)):
            v = table.get(key, low)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise MippError(f"folders.{name}.{key} must be an integer >= {low}, got {v!r}")


def _variant(label: str, table: Any, prune: Mapping[str, Any]) -> Variant:
    """Split a ``[methods.<label>]`` table into pipeline keys and method options and build
    the method once, so that a bad option fails now with the registry's message."""
    where = f"[methods.{label}]"
    if not isinstance(table, Mapping):
        raise MippError(f"{where} must be a table with at least method = NAME")
    name = table.get("method")
    if isinstance(name, str) and name in NOT_IMPLEMENTED:
        raise MippError(f"{where}.method {name!r}: {NOT_IMPLEMENTED[name]}")
    if name not in METHOD_NAMES:
        raise MippError(f"{where}.method must be one of {list(METHOD_NAMES)}, got {name!r}")
    shared = sorted(k for k in table if k in prune and k not in PIPELINE_KEYS)
    if shared:
        raise MippError(
            f"{where}: {shared} set(s) how every method of the sweep prunes; set it in [prune], "
            f"not per variant (a variant may set method, {', '.join(PIPELINE_KEYS)}, options "
            f"and the method's own options)"
        )
    extra = table.get("options", {})
    if not isinstance(extra, Mapping):
        raise MippError(f"{where}.options must be a table of the method's options, got {extra!r}")
    options = {k: v for k, v in table.items() if k not in ("method", "options", *PIPELINE_KEYS)}
    twice = sorted(set(options) & set(extra))
    if twice:
        raise MippError(f"{where}: {twice} given both as key(s) and in options; give each once")
    options.update(extra)
    pipeline = {k: table[k] for k in PIPELINE_KEYS if k in table}
    calib = pipeline.get("calib_samples", 1)
    if isinstance(calib, bool) or not isinstance(calib, int) or calib < 1:
        raise MippError(f"{where}.calib_samples must be an integer >= 1, got {calib!r}")
    for key in ("compensate", "recalibrate_bn"):
        if not isinstance(pipeline.get(key, False), bool):
            raise MippError(f"{where}.{key} must be true or false, got {pipeline[key]!r}")
    variant = Variant(label, name, options, pipeline)
    try:
        variant.build()
    except (TypeError, ValueError) as e:
        raise MippError(f"{where}: {e}") from None
    return variant


def _check_budgets(spec: SweepSpec, label: str) -> None:
    """Ask the label's method whether it can prune each sparsity of the grid the way the
    sweep will ask it to (a request of its own, or matching the reference run)."""
    method, pipeline = spec.method(label)
    matched = spec.reference_for(label) is not None
    for s in spec.grid["sparsities"]:
        budget = Budget(
            sparsity=float(s),
            target=pipeline["target"],
            tolerance=pipeline["tolerance"],
            widths={} if matched else None,  # the reference's widths, known at run time
        )
        try:
            method.check(budget)
        except ValueError as e:
            hint = ""
            if spec.reference is None:
                hint = "; no run is matched in this sweep: prune.reference is unset"
            raise MippError(
                f"[methods.{label}] cannot prune {pipeline['target']} sparsity {s} in this "
                f"sweep: {e}{hint}"
            ) from None


def load_spec(path: str | Path, *, profile: str | None = None) -> SweepSpec:
    """Read and resolve the TOML config at ``path`` (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise MippError(f"sweep config {path} not found")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MippError(f"{path} is not valid TOML: {e}") from None
    return resolve(raw, profile=profile, path=str(path))


def finetune_epochs(cfg: Mapping[str, Any]) -> int:
    """PaT re-training epochs: ``finetune.epochs`` when given (a fixed budget), else
    ``fraction × train.epochs``, rounded, at least 1."""
    if "epochs" in cfg["finetune"]:
        return int(cfg["finetune"]["epochs"])
    base = TrainConfig.from_dict(cfg["train"]).epochs
    return max(1, math.floor(cfg["finetune"]["fraction"] * base + 0.5))
