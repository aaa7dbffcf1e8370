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
    [finetune]                        # PaT re-training: a TrainConfig without epochs + fraction
    [models.vgg11]                    # constructor options per model, e.g. widths = [...]
    [methods.mipp-gaussian]           # a variant: method = "mipp", estimator = "gaussian"

    [profiles.quick]                  # deep-merged over the above by --profile quick
    grid.seeds = [0]
    data.train_subset = 10000

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

from mipp import data as mdata
from mipp import models
from mipp.baselines import METHOD_NAMES
from mipp.config import TrainConfig
from mipp.errors import MippError
from mipp.estimators import ESTIMATORS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["REGIMES", "Run", "SweepSpec", "load_spec", "resolve"]

REGIMES = ("pat", "pai")
#: what a [methods.<label>] variant may set, besides ``method``
VARIANT_KEYS = (
    "estimator",
    "pool",
    "order",
    "calib_samples",
    "allocation",
    "min_keep",
    "compensate",
    "recalibrate_bn",
    "options",
)
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
    "finetune": {"fraction": 0.67, "lr": 0.01, "schedule": "step"},
    "models": {},
    "methods": {},
}
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
class SweepSpec:
    """A resolved config (profile applied, defaults filled in, every value checked)."""

    name: str  # config name + profile, e.g. "lenet5-fmnist-quick"
    config_name: str
    profile: str | None
    path: str | None
    config: dict[str, Any]  # the resolved tables (no profiles)

    @property
    def grid(self) -> dict[str, list]:
        return self.config["grid"]

    def method(self, label: str) -> dict[str, Any]:
        """``{"method": name, **options}`` of a grid label."""
        return dict(self.config["methods"].get(label, {"method": label}))

    @property
    def reference(self) -> str | None:
        """The label whose achieved sparsity the other (non-MIPP) methods match."""
        return self.config["prune"]["reference"]

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
        body = _merge(body, profiles[profile])
    cfg = _merge(DEFAULTS, body)
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
    for d in g["datasets"]:
        if d not in mdata.list_datasets():
            raise MippError(f"grid.datasets: unknown dataset {d!r}; valid: {mdata.list_datasets()}")
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
    if p["target"] not in ("units", "params", "macs"):
        raise MippError(f"prune.target must be units, params or macs, got {p['target']!r}")
    for key in ("calib_samples", "batch_size"):
        if isinstance(p[key], bool) or not isinstance(p[key], int) or p[key] < 1:
            raise MippError(f"prune.{key} must be an integer >= 1, got {p[key]!r}")

    _check_train(cfg["train"], "train")
    fraction = cfg["finetune"].get("fraction")
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not fraction > 0:
        raise MippError(f"finetune.fraction must be > 0 (of train.epochs), got {fraction!r}")
    if "epochs" in cfg["finetune"]:
        raise MippError("finetune.epochs is set by finetune.fraction × train.epochs; remove it")
    _check_train(cfg["finetune"], "finetune", drop=("fraction",))

    for m, opts in cfg["models"].items():
        if m not in models.list_models():
            raise MippError(f"[models.{m}]: unknown model; valid: {models.list_models()}")
        _unknown(opts, ("widths",), f"[models.{m}]")

    for label, v in cfg["methods"].items():
        _unknown(v, ("method", *VARIANT_KEYS), f"[methods.{label}]")
        if v.get("method") not in METHOD_NAMES:
            raise MippError(
                f"[methods.{label}].method must be one of {list(METHOD_NAMES)}, "
                f"got {v.get('method')!r}"
            )
        if v["method"] == "mipp":
            bad = [k for k in ("allocation", "options") if k in v]
            if bad:
                raise MippError(f"[methods.{label}]: {bad} apply to baselines, not mipp")
            if "estimator" in v and v["estimator"] not in ESTIMATORS:
                raise MippError(
                    f"[methods.{label}].estimator: {v['estimator']!r}; valid: {sorted(ESTIMATORS)}"
                )
        else:
            bad = [k for k in ("estimator", "pool", "order", "min_keep") if k in v]
            if bad:
                raise MippError(f"[methods.{label}]: {bad} apply to mipp only")
    for label in g["methods"]:
        if label not in cfg["methods"] and label not in METHOD_NAMES:
            raise MippError(
                f"grid.methods: {label!r} is neither a method ({', '.join(METHOD_NAMES)}) nor "
                f"a variant defined as [methods.{label}]"
            )
        if "/" in label or label.startswith("."):
            raise MippError(f"grid.methods: {label!r} cannot name a directory")

    spec = SweepSpec(
        name=f"{name}-{profile}" if profile else name,
        config_name=name,
        profile=profile,
        path=path,
        config=cfg,
    )
    ref = p["reference"]
    if ref is not None:
        if ref not in g["methods"]:
            raise MippError(
                f"prune.reference {ref!r} is not in grid.methods {g['methods']}; list it or set "
                f'reference = "" to let every method prune to the requested sparsity itself'
            )
        if spec.method(ref)["method"] != "mipp":
            raise MippError(f"prune.reference {ref!r} must be a mipp run (it sets the sparsity)")
    for label in g["methods"]:
        if spec.method(label).get("allocation") == "widths" and ref is None:
            raise MippError(f"[methods.{label}] allocation 'widths' needs prune.reference")
    return spec


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
    """PaT re-training epochs: ``fraction × train.epochs``, rounded, at least 1."""
    base = TrainConfig.from_dict(cfg["train"]).epochs
    return max(1, math.floor(cfg["finetune"]["fraction"] * base + 0.5))
