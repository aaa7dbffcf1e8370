"""ONNX export of a (pruned) model, checked against PyTorch before anything is written, and
onnxruntime behind an ``nn.Module`` for timing.

:func:`to_onnx` exports with ``torch.onnx.export(..., dynamo=True)``, the ``torch.export``-based
exporter (PyTorch's default since 2.9; it needs ``onnxscript``; the TorchScript exporter is
deprecated and not used). The graph has one input ``"input"`` whose first dimension is
dynamic (``"batch"``) and one output ``"output"``. The exported model is then run in
onnxruntime (CPU) on seeded random inputs at batch sizes 1 and 3 and on the example input,
and compared with the PyTorch model in eval mode: it passes when

    max |onnx − torch| ≤ atol + rtol · max |torch|      (defaults rtol 1e-4, atol 1e-5),

i.e. agreement to 1e-4 of the output's scale in float32. A model that fails raises
:class:`OnnxMismatchError`; :func:`export_onnx` writes the file only after the check
passed, through a temporary file renamed into place (:func:`mipp._io.atomic_write_bytes`),
so a failed or interrupted export leaves nothing.

:class:`OnnxModule` runs exported bytes in an onnxruntime session as a module, so the
timing and evaluation code that takes an ``nn.Module`` (:func:`mipp.metrics.compare_latency`)
times onnxruntime the same way as PyTorch.

onnx, onnxruntime and onnxscript are the optional extra ``mipp[onnx]``; without them every
entry point raises :class:`OnnxUnavailableError` naming ``pip install 'mipp[onnx]'``.

>>> import mipp, torch
>>> net = mipp.create_model("lenet5", in_channels=1, input_size=28)
>>> exported = to_onnx(net, torch.randn(2, 1, 28, 28))  # doctest: +SKIP
>>> exported.check.passed, exported.input_name  # doctest: +SKIP
(True, 'input')
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mipp._io import atomic_write_bytes
from mipp.errors import MippError
from mipp.modules import eval_mode

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "INSTALL_HINT",
    "OnnxCheck",
    "OnnxExportError",
    "OnnxMismatchError",
    "OnnxModel",
    "OnnxModule",
    "OnnxUnavailableError",
    "export_onnx",
    "onnx_available",
    "to_onnx",
]

#: how to get the optional dependencies
INSTALL_HINT = "pip install 'mipp[onnx]'"
#: the check's tolerance: max |onnx − torch| ≤ DEFAULT_ATOL + DEFAULT_RTOL · max |torch|
DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5
#: batch sizes of the seeded random inputs the check runs (besides the example input)
CHECK_BATCH_SIZES = (1, 3)
INPUT_NAME = "input"
OUTPUT_NAME = "output"
_MODULES = ("onnx", "onnxruntime", "onnxscript")


class OnnxUnavailableError(MippError, ImportError):
    """onnx, onnxruntime or onnxscript is not installed (the optional extra ``mipp[onnx]``)."""


class OnnxExportError(MippError, RuntimeError):
    """``torch.onnx.export`` could not export the model; the message gives its first line."""


class OnnxMismatchError(MippError, ValueError):
    """The exported model's outputs differ from PyTorch's beyond the tolerance."""


def onnx_available() -> bool:
    """Whether onnx, onnxruntime and onnxscript are installed (nothing is imported)."""
    return all(importlib.util.find_spec(name) is not None for name in _MODULES)


def _require() -> Any:
    """Import onnxruntime (and check the exporter's dependencies), or raise one line."""
    missing = [name for name in _MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise OnnxUnavailableError(
            f"ONNX export and onnxruntime need {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed: {INSTALL_HINT}"
        )
    import onnxruntime

    return onnxruntime


@dataclass(frozen=True)
class OnnxCheck:
    """How the exported model's outputs compared with PyTorch's.

    Attributes:
        batch_sizes: the batch sizes run (the seeded inputs', then the example input's).
        max_abs_diff: max |onnx − torch| over every output element of every run.
        max_abs_reference: max |torch| over the same elements (the output's scale).
        rtol, atol: the tolerance; the check passes when
            ``max_abs_diff <= atol + rtol * max_abs_reference``.
    """

    batch_sizes: tuple[int, ...]
    max_abs_diff: float
    max_abs_reference: float
    rtol: float
    atol: float

    @property
    def limit(self) -> float:
        """The largest difference allowed, ``atol + rtol · max_abs_reference``."""
        return self.atol + self.rtol * self.max_abs_reference

    @property
    def passed(self) -> bool:
        return math.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.limit


@dataclass(frozen=True)
class OnnxModel:
    """An exported model that passed its check: the serialised ONNX bytes and the facts.

    Attributes:
        data: the ONNX model (protobuf bytes), what :func:`export_onnx` writes.
        opset: the ONNX operator set version of the default domain.
        input_name, output_name: the graph's input and output names.
        input_shape: one sample's shape (the batch dimension, dynamic, left out).
        check: the comparison with PyTorch (:class:`OnnxCheck`).
    """

    data: bytes = field(repr=False)
    opset: int
    input_name: str
    output_name: str
    input_shape: tuple[int, ...]
    check: OnnxCheck

    def module(self, *, threads: int | None = None) -> OnnxModule:
        """An :class:`OnnxModule` running this model in onnxruntime."""
        return OnnxModule(self.data, threads=threads)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's own warnings and log lines (missing torchvision ops, internal
    deprecations) for the block; the previous logger levels come back afterwards."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _session(data: bytes, *, threads: int | None) -> Any:
    ort = _require()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])


