"""Prunable unit groups of a network and their physical removal, via Torch-Pruning.

A *unit* is an output neuron of a Linear layer or an output channel of a Conv layer.
Torch-Pruning's ``DependencyGraph`` couples units that must go together: a channel produced
by several layers and summed by residual additions is one unit of one *group*. For each
group we record

- ``producers``: the Conv/Linear layers whose output channels are the group's units;
- ``consumers``: the Conv/Linear layers that read them, with, for every unit, the indices of
  the consumer's input that belong to it (one channel for a conv; the flattened map of a
  channel, e.g. 25 values, for a Linear after ``flatten``);
- ``kind``: ``"internal"`` (one producer: a plain layer or a residual block's inner conv),
  ``"stream"`` (several producers tied by additions: a residual stream) or ``"heads"``
  (attention heads, below);
- ``channelwise``: depthwise convolutions (``groups == in_channels == out_channels``) the
  group's channels pass through. A depthwise conv maps channel c to channel c only, so it is
  neither a producer nor a consumer: it loses the unit's filter with the unit, like a
  BatchNorm, and what the consumers read is its output.

Grouped convolutions (``1 < groups``, not depthwise) are pruned with the per-group width kept
equal: output channel (or input channel) p of every one of the conv's ``groups`` blocks is
tied into one unit, so each unit of such a group is ``groups`` channels (the lcm of the
groups of every grouped layer touching the group) and a removal takes the same position out
of every block. The group count never changes; a group whose channels cannot be tied into
equal units is refused.

Attention heads: query, key and value projections are tied by the attention products into
one group with several producers. When they are Linear children of one module that says its
head size (an int attribute ``attention_head_size``, as Hugging Face's attention modules, or
``head_dim``), the group's units are its heads — ``head size`` consecutive channels of every
projection and of the output projection's input — its kind is ``"heads"`` (pruned under
scope "internal") and a removal updates the module's head-count attributes
(``num_attention_heads`` / ``num_heads``, ``all_head_size`` / ``attn_dim``). A single fused
projection (timm's ``qkv``, three times as wide as the output projection's input) is one
producer whose head h is the same slice of each third. The forward must size its reshapes
from the projections' outputs (``view(..., -1, head_size)``, as Hugging Face's do) or from
those attributes (as timm's do); the verification refuses a removal that breaks it.

Readers of a concatenation through their own BatchNorm (a DenseNet layer: ``cat`` →
``norm1`` → ReLU → ``conv1``, every layer of a block re-normalising the same earlier
channels) are listed in :attr:`ModelStructure.read_through`: MIPP describes a unit there by
its value in the concatenation (the BatchNorm's input), once for all such readers, instead of
once per reader (each reader's BatchNorm is a per-channel affine map of that value).

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
from mipp.inputs import Samples, as_samples
from mipp.modules import eval_mode
from mipp.surgery.capture import count_calls, record_forward_order
from mipp.surgery.layers import (
    ATTENTION,
    NORMS,
    TABLES,
    UNIT_LAYERS,
    UnsupportedModuleError,
    check_modules,
    conv_groups,
    head_size,
    is_depthwise,
    is_transposed_linear,
    set_heads,
    zero_inputs,
)

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
    kind: Literal["internal", "stream", "heads"]
    position: int = 0
    #: producer name → its output channels of each unit (one channel per unit, except in
    #: groups tied by a grouped convolution: ``ties`` channels per unit)
    producer_index: dict[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)
    #: depthwise convolutions the units pass through (pruned with them, see module docstring)
    channelwise: list[str] = field(default_factory=list)
    #: channels per unit (1, or the lcm of the groups of the grouped convs touching it)
    ties: int = 1
    #: normalisation layer → its channels of each unit (as ``producer_index``)
    norm_index: dict[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)
    #: the attention module whose heads are this group's units (kind "heads"), else None
    attention: str | None = None

    @property
    def fused(self) -> bool:
        """Heads of one fused q/k/v projection: removed and masked by mipp itself (slicing
        the projection's rows and the output projection's inputs), since Torch-Pruning maps
        a split into q, k and v onto the output projection's inputs three times over."""
        return self.attention is not None and len(self.producers) == 1

    @property
    def root(self) -> str:
        """The layer Torch-Pruning roots the group at (its first producer in forward order)."""
        return self.producers[0]

    def channels(self, units: Sequence[int], layer: str | None = None) -> list[int]:
        """Output channels of producer ``layer`` (default: the root) holding ``units``."""
        index = self.producer_index[self.root if layer is None else layer]
        return sorted(c for j in units for c in index[int(j)])


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
    #: conv layer → the BatchNorm it reads a concatenation through (with only pointwise
    #: activations between): its units are described by the BatchNorm's input (see above)
    read_through: dict[str, str] = field(default_factory=dict)

    def recorded_modules(self, names: set[str] | Sequence[str]) -> dict[str, nn.Module]:
        """Layer name → the module whose input describes what it reads: the layer itself,
        or for a :attr:`read_through` layer its BatchNorm (the concatenation)."""
        modules = dict(self.model.named_modules())
        return {n: modules[self.read_through.get(n, n)] for n in modules if n in set(names)}

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
        """Groups pruned under ``scope`` (``"internal"``: single-producer groups and
        attention heads; ``"all"``: residual streams too)."""
        return [g for g in self.groups if scope == "all" or g.kind in ("internal", "heads")]

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
            idxs = g.channels(units)
            # a GroupNorm keeps its group count (units are tied so that every group loses
            # as many channels), except with one channel per group: then whole groups go
            single = [
                modules[n]
                for n in g.norms
                if isinstance(modules[n], nn.GroupNorm)
                and modules[n].num_groups == modules[n].num_channels
            ]
            # Torch-Pruning 1.6.1 slices a LayerNorm's weight and bias in set order, not
            # sorted (it calls the non-in-place ``Tensor.sort``): we slice them again
            layer_norms = {
                n: (modules[n].weight, modules[n].bias, g.norm_index[n])
                for n in g.norms
                if isinstance(modules[n], nn.LayerNorm)
            }
            if g.fused:
                _remove_fused(modules, g, units)
            else:
                self.graph.get_pruning_group(root, fn, idxs=idxs).prune(record_history=False)
            for m in single:
                m.num_groups = m.num_channels
            if g.attention is not None:
                attention = modules[g.attention]
                set_heads(attention, g.size - len(units), head_size(attention) or g.ties)
            for n, (weight, bias, index) in layer_norms.items():
                gone = {c for j in units for c in index[j]}
                _reslice(modules[n], weight, bias, gone)
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
                idxs = g.channels(units)
                if g.fused:
                    _zero(root, idxs, out=True)
                    consumer = g.consumers[0]
                    zero_inputs(
                        modules[consumer.layer], [i for j in units for i in consumer.index[j]]
                    )
                    continue
                for dep, ix in self.graph.get_pruning_group(root, fn, idxs=idxs):
                    _zero(
                        dep.target.module,
                        list(ix),
                        out=self.graph.is_out_channel_pruning_fn(dep.handler),
                    )


