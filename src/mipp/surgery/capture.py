"""Recording what layers see: the only place in mipp that installs forward hooks.

MIPP needs, for every prunable unit layer, the activation its consumers actually read (after
BatchNorm, the nonlinearity and any pooling in between). We get it by recording the *input*
of every consumer layer (Conv / Linear) with forward pre-hooks, plus the network's output
(the logits, the first target: what :meth:`~mipp.inputs.Samples.run` returns). Conv inputs
are pooled per channel as they are recorded, so memory stays O(n · channels · k²):

- ``pool="mean"``: global average over space, 1 feature per channel (default);
- ``pool=k`` (int): adaptive k×k average, k² features per channel (a unit is then a block).

Linear inputs are kept as they are (n, in_features); per-unit pooling of flattened conv maps
happens later, when units are mapped to their input indices (see :mod:`mipp.surgery.structure`).
A Linear applied to every position of a sequence or map ``(n, ..., in_features)`` (a
transformer's tokens, a channels-last ConvNeXt block) is recorded like a conv input: its
features are its channels, pooled over the positions.

:func:`forward_until` runs a model only as far as one layer and returns that layer's input
or output (a hook raises a private exception that ends the forward early), so a capture
costs only the part of the network up to the layer.

A name ending in :data:`OUTPUT` (``"conv2#out"``) records that module's *output* instead of
its input, pooled the same way (MIPP's ``residual="branch"`` target: a residual branch's last
layer before the addition).

A module called more than once in one forward (a shared layer, which :func:`mipp.prune`
accepts only when told to leave it whole) is recorded at its first call.

Hooks exist only inside the ``with`` block and are removed even when the forward raises.

On a CPU, :func:`stream_activations` (and so :func:`capture_activations`) runs each batch
through the model in pieces whose largest activation is about :data:`CPU_PIECE_BYTES`
[ours]: glibc hands allocations larger than its mmap threshold (at most 32 MB) straight to
the kernel and back, so every large activation of a big batch is paged in afresh (a plain
forward pass of ResNet-50 at 32 px over 512 images: 8.0 million page faults at batch 256,
35 in pieces, and 1.7× faster; ``benchmarks/capture_pieces.py``). The first piece
(:data:`PROBE_SAMPLES` samples) measures the largest activation per sample; the records are
the same, up to the rounding of the kernels at another batch size. A model whose forward
mixes the samples of a batch (batch statistics in eval mode) needs ``CPU_PIECE_BYTES = None``.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mipp.errors import MippError
from mipp.inputs import Samples, as_samples
from mipp.modules import eval_mode

__all__ = [
    "OUTPUT",
    "Activations",
    "NonFiniteActivationError",
    "Pool",
    "capture_activations",
    "capture_inputs",
    "count_calls",
    "forward_until",
    "input_spreads",
    "normalise_kept",
    "pool_channels",
    "record_first_inputs",
    "record_forward_order",
    "stream_activations",
]

Pool = str | int  # "mean" or a positive int k (k×k adaptive average)
#: on a CPU, the largest activation (bytes) of one forward piece (see the module
#: docstring); None runs every batch in one forward
CPU_PIECE_BYTES: int | None = 8 * 2**20
#: samples of the first forward piece, which measures the activations' size per sample
PROBE_SAMPLES = 8
#: suffix of a recorded name that means "this module's output" (``layers["conv2#out"]``)
OUTPUT = "#out"


class NonFiniteActivationError(MippError, ValueError):
    """A recorded activation holds NaN or Inf; the message names the layer."""


def pool_channels(x: Tensor, pool: Pool) -> Tensor:
    """Pool a conv input ``(n, c, *spatial)`` per channel to ``(n, c, f)``.

    ``pool="mean"`` gives f = 1; ``pool=k`` gives f = k² (2-D) or k (1-D) by adaptive
    averaging. A 2-D input ``(n, c)`` is returned as ``(n, c, 1)``.

    >>> pool_channels(torch.ones(2, 3, 4, 4), 2).shape
    torch.Size([2, 3, 4])
    """
    if x.ndim == 2:
        return x.unsqueeze(-1)
    if pool == "mean":
        return x.flatten(2).mean(-1, keepdim=True)
    if x.ndim == 3:
        return F.adaptive_avg_pool1d(x, int(pool))
    if x.ndim == 4:
        return F.adaptive_avg_pool2d(x, int(pool)).flatten(2)
    raise MippError(f"cannot pool an input of shape {tuple(x.shape)} per channel")


@dataclass
class Activations:
    """What :func:`capture_activations` recorded, on CPU in float32.

    ``inputs[name]``: the input of layer ``name`` — ``(n, c, f)`` pooled for convolutions,
    ``(n, in_features)`` for Linear layers. Layers reading the very same tensor are recorded
    once: ``alias[name]`` is the layer whose record holds it (itself if unique).
    ``output``: the model output ``(n, classes)``. ``order``: layer names in the order their
    forward first ran.
    """

    inputs: dict[str, Tensor] = field(default_factory=dict)
    alias: dict[str, str] = field(default_factory=dict)
    output: Tensor | None = None
    order: list[str] = field(default_factory=list)

    def of(self, name: str) -> Tensor:
        """The recorded input of layer ``name`` (following aliases)."""
        return self.inputs[self.alias.get(name, name)]

    @property
    def n(self) -> int:
        return 0 if self.output is None else int(self.output.shape[0])


@contextlib.contextmanager
def record_forward_order(modules: Mapping[str, nn.Module]) -> Iterator[list[str]]:
    """Within the block, append each module's name to the yielded list when it first runs."""
    order: list[str] = []
    handles = []

    def make(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if name not in order:
                order.append(name)

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(make(name)))
        yield order
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def count_calls(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, int]]:
    """Within the block, count in the yielded dict how often each module's forward runs."""
    calls = dict.fromkeys(modules, 0)
    handles = []

    def make(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            calls[name] += 1

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(make(name)))
        yield calls
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _recording(
    layers: Mapping[str, nn.Module], *, pool: Pool, acts: Activations
) -> Iterator[tuple[dict[str, list[Tensor]], list[Tensor], Callable[[Tensor], None]]]:
    """Hooks recording into ``(chunks, outputs)``; the caller hands each forward's output to
    the yielded ``end`` and may empty both lists between batches."""
    chunks: dict[str, list[Tensor]] = {name: [] for name in layers}
    outputs: list[Tensor] = []
    first_pass = {"on": True, "seen": {}, "keep": []}
    ran: set[str] = set()  # layers seen in the current forward: a reused one counts once
    handles = []

    def make(name: str, module: nn.Module):
        # (a BatchNorm stands for the conv reading it: ModelStructure.read_through)
        is_conv = isinstance(module, nn.Conv1d | nn.Conv2d | nn.BatchNorm1d | nn.BatchNorm2d)

        def hook(mod: nn.Module, args: tuple) -> None:
            x = args[0]
            if name in ran:  # a shared layer's later calls: its first input is recorded
                return
            ran.add(name)
            if first_pass["on"]:
                acts.order.append(name)
                key = id(x)
                if key in first_pass["seen"]:
                    acts.alias[name] = first_pass["seen"][key]
                else:
                    first_pass["seen"][key] = name
                    first_pass["keep"].append(x)  # keep alive: ids stay unique in this pass
            if name in acts.alias:
                return
            chunks[name].append(features(x, conv=is_conv, channels_last=True))

        return hook

    def features(t: Tensor, *, conv: bool, channels_last: bool) -> Tensor:
        """A recorded tensor's per-channel features, float32 on the CPU: a conv's (or its
        BatchNorm's) input always pooled per channel to ``(n, c, f)``; otherwise a map is
        pooled over its positions (channels last for a Linear on (n, ..., features): tokens
        or a channels-last map) and a flat ``(n, features)`` kept as it is."""
        t = t.detach()
        if conv:
            t = pool_channels(t, pool)
        elif t.ndim > 2:
            t = pool_channels(t.movedim(-1, 1) if channels_last else t, pool)
        return t.float().cpu()

    def end(out: Tensor) -> None:
        first_pass["on"] = False
        first_pass["keep"].clear()
        ran.clear()
        outputs.append(out.detach().float().cpu().reshape(out.shape[0], -1))

    def make_output(name: str, module: nn.Module):
        channels_last = isinstance(module, nn.Linear)

        def hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
            if name in ran:
                return
            ran.add(name)
            if first_pass["on"]:
                acts.order.append(name)
            chunks[name].append(features(out, conv=False, channels_last=channels_last))

        return hook

    try:
        for name, module in layers.items():
            if name.endswith(OUTPUT):
                handles.append(module.register_forward_hook(make_output(name, module)))
            else:
                handles.append(module.register_forward_pre_hook(make(name, module)))
        yield chunks, outputs, end
    finally:
        for h in handles:
            h.remove()
        first_pass["keep"].clear()


