"""Prunable unit groups of a network and their physical removal, via Torch-Pruning.

A *unit* is an output neuron of a Linear layer or an output channel of a Conv layer.
Torch-Pruning's ``DependencyGraph`` couples units that must go together: a channel produced
by several layers and summed by residual additions is one unit of one *group*. For each
group we record

- ``producers``: the Conv/Linear layers whose output channels are the group's units;
- ``consumers``: the Conv/Linear layers that read them, with, for every unit, the indices of
  the consumer's input that belong to it (one channel for a conv; the flattened map of a
  channel, e.g. 25 values, for a Linear after ``flatten``);
- ``kind``: ``"internal"`` (one producer: a plain layer or a residual block's inner conv) or
  ``"stream"`` (several producers tied by additions: a residual stream).

Groups are returned from the output towards the input (reverse topological order of their
first producer). :meth:`ModelStructure.remove` deletes units physically with explicit
indices through ``DG.get_pruning_group(layer, fn, idxs).prune()``; the record of what was
removed is ours, not Torch-Pruning's history (docs/METHOD.md §9).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch_pruning as tp
from torch import nn

from mipp.errors import MippError
from mipp.modules import eval_mode
from mipp.surgery.capture import count_calls, record_forward_order

__all__ = [
    "Consumer",
    "ModelStructure",
    "ReusedModuleError",
    "Scope",
    "UnitGroup",
    "UnsupportedModuleError",
    "build_structure",
]

Scope = Literal["internal", "all"]
SCOPES = ("internal", "all")

_UNIT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


class UnsupportedModuleError(MippError, TypeError):
    """The model holds a module mipp cannot prune around; the message names it and its type."""


class ReusedModuleError(UnsupportedModuleError):
    """A Conv/Linear/BatchNorm module runs more than once in one forward (a shared layer);
    the message names it, its call count and how to exclude it."""


@dataclass(frozen=True)
class Consumer:
    """A layer reading a group's units: ``index[j]`` are its input indices for unit j."""

    layer: str
    index: tuple[tuple[int, ...], ...]


@dataclass
class UnitGroup:
    """One prunable group of coupled units (see the module docstring)."""

    name: str
    size: int
    producers: list[str]
    consumers: list[Consumer]
    norms: list[str]
    kind: Literal["internal", "stream"]
    position: int = 0
    #: producer name → its output index of each unit (identity for plain layers)
    producer_index: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def root(self) -> str:
        """The layer Torch-Pruning roots the group at (its first producer in forward order)."""
        return self.producers[0]