def _remove_fused(modules: Mapping[str, nn.Module], g: UnitGroup, units: list[int]) -> None:
    """Remove heads ``units`` of a fused-projection group (:attr:`UnitGroup.fused`): the
    projection's output rows (weight and bias) and the output projection's input columns."""
    qkv, consumer = modules[g.root], g.consumers[0]
    proj = modules[consumer.layer]
    gone_out = set(g.channels(units))
    gone_in = {i for j in units for i in consumer.index[j]}
    keep_out = torch.tensor([c for c in range(qkv.out_features) if c not in gone_out])
    keep_in = torch.tensor([c for c in range(proj.in_features) if c not in gone_in])
    for module, keep, dim in ((qkv, keep_out, 0), (proj, keep_in, 1)):
        w = module.weight
        module.weight = nn.Parameter(
            w.detach().index_select(dim, keep.to(w.device)).clone(), requires_grad=w.requires_grad
        )
        if dim == 0 and module.bias is not None:
            b = module.bias
            module.bias = nn.Parameter(
                b.detach().index_select(0, keep.to(b.device)).clone(), requires_grad=b.requires_grad
            )
    qkv.out_features, proj.in_features = len(keep_out), len(keep_in)


def _reslice(module: nn.Module, weight, bias, gone: set[int]) -> None:
    """Set a pruned LayerNorm's affine parameters to the kept slice of the originals."""
    if weight is None and bias is None:
        return
    width = (weight if weight is not None else bias).shape[-1]
    keep = torch.tensor([c for c in range(width) if c not in gone], dtype=torch.long)
    for attr, old in (("weight", weight), ("bias", bias)):
        if old is not None:
            setattr(module, attr, nn.Parameter(old.detach().index_select(-1, keep.to(old.device))))