class OnnxModule(nn.Module):
    """An ONNX model run by onnxruntime on the CPU, as a module: ``forward(x)`` takes a
    ``(batch, *input_shape)`` tensor and returns the model's single output as a tensor.

    ``threads``: onnxruntime's intra-op threads (default: ``torch.get_num_threads()`` when
    the module is made, so that onnxruntime and PyTorch are timed with the same number);
    one inter-op thread, sequential execution. The module has no parameters and is not
    trainable; inputs are moved to the CPU.
    """

    def __init__(self, data: bytes, *, threads: int | None = None) -> None:
        super().__init__()
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
        ):
            raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
        self._session = _session(data, threads=threads)
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise OnnxExportError(
                f"an ONNX model with one input and one output is needed, this one has "
                f"{len(inputs)} inputs and {len(outputs)} outputs"
            )
        self.input_name = inputs[0].name

    def forward(self, x: Tensor) -> Tensor:
        out = self._session.run(None, {self.input_name: x.detach().cpu().numpy()})
        return torch.from_numpy(out[0])


def _trace_input(example: Tensor) -> Tensor:
    """Two samples to trace with: torch.export specialises a dimension of size 1, so a
    one-sample example is repeated (the batch dimension is marked dynamic either way)."""
    if len(example) >= 2:
        return example[:2]
    return example[:1].expand(2, *example.shape[1:]).contiguous()


def _check_args(example_input: Tensor, rtol: float, atol: float, seed: int) -> None:
    if not isinstance(example_input, Tensor) or example_input.ndim < 2:
        raise ValueError(
            "example_input must be a tensor (batch, *input_shape), got "
            + (
                f"shape {tuple(example_input.shape)}"
                if isinstance(example_input, Tensor)
                else type(example_input).__name__
            )
        )
    if len(example_input) < 1 or not example_input.is_floating_point():
        raise ValueError(
            f"example_input must hold at least one sample of floats, got shape "
            f"{tuple(example_input.shape)} and dtype {example_input.dtype}"
        )
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


