"""What mipp knows about layer types: which modules it prunes around and how.

- unit layers: Conv1d / Conv2d (grouped and depthwise included) and Linear;
- normalisations pruned with their channels (BatchNorm, InstanceNorm, GroupNorm, LayerNorm),
  some of which normalise across channels (:func:`renormalises`);
- attention modules (their heads, :func:`head_size`; ``nn.MultiheadAttention``, never
  pruned) and embedding tables (never pruned);
- loose per-channel parameters of other modules (:func:`unsupported_modules`), and every
  module mipp refuses, named at once (:func:`check_modules`).

:mod:`mipp.surgery.structure` builds unit groups from these facts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mipp.errors import MippError

__all__ = [
    "ATTENTION",
    "NORMS",
    "TABLES",
    "UNIT_LAYERS",
    "UnsupportedModuleError",
    "as_linears",
    "check_modules",
    "conv_groups",
    "head_size",
    "input_weights",
    "is_depthwise",
    "is_norm",
    "is_transposed_linear",
    "norm_width",
    "renormalises",
    "restore_transposed",
    "set_heads",
    "unsupported_modules",
    "zero_inputs",
]

UNIT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
#: normalisation layers, pruned with the channels they normalise (see :func:`renormalises`)
NORMS = (
    *BATCHNORMS,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.GroupNorm,
    nn.LayerNorm,
)
#: attention modules holding their own projections: their embedding width is a residual
#: stream's, pruned (like every stream) only with scope "all"; their heads are never pruned
ATTENTION = (nn.MultiheadAttention,)
#: lookup tables reading token ids: supported, never pruned (a group tied to one is skipped)
TABLES = (nn.Embedding, nn.EmbeddingBag)


def is_depthwise(module: nn.Module) -> bool:
    """A depthwise convolution: ``groups == in_channels == out_channels > 1`` (each output
    channel reads its own input channel only)."""
    return (
        isinstance(module, nn.Conv1d | nn.Conv2d)
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer mipp prunes with its channels (BatchNorm1d/2d, InstanceNorm1d/2d,
    GroupNorm, LayerNorm)."""
    return isinstance(module, NORMS)


def norm_width(module: nn.Module) -> int:
    """The number of channels a normalisation layer holds."""
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    return module.num_features


def renormalises(module: nn.Module) -> bool:
    """A normalisation whose statistics span several channels: a LayerNorm over the channel
    dimension, or a GroupNorm with fewer groups than channels. Removing a channel there
    changes how the kept channels are normalised (the pruned model normalises over the kept
    channels only), unlike a BatchNorm / InstanceNorm, which normalises each channel alone."""
    if isinstance(module, nn.LayerNorm):
        return True
    return isinstance(module, nn.GroupNorm) and module.num_groups < module.num_channels


def conv_groups(module: nn.Module) -> int:
    """The ``groups`` of a Conv (1 for a Linear)."""
    return module.groups if isinstance(module, nn.Conv1d | nn.Conv2d) else 1


class UnsupportedModuleError(MippError, TypeError):
    """The model holds a module mipp cannot prune around; the message names it and its type."""


def head_size(module: nn.Module) -> int | None:
    """The head size an attention module declares (``attention_head_size`` or
    ``head_dim``, a positive int), else None."""
    for attr in ("attention_head_size", "head_dim"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def set_heads(module: nn.Module, heads: int, size: int) -> None:
    """Update an attention module's head-count attributes after a head removal."""
    for attr, value in (
        ("num_attention_heads", heads),
        ("num_heads", heads),
        ("all_head_size", heads * size),
        ("attn_dim", heads * size),  # timm's Attention
        ("split_size", heads * size),  # GPT-2's: the width of each of q, k and v
    ):
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, value)


def input_weights(module: nn.Module, idxs: Sequence[int]) -> list[tuple[slice, list[int]]]:
    """Where a Conv/Linear's weights for input channels ``idxs`` are: a list of (output rows,
    weight columns). A grouped conv's input channel c is column ``c mod (in/groups)`` of the
    output rows of its block ``c // (in/groups)``; otherwise column c of every row."""
    g = conv_groups(module)
    if g == 1:
        return [(slice(None), list(idxs))]
    per_in = module.in_channels // g
    per_out = module.out_channels // g
    blocks: dict[int, list[int]] = {}
    for c in idxs:
        blocks.setdefault(int(c) // per_in, []).append(int(c) % per_in)
    return [(slice(b * per_out, (b + 1) * per_out), cols) for b, cols in sorted(blocks.items())]


def zero_inputs(module: nn.Module, idxs: Sequence[int]) -> None:
    """Zero the weights of a Conv/Linear that read its input channels ``idxs`` (in place;
    grouped convs included)."""
    with torch.no_grad():
        for rows, cols in input_weights(module, idxs):
            module.weight[rows, cols] = 0


def is_transposed_linear(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2, GPT): a Linear whose weight is stored transposed,
    ``(in, out)``, with ``nf`` output features and ``y = x W + b``."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(getattr(module, "nf", None), int)
        and isinstance(weight, torch.Tensor)
        and weight.ndim == 2
        and weight.shape[1] == module.nf
    )