def capture_activations(
    model: nn.Module,
    batches: Iterable[Tensor | Samples],
    layers: Mapping[str, nn.Module],
    *,
    pool: Pool = "mean",
) -> Activations:
    """Run ``batches`` through ``model`` (eval mode, no grad) recording the inputs of ``layers``.

    Args:
        model: the network; its train/eval mode is restored afterwards.
        batches: input tensors ``(batch, *input_shape)`` or :class:`~mipp.inputs.Samples`,
            on the model's device; the output recorded is what ``Samples.run`` returns.
        layers: name → Conv/Linear module whose input to record (whose output, for a name
            ending in :data:`OUTPUT`).
        pool: ``"mean"`` or k (see the module docstring).

    Raises:
        NonFiniteActivationError: a recorded input (or the output) holds NaN / Inf; the
            message names the layer.
    """
    parts: list[Activations] = []
    acts = stream_activations(model, batches, layers, pool=pool, on_batch=parts.append)
    for name in layers:
        if name not in acts.alias and parts:
            acts.inputs[name] = torch.cat([p.inputs[name] for p in parts])
    acts.output = torch.cat([p.output for p in parts]) if parts else None
    return acts


def stream_activations(
    model: nn.Module,
    batches: Iterable[Tensor | Samples],
    layers: Mapping[str, nn.Module],
    *,
    pool: Pool = "mean",
    on_batch: Callable[[Activations], None],
) -> Activations:
    """Like :func:`capture_activations`, but hand each batch's record to ``on_batch`` and keep
    nothing: memory stays that of one batch, whatever the number of batches.

    ``on_batch`` receives an :class:`Activations` holding only that batch (``inputs``,
    ``output``; ``alias`` and ``order`` are complete from the first batch on). Returns an
    :class:`Activations` with ``alias`` and ``order`` and no tensors.

    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> sizes = []
    >>> meta = stream_activations(net, torch.randn(10, 4).split(4), {"2": net[2]},
    ...                           on_batch=lambda a: sizes.append(a.n))
    >>> sizes, meta.order
    ([4, 4, 2], ['2'])
    """
    acts = Activations()
    recording = _recording(layers, pool=pool, acts=acts)
    pieces = _Pieces(model)
    with eval_mode(model), torch.no_grad(), recording as (chunks, outs, end):
        for x in batches:
            pieces.run(as_samples(x), end)
            batch = Activations(alias=acts.alias, order=acts.order)
            for name, got in chunks.items():
                if name not in acts.alias and got:
                    batch.inputs[name] = torch.cat(got)
                    got.clear()
            batch.output = torch.cat(outs) if outs else None
            outs.clear()
            _check_finite(batch)
            on_batch(batch)
    return acts


