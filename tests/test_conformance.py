"""Every registered method through the one pipeline (mipp.testing.methods), and proof that
the conformance check catches what it claims to catch."""

from __future__ import annotations

import pytest
import torch

from mipp.methods import METHOD_NAMES, Decision, Method, make_method
from mipp.methods.baselines import L1Norm
from mipp.testing.methods import check_method, tiny_data, tiny_model

#: methods that change the kept weights by design (ThiNet and DCP re-fit; IMP, SSL, GReg, IncReg,
#: TPP and OTO train; OBS updates; PFP reweights; sp-pai re-initialises and makes the kept
#: layers isometric)
CHANGE_WEIGHTS = {
    "thinet", "imp", "ssl", "greg", "increg", "tpp", "oto", "obs", "dcp", "pfp", "sp-pai",
}  # fmt: skip


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_registered_method_conforms(name):
    problems = check_method(lambda: make_method(name), exact=name not in CHANGE_WEIGHTS)
    if name == "slimming":  # the tiny model's Linear(32→12) has no BatchNorm to score
        assert problems == [
            "prune raised MippError: method 'slimming' scores the scale γ of each unit's "
            "normalisation layer; group(s) ['8'] have none (a model without BatchNorm cannot "
            "use it; exclude them with exclude=[...] or pick another method)"
        ]
        return
    assert problems == []


def test_methods_that_change_weights_are_caught_by_the_exact_check():
    problems = check_method("thinet", exact=True)
    assert len(problems) == 1 and problems[0].startswith("the pruned model differs")


class _Hooked(L1Norm):
    """Scores by L1 but leaves a forward hook on the working model."""

    name = "hooked"

    def scores(self, ctx):
        ctx.model.register_forward_hook(lambda *args: None)
        return super().scores(ctx)


class _Silent(Method):
    """Removes nothing whatever the budget, and says nothing about it."""

    name = "silent"

    def options(self):
        return {}

    def decide(self, ctx, budget):
        removed = {g.name: torch.zeros(g.size, dtype=torch.bool) for g in ctx.groups}
        return Decision(removed=removed, achieved=ctx.measure(removed))


class _Broken(Method):
    """Decides a mask of the wrong length."""

    name = "broken"

    def options(self):
        return {}

    def decide(self, ctx, budget):
        removed = {g.name: torch.zeros(g.size + 1, dtype=torch.bool) for g in ctx.groups}
        return Decision(removed=removed, achieved={"units": 0.0, "params": 0.0, "macs": 0.0})


def test_the_check_names_a_hook_left_behind():
    assert check_method(_Hooked()) == ["forward/backward hooks were left on a model"]


def test_the_check_names_a_silently_missed_request():
    problems = check_method(_Silent(), sparsity=0.5)
    assert problems == ["achieved misses the request by 0.5000 and no note says why"]


def test_the_pipeline_refuses_a_malformed_decision():
    (problem,) = check_method(_Broken())
    assert problem.startswith("prune raised MippError: method 'broken' decided no bool mask")


def test_tiny_model_has_mixed_modes_that_pruning_keeps():
    """The fix the check guards: modes are restored per module, not flattened."""
    model = tiny_model()
    assert model.training and not model[4].training and model[1].training
    x, y = tiny_data()
    assert tiny_data()[0].equal(x) and y.max() <= 3
    from mipp import prune

    pruned = prune(model, x, sparsity=0.5).model
    assert pruned.training and not pruned[4].training and pruned[1].training