def _zero(module: nn.Module, idxs: list[int], *, out: bool) -> None:
    if isinstance(module, NORMS):
        for param in (module.weight, module.bias):  # None when not affine
            if param is not None:
                param[idxs] = 0
    elif isinstance(module, UNIT_LAYERS):
        if out or is_depthwise(module):  # a depthwise filter is the channel's only weight
            module.weight[idxs] = 0
            if module.bias is not None:
                module.bias[idxs] = 0
        else:
            zero_inputs(module, idxs)


def _next_layers(
    graph: tp.DependencyGraph, layers: Mapping[nn.Module, str]
) -> dict[str, list[str]]:
    """For each unit layer: the unit layers reading the first tensor derived from its output.

    The walk follows the output through BatchNorm, activations, pooling, reshapes and
    additions, and stops at the first tensor some unit layer reads (a residual block's
    output, not every later block that the stream also reaches). A layer reading a tensor
    through a normalisation layer or a depthwise convolution reads it too: a pre-norm
    transformer's stream ``x + f(x)`` is read by the next block's projections through its
    LayerNorm (and a ConvNeXt's by the next block through its depthwise conv), so the walk
    stops there instead of reaching every later block.
    """

    def unit(node) -> str | None:
        m = node.module
        return layers.get(m) if isinstance(m, nn.Module) else None

    def behind(node) -> list[str]:
        """Unit layers reading ``node``'s output through a normalisation layer or a
        depthwise conv (and the elementwise ops and reshapes after it)."""
        m = node.module
        if not (isinstance(m, NORMS) or (isinstance(m, nn.Module) and is_depthwise(m))):
            return []
        out: list[str] = []
        seen, stack = {node}, [node]
        while stack:
            for o in stack.pop().outputs:
                if o in seen:
                    continue
                seen.add(o)
                u = unit(o)
                if u is not None:
                    out.append(u)
                elif not _joins(o):  # not across another addition or concatenation
                    stack.append(o)
        return out

    def reads(node) -> list[str]:
        found: list[str] = []
        for o in node.outputs:
            for u in [unit(o)] if unit(o) is not None else behind(o):
                if u not in found:
                    found.append(u)
        return found

    result: dict[str, list[str]] = {}
    for module, name in layers.items():
        start = graph.module2node[module]
        found: list[str] = []
        seen = {start}
        stack = [start]
        while stack:
            node = stack.pop()
            direct = reads(node)
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


#: autograd names of pointwise activations (Torch-Pruning's element-wise op nodes)
_POINTWISE = (
    "Relu",
    "Gelu",
    "Silu",
    "Sigmoid",
    "Tanh",
    "Hardswish",
    "Hardsigmoid",
    "LeakyRelu",
    "Elu",
    "Hardtanh",
    "Mish",
    "Softplus",
)
_ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Hardtanh,
    nn.Mish,
    nn.Softplus,
)


def _read_through(
    graph: tp.DependencyGraph, layers: Sequence[str], modules: Mapping[str, nn.Module]
) -> dict[str, str]:
    """Conv layers of ``layers`` that read ``act(batchnorm(cat(...)))``: layer → BatchNorm."""
    norm_names = {
        m: n for n, m in modules.items() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)
    }
    out: dict[str, str] = {}
    for name in layers:
        module = modules[name]
        if not isinstance(module, nn.Conv1d | nn.Conv2d) or module not in graph.module2node:
            continue
        node = graph.module2node[module]
        while len(node.inputs) == 1:
            node = node.inputs[0]
            m = node.module
            if m in norm_names:
                if len(node.inputs) == 1 and "Concat" in str(getattr(node.inputs[0], "name", "")):
                    out[name] = norm_names[m]
                break
            pointwise = isinstance(m, _ACTIVATIONS) or any(
                f"({op}Backward" in str(getattr(node, "name", "")) for op in _POINTWISE
            )
            if not pointwise or len(node.outputs) != 1:
                break
    return out