class _Pieces:
    """Runs batches through ``model`` in pieces on a CPU (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        param = next(model.parameters(), None)
        on_cpu = param is None or param.device.type == "cpu"
        self.model, self.limit = model, CPU_PIECE_BYTES if on_cpu else None
        #: samples per forward: None = the whole batch; 0 = not measured yet
        self.size: int | None = None if self.limit is None else 0

    def run(self, x: Samples, end: Callable[[Tensor], None]) -> None:
        n, start = len(x), 0
        if self.size is None:
            end(x.run(self.model))
            return
        while start < n:
            if self.size == 0:
                size = min(n, PROBE_SAMPLES)
                with _largest_activation(self.model) as largest:
                    end(x[start : start + size].run(self.model))
                per_sample = max(1, math.ceil(largest[0] / size))
                self.size = max(1, int(self.limit or 0) // per_sample)
            else:
                size = min(self.size, n - start)
                end((x if size == n else x[start : start + size]).run(self.model))
            start += size


@contextlib.contextmanager
def _largest_activation(model: nn.Module) -> Iterator[list[int]]:
    """Within the block, ``[bytes]`` of the largest tensor any module returned."""
    largest = [0]
    handles = []

    def hook(mod: nn.Module, args: tuple, out: object) -> None:
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, Tensor):
                largest[0] = max(largest[0], t.numel() * t.element_size())

    try:
        for module in model.modules():
            handles.append(module.register_forward_hook(hook))
        yield largest
    finally:
        for h in handles:
            h.remove()


def _check_finite(acts: Activations) -> None:
    for name, t in acts.inputs.items():
        bad = ~torch.isfinite(t)
        if bad.any():
            raise NonFiniteActivationError(
                f"the input of layer {name!r} holds {int(bad.sum())} NaN/Inf values on the "
                f"calibration data; check the model's weights and the data"
            )
    if acts.output is not None and not torch.isfinite(acts.output).all():
        raise NonFiniteActivationError(
            "the model output holds NaN/Inf values on the calibration data"
        )


def capture_inputs(
    model: nn.Module,
    batches: Iterable[Tensor | Samples],
    layers: Mapping[str, nn.Module],
    reduce: Callable[[str, Tensor], Tensor],
    *,
    pieces: bool = False,
) -> dict[str, Tensor]:
    """Run ``batches`` (eval mode, no grad) and keep ``reduce(name, input)`` of each layer.

    ``pieces=True``: on a CPU, each batch runs in pieces as in :func:`stream_activations`
    (for a ``reduce`` that treats every sample alike, e.g. one statistic per sample: it then
    sees smaller batches).

    The raw input of every layer in ``layers`` — full feature maps, not pooled — is handed to
    ``reduce`` batch by batch; the reduced tensors (first dimension: the batch) are
    concatenated on CPU. Used by the activation-based baselines (HRank ranks, CHIP nuclear
    norms, APoZ zero counts, ThiNet patch samples), whose statistics need whole maps.
    Hooks are removed even when the forward or ``reduce`` raises.
    """
    parts: dict[str, list[Tensor]] = {name: [] for name in layers}
    handles = []

    def make(name: str):
        def hook(mod: nn.Module, args: tuple) -> None:
            parts[name].append(reduce(name, args[0].detach()).cpu())

        return hook

    with eval_mode(model):
        try:
            for name, module in layers.items():
                handles.append(module.register_forward_pre_hook(make(name)))
            with torch.no_grad():
                split = _Pieces(model) if pieces else None
                for x in batches:
                    if split is None:
                        as_samples(x).run(model)
                    else:
                        split.run(as_samples(x), lambda out: None)
        finally:
            for h in handles:
                h.remove()
    return {name: torch.cat(p) for name, p in parts.items() if p}


def input_spreads(
    model: nn.Module, x: Tensor | Samples, layers: Mapping[str, nn.Module]
) -> tuple[dict[str, tuple[Tensor, Tensor, float]], Exception | None]:
    """Run ``x`` once (eval mode, no grad; on a CPU in pieces, as :func:`stream_activations`)
    and keep, for the first input of each layer per forward pass, two float64 numbers per
    feature (dimension 1; a ``Linear``'s last dimension): the largest |value − the first
    sample's value at the same position| and the largest |value|, plus the input dtype's
    rounding unit (0 for integers). What a constancy check needs, without holding the
    inputs: memory O(one sample) per layer instead of the whole unpooled inputs.

    The differences are taken in the input's own dtype (exactly 0 for equal values; a
    float64 copy of every input cost more than the forward pass), and layers that read the
    same tensor (the branches of an Inception module, a block's first convolution and its
    shortcut) share one reading of it per piece. An exception raised by the forward is
    returned instead of raised, together with what was seen until then. A NaN anywhere in a
    feature makes its spread NaN.
    """
    first: dict[str, Tensor] = {}
    seen: dict[str, tuple[Tensor, Tensor, float]] = {}
    called: set[str] = set()
    # this piece's readings by input tensor: (a weak reference to the tensor, so an id reused
    # after it is freed is not taken for it; its layout, first, spread, size)
    read: dict[int, tuple[weakref.ref, bool, Tensor, Tensor, Tensor]] = {}

    def make(name: str, linear: bool):
        def hook(mod: nn.Module, args: tuple) -> None:
            if name in called:
                return
            called.add(name)
            raw = args[0]  # (the object itself: layers reading one tensor get the same one)
            hit = read.get(id(raw))
            if (
                hit is not None
                and hit[0]() is raw
                and hit[1] == linear
                and first.setdefault(name, hit[2]) is hit[2]  # shares the first sample too
            ):
                spread, size = hit[3], hit[4]
            else:
                t = raw.detach()
                t = t.movedim(-1, 1) if linear else t  # features on dim 1
                if not t.is_floating_point():
                    t = t.double()
                ref = first.get(name)
                if ref is None:
                    ref = first[name] = t[:1].clone()
                dims = [0, *range(2, t.ndim)]
                spread = (t - ref).abs().amax(dim=dims).double()
                size = t.abs().amax(dim=dims).double()
                read[id(raw)] = (weakref.ref(raw), linear, ref, spread, size)
            if name in seen:
                old_spread, old_size, _ = seen[name]
                spread, size = torch.maximum(old_spread, spread), torch.maximum(old_size, size)
            eps = torch.finfo(raw.dtype).eps if raw.is_floating_point() else 0.0
            seen[name] = (spread.cpu(), size.cpu(), eps)

        return hook

    def end(out: object) -> None:
        called.clear()
        read.clear()

    hooks = {module: make(name, isinstance(module, nn.Linear)) for name, module in layers.items()}
    error = _run_with_pre_hooks(model, hooks, lambda: _Pieces(model).run(as_samples(x), end))
    return seen, error


def _run_with_pre_hooks(
    model: nn.Module, hooks: Mapping[nn.Module, Callable], run: Callable[[], object]
) -> Exception | None:
    """``run()`` in eval mode without gradients, with each module's forward pre-hook
    registered; an exception the forward raises is returned (the callers report it). The
    hooks are removed either way."""
    handles = []
    with eval_mode(model):
        try:
            for module, hook in hooks.items():
                handles.append(module.register_forward_pre_hook(hook))
            with torch.no_grad():
                run()
        except Exception as e:  # the caller reports it
            return e
        finally:
            for h in handles:
                h.remove()
    return None


class _StopForward(Exception):
    """Raised by a :func:`forward_until` hook to end a forward pass; caught right here."""


def record_first_inputs(
    model: nn.Module, x: Tensor | Samples, layers: Mapping[str, nn.Module]
) -> tuple[dict[str, Tensor], Exception | None]:
    """Run ``x`` once (eval mode, no grad) keeping the first input of each layer, unpooled.

    An exception raised by the forward is returned instead of raised, together with the
    inputs recorded until then (which layers ran shows where it failed).
    """
    seen: dict[str, Tensor] = {}

    def make(name: str):
        def hook(mod: nn.Module, args: tuple) -> None:
            if name not in seen:
                seen[name] = args[0].detach()

        return hook

    hooks = {module: make(name) for name, module in layers.items()}
    return seen, _run_with_pre_hooks(model, hooks, lambda: as_samples(x).run(model))


@contextlib.contextmanager
def forward_until(
    model: nn.Module, layer: nn.Module, *, record: Literal["input", "output"]
) -> Iterator[Callable[[Tensor | Samples], Tensor]]:
    """Within the block, ``run(x)`` forwards ``x`` (a tensor or :class:`~mipp.inputs.Samples`)
    only as far as ``layer``.

    ``run(x)`` returns the (detached) first positional input of ``layer`` (``record="input"``:
    the forward stops before ``layer`` runs) or its output (``record="output"``: it stops
    right after), from the first call of ``layer`` in the forward. The model is in eval mode
    and gradients are off inside the block; its train/eval mode is restored and the hook
    removed on exit, even when the forward raises (every module's own mode is restored, so
    mixed train/eval submodules come back as they were).

    Raises:
        MippError: ``layer`` did not run during the forward of ``x``.

    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> x = torch.ones(5, 3)
    >>> with forward_until(net, net[2], record="input") as run:
    ...     seen = run(x)
    >>> torch.equal(seen, net[1](net[0](x)).detach()), len(net[2]._forward_pre_hooks)
    (True, 0)
    """
    if record not in ("input", "output"):
        raise ValueError(f"record must be 'input' or 'output', got {record!r}")
    box: list[Tensor] = []

    def pre_hook(mod: nn.Module, args: tuple) -> None:
        box.append(args[0].detach())
        raise _StopForward

    def post_hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
        if not isinstance(out, Tensor):
            raise MippError(f"{type(mod).__name__} returned {type(out).__name__}, not a tensor")
        box.append(out.detach())
        raise _StopForward

    def run(x: Tensor | Samples) -> Tensor:
        box.clear()
        try:
            with torch.no_grad():
                as_samples(x).run(model)
        except _StopForward:
            return box.pop()
        raise MippError(
            f"layer {type(layer).__name__} did not run in the forward pass of "
            f"{type(model).__name__}; it cannot be captured"
        )

    with eval_mode(model):
        if record == "input":
            handle = layer.register_forward_pre_hook(pre_hook)
        else:
            handle = layer.register_forward_hook(post_hook)
        try:
            yield run
        finally:
            handle.remove()
            box.clear()


def _normalise_kept(module: nn.Module, x: Tensor, keep: Tensor) -> Tensor:
    """``module``'s output on ``x`` when only the channels ``keep`` exist (statistics over
    those channels), with zeros in the other channels' places."""
    weight = module.weight[keep] if module.weight is not None else None
    bias = module.bias[keep] if module.bias is not None else None
    if isinstance(module, nn.GroupNorm):
        dim = 1
        part = F.group_norm(x.index_select(1, keep), module.num_groups, weight, bias, module.eps)
    else:  # a LayerNorm over the channel dimension: the last one, or 1 for channels-first
        width = module.normalized_shape[-1]
        dim = x.ndim - 1 if x.shape[-1] == width or x.ndim < 3 else 1
        kept = x.index_select(dim, keep).movedim(dim, -1)
        part = F.layer_norm(kept, (len(keep),), weight, bias, module.eps).movedim(-1, dim)
    out = torch.zeros_like(x)
    return out.index_copy(dim, keep, part)


@contextlib.contextmanager
def normalise_kept(model: nn.Module, keep: Mapping[str, Sequence[int]]) -> Iterator[None]:
    """Inside the block, each normalisation layer ``name`` of ``keep`` (a LayerNorm or a
    GroupNorm) normalises over its channels ``keep[name]`` only and outputs 0 for the
    others: what the same layer computes after the other channels are removed. The masked
    reference of a removal through such a layer (:mod:`mipp.surgery.verify`)."""
    modules = dict(model.named_modules())
    handles = []

    def make(index: Tensor):
        def hook(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
            return _normalise_kept(mod, args[0], index.to(args[0].device))

        return hook

    try:
        for name, channels in keep.items():
            index = torch.tensor(sorted(int(c) for c in channels), dtype=torch.long)
            handles.append(modules[name].register_forward_hook(make(index)))
        yield
    finally:
        for h in handles:
            h.remove()
