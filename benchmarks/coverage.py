"""Which real-world architectures each pruner handles: MIPP, L1 and Torch-Pruning side by side.

    python benchmarks/coverage.py                          # every model (~1 h on 2 CPU cores)
    python benchmarks/coverage.py --models zoo-mobilenetv2,tv-mobilenet_v2,hf-bert \\
        --samples 64 --size 32 --out /tmp/coverage         # a smoke run, 2-4 min
    python benchmarks/coverage.py --list                   # the models and what they are
    python benchmarks/coverage.py --redo tv-resnet50       # run one model again, keep the rest

As a new user would try it: each model of :data:`MODELS` (torchvision, timm and Hugging Face
``transformers`` models built in code, and the mipp zoo replicas) is built with random
initialisation (seed 0) in eval mode, and pruned to ``--sparsity`` (0.5) by

- ``mipp``: ``mipp.prune(model, data, sparsity=0.5)`` (MIPP's defaults, ``scope="internal"``);
- ``mipp-all``: the same with ``scope="all"`` (residual streams too);
- ``l1``: ``mipp.prune(model, data, method="l1", sparsity=0.5)``;
- ``tp-l1``: Torch-Pruning's own ``MetaPruner(model, example_inputs,
  importance=MagnitudeImportance(p=1), pruning_ratio=0.5, ignored_layers=[output layer])``
  and ``step()`` on a deep copy (the output layer: the model's last ``nn.Linear``).

Calibration data: ``--samples`` random inputs of the model's shape (seeded N(0, 1) images of
``--size`` pixels — the zoo replicas always at 32 — or uniform token ids, ``--tokens`` long,
given to ``mipp.prune`` as a dict ``{"input_ids": ...}``; GPT-2 is built with
``use_cache=False``: Torch-Pruning cannot trace an output holding its key-value cache). No
labels: none of the four pruners uses them. Torch-Pruning gets the first two samples as its
example inputs.

Per (model, pruner) one row: ``status`` is ``ok`` (pruned, and the pruned model's forward
gives an output of the original's shape), ``refused`` (the pruner raised: ``error`` holds the
exception type and its first line), ``broken`` (it returned a model whose forward raises or
whose output shape differs), ``timeout`` (over ``--timeout`` seconds), ``crashed`` (the
model's process died) or ``skipped`` (its package is not importable, or the model cannot be
built or run). ``check`` says what an ``ok`` means: ``verified`` for mipp, which compares the
pruned model with the masked original inside ``prune`` (and raises
``PruningVerificationError`` otherwise), ``forward+shape`` for Torch-Pruning, whose output
cannot simply be compared with a masked original. Also: parameters before and after (unique
parameters, tied ones once), the share removed, MIPP's achieved share of units, and the wall
time of the pruning call alone (recorded, not asserted).

Each model runs in its own process (``--timeout`` per pruner, by ``SIGALRM``; the process is
killed after ``4 × --timeout`` + 5 min), so a failure or a hang never stops the table. The run
resumes: each finished model's rows are kept in ``<out>/coverage-parts/<model>.json`` with
the settings they were made under, and a later run with the same settings takes them instead
of running the model again (``--redo MODELS`` runs those again; a stopped run loses only the
model it was on). Writes ``<out>/coverage.{csv,json}`` (rows; the JSON also holds the
command, the settings, the package versions, the machine and the date) and prints a markdown
table to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _results import write_results
from torch import nn

OUT = Path(__file__).parent / "results"
STEM = "coverage"
PRUNERS = ("mipp", "mipp-all", "l1", "tp-l1")
PACKAGES = ("torch", "torchvision", "timm", "transformers", "torch-pruning", "mipp")
ZOO_SIZE = 32


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- models


def import_torchvision():
    """``import torchvision``, working around a torchvision build whose compiled operators do
    not load against this torch (a CUDA wheel next to a CPU torch: the import fails with
    "operator torchvision::nms does not exist"). Declaring the two operator schemas its Python
    code registers fake kernels for lets the import finish; the model definitions work, only
    the compiled ops (``nms``, ``deform_conv2d``, image decoding) stay unusable."""
    try:
        import torchvision
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for name in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_torchvision.keep = lib  # the schemas live as long as this object
        import torchvision
    return torchvision


def import_source(source: str) -> None:
    """Import a model's package. timm and transformers import torchvision when it is installed,
    so it goes first, through the workaround (its failure only matters to its own models)."""
    if source == "torchvision" or importlib.util.find_spec("torchvision") is not None:
        try:
            import_torchvision()
        except Exception:
            if source == "torchvision":
                raise
    if source not in ("torchvision", "mipp"):
        importlib.import_module(source)


def tv(name: str, **options: Any) -> Callable[[int], nn.Module]:
    def build(size: int) -> nn.Module:
        return getattr(import_torchvision().models, name)(**options)

    return build


def tv_vit_ti(size: int) -> nn.Module:
    vit = import_torchvision().models.vision_transformer
    return vit.VisionTransformer(
        image_size=size, patch_size=16, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768
    )


def timm_model(name: str, **options: Any) -> Callable[[int], nn.Module]:
    def build(size: int) -> nn.Module:
        import timm

        extra = {"img_size": size} if "vit" in name else {}
        return timm.create_model(name, pretrained=False, **options, **extra)

    return build


def hf_bert(size: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=64, num_labels=2,
    ))  # fmt: skip


def hf_gpt2(size: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0, use_cache=False)  # fmt: skip
    return GPT2LMHeadModel(config)


def hf_vit(size: int) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(
        image_size=size, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, num_labels=10,
    ))  # fmt: skip


def zoo(name: str) -> Callable[[int], nn.Module]:
    def build(size: int) -> nn.Module:
        import mipp

        return mipp.create_model(name, input_size=ZOO_SIZE)

    return build


VOCAB = 1000


@dataclass(frozen=True)
class Spec:
    """One model of the table: how to build it (from the image size) and what it reads."""

    source: str  # the package it comes from (skipped when that is not importable)
    build: Callable[[int], nn.Module]
    inputs: str  # "image", "image32" (always 32 px) or "tokens"
    about: str


MODELS: dict[str, Spec] = {
    "tv-resnet18": Spec("torchvision", tv("resnet18"), "image", "ResNet-18"),
    "tv-resnet50": Spec("torchvision", tv("resnet50"), "image", "ResNet-50"),
    "tv-vgg11_bn": Spec("torchvision", tv("vgg11_bn"), "image", "VGG-11 with BatchNorm"),
    "tv-mobilenet_v2": Spec("torchvision", tv("mobilenet_v2"), "image", "MobileNetV2"),
    "tv-mobilenet_v3_small": Spec("torchvision", tv("mobilenet_v3_small"), "image",
                                  "MobileNetV3-Small (squeeze-excitation, hardswish)"),
    "tv-efficientnet_b0": Spec("torchvision", tv("efficientnet_b0"), "image",
                               "EfficientNet-B0 (squeeze-excitation, SiLU, stochastic depth)"),
    "tv-regnet_x_400mf": Spec("torchvision", tv("regnet_x_400mf"), "image",
                              "RegNetX-400MF (grouped convolutions)"),
    "tv-shufflenet_v2_x1_0": Spec("torchvision", tv("shufflenet_v2_x1_0"), "image",
                                  "ShuffleNetV2 1.0× (channel split, concat and shuffle)"),
    "tv-densenet121": Spec("torchvision", tv("densenet121"), "image",
                           "DenseNet-121 (concatenated features)"),
    "tv-googlenet": Spec("torchvision", tv("googlenet", aux_logits=False, init_weights=True),
                         "image", "GoogLeNet / Inception v1 (branch concat), no aux heads"),
    "tv-convnext_tiny": Spec("torchvision", tv("convnext_tiny"), "image",
                             "ConvNeXt-T (depthwise 7×7, LayerNorm, layer scale)"),
    "tv-vit_ti_16": Spec("torchvision", tv_vit_ti, "image",
                         "torchvision VisionTransformer at ViT-Ti/16 size (12 layers, 192 wide, "
                         "3 heads; nn.MultiheadAttention, class token)"),
    "timm-resnet18": Spec("timm", timm_model("resnet18"), "image", "timm ResNet-18"),
    "timm-efficientnet_b0": Spec("timm", timm_model("efficientnet_b0"), "image",
                                 "timm EfficientNet-B0"),
    "timm-convnext_atto": Spec("timm", timm_model("convnext_atto"), "image",
                               "timm ConvNeXt-Atto"),
    "timm-vit_tiny_patch16_224": Spec("timm", timm_model("vit_tiny_patch16_224"), "image",
                                      "timm ViT-Ti/16 at --size px (fused qkv Linear)"),
    "hf-bert": Spec("transformers", hf_bert, "tokens",
                    "BertForSequenceClassification: hidden 64, 2 layers, 4 heads, vocab 1000"),
    "hf-gpt2": Spec("transformers", hf_gpt2, "tokens",
                    "GPT2LMHeadModel: 64 wide, 2 layers, 4 heads, vocab 1000 (Conv1D, tied head)"),
    "hf-vit": Spec("transformers", hf_vit, "image",
                   "ViTForImageClassification: patch 8, hidden 64, 2 layers, 4 heads"),
    "zoo-resnet18": Spec("mipp", zoo("resnet18"), "image32", "mipp zoo ResNet-18 (32 px)"),
    "zoo-resnet50": Spec("mipp", zoo("resnet50"), "image32", "mipp zoo ResNet-50 (32 px)"),
    "zoo-vgg11": Spec("mipp", zoo("vgg11"), "image32", "mipp zoo VGG-11 with BatchNorm (32 px)"),
    "zoo-mobilenetv2": Spec("mipp", zoo("mobilenetv2"), "image32", "mipp zoo MobileNetV2 (32 px)"),
    "zoo-convnext": Spec("mipp", zoo("convnext"), "image32", "mipp zoo ConvNeXt (32 px)"),
    "zoo-vit": Spec("mipp", zoo("vit"), "image32", "mipp zoo ViT, 4×4 patches (32 px)"),
    "zoo-googlenet": Spec("mipp", zoo("googlenet"), "image32",
                          "mipp zoo GoogLeNet, four-branch Inception modules (32 px)"),
}  # fmt: skip


def make_inputs(spec: Spec, n: int, size: int, tokens: int, seed: int):
    """The calibration inputs: a float tensor of images, or a dict of token ids."""
    g = torch.Generator().manual_seed(seed)
    if spec.inputs == "tokens":
        return {"input_ids": torch.randint(0, VOCAB, (n, tokens), generator=g)}
    side = ZOO_SIZE if spec.inputs == "image32" else size
    return torch.randn(n, 3, side, side, generator=g)


def head(batch, k: int):
    return {key: v[:k] for key, v in batch.items()} if isinstance(batch, dict) else batch[:k]


def describe(batch) -> str:
    if isinstance(batch, dict):
        return ", ".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in batch.items())
    return f"{tuple(batch.shape)} {batch.dtype}"


def run(model: nn.Module, batch) -> torch.Tensor:
    """The model's output tensor on ``batch``: the tensor, a Hugging Face output's ``logits``
    or the first element of a tuple."""
    with torch.no_grad():
        out = model(**batch) if isinstance(batch, dict) else model(batch)
    if hasattr(out, "logits"):
        out = out.logits
    if isinstance(out, tuple | list):
        out = out[0]
    return out


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def output_layer(model: nn.Module) -> nn.Module:
    """The classifier / output projection: the model's last ``nn.Linear`` in registration order
    (``fc``, ``classifier``, ``head``, ``lm_head``), else its last ``nn.Conv2d``."""
    for kind in (nn.Linear, nn.Conv2d):
        layers = [m for m in model.modules() if isinstance(m, kind)]
        if layers:
            return layers[-1]
    raise ValueError(f"{type(model).__name__} has no Linear or Conv2d output layer")


# ------------------------------------------------------------------------------- pruners


def prune_mipp(model, data, sparsity, n, **options) -> tuple[nn.Module, dict]:
    import mipp

    result = mipp.prune(model, data, sparsity=sparsity, calib_samples=n, **options)
    report = result.report
    return result.model, {
        "check": "verified" if "verify" in report.timings else "unverified",
        "units_removed": round(report.achieved.get("units", float("nan")), 4),
        "groups": len(report.groups),
    }


def prune_tp(model, data, sparsity, n) -> tuple[nn.Module, dict]:
    import torch_pruning as tp

    work = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(
        work,
        head(data, 2),
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=sparsity,
        ignored_layers=[output_layer(work)],
    )
    pruner.step()
    return work, {"check": "forward+shape"}


PRUNE: dict[str, Callable[..., tuple[nn.Module, dict]]] = {
    "mipp": prune_mipp,
    "mipp-all": lambda *a: prune_mipp(*a, scope="all"),
    "l1": lambda *a: prune_mipp(*a, method="l1"),
    "tp-l1": prune_tp,
}


class PrunerTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so that no ``except Exception`` in a pruner eats it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def ring(signum, frame):
        raise PrunerTimeout

    if seconds <= 0:
        yield
        return
    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_line(e: BaseException, limit: int = 200) -> str:
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0] if lines else ''}".strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def row(name: str, pruner: str, status: str, **fields: Any) -> dict[str, Any]:
    spec = MODELS[name]
    base = {
        "model": name,
        "source": spec.source,
        "pruner": pruner,
        "status": status,
        "error": "",
        "check": "",
        "input": "",
        "params_before": "",
        "params_after": "",
        "params_removed": "",
        "units_removed": "",
        "groups": "",
        "seconds": "",
    }
    base.update(fields)
    return base


def worker(name: str, args: argparse.Namespace, emit: Callable[[dict], None]) -> None:
    """Build ``name``, run every pruner on it, ``emit`` one row per pruner as it finishes."""
    spec = MODELS[name]
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import_source(spec.source)
    except Exception as e:
        for pruner in PRUNERS:
            emit(row(name, pruner, "skipped", error=f"{spec.source} not importable: "
                     f"{one_line(e)}"))  # fmt: skip
        return
    # imported before any clock or alarm runs: torch_pruning imports timm (and so torchvision)
    # inside a bare ``except:``, which would swallow the alarm, and imports are no pruning time
    import torch_pruning  # noqa: F401

    import mipp  # noqa: F401

    try:
        torch.manual_seed(0)
        model = spec.build(args.size).eval()
        data = make_inputs(spec, args.samples, args.size, args.tokens, seed=1)
        probe = head(data, 8)
        expected = run(model, probe).shape
    except Exception as e:
        for pruner in PRUNERS:
            emit(row(name, pruner, "skipped", error=f"could not build or run: {one_line(e)}"))
        return
    before = count_params(model)
    for pruner in PRUNERS:
        log(f"{args.progress} {name} {pruner}: pruning")
        common = {"input": describe(data), "params_before": before}
        t = time.perf_counter()
        try:
            with time_limit(args.timeout):
                pruned, extra = PRUNE[pruner](model, data, args.sparsity, args.samples)
                seconds = round(time.perf_counter() - t, 2)
                after = count_params(pruned)
                common |= {"params_after": after, "params_removed": round(1 - after / before, 4),
                           "seconds": seconds, **extra}  # fmt: skip
                try:
                    got = run(pruned.eval(), probe).shape
                except Exception as e:
                    r = row(
                        name, pruner, "broken", error=f"{one_line(e)} (pruned forward)", **common
                    )
                else:
                    r = (row(name, pruner, "ok", **common) if got == expected else
                         row(name, pruner, "broken", error=f"output shape {tuple(got)}, expected "
                             f"{tuple(expected)}", **common))  # fmt: skip
        except PrunerTimeout:
            common["seconds"] = round(time.perf_counter() - t, 2)
            r = row(name, pruner, "timeout", error=f"over --timeout {args.timeout:g} s", **common)
        except Exception as e:
            common["seconds"] = round(time.perf_counter() - t, 2)
            r = row(name, pruner, "refused", error=one_line(e), **common)
        emit(r)
        log(progress_line(r, args.progress))


# ------------------------------------------------------------------------------- driver


def run_model(name: str, args: argparse.Namespace, progress: str) -> list[dict]:
    """``name`` in a child process (this script with ``--worker``); rows of pruners it did not
    finish are ``timeout`` (killed for time) or ``crashed``."""
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = Path(tmp) / "rows.jsonl"
        command = [sys.executable, __file__, "--worker", name, "--rows-to", str(rows_path),
                   "--size", str(args.size), "--samples", str(args.samples),
                   "--tokens", str(args.tokens), "--sparsity", str(args.sparsity),
                   "--timeout", str(args.timeout), "--progress", progress]  # fmt: skip
        if args.threads:
            command += ["--threads", str(args.threads)]
        limit = args.timeout * len(PRUNERS) + 300 if args.timeout > 0 else None
        outcome = "crashed"
        try:
            proc = subprocess.run(command, stdout=sys.stderr, timeout=limit, check=False)
            outcome = "" if proc.returncode == 0 else f"crashed (exit code {proc.returncode})"
        except subprocess.TimeoutExpired:
            outcome = "timeout"
        rows = []
        if rows_path.exists():
            rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line]
    done = {r["pruner"] for r in rows}
    for pruner in PRUNERS:
        if pruner not in done:
            status = "timeout" if outcome == "timeout" else "crashed"
            rows.append(row(name, pruner, status, error=outcome or "no row written"))
            log(progress_line(rows[-1], progress))
    rows.sort(key=lambda r: PRUNERS.index(r["pruner"]))
    return rows


def progress_line(r: dict, prefix: str) -> str:
    took = f" ({r['seconds']} s)" if r["seconds"] != "" else ""
    return f"{prefix} {r['model']} {r['pruner']}: {r['status']}{took}" + (
        f" {r['error']}" if r["error"] else ""
    )


def cell(r: dict) -> str:
    if r["status"] == "ok":
        removed = r["params_removed"]
        return f"ok (−{removed:.0%} params)" if removed > 0 else "ok (nothing removed)"
    if r["status"] in ("refused", "broken"):
        return f"{r['status']}: {r['error'].split(':')[0]}"
    return r["status"]


def table(rows: list[dict], names: list[str]) -> str:
    lines = ["| model | " + " | ".join(PRUNERS) + " |", "|---" * (len(PRUNERS) + 1) + "|"]
    for name in names:
        by = {r["pruner"]: r for r in rows if r["model"] == name}
        lines.append(f"| {name} | " + " | ".join(cell(by[p]) for p in PRUNERS) + " |")
    notes = [f"- {r['model']} / {r['pruner']}: {r['status']}: {r['error']}"
             for r in rows if r["status"] != "ok" and r["error"]]  # fmt: skip
    return "\n".join(lines + (["", *notes] if notes else []))


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated names (default: all; see --list)")  # fmt: skip
    parser.add_argument("--list", action="store_true", help="print the models and exit")
    parser.add_argument("--size", type=int, default=64,
                        help="image side in pixels (zoo models: always 32)")  # fmt: skip
    parser.add_argument("--samples", type=int, default=256, help="calibration samples")
    parser.add_argument("--tokens", type=int, default=16, help="sequence length of text models")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds per (model, pruner); 0: none")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default all)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--redo", default="",
                        help="models to run again even if a part is kept")  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rows-to", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--progress", default="", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        with open(args.rows_to, "a") as f:

            def emit(r: dict) -> None:
                f.write(json.dumps(r) + "\n")
                f.flush()
                os.fsync(f.fileno())

            worker(args.worker, args, emit)
        return 0
    if args.list:
        for name, spec in MODELS.items():
            print(f"{name:28s} {spec.about}")
        return 0
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    redo = {m.strip() for m in args.redo.split(",") if m.strip()}
    unknown = [m for m in [*names, *sorted(redo)] if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; valid: {', '.join(MODELS)}")
    command = "python benchmarks/coverage.py " + " ".join(sys.argv[1:] if argv is None else argv)
    settings = {
        "size": args.size,
        "zoo_size": ZOO_SIZE,
        "samples": args.samples,
        "tokens": args.tokens,
        "sparsity": args.sparsity,
        "timeout_s": args.timeout,
        "threads": args.threads or torch.get_num_threads(),
        "seed": 0,
    }
    parts = args.out / f"{STEM}-parts"
    rows: list[dict] = []
    t0 = time.perf_counter()
    for k, name in enumerate(names, 1):
        part = parts / f"{name}.json"
        kept = json.loads(part.read_text()) if part.exists() and name not in redo else None
        if kept is not None and kept["settings"] == settings:
            log(f"[{k}/{len(names)}] {name}: kept from {part}")
            rows += kept["rows"]
            continue
        log(f"[{k}/{len(names)}] {name}: {MODELS[name].about}")
        got = run_model(name, args, progress=f"[{k}/{len(names)}]")
        parts.mkdir(parents=True, exist_ok=True)
        tmp = part.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"settings": settings, "rows": got}, indent=1))
        tmp.replace(part)  # atomic: a part is whole or absent
        rows += got
    meta = {
        "command": command,
        "settings": {"models": names, **settings},
        "versions": versions(),
        "models": {
            name: {"source": MODELS[name].source, "about": MODELS[name].about} for name in names
        },
        "seconds": round(time.perf_counter() - t0, 1),  # this invocation (kept parts: 0)
        "table": table(rows, names),
    }
    write_results(args.out / STEM, rows, meta)
    print(meta["table"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
