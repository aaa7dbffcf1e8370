"""Calibration inputs of any form (issue 15, "Inputs"): integer token ids, keyword and
positional inputs, DataLoaders of dicts, Hugging Face style outputs and ``forward=``."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import mipp
from helpers import zero_consumers
from mipp.errors import MippError
from mipp.inputs import ModelOutputError, Samples
from mipp.methods import METHOD_NAMES
from mipp.surgery.calibration import UnscaledInputWarning, calibration_inputs
from mipp.surgery.structure import build_structure
from mipp.zoo.training import seeded


class TokenNet(nn.Module):
    """Token ids ``(n, 16)`` → embedding → mean over positions → three Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 24)
        self.out = nn.Linear(24, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(self.emb(ids).mean(1)))
        return self.out(torch.relu(self.fc2(h)))


class PairNet(nn.Module):
    """Two float inputs ``a``, ``b`` ``(n, 4)`` by keyword (or position), concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, a: torch.Tensor | None = None, b: torch.Tensor | None = None):
        h = torch.relu(self.fc1(torch.cat([a, b], dim=1)))
        return self.out(torch.relu(self.fc2(h)))


class FlatNet(PairNet):
    """:class:`PairNet` taking one tensor ``(n, 8)``: the same modules, names and outputs."""

    def forward(self, x: torch.Tensor):  # type: ignore[override]
        return super().forward(a=x[:, :4], b=x[:, 4:])


@dataclass
class Output:
    """A Hugging Face ``ModelOutput`` in miniature: logits and something else."""

    logits: torch.Tensor
    hidden: torch.Tensor


class OutputNet(PairNet):
    """:class:`FlatNet` returning an :class:`Output`."""

    def forward(self, x: torch.Tensor):  # type: ignore[override]
        hidden = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        return Output(logits=self.out(hidden), hidden=hidden)


def _pair_data(n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _kept(result) -> dict[str, list[int]]:
    return {g.name: g.kept for g in result.report.groups}


@pytest.mark.parametrize("method", ["mipp", "l1"])
def test_token_ids_stay_integers_and_removal_is_exact(method):
    with seeded(0):
        model = TokenNet().eval()
    ids = torch.randint(0, 50, (512, 16), generator=torch.Generator().manual_seed(0))
    seen: list[torch.dtype] = []  # the hook's closure outlives the pipeline's deep copies
    model.emb.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnscaledInputWarning)  # ids are not unscaled images
        result = mipp.prune(model, ids, method=method, sparsity=0.5, compensate=False)
    assert seen and set(seen) == {torch.int64}
    assert abs(result.report.achieved["units"] - 0.5) <= 0.01
    assert result.report.input_shape == [16]
    masked = copy.deepcopy(model).double()  # float64: exactness, not float32 round-off
    pruned = copy.deepcopy(result.model).double()
    zero_consumers(masked, build_structure(masked, ids[:2]), result.report.removed)
    with torch.no_grad():
        assert (pruned(ids) - masked(ids)).abs().max().item() < 1e-6


def test_token_ids_reach_the_repairs_as_integers():
    with seeded(0):
        model = TokenNet().eval()
    ids = torch.randint(0, 50, (512, 16), generator=torch.Generator().manual_seed(1))
    result = mipp.prune(model, ids, sparsity=0.5)  # MIPP's default: compensation on
    fits = result.report.compensation
    assert [f["layer"] for f in fits] == ["fc2", "out"] and all(f["rows"] == 512 for f in fits)
    plain = mipp.prune(model, ids, sparsity=0.5, compensate=False)
    assert _kept(plain) == _kept(result)
    with torch.no_grad():
        want = model(ids)
        gap = (result.model(ids) - want).pow(2).mean()
        assert gap < (plain.model(ids) - want).pow(2).mean()  # re-fitted on the ids
    # the rule: a bare integer tensor stays integer for a model with an embedding only
    xs, _ = calibration_inputs(ids, 100, seed=0, keep_integers=True)
    assert xs.dtype == torch.int64
    with pytest.warns(UnscaledInputWarning):
        xs, _ = calibration_inputs(ids, 100, seed=0)
    assert xs.dtype == torch.float32


def test_keyword_and_positional_inputs_keep_the_units_of_one_tensor():
    with seeded(0):
        flat = FlatNet().eval()
    pair = PairNet().eval()
    pair.load_state_dict(flat.state_dict())
    x, y = _pair_data()
    a, b = x[:, :4], x[:, 4:]
    want = mipp.prune(flat, x, sparsity=0.5)
    rows = [{"a": a[i], "b": b[i]} for i in range(len(x))]
    forms = {
        "dict": {"a": a, "b": b},
        "dataloader of dicts": DataLoader(rows, batch_size=64),
        "positional": ((a, b), None),
        "labelled dataloader of dicts": DataLoader(list(zip(rows, y, strict=True)), batch_size=64),
        # the default collate turns each ((a_i, b_i), y_i) into a list [[a, b], y]
        "labelled dataloader of positional": DataLoader(
            [((a[i], b[i]), y[i]) for i in range(len(x))], batch_size=64
        ),
        "per-sample dicts": [(row, int(label)) for row, label in zip(rows, y, strict=True)],
    }
    for form in ("labelled dataloader of dicts", "labelled dataloader of positional"):
        inputs, labels = calibration_inputs(forms[form], len(x), seed=0)
        assert torch.equal(labels, y), form
        assert torch.equal(inputs["a"] if isinstance(inputs, dict) else inputs[0], a), form
    for form, data in forms.items():
        got = mipp.prune(pair, data, sparsity=0.5)
        assert _kept(got) == _kept(want), form
        assert got.report.input_shape == [4]
        with torch.no_grad():  # compensation re-fitted the same weights
            assert torch.allclose(got.model(a=a, b=b), want.model(x), atol=1e-5), form


@pytest.mark.parametrize("method", [m for m in METHOD_NAMES if m != "mipp"])
def test_every_baseline_takes_keyword_inputs_or_refuses_in_one_line(method):
    """Labelled keyword inputs ``({"a", "b"}, y)`` give the units of the same labelled
    single tensor; SynFlow (an all-ones input) and IMP (mipp's training loop) refuse."""
    with seeded(0):
        flat = FlatNet().eval()
    pair = PairNet().eval()
    pair.load_state_dict(flat.state_dict())
    x, y = _pair_data(128)
    options = {"method": method, "sparsity": 0.5, "seed": 0}
    if method in ("ssl", "greg", "increg", "tpp", "oto"):  # train with mipp's loop on model(x)
        with pytest.raises(MippError, match=r"run as model\(x\)") as e:
            mipp.prune(pair, ({"a": x[:, :4], "b": x[:, 4:]}, y), **options)
        assert "\n" not in str(e.value)
        return
    if method == "slimming":  # no normalisation layer to score: refused, in one line
        with pytest.raises(MippError, match="have none") as e:
            mipp.prune(pair, ({"a": x[:, :4], "b": x[:, 4:]}, y), **options)
        assert "\n" not in str(e.value)
        return
    if method in ("synflow", "imp"):
        with pytest.raises(MippError) as e:
            mipp.prune(pair, ({"a": x[:, :4], "b": x[:, 4:]}, y), **options)
        assert "\n" not in str(e.value)
        assert ("all-ones input" if method == "synflow" else "IMP(retrain=callback)") in str(
            e.value
        )
        assert "keyword inputs a (4,) float32, b (4,) float32" in str(e.value)
        return
    want = mipp.prune(flat, (x, y), **options)
    got = mipp.prune(pair, ({"a": x[:, :4], "b": x[:, 4:]}, y), **options)
    assert _kept(got) == _kept(want)


def test_a_model_output_with_logits_is_read_by_the_default_forward():
    with seeded(0):
        flat = FlatNet().eval()
    wrapped = OutputNet().eval()
    wrapped.load_state_dict(flat.state_dict())
    x, _ = _pair_data()
    want = mipp.prune(flat, x, sparsity=0.5)
    got = mipp.prune(wrapped, x, sparsity=0.5)
    assert _kept(got) == _kept(want)
    with torch.no_grad():
        assert torch.allclose(got.model(x).logits, want.model(x), atol=1e-6)


def test_forward_picks_the_output_to_preserve():
    class FeaturesFirst(FlatNet):
        """Returns ``(features, logits)``: the default forward would take the features."""

        def forward(self, x):  # type: ignore[override]
            return x[:, :2] * 1.0, super().forward(x)

    with seeded(0):
        flat = FlatNet().eval()
    net = FeaturesFirst().eval()
    net.load_state_dict(flat.state_dict())
    x, _ = _pair_data()
    seen: list[type] = []

    def logits(model: nn.Module, batch) -> torch.Tensor:
        seen.append(type(batch))
        return model(batch)[1]

    got = mipp.prune(net, x, sparsity=0.5, forward=logits)
    assert _kept(got) == _kept(mipp.prune(flat, x, sparsity=0.5))
    assert got.report.options["forward"].endswith("logits")
    assert seen and set(seen) == {torch.Tensor}
    # by default the first element, the input's own features, is the output: no layer feeds it
    with pytest.raises(MippError, match="'fc1', 'fc2', 'out' run but do not feed the output"):
        mipp.prune(net, x, sparsity=0.5)


def test_a_bad_output_type_is_one_line_suggesting_forward():
    class Strings(FlatNet):
        def forward(self, x):  # type: ignore[override]
            return {"answer": super().forward(x).argmax(1).tolist()}

    with seeded(0):
        net = Strings().eval()
    x, _ = _pair_data(64)
    with pytest.raises(ModelOutputError) as e:
        mipp.prune(net, x, method="l1", sparsity=0.5)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("the model returned a dict, not a tensor") and "forward=" in message
    with pytest.raises(ModelOutputError, match="forward= returned a list; it must return"):
        mipp.prune(net, x, method="l1", sparsity=0.5, forward=lambda m, b: m(b)["answer"])


def test_samples_move_floats_to_the_model_dtype_and_integers_to_its_device_only():
    s = Samples({"ids": torch.arange(12).reshape(6, 2), "w": torch.ones(6, 3)})
    moved = s.to("cpu", torch.float64)
    assert moved.value["ids"].dtype == torch.int64 and moved.value["w"].dtype == torch.float64
    assert [len(b) for b in s.batches(4)] == [4, 2]
    assert torch.equal(s[torch.tensor([5, 0])].value["ids"], torch.tensor([[10, 11], [0, 1]]))
    assert s.sample_shape == (2,)
    with pytest.raises(MippError, match="different numbers of samples"):
        Samples((torch.ones(3, 2), torch.ones(4, 2)))