def _joins(node) -> bool:
    """Whether a Torch-Pruning graph node adds, subtracts or concatenates tensors."""
    name = str(getattr(node, "name", ""))
    return any(op in name for op in ("AddBackward", "SubBackward", "CatBackward", "Concat"))


def _width(module: nn.Module, *, out: bool) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features if out else module.in_features
    return module.out_channels if out else module.in_channels


def _tie(size: int, keys: Mapping[int, list[tuple]], grouped: list[str]) -> list[list[int]]:
    """Root channels of each unit: channels sharing a key (a grouped layer's position p in
    each of its blocks) are one unit. Units are returned in order of their first channel."""
    parent = list(range(size))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple, int] = {}
    for r in range(size):
        for key in keys.get(r, ()):
            if key in first:
                a, b = find(first[key]), find(r)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                first[key] = r
    units: dict[int, list[int]] = {}
    for r in range(size):
        units.setdefault(find(r), []).append(r)
    out = [units[k] for k in sorted(units)]
    if len({len(u) for u in out}) != 1:
        raise UnsupportedModuleError(
            f"cannot split {size} channels into equal units across the grouped "
            f"convolutions {', '.join(repr(n) for n in grouped)}: their group counts do not "
            f"divide the widths alike"
        )
    return out


def _check_mapping(
    groups: list[UnitGroup],
    readers: Mapping[str, list[tuple[str, Consumer]]],
    modules: Mapping[str, nn.Module],
) -> None:
    """Refuse a channel mapping Torch-Pruning got wrong (instead of mis-pruning silently)."""
    for g in groups:
        for p, index in g.producer_index.items():
            if sorted(c for ix in index for c in ix) != list(range(_width(modules[p], out=True))):
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