def to_onnx(
    model: nn.Module,
    example_input: Tensor,
    *,
    opset: int | None = None,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    seed: int = 0,
    metadata: Mapping[str, str] | None = None,
) -> OnnxModel:
    """Export ``model`` to ONNX in memory and check it against PyTorch (module docstring).

    Args:
        model: the network (a CPU copy is exported when it lives elsewhere); exported and
            compared in eval mode, each submodule's mode restored afterwards. It must return
            one tensor.
        example_input: ``(n, *input_shape)``, n >= 1: the traced shape and dtype, and one
            of the checked inputs. The batch dimension is exported dynamic.
        opset: ONNX operator set version; None: the exporter's default (20 with
            PyTorch 2.13). Others are converted by onnxscript's version converter.
        rtol, atol: the check's tolerance (see :class:`OnnxCheck`).
        seed: seeds the random check inputs (a local generator; global RNG untouched).
        metadata: string pairs stored in the model's ``metadata_props``.

    Raises:
        OnnxUnavailableError: onnx, onnxruntime or onnxscript missing (``mipp[onnx]``).
        OnnxExportError: the exporter failed (first line of its error).
        OnnxMismatchError: the outputs differ beyond the tolerance.
    """
    _check_args(example_input, rtol, atol, seed)
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 7):
        raise ValueError(f"opset must be None or an ONNX opset version >= 7, got {opset!r}")
    _require()
    param = next(iter(model.parameters()), None)
    if param is not None and param.device.type != "cpu":
        model = copy.deepcopy(model).cpu()
    example = example_input.detach().cpu()
    with eval_mode(model), _quiet():
        try:
            program = torch.onnx.export(
                model,
                (_trace_input(example),),
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                verbose=False,
            )
            proto = program.model_proto
        except Exception as e:  # the exporter raises many types; the user gets one line
            raise OnnxExportError(
                f"torch.onnx.export could not export {type(model).__name__}: {_one_line(e)}"
            ) from None
        for key, value in (metadata or {}).items():
            proto.metadata_props.add(key=str(key), value=str(value))
        try:
            data = proto.SerializeToString()
        except ValueError as e:  # protobuf's 2 GiB limit
            raise OnnxExportError(f"the ONNX model cannot be serialised: {e}") from None
        onnx_module = OnnxModule(data)
        check = _compare(model, onnx_module, example, rtol=rtol, atol=atol, seed=seed)
    if not check.passed:
        raise OnnxMismatchError(
            f"the ONNX model's outputs differ from PyTorch's: max |onnx - torch| = "
            f"{check.max_abs_diff:.3g} > {check.limit:.3g} (atol {atol:g} + rtol {rtol:g} x "
            f"max |torch| {check.max_abs_reference:.3g}) on batch sizes "
            f"{', '.join(map(str, check.batch_sizes))}"
        )
    opsets = {o.domain: o.version for o in proto.opset_import}
    return OnnxModel(
        data=data,
        opset=int(opsets.get("", opsets.get("ai.onnx", 0))),
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        input_shape=tuple(example.shape[1:]),
        check=check,
    )


def _compare(
    model: nn.Module,
    onnx_module: OnnxModule,
    example: Tensor,
    *,
    rtol: float,
    atol: float,
    seed: int,
    batch_sizes: Sequence[int] = CHECK_BATCH_SIZES,
) -> OnnxCheck:
    generator = torch.Generator().manual_seed(seed)
    inputs = [
        torch.randn((b, *example.shape[1:]), generator=generator, dtype=example.dtype)
        for b in batch_sizes
    ]
    inputs.append(example)
    diff = scale = 0.0
    with torch.no_grad():
        for x in inputs:
            ref = model(x)
            if not isinstance(ref, Tensor):
                raise OnnxExportError(
                    f"{type(model).__name__} returned {type(ref).__name__}; one output "
                    f"tensor is needed"
                )
            got = onnx_module(x)
            if got.shape != ref.shape:
                raise OnnxMismatchError(
                    f"the ONNX model's output has shape {tuple(got.shape)} on a batch of "
                    f"{len(x)}, PyTorch's {tuple(ref.shape)}"
                )
            ref64, got64 = ref.double(), got.double()
            if not bool(torch.isfinite(got64).all() and torch.isfinite(ref64).all()):
                diff = math.inf  # a NaN or Inf output cannot be checked
                continue
            diff = max(diff, float((got64 - ref64).abs().max()))
            scale = max(scale, float(ref64.abs().max()))
    return OnnxCheck(
        batch_sizes=tuple(len(x) for x in inputs),
        max_abs_diff=diff,
        max_abs_reference=scale,
        rtol=float(rtol),
        atol=float(atol),
    )


def export_onnx(
    model: nn.Module,
    example_input: Tensor,
    path: str | os.PathLike[str],
    *,
    opset: int | None = None,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    seed: int = 0,
    metadata: Mapping[str, str] | None = None,
) -> OnnxModel:
    """Export ``model`` to the ONNX file ``path`` once its outputs match PyTorch's.

    :func:`to_onnx` (same arguments), then the bytes are written through a temporary file
    in the same directory renamed into place; an existing file is replaced. When the check
    fails nothing is written. Returns the :class:`OnnxModel`.

    >>> import mipp, tempfile, pathlib, torch
    >>> net = mipp.create_model("lenet5", in_channels=1, input_size=28)
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "lenet5.onnx"
    >>> exported = mipp.export_onnx(net, torch.randn(4, 1, 28, 28), path)  # doctest: +SKIP
    >>> path.read_bytes() == exported.data, exported.check.passed  # doctest: +SKIP
    (True, True)
    """
    exported = to_onnx(
        model, example_input, opset=opset, rtol=rtol, atol=atol, seed=seed, metadata=metadata
    )
    atomic_write_bytes(Path(path), exported.data)
    return exported
