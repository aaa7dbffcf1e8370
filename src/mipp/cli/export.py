"""``mipp export CHECKPOINT --out model.onnx``: a (pruned) checkpoint as a checked ONNX file.

The model is rebuilt from the checkpoint as ``mipp eval`` does (the sidecar's architecture,
its pruning replayed, the weights loaded) and exported with :func:`mipp.export.to_onnx`
(dynamic batch dimension); the ONNX model's outputs are compared with PyTorch's on seeded
random inputs before anything is written, and a mismatch is refused. The file is written
through a temporary file renamed into place. ``--out`` must end in ``.onnx``; an existing
file is replaced only with ``--force``, and never when it is the checkpoint or its sidecar.
Needs the optional extra ``mipp[onnx]`` (onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from mipp import __version__
from mipp.cli._common import fmt_int, make_console, positive_int, seed, size_table
from mipp.errors import MippError
from mipp.export import DEFAULT_ATOL, DEFAULT_RTOL, INSTALL_HINT, export_onnx, onnx_available
from mipp.metrics import count_params
from mipp.validation import expected_input_shape
from mipp.zoo.checkpoint import load_checkpoint, sidecar_path

__all__ = ["register", "run"]


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a (pruned) checkpoint to ONNX, checked against PyTorch",
        description="Rebuild the model of a checkpoint (pruned or not) and export it to ONNX "
        "with a dynamic batch dimension (torch.onnx.export, dynamo exporter). Before the file "
        "is written, onnxruntime runs it on seeded random inputs (batch 1, 2 and 3) and its "
        "outputs must equal PyTorch's: max |onnx - torch| <= atol + rtol * max |torch|. "
        f"Needs the optional dependencies: {INSTALL_HINT}.",
    )
    p.add_argument("checkpoint", help="path to a .safetensors checkpoint with its .json sidecar")
    p.add_argument("--out", required=True, help="the ONNX file to write (must end in .onnx)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace --out if it exists (never the checkpoint or its sidecar); the new file "
        "is renamed into place, so --out holds the old model or the new one, never a mixture",
    )
    p.add_argument(
        "--opset",
        type=positive_int,
        default=None,
        help="ONNX opset version (default: the exporter's, 20 with PyTorch 2.13)",
    )
    p.add_argument(
        "--rtol",
        type=_tolerance,
        default=DEFAULT_RTOL,
        help=f"relative tolerance of the check, against max |torch| (default {DEFAULT_RTOL:g})",
    )
    p.add_argument(
        "--atol",
        type=_tolerance,
        default=DEFAULT_ATOL,
        help=f"absolute tolerance of the check (default {DEFAULT_ATOL:g})",
    )
    p.add_argument(
        "--seed", type=seed, default=0, help="seed of the random check inputs (default 0)"
    )
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    p.set_defaults(func=run)


def _check_out(out: Path, checkpoint: str, *, force: bool) -> None:
    """Refuse an --out that is not an .onnx file name, is a directory, is an input of the
    command, or exists without --force — before any work."""
    if out.suffix != ".onnx":
        raise MippError(f"--out must be a file name ending in .onnx, got {str(out)!r}")
    if out.is_dir():
        raise MippError(f"--out {out} is a directory; give the ONNX file's path")
    inputs = (Path(checkpoint), sidecar_path(checkpoint))
    if any(os.path.abspath(out) == os.path.abspath(i) for i in inputs):
        raise MippError(f"--out {out} is an input of this command; choose another file")
    if out.exists() and not force:
        raise MippError(f"{out} exists; pass --force to replace it")


def run(args: argparse.Namespace) -> int:
    console = make_console()
    out = Path(args.out)
    _check_out(out, args.checkpoint, force=args.force)
    if not onnx_available():
        raise MippError(f"mipp export needs onnx, onnxruntime and onnxscript: {INSTALL_HINT}")
    ckpt = load_checkpoint(args.checkpoint)
    shape = expected_input_shape(ckpt.spec)
    example = torch.randn((2, *shape), generator=torch.Generator().manual_seed(args.seed))
    exported = export_onnx(
        ckpt.model,
        example,
        out,
        opset=args.opset,
        rtol=args.rtol,
        atol=args.atol,
        seed=args.seed,
        metadata={
            "mipp_version": __version__,
            "mipp_model": json.dumps(ckpt.spec.to_dict()),
            "mipp_checkpoint_sha256": str(ckpt.meta.get("sha256", "")),
            "mipp_pruned": str(bool(ckpt.meta.get("pruning"))).lower(),
        },
    )
    check = exported.check
    console.print(
        size_table(
            f"{ckpt.spec.name} → {out}",
            [
                ("pruned", "yes" if ckpt.meta.get("pruning") else "no"),
                ("parameters", fmt_int(count_params(ckpt.model))),
                ("input", f"{exported.input_name} (batch, {', '.join(map(str, shape))})"),
                ("opset", str(exported.opset)),
                ("file size", f"{fmt_int(len(exported.data))} bytes"),
                ("max |onnx - torch|", f"{check.max_abs_diff:.3g}"),
                (
                    "allowed",
                    f"{check.limit:.3g} (atol {check.atol:g} + rtol {check.rtol:g} x "
                    f"{check.max_abs_reference:.3g})",
                ),
                ("checked batches", ", ".join(map(str, check.batch_sizes))),
            ],
        )
    )
    if args.json:
        print(
            json.dumps(
                {
                    "out": str(out),
                    "opset": exported.opset,
                    "bytes": len(exported.data),
                    "input_shape": list(shape),
                    "max_abs_diff": check.max_abs_diff,
                    "max_abs_reference": check.max_abs_reference,
                    "rtol": check.rtol,
                    "atol": check.atol,
                    "batch_sizes": list(check.batch_sizes),
                }
            )
        )
    return 0