def as_linears(model: nn.Module) -> dict[str, type]:
    """Replace, in place, every transposed Linear (:func:`is_transposed_linear`) by the
    ``nn.Linear`` computing the same function (its weight transposed; the same Parameter
    names, dtype, device and ``requires_grad``); returns name → the replaced module's class,
    for :func:`restore_transposed`. The rest of mipp then sees plain Linear layers."""
    replaced: dict[str, type] = {}
    for name, m in list(model.named_modules()):
        if not name or not is_transposed_linear(m):
            continue
        w, b = m.weight, getattr(m, "bias", None)
        lin = nn.Linear(w.shape[0], w.shape[1], bias=b is not None, device=w.device, dtype=w.dtype)
        _set_submodule(model, name, _transposed_copy(m, lin))
        replaced[name] = type(m)
    return replaced


def restore_transposed(model: nn.Module, replaced: dict[str, type]) -> None:
    """Undo :func:`as_linears` in place: each named Linear (now perhaps narrower) becomes
    its original class again, built as ``cls(nf=out, nx=in)`` and given the weights."""
    for name, cls in replaced.items():
        lin = model.get_submodule(name)
        m = cls(lin.out_features, lin.in_features).to(lin.weight.device, lin.weight.dtype)
        _set_submodule(model, name, _transposed_copy(lin, m))


def _transposed_copy(src: nn.Module, dst: nn.Module) -> nn.Module:
    """``dst`` given ``src``'s weight transposed and its bias, their ``requires_grad`` and
    ``src``'s training mode."""
    with torch.no_grad():
        dst.weight.copy_(src.weight.T)
        if src.bias is not None:
            dst.bias.copy_(src.bias)
    dst.weight.requires_grad_(src.weight.requires_grad)
    if src.bias is not None:
        dst.bias.requires_grad_(src.bias.requires_grad)
    return dst.train(src.training)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def unsupported_modules(model: nn.Module) -> list[str]:
    """Every module of ``model`` mipp cannot prune around, each as ``'name' (Type)`` (the
    root module as ``<root>``), in definition order; empty when the model is supported.

    Supported: Conv1d / Conv2d (grouped and depthwise included), Linear, BatchNorm1d / 2d,
    InstanceNorm1d / 2d, GroupNorm, LayerNorm over one dimension, nn.MultiheadAttention,
    per-channel parameters of other modules (:func:`_channel_dim`: layer-scale gammas,
    PReLU slopes, ``cls_token`` / ``pos_embed``, sliced with the channels they index),
    Embedding / EmbeddingBag (never pruned) and any module without parameters of its own
    (activations, pooling, dropout, reshapes).
    """
    out = []
    for name, m in model.named_modules():
        label = f"{name or '<root>'!r} ({type(m).__name__})"
        if isinstance(m, nn.Conv3d | nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d):
            out.append(label)
            continue
        if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) != 1:
            out.append(f"{label[:-1]} over {len(m.normalized_shape)} dimensions)")
            continue
        if isinstance(m, UNIT_LAYERS + NORMS + TABLES + ATTENTION) or is_transposed_linear(m):
            continue
        own = [n for n, p in m.named_parameters(recurse=False) if _channel_dim(p) is None]
        if own:
            out.append(label if name else f"{label[:-1]}, parameters {', '.join(own)})")
    return out


def _channel_dim(param: torch.Tensor) -> int | None:
    """The dimension a loose parameter (one held by a module other than a layer mipp knows)
    indexes channels along, or None when its layout is not a per-channel one.

    Accepted: a scalar (-1: indexes nothing), a vector-like tensor with one dimension larger
    than 1 (a layer-scale gamma ``(C,)`` or ``(C, 1, 1)``, a PReLU slope) and a token table
    ``(1, ..., D)`` (a ``cls_token``, a learned ``pos_embed``: the last dimension). Anything
    else — a weight matrix of a module mipp does not know — is not. Torch-Pruning slices the
    accepted ones along their last dimension larger than 1 (the one returned here) with the
    channels they are added to or concatenated with.
    """
    wide = [i for i, n in enumerate(param.shape) if n > 1]
    if not wide:
        return -1
    if len(wide) == 1:
        return wide[0]
    if param.ndim >= 3 and param.shape[0] == 1 and wide[-1] == param.ndim - 1:
        return param.ndim - 1
    return None


def check_modules(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModuleError` naming every module of :func:`unsupported_modules`
    at once (one line); nothing runs the model."""
    bad = unsupported_modules(model)
    if bad:
        raise UnsupportedModuleError(
            f"{len(bad)} module{'s' if len(bad) > 1 else ''} mipp cannot prune around: "
            f"{', '.join(bad)} (supported: Conv1d/Conv2d, grouped and depthwise included, "
            f"Linear, BatchNorm, InstanceNorm, GroupNorm, LayerNorm over one dimension, "
            f"MultiheadAttention, Embedding, per-channel parameters and modules without "
            f"parameters)"
        )