def _unit_group(
    tp_group,
    graph: tp.DependencyGraph,
    names: Mapping[nn.Module, str],
    norm_names: Mapping[nn.Module, str],
    position: Mapping[str, int],
    modules: Mapping[str, nn.Module],
) -> UnitGroup | None:
    """Our record of one Torch-Pruning group (None when it has no producer or no consumer:
    the model input's channels, or the output layer's)."""
    size = len(tp_group[0].root_idxs)
    out_map: dict[str, dict[int, int]] = {}  # producer → root channel → its output channel
    in_map: dict[str, dict[int, list[int]]] = {}  # consumer → root channel → its inputs
    norms: list[str] = []
    channelwise: list[str] = []
    norm_map: dict[str, dict[int, int]] = {}  # norm → root channel → its channel
    keys: dict[int, list[tuple]] = {}  # root channel → tie keys (grouped layers)
    grouped: list[str] = []
    for i, (dep, idxs) in enumerate(tp_group):
        module = dep.target.module
        root_idxs = tp_group[i].root_idxs
        if module in norm_names:
            norms.append(norm_names[module])
            for idx, r in zip(idxs, root_idxs, strict=True):
                norm_map.setdefault(norm_names[module], {})[r] = int(idx)
            if isinstance(module, nn.GroupNorm) and 1 < module.num_groups < module.num_channels:
                block = module.num_channels // module.num_groups  # equal channels per group
                grouped.append(norm_names[module])
                for idx, r in zip(idxs, root_idxs, strict=True):
                    keys.setdefault(r, []).append((norm_names[module], True, int(idx) % block))
            continue
        if module not in names:
            continue
        name = names[module]
        if is_depthwise(module):
            if name not in channelwise:
                channelwise.append(name)
            continue
        out = graph.is_out_channel_pruning_fn(dep.handler)
        if not out and not graph.is_in_channel_pruning_fn(dep.handler):
            continue
        groups_ = conv_groups(module)
        block = _width(module, out=out) // groups_
        if groups_ > 1 and name not in grouped:
            grouped.append(name)
        for idx, r in zip(idxs, root_idxs, strict=True):
            if groups_ > 1:
                keys.setdefault(r, []).append((name, out, int(idx) % block))
            if out:
                out_map.setdefault(name, {})[r] = int(idx)
            else:
                in_map.setdefault(name, {}).setdefault(r, []).append(int(idx))
    ordered = sorted(out_map, key=lambda n: position.get(n, math.inf))
    if not ordered or not in_map:
        return None
    attention = _attention_of(ordered, in_map, modules)
    third = None
    if attention is not None:  # a head: head-size consecutive channels of every projection
        hd = head_size(modules[attention])
        # one fused projection holds q, k and v side by side: head h is the same head-size
        # slice of each third (the consumer reads the v third, through Torch-Pruning's map)
        third = modules[ordered[0]].out_features // 3 if len(ordered) == 1 else None
        for n in ordered:
            for r, idx in out_map[n].items():
                head = (idx % third if third else idx) // hd
                keys.setdefault(r, []).append((attention, "head", head))
        grouped.append(attention)
    units = _tie(size, keys, grouped) if keys else [[r] for r in range(size)]
    producer_index = {n: tuple(tuple(out_map[n][r] for r in u) for u in units) for n in ordered}
    consumers = [
        Consumer(n, tuple(tuple(i for r in u for i in in_map[n].get(r, ())) for u in units))
        for n in in_map
    ]
    if third:
        # the output projection reads the v third: v channel c is its input c − 2·third
        # (Torch-Pruning maps a split into q, k, v onto those inputs three times over)
        fused = out_map[ordered[0]]
        consumers = [
            Consumer(
                consumers[0].layer,
                tuple(
                    tuple(sorted(fused[r] - 2 * third for r in u if fused[r] >= 2 * third))
                    for u in units
                ),
            )
        ]
    return UnitGroup(
        name=ordered[0],
        size=len(units),
        producers=ordered,
        consumers=sorted(consumers, key=lambda c: position.get(c.layer, math.inf)),
        norms=norms,
        kind="heads" if attention else "internal" if len(ordered) == 1 else "stream",
        position=min(position.get(n, math.inf) for n in ordered),
        producer_index=producer_index,
        channelwise=sorted(channelwise, key=lambda n: position.get(n, math.inf)),
        ties=len(units[0]),
        norm_index={
            n: tuple(tuple(m[r] for r in u if r in m) for u in units) for n, m in norm_map.items()
        },
        attention=attention,
    )


def _attention_of(
    producers: list[str], in_map: Mapping[str, object], modules: Mapping[str, nn.Module]
) -> str | None:
    """The attention module whose heads a group holds, or None: every producer and the one
    consumer are Linear layers under one module that declares its head size
    (:func:`head_size`), dividing every projection's width; the producers are separate q, k
    and v projections, or one fused projection three times as wide as the consumer's input
    (timm's ``qkv``)."""
    parents = {n.rpartition(".")[0] for n in producers}
    if len(parents) != 1 or len(in_map) != 1:
        return None
    (parent,) = parents
    hd = head_size(modules[parent]) if parent in modules else None
    if hd is None:
        return None
    layers = [modules[n] for n in [*producers, *in_map]]
    if not all(isinstance(m, nn.Linear) for m in layers):
        return None
    if any(modules[n].out_features % hd for n in producers):
        return None
    if len(producers) == 1:
        (consumer,) = in_map
        width = modules[consumer].in_features
        if width % hd or modules[producers[0]].out_features != 3 * width:
            return None
    return parent