@dataclass
class ModelStructure:
    """Groups of a model (output → input), its output layer and graph facts pruning needs."""

    model: nn.Module
    graph: tp.DependencyGraph
    groups: list[UnitGroup]
    output_layer: str
    order: list[str]
    #: layer → Conv/Linear layers first reached from its output (empty for the output layer)
    next_layers: dict[str, list[str]]
    #: layer → (group name, consumer record) for each group whose units it reads
    readers: dict[str, list[tuple[str, Consumer]]]
    example_shape: tuple[int, ...]
    #: Conv/Linear/BatchNorm layer → how often it ran in one forward (more than 1: reused)
    calls: dict[str, int] = field(default_factory=dict)

    @property
    def reused(self) -> dict[str, int]:
        """Layers called more than once in one forward (a shared module), with their count."""
        return {name: n for name, n in self.calls.items() if n > 1}

    def touching(self, layers: Sequence[str] | set[str]) -> set[str]:
        """Names of the groups that ``layers`` produce, read or normalise (keeping all of
        them whole leaves those layers with their exact shapes)."""
        wanted = set(layers)
        return {
            g.name
            for g in self.groups
            if wanted & ({*g.producers, *g.norms} | {c.layer for c in g.consumers})
        }

    def group(self, name: str) -> UnitGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def in_scope(self, scope: Scope) -> list[UnitGroup]:
        """Groups pruned under ``scope`` (``"internal"``: single-producer groups only)."""
        return [g for g in self.groups if scope == "all" or g.kind == "internal"]

    def remove(self, removed: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
        """Physically delete units: ``removed[group name]`` are unit indices of that group.

        Every group keeps at least one unit (an empty removal is skipped). Returns what was
        removed, sorted, per group.
        """
        modules = dict(self.model.named_modules())
        done: dict[str, list[int]] = {}
        for g in self.groups:
            units = sorted({int(i) for i in removed.get(g.name, ())})
            if not units:
                continue
            if units[0] < 0 or units[-1] >= g.size:
                raise ValueError(
                    f"unit index out of range for group {g.name!r} of {g.size} units: {units}"
                )
            if len(units) >= g.size:
                raise ValueError(f"refusing to remove all {g.size} units of group {g.name!r}")
            root = modules[g.root]
            fn = self.graph.get_pruner_of_module(root).prune_out_channels
            idxs = sorted(g.producer_index[g.root][j] for j in units)
            self.graph.get_pruning_group(root, fn, idxs=idxs).prune(record_history=False)
            done[g.name] = units
        return done

    def mask(self, masked: Mapping[str, Sequence[int]]) -> None:
        """Silence units in place without changing shapes: ``masked[group name]`` unit indices.

        Every tensor Torch-Pruning would slice for those units is zeroed instead: the
        producers' weight rows and biases, the BatchNorm scale and shift (so the normalised
        output is exactly 0) and the consumers' input columns. A masked unit's output carries
        no information and, with both sides zero, gradients leave it at zero. All units of a
        group may be masked (a collapsed layer).
        """
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for g in self.groups:
                units = sorted({int(i) for i in masked.get(g.name, ())})
                if not units:
                    continue
                if units[0] < 0 or units[-1] >= g.size:
                    raise ValueError(
                        f"unit index out of range for group {g.name!r} of {g.size} units: {units}"
                    )
                root = modules[g.root]
                fn = self.graph.get_pruner_of_module(root).prune_out_channels
                idxs = sorted(g.producer_index[g.root][j] for j in units)
                for dep, ix in self.graph.get_pruning_group(root, fn, idxs=idxs):
                    _zero(
                        dep.target.module,
                        list(ix),
                        out=self.graph.is_out_channel_pruning_fn(dep.handler),
                    )


def _zero(module: nn.Module, idxs: list[int], *, out: bool) -> None:
    if isinstance(module, _NORMS):
        if module.affine:
            module.weight[idxs] = 0
            module.bias[idxs] = 0
    elif isinstance(module, _UNIT_LAYERS):
        if out:
            module.weight[idxs] = 0
            if module.bias is not None:
                module.bias[idxs] = 0
        else:
            module.weight[:, idxs] = 0


def _check_modules(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d) and m.groups != 1:
            raise UnsupportedModuleError(
                f"module {name!r} ({type(m).__name__}, groups={m.groups}): grouped and "
                f"depthwise convolutions are not supported yet"
            )
        if isinstance(m, nn.Conv3d | nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d):
            raise UnsupportedModuleError(f"module {name!r} ({type(m).__name__}) is not supported")
        own = list(m.parameters(recurse=False))
        if own and not isinstance(m, _UNIT_LAYERS + _NORMS):
            raise UnsupportedModuleError(
                f"module {name!r} ({type(m).__name__}) has parameters but is not a Conv1d/"
                f"Conv2d, Linear or BatchNorm1d/2d layer; mipp cannot prune around it"
            )


def _next_layers(
    graph: tp.DependencyGraph, layers: Mapping[nn.Module, str]
) -> dict[str, list[str]]:
    """For each unit layer: the unit layers reading the first tensor derived from its output.

    The walk follows the output through BatchNorm, activations, pooling, reshapes and
    additions, and stops at the first tensor some unit layer reads (a residual block's
    output, not every later block that the stream also reaches).
    """

    def unit(node) -> str | None:
        m = node.module
        return layers.get(m) if isinstance(m, nn.Module) else None

    result: dict[str, list[str]] = {}
    for module, name in layers.items():
        start = graph.module2node[module]
        found: list[str] = []
        seen = {start}
        stack = [start]
        while stack:
            node = stack.pop()
            direct = [unit(o) for o in node.outputs if unit(o) is not None]
            if direct and node is not start:
                found.extend(d for d in direct if d not in found)
                continue
            for o in node.outputs:
                if o not in seen and unit(o) is None:
                    seen.add(o)
                    stack.append(o)
            if node is start:
                found.extend(d for d in direct if d not in found)
        result[name] = found
    return result


def _width(module: nn.Module, *, out: bool) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features if out else module.in_features
    return module.out_channels if out else module.in_channels


def _check_mapping(
    groups: list[UnitGroup],
    readers: Mapping[str, list[tuple[str, Consumer]]],
    modules: Mapping[str, nn.Module],
) -> None:
    """Refuse a channel mapping Torch-Pruning got wrong (instead of mis-pruning silently)."""
    for g in groups:
        for p, index in g.producer_index.items():
            if sorted(index) != list(range(_width(modules[p], out=True))):
                raise UnsupportedModuleError(
                    f"cannot map the output channels of {p!r} ({type(modules[p]).__name__}, "
                    f"{_width(modules[p], out=True)} channels) to the unit group "
                    f"{g.name!r} of {g.size} units; this happens with concatenations followed "
                    f"by a flatten of spatial maps, which Torch-Pruning does not map correctly"
                )
    for layer, entries in readers.items():
        taken = sorted(i for _, c in entries for ix in c.index for i in ix)
        if len(taken) != len(set(taken)) or (
            taken and taken[-1] >= _width(modules[layer], out=False)
        ):
            raise UnsupportedModuleError(
                f"the inputs of {layer!r} ({type(modules[layer]).__name__}) map to units "
                f"inconsistently (duplicate or out-of-range input indices)"
            )


def build_structure(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    output_layer: nn.Module | None = None,
) -> ModelStructure:
    """Find the prunable unit groups of ``model`` (which is traced, not modified).

    Args:
        model: a network of Conv1d/Conv2d, Linear, BatchNorm, activations, pooling, reshapes
            and residual additions / concatenations.
        example_input: one input batch ``(n, *input_shape)``, used for tracing.
        output_layer: the layer producing the network output (never pruned). Default: the
            last Conv/Linear layer to run.

    Raises:
        UnsupportedModuleError: a module mipp cannot handle (named, with its type).
    """
    _check_modules(model)
    names = {m: n for n, m in model.named_modules() if isinstance(m, _UNIT_LAYERS)}
    if not names:
        raise UnsupportedModuleError(
            f"{type(model).__name__} has no Conv1d/Conv2d/Linear layers to prune"
        )
    tracked = {n: m for n, m in model.named_modules() if isinstance(m, _UNIT_LAYERS + _NORMS)}
    with eval_mode(model):
        with (
            torch.no_grad(),
            record_forward_order({n: m for m, n in names.items()}) as order,
            count_calls(tracked) as calls,
        ):
            model(example_input)
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    if output_layer is None:
        out_name = order[-1]
    else:
        if output_layer not in names:
            raise MippError(f"output_layer {output_layer!r} is not a Conv/Linear of the model")
        out_name = names[output_layer]
    modules = dict(model.named_modules())
    position = {n: i for i, n in enumerate(order)}
    norm_names = {m: n for n, m in model.named_modules() if isinstance(m, _NORMS)}

    groups: list[UnitGroup] = []
    raw = graph.get_all_groups(
        ignored_layers=[modules[out_name]], root_module_types=[nn.Conv1d, nn.Conv2d, nn.Linear]
    )
    for tp_group in raw:
        producers: dict[str, tuple[int, ...]] = {}
        consumers: list[Consumer] = []
        norms: list[str] = []
        size = len(tp_group[0].root_idxs)
        for i, (dep, idxs) in enumerate(tp_group):
            module = dep.target.module
            root_idxs = tp_group[i].root_idxs
            if module in names and graph.is_out_channel_pruning_fn(dep.handler):
                index = [0] * size
                for idx, r in zip(idxs, root_idxs, strict=True):
                    index[r] = idx
                producers[names[module]] = tuple(index)
            elif module in names and graph.is_in_channel_pruning_fn(dep.handler):
                per_unit: list[list[int]] = [[] for _ in range(size)]
                for idx, r in zip(idxs, root_idxs, strict=True):
                    per_unit[r].append(int(idx))
                consumers.append(Consumer(names[module], tuple(tuple(u) for u in per_unit)))
            elif module in norm_names:
                norms.append(norm_names[module])
        ordered = sorted(producers, key=lambda n: position.get(n, math.inf))
        if not ordered or not consumers:
            continue
        groups.append(
            UnitGroup(
                name=ordered[0],
                size=size,
                producers=ordered,
                consumers=sorted(consumers, key=lambda c: position.get(c.layer, math.inf)),
                norms=norms,
                kind="internal" if len(ordered) == 1 else "stream",
                position=min(position.get(n, math.inf) for n in ordered),
                producer_index={n: producers[n] for n in ordered},
            )
        )
    groups.sort(key=lambda g: g.position, reverse=True)
    readers: dict[str, list[tuple[str, Consumer]]] = {}
    for g in groups:
        for c in g.consumers:
            readers.setdefault(c.layer, []).append((g.name, c))
    _check_mapping(groups, readers, modules)
    return ModelStructure(
        model=model,
        graph=graph,
        groups=groups,
        output_layer=out_name,
        order=list(order),
        next_layers=_next_layers(graph, names),
        readers=readers,
        example_shape=tuple(example_input.shape[1:]),
        calls=dict(calls),
    )