def build_structure(
    model: nn.Module,
    example_input: torch.Tensor | Samples,
    *,
    output_layer: nn.Module | None = None,
) -> ModelStructure:
    """Find the prunable unit groups of ``model`` (which is traced, not modified).

    Args:
        model: a network of Conv1d/Conv2d, Linear, BatchNorm, activations, pooling, reshapes
            and residual additions / concatenations.
        example_input: one input batch ``(n, *input_shape)``, or :class:`~mipp.inputs.Samples`
            (inputs of any form and the ``forward`` that runs them), used for tracing; the
            trace follows what ``Samples.run`` returns.
        output_layer: the layer producing the network output (never pruned). Default: the
            last Conv/Linear layer to run.

    Raises:
        UnsupportedModuleError: a module mipp cannot handle (named, with its type).
    """
    check_modules(model)
    transposed = [n for n, m in model.named_modules() if is_transposed_linear(m)]
    if transposed:
        raise UnsupportedModuleError(
            f"{len(transposed)} transposed Linear layer(s) ({', '.join(map(repr, transposed[:3]))}"
            f"{' …' if len(transposed) > 3 else ''}, Hugging Face's Conv1D): build the structure "
            f"of a copy converted by mipp.surgery.layers.as_linears (mipp.prune does this)"
        )
    example = as_samples(example_input)
    inside = [n + "." for n, m in model.named_modules() if isinstance(m, ATTENTION)]
    names = {  # an attention module's own projections are part of it, not unit layers
        m: n
        for n, m in model.named_modules()
        if isinstance(m, UNIT_LAYERS) and not any(n.startswith(p) for p in inside)
    }
    if not names:
        raise UnsupportedModuleError(
            f"{type(model).__name__} has no Conv1d/Conv2d/Linear layers to prune"
        )
    tracked = {n: m for n, m in model.named_modules() if isinstance(m, UNIT_LAYERS + NORMS)}
    with eval_mode(model):
        with (
            torch.no_grad(),
            record_forward_order({n: m for m, n in names.items()}) as order,
            count_calls(tracked) as calls,
        ):
            example.run(model)
        with torch.enable_grad():
            try:
                graph = tp.DependencyGraph().build_dependency(
                    model,
                    example_inputs=example.value,
                    forward_fn=lambda m, _: example.run(m),
                    verbose=False,  # it slices loose per-channel parameters on its own
                )
            except (TypeError, ValueError, IndexError, KeyError, ZeroDivisionError) as e:
                where = e.__traceback__
                while where.tb_next is not None:
                    where = where.tb_next
                raise UnsupportedModuleError(
                    f"Torch-Pruning {tp.__version__} cannot trace the channel dependencies of "
                    f"{type(model).__name__} ({type(e).__name__} in its "
                    f"{where.tb_frame.f_code.co_name}: {e}); mipp cannot prune this model"
                ) from e
    cut = [n for m, n in names.items() if n in order and m not in graph.module2node]
    if cut:  # the trace starts at the output: their units would be removed from one side only
        raise MippError(
            f"layers {', '.join(map(repr, cut[:3]))} run but do not feed the output mipp "
            f"preserves (the model's output tensor or .logits, or what forward= returns); pass "
            f"a forward= returning an output that depends on every layer that runs"
        )
    if output_layer is None:
        out_name = order[-1]
    else:
        if output_layer not in names:
            raise MippError(f"output_layer {output_layer!r} is not a Conv/Linear of the model")
        out_name = names[output_layer]
    modules = dict(model.named_modules())
    position = {n: i for i, n in enumerate(order)}
    norm_names = {m: n for n, m in model.named_modules() if isinstance(m, NORMS)}

    groups: list[UnitGroup] = []
    raw = graph.get_all_groups(
        ignored_layers=[modules[out_name]], root_module_types=[nn.Conv1d, nn.Conv2d, nn.Linear]
    )
    for tp_group in raw:
        if any(isinstance(dep.target.module, TABLES + ATTENTION) for dep, _ in tp_group):
            # units tied to an embedding table's width or read by an attention module's own
            # projections are never pruned
            continue
        group = _unit_group(tp_group, graph, names, norm_names, position, modules)
        if group is not None:
            groups.append(group)
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
        next_layers=_next_layers(graph, {m: n for m, n in names.items() if not is_depthwise(m)}),
        readers=readers,
        example_shape=example.sample_shape,
        calls=dict(calls),
        read_through=_read_through(graph, list(readers), modules),
    )
